//! The maps as the kernel holds them, for `vipr lb list` (everything,
//! decoded or as raw bytes) and `vipr trace` (point lookups of the keys
//! the XDP program would look up for one packet).

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, lpm_trie::Key},
};
use ipnet::Ipv4Net;
use vipr_balancer::ServiceBalancing;
use vipr_common::{
    AffinityKey, AffinityValue, Backend, BackendKey, DataplaneConfig, Endpoint, FLOW_CLOCK_SHIFT,
    FlowKey, MaglevKey, MemberKey, NatEntry, ServiceKey, ServiceValue, SourceRangeKey, map_names,
};

use crate::{Dataplane, DataplaneError, Frontend, expiry, flows::ConntrackTable, maps::hash_map};

/// One entry of a map, its key and value as bytes (as bpftool shows them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawEntry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// A decoded entry with its raw bytes.
#[derive(Clone, Debug)]
pub struct MapEntry<K, V> {
    pub key: K,
    pub value: V,
}

impl<K: Pod, V: Pod> MapEntry<K, V> {
    pub fn raw(&self) -> RawEntry {
        RawEntry {
            key: bytes_of(&self.key).to_vec(),
            value: bytes_of(&self.value).to_vec(),
        }
    }
}

/// The bytes of a map key or value type.
pub fn bytes_of<T: Pod>(value: &T) -> &[u8] {
    // SAFETY: Pod types are plain data without padding.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

/// Every entry of the translation maps, as read now (entries may change
/// while they are walked; each is consistent on its own).
#[derive(Clone, Debug, Default)]
pub struct MapDump {
    pub config: DataplaneConfig,
    pub services: Vec<MapEntry<ServiceKey, ServiceValue>>,
    pub backends: Vec<MapEntry<BackendKey, Backend>>,
    /// Conntrack, both directions (reply entries carry `flow_flags::REPLY`).
    pub conntrack: Vec<MapEntry<FlowKey, NatEntry>>,
    /// Service id and client range.
    pub source_ranges: Vec<(u32, Ipv4Net)>,
    /// Maglev tables in summary: by service id, the slots each endpoint holds.
    pub maglev: BTreeMap<u32, BTreeMap<Endpoint, u32>>,
    /// ClientIP session affinity entries.
    pub affinity: Vec<MapEntry<AffinityKey, AffinityValue>>,
    /// Conntrack's clock when read, to age entries by `NatEntry::last_seen`.
    pub clock: u32,
    /// CLOCK_MONOTONIC when read, to age affinity entries.
    pub monotonic_ns: u64,
}

impl MapDump {
    /// How long a conntrack entry has been idle when the maps were read.
    pub fn idle(&self, entry: &NatEntry) -> Duration {
        idle_since(self.clock, entry.last_seen)
    }
}

/// CLOCK_MONOTONIC now, the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Time from conntrack tick `last_seen` to tick `now`.
fn idle_since(now: u32, last_seen: u32) -> Duration {
    Duration::from_nanos(u64::from(expiry::idle_ticks(now, last_seen)) << FLOW_CLOCK_SHIFT)
}

/// How long a conntrack entry has been idle now.
pub fn idle_now(entry: &NatEntry) -> Duration {
    idle_since(expiry::flow_clock_now(), entry.last_seen)
}

fn hash_entries<K: Pod, V: Pod>(
    ebpf: &Ebpf,
    name: &'static str,
) -> Result<Vec<MapEntry<K, V>>, DataplaneError> {
    let map: BpfHashMap<&MapData, K, V> = hash_map(ebpf, name)?;
    Ok(map
        .iter()
        .filter_map(Result::ok)
        .map(|(key, value)| MapEntry { key, value })
        .collect())
}

fn maglev_summary(
    entries: Vec<MapEntry<MaglevKey, Endpoint>>,
) -> BTreeMap<u32, BTreeMap<Endpoint, u32>> {
    let mut out: BTreeMap<u32, BTreeMap<Endpoint, u32>> = BTreeMap::new();
    for entry in entries {
        *out.entry(entry.key.service_id)
            .or_default()
            .entry(entry.value)
            .or_default() += 1;
    }
    out
}

fn lookup<K: Pod, V: Pod>(
    ebpf: &Ebpf,
    name: &'static str,
    key: &K,
) -> Result<Option<V>, DataplaneError> {
    let map: BpfHashMap<&MapData, K, V> = hash_map(ebpf, name)?;
    Ok(map.get(key, 0).ok())
}

fn config_of(ebpf: &Ebpf) -> Result<DataplaneConfig, DataplaneError> {
    let array: Array<&MapData, DataplaneConfig> = Array::try_from(
        ebpf.map(map_names::CONFIG)
            .ok_or(DataplaneError::MissingMap(map_names::CONFIG))?,
    )
    .map_err(DataplaneError::map(map_names::CONFIG))?;
    array
        .get(&0, 0)
        .map_err(DataplaneError::map(map_names::CONFIG))
}

fn source_range_trie(
    ebpf: &Ebpf,
) -> Result<LpmTrie<&MapData, SourceRangeKey, u32>, DataplaneError> {
    LpmTrie::try_from(
        ebpf.map(map_names::SOURCE_RANGES)
            .ok_or(DataplaneError::MissingMap(map_names::SOURCE_RANGES))?,
    )
    .map_err(DataplaneError::map(map_names::SOURCE_RANGES))
}

impl Dataplane {
    /// Reads every translation map whole. Walks conntrack: for the CLI.
    pub fn dump_maps(&self) -> Result<MapDump, DataplaneError> {
        let ebpf = self.ebpf();
        let trie = source_range_trie(ebpf)?;
        let source_ranges = trie
            .keys()
            .filter_map(Result::ok)
            .filter_map(|key| {
                let data = key.data();
                let prefix = key.prefix_len().saturating_sub(32).min(32) as u8;
                let net = Ipv4Net::new(Ipv4Addr::from(u32::from_be(data.addr)), prefix).ok()?;
                Some((u32::from_be(data.service_id), net))
            })
            .collect();
        Ok(MapDump {
            config: config_of(ebpf)?,
            services: hash_entries(ebpf, map_names::SERVICES)?,
            backends: hash_entries(ebpf, map_names::BACKENDS)?,
            conntrack: ConntrackTable::of(ebpf)?
                .entries()
                .into_iter()
                .map(|(key, value, _)| MapEntry { key, value })
                .collect(),
            source_ranges,
            maglev: maglev_summary(hash_entries(ebpf, map_names::MAGLEV)?),
            affinity: hash_entries(ebpf, map_names::AFFINITY)?,
            clock: expiry::flow_clock_now(),
            monotonic_ns: monotonic_ns(),
        })
    }

    /// The node-wide settings the program reads.
    pub fn config(&self) -> Result<DataplaneConfig, DataplaneError> {
        config_of(self.ebpf())
    }

    /// The SERVICES entry of `frontend`, as the program would find it.
    pub fn lookup_service(
        &self,
        frontend: &Frontend,
    ) -> Result<Option<ServiceValue>, DataplaneError> {
        lookup(self.ebpf(), map_names::SERVICES, &frontend.key())
    }

    /// The backend in slot `slot` of service `service_id`.
    pub fn lookup_backend(
        &self,
        service_id: u32,
        slot: u32,
    ) -> Result<Option<Backend>, DataplaneError> {
        lookup(
            self.ebpf(),
            map_names::BACKENDS,
            &BackendKey { service_id, slot },
        )
    }

    /// The conntrack entry of `key`, either direction (reply entries carry
    /// `flow_flags::REPLY`).
    pub fn lookup_flow(&self, key: &FlowKey) -> Result<Option<NatEntry>, DataplaneError> {
        Ok(ConntrackTable::of(self.ebpf())?.lookup(key))
    }

    /// The endpoint in slot `slot` of service `service_id`'s Maglev table.
    pub fn lookup_maglev(
        &self,
        service_id: u32,
        slot: u32,
    ) -> Result<Option<Endpoint>, DataplaneError> {
        lookup(
            self.ebpf(),
            map_names::MAGLEV,
            &MaglevKey { service_id, slot },
        )
    }

    /// The session affinity entry of `key`.
    pub fn lookup_affinity(
        &self,
        key: &AffinityKey,
    ) -> Result<Option<AffinityValue>, DataplaneError> {
        lookup(self.ebpf(), map_names::AFFINITY, key)
    }

    /// Whether `endpoint` is one of service `service_id`'s backends now.
    pub fn is_member(&self, service_id: u32, endpoint: &Endpoint) -> Result<bool, DataplaneError> {
        let key = MemberKey {
            service_id,
            addr: endpoint.addr,
            port: endpoint.port,
            _pad: 0,
        };
        Ok(lookup::<_, u32>(self.ebpf(), map_names::MEMBERS, &key)?.is_some())
    }

    /// The round-robin turn counter of service `service_id` (`rr`, `wrr`).
    pub fn balance_turn(&self, service_id: u32) -> Result<u32, DataplaneError> {
        let array: Array<&MapData, u32> = Array::try_from(
            self.ebpf()
                .map(map_names::BALANCE_TURNS)
                .ok_or(DataplaneError::MissingMap(map_names::BALANCE_TURNS))?,
        )
        .map_err(DataplaneError::map(map_names::BALANCE_TURNS))?;
        Ok(array.get(&service_id, 0).unwrap_or(0))
    }

    /// The balancing a SERVICES entry programs.
    pub fn balancing_of(value: &ServiceValue) -> ServiceBalancing {
        crate::balance::balancing_from_map(
            value.algorithm,
            value.affinity_timeout,
            value.maglev_size,
        )
    }

    /// The source range of service `service_id` that admits `client`, if any.
    pub fn matching_source_range(
        &self,
        service_id: u32,
        client: Ipv4Addr,
    ) -> Result<Option<Ipv4Net>, DataplaneError> {
        let trie = source_range_trie(self.ebpf())?;
        let key = Key::new(
            64,
            SourceRangeKey {
                service_id: service_id.to_be(),
                addr: u32::from(client).to_be(),
            },
        );
        if trie.get(&key, 0).is_err() {
            return Ok(None);
        }
        // The trie says yes; name the range from the userspace copy.
        Ok(self
            .services
            .programmed()
            .find(|(_, p)| p.id == service_id)
            .and_then(|(_, p)| {
                p.options
                    .source_ranges
                    .iter()
                    .filter(|net| net.contains(&client))
                    .max_by_key(|net| net.prefix_len())
                    .copied()
            })
            .or(Some(Ipv4Net::from(client))))
    }
}
