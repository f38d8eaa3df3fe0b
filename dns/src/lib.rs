//! `vipr-dns`: the cluster DNS server.
//!
//! The agent converts its objects into a [`ClusterSnapshot`], starts the server with
//! [`DnsServer::start`] and pushes every change with [`DnsHandle::update`]. Names in the
//! cluster zone are answered from an immutable [`ZoneIndex`] (Kubernetes DNS-Based
//! Service Discovery spec 1.1.0, CoreDNS's kubernetes plugin as the reference); other
//! names are forwarded to upstream resolvers, with a small cache, for allowed clients.
//!
//! ```no_run
//! use vipr_dns::{ClusterSnapshot, DnsConfig, DnsServer, Service, ServiceKind};
//! # async fn agent() -> Result<(), vipr_dns::DnsError> {
//! let config = DnsConfig {
//!     listen: "10.96.0.10:53".parse().unwrap(),
//!     allowed_clients: vec!["10.244.0.0/16".parse().unwrap(), "192.168.1.0/24".parse().unwrap()],
//!     ..DnsConfig::default()
//! };
//! let dns = DnsServer::start(config, &ClusterSnapshot::default()).await?;
//! let mut snapshot = ClusterSnapshot::default();
//! snapshot.services.push(Service {
//!     name: "web".into(),
//!     namespace: "default".into(),
//!     kind: ServiceKind::ClusterIp { ips: vec!["10.96.0.20".parse().unwrap()] },
//!     ports: vec![],
//!     endpoints: vec![],
//!     publish_not_ready_addresses: false,
//! });
//! dns.update(&snapshot)?; // visible to the next query
//! let metrics = dns.stats(); // export as counters
//! # let _ = metrics;
//! dns.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Modules: [`snapshot`] (input types), [`config`] (configuration), [`index`] (records),
//! `wire` (message parsing, encoding, truncation), `forward` (upstreams and cache),
//! `server` (sockets, tasks, handle), `batch` (recvmmsg/sendmmsg), `stats` (counters).

mod batch;
pub mod config;
pub mod error;
mod forward;
pub mod index;
mod server;
pub mod snapshot;
mod stats;
mod wire;

pub use config::{DnsConfig, Upstreams};
pub use error::DnsError;
pub use index::{IndexSummary, ZoneAnswer, ZoneIndex};
pub use server::{DnsHandle, DnsServer};
pub use snapshot::{ClusterSnapshot, Endpoint, Pod, Protocol, Service, ServiceKind, ServicePort};
pub use stats::DnsStats;
