//! The reference backend selection: one function, [`select_backend`], for
//! every algorithm, plus the explanation of each decision.
//!
//! The eBPF datapath implements the same rules; this module is the
//! specification it is tested against and what `vipr trace` runs to say why a
//! flow went where it went. It is deterministic: randomness comes from a
//! seeded generator in [`SelectState`] and time from [`SelectState::set_now`].
//!
//! Rules common to all algorithms:
//! - a backend with weight 0 never gets a new flow (IPVS semantics);
//! - ties go to the backend that comes first in the slice;
//! - with ClientIP session affinity, a client whose last new flow was less
//!   than the timeout ago gets the same backend again, if that backend still
//!   exists and still accepts new flows; otherwise the algorithm chooses and
//!   the choice is remembered.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::algorithm::Algorithm;
use crate::backend::{Backend, Weight};
use crate::config::{AffinityTimeout, ServiceBalancing, SessionAffinity};
use crate::flow::Flow;
use crate::maglev::{MaglevSeed, MaglevTable, MaglevTableSize};

/// No backend can take a new flow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("service has no backends")]
    NoBackends,
    #[error("all {count} backends are drained (weight 0): no new flows")]
    AllDrained { count: usize },
}

/// A backend that `random` may pick, with its chance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub index: usize,
    pub addr: SocketAddr,
    pub weight: Weight,
    /// `weight / sum(weights)`, in 0..=1.
    pub probability: f64,
}

/// Why the chosen backend was chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    /// Session affinity: the client's previous flow went there `age` ago.
    Affinity {
        client: IpAddr,
        age: Duration,
        timeout: AffinityTimeout,
    },
    /// [`scale`]`(draw, total weight)` fell in this backend's weight range.
    Random {
        draw: u32,
        candidates: Vec<Candidate>,
    },
    /// The next backend in turn.
    RoundRobin,
    /// IPVS wrr: the backend's weight reaches the current weight threshold.
    WeightedRoundRobin { current_weight: u32 },
    /// Fewest active connections.
    LeastConnection { active: u32 },
    /// [`scale`]`(hash, total_weight)` of the client address fell in this backend's range.
    SourceHash { hash: u32, total_weight: u64 },
    /// [`scale`]`(hash, total_weight)` of the destination address fell in this range.
    DestinationHash { hash: u32, total_weight: u64 },
    /// Minimal `(active + 1) / weight`.
    ShortestExpectedDelay { active: u32, weight: Weight },
    /// `idle`: it had no connection; otherwise as `sed`.
    NeverQueue {
        idle: bool,
        active: u32,
        weight: Weight,
    },
    /// The flow hash's slot in the Maglev table.
    Maglev {
        hash: u32,
        slot: usize,
        table_size: usize,
    },
}

/// The outcome of [`select_backend`].
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Index into the backend slice.
    pub index: usize,
    pub backend: SocketAddr,
    pub reason: Reason,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (backend #{}): ", self.backend, self.index)?;
        match &self.reason {
            Reason::Affinity {
                client,
                age,
                timeout,
            } => write!(
                f,
                "session affinity: {client} was sent here {}s ago (timeout {}s)",
                age.as_secs(),
                timeout.seconds()
            ),
            Reason::Random { draw, candidates } => {
                write!(f, "random draw {draw:#010x} among")?;
                for c in candidates {
                    write!(f, " {} {:.1}%", c.addr, c.probability * 100.0)?;
                }
                Ok(())
            }
            Reason::RoundRobin => f.write_str("round robin: next in turn"),
            Reason::WeightedRoundRobin { current_weight } => {
                write!(
                    f,
                    "weighted round robin: weight >= current weight {current_weight}"
                )
            }
            Reason::LeastConnection { active } => {
                write!(f, "least connection: {active} active, the fewest")
            }
            Reason::SourceHash { hash, total_weight } => write!(
                f,
                "source hash {hash:#010x} scaled to total weight {total_weight} = {}",
                scale(*hash, *total_weight)
            ),
            Reason::DestinationHash { hash, total_weight } => write!(
                f,
                "destination hash {hash:#010x} scaled to total weight {total_weight} = {}",
                scale(*hash, *total_weight)
            ),
            Reason::ShortestExpectedDelay { active, weight } => {
                write!(
                    f,
                    "shortest expected delay: ({active}+1)/{weight}, the smallest"
                )
            }
            Reason::NeverQueue { idle: true, .. } => f.write_str("never queue: idle backend"),
            Reason::NeverQueue {
                idle: false,
                active,
                weight,
            } => {
                write!(
                    f,
                    "never queue: none idle, shortest expected delay ({active}+1)/{weight}"
                )
            }
            Reason::Maglev {
                hash,
                slot,
                table_size,
            } => {
                write!(
                    f,
                    "maglev: flow hash {hash:#010x} -> slot {slot} of {table_size}"
                )
            }
        }
    }
}

