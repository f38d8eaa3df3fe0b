//! CrashLoopBackOff arithmetic, as the kubelet does it: the first restart is
//! immediate, then 10 s, doubling to a 300 s cap; a container that ran for 10
//! minutes has its back-off forgotten.

use std::time::Duration;

pub const INITIAL: Duration = Duration::from_secs(10);
pub const MAX: Duration = Duration::from_secs(300);
pub const RESET_AFTER: Duration = Duration::from_secs(600);

/// Per-container back-off state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Backoff {
    /// The delay the next crash will get; `None` = no recent crash.
    next: Option<Duration>,
}

impl Backoff {
    /// The container exited after running `ran_for`. Returns how long to wait before
    /// starting it again.
    pub fn on_exit(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= RESET_AFTER {
            self.next = None;
        }
        match self.next {
            None => {
                self.next = Some(INITIAL);
                Duration::ZERO
            }
            Some(d) => {
                self.next = Some((d * 2).min(MAX));
                d
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_cap_and_resets() {
        let mut b = Backoff::default();
        let short = Duration::from_secs(1);
        let seq: Vec<u64> = (0..8).map(|_| b.on_exit(short).as_secs()).collect();
        assert_eq!(seq, vec![0, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(b.on_exit(Duration::from_secs(601)), Duration::ZERO);
        assert_eq!(b.on_exit(short), INITIAL);
    }
}
