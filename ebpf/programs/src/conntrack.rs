//! Conntrack: the hash map that remembers each translated flow, one entry
//! per direction, each holding the full tuple its packets leave with. Both
//! directions live in one map so a packet costs one lookup either way; the
//! reply entry carries `flow_flags::REPLY`.
//!
//! Opening a flow (`open`) picks a backend (`balance`), optionally an SNAT source (port
//! claimed atomically by inserting the reply entry with BPF_NOEXIST), and
//! records both directions; `close` removes both. TCP flows leave on RST at
//! once, and after FINs both ways on the last ACK. Userspace removes the UDP
//! flows of a backend that goes (the control library's `services` module)
//! and expires idle flows by their `last_seen` stamp (its `flows` module);
//! a full map refuses new flows, counted, and never evicts a live one.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::{bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns},
    maps::{LpmTrie, lpm_trie::Key},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use vipr_common::{
    Counter, DataplaneConfig, Endpoint, FLOW_CLOCK_SHIFT, FlowKey, IPPROTO_TCP, IPPROTO_UDP,
    NatEntry, ServiceValue, SourceRangeKey, flow_flags, service_flags,
};

use crate::{
    CONFIG, CONNTRACK, SOURCE_RANGES,
    balance::{self, NewFlow},
    count,
    headers::{Packet, sealed, tcp_flags},
    monitor, reject, stats,
};

/// Random SNAT ports tried before a new flow is refused.
const SNAT_ATTEMPTS: u32 = 8;
/// LPM prefix length of a full source-range lookup (service id + address).
const SOURCE_RANGE_FULL_PREFIX: u32 = 64;
/// What a map update returns when a hash map is full.
const E2BIG: i32 = 7;

/// Conntrack's clock (see `FLOW_CLOCK_SHIFT`).
#[inline(always)]
fn now() -> u32 {
    // SAFETY: a plain helper call with no arguments.
    (unsafe { bpf_ktime_get_coarse_ns() } >> FLOW_CLOCK_SHIFT) as u32
}

/// Translates a packet of a known flow, either direction; `None` when the
/// flow is unknown.
#[inline(always)]
/// `frame_len` is the packet's length, counted for its flow's backend.
/// With `EVENTS`, replies of flows opened under a monitor are events.
pub fn established<const EVENTS: bool>(
    ctx: &XdpContext,
    packet: &Packet,
    tuple: &FlowKey,
    frame_len: usize,
) -> Option<(Counter, u32)> {
    let entry_ptr = CONNTRACK.get_ptr_mut(tuple)?;
    // SAFETY: the pointer is a live map value; plain data.
    let entry = unsafe { *entry_ptr };
    packet.rewrite(&entry);
    stats::count_flow_packet(entry.stats_id as u32, frame_len);
    stamp(entry_ptr, &entry);
    track_close(packet, tuple, entry_ptr, &entry);
    let counter = if entry.flags & flow_flags::REPLY != 0 {
        if EVENTS && entry.flags & flow_flags::MONITORED != 0 {
            monitor::reply(ctx, tuple, &entry);
        }
        Counter::ReplyTranslated
    } else {
        Counter::FlowHit
    };
    Some((counter, xdp_action::XDP_PASS))
}

/// The low bits of jiffies: the verifier inlines `bpf_jiffies64` into a
/// load, where the clock helper behind `now` is a call.
#[inline(always)]
fn tick() -> u16 {
    // SAFETY: a plain helper call with no arguments.
    unsafe { bpf_jiffies64() as u16 }
}

/// Records that the entry was used now: at most once per kernel tick (1-10
/// ms), so the common hit costs a load and a compare, and a busy flow's
/// entry is rarely dirtied. (A flow whose packets all land 2^16 ticks apart
/// would skip its stamps; no flow paces itself to the jiffy.)
#[inline(always)]
fn stamp(entry_ptr: *mut NatEntry, entry: &NatEntry) {
    let tick = tick();
    if entry.stamp_tick != tick {
        let now = now();
        // SAFETY: live map value; a racing writer stores the same values.
        unsafe {
            (*entry_ptr).stamp_tick = tick;
            (*entry_ptr).last_seen = now;
        }
    }
    if entry.flags & flow_flags::SEEN == 0 {
        // SAFETY: as above; set once per entry.
        unsafe { (*entry_ptr).flags |= flow_flags::SEEN };
    }
}

/// Follows TCP closing: a flow leaves on RST, or on the last ACK after FINs
/// both ways.
#[inline(always)]
fn track_close(packet: &Packet, tuple: &FlowKey, entry_ptr: *mut NatEntry, entry: &NatEntry) {
    let flags = packet.tcp_flags();
    // The common case costs one test: no FIN or RST now or before.
    if flags & (tcp_flags::FIN | tcp_flags::RST) == 0 && entry.flags & flow_flags::FIN == 0 {
        return;
    }
    let other_key = entry.tuple(tuple.proto).reversed();
    // The backend is the reply's source: this packet's when it is the
    // reply, else the source of the reply tuple this entry leads to.
    let reply_key = if entry.flags & flow_flags::REPLY != 0 {
        tuple
    } else {
        &other_key
    };
    let counted = (entry.flags & flow_flags::COUNTED != 0).then_some(Endpoint {
        addr: reply_key.src_addr,
        port: reply_key.src_port,
        _pad: 0,
    });
    if flags & tcp_flags::RST != 0 {
        close(tuple, &other_key, counted);
    } else if flags & tcp_flags::FIN != 0 {
        // SAFETY: as above; a racing writer can only set the same bit.
        unsafe { (*entry_ptr).flags |= flow_flags::FIN };
    } else if flags & tcp_flags::ACK != 0 {
        // This side closed earlier; once the other has too, this ACK is the
        // last packet of the flow.
        // SAFETY: plain data read.
        let other_closed =
            unsafe { CONNTRACK.get(other_key) }.is_some_and(|e| e.flags & flow_flags::FIN != 0);
        if other_closed {
            close(tuple, &other_key, counted);
        }
    }
}

