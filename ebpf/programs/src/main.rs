//! vipr's XDP service translation.
//!
//! Attached to each pod's node-side veth and to the node's uplink, it sees
//! every packet entering the node's network namespace. For a packet to a
//! service frontend it picks a backend once per flow (conntrack in a hash
//! map), rewrites the destination (DNAT, plus SNAT for externally reached
//! frontends with externalTrafficPolicy Cluster and for hairpin flows) and
//! records the reverse mapping so the backend's replies get the service
//! address back. A frontend without endpoints answers at once (TCP RST, ICMP
//! port unreachable). ICMP errors about translated flows are translated with
//! them. Anything that is neither a service packet nor a reply of a
//! translated flow is passed untouched; a packet into the service CIDR that
//! matches no service is dropped, never routed on.
//!
//! The node's own clients never pass XDP; the cgroup sock_addr programs
//! here (`vipr_connect4`, `vipr_sendmsg4`, `vipr_recvmsg4`,
//! `vipr_getpeername4`) balance them at the socket level from the same maps.
//!
//! Modules: `headers` (parsing and the in-place rewrite), `checksum`,
//! `conntrack` (flow lookup, opening and closing), `balance` (the backend
//! of a new flow: per-service algorithm, session affinity), `reject` (RST / ICMP
//! replies), `icmp` (errors about translated flows), `forward` (the fast
//! path: translated packets routed and redirected from XDP), `sock`
//! (socket-level translation for node-local clients), `stats` (per-service
//! and per-backend counters), `monitor` (events for `vipr monitor`).
#![no_std]
#![no_main]
// Atomic adds on map values (`balance`): the BPF target has no AtomicU32.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod balance;
mod checksum;
mod conntrack;
mod forward;
mod headers;
mod icmp;
mod monitor;
mod reject;
mod sock;
mod stats;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, xdp_action},
    macros::{cgroup_sock, cgroup_sock_addr, map, xdp},
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockContext, XdpContext},
};
use vipr_common::{
    AffinityKey, AffinityValue, Backend, BackendKey, Counter, CounterValue, DEFAULT_MAX_AFFINITY,
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_FLOWS, DEFAULT_MAX_MAGLEV_ENTRIES,
    DEFAULT_MAX_REDIRECT_TARGETS, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SOCK_REVNAT,
    DEFAULT_MAX_SOURCE_RANGES, DataplaneConfig, Endpoint, FlowKey, MaglevKey, MemberKey, NatEntry,
    ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue, SourceRangeKey,
};

use headers::{Packet, ParseError};

#[map(name = "SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "BACKENDS")]
static BACKENDS: HashMap<BackendKey, Backend> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Conntrack, both directions of each flow in one map: a client's tuple (to
/// the frontend) and the backend's reply tuple, each mapped to the tuple its
/// packets leave with; reply entries carry `flow_flags::REPLY`. One map means
/// one lookup per packet whichever way it travels. Sized by userspace to two
/// entries per flow.
///
/// A plain hash map, not an LRU one: an LRU map makes room by silently
/// evicting its least recently used entry, which can be a live idle flow
/// (it would come back with another backend, or its replies untranslated).
/// Here a full map refuses the new flow, counted (`DropFlowMapFull`), and
/// userspace expires idle flows by `NatEntry::last_seen`.
#[map(name = "CONNTRACK")]
static CONNTRACK: HashMap<FlowKey, NatEntry> = HashMap::with_max_entries(2 * DEFAULT_MAX_FLOWS, 0);

/// loadBalancerSourceRanges of every service that has them, keyed by service id.
#[map(name = "SOURCE_RANGES")]
static SOURCE_RANGES: LpmTrie<SourceRangeKey, u32> =
    LpmTrie::with_max_entries(DEFAULT_MAX_SOURCE_RANGES, 0);

#[map(name = "CONFIG")]
static CONFIG: Array<DataplaneConfig> = Array::with_max_entries(1, 0);

