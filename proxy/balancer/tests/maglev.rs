//! Maglev table properties: balance, minimal disruption, determinism.

mod common;

use common::{equal, weighted};
use vipr_balancer::{Backend, MaglevSeed, MaglevTable, MaglevTableSize, Weight};

fn size(m: u32) -> MaglevTableSize {
    MaglevTableSize::new(m).unwrap()
}

/// Slot -> owner address, which is what must agree across nodes and builds.
fn owners(table: &MaglevTable, backends: &[Backend]) -> Vec<std::net::SocketAddr> {
    table
        .entries()
        .iter()
        .map(|&i| backends[i as usize].addr)
        .collect()
}

/// Asserts every backend's share is within 1% (relative) of its weighted ideal.
fn assert_balanced(backends: &[Backend], m: u32) {
    let table = MaglevTable::build(backends, size(m), MaglevSeed::DEFAULT);
    assert_eq!(table.size(), m as usize);
    let total: f64 = backends.iter().map(|b| f64::from(b.weight.get())).sum();
    for (b, &got) in backends.iter().zip(&table.shares(backends.len())) {
        let ideal = f64::from(m) * f64::from(b.weight.get()) / total;
        let off = (got as f64 - ideal).abs() / ideal;
        assert!(
            off <= 0.01,
            "{}: {got} slots vs ideal {ideal:.1} ({:.2}% off)",
            b.addr,
            off * 100.0
        );
    }
}

#[test]
fn equal_weights_share_within_one_percent() {
    assert_balanced(&equal(100), 16381);
    assert_balanced(&equal(10), 4093);
    assert_balanced(&equal(600), 65521);
}

#[test]
fn weighted_shares_within_one_percent() {
    let weights: Vec<u16> = (0..20).map(|i| 1 + (i % 4)).collect();
    assert_balanced(&weighted(&weights), 65521);
    assert_balanced(&weighted(&[1, 10, 5, 2]), 16381);
}

#[test]
fn drained_backends_get_no_slot() {
    let backends = weighted(&[1, 0, 1]);
    let table = MaglevTable::build(&backends, size(251), MaglevSeed::DEFAULT);
    let shares = table.shares(3);
    assert_eq!(shares[1], 0);
    assert_eq!(shares[0] + shares[2], 251);
}

/// Fraction of slots whose owner differs between two tables.
fn moved(a: &[std::net::SocketAddr], b: &[std::net::SocketAddr]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
}

/// Fraction of slots that change owner when backend `removed` of `n` leaves.
fn removal_disruption(n: u32, m: u32, removed: usize) -> f64 {
    let before = equal(n);
    let mut after = before.clone();
    after.remove(removed);
    let t0 = MaglevTable::build(&before, size(m), MaglevSeed::DEFAULT);
    let t1 = MaglevTable::build(&after, size(m), MaglevSeed::DEFAULT);
    moved(&owners(&t0, &before), &owners(&t1, &after))
}

// The table moves the removed backend's 1/N plus some entries contested
// late in the population; that excess shrinks as the table grows relative
// to N. At the default size it stays under 1% for every N the 1%-balance
// rule allows (size over 100x N: up to 163 backends). Measured worst of the
// removals below: N=10 0.38%, N=30 0.56%, N=100 0.75%, N=160 0.80%, and
// N=1000 at 131071 slots 0.28% (the paper's round-robin population:
// 0.51%, 0.92%, 1.41%, 1.60%).
#[test]
fn removing_one_backend_remaps_under_one_nth_plus_one_percent() {
    let default = MaglevTableSize::DEFAULT.get();
    for (n, m) in [
        (10, default),
        (30, default),
        (100, default),
        (160, default),
        (1000, 131071),
    ] {
        for removed in [0, 3, n as usize / 2, n as usize - 1] {
            let fraction = removal_disruption(n, m, removed);
            let bound = 1.0 / f64::from(n) + 0.01;
            assert!(
                fraction < bound,
                "n={n} m={m} removed #{removed}: {fraction:.4} >= {bound:.4}"
            );
        }
    }
}

// Small tables at the 100x limit contest more of their entries: measured
// 1.46% over 1/N at N=10, M=1021 and 1.06% at N=30, M=4093 (the paper's
// round-robin population: 2.9% and 2.1%).
#[test]
fn removing_one_backend_from_a_small_table_stays_near_the_minimum() {
    for (n, m) in [(10, 1021), (30, 4093)] {
        for removed in [0, n as usize / 2, n as usize - 1] {
            let fraction = removal_disruption(n, m, removed);
            let bound = 1.0 / f64::from(n) + 0.025;
            assert!(
                fraction < bound,
                "n={n} m={m} removed #{removed}: {fraction:.4} >= {bound:.4}"
            );
        }
    }
}

#[test]
fn adding_one_backend_remaps_under_one_nth_plus_one_percent() {
    let (n, m) = (100, 65521);
    let before = equal(n);
    let after = equal(n + 1);
    let t0 = MaglevTable::build(&before, size(m), MaglevSeed::DEFAULT);
    let t1 = MaglevTable::build(&after, size(m), MaglevSeed::DEFAULT);
    let fraction = moved(&owners(&t0, &before), &owners(&t1, &after));
    assert!(fraction < 1.0 / f64::from(n + 1) + 0.01, "{fraction:.4}");
}

#[test]
fn same_seed_builds_identical_tables_whatever_the_input_order() {
    let seed: MaglevSeed = "0xfeed".parse().unwrap();
    let backends = weighted(&[3, 1, 2, 2, 5, 1, 1, 4]);
    let a = MaglevTable::build(&backends, size(1021), seed);
    let b = MaglevTable::build(&backends.clone(), size(1021), seed);
    assert_eq!(a, b);
    let mut reversed = backends.clone();
    reversed.reverse();
    let c = MaglevTable::build(&reversed, size(1021), seed);
    assert_eq!(owners(&a, &backends), owners(&c, &reversed));
}

#[test]
fn different_seeds_build_different_tables() {
    let backends = equal(20);
    let a = MaglevTable::build(&backends, size(4093), MaglevSeed::new(1));
    let b = MaglevTable::build(&backends, size(4093), MaglevSeed::new(2));
    // Not merely different somewhere: most slots change owner.
    assert!(moved(&owners(&a, &backends), &owners(&b, &backends)) > 0.5);
}

#[test]
fn weight_change_moves_few_entries() {
    let before = equal(50);
    let mut after = before.clone();
    after[7].weight = Weight::new(2);
    let t0 = MaglevTable::build(&before, size(16381), MaglevSeed::DEFAULT);
    let t1 = MaglevTable::build(&after, size(16381), MaglevSeed::DEFAULT);
    let shares = t1.shares(50);
    assert!((shares[7] as f64 / 16381.0 - 2.0 / 51.0).abs() < 0.01 * 2.0 / 51.0);
    // Backend 7 gains about 1/51 of the table; little else should move.
    let fraction = moved(&owners(&t0, &before), &owners(&t1, &after));
    assert!(fraction < 2.0 / 51.0 + 0.05, "{fraction:.4}");
}
