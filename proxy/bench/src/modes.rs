//! The modes compared, and how each one gets N services into its data
//! plane, changes one endpoint and is cleared again, on the same rig.
//!
//! - `vipr`: selector-less Services and EndpointSlices applied through the
//!   running agent, timed until the pinned maps hold them (stored,
//!   reconciled, programmed).
//! - `iptables-legacy`, `iptables-nft`: kube-proxy's iptables mode ruleset
//!   through `iptables-restore --noflush` of each backend; one change is
//!   kube-proxy 1.28+'s partial sync.
//! - `nftables`: kube-proxy's nftables mode table through `nft -f`; one
//!   change is its incremental transaction.
//! - `ipvs`: only where the kernel has IPVS.
//! - `direct`: no virtual IP; the client dials the pods (the floor).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use vipr_e2e::maps::PinnedServices;

use crate::{
    kube_proxy::{self, KubeService},
    rig::{
        BACKEND_TCP_PORT, BACKEND_UDP_PORT, NETFILTER_VIP_BASE, NODE_PORT, Rig, SERVICE_PORT,
        VIPR_VIP_BASE, vip,
    },
};

/// How long a programming step may take before the run gives up.
const PROGRAMMED_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Direct,
    Vipr,
    IptablesLegacy,
    IptablesNft,
    Nftables,
    Ipvs,
}

impl Mode {
    pub const ALL: [Mode; 6] = [
        Mode::Direct,
        Mode::Vipr,
        Mode::IptablesLegacy,
        Mode::IptablesNft,
        Mode::Nftables,
        Mode::Ipvs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Vipr => "vipr",
            Mode::IptablesLegacy => "iptables-legacy",
            Mode::IptablesNft => "iptables-nft",
            Mode::Nftables => "nftables",
            Mode::Ipvs => "ipvs",
        }
    }

    /// Why this mode cannot run here, if it cannot.
    pub fn unavailable(self) -> Option<String> {
        let tool = match self {
            Mode::IptablesLegacy => "iptables-legacy-restore",
            Mode::IptablesNft => "iptables-nft-restore",
            Mode::Nftables => "nft",
            Mode::Ipvs => return ipvs_unavailable(),
            Mode::Direct | Mode::Vipr => return None,
        };
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        (!found).then(|| format!("{tool} is not installed"))
    }

    /// Where the client connects for service `i` (or a pod, for `direct`).
    pub fn target(self, rig: &Rig, i: usize) -> (Ipv4Addr, u16) {
        match self {
            Mode::Direct => (rig.pods[i % rig.pods.len()], BACKEND_TCP_PORT),
            Mode::Vipr => (vip(VIPR_VIP_BASE, i), SERVICE_PORT),
            _ => (vip(NETFILTER_VIP_BASE, i), SERVICE_PORT),
        }
    }

    /// Where the UDP flood goes: the NodePort, or a pod for `direct`.
    pub fn udp_target(self, rig: &Rig) -> (Ipv4Addr, u16) {
        match self {
            Mode::Direct => (rig.pods[0], BACKEND_UDP_PORT),
            _ => (vipr_e2e::agent::NODE_IP, NODE_PORT),
        }
    }
}

