//! Backend choice for a new flow: the service's algorithm, ClientIP session
//! affinity, and the active connection counts `lc` / `sed` / `nq` read.
//!
//! This mirrors `vipr_balancer::select_backend` (the userspace reference
//! `vipr trace` runs). The deterministic algorithms agree with it exactly:
//! `sh`, `dh` and `maglev` hash the same words with the same
//! `vipr_common::hash` functions (`source_hash_v4`, `destination_hash_v4`,
//! `flow_hash_v4`), scale them the same way onto the slots'
//! weight ranges (`Backend::weight_start`), and read the Maglev table
//! userspace built with `vipr_balancer::MaglevTable`. The stateful ones
//! follow the same rules with data-plane state: `rr` / `wrr` a per-service
//! turn counter, `lc` / `sed` / `nq` the per-backend counts in
//! `ACTIVE_CONNECTIONS`, `random` `bpf_get_prandom_u32()`.
//!
//! Backends with weight 0 have no slot (userspace leaves them out), so
//! every slot accepts new flows.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_loop},
};
use vipr_common::{
    AffinityKey, AffinityValue, Backend, BackendKey, Counter, Endpoint, FlowKey, LEAST_LOADED_SCAN,
    MaglevKey, MemberKey, ServiceValue, affinity_scope,
    hash::{destination_hash_v4, flow_hash_v4, scale, source_hash_v4},
    lb_algorithm, service_flags,
};

use crate::{ACTIVE_CONNECTIONS, AFFINITY, BACKENDS, BALANCE_TURNS, MAGLEV, MEMBERS, count};

/// Halvings that find any slot of a service (2^20 > any backend capacity).
const WEIGHT_SEARCH_STEPS: u32 = 20;
const NS_PER_SECOND: u64 = 1_000_000_000;

/// A new flow as the balancer sees it: the words the hashes read (host
/// order, laid out as `vipr_balancer::flow` documents) and who the client
/// is for session affinity.
pub struct NewFlow {
    /// Client address (XDP), or the client's netns cookie folded to 32 bits
    /// (socket path, where no source address exists yet).
    pub src: u32,
    /// The frontend address the client asked for.
    pub dst: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// One of [`affinity_scope`].
    pub client_scope: u32,
    pub client: u64,
}

impl NewFlow {
    /// A packet's flow on the XDP path.
    #[inline(always)]
    pub fn of_packet(tuple: &FlowKey) -> Self {
        NewFlow {
            src: u32::from_be(tuple.src_addr),
            dst: u32::from_be(tuple.dst_addr),
            src_port: u16::from_be(tuple.src_port),
            dst_port: u16::from_be(tuple.dst_port),
            proto: tuple.proto,
            client_scope: affinity_scope::ADDRESS,
            client: u64::from(tuple.src_addr),
        }
    }

    /// A `connect()` / `sendmsg()` on the socket path: the client is its
    /// network namespace, the source port is not chosen yet (0).
    #[inline(always)]
    pub fn of_socket(netns_cookie: u64, dst_addr: u32, dst_port: u16, proto: u8) -> Self {
        NewFlow {
            src: (netns_cookie ^ (netns_cookie >> 32)) as u32,
            dst: u32::from_be(dst_addr),
            src_port: 0,
            dst_port: u16::from_be(dst_port),
            proto,
            client_scope: affinity_scope::NETNS,
            client: netns_cookie,
        }
    }
}

/// The backend for a new flow of `service` (which has backends), honouring
/// session affinity. `None` only when a map entry vanished under an update.
#[inline(always)]
pub fn choose(service: &ServiceValue, flow: &NewFlow) -> Option<Chosen> {
    if service.affinity_timeout == 0 {
        return balance(service, flow);
    }
    let key = AffinityKey {
        service_id: service.service_id,
        scope: flow.client_scope,
        client: flow.client,
    };
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(entry) = AFFINITY.get_ptr_mut(&key) {
        // SAFETY: a live map value; plain data.
        let remembered = unsafe { *entry };
        let idle = now.saturating_sub(remembered.last_seen_ns);
        if idle <= u64::from(service.affinity_timeout) * NS_PER_SECOND
            && let Some(stats_id) = member_stats_id(service.service_id, &remembered.backend)
        {
            // SAFETY: as above; a racing writer writes a time just as good.
            unsafe { (*entry).last_seen_ns = now };
            count(Counter::AffinityHit, 0);
            return Some(Chosen {
                endpoint: remembered.backend,
                stats_id,
            });
        }
    }
    let chosen = balance(service, flow)?;
    let value = AffinityValue {
        last_seen_ns: now,
        backend: chosen.endpoint,
        _pad: 0,
    };
    // An LRU map makes room by itself; losing the entry only loses affinity.
    let _ = AFFINITY.insert(&key, &value, 0);
    Some(chosen)
}

