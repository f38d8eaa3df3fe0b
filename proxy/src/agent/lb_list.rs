//! `vipr lb list`: the data plane's pinned maps decoded (frontends, backend
//! slots, conntrack with ages, source ranges, settings), optionally as raw
//! bytes the way bpftool prints them, and every difference between what
//! the agent means to program and what the kernel holds.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write,
    net::{Ipv4Addr, SocketAddrV4},
};

use serde_json::{Value, json};
use vipr_dataplane::{
    BackendAddr, Frontend, MapDump, MapEntry, Port, Protocol, RawEntry,
    vipr_common::{Endpoint, FlowKey, NatEntry, affinity_scope, flow_flags, service_flags},
};

use super::sync::{Programmed, ServiceName};

fn sock(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr)), u16::from_be(port))
}

fn ip(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(addr))
}

/// Bytes as bpftool prints them: two hex digits each, space separated.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn raw_json(entries: impl Iterator<Item = RawEntry>) -> Value {
    entries
        .map(|e| json!({"key": hex(&e.key), "value": hex(&e.value)}))
        .collect()
}

fn flag_names(flags: u32) -> Vec<&'static str> {
    [
        (service_flags::SNAT, "snat"),
        (service_flags::SOURCE_RANGES, "source-ranges"),
        (service_flags::DROP_WHEN_EMPTY, "drop-when-empty"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

fn flow_json(entry: &MapEntry<FlowKey, NatEntry>, dump: &MapDump) -> Value {
    let (k, v) = (&entry.key, &entry.value);
    json!({
        "protocol": Protocol::from_ip_proto(k.proto).map(|p| p.to_string()),
        "from": sock(k.src_addr, k.src_port).to_string(),
        "to": sock(k.dst_addr, k.dst_port).to_string(),
        "rewritten_from": sock(v.src_addr, v.src_port).to_string(),
        "rewritten_to": sock(v.dst_addr, v.dst_port).to_string(),
        "snat": v.flags & flow_flags::SNAT != 0,
        "fin_seen": v.flags & flow_flags::FIN != 0,
        "closed": v.flags & flow_flags::CLOSED != 0,
        "stats_id": v.stats_id,
        "established": v.flags & flow_flags::SEEN != 0,
        "idle_s": dump.idle(v).as_secs_f64(),
    })
}

fn frontend_of(key: &vipr_dataplane::vipr_common::ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        addr: ip(key.addr),
        port: Port::new(u16::from_be(key.port))?,
        protocol: Protocol::from_ip_proto(key.proto)?,
    })
}

fn backend_of(value: &vipr_dataplane::vipr_common::Backend) -> Option<BackendAddr> {
    Some(BackendAddr {
        addr: ip(value.addr),
        port: Port::new(u16::from_be(value.port))?,
    })
}

/// Where the maps and the agent's intent disagree, one line each.
pub fn differences(dump: &MapDump, intent: &Programmed) -> Vec<String> {
    let mut out = Vec::new();
    let in_map: BTreeMap<Frontend, _> = dump
        .services
        .iter()
        .filter_map(|e| Some((frontend_of(&e.key)?, e.value)))
        .collect();
    let slots: HashMap<(u32, u32), BackendAddr> = dump
        .backends
        .iter()
        .filter_map(|e| Some(((e.key.service_id, e.key.slot), backend_of(&e.value)?)))
        .collect();
    let owner_name = |o: &ServiceName| format!("{}/{}", o.0, o.1);
    for (frontend, owner) in &intent.owners {
        let Some(spec) = intent.by_service.get(owner).and_then(|t| t.get(frontend)) else {
            continue;
        };
        let Some(value) = in_map.get(frontend) else {
            out.push(format!(
                "frontend {frontend} ({}) is wanted but missing from SERVICES",
                owner_name(owner)
            ));
            continue;
        };
        let wanted = spec.backends.len() as u32;
        if value.backend_count != wanted {
            out.push(format!(
                "frontend {frontend} ({}): SERVICES counts {} backends, the agent wants {wanted}",
                owner_name(owner),
                value.backend_count
            ));
        }
        // WEIGHTED is derived from the weights when programming.
        let flags = value.flags & !service_flags::WEIGHTED;
        if flags != spec.options.flags() {
            out.push(format!(
                "frontend {frontend} ({}): SERVICES flags {:?}, the agent wants {:?}",
                owner_name(owner),
                flag_names(flags),
                flag_names(spec.options.flags())
            ));
        }
        for (slot, backend) in (0u32..).zip(&spec.backends) {
            match slots.get(&(value.service_id, slot)) {
                None => out.push(format!(
                    "frontend {frontend}: backend slot {slot} (service id {}) is missing, the agent wants {backend}",
                    value.service_id
                )),
                Some(held) if held != backend => out.push(format!(
                    "frontend {frontend}: backend slot {slot} holds {held}, the agent wants {backend}"
                )),
                Some(_) => {}
            }
        }
    }
    for (frontend, value) in &in_map {
        let held: u32 = dump
            .maglev
            .get(&value.service_id)
            .map_or(0, |t| t.values().sum());
        if held != value.maglev_size {
            out.push(format!(
                "frontend {frontend}: its Maglev table should have {} slots, MAGLEV holds {held}",
                value.maglev_size
            ));
        }
        let members: Vec<Endpoint> = (0..value.backend_count)
            .filter_map(|slot| slots.get(&(value.service_id, slot)))
            .map(|b| b.endpoint())
            .collect();
        for endpoint in dump
            .maglev
            .get(&value.service_id)
            .into_iter()
            .flat_map(|t| t.keys())
        {
            if !members.contains(endpoint) {
                out.push(format!(
                    "frontend {frontend}: the Maglev table sends flows to {}, which is none of its backends",
                    sock(endpoint.addr, endpoint.port)
                ));
            }
        }
    }
    for frontend in in_map.keys() {
        if !intent.owners.contains_key(frontend) {
            out.push(format!(
                "frontend {frontend} is in SERVICES but no service wants it"
            ));
        }
    }
    let counts: HashMap<u32, u32> = in_map
        .values()
        .map(|v| (v.service_id, v.backend_count))
        .collect();
    let mut strays: Vec<_> = slots
        .iter()
        .filter(|((id, slot), _)| counts.get(id).is_none_or(|count| slot >= count))
        .collect();
    strays.sort();
    for ((id, slot), backend) in strays {
        out.push(format!(
            "BACKENDS slot {slot} of service id {id} ({backend}) belongs to no frontend's backends"
        ));
    }
    out
}

