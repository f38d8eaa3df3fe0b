//! Packet fixtures: the real XDP program, loaded into the kernel, run through
//! BPF_PROG_TEST_RUN on crafted packets. Each case states the input packet,
//! the expected verdict and the expected output packet (Katran's fixture
//! tables are the model). Needs root (CAP_BPF).
//!
//! Sections: this file (translation, malformed and foreign packets,
//! checksums, balancing); `fixtures/reject.rs` (frontends without
//! endpoints); `fixtures/conntrack.rs` (flow lifetime); `fixtures/external.rs`
//! (NodePort / external IPs, SNAT, source ranges, hairpin);
//! `fixtures/balance.rs` (algorithms, weights, session affinity);
//! `fixtures/icmp.rs` (ICMP errors about translated flows);
//! `fixtures/fast_path.rs` (translated packets forwarded from XDP).
//! `fixtures/observe.rs` (counters per frontend and backend, monitor events).

mod netns;
mod packet;

#[path = "fixtures/balance.rs"]
mod balance;
#[path = "fixtures/conntrack.rs"]
mod conntrack;
#[path = "fixtures/external.rs"]
mod external;
#[path = "fixtures/fast_path.rs"]
mod fast_path;
#[path = "fixtures/icmp.rs"]
mod icmp;
#[path = "fixtures/observe.rs"]
mod observe;
#[path = "fixtures/reject.rs"]
mod reject;

use std::net::Ipv4Addr;

use packet::{ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, Ipv4Packet, L4, ethernet, verify_checksums};
use vipr_dataplane::{BackendAddr, Counter, Dataplane, DataplaneOptions, Frontend, Port, Protocol};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 7);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_NO_ENDPOINTS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const UNKNOWN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 3, 3);
const TCP_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const UDP_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 6);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

fn port(p: u16) -> Port {
    Port::new(p).unwrap()
}

fn frontend(addr: Ipv4Addr, p: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr,
        port: port(p),
        protocol,
    }
}

fn backend(addr: Ipv4Addr, p: u16) -> BackendAddr {
    BackendAddr {
        addr,
        port: port(p),
    }
}

/// A data plane with the fixture services: VIP:80/TCP -> TCP_BACKEND:8080,
/// VIP:53/UDP -> UDP_BACKEND:5353, VIP_NO_ENDPOINTS:80/TCP -> none; service
/// CIDR 10.96.0.0/12.
fn dataplane() -> Dataplane {
    dataplane_with(DataplaneOptions {
        service_cidr: Some("10.96.0.0/12".parse().unwrap()),
        ..DataplaneOptions::default()
    })
}

/// [`dataplane`] loaded with `options`.
fn dataplane_with(options: DataplaneOptions) -> Dataplane {
    let mut dp = Dataplane::load(&options).expect("load the XDP program (needs root)");
    dp.program_service(
        frontend(VIP, 80, Protocol::Tcp),
        &[backend(TCP_BACKEND, 8080)],
    )
    .unwrap();
    dp.program_service(
        frontend(VIP, 53, Protocol::Udp),
        &[backend(UDP_BACKEND, 5353)],
    )
    .unwrap();
    dp.program_service(frontend(VIP_NO_ENDPOINTS, 80, Protocol::Tcp), &[])
        .unwrap();
    dp.program_service(frontend(VIP_NO_ENDPOINTS, 53, Protocol::Udp), &[])
        .unwrap();
    dp
}

/// Runs one packet; returns the verdict and the packet as the program left it.
fn run(dp: &mut Dataplane, input: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 256];
    let result = dp.test_run(input, &mut out, 1).expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

enum Expect {
    /// Passed with exactly these bytes (untouched or translated).
    Pass(Vec<u8>),
    /// Sent back out the interface it came in on, as exactly these bytes.
    Tx(Vec<u8>),
    /// Forwarded from XDP (the fast path) as exactly these bytes.
    Redirect(Vec<u8>),
    Drop,
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
    expect: Expect,
}

