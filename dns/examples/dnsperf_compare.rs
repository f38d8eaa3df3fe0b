//! Side-by-side benchmark: the vipr DNS server against NSD serving the same names.
//!
//! Generates a cluster snapshot, starts vipr on a loopback ephemeral port (in this
//! process), writes an equivalent static zone and starts NSD on another loopback port,
//! then runs `dnsperf` against each with the same query file, twice per server,
//! interleaved: a throughput run (as fast as dnsperf can) and a latency run at a fixed
//! rate with per-query latencies (`-v`) to compute p50/p99. dnsperf acts as 4 clients
//! (`-c 4`, four source ports) so both servers spread them over their SO_REUSEPORT
//! sockets (NSD runs 2 servers with reuseport, vipr 2 UDP workers).
//!
//!     cargo run --release -p vipr-dns --example dnsperf_compare -- [SERVICES] [SECONDS] [RATE]
//!
//! Needs the `dnsperf` and `nsd` binaries (Debian packages of the same names).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vipr_dns::{
    ClusterSnapshot, DnsConfig, DnsServer, Endpoint, Protocol, Service, ServiceKind, ServicePort,
    Upstreams,
};

type Error = Box<dyn std::error::Error>;

struct Args {
    services: u32,
    seconds: u32,
    rate: u32,
}

/// One dnsperf run's figures.
#[derive(Default)]
struct Figures {
    qps: f64,
    avg_ms: f64,
    lost: String,
    p50_ms: f64,
    p99_ms: f64,
}