/// Removes both directions of a flow; a flow counted for its backend's
/// load (`counted`: the backend) is taken off the count.
#[inline(always)]
pub(crate) fn close(key: &FlowKey, other_key: &FlowKey, counted: Option<Endpoint>) {
    // Only the close that removes the entry uncounts it, so a RST racing
    // a last ACK on another CPU cannot take the count down twice.
    if CONNTRACK.remove(key).is_ok()
        && let Some(backend) = counted
    {
        balance::connection_closed(&backend);
    }
    let _ = CONNTRACK.remove(other_key);
    count(Counter::FlowClosed, 0);
}

/// First packet of a flow to a frontend: admit it, pick a backend (and an
/// SNAT source when needed), record both directions, translate.
#[inline(always)]
pub fn open<const EVENTS: bool>(
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
    let Some(chosen) = balance::choose(service, &NewFlow::of_packet(tuple)) else {
        return (Counter::DropBackendMissing, xdp_action::XDP_DROP);
    };
    let backend = chosen.endpoint;
    let config = CONFIG.get(0).copied().unwrap_or_default();
    let counted = balance::counts_connections(service);
    let counted_flag = if counted { flow_flags::COUNTED } else { 0 };
    let monitored = if EVENTS { monitor::reply_flag() } else { 0 };

    let stats_id = chosen.stats_id(service.service_id);
    let mut forward = NatEntry {
        src_addr: tuple.src_addr,
        dst_addr: backend.addr,
        src_port: tuple.src_port,
        dst_port: backend.port,
        flags: counted_flag,
        _pad: 0,
        stamp_tick: tick(),
        ip_check_delta: 0,
        l4_check_delta: 0,
        last_seen: now(),
        stats_id: u64::from(stats_id),
    };
    let mut reverse = NatEntry {
        src_addr: tuple.dst_addr,
        dst_addr: tuple.src_addr,
        src_port: tuple.dst_port,
        dst_port: tuple.src_port,
        flags: flow_flags::REPLY | counted_flag | monitored,
        _pad: 0,
        stamp_tick: tick(),
        ip_check_delta: 0,
        l4_check_delta: 0,
        last_seen: forward.last_seen,
        stats_id: u64::from(stats_id),
    };
    match snat_source(service, &config, tuple, &backend) {
        Some(addr) => {
            forward.src_addr = addr;
            forward.flags |= flow_flags::SNAT;
            reverse.flags |= flow_flags::SNAT;
            if let Err(refused) = claim_snat_port(&mut forward, &reverse, &config, tuple.proto) {
                return (refused, xdp_action::XDP_DROP);
            }
        }
        None => {
            let reply_key = forward.tuple(tuple.proto).reversed();
            if CONNTRACK.insert(reply_key, sealed(&reply_key, reverse), 0).is_err() {
                return (Counter::DropFlowMapFull, xdp_action::XDP_DROP);
            }
        }
    }
    let forward = sealed(tuple, forward);
    if CONNTRACK.insert(tuple, forward, 0).is_err() {
        let _ = CONNTRACK.remove(forward.tuple(tuple.proto).reversed());
        return (Counter::DropFlowMapFull, xdp_action::XDP_DROP);
    }
    if counted {
        balance::connection_opened(&backend);
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
    stats::count_new_flow(stats_id, ctx.data_end() - ctx.data());
    packet.rewrite(&forward);
    (Counter::NewFlow, xdp_action::XDP_PASS)
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
    backend: &Endpoint,
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
/// free, and claims it by inserting the reply entry; the drop reason when
/// none is (or conntrack is full).
#[inline(always)]
fn claim_snat_port(
    forward: &mut NatEntry,
    reverse: &NatEntry,
    config: &DataplaneConfig,
    proto: u8,
) -> Result<(), Counter> {
    let range = u32::from(config.snat_port_count);
    if range == 0 {
        return Err(Counter::DropSnatPortsExhausted);
    }
    for _ in 0..SNAT_ATTEMPTS {
        // SAFETY: a plain helper call with no arguments.
        let offset = unsafe { bpf_get_prandom_u32() } % range;
        forward.src_port = (config.snat_port_min.wrapping_add(offset as u16)).to_be();
        let reply_key = forward.tuple(proto).reversed();
        match CONNTRACK.insert(reply_key, sealed(&reply_key, *reverse), u64::from(BPF_NOEXIST)) {
            Ok(()) => return Ok(()),
            Err(error) if error == -E2BIG => return Err(Counter::DropFlowMapFull),
            Err(_) => {}
        }
    }
    Err(Counter::DropSnatPortsExhausted)
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