fn check(dp: &mut Dataplane, case: &Case) {
    let (verdict, out) = run(dp, &case.input);
    match &case.expect {
        Expect::Drop => assert_eq!(verdict, XDP_DROP, "{}: verdict", case.name),
        Expect::Pass(expected) => {
            assert_eq!(verdict, XDP_PASS, "{}: verdict", case.name);
            assert_eq!(&out, expected, "{}: output packet", case.name);
        }
        Expect::Tx(expected) => {
            assert_eq!(verdict, XDP_TX, "{}: verdict", case.name);
            assert_eq!(&out, expected, "{}: output packet", case.name);
        }
        Expect::Redirect(expected) => {
            assert_eq!(verdict, XDP_REDIRECT, "{}: verdict", case.name);
            assert_eq!(&out, expected, "{}: output packet", case.name);
        }
    }
    // Every rewrite (and every reply built) must carry valid checksums.
    if !matches!(case.expect, Expect::Drop) && out != case.input {
        verify_checksums(&out).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    }
}

fn tcp_to_vip() -> Ipv4Packet {
    Ipv4Packet::tcp((CLIENT, 40000), (VIP, 80))
}

fn udp_to_vip() -> Ipv4Packet {
    Ipv4Packet::udp((CLIENT, 40001), (VIP, 53))
}

fn truncated(mut frame: Vec<u8>, len: usize) -> Vec<u8> {
    frame.truncate(len);
    frame
}

#[test]
fn translation_fixtures() {
    let mut dp = dataplane();
    let tcp = tcp_to_vip();
    let udp = udp_to_vip();
    let mut udp_no_csum = Ipv4Packet::udp((CLIENT, 40002), (VIP, 53));
    udp_no_csum.l4 = L4::Udp {
        src_port: 40002,
        dst_port: 53,
        checksum: false,
    };
    let mut with_options = Ipv4Packet::tcp((CLIENT, 40003), (VIP, 80));
    with_options.options = vec![0x94, 0x04, 0, 0]; // Router Alert
    let mut ttl_one = Ipv4Packet::tcp((CLIENT, 40004), (VIP, 80));
    ttl_one.ttl = 1;
    let tcp_elsewhere = Ipv4Packet::tcp((CLIENT, 40005), (OUTSIDE, 80));
    let mut ttl_zero = Ipv4Packet::udp((CLIENT, 40012), (VIP, 53));
    ttl_zero.ttl = 0;
    let mut ttl_max = Ipv4Packet::tcp((CLIENT, 40013), (VIP, 80));
    ttl_max.ttl = 255;

    let cases = vec![
        Case {
            name: "TCP SYN to a VIP is sent to the backend",
            input: tcp.build(),
            expect: Expect::Pass(tcp.clone().with_dst(TCP_BACKEND, 8080).build()),
        },
        Case {
            name: "the same flow again keeps its backend",
            input: tcp.build(),
            expect: Expect::Pass(tcp.clone().with_dst(TCP_BACKEND, 8080).build()),
        },
        Case {
            name: "the backend's reply gets the VIP back as source",
            input: tcp.clone().with_dst(TCP_BACKEND, 8080).reply().build(),
            expect: Expect::Pass(tcp.reply().build()),
        },
        Case {
            name: "UDP to a VIP is sent to the backend",
            input: udp.build(),
            expect: Expect::Pass(udp.clone().with_dst(UDP_BACKEND, 5353).build()),
        },
        Case {
            name: "UDP reply is translated back",
            input: udp.clone().with_dst(UDP_BACKEND, 5353).reply().build(),
            expect: Expect::Pass(udp.reply().build()),
        },
        Case {
            name: "UDP without checksum stays without checksum",
            input: udp_no_csum.build(),
            expect: Expect::Pass(udp_no_csum.clone().with_dst(UDP_BACKEND, 5353).build()),
        },
        Case {
            name: "IP options: L4 found past them, header checksum covers them",
            input: with_options.build(),
            expect: Expect::Pass(with_options.clone().with_dst(TCP_BACKEND, 8080).build()),
        },
        Case {
            name: "TTL 1 is translated; expiry is the kernel's to report",
            input: ttl_one.build(),
            expect: Expect::Pass(ttl_one.clone().with_dst(TCP_BACKEND, 8080).build()),
        },
        Case {
            name: "TTL 0 is translated unchanged (the kernel drops it)",
            input: ttl_zero.build(),
            expect: Expect::Pass(ttl_zero.clone().with_dst(UDP_BACKEND, 5353).build()),
        },
        Case {
            name: "TTL 255: the TTL is never touched (XDP does not route)",
            input: ttl_max.build(),
            expect: Expect::Pass(ttl_max.clone().with_dst(TCP_BACKEND, 8080).build()),
        },
        Case {
            name: "a VIP without endpoints refuses with a RST",
            input: Ipv4Packet::tcp((CLIENT, 40006), (VIP_NO_ENDPOINTS, 80)).build(),
            expect: Expect::Tx(
                Ipv4Packet::tcp((CLIENT, 40006), (VIP_NO_ENDPOINTS, 80)).refusing_rst(),
            ),
        },
        Case {
            name: "an unknown address in the service CIDR drops",
            input: Ipv4Packet::tcp((CLIENT, 40007), (UNKNOWN_VIP, 80)).build(),
            expect: Expect::Drop,
        },
        Case {
            name: "a VIP on a port it does not serve drops",
            input: Ipv4Packet::tcp((CLIENT, 40008), (VIP, 81)).build(),
            expect: Expect::Drop,
        },
        Case {
            name: "UDP to a TCP-only VIP port drops",
            input: Ipv4Packet::udp((CLIENT, 40009), (VIP, 80)).build(),
            expect: Expect::Drop,
        },
        Case {
            name: "traffic outside the service CIDR is untouched",
            input: tcp_elsewhere.build(),
            expect: Expect::Pass(tcp_elsewhere.build()),
        },
        Case {
            name: "ICMP echo to a VIP drops",
            input: Ipv4Packet::icmp_echo(CLIENT, VIP).build(),
            expect: Expect::Drop,
        },
        Case {
            name: "ICMP elsewhere is untouched",
            input: Ipv4Packet::icmp_echo(CLIENT, OUTSIDE).build(),
            expect: Expect::Pass(Ipv4Packet::icmp_echo(CLIENT, OUTSIDE).build()),
        },
    ];
    for case in &cases {
        check(&mut dp, case);
    }

    let counters = dp.counters().unwrap();
    assert_eq!(counters.packets(Counter::NewFlow), 7, "new flows");
    assert_eq!(counters.packets(Counter::FlowHit), 1, "flow hits");
    assert_eq!(counters.packets(Counter::ReplyTranslated), 2, "replies");
    assert_eq!(counters.packets(Counter::RejectTcp), 1);
    assert_eq!(counters.packets(Counter::DropNoEndpoints), 0);
    assert_eq!(counters.packets(Counter::DropUnknownVip), 4);
    assert_eq!(counters.packets(Counter::Passed), 2);
}

