//! RollingUpdate arithmetic: `maxSurge` and `maxUnavailable` as numbers or
//! percentages of the desired replicas, surge rounded up and unavailable
//! down, as Kubernetes resolves them.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// How a Deployment replaces its pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Kill all old pods, then start the new ones.
    Recreate,
    /// At most `desired + max_surge` pods, at least `desired - max_unavailable` available.
    RollingUpdate {
        max_surge: i32,
        max_unavailable: i32,
    },
}

/// A `maxSurge` / `maxUnavailable` value that is neither a count nor `N%`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: Invalid value: {value:?}: must be an integer or a percentage (e.g. '25%')")]
pub struct BadValue {
    pub field: &'static str,
    pub value: String,
}

/// `value` of `total`: a count as is, a percentage scaled and rounded up or down.
pub fn scaled_value(
    value: &IntOrString,
    total: i32,
    round_up: bool,
    field: &'static str,
) -> Result<i32, BadValue> {
    match value {
        IntOrString::Int(n) => Ok(*n),
        IntOrString::String(s) => {
            let bad = || BadValue {
                field,
                value: s.clone(),
            };
            let percent: i64 = s
                .strip_suffix('%')
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse().ok())
                .ok_or_else(bad)?;
            let product = percent * i64::from(total);
            let scaled = if round_up {
                (product + 99) / 100
            } else {
                product / 100
            };
            i32::try_from(scaled).map_err(|_| bad())
        }
    }
}

/// The resolved strategy for `desired` replicas. Both limits 0 is rejected by
/// validation; should it reach here anyway, unavailable becomes 1 (as
/// Kubernetes' fenceposts do) so a rollout can never deadlock.
pub fn resolve(deployment: &Deployment, desired: i32) -> Result<Strategy, BadValue> {
    let strategy = deployment.spec.strategy.as_ref();
    if strategy.and_then(|s| s.type_.as_deref()) == Some("Recreate") {
        return Ok(Strategy::Recreate);
    }
    let rolling = strategy.and_then(|s| s.rolling_update.as_ref());
    let quarter = IntOrString::String("25%".into());
    let surge = rolling
        .and_then(|r| r.max_surge.as_ref())
        .unwrap_or(&quarter);
    let unavailable = rolling
        .and_then(|r| r.max_unavailable.as_ref())
        .unwrap_or(&quarter);
    let max_surge = scaled_value(surge, desired, true, "spec.strategy.rollingUpdate.maxSurge")?;
    let mut max_unavailable = scaled_value(
        unavailable,
        desired,
        false,
        "spec.strategy.rollingUpdate.maxUnavailable",
    )?;
    if max_surge == 0 && max_unavailable == 0 {
        max_unavailable = 1;
    }
    Ok(Strategy::RollingUpdate {
        max_surge,
        max_unavailable: max_unavailable.min(desired),
    })
}

impl Strategy {
    /// Pods that may be unavailable while the Deployment still counts as Available.
    pub fn max_unavailable(self) -> i32 {
        match self {
            Strategy::Recreate => 0,
            Strategy::RollingUpdate {
                max_unavailable, ..
            } => max_unavailable,
        }
    }

    /// Pods that may exist above the desired count.
    pub fn max_surge(self) -> i32 {
        match self {
            Strategy::Recreate => 0,
            Strategy::RollingUpdate { max_surge, .. } => max_surge,
        }
    }
}

/// The new ReplicaSet's replicas during a rolling update (Kubernetes'
/// `NewRSNewReplicas`): grow toward `desired` while all pods stay within
/// `desired + max_surge`. `all_replicas` counts every ReplicaSet's replicas.
pub fn new_replicas(desired: i32, max_surge: i32, all_replicas: i32, new_current: i32) -> i32 {
    if new_current >= desired {
        return desired;
    }
    let max_total = desired + max_surge;
    if all_replicas >= max_total {
        return new_current;
    }
    new_current + (max_total - all_replicas).min(desired - new_current)
}

/// How many old pods may go now (Kubernetes' `reconcileOldReplicaSets` bound):
/// keep `desired - max_unavailable` available, counting the new ReplicaSet's
/// not-yet-available pods as unavailable.
pub fn max_scale_down(
    desired: i32,
    max_unavailable: i32,
    all_replicas: i32,
    new_replicas: i32,
    new_available: i32,
) -> i32 {
    let min_available = desired - max_unavailable;
    let new_unavailable = (new_replicas - new_available).max(0);
    (all_replicas - min_available - new_unavailable).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pct(s: &str) -> IntOrString {
        IntOrString::String(s.into())
    }

    #[test]
    fn percentages_round_surge_up_and_unavailable_down() {
        let cases = [
            // (value, total, round_up, expected)
            (pct("25%"), 3, true, 1),
            (pct("25%"), 3, false, 0),
            (pct("25%"), 4, true, 1),
            (pct("25%"), 4, false, 1),
            (pct("25%"), 10, true, 3),
            (pct("25%"), 10, false, 2),
            (pct("50%"), 5, true, 3),
            (pct("50%"), 5, false, 2),
            (pct("100%"), 3, false, 3),
            (pct("0%"), 7, true, 0),
            (pct("1%"), 1, true, 1),
            (pct("1%"), 1, false, 0),
            (IntOrString::Int(2), 10, true, 2),
            (IntOrString::Int(0), 10, false, 0),
        ];
        for (value, total, up, expected) in cases {
            assert_eq!(
                scaled_value(&value, total, up, "f"),
                Ok(expected),
                "{value:?} of {total}, up={up}"
            );
        }
        for bad in ["25", "%", "x%", "-5%", "2.5%"] {
            assert!(scaled_value(&pct(bad), 10, true, "f").is_err(), "{bad}");
        }
    }

    #[test]
    fn new_replica_set_grows_within_the_surge() {
        // (desired, maxSurge, all replicas, new replicas) -> new replicas
        let cases = [
            (3, 1, 3, 0, 1), // start: one surge pod
            (3, 1, 4, 1, 1), // at the ceiling: wait
            (3, 1, 3, 1, 2), // an old pod went: grow
            (3, 0, 3, 0, 0), // no surge: old ones must go first
            (3, 0, 2, 0, 1), // one old went
            (3, 3, 3, 0, 3), // 100% surge: all at once
            (3, 1, 5, 4, 3), // above desired: shrink to desired
            (10, 3, 10, 0, 3),
            (0, 1, 2, 0, 0),
        ];
        for (desired, surge, all, current, expected) in cases {
            assert_eq!(
                new_replicas(desired, surge, all, current),
                expected,
                "desired {desired} surge {surge} all {all} new {current}"
            );
        }
    }

    #[test]
    fn old_replica_sets_shrink_within_availability() {
        // (desired, maxUnavailable, all, new replicas, new available) -> may remove
        let cases = [
            (3, 0, 4, 1, 0, 0), // surge pod not ready yet: keep all old
            (3, 0, 4, 1, 1, 1), // surge pod available: one old may go
            (3, 1, 3, 0, 0, 1), // no surge, one may be unavailable
            (3, 1, 4, 2, 0, 0), // two new unready eat the budget
            (3, 3, 3, 0, 0, 3),
            (1, 0, 2, 1, 1, 1),
        ];
        for (desired, unavailable, all, new, new_available, expected) in cases {
            assert_eq!(
                max_scale_down(desired, unavailable, all, new, new_available),
                expected,
                "desired {desired} maxUnavailable {unavailable} all {all} new {new}/{new_available}"
            );
        }
    }
}
