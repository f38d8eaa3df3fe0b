//! Control-plane programming cost: how long it takes to get service changes
//! into the maps, side by side with kube-proxy's iptables mode.
//!
//!     cargo bench -p vipr-dataplane --bench programming [-- --quick]
//!
//! Needs root (loads the eBPF object; runs iptables-restore inside network
//! namespaces it creates and deletes). Prints one table:
//!
//! A. One endpoint change (`program_service` of one frontend: add a
//!    backend, remove one, replace one) with N ClusterIP frontends of 2
//!    backends each already programmed, N = 1,000 / 10,000 / 50,000.
//! B. Programming N frontends from empty (N x 2 backends, and 10,000 x 10),
//!    each repetition into a freshly loaded data plane; with the process's
//!    VmRSS and the kernel's memlock of the BPF maps.
//! C. kube-proxy iptables mode for 1,000 and 10,000 services x 2 endpoints:
//!    full iptables-restore into an empty namespace, a full resync (the
//!    whole KUBE-* ruleset re-written with --noflush, kube-proxy before
//!    1.28), the 1.28+ partial sync (KUBE-SERVICES plus the changed
//!    service's chains), and a single-service update (best case).
//!
//! D. Removing one backend of a UDP frontend while conntrack holds F flows
//!    (half of them to that backend, cleared at once), F = 10,000 and
//!    262,144 (the default capacity). `-- --udp-cleanup` runs only this.
//!
//! Every figure is the median over repetitions with [min-max] across them;
//! the machine this is meant for has 2 shared cores, so single numbers lie.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use vipr_dataplane::{BackendAddr, Dataplane, DataplaneOptions, Frontend, Port, Protocol};

/// Sizes of the service table, for one endpoint change and from empty.
const CHANGE_SIZES: [u32; 3] = [1_000, 10_000, 50_000];
/// Services for the "100,000 endpoints" case, and backends per service.
const BIG_SERVICES: u32 = 10_000;
const BIG_BACKENDS: u32 = 10;
/// Service counts for the iptables comparison (2 endpoints each).
const IPTABLES_SIZES: [usize; 2] = [1_000, 10_000];

struct Config {
    /// Repetitions of each from-empty load (a fresh data plane each).
    load_reps: usize,
    /// Rounds of single changes; p50/p99 are taken per round.
    change_rounds: usize,
    /// add/remove/replace cycles per round.
    change_cycles: usize,
    /// Fresh namespaces per iptables size.
    ipt_reps: usize,
    /// Updates timed in each namespace, per update kind.
    ipt_full_updates: usize,
    ipt_small_updates: usize,
}

impl Config {
    fn new(quick: bool) -> Self {
        if quick {
            Config {
                load_reps: 2,
                change_rounds: 3,
                change_cycles: 300,
                ipt_reps: 1,
                ipt_full_updates: 2,
                ipt_small_updates: 5,
            }
        } else {
            Config {
                load_reps: 5,
                change_rounds: 5,
                change_cycles: 2_000,
                // A full 10,000-service restore with iptables-nft takes
                // over a minute here: 2 x (1 + 2) of them bound the run.
                ipt_reps: 2,
                ipt_full_updates: 2,
                ipt_small_updates: 10,
            }
        }
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let udp_cleanup_only = std::env::args().any(|a| a == "--udp-cleanup");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("programming bench: needs root (eBPF maps, network namespaces); skipped");
        return;
    }
    install_interrupt_handler();
    remove_leftovers();
    let config = Config::new(quick);
    let mut out = String::new();
    if udp_cleanup_only {
        section_udp_cleanup(&mut out);
        print!("{out}");
        return;
    }
    let _ = writeln!(
        out,
        "vipr-dataplane programming bench{} -- figures: median [min-max] over repetitions",
        if quick { " (--quick)" } else { "" }
    );

