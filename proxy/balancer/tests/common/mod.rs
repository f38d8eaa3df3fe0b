//! Helpers shared by the balancer's integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::{Ipv4Addr, SocketAddr};

use vipr_balancer::{Backend, Flow, Protocol, Weight};

/// Backend `i` at 10.1.x.y:8080.
pub fn addr(i: u32) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::from(0x0a01_0000 + i), 8080))
}

/// One backend per weight, in order.
pub fn weighted(weights: &[u16]) -> Vec<Backend> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| Backend::new(addr(i as u32)).with_weight(Weight::new(w)))
        .collect()
}

pub fn equal(count: u32) -> Vec<Backend> {
    (0..count).map(|i| Backend::new(addr(i))).collect()
}

/// A TCP flow from client `client` (10.2.x.y:port) to a fixed ClusterIP.
pub fn flow(client: u32, port: u16) -> Flow {
    let src = SocketAddr::from((Ipv4Addr::from(0x0a02_0000 + client), port));
    Flow::new(Protocol::Tcp, src, "10.96.0.10:80".parse().unwrap())
}

/// Pearson's chi-square statistic of `observed` counts against expected
/// proportions (`weights`, normalised here).
pub fn chi_square(observed: &[u64], weights: &[f64]) -> f64 {
    let n: u64 = observed.iter().sum();
    let total: f64 = weights.iter().sum();
    observed
        .iter()
        .zip(weights)
        .map(|(&o, &w)| {
            let e = n as f64 * w / total;
            (o as f64 - e).powi(2) / e
        })
        .sum()
}

/// The chi-square critical value at significance 0.001 for `df` degrees of
/// freedom, by the Wilson-Hilferty approximation (accurate to well under 1%
/// for df >= 3, and conservative enough for a fixed-seed test).
pub fn chi_square_critical_0_001(df: usize) -> f64 {
    let k = df as f64;
    let z = 3.090_232; // upper 0.001 quantile of the standard normal
    let t = 1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt();
    k * t.powi(3)
}

/// Asserts that counts fit the expected proportions at p = 0.001.
pub fn assert_goodness_of_fit(observed: &[u64], weights: &[f64]) {
    let stat = chi_square(observed, weights);
    let critical = chi_square_critical_0_001(observed.len() - 1);
    assert!(
        stat < critical,
        "chi-square {stat:.2} >= critical {critical:.2} for counts {observed:?} vs weights {weights:?}"
    );
}

#[test]
fn critical_values_match_tables() {
    // Published table values at p = 0.001: df 4 -> 18.467, df 9 -> 27.877, df 99 -> 148.230.
    for (df, table) in [(4, 18.467), (9, 27.877), (99, 148.230)] {
        let approx = chi_square_critical_0_001(df);
        assert!(
            (approx - table).abs() / table < 0.02,
            "df {df}: {approx} vs {table}"
        );
    }
}

#[test]
fn chi_square_of_perfect_fit_is_zero() {
    assert_eq!(chi_square(&[10, 20, 30], &[1.0, 2.0, 3.0]), 0.0);
}
