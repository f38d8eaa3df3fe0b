//! `vipr bench`'s packet tools, built beside the data plane's programs but
//! never part of it: a UDP flood generator and a counting sink.
//!
//! - `vipr_bench_flood` runs through BPF_PROG_TEST_RUN with live frames
//!   (`BPF_F_TEST_XDP_LIVE_FRAMES`) in the client's namespace: each run
//!   writes the plan's header template (`FLOOD_PLAN`) over the page, gives
//!   it the next source port and address of the plan's ranges and sends it
//!   out of the client's interface (`XDP_TX`). A veth peer processes the frame in its
//!   own NAPI, so the generator costs the node nothing, and sends several
//!   million frames a second from one CPU: the node, not the client's IP
//!   stack, sets the rate. Pages come back to the generator after the node
//!   has rewritten them, hence the whole header written every time.
//! - `vipr_bench_sink` is the backends' XDP program during the bench: UDP
//!   datagrams to the discard port are counted (`SINK_COUNT`, per CPU) and
//!   dropped; everything else passes. What reaches a backend is counted
//!   where a backend machine's NIC would count it, without the backend's
//!   own stack (the same for every mode) diluting the node's figure.
#![no_std]
#![no_main]

use core::ptr::write_unaligned;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};

use vipr_common::bench::{FLOOD_HEADER_LEN as HEADER_LEN, FloodPlan};
/// Offset of the UDP source port in the frame.
const SRC_PORT: usize = 14 + 20;
/// Offset of the UDP destination port in the frame.
const DST_PORT: usize = SRC_PORT + 2;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;
/// The discard port: what the sink counts.
const DISCARD_PORT: u16 = 9;

/// Offset of the IPv4 source address, and of the header checksum.
const SRC_ADDR: usize = 14 + 12;
const IP_CHECK: usize = 14 + 10;

/// What the generator sends (one entry, written by the bench).
#[map(name = "FLOOD_PLAN")]
static FLOOD_PLAN: Array<FloodPlan> = Array::with_max_entries(1, 0);

/// Frames the generator has sent on each CPU (the next port's index).
#[map(name = "FLOOD_SENT")]
static FLOOD_SENT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Datagrams the sink counted on each CPU.
#[map(name = "SINK_COUNT")]
static SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn vipr_bench_flood(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + HEADER_LEN > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let (Some(plan), Some(sent)) = (FLOOD_PLAN.get(0), FLOOD_SENT.get_ptr_mut(0)) else {
        return xdp_action::XDP_ABORTED;
    };
    let ports = u64::from(plan.ports.max(1));
    // SAFETY: this CPU's counter; the header is within bounds (checked).
    unsafe {
        let n = *sent;
        *sent = n + 1;
        write_unaligned(start as *mut [u8; HEADER_LEN], plan.header);
        let port = plan.first_port.wrapping_add((n % ports) as u16);
        write_unaligned((start + SRC_PORT) as *mut u16, port.to_be());
        let step = ((n / ports) % u64::from(plan.addresses.max(1))) as u32;
        if step != 0 {
            // The address's low word grows by `step` (no carry into the high
            // word: the bench keeps a plan's addresses within one /16), and
            // the header checksum shrinks by as much (RFC 1624).
            let low = (start + SRC_ADDR + 2) as *mut u16;
            let old = u16::from_be(core::ptr::read_unaligned(low));
            let new = old.wrapping_add(step as u16);
            write_unaligned(low, new.to_be());
            let check = (start + IP_CHECK) as *mut u16;
            let sum = u32::from(!u16::from_be(core::ptr::read_unaligned(check)))
                + u32::from(!old)
                + u32::from(new);
            let sum = (sum & 0xffff) + (sum >> 16);
            let sum = (sum & 0xffff) + (sum >> 16);
            write_unaligned(check, (!(sum as u16)).to_be());
        }
    }
    xdp_action::XDP_TX
}

#[xdp]
pub fn vipr_bench_sink(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + HEADER_LEN > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: within bounds (checked above).
    let (ether_type, version_ihl, protocol, dst_port) = unsafe {
        (
            u16::from_be(core::ptr::read_unaligned((start + 12) as *const u16)),
            *((start + 14) as *const u8),
            *((start + 14 + 9) as *const u8),
            u16::from_be(core::ptr::read_unaligned((start + DST_PORT) as *const u16)),
        )
    };
    // Only option-less IPv4 headers put the UDP ports where they are read.
    if ether_type != ETH_P_IP
        || version_ihl != 0x45
        || protocol != IPPROTO_UDP
        || dst_port != DISCARD_PORT
    {
        return xdp_action::XDP_PASS;
    }
    if let Some(count) = SINK_COUNT.get_ptr_mut(0) {
        // SAFETY: this CPU's counter; no other writer on this CPU.
        unsafe { *count += 1 };
    }
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
