//! The rig every mode is measured on: a node namespace running the real
//! `vipr agent` (XDP on its uplink and on its pods' veths), backend pods it
//! runs (`vipr-netexec`, with the bench's counting sink on their `eth0`),
//! and an outside namespace for the client, routed to the node. The
//! node's uplink takes frames in a NAPI thread of its own, pinned to
//! another CPU than the flood generator's. Dropping the rig stops the
//! agent, runs its `--cleanup` and deletes the namespaces (the agent node's
//! guard does), also when unwinding; a rig whose run was killed outright is
//! removed by the next run (`vipr_e2e::leftovers`).

use std::{collections::BTreeSet, net::Ipv4Addr, sync::Mutex, time::Duration};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use vipr_e2e::agent::{AgentNode, NODE_IP};

use crate::flood::{self, Deliveries, FloodLink, PacketTools};

/// Port the backends' HTTP server listens on (connections are timed here).
pub const BACKEND_TCP_PORT: u16 = 8080;
/// UDP port the NodePort's datagrams go to: the discard port, which the
/// bench's sink counts and drops at the backend's interface.
pub const BACKEND_UDP_PORT: u16 = flood::DISCARD_PORT;
/// The CPU the flood generator runs on; the node's uplink NAPI runs on
/// the next one.
pub const GENERATOR_CPU: usize = 0;
/// Where vipr's ClusterIPs start (inside the agent's 10.96.0.0/12, clear
/// of the addresses it allocates itself from the bottom).
pub const VIPR_VIP_BASE: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 0);
/// Where the netfilter modes' cluster IPs start: outside the agent's
/// service CIDR, so its XDP program passes them untouched to netfilter.
pub const NETFILTER_VIP_BASE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 0);
pub const SERVICE_PORT: u16 = 80;
pub const NODE_PORT: u16 = 30080;

pub struct Rig {
    pub node: AgentNode,
    /// Backend pod addresses.
    pub pods: Vec<Ipv4Addr>,
    /// The flood generator and the backends' sink.
    pub tools: Mutex<PacketTools>,
    /// The sinks' count, read while a flood runs.
    pub deliveries: Deliveries,
    /// Whether the uplink's NAPI thread runs on a CPU of its own (there is
    /// more than one CPU): otherwise the generator and the node share it.
    pub napi_pinned: bool,
}

impl Rig {
    /// `xdp_redirect`: the agent's forwarding fast path (`--xdp-redirect`).
    pub fn build(pods: usize, xdp_redirect: bool) -> Result<Rig> {
        let flags: &[&str] = if xdp_redirect {
            &[]
        } else {
            &["--xdp-redirect=false"]
        };
        // A run killed outright (SIGKILL, a restart) left its rig running.
        let swept = vipr_e2e::leftovers::sweep();
        if !swept.is_empty() {
            eprintln!("removed what killed runs left behind: {}", swept.join(", "));
        }
        // At `info`, as on a production node: no per-flow debug log is measured.
        let node = AgentNode::start_logging("bench", flags, "info")
            .context("starting the node and its agent")?;
        let manifest: String = (0..pods).map(pod_manifest).collect();
        node.apply(&manifest)?;
        let names: Vec<String> = (0..pods).map(pod_name).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        node.wait_ready(&refs, Duration::from_secs(60))?;
        let pods = names
            .iter()
            .map(|name| pod_ip(&node.pod(name)?))
            .collect::<Result<Vec<_>>>()?;
        let node_ip = NODE_IP.to_string();
        for net in ["10.96.0.0/12", "10.200.0.0/16", "10.244.0.0/16"] {
            node.outside.ip(&["route", "add", net, "via", &node_ip])?;
        }
        let mut tools = PacketTools::load()?;
        for name in &names {
            // The agent's key for a pod's pass program (`pod:<ns>/<name>`).
            let pin =
                vipr_dataplane::pass_link_pin(&node.pin_dir(), &format!("pod:default/{name}"));
            tools.install_sink(&pin)?;
        }
        let napi_pinned = thread_uplink_napi(&node)?;
        Ok(Rig {
            node,
            pods,
            deliveries: tools.deliveries()?,
            tools: Mutex::new(tools),
            napi_pinned,
        })
    }

