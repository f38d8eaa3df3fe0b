//! Per-service and per-backend counters: every packet of a translated flow
//! counts in its (frontend, backend) pair's slot of `BACKEND_STATS` (an
//! index the flow's conntrack entries carry, so a hit costs one array
//! lookup), and a packet a known frontend drops or refuses counts in
//! `SERVICE_DROPS` under its service id and reason (the rare path).

use aya_ebpf::{
    macros::map,
    maps::{LruPerCpuHashMap, PerCpuArray},
};
use vipr_common::{
    Counter, CounterValue, DEFAULT_MAX_BACKEND_STATS, DEFAULT_MAX_SERVICE_DROPS, FlowStats,
    ServiceDropKey,
};

#[map(name = "BACKEND_STATS")]
static BACKEND_STATS: PerCpuArray<FlowStats> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKEND_STATS, 0);

#[map(name = "SERVICE_DROPS")]
static SERVICE_DROPS: LruPerCpuHashMap<ServiceDropKey, CounterValue> =
    LruPerCpuHashMap::with_max_entries(DEFAULT_MAX_SERVICE_DROPS, 0);

/// Counts a packet of an established flow (either direction).
#[inline(always)]
pub fn count_flow_packet(stats_id: u32, frame_len: usize) {
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(stats_id) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += frame_len as u64;
        }
    }
}

/// Counts the first packet of a new flow.
#[inline(always)]
pub fn count_new_flow(stats_id: u32, frame_len: usize) {
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(stats_id) {
        // SAFETY: as above.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += frame_len as u64;
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
pub fn count_service_outcome(service_id: u32, counter: Counter, frame_len: usize) {
    if !counter.is_drop() && !counter.is_refusal() {
        return;
    }
    let key = ServiceDropKey {
        service_id,
        reason: counter as u32,
    };
    if let Some(value) = SERVICE_DROPS.get_ptr_mut(key) {
        // SAFETY: this CPU's copy of the value.
        unsafe {
            (*value).packets += 1;
            (*value).bytes += frame_len as u64;
        }
        return;
    }
    let first = CounterValue {
        packets: 1,
        bytes: frame_len as u64,
    };
    // Another CPU may have inserted it meanwhile; then this packet is lost
    // to the count, which is the price of never taking a lock here.
    let _ = SERVICE_DROPS.insert(key, first, 0);
}
