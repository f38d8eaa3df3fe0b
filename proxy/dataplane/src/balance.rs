//! What the data plane's new-flow balancing reads besides the service
//! value: the backend slots' weight ranges, the Maglev tables, the service
//! members (session affinity's check), the active connection counts of
//! `lc` / `sed` / `nq`, and forgetting a removed service's affinities.
//!
//! The layout is documented on the map names in `vipr_common::map_names`;
//! the eBPF side is `ebpf/programs/src/balance.rs`.

use std::collections::{HashMap, HashSet};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use vipr_balancer::{
    AffinityTimeout, Algorithm, MaglevSeed, MaglevTable, MaglevTableSize, ServiceBalancing,
    SessionAffinity, Weight,
};
use vipr_common::{
    AffinityKey, AffinityValue, Backend, Endpoint, MaglevKey, MemberKey, ServiceKey, ServiceValue,
    flow_flags, lb_algorithm, map_names,
};

use crate::{
    BackendAddr, Dataplane, DataplaneError, FrontendOptions, flows,
    maps::{hash_map, hash_map_mut},
};

/// `BPF_NOEXIST`: insert only if absent.
const BPF_NOEXIST: u64 = 1;

/// A frontend's backend slots: its backends with a non-zero weight, in the
/// order given, each owning a range of the total weight.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Slots {
    pub backends: Vec<(BackendAddr, Weight)>,
    pub total_weight: u32,
}

impl Slots {
    pub(crate) fn plan(
        frontend: &str,
        backends: &[BackendAddr],
        options: &FrontendOptions,
    ) -> Result<Self, DataplaneError> {
        let backends: Vec<(BackendAddr, Weight)> = backends
            .iter()
            .map(|b| (*b, options.weight(b)))
            .filter(|(_, w)| w.accepts_new_flows())
            .collect();
        let total: u64 = backends.iter().map(|(_, w)| u64::from(w.get())).sum();
        let total_weight = u32::try_from(total).map_err(|_| DataplaneError::WeightsTooLarge {
            frontend: frontend.to_owned(),
            total,
        })?;
        Ok(Slots {
            backends,
            total_weight,
        })
    }

    pub(crate) fn len(&self) -> u32 {
        self.backends.len() as u32
    }

    /// Whether the weights differ (equal weights index slots directly).
    pub(crate) fn weighted(&self) -> bool {
        self.backends.windows(2).any(|w| w[0].1 != w[1].1)
    }

    /// The map value of each slot, with the slot's stats id.
    pub(crate) fn values<'s>(&'s self, stats_ids: &'s [u32]) -> impl Iterator<Item = Backend> + 's {
        let mut start = 0u32;
        self.backends
            .iter()
            .zip(stats_ids)
            .map(move |((addr, weight), &stats_id)| {
                let endpoint = addr.endpoint();
                let value = Backend {
                    addr: endpoint.addr,
                    port: endpoint.port,
                    weight: weight.get(),
                    weight_start: start,
                    stats_id,
                };
                start += u32::from(weight.get());
                value
            })
    }

    /// The Maglev table of these slots, as `MAGLEV` holds it; empty unless
    /// the algorithm is Maglev.
    pub(crate) fn maglev_table(&self, balancing: &ServiceBalancing) -> Vec<Endpoint> {
        if balancing.algorithm != Algorithm::Maglev || self.backends.is_empty() {
            return Vec::new();
        }
        let backends: Vec<vipr_balancer::Backend> = self
            .backends
            .iter()
            .map(|(addr, weight)| {
                vipr_balancer::Backend::new(addr.socket_addr()).with_weight(*weight)
            })
            .collect();
        let table = MaglevTable::build(
            &backends,
            balancing.maglev_table_size,
            balancing.maglev_seed,
        );
        table
            .entries()
            .iter()
            .map(|&i| self.backends[i as usize].0.endpoint())
            .collect()
    }
}

