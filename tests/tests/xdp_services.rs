//! Service behaviour end to end, XDP on real veths of a node namespace:
//! refusals without endpoints, UDP flows moving off a removed backend, a
//! long TCP flow across scaling, NodePort / externalIP from an outside
//! namespace under both traffic policies, source ranges, hairpin, and a
//! data plane restart under an open connection.
//!
//!   outside ns (192.168.77.1) ==veth== node ns (uplink 192.168.77.2)
//!   client pod (10.244.0.2)   ==veth== node ns (10.244.0.1)
//!   backend pod i (10.244.i+1.2) ==veth== node ns (10.244.i+1.1)
//!
//! The translation program runs on every node-side veth; `vipr_pass` runs
//! on the client pod's eth0 so refusals sent back with XDP_TX arrive (a
//! native-mode veth drops XDP_TX frames unless its peer has XDP too).

use std::{
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use vipr_dataplane::{
    BackendAddr, Counter, Dataplane, DataplaneOptions, ExternalTrafficPolicy, Frontend,
    FrontendOptions, Port, Protocol, XdpMode,
};
use vipr_e2e::{BpfPinDir, Netns, VethEnd, require_root, unique_prefix, veth_pair};

const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const HAIRPIN_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a dropped SYN is waited for before calling it dropped.
const DROP_TIMEOUT: Duration = Duration::from_millis(700);

fn backend_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i as u8 + 1, 2)
}

fn port(p: u16) -> Port {
    Port::new(p).unwrap()
}

fn fe(addr: Ipv4Addr, p: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr,
        port: port(p),
        protocol,
    }
}

fn be(i: usize, p: u16) -> BackendAddr {
    BackendAddr {
        addr: backend_ip(i),
        port: port(p),
    }
}

struct Rig {
    prefix: String,
    // Field order is drop order: the servers stop before namespaces go.
    servers: Vec<Server>,
    outside: Netns,
    client: Netns,
    backends: Vec<Netns>,
    node: Netns,
    /// Node-side interfaces: uplink, client side, backend sides.
    node_ifs: Vec<String>,
}

/// Node, outside and client namespaces plus `backends` backend pods, all
/// wired and addressed, forwarding on, servers running in every backend.
fn rig(tag: &str, backends: usize) -> Result<Rig> {
    let prefix = unique_prefix(tag);
    let node = Netns::new(format!("{prefix}-node"))?;
    let outside = Netns::new(format!("{prefix}-out"))?;
    let client = Netns::new(format!("{prefix}-cli"))?;
    let backend_ns = (0..backends)
        .map(|i| Netns::new(format!("{prefix}-be{i}")))
        .collect::<Result<Vec<_>>>()?;
    let uplink = format!("{prefix}u");
    veth_pair(
        &VethEnd {
            ns: &node,
            ifname: uplink.clone(),
            addr: NODE_IP,
            prefix_len: 24,
        },
        &VethEnd {
            ns: &outside,
            ifname: "eth0".into(),
            addr: OUTSIDE_IP,
            prefix_len: 24,
        },
    )?;
    outside.ip(&[
        "route",
        "add",
        "203.0.113.0/24",
        "via",
        &NODE_IP.to_string(),
    ])?;
    let mut node_ifs = vec![uplink];
    let pods = std::iter::once((&client, CLIENT_IP, format!("{prefix}c")))
        .chain(
            backend_ns
                .iter()
                .enumerate()
                .map(|(i, ns)| (ns, backend_ip(i), format!("{prefix}b{i}"))),
        )
        .collect::<Vec<_>>();
    for (pod, pod_ip, node_if) in pods {
        let o = pod_ip.octets();
        let gateway = Ipv4Addr::new(o[0], o[1], o[2], 1);
        veth_pair(
            &VethEnd {
                ns: &node,
                ifname: node_if.clone(),
                addr: gateway,
                prefix_len: 24,
            },
            &VethEnd {
                ns: pod,
                ifname: "eth0".into(),
                addr: pod_ip,
                prefix_len: 24,
            },
        )?;
        pod.ip(&["route", "add", "default", "via", &gateway.to_string()])?;
        node_ifs.push(node_if);
    }
    // Forwarding, and accept_local: SNAT to the node address makes packets
    // arrive with a local source (client -> backend on the uplink, the reply
    // on the pod veth).
    for (key, value) in vipr_dataplane::NODE_SYSCTLS {
        node.sysctl(key, value)?;
    }
    let mut rig = Rig {
        prefix,
        servers: Vec::new(),
        outside,
        client,
        backends: backend_ns,
        node,
        node_ifs,
    };
    for i in 0..backends {
        let server = serve(&rig.backends[i], format!("be{i}"))?;
        rig.servers.push(server);
    }
    Ok(rig)
}

