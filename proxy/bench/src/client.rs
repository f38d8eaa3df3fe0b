//! The load: new TCP connections timed one by one, and a UDP flood of many
//! flows. Both run on a thread inside the outside namespace, so every packet
//! crosses the node's uplink like a real client's.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use rand::Rng;

/// A connection that takes longer than this counts as failed. Three
/// seconds leaves room for one SYN retransmit (the first comes after 1 s):
/// a single lost packet makes a slow connection, counted as such, not a
/// failed one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A connection slower than this waited for a SYN or SYN-ACK retransmit.
const RETRANSMIT_LATENCY: Duration = Duration::from_millis(900);
/// Failures tolerated before a mode's figures are called broken.
const MAX_FAILURES: usize = 5;

pub struct Connections {
    /// Time from `connect()` to established, per connection, in µs.
    pub latencies_us: Vec<f64>,
    pub per_second: f64,
    pub failures: usize,
    /// Connections that needed a SYN retransmit (a packet was lost).
    pub retransmitted: usize,
}

/// Opens `count` connections one after another, each to a target `pick`
/// chooses at random among `targets`, and closes each at once.
pub fn connect_many(
    count: usize,
    targets: usize,
    pick: impl Fn(usize) -> (Ipv4Addr, u16),
) -> Result<Connections> {
    let mut rng = rand::rng();
    let mut latencies_us = Vec::with_capacity(count);
    let mut failures = 0;
    let mut retransmitted = 0;
    let started = Instant::now();
    for _ in 0..count {
        let (addr, port) = pick(rng.random_range(0..targets));
        let begin = Instant::now();
        match TcpStream::connect_timeout(&SocketAddr::from((addr, port)), CONNECT_TIMEOUT) {
            Ok(stream) => {
                let took = begin.elapsed();
                retransmitted += usize::from(took > RETRANSMIT_LATENCY);
                latencies_us.push(took.as_secs_f64() * 1e6);
                reset_on_close(&stream);
            }
            Err(error) => {
                failures += 1;
                if failures > MAX_FAILURES {
                    bail!("connections to {addr}:{port} fail: {error}");
                }
            }
        }
    }
    let per_second = latencies_us.len() as f64 / started.elapsed().as_secs_f64();
    Ok(Connections {
        latencies_us,
        per_second,
        failures,
        retransmitted,
    })
}

/// Makes closing send RST instead of FIN, so thousands of timed
/// connections leave no TIME_WAIT entries behind on the client.
fn reset_on_close(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Where a flood leaves: the client's end of the node's uplink, and the
/// Ethernet addresses its frames carry (the client's, the node's uplink's).
pub struct FloodLink {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// How a flood picks its source ports.
#[derive(Clone, Debug)]
pub struct FloodPlan {
    /// Source ports, one flow each, used in turn.
    pub ports: std::ops::Range<u16>,
    /// Stop after each port has sent once (every datagram a new flow)
    /// instead of cycling through them until `duration` ends.
    pub once: bool,
    /// The longest the flood lasts.
    pub duration: Duration,
}

/// Sends small UDP datagrams to `target` from `source`, one flow per
/// source port of the plan. Frames go straight to the device (a packet
/// socket, qdisc bypassed), so the client's own IP stack (routing,
/// neighbour lookup per datagram) never limits the rate the node is
/// offered; one socket, and no local port binding limits how many flows
/// there are. Returns how many were sent.
pub fn udp_flood(
    link: &FloodLink,
    source: Ipv4Addr,
    target: (Ipv4Addr, u16),
    plan: &FloodPlan,
) -> Result<u64> {
    let eth_p_ip = (libc::ETH_P_IP as u16).to_be();
    // SAFETY: plain socket creation; the fd is owned below. Protocol 0:
    // the socket sends only, it receives nothing.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("packet socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&socket);
    let bypass: libc::c_int = 1;
    // SAFETY: valid fd and option value for the call's duration.
    let rc = unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const bypass).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        bail!("PACKET_QDISC_BYPASS: {}", std::io::Error::last_os_error());
    }
    // SAFETY: all-zero is a valid sockaddr_ll; the fields are set below.
    let mut device: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    device.sll_family = libc::AF_PACKET as u16;
    device.sll_protocol = eth_p_ip;
    device.sll_ifindex = link.ifindex as i32;
    device.sll_halen = 6;
    device.sll_addr[..6].copy_from_slice(&link.dst_mac);

    let mut frame = Vec::with_capacity(14 + 46);
    frame.extend(link.dst_mac);
    frame.extend(link.src_mac);
    frame.extend(eth_p_ip.to_ne_bytes());
    frame.extend(with_ip_checksum(udp_packet(source, target)));
    const SRC_PORT: usize = 14 + 20;
    let mut sent = 0u64;
    let deadline = Instant::now() + plan.duration;
    let mut ports = plan.ports.clone().cycle();
    let per_lap = plan.ports.len() as u64;
    'flood: while Instant::now() < deadline {
        // A batch between clock reads keeps the clock out of the rate.
        for _ in 0..64 {
            if plan.once && sent == per_lap {
                break 'flood;
            }
            let Some(port) = ports.next() else {
                break 'flood;
            };
            frame[SRC_PORT..SRC_PORT + 2].copy_from_slice(&port.to_be_bytes());
            // SAFETY: valid fd, buffer and address for the call's duration.
            let n = unsafe {
                libc::sendto(
                    raw,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const device).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if n > 0 {
                sent += 1;
            }
        }
    }
    Ok(sent)
}

/// `packet` with its total length and header checksum filled in (what the
/// kernel does for a raw IP socket; a packet socket sends bytes as given).
fn with_ip_checksum(mut packet: Vec<u8>) -> Vec<u8> {
    let total = packet.len() as u16;
    packet[2..4].copy_from_slice(&total.to_be_bytes());
    let sum: u32 = packet[..20]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let folded = (folded & 0xffff) + (folded >> 16);
    packet[10..12].copy_from_slice(&(!(folded as u16)).to_be_bytes());
    packet
}

/// An IPv4 + UDP datagram with an 18-byte payload, without its total
/// length and header checksum; UDP checksum 0 means none.
fn udp_packet(source: Ipv4Addr, (addr, port): (Ipv4Addr, u16)) -> Vec<u8> {
    const PAYLOAD: usize = 18;
    let mut p = vec![0u8; 28 + PAYLOAD];
    p[0] = 0x45;
    p[6] = 0x40; // DF
    p[8] = 64; // TTL
    p[9] = libc::IPPROTO_UDP as u8;
    p[12..16].copy_from_slice(&source.octets());
    p[16..20].copy_from_slice(&addr.octets());
    p[22..24].copy_from_slice(&port.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + PAYLOAD) as u16).to_be_bytes());
    p
}
