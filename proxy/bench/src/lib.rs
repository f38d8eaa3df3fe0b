//! `vipr bench`: vipr next to kube-proxy's iptables (legacy and nft
//! backends), nftables and IPVS modes, and the direct path with no virtual
//! IP, measured on one rig of network namespaces with the same client and
//! the same backend pods.
//!
//! For each scale (number of services) the modes take turns within a round
//! and the order flips every round (A B C, C B A, ...), so drift on a
//! shared machine spreads over all of them; each figure is reported as the
//! median over the rounds with its minimum and maximum.
//!
//! Modules: `rig` (namespaces, agent, pods), `modes` (how each mode is
//! programmed), `kube_proxy` (kube-proxy's rule layouts), `client` (the
//! connections), `flood` (the NodePort flood and the backends' sink),
//! `report` (JSON, table, plot).

pub mod client;
pub mod flood;
pub mod kube_proxy;
pub mod modes;
pub mod report;
pub mod rig;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{
    modes::{Mode, Programmer},
    report::{Latency, Machine, Results, Round, Run},
    rig::Rig,
};

pub struct BenchOptions {
    pub services: Vec<usize>,
    pub endpoints: usize,
    pub rounds: usize,
    pub connections: usize,
    /// Distinct source ports of the steady NodePort flood (each a flow).
    pub udp_flows: u16,
    /// How long each flood lasts (the new-flow flood: half of it).
    pub udp_duration: Duration,
    pub output: PathBuf,
    /// Modes to leave out (by name), e.g. the slow iptables-nft at 50,000.
    pub skip: Vec<String>,
    /// The agent's XDP forwarding fast path (`--xdp-redirect`).
    pub xdp_redirect: bool,
}

impl BenchOptions {
    /// `--quick`: 1 and 10,000 services, one round, lighter load.
    pub fn quick(output: PathBuf) -> Self {
        BenchOptions {
            services: vec![1, 10_000],
            endpoints: 2,
            rounds: 1,
            connections: 1_000,
            udp_flows: 8_192,
            udp_duration: Duration::from_secs(1),
            output,
            skip: Vec::new(),
            xdp_redirect: true,
        }
    }

    pub fn full(output: PathBuf) -> Self {
        BenchOptions {
            services: vec![1, 1_000, 10_000, 50_000],
            endpoints: 2,
            rounds: 3,
            connections: 3_000,
            udp_flows: 8_192,
            udp_duration: Duration::from_secs(2),
            output,
            skip: Vec::new(),
            xdp_redirect: true,
        }
    }
}

/// Set by SIGINT / SIGTERM: the run stops at its next step and the rig's
/// guards tear everything down on the way out.
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

/// Fails once SIGINT / SIGTERM came; every wait loop of the run calls it.
pub(crate) fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted: the rig was torn down");
    }
    Ok(())
}

