//! Programming frontends, their backend slots and source ranges into the
//! maps, and clearing UDP conntrack entries whose backend went away.
//!
//! A frontend owns an id and the backend slots `0..count` under that id. An
//! update writes the new slots before it publishes the new count, and removes
//! surplus slots only after, so a packet in flight always finds a backend.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, LpmTrie, MapData, lpm_trie::Key},
};
use ipnet::Ipv4Net;
use vipr_common::{Backend, BackendKey, ServiceKey, ServiceValue, SourceRangeKey, map_names};

use crate::{
    BackendAddr, Dataplane, DataplaneError, Frontend, FrontendOptions, Port, Protocol, flows,
    service_stats::{self, StatsIds},
};

#[derive(Clone, Debug)]
pub(crate) struct Programmed {
    pub(crate) id: u32,
    pub(crate) backends: Vec<BackendAddr>,
    pub(crate) options: FrontendOptions,
}

impl Programmed {
    fn backend_count(&self) -> u32 {
        self.backends.len() as u32
    }
}

/// Userspace's copy of which frontend holds which id, backends and options.
#[derive(Debug, Default)]
pub(crate) struct ServiceTable {
    frontends: HashMap<Frontend, Programmed>,
    free_ids: Vec<u32>,
    next_id: u32,
    backend_slots: u64,
    /// Counter slots of (frontend, backend) pairs.
    pub(crate) stats: StatsIds,
}

impl ServiceTable {
    /// Rebuilds the table from (possibly pinned, already filled) maps;
    /// `stats_capacity` is the size of the per-backend counters array.
    pub(crate) fn adopt(ebpf: &Ebpf, stats_capacity: u32) -> Result<Self, DataplaneError> {
        let services: BpfHashMap<_, ServiceKey, ServiceValue> = BpfHashMap::try_from(
            ebpf.map(map_names::SERVICES)
                .ok_or(DataplaneError::MissingMap(map_names::SERVICES))?,
        )
        .map_err(DataplaneError::map(map_names::SERVICES))?;
        let slots: BpfHashMap<_, BackendKey, Backend> = BpfHashMap::try_from(
            ebpf.map(map_names::BACKENDS)
                .ok_or(DataplaneError::MissingMap(map_names::BACKENDS))?,
        )
        .map_err(DataplaneError::map(map_names::BACKENDS))?;
        let mut ranges = adopt_source_ranges(ebpf)?;
        let mut table = ServiceTable {
            stats: StatsIds::new(stats_capacity),
            ..ServiceTable::default()
        };
        for entry in services.iter() {
            let (key, value) = entry.map_err(DataplaneError::map(map_names::SERVICES))?;
            let Some(frontend) = frontend_from_key(&key) else {
                continue;
            };
            let mut backends = Vec::new();
            for slot in 0..value.backend_count {
                let Ok(raw) = slots.get(&backend_key(value.service_id, slot), 0) else {
                    continue;
                };
                if let Some(backend) = BackendAddr::from_map_value(&raw) {
                    table.stats.adopt(frontend, backend, raw.stats_id);
                    backends.push(backend);
                }
            }
            let source_ranges = ranges.remove(&value.service_id).unwrap_or_default();
            table.next_id = table.next_id.max(value.service_id + 1);
            table.backend_slots += backends.len() as u64;
            table.frontends.insert(
                frontend,
                Programmed {
                    id: value.service_id,
                    backends,
                    options: FrontendOptions::from_flags(value.flags, source_ranges),
                },
            );
        }
        let used: HashSet<u32> = table.frontends.values().map(|p| p.id).collect();
        table.free_ids = (0..table.next_id).filter(|id| !used.contains(id)).collect();
        table.stats.finish_adopting();
        Ok(table)
    }

    /// Every programmed frontend with what it holds.
    pub(crate) fn programmed(&self) -> impl Iterator<Item = (Frontend, &Programmed)> {
        self.frontends.iter().map(|(f, p)| (*f, p))
    }

    fn allocate_id(&mut self) -> u32 {
        self.free_ids.pop().unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id - 1
        })
    }
}

