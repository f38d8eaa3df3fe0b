//! `vipr trace`: walks the decision the XDP program makes for one packet,
//! in its order, reading the same maps it reads, and explains each step:
//! conntrack (an existing flow or a reply of one), the frontend lookup (or
//! what happens to a packet that matches none), source ranges, endpoints,
//! traffic policy, the balancing algorithm and its pick, the NAT applied
//! and the route to the backend.
//!
//! The pick is computed as the data plane computes it, from its maps: the
//! Maglev slot of the 5-tuple's hash, the sh/dh hash scaled onto the slots'
//! weight ranges, the rr/wrr turn counter, the lc/sed/nq connection counts,
//! the ClientIP affinity entry. `random` has no pick to predict: the trace
//! lists the candidates and their odds. An existing flow's backend is
//! certain whatever the algorithm.

use std::net::{Ipv4Addr, SocketAddrV4};

use serde_json::{Value, json};
use vipr_balancer::{
    Backend as BalancerBackend, SelectState, Weight, random_candidates, select_backend,
};
use vipr_dataplane::{
    Dataplane, Frontend, Port, Protocol, monotonic_ns,
    vipr_common::{
        AffinityKey, Backend, DataplaneConfig, FlowKey, LEAST_LOADED_SCAN, NatEntry, ServiceValue,
        affinity_scope, flow_flags, hash::scale, lb_algorithm, service_flags,
    },
};
use vipr_pod_runtime::PodInfo;

use super::sync::Programmed;

/// The packet to trace.
#[derive(Clone, Copy, Debug)]
pub struct TracedPacket {
    pub src: Ipv4Addr,
    /// `None`: any client port (no conntrack entry can be looked up).
    pub src_port: Option<u16>,
    pub dst: SocketAddrV4,
    pub protocol: Protocol,
}

impl TracedPacket {
    /// Parses `--src IP[:PORT] --dst IP:PORT [--proto tcp|udp]`.
    pub fn parse(src: &str, dst: &str, protocol: Option<&str>) -> Result<Self, String> {
        let (src, src_port) = match src.parse::<SocketAddrV4>() {
            Ok(sock) => (*sock.ip(), Some(sock.port())),
            Err(_) => (
                src.parse::<Ipv4Addr>()
                    .map_err(|_| format!("--src {src:?}: expected IP or IP:PORT"))?,
                None,
            ),
        };
        let dst = dst
            .parse::<SocketAddrV4>()
            .map_err(|_| format!("--dst {dst:?}: expected IP:PORT"))?;
        let protocol = protocol
            .unwrap_or("tcp")
            .parse::<Protocol>()
            .map_err(|e| format!("--proto: {e}"))?;
        Ok(TracedPacket {
            src,
            src_port,
            dst,
            protocol,
        })
    }

    fn key(&self, src_port: u16) -> FlowKey {
        FlowKey {
            src_addr: u32::from(self.src).to_be(),
            dst_addr: u32::from(*self.dst.ip()).to_be(),
            src_port: src_port.to_be(),
            dst_port: self.dst.port().to_be(),
            proto: self.protocol.ip_proto(),
            _pad: 0,
            _pad2: 0,
        }
    }
}

fn sock(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr)), u16::from_be(port))
}

fn ip(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(addr))
}

/// The explanation being built: steps, then the verdict.
#[derive(Default)]
struct Trace {
    steps: Vec<Value>,
}

impl Trace {
    fn step(&mut self, step: &str, detail: impl Into<String>) {
        self.steps
            .push(json!({"step": step, "detail": detail.into()}));
    }

    fn finish(self, verdict: &str, backend: Option<SocketAddrV4>, candidates: Value) -> Value {
        json!({
            "steps": self.steps,
            "verdict": verdict,
            "backend": backend.map(|b| b.to_string()),
            "candidates": candidates,
        })
    }
}

/// What the agent knows besides the maps: who owns the frontends and
/// where pods live.
pub struct TraceContext<'a> {
    pub intent: &'a Programmed,
    pub pods: &'a [PodInfo],
}

