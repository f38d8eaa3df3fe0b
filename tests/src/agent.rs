//! A vipr node for end-to-end tests: a node namespace with an uplink veth to
//! an "outside" namespace, `vipr agent` running in the node namespace with a
//! scratch state dir, socket, pin dir and cgroup, and the CLI pointed at it.
//! Dropping it kills the agent, runs `vipr agent --cleanup` and removes
//! everything.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use vipr_dataplane::{Dataplane, DataplaneOptions, XdpMode};

use crate::{Netns, VethEnd, leftovers, unique_prefix, veth_pair};

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);

/// The folder holding the workspace's binaries (`vipr`, `vipr-netexec`):
/// the running executable's own folder when that is `vipr` itself (`vipr
/// bench`), else the one above a test's `deps/` folder.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let own = exe.parent().expect("executable folder").to_path_buf();
    let dir = if own.join("vipr").exists() {
        own
    } else {
        own.parent()
            .expect("target/<profile>/deps/<test>")
            .to_path_buf()
    };
    assert!(
        dir.join("vipr").exists(),
        "{} has no vipr binary: run `cargo build --bins` first (cargo xtask test does)",
        dir.display()
    );
    dir
}

/// The scratch folder of the node named by `prefix` (state, socket, log).
pub(crate) fn state_dir_of(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{STATE_DIR_PREFIX}{prefix}"))
}
pub(crate) const STATE_DIR_PREFIX: &str = "vipr-e2e-";

fn uplink_of(prefix: &str) -> String {
    format!("{prefix}u")
}

fn cgroup_root_of(prefix: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/cgroup/unified/vipr-e2e-{prefix}"))
}

/// The `vipr agent` flags every node named `prefix` runs with (and its
/// `--cleanup` needs).
pub(crate) fn node_agent_args(prefix: &str) -> Vec<String> {
    let state_dir = state_dir_of(prefix);
    vec![
        "agent".into(),
        "--state-dir".into(),
        state_dir.join("state").display().to_string(),
        "--node-name".into(),
        prefix.to_owned(),
        "--uplink".into(),
        uplink_of(prefix),
        "--cgroup-root".into(),
        cgroup_root_of(prefix).display().to_string(),
        "--api-socket".into(),
        state_dir.join("vipr.sock").display().to_string(),
        // The outside end runs vipr_pass with complete checksums.
        "--xdp-redirect-uplink=true".into(),
    ]
}

/// The agent's log filter in tests: debug for vipr's own crates, which also
/// turns on the eBPF program's per-flow debug log.
pub const TEST_LOG_FILTER: &str = "info,vipr=debug";

pub struct AgentNode {
    // Drop order matters: the agent goes first, then the namespaces.
    agent: Option<Child>,
    /// Agent flags beyond the ones every node gets (see [`AgentNode::start_with`]).
    extra_args: Vec<String>,
    /// `RUST_LOG` of the agent.
    log_filter: String,
    pub prefix: String,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub cgroup_root: PathBuf,
    pub uplink: String,
    /// `vipr_pass` on the outside end of the uplink: like a NIC that
    /// transmits XDP frames, the uplink veth then takes the frames the
    /// agent's XDP sends out of it (replies redirected by the fast path,
    /// refusals sent with XDP_TX); and like a client on a wire, the outside
    /// sends complete checksums. Dropped (detached) before the namespaces.
    _outside_xdp: Dataplane,
    pub outside: Netns,
    pub node: Netns,
}

impl AgentNode {
    /// Builds the namespaces and starts the agent; returns once it answers.
    pub fn start(tag: &str) -> Result<Self> {
        Self::start_with(tag, &[])
    }

    /// As [`AgentNode::start`], with extra `vipr agent` flags (kept across
    /// restarts and given to `--cleanup` too).
    pub fn start_with(tag: &str, extra_args: &[&str]) -> Result<Self> {
        Self::start_logging(tag, extra_args, TEST_LOG_FILTER)
    }

