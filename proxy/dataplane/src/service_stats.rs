//! Per-frontend and per-backend counters: the ids that name a (frontend,
//! backend) pair's slot in `BACKEND_STATS`, and reading those slots and the
//! per-service drop counters back, summed over CPUs.
//!
//! A pair keeps its id while the frontend lists the backend, so its
//! counters only grow. A freed id is reused last (oldest first), and its
//! slot is zeroed when handed out again; a flow still open to the old pair
//! would count in the new one, which is why reuse is put off.

use std::collections::{BTreeMap, HashMap, VecDeque};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    util::nr_cpus,
};
use vipr_common::{Counter, CounterValue, FlowStats, ServiceDropKey, map_names};

use crate::{BackendAddr, Dataplane, DataplaneError, Frontend};

/// Which (frontend, backend) pair owns which counter slot.
#[derive(Debug, Default)]
pub(crate) struct StatsIds {
    ids: HashMap<(Frontend, BackendAddr), u32>,
    free: VecDeque<u32>,
    /// Next never-used id; 0 is never handed out (it means "not counted").
    next: u32,
    capacity: u32,
}

impl StatsIds {
    pub(crate) fn new(capacity: u32) -> Self {
        StatsIds {
            ids: HashMap::new(),
            free: VecDeque::new(),
            next: 1,
            capacity,
        }
    }

    /// Records an id found in a pinned map (an agent restart).
    pub(crate) fn adopt(&mut self, frontend: Frontend, backend: BackendAddr, id: u32) {
        if id != 0 && id < self.capacity {
            self.ids.insert((frontend, backend), id);
            self.next = self.next.max(id + 1);
        }
    }

    /// Once every pinned pair is adopted: ids below `next` no pair holds are free.
    pub(crate) fn finish_adopting(&mut self) {
        let used: std::collections::HashSet<u32> = self.ids.values().copied().collect();
        self.free = (1..self.next).filter(|id| !used.contains(id)).collect();
    }

    /// The pair's id, and whether it is new (its slot must be zeroed).
    /// Id 0 (not counted) when every slot is taken.
    pub(crate) fn get_or_allocate(
        &mut self,
        frontend: Frontend,
        backend: BackendAddr,
    ) -> (u32, bool) {
        if let Some(id) = self.ids.get(&(frontend, backend)) {
            return (*id, false);
        }
        let id = match self.free.pop_front() {
            Some(id) => id,
            None if self.next < self.capacity => {
                self.next += 1;
                self.next - 1
            }
            None => return (0, false),
        };
        self.ids.insert((frontend, backend), id);
        (id, true)
    }

    /// Frees the ids of `frontend`'s pairs whose backend is not in `keep`.
    pub(crate) fn release_except(&mut self, frontend: &Frontend, keep: &[BackendAddr]) {
        let free = &mut self.free;
        self.ids.retain(|(f, b), id| {
            let gone = f == frontend && !keep.contains(b);
            if gone {
                free.push_back(*id);
            }
            !gone
        });
    }

    pub(crate) fn id(&self, frontend: &Frontend, backend: &BackendAddr) -> Option<u32> {
        self.ids.get(&(*frontend, *backend)).copied()
    }
}

/// Zeroes slot `id` on every CPU (a fresh pair starts from nothing).
pub(crate) fn reset_slot(ebpf: &mut Ebpf, id: u32) -> Result<(), DataplaneError> {
    let map = ebpf
        .map_mut(map_names::BACKEND_STATS)
        .ok_or(DataplaneError::MissingMap(map_names::BACKEND_STATS))?;
    let mut array: PerCpuArray<&mut MapData, FlowStats> =
        PerCpuArray::try_from(map).map_err(DataplaneError::map(map_names::BACKEND_STATS))?;
    let cpus = nr_cpus().map_err(|(_, e)| DataplaneError::Map {
        map: map_names::BACKEND_STATS,
        source: aya::maps::MapError::IoError(e),
    })?;
    let zeros = PerCpuValues::try_from(vec![FlowStats::default(); cpus]).map_err(|e| {
        DataplaneError::Map {
            map: map_names::BACKEND_STATS,
            source: aya::maps::MapError::IoError(e),
        }
    })?;
    array
        .set(id, zeros, 0)
        .map_err(DataplaneError::map(map_names::BACKEND_STATS))
}