/// Traces `packet` through `dataplane`'s maps.
pub fn trace(
    dataplane: &mut Dataplane,
    context: &TraceContext<'_>,
    packet: &TracedPacket,
) -> Result<Value, String> {
    let mut t = Trace::default();
    let err = |e: vipr_dataplane::DataplaneError| e.to_string();
    t.step(
        "packet",
        format!(
            "{} {}:{} -> {}",
            packet.protocol,
            packet.src,
            packet.src_port.map_or("*".into(), |p| p.to_string()),
            packet.dst
        ),
    );
    if let Some(pod) = context.pods.iter().find(|p| p.ip == Some(packet.src)) {
        t.step(
            "socket",
            format!(
                "the client is pod {} of this node: its connect()/sendmsg() to a frontend is \
                 translated by the cgroup socket hooks, before any packet, from the same maps; \
                 such sockets make no conntrack entry, and where the pick below hashes the \
                 client address (sh, maglev) or remembers it (ClientIP affinity), the socket \
                 path uses the pod's network namespace instead, so only the XDP path's pick \
                 is predicted exactly",
                pod.key
            ),
        );
    }
    if let Some(src_port) = packet.src_port {
        let key = packet.key(src_port);
        match dataplane.lookup_flow(&key).map_err(err)? {
            Some(entry) if entry.flags & flow_flags::REPLY != 0 => {
                t.step(
                    "conntrack",
                    format!(
                        "a reply of a translated flow (CONNTRACK reply entry): rewritten to {} -> {}",
                        sock(entry.src_addr, entry.src_port),
                        sock(entry.dst_addr, entry.dst_port)
                    ),
                );
                return Ok(t.finish("reverse-translated", None, Value::Null));
            }
            Some(entry) => return Ok(existing_flow(t, context, &entry)),
            None => t.step("conntrack", "no entry in CONNTRACK: a new flow"),
        }
    } else {
        t.step(
            "conntrack",
            "no client port given: conntrack not consulted, traced as a new flow",
        );
    }

    let frontend = Port::new(packet.dst.port()).map(|port| Frontend {
        addr: *packet.dst.ip(),
        port,
        protocol: packet.protocol,
    });
    let service = match frontend {
        Some(f) => dataplane.lookup_service(&f).map_err(err)?,
        None => None,
    };
    let config = dataplane.config().map_err(err)?;
    let (Some(frontend), Some(service)) = (frontend, service) else {
        return Ok(no_frontend(t, &config, packet));
    };
    let owner = context
        .intent
        .owners
        .get(&frontend)
        .map_or("no service (a stray entry)".to_owned(), |o| {
            format!("service {}/{}", o.0, o.1)
        });
    t.step(
        "frontend",
        format!(
            "{frontend} found in SERVICES: {owner}, service id {}, {} backend slot(s)",
            service.service_id, service.backend_count
        ),
    );
    if service.flags & service_flags::SOURCE_RANGES != 0 {
        match dataplane
            .matching_source_range(service.service_id, packet.src)
            .map_err(err)?
        {
            Some(range) => t.step(
                "source ranges",
                format!("{} is inside {range}: admitted", packet.src),
            ),
            None => {
                t.step(
                    "source ranges",
                    format!(
                        "{} is outside every loadBalancerSourceRange: dropped (drop_source_range)",
                        packet.src
                    ),
                );
                return Ok(t.finish("dropped: source range", None, Value::Null));
            }
        }
    } else {
        t.step("source ranges", "none set: every client admitted");
    }
    t.step("traffic policy", policy_text(&service));
    if service.backend_count == 0 {
        return Ok(no_endpoints(t, &service, packet.protocol));
    }
    new_flow(t, dataplane, context, &config, packet, &service)
}

fn existing_flow(mut t: Trace, context: &TraceContext<'_>, entry: &NatEntry) -> Value {
    let backend = sock(entry.dst_addr, entry.dst_port);
    let idle = vipr_dataplane::idle_now(entry).as_secs_f64();
    t.step(
        "conntrack",
        format!(
            "existing flow (CONNTRACK), last packet {idle:.1}s ago: every packet goes to {backend}, whatever the balancing{}",
            if entry.flags & flow_flags::FIN != 0 {
                "; the client has sent FIN"
            } else {
                ""
            }
        ),
    );
    let source = sock(entry.src_addr, entry.src_port);
    t.step(
        "nat",
        format!(
            "DNAT to {backend}; source seen by the backend {source}{}",
            if entry.flags & flow_flags::SNAT != 0 {
                " (SNAT)"
            } else {
                ""
            }
        ),
    );
    t.step("route", route_text(context, *backend.ip()));
    t.finish("forwarded", Some(backend), Value::Null)
}

