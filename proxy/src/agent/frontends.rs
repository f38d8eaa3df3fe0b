//! Turning a Service and its EndpointSlices into the frontends the data plane
//! serves and the backends behind each, as kube-proxy would program them.
//!
//! Pure logic: no maps, no I/O. The reconciler diffs what this returns.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use vipr_balancer::{NodeDefaults, ServiceAffinitySpec, ServiceBalancing, Weight};
use vipr_dataplane::{
    BackendAddr, ExternalTrafficPolicy, Frontend, FrontendOptions, Port, Protocol,
};
use vipr_store::endpoints::{self, EndpointGroup};

/// What one frontend translates to, and how.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendSpec {
    pub backends: Vec<BackendAddr>,
    pub options: FrontendOptions,
    /// Which of the service's addresses this frontend is.
    pub kind: FrontendKind,
    /// The service port it serves ("" for a single unnamed port).
    pub port_name: String,
}

/// How a client reaches a frontend, as Kubernetes names the service types.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum FrontendKind {
    #[default]
    ClusterIp,
    ExternalIp,
    LoadBalancer,
    NodePort,
}

impl FrontendKind {
    pub const fn name(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::ExternalIp => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
            FrontendKind::NodePort => "NodePort",
        }
    }
}

/// Every frontend of one service.
pub type FrontendTable = BTreeMap<Frontend, FrontendSpec>;

/// The node as services see it.
#[derive(Clone, Debug, Default)]
pub struct NodeAddresses {
    /// The node's own address, for NodePorts. `None` serves no NodePorts.
    pub node_ip: Option<Ipv4Addr>,
    /// The node's name: endpoints on it are the local ones
    /// (externalTrafficPolicy Local). Endpoints without a node name are
    /// pods of this node's own runtime.
    pub node_name: String,
    /// `--lb-algorithm` and `--maglev-seed`.
    pub balancing: NodeDefaults,
}

/// Backend weights (`vipr.io/weight`) by pod address; pods without the
/// annotation are absent (weight 1).
pub type PodWeights = HashMap<IpAddr, Weight>;

/// The weights the `pods` ask for. An invalid value (refused at apply, so
/// only possible for objects stored before) counts as the default.
pub fn pod_weights<'a>(pods: impl Iterator<Item = &'a Pod>) -> PodWeights {
    pods.filter_map(|pod| {
        let weight =
            Weight::from_pod_annotations(pod.metadata.annotations.as_ref()?).unwrap_or_default();
        let ip: IpAddr = pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
        (weight != Weight::DEFAULT).then_some((ip, weight))
    })
    .collect()
}

/// The service's balancing from its annotations and affinity fields, or
/// the node's defaults when they cannot be used (refused at apply, so only
/// for objects stored before).
pub fn service_balancing(service: &Service, node: &NodeDefaults) -> ServiceBalancing {
    let empty = BTreeMap::new();
    let annotations = service.metadata.annotations.as_ref().unwrap_or(&empty);
    let spec = service.spec.as_ref();
    let affinity = ServiceAffinitySpec {
        session_affinity: spec.and_then(|s| s.session_affinity.as_deref()),
        timeout_seconds: spec
            .and_then(|s| s.session_affinity_config.as_ref())
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map(i64::from),
    };
    ServiceBalancing::from_service(annotations, affinity, node).unwrap_or_else(|error| {
        tracing::warn!(
            service = ?service.metadata.name,
            %error,
            "unusable balancing settings; using the node defaults"
        );
        ServiceBalancing {
            algorithm: node.algorithm,
            maglev_seed: node.maglev_seed,
            ..ServiceBalancing::default()
        }
    })
}

