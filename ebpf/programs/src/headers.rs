//! Bounds-checked access to the Ethernet, IPv4 and TCP/UDP headers of the
//! packet in an XDP context, and the in-place rewrite translation needs.
//!
//! Packet memory has no alignment guarantee, so every field is read and
//! written unaligned.

use core::ptr::{addr_of, addr_of_mut, read_unaligned, write_unaligned};

use aya_ebpf::programs::XdpContext;
use vipr_common::{FlowKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, NatEntry};

use crate::checksum::{Delta, apply_folded};

pub const ETH_HDR_LEN: usize = 14;
/// 0x0800 as it reads from network-order memory on a little-endian host.
const ETH_P_IP_RAW: u16 = 0x0800u16.to_be();
pub const IPV4_MIN_HDR_LEN: usize = 20;
pub const TCP_HDR_LEN: usize = 20;
pub const UDP_HDR_LEN: usize = 8;
/// Offsets of the checksum field inside the TCP and UDP headers.
pub const TCP_CHECK_OFFSET: usize = 16;
pub const UDP_CHECK_OFFSET: usize = 6;
/// Offset of the flags byte inside the TCP header.
const TCP_FLAGS_OFFSET: usize = 13;
/// More-fragments flag and fragment offset bits of `frag_off` (host order).
const IP_MF_AND_OFFSET: u16 = 0x3fff;

/// TCP header flag bits (the 13th byte).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// Why a packet could not be parsed as a translatable TCP/UDP over IPv4 packet.
pub enum ParseError {
    /// Not IPv4 or too short to read the destination: never ours to judge.
    NotOurs,
    /// An IPv4 header or L4 header that is cut short or inconsistent.
    Malformed { dst_addr: u32 },
    /// A fragment: its ports are unknown (or absent).
    Fragment { dst_addr: u32 },
    /// ICMP: maybe an error about a translated flow (see `icmp`).
    Icmp { dst_addr: u32 },
    /// IPv4 but neither TCP, UDP nor ICMP.
    OtherProtocol { dst_addr: u32 },
}

/// The IPv4 header of an Ethernet frame, bounds-checked for its fixed part.
pub struct Ipv4 {
    pub hdr: *mut Ipv4Hdr,
    /// Header length in bytes (20..=60), from IHL.
    pub len: usize,
}

/// Finds and sanity-checks the IPv4 header (not fragments or protocol).
#[inline(always)]
pub fn ipv4(ctx: &XdpContext) -> Result<Ipv4, ParseError> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + ETH_HDR_LEN + IPV4_MIN_HDR_LEN > end {
        return Err(ParseError::NotOurs);
    }
    // SAFETY: bounds checked above.
    let ether_type = unsafe { read_unaligned((start + 12) as *const u16) };
    if ether_type != ETH_P_IP_RAW {
        return Err(ParseError::NotOurs);
    }
    let hdr = (start + ETH_HDR_LEN) as *mut Ipv4Hdr;
    // SAFETY: the fixed 20-byte header is within bounds.
    let (version_ihl, dst_addr) =
        unsafe { ((*hdr).version_ihl, read_unaligned(addr_of!((*hdr).daddr))) };
    let len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || len < IPV4_MIN_HDR_LEN {
        return Err(ParseError::Malformed { dst_addr });
    }
    Ok(Ipv4 { hdr, len })
}

/// A parsed TCP or UDP over IPv4 packet; pointers are bounds-checked.
pub struct Packet {
    pub ip: *mut Ipv4Hdr,
    /// Start of the L4 header.
    l4: usize,
    l4_check: *mut u16,
    pub proto: u8,
}