fn no_frontend(mut t: Trace, config: &DataplaneConfig, packet: &TracedPacket) -> Value {
    let dst = u32::from(*packet.dst.ip()).to_be();
    let mask = config.service_cidr_mask;
    if mask != 0 && dst & mask == config.service_cidr_addr {
        let cidr = format!(
            "{}/{}",
            ip(config.service_cidr_addr),
            u32::from_be(mask).count_ones()
        );
        t.step(
            "frontend",
            format!(
                "{} {} matches no frontend but lies in the service CIDR {cidr}: dropped, never routed (drop_unknown_vip)",
                packet.dst, packet.protocol
            ),
        );
        return t.finish(
            "dropped: unknown VIP in the service CIDR",
            None,
            Value::Null,
        );
    }
    t.step(
        "frontend",
        format!(
            "{} {} is no service address: passed untouched to the kernel's routing",
            packet.dst, packet.protocol
        ),
    );
    t.finish("passed", None, Value::Null)
}

fn policy_text(service: &ServiceValue) -> String {
    if service.flags & service_flags::SNAT != 0 {
        "externalTrafficPolicy Cluster: any backend; the client is SNATed to the node address"
            .into()
    } else if service.flags & service_flags::DROP_WHEN_EMPTY != 0 {
        "externalTrafficPolicy Local: only this node's endpoints; the client address is kept".into()
    } else {
        "in-cluster frontend: any ready endpoint; the client address is kept".into()
    }
}

fn no_endpoints(mut t: Trace, service: &ServiceValue, protocol: Protocol) -> Value {
    if service.flags & service_flags::DROP_WHEN_EMPTY != 0 {
        t.step(
            "endpoints",
            "no local endpoint (externalTrafficPolicy Local): dropped silently (drop_no_endpoints)",
        );
        return t.finish("dropped: no endpoints", None, Value::Null);
    }
    let answer = match protocol {
        Protocol::Tcp => "answered with a TCP RST (reject_tcp)",
        Protocol::Udp => "answered with ICMP port unreachable (reject_udp)",
    };
    t.step(
        "endpoints",
        format!("no ready endpoint: {answer}, like kube-proxy's REJECT"),
    );
    t.finish("refused: no endpoints", None, Value::Null)
}

fn new_flow(
    mut t: Trace,
    dataplane: &mut Dataplane,
    context: &TraceContext<'_>,
    config: &DataplaneConfig,
    packet: &TracedPacket,
    service: &ServiceValue,
) -> Result<Value, String> {
    let err = |e: vipr_dataplane::DataplaneError| e.to_string();
    let mut slots: Vec<Backend> = Vec::new();
    for slot in 0..service.backend_count {
        match dataplane
            .lookup_backend(service.service_id, slot)
            .map_err(err)?
        {
            Some(b) => slots.push(b),
            None => t.step(
                "backends",
                format!("slot {slot} is missing from BACKENDS: a pick landing there drops the packet (drop_backend_missing)"),
            ),
        }
    }
    let backends: Vec<SocketAddrV4> = slots.iter().map(|b| sock(b.addr, b.port)).collect();
    let (chosen, candidates) = match affinity_pick(&mut t, dataplane, packet, service)? {
        Some(backend) => (Some(backend), Value::Null),
        None => pick(&mut t, dataplane, packet, service, &slots)?,
    };
    let snat = if service.flags & service_flags::SNAT != 0 {
        let addr = if config.node_addr != 0 {
            ip(config.node_addr)
        } else {
            *packet.dst.ip()
        };
        Some(format!(
            "SNAT to {addr}:<a free port in {}-{}> so replies return through this node",
            config.snat_port_min,
            u32::from(config.snat_port_min) + u32::from(config.snat_port_count).saturating_sub(1)
        ))
    } else {
        None
    };
    let hairpin = config.hairpin_addr != 0
        && chosen
            .map_or(backends.clone(), |b| vec![b])
            .iter()
            .any(|b| *b.ip() == packet.src);
    let mut nat = match chosen {
        Some(backend) => format!("DNAT {} -> {backend}", packet.dst),
        None => format!("DNAT {} -> the chosen backend", packet.dst),
    };
    if let Some(snat) = snat {
        nat.push_str("; ");
        nat.push_str(&snat);
    }
    if hairpin {
        nat.push_str(&format!(
            "; if the client itself is picked (hairpin), its source becomes {}",
            ip(config.hairpin_addr)
        ));
    }
    t.step("nat", nat);
    let routed: Vec<SocketAddrV4> = chosen.map_or(backends.clone(), |b| vec![b]);
    for backend in routed {
        t.step(
            "route",
            format!("{backend}: {}", route_text(context, *backend.ip())),
        );
    }
    let verdict = if chosen.is_some() {
        "forwarded"
    } else {
        "forwarded to one of the candidates"
    };
    Ok(t.finish(verdict, chosen, candidates))
}