/// The frontends of `service` with their backends from its endpoint
/// `groups`, weighted by `weights`, balanced as the service asks.
///
/// ExternalName and headless services have none (DNS serves them). SCTP
/// ports are skipped: the data plane translates TCP and UDP.
pub fn service_frontends(
    service: &Service,
    groups: &[EndpointGroup],
    weights: &PodWeights,
    node: &NodeAddresses,
) -> FrontendTable {
    let mut table = FrontendTable::new();
    let Some(spec) = service.spec.as_ref() else {
        return table;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return table;
    }
    let cluster_ips = ipv4_addrs(
        spec.cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter()),
    );
    let external_ips = ipv4_addrs(spec.external_ips.iter().flatten());
    let lb_ips = ipv4_addrs(
        service
            .status
            .iter()
            .filter_map(|s| s.load_balancer.as_ref())
            .filter_map(|lb| lb.ingress.as_ref())
            .flatten()
            .filter_map(|ingress| ingress.ip.as_ref()),
    );

    let policy = match spec.external_traffic_policy.as_deref() {
        Some("Local") => ExternalTrafficPolicy::Local,
        _ => ExternalTrafficPolicy::Cluster,
    };
    let source_ranges: Vec<Ipv4Net> = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let balancing = service_balancing(service, &node.balancing);
    for service_port in spec.ports.iter().flatten() {
        let (Some(protocol), Some(port)) = (protocol_of(service_port), port_of(service_port.port))
        else {
            continue;
        };
        let all = backends_for(service_port, protocol, groups, None);
        let external = match policy {
            ExternalTrafficPolicy::Cluster => all.clone(),
            ExternalTrafficPolicy::Local => {
                backends_for(service_port, protocol, groups, Some(&node.node_name))
            }
        };
        let port_name = service_port.name.clone().unwrap_or_default();
        let mut add = |kind, addr: Ipv4Addr, port: Port, backends: &[BackendAddr], options| {
            let options = FrontendOptions {
                balancing,
                weights: backends
                    .iter()
                    .filter_map(|b| Some((*b, *weights.get(&IpAddr::V4(b.addr))?)))
                    .collect(),
                ..options
            };
            let spec = FrontendSpec {
                backends: backends.to_vec(),
                options,
                kind,
                port_name: port_name.clone(),
            };
            table.insert(
                Frontend {
                    addr,
                    port,
                    protocol,
                },
                spec,
            );
        };
        for addr in &cluster_ips {
            add(
                FrontendKind::ClusterIp,
                *addr,
                port,
                &all,
                FrontendOptions::default(),
            );
        }
        for addr in &external_ips {
            add(
                FrontendKind::ExternalIp,
                *addr,
                port,
                &external,
                FrontendOptions::external(policy),
            );
        }
        for addr in &lb_ips {
            let options = FrontendOptions {
                source_ranges: source_ranges.clone(),
                ..FrontendOptions::external(policy)
            };
            add(FrontendKind::LoadBalancer, *addr, port, &external, options);
        }
        if let (Some(node_ip), Some(node_port)) =
            (node.node_ip, service_port.node_port.and_then(port_of))
        {
            add(
                FrontendKind::NodePort,
                node_ip,
                node_port,
                &external,
                FrontendOptions::external(policy),
            );
        }
    }
    table
}

/// Backends for one service port by the data plane rule (vipr-store's
/// `endpoints::backends`): ready endpoints, or, while none is ready, the
/// terminating ones that still serve.
/// With `only_node`, just the endpoints on that node (or on no named node).
fn backends_for(
    service_port: &ServicePort,
    protocol: Protocol,
    groups: &[EndpointGroup],
    only_node: Option<&str>,
) -> Vec<BackendAddr> {
    let protocol = match protocol {
        Protocol::Tcp => endpoints::Protocol::Tcp,
        Protocol::Udp => endpoints::Protocol::Udp,
    };
    let name = service_port.name.as_deref().unwrap_or("");
    endpoints::backends(groups, name, protocol)
        .into_iter()
        .filter(|b| match (only_node, b.node_name.as_deref()) {
            (Some(node), Some(on)) => node == on,
            _ => true,
        })
        .filter_map(|b| match b.address {
            std::net::IpAddr::V4(addr) => Some(BackendAddr {
                addr,
                port: Port::new(b.port)?,
            }),
            std::net::IpAddr::V6(_) => None,
        })
        .collect()
}

fn protocol_of(port: &ServicePort) -> Option<Protocol> {
    port.protocol.as_deref().unwrap_or("TCP").parse().ok()
}

fn port_of(port: i32) -> Option<Port> {
    u16::try_from(port).ok().and_then(Port::new)
}

