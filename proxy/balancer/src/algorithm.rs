//! The balancing algorithm names a service can ask for with the
//! `vipr.io/lb-algorithm` annotation (or the node gets from `--lb-algorithm`).
//!
//! The names are part of the user-facing contract: `FromStr` and `Display`
//! round-trip exactly these strings.

use std::fmt;
use std::str::FromStr;

/// How a new flow picks its backend.
///
/// Backends whose weight is 0 never receive a new flow, whatever the algorithm
/// (IPVS's "quiesced" server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    /// Uniform random among backends, each weighted by its weight (`random`).
    #[default]
    Random,
    /// Round robin over backends with a non-zero weight, ignoring weights (`rr`).
    RoundRobin,
    /// IPVS weighted round robin (`wrr`).
    WeightedRoundRobin,
    /// IPVS least connection: fewest active connections (`lc`).
    LeastConnection,
    /// Hash of the client (source) IP, weighted (`sh`).
    SourceHash,
    /// Hash of the destination IP, weighted (`dh`).
    DestinationHash,
    /// IPVS shortest expected delay: minimal `(active + 1) / weight` (`sed`).
    ShortestExpectedDelay,
    /// IPVS never queue: an idle backend if there is one, else `sed` (`nq`).
    NeverQueue,
    /// Maglev consistent hashing over the flow's 5-tuple (`maglev`).
    Maglev,
}

impl Algorithm {
    /// Every algorithm, in the order the docs and error messages list them.
    pub const ALL: [Algorithm; 9] = [
        Algorithm::Random,
        Algorithm::RoundRobin,
        Algorithm::WeightedRoundRobin,
        Algorithm::LeastConnection,
        Algorithm::SourceHash,
        Algorithm::DestinationHash,
        Algorithm::ShortestExpectedDelay,
        Algorithm::NeverQueue,
        Algorithm::Maglev,
    ];

    /// The name used in annotations, flags and output.
    pub const fn name(self) -> &'static str {
        match self {
            Algorithm::Random => "random",
            Algorithm::RoundRobin => "rr",
            Algorithm::WeightedRoundRobin => "wrr",
            Algorithm::LeastConnection => "lc",
            Algorithm::SourceHash => "sh",
            Algorithm::DestinationHash => "dh",
            Algorithm::ShortestExpectedDelay => "sed",
            Algorithm::NeverQueue => "nq",
            Algorithm::Maglev => "maglev",
        }
    }

    /// Whether the choice depends on per-backend active connection counts,
    /// which the datapath then has to maintain.
    pub const fn uses_active_connections(self) -> bool {
        matches!(
            self,
            Algorithm::LeastConnection | Algorithm::ShortestExpectedDelay | Algorithm::NeverQueue
        )
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An algorithm name that is not one of [`Algorithm::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown load-balancing algorithm {name:?} (annotation vipr.io/lb-algorithm, flag --lb-algorithm); \
     valid: random, rr, wrr, lc, sh, dh, sed, nq, maglev"
)]
pub struct ParseAlgorithmError {
    /// The rejected name, as given.
    pub name: String,
}

impl FromStr for Algorithm {
    type Err = ParseAlgorithmError;

    /// Exact, case-sensitive names: annotations are data, and accepting `RR`
    /// here would make `Display` fail to round-trip what the user wrote.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| ParseAlgorithmError { name: s.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in Algorithm::ALL {
            assert_eq!(a.to_string().parse::<Algorithm>(), Ok(a));
        }
    }

    #[test]
    fn error_lists_every_valid_name() {
        let msg = "weighted".parse::<Algorithm>().unwrap_err().to_string();
        assert!(msg.contains("vipr.io/lb-algorithm"), "{msg}");
        for a in Algorithm::ALL {
            assert!(msg.contains(a.name()), "{msg} lacks {a}");
        }
    }

    #[test]
    fn default_is_random() {
        assert_eq!(Algorithm::default(), Algorithm::Random);
    }
}
