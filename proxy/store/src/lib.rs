//! vipr's embedded API store (the `local` source of truth).
//!
//! - [`manifest`]: strict parsing of Kubernetes YAML/JSON manifests into typed objects.
//! - [`object`]: the supported kinds, object keys, the [`Object`] sum type, status split.
//! - [`validation`]: API-server-like defaulting and validation, immutable fields.
//! - [`alloc`]: ClusterIP and node-port allocation (derived state, rebuilt on open).
//! - [`store`]: the [`Store`]: apply/delete/update_status, get/list/snapshot, all-or-
//!   nothing batches, persisted crash-safely by [`persist`] (redb).
//! - [`feed`]: the change feed ([`Watcher`]) for the reconciler's list-then-watch.
//! - [`endpoints`]: pure EndpointSlice-controller logic and the data-plane backend rule.
//! - [`slice`]: the EndpointSlice as stored (compact endpoints, Kubernetes JSON).
//! - [`names`]: DNS-1123 / DNS-1035 / label / IANA port name rules.

pub mod alloc;
pub mod endpoints;
mod error;
pub mod feed;
pub mod manifest;
pub mod names;
pub mod object;
mod persist;
pub mod slice;
pub mod store;
pub mod validation;

pub use alloc::ServiceNetwork;
pub use error::{Result, StoreError};
pub use feed::{Event, EventType, WatchError, Watcher};
pub use manifest::{ManifestError, parse as parse_manifests};
pub use object::{Kind, Object, ObjectKey, Status, UnknownKind};
pub use store::{Applied, Outcome, SYSTEM_NAMESPACES, Snapshot, Store, StoreConfig};
pub use validation::FieldError;

/// The namespace of namespaced objects that do not name one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The name of the database file inside the state dir.
pub const DATABASE_FILE: &str = persist::FILE_NAME;

/// Re-exported so callers build objects with the same k8s-openapi version.
pub use k8s_openapi;