/// The data plane's code of an algorithm (`vipr_common::lb_algorithm`).
pub(crate) const fn algorithm_code(algorithm: Algorithm) -> u8 {
    match algorithm {
        Algorithm::Random => lb_algorithm::RANDOM,
        Algorithm::RoundRobin => lb_algorithm::ROUND_ROBIN,
        Algorithm::WeightedRoundRobin => lb_algorithm::WEIGHTED_ROUND_ROBIN,
        Algorithm::LeastConnection => lb_algorithm::LEAST_CONNECTION,
        Algorithm::SourceHash => lb_algorithm::SOURCE_HASH,
        Algorithm::DestinationHash => lb_algorithm::DESTINATION_HASH,
        Algorithm::ShortestExpectedDelay => lb_algorithm::SHORTEST_EXPECTED_DELAY,
        Algorithm::NeverQueue => lb_algorithm::NEVER_QUEUE,
        Algorithm::Maglev => lb_algorithm::MAGLEV,
    }
}

/// The balancing a service value was written from, as far as it tells
/// (the seed is not in the maps: the agent's own is used).
pub(crate) fn balancing_from_map(
    algorithm: u8,
    affinity_timeout: u32,
    maglev_size: u32,
) -> ServiceBalancing {
    let algorithm = Algorithm::ALL
        .into_iter()
        .find(|a| algorithm_code(*a) == algorithm)
        .unwrap_or_default();
    let affinity = AffinityTimeout::from_seconds(i64::from(affinity_timeout))
        .map_or(SessionAffinity::None, |timeout| SessionAffinity::ClientIp {
            timeout,
        });
    ServiceBalancing {
        algorithm,
        maglev_table_size: MaglevTableSize::new(maglev_size).unwrap_or_default(),
        maglev_seed: MaglevSeed::default(),
        affinity,
    }
}

/// The affinity timeout as the service value holds it (0: none).
pub(crate) fn affinity_timeout(balancing: &ServiceBalancing) -> u32 {
    match balancing.affinity {
        SessionAffinity::None => 0,
        SessionAffinity::ClientIp { timeout } => timeout.seconds(),
    }
}

/// Writes the entries of `new` that differ from `old` (the table the map
/// holds for `service_id` now); entries past `new`'s end are left for
/// [`trim_maglev`]. Returns how many entries were written.
pub(crate) fn write_maglev(
    ebpf: &mut Ebpf,
    service_id: u32,
    new: &[Endpoint],
    old: &[Endpoint],
) -> Result<usize, DataplaneError> {
    let mut table: BpfHashMap<_, MaglevKey, Endpoint> = hash_map_mut(ebpf, map_names::MAGLEV)?;
    let mut written = 0;
    for (slot, entry) in (0u32..).zip(new) {
        if old.get(slot as usize) == Some(entry) {
            continue;
        }
        table
            .insert(MaglevKey { service_id, slot }, *entry, 0)
            .map_err(DataplaneError::map(map_names::MAGLEV))?;
        written += 1;
    }
    Ok(written)
}

/// Removes `service_id`'s table entries from `new_len` to `old_len`.
pub(crate) fn trim_maglev(
    ebpf: &mut Ebpf,
    service_id: u32,
    new_len: usize,
    old_len: usize,
) -> Result<(), DataplaneError> {
    let mut table: BpfHashMap<_, MaglevKey, Endpoint> = hash_map_mut(ebpf, map_names::MAGLEV)?;
    for slot in new_len..old_len {
        let _ = table.remove(&MaglevKey {
            service_id,
            slot: slot as u32,
        });
    }
    Ok(())
}

/// `service_id`'s Maglev table as the map holds it (after a restart).
pub(crate) fn read_maglev(ebpf: &Ebpf, service_id: u32, size: u32) -> Vec<Endpoint> {
    let Some(Ok(table)) = ebpf
        .map(map_names::MAGLEV)
        .map(BpfHashMap::<_, MaglevKey, Endpoint>::try_from)
    else {
        return Vec::new();
    };
    let entries: Vec<Endpoint> = (0..size)
        .map_while(|slot| table.get(&MaglevKey { service_id, slot }, 0).ok())
        .collect();
    // A partial table is useless as a base for a diff.
    if entries.len() == size as usize {
        entries
    } else {
        Vec::new()
    }
}

