//! The NodePort flood: UDP frames generated in XDP in the client's
//! namespace and counted where they reach the backends.
//!
//! The generator is `vipr_bench_flood` run through BPF_PROG_TEST_RUN with
//! live frames: the kernel runs it on pages of a page pool and sends every
//! frame it returns `XDP_TX` for out of the client's end of the uplink, in
//! batches, at several million frames a second from one CPU. The node
//! takes them in its uplink's NAPI; with NAPI threaded there (see
//! `Rig::build`) that runs on the other CPU, so the flood measures what the
//! node forwards, not what the client's IP stack can send (a packet socket
//! costs about a microsecond a datagram, as much as a mode's whole
//! forwarding path). The generator outruns every mode: frames the node's
//! ring has no room for are dropped before the node sees them.
//!
//! The sink is `vipr_bench_sink` on every backend's `eth0` (in place of the
//! agent's pass program, through its pinned link): it counts and drops the
//! datagrams to the discard port, so each mode's figure is the node's
//! forwarding, as a backend machine's NIC would count it, without the
//! backend's own stack (the same work in every mode) diluting it.

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray},
    programs::{
        TestRun, TestRunAttrs, TestRunOptions, Xdp,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use nix::{
    sched::{CpuSet, sched_setaffinity},
    unistd::Pid,
};
use vipr_dataplane::vipr_common::bench::{FLOOD_HEADER_LEN, FloodPlan};

const FLOOD_PROGRAM: &str = "vipr_bench_flood";
const SINK_PROGRAM: &str = "vipr_bench_sink";
/// Frames per kernel batch: the most the kernel takes. It is also the size
/// of the ring through which the backends' CPU gives pages back to the
/// generator's page pool; with 64, most overflowed it and were freed on the
/// node's CPU and allocated again on the generator's.
const BATCH: u32 = 256;
/// Bytes of UDP payload in each datagram.
const PAYLOAD: usize = 18;
/// The discard port: the one the sink counts.
pub const DISCARD_PORT: u16 = 9;

/// The client's end of the node's uplink, and the Ethernet addresses its
/// frames carry (the client's, the node's uplink's).
#[derive(Clone, Copy, Debug)]
pub struct FloodLink {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// The datagrams of one flood.
#[derive(Clone, Copy, Debug)]
pub struct Datagrams {
    /// The first source address; `addresses` in a row are used.
    pub source: Ipv4Addr,
    pub addresses: u32,
    pub first_port: u16,
    /// Source ports used in turn (each with every address): flows =
    /// `ports * addresses`.
    pub ports: u32,
    pub target: (Ipv4Addr, u16),
}

/// The loaded packet tools.
pub struct PacketTools {
    ebpf: Ebpf,
}

impl PacketTools {
    pub fn load() -> Result<Self> {
        ensure!(
            !vipr_dataplane::BENCH_EBPF_OBJECT.is_empty(),
            "this vipr was built without the bench's packet tools (VIPR_EBPF_OBJECT without VIPR_BENCH_EBPF_OBJECT)"
        );
        let mut ebpf = EbpfLoader::new()
            .load(vipr_dataplane::BENCH_EBPF_OBJECT)
            .context("loading the bench's packet tools")?;
        for name in [FLOOD_PROGRAM, SINK_PROGRAM] {
            let tool = program(&mut ebpf, name)?;
            vipr_dataplane::load_retrying_interrupted(|| tool.load())
                .with_context(|| format!("loading {name}"))?;
        }
        Ok(PacketTools { ebpf })
    }

    /// Puts the sink in place of the program of the XDP link pinned at
    /// `pin` (a backend's `eth0`); it stays until the link goes.
    pub fn install_sink(&mut self, pin: &Path) -> Result<()> {
        let link = PinnedLink::from_pin(pin)
            .with_context(|| format!("opening the pinned link {}", pin.display()))?;
        let link = XdpLink::try_from(FdLink::from(link))
            .with_context(|| format!("{} is no XDP link", pin.display()))?;
        program(&mut self.ebpf, SINK_PROGRAM)?
            .attach_to_link(link)
            .with_context(|| format!("putting the sink on {}", pin.display()))?;
        Ok(())
    }

    /// A handle of its own on the sinks' count, readable while a flood
    /// runs on another thread.
    pub fn deliveries(&self) -> Result<Deliveries> {
        let map = self.ebpf.map("SINK_COUNT").context("no SINK_COUNT map")?;
        let aya::maps::Map::PerCpuArray(data) = map else {
            bail!("SINK_COUNT is no per-CPU array");
        };
        let id = data.info().context("SINK_COUNT's map info")?.id();
        let own = MapData::from_id(id).context("a handle of its own on SINK_COUNT")?;
        let counts = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(own))?;
        Ok(Deliveries { counts })
    }

    /// Floods `link` (the calling thread must be in its namespace) with
    /// `datagrams`: `frames` of them, or as many as the generator sends
    /// in `duration`. Returns the frames sent and the time it took.
    pub fn flood(
        &mut self,
        link: &FloodLink,
        datagrams: &Datagrams,
        amount: Amount,
    ) -> Result<(u64, Duration)> {
        let plan = FloodPlan {
            header: header(link, datagrams),
            first_port: datagrams.first_port,
            ports: datagrams.ports,
            addresses: datagrams.addresses,
        };
        let mut plans: Array<_, FloodPlan> = Array::try_from(
            self.ebpf
                .map_mut("FLOOD_PLAN")
                .context("no FLOOD_PLAN map")?,
        )?;
        plans.set(0, plan, 0).context("writing FLOOD_PLAN")?;
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .context("counting possible CPUs")?;
        let mut sent: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map_mut("FLOOD_SENT")
                .context("no FLOOD_SENT map")?,
        )?;
        sent.set(0, aya::maps::PerCpuValues::try_from(vec![0u64; cpus])?, 0)
            .context("zeroing FLOOD_SENT")?;

        let frame = frame(&plan.header);
        let ctx = xdp_md(link.ifindex, frame.len());
        let program = program(&mut self.ebpf, FLOOD_PROGRAM)?;
        let run = |repeat: u32| {
            program.test_run(TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(&ctx),
                repeat,
                attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                ..TestRunOptions::default()
            })
        };
        let started = Instant::now();
        match amount {
            Amount::Frames(frames) => {
                run(frames).context("running the flood generator (live frames)")?;
            }
            // One call, as many frames as it can take, ended by a signal:
            // each call sets up and tears down a page pool, and the
            // teardown waits for an RCU grace period (milliseconds), so
            // calls of a few thousand frames left the generator mostly
            // asleep.
            Amount::For(duration) => {
                let me = current_thread();
                let done = std::sync::Mutex::new(false);
                let interrupted = std::thread::scope(|scope| {
                    scope.spawn(|| interrupt_after(me, duration, &done));
                    let result = run(u32::MAX);
                    *done.lock().expect("flood timer") = true;
                    result
                });
                match interrupted {
                    Err(aya::programs::ProgramError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => {
                        return Err(e).context("running the flood generator (live frames)");
                    }
                    Ok(_) => {}
                }
            }
        }
        let took = started.elapsed();
        let sent: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("FLOOD_SENT").context("no FLOOD_SENT map")?)?;
        let sent = sent.get(&0, 0).context("reading FLOOD_SENT")?;
        Ok((sent.iter().sum(), took))
    }
}

