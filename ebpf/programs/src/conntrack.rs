//! Conntrack: the two LRU maps that remember each translated flow, one entry
//! per direction, each holding the full tuple its packets leave with.
//!
//! Opening a flow picks a backend, optionally an SNAT source (port claimed
//! atomically by inserting the reply entry with BPF_NOEXIST), and records
//! both directions. TCP flows leave on RST at once, and after FINs both ways
//! on the last ACK; UDP flows are removed by userspace when their backend
//! goes (see the control library's `services` module).

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    maps::{LpmTrie, LruHashMap, lpm_trie::Key},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use vipr_common::{
    Backend, BackendKey, Counter, DataplaneConfig, FlowKey, IPPROTO_TCP, IPPROTO_UDP, NatEntry,
    ServiceValue, SourceRangeKey, flow_flags, service_flags,
};

use crate::{
    BACKENDS, CONFIG, FLOWS, REVERSE_FLOWS, SOURCE_RANGES, count,
    headers::{Packet, tcp_flags},
    reject, stats,
};

type FlowMap = LruHashMap<FlowKey, NatEntry>;

/// Random SNAT ports tried before a new flow is refused.
const SNAT_ATTEMPTS: u32 = 8;
/// LPM prefix length of a full source-range lookup (service id + address).
const SOURCE_RANGE_FULL_PREFIX: u32 = 64;

/// Translates a packet of a known flow; `None` when the flow is unknown.
#[inline(always)]
pub fn established(packet: &Packet, tuple: &FlowKey) -> Option<(Counter, u32)> {
    if let Some(entry) = FLOWS.get_ptr_mut(tuple) {
        track(packet, tuple, entry, &FLOWS, &REVERSE_FLOWS);
        return Some((Counter::FlowHit, xdp_action::XDP_PASS));
    }
    if let Some(entry) = REVERSE_FLOWS.get_ptr_mut(tuple) {
        track(packet, tuple, entry, &REVERSE_FLOWS, &FLOWS);
        return Some((Counter::ReplyTranslated, xdp_action::XDP_PASS));
    }
    None
}

/// Rewrites the packet per its flow entry and follows TCP closing.
#[inline(always)]
fn track(
    packet: &Packet,
    tuple: &FlowKey,
    entry_ptr: *mut NatEntry,
    own: &FlowMap,
    other: &FlowMap,
) {
    // SAFETY: the pointer is a live map value; plain data.
    let entry = unsafe { *entry_ptr };
    packet.rewrite(tuple, &entry);
    stats::count_flow_packet(entry.stats_id, packet);
    let flags = packet.tcp_flags();
    // The common case costs one test: no FIN or RST now or before.
    if flags & (tcp_flags::FIN | tcp_flags::RST) == 0 && entry.flags & flow_flags::FIN == 0 {
        return;
    }
    let other_key = entry.tuple(tuple.proto).reversed();
    if flags & tcp_flags::RST != 0 {
        close(own, tuple, other, &other_key);
    } else if flags & tcp_flags::FIN != 0 {
        // SAFETY: as above; a racing writer can only set the same bit.
        unsafe { (*entry_ptr).flags |= flow_flags::FIN };
    } else if flags & tcp_flags::ACK != 0 {
        // This side closed earlier; once the other has too, this ACK is the
        // last packet of the flow.
        // SAFETY: plain data read.
        let other_closed =
            unsafe { other.get(other_key) }.is_some_and(|e| e.flags & flow_flags::FIN != 0);
        if other_closed {
            close(own, tuple, other, &other_key);
        }
    }
}

#[inline(always)]
fn close(own: &FlowMap, key: &FlowKey, other: &FlowMap, other_key: &FlowKey) {
    let _ = own.remove(key);
    let _ = other.remove(other_key);
    count(Counter::FlowClosed, 0);
}

