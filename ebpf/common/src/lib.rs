//! Map keys, values and constants shared by the eBPF programs and userspace.
//!
//! Both sides compile this one crate, so a layout change is seen by both at
//! once. Every type is `#[repr(C)]`, padded explicitly (the verifier rejects
//! reads of uninitialised padding in map keys), and `Copy`.
//!
//! Addresses and ports are kept in network byte order, as they sit in the
//! packet, so the hot path never swaps bytes; userspace converts.
#![no_std]

pub mod bench;
pub mod flow_table;
pub mod hash;

/// Names of the maps in the eBPF object. Userspace looks maps up by these.
pub mod map_names {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    /// Conntrack: both directions of every translated flow in one map.
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    pub const CONFIG: &str = "CONFIG";
    pub const STATS: &str = "STATS";
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const SERVICE_DROPS: &str = "SERVICE_DROPS";
    /// The data section holding the monitor's flags (`MONITOR_WANTED`),
    /// which aya loads as a one-value array map of that name.
    pub const MONITOR: &str = ".data.vipr_monitor";
    pub const MONITOR_EVENTS: &str = "MONITOR_EVENTS";
    pub const MONITOR_LOST: &str = "MONITOR_LOST";
    /// Maglev lookup tables of every `maglev` service: [`MaglevKey`]
    /// (service id, slot `0..ServiceValue::maglev_size`) -> [`Endpoint`].
    /// Hash map, not preallocated: only maglev services use entries.
    pub const MAGLEV: &str = "MAGLEV";
    /// Which backends a service has now: [`MemberKey`] -> the stats id (u32)
    /// of the (frontend, backend) pair, see `BACKEND_STATS`. Lets session
    /// affinity check in one lookup that a remembered backend is still one
    /// of the service's (ready, weight > 0) backends, and a new flow find
    /// where it counts.
    pub const MEMBERS: &str = "MEMBERS";
    /// ClientIP session affinity (LRU): [`AffinityKey`] -> [`AffinityValue`].
    pub const AFFINITY: &str = "AFFINITY";
    /// Open flows per backend endpoint, for `lc`, `sed`, `nq`:
    /// [`Endpoint`] -> u32. +1 when a flow of such a service opens, -1 when
    /// it closes (RST, or FIN both ways); userspace recounts from the flow
    /// map to forget flows that expired or were removed without a close.
    pub const ACTIVE_CONNECTIONS: &str = "ACTIVE_CONNECTIONS";
    /// Round-robin turn counter (u32) of each service, indexed by service id
    /// (`rr`, `wrr`).
    pub const BALANCE_TURNS: &str = "BALANCE_TURNS";
    /// Socket-path connections counted in `ACTIVE_CONNECTIONS`: socket
    /// cookie (u64) -> [`Endpoint`], removed (and uncounted) when the
    /// socket is released.
    pub const SOCK_CONNECTIONS: &str = "SOCK_CONNECTIONS";
    /// Interfaces the forwarding fast path may redirect translated packets
    /// to (a device hash map: ifindex -> ifindex).
    pub const REDIRECT_TARGETS: &str = "REDIRECT_TARGETS";
    /// The new-flow programs `vipr_xdp` tail-calls (a program array), at
    /// [`NEW_FLOW_WITH_EVENTS`](super::NEW_FLOW_WITH_EVENTS) and
    /// [`NEW_FLOW_WITHOUT_EVENTS`](super::NEW_FLOW_WITHOUT_EVENTS).
    pub const NEW_FLOW_PROGRAMS: &str = "NEW_FLOW_PROGRAMS";
    /// Per-CPU scratch value where `vipr_xdp` hands a new flow's frontend
    /// to the new-flow program it tail-calls.
    pub const OPENING: &str = "OPENING";
    /// Maps of earlier builds, removed from the pin folder at load: the
    /// forward and reply conntrack maps that `CONNTRACK` replaced.
    pub const RETIRED: [&str; 2] = ["FLOWS", "REVERSE_FLOWS"];
}