/// The service's algorithm proper.
#[inline(always)]
fn balance(service: &ServiceValue, flow: &NewFlow) -> Option<Chosen> {
    let slots = service.backend_count;
    if slots == 0 {
        return None;
    }
    match service.algorithm {
        lb_algorithm::ROUND_ROBIN => slot_endpoint(service, next_turn(service) % slots),
        lb_algorithm::WEIGHTED_ROUND_ROBIN => {
            if service.flags & service_flags::WEIGHTED == 0 || service.total_weight == 0 {
                slot_endpoint(service, next_turn(service) % slots)
            } else {
                weight_point_endpoint(service, next_turn(service) % service.total_weight)
            }
        }
        lb_algorithm::LEAST_CONNECTION
        | lb_algorithm::SHORTEST_EXPECTED_DELAY
        | lb_algorithm::NEVER_QUEUE => least_loaded(service),
        lb_algorithm::SOURCE_HASH => hashed_endpoint(service, source_hash_v4(flow.src)),
        lb_algorithm::DESTINATION_HASH => hashed_endpoint(service, destination_hash_v4(flow.dst)),
        lb_algorithm::MAGLEV => {
            let hash = flow_hash_v4(flow.src, flow.dst, flow.src_port, flow.dst_port, flow.proto);
            maglev_endpoint(service, hash)
        }
        // SAFETY: a plain helper call.
        _ => hashed_endpoint(service, unsafe { bpf_get_prandom_u32() }),
    }
}

#[inline(always)]
fn slot(service: &ServiceValue, slot: u32) -> Option<Backend> {
    let key = BackendKey {
        service_id: service.service_id,
        slot,
    };
    // SAFETY: plain data read.
    unsafe { BACKENDS.get(&key) }.copied()
}

#[inline(always)]
fn slot_endpoint(service: &ServiceValue, index: u32) -> Option<Chosen> {
    slot(service, index).map(|b| Chosen {
        endpoint: b.endpoint(),
        stats_id: b.stats_id,
    })
}

/// `value` (a hash or a draw) scaled onto the service's weight ranges:
/// `vipr_balancer`'s `weighted_point`. Equal weights skip the search, as
/// `scale(v, n * w) / w == scale(v, n)`.
#[inline(always)]
fn hashed_endpoint(service: &ServiceValue, value: u32) -> Option<Chosen> {
    if service.flags & service_flags::WEIGHTED == 0 {
        slot_endpoint(service, scale(value, service.backend_count))
    } else {
        weight_point_endpoint(service, scale(value, service.total_weight))
    }
}

/// The slot whose weight range holds `point` (< total weight): a binary
/// search over the slots' ascending `weight_start`, one halving per
/// `bpf_loop` step (an open-coded loop makes the verifier walk every path
/// through the halvings).
#[inline(always)]
fn weight_point_endpoint(service: &ServiceValue, point: u32) -> Option<Chosen> {
    let mut search = WeightSearch {
        service_id: service.service_id,
        point,
        lo: 0,
        hi: service.backend_count,
    };
    // SAFETY: the callback takes exactly this context type.
    unsafe {
        bpf_loop(
            WEIGHT_SEARCH_STEPS,
            weight_search_step as *mut c_void,
            &mut search as *mut WeightSearch as *mut c_void,
            0,
        )
    };
    slot_endpoint(service, search.lo)
}

/// A binary search in progress: the slot is in `lo..hi`. 8-aligned: the
/// verifier refuses misaligned stack access, and LLVM may load two fields
/// at once.
#[repr(C, align(8))]
struct WeightSearch {
    service_id: u32,
    point: u32,
    lo: u32,
    hi: u32,
}

