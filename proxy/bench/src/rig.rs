//! The rig every mode is measured on: a node namespace running the real
//! `vipr agent` (XDP on its uplink and on its pods' veths), backend pods it
//! runs (`vipr-netexec`), and an outside namespace for the client, routed to
//! the node. Dropping it stops the agent, runs its `--cleanup` and deletes
//! the namespaces (the agent node's guard does), also when unwinding.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use vipr_e2e::agent::{AgentNode, NODE_IP};

/// Port the backends' HTTP server listens on (connections are timed here).
pub const BACKEND_TCP_PORT: u16 = 8080;
/// UDP port the NodePort's datagrams go to: nothing listens there, so the
/// backend's kernel drops them without waking any process.
pub const BACKEND_UDP_PORT: u16 = 9;
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
}

impl Rig {
    pub fn build(pods: usize) -> Result<Rig> {
        let node = AgentNode::start("bench").context("starting the node and its agent")?;
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
        Ok(Rig { node, pods })
    }

    /// Packets the node has handed to its pods so far (the node-side veths'
    /// transmit counters): what arrived at the backends.
    pub fn delivered_to_pods(&self) -> Result<u64> {
        let out = self.node.node.ip(&["-j", "-s", "link", "show"])?;
        let links: Value = serde_json::from_slice(&out.stdout)?;
        let uplink = &self.node.uplink;
        Ok(links
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| {
                let name = l["ifname"].as_str().unwrap_or("");
                name != "lo" && name != uplink
            })
            .filter_map(|l| l["stats64"]["tx"]["packets"].as_u64())
            .sum())
    }
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