/// Each Maglev table in summary: size and the share of each backend.
fn maglev_json(dump: &MapDump, frontends: &BTreeMap<u32, String>) -> Value {
    dump.maglev
        .iter()
        .map(|(id, table)| {
            let size: u32 = table.values().sum();
            let backends: serde_json::Map<String, Value> = table
                .iter()
                .map(|(e, n)| (sock(e.addr, e.port).to_string(), json!(n)))
                .collect();
            json!({"service_id": id, "frontend": frontends.get(id), "size": size, "slots": backends})
        })
        .collect()
}

/// The listing, as JSON.
pub fn lb_list(dump: &MapDump, intent: &Programmed, raw: bool) -> Value {
    let owners: BTreeMap<u32, String> = dump
        .services
        .iter()
        .filter_map(|e| {
            let owner = intent.owners.get(&frontend_of(&e.key)?)?;
            Some((e.value.service_id, format!("{}/{}", owner.0, owner.1)))
        })
        .collect();
    let mut services: Vec<Value> = dump
        .services
        .iter()
        .map(|e| {
            json!({
                "frontend": frontend_of(&e.key).map(|f| f.to_string()),
                "service_id": e.value.service_id,
                "backend_count": e.value.backend_count,
                "flags": flag_names(e.value.flags),
                "service": owners.get(&e.value.service_id),
            })
        })
        .collect();
    services.sort_by_key(|v| v["service_id"].as_u64());
    let mut backends: Vec<_> = dump.backends.iter().collect();
    backends.sort_by_key(|e| (e.key.service_id, e.key.slot));
    let backends: Vec<Value> = backends
        .iter()
        .map(|e| {
            json!({
                "service_id": e.key.service_id,
                "slot": e.key.slot,
                "backend": backend_of(&e.value).map(|b| b.to_string()),
                "weight": e.value.weight,
                "weight_start": e.value.weight_start,
            })
        })
        .collect();
    let frontends_by_id: BTreeMap<u32, String> = dump
        .services
        .iter()
        .filter_map(|e| Some((e.value.service_id, frontend_of(&e.key)?.to_string())))
        .collect();
    let (replies, flows): (Vec<_>, Vec<_>) = dump
        .conntrack
        .iter()
        .partition(|e| e.value.flags & flow_flags::REPLY != 0);
    let c = &dump.config;
    let mut value = json!({
        "config": {
            "service_cidr": format!("{}/{}", ip(c.service_cidr_addr), u32::from_be(c.service_cidr_mask).count_ones()),
            "node_addr": ip(c.node_addr).to_string(),
            "hairpin_addr": ip(c.hairpin_addr).to_string(),
            "snat_ports": format!("{}-{}", c.snat_port_min, u32::from(c.snat_port_min) + u32::from(c.snat_port_count).saturating_sub(1)),
        },
        "services": services,
        "backends": backends,
        "flows": flows.iter().map(|e| flow_json(e, dump)).collect::<Vec<_>>(),
        "reverse_flows": replies.iter().map(|e| flow_json(e, dump)).collect::<Vec<_>>(),
        "maglev": maglev_json(dump, &frontends_by_id),
        "affinity": dump.affinity.iter().map(|e| {
            let client = if e.key.scope == affinity_scope::ADDRESS {
                ip(e.key.client as u32).to_string()
            } else {
                format!("netns cookie {}", e.key.client)
            };
            json!({
                "service_id": e.key.service_id,
                "frontend": frontends_by_id.get(&e.key.service_id),
                "client": client,
                "backend": sock(e.value.backend.addr, e.value.backend.port).to_string(),
                "idle_s": dump.monotonic_ns.saturating_sub(e.value.last_seen_ns) as f64 / 1e9,
            })
        }).collect::<Vec<_>>(),
        "source_ranges": dump.source_ranges.iter().map(|(id, net)| json!({"service_id": id, "range": net.to_string()})).collect::<Vec<_>>(),
        "differences": differences(dump, intent),
    });
    if raw {
        value["raw"] = json!({
            "SERVICES": raw_json(dump.services.iter().map(MapEntry::raw)),
            "BACKENDS": raw_json(dump.backends.iter().map(MapEntry::raw)),
            "CONNTRACK": raw_json(dump.conntrack.iter().map(MapEntry::raw)),
            "AFFINITY": raw_json(dump.affinity.iter().map(MapEntry::raw)),
            "CONFIG": raw_json(std::iter::once(RawEntry {
                key: 0u32.to_ne_bytes().to_vec(),
                value: vipr_dataplane::bytes_of(&dump.config).to_vec(),
            })),
        });
    }
    value
}