/// The datagrams the backends' sinks have counted.
pub struct Deliveries {
    counts: PerCpuArray<MapData, u64>,
}

impl Deliveries {
    /// So far, all backends and CPUs together.
    pub fn count(&self) -> Result<u64> {
        Ok(self.counts.get(&0, 0)?.iter().sum())
    }
}

/// How much a flood sends.
#[derive(Clone, Copy, Debug)]
pub enum Amount {
    Frames(u32),
    For(Duration),
}

/// The calling thread's id, to signal it.
fn current_thread() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Sends SIGUSR1 to thread `tid` once `duration` has passed, unless `done`
/// is set first: it interrupts the generator's BPF_PROG_TEST_RUN, which
/// stops with EINTR when a signal is pending.
fn interrupt_after(tid: libc::pid_t, duration: Duration, done: &std::sync::Mutex<bool>) {
    ignore_usr1();
    let deadline = Instant::now() + duration;
    loop {
        let now = Instant::now();
        let done = done.lock().expect("flood timer");
        if *done {
            return;
        }
        if now >= deadline {
            // Under the lock, so the generator has not moved on to
            // anything else the signal could cut short.
            // SAFETY: a plain syscall on a thread of this process.
            unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1) };
            return;
        }
        drop(done);
        std::thread::sleep((deadline - now).min(Duration::from_millis(5)));
    }
}

