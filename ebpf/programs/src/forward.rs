//! The forwarding fast path: a packet the translation has rewritten leaves
//! from XDP, without an skb or the kernel's IP forwarding.
//!
//! The route comes from the kernel itself (`bpf_fib_lookup` in the node's
//! namespace, as if the packet were forwarded from its ingress interface):
//! only a unicast route with a resolved neighbour and an MTU the packet
//! fits, from and to interfaces listed in `REDIRECT_TARGETS` (userspace
//! lists the interfaces that take XDP frames and send complete checksums),
//! is taken. The packet then
//! gets the egress interface's and the neighbour's MAC addresses and its TTL
//! decremented (checksum fixed), as a router does, and is redirected.
//! Anything else (no neighbour yet, fragmentation needed, local delivery,
//! unreachable, TTL about to expire, which the kernel answers with ICMP) is
//! passed to the kernel untouched by this module, so correctness never
//! depends on the fast path.

use core::{
    mem::size_of,
    ptr::{addr_of, addr_of_mut, read_unaligned, write_unaligned},
};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use vipr_common::Counter;

use crate::{
    REDIRECT_TARGETS,
    checksum::Delta,
    count,
    headers::{ETH_HDR_LEN, IPV4_MIN_HDR_LEN, Ipv4Hdr},
};

const AF_INET: u8 = 2;
/// Length of a MAC address, and where the source one starts in the frame.
const ETH_ALEN: usize = 6;

/// The final verdict of a packet the translation gave `counter` and
/// `action`: translated packets it would pass (`XDP_PASS`) are forwarded
/// here when they can be (`XDP_REDIRECT`), or passed exactly as the
/// translation left them; every other verdict stands.
#[inline(always)]
pub fn fast_path(ctx: &XdpContext, counter: Counter, action: u32) -> u32 {
    let translated = matches!(
        counter,
        Counter::NewFlow | Counter::FlowHit | Counter::ReplyTranslated
    );
    if !translated || action != xdp_action::XDP_PASS || !enabled() {
        return action;
    }
    forward(ctx)
}

/// Routes and redirects a translated packet if it can; `XDP_PASS` (the
/// packet as the translation left it) if not. A BPF subprogram: the FIB
/// lookup's parameters and the saved headers get a stack frame of their
/// own, outside the per-packet path's.
#[inline(never)]
fn forward(ctx: &XdpContext) -> u32 {
    let ctx = &crate::subprogram_context(ctx);
    let action = xdp_action::XDP_PASS;
    // Only between listed interfaces: a frame that came in on an unlisted
    // one (a veth whose peer leaves checksums to offload, say) may carry a
    // partial checksum, which only the kernel's own path knows to finish.
    if REDIRECT_TARGETS
        .get_ifindex(ctx.ingress_ifindex() as u32)
        .is_none()
    {
        return action;
    }
    let start = ctx.data();
    if start + ETH_HDR_LEN + IPV4_MIN_HDR_LEN > ctx.data_end() {
        return action;
    }
    let ip = (start + ETH_HDR_LEN) as *mut Ipv4Hdr;
    // SAFETY: the fixed IPv4 header is within bounds (checked above).
    let ttl = unsafe { (*ip).ttl };
    // A packet that would leave with TTL 0 is the kernel's to drop, with
    // ICMP time exceeded.
    if ttl <= 1 {
        return action;
    }
    let Some(route) = route(ctx, ip) else {
        return action;
    };
    // SAFETY: the Ethernet header and the fixed IPv4 header are in bounds.
    let saved = unsafe { Saved::take(start, ip) };
    // SAFETY: as above.
    unsafe {
        write_unaligned(start as *mut [u8; ETH_ALEN], route.dmac);
        write_unaligned((start + ETH_ALEN) as *mut [u8; ETH_ALEN], route.smac);
        decrement_ttl(ip);
    }
    // Only to interfaces userspace listed (they take XDP frames); for any
    // other the helper answers XDP_PASS, and the kernel gets the packet
    // back as it was.
    match REDIRECT_TARGETS.redirect(route.ifindex, u64::from(xdp_action::XDP_PASS)) {
        Ok(redirect) => {
            count(Counter::Redirected, ctx.data_end() - start);
            redirect
        }
        Err(_) => {
            // SAFETY: as above.
            unsafe { saved.restore(start, ip) };
            action
        }
    }
}