    /// Seconds the agent has spent programming the data plane so far: the
    /// sum of its `kubeproxy_sync_proxy_rules_duration_seconds` histogram
    /// (every sync: computing frontends from the objects and writing the
    /// maps), read from its metrics endpoint inside the node namespace.
    /// The difference over a step is vipr's counterpart of the time
    /// `iptables-restore` or `nft -f` takes for the same step.
    pub fn agent_sync_seconds(&self) -> Result<f64> {
        let text = self
            .node
            .node
            .enter(|| http_get(AGENT_METRICS, "/metrics"))??;
        text.lines()
            .find_map(|l| l.strip_prefix(SYNC_SECONDS_SUM))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {SYNC_SECONDS_SUM} in the agent's metrics"))
    }

    /// Waits (at most [`IDLE_WAIT`]) until the agent is idle: below
    /// [`IDLE_CPU_SHARE`] of a CPU over one [`IDLE_WINDOW`]. After a large
    /// programming step it goes on working for a second or two (the
    /// EndpointSlices it derives, their commits, the DNS snapshot); on a
    /// 2-vCPU node that work competes with the client, and the latency
    /// measured would be that of a node busy reprogramming, not of the path.
    pub fn wait_agent_idle(&self) {
        let deadline = std::time::Instant::now() + IDLE_WAIT;
        while std::time::Instant::now() < deadline {
            let Some(before) = self.node.agent_cpu_seconds() else {
                return;
            };
            std::thread::sleep(IDLE_WINDOW);
            let Some(after) = self.node.agent_cpu_seconds() else {
                return;
            };
            if after - before < IDLE_CPU_SHARE * IDLE_WINDOW.as_secs_f64() {
                return;
            }
        }
    }

    /// Empties the node namespace's kernel conntrack table, so one mode's
    /// NodePort floods do not meet the flows (and the SNAT ports) an earlier
    /// mode left there: a netfilter flow outlives its rules for the UDP
    /// timeout, and would be served by the old mode's NAT. vipr keeps its
    /// own conntrack in BPF and clears it with the services.
    pub fn flush_kernel_conntrack(&self) -> Result<()> {
        self.node.node.enter(flush_conntrack)?
    }

    /// The client's end of the uplink, for the UDP flood.
    pub fn flood_link(&self) -> Result<FloodLink> {
        let outside_end = format!("{}o", self.node.prefix);
        let (ifindex, src_mac) = link_of(&self.node.outside, &outside_end)?;
        let (_, dst_mac) = link_of(&self.node.node, &self.node.uplink)?;
        Ok(FloodLink {
            ifindex,
            src_mac,
            dst_mac,
        })
    }

    /// Datagrams the backends' sinks have counted so far.
    pub fn delivered_to_pods(&self) -> Result<u64> {
        self.deliveries.count()
    }
}

/// Gives the node's uplink a NAPI thread of its own (`threaded`) and pins
/// it to the CPU after the generator's; whether it could be pinned (more
/// than one CPU).
fn thread_uplink_napi(node: &AgentNode) -> Result<bool> {
    let before = napi_threads();
    // Written from inside the node's namespace: its sysfs shows its links.
    let switch = format!("/sys/class/net/{}/threaded", node.uplink);
    let status = node
        .node
        .command("sh")
        .args(["-c", &format!("echo 1 > {switch}")])
        .status()
        .with_context(|| format!("turning on threaded NAPI ({switch})"))?;
    if !status.success() {
        bail!("turning on threaded NAPI: writing 1 to {switch} failed ({status})");
    }
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 {
        return Ok(false);
    }
    // The uplink's NAPI threads are the ones that just appeared (their
    // names, "napi/<device>-<id>", are cut to 15 characters).
    let uplink_threads: Vec<i32> = napi_threads().difference(&before).copied().collect();
    if uplink_threads.is_empty() {
        bail!("no NAPI thread appeared for the uplink {}", node.uplink);
    }
    for pid in uplink_threads {
        flood::pin_task(pid, GENERATOR_CPU + 1)?;
    }
    Ok(true)
}

/// The pids of the kernel's NAPI threads.
fn napi_threads() -> BTreeSet<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.starts_with("napi/"))
        })
        .collect()
}

