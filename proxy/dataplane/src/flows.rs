//! Reading and pruning conntrack (the CONNTRACK map, one entry per
//! direction of each flow) from userspace.
//!
//! The eBPF side removes TCP flows when they close; what it cannot know is
//! that a backend went away. A UDP flow has no close, so a flow pinned to a
//! removed backend would black-hole the client until it expired; those are
//! cleared here whenever a UDP frontend loses a backend. (Idle flows expire
//! in `expiry`.)

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, BorrowedFd},
};

use aya::{Ebpf, maps::Map};
use vipr_common::{FlowKey, IPPROTO_UDP, NatEntry, flow_flags, map_names};

use crate::{BackendAddr, Dataplane, DataplaneError, Frontend, Protocol, batch};

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

/// The conntrack map's file descriptor, for batch access.
pub(crate) fn conntrack_fd(ebpf: &Ebpf) -> Result<BorrowedFd<'_>, DataplaneError> {
    let name = map_names::CONNTRACK;
    match ebpf.map(name) {
        Some(Map::HashMap(data)) => Ok(data.fd().as_fd()),
        _ => Err(DataplaneError::MissingMap(name)),
    }
}

/// Every conntrack entry, both directions, in batches (see `batch`).
pub(crate) fn read_conntrack(
    fd: BorrowedFd<'_>,
) -> Result<Vec<(FlowKey, NatEntry)>, DataplaneError> {
    batch::lookup_all(fd).map_err(|source| DataplaneError::MapBatch {
        map: map_names::CONNTRACK,
        source,
    })
}

/// Deletes conntrack entries by key (gone ones skipped); returns how many went.
pub(crate) fn delete_from_conntrack(
    fd: BorrowedFd<'_>,
    keys: &[FlowKey],
) -> Result<usize, DataplaneError> {
    batch::delete(fd, keys).map_err(|source| DataplaneError::MapBatch {
        map: map_names::CONNTRACK,
        source,
    })
}

pub(crate) fn is_reply(entry: &NatEntry) -> bool {
    entry.flags & flow_flags::REPLY != 0
}

/// The forward (client to frontend) entries: one per flow.
fn forward_entries(ebpf: &Ebpf) -> Result<Vec<(FlowKey, NatEntry)>, DataplaneError> {
    let mut entries = read_conntrack(conntrack_fd(ebpf)?)?;
    entries.retain(|(_, entry)| !is_reply(entry));
    Ok(entries)
}

/// Removes the UDP flows to `frontend` whose backend is not in `live`, both
/// directions; returns how many flows went.
pub(crate) fn clear_udp_flows(
    ebpf: &Ebpf,
    frontend: &Frontend,
    live: &[BackendAddr],
) -> Result<usize, DataplaneError> {
    let fe = frontend.key();
    let live: Vec<_> = live.iter().map(|b| b.endpoint()).collect();
    let doomed: Vec<FlowKey> = forward_entries(ebpf)?
        .into_iter()
        .filter(|(key, entry)| {
            key.proto == IPPROTO_UDP
                && key.dst_addr == fe.addr
                && key.dst_port == fe.port
                && !live
                    .iter()
                    .any(|b| b.addr == entry.dst_addr && b.port == entry.dst_port)
        })
        .flat_map(|(key, entry)| [key, entry.tuple(key.proto).reversed()])
        .collect();
    delete_from_conntrack(conntrack_fd(ebpf)?, &doomed)?;
    let flows = doomed.len() / 2;
    if flows > 0 {
        tracing::debug!(frontend = %frontend, flows, "cleared UDP flows of removed backends");
    }
    Ok(flows)
}

impl Dataplane {
    /// Every translated flow in conntrack (forward entries), sorted. Walks
    /// the whole map: for diagnostics and tests, not for a hot loop.
    pub fn flows(&mut self) -> Result<Vec<Flow>, DataplaneError> {
        let mut flows: Vec<Flow> = forward_entries(self.ebpf())?
            .into_iter()
            .filter_map(|(key, entry)| {
                Some(Flow {
                    protocol: Protocol::from_ip_proto(key.proto)?,
                    client: sock(key.src_addr, key.src_port),
                    frontend: sock(key.dst_addr, key.dst_port),
                    source_seen: sock(entry.src_addr, entry.src_port),
                    backend: sock(entry.dst_addr, entry.dst_port),
                    client_closing: entry.flags & flow_flags::FIN != 0,
                })
            })
            .collect();
        flows.sort_unstable();
        Ok(flows)
    }

    /// How many conntrack entries each direction holds now.
    pub fn flow_counts(&mut self) -> Result<FlowCounts, DataplaneError> {
        let mut counts = FlowCounts::default();
        for (_, entry) in read_conntrack(conntrack_fd(self.ebpf())?)? {
            if is_reply(&entry) {
                counts.reverse += 1;
            } else {
                counts.forward += 1;
            }
        }
        Ok(counts)
    }
}
