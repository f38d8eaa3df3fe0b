//! The crate's error type.

use std::io;

/// Errors of the pod runtime. Validation errors name the offending field in
/// Kubernetes' path notation (`spec.containers[1].name`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid pod: {field}: {message}")]
    Invalid { field: String, message: String },
    #[error("pod {0} not found")]
    NotFound(String),
    #[error("pod {0} already exists")]
    AlreadyExists(String),
    #[error("IPAM: {0}")]
    Ipam(String),
    #[error("network setup: {0}")]
    Network(String),
    #[error("shim: {0}")]
    Shim(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("state file {path}: {message}")]
    State { path: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Attach a human context to io errors: `fs::read(p).ctx(|| format!("read {p:?}"))`.
pub trait IoContext<T> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: f(),
            source,
        })
    }
}