    // The 100,000-endpoint case first, so its RSS figures start from a
    // process that has not yet held (and kept in its allocator) a table.
    let big = from_empty(BIG_SERVICES, BIG_BACKENDS, config.load_reps);
    let mut loads = Vec::new();
    let mut changes = Vec::new();
    for n in CHANGE_SIZES {
        let (load, dp) = from_empty_keep(n, 2, config.load_reps);
        loads.push(load);
        let mut dp = dp;
        changes.push((n, one_change(&mut dp, n, &config)));
        drop(dp);
    }

    section_changes(&mut out, &changes, &config);
    section_loads(&mut out, &loads, &big, config.load_reps);
    // Printed before the iptables part, which may fail on a host without it.
    print!("{out}");
    out.clear();

    let iptables = iptables_all(&config);
    section_iptables(&mut out, &iptables, &config);
    section_udp_cleanup(&mut out);
    print!("{out}");
}

// ---------------------------------------------------------------------------
// D. UDP flows of a removed backend

/// Conntrack fill levels for the UDP cleanup case.
const UDP_CLEANUP_FLOWS: [u32; 2] = [10_000, 262_144];

/// An Ethernet + IPv4 + UDP datagram (checksum 0: none) from `client:port` to `vip:53`.
fn udp_datagram(client: Ipv4Addr, port: u16, vip: Ipv4Addr) -> Vec<u8> {
    let mut frame = vec![0u8; 12];
    frame.extend([0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0];
    ip.extend(client.octets());
    ip.extend(vip.octets());
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let check = !((sum & 0xffff) + (sum >> 16)) as u16;
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    frame.extend(ip);
    frame.extend(port.to_be_bytes());
    frame.extend(53u16.to_be_bytes());
    frame.extend([0, 8, 0, 0]);
    frame
}

/// Seconds of one idle-flow expiry pass (nothing idle) and of removing one
/// of two backends of a UDP frontend, with `flows` flows open; flows cleared.
fn udp_cleanup(flows: u32) -> (f64, f64, usize) {
    let mut dp = Dataplane::load(&DataplaneOptions {
        max_flows: flows,
        ebpf_log_level: log::LevelFilter::Off,
        ..DataplaneOptions::default()
    })
    .expect("loading the data plane (needs root)");
    let vip = Ipv4Addr::new(10, 96, 0, 53);
    let fe = Frontend {
        addr: vip,
        port: Port::new(53).unwrap(),
        protocol: Protocol::Udp,
    };
    let (a, b) = (spare_backend(1), spare_backend(2));
    dp.program_service(fe, &[a, b]).unwrap();
    let mut out = vec![0u8; 128];
    for i in 0..flows {
        check_interrupted();
        let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + i / 50_000);
        let packet = udp_datagram(client, 1024 + (i % 50_000) as u16, vip);
        dp.test_run(&packet, &mut out, 1).expect("test run");
    }
    let before = dp.flows().unwrap().len();
    let mut expirer = dp.flow_expirer().unwrap();
    let started = Instant::now();
    let expiry = expirer.expire_idle(&Default::default()).unwrap();
    let expiry_secs = started.elapsed().as_secs_f64();
    assert_eq!((expiry.flows, expiry.expired), (before, 0));
    let started = Instant::now();
    dp.program_service(fe, &[a]).unwrap();
    let secs = started.elapsed().as_secs_f64();
    (expiry_secs, secs, before - dp.flows().unwrap().len())
}

fn section_udp_cleanup(out: &mut String) {
    let _ = writeln!(
        out,
        "\nD. conntrack holding F flows: one idle-flow expiry pass (nothing idle), and removing\n   \
         one of 2 backends of a UDP frontend (its flows are cleared in the same call)"
    );
    let _ = writeln!(
        out,
        "   {:>9}  {:>16}  {:>16}  {:>14}",
        "F flows", "expiry pass ms", "removal ms", "flows cleared"
    );
    for flows in UDP_CLEANUP_FLOWS {
        let (expiry, removal, cleared) = udp_cleanup(flows);
        let _ = writeln!(
            out,
            "   {flows:>9}  {:>16.1}  {:>16.1}  {cleared:>14}",
            expiry * 1e3,
            removal * 1e3
        );
    }
}

