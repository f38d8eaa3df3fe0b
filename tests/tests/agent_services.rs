//! `vipr agent` end to end, seen from a client outside the node (the
//! harness's outside namespace, behind the node's uplink): NodePorts under
//! both traffic policies and externalIPs with the client address each
//! backend saw, a refused NodePort without endpoints, a long TCP flow that
//! keeps its pod while pods come and go, a UDP flow that moves when its pod
//! is deleted, an unready pod leaving within its probe period, LoadBalancer
//! addresses from `--lb-ip-pool`, and a full conntrack (`--max-flows`)
//! refusing new flows, counted, while the live ones keep working.
//!
//! Pods run vipr-netexec: HTTP for one-shot requests, UDP datagrams, and its
//! TCP line server for a flow that stays open.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use vipr_common::Counter;
use vipr_e2e::{
    agent::{AgentNode, NODE_IP, OUTSIDE_IP},
    maps::pinned_counter,
    require_root,
};

const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const HTTP_NODEPORT: u16 = 30080;
const UDP_NODEPORT: u16 = 30081;
const LINES_NODEPORT: u16 = 30090;
const LOCAL_NODEPORT: u16 = 30180;
const EMPTY_NODEPORT: u16 = 30280;
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// A netexec pod labelled `app: web`, ready per `/ready` probed every second
/// and unready after one failure.
fn web_pod(name: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: web}}}}
spec:
  containers:
  - name: netexec
    image: host
    command: [vipr-netexec, --http-port, "8080", --udp-port, "8081", --tcp-port, "9000"]
    ports:
    - {{name: http, containerPort: 8080}}
    - {{name: udp, containerPort: 8081, protocol: UDP}}
    - {{name: lines, containerPort: 9000}}
    readinessProbe: {{httpGet: {{path: /ready, port: http}}, periodSeconds: 1, failureThreshold: 1}}
---
"#
    )
}

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  externalIPs: [203.0.113.10]
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080}
  - {name: udp, port: 81, targetPort: udp, protocol: UDP, nodePort: 30081}
  - {name: lines, port: 90, targetPort: lines, nodePort: 30090}
---
apiVersion: v1
kind: Service
metadata: {name: web-local}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: web}
  ports: [{port: 80, targetPort: http, nodePort: 30180}]
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  type: NodePort
  selector: {app: nothing}
  ports: [{port: 80, nodePort: 30280}]
"#;

/// A node with the services and the named pods, all ready.
fn node_with(tag: &str, pods: &[&str]) -> Result<AgentNode> {
    node_with_flags(tag, pods, &[])
}

fn node_with_flags(tag: &str, pods: &[&str], agent_flags: &[&str]) -> Result<AgentNode> {
    let node = AgentNode::start_with(tag, agent_flags)?;
    let manifest: String = pods.iter().map(|p| web_pod(p)).collect();
    node.apply(&(manifest + SERVICES))?;
    node.wait_ready(pods, Duration::from_secs(30))?;
    Ok(node)
}

/// `curl` from outside the node: (success, body).
fn outside_get(node: &AgentNode, addr: Ipv4Addr, port: u16, path: &str) -> Result<(bool, String)> {
    let out = node
        .outside
        .command("curl")
        .args(["-s", "-m", "2", &format!("http://{addr}:{port}{path}")])
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    ))
}

/// The client address the pod behind `addr:port` saw for a request from outside.
fn source_seen(node: &AgentNode, addr: Ipv4Addr, port: u16) -> Result<Ipv4Addr> {
    let (ok, seen) = outside_get(node, addr, port, "/clientip")?;
    ensure!(ok, "{addr}:{port} did not answer from outside");
    client_ip(&seen)
}

/// The hostnames that answered `n` fresh HTTP connections to the NodePort.
fn outside_hostnames(node: &AgentNode, n: usize) -> Result<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        if let (true, host) = outside_get(node, NODE_IP, HTTP_NODEPORT, "/hostname")? {
            seen.insert(host);
        }
    }
    Ok(seen)
}

