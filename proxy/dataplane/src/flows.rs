//! Conntrack from userspace: the CONNTRACK table (one entry per direction
//! of each flow, laid out as `vipr_common::flow_table` describes) mapped
//! into this process, read and pruned with the same lock-free protocol the
//! eBPF side uses.
//!
//! The eBPF side removes TCP flows on a reset and marks them closed after
//! FINs both ways (to expire soon); what it cannot know is that a backend
//! went away. A UDP flow has no close, so a flow pinned to a
//! removed backend would black-hole the client until it expired; those are
//! cleared here whenever a UDP frontend loses a backend (one walk for a
//! whole batch of changes: `Dataplane::defer_udp_flow_clears`). (Idle flows
//! expire in `expiry`.)
//!
//! The table is mapped for the length of one operation and unmapped after:
//! a standing mapping would count the whole table (64 MiB at the default
//! `--max-flows`) in the agent's resident memory, although it is the
//! kernel's, already counted as the map's.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::{
    Ebpf,
    maps::{Array, Map, MapData},
};
use vipr_common::{
    DataplaneConfig, Endpoint, FlowKey, IPPROTO_UDP, NatEntry, ServiceKey, flow_flags,
    flow_table::{self, FlowSlot, Found, SlotMemory as _, TableShape, user::RawSlots},
    map_names,
};

use crate::{Dataplane, DataplaneError, Protocol};

/// One translated flow, as its forward conntrack entry records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flow {
    pub protocol: Protocol,
    /// The client as the packet arrived.
    pub client: SocketAddrV4,
    /// The frontend the client dialled.
    pub frontend: SocketAddrV4,
    /// The source the backend sees (the client, or an SNAT address and port).
    pub source_seen: SocketAddrV4,
    /// The backend chosen for the flow.
    pub backend: SocketAddrV4,
    /// A FIN was seen from the client.
    pub client_closing: bool,
    /// The TCP connection is over (FINs both ways and the last ACK); the
    /// flow stays until idle for the closing timeout.
    pub closed: bool,
}

/// Conntrack entries by direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounts {
    pub forward: usize,
    pub reverse: usize,
}

fn sock(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr)), u16::from_be(port))
}

/// A live entry of the table: its key, a consistent copy of its entry, and
/// where it is (to remove exactly it).
pub(crate) type LiveEntry = (FlowKey, NatEntry, Found);

/// The CONNTRACK table mapped into this process (shared with the kernel:
/// every access follows `vipr_common::flow_table`'s protocol).
pub(crate) struct ConntrackTable {
    memory: RawSlots,
    shape: TableShape,
    bytes: usize,
}

impl ConntrackTable {
    /// Maps the table behind `fd`, of `shape`.
    pub(crate) fn map(fd: BorrowedFd<'_>, shape: TableShape) -> Result<Self, DataplaneError> {
        let slots = shape.mask.wrapping_add(1);
        let bytes = slots as usize * size_of::<FlowSlot>();
        // SAFETY: a fresh shared mapping of a BPF_F_MMAPABLE array map of
        // `slots` slots; the kernel checks the length against the map.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(DataplaneError::MapConntrack {
                slots,
                bytes,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(ConntrackTable {
            // SAFETY: the mapping holds `slots` page-aligned slots and lives
            // until this value drops.
            memory: unsafe { RawSlots::new(base.cast(), slots) },
            shape,
            bytes,
        })
    }

    /// Maps the loaded data plane's table.
    pub(crate) fn of(ebpf: &Ebpf) -> Result<Self, DataplaneError> {
        Self::map(conntrack_fd(ebpf)?, conntrack_shape(ebpf)?)
    }

    /// Every live entry, both directions.
    pub(crate) fn entries(&self) -> Vec<LiveEntry> {
        (0..self.memory.len())
            .filter_map(|index| flow_table::read_slot(&self.memory, self.shape, index))
            .collect()
    }

    pub(crate) fn lookup(&self, key: &FlowKey) -> Option<NatEntry> {
        flow_table::lookup(&self.memory, self.shape, key).map(|(_, entry)| entry)
    }

    /// Whether the entry `found` names is still there and unused since it
    /// was read as `entry` (its time stamp unchanged).
    pub(crate) fn unused_since(&self, found: &Found, entry: &NatEntry) -> bool {
        flow_table::read_slot(&self.memory, self.shape, found.index).is_some_and(
            |(_, current, again)| {
                again.control == found.control && current.last_seen == entry.last_seen
            },
        )
    }