/// SplitMix64: tiny, seedable and good enough to stand in for the
/// datapath's `bpf_get_prandom_u32()` in tests and traces.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 32) as u32
    }
}

/// IPVS wrr's cursor: the last backend picked and the current weight.
#[derive(Debug, Clone, Copy, Default)]
struct WrrCursor {
    last: Option<usize>,
    current_weight: u32,
}

/// The Maglev table of the last backend set seen, rebuilt when it changes.
#[derive(Debug, Clone)]
struct MaglevCache {
    key: Vec<(SocketAddr, Weight)>,
    size: MaglevTableSize,
    seed: MaglevSeed,
    table: MaglevTable,
}

#[derive(Debug, Clone, Copy)]
struct Sticky {
    backend: SocketAddr,
    last_used: Duration,
}

/// Everything a service's balancing remembers between flows.
#[derive(Debug, Clone)]
pub struct SelectState {
    rng: SplitMix64,
    rr_next: usize,
    wrr: WrrCursor,
    maglev: Option<MaglevCache>,
    affinity: HashMap<IpAddr, Sticky>,
    now: Duration,
}

impl Default for SelectState {
    fn default() -> Self {
        Self::new(0)
    }
}

impl SelectState {
    /// Fresh state whose random draws are determined by `seed`.
    pub fn new(seed: u64) -> Self {
        SelectState {
            rng: SplitMix64(seed),
            rr_next: 0,
            wrr: WrrCursor::default(),
            maglev: None,
            affinity: HashMap::new(),
            now: Duration::ZERO,
        }
    }

    /// Sets the clock session affinity is measured with.
    pub fn set_now(&mut self, now: Duration) {
        self.now = now;
    }

    fn maglev_table(
        &mut self,
        backends: &[Backend],
        size: MaglevTableSize,
        seed: MaglevSeed,
    ) -> &MaglevTable {
        let key: Vec<(SocketAddr, Weight)> = backends.iter().map(|b| (b.addr, b.weight)).collect();
        let stale = self
            .maglev
            .as_ref()
            .is_none_or(|c| c.key != key || c.size != size || c.seed != seed);
        if stale {
            let table = MaglevTable::build(backends, size, seed);
            self.maglev = Some(MaglevCache {
                key,
                size,
                seed,
                table,
            });
        }
        &self.maglev.as_ref().expect("just filled").table
    }

    /// The remembered backend of the flow's client, if still usable.
    fn sticky(
        &self,
        backends: &[Backend],
        flow: &Flow,
        timeout: AffinityTimeout,
    ) -> Option<Decision> {
        let client = flow.src.ip();
        let entry = self.affinity.get(&client)?;
        let age = self.now.saturating_sub(entry.last_used);
        if age > timeout.as_duration() {
            return None;
        }
        let index = backends
            .iter()
            .position(|b| b.addr == entry.backend && b.weight.accepts_new_flows())?;
        Some(Decision {
            index,
            backend: entry.backend,
            reason: Reason::Affinity {
                client,
                age,
                timeout,
            },
        })
    }