    /// As [`AgentNode::start_with`], with the agent's `RUST_LOG` filter:
    /// benchmarks run it at `info`, as a production node would, so no
    /// per-flow debug logging is measured.
    pub fn start_logging(tag: &str, extra_args: &[&str], log_filter: &str) -> Result<Self> {
        let prefix = unique_prefix(tag);
        let node = Netns::new(format!("{prefix}-node"))?;
        let outside = Netns::new(format!("{prefix}-out"))?;
        let uplink = uplink_of(&prefix);
        veth_pair(
            &VethEnd {
                ns: &node,
                ifname: uplink.clone(),
                addr: NODE_IP,
                prefix_len: 24,
            },
            &VethEnd {
                ns: &outside,
                ifname: format!("{prefix}o"),
                addr: OUTSIDE_IP,
                prefix_len: 24,
            },
        )?;
        let outside_xdp = outside_pass(&outside, &format!("{prefix}o"))?;
        let state_dir = state_dir_of(&prefix);
        std::fs::create_dir_all(&state_dir)?;
        leftovers::claim(&state_dir)?;
        let mut node = AgentNode {
            agent: None,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            log_filter: log_filter.to_owned(),
            socket: state_dir.join("vipr.sock"),
            cgroup_root: cgroup_root_of(&prefix),
            state_dir,
            uplink,
            prefix,
            _outside_xdp: outside_xdp,
            outside,
            node,
        };
        node.spawn_agent()?;
        Ok(node)
    }