fn member_key(service_id: u32, backend: &BackendAddr) -> MemberKey {
    let endpoint = backend.endpoint();
    MemberKey {
        service_id,
        addr: endpoint.addr,
        port: endpoint.port,
        _pad: 0,
    }
}

/// Records the slots' backends as the service's members, each with the
/// `BACKEND_STATS` slot of its (frontend, backend) pair (`stats_ids`, in
/// slot order): the data plane reads it there for the flows it opens.
pub(crate) fn add_members(
    ebpf: &mut Ebpf,
    service_id: u32,
    slots: &Slots,
    stats_ids: &[u32],
) -> Result<(), DataplaneError> {
    let mut members: BpfHashMap<_, MemberKey, u32> = hash_map_mut(ebpf, map_names::MEMBERS)?;
    for ((backend, _), stats_id) in slots.backends.iter().zip(stats_ids) {
        members
            .insert(member_key(service_id, backend), stats_id, 0)
            .map_err(DataplaneError::map(map_names::MEMBERS))?;
    }
    Ok(())
}

/// Every member with its stats id, by (service id, endpoint), to adopt.
pub(crate) fn read_members(
    ebpf: &Ebpf,
) -> Result<std::collections::HashMap<(u32, Endpoint), u32>, DataplaneError> {
    let members: BpfHashMap<&MapData, MemberKey, u32> = hash_map(ebpf, map_names::MEMBERS)?;
    Ok(members
        .iter()
        .filter_map(Result::ok)
        .map(|(key, stats_id)| {
            let endpoint = Endpoint {
                addr: key.addr,
                port: key.port,
                _pad: 0,
            };
            ((key.service_id, endpoint), stats_id)
        })
        .collect())
}

/// Forgets the members in `old` that `new` no longer has.
pub(crate) fn remove_members(
    ebpf: &mut Ebpf,
    service_id: u32,
    old: &[BackendAddr],
    new: &[BackendAddr],
) -> Result<(), DataplaneError> {
    let keep: HashSet<&BackendAddr> = new.iter().collect();
    let mut members: BpfHashMap<_, MemberKey, u32> = hash_map_mut(ebpf, map_names::MEMBERS)?;
    for backend in old.iter().filter(|b| !keep.contains(b)) {
        let _ = members.remove(&member_key(service_id, backend));
    }
    Ok(())
}

/// Creates a zero count for each slot backend without one, so the data
/// plane only ever adds to existing counters.
pub(crate) fn ensure_counters(ebpf: &mut Ebpf, slots: &Slots) -> Result<(), DataplaneError> {
    let mut counts: BpfHashMap<_, Endpoint, u32> =
        hash_map_mut(ebpf, map_names::ACTIVE_CONNECTIONS)?;
    for (backend, _) in &slots.backends {
        match counts.insert(backend.endpoint(), 0, BPF_NOEXIST) {
            Ok(()) => {}
            // It exists: keep its count.
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(DataplaneError::map(map_names::ACTIVE_CONNECTIONS)(e)),
        }
    }
    Ok(())
}

/// Removes the connection counters of `backends` (no counting frontend
/// has them any more).
pub(crate) fn remove_counters(
    ebpf: &mut Ebpf,
    backends: &[BackendAddr],
) -> Result<(), DataplaneError> {
    if backends.is_empty() {
        return Ok(());
    }
    let mut counts: BpfHashMap<_, Endpoint, u32> =
        hash_map_mut(ebpf, map_names::ACTIVE_CONNECTIONS)?;
    for backend in backends {
        let _ = counts.remove(&backend.endpoint());
    }
    Ok(())
}

/// Removes every session affinity of `service_id` (its id may be reused).
pub(crate) fn forget_affinities(ebpf: &mut Ebpf, service_id: u32) -> Result<(), DataplaneError> {
    let mut affinity: BpfHashMap<_, AffinityKey, AffinityValue> =
        hash_map_mut(ebpf, map_names::AFFINITY)?;
    let doomed: Vec<AffinityKey> = affinity
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.service_id == service_id)
        .collect();
    for key in &doomed {
        let _ = affinity.remove(key);
    }
    Ok(())
}