/// First packet of a flow to a frontend: admit it, pick a backend (and an
/// SNAT source when needed), record both directions, translate.
#[inline(always)]
pub fn open(
    ctx: &XdpContext,
    packet: &Packet,
    tuple: &FlowKey,
    service: &ServiceValue,
) -> (Counter, u32) {
    if service.flags & service_flags::SOURCE_RANGES != 0
        && !source_allowed(service.service_id, tuple.src_addr)
    {
        return (Counter::DropSourceRange, xdp_action::XDP_DROP);
    }
    if service.backend_count == 0 {
        return no_endpoints(ctx, service, tuple.proto);
    }
    let Some(backend) = pick_backend(service) else {
        return (Counter::DropBackendMissing, xdp_action::XDP_DROP);
    };
    let config = CONFIG.get(0).copied().unwrap_or_default();
    // SAFETY: a plain helper call.
    let opened_s = (unsafe { bpf_ktime_get_ns() } / 1_000_000_000) as u32;

    let mut forward = NatEntry {
        src_addr: tuple.src_addr,
        dst_addr: backend.addr,
        src_port: tuple.src_port,
        dst_port: backend.port,
        flags: 0,
        _pad: 0,
        _pad2: 0,
        stats_id: backend.stats_id,
        opened_s,
    };
    let mut reverse = NatEntry {
        src_addr: tuple.dst_addr,
        dst_addr: tuple.src_addr,
        src_port: tuple.dst_port,
        dst_port: tuple.src_port,
        flags: 0,
        _pad: 0,
        _pad2: 0,
        stats_id: backend.stats_id,
        opened_s,
    };
    match snat_source(service, &config, tuple, &backend) {
        Some(addr) => {
            forward.src_addr = addr;
            forward.flags = flow_flags::SNAT;
            reverse.flags = flow_flags::SNAT;
            if !claim_snat_port(&mut forward, &reverse, &config, tuple.proto) {
                return (Counter::DropSnatPortsExhausted, xdp_action::XDP_DROP);
            }
        }
        None => {
            let reply_key = forward.tuple(tuple.proto).reversed();
            if REVERSE_FLOWS.insert(reply_key, reverse, 0).is_err() {
                return (Counter::DropFlowMapFull, xdp_action::XDP_DROP);
            }
        }
    }
    if FLOWS.insert(tuple, forward, 0).is_err() {
        let _ = REVERSE_FLOWS.remove(forward.tuple(tuple.proto).reversed());
        return (Counter::DropFlowMapFull, xdp_action::XDP_DROP);
    }
    debug!(
        ctx,
        "new flow {:i}:{} -> {:i}:{} via {:i}:{}",
        u32::from_be(tuple.src_addr),
        u16::from_be(tuple.src_port),
        u32::from_be(backend.addr),
        u16::from_be(backend.port),
        u32::from_be(tuple.dst_addr),
        u16::from_be(tuple.dst_port)
    );
    if tuple.proto == IPPROTO_TCP && packet.tcp_flags() & tcp_flags::SYN == 0 {
        count(Counter::FlowOpenedMidStream, 0);
    }
    stats::count_new_flow(backend.stats_id, packet);
    packet.rewrite(tuple, &forward);
    (Counter::NewFlow, xdp_action::XDP_PASS)
}

#[inline(always)]
pub(crate) fn pick_backend(service: &ServiceValue) -> Option<Backend> {
    // SAFETY: a plain helper call with no arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % service.backend_count;
    let key = BackendKey {
        service_id: service.service_id,
        slot,
    };
    // SAFETY: plain data read.
    unsafe { BACKENDS.get(key) }.copied()
}

/// Whether `src_addr` is inside one of the service's source ranges.
#[inline(always)]
fn source_allowed(service_id: u32, src_addr: u32) -> bool {
    let key = Key::new(
        SOURCE_RANGE_FULL_PREFIX,
        SourceRangeKey {
            service_id: service_id.to_be(),
            addr: src_addr,
        },
    );
    let trie: &LpmTrie<SourceRangeKey, u32> = &SOURCE_RANGES;
    trie.get(&key).is_some()
}

/// The source a new flow is given, if any: the hairpin address when a pod
/// reaches itself (its own reply would otherwise never leave it), the node
/// address for SNAT frontends (so the reply comes back through this node).
#[inline(always)]
fn snat_source(
    service: &ServiceValue,
    config: &DataplaneConfig,
    tuple: &FlowKey,
    backend: &Backend,
) -> Option<u32> {
    if backend.addr == tuple.src_addr && config.hairpin_addr != 0 {
        Some(config.hairpin_addr)
    } else if service.flags & service_flags::SNAT != 0 {
        Some(if config.node_addr != 0 {
            config.node_addr
        } else {
            tuple.dst_addr
        })
    } else {
        None
    }
}

/// Finds a source port for `forward`'s SNAT address whose reply tuple is
/// free, and claims it by inserting the reply entry.
#[inline(always)]
fn claim_snat_port(
    forward: &mut NatEntry,
    reverse: &NatEntry,
    config: &DataplaneConfig,
    proto: u8,
) -> bool {
    let range = u32::from(config.snat_port_count);
    if range == 0 {
        return false;
    }
    for _ in 0..SNAT_ATTEMPTS {
        // SAFETY: a plain helper call with no arguments.
        let offset = unsafe { bpf_get_prandom_u32() } % range;
        forward.src_port = (config.snat_port_min.wrapping_add(offset as u16)).to_be();
        let reply_key = forward.tuple(proto).reversed();
        if REVERSE_FLOWS
            .insert(reply_key, reverse, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return true;
        }
    }
    false
}

/// A frontend without endpoints: refuse at once (or drop, when asked).
#[inline(always)]
fn no_endpoints(ctx: &XdpContext, service: &ServiceValue, proto: u8) -> (Counter, u32) {
    let drop = (Counter::DropNoEndpoints, xdp_action::XDP_DROP);
    if service.flags & service_flags::DROP_WHEN_EMPTY != 0 {
        return drop;
    }
    match proto {
        IPPROTO_TCP => {
            reject::tcp_reset(ctx).map_or(drop, |()| (Counter::RejectTcp, xdp_action::XDP_TX))
        }
        IPPROTO_UDP => reject::icmp_port_unreachable(ctx)
            .map_or(drop, |()| (Counter::RejectUdp, xdp_action::XDP_TX)),
        _ => drop,
    }
}
