//! Behaviour of the real server on loopback: forwarding and caching against a stub
//! upstream, truncation, malformed input and floods, freshness of updates, the
//! recursion ACL and shutdown.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use vipr_dns::{ClusterSnapshot, DnsServer, Endpoint, ServiceKind};

/// A stub upstream on loopback (UDP and TCP on one port) with canned answers:
/// `example.org A` -> 1.2.3.4 TTL 30, `big.example.org TXT` -> TC over UDP and the
/// full answer over TCP, anything else NXDOMAIN with an SOA (minimum 10).
struct StubUpstream {
    addr: SocketAddr,
    udp_queries: Arc<AtomicUsize>,
    tcp_queries: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl StubUpstream {
    async fn start() -> Self {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).await.unwrap();
        let udp_queries = Arc::new(AtomicUsize::new(0));
        let tcp_queries = Arc::new(AtomicUsize::new(0));
        let (uq, tq) = (udp_queries.clone(), tcp_queries.clone());
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
                uq.fetch_add(1, Ordering::SeqCst);
                let reply = stub_answer(&buf[..n], true);
                let _ = udp.send_to(&reply, peer).await;
            }
        });
        let tcp_task = tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp.accept().await {
                tq.fetch_add(1, Ordering::SeqCst);
                let len = s.read_u16().await.unwrap();
                let mut buf = vec![0u8; usize::from(len)];
                s.read_exact(&mut buf).await.unwrap();
                let reply = stub_answer(&buf, false);
                s.write_all(&(reply.len() as u16).to_be_bytes())
                    .await
                    .unwrap();
                s.write_all(&reply).await.unwrap();
            }
        });
        StubUpstream {
            addr,
            udp_queries,
            tcp_queries,
            tasks: vec![udp_task, tcp_task],
        }
    }
}

