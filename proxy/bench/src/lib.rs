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
//! load), `report` (JSON, table, plot).

pub mod client;
pub mod kube_proxy;
pub mod modes;
pub mod report;
pub mod rig;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{
    modes::{Mode, Programmer},
    report::{Machine, Results, Round, Run},
    rig::Rig,
};

pub struct BenchOptions {
    pub services: Vec<usize>,
    pub endpoints: usize,
    pub rounds: usize,
    pub connections: usize,
    /// Distinct source ports of the steady NodePort flood (each a flow).
    pub udp_flows: u16,
    /// Source ports of the new-flow flood: each sends one datagram.
    pub udp_new_flows: u16,
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
            udp_new_flows: 50_000,
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
            udp_new_flows: 50_000,
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
    drop(rig);
    let results = Results {
        machine: Machine::describe(
            options.rounds,
            options.connections,
            options.udp_flows,
            options.udp_new_flows,
            options.udp_duration.as_secs_f64(),
            options.xdp_redirect,
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

/// NodePort datagrams per second handed to the backends: with `udp_flows`
/// flows already open (a first lap, not counted, opens them: netfilter's
/// rule walk and vipr's backend choice happen once per flow), and with
/// every datagram a new flow (each pays the walk or the choice, and a
/// conntrack entry). kube-proxy's iptables cost per new flow grows with
/// the number of services; that is where the modes part most.
fn nodeport_pps(rig: &Rig, mode: Mode, options: &BenchOptions) -> Result<(f64, f64)> {
    let target = mode.udp_target(rig);
    let link = rig.flood_link()?;
    let flood = |source: std::net::Ipv4Addr, plan: client::FloodPlan| {
        rig.node
            .outside
            .enter(|| client::udp_flood(&link, source, target, &plan))?
    };
    let client = vipr_e2e::agent::OUTSIDE_IP;
    rig.flush_kernel_conntrack()?;
    let steady_ports = STEADY_FIRST_PORT..STEADY_FIRST_PORT + options.udp_flows;
    flood(
        client,
        client::FloodPlan {
            ports: steady_ports.clone(),
            once: true,
            duration: options.udp_duration * 5,
        },
    )?;
    settle_deliveries(rig)?;
    check_interrupted()?;

    let before = rig.delivered_to_pods()?;
    flood(
        client,
        client::FloodPlan {
            ports: steady_ports,
            once: false,
            duration: options.udp_duration,
        },
    )?;
    let (delivered, _) = settle_deliveries(rig)?;
    let steady = (delivered - before) as f64 / options.udp_duration.as_secs_f64();
    check_interrupted()?;

    let before = rig.delivered_to_pods()?;
    let started = std::time::Instant::now();
    flood(
        fresh_source(),
        client::FloodPlan {
            ports: NEW_FLOW_FIRST_PORT..NEW_FLOW_FIRST_PORT + options.udp_new_flows,
            once: true,
            duration: options.udp_duration,
        },
    )?;
    let (delivered, last_delivery) = settle_deliveries(rig)?;
    let elapsed = last_delivery.saturating_duration_since(started);
    let new_flows = (delivered - before) as f64 / elapsed.as_secs_f64().max(1e-3);
    Ok((steady, new_flows))
}

/// A source address no earlier new-flow flood of this process used, so
/// none of its flows is still in a conntrack table from an earlier round
/// (198.18.0.0/15, the benchmarking range; nothing answers these datagrams,
/// so no route back is needed).
fn fresh_source() -> std::net::Ipv4Addr {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % (1 << 17);
    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + k)
}

/// Waits (at most a second) until the node has handed its queued datagrams
/// on: the pods' delivery counter unchanged over three polls 10 ms apart.
/// Returns the counter and when it was last seen moving (the new-flow rate
/// is timed to that, so the poll interval bounds its error: a 50,000-flow
/// flood takes 100-150 ms at vipr's rate).
fn settle_deliveries(rig: &Rig) -> Result<(u64, std::time::Instant)> {
    const POLL: Duration = Duration::from_millis(10);
    const STILL_POLLS: u32 = 3;
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    let mut last = rig.delivered_to_pods()?;
    let mut moved_at = std::time::Instant::now();
    let mut still = 0;
    while still < STILL_POLLS && std::time::Instant::now() < deadline {
        std::thread::sleep(POLL);
        let now = rig.delivered_to_pods()?;
        if now == last {
            still += 1;
        } else {
            still = 0;
            last = now;
            moved_at = std::time::Instant::now();
        }
    }
    Ok((last, moved_at))
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

    let connections = rig
        .node
        .outside
        .enter(|| client::connect_many(options.connections, n, |i| mode.target(rig, i)))??;
    check_interrupted()?;

    let (udp_pps, udp_new_flow_pps) = nodeport_pps(rig, mode, options)?;

    let changed = n / 2;
    let after = modes::with_extra_endpoint(&services[changed]);
    let one_change = programmer.change_one(&services, changed, &after)?;
    programmer.clear(&services)?;

    let mut latencies = connections.latencies_us;
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let programmed = !matches!(mode, Mode::Direct);
    Ok(Round {
        p50: pct(0.50),
        p90: pct(0.90),
        p99: pct(0.99),
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