/// Read-only globals of the eBPF object, set by userspace when it loads
/// the object: constants for the verifier and one load each for the hit
/// path (a `CONFIG` lookup costs several instructions more).
pub mod globals {
    /// `u32`: the conntrack table's slot count minus one.
    pub const FLOW_TABLE_MASK: &str = "FLOW_TABLE_MASK";
    /// `u64`: the conntrack table's hash seed (kept in `CONFIG` too, where
    /// a restarted agent finds it).
    pub const FLOW_TABLE_SEED: &str = "FLOW_TABLE_SEED";
    /// `u32`: 1 when the forwarding fast path is on.
    pub const XDP_REDIRECT: &str = "XDP_REDIRECT";
}

/// Name of the XDP program that translates service traffic.
pub const XDP_PROGRAM: &str = "vipr_xdp";
/// Name of the XDP program that passes every packet untouched: the cost
/// floor for benchmarks, and the program a veth peer needs so that XDP_TX
/// (and XDP_REDIRECT) frames sent towards it are received in native mode.
pub const PASS_PROGRAM: &str = "vipr_pass";
/// The translation with the monitor's event code compiled out: loaded only
/// by benchmarks, to measure what the (idle) event code costs.
pub const XDP_PROGRAM_WITHOUT_EVENTS: &str = "vipr_xdp_no_events";
/// The program `vipr_xdp` tail-calls to open a flow (its first packet to a
/// frontend), and its counterpart for `vipr_xdp_no_events`.
pub const NEW_FLOW_PROGRAM: &str = "vipr_xdp_new_flow";
pub const NEW_FLOW_PROGRAM_WITHOUT_EVENTS: &str = "vipr_xdp_new_flow_no_events";
/// Their indexes in `map_names::NEW_FLOW_PROGRAMS`.
pub const NEW_FLOW_WITH_EVENTS: u32 = 0;
pub const NEW_FLOW_WITHOUT_EVENTS: u32 = 1;

/// Names of the cgroup sock_addr programs that balance the node's own
/// clients at the socket level (attached together to one cgroup v2 folder).
pub mod sock_programs {
    /// `connect()` of TCP and UDP sockets: the VIP becomes a backend.
    pub const CONNECT4: &str = "vipr_connect4";
    /// `sendmsg()` / `sendto()` of unconnected UDP sockets, per datagram.
    pub const SENDMSG4: &str = "vipr_sendmsg4";
    /// `recvmsg()` / `recvfrom()` of UDP sockets: replies show the VIP.
    pub const RECVMSG4: &str = "vipr_recvmsg4";
    /// `getpeername()`: a translated socket's peer shows as the VIP.
    pub const GETPEERNAME4: &str = "vipr_getpeername4";
    /// Every sock_addr program, in attach order.
    pub const ALL: [&str; 4] = [CONNECT4, SENDMSG4, RECVMSG4, GETPEERNAME4];
    /// cgroup `sock_release` (a cgroup sock program, not sock_addr): a TCP
    /// socket counted for `lc` / `sed` / `nq` at connect is uncounted.
    pub const SOCK_RELEASE: &str = "vipr_sock_release";
}

/// Default capacity of the service (frontend) map.
pub const DEFAULT_MAX_SERVICES: u32 = 65_536;
/// Default capacity of the backend map (service slots).
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;
/// Default number of flows conntrack holds at least; the `CONNTRACK` table
/// gets `flow_table::SLOTS_PER_FLOW` slots per flow (two entries, one per
/// direction, in a table at most half full).
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;

/// Conntrack's clock: `bpf_ktime_get_coarse_ns() >> FLOW_CLOCK_SHIFT`
/// (CLOCK_MONOTONIC_COARSE in ticks of 2^24 ns, about 16.8 ms), kept in
/// [`NatEntry::last_seen`]; a u32 of these wraps after about 2.3 years.
pub const FLOW_CLOCK_SHIFT: u32 = 24;
/// Default capacity of the loadBalancerSourceRanges trie (all services).
pub const DEFAULT_MAX_SOURCE_RANGES: u32 = 16_384;
/// Default capacity of the socket-level reverse translation map (LRU).
pub const DEFAULT_MAX_SOCK_REVNAT: u32 = 131_072;
/// Default capacity of the Maglev map: all maglev services' slots together
/// (64 services at the default table size 16381, 4,000 at 251). Entries
/// are not preallocated, but the kernel sizes the bucket array from this
/// (16 MiB at 2^20).
pub const DEFAULT_MAX_MAGLEV_ENTRIES: u32 = 1_048_576;
/// Default capacity of the session affinity map (LRU).
pub const DEFAULT_MAX_AFFINITY: u32 = 131_072;
/// At most this many backend slots are compared by `lc`, `sed` and `nq`
/// (the first ones); a bounded loop on the new-flow path.
pub const LEAST_LOADED_SCAN: u32 = 256;

