//! Test helpers: a fixture snapshot, a server on an ephemeral loopback port, and a
//! tiny DNS client over UDP and TCP (every wait bounded by a timeout).
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use vipr_dns::{
    ClusterSnapshot, DnsConfig, DnsHandle, DnsServer, Endpoint, Pod, Protocol, Service,
    ServiceKind, ServicePort, Upstreams,
};

pub const TIMEOUT: Duration = Duration::from_secs(2);

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn port(name: &str, protocol: Protocol, port: u16) -> ServicePort {
    ServicePort {
        name: name.into(),
        protocol,
        port,
    }
}

pub fn service(
    ns: &str,
    name: &str,
    kind: ServiceKind,
    ports: Vec<ServicePort>,
    endpoints: Vec<Endpoint>,
) -> Service {
    Service {
        name: name.into(),
        namespace: ns.into(),
        kind,
        ports,
        endpoints,
        publish_not_ready_addresses: false,
    }
}

pub fn named_ep(addr: &str, hostname: &str) -> Endpoint {
    Endpoint {
        hostname: Some(hostname.into()),
        ..Endpoint::ready(ip(addr))
    }
}

pub fn not_ready(addr: &str) -> Endpoint {
    Endpoint {
        ready: false,
        serving: false,
        ..Endpoint::ready(ip(addr))
    }
}

/// The cluster the table tests query.
pub fn fixture() -> ClusterSnapshot {
    let mut notready = service(
        "default",
        "notready",
        ServiceKind::Headless,
        vec![],
        vec![not_ready("10.1.2.1")],
    );
    notready.publish_not_ready_addresses = true;
    ClusterSnapshot {
        namespaces: vec!["default".into(), "emptyns".into()],
        services: vec![
            service(
                "default",
                "web",
                ServiceKind::ClusterIp {
                    ips: vec![ip("10.96.0.10"), ip("fd00::10")],
                },
                vec![
                    port("http", Protocol::Tcp, 80),
                    port("dns", Protocol::Udp, 53),
                    port("", Protocol::Tcp, 9),
                ],
                vec![Endpoint::ready(ip("10.1.0.1")), not_ready("10.1.0.2")],
            ),
            service(
                "default",
                "db",
                ServiceKind::Headless,
                vec![port("pg", Protocol::Tcp, 5432)],
                vec![
                    named_ep("10.1.1.1", "db-0"),
                    named_ep("10.1.1.2", "db-1"),
                    not_ready("10.1.1.3"),
                    Endpoint::ready(ip("fd00::1:1")),
                ],
            ),
            service("default", "empty", ServiceKind::Headless, vec![], vec![]),
            notready,
            service(
                "default",
                "ext",
                ServiceKind::ExternalName {
                    external_name: "example.com".into(),
                },
                vec![],
                vec![],
            ),
        ],
        pods: vec![
            pod("web-1", "default", "10.1.0.1", None, None),
            pod("db-0", "default", "10.1.1.1", Some("db-0"), Some("db")),
            pod("custom", "default", "10.1.3.3", Some("custom"), Some("db")),
        ],
    }
}

pub fn pod(
    name: &str,
    ns: &str,
    addr: &str,
    hostname: Option<&str>,
    subdomain: Option<&str>,
) -> Pod {
    Pod {
        name: name.into(),
        namespace: ns.into(),
        ip: ip(addr),
        hostname: hostname.map(Into::into),
        subdomain: subdomain.map(Into::into),
    }
}

pub fn test_config(upstreams: Vec<SocketAddr>) -> DnsConfig {
    DnsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstreams: Upstreams::Static(upstreams),
        udp_workers: 2,
        upstream_timeout: Duration::from_millis(500),
        ..DnsConfig::default()
    }
}

pub async fn start(snapshot: &ClusterSnapshot, upstreams: Vec<SocketAddr>) -> DnsHandle {
    DnsServer::start(test_config(upstreams), snapshot)
        .await
        .expect("server starts")
}

pub fn query_message(name: &str, qtype: RecordType, edns: Option<u16>) -> Message {
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        msg.set_edns(e);
    }
    msg
}

/// Sends raw bytes over UDP and waits for one reply (None on timeout).
pub async fn udp_raw(server: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(bytes, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(wait, sock.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    buf.truncate(n);
    Some(buf)
}

pub async fn udp_query(
    server: SocketAddr,
    name: &str,
    qtype: RecordType,
    edns: Option<u16>,
) -> Message {
    let msg = query_message(name, qtype, edns);
    let reply = udp_raw(server, &msg.to_vec().unwrap(), TIMEOUT)
        .await
        .expect("udp reply");
    let reply = Message::from_vec(&reply).expect("decodable reply");
    assert_eq!(reply.metadata.id, msg.metadata.id);
    reply
}

pub async fn tcp_exchange(stream: &mut TcpStream, bytes: &[u8]) -> Vec<u8> {
    let fut = async {
        stream
            .write_all(&(bytes.len() as u16).to_be_bytes())
            .await
            .unwrap();
        stream.write_all(bytes).await.unwrap();
        let len = stream.read_u16().await.unwrap();
        let mut buf = vec![0u8; usize::from(len)];
        stream.read_exact(&mut buf).await.unwrap();
        buf
    };
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .expect("tcp reply in time")
}

pub async fn tcp_query(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let mut stream = TcpStream::connect(server).await.unwrap();
    let msg = query_message(name, qtype, None);
    let reply =
        Message::from_vec(&tcp_exchange(&mut stream, &msg.to_vec().unwrap()).await).unwrap();
    assert_eq!(reply.metadata.id, msg.metadata.id);
    reply
}

/// `name TYPE rdata`, lowercased, sorted: order-independent section comparison.
pub fn section(records: &[hickory_proto::rr::Record]) -> Vec<String> {
    let mut v: Vec<String> = records
        .iter()
        .map(|r| format!("{} {} {}", r.name, r.record_type(), r.data).to_ascii_lowercase())
        .collect();
    v.sort();
    v
}
