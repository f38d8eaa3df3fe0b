//! vipr's XDP service translation.
//!
//! Attached to each pod's node-side veth and to the node's uplink, it sees
//! every packet entering the node's network namespace. For a packet to a
//! service frontend it picks a backend once per flow (conntrack in an LRU
//! map), rewrites the destination (DNAT) and records the reverse mapping so
//! the backend's replies get the service address back as their source.
//! Anything that is neither a service packet nor a reply of a translated flow
//! is passed untouched; a packet into the service CIDR that matches no service
//! is dropped, never routed on.
#![no_std]
#![no_main]

mod checksum;
mod headers;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_get_prandom_u32,
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use vipr_common::{
    Backend, BackendKey, Counter, CounterValue, DataplaneConfig, FlowKey, NatTarget, ServiceKey,
    ServiceValue, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_FLOWS, DEFAULT_MAX_SERVICES,
};

use headers::{Packet, ParseError};

#[map(name = "SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

#[map(name = "BACKENDS")]
static BACKENDS: HashMap<BackendKey, Backend> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Forward direction: client 5-tuple (to the frontend) -> chosen backend.
#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, NatTarget> = LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// Reply direction: backend -> client 5-tuple -> the frontend to restore.
#[map(name = "REVERSE_FLOWS")]
static REVERSE_FLOWS: LruHashMap<FlowKey, NatTarget> =
    LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

#[map(name = "CONFIG")]
static CONFIG: Array<DataplaneConfig> = Array::with_max_entries(1, 0);

#[map(name = "STATS")]
static STATS: PerCpuArray<CounterValue> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[xdp]
pub fn vipr_xdp(ctx: XdpContext) -> u32 {
    let (counter, action) = translate(&ctx);
    count(counter, ctx.data_end() - ctx.data());
    action
}

/// Decides the packet's fate and rewrites it in place when it is translated.
#[inline(always)]
fn translate(ctx: &XdpContext) -> (Counter, u32) {
    let packet = match Packet::parse(ctx) {
        Ok(packet) => packet,
        // Not IPv4, or too short to tell where it goes: the kernel's problem.
        Err(ParseError::NotOurs) => return (Counter::Passed, xdp_action::XDP_PASS),
        Err(ParseError::Malformed { dst_addr }) => {
            return reject_if_service_range(dst_addr, Counter::DropMalformed);
        }
        Err(ParseError::Fragment { dst_addr }) => {
            return reject_if_service_range(dst_addr, Counter::DropFragment);
        }
        Err(ParseError::OtherProtocol { dst_addr }) => {
            return reject_if_service_range(dst_addr, Counter::DropUnknownVip);
        }
    };
    let tuple = packet.tuple();

    // SAFETY: map values are plain data; a concurrent update at worst yields
    // a stale but well-formed target.
    if let Some(frontend) = unsafe { REVERSE_FLOWS.get(&tuple) } {
        let frontend = *frontend;
        packet.rewrite_source(frontend.addr, frontend.port);
        return (Counter::ReplyTranslated, xdp_action::XDP_PASS);
    }
    if let Some(backend) = unsafe { FLOWS.get(&tuple) } {
        let backend = *backend;
        packet.rewrite_destination(backend.addr, backend.port);
        return (Counter::FlowHit, xdp_action::XDP_PASS);
    }

    let service_key = ServiceKey {
        addr: tuple.dst_addr,
        port: tuple.dst_port,
        proto: tuple.proto,
        _pad: 0,
    };
    match unsafe { SERVICES.get(&service_key) } {
        Some(service) => {
            let service = *service;
            open_flow(ctx, &packet, &tuple, &service)
        }
        None => reject_if_service_range(tuple.dst_addr, Counter::DropUnknownVip),
    }
}

/// First packet of a flow to a frontend: pick a backend, record both
/// directions, translate.
#[inline(always)]
fn open_flow(
    ctx: &XdpContext,
    packet: &Packet,
    tuple: &FlowKey,
    service: &ServiceValue,
) -> (Counter, u32) {
    if service.backend_count == 0 {
        return (Counter::DropNoEndpoints, xdp_action::XDP_DROP);
    }
    // SAFETY: a plain helper call with no arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % service.backend_count;
    let backend_key = BackendKey {
        service_id: service.service_id,
        slot,
    };
    let Some(backend) = (unsafe { BACKENDS.get(&backend_key) }) else {
        return (Counter::DropBackendMissing, xdp_action::XDP_DROP);
    };
    let backend = *backend;

    let to_backend = NatTarget {
        addr: backend.addr,
        port: backend.port,
        _pad: 0,
    };
    let reply_tuple = FlowKey {
        src_addr: backend.addr,
        dst_addr: tuple.src_addr,
        src_port: backend.port,
        dst_port: tuple.src_port,
        proto: tuple.proto,
        _pad: [0; 3],
    };
    let to_frontend = NatTarget {
        addr: tuple.dst_addr,
        port: tuple.dst_port,
        _pad: 0,
    };
    if FLOWS.insert(tuple, &to_backend, 0).is_err()
        || REVERSE_FLOWS.insert(&reply_tuple, &to_frontend, 0).is_err()
    {
        let _ = FLOWS.remove(tuple);
        return (Counter::DropFlowMapFull, xdp_action::XDP_DROP);
    }
    debug!(
        ctx,
        "new flow {:i}:{} -> {:i}:{} via {:i}:{}",
        u32::from_be(tuple.src_addr),
        u16::from_be(tuple.src_port),
        u32::from_be(backend.addr),
        u16::from_be(backend.port),
        u32::from_be(tuple.dst_addr),
        u16::from_be(tuple.dst_port)
    );
    packet.rewrite_destination(backend.addr, backend.port);
    (Counter::NewFlow, xdp_action::XDP_PASS)
}

/// Drops a packet addressed into the service CIDR (counted under `reason`);
/// passes anything else untouched.
#[inline(always)]
fn reject_if_service_range(dst_addr: u32, reason: Counter) -> (Counter, u32) {
    let Some(config) = CONFIG.get(0) else {
        return (Counter::Passed, xdp_action::XDP_PASS);
    };
    let mask = config.service_cidr_mask;
    if mask != 0 && dst_addr & mask == config.service_cidr_addr {
        (reason, xdp_action::XDP_DROP)
    } else {
        (Counter::Passed, xdp_action::XDP_PASS)
    }
}

#[inline(always)]
fn count(counter: Counter, bytes: usize) {
    if let Some(value) = STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe {
            (*value).packets += 1;
            (*value).bytes += bytes as u64;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
