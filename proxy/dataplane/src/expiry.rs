//! Expiring idle flows from conntrack.
//!
//! The CONNTRACK table never evicts: a full neighbourhood refuses new flows
//! (counted as `drop_flow_map_full`) rather than silently dropping a live
//! one, and flows that end without a close the eBPF side can see (UDP, a
//! TCP peer that vanished, a SYN never answered) are removed here once idle
//! past their timeout. Every entry carries `last_seen`, the eBPF side's
//! coarse monotonic clock at its last packet.
//!
//! A pass maps the table, walks its slots and removes the idle flows in
//! place; the agent runs it on its own map handle, off the lock that
//! programs services.

use std::{os::fd::AsFd, time::Duration};

use aya::maps::{Map, MapData};
use vipr_common::{
    FLOW_CLOCK_SHIFT, FlowKey, IPPROTO_TCP, NatEntry, flow_flags,
    flow_table::{SLOTS_PER_FLOW, TableShape},
    map_names,
};

use crate::{
    Dataplane, DataplaneError,
    flows::{ConntrackTable, conntrack_shape, is_reply},
};

/// How long a flow may stay idle (no packet either way) before it expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowTimeouts {
    /// TCP whose backend answered, no FIN seen (Cilium's default; Linux
    /// keeps established TCP for 5 days).
    pub tcp_established: Duration,
    /// TCP after a FIN either way, and closed TCP (FINs both ways and the
    /// last ACK): netfilter's TIME_WAIT, shorter. Until then a late packet
    /// of the connection is still translated; a SYN on its tuple replaces it.
    pub tcp_closing: Duration,
    /// UDP whose backend answered.
    pub udp: Duration,
    /// Any flow whose backend never answered: an unanswered SYN (e.g. a
    /// SYN flood) or datagram.
    pub unanswered: Duration,
}

impl Default for FlowTimeouts {
    fn default() -> Self {
        FlowTimeouts {
            tcp_established: Duration::from_secs(6 * 3600),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(120),
            unanswered: Duration::from_secs(60),
        }
    }
}

/// What one expiry pass found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expiry {
    /// Flows still in conntrack after the pass.
    pub flows: usize,
    /// Flows removed as idle.
    pub expired: usize,
    /// Flows the table is sized for (`--max-flows` rounded up to its
    /// power-of-two size): it holds these at least, and refuses (counted)
    /// only what lands in a full neighbourhood beyond.
    pub capacity: u32,
}

/// A handle of its own on the conntrack map, for expiry passes that do not
/// hold the [`Dataplane`] (see [`Dataplane::flow_expirer`]).
pub struct FlowExpirer {
    map: MapData,
    shape: TableShape,
}

impl FlowExpirer {
    /// Removes every flow idle past its timeout (both of its entries).
    pub fn expire_idle(&mut self, timeouts: &FlowTimeouts) -> Result<Expiry, DataplaneError> {
        let table = ConntrackTable::map(self.map.fd().as_fd(), self.shape)?;
        let capacity = self.shape.mask.wrapping_add(1) / SLOTS_PER_FLOW;
        Ok(expire_idle(&table, capacity, timeouts))
    }
}

impl Dataplane {
    /// A second handle on the conntrack map for [`FlowExpirer::expire_idle`].
    pub fn flow_expirer(&self) -> Result<FlowExpirer, DataplaneError> {
        let name = map_names::CONNTRACK;
        let Some(Map::Array(data)) = self.ebpf().map(name) else {
            return Err(DataplaneError::MissingMap(name));
        };
        let info = data.info().map_err(DataplaneError::map(name))?;
        let data = MapData::from_id(info.id()).map_err(DataplaneError::map(name))?;
        Ok(FlowExpirer {
            map: data,
            shape: conntrack_shape(self.ebpf())?,
        })
    }

    /// [`FlowExpirer::expire_idle`] through this data plane's own handle.
    pub fn expire_idle_flows(&mut self, timeouts: &FlowTimeouts) -> Result<Expiry, DataplaneError> {
        self.flow_expirer()?.expire_idle(timeouts)
    }
}

/// Conntrack's clock now, as the eBPF side reads it
/// (`bpf_ktime_get_coarse_ns() >> FLOW_CLOCK_SHIFT`).
pub(crate) fn flow_clock_now() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC_COARSE always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    let ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    (ns >> FLOW_CLOCK_SHIFT) as u32
}

fn ticks(d: Duration) -> u32 {
    u32::try_from(d.as_nanos() >> FLOW_CLOCK_SHIFT).unwrap_or(u32::MAX)
}

/// Ticks since `last_seen`; a stamp from "after now" (a packet during the
/// pass) counts as fresh.
pub(crate) fn idle_ticks(now: u32, last_seen: u32) -> u32 {
    let age = now.wrapping_sub(last_seen);
    if age > u32::MAX / 2 { 0 } else { age }
}

/// A flow key as one number, to sort and search by.
fn sort_key(key: &FlowKey) -> u128 {
    (u128::from(key.src_addr) << 96)
        | (u128::from(key.dst_addr) << 64)
        | (u128::from(key.src_port) << 48)
        | (u128::from(key.dst_port) << 32)
        | u128::from(key.proto)
}

