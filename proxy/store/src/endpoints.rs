//! Pure endpoint logic, no store access: which pods back a service and how, computed
//! like the Kubernetes EndpointSlice controller; the conversion to and from
//! `EndpointSlice` objects (selector-less services bring their own slices); and the
//! rule the data plane uses to pick backends.
//!
//! Controller rules mirrored here (pkg/controller/endpointslice and
//! pkg/api/v1/endpoints): a pod is an endpoint when the service has a selector that
//! matches its labels in the same namespace, it has an IP and is not terminal
//! (Succeeded/Failed); `serving` = the pod's Ready condition, `terminating` =
//! `deletionTimestamp` set, `ready` = serving and not terminating, or always with
//! `publishNotReadyAddresses`. Named target ports resolve per pod through its container
//! ports (same name and protocol), so pods can map a service port differently; each
//! distinct mapping becomes its own group (one EndpointSlice in Kubernetes).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service, ServicePort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::slice::{
    Endpoint as SliceEndpoint, EndpointConditions, EndpointPort as SlicePort, EndpointSlice,
};

/// The label tying an EndpointSlice to its service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label naming the controller that manages a slice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// Our value for [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "endpointslice-controller.vipr.io";
/// Kubernetes' default maximum number of endpoints per slice.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// A transport protocol of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the API spelling; absent means TCP (the API default).
    pub fn from_api(s: Option<&str>) -> Option<Protocol> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A resolved port of an endpoint group: the service port's name, the backend's port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointPort {
    /// The service port name ("" for a single unnamed port).
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub app_protocol: Option<String>,
}

/// Endpoint conditions, as in `discovery.k8s.io/v1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// The pod behind an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

/// One backend address with its conditions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub address: IpAddr,
    pub conditions: Conditions,
    pub node_name: Option<String>,
    /// Set when the pod's hostname+subdomain make it addressable under the service.
    pub hostname: Option<String>,
    pub target: Option<PodRef>,
}

/// Endpoints that share one port mapping (one EndpointSlice's worth, before the
/// per-slice size limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointGroup {
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

