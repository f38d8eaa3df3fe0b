//! `vipr service list`: every frontend the agent programs, with its
//! service's balancing and traffic policy, every endpoint of its service
//! port with its conditions (and whether the data plane uses it), and the
//! counters the data plane keeps per frontend and backend.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::Service;
use serde_json::{Value, json};
use vipr_balancer::ServiceBalancing;
use vipr_dataplane::{BackendAddr, ExternalTrafficPolicy, FlowStats, Frontend, FrontendStats};
use vipr_store::{
    Kind, ObjectKey, Store,
    endpoints::{self, EndpointGroup},
};

use super::{
    frontends::{FrontendKind, FrontendSpec},
    reconciler::ComputedSlices,
    sync::{Programmed, ServiceName},
};

/// The stored Service named `name`, if any.
fn stored_service(store: &Store, name: &ServiceName) -> Option<Service> {
    let key = ObjectKey::namespaced(Kind::Service, &name.0, name.1.clone());
    store.get(&key)?.as_service().cloned()
}

/// The user's EndpointSlices (selector-less services) as groups, by the
/// service they name: one pass over the slices for the whole list.
fn user_slice_groups(store: &Store) -> HashMap<ServiceName, Vec<EndpointGroup>> {
    let mut out: HashMap<ServiceName, Vec<EndpointGroup>> = HashMap::new();
    for object in store.list(Kind::EndpointSlice, None) {
        let Some(slice) = object.as_endpoint_slice() else {
            continue;
        };
        let (Some(service), Some(group)) = (
            endpoints::slice_service_name(slice),
            endpoints::from_endpoint_slice(slice),
        ) else {
            continue;
        };
        let namespace = slice.metadata.namespace.clone().unwrap_or_default();
        out.entry((namespace, service.to_owned()))
            .or_default()
            .push(group);
    }
    out
}

/// The endpoint groups of a service as the reconciler sees them: computed
/// from pods for selector services, the user's slices otherwise.
fn endpoint_groups(
    computed: &ComputedSlices,
    user_slices: &HashMap<ServiceName, Vec<EndpointGroup>>,
    service: &Service,
    name: &ServiceName,
) -> Vec<EndpointGroup> {
    if endpoints::is_selector_managed(service) {
        return computed
            .read()
            .unwrap()
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(endpoints::from_endpoint_slice)
            .collect();
    }
    user_slices.get(name).cloned().unwrap_or_default()
}

fn counters_json(stats: &FlowStats) -> Value {
    json!({"packets": stats.packets, "bytes": stats.bytes, "new_flows": stats.new_flows})
}

/// The traffic policy that applies to a frontend, as Kubernetes names it.
pub fn traffic_policy(
    kind: FrontendKind,
    spec: &FrontendSpec,
    service: Option<&Service>,
) -> String {
    match (kind, spec.options.external_traffic_policy) {
        (FrontendKind::ClusterIp, _) | (_, None) => service
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.internal_traffic_policy.clone())
            .unwrap_or_else(|| "Cluster".into()),
        (_, Some(ExternalTrafficPolicy::Cluster)) => "Cluster".into(),
        (_, Some(ExternalTrafficPolicy::Local)) => "Local".into(),
    }
}

fn endpoint_state(conditions: &endpoints::Conditions) -> &'static str {
    match (conditions.ready, conditions.serving, conditions.terminating) {
        (_, _, true) if conditions.serving => "terminating (serving)",
        (_, _, true) => "terminating",
        (true, _, _) => "ready",
        (false, true, _) => "serving (not ready)",
        (false, false, _) => "not ready",
    }
}

