//! The change feed: every committed change becomes an [`Event`] in a bounded in-memory
//! log ordered by revision. A [`Watcher`] follows the log from a revision; together
//! with [`crate::Store::snapshot`] (a consistent list at one revision) this is the
//! Kubernetes list-then-watch pattern the reconciler uses.
//!
//! A log rather than a channel per subscriber: a slow consumer never blocks writers or
//! grows memory without bound; if it falls behind the retained window it gets
//! [`WatchError::Compacted`] and re-lists, exactly like a 410 Gone from an API server.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::object::Object;

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change. For `Deleted`, `object` is the last stored state (with the deletion's
/// revision as its `resourceVersion`).
#[derive(Debug, Clone)]
pub struct Event {
    pub event_type: EventType,
    pub object: Arc<Object>,
    pub revision: u64,
}

/// Why a watcher cannot continue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    #[error(
        "revision {requested} is no longer in the change log (oldest kept: {oldest}); list again"
    )]
    Compacted { requested: u64, oldest: u64 },
}

#[derive(Debug)]
struct Log {
    events: VecDeque<Event>,
    /// Revision of the last committed change (events may be fewer after compaction).
    revision: u64,
    /// Everything up to and including this revision was dropped from `events`.
    compacted_through: u64,
    capacity: usize,
}

/// Shared between the store (producer) and its watchers.
#[derive(Debug)]
pub(crate) struct Feed {
    log: Mutex<Log>,
    changed: Condvar,
    notify: tokio::sync::watch::Sender<u64>,
}

impl Feed {
    pub(crate) fn new(revision: u64, capacity: usize) -> Arc<Feed> {
        let (notify, _) = tokio::sync::watch::channel(revision);
        Arc::new(Feed {
            log: Mutex::new(Log {
                events: VecDeque::new(),
                revision,
                compacted_through: revision,
                capacity: capacity.max(1),
            }),
            changed: Condvar::new(),
            notify,
        })
    }

    /// Appends one committed batch (revisions increasing) and wakes watchers.
    pub(crate) fn publish(&self, events: Vec<Event>) {
        let Some(last) = events.last().map(|e| e.revision) else {
            return;
        };
        {
            let mut log = self.log.lock().expect("feed lock");
            log.events.extend(events);
            log.revision = last;
            while log.events.len() > log.capacity {
                let dropped = log.events.pop_front().expect("non-empty");
                log.compacted_through = dropped.revision;
            }
        }
        self.changed.notify_all();
        self.notify.send_replace(last);
    }

    /// Events after `revision`, or `Compacted` if some of them are gone.
    fn since(&self, revision: u64) -> Result<Vec<Event>, WatchError> {
        let log = self.log.lock().expect("feed lock");
        Self::since_locked(&log, revision)
    }

    fn since_locked(log: &Log, revision: u64) -> Result<Vec<Event>, WatchError> {
        if revision < log.compacted_through {
            return Err(WatchError::Compacted {
                requested: revision,
                oldest: log.compacted_through + 1,
            });
        }
        let start = log.events.partition_point(|e| e.revision <= revision);
        Ok(log.events.range(start..).cloned().collect())
    }

    pub(crate) fn watch(self: &Arc<Feed>, from_revision: u64) -> Watcher {
        Watcher {
            feed: Arc::clone(self),
            revision: from_revision,
            notify: self.notify.subscribe(),
        }
    }
}

/// Follows the change feed from a revision. Each call returns the events committed
/// since the previous one, in revision order.
#[derive(Debug)]
pub struct Watcher {
    feed: Arc<Feed>,
    revision: u64,
    notify: tokio::sync::watch::Receiver<u64>,
}

impl Watcher {
    /// The revision this watcher has delivered everything up to.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn advance(&mut self, events: &[Event]) {
        if let Some(last) = events.last() {
            self.revision = last.revision;
        }
    }

    /// Pending events without waiting (possibly none).
    pub fn try_next(&mut self) -> Result<Vec<Event>, WatchError> {
        let events = self.feed.since(self.revision)?;
        self.advance(&events);
        Ok(events)
    }

    /// Waits until there is at least one event (for async consumers).
    pub async fn next(&mut self) -> Result<Vec<Event>, WatchError> {
        loop {
            self.notify.mark_unchanged();
            let events = self.try_next()?;
            if !events.is_empty() {
                return Ok(events);
            }
            if self.notify.changed().await.is_err() {
                // The store is gone: nothing more will ever arrive.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits up to `timeout` for events (for threads without a runtime); an empty
    /// vector means the timeout passed.
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Vec<Event>, WatchError> {
        let deadline = Instant::now() + timeout;
        let feed = Arc::clone(&self.feed);
        let mut log = feed.log.lock().expect("feed lock");
        let events = loop {
            let events = Feed::since_locked(&log, self.revision)?;
            let now = Instant::now();
            if !events.is_empty() || now >= deadline {
                break events;
            }
            log = feed
                .changed
                .wait_timeout(log, deadline - now)
                .expect("feed lock")
                .0;
        };
        drop(log);
        self.advance(&events);
        Ok(events)
    }
}
