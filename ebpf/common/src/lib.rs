//! Map keys, values and constants shared by the eBPF programs and userspace.
//!
//! Both sides compile this one crate, so a layout change is seen by both at
//! once. Every type is `#[repr(C)]`, padded explicitly (the verifier rejects
//! reads of uninitialised padding in map keys), and `Copy`.
//!
//! Addresses and ports are kept in network byte order, as they sit in the
//! packet, so the hot path never swaps bytes; userspace converts.
#![no_std]

/// Names of the maps in the eBPF object. Userspace looks maps up by these.
pub mod map_names {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const FLOWS: &str = "FLOWS";
    pub const REVERSE_FLOWS: &str = "REVERSE_FLOWS";
    pub const CONFIG: &str = "CONFIG";
    pub const STATS: &str = "STATS";
}

/// Name of the XDP program that translates service traffic.
pub const XDP_PROGRAM: &str = "vipr_xdp";

/// Default capacity of the service (frontend) map.
pub const DEFAULT_MAX_SERVICES: u32 = 65_536;
/// Default capacity of the backend map (service slots).
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;
/// Default capacity of each conntrack map (LRU).
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;

/// IP protocol numbers the data plane translates.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// A service frontend: the virtual address, port and protocol a client dials.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// What the data plane needs to pick a backend for a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Stable id chosen by userspace; keys the backend slots.
    pub service_id: u32,
    /// Number of backend slots `0..backend_count` filled for this service.
    /// Zero means "no ready endpoint": the data plane rejects the flow.
    pub backend_count: u32,
}

/// One backend slot of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub service_id: u32,
    pub slot: u32,
}

/// A backend: where a translated packet goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// A connection's 5-tuple as seen in one direction of the packet path.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// The rewrite recorded for one direction of a flow: the address and port
/// that replace the destination (forward) or the source (reply).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatTarget {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Node-wide settings written by userspace into a one-entry array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DataplaneConfig {
    /// Service CIDR network address, network byte order. A packet to an
    /// address inside it that matches no service is dropped, never routed.
    pub service_cidr_addr: u32,
    /// Service CIDR mask, network byte order; zero disables the check.
    pub service_cidr_mask: u32,
}

/// Why a packet got the verdict it got. Indexes the per-CPU `STATS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Not for a service and not a reply of a translated flow: left untouched.
    Passed = 0,
    /// First packet of a flow translated to a backend.
    NewFlow = 1,
    /// Packet of a known flow translated to its backend.
    FlowHit = 2,
    /// Reply of a translated flow given its service address back.
    ReplyTranslated = 3,
    /// Dropped: addressed into the service CIDR but matches no service.
    DropUnknownVip = 4,
    /// Dropped: the service has no ready endpoint.
    DropNoEndpoints = 5,
    /// Dropped: a header was cut short or malformed.
    DropMalformed = 6,
    /// Dropped: an IP fragment addressed to a service (ports unknown).
    DropFragment = 7,
    /// Dropped: conntrack could not record the flow (map full).
    DropFlowMapFull = 8,
    /// Dropped: backend slot missing although the service counts it.
    DropBackendMissing = 9,
}

impl Counter {
    /// Number of counters; the size of the `STATS` array.
    pub const COUNT: u32 = 10;

    /// Every counter, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Passed,
        Counter::NewFlow,
        Counter::FlowHit,
        Counter::ReplyTranslated,
        Counter::DropUnknownVip,
        Counter::DropNoEndpoints,
        Counter::DropMalformed,
        Counter::DropFragment,
        Counter::DropFlowMapFull,
        Counter::DropBackendMissing,
    ];

    /// A stable snake_case name, used for metrics labels and CLI output.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Passed => "passed",
            Counter::NewFlow => "new_flow",
            Counter::FlowHit => "flow_hit",
            Counter::ReplyTranslated => "reply_translated",
            Counter::DropUnknownVip => "drop_unknown_vip",
            Counter::DropNoEndpoints => "drop_no_endpoints",
            Counter::DropMalformed => "drop_malformed",
            Counter::DropFragment => "drop_fragment",
            Counter::DropFlowMapFull => "drop_flow_map_full",
            Counter::DropBackendMissing => "drop_backend_missing",
        }
    }
}

/// Per-CPU packet and byte totals for one counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: every type is repr(C), Copy, has no implicit padding and is valid
    // for any bit pattern, which is what aya::Pod requires.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for NatTarget {}
    unsafe impl aya::Pod for DataplaneConfig {}
    unsafe impl aya::Pod for CounterValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 8);
        assert_eq!(size_of::<BackendKey>(), 8);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<FlowKey>(), 16);
        assert_eq!(size_of::<NatTarget>(), 8);
        assert_eq!(size_of::<DataplaneConfig>(), 8);
        assert_eq!(size_of::<CounterValue>(), 16);
    }

    #[test]
    fn counters_are_indexed_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{}", c.name());
        }
    }
}
