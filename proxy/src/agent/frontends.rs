//! Turning a Service and its EndpointSlices into the frontends the data plane
//! serves and the backends behind each, as kube-proxy would program them.
//!
//! Pure logic: no maps, no I/O. The reconciler diffs what this returns.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use vipr_dataplane::{BackendAddr, Frontend, Port, Protocol};
use vipr_store::endpoints::{self, EndpointGroup};

/// Every frontend of one service with the backends it translates to.
pub type FrontendTable = BTreeMap<Frontend, Vec<BackendAddr>>;

/// Where a service is reachable besides its ClusterIP.
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeAddresses {
    /// The node's own address, for NodePorts. `None` serves no NodePorts.
    pub node_ip: Option<Ipv4Addr>,
}

/// The frontends of `service` with their backends from its endpoint `groups`.
///
/// ExternalName and headless services have none (DNS serves them). SCTP
/// ports are skipped: the data plane translates TCP and UDP.
pub fn service_frontends(
    service: &Service,
    groups: &[EndpointGroup],
    node: NodeAddresses,
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

    for service_port in spec.ports.iter().flatten() {
        let (Some(protocol), Some(port)) = (protocol_of(service_port), port_of(service_port.port))
        else {
            continue;
        };
        let backends = backends_for(service_port, protocol, groups);
        let mut add = |addr: Ipv4Addr, port: Port| {
            table.insert(
                Frontend {
                    addr,
                    port,
                    protocol,
                },
                backends.clone(),
            );
        };
        for addr in cluster_ips.iter().chain(&external_ips).chain(&lb_ips) {
            add(*addr, port);
        }
        if let (Some(node_ip), Some(node_port)) =
            (node.node_ip, service_port.node_port.and_then(port_of))
        {
            add(node_ip, node_port);
        }
    }
    table
}

/// Backends for one service port by the data plane rule (vipr-store's
/// `endpoints::backends`): ready endpoints, or, while none is ready, the
/// terminating ones that still serve.
fn backends_for(
    service_port: &ServicePort,
    protocol: Protocol,
    groups: &[EndpointGroup],
) -> Vec<BackendAddr> {
    let protocol = match protocol {
        Protocol::Tcp => endpoints::Protocol::Tcp,
        Protocol::Udp => endpoints::Protocol::Udp,
    };
    let name = service_port.name.as_deref().unwrap_or("");
    endpoints::backends(groups, name, protocol)
        .into_iter()
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
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use serde_json::json;

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
        };
        let table = service_frontends(&svc, &slices, node);
        let http = vec![be([10, 244, 0, 5], 8080)];
        assert_eq!(table[&fe([10, 96, 0, 10], 80, Protocol::Tcp)], http);
        assert_eq!(table[&fe([192, 0, 2, 10], 80, Protocol::Tcp)], http);
        assert_eq!(table[&fe([172, 18, 0, 2], 30080, Protocol::Tcp)], http);
        assert_eq!(
            table[&fe([10, 96, 0, 10], 53, Protocol::Udp)],
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
        let table = service_frontends(&svc, &only_terminating, NodeAddresses::default());
        assert_eq!(table[&key], vec![be([10, 244, 0, 7], 8080)]);

        let with_ready = [slice(
            json!([terminating, {"addresses": ["10.244.0.8"], "conditions": {"ready": true}}]),
            json!([{"port": 8080}]),
        )];
        let table = service_frontends(&svc, &with_ready, NodeAddresses::default());
        assert_eq!(table[&key], vec![be([10, 244, 0, 8], 8080)]);
    }

    #[test]
    fn no_endpoints_keeps_the_frontend_with_no_backends() {
        let svc = service(json!({"clusterIP": "10.96.0.12", "ports": [{"port": 80}]}));
        let table = service_frontends(&svc, &[], NodeAddresses::default());
        assert_eq!(table[&fe([10, 96, 0, 12], 80, Protocol::Tcp)], vec![]);
    }

    #[test]
    fn headless_and_external_name_have_no_frontends() {
        let headless = service(json!({"clusterIP": "None", "ports": [{"port": 80}]}));
        assert!(service_frontends(&headless, &[], NodeAddresses::default()).is_empty());
        let external = service(json!({"type": "ExternalName", "externalName": "example.org"}));
        assert!(service_frontends(&external, &[], NodeAddresses::default()).is_empty());
    }
}