fn adopt_source_ranges(ebpf: &Ebpf) -> Result<HashMap<u32, Vec<Ipv4Net>>, DataplaneError> {
    let trie: LpmTrie<_, SourceRangeKey, u32> = LpmTrie::try_from(
        ebpf.map(map_names::SOURCE_RANGES)
            .ok_or(DataplaneError::MissingMap(map_names::SOURCE_RANGES))?,
    )
    .map_err(DataplaneError::map(map_names::SOURCE_RANGES))?;
    let mut ranges: HashMap<u32, Vec<Ipv4Net>> = HashMap::new();
    for key in trie.keys() {
        let key = key.map_err(DataplaneError::map(map_names::SOURCE_RANGES))?;
        let data = key.data();
        let prefix = key.prefix_len().saturating_sub(32).min(32) as u8;
        let addr = Ipv4Addr::from(u32::from_be(data.addr));
        if let Ok(net) = Ipv4Net::new(addr, prefix) {
            ranges
                .entry(u32::from_be(data.service_id))
                .or_default()
                .push(net);
        }
    }
    Ok(ranges)
}

fn frontend_from_key(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        addr: Ipv4Addr::from(u32::from_be(key.addr)),
        port: Port::new(u16::from_be(key.port))?,
        protocol: Protocol::from_ip_proto(key.proto)?,
    })
}

impl Dataplane {
    /// Makes `frontend` translate to `backends` (replacing what it had), as
    /// an in-cluster (ClusterIP) frontend. An empty list keeps the frontend
    /// known, so its traffic is refused (TCP RST, ICMP port unreachable)
    /// rather than routed on. Established TCP flows keep their backend; UDP
    /// flows to a backend no longer listed are cleared, so their next
    /// datagram picks a live one.
    pub fn program_service(
        &mut self,
        frontend: Frontend,
        backends: &[BackendAddr],
    ) -> Result<(), DataplaneError> {
        self.program_service_with(frontend, backends, &FrontendOptions::default())
    }

    /// [`Dataplane::program_service`] with per-frontend options: external
    /// traffic policy (SNAT or client IP kept) and source ranges.
    pub fn program_service_with(
        &mut self,
        frontend: Frontend,
        backends: &[BackendAddr],
        options: &FrontendOptions,
    ) -> Result<(), DataplaneError> {
        let previous = self.services.frontends.get(&frontend).cloned();
        let old_count = previous.as_ref().map_or(0, Programmed::backend_count);
        let new_count = u32::try_from(backends.len()).unwrap_or(u32::MAX);
        self.check_capacity(&frontend, previous.is_none(), old_count, backends.len())?;
        let id = match &previous {
            Some(p) => p.id,
            None => self.services.allocate_id(),
        };
        let old_ranges = previous
            .as_ref()
            .map(|p| p.options.source_ranges.clone())
            .unwrap_or_default();

        let mut stats_ids = Vec::with_capacity(backends.len());
        for backend in backends {
            let (stats_id, fresh) = self.services.stats.get_or_allocate(frontend, *backend);
            if fresh {
                service_stats::reset_slot(self.ebpf_mut(), stats_id)?;
            }
            stats_ids.push(stats_id);
        }
        let ebpf = self.ebpf_mut();
        let mut slots = backend_map(ebpf)?;
        for ((slot, backend), stats_id) in (0u32..).zip(backends).zip(stats_ids) {
            slots
                .insert(backend_key(id, slot), backend.to_map_value(stats_id), 0)
                .map_err(DataplaneError::map(map_names::BACKENDS))?;
        }
        write_source_ranges(ebpf, id, &options.source_ranges, &old_ranges)?;
        let value = ServiceValue {
            service_id: id,
            backend_count: new_count,
            flags: options.flags(),
        };
        service_map(ebpf)?
            .insert(frontend.key(), value, 0)
            .map_err(DataplaneError::map(map_names::SERVICES))?;
        let mut slots = backend_map(ebpf)?;
        for slot in new_count..old_count {
            // Absent already is fine: the goal is that it is gone.
            let _ = slots.remove(&backend_key(id, slot));
        }

        self.services.backend_slots =
            self.services.backend_slots - u64::from(old_count) + u64::from(new_count);
        self.services.stats.release_except(&frontend, backends);
        self.services.frontends.insert(
            frontend,
            Programmed {
                id,
                backends: backends.to_vec(),
                options: options.clone(),
            },
        );
        let lost_backend = previous
            .as_ref()
            .is_some_and(|p| p.backends.iter().any(|b| !backends.contains(b)));
        if frontend.protocol == Protocol::Udp && lost_backend {
            flows::clear_udp_flows(self.ebpf_mut(), &frontend, backends)?;
        }
        Ok(())
    }

