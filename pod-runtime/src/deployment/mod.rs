//! The Deployment controller's pure logic (apps/v1), kept free of the store,
//! the runtime and BPF so it is testable as tables:
//!
//! - [`hash`]: the `pod-template-hash` of a pod template;
//! - [`strategy`]: `maxSurge` / `maxUnavailable` arithmetic;
//! - [`controller`]: the step function, observed state in, [`Action`]s out
//!   (ReplicaSet-like revisions, pods to create and delete, status);
//! - [`edit`]: what `scale`, `set image|env`, `rollout pause|resume|undo`
//!   change in a Deployment, and `rollout history|status` read from it.
//!
//! The agent runs [`step`] whenever a Deployment, one of its ReplicaSets or
//! one of their pods changes, and applies the actions through the store.

pub mod controller;
pub mod edit;
pub mod hash;
pub mod strategy;

pub use controller::{Action, Observed, Plan, step};
pub use edit::{EditError, History, Rollback};
pub use hash::pod_template_hash;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

/// The label that ties a ReplicaSet and its pods to one pod template.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// The revision annotation of ReplicaSets and their Deployment.
pub const REVISION: &str = "deployment.kubernetes.io/revision";
/// The annotation `rollout history` shows.
pub const CHANGE_CAUSE: &str = "kubernetes.io/change-cause";
/// The Deployment's replicas when the ReplicaSet was last scaled (kubectl shows it).
pub const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
/// Desired replicas plus maxSurge at that time.
pub const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";

/// A ReplicaSet's revision (0 when it has none or a malformed one).
pub fn revision(meta: &ObjectMeta) -> i64 {
    annotation(meta, REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// An object's `kubernetes.io/change-cause`.
pub fn change_cause(meta: &ObjectMeta) -> Option<&String> {
    annotation(meta, CHANGE_CAUSE)
}

fn annotation<'m>(meta: &'m ObjectMeta, key: &str) -> Option<&'m String> {
    meta.annotations.as_ref()?.get(key)
}

/// The ownerReference naming `owner` as controller, if any.
pub fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
}

/// Whether `meta` is controlled by the object with `uid`.
pub fn is_controlled_by(meta: &ObjectMeta, uid: &str) -> bool {
    controller_of(meta).is_some_and(|r| r.uid == uid)
}

/// A controller ownerReference to `meta` of `kind` (apps/v1).
pub(crate) fn owner_reference(kind: &str, meta: &ObjectMeta) -> OwnerReference {
    OwnerReference {
        api_version: "apps/v1".into(),
        kind: kind.into(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The ReplicaSet's replicas (spec), defaulted like the API server does.
pub(crate) fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.replicas.unwrap_or(1)
}