/// Default capacity of the per-(frontend, backend) counters array.
pub const DEFAULT_MAX_BACKEND_STATS: u32 = 65_536;
/// Default capacity of the per-service drop counters (LRU, per CPU).
pub const DEFAULT_MAX_SERVICE_DROPS: u32 = 16_384;
/// Size of the monitor's event ring buffer, bytes (a power of two pages).
pub const MONITOR_RING_BYTES: u32 = 1 << 20;

/// IP protocol numbers the data plane looks at.
pub const IPPROTO_ICMP: u8 = 1;
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

/// Bits of [`ServiceValue::flags`].
pub mod service_flags {
    /// New flows get their source rewritten to the node address and a port
    /// the data plane allocates (externalTrafficPolicy: Cluster).
    pub const SNAT: u32 = 1 << 0;
    /// New flows are admitted only from the service's source ranges
    /// (loadBalancerSourceRanges), looked up in `SOURCE_RANGES`.
    pub const SOURCE_RANGES: u32 = 1 << 1;
    /// With no backend, drop silently instead of rejecting
    /// (externalTrafficPolicy: Local without a local endpoint).
    pub const DROP_WHEN_EMPTY: u32 = 1 << 2;
    /// The backends' weights differ: weighted algorithms walk the slots'
    /// weight ranges instead of indexing a slot directly.
    pub const WEIGHTED: u32 = 1 << 3;
}

/// Values of [`ServiceValue::algorithm`]: how a new flow picks its backend
/// slot. The names are `vipr_balancer::Algorithm`'s; the data plane mirrors
/// `vipr_balancer::select_backend` (same hashes over the same words for
/// `sh`, `dh`, `maglev`).
pub mod lb_algorithm {
    /// `bpf_get_prandom_u32()` scaled onto the weight ranges.
    pub const RANDOM: u8 = 0;
    /// The service's turn counter modulo the slot count.
    pub const ROUND_ROBIN: u8 = 1;
    /// The turn counter modulo the total weight, onto the weight ranges.
    pub const WEIGHTED_ROUND_ROBIN: u8 = 2;
    /// Fewest [`ACTIVE_CONNECTIONS`](super::map_names::ACTIVE_CONNECTIONS).
    pub const LEAST_CONNECTION: u8 = 3;
    /// jhash of the client address, scaled onto the weight ranges.
    pub const SOURCE_HASH: u8 = 4;
    /// jhash of the frontend address, scaled onto the weight ranges.
    pub const DESTINATION_HASH: u8 = 5;
    /// Minimal `(active + 1) / weight`.
    pub const SHORTEST_EXPECTED_DELAY: u8 = 6;
    /// An idle backend if any, else as `SHORTEST_EXPECTED_DELAY`.
    pub const NEVER_QUEUE: u8 = 7;
    /// jhash of the 5-tuple modulo the table size, looked up in `MAGLEV`.
    pub const MAGLEV: u8 = 8;

    /// The `vipr.io/lb-algorithm` name of a code, for tools decoding the
    /// maps (`vipr lb list`); `None` for a code this build does not know.
    pub const fn name(code: u8) -> Option<&'static str> {
        Some(match code {
            RANDOM => "random",
            ROUND_ROBIN => "rr",
            WEIGHTED_ROUND_ROBIN => "wrr",
            LEAST_CONNECTION => "lc",
            SOURCE_HASH => "sh",
            DESTINATION_HASH => "dh",
            SHORTEST_EXPECTED_DELAY => "sed",
            NEVER_QUEUE => "nq",
            MAGLEV => "maglev",
            _ => return None,
        })
    }
}