// ---------------------------------------------------------------------------
// interruption and cleanup

/// Set by SIGINT / SIGTERM (`timeout`, Ctrl-C): the run stops at its next
/// check by panicking, so unwinding deletes its namespaces and files.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn install_interrupt_handler() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

fn check_interrupted() {
    assert!(
        !INTERRUPTED.load(Ordering::Relaxed),
        "interrupted: cleaning up"
    );
}

/// Namespaces and scratch folders of earlier runs of this bench whose
/// process is gone (killed before it could clean up).
fn remove_leftovers() {
    let dead = |name: &str, prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| {
                pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
            })
    };
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name, "vipr-bench-") {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name, "vipr-bench-iptables-") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// vipr

fn frontend(i: u32) -> Frontend {
    Frontend {
        // 10.96.x.y
        addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i),
        port: Port::new(80).expect("non-zero"),
        protocol: Protocol::Tcp,
    }
}

fn backend(base: Ipv4Addr, index: u32) -> BackendAddr {
    BackendAddr {
        addr: Ipv4Addr::from(u32::from(base) + index),
        port: Port::new(8080).expect("non-zero"),
    }
}

/// Backend `j` of service `i` when services have `per` backends.
fn backend_of(i: u32, j: u32, per: u32) -> BackendAddr {
    backend(Ipv4Addr::new(10, 128, 0, 0), i * per + j)
}

/// A third address for service `i`, outside every base list.
fn spare_backend(i: u32) -> BackendAddr {
    backend(Ipv4Addr::new(10, 192, 0, 0), i)
}

fn load(services: u32, backends_per: u32) -> Dataplane {
    Dataplane::load(&DataplaneOptions {
        max_services: services,
        // Room for the one extra backend of the "add" change.
        max_backends: services * backends_per + 64,
        ebpf_log_level: log::LevelFilter::Off,
        ..DataplaneOptions::default()
    })
    .expect("loading the data plane (needs root)")
}

struct LoadResult {
    services: u32,
    backends_per: u32,
    /// Seconds to program all services, per repetition.
    secs: Vec<f64>,
    /// VmRSS (KiB) before load, after load, after programming: first repetition.
    rss: [u64; 3],
    /// memlock (KiB) of all BPF maps the process holds, after programming.
    map_memlock: u64,
}

fn from_empty(services: u32, backends_per: u32, reps: usize) -> LoadResult {
    from_empty_keep(services, backends_per, reps).0
}

/// Programs `services` frontends into a freshly loaded data plane `reps`
/// times; returns the timings and the last (still loaded) data plane.
fn from_empty_keep(services: u32, backends_per: u32, reps: usize) -> (LoadResult, Dataplane) {
    let mut secs = Vec::with_capacity(reps);
    let mut rss = [0; 3];
    let mut map_memlock = 0;
    let mut last = None;
    let lists: Vec<Vec<BackendAddr>> = (0..services)
        .map(|i| {
            (0..backends_per)
                .map(|j| backend_of(i, j, backends_per))
                .collect()
        })
        .collect();
    for rep in 0..reps.max(1) {
        check_interrupted();
        // The previous data plane's maps close before the next load.
        drop(last.take());
        let before_load = vm_rss_kib();
        let mut dp = load(services, backends_per);
        let after_load = vm_rss_kib();
        let start = Instant::now();
        for (i, list) in (0..services).zip(&lists) {
            dp.program_service(frontend(i), list)
                .expect("programming a frontend");
        }
        secs.push(start.elapsed().as_secs_f64());
        if rep == 0 {
            rss = [before_load, after_load, vm_rss_kib()];
            map_memlock = bpf_map_memlock_kib();
        }
        assert_eq!(dp.frontends().len(), services as usize);
        last = Some(dp);
    }
    (
        LoadResult {
            services,
            backends_per,
            secs,
            rss,
            map_memlock,
        },
        last.expect("at least one repetition"),
    )
}