/// One halving; returns 1 (stop) once one slot is left.
#[inline(never)]
extern "C" fn weight_search_step(_index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the context given in weight_point_endpoint.
    let search = unsafe { &mut *(ctx as *mut WeightSearch) };
    let (lo, hi) = (search.lo, search.hi);
    if hi <= lo + 1 {
        return 1;
    }
    let mid = lo + (hi - lo) / 2;
    let key = BackendKey {
        service_id: search.service_id,
        slot: mid,
    };
    // SAFETY: plain data read.
    match unsafe { BACKENDS.get(&key) } {
        Some(backend) if backend.weight_start <= search.point => search.lo = mid,
        Some(_) => search.hi = mid,
        // A slot vanishing under an update: settle for the range's start.
        None => return 1,
    }
    0
}

#[inline(always)]
fn maglev_endpoint(service: &ServiceValue, hash: u32) -> Option<Chosen> {
    let size = service.maglev_size;
    if size == 0 {
        return None;
    }
    let key = MaglevKey {
        service_id: service.service_id,
        slot: hash % size,
    };
    // SAFETY: plain data read.
    unsafe { MAGLEV.get(&key) }.map(|endpoint| Chosen {
        endpoint: *endpoint,
        stats_id: UNKNOWN_STATS_ID,
    })
}

/// The service's next turn (`rr`, `wrr`). A plain read and write: an
/// atomic fetch-and-add needs BPF ISA v3, which this build does not target,
/// so two flows opening at the same instant on two CPUs may share a turn
/// (the spread stays even; only the strict order slips).
#[inline(always)]
fn next_turn(service: &ServiceValue) -> u32 {
    match BALANCE_TURNS.get_ptr_mut(service.service_id) {
        // SAFETY: a live, aligned u32 map value; a racing writer at worst
        // writes the same next turn.
        Some(turn) => unsafe {
            let current = *turn;
            *turn = current.wrapping_add(1);
            current
        },
        None => 0,
    }
}

/// `lc`: fewest active; `sed`: minimal `(active + 1) / weight`; `nq`: the
/// first idle one, else as `sed`. Ties go to the first slot. Only the first
/// [`LEAST_LOADED_SCAN`] slots are compared, one per `bpf_loop` step.
#[inline(always)]
fn least_loaded(service: &ServiceValue) -> Option<Chosen> {
    let mut scan = LoadScan {
        best: Endpoint {
            addr: 0,
            port: 0,
            _pad: 0,
        },
        service_id: service.service_id,
        algorithm: u32::from(service.algorithm),
        found: 0,
        best_active: 0,
        best_weight: 0,
        best_stats_id: 0,
    };
    let slots = service.backend_count.min(LEAST_LOADED_SCAN);
    // SAFETY: the callback takes exactly this context type.
    unsafe {
        bpf_loop(
            slots,
            load_scan_step as *mut c_void,
            &mut scan as *mut LoadScan as *mut c_void,
            0,
        )
    };
    (scan.found != 0).then_some(Chosen {
        endpoint: scan.best,
        stats_id: scan.best_stats_id,
    })
}

/// The least loaded slot so far (8-aligned, as [`WeightSearch`]).
#[repr(C, align(8))]
struct LoadScan {
    best: Endpoint,
    service_id: u32,
    algorithm: u32,
    found: u32,
    best_active: u32,
    best_weight: u32,
    best_stats_id: u32,
}

/// Compares slot `index` with the best so far; returns 1 (stop) at an idle
/// backend for `nq`.
#[inline(never)]
extern "C" fn load_scan_step(index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the context given in least_loaded.
    let scan = unsafe { &mut *(ctx as *mut LoadScan) };
    let key = BackendKey {
        service_id: scan.service_id,
        slot: index,
    };
    // SAFETY: plain data read.
    let Some(backend) = (unsafe { BACKENDS.get(&key) }).copied() else {
        return 0;
    };
    let endpoint = backend.endpoint();
    let active = active_connections(&endpoint);
    let better = if scan.found == 0 {
        true
    } else if scan.algorithm == u32::from(lb_algorithm::LEAST_CONNECTION) {
        active < scan.best_active
    } else {
        // Cross-multiplied, as IPVS does, to stay in integers.
        (u64::from(active) + 1) * u64::from(scan.best_weight)
            < (u64::from(scan.best_active) + 1) * u64::from(backend.weight)
    };
    let idle_wins = scan.algorithm == u32::from(lb_algorithm::NEVER_QUEUE) && active == 0;
    if better || idle_wins {
        scan.found = 1;
        scan.best = endpoint;
        scan.best_active = active;
        scan.best_weight = u32::from(backend.weight);
        scan.best_stats_id = backend.stats_id;
    }
    i64::from(idle_wins)
}

