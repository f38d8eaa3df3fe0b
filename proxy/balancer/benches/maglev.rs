//! Maglev table build time. The budget: 1,000 backends at size 65521 in
//! under 10 ms, so an endpoint change at a big service is programmed fast.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};

use criterion::{Criterion, criterion_group, criterion_main};
use vipr_balancer::{Backend, MaglevSeed, MaglevTable, MaglevTableSize, Weight};

fn backends(count: u32, weight: impl Fn(u32) -> u16) -> Vec<Backend> {
    (0..count)
        .map(|i| {
            let ip = Ipv4Addr::from(0x0a00_0000 + i);
            Backend::new(SocketAddr::from((ip, 8080))).with_weight(Weight::new(weight(i)))
        })
        .collect()
}

fn build(c: &mut Criterion) {
    let size = MaglevTableSize::new(65521).expect("listed prime");
    let seed = MaglevSeed::DEFAULT;
    let mut group = c.benchmark_group("maglev_build");
    let equal = backends(1000, |_| 1);
    group.bench_function("1000_backends_65521_equal_weights", |b| {
        b.iter(|| MaglevTable::build(black_box(&equal), size, seed))
    });
    let mixed = backends(1000, |i| 1 + (i % 10) as u16);
    group.bench_function("1000_backends_65521_weights_1_to_10", |b| {
        b.iter(|| MaglevTable::build(black_box(&mixed), size, seed))
    });
    // One backend outweighing the rest 65535:1: its walk runs long while
    // the others take one slot each.
    let skewed = backends(1000, |i| if i == 0 { u16::MAX } else { 1 });
    group.bench_function("1000_backends_65521_one_heavy", |b| {
        b.iter(|| MaglevTable::build(black_box(&skewed), size, seed))
    });
    let default_size = backends(100, |_| 1);
    group.bench_function("100_backends_16381", |b| {
        b.iter(|| MaglevTable::build(black_box(&default_size), MaglevTableSize::DEFAULT, seed))
    });
    group.finish();
}

criterion_group!(benches, build);
criterion_main!(benches);