/// ctnetlink's flush: an `IPCTNL_MSG_CT_DELETE` request without attributes
/// deletes every IPv4 entry of the calling thread's namespace. Hand-made
/// (a header and a `nfgenmsg`): no netlink crate of the workspace speaks
/// ctnetlink. A namespace where netfilter never tracked a flow has no table
/// to flush; that is not an error.
fn flush_conntrack() -> Result<()> {
    const NETLINK_NETFILTER: libc::c_int = 12;
    const NFNL_SUBSYS_CTNETLINK: u16 = 1;
    const IPCTNL_MSG_CT_DELETE: u16 = 2;
    // SAFETY: plain socket creation; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        bail!(
            "netfilter netlink socket: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: a fresh fd nothing else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&socket);
    let mut request = Vec::with_capacity(20);
    request.extend(20u32.to_ne_bytes()); // nlmsg_len
    request.extend(((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE).to_ne_bytes());
    request.extend(((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    request.extend(1u32.to_ne_bytes()); // seq
    request.extend(0u32.to_ne_bytes()); // pid: the kernel fills it in
    request.extend([libc::AF_INET as u8, 0, 0, 0]); // nfgenmsg: family, version 0, res_id 0
    // SAFETY: valid fd and buffer for the call's duration.
    if unsafe { libc::send(raw, request.as_ptr().cast(), request.len(), 0) } < 0 {
        bail!("conntrack flush: {}", std::io::Error::last_os_error());
    }
    let mut answer = [0u8; 256];
    // SAFETY: as above; the kernel answers the ACK flag at once.
    let n = unsafe { libc::recv(raw, answer.as_mut_ptr().cast(), answer.len(), 0) };
    if n < 20 {
        bail!(
            "conntrack flush: no answer ({})",
            std::io::Error::last_os_error()
        );
    }
    // An NLMSG_ERROR answer carries the errno (0: done) after the header.
    let kind = u16::from_ne_bytes([answer[4], answer[5]]);
    if kind != libc::NLMSG_ERROR as u16 {
        bail!("conntrack flush: unexpected answer type {kind}");
    }
    let error = i32::from_ne_bytes([answer[16], answer[17], answer[18], answer[19]]);
    match -error {
        0 | libc::ENOENT | libc::EOPNOTSUPP => Ok(()),
        errno => bail!(
            "conntrack flush: {}",
            std::io::Error::from_raw_os_error(errno)
        ),
    }
}

/// The index and MAC address of interface `name` in `ns`.
fn link_of(ns: &vipr_e2e::Netns, name: &str) -> Result<(u32, [u8; 6])> {
    let out = ns.ip(&["-j", "link", "show", "dev", name])?;
    let links: Value = serde_json::from_slice(&out.stdout)?;
    let link = &links[0];
    let ifindex = link["ifindex"]
        .as_u64()
        .with_context(|| format!("no ifindex for {name}"))?;
    let address = link["address"]
        .as_str()
        .with_context(|| format!("no address for {name}"))?;
    let mut mac = [0u8; 6];
    let octets: Vec<u8> = address
        .split(':')
        .map(|o| u8::from_str_radix(o, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC address {address:?} of {name}"))?;
    anyhow::ensure!(octets.len() == 6, "MAC address {address:?} of {name}");
    mac.copy_from_slice(&octets);
    Ok((ifindex as u32, mac))
}

const IDLE_WAIT: Duration = Duration::from_secs(10);
const IDLE_WINDOW: Duration = Duration::from_millis(300);
const IDLE_CPU_SHARE: f64 = 0.05;

/// The agent's default `--metrics-addr`, inside the node namespace.
const AGENT_METRICS: &str = "127.0.0.1:10249";
const SYNC_SECONDS_SUM: &str = "kubeproxy_sync_proxy_rules_duration_seconds_sum ";

/// The body of a plain HTTP/1.0 GET.
fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    // One write: the request is one segment, as any HTTP client sends it.
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        bail!("{addr}{path}: no HTTP response");
    };
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{addr}{path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}

fn pod_name(i: usize) -> String {
    format!("bench-backend-{i}")
}

fn pod_manifest(i: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  labels:\n    app: bench-backend\n\
         spec:\n  containers:\n    - name: netexec\n      image: host\n      command: [\"vipr-netexec\", \"--http-port\", \"{BACKEND_TCP_PORT}\", \"--udp-port\", \"8081\"]\n\
         ---\n",
        pod_name(i)
    )
}

fn pod_ip(pod: &Value) -> Result<Ipv4Addr> {
    let Some(ip) = pod["status"]["podIP"].as_str() else {
        bail!("backend pod has no IP");
    };
    Ok(ip.parse()?)
}

/// Service `i`'s virtual IP counting up from `base`.
pub fn vip(base: Ipv4Addr, i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + i as u32)
}
