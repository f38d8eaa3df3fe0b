//! Errors of the data plane control library, each naming what failed.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no program {0:?}")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0:?}")]
    MissingMap(&'static str),
    #[error("eBPF program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching XDP to interface {interface}")]
    Attach {
        interface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pinned XDP link of interface {interface}: {source}")]
    Link {
        interface: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("interface {0} has no XDP program of ours attached")]
    NotAttached(String),
    #[error("socket-level translation on cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cgroup {0} has no socket-level translation of ours attached")]
    CgroupNotAttached(PathBuf),
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("mapping the conntrack table into memory ({slots} slots, {bytes} bytes)")]
    MapConntrack {
        slots: u32,
        bytes: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("installing new-flow program {name} at index {index} of NEW_FLOW_PROGRAMS")]
    NewFlowProgram {
        name: &'static str,
        index: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("creating the pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {0} does not exist")]
    NoSuchInterface(String),
    #[error("listing interface {interface} for the XDP fast path")]
    RedirectTarget {
        interface: String,
        #[source]
        source: aya::maps::xdp::XdpMapError,
    },
    #[error("turning off transmit checksum offload on {interface}")]
    ChecksumOffload {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("service map is full ({capacity} frontends): cannot add {frontend}")]
    ServicesFull { frontend: String, capacity: u32 },
    #[error("frontend {frontend} has {count} backends; the backend map allows {capacity} in all")]
    BackendsFull {
        frontend: String,
        count: usize,
        capacity: u32,
    },
    #[error(
        "frontend {frontend}: the backends' vipr.io/weight values add up to {total}, \
         more than the data plane's 32-bit total"
    )]
    WeightsTooLarge { frontend: String, total: u64 },
    #[error(
        "frontend {frontend} needs a Maglev table of {size} entries; the Maglev map holds \
         {capacity} for all services (a smaller vipr.io/maglev-table-size fits more)"
    )]
    MaglevFull {
        frontend: String,
        size: usize,
        capacity: u32,
    },
}

impl DataplaneError {
    pub(crate) fn map(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Self {
        move |source| DataplaneError::Map { map, source }
    }
}
