//! Per-packet cost of the XDP program through BPF_PROG_TEST_RUN, side by
//! side with the pass-everything program `vipr_pass` (the floor: test-run
//! overhead plus an empty program). Ignored by default; run with
//!
//!     cargo test --release -p vipr-dataplane --test per_packet_cost -- --ignored --nocapture
//!
//! Two methods, because the kernel's repeat loop runs the program on the
//! same buffer without restoring it, so after one DNAT every later repeat
//! would see the rewritten packet (and miss, or take another path):
//! - `repeat` (1,000,000 runs in one call, kernel-averaged): only for
//!   packets whose output equals their input. A conntrack hit is made so by
//!   a flow whose backend is the frontend itself: the same lookup, rewrite
//!   and checksum arithmetic as any hit, the rewrite just writes equal
//!   values. Both directions are measured (client packet, backend reply),
//!   and the counters prove every run was a hit of the direction claimed.
//! - `single` (many calls of one run each, the kernel's per-call time
//!   averaged): each call starts from the caller's buffer, so a real DNAT
//!   hit (to another backend, bytes changed) and fresh new flows can be
//!   measured; the per-call figure carries more timer noise.
//!
//! `fast_path_cost` measures a conntrack hit with the forwarding fast path
//! (FIB lookup, MAC and TTL rewrite, redirect) against the same hit passed
//! to the kernel, in a namespace of its own with the route and neighbour.
//! `idle_monitor_cost` puts `vipr_xdp` (with the monitor's event check, no
//! monitor attached) next to `vipr_xdp_no_events` (the same program with
//! the event code compiled out) on the conntrack-hit path, in interleaved
//! rounds (kernel figure averaged, wall time median).

mod netns;
mod packet;

use std::{net::Ipv4Addr, time::Duration};

use packet::Ipv4Packet;
use vipr_dataplane::{BackendAddr, Counter, Dataplane, DataplaneOptions, Frontend, Port, Protocol};

const REPEAT: u32 = 1_000_000;
/// Rounds of the repeat method, each case once a round.
const REPEAT_ROUNDS: usize = 31;
const SINGLE_RUNS: u16 = 20_000;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 7);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const IDEMPOTENT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const TCP_ACK: u8 = 0x10;

/// The translation alone: with the fast path on, every hit here would also
/// pay a FIB lookup in the test's namespace (the host's routes); that cost
/// is measured on its own, with a real route, by `fast_path_cost`.
fn dataplane() -> Dataplane {
    dataplane_with(false)
}

fn dataplane_with(xdp_redirect: bool) -> Dataplane {
    let mut dp = Dataplane::load(&DataplaneOptions {
        ebpf_log_level: log::LevelFilter::Off,
        xdp_redirect,
        ..DataplaneOptions::default()
    })
    .expect("load (needs root)");
    let port = Port::new(80).unwrap();
    for (vip, backend) in [(VIP, BACKEND), (IDEMPOTENT_VIP, IDEMPOTENT_VIP)] {
        dp.program_service(
            Frontend {
                addr: vip,
                port,
                protocol: Protocol::Tcp,
            },
            &[BackendAddr {
                addr: backend,
                port,
            }],
        )
        .unwrap();
    }
    dp
}

fn ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

/// Kernel-averaged ns per run of `REPEAT` runs on one buffer; the output
/// must equal the input, or later runs saw another packet than the first.
fn repeated(dp: &mut Dataplane, pass_program: bool, packet: &[u8]) -> f64 {
    let mut out = vec![0u8; packet.len() + 64];
    let result = if pass_program {
        dp.test_run_pass(packet, &mut out, REPEAT)
    } else {
        dp.test_run(packet, &mut out, REPEAT)
    }
    .unwrap();
    assert_eq!(
        &out[..packet.len()],
        packet,
        "repeat runs changed the packet"
    );
    ns(result.duration)
}

/// Mean kernel-measured ns of single runs, each on its own packet.
fn single(dp: &mut Dataplane, pass_program: bool, packets: &[Vec<u8>]) -> f64 {
    let mut out = vec![0u8; 256];
    let total: f64 = packets
        .iter()
        .map(|p| {
            let result = if pass_program {
                dp.test_run_pass(p, &mut out, 1)
            } else {
                dp.test_run(p, &mut out, 1)
            }
            .unwrap();
            ns(result.duration)
        })
        .sum();
    total / packets.len() as f64
}

