//! The reference selection of every algorithm, checked against its definition.

mod common;

use std::time::Duration;

use common::{addr, assert_goodness_of_fit, equal, flow, weighted};
use vipr_balancer::{
    AffinityTimeout, Algorithm, Backend, Flow, Protocol, Reason, SelectError, SelectState,
    ServiceBalancing, SessionAffinity, Weight, random_candidates, select_backend,
};

fn balancing(algorithm: Algorithm) -> ServiceBalancing {
    ServiceBalancing {
        algorithm,
        ..ServiceBalancing::default()
    }
}

/// Runs `picks` selections of distinct flows and counts picks per backend.
fn spread(algorithm: Algorithm, backends: &[Backend], picks: u32) -> Vec<u64> {
    let mut state = SelectState::new(0x5eed);
    let mut counts = vec![0; backends.len()];
    for i in 0..picks {
        let f = flow(i, 40000 + (i % 20000) as u16);
        let d = select_backend(&balancing(algorithm), backends, &f, &mut state).unwrap();
        counts[d.index] += 1;
    }
    counts
}

fn pick(algorithm: Algorithm, backends: &[Backend]) -> usize {
    select_backend(
        &balancing(algorithm),
        backends,
        &flow(1, 1000),
        &mut SelectState::default(),
    )
    .unwrap()
    .index
}

#[test]
fn random_spread_passes_chi_square() {
    let counts = spread(Algorithm::Random, &equal(8), 40_000);
    assert_goodness_of_fit(&counts, &[1.0; 8]);
}