/// The address part of netexec's `IP:PORT` client address.
fn client_ip(answer: &str) -> Result<Ipv4Addr> {
    let (ip, _) = answer
        .rsplit_once(':')
        .with_context(|| format!("no IP:PORT in {answer:?}"))?;
    ip.parse()
        .with_context(|| format!("client IP in {answer:?}"))
}

/// One TCP connection to netexec's line server, opened from outside.
struct LineFlow {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl LineFlow {
    fn open(node: &AgentNode, to: SocketAddr) -> Result<Self> {
        let stream = node
            .outside
            .enter(move || TcpStream::connect_timeout(&to, IO_TIMEOUT))??;
        Self::of(stream)
    }

    fn of(stream: TcpStream) -> Result<Self> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(LineFlow {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Closes with RST instead of FIN.
    fn reset(self) {
        use std::os::fd::AsRawFd;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and a correctly sized option value.
        unsafe {
            libc::setsockopt(
                self.writer.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }

    fn ask(&mut self, command: &str) -> Result<String> {
        writeln!(self.writer, "{command}")?;
        let mut line = String::new();
        ensure!(self.reader.read_line(&mut line)? > 0, "the flow was closed");
        Ok(line.trim().to_owned())
    }
}

/// A UDP socket connected to `to` from outside the node.
fn outside_udp(node: &AgentNode, to: SocketAddr) -> Result<UdpSocket> {
    let socket = node.outside.enter(move || -> std::io::Result<UdpSocket> {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.connect(to)?;
        Ok(socket)
    })??;
    socket.set_read_timeout(Some(Duration::from_millis(300)))?;
    Ok(socket)
}

fn udp_ask(socket: &UdpSocket, command: &str) -> Result<String> {
    socket.send(command.as_bytes())?;
    let mut buf = [0u8; 512];
    let len = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..len]).trim().to_owned())
}

#[test]
fn outside_clients_through_nodeports_and_external_ips() -> Result<()> {
    require_root();
    let node = node_with_flags("aso", &["web-1"], &["--max-flows", "1000"])?;

    // externalTrafficPolicy Cluster: SNAT to the node, so the reply returns
    // through it; Local: the client's own address is kept.
    assert_eq!(
        source_seen(&node, NODE_IP, HTTP_NODEPORT)?,
        NODE_IP,
        "NodePort, Cluster"
    );
    assert_eq!(
        source_seen(&node, NODE_IP, LOCAL_NODEPORT)?,
        OUTSIDE_IP,
        "NodePort, Local"
    );

    let udp = outside_udp(&node, SocketAddr::from((NODE_IP, UDP_NODEPORT)))?;
    assert_eq!(
        client_ip(&udp_ask(&udp, "clientip")?)?,
        NODE_IP,
        "UDP NodePort"
    );

    // The external IP routes to the node, as a router in front of it would.
    node.outside.ip(&[
        "route",
        "add",
        &format!("{EXTERNAL_IP}/32"),
        "via",
        &NODE_IP.to_string(),
    ])?;
    assert_eq!(
        source_seen(&node, EXTERNAL_IP, 80)?,
        NODE_IP,
        "externalIP, Cluster"
    );
    let (ok, host) = outside_get(&node, EXTERNAL_IP, 80, "/hostname")?;
    assert!(ok && host == "web-1", "externalIP reached {host:?}");

    // No endpoint: refused at once (a RST), not a timeout. The RST leaves
    // the uplink with XDP_TX; a veth drops such frames unless its peer runs
    // an XDP program (a physical uplink needs none): the harness gives the
    // outside end the pass program.
    let started = Instant::now();
    let out = node
        .outside
        .command("curl")
        .args([
            "-s",
            "-m",
            "5",
            &format!("http://{NODE_IP}:{EMPTY_NODEPORT}/"),
        ])
        .output()?;
    let took = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl: connection refused expected"
    );
    assert!(took < Duration::from_secs(1), "refusal took {took:?}");

    // The conntrack size flag took effect (the first expiry pass runs at
    // start): the table rounds 4 slots a flow up to a power of two, 4,096.
    let metrics = node
        .node
        .command("curl")
        .args(["-s", "-m", "2", "http://127.0.0.1:10249/metrics"])
        .output()?;
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("vipr_conntrack_capacity_flows 1024"),
        "{metrics}"
    );
    Ok(())
}