/// A SIGUSR1 handler that does nothing: the signal only interrupts (the
/// default action would end the process).
fn ignore_usr1() {
    extern "C" fn nothing(_: libc::c_int) {}
    // SAFETY: a valid handler that touches nothing; no SA_RESTART.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = nothing as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut());
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?)
}

/// The `xdp_md` a live-frames run starts from: frames of `len` bytes
/// (the kernel wants `data_end` to say so) arrive on, and `XDP_TX` sends
/// them out of, interface `ifindex` of the calling thread's namespace.
fn xdp_md(ifindex: u32, len: usize) -> Vec<u8> {
    // data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
    [0u32, len as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect()
}

/// Ethernet, IPv4 and UDP headers of the flood's first frame.
fn header(link: &FloodLink, datagrams: &Datagrams) -> [u8; FLOOD_HEADER_LEN] {
    let mut h = [0u8; FLOOD_HEADER_LEN];
    h[0..6].copy_from_slice(&link.dst_mac);
    h[6..12].copy_from_slice(&link.src_mac);
    h[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut h[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + 8 + PAYLOAD) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64; // TTL
    ip[9] = libc::IPPROTO_UDP as u8;
    ip[12..16].copy_from_slice(&datagrams.source.octets());
    ip[16..20].copy_from_slice(&datagrams.target.0.octets());
    let check = ipv4_checksum(ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    let udp = &mut h[34..42];
    udp[0..2].copy_from_slice(&datagrams.first_port.to_be_bytes());
    udp[2..4].copy_from_slice(&datagrams.target.1.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + PAYLOAD) as u16).to_be_bytes());
    // UDP checksum 0: none computed, so ports and addresses change freely.
    h
}

/// A whole frame: the headers and a zero payload.
fn frame(header: &[u8; FLOOD_HEADER_LEN]) -> Vec<u8> {
    let mut frame = header.to_vec();
    frame.resize(FLOOD_HEADER_LEN + PAYLOAD, 0);
    frame
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    !(((folded & 0xffff) + (folded >> 16)) as u16)
}

/// Pins task `pid` (a thread, or a kernel thread such as a NAPI one; 0:
/// the calling thread) to `cpu`.
pub fn pin_task(pid: i32, cpu: usize) -> Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)
        .with_context(|| format!("CPU {cpu} is beyond a CPU set"))?;
    sched_setaffinity(Pid::from_raw(pid), &set)
        .with_context(|| format!("pinning task {pid} to CPU {cpu}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_a_valid_udp_datagram() {
        let link = FloodLink {
            ifindex: 1,
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
        };
        let datagrams = Datagrams {
            source: Ipv4Addr::new(198, 18, 0, 1),
            addresses: 1,
            first_port: 1024,
            ports: 1,
            target: (Ipv4Addr::new(172, 31, 0, 2), 30080),
        };
        let frame = frame(&header(&link, &datagrams));
        let ip = &frame[14..34];
        assert_eq!(
            ipv4_checksum(ip),
            0,
            "a header with its checksum sums to zero"
        );
        assert_eq!(
            u16::from_be_bytes([ip[2], ip[3]]) as usize,
            frame.len() - 14
        );
        assert_eq!(&frame[36..38], &30080u16.to_be_bytes());
        assert_eq!(xdp_md(7, 60).len(), 24, "the size of struct xdp_md");
    }
}
