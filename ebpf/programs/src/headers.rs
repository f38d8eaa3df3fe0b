//! Bounds-checked access to the Ethernet, IPv4 and TCP/UDP headers of the
//! packet in an XDP context, and the in-place rewrites translation needs.
//!
//! Packet memory has no alignment guarantee, so every field is read and
//! written unaligned.

use core::ptr::{addr_of, addr_of_mut, read_unaligned, write_unaligned};

use aya_ebpf::programs::XdpContext;
use vipr_common::{FlowKey, IPPROTO_TCP, IPPROTO_UDP};

use crate::checksum;

const ETH_HDR_LEN: usize = 14;
/// 0x0800 as it reads from network-order memory on a little-endian host.
const ETH_P_IP_RAW: u16 = 0x0800u16.to_be();
const IPV4_MIN_HDR_LEN: usize = 20;
const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
/// Offsets of the checksum field inside the TCP and UDP headers.
const TCP_CHECK_OFFSET: usize = 16;
const UDP_CHECK_OFFSET: usize = 6;
/// More-fragments flag and fragment offset bits of `frag_off` (host order).
const IP_MF_AND_OFFSET: u16 = 0x3fff;

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
    /// IPv4 but neither TCP nor UDP.
    OtherProtocol { dst_addr: u32 },
}

/// A parsed TCP or UDP over IPv4 packet; pointers are bounds-checked.
pub struct Packet {
    ip: *mut Ipv4Hdr,
    /// Source and destination ports, network order, at the start of the L4 header.
    ports: *mut [u16; 2],
    l4_check: *mut u16,
    proto: u8,
}

impl Packet {
    #[inline(always)]
    pub fn parse(ctx: &XdpContext) -> Result<Self, ParseError> {
        let start = ctx.data();
        let end = ctx.data_end();
        if start + ETH_HDR_LEN > end {
            return Err(ParseError::NotOurs);
        }
        // SAFETY: bounds checked above.
        let ether_type = unsafe { read_unaligned((start + 12) as *const u16) };
        if ether_type != ETH_P_IP_RAW {
            return Err(ParseError::NotOurs);
        }
        let ip_start = start + ETH_HDR_LEN;
        if ip_start + IPV4_MIN_HDR_LEN > end {
            return Err(ParseError::NotOurs);
        }
        let ip = ip_start as *mut Ipv4Hdr;
        // SAFETY: the fixed 20-byte header is within bounds.
        let (version_ihl, frag_off, protocol, dst_addr) = unsafe {
            (
                (*ip).version_ihl,
                read_unaligned(addr_of!((*ip).frag_off)),
                (*ip).protocol,
                read_unaligned(addr_of!((*ip).daddr)),
            )
        };
        let ihl = usize::from(version_ihl & 0x0f) * 4;
        if version_ihl >> 4 != 4 || ihl < IPV4_MIN_HDR_LEN {
            return Err(ParseError::Malformed { dst_addr });
        }
        if u16::from_be(frag_off) & IP_MF_AND_OFFSET != 0 {
            return Err(ParseError::Fragment { dst_addr });
        }
        let l4_start = ip_start + ihl;
        let (l4_len, check_offset) = match protocol {
            IPPROTO_TCP => (TCP_HDR_LEN, TCP_CHECK_OFFSET),
            IPPROTO_UDP => (UDP_HDR_LEN, UDP_CHECK_OFFSET),
            _ => return Err(ParseError::OtherProtocol { dst_addr }),
        };
        if l4_start + l4_len > end {
            return Err(ParseError::Malformed { dst_addr });
        }
        Ok(Packet {
            ip,
            ports: l4_start as *mut [u16; 2],
            l4_check: (l4_start + check_offset) as *mut u16,
            proto: protocol,
        })
    }

    /// The packet's 5-tuple, as conntrack keys it.
    #[inline(always)]
    pub fn tuple(&self) -> FlowKey {
        // SAFETY: pointers were bounds-checked in `parse`.
        unsafe {
            let ports = read_unaligned(self.ports);
            FlowKey {
                src_addr: read_unaligned(addr_of!((*self.ip).saddr)),
                dst_addr: read_unaligned(addr_of!((*self.ip).daddr)),
                src_port: ports[0],
                dst_port: ports[1],
                proto: self.proto,
                _pad: [0; 3],
            }
        }
    }

    /// DNAT: replaces the destination address and port, fixing both checksums.
    #[inline(always)]
    pub fn rewrite_destination(&self, addr: u32, port: u16) {
        // SAFETY: pointers were bounds-checked in `parse`.
        unsafe {
            self.rewrite(addr_of_mut!((*self.ip).daddr), (self.ports as *mut u16).add(1), addr, port)
        }
    }

    /// Reverse NAT: replaces the source address and port, fixing both checksums.
    #[inline(always)]
    pub fn rewrite_source(&self, addr: u32, port: u16) {
        // SAFETY: pointers were bounds-checked in `parse`.
        unsafe { self.rewrite(addr_of_mut!((*self.ip).saddr), self.ports as *mut u16, addr, port) }
    }

    #[inline(always)]
    unsafe fn rewrite(&self, addr_field: *mut u32, port_field: *mut u16, addr: u32, port: u16) {
        unsafe {
            let old_addr = read_unaligned(addr_field);
            let old_port = read_unaligned(port_field);
            write_unaligned(addr_field, addr);
            write_unaligned(port_field, port);

            let ip_check = addr_of_mut!((*self.ip).check);
            write_unaligned(ip_check, checksum::replace_u32(read_unaligned(ip_check), old_addr, addr));

            let l4_check = read_unaligned(self.l4_check);
            // A zero UDP checksum means "none computed": leave it so.
            if self.proto == IPPROTO_UDP && l4_check == 0 {
                return;
            }
            // The address is part of the L4 pseudo-header, so it enters the L4 sum too.
            let mut check = checksum::replace_u32(l4_check, old_addr, addr);
            check = checksum::replace_u16(check, old_port, port);
            if self.proto == IPPROTO_UDP && check == 0 {
                check = 0xffff;
            }
            write_unaligned(self.l4_check, check);
        }
    }
}
