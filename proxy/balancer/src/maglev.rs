//! Maglev consistent-hashing lookup tables (Eisenbud et al., NSDI 2016).
//!
//! Userspace builds the table; the datapath only indexes it with
//! `flow.hash() % size`. Every node must build the *identical* table from the
//! same backend set, so that a flow keeps its backend whichever node it
//! enters through. That holds because the table depends only on:
//!
//! - the set of backends with a non-zero weight, ordered by address (never
//!   by the caller's order, which differs between nodes and watches);
//! - each backend's stable identity, its `addr` rendered as text
//!   (`10.0.0.1:8080`, `[fd00::1]:8080`), hashed with MurmurHash3 x64/128
//!   keyed by the node-wide [`MaglevSeed`];
//! - the weights and the [`MaglevTableSize`].
//!
//! Population is position-ordered, a stable assignment rather than the
//! paper's round-robin claims: every backend walks its own permutation one
//! position at a time, all backends in step, and takes each slot it reaches
//! that is still free, until it holds its quota. Quotas are exact: `size`
//! split by weight (largest remainder), so each backend's share is within
//! one slot of `size * w_i / sum(w)`.
//!
//! Why not the paper's order: there, backend `i` claims its next free slot
//! in turn `k * count + i`, so when a backend leaves, every later claim of
//! every other backend shifts and the final rounds reshuffle. Ordering the
//! claims by position instead keeps most of them where they were: removing
//! one of 100 backends from a 16381-slot table moves 1/100 + 0.8% of the
//! slots (the paper's order: + 1.4%); see `tests/maglev.rs`.
//!
//! After a backend is added or removed only slightly more entries than the
//! minimum move (the entries the changed backend gains or loses); the
//! disruption tests pin that down.

use std::fmt;
use std::str::FromStr;

use crate::backend::Backend;
use crate::hash::murmur3_x64_128;

/// A Maglev table size: only the primes Cilium offers.
///
/// Prime so every skip in `1..size` generates a full permutation; the
/// datapath sizes its map from this, so arbitrary values are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MaglevTableSize(u32);

impl MaglevTableSize {
    /// Every accepted size, ascending.
    pub const ALL: [MaglevTableSize; 10] = [
        MaglevTableSize(251),
        MaglevTableSize(509),
        MaglevTableSize(1021),
        MaglevTableSize(2039),
        MaglevTableSize(4093),
        MaglevTableSize(8191),
        MaglevTableSize(16381),
        MaglevTableSize(32749),
        MaglevTableSize(65521),
        MaglevTableSize(131071),
    ];

    /// Cilium's default, good for up to ~160 backends at 1% imbalance.
    pub const DEFAULT: MaglevTableSize = MaglevTableSize(16381);

    /// The size if it is one of [`MaglevTableSize::ALL`].
    pub fn new(size: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.0 == size)
    }

    pub const fn get(self) -> u32 {
        self.0
    }
}

impl Default for MaglevTableSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for MaglevTableSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A table size that is not one of the listed primes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid annotation vipr.io/maglev-table-size={value:?}: must be one of \
     251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071"
)]
pub struct MaglevTableSizeError {
    pub value: String,
}

impl FromStr for MaglevTableSize {
    type Err = MaglevTableSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse::<u32>()
            .ok()
            .and_then(MaglevTableSize::new)
            .ok_or_else(|| MaglevTableSizeError {
                value: s.to_owned(),
            })
    }
}

/// The node-wide key of the backend hashes (`--maglev-seed`).
///
/// All nodes of a cluster must use the same seed, or they build different
/// tables and a flow that moves between nodes changes backend. A different
/// seed gives a different table, which keeps outsiders from predicting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MaglevSeed(u64);

impl MaglevSeed {
    /// The seed when `--maglev-seed` is not given.
    pub const DEFAULT: MaglevSeed = MaglevSeed(0x7669_7072_6d61_676c); // "viprmagl"

    pub const fn new(seed: u64) -> Self {
        MaglevSeed(seed)
    }

    pub const fn get(self) -> u64 {
        self.0
    }
}

