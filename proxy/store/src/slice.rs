//! The EndpointSlice as the store keeps it: field for field the
//! `discovery.k8s.io/v1` object (same JSON, same names, converted to and from
//! k8s-openapi's type at the edges), with each endpoint's rarely set parts
//! boxed. k8s-openapi's `Endpoint` is about 350 bytes inline, most of it an
//! `ObjectReference` and topology hints that selector-less slices seldom
//! carry; at 100,000 endpoints that alone was 35 MiB of the agent's memory.
//! This one is about 130 bytes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::discovery::v1 as k8s;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

pub use k8s::{EndpointConditions, EndpointHints, EndpointPort};

/// A set of endpoints of one service (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "k8s::EndpointSlice", into = "k8s::EndpointSlice")]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    pub address_type: String,
    pub endpoints: Option<Vec<Endpoint>>,
    pub ports: Option<Vec<EndpointPort>>,
}

/// One endpoint of a slice; the fields of `discovery.k8s.io/v1` `Endpoint`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Endpoint {
    pub addresses: Vec<String>,
    pub conditions: Option<EndpointConditions>,
    pub deprecated_topology: Option<Box<BTreeMap<String, String>>>,
    pub hints: Option<Box<EndpointHints>>,
    pub hostname: Option<String>,
    pub node_name: Option<String>,
    pub target_ref: Option<Box<ObjectReference>>,
    pub zone: Option<String>,
}

impl k8s_openapi::Resource for EndpointSlice {
    const API_VERSION: &'static str = <k8s::EndpointSlice as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <k8s::EndpointSlice as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <k8s::EndpointSlice as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <k8s::EndpointSlice as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str =
        <k8s::EndpointSlice as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for EndpointSlice {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl From<k8s::EndpointSlice> for EndpointSlice {
    fn from(slice: k8s::EndpointSlice) -> Self {
        EndpointSlice {
            metadata: slice.metadata,
            address_type: slice.address_type,
            endpoints: slice.endpoints.map(|endpoints| {
                // Not `collect()`: it would reuse the larger k8s buffer in
                // place and keep all of its capacity.
                let mut compact = Vec::with_capacity(endpoints.len());
                compact.extend(endpoints.into_iter().map(Endpoint::from));
                compact
            }),
            ports: slice.ports,
        }
    }
}

impl From<EndpointSlice> for k8s::EndpointSlice {
    fn from(slice: EndpointSlice) -> Self {
        k8s::EndpointSlice {
            metadata: slice.metadata,
            address_type: slice.address_type,
            endpoints: slice
                .endpoints
                .map(|endpoints| endpoints.into_iter().map(k8s::Endpoint::from).collect()),
            ports: slice.ports,
        }
    }
}

impl From<k8s::Endpoint> for Endpoint {
    fn from(e: k8s::Endpoint) -> Self {
        Endpoint {
            addresses: e.addresses,
            conditions: e.conditions,
            deprecated_topology: e.deprecated_topology.map(Box::new),
            hints: e.hints.map(Box::new),
            hostname: e.hostname,
            node_name: e.node_name,
            target_ref: e.target_ref.map(Box::new),
            zone: e.zone,
        }
    }
}

impl From<Endpoint> for k8s::Endpoint {
    fn from(e: Endpoint) -> Self {
        k8s::Endpoint {
            addresses: e.addresses,
            conditions: e.conditions,
            deprecated_topology: e.deprecated_topology.map(|t| *t),
            hints: e.hints.map(|h| *h),
            hostname: e.hostname,
            node_name: e.node_name,
            target_ref: e.target_ref.map(|t| *t),
            zone: e.zone,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_json_as_kubernetes_and_smaller() {
        let json = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true},
                 "hostname": "a", "nodeName": "n1", "zone": "z",
                 "targetRef": {"kind": "Pod", "name": "web-a", "namespace": "default"},
                 "hints": {"forZones": [{"name": "z"}]},
                 "deprecatedTopology": {"k": "v"}},
                {"addresses": ["10.0.0.2"]},
            ],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        });
        let slice: EndpointSlice = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(serde_json::to_value(&slice).unwrap(), json);
        let k8s_slice: k8s::EndpointSlice = serde_json::from_value(json).unwrap();
        assert_eq!(k8s::EndpointSlice::from(slice.clone()), k8s_slice);
        let compact = EndpointSlice::from(k8s_slice);
        assert_eq!(compact, slice);
        assert_eq!(compact.endpoints.unwrap().capacity(), 2);
        assert!(
            std::mem::size_of::<Endpoint>() * 2 < std::mem::size_of::<k8s::Endpoint>(),
            "{} vs {} bytes",
            std::mem::size_of::<Endpoint>(),
            std::mem::size_of::<k8s::Endpoint>()
        );
    }
}
