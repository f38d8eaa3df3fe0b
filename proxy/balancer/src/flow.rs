//! The 5-tuple of a new flow and the hashes the datapath computes over it.
//!
//! The word layout below is the contract with the eBPF side, which must feed
//! [`jhash_words`] the same words in the same order:
//!
//! - an IPv4 address is one word, its value in host order
//!   (`u32::from_be_bytes(octets)`, i.e. `bpf_ntohl(iph->saddr)`);
//! - an IPv6 address is four such words, most significant first;
//! - ports are combined as `(src_port << 16) | dst_port`, in host order;
//! - the protocol is its IP protocol number.
//!
//! For IPv4 these are `vipr_common::hash::{flow_hash_v4, source_hash_v4,
//! destination_hash_v4}`, the very functions the data plane runs.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use crate::hash::jhash_words;
pub use vipr_common::hash::{DESTINATION_HASH_INITVAL, FLOW_HASH_INITVAL, SOURCE_HASH_INITVAL};

/// A transport protocol a service port can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        })
    }
}

/// A protocol name other than tcp, udp or sctp.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown protocol {0:?}: expected tcp, udp or sctp")]
pub struct ParseProtocolError(pub String);

impl FromStr for Protocol {
    type Err = ParseProtocolError;

    /// Case-insensitive: Kubernetes writes `TCP`, the CLI `tcp`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "sctp" => Ok(Protocol::Sctp),
            _ => Err(ParseProtocolError(s.to_owned())),
        }
    }
}

/// The first packet of a flow: who sends, to which service address, over what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub protocol: Protocol,
    pub src: SocketAddr,
    /// The service address the client asked for (ClusterIP, NodePort...),
    /// before translation.
    pub dst: SocketAddr,
}

/// Up to 10 words: two IPv6 addresses, the ports, the protocol.
struct Words {
    buf: [u32; 10],
    len: usize,
}

impl Words {
    fn new() -> Self {
        Words {
            buf: [0; 10],
            len: 0,
        }
    }

    fn push(&mut self, w: u32) {
        self.buf[self.len] = w;
        self.len += 1;
    }

    fn push_ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => self.push(u32::from(v4)),
            IpAddr::V6(v6) => {
                for chunk in v6.octets().chunks_exact(4) {
                    self.push(u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]));
                }
            }
        }
    }

    fn hash(&self, initval: u32) -> u32 {
        jhash_words(&self.buf[..self.len], initval)
    }
}

impl Flow {
    pub const fn new(protocol: Protocol, src: SocketAddr, dst: SocketAddr) -> Self {
        Flow { protocol, src, dst }
    }

    /// Hash of the whole 5-tuple: the Maglev lookup key.
    pub fn hash(&self) -> u32 {
        let mut w = Words::new();
        w.push_ip(self.src.ip());
        w.push_ip(self.dst.ip());
        w.push((u32::from(self.src.port()) << 16) | u32::from(self.dst.port()));
        w.push(u32::from(self.protocol.number()));
        w.hash(FLOW_HASH_INITVAL)
    }

    /// Hash of the client address only (`sh`): every connection of a client
    /// lands on the same backend while the backend set is unchanged.
    pub fn source_hash(&self) -> u32 {
        let mut w = Words::new();
        w.push_ip(self.src.ip());
        w.hash(SOURCE_HASH_INITVAL)
    }

    /// Hash of the destination address only (`dh`), as IPVS defines it.
    ///
    /// For a ClusterIP every flow of a service has the same destination, so
    /// `dh` sends all of them to one backend (as in kube-proxy's IPVS mode);
    /// it spreads load only across services or destination addresses.
    pub fn destination_hash(&self) -> u32 {
        let mut w = Words::new();
        w.push_ip(self.dst.ip());
        w.hash(DESTINATION_HASH_INITVAL)
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} -> {}", self.protocol, self.src, self.dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(src: &str, dst: &str) -> Flow {
        Flow::new(Protocol::Tcp, src.parse().unwrap(), dst.parse().unwrap())
    }

    #[test]
    fn flow_hash_uses_the_documented_word_layout() {
        let f = flow("10.0.0.1:1234", "10.96.0.10:80");
        let words = [0x0a00_0001, 0x0a60_000a, (1234 << 16) | 80, 6];
        assert_eq!(f.hash(), jhash_words(&words, FLOW_HASH_INITVAL));
        assert_eq!(
            f.hash(),
            vipr_common::hash::flow_hash_v4(0x0a00_0001, 0x0a60_000a, 1234, 80, 6)
        );
        assert_eq!(
            f.source_hash(),
            jhash_words(&[0x0a00_0001], SOURCE_HASH_INITVAL)
        );
        assert_eq!(
            f.destination_hash(),
            jhash_words(&[0x0a60_000a], DESTINATION_HASH_INITVAL)
        );
    }

    #[test]
    fn ipv6_addresses_are_four_words() {
        let f = flow("[fd00::1]:1", "[fd00::2]:2");
        let words = [0xfd00_0000, 0, 0, 1, 0xfd00_0000, 0, 0, 2, (1 << 16) | 2, 6];
        assert_eq!(f.hash(), jhash_words(&words, FLOW_HASH_INITVAL));
    }

    #[test]
    fn protocol_parses_kubernetes_spelling() {
        assert_eq!("TCP".parse::<Protocol>(), Ok(Protocol::Tcp));
        assert_eq!("udp".parse::<Protocol>(), Ok(Protocol::Udp));
        assert!("icmp".parse::<Protocol>().is_err());
    }
}
