//! `vipr-balancer`: how a service chooses a backend.
//!
//! This crate owns the *userspace* half of load balancing:
//!
//! - [`algorithm`]: the names of the balancing algorithms (`vipr.io/lb-algorithm`).
//! - [`config`]: a service's validated balancing configuration, built from its
//!   annotations, its session affinity fields and the node defaults.
//! - [`backend`]: a backend as the balancer sees it (address, [`Weight`], active
//!   connections) and the pod annotation `vipr.io/weight`.
//! - [`flow`]: the 5-tuple of a new flow and the hashes the datapath computes over it.
//! - [`hash`]: the hash functions themselves (Linux `jhash2`, MurmurHash3 x64/128).
//! - [`maglev`]: Maglev lookup tables, built here and copied into a BPF map.
//! - [`select`]: [`select_backend`], the reference implementation of every
//!   algorithm. The eBPF datapath mirrors it; `vipr trace` uses it to explain a
//!   decision and tests use it to check the datapath.
//!
//! Nothing here knows about Kubernetes objects beyond plain annotation maps and
//! field values, and nothing here touches BPF: the agent wires both sides.

pub mod algorithm;
pub mod backend;
pub mod config;
pub mod flow;
pub mod hash;
pub mod maglev;
pub mod select;

pub use algorithm::{Algorithm, ParseAlgorithmError};
pub use backend::{Backend, WEIGHT_ANNOTATION, Weight, WeightError};
pub use config::{
    AFFINITY_TIMEOUT_FIELD, ALGORITHM_ANNOTATION, AffinityTimeout, ConfigError,
    MAGLEV_TABLE_SIZE_ANNOTATION, NodeDefaults, SESSION_AFFINITY_FIELD, ServiceAffinitySpec,
    ServiceBalancing, SessionAffinity,
};
pub use flow::{Flow, Protocol};
pub use maglev::{MaglevSeed, MaglevTable, MaglevTableSize};
pub use select::{
    Candidate, Decision, Reason, SelectError, SelectState, random_candidates, scale, select_backend,
};