fn main() -> Result<(), Error> {
    let args = parse_args();
    let snap = snapshot(args.services, 5);
    let dir = std::env::temp_dir().join(format!("vipr-dnsperf-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let queries = write_queries(&dir, &snap)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let config = DnsConfig {
        listen: "127.0.0.1:0".parse()?,
        upstreams: Upstreams::Static(vec![]),
        // VIPR_UDP_WORKERS: A/B knob for the worker count (default 2, one per core).
        udp_workers: std::env::var("VIPR_UDP_WORKERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2),
        ..DnsConfig::default()
    };
    let handle = rt.block_on(DnsServer::start(config, &snap))?;
    let vipr = handle.local_addr();

    let nsd_port = free_port()?;
    let mut nsd = start_nsd(&dir, &snap, nsd_port)?;
    let nsd_addr = SocketAddr::from(([127, 0, 0, 1], nsd_port));
    let result = run_all(&args, &queries, vipr, nsd_addr);
    let _ = nsd.kill();
    let _ = nsd.wait();
    let stats = handle.stats();
    let update = time_large_update(&handle)?;
    rt.block_on(handle.shutdown());
    let _ = std::fs::remove_dir_all(&dir);
    let table = result?;
    println!("{table}");
    println!("vipr counters: {stats:?}");
    println!("{update}");
    Ok(())
}

fn parse_args() -> Args {
    let mut it = std::env::args()
        .skip(1)
        .map(|a| a.parse::<u32>().expect("numeric argument"));
    Args {
        services: it.next().unwrap_or(1000),
        seconds: it.next().unwrap_or(10),
        rate: it.next().unwrap_or(20_000),
    }
}

fn run_all(
    args: &Args,
    queries: &Path,
    vipr: SocketAddr,
    nsd: SocketAddr,
) -> Result<String, Error> {
    wait_until_answers(nsd, queries)?;
    let mut rows = Vec::new();
    // Interleaved, twice each, so that noise from other load hits both alike.
    for round in 1..=2 {
        for (name, addr) in [("vipr", vipr), ("nsd", nsd)] {
            let mut f = throughput(addr, queries, args.seconds)?;
            let lat = latency(addr, queries, args.seconds.min(5), args.rate)?;
            f.p50_ms = lat.p50_ms;
            f.p99_ms = lat.p99_ms;
            rows.push((round, name, f));
        }
    }
    let mut out = format!(
        "{} services, dnsperf -l {}s; latency at a fixed {} qps\n{:<6}{:<6}{:>12}{:>12}{:>10}{:>10}{:>10}\n",
        args.services,
        args.seconds,
        args.rate,
        "round",
        "server",
        "max qps",
        "avg ms",
        "lost",
        "p50 ms",
        "p99 ms"
    );
    for (round, name, f) in &rows {
        writeln!(
            out,
            "{round:<6}{name:<6}{:>12.0}{:>12.3}{:>10}{:>10.3}{:>10.3}",
            f.qps, f.avg_ms, f.lost, f.p50_ms, f.p99_ms
        )?;
    }
    let best = |n: &str| {
        rows.iter()
            .filter(|r| r.1 == n)
            .map(|r| r.2.qps)
            .fold(0.0, f64::max)
    };
    writeln!(
        out,
        "best qps: vipr {:.0}, nsd {:.0}, ratio {:.2}",
        best("vipr"),
        best("nsd"),
        best("vipr") / best("nsd")
    )?;
    Ok(out)
}

/// How long `update` takes (index build + swap) at 10,000 services and 100,000
/// endpoints: the bound on how stale answers can be after a change.
fn time_large_update(handle: &vipr_dns::DnsHandle) -> Result<String, Error> {
    let large = snapshot(10_000, 10);
    let t = std::time::Instant::now();
    let summary = handle.update(&large)?;
    Ok(format!(
        "update with {} services / {} endpoints took {:?}",
        summary.services,
        summary.endpoints,
        t.elapsed()
    ))
}

/// Maximum rate: many outstanding queries, as fast as dnsperf can.
fn throughput(addr: SocketAddr, queries: &Path, seconds: u32) -> Result<Figures, Error> {
    let out = dnsperf(
        addr,
        queries,
        &[
            "-l",
            &seconds.to_string(),
            "-q",
            "256",
            "-t",
            "2",
            "-c",
            "4",
        ],
    )?;
    Ok(Figures {
        qps: field(&out, "Queries per second:").unwrap_or(0.0),
        avg_ms: field(&out, "Average Latency (s):").unwrap_or(0.0) * 1000.0,
        lost: out
            .lines()
            .find(|l| l.contains("Queries lost:"))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("?")
            .to_string(),
        ..Figures::default()
    })
}

/// Fixed rate below saturation, per-query latencies from verbose output.
fn latency(addr: SocketAddr, queries: &Path, seconds: u32, rate: u32) -> Result<Figures, Error> {
    let out = dnsperf(
        addr,
        queries,
        &[
            "-l",
            &seconds.to_string(),
            "-Q",
            &rate.to_string(),
            "-v",
            "-t",
            "2",
            "-c",
            "4",
        ],
    )?;
    let mut lat: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
    };
    Ok(Figures {
        p50_ms: pct(0.50).unwrap_or(f64::NAN) * 1000.0,
        p99_ms: pct(0.99).unwrap_or(f64::NAN) * 1000.0,
        ..Figures::default()
    })
}

fn dnsperf(addr: SocketAddr, queries: &Path, extra: &[&str]) -> Result<String, Error> {
    let output = Command::new("dnsperf")
        .args([
            "-s",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
            "-d",
        ])
        .arg(queries)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running dnsperf (apt-get install dnsperf): {e}"))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn field(out: &str, label: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.trim_start().starts_with(label))?;
    line.trim_start()[label.len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// NSD loads the zone asynchronously: poll (bounded) until it answers.
fn wait_until_answers(addr: SocketAddr, queries: &Path) -> Result<(), Error> {
    for _ in 0..50 {
        let out = dnsperf(addr, queries, &["-l", "1", "-Q", "100"])?;
        if field(&out, "Queries completed:").unwrap_or(0.0) > 0.0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("nsd on {addr} never answered").into())
}

/// `services` ClusterIP services over 10 namespaces with an `http` port, plus one
/// headless service with 5 endpoints per 10 ClusterIP ones.
fn snapshot(services: u32, endpoints_per_service: u32) -> ClusterSnapshot {
    let mut snap = ClusterSnapshot::default();
    for s in 0..services {
        let headless = s % 10 == 9;
        let kind = if headless {
            ServiceKind::Headless
        } else {
            ServiceKind::ClusterIp {
                ips: vec![IpAddr::V4(Ipv4Addr::from(0x6440_0000 + s))],
            }
        };
        let endpoints = (0..endpoints_per_service)
            .map(|e| Endpoint::ready(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + s * 16 + e))))
            .collect();
        snap.services.push(Service {
            name: format!("svc-{s}"),
            namespace: format!("ns-{}", s % 10),
            kind,
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
            }],
            endpoints,
            publish_not_ready_addresses: false,
        });
    }
    snap
}