fn route_text(context: &TraceContext<'_>, addr: Ipv4Addr) -> String {
    match context.pods.iter().find(|p| p.ip == Some(addr)) {
        Some(pod) if !pod.host_ifname.is_empty() => format!(
            "pod {} on this node, through its veth {} (ifindex {})",
            pod.key,
            pod.host_ifname,
            pod.host_ifindex.map_or("?".into(), |i| i.to_string())
        ),
        Some(pod) => format!("pod {} (host network): delivered locally", pod.key),
        None => "not a pod of this node: routed by the kernel's table".into(),
    }
}

/// The packet as the reference balancer sees it: its hashes are the ones
/// the data plane computes (the client port 0 when not given).
fn balancer_flow(packet: &TracedPacket) -> vipr_balancer::Flow {
    let protocol = match packet.protocol {
        Protocol::Tcp => vipr_balancer::Protocol::Tcp,
        Protocol::Udp => vipr_balancer::Protocol::Udp,
    };
    vipr_balancer::Flow::new(
        protocol,
        std::net::SocketAddr::V4(SocketAddrV4::new(packet.src, packet.src_port.unwrap_or(0))),
        std::net::SocketAddr::V4(packet.dst),
    )
}

/// ClientIP session affinity, as the data plane checks it: the client's
/// entry, if young enough and its backend still a member, decides.
fn affinity_pick(
    t: &mut Trace,
    dataplane: &Dataplane,
    packet: &TracedPacket,
    service: &ServiceValue,
) -> Result<Option<SocketAddrV4>, String> {
    let timeout = service.affinity_timeout;
    if timeout == 0 {
        t.step("affinity", "none (sessionAffinity None)");
        return Ok(None);
    }
    let key = AffinityKey {
        service_id: service.service_id,
        scope: affinity_scope::ADDRESS,
        client: u64::from(u32::from(packet.src).to_be()),
    };
    let err = |e: vipr_dataplane::DataplaneError| e.to_string();
    let Some(entry) = dataplane.lookup_affinity(&key).map_err(err)? else {
        t.step(
            "affinity",
            format!("ClientIP {timeout}s: no entry for {}: the algorithm picks, and the pick is remembered", packet.src),
        );
        return Ok(None);
    };
    let backend = sock(entry.backend.addr, entry.backend.port);
    let idle = monotonic_ns().saturating_sub(entry.last_seen_ns) as f64 / 1e9;
    if idle > f64::from(timeout) {
        t.step(
            "affinity",
            format!("ClientIP {timeout}s: {}'s entry ({backend}) is {idle:.0}s old, expired: the algorithm picks afresh", packet.src),
        );
        return Ok(None);
    }
    if !dataplane
        .is_member(service.service_id, &entry.backend)
        .map_err(err)?
    {
        t.step(
            "affinity",
            format!("ClientIP {timeout}s: {}'s backend {backend} is no longer one of the service's: the algorithm picks afresh", packet.src),
        );
        return Ok(None);
    }
    t.step(
        "affinity",
        format!(
            "ClientIP {timeout}s: {} was sent to {backend} {idle:.1}s ago: {backend} again",
            packet.src
        ),
    );
    Ok(Some(backend))
}