/// What the data plane needs to pick a backend for a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Stable id chosen by userspace; keys the backend slots.
    pub service_id: u32,
    /// Number of backend slots `0..backend_count` filled for this service
    /// (backends with weight 0 get none: they take no new flows).
    /// Zero means "no ready endpoint": the data plane rejects the flow.
    pub backend_count: u32,
    /// [`service_flags`] bits.
    pub flags: u32,
    /// One of [`lb_algorithm`].
    pub algorithm: u8,
    pub _pad: u8,
    pub _pad2: u16,
    /// ClientIP session affinity timeout in seconds; 0: no affinity.
    pub affinity_timeout: u32,
    /// Sum of the slots' weights (`Backend::weight`).
    pub total_weight: u32,
    /// Entries `0..maglev_size` of this service in `MAGLEV`; 0 unless the
    /// algorithm is [`lb_algorithm::MAGLEV`].
    pub maglev_size: u32,
}

/// One backend slot of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub service_id: u32,
    pub slot: u32,
}

/// A backend slot: where a translated packet goes, and its weight range.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    /// `vipr.io/weight` of the backend's pod, 1..=65535 (host order).
    pub weight: u16,
    /// Sum of the weights of the slots before this one (host order): the
    /// slot owns the points `weight_start..weight_start + weight` of
    /// `0..ServiceValue::total_weight`.
    pub weight_start: u32,
    /// The (frontend, backend) pair's `BACKEND_STATS` slot, as `MEMBERS`
    /// holds it: carried here so a new flow's counters need no second
    /// lookup (with many services, each lookup is a cache miss).
    pub stats_id: u32,
}

impl Backend {
    #[inline(always)]
    pub const fn endpoint(&self) -> Endpoint {
        Endpoint {
            addr: self.addr,
            port: self.port,
            _pad: 0,
        }
    }
}

/// An IPv4 address and port, network byte order: a Maglev table entry, and
/// the key of the active connection counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Key of `MAGLEV`: one slot of one service's lookup table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaglevKey {
    pub service_id: u32,
    pub slot: u32,
}

/// Key of `MEMBERS`: a backend endpoint of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MemberKey {
    pub service_id: u32,
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Values of [`AffinityKey::scope`]: what identifies a client.
pub mod affinity_scope {
    /// The client's IPv4 address (XDP path), network order, in `client`.
    pub const ADDRESS: u32 = 0;
    /// The client's network namespace cookie (socket path: the source
    /// address is not chosen yet at `connect()`; one netns = one pod).
    pub const NETNS: u32 = 1;
}

/// Key of `AFFINITY`: a client of one service (frontend).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service_id: u32,
    /// One of [`affinity_scope`].
    pub scope: u32,
    pub client: u64,
}

/// Value of `AFFINITY`: the backend the client's last new flow got, and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the client's last new flow.
    pub last_seen_ns: u64,
    pub backend: Endpoint,
    pub _pad: u32,
}

/// Key of `SOCK_REVNAT`: one backend a socket was sent to by the socket-level
/// translation. The cookie is unique per socket for the kernel's lifetime,
/// so an entry can never be mistaken for another socket's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    /// `bpf_get_socket_cookie()` of the client socket.
    pub cookie: u64,
    /// Backend IPv4 address, network byte order.
    pub addr: u32,
    /// Backend port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Value of `SOCK_REVNAT`: the frontend the client asked for, given back as
/// the source of replies (recvmsg) and as the peer (getpeername).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatValue {
    /// Frontend IPv4 address, network byte order.
    pub addr: u32,
    /// Frontend port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// A connection's 5-tuple as seen in one direction of the packet path.
///
/// 8-aligned, so the flow table hashes and compares it as two 64-bit words
/// (the verifier refuses misaligned access to the stack). The padding is
/// always zero: the table compares a stored key's bytes, padding included,
/// with [`FlowKey::words`].
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    // Two fields, not `[u8; 3]`: the eBPF target zeroes a 3-byte array with
    // a call to memset on every packet.
    pub _pad: u8,
    pub _pad2: u16,
}

impl FlowKey {
    /// The key as two 64-bit words (addresses; ports and protocol), as the
    /// flow table hashes and compares it.
    #[inline(always)]
    pub const fn words(&self) -> [u64; 2] {
        [
            self.src_addr as u64 | ((self.dst_addr as u64) << 32),
            self.src_port as u64 | ((self.dst_port as u64) << 16) | ((self.proto as u64) << 32),
        ]
    }