/// 1 when the fast path is on, set by userspace at load (read-only data,
/// `vipr_common::globals`): for the verifier a constant, so with the fast
/// path off its code is not even part of the program it runs.
#[unsafe(no_mangle)]
static XDP_REDIRECT: u32 = 0;

#[inline(always)]
fn enabled() -> bool {
    // SAFETY: a plain read of a global; volatile, or the compiler would
    // fold in the zero it is built with.
    unsafe { core::ptr::read_volatile(&XDP_REDIRECT) != 0 }
}

/// What the fast path changes, to put back when the packet goes to the
/// kernel after all.
struct Saved {
    macs: [u8; 2 * ETH_ALEN],
    ttl_protocol: u16,
    check: u16,
}

impl Saved {
    /// # Safety
    /// `start` is the frame start, `ip` its in-bounds fixed IPv4 header.
    #[inline(always)]
    unsafe fn take(start: usize, ip: *const Ipv4Hdr) -> Self {
        // SAFETY: the caller's promise.
        unsafe {
            Saved {
                macs: read_unaligned(start as *const [u8; 2 * ETH_ALEN]),
                ttl_protocol: read_unaligned(addr_of!((*ip).ttl) as *const u16),
                check: read_unaligned(addr_of!((*ip).check)),
            }
        }
    }

    /// # Safety
    /// As for [`Saved::take`], on the same packet.
    #[inline(always)]
    unsafe fn restore(&self, start: usize, ip: *mut Ipv4Hdr) {
        // SAFETY: the caller's promise.
        unsafe {
            write_unaligned(start as *mut [u8; 2 * ETH_ALEN], self.macs);
            write_unaligned(addr_of_mut!((*ip).ttl) as *mut u16, self.ttl_protocol);
            write_unaligned(addr_of_mut!((*ip).check), self.check);
        }
    }
}

/// Where the FIB sends a packet: egress interface and Ethernet addresses.
struct Route {
    ifindex: u32,
    smac: [u8; ETH_ALEN],
    dmac: [u8; ETH_ALEN],
}

/// The kernel's forwarding decision for the packet, when it is a unicast
/// route with a resolved neighbour that needs no fragmentation.
#[inline(always)]
fn route(ctx: &XdpContext, ip: *const Ipv4Hdr) -> Option<Route> {
    // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions
    // of them).
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    // SAFETY: the caller checked the fixed IPv4 header is in bounds.
    unsafe {
        params.family = AF_INET;
        params.l4_protocol = (*ip).protocol;
        params.__bindgen_anon_1.tot_len = u16::from_be(read_unaligned(addr_of!((*ip).tot_len)));
        params.__bindgen_anon_2.tos = (*ip).tos;
        params.__bindgen_anon_3.ipv4_src = read_unaligned(addr_of!((*ip).saddr));
        params.__bindgen_anon_4.ipv4_dst = read_unaligned(addr_of!((*ip).daddr));
    }
    params.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: `params` is a live, correctly sized bpf_fib_lookup; the
    // context is the program's own.
    let result = unsafe {
        fib_lookup(
            ctx.ctx.cast(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    (result == i64::from(BPF_FIB_LKUP_RET_SUCCESS)).then_some(Route {
        ifindex: params.ifindex,
        smac: params.smac,
        dmac: params.dmac,
    })
}

/// TTL minus one with the header checksum updated incrementally (RFC 1624),
/// as `ip_decrease_ttl` does in the kernel.
///
/// # Safety
/// `ip` points at an in-bounds IPv4 header with a TTL above zero.
#[inline(always)]
unsafe fn decrement_ttl(ip: *mut Ipv4Hdr) {
    // SAFETY: the caller's promise.
    unsafe {
        // TTL and protocol share one 16-bit word of the checksum.
        let word = addr_of_mut!((*ip).ttl) as *mut u16;
        let old = read_unaligned(word);
        write_unaligned(addr_of_mut!((*ip).ttl), (*ip).ttl - 1);
        let new = read_unaligned(word);
        let check = addr_of_mut!((*ip).check);
        write_unaligned(
            check,
            Delta::default().u16(old, new).apply(read_unaligned(check)),
        );
    }
}