/// One frontend's backends: every endpoint of its service port (with its
/// state), then any programmed backend no endpoint accounts for.
fn backends_json(
    frontend: &Frontend,
    spec: &FrontendSpec,
    groups: &[EndpointGroup],
    stats: Option<&FrontendStats>,
) -> Vec<Value> {
    let counters_of = |backend: &BackendAddr| {
        stats
            .and_then(|s| s.backends.iter().find(|b| b.backend == *backend))
            .map(|b| counters_json(&b.stats))
    };
    let protocol = match frontend.protocol {
        vipr_dataplane::Protocol::Tcp => endpoints::Protocol::Tcp,
        vipr_dataplane::Protocol::Udp => endpoints::Protocol::Udp,
    };
    let mut listed = Vec::new();
    let mut out = Vec::new();
    for group in groups {
        let Some(port) = group
            .ports
            .iter()
            .find(|p| p.name == spec.port_name && p.protocol == protocol)
        else {
            continue;
        };
        for endpoint in &group.endpoints {
            let std::net::IpAddr::V4(addr) = endpoint.address else {
                continue;
            };
            let Some(port) = vipr_dataplane::Port::new(port.port) else {
                continue;
            };
            let backend = BackendAddr { addr, port };
            let active = spec.backends.contains(&backend);
            listed.push(backend);
            out.push(json!({
                "address": backend.to_string(),
                "pod": endpoint.target.as_ref().map(|t| t.name.clone()),
                "node": endpoint.node_name,
                "state": endpoint_state(&endpoint.conditions),
                "ready": endpoint.conditions.ready,
                "serving": endpoint.conditions.serving,
                "terminating": endpoint.conditions.terminating,
                "active": active,
                "counters": counters_of(&backend),
            }));
        }
    }
    for backend in spec.backends.iter().filter(|b| !listed.contains(b)) {
        out.push(json!({
            "address": backend.to_string(),
            "pod": null,
            "state": "static",
            "active": true,
            "counters": counters_of(backend),
        }));
    }
    out
}

/// The whole list, as JSON the CLI prints as a table or as it is.
pub fn service_list(
    store: &Store,
    computed: &ComputedSlices,
    intent: &Programmed,
    stats: &[FrontendStats],
) -> Value {
    let stats: BTreeMap<Frontend, &FrontendStats> = stats.iter().map(|s| (s.frontend, s)).collect();
    let owners = &intent.owners;
    let programmed: BTreeMap<&ServiceName, _> = intent.by_service.iter().collect();
    let user_slices = user_slice_groups(store);
    let mut frontends = Vec::new();
    for (name, table) in programmed {
        let service = stored_service(store, name);
        let groups = service
            .as_ref()
            .map(|s| endpoint_groups(computed, &user_slices, s, name))
            .unwrap_or_default();
        for (frontend, spec) in table {
            if owners.get(frontend) != Some(name) {
                continue;
            }
            let frontend_stats = stats.get(frontend).copied();
            // What the reconciler programmed (annotations over the node's
            // --lb-algorithm default).
            let balancing = &spec.options.balancing;
            let algorithm = match balancing.algorithm {
                vipr_balancer::Algorithm::Maglev => {
                    format!("maglev({})", balancing.maglev_table_size)
                }
                other => other.to_string(),
            };
            let affinity = affinity_name(balancing);
            frontends.push(json!({
                "namespace": name.0,
                "service": name.1,
                "frontend": frontend.to_string(),
                "type": spec.kind.name(),
                "port_name": spec.port_name,
                "algorithm": algorithm,
                "affinity": affinity,
                "traffic_policy": traffic_policy(spec.kind, spec, service.as_ref()),
                "source_ranges": spec.options.source_ranges.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
                "programmed": frontend_stats.is_some(),
                "counters": frontend_stats.map(|s| counters_json(&s.total)),
                "drops": frontend_stats.map(|s| {
                    s.drops.iter().map(|(reason, v)| (reason.to_string(), json!(v.packets))).collect::<serde_json::Map<_, _>>()
                }),
                "backends": backends_json(frontend, spec, &groups, frontend_stats),
            }));
        }
    }
    json!({"frontends": frontends})
}

fn affinity_name(balancing: &ServiceBalancing) -> String {
    match balancing.affinity {
        vipr_balancer::SessionAffinity::None => "None".into(),
        vipr_balancer::SessionAffinity::ClientIp { timeout } => {
            format!("ClientIP {}s", timeout.seconds())
        }
    }
}