impl Drop for StubUpstream {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

fn stub_answer(bytes: &[u8], udp: bool) -> Vec<u8> {
    let req = Message::from_vec(bytes).unwrap();
    let q = req.queries[0].clone();
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.recursion_available = true;
    resp.add_query(q.clone());
    match (q.name.to_ascii().as_str(), q.query_type) {
        ("example.org.", RecordType::A) => {
            resp.add_answer(Record::from_rdata(
                q.name.clone(),
                30,
                RData::A(A::new(1, 2, 3, 4)),
            ));
        }
        ("big.example.org.", RecordType::TXT) if udp => resp.metadata.truncation = true,
        ("big.example.org.", RecordType::TXT) => {
            resp.add_answer(Record::from_rdata(
                q.name.clone(),
                30,
                RData::TXT(TXT::new(vec!["x".repeat(200)])),
            ));
        }
        _ => {
            resp.metadata.response_code = ResponseCode::NXDomain;
            let org = Name::from_ascii("example.org.").unwrap();
            let soa = SOA::new(org.clone(), org.clone(), 1, 1, 1, 1, 10);
            resp.add_authority(Record::from_rdata(org, 60, RData::SOA(soa)));
        }
    }
    resp.to_vec().unwrap()
}

#[tokio::test]
async fn forwards_out_of_zone_names_and_caches_by_ttl() {
    let stub = StubUpstream::start().await;
    let server = start(&fixture(), vec![stub.addr]).await;
    let addr = server.local_addr();

    let first = udp_query(addr, "example.org.", RecordType::A, None).await;
    assert_eq!(first.metadata.response_code, ResponseCode::NoError);
    assert!(first.metadata.recursion_available && !first.metadata.authoritative);
    assert_eq!(section(&first.answers), vec!["example.org. a 1.2.3.4"]);
    // Second time (and over TCP, case changed): from the cache, TTL not above the original.
    let second = udp_query(addr, "example.org.", RecordType::A, None).await;
    let third = tcp_query(addr, "EXAMPLE.org.", RecordType::A).await;
    assert_eq!(section(&second.answers), vec!["example.org. a 1.2.3.4"]);
    assert!(second.answers[0].ttl <= 30);
    assert_eq!(third.answers.len(), 1);
    assert_eq!(stub.udp_queries.load(Ordering::SeqCst), 1, "cached");

    // Negative answers are cached too (SOA minimum 10 s).
    for _ in 0..2 {
        let nx = udp_query(addr, "nope.example.org.", RecordType::A, None).await;
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(nx.authorities.len(), 1);
    }
    assert_eq!(stub.udp_queries.load(Ordering::SeqCst), 2);

    let stats = server.stats();
    assert_eq!((stats.forwarded, stats.cache_hits), (2, 3));
    assert_eq!(stats.nxdomain, 2);
    server.shutdown().await;
}

#[tokio::test]
async fn truncated_upstream_answer_is_refetched_over_tcp() {
    let stub = StubUpstream::start().await;
    let server = start(&fixture(), vec![stub.addr]).await;
    let reply = tcp_query(server.local_addr(), "big.example.org.", RecordType::TXT).await;
    assert_eq!(reply.answers.len(), 1);
    assert_eq!(stub.tcp_queries.load(Ordering::SeqCst), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn unreachable_upstream_gives_servfail() {
    // A bound socket that never answers: the forwarder must time out, not hang.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let server = start(&fixture(), vec![silent.local_addr().unwrap()]).await;
    let reply = udp_query(server.local_addr(), "example.org.", RecordType::A, None).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(server.stats().servfail, 1);
    server.shutdown().await;
}

fn big_snapshot() -> ClusterSnapshot {
    let endpoints = (0..100u8)
        .map(|i| Endpoint::ready(ip(&format!("10.2.0.{i}"))))
        .collect();
    ClusterSnapshot {
        services: vec![service(
            "default",
            "big",
            ServiceKind::Headless,
            vec![],
            endpoints,
        )],
        ..ClusterSnapshot::default()
    }
}

#[tokio::test]
async fn udp_truncates_unless_edns_payload_allows() {
    let server = start(&big_snapshot(), vec![]).await;
    let addr = server.local_addr();
    let name = "big.default.svc.cluster.local.";

    let plain = udp_query(addr, name, RecordType::A, None).await;
    assert!(
        plain.metadata.truncation,
        "100 A records do not fit 512 bytes"
    );
    assert!(plain.answers.is_empty());
    assert_eq!(plain.queries.len(), 1);

    let edns = udp_query(addr, name, RecordType::A, Some(4096)).await;
    assert!(!edns.metadata.truncation);
    assert_eq!(edns.answers.len(), 100);
    assert!(edns.edns.is_some(), "OPT echoed");

    let small_edns = udp_query(addr, name, RecordType::A, Some(1024)).await;
    assert!(
        small_edns.metadata.truncation,
        "advertised 1024 is honoured"
    );

    let tcp = tcp_query(addr, name, RecordType::A).await;
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 100);
    assert_eq!(server.stats().truncated, 2);
    server.shutdown().await;
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
fn junk(seed: &mut u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed as u8
        })
        .collect()
}

#[tokio::test]
async fn garbage_udp_is_dropped_or_formerr_and_service_continues() {
    let server = start(&fixture(), vec![]).await;
    let addr = server.local_addr();
    let short = Duration::from_millis(200);

    // Shorter than a header: no reply possible.
    assert!(
        udp_raw(addr, &[0x12, 0x34, 0x01, 0x00, 0x00], short)
            .await
            .is_none()
    );
    // A response packet: never answered (no reflection loops).
    let mut resp = query_message("web.default.svc.cluster.local.", RecordType::A, None);
    resp.metadata.message_type = MessageType::Response;
    assert!(
        udp_raw(addr, &resp.to_vec().unwrap(), short)
            .await
            .is_none()
    );

    // Header promising a question that is not there: FORMERR, same id.
    let header_only = [0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    assert_formerr(
        &udp_raw(addr, &header_only, TIMEOUT).await.unwrap(),
        0xbeef,
        1,
    );
    // Oversized: a valid header followed by 60,000 bytes of junk.
    let mut seed = 0x9e37_79b9_7f4a_7c15;
    let mut big = header_only.to_vec();
    big.extend(junk(&mut seed, 60_000));
    assert_formerr(&udp_raw(addr, &big, TIMEOUT).await.unwrap(), 0xbeef, 1);
    // Two questions: FORMERR.
    let mut two = query_message("a.cluster.local.", RecordType::A, None);
    two.add_query(two.queries[0].clone());
    assert_formerr(
        &udp_raw(addr, &two.to_vec().unwrap(), TIMEOUT)
            .await
            .unwrap(),
        two.metadata.id,
        1,
    );
    // Opcode STATUS: NOTIMP.
    let status = [0x00, 0x07, 0x10, 0x00, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_formerr(&udp_raw(addr, &status, TIMEOUT).await.unwrap(), 7, 4);

    // 500 random datagrams of random sizes, fire and forget.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..500 {
        let len = (junk(&mut seed, 2)[0] as usize) * 2;
        let _ = sock.send_to(&junk(&mut seed, len), addr).await;
    }

    let ok = udp_query(addr, "web.default.svc.cluster.local.", RecordType::A, None).await;
    assert_eq!(
        section(&ok.answers),
        vec!["web.default.svc.cluster.local. a 10.96.0.10"]
    );
    let stats = server.stats();
    assert!(stats.dropped >= 2, "{stats:?}");
    assert!(stats.formerr >= 4, "{stats:?}");
    server.shutdown().await;
}

fn assert_formerr(reply: &[u8], id: u16, rcode: u8) {
    assert!(reply.len() >= 12);
    assert_eq!(u16::from_be_bytes([reply[0], reply[1]]), id);
    assert_eq!(reply[2] & 0x80, 0x80, "QR set");
    assert_eq!(reply[3] & 0x0f, rcode);
}

#[tokio::test]
async fn garbage_tcp_gets_formerr_and_connection_keeps_working() {
    let server = start(&fixture(), vec![]).await;
    let addr = server.local_addr();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut junk_msg = vec![0x00, 0x42, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    junk_msg.extend_from_slice(&[0xff; 40]);
    assert_formerr(&tcp_exchange(&mut stream, &junk_msg).await, 0x42, 1);
    let q = query_message("web.default.svc.cluster.local.", RecordType::A, None);
    let reply = Message::from_vec(&tcp_exchange(&mut stream, &q.to_vec().unwrap()).await).unwrap();
    assert_eq!(reply.answers.len(), 1);

    // A peer announcing 1000 bytes and hanging up must not disturb anyone.
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(&[0x03, 0xe8, 1, 2, 3]).await.unwrap();
    drop(half);
    assert_eq!(
        tcp_query(addr, "web.default.svc.cluster.local.", RecordType::A)
            .await
            .answers
            .len(),
        1
    );
    server.shutdown().await;
}

#[tokio::test]
async fn flood_does_not_stop_answers() {
    let server = start(&fixture(), vec![]).await;
    let addr = server.local_addr();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let query = query_message("db.default.svc.cluster.local.", RecordType::A, None)
        .to_vec()
        .unwrap();
    let mut seed = 42;
    // 20,000 datagrams as fast as we can, half garbage, never reading replies.
    for i in 0..20_000 {
        let bytes = if i % 2 == 0 {
            query.clone()
        } else {
            junk(&mut seed, 64)
        };
        let _ = sock.send_to(&bytes, addr).await;
    }
    let t = Instant::now();
    let ok = udp_query(addr, "web.default.svc.cluster.local.", RecordType::A, None).await;
    assert_eq!(ok.answers.len(), 1);
    assert!(t.elapsed() < TIMEOUT);
    server.shutdown().await;
}

#[tokio::test]
async fn updates_are_visible_within_100ms() {
    let server = start(&fixture(), vec![]).await;
    let addr = server.local_addr();
    let name = "new.default.svc.cluster.local.";
    assert_eq!(
        udp_query(addr, name, RecordType::A, None)
            .await
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );

    let mut snap = fixture();
    snap.services.push(service(
        "default",
        "new",
        ServiceKind::ClusterIp {
            ips: vec![ip("10.96.0.99")],
        },
        vec![],
        vec![],
    ));
    let t = Instant::now();
    let summary = server.update(&snap).unwrap();
    assert_eq!(summary.services, 6);
    let mut visible = None;
    for _ in 0..50 {
        let reply = udp_query(addr, name, RecordType::A, None).await;
        if reply.answers.len() == 1 {
            visible = Some(t.elapsed());
            break;
        }
        if t.elapsed() > Duration::from_millis(100) {
            break;
        }
    }
    let visible = visible.expect("update visible");
    assert!(
        visible < Duration::from_millis(100),
        "visible after {visible:?}"
    );

    server.update(&fixture()).unwrap();
    assert_eq!(
        udp_query(addr, name, RecordType::A, None)
            .await
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );
    assert_eq!(server.stats().updates, 2);
    server.shutdown().await;
}

#[tokio::test]
async fn recursion_refused_for_clients_outside_allowed_cidrs() {
    let stub = StubUpstream::start().await;
    let config = vipr_dns::DnsConfig {
        allowed_clients: vec!["10.0.0.0/8".parse().unwrap()],
        ..test_config(vec![stub.addr])
    };
    let server = DnsServer::start(config, &fixture()).await.unwrap();
    let addr = server.local_addr();
    let refused = udp_query(addr, "example.org.", RecordType::A, None).await;
    assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
    assert!(refused.answers.is_empty() && !refused.metadata.recursion_available);
    let refused_tcp = tcp_query(addr, "example.org.", RecordType::A).await;
    assert_eq!(refused_tcp.metadata.response_code, ResponseCode::Refused);
    assert_eq!(
        stub.udp_queries.load(Ordering::SeqCst),
        0,
        "never forwarded"
    );
    // Cluster names are authoritative data, not recursion: still answered.
    let local = udp_query(addr, "web.default.svc.cluster.local.", RecordType::A, None).await;
    assert_eq!(local.answers.len(), 1);
    assert_eq!(server.stats().refused, 2);
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_stops_answering_and_frees_the_port() {
    let server = start(&fixture(), vec![]).await;
    let addr = server.local_addr();
    let tcp_idle = TcpStream::connect(addr).await.unwrap();
    let t = Instant::now();
    server.shutdown().await;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "idle TCP connection did not delay shutdown"
    );
    drop(tcp_idle);
    let q = query_message("web.default.svc.cluster.local.", RecordType::A, None);
    assert!(
        udp_raw(addr, &q.to_vec().unwrap(), Duration::from_millis(200))
            .await
            .is_none()
    );
    assert!(TcpStream::connect(addr).await.is_err());
    // The port can be bound again.
    UdpSocket::bind(addr).await.expect("udp port free");
}

#[tokio::test]
async fn forwarding_is_bounded_under_flood() {
    // One forward slot and a silent upstream: the first query holds the slot until the
    // upstream timeout, the next ones get SERVFAIL at once instead of piling up.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let config = vipr_dns::DnsConfig {
        max_inflight_forwards: 1,
        upstream_timeout: Duration::from_secs(1),
        ..test_config(vec![silent.local_addr().unwrap()])
    };
    let server = DnsServer::start(config, &fixture()).await.unwrap();
    let addr = server.local_addr();
    let slow = query_message("slow.example.org.", RecordType::A, None);
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&slow.to_vec().unwrap(), addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    let fast = udp_query(addr, "other.example.org.", RecordType::A, None).await;
    assert_eq!(fast.metadata.response_code, ResponseCode::ServFail);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "rejected without waiting"
    );
    // In-zone names are unaffected.
    assert_eq!(
        udp_query(addr, "web.default.svc.cluster.local.", RecordType::A, None)
            .await
            .answers
            .len(),
        1
    );
    server.shutdown().await;
}

#[tokio::test]
async fn tcp_connections_are_bounded() {
    let config = vipr_dns::DnsConfig {
        max_tcp_connections: 1,
        ..test_config(vec![])
    };
    let server = DnsServer::start(config, &fixture()).await.unwrap();
    let addr = server.local_addr();
    let mut first = TcpStream::connect(addr).await.unwrap();
    let q = query_message("web.default.svc.cluster.local.", RecordType::A, None)
        .to_vec()
        .unwrap();
    tcp_exchange(&mut first, &q).await;
    // The second connection is accepted by the kernel, then closed by the server.
    let mut second = TcpStream::connect(addr).await.unwrap();
    let _ = second.write_all(&(q.len() as u16).to_be_bytes()).await;
    let _ = second.write_all(&q).await;
    let mut buf = [0u8; 2];
    let read = tokio::time::timeout(TIMEOUT, second.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "second connection closed: {read:?}"
    );
    // The first still works, and UDP is unaffected.
    assert!(!tcp_exchange(&mut first, &q).await.is_empty());
    assert_eq!(
        udp_query(addr, "web.default.svc.cluster.local.", RecordType::A, None)
            .await
            .answers
            .len(),
        1
    );
    server.shutdown().await;
}

#[tokio::test]
async fn edns_version_above_zero_gets_badvers() {
    let server = start(&fixture(), vec![]).await;
    let mut msg = query_message("web.default.svc.cluster.local.", RecordType::A, Some(1232));
    msg.edns.as_mut().unwrap().set_version(1);
    let reply = udp_raw(server.local_addr(), &msg.to_vec().unwrap(), TIMEOUT)
        .await
        .unwrap();
    let reply = Message::from_vec(&reply).unwrap();
    // BADVERS and BADSIG share code 16; hickory decodes it as BADSIG.
    assert_eq!(u16::from(reply.metadata.response_code), 16);
    server.shutdown().await;
}
