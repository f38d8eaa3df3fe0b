//! A backend as the balancer sees it, and its weight.
//!
//! The weight comes from the pod annotation `vipr.io/weight`. Like IPVS, a
//! weight of 0 *drains* a backend: it gets no new flows, but flows it already
//! has (conntrack entries) keep going to it until they end. That makes 0 the
//! way to take a pod out of rotation gracefully without deleting it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// The pod annotation that sets a backend's weight.
pub const WEIGHT_ANNOTATION: &str = "vipr.io/weight";

/// A backend's relative share of new flows, 0..=65535.
///
/// 16 bits because the datapath stores it per backend in a BPF map and
/// because Cilium uses the same range; sums over thousands of backends still
/// fit easily in the `u64` arithmetic the algorithms use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Weight(u16);

impl Weight {
    /// The weight of a backend whose pod has no `vipr.io/weight` annotation.
    pub const DEFAULT: Weight = Weight(1);
    /// No new flows; existing flows continue.
    pub const DRAIN: Weight = Weight(0);

    pub const fn new(weight: u16) -> Self {
        Weight(weight)
    }

    pub const fn get(self) -> u16 {
        self.0
    }

    /// Whether a new flow may be sent to a backend with this weight.
    pub const fn accepts_new_flows(self) -> bool {
        self.0 > 0
    }

    /// The weight from a pod's annotations: [`Weight::DEFAULT`] when absent.
    pub fn from_pod_annotations(
        annotations: &BTreeMap<String, String>,
    ) -> Result<Self, WeightError> {
        annotations
            .get(WEIGHT_ANNOTATION)
            .map_or(Ok(Weight::DEFAULT), |v| v.parse())
    }
}

impl Default for Weight {
    fn default() -> Self {
        Weight::DEFAULT
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A `vipr.io/weight` value that is not an integer in 0..=65535.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid pod annotation vipr.io/weight={value:?}: expected an integer 0..=65535 \
     (0 drains the backend: no new flows)"
)]
pub struct WeightError {
    pub value: String,
}

impl FromStr for Weight {
    type Err = WeightError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Surrounding blanks are a common YAML slip and harmless; anything
        // else (signs, decimals, units) is rejected rather than guessed at.
        s.trim()
            .parse::<u16>()
            .map(Weight)
            .map_err(|_| WeightError {
                value: s.to_owned(),
            })
    }
}

/// One backend of a service: where it is, its weight and its load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Backend {
    /// The backend's address and port. It is also the backend's stable
    /// identity for Maglev: the same pod at the same address hashes the same
    /// on every node.
    pub addr: SocketAddr,
    pub weight: Weight,
    /// Active connections (the datapath's counter), used by `lc`, `sed`, `nq`.
    pub active: u32,
}

impl Backend {
    /// A backend with the default weight and no connections.
    pub const fn new(addr: SocketAddr) -> Self {
        Backend {
            addr,
            weight: Weight::DEFAULT,
            active: 0,
        }
    }

    pub const fn with_weight(mut self, weight: Weight) -> Self {
        self.weight = weight;
        self
    }

    pub const fn with_active(mut self, active: u32) -> Self {
        self.active = active;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn weight_defaults_to_one() {
        assert_eq!(
            Weight::from_pod_annotations(&annotations(&[])),
            Ok(Weight::DEFAULT)
        );
        assert_eq!(Weight::DEFAULT.get(), 1);
    }

    #[test]
    fn weight_parses_and_zero_drains() {
        let w = Weight::from_pod_annotations(&annotations(&[(WEIGHT_ANNOTATION, "0")])).unwrap();
        assert_eq!(w, Weight::DRAIN);
        assert!(!w.accepts_new_flows());
        assert_eq!(" 7 ".parse::<Weight>(), Ok(Weight::new(7)));
        assert_eq!("65535".parse::<Weight>(), Ok(Weight::new(u16::MAX)));
    }

    #[test]
    fn weight_rejects_garbage_naming_the_annotation() {
        for bad in ["-1", "65536", "1.5", "", "ten", "+"] {
            let err = bad.parse::<Weight>().unwrap_err();
            assert!(err.to_string().contains("vipr.io/weight"), "{err}");
        }
    }
}
