//! The command line: `vipr agent` and the kubectl-like client commands.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::Ipv4Net;

use crate::api::DEFAULT_SOCKET;

#[derive(Parser)]
#[command(
    name = "vipr",
    version,
    about = "A Kubernetes service data plane on eBPF/XDP: a kube-proxy replacement",
    propagate_version = true
)]
pub struct Cli {
    /// The agent's API socket.
    #[arg(long, global = true, env = "VIPR_SOCKET", default_value = DEFAULT_SOCKET)]
    pub api_socket: PathBuf,

    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the node agent: store, pods, data plane, DNS, API.
    Agent(Box<AgentArgs>),
    /// Create or update objects from manifests (a file, a folder, or - for stdin).
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Delete objects named in manifests, or one object by kind and name.
    Delete {
        #[arg(short = 'f', long = "filename", conflicts_with_all = ["kind", "name"])]
        files: Vec<PathBuf>,
        /// Kind (kubectl's names and short names: po, svc, deploy...).
        kind: Option<String>,
        name: Option<String>,
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// List objects, kubectl style.
    Get(GetArgs),
    /// Show an object in detail, with its events.
    Describe {
        kind: String,
        name: String,
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// Print a container's log.
    Logs {
        pod: String,
        #[arg(short, long)]
        container: Option<String>,
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// Run a command in a container: vipr exec POD [-c C] -- CMD...
    Exec {
        pod: String,
        #[arg(short, long)]
        container: Option<String>,
        #[arg(short, long)]
        namespace: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Set a Deployment's replicas: vipr scale deployment/NAME --replicas N
    Scale(ScaleArgs),
    /// Change a Deployment's pod template (starts a rollout).
    #[command(subcommand)]
    Set(SetCommand),
    /// Follow, list, undo, pause and resume a Deployment's rollouts.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Service frontends as the data plane serves them.
    Service {
        #[command(subcommand)]
        command: ServiceCommand,
    },
    /// The data plane's BPF maps.
    Lb {
        #[command(subcommand)]
        command: LbCommand,
    },
    /// Explain what the data plane does with one packet, step by step.
    Trace(TraceArgs),
    /// Stream data plane events: new flows translated, drops with their
    /// reason, replies on demand (Ctrl-C to stop).
    Monitor(MonitorArgs),
    /// Benchmark vipr against kube-proxy's iptables, nftables and IPVS modes
    /// on a rig of network namespaces it builds and removes (needs root).
    Bench(BenchArgs),
}

/// The Deployment a command acts on: `deployment/NAME` (or `deploy/NAME`),
/// or `deployment NAME`.
#[derive(Args, Clone, Debug)]
pub struct DeploymentTarget {
    /// deployment/NAME, or the kind followed by NAME.
    pub target: String,
    pub name: Option<String>,
    #[arg(short, long)]
    pub namespace: Option<String>,
}

#[derive(Args)]
pub struct ScaleArgs {
    #[command(flatten)]
    pub deployment: DeploymentTarget,
    /// The new number of replicas.
    #[arg(long, allow_negative_numbers = true)]
    pub replicas: i64,
}

#[derive(Subcommand)]
pub enum SetCommand {
    /// vipr set image deployment/NAME CONTAINER=IMAGE... (`*=IMAGE`: all containers)
    Image {
        target: String,
        /// CONTAINER=IMAGE pairs.
        #[arg(required = true)]
        images: Vec<String>,
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// vipr set env deployment/NAME KEY=VALUE... KEY-...
    Env {
        target: String,
        /// KEY=VALUE sets, KEY- removes.
        #[arg(required = true)]
        env: Vec<String>,
        /// Only this container (default: all).
        #[arg(short, long)]
        container: Option<String>,
        #[arg(short, long)]
        namespace: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Wait for the rollout to finish, printing its progress.
    Status {
        #[command(flatten)]
        deployment: DeploymentTarget,
        /// Give up after this long (e.g. 90s, 5m; 0: wait forever).
        #[arg(long, default_value = "0")]
        timeout: String,
    },
    /// List the revisions (REVISION CHANGE-CAUSE).
    History {
        #[command(flatten)]
        deployment: DeploymentTarget,
    },
    /// Go back to the previous revision, or to --to-revision.
    Undo {
        #[command(flatten)]
        deployment: DeploymentTarget,
        #[arg(long, default_value_t = 0)]
        to_revision: i64,
    },
    /// Stop rolling out template changes (scaling still applies).
    Pause {
        #[command(flatten)]
        deployment: DeploymentTarget,
    },
    /// Roll out template changes again.
    Resume {
        #[command(flatten)]
        deployment: DeploymentTarget,
    },
}

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Every frontend (VIP:port/proto, type, algorithm, affinity, traffic
    /// policy) with its backends, their state and counters.
    List {
        #[arg(short, long, value_enum)]
        output: Option<DataOutput>,
    },
}

#[derive(Subcommand)]
pub enum LbCommand {
    /// The pinned maps decoded (frontends, backends, conntrack with ages)
    /// and where they differ from what the agent meant to program.
    List {
        /// Keys and values as hex bytes, as bpftool prints them.
        #[arg(long)]
        raw: bool,
        #[arg(short, long, value_enum)]
        output: Option<DataOutput>,
    },
}

#[derive(Args)]
pub struct TraceArgs {
    /// The client: IP or IP:PORT (with a port, an existing flow is found).
    #[arg(long)]
    pub src: String,
    /// The destination: IP:PORT.
    #[arg(long)]
    pub dst: String,
    #[arg(long = "proto", default_value = "tcp")]
    pub protocol: String,
    #[arg(short, long, value_enum)]
    pub output: Option<DataOutput>,
}

#[derive(Args)]
pub struct MonitorArgs {
    /// Only this service's events (NAME or NAMESPACE/NAME).
    #[arg(long)]
    pub service: Option<String>,
    /// Only events to or from this pod.
    #[arg(long)]
    pub pod: Option<String>,
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Event types (repeatable): translate, drop, reply (replies translated
    /// back, of flows opened while such a monitor listens: many, so only
    /// when asked). Default: translate and drop.
    #[arg(long = "type", value_enum)]
    pub types: Vec<MonitorType>,
    #[arg(short, long, value_enum)]
    pub output: Option<DataOutput>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum MonitorType {
    Translate,
    Drop,
    Reply,
}

/// Machine-readable output of the debugging commands.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DataOutput {
    Json,
}

#[derive(Args)]
pub struct BenchArgs {
    /// 1 and 10,000 services, one round (a few minutes).
    #[arg(long)]
    pub quick: bool,
    /// Numbers of services to measure (default 1,1000,10000,50000; --quick: 1,10000).
    #[arg(long, value_delimiter = ',')]
    pub services: Option<Vec<usize>>,
    /// Endpoints (backend pods) per service.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub endpoints: u16,
    /// Rounds per scale (modes interleaved; default 3, --quick 1).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=20))]
    pub rounds: Option<u16>,
    /// New connections timed per mode and round.
    #[arg(long)]
    pub connections: Option<usize>,
    /// The agent's XDP forwarding fast path (`vipr agent --xdp-redirect`);
    /// `--xdp-redirect=false` measures vipr with the kernel forwarding.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub xdp_redirect: bool,
    /// Modes to leave out, e.g. --skip iptables-nft.
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
    /// Where results.json and results.svg go.
    #[arg(long, default_value = "vipr-bench")]
    pub output: PathBuf,
}

#[derive(Args)]
pub struct GetArgs {
    /// Kind (kubectl's names and short names: po, svc, deploy, ep, cm...).
    pub kind: String,
    pub name: Option<String>,
    #[arg(short, long)]
    pub namespace: Option<String>,
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    #[arg(short, long, value_enum)]
    pub output: Option<OutputFormat>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    Wide,
    Json,
    Yaml,
}

#[derive(Args, Clone, Debug)]
pub struct AgentArgs {
    /// Where the store, pod state and IPAM live.
    #[arg(long, default_value = "/var/lib/vipr")]
    pub state_dir: PathBuf,
    /// The node's uplink interface: NodePort and external traffic arrives here.
    #[arg(long)]
    pub uplink: Option<String>,
    /// The node's address (NodePorts); default: the uplink's first IPv4 address.
    #[arg(long)]
    pub node_ip: Option<std::net::Ipv4Addr>,
    /// The node's name; default: the host name.
    #[arg(long)]
    pub node_name: Option<String>,
    #[arg(long, default_value = "10.244.0.0/24")]
    pub pod_cidr: Ipv4Net,
    #[arg(long, default_value = "10.96.0.0/12")]
    pub service_cidr: Ipv4Net,
    /// The cluster DNS service address pods are given.
    #[arg(long, default_value = "10.96.0.10")]
    pub cluster_dns: std::net::Ipv4Addr,
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Upstream resolvers for names outside the cluster; default: the node's resolv.conf.
    #[arg(long)]
    pub dns_upstream: Vec<SocketAddr>,
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:10256")]
    pub healthz_addr: SocketAddr,
    /// cgroup under which pod cgroups are made.
    #[arg(long, default_value = "/sys/fs/cgroup/unified/vipr")]
    pub cgroup_root: PathBuf,
    /// Balancing of services without a vipr.io/lb-algorithm annotation:
    /// random, rr, wrr, lc, sh, dh, sed, nq, maglev.
    #[arg(long, default_value = "random")]
    pub lb_algorithm: vipr_balancer::Algorithm,
    /// Key of the Maglev backend hashes (decimal or 0x hex); give every node
    /// of a cluster the same one, so a flow gets the same backend anywhere.
    #[arg(long, default_value_t = vipr_balancer::MaglevSeed::DEFAULT)]
    pub maglev_seed: vipr_balancer::MaglevSeed,
    /// Where services come from.
    #[arg(long, value_enum, default_value_t = Source::Local)]
    pub source: Source,
    /// Flows conntrack is sized for: 4 slots of 64 bytes a flow, rounded up
    /// to a power of two (64 MiB for the default), so it holds at least
    /// this many. A new flow that finds no free slot near its place is
    /// dropped and counted (drop_flow_map_full); live ones are never
    /// evicted. Changing it discards the pinned conntrack (open flows reopen).
    #[arg(long, default_value_t = vipr_dataplane::DEFAULT_MAX_FLOWS, value_parser = clap::value_parser!(u32).range(1..=(1 << 24)))]
    pub max_flows: u32,
    /// Service frontends (VIP, port, protocol) the data plane holds.
    #[arg(long, default_value_t = vipr_dataplane::DEFAULT_MAX_SERVICES, value_parser = clap::value_parser!(u32).range(1..=(1 << 24)))]
    pub max_services: u32,
    /// Addresses for LoadBalancer services (LB IPAM): each gets one in
    /// status.loadBalancer.ingress. The pool must be routed to the node.
    #[arg(long)]
    pub lb_ip_pool: Option<Ipv4Net>,
    /// Backend slots over all frontends.
    #[arg(long, default_value_t = vipr_dataplane::DEFAULT_MAX_BACKENDS, value_parser = clap::value_parser!(u32).range(1..=(1 << 26)))]
    pub max_backends: u32,
    /// The XDP forwarding fast path: translated packets are routed (the
    /// kernel's FIB and neighbours) and sent on from XDP, never through the
    /// kernel's IP forwarding; packets it cannot route still go that way.
    /// `--xdp-redirect=false` passes every packet to the kernel.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub xdp_redirect: bool,
    /// Whether the fast path also runs for the uplink: packets in from it
    /// forwarded from XDP, replies sent out of it from XDP. Default: yes
    /// for a physical NIC (its driver transmits XDP frames; frames off a
    /// wire carry complete checksums), no for a virtual uplink such as a
    /// veth, whose peer drops XDP frames unless it runs an XDP program and
    /// whose frames may carry partial checksums; say `true` when its peer
    /// runs XDP and sends complete checksums.
    #[arg(long, action = clap::ArgAction::Set)]
    pub xdp_redirect_uplink: Option<bool>,
    /// Source ports for SNAT'd flows (externalTrafficPolicy Cluster,
    /// hairpin), MIN-MAX. A flow needs a port of its own per backend, so
    /// this bounds the concurrent external flows of one backend; keep it
    /// clear of the node's ephemeral range (net.ipv4.ip_local_port_range).
    #[arg(long, default_value = "1024-32767", value_parser = parse_port_range)]
    pub snat_ports: std::ops::RangeInclusive<u16>,
    /// Remove everything the agent made (programs, maps, links, pods) and exit.
    #[arg(long)]
    pub cleanup: bool,
}

/// `MIN-MAX`, both ports 1..=65535, MIN <= MAX.
fn parse_port_range(text: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (min, max) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?}: expected MIN-MAX, e.g. 1024-32767"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{text:?}: {p:?} is not a port (1-65535)"))
    };
    let (min, max) = (port(min)?, port(max)?);
    if min > max {
        return Err(format!("{text:?}: {min} is above {max}"));
    }
    Ok(min..=max)
}

#[cfg(test)]
mod tests {
    use super::{Cli, Command, parse_port_range};
    use clap::Parser;

    #[test]
    fn snat_ports_default_is_the_data_planes() {
        let cli = Cli::try_parse_from(["vipr", "agent"]).unwrap();
        let Command::Agent(args) = cli.command else {
            panic!("not the agent command");
        };
        assert_eq!(args.snat_ports, vipr_dataplane::DEFAULT_SNAT_PORTS);
    }

    #[test]
    fn port_ranges_parse_and_bad_ones_are_named() {
        assert_eq!(parse_port_range("1024-32767"), Ok(1024..=32767));
        assert_eq!(parse_port_range("61000-61000"), Ok(61000..=61000));
        for bad in ["1024", "0-10", "10-5", "a-b", "1-65536"] {
            let err = parse_port_range(bad).unwrap_err();
            assert!(err.starts_with(&format!("{bad:?}")), "{err}");
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Source {
    /// The embedded store under --state-dir, fed by `vipr apply`.
    Local,
}