/// Whether the service's selector picks this pod. A service without a selector (or an
/// empty one) selects nothing: its endpoints come from user-provided slices.
pub fn selects(service: &Service, pod: &Pod) -> bool {
    let Some(selector) = service
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .filter(|s| !s.is_empty())
    else {
        return false;
    };
    if service.metadata.namespace != pod.metadata.namespace {
        return false;
    }
    let labels = pod.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// Whether the controller manages endpoints for this service at all.
pub fn is_selector_managed(service: &Service) -> bool {
    let spec = service.spec.as_ref();
    spec.and_then(|s| s.selector.as_ref())
        .is_some_and(|s| !s.is_empty())
        && spec.and_then(|s| s.type_.as_deref()) != Some("ExternalName")
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The pod's Ready condition.
pub fn is_pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The pod's IPs (status.podIPs, falling back to status.podIP), parsed.
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let listed = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok());
    let mut ips: Vec<IpAddr> = listed.collect();
    if ips.is_empty() {
        ips.extend(
            status
                .pod_ip
                .as_deref()
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
    }
    ips
}

/// Resolves a service port's targetPort for one pod (Kubernetes' `FindPort`): a number
/// is used as is; a name is looked up in the pod's container ports with the same
/// protocol. `None` when the name is not found (the pod gets no endpoint for it).
pub fn resolve_target_port(service_port: &ServicePort, pod: &Pod) -> Option<u16> {
    let protocol = service_port.protocol.as_deref().unwrap_or("TCP");
    match service_port.target_port.as_ref() {
        None => u16::try_from(service_port.port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok().filter(|n| *n != 0),
        Some(IntOrString::String(name)) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| {
                p.name.as_deref() == Some(name.as_str())
                    && p.protocol.as_deref().unwrap_or("TCP") == protocol
            })
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

fn resolve_ports(service: &Service, pod: &Pod) -> Vec<EndpointPort> {
    let ports = service.spec.as_ref().and_then(|s| s.ports.as_ref());
    let mut out: Vec<EndpointPort> = ports
        .into_iter()
        .flatten()
        .filter_map(|sp| {
            Some(EndpointPort {
                name: sp.name.clone().unwrap_or_default(),
                port: resolve_target_port(sp, pod)?,
                protocol: Protocol::from_api(sp.protocol.as_deref())?,
                app_protocol: sp.app_protocol.clone(),
            })
        })
        .collect();
    out.sort();
    out
}

/// Kubernetes' `ShouldSetHostname`.
fn hostname_for(service: &Service, pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let hostname = spec.hostname.as_ref().filter(|h| !h.is_empty())?;
    let matches = spec.subdomain.as_deref() == service.metadata.name.as_deref()
        && pod.metadata.namespace == service.metadata.namespace;
    matches.then(|| hostname.clone())
}

fn conditions_for(service: &Service, pod: &Pod) -> Conditions {
    let serving = is_pod_ready(pod);
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let publish = service
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        == Some(true);
    Conditions {
        ready: publish || (serving && !terminating),
        serving,
        terminating,
    }
}

/// Which address families the service wants (its ipFamilies; IPv4 if unset).
fn wants_family(service: &Service, ip: &IpAddr) -> bool {
    let families = service.spec.as_ref().and_then(|s| s.ip_families.as_ref());
    match families {
        Some(f) if !f.is_empty() => f.iter().any(|f| (f == "IPv4") == ip.is_ipv4()),
        _ => ip.is_ipv4(),
    }
}

/// The service's endpoints from the given pods, grouped by port mapping; deterministic
/// (groups by ports, endpoints by address). Empty for services the controller does not
/// manage (no selector, ExternalName).
pub fn compute<'a>(
    service: &Service,
    pods: impl IntoIterator<Item = &'a Pod>,
) -> Vec<EndpointGroup> {
    if !is_selector_managed(service) {
        return Vec::new();
    }
    let mut groups: BTreeMap<Vec<EndpointPort>, Vec<Endpoint>> = BTreeMap::new();
    for pod in pods
        .into_iter()
        .filter(|p| selects(service, p) && !is_terminal(p))
    {
        let conditions = conditions_for(service, pod);
        let ports = resolve_ports(service, pod);
        for address in pod_ips(pod)
            .into_iter()
            .filter(|ip| wants_family(service, ip))
        {
            groups.entry(ports.clone()).or_default().push(Endpoint {
                address,
                conditions,
                node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                hostname: hostname_for(service, pod),
                target: Some(PodRef {
                    namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                    name: pod.metadata.name.clone().unwrap_or_default(),
                    uid: pod.metadata.uid.clone(),
                }),
            });
        }
    }
    groups
        .into_iter()
        .map(|(ports, mut endpoints)| {
            endpoints.sort_by_key(|e| e.address);
            EndpointGroup { ports, endpoints }
        })
        .collect()
}

/// Renders groups as EndpointSlice objects (at most [`MAX_ENDPOINTS_PER_SLICE`] each),
/// labelled and owned like the controller's, named `<service>-<n>`.
pub fn to_endpoint_slices(service: &Service, groups: &[EndpointGroup]) -> Vec<EndpointSlice> {
    let name = service.metadata.name.clone().unwrap_or_default();
    let mut slices = Vec::new();
    for group in groups {
        let chunks: Vec<&[Endpoint]> = if group.endpoints.is_empty() {
            vec![&[]]
        } else {
            group.endpoints.chunks(MAX_ENDPOINTS_PER_SLICE).collect()
        };
        for chunk in chunks {
            let address_type = match chunk.first().map(|e| e.address) {
                Some(IpAddr::V6(_)) => "IPv6",
                _ => "IPv4",
            };
            slices.push(EndpointSlice {
                metadata: slice_metadata(service, &name, slices.len()),
                address_type: address_type.into(),
                endpoints: Some(chunk.iter().map(to_slice_endpoint).collect()),
                ports: Some(group.ports.iter().map(to_slice_port).collect()),
            });
        }
    }
    slices
}

fn slice_metadata(service: &Service, name: &str, index: usize) -> ObjectMeta {
    let labels = [(SERVICE_NAME_LABEL, name), (MANAGED_BY_LABEL, MANAGED_BY)];
    ObjectMeta {
        name: Some(format!("{name}-{index}")),
        namespace: service.metadata.namespace.clone(),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        owner_references: service.metadata.uid.clone().map(|uid| {
            vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Service".into(),
                name: name.to_owned(),
                uid,
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]
        }),
        ..Default::default()
    }
}

fn to_slice_endpoint(e: &Endpoint) -> SliceEndpoint {
    SliceEndpoint {
        addresses: vec![e.address.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(e.conditions.ready),
            serving: Some(e.conditions.serving),
            terminating: Some(e.conditions.terminating),
        }),
        hostname: e.hostname.clone(),
        node_name: e.node_name.clone(),
        target_ref: e.target.as_ref().map(|t| {
            Box::new(ObjectReference {
                kind: Some("Pod".into()),
                namespace: Some(t.namespace.clone()),
                name: Some(t.name.clone()),
                uid: t.uid.clone(),
                ..Default::default()
            })
        }),
        ..Default::default()
    }
}