    /// Whether `other` is the same tuple: two word compares (an array
    /// compare may become a call to `bcmp`, which eBPF has not).
    #[inline(always)]
    pub const fn same_tuple(&self, other: &FlowKey) -> bool {
        let (a, b) = (self.words(), other.words());
        a[0] == b[0] && a[1] == b[1]
    }

    /// The tuple of a packet travelling the other way.
    #[inline(always)]
    pub const fn reversed(&self) -> FlowKey {
        FlowKey {
            src_addr: self.dst_addr,
            dst_addr: self.src_addr,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
            _pad: 0,
            _pad2: 0,
        }
    }
}

/// Bits of [`NatEntry::flags`].
pub mod flow_flags {
    /// A TCP FIN was seen in this entry's direction.
    pub const FIN: u8 = 1 << 0;
    /// The flow's source is rewritten (SNAT, hairpin, or a client port
    /// remapped on a clash): the reverse entry restores the client as
    /// destination.
    pub const SNAT: u8 = 1 << 1;
    /// The entry is the flow's reply direction (backend to client), so one
    /// lookup serves both directions and still tells them apart.
    pub const REPLY: u8 = 1 << 2;
    /// A packet was translated with this entry after the flow opened: on
    /// the reply entry, the backend answered (the flow is established).
    pub const SEEN: u8 = 1 << 3;
    /// The flow counts in `ACTIVE_CONNECTIONS` of its backend (its service
    /// balances by load): its close takes the count down again.
    pub const COUNTED: u8 = 1 << 4;
    /// On a reply entry: a monitor asked for reply events when the flow
    /// opened, so its replies are events (while a monitor still wants
    /// them). A bit of an entry the hit path has loaded anyway: replies of
    /// unmonitored flows pay nothing for the monitor.
    pub const MONITORED: u8 = 1 << 5;
    /// TCP, on both entries: FINs went both ways and the last ACK with
    /// them; the connection is over. The entries stay until idle for the
    /// closing timeout (netfilter's TIME_WAIT, shorter), so late packets
    /// (the other side's last ACK after a simultaneous close, a
    /// retransmitted FIN) are translated instead of opening a flow to
    /// whichever backend; a SYN on the tuple starts a new connection: the
    /// old entries go and the flow opens anew.
    pub const CLOSED: u8 = 1 << 6;
}

/// The rewrite recorded for one direction of a flow: the full tuple a packet
/// of that direction leaves with. Fields that do not change hold their old
/// value, so one rewrite routine serves DNAT, reverse NAT and SNAT, and the
/// tuple of the other direction after translation is `reversed()` of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatEntry {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// [`flow_flags`] bits.
    pub flags: u8,
    pub _pad: u8,
    /// Low 16 bits of the kernel's jiffies at the last stamp: the hit path
    /// reads the (inlined, nearly free) jiffies and calls the clock helper
    /// for `last_seen` only when the tick moved on.
    pub stamp_tick: u16,
    /// The rewrite's change to the IPv4 header checksum (addresses), and to
    /// the TCP/UDP checksum (addresses, as part of the pseudo-header, and
    /// ports): folded ones' complement sums, computed once when the flow
    /// opens so a conntrack hit only adds them.
    pub ip_check_delta: u16,
    pub l4_check_delta: u16,
    /// When a packet last used this entry (to a kernel tick), in
    /// [`FLOW_CLOCK_SHIFT`] ticks: userspace removes flows idle for longer
    /// than their timeout.
    pub last_seen: u32,
    /// The (frontend, backend) counters this flow's packets count in, both
    /// directions: the pair's `BACKEND_STATS` slot (a u32), which
    /// `map_names::MEMBERS` gives when the flow opens. Widened to a u64 of
    /// its own: as a u32 next to `last_seen`, LLVM merged the two stores
    /// into one the verifier rejects as misaligned on the stack.
    pub stats_id: u64,
}