#[test]
fn malformed_and_foreign_fixtures() {
    let mut dp = dataplane();
    let tcp = tcp_to_vip().build();
    let tcp_elsewhere = Ipv4Packet::tcp((CLIENT, 40010), (OUTSIDE, 80)).build();
    let mut fragment = tcp_to_vip();
    fragment.frag = 0x2000; // MF
    let mut later_fragment = tcp_to_vip();
    later_fragment.frag = 0x0010; // offset 128 bytes
    let mut foreign_fragment = Ipv4Packet::tcp((CLIENT, 40011), (OUTSIDE, 80));
    foreign_fragment.frag = 0x2000;
    let mut bad_ihl = tcp.clone();
    bad_ihl[14] = 0x44;
    let mut bad_version = tcp.clone();
    bad_version[14] = 0x65;
    let mut arp = ethernet(ETH_P_ARP);
    arp.extend([0u8; 28]);
    let mut ipv6 = ethernet(ETH_P_IPV6);
    ipv6.extend([0x60, 0, 0, 0, 0, 8, 17, 64]);
    ipv6.extend([0u8; 40]);
    let udp_to_vip_frame = udp_to_vip().build();
    let mut vlan = ethernet(0x8100);
    vlan.extend([0, 10, 8, 0]);
    vlan.extend(&tcp[14..]);
    let mut ip_header_only = ethernet(ETH_P_IP);
    ip_header_only.extend(&tcp[14..24]);

    let cases = vec![
        Case {
            name: "ARP is untouched",
            input: arp.clone(),
            expect: Expect::Pass(arp),
        },
        Case {
            name: "IPv6 is untouched",
            input: ipv6.clone(),
            expect: Expect::Pass(ipv6),
        },
        Case {
            name: "an IPv4 header cut short is left to the kernel",
            input: ip_header_only.clone(),
            expect: Expect::Pass(ip_header_only),
        },
        Case {
            name: "a TCP header cut short to a VIP drops",
            input: truncated(tcp.clone(), 14 + 20 + 10),
            expect: Expect::Drop,
        },
        Case {
            name: "a UDP header cut short to a VIP drops",
            input: truncated(udp_to_vip_frame, 14 + 20 + 6),
            expect: Expect::Drop,
        },
        Case {
            name: "an 802.1Q-tagged frame is untouched (VLANs are not parsed)",
            input: vlan.clone(),
            expect: Expect::Pass(vlan),
        },
        Case {
            name: "a TCP header cut short elsewhere is untouched",
            input: truncated(tcp_elsewhere.clone(), 14 + 20 + 10),
            expect: Expect::Pass(truncated(tcp_elsewhere, 14 + 20 + 10)),
        },
        Case {
            name: "a first fragment to a VIP drops",
            input: fragment.build(),
            expect: Expect::Drop,
        },
        Case {
            name: "a later fragment to a VIP drops",
            input: later_fragment.build(),
            expect: Expect::Drop,
        },
        Case {
            name: "a fragment elsewhere is untouched",
            input: foreign_fragment.build(),
            expect: Expect::Pass(foreign_fragment.build()),
        },
        Case {
            name: "IHL 4 to a VIP drops",
            input: bad_ihl,
            expect: Expect::Drop,
        },
        Case {
            name: "IP version 6 inside an IPv4 frame to a VIP drops",
            input: bad_version,
            expect: Expect::Drop,
        },
    ];
    for case in &cases {
        check(&mut dp, case);
    }
    let counters = dp.counters().unwrap();
    assert_eq!(counters.packets(Counter::DropMalformed), 4);
    assert_eq!(counters.packets(Counter::DropFragment), 2);
    assert_eq!(counters.packets(Counter::NewFlow), 0);
}

