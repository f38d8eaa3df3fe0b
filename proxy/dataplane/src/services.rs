//! Programming frontends, their backend slots and source ranges into the
//! maps, and clearing UDP conntrack entries whose backend went away.
//!
//! A frontend owns an id and the backend slots `0..count` under that id
//! (its backends with a non-zero weight, see `balance`). An update writes
//! the new slots, members and Maglev entries before it publishes the new
//! service value, and removes surplus ones only after, so a packet in
//! flight always finds a backend.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, LpmTrie, MapData, lpm_trie::Key},
};
use ipnet::Ipv4Net;
use vipr_balancer::{SessionAffinity, Weight};
use vipr_common::{
    Backend, BackendKey, Endpoint, ServiceKey, ServiceValue, SourceRangeKey, map_names,
    service_flags,
};

use crate::{
    BackendAddr, Dataplane, DataplaneError, Frontend, FrontendOptions, Port, Protocol,
    balance::{self, Slots},
    flows,
    maps::{hash_map, hash_map_mut},
    service_stats::{self, StatsIds},
};

#[derive(Clone, Debug)]
pub(crate) struct Programmed {
    pub(crate) id: u32,
    pub(crate) backends: Vec<BackendAddr>,
    pub(crate) options: FrontendOptions,
    /// The backends holding slots, in slot order.
    slots: Vec<BackendAddr>,
    /// The Maglev table the map holds (empty unless Maglev).
    maglev: Vec<Endpoint>,
}

impl Programmed {
    fn backend_count(&self) -> u32 {
        self.slots.len() as u32
    }

    /// The slots whose flows are counted (`lc`, `sed`, `nq`), if any.
    fn counted(&self) -> &[BackendAddr] {
        counted_slots(&self.options, &self.slots)
    }
}

fn counted_slots<'a>(options: &FrontendOptions, slots: &'a [BackendAddr]) -> &'a [BackendAddr] {
    if options.balancing.algorithm.uses_active_connections() {
        slots
    } else {
        &[]
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
    /// Maglev table entries of all frontends together.
    maglev_slots: u64,
    /// How many counting frontends have each backend: its connection
    /// counter goes when none has it any more.
    counters: HashMap<BackendAddr, u32>,
    /// UDP frontends whose flows wait to be cleared: `Some` while clears
    /// are deferred ([`Dataplane::defer_udp_flow_clears`]).
    deferred_udp_clears: Option<HashSet<Frontend>>,
}

impl ServiceTable {
    /// Rebuilds the table from (possibly pinned, already filled) maps;
    /// `stats_capacity` is the size of the per-backend counters array.
    pub(crate) fn adopt(ebpf: &Ebpf, stats_capacity: u32) -> Result<Self, DataplaneError> {
        let services: BpfHashMap<_, ServiceKey, ServiceValue> =
            hash_map(ebpf, map_names::SERVICES)?;
        let slots: BpfHashMap<_, BackendKey, Backend> = hash_map(ebpf, map_names::BACKENDS)?;
        let mut ranges = adopt_source_ranges(ebpf)?;
        let members = balance::read_members(ebpf)?;
        let mut table = ServiceTable {
            stats: StatsIds::new(stats_capacity),
            ..ServiceTable::default()
        };
        for entry in services.iter() {
            let (key, value) = entry.map_err(DataplaneError::map(map_names::SERVICES))?;
            let Some(frontend) = frontend_from_key(&key) else {
                continue;
            };
            let mut options = FrontendOptions::from_flags(
                value.flags,
                ranges.remove(&value.service_id).unwrap_or_default(),
            );
            options.balancing = balance::balancing_from_map(
                value.algorithm,
                value.affinity_timeout,
                value.maglev_size,
            );
            let mut backends = Vec::new();
            for slot in 0..value.backend_count {
                let Ok(b) = slots.get(&backend_key(value.service_id, slot), 0) else {
                    continue;
                };
                let Some(addr) = BackendAddr::from_endpoint(b.addr, b.port) else {
                    continue;
                };
                if b.weight != Weight::DEFAULT.get() {
                    options.weights.insert(addr, Weight::new(b.weight));
                }
                if let Some(stats_id) = members.get(&(value.service_id, b.endpoint())) {
                    table.stats.adopt(frontend, addr, *stats_id);
                }
                backends.push(addr);
            }
            table.next_id = table.next_id.max(value.service_id + 1);
            table.backend_slots += backends.len() as u64;
            table.maglev_slots += u64::from(value.maglev_size);
            table.frontends.insert(
                frontend,
                Programmed {
                    id: value.service_id,
                    slots: backends.clone(),
                    backends,
                    options,
                    maglev: balance::read_maglev(ebpf, value.service_id, value.maglev_size),
                },
            );
        }
        let used: HashSet<u32> = table.frontends.values().map(|p| p.id).collect();
        table.free_ids = (0..table.next_id).filter(|id| !used.contains(id)).collect();
        let counted: Vec<BackendAddr> = table
            .frontends
            .values()
            .flat_map(|p| p.counted().iter().copied())
            .collect();
        table.count_backends(&counted, &[]);
        table.stats.finish_adopting();
        Ok(table)
    }