#[map(name = "STATS")]
static STATS: PerCpuArray<CounterValue> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Socket-level translations (node-local clients): socket cookie + backend
/// -> the frontend the socket asked for. See the `sock` module.
#[map(name = "SOCK_REVNAT")]
static SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNatValue> =
    LruHashMap::with_max_entries(DEFAULT_MAX_SOCK_REVNAT, 0);

/// Maglev tables: (service id, slot) -> backend. Filled only for maglev
/// services, so not preallocated.
#[map(name = "MAGLEV")]
static MAGLEV: HashMap<MaglevKey, Endpoint> =
    HashMap::with_max_entries(DEFAULT_MAX_MAGLEV_ENTRIES, BPF_F_NO_PREALLOC);

/// (service id, backend) -> slot, for every backend slot.
#[map(name = "MEMBERS")]
static MEMBERS: HashMap<MemberKey, u32> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// ClientIP session affinity: (service id, client) -> backend, last seen.
#[map(name = "AFFINITY")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(DEFAULT_MAX_AFFINITY, 0);

/// Open counted flows per backend (`lc`, `sed`, `nq`).
#[map(name = "ACTIVE_CONNECTIONS")]
static ACTIVE_CONNECTIONS: HashMap<Endpoint, u32> =
    HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Socket-path TCP connections of counting services: cookie -> backend.
#[map(name = "SOCK_CONNECTIONS")]
static SOCK_CONNECTIONS: HashMap<u64, Endpoint> =
    HashMap::with_max_entries(DEFAULT_MAX_SOCK_REVNAT, 0);

/// Round-robin turn of each service, by service id.
#[map(name = "BALANCE_TURNS")]
static BALANCE_TURNS: Array<u32> = Array::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Interfaces the forwarding fast path may redirect to (ifindex ->
/// ifindex): those userspace knows take XDP frames. See `forward`.
#[map(name = "REDIRECT_TARGETS")]
static REDIRECT_TARGETS: DevMapHash = DevMapHash::with_max_entries(DEFAULT_MAX_REDIRECT_TARGETS, 0);

#[xdp]
pub fn vipr_xdp(ctx: XdpContext) -> u32 {
    let bytes = ctx.data_end() - ctx.data();
    let (counter, action) = translate::<true>(&ctx);
    count(counter, bytes);
    forward::fast_path(&ctx, counter, action)
}

/// `vipr_xdp` with the monitor's event code compiled out, for benchmarks
/// only: the difference between the two is what the idle event code costs.
#[xdp]
pub fn vipr_xdp_no_events(ctx: XdpContext) -> u32 {
    let bytes = ctx.data_end() - ctx.data();
    let (counter, action) = translate::<false>(&ctx);
    count(counter, bytes);
    forward::fast_path(&ctx, counter, action)
}

/// Passes every packet. The benchmark floor, and what a veth peer runs so
/// that frames sent to it with XDP_TX are received in native mode.
#[xdp]
pub fn vipr_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// connect() of a TCP or UDP socket in the attached cgroup.
#[cgroup_sock_addr(connect4)]
pub fn vipr_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate_destination(&ctx, sock::Hook::Connect)
}

/// sendmsg() with a destination, i.e. unconnected UDP, per datagram.
#[cgroup_sock_addr(sendmsg4)]
pub fn vipr_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate_destination(&ctx, sock::Hook::Sendmsg)
}

/// A socket closes: a connection counted at connect() is uncounted.
#[cgroup_sock(sock_release)]
pub fn vipr_sock_release(ctx: SockContext) -> i32 {
    sock::release(&ctx)
}

/// recvmsg() of UDP with a source address asked for: replies show the VIP.
#[cgroup_sock_addr(recvmsg4)]
pub fn vipr_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::restore_frontend(&ctx)
}

/// getpeername(): a translated socket's peer shows as the VIP.
#[cgroup_sock_addr(getpeername4)]
pub fn vipr_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::restore_frontend(&ctx)
}