    fn remember(&mut self, client: IpAddr, backend: SocketAddr) {
        self.affinity.insert(
            client,
            Sticky {
                backend,
                last_used: self.now,
            },
        );
    }
}

/// Chooses the backend for a new flow.
pub fn select_backend(
    balancing: &ServiceBalancing,
    backends: &[Backend],
    flow: &Flow,
    state: &mut SelectState,
) -> Result<Decision, SelectError> {
    ensure_selectable(backends)?;
    if let SessionAffinity::ClientIp { timeout } = balancing.affinity
        && let Some(decision) = state.sticky(backends, flow, timeout)
    {
        state.remember(flow.src.ip(), decision.backend);
        return Ok(decision);
    }
    let (index, reason) = choose(balancing, backends, flow, state);
    if matches!(balancing.affinity, SessionAffinity::ClientIp { .. }) {
        state.remember(flow.src.ip(), backends[index].addr);
    }
    Ok(Decision {
        index,
        backend: backends[index].addr,
        reason,
    })
}

fn ensure_selectable(backends: &[Backend]) -> Result<(), SelectError> {
    if backends.is_empty() {
        Err(SelectError::NoBackends)
    } else if !backends.iter().any(|b| b.weight.accepts_new_flows()) {
        Err(SelectError::AllDrained {
            count: backends.len(),
        })
    } else {
        Ok(())
    }
}

/// The algorithm proper; `backends` has at least one accepting backend.
fn choose(
    balancing: &ServiceBalancing,
    backends: &[Backend],
    flow: &Flow,
    state: &mut SelectState,
) -> (usize, Reason) {
    match balancing.algorithm {
        Algorithm::Random => random(backends, state),
        Algorithm::RoundRobin => (round_robin(backends, state), Reason::RoundRobin),
        Algorithm::WeightedRoundRobin => weighted_round_robin(backends, state),
        Algorithm::LeastConnection => least_connection(backends),
        Algorithm::SourceHash => {
            let (hash, total_weight) = (flow.source_hash(), total_weight(backends));
            (
                weighted_point(backends, hash),
                Reason::SourceHash { hash, total_weight },
            )
        }
        Algorithm::DestinationHash => {
            let (hash, total_weight) = (flow.destination_hash(), total_weight(backends));
            (
                weighted_point(backends, hash),
                Reason::DestinationHash { hash, total_weight },
            )
        }
        Algorithm::ShortestExpectedDelay => {
            let i = shortest_expected_delay(backends);
            let b = backends[i];
            (
                i,
                Reason::ShortestExpectedDelay {
                    active: b.active,
                    weight: b.weight,
                },
            )
        }
        Algorithm::NeverQueue => never_queue(backends),
        Algorithm::Maglev => {
            let hash = flow.hash();
            let table =
                state.maglev_table(backends, balancing.maglev_table_size, balancing.maglev_seed);
            let slot = table
                .slot(hash)
                .expect("an accepting backend means a non-empty table");
            let reason = Reason::Maglev {
                hash,
                slot,
                table_size: table.size(),
            };
            (table.entries()[slot] as usize, reason)
        }
    }
}

fn accepting(backends: &[Backend]) -> impl Iterator<Item = (usize, &Backend)> {
    backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.weight.accepts_new_flows())
}

fn total_weight(backends: &[Backend]) -> u64 {
    backends.iter().map(|b| u64::from(b.weight.get())).sum()
}

/// Maps a 32-bit hash or draw onto `0..total` by multiply-shift
/// (`hash * total >> 32`) rather than `hash % total`: the high bits of a
/// one-word jhash are well mixed, its low bits measurably less so over
/// sequential addresses, and the datapath avoids a division. The datapath
/// computes it in u64, which is exact while `total < 2^32`.
pub fn scale(value: u32, total: u64) -> u64 {
    ((u128::from(value) * u128::from(total)) >> 32) as u64
}