    /// Removes the entry `found` names if it is still there.
    pub(crate) fn remove(&self, found: &Found) -> bool {
        flow_table::remove(&self.memory, self.shape, found)
    }

    /// Removes the entry of `key`, if there is one.
    pub(crate) fn remove_key(&self, key: &FlowKey) -> bool {
        flow_table::remove_key(&self.memory, self.shape, key)
    }
}

impl Drop for ConntrackTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe {
            let base = self.memory.slot(0).expect("a table has slots");
            libc::munmap(base.cast(), self.bytes);
        }
    }
}

/// The conntrack map's file descriptor.
pub(crate) fn conntrack_fd(ebpf: &Ebpf) -> Result<BorrowedFd<'_>, DataplaneError> {
    let name = map_names::CONNTRACK;
    match ebpf.map(name) {
        Some(Map::Array(data)) => Ok(data.fd().as_fd()),
        _ => Err(DataplaneError::MissingMap(name)),
    }
}

/// The conntrack table's shape, from `CONFIG` (written at load).
pub(crate) fn conntrack_shape(ebpf: &Ebpf) -> Result<TableShape, DataplaneError> {
    let name = map_names::CONFIG;
    let map = ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
    let array: Array<&MapData, DataplaneConfig> =
        Array::try_from(map).map_err(DataplaneError::map(name))?;
    Ok(array
        .get(&0, 0)
        .map_err(DataplaneError::map(name))?
        .flow_shape())
}

pub(crate) fn is_reply(entry: &NatEntry) -> bool {
    entry.flags & flow_flags::REPLY != 0
}

/// Removes, both directions, the UDP flows to each frontend of `live` whose
/// backend is not among its live ones, in one walk of the table; returns
/// how many flows went.
pub(crate) fn clear_udp_flows(
    ebpf: &Ebpf,
    live: &HashMap<ServiceKey, Vec<Endpoint>>,
) -> Result<usize, DataplaneError> {
    let table = ConntrackTable::of(ebpf)?;
    let mut flows = 0;
    for (key, entry, found) in table.entries() {
        if is_reply(&entry) || key.proto != IPPROTO_UDP {
            continue;
        }
        let frontend = ServiceKey {
            addr: key.dst_addr,
            port: key.dst_port,
            proto: key.proto,
            _pad: 0,
        };
        let Some(backends) = live.get(&frontend) else {
            continue;
        };
        let doomed = !backends
            .iter()
            .any(|b| b.addr == entry.dst_addr && b.port == entry.dst_port);
        if doomed && table.remove(&found) {
            table.remove_key(&entry.tuple(key.proto).reversed());
            flows += 1;
        }
    }
    if flows > 0 {
        tracing::debug!(
            frontends = live.len(),
            flows,
            "cleared UDP flows of removed backends"
        );
    }
    Ok(flows)
}

impl Dataplane {
    /// Every translated flow in conntrack (forward entries), sorted. Walks
    /// the whole table: for diagnostics and tests, not for a hot loop.
    pub fn flows(&mut self) -> Result<Vec<Flow>, DataplaneError> {
        let mut flows: Vec<Flow> = ConntrackTable::of(self.ebpf())?
            .entries()
            .into_iter()
            .filter(|(_, entry, _)| !is_reply(entry))
            .filter_map(|(key, entry, _)| {
                Some(Flow {
                    protocol: Protocol::from_ip_proto(key.proto)?,
                    client: sock(key.src_addr, key.src_port),
                    frontend: sock(key.dst_addr, key.dst_port),
                    source_seen: sock(entry.src_addr, entry.src_port),
                    backend: sock(entry.dst_addr, entry.dst_port),
                    client_closing: entry.flags & flow_flags::FIN != 0,
                    closed: entry.flags & flow_flags::CLOSED != 0,
                })
            })
            .collect();
        flows.sort_unstable();
        Ok(flows)
    }

    /// How many conntrack entries each direction holds now.
    pub fn flow_counts(&mut self) -> Result<FlowCounts, DataplaneError> {
        let mut counts = FlowCounts::default();
        for (_, entry, _) in ConntrackTable::of(self.ebpf())?.entries() {
            if is_reply(&entry) {
                counts.reverse += 1;
            } else {
                counts.forward += 1;
            }
        }
        Ok(counts)
    }
}
