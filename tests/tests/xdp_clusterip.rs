//! The XDP program attached to real veths on a node namespace, carrying real
//! TCP and UDP between a client pod and a backend pod through a ClusterIP.
//!
//!   client ns (10.244.0.2) ==veth== node ns ==veth== backend ns (10.244.1.2)
//!                              XDP on both node-side veths
//!
//! The client dials the VIP 10.96.0.10; the node's XDP translates it to the
//! backend and the reply back, and the kernel routes between the veths.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Result;
use vipr_dataplane::{
    BackendAddr, Counter, Dataplane, DataplaneOptions, Frontend, Port, Protocol, XdpMode,
};
use vipr_e2e::{Netns, VethEnd, require_root, unique_prefix, veth_pair};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const UNKNOWN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 7);
const IO_TIMEOUT: Duration = Duration::from_secs(2);

struct Rig {
    // Field order is drop order: namespaces go last.
    client: Netns,
    backend: Netns,
    node: Netns,
    client_side_if: String,
    backend_side_if: String,
}

fn rig(tag: &str) -> Result<Rig> {
    let prefix = unique_prefix(tag);
    let node = Netns::new(format!("{prefix}-node"))?;
    let client = Netns::new(format!("{prefix}-cli"))?;
    let backend = Netns::new(format!("{prefix}-be"))?;
    let client_side_if = format!("{prefix}c");
    let backend_side_if = format!("{prefix}b");
    for (pod, pod_ip, node_if, node_ip) in [
        (
            &client,
            CLIENT_IP,
            &client_side_if,
            Ipv4Addr::new(10, 244, 0, 1),
        ),
        (
            &backend,
            BACKEND_IP,
            &backend_side_if,
            Ipv4Addr::new(10, 244, 1, 1),
        ),
    ] {
        veth_pair(
            &VethEnd {
                ns: &node,
                ifname: node_if.clone(),
                addr: node_ip,
                prefix_len: 24,
            },
            &VethEnd {
                ns: pod,
                ifname: "eth0".into(),
                addr: pod_ip,
                prefix_len: 24,
            },
        )?;
        pod.ip(&["route", "add", "default", "via", &node_ip.to_string()])?;
    }
    node.sysctl("net.ipv4.ip_forward", "1")?;
    Ok(Rig {
        client,
        backend,
        node,
        client_side_if,
        backend_side_if,
    })
}

fn port(p: u16) -> Port {
    Port::new(p).unwrap()
}

fn tcp_request(rig: &Rig, to: SocketAddr) -> Result<Result<String>> {
    rig.client.enter(move || -> Result<String> {
        let mut conn = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
        conn.set_read_timeout(Some(IO_TIMEOUT))?;
        writeln!(conn, "hello")?;
        let mut reply = String::new();
        BufReader::new(conn).read_line(&mut reply)?;
        Ok(reply.trim().to_owned())
    })
}

fn udp_request(rig: &Rig, to: SocketAddr) -> Result<Result<(String, SocketAddr)>> {
    rig.client.enter(move || -> Result<(String, SocketAddr)> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(IO_TIMEOUT))?;
        socket.send_to(b"who am i", to)?;
        let mut buf = [0u8; 512];
        let (n, from) = socket.recv_from(&mut buf)?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    })
}

#[test]
fn clusterip_tcp_and_udp_through_xdp_on_veths() -> Result<()> {
    require_root();
    let rig = rig("xdp")?;
    let mut dp = Dataplane::load(&DataplaneOptions {
        service_cidr: Some("10.96.0.0/12".parse()?),
        ..DataplaneOptions::default()
    })?;
    let backend = |p| BackendAddr {
        addr: BACKEND_IP,
        port: port(p),
    };
    dp.program_service(
        Frontend {
            addr: VIP,
            port: port(80),
            protocol: Protocol::Tcp,
        },
        &[backend(8080)],
    )?;
    dp.program_service(
        Frontend {
            addr: VIP,
            port: port(53),
            protocol: Protocol::Udp,
        },
        &[backend(5353)],
    )?;
    let interfaces = [rig.client_side_if.clone(), rig.backend_side_if.clone()];
    rig.node.enter(|| -> Result<()> {
        for ifname in &interfaces {
            dp.attach(ifname, XdpMode::Default)?;
        }
        Ok(())
    })??;
    assert_eq!(dp.attached_interfaces().len(), 2);

    let stop = Arc::new(AtomicBool::new(false));
    let server = vipr_e2e::spawn_peer_echo(&rig.backend, stop.clone())?;

    // TCP: the connection completes (the SYN-ACK came back from the VIP, or
    // the client's kernel would have reset it) and the backend saw the
    // client's own address: ClusterIP traffic is not masqueraded.
    let reply = tcp_request(&rig, SocketAddr::from((VIP, 80)))??;
    assert!(
        reply.starts_with(&format!("peer={CLIENT_IP}:")),
        "TCP reply {reply:?}"
    );
    for _ in 0..5 {
        tcp_request(&rig, SocketAddr::from((VIP, 80)))??;
    }

    // UDP: the answer comes from the VIP, not from the backend's address.
    let (reply, from) = udp_request(&rig, SocketAddr::from((VIP, 53)))??;
    assert!(
        reply.starts_with(&format!("peer={CLIENT_IP}:")),
        "UDP reply {reply:?}"
    );
    assert_eq!(from, SocketAddr::from((VIP, 53)));

    // An address in the service CIDR that no service holds goes nowhere.
    let unknown = tcp_request(&rig, SocketAddr::from((UNKNOWN_VIP, 80)))?;
    assert!(unknown.is_err(), "connecting to an unknown VIP succeeded");

    dp.flush_logs();
    let counters = dp.counters()?;
    assert_eq!(counters.packets(Counter::NewFlow), 7, "6 TCP + 1 UDP flows");
    assert!(counters.packets(Counter::ReplyTranslated) >= 7);
    assert!(counters.packets(Counter::FlowHit) > 0);
    assert!(counters.packets(Counter::DropUnknownVip) >= 1);

    stop.store(true, Ordering::Relaxed);
    server.join().expect("backend thread")??;
    // Detach explicitly: the interfaces live in the node namespace.
    rig.node.enter(|| -> Result<()> {
        for ifname in &interfaces {
            dp.detach(ifname)?;
        }
        Ok(())
    })??;
    Ok(())
}
