//! The agent's API: requests the CLI sends over the unix socket and the
//! answers it gets. One JSON request line per connection, one JSON answer line.
//!
//! The socket is created mode 0600 (root only): it can change everything
//! the agent runs.

mod client;
mod server;

use serde::{Deserialize, Serialize};

pub use client::{call, stream};
pub use server::{Handler, serve};

/// Default socket path; `--api-socket` or `VIPR_SOCKET` override it.
pub const DEFAULT_SOCKET: &str = "/run/vipr/vipr.sock";

/// The largest request accepted (a manifest directory's worth of YAML).
pub const MAX_REQUEST_BYTES: usize = 64 << 20;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Create or update every object in the manifests, all or nothing.
    Apply { manifests: String },
    /// Delete the objects the manifests name.
    DeleteManifests { manifests: String },
    /// Delete one object.
    Delete {
        kind: String,
        namespace: Option<String>,
        name: String,
    },
    /// List objects of a kind (one when `name` is set), as Kubernetes JSON.
    Get {
        kind: String,
        namespace: Option<String>,
        all_namespaces: bool,
        name: Option<String>,
    },
    /// A pod's container log.
    Logs {
        namespace: Option<String>,
        pod: String,
        container: Option<String>,
    },
    /// Runs a command in a pod's container.
    Exec {
        namespace: Option<String>,
        pod: String,
        container: Option<String>,
        command: Vec<String>,
    },
    /// An object with its events, for `describe`.
    Describe {
        kind: String,
        namespace: Option<String>,
        name: String,
    },
    /// Changes a Deployment the way kubectl's `scale`, `set` and `rollout`
    /// commands do.
    EditDeployment {
        namespace: Option<String>,
        name: String,
        edit: DeploymentEdit,
    },
    /// Every service frontend with its backends, their state and counters.
    ServiceList,
    /// The data plane's maps decoded (and raw, when asked), with the
    /// differences from what the agent meant to program.
    LbList { raw: bool },
    /// What the data plane does with one packet, step by step.
    Trace {
        src: String,
        dst: String,
        protocol: Option<String>,
    },
    /// A stream of data plane events (one `Data` answer per line) until the
    /// client goes away.
    Monitor(MonitorFilter),
}

/// Which events a monitor wants.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MonitorFilter {
    /// Only events of this service (`NAME` or `NAMESPACE/NAME`).
    pub service: Option<String>,
    /// Namespace of `service` and `pod` when they name none (default: default).
    pub namespace: Option<String>,
    /// Only events to or from this pod.
    pub pod: Option<String>,
    /// Event types: `translate`, `drop`, `reply`; empty: translate and drop.
    pub types: Vec<String>,
}

/// One kubectl-like change to a Deployment.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "edit", rename_all = "kebab-case")]
pub enum DeploymentEdit {
    /// `spec.replicas` (no new revision).
    Scale {
        replicas: i64,
    },
    /// `CONTAINER=IMAGE` pairs (`*` for all containers).
    SetImage {
        images: Vec<(String, String)>,
    },
    /// `KEY=VALUE` / `KEY-` for every container, or `container`'s.
    SetEnv {
        container: Option<String>,
        env: Vec<String>,
    },
    Pause,
    Resume,
    /// Back to `to_revision`, or the previous revision with 0.
    Undo {
        to_revision: i64,
    },
}

/// Externally tagged (`{"data": {...}}`) on purpose: an internally tagged
/// enum makes serde buffer the whole answer before decoding it, which
/// doubled the CLI's time for a thousand pods.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    /// Success; `lines` are human-readable outcome lines (`service/web created`).
    Done { lines: Vec<String> },
    /// Success with data (objects, tables).
    Data { value: serde_json::Value },
    /// A command's outcome inside a container.
    Exec {
        code: Option<i32>,
        stdout: String,
        stderr: String,
    },
    /// Failure: one line naming the object and the problem.
    Error { message: String },
}
