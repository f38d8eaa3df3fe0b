//! Services and endpoints applied through a real agent until they are in
//! the kernel's maps: issue 6's "10,000 services with 100,000 endpoints
//! applied and programmed", with the agent's memory at that size.
//!
//!     cargo build --release --bins
//!     cargo bench -p vipr-e2e --bench apply_scale [-- SERVICES [ENDPOINTS_PER_SERVICE]]
//!
//! Selector-less Services with explicit clusterIPs and one EndpointSlice
//! each (as a controller or a user would write them), sent in one
//! `vipr apply -f FILE`. The clock stops when the pinned SERVICES map holds
//! every frontend with all its backends: stored, reconciled and programmed,
//! as a client would see it. Then one endpoint change is timed the same way.
//! Each size also runs at a tenth of it, side by side, to show how it scales.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use vipr_e2e::{agent::AgentNode, maps::PinnedServices};

const SERVICE_PORT: u16 = 80;
/// Bounded wait for the maps to show a change.
const PROGRAMMED_TIMEOUT: Duration = Duration::from_secs(120);

fn main() -> Result<()> {
    let numbers: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let services = numbers.first().copied().unwrap_or(10_000);
    let per_service = numbers.get(1).copied().unwrap_or(10);
    let mut rows = Vec::new();
    for n in [services / 10, services] {
        rows.push(run(n.max(1), per_service)?);
    }
    println!(
        "{:>8} {:>10} {:>12} {:>14} {:>12} {:>10}",
        "services", "endpoints", "apply (CLI)", "programmed", "one change", "agent RSS"
    );
    for r in &rows {
        println!(
            "{:>8} {:>10} {:>9.0} ms {:>11.0} ms {:>9.1} ms {:>6.1} MiB",
            r.services,
            r.services * r.per_service,
            r.stored.as_secs_f64() * 1e3,
            r.programmed.as_secs_f64() * 1e3,
            r.one_change.as_secs_f64() * 1e3,
            r.rss_mib
        );
    }
    Ok(())
}

struct Row {
    services: usize,
    per_service: usize,
    /// `vipr apply` returned: every object stored.
    stored: Duration,
    /// Every frontend in the maps with all its backends.
    programmed: Duration,
    /// One EndpointSlice gains an endpoint -> its frontend shows it.
    one_change: Duration,
    rss_mib: f64,
}

fn run(services: usize, per_service: usize) -> Result<Row> {
    let node = AgentNode::start("as")?;
    let manifest: String = (0..services)
        .map(|i| service_manifest(i, per_service))
        .collect();
    let file = node.state_dir.join("scale.yaml");
    std::fs::write(&file, manifest)?;

    let started = Instant::now();
    node.vipr_ok(&["apply", "-f", &file.display().to_string()])?;
    let stored = started.elapsed();
    let services_map = PinnedServices::open(&node.pin_dir())?;
    // The reconciler goes through services in name order: the last one
    // programmed is the last name; then every frontend is checked.
    wait_backends(&services_map, services - 1, per_service)?;
    for i in 0..services {
        let backends = services_map.backends(cluster_ip(i), SERVICE_PORT, true)?;
        if backends != Some(per_service as u32) {
            bail!("svc-{i:05} has {backends:?} backends, expected {per_service}");
        }
    }
    let programmed = started.elapsed();
    let rss_mib = node.agent_rss_mib().unwrap_or(f64::NAN);

    let changed = services / 2;
    let started = Instant::now();
    node.apply(&slice_manifest(changed, per_service + 1))?;
    wait_backends(&services_map, changed, per_service + 1)?;
    let one_change = started.elapsed();
    Ok(Row {
        services,
        per_service,
        stored,
        programmed,
        one_change,
        rss_mib,
    })
}

/// Service `i`'s clusterIP: 10.96.0.0/12 from 10.97.0.0 on, clear of the
/// cluster DNS address the agent takes.
fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + i as u32)
}

fn service_manifest(i: usize, per_service: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{i:05}\nspec:\n  clusterIP: {}\n  ports:\n    - port: {SERVICE_PORT}\n      targetPort: 8080\n---\n{}",
        cluster_ip(i),
        slice_manifest(i, per_service)
    )
}

/// Service `i`'s EndpointSlice with `endpoints` ready addresses.
fn slice_manifest(i: usize, endpoints: usize) -> String {
    let addresses: String = (0..endpoints)
        .map(|e| {
            let addr =
                Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + (i * 64 + e) as u32);
            format!("  - addresses: [\"{addr}\"]\n    conditions: {{ready: true}}\n")
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: svc-{i:05}-a\n  labels:\n    kubernetes.io/service-name: svc-{i:05}\naddressType: IPv4\nports:\n  - port: 8080\n    protocol: TCP\nendpoints:\n{addresses}---\n"
    )
}

/// Waits until service `i`'s frontend has `backends` backends.
fn wait_backends(map: &PinnedServices, i: usize, backends: usize) -> Result<()> {
    let deadline = Instant::now() + PROGRAMMED_TIMEOUT;
    loop {
        if map.backends(cluster_ip(i), SERVICE_PORT, true)? == Some(backends as u32) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("svc-{i:05} not programmed with {backends} backends in {PROGRAMMED_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}
