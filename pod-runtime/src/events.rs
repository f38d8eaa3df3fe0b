//! Per-pod event log (Created, Started, Killing, Unhealthy, BackOff, ...) for
//! `vipr describe`. Bounded: old events fall off, repeated ones are counted.

use std::collections::VecDeque;

use serde::Serialize;

const MAX_EVENTS: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodEvent {
    /// "Normal" or "Warning".
    pub type_: String,
    pub reason: String,
    pub message: String,
    /// Container the event is about, if any.
    pub container: Option<String>,
    pub first_seen: i64,
    pub last_seen: i64,
    pub count: u32,
}

#[derive(Debug, Default)]
pub struct EventLog {
    events: VecDeque<PodEvent>,
}

impl EventLog {
    pub fn push(&mut self, warning: bool, reason: &str, container: Option<&str>, message: String) {
        let now = crate::util::now_unix();
        if let Some(last) = self.events.iter_mut().rev().find(|e| {
            e.reason == reason && e.message == message && e.container.as_deref() == container
        }) {
            last.count += 1;
            last.last_seen = now;
            return;
        }
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        tracing::debug!(reason, ?container, %message, "pod event");
        self.events.push_back(PodEvent {
            type_: if warning { "Warning" } else { "Normal" }.into(),
            reason: reason.into(),
            message,
            container: container.map(str::to_string),
            first_seen: now,
            last_seen: now,
            count: 1,
        });
    }

    pub fn list(&self) -> Vec<PodEvent> {
        self.events.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedups_and_bounds() {
        let mut l = EventLog::default();
        l.push(true, "BackOff", Some("c"), "x".into());
        l.push(true, "BackOff", Some("c"), "x".into());
        assert_eq!(l.list().len(), 1);
        assert_eq!(l.list()[0].count, 2);
        for i in 0..200 {
            l.push(false, "Started", None, i.to_string());
        }
        assert_eq!(l.list().len(), MAX_EVENTS);
    }
}