#[test]
fn every_rewrite_has_valid_checksums() {
    let mut dp = dataplane();
    // Many ports and payload lengths exercise carries in the incremental sums.
    for i in 0..200u16 {
        let mut tcp = Ipv4Packet::tcp((CLIENT, 1024 + i * 37), (VIP, 80));
        tcp.payload = vec![i as u8; usize::from(i % 13)];
        let (verdict, out) = run(&mut dp, &tcp.build());
        assert_eq!(verdict, XDP_PASS);
        verify_checksums(&out).unwrap_or_else(|e| panic!("TCP flow {i}: {e}"));

        let reply = tcp.clone().with_dst(TCP_BACKEND, 8080).reply();
        let (verdict, out) = run(&mut dp, &reply.build());
        assert_eq!(verdict, XDP_PASS);
        verify_checksums(&out).unwrap_or_else(|e| panic!("TCP reply {i}: {e}"));

        let udp = Ipv4Packet::udp((CLIENT, 60000 - i * 91), (VIP, 53));
        let (verdict, out) = run(&mut dp, &udp.build());
        assert_eq!(verdict, XDP_PASS);
        verify_checksums(&out).unwrap_or_else(|e| panic!("UDP flow {i}: {e}"));
    }
}

#[test]
fn flows_spread_over_backends_and_stick() {
    let mut dp = dataplane();
    let backends: Vec<_> = (1..=3)
        .map(|i| backend(Ipv4Addr::new(10, 244, 2, i), 8080))
        .collect();
    dp.program_service(frontend(VIP, 80, Protocol::Tcp), &backends)
        .unwrap();

    let mut chosen = std::collections::HashMap::new();
    for client_port in 20000..20300u16 {
        let packet = Ipv4Packet::tcp((CLIENT, client_port), (VIP, 80)).build();
        let (verdict, out) = run(&mut dp, &packet);
        assert_eq!(verdict, XDP_PASS);
        let dst = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        assert!(
            backends.iter().any(|b| b.addr == dst),
            "{dst} is no backend"
        );
        chosen.insert(client_port, dst);
    }
    // Every backend gets a fair share (expected 100 each; 50 is far below chance).
    for b in &backends {
        let share = chosen.values().filter(|d| **d == b.addr).count();
        assert!(
            share > 50,
            "backend {} got only {share} of 300 flows",
            b.addr
        );
    }
    // Removing a backend does not move established flows.
    dp.program_service(frontend(VIP, 80, Protocol::Tcp), &backends[..1])
        .unwrap();
    for (client_port, dst) in &chosen {
        let packet = Ipv4Packet::tcp((CLIENT, *client_port), (VIP, 80)).build();
        let (_, out) = run(&mut dp, &packet);
        assert_eq!(Ipv4Addr::new(out[30], out[31], out[32], out[33]), *dst);
    }
}

