//! Reads a node's pinned maps: what the kernel holds, so a test or
//! benchmark can tell when a change is programmed (not just stored), and
//! what the data plane counted (STATS, without waiting for a metrics export).

use std::{net::Ipv4Addr, path::Path};

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray};
use vipr_common::{
    Counter, CounterValue, Endpoint, IPPROTO_TCP, IPPROTO_UDP, MaglevKey, ServiceKey, ServiceValue,
    map_names,
};

/// Packets counted under `counter` on all CPUs, from the pinned STATS map.
pub fn pinned_counter(pin_dir: &Path, counter: Counter) -> Result<u64> {
    let path = pin_dir.join(map_names::STATS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let stats: PerCpuArray<_, CounterValue> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
    let per_cpu = stats.get(&(counter as u32), 0)?;
    Ok(per_cpu.iter().map(|v| v.packets).sum())
}

/// The pinned SERVICES map of the agent whose pin folder is `pin_dir`.
pub struct PinnedServices(BpfHashMap<MapData, ServiceKey, ServiceValue>);

/// The Maglev table the kernel holds for TCP frontend `addr:port`, slot by
/// slot as (backend address, port); empty when it has none.
pub fn pinned_maglev_table(
    pin_dir: &Path,
    addr: Ipv4Addr,
    port: u16,
) -> Result<Vec<(Ipv4Addr, u16)>> {
    let Some(service) = PinnedServices::open(pin_dir)?.value(addr, port, true)? else {
        return Ok(Vec::new());
    };
    let path = pin_dir.join(map_names::MAGLEV);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let table: BpfHashMap<_, MaglevKey, Endpoint> = BpfHashMap::try_from(Map::HashMap(data))?;
    (0..service.maglev_size)
        .map(|slot| {
            let key = MaglevKey {
                service_id: service.service_id,
                slot,
            };
            let e = table
                .get(&key, 0)
                .with_context(|| format!("Maglev slot {slot}"))?;
            Ok((Ipv4Addr::from(u32::from_be(e.addr)), u16::from_be(e.port)))
        })
        .collect()
}

impl PinnedServices {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let path = pin_dir.join("SERVICES");
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(PinnedServices(BpfHashMap::try_from(Map::HashMap(data))?))
    }

    /// The backend count of frontend `addr:port/proto`, if programmed.
    pub fn backends(&self, addr: Ipv4Addr, port: u16, tcp: bool) -> Result<Option<u32>> {
        Ok(self.value(addr, port, tcp)?.map(|v| v.backend_count))
    }

    /// The service value of frontend `addr:port/proto`, if programmed.
    pub fn value(&self, addr: Ipv4Addr, port: u16, tcp: bool) -> Result<Option<ServiceValue>> {
        let key = ServiceKey {
            addr: u32::from(addr).to_be(),
            port: port.to_be(),
            proto: if tcp { IPPROTO_TCP } else { IPPROTO_UDP },
            _pad: 0,
        };
        match self.0.get(&key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl PinnedServices {
    /// Overwrites the backend count of frontend `addr:port/proto` (tests
    /// tampering with the kernel's state behind the agent's back); returns
    /// the count it had.
    pub fn set_backends(
        &mut self,
        addr: Ipv4Addr,
        port: u16,
        tcp: bool,
        count: u32,
    ) -> Result<u32> {
        let key = ServiceKey {
            addr: u32::from(addr).to_be(),
            port: port.to_be(),
            proto: if tcp { IPPROTO_TCP } else { IPPROTO_UDP },
            _pad: 0,
        };
        let mut value = self.0.get(&key, 0)?;
        let old = value.backend_count;
        value.backend_count = count;
        self.0.insert(key, value, 0)?;
        Ok(old)
    }
}
