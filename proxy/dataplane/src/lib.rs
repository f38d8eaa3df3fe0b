//! vipr's data plane control library.
//!
//! Owns the eBPF object (built from `ebpf/programs` and embedded at compile
//! time): loading it, pinning its maps (and optionally its links),
//! attaching the XDP program to interfaces, programming service frontends
//! with their backends and options, pruning conntrack, and reading the
//! counters back. Modules: `loader` (load, pin, attach, test_run), `links`
//! (attachments, pinned links that survive a restart), `cgroup` (socket-level
//! translation for the node's own clients: cgroup sock_addr attachments),
//! `redirect` (the interfaces the XDP forwarding fast path may send to),
//! `services` (frontends, backends, source ranges), `balance` (what new-flow
//! balancing reads: weight ranges, Maglev tables, members, connection
//! counts), `flows` (conntrack reads and UDP pruning), `expiry` (idle flows
//! out of conntrack), `stats` (counters), `service_stats` (counters per
//! frontend and backend, drops per service), `monitor` (the event ring of
//! `vipr monitor`), `inspect` (the maps decoded and raw, for `vipr lb list`
//! and `vipr trace`), `types` (the API vocabulary). Like Katran's control library it knows nothing of
//! Kubernetes: callers speak in frontends and backend addresses.
//!
//! # What the node must provide
//! - [`NODE_SYSCTLS`] in the node's network namespace: forwarding, and
//!   `accept_local`, because SNATed flows (externalTrafficPolicy Cluster)
//!   carry the node's own address as source into the kernel's routing.
//! - The pass program ([`Dataplane::attach_pass`]) on the pod side of every
//!   pod veth whose node side runs the translation natively: refusals of
//!   frontends without endpoints go back with XDP_TX, and a native-mode
//!   veth drops XDP_TX frames unless its peer runs XDP too (measured on
//!   6.18; enabling GRO on the peer did not help).
//! - For the XDP forwarding fast path ([`DataplaneOptions::xdp_redirect`],
//!   on by default): egress interfaces listed with
//!   [`Dataplane::allow_redirect`] must take XDP frames; for a veth, its
//!   peer must run an XDP program (the pass program does), or redirected
//!   frames are dropped. Unlisted interfaces get the kernel's forwarding.
//!   Local stacks sending into the node over veths (pods' `eth0`, a veth
//!   uplink's peer) must checksum in software
//!   ([`disable_tx_checksum_offload`]): a redirected frame with a
//!   checksum left to offload arrives corrupt.
//! - For the node's own clients (XDP never sees what the node sends): a
//!   cgroup v2 folder holding the node's processes, given to
//!   [`Dataplane::attach_cgroup`]; sockets there are balanced at connect /
//!   sendmsg time from the same service maps.
//! - A hairpin address ([`DataplaneOptions::hairpin_addr`]) that routes to
//!   the node from every pod (a link-local address no one owns works).

mod balance;
mod cgroup;
mod error;
mod expiry;
mod flows;
mod inspect;
mod links;
mod loader;
mod maps;
mod monitor;
mod redirect;
mod service_stats;
mod services;
mod stats;
mod types;

pub use error::DataplaneError;
pub use expiry::{Expiry, FlowExpirer, FlowTimeouts};
pub use flows::{Flow, FlowCounts};
pub use inspect::{MapDump, MapEntry, RawEntry};
pub use inspect::{bytes_of, idle_now, monotonic_ns};
pub use loader::{
    DEFAULT_SNAT_PORTS, Dataplane, DataplaneOptions, XdpMode, load_retrying_interrupted,
    pass_link_pin,
};
pub use monitor::MonitorEvents;
pub use redirect::disable_tx_checksum_offload;
pub use service_stats::{BackendStats, FrontendStats};
pub use stats::Counters;
pub use types::{
    BackendAddr, ExternalTrafficPolicy, Frontend, FrontendOptions, InvalidPort, Port, Protocol,
};
pub use vipr_common::{
    self, Counter, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_FLOWS, DEFAULT_MAX_SERVICES, FlowStats,
    MonitorEvent, monitor_flags,
};

/// Sysctls (key, value) the node's network namespace needs for every path
/// of the data plane to work; the agent sets them where it attaches.
pub const NODE_SYSCTLS: [(&str, &str); 2] = [
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv4.conf.all.accept_local", "1"),
];

/// The eBPF object this crate was built with.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vipr-ebpf.o"));

/// `vipr bench`'s packet tools (a flood generator and a counting sink, see
/// `ebpf/programs/bench`), built with the data plane's programs but no part
/// of the data plane; empty when the build was given a prebuilt data plane
/// object without them.
pub static BENCH_EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vipr-bench-ebpf.o"));