impl NatEntry {
    /// The rewritten tuple as a flow key of protocol `proto`.
    #[inline(always)]
    pub const fn tuple(&self, proto: u8) -> FlowKey {
        FlowKey {
            src_addr: self.src_addr,
            dst_addr: self.dst_addr,
            src_port: self.src_port,
            dst_port: self.dst_port,
            proto,
            _pad: 0,
            _pad2: 0,
        }
    }
}

/// Key of the `SOURCE_RANGES` LPM trie: a service id (all 32 bits always
/// match) followed by a client address prefix. `prefix_len` is 32 plus the
/// range's prefix length; lookups use 64.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceRangeKey {
    /// Service id, network byte order (the trie matches bits from the first byte).
    pub service_id: u32,
    /// Client address, network byte order.
    pub addr: u32,
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
    /// The node's address, network byte order: the source of SNATed flows
    /// (externalTrafficPolicy: Cluster). Zero: the frontend's own address.
    pub node_addr: u32,
    /// Source of hairpin flows (a pod reaching itself through a service),
    /// network byte order. Zero: hairpin flows are not SNATed.
    pub hairpin_addr: u32,
    /// First port (host order) of the SNAT source port range.
    pub snat_port_min: u16,
    /// Number of ports in the SNAT range; zero disables SNAT.
    pub snat_port_count: u16,
    /// Zero (was option flags; the options the programs read are
    /// read-only globals now, `globals`).
    pub _reserved: u32,
    /// The conntrack table's slot count minus one (see
    /// [`flow_table::TableShape`]).
    pub flow_mask: u32,
    pub _pad: u32,
    /// The conntrack table's hash seed: random per node, kept across agent
    /// restarts with the pinned table it addresses.
    pub flow_seed: u64,
}

impl DataplaneConfig {
    /// Where the conntrack table's flows are.
    #[inline(always)]
    pub const fn flow_shape(&self) -> flow_table::TableShape {
        flow_table::TableShape {
            mask: self.flow_mask,
            seed: self.flow_seed,
        }
    }
}

/// A flow being opened: what the new-flow program works on, kept in a
/// per-CPU map value (`map_names::OPENING`) rather than on the 512-byte
/// eBPF stack. `vipr_xdp` fills in `service` and `tuple` before it
/// tail-calls the new-flow program, which checks `tuple` is its packet's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opening {
    pub service: ServiceValue,
    pub _pad: u32,
    /// The packet's tuple: the forward entry's key.
    pub tuple: FlowKey,
    pub forward: NatEntry,
    /// Keyed by the reply tuple (the forward entry's, reversed).
    pub reverse: NatEntry,
    /// Where the reply entry went, once recorded.
    pub reply: flow_table::SlotRef,
}

/// Default capacity of `REDIRECT_TARGETS` (the uplink and every pod veth).
pub const DEFAULT_MAX_REDIRECT_TARGETS: u32 = 4_096;

/// Per-CPU traffic of one (frontend, backend) pair, both directions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub packets: u64,
    /// IP bytes plus the Ethernet header.
    pub bytes: u64,
    /// Flows opened to this backend through this frontend.
    pub new_flows: u64,
}

/// Key of `SERVICE_DROPS`: a frontend's service id and the counter
/// (a drop or refusal reason) a packet to it was counted under.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceDropKey {
    pub service_id: u32,
    /// A [`Counter`] index.
    pub reason: u32,
}

/// Bits of the monitor flags ([`map_names::MONITOR`]): which events the
/// data plane emits into `MONITOR_EVENTS`. Zero (no monitor attached) costs
/// one load and a branch.
pub mod monitor_flags {
    /// New flows translated to a backend.
    pub const TRANSLATE: u32 = 1 << 0;
    /// Drops and refusals, with their reason.
    pub const DROP: u32 = 1 << 1;
    /// Replies given their service address back (many: only on demand).
    pub const REPLY: u32 = 1 << 2;
}

/// One event of `vipr monitor`, as the data plane writes it to the ring.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MonitorEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC.
    pub timestamp_ns: u64,
    /// Interface the packet arrived on; 0 for the socket-level translation
    /// (cgroup hooks: no packet yet, and the client's address may still be
    /// unbound, in which case `before`'s source is zero).
    pub ifindex: u32,
    /// The [`Counter`] the packet was counted under (the outcome).
    pub counter: u32,
    /// The packet's tuple as it arrived (ports 0 when unknown).
    pub before: FlowKey,
    /// Its tuple as it left (translations); equal to `before` otherwise.
    pub after: FlowKey,
}

