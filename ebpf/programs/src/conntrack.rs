//! Conntrack: the table that remembers each translated flow (`flows`), one
//! entry per direction, each holding the full tuple its packets leave with.
//! Both directions live in one table so a packet costs one lookup either
//! way; the reply entry carries `flow_flags::REPLY`.
//!
//! Opening a flow (`open`, in the tail-called new-flow program) picks a
//! backend (`balance`), optionally an SNAT source (port claimed atomically
//! by inserting the reply entry: the table stores a key at most once), and
//! records both directions. A TCP flow leaves on RST at once (both
//! entries removed); after FINs both ways, the last ACK marks it
//! `CLOSED`, and it stays (late packets still translated) until idle for
//! the closing timeout, unless a new SYN on its tuple replaces it first.
//! Userspace removes the UDP flows of a backend that goes (the control
//! library's `services` module) and expires idle flows by their
//! `last_seen` stamp (its `expiry` module); a full neighbourhood of the
//! table refuses new flows, counted, and never evicts a live one.

use core::intrinsics::{AtomicOrdering, atomic_or};

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns},
    maps::{LpmTrie, lpm_trie::Key},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use vipr_common::{
    Counter, DataplaneConfig, Endpoint, FLOW_CLOCK_SHIFT, FlowKey, IPPROTO_TCP, IPPROTO_UDP,
    NatEntry, Opening, ServiceValue, SourceRangeKey, flow_flags,
    flow_table::{Found, InsertError, SlotRef},
    service_flags,
};

use crate::{
    CONFIG, SOURCE_RANGES,
    balance::{self, NewFlow},
    count,
    flows::{self, found_at},
    headers::{Packet, seal, tcp_flags},
    monitor, reject, stats,
};

/// Random SNAT ports tried before a new flow is refused.
const SNAT_ATTEMPTS: u32 = 8;
/// LPM prefix length of a full source-range lookup (service id + address).
const SOURCE_RANGE_FULL_PREFIX: u32 = 64;

/// Conntrack's clock (see `FLOW_CLOCK_SHIFT`).
#[inline(always)]
fn now() -> u32 {
    // SAFETY: a plain helper call with no arguments.
    (unsafe { bpf_ktime_get_coarse_ns() } >> FLOW_CLOCK_SHIFT) as u32
}

