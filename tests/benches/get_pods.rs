//! `vipr get pods` against a real agent running many real pods.
//!
//! Reports the CLI's wall-clock time (process start, socket round trip,
//! table or JSON rendering) at 0 pods — the floor every CLI call pays — and
//! at N pods, side by side in one run, plus the agent's RSS at each size.
//!
//!     cargo build --release --bins
//!     cargo bench -p vipr-e2e --bench get_pods [-- PODS]   # default 1000
//!
//! Pods are `image: host` containers running `sleep`, so the figure is the
//! API path, not the workload. Needs root; everything lives in namespaces
//! and a cgroup of its own and is removed at the end.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use vipr_e2e::agent::{AgentNode, bin_dir};

/// CLI calls timed per size and output format.
const SAMPLES: usize = 25;
/// Pods per `vipr apply` (one multi-document manifest each).
const APPLY_BATCH: usize = 100;

fn main() -> Result<()> {
    let pods: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    // A /21 holds 2046 pod addresses; the default /24 only 253.
    let node = AgentNode::start_with("gp", &["--pod-cidr", "10.244.0.0/21"])?;

    let mut rows = vec![measure(&node, 0)?];
    let started = Instant::now();
    for first in (0..pods).step_by(APPLY_BATCH) {
        let batch: Vec<String> = (first..pods.min(first + APPLY_BATCH))
            .map(pod_manifest)
            .collect();
        node.apply(&batch.join("---\n"))?;
    }
    wait_running(&node, pods, Duration::from_secs(60 + pods as u64 / 5))?;
    eprintln!("{pods} pods Running after {:.1?}", started.elapsed());
    rows.push(measure(&node, pods)?);

    println!(
        "{:>6}  {:>18}  {:>18}  {:>18}  {:>9}",
        "pods", "get pods p50/p90", "-o wide p50/p90", "-o json p50/p90", "agent RSS"
    );
    for row in &rows {
        println!(
            "{:>6}  {:>18}  {:>18}  {:>18}  {:>6.1} MiB",
            row.pods,
            row.table.to_string(),
            row.wide.to_string(),
            row.json.to_string(),
            row.rss_mib
        );
    }
    Ok(())
}

fn pod_manifest(i: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: sleeper-{i:04}\n  labels:\n    app: sleeper\n\
         spec:\n  containers:\n    - name: main\n      image: host\n      command: [\"sleep\", \"86400\"]\n"
    )
}

struct Row {
    pods: usize,
    table: Spread,
    wide: Spread,
    json: Spread,
    rss_mib: f64,
}

struct Spread {
    p50: Duration,
    p90: Duration,
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} / {:.1} ms",
            self.p50.as_secs_f64() * 1e3,
            self.p90.as_secs_f64() * 1e3
        )
    }
}

fn measure(node: &AgentNode, pods: usize) -> Result<Row> {
    Ok(Row {
        pods,
        table: time_cli(node, &["get", "pods"], pods)?,
        wide: time_cli(node, &["get", "pods", "-o", "wide"], pods)?,
        json: time_cli(node, &["get", "pods", "-o", "json"], pods)?,
        rss_mib: node.agent_rss_mib().unwrap_or(f64::NAN),
    })
}

/// Times `vipr ARGS` SAMPLES times (after one warm-up call) and checks each
/// answer lists `pods` pods, so a fast error can never pass for a fast answer.
fn time_cli(node: &AgentNode, args: &[&str], pods: usize) -> Result<Spread> {
    let mut samples = Vec::with_capacity(SAMPLES);
    for round in 0..=SAMPLES {
        let started = Instant::now();
        let out = Command::new(bin_dir().join("vipr"))
            .args(args)
            .env("VIPR_SOCKET", &node.socket)
            .output()
            .context("running vipr")?;
        let elapsed = started.elapsed();
        if !out.status.success() {
            bail!(
                "vipr {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let listed = count_pods(&out.stdout, args.contains(&"json"))?;
        if listed != pods {
            bail!(
                "vipr {} listed {listed} pods, expected {pods}",
                args.join(" ")
            );
        }
        if round > 0 {
            samples.push(elapsed);
        }
    }
    samples.sort();
    Ok(Spread {
        p50: samples[samples.len() / 2],
        p90: samples[samples.len() * 9 / 10],
    })
}

/// Pods in a `get pods` answer: table rows, or a JSON List's items.
fn count_pods(stdout: &[u8], json: bool) -> Result<usize> {
    if json {
        let list: serde_json::Value = serde_json::from_slice(stdout)?;
        return Ok(list["items"].as_array().map_or(0, Vec::len));
    }
    Ok(String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| l.starts_with("sleeper-"))
        .count())
}

fn wait_running(node: &AgentNode, pods: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let list = node.vipr_ok(&["get", "pods"])?;
        let running = list.lines().filter(|l| l.contains(" Running ")).count();
        if running == pods {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {running} of {pods} pods Running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