/// Why a packet got the verdict it got. Indexes the per-CPU `STATS` array.
/// New counters are appended, so indexes stay stable across versions.
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
    /// Dropped: the service has no ready endpoint and asks for a silent drop
    /// (externalTrafficPolicy: Local), or the packet cannot be answered.
    DropNoEndpoints = 5,
    /// Dropped: a header was cut short or malformed.
    DropMalformed = 6,
    /// Dropped: an IP fragment addressed to a service (ports unknown).
    DropFragment = 7,
    /// Dropped: conntrack could not record the flow: the table has no free
    /// slot near the flow's home (it is full of live flows; idle ones are
    /// expired by userspace, never evicted).
    DropFlowMapFull = 8,
    /// Dropped: backend slot missing although the service counts it.
    DropBackendMissing = 9,
    /// Answered with a TCP RST: the service has no endpoint.
    RejectTcp = 10,
    /// Answered with ICMP port unreachable: the UDP service has no endpoint.
    RejectUdp = 11,
    /// Dropped: the client is outside the service's source ranges.
    DropSourceRange = 12,
    /// Dropped: no free SNAT source port for the chosen backend.
    DropSnatPortsExhausted = 13,
    /// An ICMP error about a translated flow, translated with it.
    IcmpErrorTranslated = 14,
    /// A TCP connection ended: RST seen (its flow leaves conntrack), or FIN
    /// both ways and the last ACK (its flow is marked closed and leaves
    /// when idle for the closing timeout).
    FlowClosed = 15,
    /// Socket level (node-local client, cgroup hooks): a `connect()` to a
    /// frontend was given a backend instead.
    SockConnectTranslated = 16,
    /// Socket level: an unconnected UDP datagram to a frontend was sent to
    /// a backend instead.
    SockSendmsgTranslated = 17,
    /// Socket level: a reply's source (recvmsg) or a socket's peer
    /// (getpeername) was given the frontend address back.
    SockReverseTranslated = 18,
    /// Socket level: `connect()` / `sendmsg()` to a frontend without
    /// endpoints refused with ECONNREFUSED.
    SockRejected = 19,
    /// A TCP packet without SYN opened a flow (counted besides `NewFlow`):
    /// its conntrack entry is gone (expired while idle, removed with a
    /// vanished backend, or the map was recreated).
    FlowOpenedMidStream = 20,
    /// A new flow went to the backend its client's session affinity
    /// (ClientIP) remembered (counted besides `NewFlow` / `Sock*`).
    AffinityHit = 21,
    /// A translated packet forwarded from XDP by the fast path (counted
    /// besides `NewFlow` / `FlowHit` / `ReplyTranslated`): routed with the
    /// kernel's FIB, TTL decremented, redirected to its egress interface.
    Redirected = 22,
    /// Dropped: the first packets of one flow reached two CPUs at once and
    /// both opened it; the other CPU's entries stand, and the flow's next
    /// packet uses them.
    DropFlowRace = 23,
    /// Dropped: a new flow could not be handed to its new-flow program:
    /// the program was not installed (`NEW_FLOW_PROGRAMS`, between loading
    /// the data plane and installing its programs), or the per-CPU scratch
    /// value that carries the flow over (`OPENING`) was missing or not this
    /// packet's (an upgrade that changed its layout, while links are taken
    /// over).
    DropNewFlowHandover = 24,
}