#[test]
fn a_long_tcp_flow_keeps_its_pod_while_pods_come_and_go() -> Result<()> {
    require_root();
    let node = node_with("asl", &["web-1"])?;
    let mut flow = LineFlow::open(&node, SocketAddr::from((NODE_IP, LINES_NODEPORT)))?;
    assert_eq!(flow.ask("hostname")?, "web-1");

    // Scale up: new connections spread to the new pods, the flow stays.
    node.apply(&(web_pod("web-2") + &web_pod("web-3")))?;
    node.wait_ready(&["web-2", "web-3"], Duration::from_secs(30))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = outside_hostnames(&node, 12)?;
        if seen.len() == 3 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "new connections only reached {seen:?}"
        );
    }
    assert_eq!(flow.ask("hostname")?, "web-1", "after scaling up");

    // Scale down to the flow's own pod: it keeps working throughout.
    node.vipr_ok(&["delete", "pod", "web-2"])?;
    assert_eq!(flow.ask("hostname")?, "web-1", "after deleting web-2");
    node.vipr_ok(&["delete", "pod", "web-3"])?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while outside_hostnames(&node, 4)? != BTreeSet::from(["web-1".to_owned()]) {
        ensure!(Instant::now() < deadline, "deleted pods still answer");
    }
    assert_eq!(flow.ask("hostname")?, "web-1", "after scaling down");
    assert_eq!(client_ip(&flow.ask("clientip")?)?, NODE_IP);
    Ok(())
}

