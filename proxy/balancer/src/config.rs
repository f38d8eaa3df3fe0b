//! A service's balancing configuration, validated once when the service is
//! read, so the rest of the agent only ever sees values it can program.
//!
//! Inputs: the service's annotations (`vipr.io/lb-algorithm`,
//! `vipr.io/maglev-table-size`), its `spec.sessionAffinity` and
//! `spec.sessionAffinityConfig.clientIP.timeoutSeconds`, and the node
//! defaults from the agent's flags (`--lb-algorithm`, `--maglev-seed`).
//! Every error names the annotation or field the user has to fix.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::algorithm::{Algorithm, ParseAlgorithmError};
use crate::maglev::{MaglevSeed, MaglevTableSize, MaglevTableSizeError};

/// Service annotation choosing the algorithm.
pub const ALGORITHM_ANNOTATION: &str = "vipr.io/lb-algorithm";
/// Service annotation choosing the Maglev table size.
pub const MAGLEV_TABLE_SIZE_ANNOTATION: &str = "vipr.io/maglev-table-size";
/// The Service field that turns session affinity on.
pub const SESSION_AFFINITY_FIELD: &str = "spec.sessionAffinity";
/// The Service field holding the ClientIP affinity timeout.
pub const AFFINITY_TIMEOUT_FIELD: &str = "spec.sessionAffinityConfig.clientIP.timeoutSeconds";

/// What the node uses for services that do not say otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeDefaults {
    /// `--lb-algorithm`.
    pub algorithm: Algorithm,
    /// `--maglev-seed`; the same on every node of a cluster.
    pub maglev_seed: MaglevSeed,
}

/// How long a client keeps its backend after its last new flow: 1..=86400 s,
/// as Kubernetes validates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffinityTimeout(u32);

impl AffinityTimeout {
    /// Kubernetes' default: 3 hours.
    pub const DEFAULT: AffinityTimeout = AffinityTimeout(10_800);
    /// Kubernetes' maximum: one day.
    pub const MAX_SECONDS: u32 = 86_400;

    /// The timeout if `seconds` is in 1..=86400.
    pub fn from_seconds(seconds: i64) -> Option<Self> {
        (1..=i64::from(Self::MAX_SECONDS))
            .contains(&seconds)
            .then_some(AffinityTimeout(seconds as u32))
    }

    pub const fn seconds(self) -> u32 {
        self.0
    }

    pub const fn as_duration(self) -> Duration {
        Duration::from_secs(self.0 as u64)
    }
}

impl Default for AffinityTimeout {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Whether a client's new flows stick to one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionAffinity {
    /// Every new flow is balanced afresh (`sessionAffinity: None`).
    #[default]
    None,
    /// New flows from a client IP go to the backend its previous flow got, as
    /// long as the previous one is less than `timeout` old
    /// (`sessionAffinity: ClientIP`).
    ClientIp { timeout: AffinityTimeout },
}

/// The session affinity fields of a Service spec, as found in the manifest.
///
/// Plain values rather than k8s-openapi types so the balancer does not
/// depend on the API types' crate; the agent copies the two fields over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServiceAffinitySpec<'a> {
    /// `spec.sessionAffinity`: `None` (default) or `ClientIP`.
    pub session_affinity: Option<&'a str>,
    /// `spec.sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub timeout_seconds: Option<i64>,
}

/// A service's validated balancing configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServiceBalancing {
    pub algorithm: Algorithm,
    /// Used when `algorithm` is Maglev; validated whatever the algorithm so a
    /// bad annotation is reported when written, not when the algorithm changes.
    pub maglev_table_size: MaglevTableSize,
    pub maglev_seed: MaglevSeed,
    pub affinity: SessionAffinity,
}

/// A service whose balancing settings cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Algorithm(#[from] ParseAlgorithmError),
    #[error(transparent)]
    MaglevTableSize(#[from] MaglevTableSizeError),
    #[error("invalid spec.sessionAffinity {value:?}: expected None or ClientIP")]
    SessionAffinity { value: String },
    #[error(
        "invalid spec.sessionAffinityConfig.clientIP.timeoutSeconds {value}: \
         must be between 1 and 86400"
    )]
    AffinityTimeout { value: i64 },
}

impl ServiceBalancing {
    /// Validates a service's annotations and affinity fields against the
    /// node defaults. The first invalid setting is reported.
    pub fn from_service(
        annotations: &BTreeMap<String, String>,
        affinity: ServiceAffinitySpec<'_>,
        node: &NodeDefaults,
    ) -> Result<Self, ConfigError> {
        let algorithm = match annotations.get(ALGORITHM_ANNOTATION) {
            Some(name) => name.parse()?,
            None => node.algorithm,
        };
        let maglev_table_size = match annotations.get(MAGLEV_TABLE_SIZE_ANNOTATION) {
            Some(size) => size.parse()?,
            None => MaglevTableSize::DEFAULT,
        };
        Ok(ServiceBalancing {
            algorithm,
            maglev_table_size,
            maglev_seed: node.maglev_seed,
            affinity: parse_affinity(affinity)?,
        })
    }
}

fn parse_affinity(spec: ServiceAffinitySpec<'_>) -> Result<SessionAffinity, ConfigError> {
    match spec.session_affinity.unwrap_or("None") {
        // Like kube-proxy, a timeout given alongside `None` is ignored.
        "None" | "" => Ok(SessionAffinity::None),
        "ClientIP" => {
            let timeout = match spec.timeout_seconds {
                None => AffinityTimeout::DEFAULT,
                Some(s) => AffinityTimeout::from_seconds(s)
                    .ok_or(ConfigError::AffinityTimeout { value: s })?,
            };
            Ok(SessionAffinity::ClientIp { timeout })
        }
        other => Err(ConfigError::SessionAffinity {
            value: other.to_owned(),
        }),
    }
}

impl fmt::Display for ServiceBalancing {
    /// One line for `vipr lb list`: `maglev(16381)` / `rr, ClientIP 10800s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.algorithm)?;
        if self.algorithm == Algorithm::Maglev {
            write!(f, "({})", self.maglev_table_size)?;
        }
        if let SessionAffinity::ClientIp { timeout } = self.affinity {
            write!(f, ", ClientIP {}s", timeout.seconds())?;
        }
        Ok(())
    }
}