/// The same names as a static zone: what vipr answers for A and SRV queries.
fn zone_file(snap: &ClusterSnapshot) -> String {
    let mut z = String::from(
        "$ORIGIN cluster.local.\n$TTL 5\n@ IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5\n@ IN NS ns.dns.cluster.local.\nns.dns IN A 127.0.0.1\ndns-version IN TXT \"1.1.0\"\n",
    );
    for svc in &snap.services {
        let owner = format!("{}.{}.svc", svc.name, svc.namespace);
        let ips: Vec<IpAddr> = match &svc.kind {
            ServiceKind::ClusterIp { ips } => ips.clone(),
            _ => svc.endpoints.iter().map(|e| e.ip).collect(),
        };
        for ip in &ips {
            let _ = writeln!(z, "{owner} IN A {ip}");
        }
        let _ = writeln!(z, "_http._tcp.{owner} IN SRV 0 100 80 {owner}");
    }
    z
}

fn write_queries(dir: &Path, snap: &ClusterSnapshot) -> Result<PathBuf, Error> {
    let mut q = String::new();
    for (i, svc) in snap.services.iter().enumerate() {
        let name = format!("{}.{}.svc.cluster.local", svc.name, svc.namespace);
        let _ = writeln!(q, "{name} A");
        if i % 10 == 0 {
            let _ = writeln!(q, "_http._tcp.{name} SRV");
            let _ = writeln!(q, "missing-{i}.{}.svc.cluster.local A", svc.namespace);
        }
    }
    let path = dir.join("queries.txt");
    std::fs::write(&path, q)?;
    Ok(path)
}

fn start_nsd(dir: &Path, snap: &ClusterSnapshot, port: u16) -> Result<Child, Error> {
    std::fs::write(dir.join("cluster.local.zone"), zone_file(snap))?;
    let d = dir.display();
    let conf = format!(
        "server:\n  ip-address: 127.0.0.1@{port}\n  server-count: 2\n  reuseport: yes\n  username: \"\"\n  chroot: \"\"\n  zonesdir: \"{d}\"\n  database: \"\"\n  zonelistfile: \"{d}/zone.list\"\n  xfrdfile: \"{d}/xfrd.state\"\n  pidfile: \"{d}/nsd.pid\"\n  logfile: \"{d}/nsd.log\"\n  verbosity: 0\n  rrl-ratelimit: 0\n  rrl-whitelist-ratelimit: 0\nremote-control:\n  control-enable: no\nzone:\n  name: cluster.local\n  zonefile: \"{d}/cluster.local.zone\"\n"
    );
    let conf_path = dir.join("nsd.conf");
    std::fs::write(&conf_path, conf)?;
    let child = Command::new("nsd")
        .arg("-d")
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting nsd (apt-get install nsd): {e}"))?;
    Ok(child)
}

/// A free loopback port for NSD (small race with other processes; fine for a bench).
fn free_port() -> Result<u16, Error> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}
