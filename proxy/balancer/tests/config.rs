//! Service balancing configuration from annotations, affinity fields and node defaults.

use std::collections::BTreeMap;

use vipr_balancer::{
    AffinityTimeout, Algorithm, ConfigError, MaglevSeed, MaglevTableSize, NodeDefaults,
    ServiceAffinitySpec, ServiceBalancing, SessionAffinity,
};

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse(
    pairs: &[(&str, &str)],
    affinity: ServiceAffinitySpec<'_>,
) -> Result<ServiceBalancing, ConfigError> {
    ServiceBalancing::from_service(&annotations(pairs), affinity, &NodeDefaults::default())
}

#[test]
fn defaults_without_annotations() {
    let b = parse(&[], ServiceAffinitySpec::default()).unwrap();
    assert_eq!(b.algorithm, Algorithm::Random);
    assert_eq!(b.maglev_table_size.get(), 16381);
    assert_eq!(b.affinity, SessionAffinity::None);
}

#[test]
fn node_default_algorithm_and_seed_apply() {
    let node = NodeDefaults {
        algorithm: "maglev".parse().unwrap(),
        maglev_seed: "7".parse().unwrap(),
    };
    let b = ServiceBalancing::from_service(&BTreeMap::new(), ServiceAffinitySpec::default(), &node)
        .unwrap();
    assert_eq!(b.algorithm, Algorithm::Maglev);
    assert_eq!(b.maglev_seed, MaglevSeed::new(7));
}

#[test]
fn annotation_overrides_node_default() {
    let node = NodeDefaults {
        algorithm: Algorithm::Maglev,
        ..NodeDefaults::default()
    };
    let b = ServiceBalancing::from_service(
        &annotations(&[("vipr.io/lb-algorithm", "sed")]),
        ServiceAffinitySpec::default(),
        &node,
    )
    .unwrap();
    assert_eq!(b.algorithm, Algorithm::ShortestExpectedDelay);
}

#[test]
fn unknown_algorithm_names_the_annotation_and_lists_valid_names() {
    let err = parse(
        &[("vipr.io/lb-algorithm", "wlc")],
        ServiceAffinitySpec::default(),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("vipr.io/lb-algorithm") && msg.contains("\"wlc\""),
        "{msg}"
    );
    for name in [
        "random", "rr", "wrr", "lc", "sh", "dh", "sed", "nq", "maglev",
    ] {
        assert!(msg.contains(name), "{msg} lacks {name}");
    }
}

#[test]
fn maglev_table_size_must_be_a_listed_prime() {
    let ok = parse(
        &[("vipr.io/maglev-table-size", "65521")],
        ServiceAffinitySpec::default(),
    )
    .unwrap();
    assert_eq!(ok.maglev_table_size, MaglevTableSize::new(65521).unwrap());
    let err = parse(
        &[("vipr.io/maglev-table-size", "65536")],
        ServiceAffinitySpec::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ConfigError::MaglevTableSize(_)));
    assert!(
        err.to_string().contains("vipr.io/maglev-table-size"),
        "{err}"
    );
}

#[test]
fn client_ip_affinity_defaults_to_10800_seconds() {
    let spec = ServiceAffinitySpec {
        session_affinity: Some("ClientIP"),
        timeout_seconds: None,
    };
    let b = parse(&[], spec).unwrap();
    assert_eq!(
        b.affinity,
        SessionAffinity::ClientIp {
            timeout: AffinityTimeout::DEFAULT
        }
    );
    assert_eq!(AffinityTimeout::DEFAULT.seconds(), 10800);
}

#[test]
fn affinity_timeout_bounds_are_kubernetes_ones() {
    for ok in [1, 60, 86400] {
        let spec = ServiceAffinitySpec {
            session_affinity: Some("ClientIP"),
            timeout_seconds: Some(ok),
        };
        let b = parse(&[], spec).unwrap();
        assert_eq!(
            b.affinity,
            SessionAffinity::ClientIp {
                timeout: AffinityTimeout::from_seconds(ok).unwrap()
            }
        );
    }
    for bad in [0, -5, 86401] {
        let spec = ServiceAffinitySpec {
            session_affinity: Some("ClientIP"),
            timeout_seconds: Some(bad),
        };
        let err = parse(&[], spec).unwrap_err();
        assert_eq!(err, ConfigError::AffinityTimeout { value: bad });
        assert!(
            err.to_string()
                .contains("spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
            "{err}"
        );
    }
}

#[test]
fn timeout_is_ignored_without_client_ip_affinity() {
    let spec = ServiceAffinitySpec {
        session_affinity: Some("None"),
        timeout_seconds: Some(0),
    };
    assert_eq!(parse(&[], spec).unwrap().affinity, SessionAffinity::None);
}

#[test]
fn unknown_session_affinity_is_rejected() {
    let spec = ServiceAffinitySpec {
        session_affinity: Some("Cookie"),
        timeout_seconds: None,
    };
    let err = parse(&[], spec).unwrap_err();
    assert!(err.to_string().contains("spec.sessionAffinity"), "{err}");
}

#[test]
fn display_is_one_line_for_lb_list() {
    let spec = ServiceAffinitySpec {
        session_affinity: Some("ClientIP"),
        timeout_seconds: Some(60),
    };
    let b = parse(&[("vipr.io/lb-algorithm", "maglev")], spec).unwrap();
    assert_eq!(b.to_string(), "maglev(16381), ClientIP 60s");
}