/// One backend's counters through one frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendStats {
    pub backend: BackendAddr,
    pub stats: FlowStats,
}

/// A frontend's counters: its backends' (summed, they are its traffic) and
/// its drops and refusals by reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendStats {
    pub frontend: Frontend,
    pub total: FlowStats,
    pub backends: Vec<BackendStats>,
    /// Drops and refusals of packets to this frontend, by reason.
    pub drops: BTreeMap<&'static str, CounterValue>,
}

fn sum_flow_stats(values: &PerCpuValues<FlowStats>) -> FlowStats {
    values
        .iter()
        .fold(FlowStats::default(), |acc, v| FlowStats {
            packets: acc.packets + v.packets,
            bytes: acc.bytes + v.bytes,
            new_flows: acc.new_flows + v.new_flows,
        })
}

impl Dataplane {
    /// Counters of every programmed frontend and its current backends,
    /// sorted by frontend. One map read per backend: for metrics ticks
    /// and the CLI, not for a hot loop.
    pub fn frontend_stats(&self) -> Result<Vec<FrontendStats>, DataplaneError> {
        let ebpf = self.ebpf();
        let array: PerCpuArray<&MapData, FlowStats> = PerCpuArray::try_from(
            ebpf.map(map_names::BACKEND_STATS)
                .ok_or(DataplaneError::MissingMap(map_names::BACKEND_STATS))?,
        )
        .map_err(DataplaneError::map(map_names::BACKEND_STATS))?;
        let drops = self.drops_by_service_id()?;
        let mut out = Vec::new();
        for (frontend, programmed) in self.services.programmed() {
            let mut total = FlowStats::default();
            let mut backends = Vec::with_capacity(programmed.backends.len());
            for backend in &programmed.backends {
                let stats = match self.services.stats.id(&frontend, backend) {
                    Some(id) => array
                        .get(&id, 0)
                        .map(|v| sum_flow_stats(&v))
                        .unwrap_or_default(),
                    None => FlowStats::default(),
                };
                total.packets += stats.packets;
                total.bytes += stats.bytes;
                total.new_flows += stats.new_flows;
                backends.push(BackendStats {
                    backend: *backend,
                    stats,
                });
            }
            out.push(FrontendStats {
                frontend,
                total,
                backends,
                drops: drops.get(&programmed.id).cloned().unwrap_or_default(),
            });
        }
        out.sort_by_key(|s| s.frontend);
        Ok(out)
    }

    fn drops_by_service_id(
        &self,
    ) -> Result<HashMap<u32, BTreeMap<&'static str, CounterValue>>, DataplaneError> {
        let map: PerCpuHashMap<&MapData, ServiceDropKey, CounterValue> = PerCpuHashMap::try_from(
            self.ebpf()
                .map(map_names::SERVICE_DROPS)
                .ok_or(DataplaneError::MissingMap(map_names::SERVICE_DROPS))?,
        )
        .map_err(DataplaneError::map(map_names::SERVICE_DROPS))?;
        let mut out: HashMap<u32, BTreeMap<&'static str, CounterValue>> = HashMap::new();
        for entry in map.iter().filter_map(Result::ok) {
            let (key, values) = entry;
            let Some(counter) = Counter::from_index(key.reason) else {
                continue;
            };
            let sum = values
                .iter()
                .fold(CounterValue::default(), |acc, v| CounterValue {
                    packets: acc.packets + v.packets,
                    bytes: acc.bytes + v.bytes,
                });
            out.entry(key.service_id)
                .or_default()
                .insert(counter.name(), sum);
        }
        Ok(out)
    }
}
