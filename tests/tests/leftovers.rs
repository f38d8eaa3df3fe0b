//! A process killed outright (SIGKILL: no guard runs) leaves its node
//! behind: the agent and a pod still running, pinned maps, cgroups,
//! namespaces, state folder. `leftovers::sweep` removes exactly that,
//! and nothing of a node whose owner still runs.
//!
//! The killed owner is this very test binary, started again as a child
//! that builds a node, reports it and waits to be killed.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use vipr_e2e::{
    agent::{AgentNode, netexec_pod},
    leftovers, require_root,
};

const CHILD_ENV: &str = "VIPR_E2E_LEFTOVERS_CHILD";
const TEST_NAME: &str = "a_killed_owners_node_is_swept_and_a_live_ones_kept";

#[test]
fn a_killed_owners_node_is_swept_and_a_live_ones_kept() -> Result<()> {
    require_root();
    if std::env::var_os(CHILD_ENV).is_some() {
        return be_the_killed_owner();
    }
    // A node of this (live) process: the sweep must not touch it.
    let live = AgentNode::start("lvk")?;

    let mut child = Command::new(std::env::current_exe()?)
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the owner to kill")?;
    let report = read_report(child.stdout.take().context("child stdout")?);
    let _ = child.kill();
    let _ = child.wait();
    let (prefix, agent_pid) = report?;

    let node_ns = Path::new("/run/netns").join(format!("{prefix}-node"));
    let pins = Path::new("/sys/fs/bpf/vipr").join(&prefix);
    let cgroup = Path::new("/sys/fs/cgroup/unified").join(format!("vipr-e2e-{prefix}"));
    let state = std::env::temp_dir().join(format!("vipr-e2e-{prefix}"));
    let agent = Path::new("/proc").join(agent_pid.to_string());
    for left in [&node_ns, &pins, &cgroup, &state, &agent] {
        ensure!(left.exists(), "{} should be left behind", left.display());
    }

    let swept = leftovers::sweep();
    ensure!(swept.contains(&prefix), "swept {swept:?}, not {prefix}");
    ensure!(
        !swept.contains(&live.prefix),
        "the live node was swept: {swept:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for gone in [&node_ns, &pins, &cgroup, &state, &agent] {
        ensure!(!gone.exists(), "{} is still there", gone.display());
    }
    ensure!(
        live.vipr(&["get", "ns"])?.status.success(),
        "the live node's agent still answers"
    );
    Ok(())
}

/// The child: builds a node with a running pod, reports its prefix and
/// agent pid, and waits (at most a minute) to be killed.
fn be_the_killed_owner() -> Result<()> {
    let node = AgentNode::start("lvd")?;
    node.apply(&netexec_pod("doomed", "doomed"))?;
    node.wait_ready(&["doomed"], Duration::from_secs(30))?;
    let pid = node.agent_pid().context("agent pid")?;
    println!("LEFTOVER {} {pid}", node.prefix);
    std::thread::sleep(Duration::from_secs(60));
    Ok(())
}

/// The child's report line, read within 60 s.
fn read_report(stdout: std::process::ChildStdout) -> Result<(String, u32)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // After the harness's "test NAME ... ", on the same line.
            if let Some((_, rest)) = line.split_once("LEFTOVER ") {
                let _ = tx.send(rest.to_owned());
                return;
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .context("the child never reported its node")?;
    let (prefix, pid) = line.split_once(' ').context("report line")?;
    Ok((prefix.to_owned(), pid.parse()?))
}