impl Counter {
    /// Number of counters; the size of the `STATS` array.
    pub const COUNT: u32 = 25;

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
        Counter::RejectTcp,
        Counter::RejectUdp,
        Counter::DropSourceRange,
        Counter::DropSnatPortsExhausted,
        Counter::IcmpErrorTranslated,
        Counter::FlowClosed,
        Counter::SockConnectTranslated,
        Counter::SockSendmsgTranslated,
        Counter::SockReverseTranslated,
        Counter::SockRejected,
        Counter::FlowOpenedMidStream,
        Counter::AffinityHit,
        Counter::Redirected,
        Counter::DropFlowRace,
        Counter::DropNewFlowHandover,
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
            Counter::RejectTcp => "reject_tcp",
            Counter::RejectUdp => "reject_udp",
            Counter::DropSourceRange => "drop_source_range",
            Counter::DropSnatPortsExhausted => "drop_snat_ports_exhausted",
            Counter::IcmpErrorTranslated => "icmp_error_translated",
            Counter::FlowClosed => "flow_closed",
            Counter::SockConnectTranslated => "sock_connect_translated",
            Counter::SockSendmsgTranslated => "sock_sendmsg_translated",
            Counter::SockReverseTranslated => "sock_reverse_translated",
            Counter::SockRejected => "sock_rejected",
            Counter::FlowOpenedMidStream => "flow_opened_mid_stream",
            Counter::AffinityHit => "affinity_hit",
            Counter::Redirected => "redirected",
            Counter::DropFlowRace => "drop_flow_race",
            Counter::DropNewFlowHandover => "drop_new_flow_handover",
        }
    }

    /// The counter at `index`, if there is one.
    pub const fn from_index(index: u32) -> Option<Counter> {
        if index < Self::COUNT {
            Some(Self::ALL[index as usize])
        } else {
            None
        }
    }

    /// Whether the packet was refused at once (TCP RST, ICMP unreachable):
    /// not forwarded, like a drop, but answered.
    pub const fn is_refusal(self) -> bool {
        matches!(
            self,
            Counter::RejectTcp | Counter::RejectUdp | Counter::SockRejected
        )
    }

    /// Whether the packet counted here was dropped.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Counter::DropUnknownVip
                | Counter::DropNoEndpoints
                | Counter::DropMalformed
                | Counter::DropFragment
                | Counter::DropFlowMapFull
                | Counter::DropBackendMissing
                | Counter::DropSourceRange
                | Counter::DropSnatPortsExhausted
                | Counter::DropFlowRace
                | Counter::DropNewFlowHandover
        )
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
    unsafe impl aya::Pod for NatEntry {}
    unsafe impl aya::Pod for flow_table::FlowSlot {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for DataplaneConfig {}
    unsafe impl aya::Pod for CounterValue {}
    unsafe impl aya::Pod for SockRevNatKey {}
    unsafe impl aya::Pod for SockRevNatValue {}
    unsafe impl aya::Pod for FlowStats {}
    unsafe impl aya::Pod for ServiceDropKey {}
    unsafe impl aya::Pod for MonitorEvent {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for MaglevKey {}
    unsafe impl aya::Pod for MemberKey {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for bench::FloodPlan {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 28);
        assert_eq!(size_of::<BackendKey>(), 8);
        assert_eq!(size_of::<Backend>(), 16);
        assert_eq!(size_of::<Endpoint>(), 8);
        assert_eq!(size_of::<MaglevKey>(), 8);
        assert_eq!(size_of::<MemberKey>(), 12);
        assert_eq!(size_of::<AffinityKey>(), 16);
        assert_eq!(size_of::<AffinityValue>(), 24);
        assert_eq!(size_of::<FlowKey>(), 16);
        assert_eq!(size_of::<NatEntry>(), 32);
        assert_eq!(size_of::<FlowStats>(), 24);
        assert_eq!(size_of::<ServiceDropKey>(), 8);
        assert_eq!(size_of::<MonitorEvent>(), 48);
        assert_eq!(size_of::<SourceRangeKey>(), 8);
        assert_eq!(size_of::<DataplaneConfig>(), 40);
        assert_eq!(size_of::<Opening>(), 128);
        assert_eq!(size_of::<CounterValue>(), 16);
        assert_eq!(size_of::<SockRevNatKey>(), 16);
        assert_eq!(size_of::<SockRevNatValue>(), 8);
    }

    #[test]
    fn counters_are_indexed_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{}", c.name());
        }
    }

    #[test]
    fn reversing_twice_is_identity() {
        let k = FlowKey {
            src_addr: 1,
            dst_addr: 2,
            src_port: 3,
            dst_port: 4,
            proto: IPPROTO_TCP,
            _pad: 0,
            _pad2: 0,
        };
        assert_eq!(k.reversed().reversed(), k);
        assert_eq!(k.reversed().src_addr, 2);
    }
}