    fn agent_args(&self) -> Vec<String> {
        let mut args = node_agent_args(&self.prefix);
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Starts `vipr agent` inside the node namespace (entering only its
    /// network namespace, so the host's bpffs stays visible for pinning).
    fn spawn_agent(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_dir.join("agent.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node.name()))
            .arg(bin_dir().join("vipr"))
            .args(self.agent_args())
            .env("RUST_LOG", &self.log_filter)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting vipr agent")?;
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.vipr(&["get", "ns"]).is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if let Some(status) = self.agent.as_mut().unwrap().try_wait()? {
                bail!("vipr agent exited ({status}):\n{}", self.agent_log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "vipr agent did not answer within 20s:\n{}",
            self.agent_log()
        )
    }

    /// Kills the agent with SIGKILL (pods and pinned maps stay).
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills and starts the agent again on the same state.
    pub fn restart_agent(&mut self) -> Result<()> {
        self.kill_agent();
        self.spawn_agent()
    }

    /// Where the agent pins its maps and links.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new("/sys/fs/bpf/vipr").join(&self.prefix)
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("agent.log")).unwrap_or_default()
    }

    /// The agent's process id, if it was started (nsenter execs vipr in
    /// place: the same pid).
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// The agent's resident set size in MiB (from /proc), if it runs.
    pub fn agent_rss_mib(&self) -> Option<f64> {
        // The child is nsenter, which execs vipr in place: same pid.
        let pid = self.agent.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some((kib - bpf_map_rss_kib(pid)) / 1024.0)
    }

    /// CPU time (user + system) the agent has used so far, from
    /// `/proc/PID/stat`; `None` once it has exited.
    pub fn agent_cpu_seconds(&self) -> Option<f64> {
        let pid = self.agent.as_ref()?.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (per_second > 0).then(|| ticks as f64 / per_second as f64)
    }

    /// Runs the vipr CLI against this node's agent.
    pub fn vipr(&self, args: &[&str]) -> Result<Output> {
        Command::new(bin_dir().join("vipr"))
            .args(args)
            .env("VIPR_SOCKET", &self.socket)
            .stdin(Stdio::null())
            .output()
            .context("running the vipr CLI")
    }

    /// Runs the vipr CLI and returns its stdout, failing with stderr.
    pub fn vipr_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.vipr(args)?;
        if !out.status.success() {
            bail!(
                "vipr {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `vipr apply -f -` with `manifest` on stdin.
    pub fn apply(&self, manifest: &str) -> Result<String> {
        use std::io::Write;
        let mut child = Command::new(bin_dir().join("vipr"))
            .args(["apply", "-f", "-"])
            .env("VIPR_SOCKET", &self.socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().unwrap().write_all(manifest.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "vipr apply failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The pod as JSON (`vipr get pod NAME -o json`).
    pub fn pod(&self, name: &str) -> Result<Value> {
        Ok(serde_json::from_str(
            &self.vipr_ok(&["get", "pod", name, "-o", "json"])?,
        )?)
    }

    /// Waits until every named pod is Ready.
    pub fn wait_ready(&self, pods: &[&str], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut all = true;
            for name in pods {
                all &= self.pod(name).is_ok_and(|p| is_ready(&p));
            }
            if all {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "pods {pods:?} not ready within {timeout:?}:\n{}",
                    self.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `vipr exec POD -- ARGS`: (exit success, stdout).
    pub fn exec(&self, pod: &str, args: &[&str]) -> Result<(bool, String)> {
        let mut full = vec!["exec", pod, "--"];
        full.extend(args);
        let out = self.vipr(&full)?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    /// `ip -d link show eth0` inside the network namespace of the pod with `uid`.
    pub fn pod_eth0(&self, uid: &str) -> Result<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.pod_netns(uid)?.display()))
            .args(["ip", "-d", "link", "show", "eth0"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The network namespace file of the pod with `uid`, through a process
    /// of its first container, found in its cgroup (so it works while no
    /// agent runs). For [`crate::spawn_in_netns`].
    pub fn pod_netns(&self, uid: &str) -> Result<PathBuf> {
        let cgroup = std::fs::read_dir(self.cgroup_root.join(format!("pod-{uid}")))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.is_dir() && !p.ends_with("_sandbox"))
            .context("pod has no container cgroup")?;
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs"))?;
        let pid = procs.lines().next().context("container has no process")?;
        Ok(PathBuf::from(format!("/proc/{pid}/ns/net")))
    }

    /// A service's ClusterIP.
    pub fn cluster_ip(&self, service: &str) -> Result<String> {
        let svc: Value =
            serde_json::from_str(&self.vipr_ok(&["get", "svc", service, "-o", "json"])?)?;
        svc["spec"]["clusterIP"]
            .as_str()
            .map(str::to_owned)
            .context("service has no clusterIP")
    }
}

/// A pod running `vipr-netexec` (HTTP on port `http` 8080, UDP on port
/// `udp` 8081) labelled `app: APP`, Ready once `/ready` answers.
pub fn netexec_pod(name: &str, app: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {app}}}}}
spec:
  containers:
  - name: netexec
    image: host
    command: [vipr-netexec, --http-port, "8080", --udp-port, "8081"]
    ports: [{{name: http, containerPort: 8080}}, {{name: udp, containerPort: 8081, protocol: UDP}}]
    readinessProbe: {{httpGet: {{path: /ready, port: http}}, periodSeconds: 1}}
---
"#
    )
}

/// A pod that only sleeps: a client to exec into (or enter the network of).
pub fn client_pod(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  containers:\n  - name: shell\n    image: host\n    command: [sleep, \"3600\"]\n---\n"
    )
}

pub fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// A data plane with `vipr_pass` attached to `interface` in `ns` (transmit
/// checksum offload off there); its maps sized to nothing, since only the
/// pass program runs.
fn outside_pass(ns: &Netns, interface: &str) -> Result<Dataplane> {
    let mut dataplane = Dataplane::load(&DataplaneOptions {
        max_services: 1,
        max_backends: 1,
        max_flows: 1,
        max_source_ranges: 1,
        ..DataplaneOptions::default()
    })
    .context("loading the pass program for the outside end")?;
    ns.enter(|| dataplane.attach_pass(interface, XdpMode::Default))?
        .with_context(|| format!("attaching vipr_pass to {interface}"))?;
    // A client on a wire sends complete checksums; a local stack on a veth
    // leaves them to offload, which frames redirected by the node's fast
    // path cannot carry.
    ns.enter(|| vipr_dataplane::disable_tx_checksum_offload(interface))??;
    Ok(dataplane)
}

impl Drop for AgentNode {
    fn drop(&mut self) {
        self.kill_agent();
        let cleanup = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node.name()))
            .arg(bin_dir().join("vipr"))
            .args(self.agent_args())
            .arg("--cleanup")
            .output();
        if let Ok(out) = cleanup
            && !out.status.success()
        {
            eprintln!(
                "vipr agent --cleanup failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.agent_log());
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// Resident KiB of BPF maps mapped into process `pid` (the agent maps the
/// conntrack table for an expiry pass): the kernel's memory, already the
/// map's, not the process's own.
fn bpf_map_rss_kib(pid: u32) -> f64 {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return 0.0;
    };
    let mut in_map = false;
    let mut kib = 0.0;
    for line in smaps.lines() {
        if let Some(rss) = line.strip_prefix("Rss:") {
            if in_map {
                kib += rss
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<f64>()
                    .unwrap_or(0.0);
            }
        } else if line.split_whitespace().next().is_some_and(|range| {
            range.contains('-') && range.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        }) {
            // A mapping's header: "start-end perms offset dev inode path".
            in_map = line.contains("bpf-map");
        }
    }
    kib
}