    /// Forgets `frontend`: new packets to it are no longer translated, and
    /// its UDP flows are cleared. Returns whether it was programmed.
    pub fn remove_service(&mut self, frontend: &Frontend) -> Result<bool, DataplaneError> {
        let Some(programmed) = self.services.frontends.remove(frontend) else {
            return Ok(false);
        };
        let ebpf = self.ebpf_mut();
        let _ = service_map(ebpf)?.remove(&frontend.key());
        let mut slots = backend_map(ebpf)?;
        for slot in 0..programmed.backend_count() {
            let _ = slots.remove(&backend_key(programmed.id, slot));
        }
        write_source_ranges(ebpf, programmed.id, &[], &programmed.options.source_ranges)?;
        if frontend.protocol == Protocol::Udp {
            flows::clear_udp_flows(ebpf, frontend, &[])?;
        }
        self.services.backend_slots -= u64::from(programmed.backend_count());
        self.services.free_ids.push(programmed.id);
        self.services.stats.release_except(frontend, &[]);
        Ok(true)
    }

    /// Frontends currently programmed, with their backend counts, sorted.
    pub fn frontends(&self) -> Vec<(Frontend, u32)> {
        let mut all: Vec<_> = self
            .services
            .frontends
            .iter()
            .map(|(f, p)| (*f, p.backend_count()))
            .collect();
        all.sort_unstable();
        all
    }

    /// The backends and options `frontend` is programmed with.
    pub fn frontend(&self, frontend: &Frontend) -> Option<(Vec<BackendAddr>, FrontendOptions)> {
        self.services
            .frontends
            .get(frontend)
            .map(|p| (p.backends.clone(), p.options.clone()))
    }

    fn check_capacity(
        &self,
        frontend: &Frontend,
        is_new: bool,
        old_count: u32,
        new_count: usize,
    ) -> Result<(), DataplaneError> {
        let capacity = self.max_backends;
        let after = self.services.backend_slots - u64::from(old_count) + new_count as u64;
        if after > u64::from(capacity) {
            return Err(DataplaneError::BackendsFull {
                frontend: frontend.to_string(),
                count: new_count,
                capacity,
            });
        }
        let max_services = self.max_services;
        if is_new && self.services.frontends.len() as u64 >= u64::from(max_services) {
            return Err(DataplaneError::ServicesFull {
                frontend: frontend.to_string(),
                capacity: max_services,
            });
        }
        Ok(())
    }
}

/// Adds the ranges in `new` missing from `old`, then removes those in `old`
/// no longer in `new` (so a client allowed before and after never fails).
fn write_source_ranges(
    ebpf: &mut Ebpf,
    service_id: u32,
    new: &[Ipv4Net],
    old: &[Ipv4Net],
) -> Result<(), DataplaneError> {
    if new.is_empty() && old.is_empty() {
        return Ok(());
    }
    let map = ebpf
        .map_mut(map_names::SOURCE_RANGES)
        .ok_or(DataplaneError::MissingMap(map_names::SOURCE_RANGES))?;
    let mut trie: LpmTrie<&mut MapData, SourceRangeKey, u32> =
        LpmTrie::try_from(map).map_err(DataplaneError::map(map_names::SOURCE_RANGES))?;
    for net in new.iter().filter(|n| !old.contains(n)) {
        trie.insert(&source_range_key(service_id, net), 1, 0)
            .map_err(DataplaneError::map(map_names::SOURCE_RANGES))?;
    }
    for net in old.iter().filter(|n| !new.contains(n)) {
        let _ = trie.remove(&source_range_key(service_id, net));
    }
    Ok(())
}

fn source_range_key(service_id: u32, net: &Ipv4Net) -> Key<SourceRangeKey> {
    Key::new(
        32 + u32::from(net.prefix_len()),
        SourceRangeKey {
            service_id: service_id.to_be(),
            addr: u32::from(net.network()).to_be(),
        },
    )
}

fn backend_key(service_id: u32, slot: u32) -> BackendKey {
    BackendKey { service_id, slot }
}

fn service_map(
    ebpf: &mut Ebpf,
) -> Result<BpfHashMap<&mut MapData, ServiceKey, ServiceValue>, DataplaneError> {
    let map = ebpf
        .map_mut(map_names::SERVICES)
        .ok_or(DataplaneError::MissingMap(map_names::SERVICES))?;
    BpfHashMap::try_from(map).map_err(DataplaneError::map(map_names::SERVICES))
}

fn backend_map(
    ebpf: &mut Ebpf,
) -> Result<BpfHashMap<&mut MapData, BackendKey, Backend>, DataplaneError> {
    let map = ebpf
        .map_mut(map_names::BACKENDS)
        .ok_or(DataplaneError::MissingMap(map_names::BACKENDS))?;
    BpfHashMap::try_from(map).map_err(DataplaneError::map(map_names::BACKENDS))
}
