//! Packet fixtures of the XDP forwarding fast path: translated packets
//! through BPF_PROG_TEST_RUN, with the kernel's FIB and neighbour table
//! answering the route lookup. Needs root.
//!
//! BPF_PROG_TEST_RUN runs the program in the calling thread's network
//! namespace (ingress: its loopback), so each test runs on a thread that
//! unshares a fresh namespace and builds the routes and neighbours there;
//! the namespace vanishes with the thread, also when the test fails.

mod netns;
mod packet;

use std::net::Ipv4Addr;

use netns::{enable_forwarding, in_fresh_netns, ip, mac, routed_host, veth};
use packet::{Ipv4Packet, verify_checksums};
use vipr_dataplane::{BackendAddr, Counter, Dataplane, DataplaneOptions, Frontend, Port, Protocol};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

/// The outside client, behind the uplink.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const OUTSIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0c, 0x01];
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x01];
/// A pod behind a routed veth (/32 route, neighbour known).
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0c, 0x05];
const POD_VETH_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x05];
/// A pod routed through the same veth whose neighbour is not known yet.
const POD_UNRESOLVED: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 6);
/// A pod behind an interface not listed for redirects.
const POD_UNLISTED: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 9);
/// A backend on an interface whose MTU the test packet exceeds.
const POD_SMALL_MTU: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 9);
/// An address of the node itself (local delivery, never forwarded).
const NODE_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn port(p: u16) -> Port {
    Port::new(p).unwrap()
}

/// A node: a routed pod veth (`pods`), an uplink (`uplink`), an interface not
/// listed for redirects (`other`), one with a small MTU (`small`): veths
/// whose peers stay in the namespace (test runs transmit nothing).
fn build_node() {
    enable_forwarding();
    for (name, address) in [
        ("uplink", UPLINK_MAC),
        ("pods", POD_VETH_MAC),
        ("other", [2, 0, 0, 0, 0x0a, 0x09]),
        ("small", [2, 0, 0, 0, 0x0a, 0x0b]),
    ] {
        veth(name, address);
    }
    ip("link set small mtu 576");
    ip("addr add 192.0.2.2/24 dev uplink");
    ip(&format!(
        "neigh add {OUTSIDE} lladdr {} dev uplink nud permanent",
        mac(OUTSIDE_MAC)
    ));
    ip(&format!("addr add {NODE_LOCAL}/32 dev pods"));
    routed_host(POD, "pods", Some(POD_MAC));
    routed_host(POD_UNRESOLVED, "pods", None);
    routed_host(POD_UNLISTED, "other", Some([2, 0, 0, 0, 0x0c, 0x09]));
    routed_host(POD_SMALL_MTU, "small", Some([2, 0, 0, 0, 0x0c, 0x0b]));
}

/// Services VIP:<port>/TCP -> <backend>:8080, one per backend, the uplink
/// and the pod veth listed for redirects (as the agent lists them).
fn dataplane(xdp_redirect: bool) -> Dataplane {
    let mut dp = Dataplane::load(&DataplaneOptions {
        service_cidr: Some("10.96.0.0/12".parse().unwrap()),
        xdp_redirect,
        ..DataplaneOptions::default()
    })
    .expect("load the XDP program (needs root)");
    for (vip_port, backend) in BACKENDS {
        dp.program_service(
            Frontend {
                addr: VIP,
                port: port(vip_port),
                protocol: Protocol::Tcp,
            },
            &[BackendAddr {
                addr: backend,
                port: port(8080),
            }],
        )
        .unwrap();
    }
    for interface in ["uplink", "pods"] {
        dp.allow_redirect(interface).unwrap();
    }
    dp
}

const BACKENDS: [(u16, Ipv4Addr); 5] = [
    (80, POD),
    (81, POD_UNRESOLVED),
    (82, POD_UNLISTED),
    (83, POD_SMALL_MTU),
    (84, NODE_LOCAL),
];

fn run(dp: &mut Dataplane, input: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 256];
    let result = dp.test_run(input, &mut out, 1).expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// `frame` as a router sends it on: next hop's and egress interface's MAC
/// addresses, TTL one less (the header checksum computed from scratch).
fn forwarded(packet: &Ipv4Packet, next_hop: [u8; 6], egress: [u8; 6]) -> Vec<u8> {
    let mut packet = packet.clone();
    packet.ttl -= 1;
    let mut frame = packet.build();
    frame[..6].copy_from_slice(&next_hop);
    frame[6..12].copy_from_slice(&egress);
    frame
}

enum Expect {
    /// Redirected with exactly these bytes.
    Redirect(Vec<u8>),
    /// Passed to the kernel with exactly these bytes (translated only).
    Pass(Vec<u8>),
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
    expect: Expect,
}