fn ipvs_unavailable() -> Option<String> {
    if Path::new("/proc/net/ip_vs").exists() {
        return Some("IPVS is loaded, but vipr bench does not drive ipvsadm yet".into());
    }
    let loadable = Command::new("modprobe")
        .args(["-n", "ip_vs"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    Some(if loadable {
        "IPVS is not loaded (modprobe ip_vs would be needed) and vipr bench does not drive ipvsadm yet".into()
    } else {
        "this kernel has no IPVS (ip_vs module not found)".into()
    })
}

/// The services of one scale: `n` ClusterIP services over the backend pods
/// plus one UDP NodePort service, in kube-proxy's terms.
pub fn services(mode: Mode, rig: &Rig, n: usize, endpoints: usize) -> Vec<KubeService> {
    let base = if mode == Mode::Vipr {
        VIPR_VIP_BASE
    } else {
        NETFILTER_VIP_BASE
    };
    let mut services: Vec<KubeService> = (0..n)
        .map(|i| KubeService {
            name: format!("default/svc-{i:05}:http"),
            cluster_ip: vip(base, i),
            port: SERVICE_PORT,
            protocol: "tcp",
            node_port: None,
            endpoints: (0..endpoints)
                .map(|e| (rig.pods[(i + e) % rig.pods.len()], BACKEND_TCP_PORT))
                .collect(),
        })
        .collect();
    services.push(KubeService {
        name: "default/flood:udp".into(),
        cluster_ip: vip(base, n),
        port: SERVICE_PORT,
        protocol: "udp",
        node_port: Some(NODE_PORT),
        endpoints: rig
            .pods
            .iter()
            .map(|pod| (*pod, BACKEND_UDP_PORT))
            .collect(),
    });
    services
}

/// `services[changed]` with one more endpoint (a spare address): a change
/// every mode must really program.
pub fn with_extra_endpoint(service: &KubeService) -> KubeService {
    let mut changed = service.clone();
    changed
        .endpoints
        .push((Ipv4Addr::new(10, 244, 255, 250), BACKEND_TCP_PORT));
    changed
}

/// How long a programming step took.
pub struct Timing {
    /// The data plane's own work, comparable across modes: for the
    /// netfilter modes the `iptables-restore` / `nft -f` run (process start
    /// included, as kube-proxy pays it too); for vipr the agent's syncs
    /// (computing the frontends from the objects and writing the maps).
    pub programming: Duration,
    /// vipr only: from `vipr apply` to the maps holding the change, which
    /// adds the CLI, the API socket and the store's durable commit (the
    /// part kube-proxy leaves to the API server and its watch).
    pub end_to_end: Option<Duration>,
}

impl Timing {
    fn programmer_only(programming: Duration) -> Self {
        Timing {
            programming,
            end_to_end: None,
        }
    }
}

/// One mode's data plane on the rig, holding what it programmed.
pub struct Programmer<'a> {
    mode: Mode,
    rig: &'a Rig,
    scratch: PathBuf,
}

impl<'a> Programmer<'a> {
    pub fn new(mode: Mode, rig: &'a Rig) -> Result<Self> {
        let scratch = rig.node.state_dir.join(format!("bench-{}", mode.name()));
        std::fs::create_dir_all(&scratch)?;
        Ok(Programmer { mode, rig, scratch })
    }

    /// Programs every service from empty; returns how long it took.
    pub fn program_all(&self, services: &[KubeService]) -> Result<Timing> {
        match self.mode {
            Mode::Vipr => {
                let file = self.write("services.yaml", &vipr_manifest(services))?;
                self.through_agent(|| {
                    self.rig
                        .node
                        .vipr_ok(&["apply", "-f", &file.display().to_string()])?;
                    let map = PinnedServices::open(&self.rig.node.pin_dir())?;
                    // The reconciler goes through services in name order.
                    let last = services.len() - 2;
                    wait_programmed(&map, &services[last], services[last].endpoints.len())?;
                    for service in services {
                        wait_programmed(&map, service, service.endpoints.len())?;
                    }
                    Ok(())
                })
            }
            Mode::IptablesLegacy | Mode::IptablesNft => {
                let file = self.write("full.rules", &kube_proxy::iptables_full(services))?;
                self.restore(&file).map(Timing::programmer_only)
            }
            Mode::Nftables => {
                let file = self.write("full.nft", &kube_proxy::nftables_full(services))?;
                self.nft(&file).map(Timing::programmer_only)
            }
            Mode::Direct | Mode::Ipvs => Ok(Timing::programmer_only(Duration::ZERO)),
        }
    }

    /// Runs `step` (an apply through the agent, waited for until the maps
    /// show it) and times it end to end and by the agent's own programming.
    fn through_agent(&self, step: impl FnOnce() -> Result<()>) -> Result<Timing> {
        let synced_before = self.rig.agent_sync_seconds()?;
        let started = Instant::now();
        step()?;
        let end_to_end = started.elapsed();
        // The last sync's metric is recorded just after its map writes.
        std::thread::sleep(Duration::from_millis(50));
        let synced = self.rig.agent_sync_seconds()? - synced_before;
        Ok(Timing {
            programming: Duration::from_secs_f64(synced.max(0.0)),
            end_to_end: Some(end_to_end),
        })
    }

    /// Applies `after` (service `changed` of `services`, one endpoint
    /// different) and returns how long until it is in the data plane.
    pub fn change_one(
        &self,
        services: &[KubeService],
        changed: usize,
        after: &KubeService,
    ) -> Result<Timing> {
        let before = &services[changed];
        match self.mode {
            Mode::Vipr => {
                let map = PinnedServices::open(&self.rig.node.pin_dir())?;
                self.through_agent(|| {
                    self.rig.node.apply(&slice_manifest(after, changed))?;
                    wait_programmed(&map, after, after.endpoints.len())
                })
            }
            Mode::IptablesLegacy | Mode::IptablesNft => {
                let mut updated = services.to_vec();
                updated[changed] = after.clone();
                let text = kube_proxy::iptables_partial(&updated, changed, before);
                let file = self.write("partial.rules", &text)?;
                self.restore(&file).map(Timing::programmer_only)
            }
            Mode::Nftables => {
                let file = self.write("change.nft", &kube_proxy::nftables_change(after, before))?;
                self.nft(&file).map(Timing::programmer_only)
            }
            Mode::Direct | Mode::Ipvs => Ok(Timing::programmer_only(Duration::ZERO)),
        }
    }

    /// Removes everything this mode programmed.
    pub fn clear(&self, services: &[KubeService]) -> Result<()> {
        match self.mode {
            Mode::Vipr => {
                let file = self.scratch.join("services.yaml");
                self.rig
                    .node
                    .vipr_ok(&["delete", "-f", &file.display().to_string()])?;
                let map = PinnedServices::open(&self.rig.node.pin_dir())?;
                let last = &services[services.len() - 2];
                let deadline = Instant::now() + PROGRAMMED_TIMEOUT;
                while map.backends(last.cluster_ip, last.port, true)?.is_some() {
                    if Instant::now() > deadline {
                        bail!("vipr services still programmed after delete");
                    }
                    crate::check_interrupted()?;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(())
            }
            Mode::IptablesLegacy | Mode::IptablesNft => {
                // Without --noflush: every table named is emptied and its
                // own chains deleted (the namespace is the rig's own).
                let file = self.write(
                    "empty.rules",
                    "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n\
                     *filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n",
                )?;
                let tool = self.restore_tool();
                self.run_in_node(tool, &[&file.display().to_string()])?;
                Ok(())
            }
            Mode::Nftables => {
                self.run_in_node("nft", &["delete", "table", "ip", kube_proxy::NFT_TABLE])?;
                Ok(())
            }
            Mode::Direct | Mode::Ipvs => Ok(()),
        }
    }

    fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.scratch.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    fn restore_tool(&self) -> &'static str {
        if self.mode == Mode::IptablesLegacy {
            "iptables-legacy-restore"
        } else {
            "iptables-nft-restore"
        }
    }

    fn restore(&self, file: &Path) -> Result<Duration> {
        let tool = self.restore_tool();
        self.run_in_node(tool, &["--noflush", &file.display().to_string()])
    }

    fn nft(&self, file: &Path) -> Result<Duration> {
        self.run_in_node("nft", &["-f", &file.display().to_string()])
    }

    /// Runs `program ARGS` in the node's network namespace; returns its
    /// wall time (process start included, as kube-proxy pays it too).
    fn run_in_node(&self, program: &str, args: &[&str]) -> Result<Duration> {
        let started = Instant::now();
        let out = self
            .rig
            .node
            .node
            .net_command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program}"))?;
        let took = started.elapsed();
        if !out.status.success() {
            bail!(
                "{program} {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(took)
    }
}

fn wait_programmed(map: &PinnedServices, service: &KubeService, backends: usize) -> Result<()> {
    let deadline = Instant::now() + PROGRAMMED_TIMEOUT;
    let tcp = service.protocol == "tcp";
    loop {
        let port = service.node_port.unwrap_or(service.port);
        let addr = if service.node_port.is_some() {
            vipr_e2e::agent::NODE_IP
        } else {
            service.cluster_ip
        };
        if map.backends(addr, port, tcp)? == Some(backends as u32) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} not programmed with {backends} backends within {PROGRAMMED_TIMEOUT:?}",
                service.name
            );
        }
        crate::check_interrupted()?;
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Selector-less Services with explicit clusterIPs and one EndpointSlice
/// each, as a user or controller would write them.
fn vipr_manifest(services: &[KubeService]) -> String {
    let mut out = String::with_capacity(services.len() * 700);
    for (i, s) in services.iter().enumerate() {
        let node_port = s
            .node_port
            .map(|p| format!("      nodePort: {p}\n"))
            .unwrap_or_default();
        let kind = if s.node_port.is_some() {
            "NodePort"
        } else {
            "ClusterIP"
        };
        out.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\nspec:\n  type: {kind}\n  clusterIP: {}\n  ports:\n    - port: {}\n      protocol: {}\n      targetPort: {}\n{node_port}---\n",
            service_name(i),
            s.cluster_ip,
            s.port,
            s.protocol.to_uppercase(),
            s.endpoints.first().map_or(s.port, |e| e.1),
        ));
        out.push_str(&slice_manifest(s, i));
    }
    out
}

fn service_name(i: usize) -> String {
    format!("svc-{i:05}")
}

fn slice_manifest(s: &KubeService, i: usize) -> String {
    let endpoints: String = s
        .endpoints
        .iter()
        .map(|(addr, _)| format!("  - addresses: [\"{addr}\"]\n    conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-a\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n  - port: {}\n    protocol: {}\nendpoints:\n{endpoints}---\n",
        s.endpoints.first().map_or(s.port, |e| e.1),
        s.protocol.to_uppercase(),
        name = service_name(i),
    )
}