/// Decides the packet's fate and rewrites it in place when it is translated.
///
/// With `EVENTS`, outcomes a monitor may want become events: every one but
/// a conntrack hit reads the monitor flags (one load) and only goes further
/// with a monitor attached; a hit pays nothing (a reply tests one bit of its
/// entry, see `flow_flags::MONITORED`).
#[inline(always)]
fn translate<const EVENTS: bool>(ctx: &XdpContext) -> (Counter, u32) {
    let packet = match Packet::parse(ctx) {
        Ok(packet) => packet,
        // Not IPv4, or too short to tell where it goes: the kernel's problem.
        Err(ParseError::NotOurs) => return (Counter::Passed, xdp_action::XDP_PASS),
        Err(ParseError::Malformed { dst_addr }) => {
            let verdict = reject_if_service_range(dst_addr, Counter::DropMalformed);
            return observed::<EVENTS>(ctx, verdict);
        }
        Err(ParseError::Fragment { dst_addr }) => {
            let verdict = reject_if_service_range(dst_addr, Counter::DropFragment);
            return observed::<EVENTS>(ctx, verdict);
        }
        Err(ParseError::Icmp { dst_addr }) => {
            if icmp::translate_error(ctx) {
                return (Counter::IcmpErrorTranslated, xdp_action::XDP_PASS);
            }
            let verdict = reject_if_service_range(dst_addr, Counter::DropUnknownVip);
            return observed::<EVENTS>(ctx, verdict);
        }
        Err(ParseError::OtherProtocol { dst_addr }) => {
            let verdict = reject_if_service_range(dst_addr, Counter::DropUnknownVip);
            return observed::<EVENTS>(ctx, verdict);
        }
    };
    let tuple = packet.tuple();
    // The frame's length: what the wrapper counts too (the same registers).
    let frame_len = ctx.data_end() - ctx.data();
    if let Some(verdict) = conntrack::established::<EVENTS>(ctx, &packet, &tuple, frame_len) {
        return verdict;
    }

    let service_key = ServiceKey {
        addr: tuple.dst_addr,
        port: tuple.dst_port,
        proto: tuple.proto,
        _pad: 0,
    };
    // SAFETY: map values are plain data; a concurrent update at worst yields
    // a stale but well-formed value.
    let verdict = match unsafe { SERVICES.get(service_key) } {
        Some(service) => {
            let service = *service;
            let verdict = conntrack::open::<EVENTS>(ctx, &packet, &tuple, &service);
            stats::count_service_outcome(service.service_id, verdict.0, frame_len);
            verdict
        }
        None => reject_if_service_range(tuple.dst_addr, Counter::DropUnknownVip),
    };
    observed::<EVENTS>(ctx, verdict)
}

/// Hands an outcome (not a conntrack hit) to the monitor, with `EVENTS`.
#[inline(always)]
fn observed<const EVENTS: bool>(ctx: &XdpContext, verdict: (Counter, u32)) -> (Counter, u32) {
    if EVENTS && verdict.0 != Counter::Passed {
        monitor::observe(ctx, verdict.0);
    }
    verdict
}

/// Drops a packet addressed into the service CIDR (counted under `reason`);
/// passes anything else untouched.
#[inline(always)]
fn reject_if_service_range(dst_addr: u32, reason: Counter) -> (Counter, u32) {
    let Some(config) = CONFIG.get(0) else {
        return (Counter::Passed, xdp_action::XDP_PASS);
    };
    let mask = config.service_cidr_mask;
    if mask != 0 && dst_addr & mask == config.service_cidr_addr {
        (reason, xdp_action::XDP_DROP)
    } else {
        (Counter::Passed, xdp_action::XDP_PASS)
    }
}

#[inline(always)]
fn count(counter: Counter, bytes: usize) {
    if let Some(value) = STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe {
            (*value).packets += 1;
            (*value).bytes += bytes as u64;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