#[test]
fn removed_service_address_drops() {
    let mut dp = dataplane();
    let fe = frontend(VIP, 80, Protocol::Tcp);
    assert!(dp.remove_service(&fe).unwrap());
    assert!(!dp.remove_service(&fe).unwrap());
    let (verdict, _) = run(
        &mut dp,
        &Ipv4Packet::tcp((CLIENT, 41000), (VIP, 80)).build(),
    );
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(dp.frontends().len(), 3);
}

/// A bpffs folder for one test, removed on drop.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn pinned_maps_of_another_layout_are_replaced() {
    let dir = PinDir(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/vipr-fixture-{}",
        std::process::id()
    )));
    let options = DataplaneOptions {
        pin_dir: Some(dir.0.clone()),
        ..DataplaneOptions::default()
    };
    let mut dp = Dataplane::load(&options).expect("load with a pin dir (needs bpffs)");
    dp.program_service(
        frontend(VIP, 80, Protocol::Tcp),
        &[backend(TCP_BACKEND, 8080)],
    )
    .unwrap();
    drop(dp);
    // Pretend an older build left a SERVICES map with other value sizes:
    // put the (8-byte value) BACKENDS map where SERVICES (12 bytes) belongs.
    std::fs::rename(dir.0.join("BACKENDS"), dir.0.join("SERVICES")).unwrap();
    let mut dp = Dataplane::load(&options).expect("the stale pin is replaced, not reused");
    assert!(
        dp.frontends().is_empty(),
        "state of the other layout is gone"
    );
    let (verdict, _) = run(&mut dp, &tcp_to_vip().build());
    assert_eq!(
        verdict, XDP_PASS,
        "no service: passed (no service CIDR set)"
    );
}

#[test]
fn pinned_maps_of_another_size_are_replaced() {
    let dir = PinDir(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/vipr-fixture-size-{}",
        std::process::id()
    )));
    let options = |max_flows| DataplaneOptions {
        pin_dir: Some(dir.0.clone()),
        max_flows,
        ..DataplaneOptions::default()
    };
    // The table rounds up to a power of two: room for 8 and 64 flows.
    let mut dp = Dataplane::load(&options(4)).expect("load with a pin dir (needs bpffs)");
    assert_eq!(
        dp.expire_idle_flows(&Default::default()).unwrap().capacity,
        8
    );
    drop(dp);
    let mut dp = Dataplane::load(&options(50)).unwrap();
    assert_eq!(
        dp.expire_idle_flows(&Default::default()).unwrap().capacity,
        64,
        "a new --max-flows takes effect over the pinned map"
    );
}

