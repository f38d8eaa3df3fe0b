//! The plain data the agent hands the DNS server: services, their endpoints and pods.
//!
//! These types are deliberately independent of k8s-openapi so that `vipr-dns` knows
//! nothing about the Kubernetes object model; the agent converts its store objects into
//! a [`ClusterSnapshot`] and calls [`crate::DnsHandle::update`].

use std::net::IpAddr;

/// Everything the DNS server answers from. Each update replaces the whole snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterSnapshot {
    /// Namespaces that exist (services and pods add their namespace implicitly);
    /// `<ns>.svc.<zone>` answers NODATA instead of NXDOMAIN for these.
    pub namespaces: Vec<String>,
    /// All services, with their endpoints.
    pub services: Vec<Service>,
    /// Pods that exist, for `a-b-c-d.<ns>.pod.<zone>` ("pods verified") and for
    /// `<hostname>.<subdomain>.<ns>.svc.<zone>`.
    pub pods: Vec<Pod>,
}

/// One Kubernetes Service and the endpoints that back it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub kind: ServiceKind,
    /// Named ports; unnamed ports get no SRV record (as in the DNS spec).
    pub ports: Vec<ServicePort>,
    /// Endpoints of the service (from its EndpointSlices), ready or not.
    pub endpoints: Vec<Endpoint>,
    /// `spec.publishNotReadyAddresses`: serve not-ready endpoints too.
    pub publish_not_ready_addresses: bool,
}

/// How a service name resolves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    /// A virtual IP per family (`spec.clusterIPs`); NodePort and LoadBalancer are this too.
    ClusterIp { ips: Vec<IpAddr> },
    /// `clusterIP: None`: the name resolves to the endpoints themselves.
    Headless,
    /// `type: ExternalName`: a CNAME to `external_name`.
    ExternalName { external_name: String },
}

/// Transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The `_proto` label used in SRV names.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Tcp => "_tcp",
            Protocol::Udp => "_udp",
            Protocol::Sctp => "_sctp",
        }
    }
}

/// A service port. For headless services `port` should be the endpoint (target) port,
/// since SRV records then point at the endpoints directly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// One endpoint address of a service (EndpointSlice-shaped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// `hostname` of the endpoint (set from the pod's hostname when its subdomain
    /// matches the service); otherwise the endpoint is named by its dashed IP.
    pub hostname: Option<String>,
    pub node_name: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// A pod that exists, with its IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub ip: IpAddr,
    pub hostname: Option<String>,
    pub subdomain: Option<String>,
}

impl Endpoint {
    /// A ready, serving endpoint with no hostname: the common case.
    pub fn ready(ip: IpAddr) -> Self {
        Endpoint {
            ip,
            hostname: None,
            node_name: None,
            ready: true,
            serving: true,
            terminating: false,
        }
    }
}
