//! Server configuration ([`DnsConfig`]) and discovery of upstream resolvers from
//! `/etc/resolv.conf`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::error::DnsError;

/// Where names outside the cluster zone are forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstreams {
    /// The `nameserver` lines of a resolv.conf (the node's, by default), minus our own
    /// listen address so that we never forward to ourselves.
    ResolvConf(PathBuf),
    /// An explicit list, tried in order. Empty: out-of-zone names get SERVFAIL.
    Static(Vec<SocketAddr>),
}

/// Configuration of [`crate::DnsServer`].
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// Cluster domain, e.g. `cluster.local`.
    pub zone: String,
    /// TTL of every in-zone record (and the SOA minimum).
    pub ttl: u32,
    /// UDP and TCP listen address; port 0 picks an ephemeral port (same for both).
    pub listen: SocketAddr,
    pub upstreams: Upstreams,
    /// Clients allowed to use recursion (forwarding). Everyone else gets REFUSED for
    /// out-of-zone names, so the server is never an open resolver. In-zone names are
    /// answered for any client: they are authoritative data, not recursion.
    pub allowed_clients: Vec<IpNet>,
    /// Maximum number of cached upstream answers.
    pub cache_size: usize,
    /// Upper bound on how long an upstream answer is cached, whatever its TTL.
    pub cache_max_ttl: Duration,
    /// Time to wait for one upstream before trying the next.
    pub upstream_timeout: Duration,
    /// Number of UDP worker tasks, each with its own SO_REUSEPORT socket.
    pub udp_workers: usize,
    /// Open TCP connections at most; further connections are closed at once.
    pub max_tcp_connections: usize,
    /// Forwarded queries in flight at most; beyond that, SERVFAIL (flood protection).
    pub max_inflight_forwards: usize,
    /// A TCP connection idle this long is closed.
    pub tcp_idle_timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            zone: "cluster.local".to_string(),
            ttl: 5,
            listen: SocketAddr::from(([0, 0, 0, 0], 53)),
            upstreams: Upstreams::ResolvConf(PathBuf::from("/etc/resolv.conf")),
            allowed_clients: default_allowed_clients(),
            cache_size: 10_000,
            cache_max_ttl: Duration::from_secs(3600),
            upstream_timeout: Duration::from_secs(2),
            udp_workers: std::thread::available_parallelism().map_or(2, |n| n.get().min(8)),
            max_tcp_connections: 1024,
            max_inflight_forwards: 4096,
            tcp_idle_timeout: Duration::from_secs(10),
        }
    }
}

/// Loopback and private ranges: where pod and node networks live. The agent should
/// replace this with the actual pod and node CIDRs.
fn default_allowed_clients() -> Vec<IpNet> {
    [
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "::1/128",
        "fc00::/7",
    ]
    .iter()
    .map(|s| s.parse().expect("static CIDR"))
    .collect()
}

impl DnsConfig {
    /// Resolves [`Upstreams`] into concrete addresses.
    pub fn upstream_addrs(&self) -> Result<Vec<SocketAddr>, DnsError> {
        match &self.upstreams {
            Upstreams::Static(addrs) => Ok(addrs.clone()),
            Upstreams::ResolvConf(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| DnsError::ResolvConf {
                        path: path.display().to_string(),
                        source,
                    })?;
                Ok(nameservers_from_resolv_conf(&text, self.listen))
            }
        }
    }

    /// Whether `ip` may use recursion.
    pub fn is_allowed_client(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allowed_clients.iter().any(|net| net.contains(&ip))
    }
}

/// The `nameserver` addresses of a resolv.conf, on port 53, skipping `listen` itself
/// (a node whose resolv.conf points at the cluster DNS would otherwise loop).
pub fn nameservers_from_resolv_conf(text: &str, listen: SocketAddr) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(addr)) => addr.parse::<IpAddr>().ok(),
                _ => None,
            }
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .filter(|addr| !is_self(*addr, listen))
        .collect()
}

fn is_self(upstream: SocketAddr, listen: SocketAddr) -> bool {
    if upstream.port() != listen.port() {
        return false;
    }
    // An unspecified listen address also answers on loopback.
    upstream.ip() == listen.ip() || (listen.ip().is_unspecified() && upstream.ip().is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_skips_own_listen_address() {
        let text = "search x\nnameserver 10.96.0.10\nnameserver 1.1.1.1\n# c\nnameserver ::1\n";
        let listen: SocketAddr = "10.96.0.10:53".parse().unwrap();
        let got = nameservers_from_resolv_conf(text, listen);
        assert_eq!(
            got,
            vec![
                "1.1.1.1:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        let any: SocketAddr = "0.0.0.0:53".parse().unwrap();
        assert_eq!(nameservers_from_resolv_conf(text, any).len(), 2);
    }

    #[test]
    fn allowed_clients_match_mapped_v4() {
        let cfg = DnsConfig::default();
        assert!(cfg.is_allowed_client("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!cfg.is_allowed_client("8.8.8.8".parse().unwrap()));
    }
}