#[test]
fn header_edge_fixtures() {
    let mut dp = dataplane();
    let eth_only = ethernet(ETH_P_IP);
    let mut lldp = ethernet(0x88cc);
    lldp.extend([0u8; 32]);

    let mut max_options = Ipv4Packet::tcp((CLIENT, 45000), (VIP, 80));
    max_options.options = [vec![0x01; 39], vec![0x00]].concat(); // NOPs, EOL: IHL 15
    let mut udp_options = Ipv4Packet::udp((CLIENT, 45001), (VIP, 53));
    udp_options.options = vec![0x94, 0x04, 0, 0];
    let mut reply_with_options = udp_options.clone().with_dst(UDP_BACKEND, 5353).reply();
    reply_with_options.options = vec![0x01, 0x01, 0x01, 0x00];
    let mut expected_reply = udp_options.reply();
    expected_reply.options = reply_with_options.options.clone();
    let mut options_elsewhere = Ipv4Packet::tcp((CLIENT, 45002), (OUTSIDE, 80));
    options_elsewhere.options = vec![0x94, 0x04, 0, 0];
    let mut options_cut_l4 = Ipv4Packet::tcp((CLIENT, 45003), (VIP, 80));
    options_cut_l4.options = vec![0x01; 8];
    let options_cut_l4 = truncated(options_cut_l4.build(), 14 + 28 + 12);
    let frame_ends_in_options = truncated(max_options.build(), 14 + 30);
    let pure_ack = Ipv4Packet {
        payload: Vec::new(),
        ..Ipv4Packet::tcp((CLIENT, 45004), (VIP, 80)).with_tcp(0x10, 1, 1)
    };
    let tcp_reply_ttl_one = {
        let syn = Ipv4Packet::tcp((CLIENT, 45005), (VIP, 80));
        run(&mut dp, &syn.build());
        let mut reply = syn.clone().with_dst(TCP_BACKEND, 8080).reply();
        reply.ttl = 1;
        let mut expected = syn.reply();
        expected.ttl = 1;
        (reply, expected)
    };
    let mut udp_ttl_one_elsewhere = Ipv4Packet::udp((CLIENT, 45006), (OUTSIDE, 53));
    udp_ttl_one_elsewhere.ttl = 1;

    let cases = vec![
        Case {
            name: "an Ethernet header alone (IPv4 type, no IP header) is untouched",
            input: eth_only.clone(),
            expect: Expect::Pass(eth_only),
        },
        Case {
            name: "LLDP (another ether type) is untouched",
            input: lldp.clone(),
            expect: Expect::Pass(lldp),
        },
        Case {
            name: "IHL 15 (40 bytes of options): translated, L4 found past them",
            input: max_options.build(),
            expect: Expect::Pass(max_options.clone().with_dst(TCP_BACKEND, 8080).build()),
        },
        Case {
            name: "UDP with IP options is translated",
            input: udp_options.build(),
            expect: Expect::Pass(udp_options.clone().with_dst(UDP_BACKEND, 5353).build()),
        },
        Case {
            name: "a reply with IP options (other ones) is translated back",
            input: reply_with_options.build(),
            expect: Expect::Pass(expected_reply.build()),
        },
        Case {
            name: "IP options to a non-service address are untouched",
            input: options_elsewhere.build(),
            expect: Expect::Pass(options_elsewhere.build()),
        },
        Case {
            name: "TCP header cut short after IP options, to a VIP: dropped",
            input: options_cut_l4,
            expect: Expect::Drop,
        },
        Case {
            name: "the frame ends inside the IP options, to a VIP: dropped",
            input: frame_ends_in_options,
            expect: Expect::Drop,
        },
        Case {
            name: "a pure ACK (no payload) of a new flow is translated",
            input: pure_ack.build(),
            expect: Expect::Pass(pure_ack.clone().with_dst(TCP_BACKEND, 8080).build()),
        },
        Case {
            name: "a reply with TTL 1 is translated back, TTL untouched",
            input: tcp_reply_ttl_one.0.build(),
            expect: Expect::Pass(tcp_reply_ttl_one.1.build()),
        },
        Case {
            name: "UDP with TTL 1 to a non-service address is untouched",
            input: udp_ttl_one_elsewhere.build(),
            expect: Expect::Pass(udp_ttl_one_elsewhere.build()),
        },
    ];
    for case in &cases {
        check(&mut dp, case);
    }
    let counters = dp.counters().unwrap();
    assert_eq!(counters.packets(Counter::DropMalformed), 2);
    assert_eq!(counters.packets(Counter::ReplyTranslated), 2);
    assert_eq!(
        counters.packets(Counter::FlowOpenedMidStream),
        1,
        "the pure ACK"
    );
}
