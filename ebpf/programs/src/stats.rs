//! Per-service and per-backend counters: every packet of a translated flow
//! counts in its (frontend, backend) pair's slot of `BACKEND_STATS` (an
//! index the flow's conntrack entries carry, so a hit costs one array
//! lookup), and a packet a known frontend drops or refuses counts in
//! `SERVICE_DROPS` under its service id and reason (the rare path).

use core::ptr::{addr_of, read_unaligned};

use aya_ebpf::{
    macros::map,
    maps::{LruPerCpuHashMap, PerCpuArray},
};
use vipr_common::{
    Counter, CounterValue, DEFAULT_MAX_BACKEND_STATS, DEFAULT_MAX_SERVICE_DROPS, FlowStats,
    ServiceDropKey,
};

use crate::headers::{ETH_HDR_LEN, Packet};

#[map(name = "BACKEND_STATS")]
static BACKEND_STATS: PerCpuArray<FlowStats> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKEND_STATS, 0);

#[map(name = "SERVICE_DROPS")]
static SERVICE_DROPS: LruPerCpuHashMap<ServiceDropKey, CounterValue> =
    LruPerCpuHashMap::with_max_entries(DEFAULT_MAX_SERVICE_DROPS, 0);

/// The packet's size as the counters record it: its IP length plus the
/// Ethernet header (what `STATS` counts for a well-formed packet).
#[inline(always)]
pub fn packet_bytes(packet: &Packet) -> u64 {
    // SAFETY: `Packet::parse` bounds-checked the fixed IP header.
    let total = unsafe { read_unaligned(addr_of!((*packet.ip).tot_len)) };
    u64::from(u16::from_be(total)) + ETH_HDR_LEN as u64
}

/// Counts a packet of an established flow (either direction).
#[inline(always)]
pub fn count_flow_packet(stats_id: u32, packet: &Packet) {
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(stats_id) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += packet_bytes(packet);
        }
    }
}

/// Counts the first packet of a new flow.
#[inline(always)]
pub fn count_new_flow(stats_id: u32, packet: &Packet) {
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(stats_id) {
        // SAFETY: as above.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += packet_bytes(packet);
            (*stats).new_flows += 1;
        }
    }
}

/// Counts a flow the socket-level translation (cgroup hooks) opened: no
/// packet has been sent yet, and its packets are never seen as the
/// frontend's, so only the flow counts.
#[inline(always)]
pub fn count_socket_flow(stats_id: u32) {
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(stats_id) {
        // SAFETY: as above.
        unsafe { (*stats).new_flows += 1 };
    }
}

/// Counts a packet to a frontend of service `service_id` under `counter`
/// when it is a drop or a refusal; other outcomes are counted per backend.
#[inline(always)]
pub fn count_service_outcome(service_id: u32, counter: Counter, bytes: u64) {
    if !counter.is_drop() && !counter.is_refusal() {
        return;
    }
    let key = ServiceDropKey {
        service_id,
        reason: counter as u32,
    };
    if let Some(value) = SERVICE_DROPS.get_ptr_mut(&key) {
        // SAFETY: this CPU's copy of the value.
        unsafe {
            (*value).packets += 1;
            (*value).bytes += bytes;
        }
        return;
    }
    let first = CounterValue { packets: 1, bytes };
    // Another CPU may have inserted it meanwhile; then this packet is lost
    // to the count, which is the price of never taking a lock here.
    let _ = SERVICE_DROPS.insert(&key, &first, 0);
}