impl Rig {
    fn load(&self, options: DataplaneOptions) -> Result<Dataplane> {
        let mut dp = Dataplane::load(&DataplaneOptions {
            service_cidr: Some("10.96.0.0/12".parse()?),
            node_addr: Some(NODE_IP),
            hairpin_addr: Some(HAIRPIN_IP),
            ..options
        })?;
        self.attach(&mut dp)?;
        Ok(dp)
    }

    fn attach(&self, dp: &mut Dataplane) -> Result<()> {
        let ifs = self.node_ifs.clone();
        self.node.enter(|| -> Result<()> {
            for ifname in &ifs {
                dp.attach(ifname, XdpMode::Default)?;
            }
            Ok(())
        })??;
        // Without a program on the pod side, native-mode XDP_TX frames
        // (the refusals) are dropped by the veth: measured on 6.18, where
        // `ethtool -K eth0 gro on` on the pod side did not help either.
        self.client
            .enter(|| dp.attach_pass("eth0", XdpMode::Default))??;
        Ok(())
    }
}

/// A backend pod's servers: TCP 8080 answers every line, UDP 5353 every
/// datagram, with `peer=<addr the backend saw> host=<name>`.
struct Server {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Result<Result<()>>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn serve(ns: &Netns, host: String) -> Result<Server> {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stop_flag = stop.clone();
    let handle = ns.spawn(move || -> Result<()> {
        let tcp = TcpListener::bind("0.0.0.0:8080")?;
        let udp = UdpSocket::bind("0.0.0.0:5353")?;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(10)))?;
        ready_tx.send(()).ok();
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut buf = [0u8; 512];
        while !stop_flag.load(Ordering::Relaxed) && Instant::now() < deadline {
            if let Ok((conn, peer)) = tcp.accept() {
                let (host, stop) = (host.clone(), stop_flag.clone());
                std::thread::spawn(move || answer_lines(conn, peer, &host, &stop));
            }
            if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(format!("peer={peer} host={host}").as_bytes(), peer);
            }
        }
        Ok(())
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("backend did not start")?;
    Ok(Server {
        stop,
        handle: Some(handle),
    })
}