/// Per-round p50 and p99 (µs) of each change kind.
struct ChangeResult {
    add: Vec<(f64, f64)>,
    remove: Vec<(f64, f64)>,
    replace: Vec<(f64, f64)>,
}

/// Times single `program_service` calls on random frontends of a table of
/// `n` frontends with backends [a, b]: add ([a, b] -> [a, b, c]), remove
/// ([a, b, c] -> [a, c]) and replace ([a, c] -> [a, b], back to the start).
fn one_change(dp: &mut Dataplane, n: u32, config: &Config) -> ChangeResult {
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut result = ChangeResult {
        add: Vec::new(),
        remove: Vec::new(),
        replace: Vec::new(),
    };
    let timed = |dp: &mut Dataplane, f: Frontend, list: &[BackendAddr]| {
        let start = Instant::now();
        dp.program_service(f, list).expect("programming a change");
        start.elapsed()
    };
    // Warm up: fault in the code paths and the userspace table.
    for i in 0..n.min(100) {
        let list = [backend_of(i, 0, 2), backend_of(i, 1, 2)];
        dp.program_service(frontend(i), &list).expect("warm up");
    }
    for _ in 0..config.change_rounds {
        check_interrupted();
        let mut add = Vec::with_capacity(config.change_cycles);
        let mut remove = Vec::with_capacity(config.change_cycles);
        let mut replace = Vec::with_capacity(config.change_cycles);
        for _ in 0..config.change_cycles {
            rng = rng
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let i = ((rng >> 33) % u64::from(n)) as u32;
            let (a, b, c) = (backend_of(i, 0, 2), backend_of(i, 1, 2), spare_backend(i));
            let f = frontend(i);
            add.push(timed(dp, f, &[a, b, c]));
            remove.push(timed(dp, f, &[a, c]));
            replace.push(timed(dp, f, &[a, b]));
        }
        result.add.push(p50_p99_us(&mut add));
        result.remove.push(p50_p99_us(&mut remove));
        result.replace.push(p50_p99_us(&mut replace));
    }
    assert_eq!(dp.frontends().len(), n as usize);
    result
}

fn p50_p99_us(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(percentile(samples, 0.50)), us(percentile(samples, 0.99)))
}

fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Sum of the `memlock` the kernel accounts to every BPF map fd this
/// process holds (kernel memory, not part of VmRSS).
fn bpf_map_memlock_kib() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return 0;
    };
    let mut bytes = 0u64;
    for entry in dir.flatten() {
        let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if !info.contains("map_type:") {
            continue;
        }
        bytes += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    bytes / 1024
}

// ---------------------------------------------------------------------------
// kube-proxy, iptables mode

/// A network namespace of our own, deleted on drop (also when unwinding).
struct Netns(String);

impl Netns {
    fn create(tag: &str) -> Netns {
        check_interrupted();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("vipr-bench-{}-{tag}-{nanos}", std::process::id());
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("running ip netns add");
        assert!(status.success(), "ip netns add {name} failed");
        Netns(name)
    }

    /// `ip netns exec <ns> <args>`; panics on failure. Returns the wall time.
    fn exec(&self, args: &[&str]) -> Duration {
        check_interrupted();
        let start = Instant::now();
        let output = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running ip netns exec");
        let elapsed = start.elapsed();
        assert!(
            output.status.success(),
            "ip netns exec {} {args:?}: {}",
            self.0,
            String::from_utf8_lossy(&output.stderr)
        );
        elapsed
    }

