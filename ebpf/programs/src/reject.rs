//! Answers for a frontend without endpoints, as kube-proxy's REJECT does: a
//! TCP packet gets a RST, a UDP datagram an ICMP port unreachable, both sent
//! back out the interface they came in on (XDP_TX) so the client fails at
//! once instead of timing out.
//!
//! Every field of the original is read into registers first; the reply is
//! then written over the front of the frame and the frame resized, which
//! invalidates all earlier packet pointers.

use core::ptr::{read_unaligned, write_unaligned};

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use vipr_common::{IPPROTO_ICMP, IPPROTO_TCP};

use crate::{
    checksum::{fold, sum_u32},
    headers::{ETH_HDR_LEN, IPV4_MIN_HDR_LEN, TCP_HDR_LEN, UDP_HDR_LEN, tcp_flags},
};

/// Ethernet + IPv4 + TCP without options: the size of a RST we send.
const RST_FRAME_LEN: usize = ETH_HDR_LEN + IPV4_MIN_HDR_LEN + TCP_HDR_LEN;
/// ICMP header length (type, code, checksum, unused).
const ICMP_HDR_LEN: usize = 8;
/// What an ICMP error adds in front of the quoted original IP header.
const ICMP_PREFIX_LEN: usize = IPV4_MIN_HDR_LEN + ICMP_HDR_LEN;
/// Longest quote: a 60-byte IP header plus 8 bytes, in 32-bit words, plus
/// the ICMP header's two words.
const ICMP_MAX_WORDS: usize = (60 + 8 + ICMP_HDR_LEN) / 4;
const REPLY_TTL: u8 = 64;

/// The Ethernet and IP endpoints of the packet being answered.
struct Origin {
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    saddr: u32,
    daddr: u32,
    ihl: usize,
    tot_len: u16,
}

/// Reads the Ethernet addresses and IPv4 endpoints; the caller's parse has
/// already validated the headers, so this only re-proves bounds.
#[inline(always)]
fn origin(ctx: &XdpContext) -> Option<Origin> {
    let data = ctx.data();
    if data + ETH_HDR_LEN + IPV4_MIN_HDR_LEN > ctx.data_end() {
        return None;
    }
    let ip = data + ETH_HDR_LEN;
    // SAFETY: bounds checked above.
    unsafe {
        Some(Origin {
            dst_mac: read_unaligned(data as *const [u8; 6]),
            src_mac: read_unaligned((data + 6) as *const [u8; 6]),
            ihl: usize::from(read_unaligned(ip as *const u8) & 0x0f) * 4,
            tot_len: u16::from_be(read_unaligned((ip + 2) as *const u16)),
            saddr: read_unaligned((ip + 12) as *const u32),
            daddr: read_unaligned((ip + 16) as *const u32),
        })
    }
}

/// Writes a reply's Ethernet header (addresses swapped, type IPv4) and a fresh 20-byte
/// IPv4 header from `from` to `to`, checksum included.
///
/// SAFETY: `data + ETH_HDR_LEN + IPV4_MIN_HDR_LEN` must be within the packet.
#[inline(always)]
unsafe fn write_eth_ip(data: usize, o: &Origin, tot_len: u16, proto: u8) {
    let words: [u16; 10] = [
        0x4500u16.to_be(),
        tot_len.to_be(),
        0,
        0x4000u16.to_be(), // DF
        (u16::from(REPLY_TTL) << 8 | u16::from(proto)).to_be(),
        0,
        o.daddr as u16,
        (o.daddr >> 16) as u16,
        o.saddr as u16,
        (o.saddr >> 16) as u16,
    ];
    let mut sum = 0u32;
    for w in words {
        sum += u32::from(w);
    }
    let ip = data + ETH_HDR_LEN;
    unsafe {
        write_unaligned(data as *mut [u8; 6], o.src_mac);
        write_unaligned((data + 6) as *mut [u8; 6], o.dst_mac);
        // A grown frame's front is fresh headroom: the type must be written too.
        write_unaligned((data + 12) as *mut u16, 0x0800u16.to_be());
        write_unaligned(ip as *mut [u16; 10], words);
        write_unaligned((ip + 10) as *mut u16, !fold(sum));
    }
}

/// Shrinks the frame to `len` bytes.
#[inline(always)]
fn trim_to(ctx: &XdpContext, len: usize) -> Option<()> {
    let cur = ctx.data_end() - ctx.data();
    if cur > len {
        // SAFETY: plain helper call on our own context.
        let err = unsafe { bpf_xdp_adjust_tail(ctx.ctx, len as i32 - cur as i32) };
        if err != 0 {
            return None;
        }
    }
    Some(())
}

