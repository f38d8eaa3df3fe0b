//! Pod phase and condition logic (pure), following the kubelet's `getPhase`:
//! the restart-policy x container-state table lives here and nowhere else.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("OnFailure") => RestartPolicy::OnFailure,
            Some("Never") => RestartPolicy::Never,
            _ => RestartPolicy::Always,
        }
    }

    /// Should a regular container that exited with `exit_code` be started again?
    pub fn restarts(self, exit_code: i32) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => exit_code != 0,
            RestartPolicy::Never => false,
        }
    }

    /// Init containers are retried unless the policy is Never (kubelet semantics:
    /// Always behaves like OnFailure for them).
    pub fn restarts_init(self, exit_code: i32) -> bool {
        exit_code != 0 && self != RestartPolicy::Never
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What the phase computation needs to know of one container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CState {
    /// Not running; `ran_before` if it has a last termination state (it is restarting).
    Waiting {
        ran_before: bool,
    },
    Running,
    Terminated {
        exit_code: i32,
    },
    /// The shim is gone: we cannot know.
    Unknown,
}

/// Progress of the init containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitProgress {
    /// All init containers exited 0 (or there are none).
    Done,
    /// Still running or retrying one.
    InProgress,
    /// One failed and will not be retried (restartPolicy Never).
    Failed,
}

pub fn pod_phase(policy: RestartPolicy, init: InitProgress, containers: &[CState]) -> Phase {
    match init {
        InitProgress::Failed => return Phase::Failed,
        InitProgress::InProgress => return Phase::Pending,
        InitProgress::Done => {}
    }
    let (mut waiting, mut running, mut stopped, mut succeeded, mut unknown) = (0, 0, 0, 0, 0);
    for c in containers {
        match *c {
            CState::Running => running += 1,
            CState::Terminated { exit_code } => {
                stopped += 1;
                if exit_code == 0 {
                    succeeded += 1;
                }
            }
            CState::Waiting { ran_before: true } => stopped += 1,
            CState::Waiting { ran_before: false } => waiting += 1,
            CState::Unknown => unknown += 1,
        }
    }
    if unknown > 0 && running == 0 && stopped == 0 && waiting == 0 {
        return Phase::Unknown;
    }
    if waiting > 0 {
        return Phase::Pending;
    }
    if running > 0 && unknown == 0 {
        return Phase::Running;
    }
    if running == 0 && stopped > 0 && unknown == 0 {
        if policy == RestartPolicy::Always {
            return Phase::Running;
        }
        if stopped == succeeded {
            return Phase::Succeeded;
        }
        if policy == RestartPolicy::Never {
            return Phase::Failed;
        }
        return Phase::Running;
    }
    if unknown > 0 {
        return Phase::Unknown;
    }
    Phase::Pending
}

/// Condition values derived with the phase: (Initialized, ContainersReady, Ready).
pub fn conditions(init: InitProgress, phase: Phase, all_ready: bool) -> (bool, bool, bool) {
    let initialized = init == InitProgress::Done;
    let terminal = matches!(phase, Phase::Succeeded | Phase::Failed);
    let cready = initialized && all_ready && !terminal;
    (initialized, cready, cready)
}

#[cfg(test)]
mod tests {
    use super::*;
    use CState::{Terminated, Waiting};
    use Phase::{Failed, Pending, Succeeded};
    const RUN: CState = CState::Running;
    use RestartPolicy::*;

    #[test]
    fn restart_policy_table() {
        // (policy, exit code) -> restart?
        let table = [
            (Always, 0, true),
            (Always, 1, true),
            (OnFailure, 0, false),
            (OnFailure, 2, true),
            (Never, 0, false),
            (Never, 137, false),
        ];
        for (p, code, want) in table {
            assert_eq!(p.restarts(code), want, "{p:?} exit {code}");
        }
        assert!(Always.restarts_init(1) && !Always.restarts_init(0) && !Never.restarts_init(1));
    }

    #[test]
    fn phase_table() {
        let d = InitProgress::Done;
        let rows: &[(RestartPolicy, &[CState], Phase)] = &[
            (Always, &[Waiting { ran_before: false }], Pending),
            (Always, &[RUN], Phase::Running),
            (Always, &[Terminated { exit_code: 0 }], Phase::Running),
            (Always, &[Terminated { exit_code: 1 }], Phase::Running),
            (Always, &[Waiting { ran_before: true }], Phase::Running),
            (OnFailure, &[Terminated { exit_code: 0 }], Succeeded),
            (OnFailure, &[Terminated { exit_code: 1 }], Phase::Running),
            (OnFailure, &[Waiting { ran_before: true }], Phase::Running),
            (Never, &[Terminated { exit_code: 0 }], Succeeded),
            (Never, &[Terminated { exit_code: 1 }], Failed),
            (
                Never,
                &[Terminated { exit_code: 0 }, Terminated { exit_code: 3 }],
                Failed,
            ),
            (Never, &[RUN, Terminated { exit_code: 3 }], Phase::Running),
            (Never, &[RUN, Waiting { ran_before: false }], Pending),
            (Always, &[CState::Unknown], Phase::Unknown),
        ];
        for (p, cs, want) in rows {
            assert_eq!(pod_phase(*p, d, cs), *want, "{p:?} {cs:?}");
        }
        assert_eq!(pod_phase(Always, InitProgress::InProgress, &[RUN]), Pending);
        assert_eq!(
            pod_phase(
                Never,
                InitProgress::Failed,
                &[Waiting { ran_before: false }]
            ),
            Failed
        );
    }

    #[test]
    fn conditions_follow_phase() {
        assert_eq!(
            conditions(InitProgress::Done, Phase::Running, true),
            (true, true, true)
        );
        assert_eq!(
            conditions(InitProgress::Done, Phase::Running, false),
            (true, false, false)
        );
        assert_eq!(
            conditions(InitProgress::InProgress, Pending, true),
            (false, false, false)
        );
        assert_eq!(
            conditions(InitProgress::Done, Succeeded, true),
            (true, false, false)
        );
    }
}