/// Runs the whole benchmark and writes `results.json` and `results.svg`.
pub fn run(options: &BenchOptions) -> Result<Results> {
    install_interrupt_handler();
    let modes: Vec<(Mode, Option<String>)> = Mode::ALL
        .into_iter()
        .map(|m| {
            let skipped = options.skip.iter().any(|s| s == m.name());
            let reason = if skipped {
                Some("left out with --skip".to_owned())
            } else {
                m.unavailable()
            };
            (m, reason)
        })
        .collect();
    let runnable: Vec<Mode> = modes
        .iter()
        .filter(|(_, r)| r.is_none())
        .map(|(m, _)| *m)
        .collect();
    let steps = options.services.len() * options.rounds * runnable.len();
    let progress = ProgressBar::new(steps as u64 + 1);
    progress.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    progress.set_message("building the rig (agent, backend pods)");
    let rig = Rig::build(options.endpoints.max(2), options.xdp_redirect)?;
    progress.inc(1);

    let mut runs = Vec::new();
    for &n in &options.services {
        let mut rounds: Vec<Vec<Round>> = runnable.iter().map(|_| Vec::new()).collect();
        for round in 0..options.rounds {
            let mut order: Vec<usize> = (0..runnable.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for k in order {
                check_interrupted()?;
                let mode = runnable[k];
                progress.set_message(format!(
                    "{} services, round {}/{}: {}",
                    n,
                    round + 1,
                    options.rounds,
                    mode.name()
                ));
                rounds[k].push(measure(&rig, mode, n, options)?);
                progress.inc(1);
            }
        }
        for (mode, reason) in &modes {
            match (reason, runnable.iter().position(|m| m == mode)) {
                (None, Some(k)) => {
                    runs.push(Run::from_rounds(*mode, n, options.endpoints, &rounds[k]))
                }
                (Some(reason), _) => runs.push(Run::unavailable(
                    *mode,
                    n,
                    options.endpoints,
                    reason.clone(),
                )),
                (None, None) => {}
            }
        }
    }
    progress.finish_with_message("done; tearing the rig down");
    let rig_napi_pinned = rig.napi_pinned;
    drop(rig);
    let results = Results {
        machine: Machine::describe(
            options.rounds,
            options.connections,
            options.udp_flows,
            options.udp_duration.as_secs_f64(),
            options.xdp_redirect,
            rig_napi_pinned,
        ),
        runs,
    };
    results.write(&options.output)?;
    Ok(results)
}

/// Source ports of the steady flood start here; the new-flow flood's start
/// above them, so none of its datagrams belongs to a flow already open.
const STEADY_FIRST_PORT: u16 = 1024;
const NEW_FLOW_FIRST_PORT: u16 = 10_000;
/// Source ports and addresses of each new-flow burst: 3.2 million flows,
/// more than the generator sends in a burst, so every datagram the node
/// takes is a new flow.
const NEW_FLOW_PORTS: u32 = 50_000;
const NEW_FLOW_ADDRESSES: u32 = 64;
/// How long each new-flow burst lasts, and how many new flows the bursts'
/// windows must count before the rate is taken: one burst of the fastest
/// mode stays below the 31,744 SNAT ports vipr has per backend.
const NEW_FLOW_BURST: Duration = Duration::from_millis(40);
const NEW_FLOWS_MEASURED: u64 = 15_000;
/// Frames the generator sends before it waits for the node to catch up,
/// while the steady flood's flows are being opened (below the 256 frames a
/// veth's ring holds, so none is dropped before the node sees it).
const OPENING_CHUNK: u32 = 128;

/// NodePort datagrams per second the backends receive: with `udp_flows`
/// flows already open (a first lap, not counted, opens them: netfilter's
/// rule walk and vipr's backend choice happen once per flow), and with
/// every datagram a new flow (each pays the walk or the choice, and a
/// conntrack entry). kube-proxy's iptables cost per new flow grows with
/// the number of services; that is where the modes part most.
///
/// Both floods offer far more than any mode forwards (see `flood`): the
/// figure is what the node passes on, counted at the backends, in a window
/// inside the flood (`flood_rate`).
fn nodeport_pps(rig: &Rig, mode: Mode, options: &BenchOptions) -> Result<(f64, f64)> {
    let target = mode.udp_target(rig);
    let link = rig.flood_link()?;
    rig.flush_kernel_conntrack()?;
    let steady = flood::Datagrams {
        source: vipr_e2e::agent::OUTSIDE_IP,
        addresses: 1,
        first_port: STEADY_FIRST_PORT,
        ports: u32::from(options.udp_flows),
        target,
    };
    // The opening lap, paced by the node: a chunk (smaller than the node's
    // ring) at a time, each waited for, so every flow gets its first
    // datagram through whatever a mode's new flows cost.
    let mut opening = steady;
    let mut opened = 0;
    while opened < steady.ports {
        opening.first_port = STEADY_FIRST_PORT + opened as u16;
        opening.ports = OPENING_CHUNK.min(steady.ports - opened);
        let before = rig.delivered_to_pods()?;
        run_flood(rig, &link, opening, flood::Amount::Frames(opening.ports))?;
        let deadline = Instant::now() + Duration::from_millis(500);
        while rig.delivered_to_pods()? - before < u64::from(opening.ports)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        opened += opening.ports;
        check_interrupted()?;
    }
    let (delivered, window) = flood_rate(rig, &link, steady, options.udp_duration)?;
    let steady_pps = delivered as f64 / window.as_secs_f64();
    check_interrupted()?;

    // Every datagram a new flow, in short bursts of unique flows until the
    // windows counted NEW_FLOWS_MEASURED (or half the flood time went by):
    // externalTrafficPolicy Cluster gives each flow an SNAT port of the
    // node's per backend (31,744 of vipr's, about 64k of netfilter's), and
    // unanswered UDP flows stay for a minute, so a longer flood would
    // measure a full port range.
    let (mut new_delivered, mut measured) = (0, Duration::ZERO);
    let budget = Instant::now() + options.udp_duration / 2;
    while new_delivered < NEW_FLOWS_MEASURED && Instant::now() < budget {
        let datagrams = flood::Datagrams {
            source: fresh_sources(),
            addresses: NEW_FLOW_ADDRESSES,
            first_port: NEW_FLOW_FIRST_PORT,
            ports: NEW_FLOW_PORTS,
            target,
        };
        let (delivered, window) = flood_rate(rig, &link, datagrams, NEW_FLOW_BURST)?;
        new_delivered += delivered;
        measured += window;
        settle_deliveries(rig)?;
        check_interrupted()?;
    }
    let new_flow_pps = new_delivered as f64 / measured.as_secs_f64();
    Ok((steady_pps, new_flow_pps))
}

/// Runs the generator (in the client's namespace, on its CPU) until it has
/// sent `amount`.
fn run_flood(
    rig: &Rig,
    link: &flood::FloodLink,
    datagrams: flood::Datagrams,
    amount: flood::Amount,
) -> Result<(u64, Duration)> {
    rig.node.outside.enter(|| {
        flood::pin_task(0, rig::GENERATOR_CPU)?;
        let mut tools = rig.tools.lock().expect("packet tools");
        tools.flood(link, &datagrams, amount)
    })?
}

/// Floods for `duration` and counts what reaches the backends inside it,
/// leaving out the first sixth (the generator's page pool filling, the
/// node's ring and NAPI thread coming up to speed) and the last
/// millisecond: the datagrams delivered in that window, and its length.
fn flood_rate(
    rig: &Rig,
    link: &flood::FloodLink,
    datagrams: flood::Datagrams,
    duration: Duration,
) -> Result<(u64, Duration)> {
    std::thread::scope(|scope| {
        let started = Instant::now();
        let generator =
            scope.spawn(|| run_flood(rig, link, datagrams, flood::Amount::For(duration)));
        std::thread::sleep(duration / 6);
        let (first, from) = (rig.delivered_to_pods()?, Instant::now());
        let until = started + duration - Duration::from_millis(1);
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
        let (last, to) = (rig.delivered_to_pods()?, Instant::now());
        generator
            .join()
            .map_err(|_| anyhow::anyhow!("the flood generator panicked"))??;
        Ok((last - first, to - from))
    })
}

/// The first of [`NEW_FLOW_ADDRESSES`] source addresses no earlier new-flow
/// flood of this process used, so none of its flows is still in a
/// conntrack table from an earlier round (198.18.0.0/15, the benchmarking
/// range; nothing answers these datagrams, so no route back is needed).
/// Blocks never cross a /16 (the generator adds to the low 16 bits).
fn fresh_sources() -> std::net::Ipv4Addr {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let blocks = (1 << 17) / NEW_FLOW_ADDRESSES;
    let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % blocks;
    std::net::Ipv4Addr::from(
        u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + k * NEW_FLOW_ADDRESSES,
    )
}

/// Waits (at most a second) until the node has handed its queued datagrams
/// on: the backends' count unchanged over five polls 2 ms apart (the
/// sink's count is a map read, no process to start).
fn settle_deliveries(rig: &Rig) -> Result<()> {
    const POLL: Duration = Duration::from_millis(2);
    const STILL_POLLS: u32 = 5;
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut last = rig.delivered_to_pods()?;
    let mut still = 0;
    while still < STILL_POLLS && Instant::now() < deadline {
        std::thread::sleep(POLL);
        let now = rig.delivered_to_pods()?;
        if now == last {
            still += 1;
        } else {
            still = 0;
            last = now;
        }
    }
    Ok(())
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// One round of one mode at `n` services: program, load, change, clear.
fn measure(rig: &Rig, mode: Mode, n: usize, options: &BenchOptions) -> Result<Round> {
    let services = modes::services(mode, rig, n, options.endpoints);
    let programmer = Programmer::new(mode, rig)?;
    let program_all = programmer.program_all(&services)?;
    let rss = (mode == Mode::Vipr)
        .then(|| rig.node.agent_rss_mib())
        .flatten();
    check_interrupted()?;
    rig.wait_agent_idle();

    // Every mode's connections are paired with direct ones, timed at the
    // same moments (the direct mode's are direct already).
    let direct = |i: usize| Mode::Direct.target(rig, i);
    let alongside: Option<&(dyn Fn(usize) -> (std::net::Ipv4Addr, u16) + Sync)> =
        (mode != Mode::Direct).then_some(&direct);
    let (connections, paired) = rig.node.outside.enter(|| {
        client::connect_many(options.connections, n, |i| mode.target(rig, i), alongside)
    })??;
    check_interrupted()?;

    let (udp_pps, udp_new_flow_pps) = nodeport_pps(rig, mode, options)?;

    let changed = n / 2;
    let after = modes::with_extra_endpoint(&services[changed]);
    let one_change = programmer.change_one(&services, changed, &after)?;
    programmer.clear(&services)?;

    let programmed = !matches!(mode, Mode::Direct);
    Ok(Round {
        latency: Latency::of(connections.latencies_us),
        paired_direct: paired.map(|p| Latency::of(p.latencies_us)),
        conn_per_s: connections.per_second,
        udp_pps,
        udp_new_flow_pps,
        program_all_ms: programmed.then_some(ms(program_all.programming)),
        program_one_change_ms: programmed.then_some(ms(one_change.programming)),
        apply_all_ms: program_all.end_to_end.map(ms),
        apply_one_change_ms: one_change.end_to_end.map(ms),
        rss_mib: rss,
        failures: connections.failures,
        retransmitted: connections.retransmitted,
    })
}
