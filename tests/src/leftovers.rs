//! What end-to-end nodes of killed processes left behind, and its removal.
//!
//! A node's guard ([`crate::agent::AgentNode`]) removes everything when it
//! drops, also on panic. A process killed outright (SIGKILL, a CI timeout,
//! the machine restarting) runs no guard: its agent and pods keep running,
//! and its pinned maps, cgroups, namespaces and state folder stay. Each
//! node's state folder names its owner (pid and start time, so a reused pid
//! is not taken for it); [`sweep`] removes the nodes whose owner is gone and
//! leaves every other one alone.

use std::{path::Path, process::Stdio};

use anyhow::{Context, Result};

use crate::{
    Netns,
    agent::{STATE_DIR_PREFIX, bin_dir, node_agent_args},
};

/// The file in a node's state folder that names its owner.
const OWNER_FILE: &str = "owner";

/// Records this process as the owner of the node whose state is in
/// `state_dir`.
pub(crate) fn claim(state_dir: &Path) -> Result<()> {
    let me = std::process::id();
    let started = start_time(me).context("reading this process's start time")?;
    std::fs::write(state_dir.join(OWNER_FILE), format!("{me} {started}\n"))
        .with_context(|| format!("writing {}", state_dir.join(OWNER_FILE).display()))
}

/// When process `pid` started (clock ticks since boot), if it runs.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command, in parentheses, may hold spaces; the start time is the
    // 22nd field, the 20th after the command.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Whether the owner an owner file names still runs; an unreadable file
/// counts as alive (nothing is removed on a guess).
fn owner_runs(owner: &str) -> bool {
    let mut fields = owner.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(pid)), Some(Ok(started))) = (fields.next(), fields.next()) else {
        return true;
    };
    u32::try_from(pid).map_or(true, |pid| start_time(pid) == Some(started))
}

/// Removes every node whose owner is gone: its agent and any process in
/// its namespaces, then what `vipr agent --cleanup` removes (pods, pinned
/// maps and links, cgroups), the namespaces and the state folder. Returns
/// the prefixes of the nodes removed.
pub fn sweep() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(prefix) = name.strip_prefix(STATE_DIR_PREFIX) else {
            continue;
        };
        let state_dir = entry.path();
        let Ok(owner) = std::fs::read_to_string(state_dir.join(OWNER_FILE)) else {
            continue;
        };
        if owner_runs(&owner) {
            continue;
        }
        remove_node(prefix, &state_dir);
        removed.push(prefix.to_owned());
    }
    removed
}

fn remove_node(prefix: &str, state_dir: &Path) {
    let node = Netns::existing(format!("{prefix}-node"));
    let outside = Netns::existing(format!("{prefix}-out"));
    if let Some(node) = &node {
        // The agent first, so nothing pins or attaches again meanwhile;
        // then its cleanup, inside the node's namespace as the guard runs
        // it (it also removes routes there).
        node.kill_processes();
        let _ = node
            .net_command(&bin_dir().join("vipr").display().to_string())
            .args(node_agent_args(prefix))
            .arg("--cleanup")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    // Dropping the guards kills what is left in them and deletes them.
    drop((node, outside));
    let _ = std::fs::remove_dir_all(state_dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_runs_and_a_made_up_one_does_not() {
        let me = std::process::id();
        let started = start_time(me).expect("own start time");
        assert!(owner_runs(&format!("{me} {started}")));
        // The same pid with another start time: a reused pid.
        assert!(!owner_runs(&format!("{me} {}", started + 1)));
        assert!(!owner_runs(&format!("{} 1", u32::MAX)));
        assert!(owner_runs("garbage"), "an unreadable owner is left alone");
    }
}