impl Default for MaglevSeed {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for MaglevSeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A `--maglev-seed` that is not a 64-bit integer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid --maglev-seed {value:?}: expected a 64-bit unsigned integer, decimal or 0x-prefixed hex"
)]
pub struct MaglevSeedError {
    pub value: String,
}

impl FromStr for MaglevSeed {
    type Err = MaglevSeedError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => t.parse::<u64>(),
        };
        parsed.map(MaglevSeed).map_err(|_| MaglevSeedError {
            value: s.to_owned(),
        })
    }
}

/// Marks a slot not yet claimed while the table is populated.
const UNCLAIMED: u32 = u32::MAX;

/// A backend's walk through the table: where it looks next and by how much
/// it steps. The walk `offset, offset + skip, ...` (mod size) visits every
/// slot exactly once because the size is prime and `1 <= skip < size`.
struct Permutation {
    next: u32,
    skip: u32,
}

impl Permutation {
    fn of(backend: &Backend, size: u32, seed: MaglevSeed) -> Self {
        let identity = backend.addr.to_string();
        let (h1, h2) = murmur3_x64_128(identity.as_bytes(), seed.get());
        let m = u64::from(size);
        // Both values are < size <= u32::MAX, so the casts are lossless.
        Permutation {
            next: (h1 % m) as u32,
            skip: (h2 % (m - 1) + 1) as u32,
        }
    }
}

/// `(slot + skip) % size` without a division: both operands are below size.
#[inline]
fn step(slot: u32, skip: u32, size: u32) -> u32 {
    let (sum, overflow) = slot.overflowing_add(skip);
    if overflow || sum >= size {
        sum.wrapping_sub(size)
    } else {
        sum
    }
}

/// A populated Maglev lookup table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaglevTable {
    /// Slot -> index into the backend slice the table was built from.
    /// Empty when no backend accepts new flows.
    entries: Vec<u32>,
}

impl MaglevTable {
    /// Builds the table for `backends`. Backends with weight 0 get no slot.
    ///
    /// Entries are indices into `backends`, but which *address* owns a slot
    /// does not depend on the order of `backends`.
    pub fn build(backends: &[Backend], size: MaglevTableSize, seed: MaglevSeed) -> Self {
        let mut eligible: Vec<usize> = (0..backends.len())
            .filter(|&i| backends[i].weight.accepts_new_flows())
            .collect();
        if eligible.is_empty() {
            return MaglevTable {
                entries: Vec::new(),
            };
        }
        eligible.sort_by_key(|&i| backends[i].addr);
        let m = size.get();
        let weights: Vec<u64> = eligible
            .iter()
            .map(|&i| u64::from(backends[i].weight.get()))
            .collect();
        let mut walkers: Vec<Walker> = eligible
            .iter()
            .zip(quotas(&weights, m))
            .filter(|(_, quota)| *quota > 0)
            .map(|(&i, quota)| Walker {
                walk: Permutation::of(&backends[i], m, seed),
                owner: i as u32,
                quota,
            })
            .collect();
        let mut entries = vec![UNCLAIMED; m as usize];
        // One pass per permutation position. A walk visits every slot once
        // in `m` positions and the quotas add up to `m`, so every walker
        // fills its quota within `m` passes: the loop is bounded.
        for _ in 0..m {
            walkers.retain_mut(|w| {
                let slot = w.walk.next;
                w.walk.next = step(slot, w.walk.skip, m);
                if entries[slot as usize] == UNCLAIMED {
                    entries[slot as usize] = w.owner;
                    w.quota -= 1;
                }
                w.quota > 0
            });
            if walkers.is_empty() {
                break;
            }
        }
        debug_assert!(entries.iter().all(|&e| e != UNCLAIMED));
        MaglevTable { entries }
    }

    /// The number of slots (0 for a table without backends).
    pub fn size(&self) -> usize {
        self.entries.len()
    }

    /// Slot -> backend index, as it goes into the BPF map.
    pub fn entries(&self) -> &[u32] {
        &self.entries
    }

    /// The slot a flow hash falls in, as the datapath computes it.
    pub fn slot(&self, hash: u32) -> Option<usize> {
        (!self.entries.is_empty()).then(|| hash as usize % self.entries.len())
    }

