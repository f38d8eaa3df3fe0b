//! Events for `vipr monitor`: new flows translated, drops and refusals with
//! their reason, and on demand replies translated back, written to the
//! `MONITOR_EVENTS` ring buffer from one place (the `vipr_xdp` wrapper,
//! around `translate`).
//!
//! While no monitor is attached the `MONITOR` flags are zero and the whole
//! cost is that one array load and a branch. An event the ring has no room
//! for is counted in `MONITOR_LOST`, so the monitor can say how many it
//! missed.

use core::ptr::read_unaligned;

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{PerCpuArray, RingBuf},
    programs::XdpContext,
};
use vipr_common::{
    Counter, FlowKey, IPPROTO_TCP, IPPROTO_UDP, MONITOR_RING_BYTES, MonitorEvent, NatEntry,
    flow_flags, monitor_flags,
};

use crate::{flows, headers::ipv4};

/// The [`monitor_flags`] the agent sets while monitors listen: a global in
/// a data section of its own (a one-value array map userspace writes), so
/// reading it is one load, without the lookup an array map costs.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".data.vipr_monitor")]
static mut MONITOR_WANTED: u32 = 0;

#[map(name = "MONITOR_EVENTS")]
static MONITOR_EVENTS: RingBuf = RingBuf::with_byte_size(MONITOR_RING_BYTES, 0);

/// Per CPU: events that found the ring full.
#[map(name = "MONITOR_LOST")]
static MONITOR_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The events asked for now; zero when no monitor is attached.
#[inline(always)]
pub fn wanted() -> u32 {
    // SAFETY: a plain read of a u32 userspace may change at any time;
    // volatile, so the compiler never assumes it is the initial zero.
    unsafe { core::ptr::read_volatile(&raw const MONITOR_WANTED) }
}

/// The packet's tuple as far as it can be read (ports zero otherwise).
#[inline(always)]
pub fn tuple(ctx: &XdpContext) -> Option<FlowKey> {
    let ip = ipv4(ctx).ok()?;
    let start = ip.hdr as usize;
    // SAFETY: `ipv4` checked the fixed 20-byte header is in bounds.
    let (proto, src_addr, dst_addr) = unsafe {
        (
            read_unaligned((start + 9) as *const u8),
            read_unaligned((start + 12) as *const u32),
            read_unaligned((start + 16) as *const u32),
        )
    };
    let mut key = FlowKey {
        src_addr,
        dst_addr,
        src_port: 0,
        dst_port: 0,
        proto,
        _pad: 0,
        _pad2: 0,
    };
    let l4 = start + ip.len;
    if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) && l4 + 4 <= ctx.data_end() {
        // SAFETY: bounds checked just above.
        let ports = unsafe { read_unaligned(l4 as *const [u16; 2]) };
        key.src_port = ports[0];
        key.dst_port = ports[1];
    }
    Some(key)
}

/// The event kind (a [`monitor_flags`] bit) of an outcome, if it has one.
#[inline(always)]
fn kind_of(counter: Counter) -> Option<u32> {
    match counter {
        Counter::NewFlow | Counter::SockConnectTranslated | Counter::SockSendmsgTranslated => {
            Some(monitor_flags::TRANSLATE)
        }
        Counter::ReplyTranslated => Some(monitor_flags::REPLY),
        c if c.is_drop() || c.is_refusal() => Some(monitor_flags::DROP),
        _ => None,
    }
}

/// An outcome of `translate` other than a conntrack hit: an event if a
/// monitor wants its kind. Costs one load while none listens.
#[inline(always)]
pub fn observe(ctx: &XdpContext, counter: Counter) {
    let wanted = wanted();
    if wanted != 0 {
        crate::called(emit_event(ctx, wanted, counter as u32));
    }
}

/// [`emit`] as a BPF subprogram: events are the rare path, kept out of the
/// per-packet path's stack frame.
#[inline(never)]
fn emit_event(ctx: &XdpContext, wanted: u32, counter: u32) -> u32 {
    let ctx = &crate::subprogram_context(ctx);
    Counter::from_index(counter).map_or(0, |counter| u32::from(emit(ctx, wanted, counter)))
}

/// The `flow_flags::MONITORED` bit for a new flow's reply entry: set while
/// a monitor wants reply events.
#[inline(always)]
pub fn reply_flag() -> u8 {
    if wanted() & monitor_flags::REPLY != 0 {
        flow_flags::MONITORED
    } else {
        0
    }
}

/// A reply of a flow opened under a monitor, translated back with `entry`
/// (`before`: the tuple it arrived with): an event while replies are wanted.
/// A BPF subprogram, as [`emit_event`].
#[inline(never)]
pub fn reply(ctx: &XdpContext, before: &FlowKey, entry: &NatEntry) -> u32 {
    let ctx = &crate::subprogram_context(ctx);
    if wanted() & monitor_flags::REPLY == 0 {
        return 0;
    }
    // SAFETY: the context is valid for the program's run; the ifindex field
    // of xdp_md is always readable.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    u32::from(write(
        ifindex,
        Counter::ReplyTranslated,
        before,
        &entry.tuple(before.proto),
    ))
}

/// Writes the event for a packet `translate` counted under `counter`, if
/// `wanted` asks for that kind; whether it did. The packet has already been rewritten, so
/// the tuple it arrived with comes from the conntrack entry just used (a
/// translation or reply) or from the packet itself (a drop leaves it as it
/// was; a refusal turned it into the answer, which travels the other way).
#[inline(always)]
pub fn emit(ctx: &XdpContext, wanted: u32, counter: Counter) -> bool {
    let Some(kind) = kind_of(counter) else {
        return false;
    };
    if wanted & kind == 0 {
        return false;
    }
    let Some(now) = tuple(ctx) else {
        return false;
    };
    let before = match counter {
        // The reply entry of the new flow records the client and frontend.
        Counter::NewFlow => match flows::lookup(&now.reversed()) {
            Some((_, reply)) => reply.tuple(now.proto).reversed(),
            None => return false,
        },
        Counter::RejectTcp => now.reversed(),
        // The ICMP error's outer header: frontend -> client; ports unknown.
        Counter::RejectUdp => FlowKey {
            proto: IPPROTO_UDP,
            ..now.reversed()
        },
        _ => now,
    };
    let after = if kind == monitor_flags::DROP {
        before
    } else {
        now
    };
    // SAFETY: the context is valid for the program's run; the ifindex field
    // of xdp_md is always readable.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    write(ifindex, counter, &before, &after)
}

/// The event of a socket-level translation or refusal (`after`: the
/// backend as destination; equal to `before` for a refusal).
#[inline(always)]
pub fn emit_socket(counter: Counter, before: &FlowKey, after: &FlowKey) {
    let Some(kind) = kind_of(counter) else {
        return;
    };
    if wanted() & kind != 0 {
        // Not written: counted in MONITOR_LOST.
        let _ = write(0, counter, before, after);
    }
}

/// Writes an event to the ring; whether it had room (if not, the loss is
/// counted in `MONITOR_LOST`).
#[inline(always)]
fn write(ifindex: u32, counter: Counter, before: &FlowKey, after: &FlowKey) -> bool {
    let Some(mut entry) = MONITOR_EVENTS.reserve::<MonitorEvent>(0) else {
        if let Some(lost) = MONITOR_LOST.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, no other writer on this CPU.
            unsafe { *lost += 1 };
        }
        return false;
    };
    entry.write(MonitorEvent {
        // SAFETY: a plain helper call.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        ifindex,
        counter: counter as u32,
        before: *before,
        after: *after,
    });
    entry.submit(0);
    true
}
