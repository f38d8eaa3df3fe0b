//! The store's error type. Every variant renders as one line that names the object
//! (`service/default/web: ...`) or the storage step that failed.

use std::path::PathBuf;

use crate::manifest::ManifestError;
use crate::object::{Kind, ObjectKey};
use crate::validation::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The object failed validation (syntax, ranges, allocation clashes, immutable
    /// fields); `error.field` is the path of the offending field.
    #[error("{key}: {error}")]
    Invalid { key: ObjectKey, error: FieldError },
    #[error("{key}: namespace {namespace:?} not found")]
    NamespaceNotFound { key: ObjectKey, namespace: String },
    #[error("{key}: not found")]
    NotFound { key: ObjectKey },
    /// Optimistic concurrency: the caller's copy is stale.
    #[error(
        "{key}: the object has been modified (given {field} {given:?}, stored {stored:?}); read it again and retry"
    )]
    Conflict {
        key: ObjectKey,
        field: &'static str,
        given: String,
        stored: String,
    },
    #[error("{key}: {reason}")]
    Forbidden { key: ObjectKey, reason: String },
    #[error("{key}: a {status} status cannot be written to a {kind}")]
    StatusKindMismatch {
        key: ObjectKey,
        status: Kind,
        kind: Kind,
    },
    #[error("state dir {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("storage: {context}: {source}")]
    Storage {
        context: &'static str,
        source: Box<redb::Error>,
    },
    #[error("stored record {key:?} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

/// Adapts any redb error type into [`StoreError::Storage`] with what we were doing.
pub(crate) fn storage<E: Into<redb::Error>>(context: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Storage {
        context,
        source: Box::new(e.into()),
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