fn to_slice_port(p: &EndpointPort) -> SlicePort {
    SlicePort {
        name: Some(p.name.clone()),
        port: Some(i32::from(p.port)),
        protocol: Some(p.protocol.as_str().into()),
        app_protocol: p.app_protocol.clone(),
    }
}

/// The service an EndpointSlice belongs to (its `kubernetes.io/service-name` label).
pub fn slice_service_name(slice: &EndpointSlice) -> Option<&str> {
    slice
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)
        .map(String::as_str)
}

/// Reads a stored EndpointSlice (e.g. a selector-less service's) as a group. FQDN
/// slices have no routable addresses and give `None`. Absent conditions follow the API
/// contract: ready unknown = ready, serving unknown = ready, terminating unknown = no.
/// Ports without a number are dropped (they mean "all ports", which we do not route).
pub fn from_endpoint_slice(slice: &EndpointSlice) -> Option<EndpointGroup> {
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return None;
    }
    let mut ports: Vec<EndpointPort> = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some(EndpointPort {
                name: p.name.clone().unwrap_or_default(),
                port: u16::try_from(p.port?).ok()?,
                protocol: Protocol::from_api(p.protocol.as_deref())?,
                app_protocol: p.app_protocol.clone(),
            })
        })
        .collect();
    ports.sort();
    let endpoints = slice
        .endpoints
        .iter()
        .flatten()
        .filter_map(from_slice_endpoint)
        .collect();
    Some(EndpointGroup { ports, endpoints })
}

fn from_slice_endpoint(e: &SliceEndpoint) -> Option<Endpoint> {
    let address = e.addresses.first()?.parse().ok()?;
    let c = e.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let target = e
        .target_ref
        .as_ref()
        .filter(|t| t.kind.as_deref() == Some("Pod"))
        .map(|t| PodRef {
            namespace: t.namespace.clone().unwrap_or_default(),
            name: t.name.clone().unwrap_or_default(),
            uid: t.uid.clone(),
        });
    Some(Endpoint {
        address,
        conditions: Conditions {
            ready,
            serving: c.and_then(|c| c.serving).unwrap_or(ready),
            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
        },
        node_name: e.node_name.clone(),
        hostname: e.hostname.clone(),
        target,
    })
}

/// One backend the data plane may send a service port's traffic to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub address: IpAddr,
    pub port: u16,
    pub node_name: Option<String>,
    /// True when this is a terminating-but-serving fallback.
    pub terminating: bool,
}

