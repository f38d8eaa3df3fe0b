//! vipr's pod runtime: real pods on one node, without a container engine.
//!
//! - [`runtime`]: the [`Runtime`] API (create/delete/status/events/logs/exec,
//!   change notifications, adoption after an agent restart) and the per-pod supervisor.
//! - [`shim`]: the per-pod holder process (netns + UTS owner, parent of containers),
//!   reached through the hidden entry point [`shim::main`].
//! - [`net`]: routed veth networking (no bridge), behind the [`net::NetOps`] trait.
//! - [`ipam`]: pod IPs from the node CIDR, persisted.
//! - [`spec`]: env / Downward API / volumes / images / per-pod /etc files.
//! - [`probe`], [`backoff`], [`phase`]: pure state machines and tables.
//! - [`cgroup`]: limits and OOM detection under `cgroup_root` (v2, or v1 on hybrid).
//! - [`exec`]: running a command in a container's namespaces.
//! - [`validate`]: input validation naming the bad field.
//! - [`events`]: per-pod event log for `vipr describe`.
//! - [`deployment`]: the Deployment controller's pure logic (revisions, rollouts, status).
//!
//! # Wiring it into the agent
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn agent() -> vipr_pod_runtime::Result<()> {
//! // 1. First thing in `main`, before any runtime/threads: the hidden shim entry.
//! let args: Vec<String> = std::env::args().collect();
//! if args.get(1).map(String::as_str) == Some(vipr_pod_runtime::shim::SHIM_ARG) {
//!     std::process::exit(vipr_pod_runtime::shim::main(&args[2..]));
//! }
//! // 2. The runtime (its default `shim_command` is `/proc/self/exe __pod-shim`).
//! let mut cfg = vipr_pod_runtime::RuntimeConfig::new("/var/lib/vipr", "10.244.0.0/24".parse().unwrap());
//! cfg.cluster_dns = vec!["10.96.0.10".parse().unwrap()];
//! cfg.cgroup_root = Some("/sys/fs/cgroup/unified/vipr".into());
//! cfg.extra_path = vec![std::env::current_exe().unwrap().parent().unwrap().into()];
//! let rt = vipr_pod_runtime::Runtime::new(cfg, Arc::new(vipr_pod_runtime::NoObjects))?;
//! let mut changes = rt.subscribe(); // PodChange { key, ip, ready, .. } -> endpoints
//! # Ok(()) }
//! ```
//!
//! The node needs `net.ipv4.ip_forward=1` in its netns for pod-to-pod traffic; the
//! runtime sets forwarding and proxy ARP only on the pod veths it creates.

pub mod backoff;
pub mod cgroup;
pub mod deployment;
pub mod error;
pub mod events;
pub mod exec;
pub mod ipam;
pub mod net;
pub mod phase;
pub mod probe;
pub mod runtime;
pub mod shim;
pub mod spec;
mod util;
pub mod validate;

pub use error::{Error, Result};
pub use events::PodEvent;
pub use runtime::{PodChange, PodInfo, PodKey, Runtime, RuntimeConfig};
pub use spec::{NoObjects, ObjectLookup};
