//! The vocabulary of the data plane's control API: frontends, backends,
//! ports and protocols, in types that cannot hold a wrong value.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, num::NonZeroU16, str::FromStr};

use ipnet::Ipv4Net;
use vipr_balancer::{ServiceBalancing, Weight};
use vipr_common::{Endpoint, IPPROTO_TCP, IPPROTO_UDP, ServiceKey, service_flags};

/// A TCP or UDP port; never zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port(NonZeroU16);

impl Port {
    /// `None` for port 0, which no service or backend can use.
    pub const fn new(port: u16) -> Option<Self> {
        match NonZeroU16::new(port) {
            Some(p) => Some(Port(p)),
            None => None,
        }
    }

    pub const fn get(self) -> u16 {
        self.0.get()
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl TryFrom<u16> for Port {
    type Error = InvalidPort;
    fn try_from(port: u16) -> Result<Self, InvalidPort> {
        Port::new(port).ok_or(InvalidPort)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("port 0 is not a valid service or backend port")]
pub struct InvalidPort;

/// The L4 protocols the data plane translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }

    pub const fn from_ip_proto(proto: u8) -> Option<Self> {
        match proto {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            other => Err(format!("unknown protocol {other:?}: expected tcp or udp")),
        }
    }
}

/// What a client dials: a virtual (or node) address, a port and a protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: Port,
    pub protocol: Protocol,
}

impl Frontend {
    pub(crate) fn key(&self) -> ServiceKey {
        ServiceKey {
            addr: u32::from(self.addr).to_be(),
            port: self.port.get().to_be(),
            proto: self.protocol.ip_proto(),
            _pad: 0,
        }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.protocol)
    }
}

/// Where translated packets of a flow go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: Port,
}

impl BackendAddr {
    pub(crate) fn from_endpoint(addr: u32, port: u16) -> Option<Self> {
        Some(BackendAddr {
            addr: Ipv4Addr::from(u32::from_be(addr)),
            port: Port::new(u16::from_be(port))?,
        })
    }

    /// The address as the maps hold it (network order).
    pub fn endpoint(self) -> Endpoint {
        Endpoint {
            addr: u32::from(self.addr).to_be(),
            port: self.port.get().to_be(),
            _pad: 0,
        }
    }

    pub(crate) fn socket_addr(self) -> std::net::SocketAddr {
        std::net::SocketAddr::from((self.addr, self.port.get()))
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.addr, self.port)
    }
}

/// How a frontend reached from outside the cluster (NodePort, externalIPs,
/// LoadBalancer ingress) treats the client's address, as Kubernetes'
/// `externalTrafficPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExternalTrafficPolicy {
    /// Any backend; the client is SNATed to the node address (and a port
    /// the data plane allocates), so replies come back through this node.
    Cluster,
    /// Only the backends given (the caller passes the node-local ones); the
    /// client address is kept; with none, packets are dropped, not refused.
    Local,
}

/// Per-frontend behaviour beyond its backends. The default is a ClusterIP
/// frontend: no SNAT, refused with RST / ICMP when it has no endpoint,
/// balanced at random with equal weights and no session affinity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendOptions {
    /// `None` for in-cluster frontends (ClusterIP).
    pub external_traffic_policy: Option<ExternalTrafficPolicy>,
    /// `loadBalancerSourceRanges`: when non-empty, new flows from clients
    /// outside every range are dropped (counted as `drop_source_range`).
    pub source_ranges: Vec<Ipv4Net>,
    /// Algorithm, Maglev table size and seed, ClientIP session affinity.
    pub balancing: ServiceBalancing,
    /// Backends whose weight is not [`Weight::DEFAULT`]. Weight 0 drains a
    /// backend: no new flows, established ones continue.
    pub weights: BTreeMap<BackendAddr, Weight>,
}

impl FrontendOptions {
    /// An external frontend with the given policy and no source ranges.
    pub fn external(policy: ExternalTrafficPolicy) -> Self {
        FrontendOptions {
            external_traffic_policy: Some(policy),
            ..FrontendOptions::default()
        }
    }

    /// The weight of `backend` (default 1).
    pub fn weight(&self, backend: &BackendAddr) -> Weight {
        self.weights.get(backend).copied().unwrap_or_default()
    }

    /// The `service_flags` bits these options program.
    pub fn flags(&self) -> u32 {
        let mut flags = match self.external_traffic_policy {
            None => 0,
            Some(ExternalTrafficPolicy::Cluster) => service_flags::SNAT,
            Some(ExternalTrafficPolicy::Local) => service_flags::DROP_WHEN_EMPTY,
        };
        if !self.source_ranges.is_empty() {
            flags |= service_flags::SOURCE_RANGES;
        }
        flags
    }

    /// The external policy and source ranges back from the service flags
    /// (balancing and weights are restored by the caller).
    pub(crate) fn from_flags(flags: u32, source_ranges: Vec<Ipv4Net>) -> Self {
        let external_traffic_policy = if flags & service_flags::SNAT != 0 {
            Some(ExternalTrafficPolicy::Cluster)
        } else if flags & service_flags::DROP_WHEN_EMPTY != 0 {
            Some(ExternalTrafficPolicy::Local)
        } else {
            None
        };
        FrontendOptions {
            external_traffic_policy,
            source_ranges,
            ..FrontendOptions::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_is_rejected() {
        assert_eq!(Port::try_from(0), Err(InvalidPort));
        assert_eq!(Port::try_from(80).unwrap().get(), 80);
    }

    #[test]
    fn frontend_key_is_network_order() {
        let fe = Frontend {
            addr: Ipv4Addr::new(10, 96, 0, 1),
            port: Port::new(80).unwrap(),
            protocol: Protocol::Tcp,
        };
        let key = fe.key();
        assert_eq!(key.addr.to_ne_bytes(), [10, 96, 0, 1]);
        assert_eq!(key.port.to_ne_bytes(), [0, 80]);
        assert_eq!(key.proto, 6);
    }

    #[test]
    fn frontend_options_round_trip_through_flags() {
        for policy in [
            None,
            Some(ExternalTrafficPolicy::Cluster),
            Some(ExternalTrafficPolicy::Local),
        ] {
            let options = FrontendOptions {
                external_traffic_policy: policy,
                source_ranges: vec!["192.0.2.0/24".parse().unwrap()],
                ..FrontendOptions::default()
            };
            let back = FrontendOptions::from_flags(options.flags(), options.source_ranges.clone());
            assert_eq!(back, options);
        }
        assert_eq!(FrontendOptions::default().flags(), 0);
    }
}
