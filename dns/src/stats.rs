//! Counters the server keeps and the agent exports as metrics ([`DnsStats`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A point-in-time copy of the server's counters (monotonic since start).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsStats {
    /// Messages received that had a parseable header (UDP datagrams and TCP messages).
    pub queries: u64,
    /// Answered from the cluster zone (any rcode).
    pub local_answers: u64,
    /// NXDOMAIN responses, local or forwarded.
    pub nxdomain: u64,
    /// Queries sent upstream (cache misses).
    pub forwarded: u64,
    /// Out-of-zone queries answered from the cache.
    pub cache_hits: u64,
    /// REFUSED: recursion asked by a client outside the allowed CIDRs.
    pub refused: u64,
    /// FORMERR or NOTIMP replies to malformed or unsupported queries.
    pub formerr: u64,
    /// Input dropped without a reply (too short for a header, or a response packet).
    pub dropped: u64,
    /// SERVFAIL: every upstream failed or the forwarding limit was hit.
    pub servfail: u64,
    /// UDP responses truncated (TC set) to fit the client's payload size.
    pub truncated: u64,
    /// Snapshot updates applied.
    pub updates: u64,
}

/// The live counters, shared by all tasks.
#[derive(Default)]
pub(crate) struct Counters {
    pub queries: AtomicU64,
    pub local_answers: AtomicU64,
    pub nxdomain: AtomicU64,
    pub forwarded: AtomicU64,
    pub cache_hits: AtomicU64,
    pub refused: AtomicU64,
    pub formerr: AtomicU64,
    pub dropped: AtomicU64,
    pub servfail: AtomicU64,
    pub truncated: AtomicU64,
    pub updates: AtomicU64,
}

impl Counters {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> DnsStats {
        DnsStats {
            queries: self.queries.load(Relaxed),
            local_answers: self.local_answers.load(Relaxed),
            nxdomain: self.nxdomain.load(Relaxed),
            forwarded: self.forwarded.load(Relaxed),
            cache_hits: self.cache_hits.load(Relaxed),
            refused: self.refused.load(Relaxed),
            formerr: self.formerr.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            servfail: self.servfail.load(Relaxed),
            truncated: self.truncated.load(Relaxed),
            updates: self.updates.load(Relaxed),
        }
    }
}
