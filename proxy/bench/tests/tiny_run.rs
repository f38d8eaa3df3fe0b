//! The whole benchmark at a tiny scale: every mode measured (or reported
//! unavailable with a reason), sane figures in results.json, and nothing of
//! the rig left behind. Needs root and `cargo build --bins` (the agent).

use std::time::Duration;

use serde_json::Value;
use vipr_bench::BenchOptions;

#[test]
fn tiny_run_measures_every_mode_and_cleans_up() {
    vipr_e2e::require_root();
    let output = std::env::temp_dir().join(format!("vipr-bench-test-{}", std::process::id()));
    let options = BenchOptions {
        services: vec![3],
        endpoints: 2,
        rounds: 1,
        connections: 50,
        udp_flows: 64,
        udp_duration: Duration::from_millis(300),
        output: output.clone(),
        skip: Vec::new(),
        xdp_redirect: true,
    };
    vipr_bench::run(&options).expect("bench run");

    let results: Value =
        serde_json::from_slice(&std::fs::read(output.join("results.json")).unwrap()).unwrap();
    assert!(output.join("results.svg").exists(), "plot written");
    assert!(!results["machine"]["kernel"].as_str().unwrap().is_empty());
    let runs = results["runs"].as_array().unwrap();
    for mode in [
        "direct",
        "vipr",
        "iptables-legacy",
        "iptables-nft",
        "nftables",
        "ipvs",
    ] {
        let run = runs
            .iter()
            .find(|r| r["mode"] == mode)
            .unwrap_or_else(|| panic!("{mode} missing from {runs:?}"));
        if run["available"] == false {
            assert!(
                run["reason"].as_str().is_some_and(|r| !r.is_empty()),
                "{run}"
            );
            assert!(
                run["conn_latency_us"].is_null(),
                "no figure for an unavailable mode"
            );
            continue;
        }
        let p50 = run["conn_latency_us"]["p50"].as_f64().unwrap();
        let p99 = run["conn_latency_us"]["p99"].as_f64().unwrap();
        assert!(p50 > 0.0 && p50 <= p99, "{mode}: {run}");
        assert!(run["conn_per_s"].as_f64().unwrap() > 0.0, "{mode}");
        assert!(
            run["udp_pps"].as_f64().unwrap() > 0.0,
            "{mode}: the flood arrived"
        );
        assert!(
            run["udp_new_flow_pps"].as_f64().unwrap() > 0.0,
            "{mode}: the new-flow flood arrived"
        );
        if mode != "direct" {
            // Direct connections were timed alongside this mode's.
            let paired = run["paired_direct_latency_us"]["p50"].as_f64().unwrap();
            assert!(paired > 0.0, "{mode}: {run}");
            assert!(run["p50_vs_direct"].as_f64().unwrap() > 0.0, "{mode}");
            assert!(run["program_all_ms"].as_f64().unwrap() > 0.0, "{mode}");
            assert!(
                run["program_one_change_ms"].as_f64().unwrap() > 0.0,
                "{mode}"
            );
        }
    }
    let vipr = runs.iter().find(|r| r["mode"] == "vipr").unwrap();
    // The agent's own programming is part of the apply it is measured in.
    let (program, apply) = (
        vipr["program_one_change_ms"].as_f64().unwrap(),
        vipr["apply_one_change_ms"].as_f64().unwrap(),
    );
    assert!(
        program < apply,
        "programming {program} ms within apply {apply} ms"
    );
    assert!(
        vipr["rss_mib"].as_f64().unwrap() > 1.0,
        "agent RSS measured"
    );

    // The rig is gone: no namespace, pin folder or state dir of its agent.
    let netns = std::process::Command::new("ip")
        .args(["netns"])
        .output()
        .unwrap();
    let prefix = format!("vben{}", std::process::id() % 100_000);
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&prefix),
        "namespaces left behind"
    );
    let _ = std::fs::remove_dir_all(output);
}