    /// Every programmed frontend with what it holds.
    pub(crate) fn programmed(&self) -> impl Iterator<Item = (Frontend, &Programmed)> {
        self.frontends.iter().map(|(f, p)| (*f, p))
    }

    /// Records that counting frontends gained `added` and lost `dropped`
    /// backends; returns the backends no counting frontend has any more.
    fn count_backends(
        &mut self,
        added: &[BackendAddr],
        dropped: &[BackendAddr],
    ) -> Vec<BackendAddr> {
        for backend in added {
            *self.counters.entry(*backend).or_default() += 1;
        }
        let mut gone = Vec::new();
        for backend in dropped {
            if let Some(n) = self.counters.get_mut(backend) {
                *n -= 1;
                if *n == 0 {
                    self.counters.remove(backend);
                    gone.push(*backend);
                }
            }
        }
        gone
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
    /// traffic policy (SNAT or client IP kept), source ranges, balancing
    /// (algorithm, Maglev table, session affinity) and backend weights.
    pub fn program_service_with(
        &mut self,
        frontend: Frontend,
        backends: &[BackendAddr],
        options: &FrontendOptions,
    ) -> Result<(), DataplaneError> {
        let previous = self.services.frontends.get(&frontend).cloned();
        let old_count = previous.as_ref().map_or(0, Programmed::backend_count);
        let plan = Slots::plan(&frontend.to_string(), backends, options)?;
        let new_count = plan.len();
        self.check_capacity(
            &frontend,
            previous.is_none(),
            old_count,
            plan.backends.len(),
        )?;
        let id = match &previous {
            Some(p) => p.id,
            None => self.services.allocate_id(),
        };
        let old_ranges = previous
            .as_ref()
            .map(|p| p.options.source_ranges.clone())
            .unwrap_or_default();
        let old_maglev = previous
            .as_ref()
            .map(|p| p.maglev.clone())
            .unwrap_or_default();
        let old_slots = previous
            .as_ref()
            .map(|p| p.slots.clone())
            .unwrap_or_default();
        let maglev = plan.maglev_table(&options.balancing);
        self.check_maglev_capacity(&frontend, old_maglev.len(), maglev.len())?;
        let new_slots: Vec<BackendAddr> = plan.backends.iter().map(|(b, _)| *b).collect();
        let mut stats_ids = Vec::with_capacity(new_slots.len());
        for backend in &new_slots {
            let (stats_id, fresh) = self.services.stats.get_or_allocate(frontend, *backend);
            if fresh {
                service_stats::reset_slot(self.ebpf_mut(), stats_id)?;
            }
            stats_ids.push(stats_id);
        }

        let ebpf = self.ebpf_mut();
        let mut slots = backend_map(ebpf)?;
        for (slot, value) in (0u32..).zip(plan.values(&stats_ids)) {
            slots
                .insert(backend_key(id, slot), value, 0)
                .map_err(DataplaneError::map(map_names::BACKENDS))?;
        }
        balance::add_members(ebpf, id, &plan, &stats_ids)?;
        let maglev_written = balance::write_maglev(ebpf, id, &maglev, &old_maglev)?;
        if options.balancing.algorithm.uses_active_connections() {
            balance::ensure_counters(ebpf, &plan)?;
        }
        write_source_ranges(ebpf, id, &options.source_ranges, &old_ranges)?;
        let mut flags = options.flags();
        if plan.weighted() {
            flags |= service_flags::WEIGHTED;
        }
        let value = ServiceValue {
            service_id: id,
            backend_count: new_count,
            flags,
            algorithm: balance::algorithm_code(options.balancing.algorithm),
            _pad: 0,
            _pad2: 0,
            affinity_timeout: balance::affinity_timeout(&options.balancing),
            total_weight: plan.total_weight,
            maglev_size: maglev.len() as u32,
        };
        service_map(ebpf)?
            .insert(frontend.key(), value, 0)
            .map_err(DataplaneError::map(map_names::SERVICES))?;
        let mut slots = backend_map(ebpf)?;
        for slot in new_count..old_count {
            // Absent already is fine: the goal is that it is gone.
            let _ = slots.remove(&backend_key(id, slot));
        }
        balance::remove_members(ebpf, id, &old_slots, &new_slots)?;
        balance::trim_maglev(ebpf, id, maglev.len(), old_maglev.len())?;
        if maglev_written > 0 {
            tracing::debug!(%frontend, entries = maglev_written, size = maglev.len(), "Maglev table written");
        }

        let dropped = previous.as_ref().map_or(&[][..], Programmed::counted);
        let gone = self
            .services
            .count_backends(counted_slots(options, &new_slots), dropped);
        balance::remove_counters(self.ebpf_mut(), &gone)?;
        self.services.backend_slots =
            self.services.backend_slots - u64::from(old_count) + u64::from(new_count);
        self.services.stats.release_except(&frontend, &new_slots);
        self.services.maglev_slots =
            self.services.maglev_slots - old_maglev.len() as u64 + maglev.len() as u64;
        self.services.frontends.insert(
            frontend,
            Programmed {
                id,
                backends: backends.to_vec(),
                options: options.clone(),
                slots: new_slots,
                maglev,
            },
        );
        let lost_backend = previous
            .as_ref()
            .is_some_and(|p| p.backends.iter().any(|b| !backends.contains(b)));
        if frontend.protocol == Protocol::Udp && lost_backend {
            self.udp_flows_stale(frontend)?;
        }
        Ok(())
    }

    /// Defers the UDP flow clears the changes that follow call for, until
    /// [`Dataplane::clear_deferred_udp_flows`]. A clear walks the whole
    /// conntrack table, whose cost grows with its capacity (about 9 ms at
    /// the default `--max-flows`), so a batch of changes (a sync of many
    /// services) is cleared in one walk instead of one walk per frontend.
    pub fn defer_udp_flow_clears(&mut self) {
        self.services
            .deferred_udp_clears
            .get_or_insert_with(HashSet::new);
    }

    /// Clears, in one walk, the UDP flows of every frontend changed since
    /// [`Dataplane::defer_udp_flow_clears`] whose backend is gone, and
    /// clears at once again from here on. Returns the flows cleared.
    pub fn clear_deferred_udp_flows(&mut self) -> Result<usize, DataplaneError> {
        let stale = self.services.deferred_udp_clears.take().unwrap_or_default();
        self.clear_udp_flows(stale)
    }

    /// `frontend`'s UDP flows may lead to backends it no longer has: cleared
    /// now, or with the deferred ones.
    fn udp_flows_stale(&mut self, frontend: Frontend) -> Result<(), DataplaneError> {
        match &mut self.services.deferred_udp_clears {
            Some(stale) => {
                stale.insert(frontend);
                Ok(())
            }
            None => self.clear_udp_flows([frontend]).map(drop),
        }
    }

    /// Removes the UDP flows of `frontends` to backends they no longer have
    /// (all of them for a frontend that went), in one walk of conntrack.
    fn clear_udp_flows(
        &self,
        frontends: impl IntoIterator<Item = Frontend>,
    ) -> Result<usize, DataplaneError> {
        let live: HashMap<ServiceKey, Vec<Endpoint>> = frontends
            .into_iter()
            .map(|frontend| {
                let backends = self
                    .services
                    .frontends
                    .get(&frontend)
                    .map_or_else(Vec::new, |p| {
                        p.backends.iter().map(|b| b.endpoint()).collect()
                    });
                (frontend.key(), backends)
            })
            .collect();
        if live.is_empty() {
            return Ok(0);
        }
        flows::clear_udp_flows(self.ebpf(), &live)
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
        balance::remove_members(ebpf, programmed.id, &programmed.slots, &[])?;
        balance::trim_maglev(ebpf, programmed.id, 0, programmed.maglev.len())?;
        if programmed.options.balancing.affinity != SessionAffinity::None {
            balance::forget_affinities(ebpf, programmed.id)?;
        }
        write_source_ranges(ebpf, programmed.id, &[], &programmed.options.source_ranges)?;
        let gone = self.services.count_backends(&[], programmed.counted());
        balance::remove_counters(self.ebpf_mut(), &gone)?;
        self.services.backend_slots -= u64::from(programmed.backend_count());
        self.services.maglev_slots -= programmed.maglev.len() as u64;
        self.services.free_ids.push(programmed.id);
        self.services.stats.release_except(frontend, &[]);
        if frontend.protocol == Protocol::Udp {
            self.udp_flows_stale(*frontend)?;
        }
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

    fn check_maglev_capacity(
        &self,
        frontend: &Frontend,
        old_size: usize,
        new_size: usize,
    ) -> Result<(), DataplaneError> {
        let capacity = self.max_maglev_entries;
        let after = self.services.maglev_slots - old_size as u64 + new_size as u64;
        if after > u64::from(capacity) {
            return Err(DataplaneError::MaglevFull {
                frontend: frontend.to_string(),
                size: new_size,
                capacity,
            });
        }
        Ok(())
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
    hash_map_mut(ebpf, map_names::SERVICES)
}

fn backend_map(
    ebpf: &mut Ebpf,
) -> Result<BpfHashMap<&mut MapData, BackendKey, Backend>, DataplaneError> {
    hash_map_mut(ebpf, map_names::BACKENDS)
}