#[test]
fn a_udp_flow_moves_when_its_pod_is_deleted() -> Result<()> {
    require_root();
    let node = node_with("asu", &["web-1", "web-2"])?;
    let socket = outside_udp(&node, SocketAddr::from((NODE_IP, UDP_NODEPORT)))?;
    let first = udp_ask(&socket, "hostname")?;
    for _ in 0..5 {
        assert_eq!(
            udp_ask(&socket, "hostname")?,
            first,
            "the flow sticks to its pod"
        );
    }
    let other = if first == "web-1" { "web-2" } else { "web-1" };

    node.vipr_ok(&["delete", "pod", &first])?;
    // The same socket (same 5-tuple) must reach the live pod, not a
    // black-holed conntrack entry: bounded retries, each a fresh datagram.
    let started = Instant::now();
    let moved = loop {
        match udp_ask(&socket, "hostname") {
            Ok(host) if host == other => break started.elapsed(),
            Ok(host) if host == first => {}
            Ok(host) => bail!("unexpected answer {host:?}"),
            Err(_) => {}
        }
        ensure!(
            started.elapsed() < Duration::from_secs(5),
            "the UDP flow still goes to the deleted pod {first}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("UDP flow moved {moved:?} after `vipr delete pod {first}` returned");
    assert!(moved < Duration::from_secs(2), "moved only after {moved:?}");
    for _ in 0..5 {
        assert_eq!(
            udp_ask(&socket, "hostname")?,
            other,
            "the moved flow sticks"
        );
    }
    Ok(())
}

#[test]
fn an_unready_pod_leaves_within_its_probe_period() -> Result<()> {
    require_root();
    let node = node_with("asr", &["web-1", "web-2"])?;
    let both = BTreeSet::from(["web-1".to_owned(), "web-2".to_owned()]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while outside_hostnames(&node, 10)? != both {
        ensure!(Instant::now() < deadline, "both pods never answered");
    }

    let web1 = node.pod("web-1")?["status"]["podIP"]
        .as_str()
        .context("web-1 has no IP")?
        .to_owned();
    let (ok, _) = node.exec(
        "web-2",
        &[
            "curl",
            "-s",
            "-m",
            "2",
            &format!("http://{web1}:8080/ready?set=false"),
        ],
    )?;
    ensure!(ok, "could not make web-1 unready");
    let started = Instant::now();
    let only_web2 = BTreeSet::from(["web-2".to_owned()]);
    // periodSeconds 1, failureThreshold 1: the next probe fails it.
    while outside_hostnames(&node, 4)? != only_web2 {
        ensure!(
            started.elapsed() < Duration::from_secs(5),
            "web-1 still serves 5 s after turning unready"
        );
    }
    let took = started.elapsed();
    eprintln!("unready web-1 left the service after {took:?} (probe period 1 s)");
    // One period, plus the probe's own timing and the curls that observed it.
    assert!(took < Duration::from_millis(1800), "took {took:?}");
    Ok(())
}

const LB_POOL: &str = "198.18.0.0/29";

/// The pool address in a service's status.loadBalancer.ingress, once assigned.
fn wait_ingress(node: &AgentNode, service: &str) -> Result<Ipv4Addr> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let svc: serde_json::Value =
            serde_json::from_str(&node.vipr_ok(&["get", "svc", service, "-o", "json"])?)?;
        if let Some(ip) = svc["status"]["loadBalancer"]["ingress"][0]["ip"].as_str() {
            return Ok(ip.parse()?);
        }
        ensure!(Instant::now() < deadline, "{service} got no ingress: {svc}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn load_balancers_get_pool_addresses_served_from_outside() -> Result<()> {
    require_root();
    let node = AgentNode::start_with("asb", &["--lb-ip-pool", LB_POOL])?;
    let lb = |name: &str, policy: &str, kind: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  type: {kind}\n  \
             externalTrafficPolicy: {policy}\n  selector: {{app: web}}\n  \
             ports: [{{port: 80, targetPort: http}}]\n---\n"
        )
    };
    node.apply(
        &(web_pod("web-1")
            + &lb("lb", "Cluster", "LoadBalancer")
            + &lb("lb-local", "Local", "LoadBalancer")),
    )?;
    node.wait_ready(&["web-1"], Duration::from_secs(30))?;
    let cluster = wait_ingress(&node, "lb")?;
    let local = wait_ingress(&node, "lb-local")?;
    let pool: Vec<Ipv4Addr> = (1..=6).map(|i| Ipv4Addr::new(198, 18, 0, i)).collect();
    assert!(pool.contains(&cluster) && pool.contains(&local) && cluster != local);

    // The pool routes to the node, as the network in front of it would.
    node.outside
        .ip(&["route", "add", LB_POOL, "via", &NODE_IP.to_string()])?;
    assert_eq!(
        source_seen(&node, cluster, 80)?,
        NODE_IP,
        "LoadBalancer, Cluster"
    );
    assert_eq!(
        source_seen(&node, local, 80)?,
        OUTSIDE_IP,
        "LoadBalancer, Local"
    );

    // No longer a LoadBalancer: the address goes back and stops answering.
    node.apply(&lb("lb", "Cluster", "NodePort"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let svc: serde_json::Value =
            serde_json::from_str(&node.vipr_ok(&["get", "svc", "lb", "-o", "json"])?)?;
        if svc["status"]["loadBalancer"]["ingress"].is_null() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "ingress kept after type change: {svc}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, _) = outside_get(&node, cluster, 80, "/hostname")?;
    assert!(
        !ok,
        "{cluster} still answers after the service left LoadBalancer"
    );
    Ok(())
}

/// `vipr_datapath_packets_total` of one outcome, from the agent's metrics.
fn datapath_packets(node: &AgentNode, outcome: &str) -> Result<u64> {
    let out = node
        .node
        .command("curl")
        .args(["-s", "-m", "2", "http://127.0.0.1:10249/metrics"])
        .output()?;
    let metrics = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("vipr_datapath_packets_total{{outcome=\"{outcome}\"}} ");
    Ok(metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(Ok(0), str::parse)?)
}

#[test]
fn a_full_conntrack_refuses_new_flows_and_says_so() -> Result<()> {
    require_root();
    // The smallest table: 32 slots, one neighbourhood, room for 16 flows
    // (two entries each); it holds at least the 2 asked for.
    let node = node_with_flags("asf", &["web-1"], &["--max-flows", "2"])?;
    let to = SocketAddr::from((NODE_IP, LINES_NODEPORT));
    let mut open = Vec::new();
    let refused = loop {
        let attempt = node
            .outside
            .enter(move || TcpStream::connect_timeout(&to, Duration::from_millis(1500)))?;
        match attempt {
            Ok(stream) => open.push(stream),
            Err(error) => break error,
        }
        ensure!(open.len() <= 32, "32 flows got into a table of 32 slots");
    };
    assert!(
        open.len() >= 2,
        "refused with {} flows open: {refused}",
        open.len()
    );
    // Never a live flow evicted: every open one still answers.
    let mut open: Vec<LineFlow> = open.into_iter().map(LineFlow::of).collect::<Result<_>>()?;
    for flow in &mut open {
        assert_eq!(flow.ask("hostname")?, "web-1", "live flows keep working");
    }
    // The drop is counted by reason (exported every 5 s).
    let deadline = Instant::now() + Duration::from_secs(8);
    while datapath_packets(&node, "drop_flow_map_full")? == 0 {
        ensure!(
            Instant::now() < deadline,
            "no drop_flow_map_full in the metrics"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // A flow that is reset makes room at once (one closed with FINs stays
    // until idle for the closing timeout, as netfilter's TIME_WAIT).
    open.pop().expect("a flow was open").reset();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut next = loop {
        match LineFlow::open(&node, to) {
            Ok(flow) => break flow,
            Err(e) => ensure!(Instant::now() < deadline, "no room after a close: {e}"),
        }
    };
    assert_eq!(next.ask("hostname")?, "web-1");
    Ok(())
}

/// Datagrams the node's kernel forwarded (`ForwDatagrams` of /proc/net/snmp).
fn kernel_forwarded(node: &AgentNode) -> Result<u64> {
    let out = node.node.command("cat").arg("/proc/net/snmp").output()?;
    let snmp = String::from_utf8_lossy(&out.stdout);
    let mut ip_lines = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip_lines.next(), ip_lines.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no Ip: lines in /proc/net/snmp");
    };
    let column = names
        .split_whitespace()
        .position(|n| n == "ForwDatagrams")
        .context("no ForwDatagrams column")?;
    Ok(values
        .split_whitespace()
        .nth(column)
        .context("short Ip: line")?
        .parse()?)
}

#[test]
fn nodeport_flows_are_forwarded_from_xdp_unless_switched_off() -> Result<()> {
    require_root();
    const ROUND_TRIPS: u64 = 200;
    for (tag, flags, fast_path) in [
        ("afp", &[][..], true),
        ("afo", &["--xdp-redirect=false"][..], false),
    ] {
        let node = node_with_flags(tag, &["web-1"], flags)?;
        let mut flow = LineFlow::open(&node, SocketAddr::from((NODE_IP, LINES_NODEPORT)))?;
        // The first packets teach the node its neighbours (the kernel's
        // forwarding resolves them; the fast path only uses them).
        assert_eq!(flow.ask("hostname")?, "web-1");
        let forwarded_before = kernel_forwarded(&node)?;
        let redirected_before = pinned_counter(&node.pin_dir(), Counter::Redirected)?;
        for _ in 0..ROUND_TRIPS {
            assert_eq!(flow.ask("hostname")?, "web-1");
        }
        let forwarded = kernel_forwarded(&node)? - forwarded_before;
        let redirected = pinned_counter(&node.pin_dir(), Counter::Redirected)? - redirected_before;
        if fast_path {
            // Each round trip is a request in and an answer out, both ways
            // redirected (to the pod's veth and out of the uplink).
            assert!(
                redirected >= 2 * ROUND_TRIPS,
                "{redirected} redirects for {ROUND_TRIPS} round trips"
            );
            assert!(
                forwarded < ROUND_TRIPS / 10,
                "the kernel still forwarded {forwarded} packets"
            );
        } else {
            assert_eq!(redirected, 0, "redirects with --xdp-redirect=false");
            assert!(
                forwarded >= 2 * ROUND_TRIPS,
                "the kernel forwarded only {forwarded} packets"
            );
        }
    }
    Ok(())
}