/// Translates a packet of a known flow, either direction; `None` when the
/// flow is unknown. `frame_len` is the packet's length, counted for its
/// flow's backend. With `EVENTS`, replies of flows opened under a monitor
/// are events.
#[inline(always)]
pub fn established<const EVENTS: bool>(
    ctx: &XdpContext,
    packet: &Packet,
    tuple: &FlowKey,
    frame_len: usize,
) -> Option<(Counter, u32)> {
    // The entry is read in place, without the copy-and-recheck of
    // `flows::lookup`: a flow removed and its slot reused by another in the
    // few nanoseconds between the key check and these reads would lend its
    // last packet the newcomer's translation (as a preallocated kernel hash
    // map's lookup would); that copy costs a tenth of the hit path.
    let found = flows::find(tuple)?;
    // SAFETY: a live map value; plain data.
    let entry = unsafe { (*found.slot).entry };
    if entry.flags & flow_flags::CLOSED != 0
        && packet.tcp_flags() & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
    {
        // A new connection on the tuple of a closed one.
        crate::called(forget(&found, tuple, &entry));
        return None;
    }
    packet.rewrite(&entry);
    stats::count_flow_packet(entry.stats_id as u32, frame_len);
    let entry_ptr = entry_of(&found);
    stamp(entry_ptr, &entry);
    track_close(packet, tuple, &found, &entry);
    let counter = if entry.flags & flow_flags::REPLY != 0 {
        if EVENTS && entry.flags & flow_flags::MONITORED != 0 {
            crate::called(monitor::reply(ctx, tuple, &entry));
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
        set_flags(entry_ptr, flow_flags::SEEN);
    }
}

/// ORs `bits` into the entry's flags, atomically (several CPUs set flags of
/// one entry: SEEN, FIN, CLOSED); the flags before.
#[inline(always)]
fn set_flags(entry: *mut NatEntry, bits: u8) -> u8 {
    // The flags are the low byte of the entry's 4-aligned fourth word (the
    // rest of it: padding and `stamp_tick`, which are left as they are).
    // SAFETY: a live map value; BPF_OR | BPF_FETCH on an aligned word.
    let old = unsafe {
        atomic_or::<u32, u32, { AtomicOrdering::SeqCst }>(
            (&raw mut (*entry).flags).cast::<u32>(),
            u32::from(bits),
        )
    };
    old as u8
}

/// Follows TCP closing: a flow leaves on RST; after FINs both ways, the
/// last ACK marks it closed (`flow_flags::CLOSED`), to leave when idle.
#[inline(always)]
fn track_close(packet: &Packet, tuple: &FlowKey, found: &Found, entry: &NatEntry) {
    let flags = packet.tcp_flags();
    // The common case costs one test: no FIN or RST now or before.
    if flags & (tcp_flags::FIN | tcp_flags::RST) == 0 && entry.flags & flow_flags::FIN == 0 {
        return;
    }
    crate::called(follow_close(flags, tuple, found, entry));
}

/// [`track_close`] past its first test, as a BPF subprogram: closing is a
/// packet or two per flow, kept out of the per-packet path's stack frame.
/// Returns what it did: 1 reset, 2 a FIN noted, 3 closed, 0 nothing.
///
/// The forward entry's `CLOSED` bit decides who ends the connection: of a
/// reset and a last ACK, two resets, or the two last ACKs of a simultaneous
/// close, on as many CPUs, exactly one sets it.
#[inline(never)]
fn follow_close(flags: u8, tuple: &FlowKey, found: &Found, entry: &NatEntry) -> u32 {
    if !flows::still_holds(found) {
        // The flow left and its slot was reused since it was found.
        return 0;
    }
    let entry_ptr = entry_of(found);
    let other_key = entry.tuple(tuple.proto).reversed();
    let is_reply = entry.flags & flow_flags::REPLY != 0;
    // The backend is the reply's source: this packet's when it is the
    // reply, else the source of the reply tuple this entry leads to. (A
    // plain value and a flag, not an Option: LLVM may spill the undefined
    // payload of a None, which the verifier refuses to read.)
    let reply_key = if is_reply { tuple } else { &other_key };
    let backend = Endpoint {
        addr: reply_key.src_addr,
        port: reply_key.src_port,
        _pad: 0,
    };
    let counted = entry.flags & flow_flags::COUNTED != 0;
    if flags & tcp_flags::RST != 0 {
        let other = flows::find(&other_key);
        let forward = if is_reply {
            other.as_ref().map(|other| entry_of(other))
        } else {
            Some(entry_ptr)
        };
        if let Some(forward) = forward
            && set_flags(forward, flow_flags::CLOSED) & flow_flags::CLOSED == 0
        {
            ended(counted, &backend);
        }
        remove_both(found, other.as_ref());
        return 1;
    }
    if flags & tcp_flags::FIN != 0 {
        set_flags(entry_ptr, flow_flags::FIN);
        return 2;
    }
    if flags & tcp_flags::ACK != 0 && entry.flags & flow_flags::CLOSED == 0 {
        // This side closed earlier; once the other has too, this ACK is the
        // last packet of the connection.
        if let Some((other, other_entry)) = flows::lookup(&other_key)
            && other_entry.flags & flow_flags::FIN != 0
        {
            let other_ptr = entry_of(&other);
            let (forward, reply) = if is_reply {
                (other_ptr, entry_ptr)
            } else {
                (entry_ptr, other_ptr)
            };
            set_flags(reply, flow_flags::CLOSED);
            if set_flags(forward, flow_flags::CLOSED) & flow_flags::CLOSED == 0 {
                ended(counted, &backend);
            }
            return 3;
        }
    }
    0
}

/// The entry in a found slot, to change in place.
#[inline(always)]
fn entry_of(found: &Found) -> *mut NatEntry {
    // SAFETY: only the address of the slot's entry is taken.
    unsafe { &raw mut (*found.slot).entry }
}

/// A TCP connection ended (closed or reset): counted, and taken off its
/// backend's load if it was `counted` there.
#[inline(always)]
fn ended(counted: bool, backend: &Endpoint) {
    if counted {
        balance::connection_closed(backend);
    }
    count(Counter::FlowClosed, 0);
}

/// Removes both directions of a flow; whether this call removed `this`.
#[inline(always)]
fn remove_both(this: &Found, other: Option<&Found>) -> bool {
    let removed = flows::remove(this);
    if let Some(other) = other {
        flows::remove(other);
    }
    removed
}

/// Removes both directions of a closed flow, for a new connection on its
/// tuple (uncounted and counted as closed already); 1 if this call removed
/// it. A BPF subprogram: a packet per connection at most.
#[inline(never)]
fn forget(this: &Found, tuple: &FlowKey, entry: &NatEntry) -> u32 {
    let other = flows::find(&entry.tuple(tuple.proto).reversed());
    u32::from(remove_both(this, other.as_ref()))
}

/// First packet of a flow to a frontend: admit it, pick a backend (and an
/// SNAT source when needed), record both directions, translate.
///
/// Runs in the tail-called new-flow program, on a flow being opened in
/// `opening` (a per-CPU map value, not the stack: the eBPF stack is 512
/// bytes for a whole call chain). Each step is a BPF subprogram with a
/// small frame of its own, called one after the other, so their frames
/// never add up.
#[inline(always)]
pub fn open<const EVENTS: bool>(
    ctx: &XdpContext,
    packet: &Packet,
    opening: &mut Opening,
) -> (Counter, u32) {
    let service = &opening.service;
    let tuple = &opening.tuple;
    if service.flags & service_flags::SOURCE_RANGES != 0
        && !source_allowed(service.service_id, tuple.src_addr)
    {
        return (Counter::DropSourceRange, xdp_action::XDP_DROP);
    }
    if service.backend_count == 0 {
        return no_endpoints(ctx, service.flags, tuple.proto);
    }
    let monitored = if EVENTS { monitor::reply_flag() } else { 0 };
    if !prepare(opening, monitored) {
        return (Counter::DropBackendMissing, xdp_action::XDP_DROP);
    }
    let outcome = claim_reply(opening);
    if outcome != RECORDED {
        return refused(outcome);
    }
    let outcome = insert_forward(opening);
    if outcome != RECORDED {
        return refused(outcome);
    }
    let tuple = &opening.tuple;
    let forward = &opening.forward;
    if forward.flags & flow_flags::COUNTED != 0 {
        balance::connection_opened(&Endpoint {
            addr: forward.dst_addr,
            port: forward.dst_port,
            _pad: 0,
        });
    }
    debug!(
        ctx,
        "new flow {:i}:{} -> {:i}:{} via {:i}:{}",
        u32::from_be(tuple.src_addr),
        u16::from_be(tuple.src_port),
        u32::from_be(forward.dst_addr),
        u16::from_be(forward.dst_port),
        u32::from_be(tuple.dst_addr),
        u16::from_be(tuple.dst_port)
    );
    if tuple.proto == IPPROTO_TCP && packet.tcp_flags() & tcp_flags::SYN == 0 {
        count(Counter::FlowOpenedMidStream, 0);
    }
    stats::count_new_flow(forward.stats_id as u32, ctx.data_end() - ctx.data());
    packet.rewrite(forward);
    (Counter::NewFlow, xdp_action::XDP_PASS)
}

/// Picks the backend and fills in both entries of the flow (not yet
/// sealed, the SNAT source port not yet chosen); `false` when the service
/// has no backend to give.
#[inline(never)]
fn prepare(opening: &mut Opening, monitored: u8) -> bool {
    let service = &opening.service;
    let tuple = &opening.tuple;
    let Some(chosen) = balance::choose_in_call(service, &NewFlow::of_packet(tuple)) else {
        return false;
    };
    let backend = chosen.endpoint;
    let stats_id = u64::from(chosen.stats_id(service.service_id));
    let counted = if balance::counts_connections(service) {
        flow_flags::COUNTED
    } else {
        0
    };
    let (stamp_tick, last_seen) = (tick(), now());
    opening.forward = NatEntry {
        src_addr: tuple.src_addr,
        dst_addr: backend.addr,
        src_port: tuple.src_port,
        dst_port: backend.port,
        flags: counted,
        _pad: 0,
        stamp_tick,
        ip_check_delta: 0,
        l4_check_delta: 0,
        last_seen,
        stats_id,
    };
    opening.reverse = NatEntry {
        src_addr: tuple.dst_addr,
        dst_addr: tuple.src_addr,
        src_port: tuple.dst_port,
        dst_port: tuple.src_port,
        flags: flow_flags::REPLY | counted | monitored,
        _pad: 0,
        stamp_tick,
        ip_check_delta: 0,
        l4_check_delta: 0,
        last_seen,
        stats_id,
    };
    if let Some(config) = CONFIG.get(0)
        && let Some(addr) = snat_source(&opening.service, config, &opening.tuple, &backend)
    {
        opening.forward.src_addr = addr;
        opening.forward.flags |= flow_flags::SNAT;
        opening.reverse.flags |= flow_flags::SNAT;
    }
    true
}

/// The verdict of a drop whose counter index a step returned.
#[inline(always)]
fn refused(counter: u32) -> (Counter, u32) {
    let counter = Counter::from_index(counter).unwrap_or(Counter::DropFlowMapFull);
    (counter, xdp_action::XDP_DROP)
}

/// What [`claim_reply`] and [`insert_forward`] return when their entry is
/// in the table; any other value is the index of the drop's counter (a
/// code, not an enum: the verdict of a BPF subprogram is one register).
const RECORDED: u32 = u32::MAX;

/// Records the reply direction (claiming an SNAT source port first when the
/// flow has an SNAT source, or when its reply tuple is another flow's), in
/// `opening.reply`: [`RECORDED`], or the drop's counter index.
#[inline(never)]
fn claim_reply(opening: &mut Opening) -> u32 {
    if opening.forward.flags & flow_flags::SNAT == 0 {
        match insert_reply(opening) {
            Ok(found) => return recorded(opening, &found),
            Err(ReplyRefused::Drop(counter)) => return counter as u32,
            Err(ReplyRefused::TupleTaken) => {}
        }
    }
    match claim_snat_port(opening) {
        Ok(found) => recorded(opening, &found),
        Err(counter) => counter as u32,
    }
}

/// Notes where the reply entry went.
#[inline(always)]
fn recorded(opening: &mut Opening, reply: &Found) -> u32 {
    opening.reply = SlotRef::of(reply);
    RECORDED
}

/// Seals and records the forward direction: [`RECORDED`], or the drop's
/// counter index (the reply entry removed again).
#[inline(never)]
fn insert_forward(opening: &mut Opening) -> u32 {
    seal(&opening.tuple, &mut opening.forward);
    let refused = match flows::insert(&opening.tuple, &opening.forward) {
        Ok(_) => return RECORDED,
        Err(InsertError::Full) => Counter::DropFlowMapFull,
        Err(InsertError::Exists) => Counter::DropFlowRace,
    };
    if let Some(reply) = found_at(&opening.reply) {
        flows::remove(&reply);
    }
    refused as u32
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

/// Why [`insert_reply`] recorded nothing.
enum ReplyRefused {
    /// Dropped, counted so.
    Drop(Counter),
    /// Another flow holds the reply tuple: the flow needs a source port of
    /// its own (its SNAT flags are set).
    TupleTaken,
}

/// Inserts the reply entry of a flow without SNAT. Its tuple (backend to
/// client) may be taken already:
/// - by the reply entry of this very client tuple: another CPU opening the
///   same flow right now (its reply recorded, its forward entry maybe not
///   yet), so this packet loses the race, dropped and counted; or a
///   leftover whose forward entry is gone, which is replaced;
/// - by another flow: the same client port reaching the same backend
///   through another frontend (a client reuses a source port towards
///   distinct destinations). Both would reach the backend as one
///   connection, so this one gets a source port of its own, as netfilter
///   remaps a source port on such a clash.
#[inline(always)]
fn insert_reply(opening: &mut Opening) -> Result<Found, ReplyRefused> {
    let proto = opening.tuple.proto;
    let reply_key = opening.forward.tuple(proto).reversed();
    seal(&reply_key, &mut opening.reverse);
    match flows::insert(&reply_key, &opening.reverse) {
        Ok(found) => return Ok(found),
        Err(InsertError::Full) => return Err(ReplyRefused::Drop(Counter::DropFlowMapFull)),
        Err(InsertError::Exists) => {}
    }
    if let Some((taken, holder)) = flows::lookup(&reply_key) {
        let owner = holder.tuple(proto).reversed();
        if !owner.same_tuple(&opening.tuple) {
            opening.forward.flags |= flow_flags::SNAT;
            opening.reverse.flags |= flow_flags::SNAT;
            return Err(ReplyRefused::TupleTaken);
        }
        // An opening CPU stamps both entries before recording either, so a
        // reply younger than a clock tick may still wait for its forward.
        let fresh = now().wrapping_sub(holder.last_seen) <= 1;
        if fresh || flows::find(&owner).is_some() {
            return Err(ReplyRefused::Drop(Counter::DropFlowRace));
        }
        flows::remove(&taken);
    }
    flows::insert(&reply_key, &opening.reverse)
        .map_err(|_| ReplyRefused::Drop(Counter::DropFlowMapFull))
}

/// Finds a source port for the forward entry's SNAT address whose reply
/// tuple is free, and claims it by inserting the reply entry (the table
/// stores a tuple once, so two flows never share one); the drop reason
/// when none is (or the table has no room).
#[inline(always)]
fn claim_snat_port(opening: &mut Opening) -> Result<Found, Counter> {
    let Some(config) = CONFIG.get(0) else {
        return Err(Counter::DropSnatPortsExhausted);
    };
    let range = u32::from(config.snat_port_count);
    if range == 0 {
        return Err(Counter::DropSnatPortsExhausted);
    }
    let first = config.snat_port_min;
    let mut refused = Counter::DropSnatPortsExhausted;
    for _ in 0..SNAT_ATTEMPTS {
        // SAFETY: a plain helper call with no arguments.
        let offset = unsafe { bpf_get_prandom_u32() } % range;
        opening.forward.src_port = first.wrapping_add(offset as u16).to_be();
        let reply_key = opening.forward.tuple(opening.tuple.proto).reversed();
        seal(&reply_key, &mut opening.reverse);
        match flows::insert(&reply_key, &opening.reverse) {
            Ok(found) => return Ok(found),
            // Another port lands in another neighbourhood.
            Err(InsertError::Full) => refused = Counter::DropFlowMapFull,
            Err(InsertError::Exists) => {}
        }
    }
    Err(refused)
}

/// A frontend without endpoints: refuse at once (or drop, when asked).
#[inline(always)]
fn no_endpoints(ctx: &XdpContext, service_flags: u32, proto: u8) -> (Counter, u32) {
    let verdict = refuse(ctx, service_flags, proto);
    let counter = Counter::from_index(verdict as u32).unwrap_or(Counter::DropNoEndpoints);
    (counter, (verdict >> 32) as u32)
}

/// [`no_endpoints`] as a BPF subprogram (building the answer takes a frame
/// of its own), its verdict packed in one register: the counter in the low
/// half, the XDP action in the high.
#[inline(never)]
fn refuse(ctx: &XdpContext, service_flags: u32, proto: u8) -> u64 {
    let ctx = &crate::subprogram_context(ctx);
    let (counter, action) = refusal(ctx, service_flags, proto);
    u64::from(counter as u32) | (u64::from(action) << 32)
}

#[inline(always)]
fn refusal(ctx: &XdpContext, flags: u32, proto: u8) -> (Counter, u32) {
    let drop = (Counter::DropNoEndpoints, xdp_action::XDP_DROP);
    if flags & service_flags::DROP_WHEN_EMPTY != 0 {
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
