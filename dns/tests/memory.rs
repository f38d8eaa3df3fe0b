//! Memory budget of the index: 10,000 services and 100,000 endpoints must index in
//! under 64 MiB. A counting global allocator measures the live bytes the index holds
//! (and the peak while building it). Run with `--nocapture` to see the figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use vipr_dns::{
    ClusterSnapshot, Endpoint, Pod, Protocol, Service, ServiceKind, ServicePort, ZoneIndex,
};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
        PEAK.fetch_max(live, Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MIB: f64 = 1024.0 * 1024.0;

/// 10,000 services x 10 endpoints: 9,000 ClusterIP (2 named ports) and 1,000 headless
/// StatefulSet-like ones whose endpoints have hostnames; one pod per endpoint.
fn large_snapshot() -> ClusterSnapshot {
    let mut snap = ClusterSnapshot::default();
    for s in 0..10_000u32 {
        let ns = format!("ns-{}", s % 100);
        let name = format!("service-{s}");
        let headless = s % 10 == 0;
        let endpoints: Vec<Endpoint> = (0..10u32)
            .map(|e| {
                let n = s * 10 + e;
                let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n));
                let hostname = headless.then(|| format!("{name}-{e}"));
                snap.pods.push(Pod {
                    name: format!("{name}-{e}"),
                    namespace: ns.clone(),
                    ip,
                    hostname: hostname.clone(),
                    subdomain: headless.then(|| name.clone()),
                });
                Endpoint {
                    hostname,
                    ..Endpoint::ready(ip)
                }
            })
            .collect();
        let kind = if headless {
            ServiceKind::Headless
        } else {
            ServiceKind::ClusterIp {
                ips: vec![IpAddr::V4(Ipv4Addr::from(0x6440_0000 + s))],
            }
        };
        snap.services.push(Service {
            name,
            namespace: ns,
            kind,
            ports: vec![
                ServicePort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                },
                ServicePort {
                    name: "metrics".into(),
                    protocol: Protocol::Tcp,
                    port: 9090,
                },
            ],
            endpoints,
            publish_not_ready_addresses: false,
        });
    }
    snap
}

#[test]
fn index_of_10k_services_100k_endpoints_fits_64_mib() {
    let snap = large_snapshot();
    let before = LIVE.load(Relaxed);
    PEAK.store(before, Relaxed);
    let t = std::time::Instant::now();
    let index = ZoneIndex::build("cluster.local", 5, &snap).unwrap();
    let took = t.elapsed();
    let held = LIVE.load(Relaxed) - before;
    let peak = PEAK.load(Relaxed) - before;
    let summary = index.summary();
    println!(
        "index: {} services, {} endpoints, {} pods: {:.1} MiB held, {:.1} MiB peak while building, built in {took:?}",
        summary.services,
        summary.endpoints,
        summary.pods,
        held as f64 / MIB,
        peak as f64 / MIB,
    );
    assert_eq!((summary.services, summary.endpoints), (10_000, 100_000));
    assert!(held < 64 << 20, "index holds {held} bytes");
    drop(index);
}