/// The data plane rule for one service port (by name and protocol) across all of the
/// service's groups: ready endpoints only; when none is ready, the serving ones that
/// are terminating (so connections drain instead of failing during a rollout).
pub fn backends(groups: &[EndpointGroup], port_name: &str, protocol: Protocol) -> Vec<Backend> {
    let candidates: Vec<(&Endpoint, u16)> = groups
        .iter()
        .filter_map(|g| {
            g.ports
                .iter()
                .find(|p| p.name == port_name && p.protocol == protocol)
                .map(|p| (g, p.port))
        })
        .flat_map(|(g, port)| g.endpoints.iter().map(move |e| (e, port)))
        .collect();
    let ready: Vec<&(&Endpoint, u16)> = candidates
        .iter()
        .filter(|(e, _)| e.conditions.ready)
        .collect();
    let chosen = if ready.is_empty() {
        candidates
            .iter()
            .filter(|(e, _)| e.conditions.serving && e.conditions.terminating)
            .collect()
    } else {
        ready
    };
    let mut out: Vec<Backend> = chosen
        .into_iter()
        .map(|(e, port)| Backend {
            address: e.address,
            port: *port,
            node_name: e.node_name.clone(),
            terminating: e.conditions.terminating,
        })
        .collect();
    out.sort();
    out.dedup_by(|a, b| a.address == b.address && a.port == b.port);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse;
    use crate::object::Object;

    fn service(extra_spec: &str) -> Service {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default, uid: svc-uid}}\nspec:\n  selector: {{app: web}}\n  ports:\n  - {{name: http, port: 80, targetPort: http}}\n  - {{name: metrics, port: 9090, targetPort: 9100}}\n{extra_spec}"
        );
        let Object::Service(s) = parse(&yaml).unwrap().remove(0) else {
            panic!()
        };
        *s
    }

    /// A pod with `ip`, Ready as given, whose `http` port is `http_port`.
    fn pod(name: &str, ip: &str, ready: bool, http_port: i32) -> Pod {
        let yaml = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: web}}}}\nspec:\n  nodeName: node-a\n  containers:\n  - name: c\n    ports: [{{name: http, containerPort: {http_port}}}]\nstatus:\n  phase: Running\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"{}\"}}]\n",
            if ready { "True" } else { "False" }
        );
        let Object::Pod(p) = parse(&yaml).unwrap().remove(0) else {
            panic!()
        };
        *p
    }

    fn terminating(mut p: Pod) -> Pod {
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        p
    }

    #[test]
    fn only_selected_pods_with_ips_and_not_terminal() {
        let svc = service("");
        let mut other = pod("other", "10.0.0.9", true, 8080);
        other.metadata.labels = Some([("app".to_string(), "db".to_string())].into());
        let mut no_ip = pod("noip", "10.0.0.8", true, 8080);
        no_ip.status.as_mut().unwrap().pod_ip = None;
        let mut done = pod("done", "10.0.0.7", false, 8080);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut elsewhere = pod("elsewhere", "10.0.0.6", true, 8080);
        elsewhere.metadata.namespace = Some("prod".into());
        let pods = [
            pod("a", "10.0.0.1", true, 8080),
            other,
            no_ip,
            done,
            elsewhere,
        ];
        let groups = compute(&svc, &pods);
        assert_eq!(groups.len(), 1);
        let addrs: Vec<String> = groups[0]
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(addrs, ["10.0.0.1"]);
        let e = &groups[0].endpoints[0];
        assert_eq!(e.node_name.as_deref(), Some("node-a"));
        assert_eq!(e.target.as_ref().unwrap().name, "a");
    }

    #[test]
    fn conditions_follow_the_controller() {
        let svc = service("");
        let pods = [
            pod("a", "10.0.0.1", true, 8080),
            pod("b", "10.0.0.2", false, 8080),
            terminating(pod("c", "10.0.0.3", true, 8080)),
        ];
        let eps = &compute(&svc, &pods)[0].endpoints;
        assert_eq!(
            eps[0].conditions,
            Conditions {
                ready: true,
                serving: true,
                terminating: false
            }
        );
        assert_eq!(
            eps[1].conditions,
            Conditions {
                ready: false,
                serving: false,
                terminating: false
            }
        );
        assert_eq!(
            eps[2].conditions,
            Conditions {
                ready: false,
                serving: true,
                terminating: true
            }
        );
        let publish = service("  publishNotReadyAddresses: true\n");
        let eps = &compute(&publish, &pods)[0].endpoints;
        assert!(eps.iter().all(|e| e.conditions.ready));
        assert!(!eps[1].conditions.serving);
    }

    #[test]
    fn named_target_ports_resolve_per_pod_and_group() {
        let svc = service("");
        let pods = [
            pod("a", "10.0.0.1", true, 8080),
            pod("b", "10.0.0.2", true, 8081),
            pod("c", "10.0.0.3", true, 8080),
        ];
        let groups = compute(&svc, &pods);
        assert_eq!(groups.len(), 2);
        let http = |g: &EndpointGroup| g.ports.iter().find(|p| p.name == "http").unwrap().port;
        assert_eq!(http(&groups[0]), 8080);
        assert_eq!(groups[0].endpoints.len(), 2);
        assert_eq!(http(&groups[1]), 8081);
        assert!(groups.iter().all(|g| {
            g.ports
                .iter()
                .any(|p| p.name == "metrics" && p.port == 9100)
        }));
        // A pod without the named port still serves the numeric one.
        let mut unnamed = pod("d", "10.0.0.4", true, 8080);
        unnamed.spec.as_mut().unwrap().containers[0].ports = None;
        let groups = compute(&svc, std::slice::from_ref(&unnamed));
        assert_eq!(
            groups[0]
                .ports
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["metrics"]
        );
    }

    #[test]
    fn hostname_only_when_subdomain_matches_service() {
        let svc = service("");
        let mut p = pod("a", "10.0.0.1", true, 8080);
        p.spec.as_mut().unwrap().hostname = Some("web-0".into());
        assert_eq!(
            compute(&svc, std::slice::from_ref(&p))[0].endpoints[0].hostname,
            None
        );
        p.spec.as_mut().unwrap().subdomain = Some("web".into());
        assert_eq!(
            compute(&svc, std::slice::from_ref(&p))[0].endpoints[0]
                .hostname
                .as_deref(),
            Some("web-0")
        );
    }

    #[test]
    fn selectorless_and_external_name_services_are_not_managed() {
        let mut svc = service("");
        svc.spec.as_mut().unwrap().selector = None;
        assert!(compute(&svc, &[pod("a", "10.0.0.1", true, 8080)]).is_empty());
        let mut ext = service("");
        ext.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
        assert!(compute(&ext, &[pod("a", "10.0.0.1", true, 8080)]).is_empty());
    }

    #[test]
    fn dataplane_uses_ready_then_terminating_serving() {
        let svc = service("");
        let ready_and_terminating = [
            pod("a", "10.0.0.1", true, 8080),
            terminating(pod("b", "10.0.0.2", true, 8080)),
        ];
        let b = backends(
            &compute(&svc, &ready_and_terminating),
            "http",
            Protocol::Tcp,
        );
        assert_eq!(
            b.iter().map(|b| b.address.to_string()).collect::<Vec<_>>(),
            ["10.0.0.1"]
        );
        let only_terminating = [
            terminating(pod("b", "10.0.0.2", true, 8080)),
            terminating(pod("c", "10.0.0.3", false, 8080)),
            pod("d", "10.0.0.4", false, 8080),
        ];
        let b = backends(&compute(&svc, &only_terminating), "http", Protocol::Tcp);
        assert_eq!(b.len(), 1);
        assert_eq!(
            (b[0].address.to_string(), b[0].port, b[0].terminating),
            ("10.0.0.2".to_string(), 8080, true)
        );
        assert!(backends(&compute(&svc, &only_terminating), "http", Protocol::Udp).is_empty());
    }

    #[test]
    fn slices_round_trip_and_chunk() {
        let mut svc = service("");
        svc.spec
            .as_mut()
            .unwrap()
            .ports
            .as_mut()
            .unwrap()
            .truncate(1);
        let pods: Vec<Pod> = (0..250)
            .map(|i| {
                pod(
                    &format!("p{i}"),
                    &format!("10.0.{}.{}", i / 200, i % 200 + 1),
                    i % 2 == 0,
                    8080,
                )
            })
            .collect();
        let groups = compute(&svc, &pods);
        let slices = to_endpoint_slices(&svc, &groups);
        assert_eq!(slices.len(), 3);
        assert_eq!(slice_service_name(&slices[0]), Some("web"));
        assert_eq!(
            slices[0].metadata.owner_references.as_ref().unwrap()[0].uid,
            "svc-uid"
        );
        let back: Vec<Endpoint> = slices
            .iter()
            .flat_map(|s| from_endpoint_slice(s).unwrap().endpoints)
            .collect();
        assert_eq!(back, groups[0].endpoints);
        // And the slices pass the store's own validation.
        for s in slices {
            let mut o = Object::from(s);
            crate::validation::default_and_validate(&mut o).unwrap();
        }
    }

    #[test]
    fn user_slices_default_missing_conditions() {
        let Object::EndpointSlice(s) = parse("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: ext-1, labels: {kubernetes.io/service-name: ext}}\naddressType: IPv4\nendpoints:\n- addresses: [192.0.2.1]\n- addresses: [192.0.2.2]\n  conditions: {ready: false}\nports:\n- {name: http, port: 80}\n").unwrap().remove(0) else { panic!() };
        let g = from_endpoint_slice(&s).unwrap();
        assert_eq!(
            g.endpoints[0].conditions,
            Conditions {
                ready: true,
                serving: true,
                terminating: false
            }
        );
        assert!(!g.endpoints[1].conditions.ready);
        assert_eq!(backends(&[g], "http", Protocol::Tcp).len(), 1);
    }
}