fn ipv4_addrs<'a>(addrs: impl Iterator<Item = &'a String>) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = addrs.filter_map(|a| a.parse().ok()).collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vipr_store::slice::EndpointSlice;

    fn service(spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn slice(endpoints: serde_json::Value, ports: serde_json::Value) -> EndpointGroup {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "web-abc", "namespace": "default"},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        }))
        .unwrap();
        endpoints::from_endpoint_slice(&slice).unwrap()
    }

    fn fe(addr: [u8; 4], port: u16, protocol: Protocol) -> Frontend {
        Frontend {
            addr: addr.into(),
            port: Port::new(port).unwrap(),
            protocol,
        }
    }

    fn be(addr: [u8; 4], port: u16) -> BackendAddr {
        BackendAddr {
            addr: addr.into(),
            port: Port::new(port).unwrap(),
        }
    }

    #[test]
    fn clusterip_nodeport_and_external_ips() {
        let svc = service(json!({
            "type": "NodePort",
            "clusterIP": "10.96.0.10",
            "externalIPs": ["192.0.2.10"],
            "ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ],
        }));
        let slices = [slice(
            json!([
                {"addresses": ["10.244.0.5"], "conditions": {"ready": true}},
                {"addresses": ["10.244.0.6"], "conditions": {"ready": false}},
            ]),
            json!([
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 5353, "protocol": "UDP"},
            ]),
        )];
        let node = NodeAddresses {
            node_ip: Some([172, 18, 0, 2].into()),
            node_name: "n1".into(),
            ..NodeAddresses::default()
        };
        let table = service_frontends(&svc, &slices, &PodWeights::new(), &node);
        let http = vec![be([10, 244, 0, 5], 8080)];
        let cluster_ip = &table[&fe([10, 96, 0, 10], 80, Protocol::Tcp)];
        assert_eq!(cluster_ip.backends, http);
        assert_eq!(cluster_ip.options, FrontendOptions::default());
        let external = FrontendOptions::external(ExternalTrafficPolicy::Cluster);
        assert_eq!(
            table[&fe([192, 0, 2, 10], 80, Protocol::Tcp)].backends,
            http
        );
        assert_eq!(
            table[&fe([192, 0, 2, 10], 80, Protocol::Tcp)].options,
            external
        );
        assert_eq!(
            table[&fe([172, 18, 0, 2], 30080, Protocol::Tcp)].backends,
            http
        );
        assert_eq!(
            table[&fe([172, 18, 0, 2], 30080, Protocol::Tcp)].options,
            external
        );
        assert_eq!(
            table[&fe([10, 96, 0, 10], 53, Protocol::Udp)].backends,
            vec![be([10, 244, 0, 5], 5353)]
        );
        assert_eq!(table.len(), 5);
    }

    #[test]
    fn terminating_endpoints_serve_only_while_none_is_ready() {
        let svc = service(json!({"clusterIP": "10.96.0.11", "ports": [{"port": 80}]}));
        let terminating = json!({"addresses": ["10.244.0.7"],
            "conditions": {"ready": false, "serving": true, "terminating": true}});
        let only_terminating = [slice(json!([terminating.clone()]), json!([{"port": 8080}]))];
        let key = fe([10, 96, 0, 11], 80, Protocol::Tcp);
        let table = service_frontends(
            &svc,
            &only_terminating,
            &PodWeights::new(),
            &NodeAddresses::default(),
        );
        assert_eq!(table[&key].backends, vec![be([10, 244, 0, 7], 8080)]);

        let with_ready = [slice(
            json!([terminating, {"addresses": ["10.244.0.8"], "conditions": {"ready": true}}]),
            json!([{"port": 8080}]),
        )];
        let table = service_frontends(
            &svc,
            &with_ready,
            &PodWeights::new(),
            &NodeAddresses::default(),
        );
        assert_eq!(table[&key].backends, vec![be([10, 244, 0, 8], 8080)]);
    }

    #[test]
    fn no_endpoints_keeps_the_frontend_with_no_backends() {
        let svc = service(json!({"clusterIP": "10.96.0.12", "ports": [{"port": 80}]}));
        let table = service_frontends(&svc, &[], &PodWeights::new(), &NodeAddresses::default());
        assert_eq!(
            table[&fe([10, 96, 0, 12], 80, Protocol::Tcp)].backends,
            vec![]
        );
    }

    #[test]
    fn balancing_annotations_and_pod_weights_reach_every_frontend() {
        use vipr_balancer::{Algorithm, SessionAffinity};
        let mut svc = service(json!({
            "type": "NodePort",
            "clusterIP": "10.96.0.14",
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 2}},
            "ports": [{"port": 80, "nodePort": 30082}],
        }));
        svc.metadata.annotations =
            Some([("vipr.io/lb-algorithm".to_owned(), "sh".to_owned())].into());
        let slices = [slice(
            json!([
                {"addresses": ["10.244.0.5"], "conditions": {"ready": true}},
                {"addresses": ["10.244.0.6"], "conditions": {"ready": true}},
            ]),
            json!([{"port": 8080}]),
        )];
        let weights: PodWeights = [("10.244.0.6".parse().unwrap(), Weight::new(3))].into();
        let node = NodeAddresses {
            node_ip: Some([172, 18, 0, 2].into()),
            ..NodeAddresses::default()
        };
        let table = service_frontends(&svc, &slices, &weights, &node);
        assert_eq!(table.len(), 2);
        for spec in table.values() {
            assert_eq!(spec.options.balancing.algorithm, Algorithm::SourceHash);
            assert!(matches!(
                spec.options.balancing.affinity,
                SessionAffinity::ClientIp { timeout } if timeout.seconds() == 2
            ));
            assert_eq!(
                spec.options.weight(&be([10, 244, 0, 6], 8080)),
                Weight::new(3)
            );
            assert_eq!(
                spec.options.weight(&be([10, 244, 0, 5], 8080)),
                Weight::DEFAULT
            );
        }
        // Without the annotation, the node's default algorithm.
        svc.metadata.annotations = None;
        let node = NodeAddresses {
            balancing: NodeDefaults {
                algorithm: Algorithm::Maglev,
                ..NodeDefaults::default()
            },
            ..node
        };
        let table = service_frontends(&svc, &slices, &weights, &node);
        assert!(
            table
                .values()
                .all(|s| s.options.balancing.algorithm == Algorithm::Maglev)
        );
    }

    #[test]
    fn headless_and_external_name_have_no_frontends() {
        let headless = service(json!({"clusterIP": "None", "ports": [{"port": 80}]}));
        assert!(
            service_frontends(
                &headless,
                &[],
                &PodWeights::new(),
                &NodeAddresses::default()
            )
            .is_empty()
        );
        let external = service(json!({"type": "ExternalName", "externalName": "example.org"}));
        assert!(
            service_frontends(
                &external,
                &[],
                &PodWeights::new(),
                &NodeAddresses::default()
            )
            .is_empty()
        );
    }

    #[test]
    fn local_policy_serves_only_this_nodes_endpoints_and_keeps_source_ranges() {
        let svc = service(json!({
            "type": "LoadBalancer",
            "clusterIP": "10.96.0.13",
            "externalTrafficPolicy": "Local",
            "loadBalancerSourceRanges": ["192.0.2.0/24"],
            "ports": [{"port": 80, "nodePort": 30081}],
        }));
        let mut svc = svc;
        svc.status = serde_json::from_value(json!({
            "loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}
        }))
        .unwrap();
        let slices = [slice(
            json!([
                {"addresses": ["10.244.0.5"], "nodeName": "n1", "conditions": {"ready": true}},
                {"addresses": ["10.244.9.5"], "nodeName": "n2", "conditions": {"ready": true}},
            ]),
            json!([{"port": 8080}]),
        )];
        let node = NodeAddresses {
            node_ip: Some([172, 18, 0, 2].into()),
            node_name: "n1".into(),
            ..NodeAddresses::default()
        };
        let table = service_frontends(&svc, &slices, &PodWeights::new(), &node);
        let cluster_ip = &table[&fe([10, 96, 0, 13], 80, Protocol::Tcp)];
        assert_eq!(
            cluster_ip.backends.len(),
            2,
            "ClusterIP uses every endpoint"
        );
        let node_port = &table[&fe([172, 18, 0, 2], 30081, Protocol::Tcp)];
        assert_eq!(node_port.backends, vec![be([10, 244, 0, 5], 8080)]);
        assert_eq!(
            node_port.options.external_traffic_policy,
            Some(ExternalTrafficPolicy::Local)
        );
        let lb = &table[&fe([198, 51, 100, 7], 80, Protocol::Tcp)];
        assert_eq!(lb.backends, vec![be([10, 244, 0, 5], 8080)]);
        assert_eq!(
            lb.options.source_ranges,
            vec!["192.0.2.0/24".parse::<Ipv4Net>().unwrap()]
        );
    }
}
