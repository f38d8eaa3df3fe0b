//! Converting the store's Services, EndpointSlices and Pods into the plain
//! snapshot the DNS server answers from (vipr-dns knows no Kubernetes types).

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::core::v1::{Pod, Service};
use vipr_dns::{ClusterSnapshot, Endpoint, Protocol, ServiceKind, ServicePort};
use vipr_store::slice::EndpointSlice;

/// The label EndpointSlices carry naming their service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Builds the DNS snapshot from everything the store holds.
pub fn cluster_snapshot(
    namespaces: Vec<String>,
    services: &[&Service],
    slices: &[&EndpointSlice],
    pods: &[&Pod],
) -> ClusterSnapshot {
    let mut slices_by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for &slice in slices {
        let namespace = slice.metadata.namespace.clone().unwrap_or_default();
        if let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        {
            slices_by_service
                .entry((namespace, service.clone()))
                .or_default()
                .push(slice);
        }
    }
    let services = services
        .iter()
        .filter_map(|service| {
            let key = (
                service.metadata.namespace.clone().unwrap_or_default(),
                service.metadata.name.clone().unwrap_or_default(),
            );
            let slices = slices_by_service
                .get(&key)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            dns_service(service, slices)
        })
        .collect();
    ClusterSnapshot {
        namespaces,
        services,
        pods: pods.iter().copied().filter_map(dns_pod).collect(),
    }
}

fn dns_service(service: &Service, slices: &[&EndpointSlice]) -> Option<vipr_dns::Service> {
    let spec = service.spec.as_ref()?;
    let kind = if spec.type_.as_deref() == Some("ExternalName") {
        ServiceKind::ExternalName {
            external_name: spec.external_name.clone()?,
        }
    } else if spec.cluster_ip.as_deref() == Some("None") {
        ServiceKind::Headless
    } else {
        let ips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        ServiceKind::ClusterIp { ips }
    };
    let headless = matches!(kind, ServiceKind::Headless);
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let protocol = protocol(p.protocol.as_deref());
            // Headless SRV records point at the endpoints, so they carry the
            // endpoint port, found by name in the slices.
            let port = if headless {
                slice_port(slices, p.name.as_deref(), protocol).unwrap_or(p.port)
            } else {
                p.port
            };
            Some(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol,
                port: u16::try_from(port).ok()?,
            })
        })
        .collect();
    let endpoints = slices
        .iter()
        .flat_map(|slice| slice.endpoints.iter().flatten())
        .flat_map(|endpoint| {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            endpoint
                .addresses
                .iter()
                .filter_map(|a| a.parse::<IpAddr>().ok())
                .map(move |ip| Endpoint {
                    ip,
                    hostname: endpoint.hostname.clone(),
                    node_name: endpoint.node_name.clone(),
                    ready: conditions.ready.unwrap_or(true),
                    serving: conditions.serving.unwrap_or(true),
                    terminating: conditions.terminating.unwrap_or(false),
                })
        })
        .collect();
    Some(vipr_dns::Service {
        name: service.metadata.name.clone()?,
        namespace: service.metadata.namespace.clone()?,
        kind,
        ports,
        endpoints,
        publish_not_ready_addresses: spec.publish_not_ready_addresses.unwrap_or(false),
    })
}

fn slice_port(slices: &[&EndpointSlice], name: Option<&str>, protocol: Protocol) -> Option<i32> {
    slices
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .find(|p| {
            p.name.as_deref().unwrap_or("") == name.unwrap_or("")
                && self::protocol(p.protocol.as_deref()) == protocol
        })
        .and_then(|p| p.port)
}

fn protocol(name: Option<&str>) -> Protocol {
    match name.unwrap_or("TCP") {
        "UDP" => Protocol::Udp,
        "SCTP" => Protocol::Sctp,
        _ => Protocol::Tcp,
    }
}

fn dns_pod(pod: &Pod) -> Option<vipr_dns::Pod> {
    let ip = pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
    let spec = pod.spec.as_ref();
    Some(vipr_dns::Pod {
        name: pod.metadata.name.clone()?,
        namespace: pod.metadata.namespace.clone()?,
        ip,
        hostname: spec.and_then(|s| s.hostname.clone()),
        subdomain: spec.and_then(|s| s.subdomain.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn services_get_their_slices_and_pods_their_ips() {
        let services: Vec<Service> = serde_json::from_value(json!([
            {"metadata": {"name": "web", "namespace": "default"},
             "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}]}},
            {"metadata": {"name": "db", "namespace": "default"},
             "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}},
            {"metadata": {"name": "ext", "namespace": "default"},
             "spec": {"type": "ExternalName", "externalName": "example.org"}},
        ]))
        .unwrap();
        let slices: Vec<EndpointSlice> = serde_json::from_value(json!([
            {"metadata": {"name": "db-1", "namespace": "default",
                          "labels": {"kubernetes.io/service-name": "db"}},
             "addressType": "IPv4",
             "endpoints": [{"addresses": ["10.244.0.9"], "hostname": "db-0",
                            "conditions": {"ready": true}}],
             "ports": [{"name": "pg", "port": 15432, "protocol": "TCP"}]},
        ]))
        .unwrap();
        let pods: Vec<Pod> = serde_json::from_value(json!([
            {"metadata": {"name": "db-0", "namespace": "default"},
             "spec": {"containers": [], "hostname": "db-0", "subdomain": "db"},
             "status": {"podIP": "10.244.0.9"}},
            {"metadata": {"name": "pending", "namespace": "default"},
             "spec": {"containers": []}},
        ]))
        .unwrap();
        let snapshot = cluster_snapshot(
            vec!["default".into()],
            &services.iter().collect::<Vec<_>>(),
            &slices.iter().collect::<Vec<_>>(),
            &pods.iter().collect::<Vec<_>>(),
        );
        assert_eq!(snapshot.services.len(), 3);
        let web = &snapshot.services[0];
        assert_eq!(
            web.kind,
            ServiceKind::ClusterIp {
                ips: vec!["10.96.0.20".parse().unwrap()]
            }
        );
        let db = &snapshot.services[1];
        assert_eq!(db.kind, ServiceKind::Headless);
        assert_eq!(
            db.ports[0].port, 15432,
            "headless SRV uses the endpoint port"
        );
        assert_eq!(db.endpoints[0].hostname.as_deref(), Some("db-0"));
        assert!(matches!(
            snapshot.services[2].kind,
            ServiceKind::ExternalName { .. }
        ));
        assert_eq!(snapshot.pods.len(), 1, "a pod without an IP has no record");
    }
}
