//! Pod networking, routed model without a bridge (Calico-style):
//! node side `vp<hash>` has no address, a fixed MAC (ee:ee:ee:ee:ee:ee), proxy ARP,
//! and a /32 route to the pod IP; pod side `eth0` has IP/32, a link-local gateway
//! (169.254.1.1) on-link with a permanent neighbour entry for that MAC, and the
//! default route through it. The eBPF data plane attaches XDP to the node-side veth.
//!
//! Syscall-level work sits behind [`NetOps`] so the runtime's logic can be tested
//! with a fake. [`IpRoute2`] drives iproute2's `ip -batch` (one process per side).
//! Node-side commands run in the calling thread's network namespace, which the
//! runtime's pod threads set to the node netns; pod-side ones enter the holder's.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

pub const NODE_VETH_MAC: &str = "ee:ee:ee:ee:ee:ee";

/// What the runtime asks of the network.
pub trait NetOps: Send + Sync {
    /// Create the veth pair, configure both sides; returns the node-side ifindex.
    fn setup(&self, holder_pid: i32, host_if: &str, ip: Ipv4Addr, gateway: Ipv4Addr)
    -> Result<u32>;
    /// Remove the node side (the peer goes with it) and its route. Idempotent.
    fn teardown(&self, host_if: &str, ip: Ipv4Addr) -> Result<()>;
    /// ifindex of a node-side interface, if it exists.
    fn ifindex(&self, host_if: &str) -> Option<u32>;
}

/// iproute2-backed implementation.
pub struct IpRoute2;

fn ip_batch(netns_of_pid: Option<i32>, script: &str, ignore_errors: bool) -> Result<()> {
    // `nsenter` rather than a setns in `pre_exec`: a pre_exec hook forces
    // fork(), which copies the page tables of an agent with a thread per pod
    // (and stalls every core with TLB shootdowns while it does); without one
    // std spawns with posix_spawn (vfork-like).
    let mut cmd = match netns_of_pid {
        Some(pid) => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/proc/{pid}/ns/net")).arg("ip");
            cmd
        }
        None => Command::new("ip"),
    };
    if ignore_errors {
        cmd.arg("-force");
    }
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let out = run(cmd, script)?;
    check(out, script, ignore_errors)
}

fn run(mut cmd: Command, script: &str) -> Result<std::process::Output> {
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Network(format!("spawn ip: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    child
        .wait_with_output()
        .map_err(|e| Error::Network(format!("wait ip: {e}")))
}

fn check(out: std::process::Output, script: &str, ignore: bool) -> Result<()> {
    if out.status.success() || ignore {
        Ok(())
    } else {
        Err(Error::Network(format!(
            "ip -batch failed ({}): {}\nscript:\n{script}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl NetOps for IpRoute2 {
    fn setup(&self, holder_pid: i32, host_if: &str, ip: Ipv4Addr, gw: Ipv4Addr) -> Result<u32> {
        // A leftover from a crashed earlier attempt would make `link add` fail.
        let _ = ip_batch(None, &format!("link del {host_if}\n"), true);
        ip_batch(
            None,
            &format!(
                "link add {host_if} address {NODE_VETH_MAC} type veth peer name eth0 netns {holder_pid}\n\
                 link set {host_if} up\n\
                 route replace {ip}/32 dev {host_if} scope link\n"
            ),
            false,
        )?;
        // /proc/sys/net resolves against the writing thread's netns: the node's here.
        for (k, v) in [
            ("proxy_arp", "1"),
            ("proxy_arp_pvlan", "0"),
            ("forwarding", "1"),
        ] {
            let p = format!("/proc/sys/net/ipv4/conf/{host_if}/{k}");
            let _ = std::fs::write(&p, v);
        }
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv4/neigh/{host_if}/proxy_delay"),
            "0",
        );
        ip_batch(
            Some(holder_pid),
            &format!(
                "link set lo up\n\
                 addr add {ip}/32 dev eth0\n\
                 link set eth0 up\n\
                 route add {gw} dev eth0 scope link\n\
                 route add default via {gw} dev eth0\n\
                 neigh replace {gw} lladdr {NODE_VETH_MAC} dev eth0 nud permanent\n"
            ),
            false,
        )?;
        self.ifindex(host_if)
            .ok_or_else(|| Error::Network(format!("{host_if} vanished after creation")))
    }

    fn teardown(&self, host_if: &str, ip: Ipv4Addr) -> Result<()> {
        ip_batch(
            None,
            &format!("route del {ip}/32 dev {host_if}\nlink del {host_if}\n"),
            true,
        )
    }

    fn ifindex(&self, host_if: &str) -> Option<u32> {
        // if_nametoindex uses a socket in the calling thread's netns.
        nix::net::if_::if_nametoindex(host_if).ok()
    }
}

/// Node-side interface name for a pod: `<prefix><hex hash of uid>`, <= 15 bytes.
pub fn host_ifname(prefix: &str, pod_uid: &str) -> String {
    let hex = format!("{:012x}", crate::util::short_hash(pod_uid));
    let room = 15usize.saturating_sub(prefix.len());
    format!("{prefix}{}", &hex[..room.min(hex.len())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifnames_fit_and_are_stable() {
        let a = host_ifname("vp", "3f1c-uid");
        assert_eq!(a.len(), 14);
        assert_eq!(a, host_ifname("vp", "3f1c-uid"));
        assert_ne!(a, host_ifname("vp", "other"));
        assert!(host_ifname("vprlongprefix", "x").len() <= 15);
    }
}