#[test]
fn random_honours_weights_chi_square() {
    let counts = spread(Algorithm::Random, &weighted(&[1, 2, 3, 4]), 40_000);
    assert_goodness_of_fit(&counts, &[1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn random_candidates_report_odds_and_skip_drained() {
    let backends = weighted(&[1, 0, 3]);
    let c = random_candidates(&backends);
    assert_eq!(c.iter().map(|c| c.index).collect::<Vec<_>>(), vec![0, 2]);
    assert_eq!(
        c.iter().map(|c| c.probability).collect::<Vec<_>>(),
        vec![0.25, 0.75]
    );
    let counts = spread(Algorithm::Random, &backends, 2_000);
    assert_eq!(counts[1], 0, "a drained backend got new flows");
    let d = select_backend(
        &balancing(Algorithm::Random),
        &backends,
        &flow(1, 1),
        &mut SelectState::default(),
    )
    .unwrap();
    assert!(matches!(&d.reason, Reason::Random { candidates, .. } if candidates == &c));
    assert!(d.to_string().contains("random draw"), "{d}");
}

#[test]
fn rr_spread_passes_chi_square_and_cycles_in_order() {
    let backends = equal(5);
    let counts = spread(Algorithm::RoundRobin, &backends, 10_003);
    assert_goodness_of_fit(&counts, &[1.0; 5]);
    let mut state = SelectState::default();
    let order: Vec<usize> = (0..7)
        .map(|i| {
            select_backend(
                &balancing(Algorithm::RoundRobin),
                &backends,
                &flow(i, 1),
                &mut state,
            )
            .unwrap()
            .index
        })
        .collect();
    assert_eq!(order, vec![0, 1, 2, 3, 4, 0, 1]);
}

#[test]
fn rr_ignores_weights_but_skips_drained() {
    let counts = spread(Algorithm::RoundRobin, &weighted(&[5, 0, 1]), 100);
    assert_eq!(counts, vec![50, 0, 50]);
}

fn sequence(algorithm: Algorithm, backends: &[Backend], len: u32) -> Vec<usize> {
    let mut state = SelectState::default();
    (0..len)
        .map(|i| {
            select_backend(&balancing(algorithm), backends, &flow(i, 1), &mut state)
                .unwrap()
                .index
        })
        .collect()
}

#[test]
fn wrr_follows_ipvs_interleaving() {
    // IPVS wrr with weights 4,3,2: current weight 4: A; 3: A B; 2: A B C; 1: A B C.
    assert_eq!(
        sequence(Algorithm::WeightedRoundRobin, &weighted(&[4, 3, 2]), 9),
        vec![0, 0, 1, 0, 1, 2, 0, 1, 2]
    );
    assert_eq!(
        sequence(Algorithm::WeightedRoundRobin, &weighted(&[5, 1, 1]), 7),
        vec![0, 0, 0, 0, 0, 1, 2]
    );
}

#[test]
fn wrr_shares_equal_weights_exactly() {
    let counts = spread(
        Algorithm::WeightedRoundRobin,
        &weighted(&[6, 0, 2, 4]),
        1_200,
    );
    assert_eq!(counts, vec![600, 0, 200, 400]);
    // A gcd above 1 only shortens the cycle.
    assert_eq!(
        spread(Algorithm::WeightedRoundRobin, &weighted(&[20, 10]), 30),
        vec![20, 10]
    );
}

#[test]
fn source_hash_is_stable_per_client_and_spreads_across_clients() {
    let backends = equal(6);
    let b = balancing(Algorithm::SourceHash);
    let mut state = SelectState::default();
    for client in 0..50 {
        let first = select_backend(&b, &backends, &flow(client, 1000), &mut state)
            .unwrap()
            .index;
        for port in [1001, 2000, 65000] {
            assert_eq!(
                select_backend(&b, &backends, &flow(client, port), &mut state)
                    .unwrap()
                    .index,
                first
            );
        }
    }
    let counts = spread(Algorithm::SourceHash, &backends, 30_000);
    assert_goodness_of_fit(&counts, &[1.0; 6]);
}

#[test]
fn source_hash_honours_weights() {
    let counts = spread(Algorithm::SourceHash, &weighted(&[1, 3, 0]), 20_000);
    assert_eq!(counts[2], 0);
    assert_goodness_of_fit(&counts[..2], &[1.0, 3.0]);
}

#[test]
fn destination_hash_is_stable_per_destination_and_spreads_across_destinations() {
    let backends = equal(4);
    let b = balancing(Algorithm::DestinationHash);
    let mut state = SelectState::default();
    let to = |client: u32, dst: u32| {
        let dst = std::net::SocketAddr::from((std::net::Ipv4Addr::from(0x0a60_0000 + dst), 80));
        Flow::new(Protocol::Udp, flow(client, 5000).src, dst)
    };
    let mut counts = vec![0u64; 4];
    for dst in 0..20_000 {
        let first = select_backend(&b, &backends, &to(0, dst), &mut state)
            .unwrap()
            .index;
        if dst < 50 {
            for client in 1..5 {
                assert_eq!(
                    select_backend(&b, &backends, &to(client, dst), &mut state)
                        .unwrap()
                        .index,
                    first
                );
            }
        }
        counts[first] += 1;
    }
    assert_goodness_of_fit(&counts, &[1.0; 4]);
}

fn loaded(spec: &[(u32, u16)]) -> Vec<Backend> {
    spec.iter()
        .enumerate()
        .map(|(i, &(active, w))| {
            Backend::new(addr(i as u32))
                .with_active(active)
                .with_weight(Weight::new(w))
        })
        .collect()
}

#[test]
fn lc_picks_fewest_active_first_on_ties_never_drained() {
    assert_eq!(
        pick(
            Algorithm::LeastConnection,
            &loaded(&[(5, 1), (2, 1), (9, 1)])
        ),
        1
    );
    assert_eq!(
        pick(
            Algorithm::LeastConnection,
            &loaded(&[(3, 1), (1, 1), (1, 1)])
        ),
        1
    );
    // Weight does not matter to lc, except 0.
    assert_eq!(
        pick(
            Algorithm::LeastConnection,
            &loaded(&[(0, 0), (4, 1), (3, 100)])
        ),
        2
    );
}

#[test]
fn sed_minimises_active_plus_one_over_weight() {
    // (3+1)/1 = 4, (5+1)/2 = 3, (8+1)/3 = 3: B and C tie, B comes first.
    let backends = loaded(&[(3, 1), (5, 2), (8, 3)]);
    assert_eq!(pick(Algorithm::ShortestExpectedDelay, &backends), 1);
    assert_eq!(
        pick(Algorithm::LeastConnection, &backends),
        0,
        "lc would have chosen A"
    );
    // An idle light backend loses to a busy heavy one: 1/1 > (1+1)/10.
    assert_eq!(
        pick(
            Algorithm::ShortestExpectedDelay,
            &loaded(&[(0, 1), (1, 10)])
        ),
        1
    );
    assert_eq!(
        pick(Algorithm::ShortestExpectedDelay, &loaded(&[(0, 0), (7, 1)])),
        1
    );
}

#[test]
fn nq_prefers_an_idle_backend_else_sed() {
    let backends = loaded(&[(2, 1), (0, 1), (1, 10)]);
    let d = select_backend(
        &balancing(Algorithm::NeverQueue),
        &backends,
        &flow(1, 1),
        &mut SelectState::default(),
    )
    .unwrap();
    assert_eq!(d.index, 1);
    assert!(matches!(d.reason, Reason::NeverQueue { idle: true, .. }));
    assert_eq!(
        pick(Algorithm::ShortestExpectedDelay, &backends),
        2,
        "sed would have chosen C"
    );
    // No idle backend: same as sed.
    let busy = loaded(&[(3, 1), (5, 2), (8, 3)]);
    assert_eq!(
        pick(Algorithm::NeverQueue, &busy),
        pick(Algorithm::ShortestExpectedDelay, &busy)
    );
    // An idle but drained backend is not a candidate.
    assert_eq!(pick(Algorithm::NeverQueue, &loaded(&[(0, 0), (4, 1)])), 1);
}

#[test]
fn maglev_selection_is_the_table_lookup_and_per_flow_stable() {
    let backends = equal(10);
    let b = balancing(Algorithm::Maglev);
    let table = vipr_balancer::MaglevTable::build(&backends, b.maglev_table_size, b.maglev_seed);
    let mut state = SelectState::default();
    for i in 0..500 {
        let f = flow(i, 3000 + i as u16);
        let d = select_backend(&b, &backends, &f, &mut state).unwrap();
        assert_eq!(Some(d.index), table.lookup(f.hash()));
        assert_eq!(
            select_backend(&b, &backends, &f, &mut state).unwrap().index,
            d.index
        );
    }
    let counts = spread(Algorithm::Maglev, &backends, 20_000);
    assert_goodness_of_fit(&counts, &[1.0; 10]);
}

fn with_affinity(algorithm: Algorithm, seconds: i64) -> ServiceBalancing {
    let timeout = AffinityTimeout::from_seconds(seconds).unwrap();
    ServiceBalancing {
        algorithm,
        affinity: SessionAffinity::ClientIp { timeout },
        ..ServiceBalancing::default()
    }
}

#[test]
fn client_ip_affinity_sticks_until_the_timeout() {
    let backends = equal(3);
    let b = with_affinity(Algorithm::RoundRobin, 10);
    let mut state = SelectState::default();
    let at = |secs: u64, client: u32, state: &mut SelectState| {
        state.set_now(Duration::from_secs(secs));
        select_backend(&b, &backends, &flow(client, 1000 + secs as u16), state).unwrap()
    };
    assert_eq!(at(0, 1, &mut state).index, 0);
    assert_eq!(
        at(1, 2, &mut state).index,
        1,
        "another client is balanced normally"
    );
    let again = at(5, 1, &mut state);
    assert_eq!(again.index, 0);
    assert!(matches!(again.reason, Reason::Affinity { .. }), "{again}");
    // Each new flow refreshes the entry: 5 + 10 is still within the timeout.
    assert_eq!(at(15, 1, &mut state).index, 0);
    // 11 s of silence: the entry expired, round robin continues.
    assert_eq!(at(26, 1, &mut state).index, 2);
}

#[test]
fn affinity_is_dropped_when_the_backend_drains_or_leaves() {
    let mut backends = equal(3);
    let b = with_affinity(Algorithm::RoundRobin, 100);
    let mut state = SelectState::default();
    assert_eq!(
        select_backend(&b, &backends, &flow(1, 1), &mut state)
            .unwrap()
            .index,
        0
    );
    backends[0].weight = Weight::DRAIN;
    assert_eq!(
        select_backend(&b, &backends, &flow(1, 2), &mut state)
            .unwrap()
            .index,
        1
    );
    backends.remove(1);
    let d = select_backend(&b, &backends, &flow(1, 3), &mut state).unwrap();
    assert_eq!(d.backend, addr(2));
}

#[test]
fn no_backend_to_choose_is_an_error() {
    let mut state = SelectState::default();
    for algorithm in Algorithm::ALL {
        let b = balancing(algorithm);
        assert_eq!(
            select_backend(&b, &[], &flow(1, 1), &mut state),
            Err(SelectError::NoBackends)
        );
        let drained = weighted(&[0, 0]);
        assert_eq!(
            select_backend(&b, &drained, &flow(1, 1), &mut state),
            Err(SelectError::AllDrained { count: 2 })
        );
    }
}

#[test]
fn every_algorithm_explains_its_decision() {
    let backends = loaded(&[(1, 1), (0, 2), (3, 3)]);
    for algorithm in Algorithm::ALL {
        let d = select_backend(
            &balancing(algorithm),
            &backends,
            &flow(7, 7),
            &mut SelectState::default(),
        )
        .unwrap();
        let text = d.to_string();
        assert!(
            text.starts_with(&d.backend.to_string()),
            "{algorithm}: {text}"
        );
    }
}
