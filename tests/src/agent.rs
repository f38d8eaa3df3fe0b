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

use crate::{Netns, VethEnd, unique_prefix, veth_pair};

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

pub struct AgentNode {
    // Drop order matters: the agent goes first, then the namespaces.
    agent: Option<Child>,
    /// Agent flags beyond the ones every node gets (see [`AgentNode::start_with`]).
    extra_args: Vec<String>,
    pub prefix: String,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub cgroup_root: PathBuf,
    pub uplink: String,
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
        let prefix = unique_prefix(tag);
        let node = Netns::new(format!("{prefix}-node"))?;
        let outside = Netns::new(format!("{prefix}-out"))?;
        let uplink = format!("{prefix}u");
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
        let state_dir = std::env::temp_dir().join(format!("vipr-e2e-{prefix}"));
        std::fs::create_dir_all(&state_dir)?;
        let mut node = AgentNode {
            agent: None,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            socket: state_dir.join("vipr.sock"),
            cgroup_root: PathBuf::from(format!("/sys/fs/cgroup/unified/vipr-e2e-{prefix}")),
            state_dir,
            uplink,
            prefix,
            outside,
            node,
        };
        node.spawn_agent()?;
        Ok(node)
    }

    fn agent_args(&self) -> Vec<String> {
        let mut args = vec![
            "agent".into(),
            "--state-dir".into(),
            self.state_dir.join("state").display().to_string(),
            "--node-name".into(),
            self.prefix.clone(),
            "--uplink".into(),
            self.uplink.clone(),
            "--cgroup-root".into(),
            self.cgroup_root.display().to_string(),
            "--api-socket".into(),
            self.socket.display().to_string(),
        ];
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
            .env("RUST_LOG", "info,vipr=debug")
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
        Some(kib / 1024.0)
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

    /// `ip -d link show eth0` inside the network namespace of the pod with
    /// `uid` (entered through a process of its first container, found in its
    /// cgroup, so it works while no agent runs).
    pub fn pod_eth0(&self, uid: &str) -> Result<String> {
        let cgroup = std::fs::read_dir(self.cgroup_root.join(format!("pod-{uid}")))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.is_dir() && !p.ends_with("_sandbox"))
            .context("pod has no container cgroup")?;
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs"))?;
        let pid = procs.lines().next().context("container has no process")?;
        let out = Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .args(["ip", "-d", "link", "show", "eth0"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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

/// A `vipr-netexec` pod (HTTP on 8080 as port `http`, UDP on 8081 as
/// `udp`, ready by `/ready` every second) labelled `app: APP`.
pub fn netexec_pod(name: &str, app: &str) -> String {
    format!(
        r#"
apiVersion: v1
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

/// A pod named `client` that only waits, to run commands in.
pub const CLIENT_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  containers:
  - name: shell
    image: host
    command: [sleep, "3600"]
---
"#;

pub fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
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