/// Answers each line of one connection until EOF, stop or a 60 s limit.
fn answer_lines(conn: TcpStream, peer: SocketAddr, host: &str, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writeln!(writer, "peer={peer} host={host}").is_err() {
                    return;
                }
                line.clear();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// A line-oriented TCP connection opened from inside a namespace.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn open(ns: &Netns, to: SocketAddr) -> Result<Conn> {
        let stream = ns.enter(move || TcpStream::connect_timeout(&to, IO_TIMEOUT))??;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(Conn {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// Sends a line, returns the answer (`peer=... host=...`).
    fn ask(&mut self) -> Result<String> {
        writeln!(self.writer, "hello")?;
        let mut reply = String::new();
        self.reader.read_line(&mut reply)?;
        ensure!(!reply.is_empty(), "connection closed");
        Ok(reply.trim().to_owned())
    }

    fn local_port(&self) -> Result<u16> {
        Ok(self.writer.local_addr()?.port())
    }
}

fn tcp_once(ns: &Netns, to: SocketAddr) -> Result<String> {
    Conn::open(ns, to)?.ask()
}

fn udp_ask(socket: &UdpSocket) -> Result<String> {
    socket.send(b"hello")?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn connected_udp(ns: &Netns, to: SocketAddr) -> Result<UdpSocket> {
    let socket = ns.enter(move || -> std::io::Result<UdpSocket> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.connect(to)?;
        Ok(socket)
    })??;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(socket)
}

fn peer_ip(reply: &str) -> Result<Ipv4Addr> {
    let peer = reply
        .split_whitespace()
        .find_map(|w| w.strip_prefix("peer="))
        .context("no peer in reply")?;
    let addr: SocketAddr = peer.parse()?;
    match addr {
        SocketAddr::V4(v4) => Ok(*v4.ip()),
        SocketAddr::V6(_) => bail!("IPv6 peer {addr}"),
    }
}

fn host(reply: &str) -> &str {
    reply
        .split_whitespace()
        .find_map(|w| w.strip_prefix("host="))
        .unwrap_or("")
}

#[test]
fn no_endpoints_refuses_tcp_and_udp_at_once() -> Result<()> {
    require_root();
    let rig = rig("rej", 0)?;
    let mut dp = rig.load(DataplaneOptions::default())?;
    dp.program_service(fe(VIP, 80, Protocol::Tcp), &[])?;
    dp.program_service(fe(VIP, 53, Protocol::Udp), &[])?;

    let started = Instant::now();
    let tcp = rig.client.enter(|| {
        TcpStream::connect_timeout(&SocketAddr::from((VIP, 80)), Duration::from_secs(3))
    })?;
    let elapsed = started.elapsed();
    let error = tcp
        .err()
        .context("connect to a VIP without endpoints succeeded")?;
    assert_eq!(error.kind(), ErrorKind::ConnectionRefused, "{error}");
    assert!(
        elapsed < Duration::from_millis(500),
        "refusal took {elapsed:?}"
    );

    let socket = connected_udp(&rig.client, SocketAddr::from((VIP, 53)))?;
    let started = Instant::now();
    let error = udp_ask(&socket)
        .err()
        .context("UDP to a VIP without endpoints answered")?;
    let io = error
        .downcast_ref::<std::io::Error>()
        .context("not an I/O error")?;
    assert_eq!(io.kind(), ErrorKind::ConnectionRefused, "{io}");
    assert!(started.elapsed() < Duration::from_millis(500));

    let counters = dp.counters()?;
    assert_eq!(counters.packets(Counter::RejectTcp), 1);
    assert_eq!(counters.packets(Counter::RejectUdp), 1);
    Ok(())
}

#[test]
fn udp_flow_moves_when_its_backend_is_removed() -> Result<()> {
    require_root();
    let rig = rig("udp", 2)?;
    let mut dp = rig.load(DataplaneOptions::default())?;
    let vip = fe(VIP, 53, Protocol::Udp);
    dp.program_service(vip, &[be(0, 5353), be(1, 5353)])?;

    let socket = connected_udp(&rig.client, SocketAddr::from((VIP, 53)))?;
    let first = udp_ask(&socket)?;
    assert_eq!(udp_ask(&socket)?, first, "the flow sticks to its backend");
    let (gone, kept) = if host(&first) == "be0" {
        (0, 1)
    } else {
        (1, 0)
    };
    dp.program_service(vip, &[be(kept, 5353)])?;
    let moved = udp_ask(&socket)?;
    assert_eq!(
        host(&moved),
        format!("be{kept}"),
        "the next datagram found a live backend"
    );
    assert_eq!(peer_ip(&moved)?, CLIENT_IP);
    let flows = dp.flows()?;
    assert!(
        flows.iter().all(|f| *f.backend.ip() != backend_ip(gone)),
        "a flow still points at the removed backend: {flows:?}"
    );
    Ok(())
}

#[test]
fn long_tcp_flow_survives_scaling_then_closes_and_expires() -> Result<()> {
    require_root();
    let rig = rig("tcp", 3)?;
    let mut dp = rig.load(DataplaneOptions::default())?;
    let vip = fe(VIP, 80, Protocol::Tcp);
    dp.program_service(vip, &[be(0, 8080)])?;

    let mut conn = Conn::open(&rig.client, SocketAddr::from((VIP, 80)))?;
    let first = conn.ask()?;
    assert_eq!(host(&first), "be0");
    let scales: [&[BackendAddr]; 4] = [
        &[be(0, 8080), be(1, 8080), be(2, 8080)],
        &[be(1, 8080), be(0, 8080)],
        &[be(0, 8080)],
        &[be(2, 8080), be(1, 8080), be(0, 8080)],
    ];
    for backends in scales {
        dp.program_service(vip, backends)?;
        assert_eq!(conn.ask()?, first, "after scaling to {}", backends.len());
        // New connections spread while the old one stays.
        tcp_once(&rig.client, SocketAddr::from((VIP, 80)))?;
    }
    let port = conn.local_port()?;
    assert!(dp.flows()?.iter().any(|f| f.client.port() == port));
    drop(conn);
    // FIN both ways and the last ACK close the flow: marked closed, it
    // stays until idle for the closing timeout (late packets of it are
    // still translated), then an expiry pass takes it out.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !dp
        .flows()?
        .iter()
        .any(|f| f.client.port() == port && f.closed)
    {
        ensure!(Instant::now() < deadline, "closed flow not marked closed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(dp.counters()?.packets(Counter::FlowClosed) >= 1);
    let timeouts = vipr_dataplane::FlowTimeouts {
        tcp_closing: Duration::ZERO,
        ..Default::default()
    };
    std::thread::sleep(Duration::from_millis(50));
    dp.expire_idle_flows(&timeouts)?;
    assert!(
        !dp.flows()?.iter().any(|f| f.client.port() == port),
        "the closed flow left at its (here zero) closing timeout"
    );
    Ok(())
}

#[test]
fn nodeport_and_external_ip_from_outside() -> Result<()> {
    require_root();
    let rig = rig("np", 1)?;
    let mut dp = rig.load(DataplaneOptions::default())?;
    let cluster = FrontendOptions::external(ExternalTrafficPolicy::Cluster);
    let local = FrontendOptions::external(ExternalTrafficPolicy::Local);
    dp.program_service_with(fe(NODE_IP, 30080, Protocol::Tcp), &[be(0, 8080)], &cluster)?;
    dp.program_service_with(fe(NODE_IP, 30081, Protocol::Tcp), &[be(0, 8080)], &local)?;
    dp.program_service_with(fe(NODE_IP, 30053, Protocol::Udp), &[be(0, 5353)], &cluster)?;
    dp.program_service_with(fe(EXTERNAL_IP, 80, Protocol::Tcp), &[be(0, 8080)], &cluster)?;
    dp.program_service_with(fe(EXTERNAL_IP, 81, Protocol::Tcp), &[be(0, 8080)], &local)?;
    dp.program_service_with(fe(NODE_IP, 30082, Protocol::Tcp), &[], &local)?;
    let ranged = FrontendOptions {
        external_traffic_policy: Some(ExternalTrafficPolicy::Cluster),
        source_ranges: vec!["198.51.100.0/24".parse()?],
        ..FrontendOptions::default()
    };
    dp.program_service_with(fe(EXTERNAL_IP, 82, Protocol::Tcp), &[be(0, 8080)], &ranged)?;

    let out = &rig.outside;
    let reply = tcp_once(out, SocketAddr::from((NODE_IP, 30080)))?;
    assert_eq!(
        peer_ip(&reply)?,
        NODE_IP,
        "Cluster: the backend sees the node ({reply})"
    );
    let reply = tcp_once(out, SocketAddr::from((NODE_IP, 30081)))?;
    assert_eq!(
        peer_ip(&reply)?,
        OUTSIDE_IP,
        "Local: the backend sees the client ({reply})"
    );
    let udp = connected_udp(out, SocketAddr::from((NODE_IP, 30053)))?;
    assert_eq!(peer_ip(&udp_ask(&udp)?)?, NODE_IP, "UDP NodePort, Cluster");
    let reply = tcp_once(out, SocketAddr::from((EXTERNAL_IP, 80)))?;
    assert_eq!(peer_ip(&reply)?, NODE_IP, "externalIP, Cluster ({reply})");
    let reply = tcp_once(out, SocketAddr::from((EXTERNAL_IP, 81)))?;
    assert_eq!(peer_ip(&reply)?, OUTSIDE_IP, "externalIP, Local ({reply})");

    // Dropped, not refused: Local without local endpoints, and a client
    // outside the source ranges.
    for (addr, p) in [(NODE_IP, 30082), (EXTERNAL_IP, 82)] {
        let to = SocketAddr::from((addr, p));
        let result = out.enter(move || TcpStream::connect_timeout(&to, DROP_TIMEOUT))?;
        let error = result.err().with_context(|| format!("{to} answered"))?;
        assert_eq!(error.kind(), ErrorKind::TimedOut, "{to}: {error}");
    }
    let counters = dp.counters()?;
    assert!(counters.packets(Counter::DropNoEndpoints) >= 1);
    assert!(counters.packets(Counter::DropSourceRange) >= 1);
    Ok(())
}

#[test]
fn hairpin_pod_reaches_itself_through_its_service() -> Result<()> {
    require_root();
    let rig = rig("hp", 0)?;
    let _server = serve(&rig.client, "self".into())?;
    let mut dp = rig.load(DataplaneOptions::default())?;
    dp.program_service(
        fe(VIP, 80, Protocol::Tcp),
        &[BackendAddr {
            addr: CLIENT_IP,
            port: port(8080),
        }],
    )?;
    dp.program_service(
        fe(VIP, 53, Protocol::Udp),
        &[BackendAddr {
            addr: CLIENT_IP,
            port: port(5353),
        }],
    )?;
    let reply = tcp_once(&rig.client, SocketAddr::from((VIP, 80)))?;
    assert_eq!(host(&reply), "self");
    assert_eq!(peer_ip(&reply)?, HAIRPIN_IP, "hairpin source ({reply})");
    let udp = connected_udp(&rig.client, SocketAddr::from((VIP, 53)))?;
    assert_eq!(peer_ip(&udp_ask(&udp)?)?, HAIRPIN_IP);
    Ok(())
}

#[test]
fn restarting_the_data_plane_keeps_an_open_connection() -> Result<()> {
    require_root();
    let rig = rig("rst", 2)?;
    let pins = BpfPinDir::new(&format!("{}-pins", rig.prefix))?;
    let options = || DataplaneOptions {
        pin_dir: Some(pins.path().to_owned()),
        ..DataplaneOptions::default()
    };
    let mut dp = rig.load(options())?;
    let vip = fe(VIP, 80, Protocol::Tcp);
    dp.program_service(vip, &[be(0, 8080), be(1, 8080)])?;
    let mut conn = Conn::open(&rig.client, SocketAddr::from((VIP, 80)))?;
    let first = conn.ask()?;
    let hits_before = dp.counters()?.packets(Counter::FlowHit);

    drop(dp);
    let mut dp = rig.load(options())?;
    assert!(
        dp.counters()?.packets(Counter::FlowHit) >= hits_before,
        "counters are pinned too"
    );
    assert_eq!(
        dp.frontends().len(),
        1,
        "services adopted from the pinned maps"
    );
    assert_eq!(
        conn.ask()?,
        first,
        "same connection, same backend after the restart"
    );
    // The adopted table still drives updates: scaling keeps the flow too.
    dp.program_service(vip, &[be(1, 8080), be(0, 8080)])?;
    assert_eq!(conn.ask()?, first);
    Ok(())
}

#[test]
fn pinned_links_keep_translating_while_the_data_plane_is_down() -> Result<()> {
    require_root();
    let rig = rig("pin", 1)?;
    let pins = BpfPinDir::new(&format!("{}-pins", rig.prefix))?;
    let options = || DataplaneOptions {
        pin_dir: Some(pins.path().to_owned()),
        pin_links: true,
        ..DataplaneOptions::default()
    };
    let mut dp = rig.load(options())?;
    dp.program_service(fe(VIP, 80, Protocol::Tcp), &[be(0, 8080)])?;
    let mut conn = Conn::open(&rig.client, SocketAddr::from((VIP, 80)))?;
    let first = conn.ask()?;

    drop(dp);
    // No data plane process: the pinned links and maps keep translating,
    // for the open connection and for new ones.
    assert_eq!(
        conn.ask()?,
        first,
        "open connection while the data plane is down"
    );
    tcp_once(&rig.client, SocketAddr::from((VIP, 80)))?;
    let link = rig.node.ip(&["-d", "link", "show", &rig.node_ifs[0]])?;
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("vipr_xdp"),
        "the uplink lost its program"
    );

    let mut dp = rig.load(options())?;
    let mut adopted: Vec<String> = dp
        .attached_interfaces()
        .iter()
        .map(|s| s.to_string())
        .collect();
    adopted.sort();
    let mut expected = rig.node_ifs.clone();
    expected.sort();
    assert_eq!(adopted, expected, "every pinned attachment taken over");
    assert_eq!(conn.ask()?, first, "after the reload");
    let before = dp.counters()?.packets(Counter::FlowHit);
    conn.ask()?;
    assert!(
        dp.counters()?.packets(Counter::FlowHit) > before,
        "the new program translates"
    );

    let ifs = rig.node_ifs.clone();
    for ifname in &ifs {
        dp.detach(ifname)?;
    }
    let link = rig.node.ip(&["-d", "link", "show", &rig.node_ifs[0]])?;
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("vipr_xdp"),
        "detach removes a pinned attachment"
    );
    Ok(())
}