/// The backend whose cumulative weight range holds `scale(value, total)`.
/// Shared by `random`, `sh` and `dh`, so all three honour weights the same
/// way; the datapath walks its backend array the same way.
fn weighted_point(backends: &[Backend], value: u32) -> usize {
    let mut point = scale(value, total_weight(backends));
    for (i, b) in accepting(backends) {
        let w = u64::from(b.weight.get());
        if point < w {
            return i;
        }
        point -= w;
    }
    unreachable!("scale() < total weight always falls in some backend's range")
}

/// The candidates `random` chooses among and their odds.
pub fn random_candidates(backends: &[Backend]) -> Vec<Candidate> {
    let total = total_weight(backends) as f64;
    accepting(backends)
        .map(|(index, b)| Candidate {
            index,
            addr: b.addr,
            weight: b.weight,
            probability: f64::from(b.weight.get()) / total,
        })
        .collect()
}

fn random(backends: &[Backend], state: &mut SelectState) -> (usize, Reason) {
    let draw = state.rng.next_u32();
    let reason = Reason::Random {
        draw,
        candidates: random_candidates(backends),
    };
    (weighted_point(backends, draw), reason)
}

fn round_robin(backends: &[Backend], state: &mut SelectState) -> usize {
    let n = backends.len();
    let start = state.rr_next % n;
    let index = (0..n)
        .map(|k| (start + k) % n)
        .find(|&i| backends[i].weight.accepts_new_flows())
        .expect("some backend accepts new flows");
    state.rr_next = (index + 1) % n;
    index
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// IPVS `ip_vs_wrr_schedule`: walk the backends; each time the walk wraps,
/// lower the current weight by the weights' gcd (back to the maximum below
/// 1); pick the first backend whose weight reaches the current weight.
fn weighted_round_robin(backends: &[Backend], state: &mut SelectState) -> (usize, Reason) {
    let weights: Vec<u32> = backends.iter().map(|b| u32::from(b.weight.get())).collect();
    let max = weights.iter().copied().max().unwrap_or(0);
    let step = weights.iter().copied().fold(0, gcd);
    let n = backends.len();
    let WrrCursor {
        mut last,
        current_weight,
    } = state.wrr;
    // Weights may have dropped since the last call.
    let mut cw = current_weight.min(max);
    loop {
        let i = last.map_or(0, |l| (l + 1) % n);
        if i == 0 {
            cw = cw.saturating_sub(step);
            if cw == 0 {
                cw = max;
            }
        }
        last = Some(i);
        if weights[i] >= cw {
            state.wrr = WrrCursor {
                last,
                current_weight: cw,
            };
            return (i, Reason::WeightedRoundRobin { current_weight: cw });
        }
    }
}

fn least_connection(backends: &[Backend]) -> (usize, Reason) {
    let (i, b) = accepting(backends)
        .min_by_key(|(_, b)| b.active)
        .expect("some backend accepts new flows");
    (i, Reason::LeastConnection { active: b.active })
}

/// Whether `a` has a strictly smaller `(active + 1) / weight` than `b`,
/// compared by cross-multiplying, as IPVS does, to stay in integers.
fn lower_expected_delay(a: &Backend, b: &Backend) -> bool {
    let cost = |x: &Backend, y: &Backend| (u64::from(x.active) + 1) * u64::from(y.weight.get());
    cost(a, b) < cost(b, a)
}

fn shortest_expected_delay(backends: &[Backend]) -> usize {
    accepting(backends)
        .reduce(|best, cur| {
            if lower_expected_delay(cur.1, best.1) {
                cur
            } else {
                best
            }
        })
        .map(|(i, _)| i)
        .expect("some backend accepts new flows")
}

fn never_queue(backends: &[Backend]) -> (usize, Reason) {
    let (index, idle) = match accepting(backends).find(|(_, b)| b.active == 0) {
        Some((i, _)) => (i, true),
        None => (shortest_expected_delay(backends), false),
    };
    let b = backends[index];
    (
        index,
        Reason::NeverQueue {
            idle,
            active: b.active,
            weight: b.weight,
        },
    )
}