/// The timeout of a flow from its forward entry and (if present) its reply entry.
fn timeout_of(
    key: &FlowKey,
    forward: &NatEntry,
    reply: Option<&NatEntry>,
    t: &FlowTimeouts,
) -> Duration {
    let answered = reply.is_some_and(|r| r.flags & flow_flags::SEEN != 0);
    let closing = forward.flags & flow_flags::FIN != 0
        || reply.is_some_and(|r| r.flags & flow_flags::FIN != 0);
    match (key.proto == IPPROTO_TCP, answered) {
        (_, false) => t.unanswered,
        (true, true) if closing => t.tcp_closing,
        (true, true) => t.tcp_established,
        (false, true) => t.udp,
    }
}

fn expire_idle(table: &ConntrackTable, capacity: u32, timeouts: &FlowTimeouts) -> Expiry {
    // An entry removed or added while we read is missed or seen: either is fine.
    let (mut replies, forwards): (Vec<_>, Vec<_>) = table
        .entries()
        .into_iter()
        .partition(|(_, entry, _)| is_reply(entry));
    // Read after the table, so no stamp read is newer than `now`.
    let now = flow_clock_now();
    // Sorted, so each forward entry finds its reply by binary search.
    replies.sort_unstable_by_key(|(key, _, _)| sort_key(key));
    let mut paired = vec![false; replies.len()];
    let mut expired = 0;
    let mut removed_entries = 0;
    for (key, entry, found) in &forwards {
        let reply_key = entry.tuple(key.proto).reversed();
        let reply = replies
            .binary_search_by_key(&sort_key(&reply_key), |(k, _, _)| sort_key(k))
            .ok();
        if let Some(i) = reply {
            paired[i] = true;
        }
        let reply = reply.map(|i| &replies[i]);
        let idle = reply.map_or(idle_ticks(now, entry.last_seen), |(_, r, _)| {
            idle_ticks(now, entry.last_seen).min(idle_ticks(now, r.last_seen))
        });
        if idle > ticks(timeout_of(key, entry, reply.map(|(_, r, _)| r), timeouts))
            // Re-read just before removing: a flow that got a packet during
            // the walk (a long-idle connection resuming) stays. One whose
            // packet lands in the nanoseconds between this check and the
            // removal loses its entry; its next packet opens it again.
            && table.unused_since(found, entry)
            && reply.is_none_or(|(_, r, reply_found)| table.unused_since(reply_found, r))
        {
            if table.remove(found) {
                expired += 1;
                removed_entries += 1;
            }
            if let Some((_, _, reply_found)) = reply
                && table.remove(reply_found)
            {
                removed_entries += 1;
            }
        }
    }
    // A reply entry without its forward entry can only be a leftover.
    for ((_, entry, found), paired) in replies.iter().zip(paired) {
        if !paired
            && idle_ticks(now, entry.last_seen) > ticks(timeouts.unanswered)
            && table.remove(found)
        {
            removed_entries += 1;
        }
    }
    if removed_entries > 0 {
        tracing::debug!(expired, entries = removed_entries, "expired idle flows");
    }
    Expiry {
        flows: forwards.len() - expired,
        expired,
        capacity,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vipr_common::IPPROTO_UDP;

    fn entry(flags: u8) -> NatEntry {
        NatEntry {
            src_addr: 1,
            dst_addr: 2,
            src_port: 3,
            dst_port: 4,
            flags,
            _pad: 0,
            stamp_tick: 0,
            ip_check_delta: 0,
            l4_check_delta: 0,
            last_seen: 0,
            stats_id: 0,
        }
    }

    fn key(proto: u8) -> FlowKey {
        FlowKey {
            src_addr: 5,
            dst_addr: 6,
            src_port: 7,
            dst_port: 8,
            proto,
            _pad: 0,
            _pad2: 0,
        }
    }

    #[test]
    fn timeouts_follow_the_flow_state() {
        let t = FlowTimeouts::default();
        let tcp = key(IPPROTO_TCP);
        let fwd = entry(0);
        let answered = entry(flow_flags::REPLY | flow_flags::SEEN);
        let silent = entry(flow_flags::REPLY);
        assert_eq!(timeout_of(&tcp, &fwd, Some(&silent), &t), t.unanswered);
        assert_eq!(timeout_of(&tcp, &fwd, None, &t), t.unanswered);
        assert_eq!(
            timeout_of(&tcp, &fwd, Some(&answered), &t),
            t.tcp_established
        );
        let closing = entry(flow_flags::FIN);
        assert_eq!(
            timeout_of(&tcp, &closing, Some(&answered), &t),
            t.tcp_closing
        );
        assert_eq!(
            timeout_of(&key(IPPROTO_UDP), &fwd, Some(&answered), &t),
            t.udp
        );
    }

    #[test]
    fn idle_time_is_wrap_safe() {
        assert_eq!(idle_ticks(10, 4), 6);
        assert_eq!(idle_ticks(3, u32::MAX - 2), 6);
        assert_eq!(idle_ticks(4, 10), 0, "a stamp after now is fresh");
    }
}