/// Turns a TCP segment into the RST that refuses it (RFC 793's reset
/// generation: the ACK'd sequence when it carried an ACK, else an ACK of
/// everything it occupied). `None`: not answerable (e.g. it was a RST).
#[inline(always)]
pub fn tcp_reset(ctx: &XdpContext) -> Option<()> {
    let o = origin(ctx)?;
    let data = ctx.data();
    let tcp = data + ETH_HDR_LEN + o.ihl;
    if tcp + TCP_HDR_LEN > ctx.data_end() || data + RST_FRAME_LEN > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked above.
    let (ports, seq, ack, doff, flags) = unsafe {
        (
            read_unaligned(tcp as *const [u16; 2]),
            read_unaligned((tcp + 4) as *const u32),
            read_unaligned((tcp + 8) as *const u32),
            usize::from(read_unaligned((tcp + 12) as *const u8) >> 4) * 4,
            read_unaligned((tcp + 13) as *const u8),
        )
    };
    if flags & tcp_flags::RST != 0 {
        return None;
    }
    let (rst_seq, rst_ack, rst_flags) = if flags & tcp_flags::ACK != 0 {
        (ack, 0, tcp_flags::RST)
    } else {
        let payload = usize::from(o.tot_len).saturating_sub(o.ihl + doff) as u32;
        let syn_fin =
            u32::from(flags & tcp_flags::SYN != 0) + u32::from(flags & tcp_flags::FIN != 0);
        let acked = u32::from_be(seq).wrapping_add(payload + syn_fin);
        (0, acked.to_be(), tcp_flags::RST | tcp_flags::ACK)
    };
    let words: [u16; 10] = [
        ports[1],
        ports[0],
        rst_seq as u16,
        (rst_seq >> 16) as u16,
        rst_ack as u16,
        (rst_ack >> 16) as u16,
        ((5u16 << 12) | u16::from(rst_flags)).to_be(),
        0, // window
        0, // checksum
        0, // urgent pointer
    ];
    // Pseudo-header: addresses (swapped: a sum does not care), protocol, length.
    let mut sum = sum_u32(o.saddr)
        + sum_u32(o.daddr)
        + u32::from(u16::from(IPPROTO_TCP).to_be())
        + u32::from((TCP_HDR_LEN as u16).to_be());
    for w in words {
        sum += u32::from(w);
    }
    let tcp = data + ETH_HDR_LEN + IPV4_MIN_HDR_LEN;
    // SAFETY: `data + RST_FRAME_LEN` was checked against the end above.
    unsafe {
        write_eth_ip(
            data,
            &o,
            (IPV4_MIN_HDR_LEN + TCP_HDR_LEN) as u16,
            IPPROTO_TCP,
        );
        write_unaligned(tcp as *mut [u16; 10], words);
        write_unaligned((tcp + 16) as *mut u16, !fold(sum));
    }
    trim_to(ctx, RST_FRAME_LEN)
}

/// Turns a UDP datagram into the ICMP port unreachable (type 3, code 3) that
/// refuses it, quoting its IP header and first 8 bytes (RFC 792).
#[inline(always)]
pub fn icmp_port_unreachable(ctx: &XdpContext) -> Option<()> {
    let o = origin(ctx)?;
    if o.ihl < IPV4_MIN_HDR_LEN || o.ihl > 60 {
        return None;
    }
    if ctx.data() + ETH_HDR_LEN + o.ihl + UDP_HDR_LEN > ctx.data_end() {
        return None;
    }
    // Grow in front: the original IP header then sits right where the quote goes.
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(ICMP_PREFIX_LEN as i32)) } != 0 {
        return None;
    }
    let quote_len = o.ihl + UDP_HDR_LEN;
    let frame_len = ETH_HDR_LEN + ICMP_PREFIX_LEN + quote_len;
    let data = ctx.data();
    let end = ctx.data_end();
    let icmp = data + ETH_HDR_LEN + IPV4_MIN_HDR_LEN;
    if icmp + ICMP_HDR_LEN > end {
        return None;
    }
    // SAFETY: bounds checked above.
    unsafe {
        write_eth_ip(data, &o, (ICMP_PREFIX_LEN + quote_len) as u16, IPPROTO_ICMP);
        // Type 3 (destination unreachable), code 3 (port), checksum 0 for now, unused.
        write_unaligned(icmp as *mut [u8; 8], [3, 3, 0, 0, 0, 0, 0, 0]);
    }
    // The ICMP checksum covers the header and the quote: a bounded walk.
    let words = (ICMP_HDR_LEN + quote_len) / 4;
    let mut sum = 0u32;
    for i in 0..ICMP_MAX_WORDS {
        if i >= words {
            break;
        }
        let at = icmp + i * 4;
        if at + 4 > end {
            return None;
        }
        // SAFETY: bounds checked just above.
        sum += sum_u32(unsafe { read_unaligned(at as *const u32) });
    }
    // SAFETY: `icmp + ICMP_HDR_LEN <= end` was checked above.
    unsafe { write_unaligned((icmp + 2) as *mut u16, !fold(sum)) };
    trim_to(ctx, frame_len)
}
