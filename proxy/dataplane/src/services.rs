//! Programming frontends and their backend slots into the maps.
//!
//! A frontend owns an id and the backend slots `0..count` under that id. An
//! update writes the new slots before it publishes the new count, and removes
//! surplus slots only after, so a packet in flight always finds a backend.

use std::{collections::HashMap, net::Ipv4Addr};

use aya::{Ebpf, maps::HashMap as BpfHashMap};
use vipr_common::{Backend, BackendKey, ServiceKey, ServiceValue, map_names};

use crate::{BackendAddr, Dataplane, DataplaneError, Frontend, Port, Protocol};

#[derive(Clone, Copy, Debug)]
struct Programmed {
    id: u32,
    backend_count: u32,
}

/// Userspace's copy of which frontend holds which id and how many slots.
#[derive(Debug, Default)]
pub(crate) struct ServiceTable {
    frontends: HashMap<Frontend, Programmed>,
    free_ids: Vec<u32>,
    next_id: u32,
    backend_slots: u64,
}

impl ServiceTable {
    /// Rebuilds the table from a (possibly pinned, already filled) SERVICES map.
    pub(crate) fn adopt(ebpf: &Ebpf) -> Result<Self, DataplaneError> {
        let map = ebpf
            .map(map_names::SERVICES)
            .ok_or(DataplaneError::MissingMap(map_names::SERVICES))?;
        let services: BpfHashMap<_, ServiceKey, ServiceValue> =
            BpfHashMap::try_from(map).map_err(DataplaneError::map(map_names::SERVICES))?;
        let mut table = ServiceTable::default();
        for entry in services.iter() {
            let (key, value) = entry.map_err(DataplaneError::map(map_names::SERVICES))?;
            let Some(frontend) = frontend_from_key(&key) else {
                continue;
            };
            table.next_id = table.next_id.max(value.service_id + 1);
            table.backend_slots += u64::from(value.backend_count);
            table.frontends.insert(
                frontend,
                Programmed {
                    id: value.service_id,
                    backend_count: value.backend_count,
                },
            );
        }
        let used: std::collections::HashSet<u32> = table.frontends.values().map(|p| p.id).collect();
        table.free_ids = (0..table.next_id).filter(|id| !used.contains(id)).collect();
        Ok(table)
    }

    fn allocate_id(&mut self) -> u32 {
        self.free_ids.pop().unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id - 1
        })
    }
}

fn frontend_from_key(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        addr: Ipv4Addr::from(u32::from_be(key.addr)),
        port: Port::new(u16::from_be(key.port))?,
        protocol: Protocol::from_ip_proto(key.proto)?,
    })
}

impl Dataplane {
    /// Makes `frontend` translate to `backends` (replacing what it had). An
    /// empty list keeps the frontend known, so its traffic is rejected rather
    /// than routed on. Existing flows keep their backend.
    pub fn program_service(
        &mut self,
        frontend: Frontend,
        backends: &[BackendAddr],
    ) -> Result<(), DataplaneError> {
        let previous = self.services.frontends.get(&frontend).copied();
        let old_count = previous.map_or(0, |p| p.backend_count);
        let new_count = u32::try_from(backends.len()).unwrap_or(u32::MAX);
        self.check_capacity(&frontend, previous.is_none(), old_count, backends.len())?;
        let id = match previous {
            Some(p) => p.id,
            None => self.services.allocate_id(),
        };

        let ebpf = self.ebpf_mut();
        let mut slots = backend_map(ebpf)?;
        for (slot, backend) in (0u32..).zip(backends) {
            slots
                .insert(backend_key(id, slot), backend.to_map_value(), 0)
                .map_err(DataplaneError::map(map_names::BACKENDS))?;
        }
        let mut services = service_map(ebpf)?;
        let value = ServiceValue {
            service_id: id,
            backend_count: new_count,
        };
        services
            .insert(frontend.key(), value, 0)
            .map_err(DataplaneError::map(map_names::SERVICES))?;
        let mut slots = backend_map(ebpf)?;
        for slot in new_count..old_count {
            // Absent already is fine: the goal is that it is gone.
            let _ = slots.remove(&backend_key(id, slot));
        }

        self.services.backend_slots =
            self.services.backend_slots - u64::from(old_count) + u64::from(new_count);
        self.services.frontends.insert(
            frontend,
            Programmed {
                id,
                backend_count: new_count,
            },
        );
        Ok(())
    }

    /// Forgets `frontend`: new packets to it are no longer translated.
    /// Returns whether it was programmed.
    pub fn remove_service(&mut self, frontend: &Frontend) -> Result<bool, DataplaneError> {
        let Some(programmed) = self.services.frontends.remove(frontend) else {
            return Ok(false);
        };
        let ebpf = self.ebpf_mut();
        let mut services = service_map(ebpf)?;
        let _ = services.remove(&frontend.key());
        let mut slots = backend_map(ebpf)?;
        for slot in 0..programmed.backend_count {
            let _ = slots.remove(&backend_key(programmed.id, slot));
        }
        self.services.backend_slots -= u64::from(programmed.backend_count);
        self.services.free_ids.push(programmed.id);
        Ok(true)
    }

    /// Frontends currently programmed, with their backend counts, sorted.
    pub fn frontends(&self) -> Vec<(Frontend, u32)> {
        let mut all: Vec<_> = self
            .services
            .frontends
            .iter()
            .map(|(f, p)| (*f, p.backend_count))
            .collect();
        all.sort_unstable();
        all
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

fn backend_key(service_id: u32, slot: u32) -> BackendKey {
    BackendKey { service_id, slot }
}

fn service_map(
    ebpf: &mut Ebpf,
) -> Result<BpfHashMap<&mut aya::maps::MapData, ServiceKey, ServiceValue>, DataplaneError> {
    let map = ebpf
        .map_mut(map_names::SERVICES)
        .ok_or(DataplaneError::MissingMap(map_names::SERVICES))?;
    BpfHashMap::try_from(map).map_err(DataplaneError::map(map_names::SERVICES))
}

fn backend_map(
    ebpf: &mut Ebpf,
) -> Result<BpfHashMap<&mut aya::maps::MapData, BackendKey, Backend>, DataplaneError> {
    let map = ebpf
        .map_mut(map_names::BACKENDS)
        .ok_or(DataplaneError::MissingMap(map_names::BACKENDS))?;
    BpfHashMap::try_from(map).map_err(DataplaneError::map(map_names::BACKENDS))
}