/// The slot a hash or draw `value` lands on, as the data plane scales it:
/// onto the slots directly, or onto their weight ranges when they differ.
fn hashed_slot(service: &ServiceValue, slots: &[Backend], value: u32) -> Option<usize> {
    if service.flags & service_flags::WEIGHTED == 0 {
        return Some(scale(value, service.backend_count) as usize).filter(|i| *i < slots.len());
    }
    weight_point(slots, scale(value, service.total_weight))
}

fn weight_point(slots: &[Backend], point: u32) -> Option<usize> {
    slots
        .iter()
        .position(|b| b.weight_start <= point && point < b.weight_start + u32::from(b.weight))
}

/// The algorithm's pick (or, for `random`, the candidates and their odds),
/// computed from the same maps and hashes as the data plane.
fn pick(
    t: &mut Trace,
    dataplane: &mut Dataplane,
    packet: &TracedPacket,
    service: &ServiceValue,
    slots: &[Backend],
) -> Result<(Option<SocketAddrV4>, Value), String> {
    let err = |e: vipr_dataplane::DataplaneError| e.to_string();
    let name = Dataplane::balancing_of(service).algorithm;
    let at = |i: Option<usize>| i.and_then(|i| slots.get(i)).map(|b| sock(b.addr, b.port));
    let (chosen, why) = match service.algorithm {
        lb_algorithm::ROUND_ROBIN | lb_algorithm::WEIGHTED_ROUND_ROBIN => {
            let turn = dataplane.balance_turn(service.service_id).map_err(err)?;
            let weighted = service.algorithm == lb_algorithm::WEIGHTED_ROUND_ROBIN
                && service.flags & service_flags::WEIGHTED != 0
                && service.total_weight != 0;
            let slot = if weighted {
                weight_point(slots, turn % service.total_weight)
            } else {
                Some((turn % service.backend_count) as usize)
            };
            (
                at(slot),
                format!(
                    "{name}: the service's turn counter is {turn}: the next new flow (of any client) takes slot {}",
                    slot.map_or("?".into(), |s| s.to_string())
                ),
            )
        }
        lb_algorithm::SOURCE_HASH => {
            let hash = balancer_flow(packet).source_hash();
            (
                at(hashed_slot(service, slots, hash)),
                format!(
                    "sh: hash of the client address {hash:#010x}, scaled onto {} slot(s)",
                    slots.len()
                ),
            )
        }
        lb_algorithm::DESTINATION_HASH => {
            let hash = balancer_flow(packet).destination_hash();
            (
                at(hashed_slot(service, slots, hash)),
                format!(
                    "dh: hash of the frontend address {hash:#010x}, scaled onto {} slot(s)",
                    slots.len()
                ),
            )
        }
        lb_algorithm::MAGLEV => return maglev_pick(t, dataplane, packet, service),
        lb_algorithm::LEAST_CONNECTION
        | lb_algorithm::SHORTEST_EXPECTED_DELAY
        | lb_algorithm::NEVER_QUEUE => {
            let mut loads = Vec::new();
            for b in slots.iter().take(LEAST_LOADED_SCAN as usize) {
                let addr = sock(b.addr, b.port);
                let backend = vipr_dataplane::BackendAddr {
                    addr: *addr.ip(),
                    port: Port::new(addr.port()).ok_or("backend port 0")?,
                };
                let active = dataplane
                    .active_connections(&backend)
                    .map_err(err)?
                    .unwrap_or(0);
                loads.push(
                    BalancerBackend::new(std::net::SocketAddr::V4(addr))
                        .with_weight(Weight::new(b.weight))
                        .with_active(active),
                );
            }
            let balancing = Dataplane::balancing_of(service);
            let balancing = vipr_balancer::ServiceBalancing {
                affinity: vipr_balancer::SessionAffinity::None,
                ..balancing
            };
            let flow = vipr_balancer::Flow::new(
                vipr_balancer::Protocol::Tcp,
                std::net::SocketAddr::V4(SocketAddrV4::new(
                    packet.src,
                    packet.src_port.unwrap_or(0),
                )),
                std::net::SocketAddr::V4(packet.dst),
            );
            let listed: Vec<String> = loads
                .iter()
                .map(|b| format!("{} {} active (weight {})", b.addr, b.active, b.weight.get()))
                .collect();
            match select_backend(&balancing, &loads, &flow, &mut SelectState::default()) {
                Ok(decision) => {
                    let std::net::SocketAddr::V4(addr) = decision.backend else {
                        return Err("an IPv6 backend".into());
                    };
                    (
                        Some(addr),
                        format!("{name}: {}; {}", listed.join(", "), decision),
                    )
                }
                Err(e) => (None, format!("{name}: {e}")),
            }
        }
        _ => {
            let candidates: Vec<BalancerBackend> = slots
                .iter()
                .map(|b| {
                    BalancerBackend::new(std::net::SocketAddr::V4(sock(b.addr, b.port)))
                        .with_weight(Weight::new(b.weight))
                })
                .collect();
            let odds = random_candidates(&candidates);
            let listed: Vec<String> = odds
                .iter()
                .map(|c| format!("{} {:.1}%", c.addr, c.probability * 100.0))
                .collect();
            t.step(
                "algorithm",
                format!(
                    "random: one draw per new flow over {} slot(s), by weight: {}",
                    slots.len(),
                    listed.join(", ")
                ),
            );
            let value = odds
                .iter()
                .map(|c| json!({"backend": c.addr.to_string(), "probability": c.probability}))
                .collect();
            let only = (slots.len() == 1).then(|| sock(slots[0].addr, slots[0].port));
            return Ok((only, value));
        }
    };
    match chosen {
        Some(backend) => t.step("algorithm", format!("{why}: {backend}")),
        None => t.step(
            "algorithm",
            format!("{why}: no backend (a slot vanished under an update)"),
        ),
    }
    Ok((chosen, Value::Null))
}

