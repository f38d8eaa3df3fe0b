//! Reads a node's pinned maps: SERVICES (what the kernel holds, so a test or
//! benchmark can tell when a change is programmed, not just stored) and
//! STATS (the data plane's counters, without waiting for a metrics export).

use std::{net::Ipv4Addr, path::Path};

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray};
use vipr_common::{Counter, CounterValue, IPPROTO_TCP, IPPROTO_UDP, ServiceKey, ServiceValue};

/// The pinned SERVICES map of the agent whose pin folder is `pin_dir`.
pub struct PinnedServices(BpfHashMap<MapData, ServiceKey, ServiceValue>);

impl PinnedServices {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let path = pin_dir.join("SERVICES");
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(PinnedServices(BpfHashMap::try_from(Map::HashMap(data))?))
    }

    /// The backend count of frontend `addr:port/proto`, if programmed.
    pub fn backends(&self, addr: Ipv4Addr, port: u16, tcp: bool) -> Result<Option<u32>> {
        let key = ServiceKey {
            addr: u32::from(addr).to_be(),
            port: port.to_be(),
            proto: if tcp { IPPROTO_TCP } else { IPPROTO_UDP },
            _pad: 0,
        };
        match self.0.get(&key, 0) {
            Ok(value) => Ok(Some(value.backend_count)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// Packets counted under `counter` so far (all CPUs) by the agent whose pin
/// folder is `pin_dir`.
pub fn pinned_packets(pin_dir: &Path, counter: Counter) -> Result<u64> {
    let path = pin_dir.join("STATS");
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let stats: PerCpuArray<MapData, CounterValue> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
    let per_cpu = stats.get(&(counter as u32), 0)?;
    Ok(per_cpu.iter().map(|value| value.packets).sum())
}
