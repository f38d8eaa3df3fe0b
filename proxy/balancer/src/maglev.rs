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
//! Weights follow Cilium: a backend takes a turn to claim its next preferred
//! slot only while the turns it has had stay within its weighted share, so
//! backend `i` ends up with about `size * w_i / sum(w)` slots. With equal
//! weights this is exactly the paper's round-robin population.
//!
//! After a backend is added or removed, Maglev moves only slightly more
//! entries than the minimum (the entries the changed backend gains or loses);
//! the disruption tests pin that down.

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

    /// Claims the first unclaimed slot on this backend's walk for `owner`.
    fn claim(&mut self, entries: &mut [u32], owner: u32) {
        let size = entries.len() as u32;
        let mut slot = self.next;
        while entries[slot as usize] != UNCLAIMED {
            slot = step(slot, self.skip, size);
        }
        entries[slot as usize] = owner;
        self.next = step(slot, self.skip, size);
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
        let mut walks: Vec<Permutation> = eligible
            .iter()
            .map(|&i| Permutation::of(&backends[i], m, seed))
            .collect();
        let weights: Vec<u64> = eligible
            .iter()
            .map(|&i| u64::from(backends[i].weight.get()))
            .collect();
        let mut entries = vec![UNCLAIMED; m as usize];
        let mut turns = WeightedTurns::new(weights);
        for turn in 0..u64::from(m) {
            let i = turns.next(turn);
            walks[i].claim(&mut entries, eligible[i] as u32);
        }
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

/// Cilium's weighted turn order: turn `n` starts at backend `n % count` and
/// moves on past every backend that has already had its share of the first
/// `n + 1` turns (`used_i > (n + 1) * w_i`, where each turn costs `sum(w)`).
///
/// Cilium scans linearly, which costs O(size * count) when one backend's
/// weight dwarfs the others' (30 ms for 1,000 backends at 65521). This finds
/// the same backend, but skips whole blocks of backends that are all still
/// over their share. With equal weights nobody is ever skipped (after `k`
/// turns of its own, backend `i` is eligible from turn `k * count - 1`, and
/// its next turn is `k * count + i`), so no bookkeeping is kept at all.
struct WeightedTurns {
    weights: Vec<u64>,
    used: Vec<u64>,
    total: u64,
    /// Each backend's first eligible turn; `None` when all weights are equal.
    eligible_from: Option<BlockMin>,
}

impl WeightedTurns {
    fn new(weights: Vec<u64>) -> Self {
        let total = weights.iter().sum();
        let used = vec![0; weights.len()];
        let uniform = weights.windows(2).all(|w| w[0] == w[1]);
        let eligible_from = (!uniform).then(|| BlockMin::new(weights.len()));
        WeightedTurns {
            weights,
            used,
            total,
            eligible_from,
        }
    }

    /// Whose turn `turn` is. Some backend is always eligible: the shares of
    /// the first `turn + 1` turns add up to more than the turns taken.
    fn next(&mut self, turn: u64) -> usize {
        let start = (turn % self.weights.len() as u64) as usize;
        let Some(eligible_from) = &mut self.eligible_from else {
            return start;
        };
        let i = eligible_from
            .first_at_most(start, turn)
            .or_else(|| eligible_from.first_at_most(0, turn))
            .expect("some backend is under its share");
        self.used[i] += self.total;
        // Eligible at turn n  <=>  (n + 1) * w >= used  <=>  n >= ceil(used / w) - 1.
        eligible_from.raise(i, self.used[i].div_ceil(self.weights[i]) - 1);
        i
    }
}

/// Backends per block of [`BlockMin`]: small enough that rescanning a block
/// is cheap, large enough that 1,000 backends are ~32 blocks.
const BLOCK: usize = 32;

/// Values that only ever grow, with the minimum of each block of [`BLOCK`]
/// kept, to find the first value `<= bound` from an index on.
struct BlockMin {
    values: Vec<u64>,
    block_min: Vec<u64>,
}

impl BlockMin {
    /// `len` values, all 0.
    fn new(len: usize) -> Self {
        BlockMin {
            values: vec![0; len],
            block_min: vec![0; len.div_ceil(BLOCK)],
        }
    }

    fn block(&self, b: usize) -> &[u64] {
        &self.values[b * BLOCK..((b + 1) * BLOCK).min(self.values.len())]
    }

    /// Sets `values[index]` to `value`, which is not lower than before.
    fn raise(&mut self, index: usize, value: u64) {
        let old = std::mem::replace(&mut self.values[index], value);
        let b = index / BLOCK;
        // Only raising the block's (or a tied) minimum can change it.
        if old == self.block_min[b] {
            self.block_min[b] = self.block(b).iter().copied().min().unwrap_or(u64::MAX);
        }
    }

    /// The first index `>= from` whose value is `<= bound`.
    fn first_at_most(&self, from: usize, bound: u64) -> Option<usize> {
        let first_block = from / BLOCK;
        let partial = (from..((first_block + 1) * BLOCK).min(self.values.len()))
            .find(|&i| self.values[i] <= bound);
        partial.or_else(|| {
            (first_block + 1..self.block_min.len())
                .find(|&b| self.block_min[b] <= bound)
                .and_then(|b| {
                    let offset = self.block(b).iter().position(|&v| v <= bound)?;
                    Some(b * BLOCK + offset)
                })
        })
    }
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

    /// Cilium's linear scan, kept as the specification of [`WeightedTurns`].
    fn cilium_turns(weights: &[u64], turns: u64) -> Vec<usize> {
        let total: u64 = weights.iter().sum();
        let mut used = vec![0u64; weights.len()];
        (0..turns)
            .map(|n| {
                let mut i = (n % weights.len() as u64) as usize;
                while (n + 1) * weights[i] < used[i] {
                    i = (i + 1) % weights.len();
                }
                used[i] += total;
                i
            })
            .collect()
    }

    #[test]
    fn weighted_turns_match_cilium_linear_scan() {
        let cases: [&[u64]; 6] = [
            &[1, 1, 1],
            &[3, 1, 2],
            &[65535, 1, 1, 1, 1, 1, 1],
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
            &[7],
            &[1, 1000, 1, 1000, 1],
        ];
        for weights in cases {
            let mut turns = WeightedTurns::new(weights.to_vec());
            let ours: Vec<usize> = (0..2039).map(|n| turns.next(n)).collect();
            assert_eq!(ours, cilium_turns(weights, 2039), "weights {weights:?}");
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