/// How much `counter` grew while `run` ran.
fn counted<T>(
    dp: &mut Dataplane,
    counter: Counter,
    run: impl FnOnce(&mut Dataplane) -> T,
) -> (T, u64) {
    let before = dp.counters().unwrap().packets(counter);
    let value = run(dp);
    (value, dp.counters().unwrap().packets(counter) - before)
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture, ideally --release on an idle machine"]
fn per_packet_cost() {
    let mut dp = dataplane();
    let syn = Ipv4Packet::tcp((CLIENT, 40000), (IDEMPOTENT_VIP, 80));
    let forward = syn.clone().with_tcp(TCP_ACK, 2, 2).build();
    let reply = syn.reply().with_tcp(TCP_ACK, 2, 2).build();
    let passthrough = Ipv4Packet::tcp((CLIENT, 40000), (Ipv4Addr::new(192, 0, 2, 1), 80))
        .with_tcp(TCP_ACK, 2, 2)
        .build();

    // Open the idempotent flow with its SYN, fault in the code paths.
    let mut out = vec![0u8; 256];
    dp.test_run(&syn.build(), &mut out, 1).unwrap();
    repeated(&mut dp, false, &forward);
    repeated(&mut dp, false, &reply);

    // Interleaved rounds, the order rotating, each case's median taken:
    // the machine's drift over the run (a shared VM's) hits every case
    // alike, and the ratio is of medians measured side by side.
    let hits_before = dp.counters().unwrap().packets(Counter::FlowHit);
    let replies_before = dp.counters().unwrap().packets(Counter::ReplyTranslated);
    let cases: [(bool, &[u8]); 4] = [
        (true, &forward),
        (false, &forward),
        (false, &reply),
        (false, &passthrough),
    ];
    let mut samples = vec![Vec::new(); cases.len()];
    for round in 0..REPEAT_ROUNDS {
        for k in 0..cases.len() {
            let case = (k + round) % cases.len();
            let (pass_program, packet) = cases[case];
            samples[case].push(repeated(&mut dp, pass_program, packet));
        }
    }
    let counters = dp.counters().unwrap();
    let rounds = REPEAT_ROUNDS as u64 * u64::from(REPEAT);
    assert_eq!(
        counters.packets(Counter::FlowHit) - hits_before,
        rounds,
        "every forward run was a conntrack hit"
    );
    assert_eq!(
        counters.packets(Counter::ReplyTranslated) - replies_before,
        rounds,
        "every reply run was a conntrack hit"
    );
    let spread = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let [floor, hit, reply_hit, untouched] = [0, 1, 2, 3].map(|k| spread(&samples[k]));
    // Each round's case over that round's floor, measured moments apart:
    // the machine's slow spells hit both, so their ratio holds still better
    // than either figure.
    let ratio = |k: usize| {
        let ratios: Vec<f64> = samples[k]
            .iter()
            .zip(&samples[0])
            .map(|(case, floor)| case / floor)
            .collect();
        spread(&ratios)
    };
    let (hit_ratio, reply_ratio) = (ratio(1), ratio(2));

    // Single runs: a real DNAT flow (VIP -> BACKEND), its replies, and new flows.
    let real = Ipv4Packet::tcp((CLIENT, 41000), (VIP, 80));
    dp.test_run(&real.build(), &mut out, 1).unwrap();
    let real_forward = vec![real.clone().with_tcp(TCP_ACK, 2, 2).build(); usize::from(SINGLE_RUNS)];
    let real_reply = vec![
        real.with_dst(BACKEND, 80)
            .reply()
            .with_tcp(TCP_ACK, 2, 2)
            .build();
        usize::from(SINGLE_RUNS)
    ];
    let new_flows: Vec<Vec<u8>> = (0..SINGLE_RUNS)
        .map(|i| Ipv4Packet::tcp((CLIENT, 10000 + i), (VIP, 80)).build())
        .collect();

    let floor_single = single(&mut dp, true, &new_flows);
    let (hit_single, n) = counted(&mut dp, Counter::FlowHit, |dp| {
        single(dp, false, &real_forward)
    });
    assert_eq!(
        n,
        u64::from(SINGLE_RUNS),
        "every single forward run was a hit"
    );
    let (reply_single, n) = counted(&mut dp, Counter::ReplyTranslated, |dp| {
        single(dp, false, &real_reply)
    });
    assert_eq!(
        n,
        u64::from(SINGLE_RUNS),
        "every single reply run was a hit"
    );
    let (new_flow_single, n) = counted(&mut dp, Counter::NewFlow, |dp| {
        single(dp, false, &new_flows)
    });
    assert_eq!(
        n,
        u64::from(SINGLE_RUNS),
        "every fresh packet opened a flow"
    );

    println!(
        "per-packet cost, ns (BPF_PROG_TEST_RUN, XDP); repeat: median (min-max) of {REPEAT_ROUNDS} interleaved rounds of {REPEAT} runs"
    );
    println!("{:<40} {:>18} {:>10}", "case", "repeat", "single");
    let row = |case: &str, repeat: Option<(f64, f64, f64)>, single: Option<f64>| {
        let repeat = repeat.map_or("-".to_owned(), |(m, lo, hi)| {
            format!("{m:.0} ({lo:.0}-{hi:.0})")
        });
        let single = single.map_or("-".to_owned(), |v| format!("{v:.1}"));
        println!("{case:<40} {repeat:>18} {single:>10}");
    };
    row("vipr_pass (floor)", Some(floor), Some(floor_single));
    row(
        "vipr_xdp conntrack hit, client->backend",
        Some(hit),
        Some(hit_single),
    );
    row(
        "vipr_xdp conntrack hit, reply",
        Some(reply_hit),
        Some(reply_single),
    );
    row("vipr_xdp new flow", None, Some(new_flow_single));
    row("vipr_xdp not a service (passed)", Some(untouched), None);
    println!(
        "conntrack hit / floor, repeat: {:.2}x forward, {:.2}x reply (median of the rounds' ratios; \
         {:.2}-{:.2}x, {:.2}-{:.2}x); single: {:.2}x, {:.2}x",
        hit_ratio.0,
        reply_ratio.0,
        hit_ratio.1,
        hit_ratio.2,
        reply_ratio.1,
        reply_ratio.2,
        hit_single / floor_single,
        reply_single / floor_single
    );
}

/// Backends behind each service of the per-algorithm table.
const ALGORITHM_BACKENDS: u8 = 16;
/// New flows timed per algorithm (each a fresh packet: one single run each).
const ALGORITHM_RUNS: u16 = 10_000;

/// New-flow cost of each balancing algorithm, ns/packet: `single` runs, each
/// on a packet of its own flow (new source address and port), so every run
/// opens a flow and none sees a packet an earlier run rewrote; the counters
/// prove it. One frontend per case, 16 backends, weights 1..=16 for the
/// weighted cases; the floor is `vipr_pass` on the same packets.
#[test]
#[ignore = "benchmark: run with --ignored --nocapture, ideally on an idle machine"]
fn per_packet_cost_by_algorithm() {
    use vipr_balancer::{
        AffinityTimeout, Algorithm, MaglevTableSize, ServiceBalancing, SessionAffinity, Weight,
    };
    use vipr_dataplane::FrontendOptions;

    let mut dp = Dataplane::load(&DataplaneOptions {
        ebpf_log_level: log::LevelFilter::Off,
        max_flows: 400_000,
        max_maglev_entries: 32_768,
        ..DataplaneOptions::default()
    })
    .expect("load (needs root)");
    let port = Port::new(80).unwrap();
    let backends: Vec<BackendAddr> = (1..=ALGORITHM_BACKENDS)
        .map(|i| BackendAddr {
            addr: Ipv4Addr::new(10, 244, 9, i),
            port,
        })
        .collect();
    let weights = |on: bool| {
        if on {
            backends
                .iter()
                .zip(1..)
                .map(|(b, w)| (*b, Weight::new(w)))
                .collect()
        } else {
            Default::default()
        }
    };
    let affinity = SessionAffinity::ClientIp {
        timeout: AffinityTimeout::DEFAULT,
    };
    // (case, algorithm, weighted, affinity, one client for every flow)
    let cases = [
        ("random", Algorithm::Random, false, false, false),
        ("random, weighted", Algorithm::Random, true, false, false),
        ("rr", Algorithm::RoundRobin, false, false, false),
        (
            "wrr, weighted",
            Algorithm::WeightedRoundRobin,
            true,
            false,
            false,
        ),
        ("lc", Algorithm::LeastConnection, false, false, false),
        (
            "sed, weighted",
            Algorithm::ShortestExpectedDelay,
            true,
            false,
            false,
        ),
        ("nq, weighted", Algorithm::NeverQueue, true, false, false),
        ("sh", Algorithm::SourceHash, false, false, false),
        ("sh, weighted", Algorithm::SourceHash, true, false, false),
        ("dh", Algorithm::DestinationHash, false, false, false),
        ("maglev (16381)", Algorithm::Maglev, false, false, false),
        ("maglev, weighted", Algorithm::Maglev, true, false, false),
        (
            "random + ClientIP, new clients",
            Algorithm::Random,
            false,
            true,
            false,
        ),
        (
            "random + ClientIP, same client",
            Algorithm::Random,
            false,
            true,
            true,
        ),
    ];
    println!(
        "new-flow cost by algorithm, ns/packet (BPF_PROG_TEST_RUN, XDP, {ALGORITHM_BACKENDS} backends, {ALGORITHM_RUNS} flows each)"
    );
    println!(
        "{:<34} {:>10} {:>10} {:>8}",
        "algorithm", "vipr_xdp", "floor", "- floor"
    );
    for (i, (case, algorithm, weighted, sticky, one_client)) in cases.into_iter().enumerate() {
        let vip = Ipv4Addr::new(10, 96, 10, i as u8 + 1);
        let options = FrontendOptions {
            balancing: ServiceBalancing {
                algorithm,
                maglev_table_size: MaglevTableSize::DEFAULT,
                affinity: if sticky {
                    affinity
                } else {
                    SessionAffinity::None
                },
                ..ServiceBalancing::default()
            },
            weights: weights(weighted),
            ..FrontendOptions::default()
        };
        let frontend = Frontend {
            addr: vip,
            port,
            protocol: Protocol::Tcp,
        };
        dp.program_service_with(frontend, &backends, &options)
            .unwrap();
        let packets: Vec<Vec<u8>> = (0..ALGORITHM_RUNS)
            .map(|n| {
                let client = if one_client {
                    CLIENT
                } else {
                    Ipv4Addr::new(10, 245, (n >> 8) as u8, n as u8)
                };
                Ipv4Packet::tcp((client, 10000 + n), (vip, 80)).build()
            })
            .collect();
        let floor = single(&mut dp, true, &packets);
        let (cost, opened) = counted(&mut dp, Counter::NewFlow, |dp| single(dp, false, &packets));
        assert_eq!(
            opened,
            u64::from(ALGORITHM_RUNS),
            "{case}: every run opened a flow"
        );
        println!(
            "{case:<34} {cost:>10.1} {floor:>10.1} {:>8.1}",
            cost - floor
        );
    }
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture, ideally --release on an idle machine"]
fn fast_path_cost() {
    const XDP_PASS: u32 = 2;
    const XDP_REDIRECT: u32 = 4;
    netns::in_fresh_netns(|| {
        netns::enable_forwarding();
        netns::veth("pods", [2, 0, 0, 0, 0x0a, 5]);
        netns::routed_host(BACKEND, "pods", Some([2, 0, 0, 0, 0x0c, 5]));
        let flow = Ipv4Packet::tcp((CLIENT, 42000), (VIP, 80));
        let hits = vec![flow.clone().with_tcp(TCP_ACK, 2, 2).build(); usize::from(SINGLE_RUNS)];
        let mut out = vec![0u8; 256];
        let mut figures = Vec::new();
        for (xdp_redirect, verdict) in [(true, XDP_REDIRECT), (false, XDP_PASS)] {
            let mut dp = dataplane_with(xdp_redirect);
            // The test runs' ingress (loopback) and the egress, as the
            // agent lists a pod veth and a NIC uplink.
            dp.allow_redirect("lo").unwrap();
            dp.allow_redirect("pods").unwrap();
            dp.test_run(&flow.build(), &mut out, 1).unwrap();
            let result = dp.test_run(&hits[0], &mut out, 1).unwrap();
            assert_eq!(result.return_value, verdict, "fast path {xdp_redirect}");
            let (cost, n) = counted(&mut dp, Counter::FlowHit, |dp| single(dp, false, &hits));
            assert_eq!(n, u64::from(SINGLE_RUNS), "every run was a hit");
            let floor = single(&mut dp, true, &hits);
            figures.push((xdp_redirect, cost, floor));
        }
        println!("conntrack hit with and without the fast path, ns (single runs)");
        for (xdp_redirect, cost, floor) in figures {
            let case = if xdp_redirect {
                "hit + FIB lookup + redirect"
            } else {
                "hit, passed to the kernel"
            };
            println!("{case:<40} {cost:>8.1}   (vipr_pass floor {floor:.1})");
        }
    });
}

const ROUNDS: usize = 101;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture, ideally --release on an idle machine"]
fn idle_monitor_cost() {
    let mut dp = dataplane();
    let syn = Ipv4Packet::tcp((CLIENT, 40001), (IDEMPOTENT_VIP, 80));
    let mut out = vec![0u8; 256];
    // Open the flow, load the bare program.
    dp.test_run(&syn.build(), &mut out, 1).unwrap();
    dp.test_run_without_events(&syn.build(), &mut out, 1)
        .unwrap();
    let cases = [
        (
            "forward hit",
            Counter::FlowHit,
            syn.clone().with_tcp(TCP_ACK, 2, 2).build(),
        ),
        (
            "reply hit",
            Counter::ReplyTranslated,
            syn.reply().with_tcp(TCP_ACK, 2, 2).build(),
        ),
    ];
    println!("conntrack hits, ns/packet, {ROUNDS} interleaved rounds of {REPEAT} runs each");
    println!(
        "{:<12} {:>22} {:>22} {:>9} {:>12}",
        "case", "no_events kernel/wall", "vipr_xdp kernel/wall", "kernel", "wall"
    );
    for (name, counter, packet) in cases {
        // Per round and program: the kernel's figure (it stops its clock
        // while the thread is preempted, but rounds to whole ns, so rounds
        // are averaged) and the wall time of the call (sub-ns, but it
        // counts time other processes take).
        let (mut kernel, mut wall) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
        let before = dp.counters().unwrap().packets(counter);
        for round in 0..ROUNDS {
            // Alternate which goes first, so drift hits both alike.
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for which in order {
                let started = std::time::Instant::now();
                let result = if which == 0 {
                    dp.test_run_without_events(&packet, &mut out, REPEAT)
                } else {
                    dp.test_run(&packet, &mut out, REPEAT)
                }
                .unwrap();
                wall[which].push(ns(started.elapsed()) / f64::from(REPEAT));
                kernel[which].push(ns(result.duration));
            }
        }
        assert_eq!(
            dp.counters().unwrap().packets(counter) - before,
            2 * ROUNDS as u64 * u64::from(REPEAT),
            "every {name} run was counted as {}",
            counter.name()
        );
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let kernel = [mean(&kernel[0]), mean(&kernel[1])];
        let wall = [median(wall[0].clone()), median(wall[1].clone())];
        println!(
            "{name:<12} {:>10.2} / {:>9.2} {:>10.2} / {:>9.2} {:>+8.2}% {:>+11.2}%",
            kernel[0],
            wall[0],
            kernel[1],
            wall[1],
            (kernel[1] / kernel[0] - 1.0) * 100.0,
            (wall[1] / wall[0] - 1.0) * 100.0
        );
    }
}

/// The new-flow cost with many services programmed and each new flow to a
/// random one of them, next to the same with one service: what the map
/// lookups cost once their entries are no longer in the CPU's caches.
#[test]
#[ignore = "benchmark: run with --ignored --nocapture, ideally --release on an idle machine"]
fn new_flow_cost_by_service_count() {
    println!("new flow, ns/packet (single runs), random service of N, 2 backends each");
    println!(
        "{:>8} {:>10} {:>10} {:>10}",
        "services", "new flow", "floor", "- floor"
    );
    for services in [1u32, 1_000, 10_000] {
        let mut dp = dataplane();
        let port = Port::new(80).unwrap();
        let vip = |i: u32| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i);
        for i in 0..services {
            let backend = |k: u32| BackendAddr {
                addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + 2 * i + k),
                port,
            };
            dp.program_service(
                Frontend {
                    addr: vip(i),
                    port,
                    protocol: Protocol::Tcp,
                },
                &[backend(0), backend(1)],
            )
            .unwrap();
        }
        // A fixed scramble of the run number: every service about as often,
        // in no order the caches could follow.
        let service_of = |i: u16| (u32::from(i).wrapping_mul(2_654_435_761) >> 8) % services;
        let flows: Vec<Vec<u8>> = (0..SINGLE_RUNS)
            .map(|i| {
                let client = Ipv4Addr::from(u32::from(CLIENT) + u32::from(i / 1000));
                Ipv4Packet::tcp((client, 10000 + i % 1000), (vip(service_of(i)), 80)).build()
            })
            .collect();
        let floor = single(&mut dp, true, &flows);
        let (cost, n) = counted(&mut dp, Counter::NewFlow, |dp| single(dp, false, &flows));
        assert_eq!(n, u64::from(SINGLE_RUNS), "every run opened a flow");
        println!(
            "{services:>8} {cost:>10.1} {floor:>10.1} {:>10.1}",
            cost - floor
        );
    }
}