/// The stats id of `endpoint` as a backend of the service, or `None` when
/// it is not one (any more).
#[inline(always)]
fn member_stats_id(service_id: u32, endpoint: &Endpoint) -> Option<u32> {
    let key = MemberKey {
        service_id,
        addr: endpoint.addr,
        port: endpoint.port,
        _pad: 0,
    };
    // SAFETY: plain data read.
    unsafe { MEMBERS.get(&key) }.copied()
}

/// A new flow's backend, with its `BACKEND_STATS` slot when the choice
/// read it from the backend's slot (every algorithm but Maglev, whose
/// table holds endpoints only).
#[derive(Clone, Copy)]
pub struct Chosen {
    pub endpoint: Endpoint,
    /// The pair's stats slot, or [`UNKNOWN_STATS_ID`] (a plain value, not
    /// an Option: LLVM may spill a None's undefined payload, which the
    /// verifier refuses to read).
    stats_id: u32,
}

/// `Chosen::stats_id` of a choice made without the backend slot (Maglev).
const UNKNOWN_STATS_ID: u32 = u32::MAX;

/// [`choose`] as a BPF subprogram: the algorithms' state gets a stack frame
/// of its own, beside (not on top of) the caller's other work.
#[inline(always)]
pub fn choose_in_call(service: &ServiceValue, flow: &NewFlow) -> Option<Chosen> {
    let mut chosen = Chosen {
        endpoint: Endpoint {
            addr: 0,
            port: 0,
            _pad: 0,
        },
        stats_id: UNKNOWN_STATS_ID,
    };
    choose_into(service, flow, &mut chosen).then_some(chosen)
}

#[inline(never)]
fn choose_into(service: &ServiceValue, flow: &NewFlow, chosen: &mut Chosen) -> bool {
    match choose(service, flow) {
        Some(choice) => {
            *chosen = choice;
            true
        }
        None => false,
    }
}

impl Chosen {
    /// The pair's stats slot: carried, or looked up in `MEMBERS`.
    #[inline(always)]
    pub fn stats_id(&self, service_id: u32) -> u32 {
        if self.stats_id == UNKNOWN_STATS_ID {
            stats_id(service_id, &self.endpoint)
        } else {
            self.stats_id
        }
    }
}

/// The `BACKEND_STATS` slot of the (frontend, backend) pair, from the
/// backend's member entry; 0 (counted nowhere) when it has none.
#[inline(always)]
fn stats_id(service_id: u32, endpoint: &Endpoint) -> u32 {
    let key = MemberKey {
        service_id,
        addr: endpoint.addr,
        port: endpoint.port,
        _pad: 0,
    };
    // SAFETY: plain data read.
    unsafe { MEMBERS.get(&key) }.copied().unwrap_or(0)
}

/// Whether the service's flows are counted per backend (`lc`, `sed`, `nq`).
#[inline(always)]
pub fn counts_connections(service: &ServiceValue) -> bool {
    matches!(
        service.algorithm,
        lb_algorithm::LEAST_CONNECTION
            | lb_algorithm::SHORTEST_EXPECTED_DELAY
            | lb_algorithm::NEVER_QUEUE
    )
}

#[inline(always)]
fn active_connections(endpoint: &Endpoint) -> u32 {
    // SAFETY: plain data read of a counter other CPUs update atomically.
    unsafe { ACTIVE_CONNECTIONS.get(endpoint) }
        .copied()
        .unwrap_or(0)
}

/// A counted flow to `endpoint` opened. Userspace creates the counter when
/// it programs a counting service, so there is nothing to insert here.
#[inline(always)]
pub fn connection_opened(endpoint: &Endpoint) {
    if let Some(active) = ACTIVE_CONNECTIONS.get_ptr_mut(endpoint) {
        // SAFETY: a live, aligned u32 map value shared between CPUs.
        unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(active, 1) };
    }
}

/// A counted flow to `endpoint` closed. Never below zero: after a userspace
/// recount a close may find its flow already forgotten.
#[inline(always)]
pub fn connection_closed(endpoint: &Endpoint) {
    if let Some(active) = ACTIVE_CONNECTIONS.get_ptr_mut(endpoint) {
        // SAFETY: a live, aligned u32 map value shared between CPUs; adding
        // u32::MAX is subtracting 1 (BPF's atomic add without fetch).
        unsafe {
            if *active > 0 {
                atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(active, u32::MAX);
            }
        }
    }
}