impl Packet {
    #[inline(always)]
    pub fn parse(ctx: &XdpContext) -> Result<Self, ParseError> {
        let Ipv4 { hdr: ip, len: ihl } = ipv4(ctx)?;
        // SAFETY: `ipv4` checked the fixed header is within bounds.
        let (frag_off, protocol, dst_addr) = unsafe {
            (
                read_unaligned(addr_of!((*ip).frag_off)),
                (*ip).protocol,
                read_unaligned(addr_of!((*ip).daddr)),
            )
        };
        if u16::from_be(frag_off) & IP_MF_AND_OFFSET != 0 {
            return Err(ParseError::Fragment { dst_addr });
        }
        let l4 = ip as usize + ihl;
        let (l4_len, check_offset) = match protocol {
            IPPROTO_TCP => (TCP_HDR_LEN, TCP_CHECK_OFFSET),
            IPPROTO_UDP => (UDP_HDR_LEN, UDP_CHECK_OFFSET),
            IPPROTO_ICMP => return Err(ParseError::Icmp { dst_addr }),
            _ => return Err(ParseError::OtherProtocol { dst_addr }),
        };
        if l4 + l4_len > ctx.data_end() {
            return Err(ParseError::Malformed { dst_addr });
        }
        Ok(Packet {
            ip,
            l4,
            l4_check: (l4 + check_offset) as *mut u16,
            proto: protocol,
        })
    }

    /// The packet's 5-tuple, as conntrack keys it.
    #[inline(always)]
    pub fn tuple(&self) -> FlowKey {
        // SAFETY: pointers were bounds-checked in `parse`.
        unsafe {
            let ports = read_unaligned(self.l4 as *const [u16; 2]);
            FlowKey {
                src_addr: read_unaligned(addr_of!((*self.ip).saddr)),
                dst_addr: read_unaligned(addr_of!((*self.ip).daddr)),
                src_port: ports[0],
                dst_port: ports[1],
                proto: self.proto,
                _pad: 0,
                _pad2: 0,
            }
        }
    }

    /// The TCP flags byte; zero for UDP.
    #[inline(always)]
    pub fn tcp_flags(&self) -> u8 {
        if self.proto != IPPROTO_TCP {
            return 0;
        }
        // SAFETY: `parse` checked the whole 20-byte TCP header.
        unsafe { read_unaligned((self.l4 + TCP_FLAGS_OFFSET) as *const u8) }
    }

    /// Gives the packet the addresses and ports of `to` (DNAT, reverse NAT
    /// and SNAT alike), fixing the IP and L4 checksums incrementally with the
    /// deltas `to` carries (see [`seal`]: they assume the packet's tuple is
    /// the one the entry was sealed for, i.e. its conntrack key).
    #[inline(always)]
    pub fn rewrite(&self, to: &NatEntry) {
        // SAFETY: pointers were bounds-checked in `parse`.
        unsafe {
            write_unaligned(addr_of_mut!((*self.ip).saddr), to.src_addr);
            write_unaligned(addr_of_mut!((*self.ip).daddr), to.dst_addr);
            write_unaligned(self.l4 as *mut [u16; 2], [to.src_port, to.dst_port]);

            let ip_check = addr_of_mut!((*self.ip).check);
            write_unaligned(
                ip_check,
                apply_folded(to.ip_check_delta, read_unaligned(ip_check)),
            );

            let l4_check = read_unaligned(self.l4_check);
            // A zero UDP checksum means "none computed": leave it so.
            if self.proto == IPPROTO_UDP && l4_check == 0 {
                return;
            }
            let mut check = apply_folded(to.l4_check_delta, l4_check);
            if self.proto == IPPROTO_UDP && check == 0 {
                check = 0xffff;
            }
            write_unaligned(self.l4_check, check);
        }
    }
}

/// Gives `to` the checksum deltas of rewriting a packet of tuple `from`
/// into it, ready to be stored as `from`'s conntrack entry.
#[inline(always)]
pub fn seal(from: &FlowKey, to: &mut NatEntry) {
    let addrs = Delta::default()
        .u32(from.src_addr, to.src_addr)
        .u32(from.dst_addr, to.dst_addr);
    // The addresses are part of the L4 pseudo-header, so they enter the L4 sum too.
    let all = addrs
        .u16(from.src_port, to.src_port)
        .u16(from.dst_port, to.dst_port);
    to.ip_check_delta = addrs.folded();
    to.l4_check_delta = all.folded();
}