    /// The backend index for a flow hash, or `None` without backends.
    pub fn lookup(&self, hash: u32) -> Option<usize> {
        self.slot(hash).map(|s| self.entries[s] as usize)
    }

    /// How many slots each backend index owns (`len` = number of backends).
    pub fn shares(&self, backends: usize) -> Vec<usize> {
        let mut counts = vec![0; backends];
        for &e in &self.entries {
            counts[e as usize] += 1;
        }
        counts
    }
}

/// A backend on its walk, with the slots it still has to take.
struct Walker {
    walk: Permutation,
    owner: u32,
    quota: u32,
}

/// `size` split in proportion to `weights` (all > 0), by largest
/// remainder: each quota is `floor(size * w / sum)` or one more, the extra
/// slots going to the largest remainders (ties to the earlier backend, in
/// address order), so the quotas add up to `size` exactly.
fn quotas(weights: &[u64], size: u32) -> Vec<u32> {
    let total: u64 = weights.iter().sum();
    let size = u64::from(size);
    let mut quotas: Vec<u32> = weights.iter().map(|w| (size * w / total) as u32).collect();
    let given: u64 = quotas.iter().map(|&q| u64::from(q)).sum();
    let mut by_remainder: Vec<usize> = (0..weights.len()).collect();
    by_remainder.sort_by_key(|&i| std::cmp::Reverse(size * weights[i] % total));
    for &i in by_remainder.iter().take((size - given) as usize) {
        quotas[i] += 1;
    }
    quotas
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_exactly_the_listed_primes() {
        assert_eq!(
            "16381".parse::<MaglevTableSize>(),
            Ok(MaglevTableSize::DEFAULT)
        );
        assert_eq!(MaglevTableSize::default().get(), 16381);
        for bad in ["16383", "0", "65537", "big", "-251"] {
            let err = bad.parse::<MaglevTableSize>().unwrap_err();
            assert!(
                err.to_string().contains("vipr.io/maglev-table-size"),
                "{err}"
            );
        }
        for s in MaglevTableSize::ALL {
            let n = s.get();
            assert!(
                (2..n).take_while(|d| d * d <= n).all(|d| n % d != 0),
                "{n} is not prime"
            );
        }
    }

    #[test]
    fn seed_parses_decimal_and_hex() {
        assert_eq!("42".parse::<MaglevSeed>(), Ok(MaglevSeed::new(42)));
        assert_eq!("0x2A".parse::<MaglevSeed>(), Ok(MaglevSeed::new(42)));
        assert!("forty-two".parse::<MaglevSeed>().is_err());
    }

    #[test]
    fn step_wraps_without_division() {
        assert_eq!(step(5, 3, 7), 1);
        assert_eq!(step(2, 3, 7), 5);
        assert_eq!(step(u32::MAX - 1, u32::MAX - 1, u32::MAX), u32::MAX - 2);
    }

    #[test]
    fn quotas_split_the_table_exactly_by_weight() {
        assert_eq!(quotas(&[1, 1, 1], 10), [4, 3, 3]);
        assert_eq!(quotas(&[3, 1], 251), [188, 63]);
        assert_eq!(quotas(&[65535, 1], 251), [251, 0]);
        for weights in [&[1u64, 2, 3, 4, 5, 6, 7][..], &[1, 1000, 1, 1000, 1], &[7]] {
            for size in [251, 16381, 65521] {
                let q = quotas(weights, size);
                assert_eq!(
                    q.iter().map(|&q| u64::from(q)).sum::<u64>(),
                    u64::from(size)
                );
                let total: u64 = weights.iter().sum();
                for (w, q) in weights.iter().zip(q) {
                    let ideal = f64::from(size) * *w as f64 / total as f64;
                    assert!((f64::from(q) - ideal).abs() < 1.0, "{weights:?} {size}");
                }
            }
        }
    }

    #[test]
    fn table_without_accepting_backends_is_empty() {
        let b = Backend::new("10.0.0.1:80".parse().unwrap()).with_weight(crate::Weight::DRAIN);
        let t = MaglevTable::build(&[b], MaglevTableSize::DEFAULT, MaglevSeed::DEFAULT);
        assert_eq!(t.size(), 0);
        assert_eq!(t.lookup(123), None);
    }
}
