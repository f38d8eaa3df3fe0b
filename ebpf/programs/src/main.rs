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
//! Writing code the verifier accepts, as learnt here:
//! - the stack is 512 bytes for a whole call chain: the new-flow path is a
//!   tail-called program of its own, works on a per-CPU scratch value
//!   (`OPENING`), and its steps are subprograms called one after another;
//! - no value may be undefined where paths merge: LLVM may spill an
//!   undefined register (the payload of a `None`, say) and the verifier
//!   refuses to read it. Options of structs are built from fields computed
//!   on every path, or replaced by plain values with a sentinel;
//! - a subprogram taking the context starts with `subprogram_context`, and
//!   one with nothing to return returns a computed value its caller hands
//!   to `called` (see both).
//!
//! Modules: `headers` (parsing and the in-place rewrite), `checksum`,
//! `flows` (the conntrack table's memory and shape), `conntrack` (flow
//! lookup, opening and closing), `balance` (the backend
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
mod flows;
mod forward;
mod headers;
mod icmp;
mod monitor;
mod reject;
mod sock;
mod stats;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, xdp_action},
    macros::{cgroup_sock, cgroup_sock_addr, map, xdp},
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
    programs::{SockAddrContext, SockContext, XdpContext},
};
use vipr_common::{
    AffinityKey, AffinityValue, Backend, BackendKey, Counter, CounterValue, DEFAULT_MAX_AFFINITY,
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_FLOWS, DEFAULT_MAX_MAGLEV_ENTRIES,
    DEFAULT_MAX_REDIRECT_TARGETS, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SOCK_REVNAT,
    DEFAULT_MAX_SOURCE_RANGES, DataplaneConfig, Endpoint, MaglevKey, MemberKey,
    NEW_FLOW_WITH_EVENTS, NEW_FLOW_WITHOUT_EVENTS, Opening, ServiceKey, ServiceValue,
    SockRevNatKey, SockRevNatValue, SourceRangeKey,
    flow_table::{FlowSlot, TableShape},
};

use headers::{Packet, ParseError};

#[map(name = "SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "BACKENDS")]
static BACKENDS: HashMap<BackendKey, Backend> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Conntrack, both directions of each flow in one table: a client's tuple
/// (to the frontend) and the backend's reply tuple, each mapped to the tuple
/// its packets leave with; reply entries carry `flow_flags::REPLY`. One
/// table means one lookup per packet whichever way it travels. The slots
/// and how flows are placed in them: `vipr_common::flow_table`; sized by
/// userspace (`TableShape::slots_for`), which maps it to read and expire
/// flows.
///
/// Never evicting: a full neighbourhood refuses the new flow, counted
/// (`DropFlowMapFull`), rather than dropping a live idle one (an LRU map
/// would, and the flow would come back with another backend, or its
/// replies untranslated); userspace expires idle flows by
/// `NatEntry::last_seen`.
#[map(name = "CONNTRACK")]
static CONNTRACK: Array<FlowSlot> =
    Array::with_max_entries(TableShape::slots_for(DEFAULT_MAX_FLOWS), BPF_F_MMAPABLE);

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

/// The new-flow programs `translate` tail-calls for a packet to a frontend
/// without a conntrack entry: [`NEW_FLOW_WITH_EVENTS`] is
/// `vipr_xdp_new_flow`, [`NEW_FLOW_WITHOUT_EVENTS`]
/// `vipr_xdp_new_flow_no_events`. A tail call starts a fresh 512-byte
/// stack: opening a flow (balancing, SNAT, two table inserts) does not fit
/// beside the per-packet path's frame as a nested call. Pinned, so an
/// attached program keeps opening flows while the agent restarts.
#[map(name = "NEW_FLOW_PROGRAMS")]
static NEW_FLOW_PROGRAMS: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// The flow a tail-called new-flow program opens (its frontend handed over
/// by `translate`), per CPU: XDP runs to completion on one CPU.
#[map(name = "OPENING")]
static OPENING: PerCpuArray<Opening> = PerCpuArray::with_max_entries(1, 0);

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

/// A packet to a frontend without a conntrack entry: tail-called by
/// `vipr_xdp` (see [`NEW_FLOW_PROGRAMS`]).
#[xdp]
pub fn vipr_xdp_new_flow(ctx: XdpContext) -> u32 {
    new_flow::<true>(&ctx)
}

/// `vipr_xdp_new_flow` for `vipr_xdp_no_events`.
#[xdp]
pub fn vipr_xdp_new_flow_no_events(ctx: XdpContext) -> u32 {
    new_flow::<false>(&ctx)
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
            if let Some(opening) = OPENING.get_ptr_mut(0) {
                // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
                unsafe {
                    (*opening).service = *service;
                    (*opening).tuple = tuple;
                }
                let program = if EVENTS {
                    NEW_FLOW_WITH_EVENTS
                } else {
                    NEW_FLOW_WITHOUT_EVENTS
                };
                // SAFETY: the context is this program's; on success the
                // call does not return.
                unsafe { NEW_FLOW_PROGRAMS.tail_call(ctx, program) };
            }
            (Counter::DropNewFlowHandover, xdp_action::XDP_DROP)
        }
        None => reject_if_service_range(tuple.dst_addr, Counter::DropUnknownVip),
    };
    observed::<EVENTS>(ctx, verdict)
}

/// Opens the flow of a packet `translate` found a frontend for (handed over
/// in `OPENING`) and gives its final verdict, as `vipr_xdp` does for the
/// packets it settles itself.
#[inline(always)]
fn new_flow<const EVENTS: bool>(ctx: &XdpContext) -> u32 {
    let frame_len = ctx.data_end() - ctx.data();
    let (counter, action) = match (Packet::parse(ctx), OPENING.get_ptr_mut(0)) {
        // SAFETY: this CPU's slot; nothing else runs on it meanwhile.
        (Ok(packet), Some(opening)) if unsafe { (*opening).tuple.same_tuple(&packet.tuple()) } => {
            // SAFETY: as above.
            let opening = unsafe { &mut *opening };
            let verdict = conntrack::open::<EVENTS>(ctx, &packet, opening);
            stats::count_service_outcome(opening.service.service_id, verdict.0, frame_len);
            observed::<EVENTS>(ctx, verdict)
        }
        // `translate` parsed this very packet and handed its service over,
        // unless an older `translate` wrote another scratch value.
        _ => (Counter::DropNewFlowHandover, xdp_action::XDP_DROP),
    };
    count(counter, frame_len);
    forward::fast_path(ctx, counter, action)
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

/// Takes what a BPF subprogram returned, opaquely. A subprogram with
/// nothing to return still returns a value computed from what it did, and
/// its caller hands that here: a function returning nothing, or a
/// constant (which LLVM propagates to the callers and then drops), leaves
/// whatever the return register held, and the verifier refuses a
/// subprogram whose return register holds a stack pointer.
#[inline(always)]
fn called(returned: u32) {
    core::hint::black_box(returned);
}

/// The context a BPF subprogram was given, read through a volatile load.
///
/// Every subprogram taking the context starts with this. Without it, LLVM
/// may hand the subprogram the context's `data` and `data_end` fields
/// instead of the context (argument promotion), as the 32-bit values
/// `xdp_md` declares them to be; the verifier only knows them as packet
/// pointers when they are loaded from the context itself.
#[inline(always)]
fn subprogram_context(ctx: &XdpContext) -> XdpContext {
    // SAFETY: a valid reference, read once.
    XdpContext::new(unsafe { core::ptr::read_volatile(&ctx.ctx) })
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