    fn exec_output(&self, args: &[&str]) -> String {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .expect("running ip netns exec");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn restore(&self, file: &Path) -> Duration {
        let file = file.to_str().expect("utf-8 path");
        self.exec(&["iptables-restore", "--noflush", "--counters", file])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A scratch folder for the restore files, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let dir = std::env::temp_dir().join(format!("vipr-bench-iptables-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the scratch folder");
        Scratch(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("writing a restore file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// kube-proxy's chain names: a prefix and 16 base32 characters of a hash
/// (kube-proxy hashes with SHA-256; any stable hash gives the same shape).
fn chain_name(prefix: &str, seed: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h = 0xcbf2_9ce4_8422_2325_u64;
    let mut name = String::with_capacity(prefix.len() + 16);
    name.push_str(prefix);
    for round in 0..2u8 {
        for b in seed.bytes().chain([round]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let mut bits = h;
        for _ in 0..8 {
            name.push(char::from(ALPHABET[(bits & 31) as usize]));
            bits >>= 5;
        }
    }
    name
}

fn svc_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i as u32)
}

/// The endpoints of service `i`; `alternate` swaps the second one.
fn ipt_endpoints(i: usize, alternate: bool) -> [Ipv4Addr; 2] {
    let base = u32::from(Ipv4Addr::new(10, 128, 0, 0));
    let second = if alternate {
        u32::from(Ipv4Addr::new(10, 192, 0, 0)) + i as u32
    } else {
        base + 2 * i as u32 + 1
    };
    [Ipv4Addr::from(base + 2 * i as u32), Ipv4Addr::from(second)]
}

fn svc_name(i: usize) -> String {
    format!("default/svc-{i}:http")
}

fn svc_chain(i: usize) -> String {
    chain_name("KUBE-SVC-", &format!("{}tcp", svc_name(i)))
}

fn sep_chain(i: usize, ep: Ipv4Addr) -> String {
    chain_name("KUBE-SEP-", &format!("{}tcp{ep}:8080", svc_name(i)))
}

const KUBE_SERVICES_LAST: &str = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";

fn kube_services_rule(out: &mut String, i: usize) {
    let _ = writeln!(
        out,
        "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {}/32 --dport 80 -j {}",
        svc_name(i),
        svc_ip(i),
        svc_chain(i)
    );
}

/// Declarations (`:CHAIN`) of service `i`'s chains.
fn service_chain_decls(out: &mut String, i: usize, alternate: bool) {
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(i));
    for ep in ipt_endpoints(i, alternate) {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(i, ep));
    }
}

/// The rules of service `i`'s KUBE-SVC and KUBE-SEP chains.
fn service_chain_rules(out: &mut String, i: usize, alternate: bool) {
    let name = svc_name(i);
    let svc = svc_chain(i);
    let eps = ipt_endpoints(i, alternate);
    let _ = writeln!(
        out,
        "-A {svc} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {}/32 --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ",
        svc_ip(i)
    );
    for (k, ep) in eps.iter().enumerate() {
        let remaining = eps.len() - k;
        let probability = if remaining > 1 {
            format!(
                " -m statistic --mode random --probability {:.10}",
                1.0 / remaining as f64
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "-A {svc} -m comment --comment \"{name} -> {ep}:8080\"{probability} -j {}",
            sep_chain(i, *ep)
        );
    }
    for ep in eps {
        let sep = sep_chain(i, ep);
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment {name} -s {ep}/32 -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment {name} -m tcp -p tcp -j DNAT --to-destination {ep}:8080"
        );
    }
}

/// The whole ruleset kube-proxy writes on a full sync (as it does, with
/// `--noflush`: every declared chain is flushed and re-filled). Service
/// `alternate` has its second endpoint swapped; `stale` names the chains
/// to delete (endpoints gone since the last sync).
fn full_ruleset(n: usize, alternate: Option<usize>, stale: &[String]) -> String {
    let mut out = String::with_capacity(n * 1_200);
    out.push_str(
        "*filter\n\
         :KUBE-SERVICES - [0:0]\n\
         :KUBE-EXTERNAL-SERVICES - [0:0]\n\
         :KUBE-FORWARD - [0:0]\n\
         :KUBE-NODEPORTS - [0:0]\n\
         :KUBE-PROXY-FIREWALL - [0:0]\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n\
         *nat\n\
         :KUBE-SERVICES - [0:0]\n\
         :KUBE-NODEPORTS - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]\n",
    );
    for i in 0..n {
        service_chain_decls(&mut out, i, alternate == Some(i));
    }
    // As kube-proxy: a chain to delete is declared (so flushed) first;
    // iptables only deletes empty chains.
    for chain in stale {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    out.push_str(
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    for i in 0..n {
        kube_services_rule(&mut out, i);
    }
    out.push_str(KUBE_SERVICES_LAST);
    for i in 0..n {
        service_chain_rules(&mut out, i, alternate == Some(i));
    }
    for chain in stale {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

/// kube-proxy 1.28+ partial sync after one service's endpoints changed:
/// KUBE-SERVICES re-written in full, plus the changed service's chains.
fn partial_ruleset(n: usize, changed: usize, alternate: bool, stale: &str) -> String {
    let mut out = String::with_capacity(n * 200);
    out.push_str("*nat\n:KUBE-SERVICES - [0:0]\n");
    service_chain_decls(&mut out, changed, alternate);
    let _ = writeln!(out, ":{stale} - [0:0]");
    for i in 0..n {
        kube_services_rule(&mut out, i);
    }
    out.push_str(KUBE_SERVICES_LAST);
    service_chain_rules(&mut out, changed, alternate);
    let _ = writeln!(out, "-X {stale}");
    out.push_str("COMMIT\n");
    out
}

/// The least any iptables update of one endpoint can write: the changed
/// service's KUBE-SVC chain, its new KUBE-SEP chain, the old one deleted.
fn single_service_ruleset(changed: usize, alternate: bool, stale: &str) -> String {
    let mut out = String::from("*nat\n");
    service_chain_decls(&mut out, changed, alternate);
    let _ = writeln!(out, ":{stale} - [0:0]");
    service_chain_rules(&mut out, changed, alternate);
    let _ = writeln!(out, "-X {stale}");
    out.push_str("COMMIT\n");
    out
}

/// The chain that goes away when service `i` switches to `alternate`.
fn stale_sep(i: usize, alternate: bool) -> String {
    sep_chain(i, ipt_endpoints(i, !alternate)[1])
}

struct IptablesResult {
    n: usize,
    rules: usize,
    file_kib: usize,
    /// Wall ms of each kind of restore.
    full_load: Vec<f64>,
    full_resync: Vec<f64>,
    partial: Vec<f64>,
    single: Vec<f64>,
}

struct IptablesRun {
    version: String,
    /// `ip netns exec <ns> true`: the process overhead in every figure.
    exec_floor: Vec<f64>,
    results: Vec<IptablesResult>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn iptables_all(config: &Config) -> IptablesRun {
    let version = Command::new("iptables-restore")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let scratch = Scratch::new();
    let mut exec_floor = Vec::new();
    {
        let ns = Netns::create("floor");
        for _ in 0..10 {
            exec_floor.push(ms(ns.exec(&["true"])));
        }
    }
    let results = IPTABLES_SIZES
        .iter()
        .map(|&n| iptables_size(n, config, &scratch))
        .collect();
    IptablesRun {
        version,
        exec_floor,
        results,
    }
}

fn iptables_size(n: usize, config: &Config, scratch: &Scratch) -> IptablesResult {
    // The service whose endpoint changes: in the middle of the table.
    let changed = n / 2;
    let initial = full_ruleset(n, None, &[]);
    let initial_path = scratch.write(&format!("full-{n}.rules"), &initial);
    // Restore files for both directions of the change (to the alternate
    // endpoint and back), so every update really changes the ruleset.
    let by_direction = |alternate: bool| {
        let stale = stale_sep(changed, alternate);
        let tag = if alternate { "a" } else { "b" };
        (
            scratch.write(
                &format!("resync-{n}-{tag}.rules"),
                &full_ruleset(
                    n,
                    alternate.then_some(changed),
                    std::slice::from_ref(&stale),
                ),
            ),
            scratch.write(
                &format!("partial-{n}-{tag}.rules"),
                &partial_ruleset(n, changed, alternate, &stale),
            ),
            scratch.write(
                &format!("single-{n}-{tag}.rules"),
                &single_service_ruleset(changed, alternate, &stale),
            ),
        )
    };
    let to_alternate = by_direction(true);
    let back = by_direction(false);

    let mut result = IptablesResult {
        n,
        rules: 0,
        file_kib: initial.len() / 1024,
        full_load: Vec::new(),
        full_resync: Vec::new(),
        partial: Vec::new(),
        single: Vec::new(),
    };
    for rep in 0..config.ipt_reps {
        let ns = Netns::create(&format!("{n}-{rep}"));
        // kube-proxy's jumps from the built-in chains (it adds them with
        // single iptables calls; untimed here).
        let jumps = scratch.write(
            "jumps.rules",
            "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n\
             -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
             COMMIT\n",
        );
        ns.restore(&jumps);
        result.full_load.push(ms(ns.restore(&initial_path)));
        if rep == 0 {
            result.rules = ns
                .exec_output(&["iptables-save"])
                .lines()
                .filter(|l| l.starts_with("-A "))
                .count();
        }
        // Each update flips the changed service's second endpoint; the
        // next kind starts from where the last one left off.
        let mut alternate = false;
        let mut flip = |kind: usize, count: usize, samples: &mut Vec<f64>| {
            for _ in 0..count {
                alternate = !alternate;
                let files = if alternate { &to_alternate } else { &back };
                let path = match kind {
                    0 => &files.0,
                    1 => &files.1,
                    _ => &files.2,
                };
                samples.push(ms(ns.restore(path)));
            }
        };
        flip(0, config.ipt_full_updates, &mut result.full_resync);
        flip(1, config.ipt_small_updates, &mut result.partial);
        flip(2, config.ipt_small_updates, &mut result.single);
        drop(ns);
    }
    result
}

// ---------------------------------------------------------------------------
// the table

/// "median [min-max]" of `values`.
fn spread(values: &[f64], precision: usize) -> String {
    let mut v = values.to_vec();
    v.sort_unstable_by(f64::total_cmp);
    if v.is_empty() {
        return "-".to_owned();
    }
    format!(
        "{:.p$} [{:.p$}-{:.p$}]",
        percentile(&v, 0.5),
        v[0],
        v[v.len() - 1],
        p = precision
    )
}

fn section_changes(out: &mut String, changes: &[(u32, ChangeResult)], config: &Config) {
    let _ = writeln!(
        out,
        "\nA. one endpoint change: program_service of ONE frontend, N frontends x 2 backends programmed\n   \
         us per call; p50 and p99 of {} calls per round, median [min-max] over {} rounds",
        config.change_cycles, config.change_rounds
    );
    let _ = writeln!(
        out,
        "   {:>7}  {:<28} {:>24} {:>24}",
        "N", "change", "p50 us", "p99 us"
    );
    for (n, result) in changes {
        for (label, rounds) in [
            ("add [a,b] -> [a,b,c]", &result.add),
            ("remove [a,b,c] -> [a,c]", &result.remove),
            ("replace [a,c] -> [a,b]", &result.replace),
        ] {
            let p50: Vec<f64> = rounds.iter().map(|r| r.0).collect();
            let p99: Vec<f64> = rounds.iter().map(|r| r.1).collect();
            let _ = writeln!(
                out,
                "   {:>7}  {:<28} {:>24} {:>24}",
                n,
                label,
                spread(&p50, 1),
                spread(&p99, 1)
            );
        }
    }
}

fn section_loads(out: &mut String, loads: &[LoadResult], big: &LoadResult, reps: usize) {
    let _ = writeln!(
        out,
        "\nB. programming from empty (fresh data plane each repetition, {reps} repetitions; maps sized to fit)"
    );
    let _ = writeln!(
        out,
        "   {:<26} {:>30} {:>12}",
        "services x backends", "total ms", "us/service"
    );
    for load in loads.iter().chain([big]) {
        let ms: Vec<f64> = load.secs.iter().map(|s| s * 1e3).collect();
        let per: Vec<f64> = load
            .secs
            .iter()
            .map(|s| s * 1e6 / f64::from(load.services))
            .collect();
        let mut per_sorted = per.clone();
        per_sorted.sort_unstable_by(f64::total_cmp);
        let _ = writeln!(
            out,
            "   {:<26} {:>30} {:>12.1}",
            format!(
                "{} x {} ({} endpoints)",
                load.services,
                load.backends_per,
                load.services * load.backends_per
            ),
            spread(&ms, 1),
            percentile(&per_sorted, 0.5)
        );
    }
    let _ = writeln!(
        out,
        "\n   memory, first repetition, MiB (VmRSS is userspace only; the maps are kernel memory, see memlock)\n   \
         {:<26} {:>12} {:>12} {:>14} {:>16}",
        "services x backends", "VmRSS before", "after load", "after program", "BPF map memlock"
    );
    let _ = writeln!(
        out,
        "   (rows in run order: the first starts from a fresh process; later ones from the\n   \
         allocator's leftovers of earlier tables. memlock includes the flow maps, default size)"
    );
    for load in [big].into_iter().chain(loads) {
        let mib = |kib: u64| kib as f64 / 1024.0;
        let _ = writeln!(
            out,
            "   {:<26} {:>12.1} {:>12.1} {:>14.1} {:>16.1}",
            format!("{} x {}", load.services, load.backends_per),
            mib(load.rss[0]),
            mib(load.rss[1]),
            mib(load.rss[2]),
            mib(load.map_memlock)
        );
    }
}

fn section_iptables(out: &mut String, run: &IptablesRun, config: &Config) {
    let _ = writeln!(
        out,
        "\nC. kube-proxy iptables mode, services x 2 endpoints: `ip netns exec <own ns> iptables-restore --noflush --counters <file>`\n   \
         iptables-restore: {}; wall ms, median [min-max]; {} namespace(s) per size\n   \
         floor (`ip netns exec <ns> true`): {} ms, included in every figure below",
        run.version,
        config.ipt_reps,
        spread(&run.exec_floor, 1)
    );
    let _ = writeln!(
        out,
        "   {:>7} {:>8} {:>9}  {:>24} {:>24} {:>24} {:>24}",
        "svcs",
        "rules",
        "file KiB",
        "full load (empty ns)",
        "full resync (<1.28)",
        "partial sync (1.28+)",
        "one service only"
    );
    for r in &run.results {
        let _ = writeln!(
            out,
            "   {:>7} {:>8} {:>9}  {:>24} {:>24} {:>24} {:>24}",
            r.n,
            r.rules,
            r.file_kib,
            spread(&r.full_load, 1),
            spread(&r.full_resync, 1),
            spread(&r.partial, 1),
            spread(&r.single, 1)
        );
    }
    let _ = writeln!(
        out,
        "   full resync: the whole KUBE-* ruleset re-written for one endpoint change; partial: KUBE-SERVICES\n   \
         (every service's jump) + the changed service's chains; one service only: its KUBE-SVC chain and\n   \
         new KUBE-SEP chain, the old KUBE-SEP chain deleted (the least any iptables update writes)."
    );
}