fn check(dp: &mut Dataplane, case: &Case) {
    let (verdict, out) = run(dp, &case.input);
    let (want_verdict, want) = match &case.expect {
        Expect::Redirect(frame) => (XDP_REDIRECT, frame),
        Expect::Pass(frame) => (XDP_PASS, frame),
    };
    assert_eq!(verdict, want_verdict, "{}: verdict", case.name);
    assert_eq!(&out, want, "{}: output packet", case.name);
    verify_checksums(&out).unwrap_or_else(|e| panic!("{}: {e}", case.name));
}

fn to_vip(vip_port: u16, client_port: u16) -> Ipv4Packet {
    Ipv4Packet::tcp((OUTSIDE, client_port), (VIP, vip_port))
}

#[test]
fn translated_packets_are_forwarded_from_xdp() {
    in_fresh_netns(|| {
        build_node();
        let mut dp = dataplane(true);
        let syn = to_vip(80, 40000);
        let at_pod = syn.clone().with_dst(POD, 8080);
        let mut ttl_two = to_vip(80, 40001);
        ttl_two.ttl = 2;
        let mut ttl_one = to_vip(80, 40002);
        ttl_one.ttl = 1;
        let not_a_service = Ipv4Packet::tcp((OUTSIDE, 40003), (POD, 8080));
        let mut too_big = to_vip(83, 40004);
        too_big.payload = vec![0x5a; 600];
        let cases = [
            Case {
                name: "new flow: routed to the pod's veth, MACs and TTL rewritten",
                input: syn.build(),
                expect: Expect::Redirect(forwarded(&at_pod, POD_MAC, POD_VETH_MAC)),
            },
            Case {
                name: "conntrack hit: the same",
                input: syn.clone().with_tcp(0x10, 0x0102_0305, 1).build(),
                expect: Expect::Redirect(forwarded(
                    &at_pod.clone().with_tcp(0x10, 0x0102_0305, 1),
                    POD_MAC,
                    POD_VETH_MAC,
                )),
            },
            Case {
                name: "reply: reverse translated, routed out of the uplink to the client",
                input: at_pod.reply().build(),
                expect: Expect::Redirect(forwarded(&syn.reply(), OUTSIDE_MAC, UPLINK_MAC)),
            },
            Case {
                name: "TTL 2 leaves with TTL 1",
                input: ttl_two.build(),
                expect: Expect::Redirect(forwarded(
                    &ttl_two.clone().with_dst(POD, 8080),
                    POD_MAC,
                    POD_VETH_MAC,
                )),
            },
            Case {
                name: "TTL 1: to the kernel (ICMP time exceeded), translated only",
                input: ttl_one.build(),
                expect: Expect::Pass(ttl_one.clone().with_dst(POD, 8080).build()),
            },
            Case {
                name: "no neighbour yet: to the kernel (it resolves one)",
                input: to_vip(81, 40005).build(),
                expect: Expect::Pass(to_vip(81, 40005).with_dst(POD_UNRESOLVED, 8080).build()),
            },
            Case {
                name: "egress not listed for redirects: to the kernel",
                input: to_vip(82, 40006).build(),
                expect: Expect::Pass(to_vip(82, 40006).with_dst(POD_UNLISTED, 8080).build()),
            },
            Case {
                name: "larger than the egress MTU: to the kernel (fragmentation needed)",
                input: too_big.build(),
                expect: Expect::Pass(too_big.clone().with_dst(POD_SMALL_MTU, 8080).build()),
            },
            Case {
                name: "backend on the node itself: local delivery by the kernel",
                input: to_vip(84, 40007).build(),
                expect: Expect::Pass(to_vip(84, 40007).with_dst(NODE_LOCAL, 8080).build()),
            },
            Case {
                name: "not a service packet: untouched, though routable",
                input: not_a_service.build(),
                expect: Expect::Pass(not_a_service.build()),
            },
        ];
        for case in &cases {
            check(&mut dp, case);
        }
        let redirects = cases
            .iter()
            .filter(|c| matches!(c.expect, Expect::Redirect(_)))
            .count() as u64;
        let counters = dp.counters().unwrap();
        assert_eq!(counters.packets(Counter::Redirected), redirects);
        assert!(counters.bytes(Counter::Redirected) > 0);
    });
}

#[test]
fn fast_path_off_passes_every_packet() {
    in_fresh_netns(|| {
        build_node();
        let mut dp = dataplane(false);
        let syn = to_vip(80, 41000);
        let at_pod = syn.clone().with_dst(POD, 8080);
        for case in [
            Case {
                name: "new flow, fast path off: translated and passed",
                input: syn.build(),
                expect: Expect::Pass(at_pod.build()),
            },
            Case {
                name: "reply, fast path off: translated and passed",
                input: at_pod.reply().build(),
                expect: Expect::Pass(syn.reply().build()),
            },
        ] {
            check(&mut dp, &case);
        }
        assert_eq!(dp.counters().unwrap().packets(Counter::Redirected), 0);
    });
}
