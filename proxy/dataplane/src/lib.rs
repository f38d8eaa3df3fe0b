//! vipr's data plane control library.
//!
//! Owns the eBPF object (built from `ebpf/programs` and embedded at compile
//! time): loading it, pinning its maps, attaching the XDP program to
//! interfaces, programming service frontends and their backends, and reading
//! the counters back. Like Katran's control library it knows nothing of
//! Kubernetes: callers speak in frontends and backend addresses.

mod error;
mod loader;
mod services;
mod stats;
mod types;

pub use error::DataplaneError;
pub use loader::{Dataplane, DataplaneOptions, XdpMode};
pub use stats::Counters;
pub use types::{BackendAddr, Frontend, InvalidPort, Port, Protocol};
pub use vipr_common::Counter;

/// The eBPF object this crate was built with.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vipr-ebpf.o"));
