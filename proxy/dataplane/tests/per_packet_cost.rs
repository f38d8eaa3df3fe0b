//! Per-packet cost of the XDP program through BPF_PROG_TEST_RUN, side by
//! side with the pass-everything program `vipr_pass` (the floor: test-run
//! overhead plus an empty program). Ignored by default; run with
//!
//!     cargo test --release -p vipr-dataplane --test per_packet_cost -- --ignored --nocapture
//!
//! Two methods, because the kernel's repeat loop runs the program on the
//! same buffer without restoring it:
//! - `repeat` (1,000,000 runs in one call, kernel-averaged): only for
//!   packets whose output equals their input. A conntrack hit is made so by
//!   a flow whose backend is the frontend itself (the same lookups and
//!   checksum arithmetic as any hit; the rewrite just writes equal values).
//! - `single` (many calls of one run each, the kernel's per-call time
//!   averaged): every packet differs, so each one is a new flow.
//!
//! `idle_monitor_cost` puts `vipr_xdp` (with the monitor's event check, no
//! monitor attached) next to `vipr_xdp_no_events` (the same program with
//! the event code compiled out) on the conntrack-hit path, in interleaved
//! rounds, and reports the median of each.

mod packet;

use std::{net::Ipv4Addr, time::Duration};

use packet::Ipv4Packet;
use vipr_dataplane::{BackendAddr, Counter, Dataplane, DataplaneOptions, Frontend, Port, Protocol};

const REPEAT: u32 = 1_000_000;
const SINGLE_RUNS: u16 = 20_000;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 7);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const IDEMPOTENT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

fn dataplane() -> Dataplane {
    let mut dp = Dataplane::load(&DataplaneOptions {
        ebpf_log_level: log::LevelFilter::Off,
        ..DataplaneOptions::default()
    })
    .expect("load (needs root)");
    let port = Port::new(80).unwrap();
    for (vip, backend) in [
        (VIP, Ipv4Addr::new(10, 244, 1, 5)),
        (IDEMPOTENT_VIP, IDEMPOTENT_VIP),
    ] {
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

/// Kernel-averaged ns per run of `repeat` runs on one buffer.
fn repeated(dp: &mut Dataplane, pass_program: bool, packet: &[u8]) -> f64 {
    let mut out = vec![0u8; packet.len() + 64];
    let result = if pass_program {
        dp.test_run_pass(packet, &mut out, REPEAT)
    } else {
        dp.test_run(packet, &mut out, REPEAT)
    }
    .unwrap();
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

#[test]
#[ignore = "benchmark: run with --ignored --nocapture, ideally --release on an idle machine"]
fn per_packet_cost() {
    let mut dp = dataplane();
    let hit = Ipv4Packet::tcp((CLIENT, 40000), (IDEMPOTENT_VIP, 80)).build();
    let passthrough = Ipv4Packet::tcp((CLIENT, 40000), (Ipv4Addr::new(192, 0, 2, 1), 80)).build();
    let new_flows: Vec<Vec<u8>> = (0..SINGLE_RUNS)
        .map(|i| Ipv4Packet::tcp((CLIENT, 10000 + i), (VIP, 80)).build())
        .collect();
    let hits: Vec<Vec<u8>> = vec![hit.clone(); usize::from(SINGLE_RUNS)];

    // Warm up: open the idempotent flow, fault in the code paths.
    repeated(&mut dp, false, &hit);
    let before = dp.counters().unwrap();
    let floor = repeated(&mut dp, true, &hit);
    let hit_ns = repeated(&mut dp, false, &hit);
    let untouched = repeated(&mut dp, false, &passthrough);
    let after = dp.counters().unwrap();
    assert_eq!(
        after.packets(Counter::FlowHit) - before.packets(Counter::FlowHit),
        u64::from(REPEAT),
        "every repeated run was a conntrack hit"
    );

    let floor_single = single(&mut dp, true, &new_flows);
    let new_flow_single = single(&mut dp, false, &new_flows);
    let hit_single = single(&mut dp, false, &hits);
    assert_eq!(
        dp.counters().unwrap().packets(Counter::NewFlow),
        u64::from(SINGLE_RUNS) + 1,
        "every single run on a fresh packet opened a flow"
    );

    println!("per-packet cost, ns (BPF_PROG_TEST_RUN, XDP)");
    println!("{:<34} {:>10} {:>10}", "case", "repeat 1M", "single");
    println!(
        "{:<34} {:>10.1} {:>10.1}",
        "vipr_pass (floor)", floor, floor_single
    );
    println!(
        "{:<34} {:>10.1} {:>10.1}",
        "vipr_xdp conntrack hit", hit_ns, hit_single
    );
    println!(
        "{:<34} {:>10} {:>10.1}",
        "vipr_xdp new flow", "-", new_flow_single
    );
    println!(
        "{:<34} {:>10.1} {:>10}",
        "vipr_xdp not a service (passed)", untouched, "-"
    );
    println!(
        "conntrack hit / floor: {:.2}x (repeat), {:.2}x (single)",
        hit_ns / floor,
        hit_single / floor_single
    );
}

const ROUNDS: usize = 31;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture, ideally --release on an idle machine"]
fn idle_monitor_cost() {
    let mut dp = dataplane();
    let hit = Ipv4Packet::tcp((CLIENT, 40001), (IDEMPOTENT_VIP, 80)).build();
    let mut out = vec![0u8; hit.len() + 64];
    // Open the flow, load the bare program, warm both up.
    dp.test_run(&hit, &mut out, 1000).unwrap();
    dp.test_run_without_events(&hit, &mut out, 1000).unwrap();
    let before = dp.counters().unwrap();

    // Per round and program: the kernel's figure (it stops its clock while
    // the thread is preempted, but rounds to whole ns, so rounds are
    // averaged) and the wall time of the call (sub-ns, but it counts time
    // other processes take).
    let (mut kernel, mut wall) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for round in 0..ROUNDS {
        // Alternate which goes first, so drift hits both alike.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let started = std::time::Instant::now();
            let result = if which == 0 {
                dp.test_run_without_events(&hit, &mut out, REPEAT)
            } else {
                dp.test_run(&hit, &mut out, REPEAT)
            }
            .unwrap();
            wall[which].push(ns(started.elapsed()) / f64::from(REPEAT));
            kernel[which].push(ns(result.duration));
        }
    }
    let after = dp.counters().unwrap();
    assert_eq!(
        after.packets(Counter::FlowHit) - before.packets(Counter::FlowHit),
        2 * ROUNDS as u64 * u64::from(REPEAT),
        "every run was a conntrack hit"
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let kernel = [mean(&kernel[0]), mean(&kernel[1])];
    let wall = [median(wall[0].clone()), median(wall[1].clone())];
    println!("conntrack hit, ns/packet, {ROUNDS} interleaved rounds of {REPEAT} runs");
    println!("{:<46} {:>12} {:>12}", "", "kernel mean", "wall median");
    println!(
        "{:<46} {:>12.2} {:>12.2}",
        "vipr_xdp_no_events (event code compiled out)", kernel[0], wall[0]
    );
    println!(
        "{:<46} {:>12.2} {:>12.2}",
        "vipr_xdp, no monitor attached", kernel[1], wall[1]
    );
    println!(
        "idle event code: kernel {:+.2} ns ({:+.2}%), wall {:+.2} ns ({:+.2}%)",
        kernel[1] - kernel[0],
        (kernel[1] / kernel[0] - 1.0) * 100.0,
        wall[1] - wall[0],
        (wall[1] / wall[0] - 1.0) * 100.0
    );
}
