//! ICMP errors (destination unreachable, e.g. fragmentation needed or port
//! unreachable; time exceeded; parameter problem) about a translated flow.
//!
//! The error quotes the packet that caused it, as it was after translation,
//! so the receiver could not match it to its socket. Like netfilter's
//! "related" handling, the quoted tuple is given back its untranslated form
//! (inner addresses, ports and both inner checksums) and the outer header
//! is addressed to the flow's real peer, every checksum fixed incrementally.

use core::ptr::{read_unaligned, write_unaligned};

use aya_ebpf::programs::XdpContext;
use vipr_common::{FlowKey, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    checksum::Delta,
    flows,
    headers::{IPV4_MIN_HDR_LEN, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET, UDP_HDR_LEN, ipv4},
};

const ICMP_HDR_LEN: usize = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;
/// More-fragments flag and fragment offset bits of `frag_off` (host order).
const IP_MF_AND_OFFSET: u16 = 0x3fff;

/// Reads a 16-bit word at `at`. SAFETY: `at + 2` must be within the packet.
#[inline(always)]
unsafe fn get16(at: usize) -> u16 {
    unsafe { read_unaligned(at as *const u16) }
}

/// Reads a 32-bit word at `at`. SAFETY: `at + 4` must be within the packet.
#[inline(always)]
unsafe fn get32(at: usize) -> u32 {
    unsafe { read_unaligned(at as *const u32) }
}

/// Translates an ICMP error about a known flow; `false` when the packet is
/// no such error (the caller then treats it as any other ICMP). A BPF
/// subprogram: a rare path, kept out of the per-packet path's stack frame.
#[inline(never)]
pub fn translate_error(ctx: &XdpContext) -> bool {
    let ctx = &crate::subprogram_context(ctx);
    try_translate(ctx).is_some()
}

#[inline(always)]
fn try_translate(ctx: &XdpContext) -> Option<()> {
    let outer = ipv4(ctx).ok()?;
    let end = ctx.data_end();
    let ip = outer.hdr as usize;
    // SAFETY: `ipv4` checked the fixed outer header.
    if u16::from_be(unsafe { get16(ip + 6) }) & IP_MF_AND_OFFSET != 0 {
        return None;
    }
    let icmp = ip + outer.len;
    let inner = icmp + ICMP_HDR_LEN;
    if inner + IPV4_MIN_HDR_LEN > end {
        return None;
    }
    // SAFETY: the ICMP header and the inner fixed IP header are in bounds.
    let (icmp_type, inner_vihl, inner_proto) = unsafe {
        (
            read_unaligned(icmp as *const u8),
            read_unaligned(inner as *const u8),
            read_unaligned((inner + 9) as *const u8),
        )
    };
    if !matches!(
        icmp_type,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROB
    ) || !matches!(inner_proto, IPPROTO_TCP | IPPROTO_UDP)
    {
        return None;
    }
    let inner_len = usize::from(inner_vihl & 0x0f) * 4;
    if inner_vihl >> 4 != 4 || inner_len < IPV4_MIN_HDR_LEN {
        return None;
    }
    let inner_l4 = inner + inner_len;
    if inner_l4 + UDP_HDR_LEN > end {
        return None;
    }
    // SAFETY: the inner IP header and 8 bytes after it are in bounds.
    let quoted = unsafe {
        FlowKey {
            src_addr: get32(inner + 12),
            dst_addr: get32(inner + 16),
            src_port: get16(inner_l4),
            dst_port: get16(inner_l4 + 2),
            proto: inner_proto,
            _pad: 0,
            _pad2: 0,
        }
    };
    // The quoted packet travelled one way; the flow entry for the other way
    // says what that packet looked like before translation (reversed).
    let key = quoted.reversed();
    let (_, entry) = flows::lookup(&key)?;
    let restored = entry.tuple(inner_proto).reversed();

    // Inner IP header.
    let inner_addrs = Delta::default()
        .u32(quoted.src_addr, restored.src_addr)
        .u32(quoted.dst_addr, restored.dst_addr);
    // SAFETY: all offsets below were bounds-checked above.
    unsafe {
        let old_check = get16(inner + 10);
        let new_check = inner_addrs.apply(old_check);
        write_unaligned((inner + 12) as *mut u32, restored.src_addr);
        write_unaligned((inner + 16) as *mut u32, restored.dst_addr);
        write_unaligned((inner + 10) as *mut u16, new_check);
        write_unaligned(inner_l4 as *mut u16, restored.src_port);
        write_unaligned((inner_l4 + 2) as *mut u16, restored.dst_port);

        let ports = Delta::default()
            .u16(quoted.src_port, restored.src_port)
            .u16(quoted.dst_port, restored.dst_port);
        let mut icmp_delta = inner_addrs.u16(old_check, new_check);
        icmp_delta = icmp_delta
            .u16(quoted.src_port, restored.src_port)
            .u16(quoted.dst_port, restored.dst_port);
        if let Some((old, new)) = fix_inner_l4(inner_l4, end, inner_proto, inner_addrs, ports) {
            icmp_delta = icmp_delta.u16(old, new);
        }
        let icmp_check = (icmp + 2) as *mut u16;
        write_unaligned(icmp_check, icmp_delta.apply(read_unaligned(icmp_check)));

        // Outer header: to the flow's real peer; from the service when the
        // error came from the translated endpoint itself, else (a router on
        // the way) from whoever sent it.
        let outer_src = get32(ip + 12);
        let outer_dst = get32(ip + 16);
        let new_src = if outer_src == quoted.dst_addr {
            entry.src_addr
        } else {
            outer_src
        };
        let new_dst = entry.dst_addr;
        let outer_delta = Delta::default()
            .u32(outer_src, new_src)
            .u32(outer_dst, new_dst);
        write_unaligned((ip + 12) as *mut u32, new_src);
        write_unaligned((ip + 16) as *mut u32, new_dst);
        let outer_check = (ip + 10) as *mut u16;
        write_unaligned(outer_check, outer_delta.apply(read_unaligned(outer_check)));
    }
    Some(())
}

/// Fixes the quoted TCP/UDP checksum when the quote holds it (a TCP quote
/// is often only 8 bytes long; a zero UDP checksum stays zero). Returns the
/// old and new checksum words, which the ICMP checksum covers too.
///
/// SAFETY: `l4 + UDP_HDR_LEN` must be within the packet.
#[inline(always)]
unsafe fn fix_inner_l4(
    l4: usize,
    end: usize,
    proto: u8,
    addrs: Delta,
    ports: Delta,
) -> Option<(u16, u16)> {
    let at = if proto == IPPROTO_TCP {
        l4 + TCP_CHECK_OFFSET
    } else {
        l4 + UDP_CHECK_OFFSET
    };
    if at + 2 > end {
        return None;
    }
    let old = unsafe { get16(at) };
    if proto == IPPROTO_UDP && old == 0 {
        return None;
    }
    let mut new = ports.combine(addrs).apply(old);
    if proto == IPPROTO_UDP && new == 0 {
        new = 0xffff;
    }
    unsafe { write_unaligned(at as *mut u16, new) };
    Some((old, new))
}