/// Maglev: the 5-tuple hash's slot of the service's table, read from the
/// map. Without a client port the flow's slot is unknown: the table's
/// shares are the odds.
fn maglev_pick(
    t: &mut Trace,
    dataplane: &Dataplane,
    packet: &TracedPacket,
    service: &ServiceValue,
) -> Result<(Option<SocketAddrV4>, Value), String> {
    let err = |e: vipr_dataplane::DataplaneError| e.to_string();
    let size = service.maglev_size;
    if size == 0 {
        t.step(
            "algorithm",
            "maglev: the service has no table (maglev_size 0): dropped (drop_backend_missing)",
        );
        return Ok((None, Value::Null));
    }
    if packet.src_port.is_some() {
        let hash = balancer_flow(packet).hash();
        let slot = hash % size;
        let chosen = dataplane
            .lookup_maglev(service.service_id, slot)
            .map_err(err)?
            .map(|e| sock(e.addr, e.port));
        t.step(
            "algorithm",
            format!(
                "maglev: 5-tuple hash {hash:#010x} -> slot {slot} of {size}: {}",
                chosen.map_or("no entry (table being rewritten)".into(), |b| b.to_string())
            ),
        );
        return Ok((chosen, Value::Null));
    }
    let mut shares: std::collections::BTreeMap<SocketAddrV4, u32> = Default::default();
    for slot in 0..size {
        if let Some(e) = dataplane
            .lookup_maglev(service.service_id, slot)
            .map_err(err)?
        {
            *shares.entry(sock(e.addr, e.port)).or_default() += 1;
        }
    }
    let listed: Vec<String> = shares
        .iter()
        .map(|(b, n)| format!("{b} {:.1}%", f64::from(*n) * 100.0 / f64::from(size)))
        .collect();
    t.step(
        "algorithm",
        format!("maglev: the pick depends on the client port (give --src IP:PORT); the table's {size} slots: {}", listed.join(", ")),
    );
    let value = shares
        .iter()
        .map(|(b, n)| json!({"backend": b.to_string(), "probability": f64::from(*n) / f64::from(size)}))
        .collect();
    Ok((None, value))
}
