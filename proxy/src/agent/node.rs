//! The node the agent runs on: its name, its address, where its maps are
//! pinned, the local address of the cluster DNS, and `--cleanup`.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::cli::AgentArgs;

/// The source given to a pod reaching itself through a service (hairpin),
/// so its reply leaves the pod and meets the translation: link-local, owned
/// by nobody, routed to the node by every pod's default route.
pub const HAIRPIN_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

/// Where pinned maps live; one folder per node so several agents (one per
/// test node namespace) never share maps.
const BPFFS_ROOT: &str = "/sys/fs/bpf/vipr";

pub struct NodeIdentity {
    pub name: String,
    pub node_ip: Option<Ipv4Addr>,
    pub pin_dir: PathBuf,
}

impl NodeIdentity {
    pub fn resolve(args: &AgentArgs) -> Result<Self> {
        let name = match &args.node_name {
            Some(name) => name.clone(),
            None => nix::unistd::gethostname()
                .context("reading the host name")?
                .to_string_lossy()
                .into_owned(),
        };
        let node_ip = match (args.node_ip, &args.uplink) {
            (Some(ip), _) => Some(ip),
            (None, Some(uplink)) => Some(first_ipv4(uplink)?),
            (None, None) => None,
        };
        Ok(NodeIdentity {
            pin_dir: Path::new(BPFFS_ROOT).join(&name),
            name,
            node_ip,
        })
    }
}

/// The first IPv4 address of `interface`.
fn first_ipv4(interface: &str) -> Result<Ipv4Addr> {
    let addrs = nix::ifaddrs::getifaddrs().context("listing interface addresses")?;
    for addr in addrs.filter(|a| a.interface_name == interface) {
        if let Some(sin) = addr.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            return Ok(sin.ip());
        }
    }
    bail!("uplink {interface} has no IPv4 address; pass --node-ip")
}

/// Makes the cluster DNS address local with a `local` route, so the DNS
/// server can bind it and answer from it (its replies then need no reverse
/// translation). A route rather than an interface address, so the kernel
/// never picks it as the source of the node's own connections. Idempotent.
pub fn bind_cluster_dns(addr: Ipv4Addr) -> Result<()> {
    ip(&[
        "route",
        "replace",
        "local",
        &format!("{addr}/32"),
        "dev",
        "lo",
    ])
}

/// Sets sysctls of the node's network namespace (the agent's own).
pub fn set_sysctls(sysctls: &[(&str, &str)]) -> Result<()> {
    for (key, value) in sysctls {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        std::fs::write(&path, value).with_context(|| format!("setting {key}={value}"))?;
    }
    Ok(())
}

/// Removes a cgroup folder and its (now empty) children, deepest first; a
/// cgroup that still has processes stays, and so do its parents.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// `vipr agent --cleanup`: removes every pod, the pinned maps, the DNS
/// interface and the API socket, like `kube-proxy --cleanup`. The store is
/// kept: it is the user's desired state, not something the agent made.
pub fn cleanup(args: &AgentArgs, node: &NodeIdentity, api_socket: &Path) -> Result<()> {
    let mut config =
        vipr_pod_runtime::RuntimeConfig::new(args.state_dir.join("runtime"), args.pod_cidr);
    config.cgroup_root = Some(args.cgroup_root.clone());
    let runtime_dir = config.state_dir.clone();
    let mut cgroup_roots = vec![args.cgroup_root.clone()];
    if runtime_dir.exists() {
        let runtime = vipr_pod_runtime::Runtime::new(config, Arc::new(vipr_pod_runtime::NoObjects))
            .context("opening the pod runtime")?;
        for pod in runtime.list() {
            let _ = runtime.delete_pod(&pod.key, Some(0));
        }
        for pod in runtime.list() {
            if !runtime.wait_deleted(&pod.key, Duration::from_secs(10)) {
                tracing::warn!(pod = %pod.key, "pod did not stop within 10s");
            }
        }
        cgroup_roots.extend(runtime.cgroup_roots());
        runtime.detach();
    }
    kill_unrecorded_pods(&args.cgroup_root);
    if node.pin_dir.exists() {
        std::fs::remove_dir_all(&node.pin_dir)
            .with_context(|| format!("removing pinned maps {}", node.pin_dir.display()))?;
    }
    // The shared parent goes too once the last node's folder is gone.
    let _ = std::fs::remove_dir(BPFFS_ROOT);
    // A killed process leaves its cgroup a moment after it is reaped:
    // retry briefly rather than leave empty cgroups behind.
    for _ in 0..50 {
        cgroup_roots.retain(|root| {
            remove_cgroup_tree(root);
            root.exists()
        });
        if cgroup_roots.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let dns = format!("{}/32", args.cluster_dns);
    let _ = Command::new("ip")
        .args(["route", "del", "local", &dns, "dev", "lo"])
        .output();
    let _ = std::fs::remove_file(api_socket);
    eprintln!("vipr: removed pods, pinned maps and the cluster DNS address {dns}");
    Ok(())
}

/// Kills what still runs in a pod cgroup (`pod-*`) under `cgroup_root`: a
/// pod being started when the agent was killed may not be in the runtime's
/// records yet. Only pod folders: the root may hold the node's own processes.
fn kill_unrecorded_pods(cgroup_root: &Path) {
    let Ok(entries) = std::fs::read_dir(cgroup_root) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with("pod-") {
            // cgroup v2's cgroup.kill: SIGKILL to the whole subtree.
            let _ = std::fs::write(entry.path().join("cgroup.kill"), "1");
        }
    }
}

/// Whether `interface` (in this network namespace) is a physical NIC, whose
/// driver transmits XDP frames itself; virtual ones (veth, bridge, ...) have
/// no parent device.
pub fn is_physical(interface: &str) -> bool {
    std::path::Path::new(&format!("/sys/class/net/{interface}/device")).exists()
}