impl Dataplane {
    /// Sets every backend's active connection count (`lc`, `sed`, `nq`) to
    /// the number of counted flows conntrack holds for it plus the counted
    /// sockets of node-local clients. The data plane counts opens and
    /// closes; this forgets the flows that left conntrack without a close
    /// (expired idle, UDP flows cleared with their backend). A flow opening or closing
    /// during the walk may be missed until the next recount. Returns the
    /// number of counted flows found.
    pub fn recount_active_connections(&mut self) -> Result<u64, DataplaneError> {
        let ebpf = self.ebpf_mut();
        let mut open: HashMap<Endpoint, u32> = HashMap::new();
        for (_, entry, _) in flows::ConntrackTable::of(ebpf)?.entries() {
            // The forward entry's destination is the backend.
            // A closed flow (kept until idle) was uncounted when it closed.
            let still_open = entry.flags & (flow_flags::REPLY | flow_flags::CLOSED) == 0;
            if entry.flags & flow_flags::COUNTED != 0 && still_open {
                let backend = Endpoint {
                    addr: entry.dst_addr,
                    port: entry.dst_port,
                    _pad: 0,
                };
                *open.entry(backend).or_default() += 1;
            }
        }
        {
            let sockets: BpfHashMap<_, u64, Endpoint> =
                hash_map_mut(ebpf, map_names::SOCK_CONNECTIONS)?;
            for backend in sockets.iter().filter_map(Result::ok).map(|(_, b)| b) {
                *open.entry(backend).or_default() += 1;
            }
        }
        let mut counts: BpfHashMap<_, Endpoint, u32> =
            hash_map_mut(ebpf, map_names::ACTIVE_CONNECTIONS)?;
        let keys: Vec<Endpoint> = counts.keys().filter_map(Result::ok).collect();
        for key in keys {
            let actual = open.get(&key).copied().unwrap_or(0);
            if counts.get(&key, 0).ok() != Some(actual) {
                counts
                    .insert(key, actual, 0)
                    .map_err(DataplaneError::map(map_names::ACTIVE_CONNECTIONS))?;
            }
        }
        Ok(open.values().map(|&n| u64::from(n)).sum())
    }

    /// The Maglev table the kernel holds for `frontend`, slot by slot
    /// (empty unless it balances with Maglev). Reads the map, not the
    /// userspace copy: for diagnostics and tests.
    pub fn maglev_table(&self, frontend: &crate::Frontend) -> Vec<BackendAddr> {
        let Some(Ok(services)) = self
            .ebpf()
            .map(map_names::SERVICES)
            .map(BpfHashMap::<_, ServiceKey, ServiceValue>::try_from)
        else {
            return Vec::new();
        };
        let Ok(service) = services.get(&frontend.key(), 0) else {
            return Vec::new();
        };
        read_maglev(self.ebpf(), service.service_id, service.maglev_size)
            .iter()
            .filter_map(|e| BackendAddr::from_endpoint(e.addr, e.port))
            .collect()
    }

    /// The active connection count the data plane holds for `backend`
    /// (`None` when no counting service has it).
    pub fn active_connections(
        &mut self,
        backend: &BackendAddr,
    ) -> Result<Option<u32>, DataplaneError> {
        let counts: BpfHashMap<_, Endpoint, u32> =
            hash_map_mut(self.ebpf_mut(), map_names::ACTIVE_CONNECTIONS)?;
        Ok(counts.get(&backend.endpoint(), 0).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_codes_round_trip_and_carry_the_annotation_names() {
        for algorithm in Algorithm::ALL {
            let code = algorithm_code(algorithm);
            assert_eq!(lb_algorithm::name(code), Some(algorithm.name()));
            assert_eq!(balancing_from_map(code, 0, 0).algorithm, algorithm);
        }
        assert_eq!(lb_algorithm::name(200), None);
    }
}
