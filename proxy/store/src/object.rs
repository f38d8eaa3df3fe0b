//! The typed object model: which kinds the store holds ([`Kind`]), how an object is
//! addressed ([`ObjectKey`]), the [`Object`] sum type over the k8s-openapi types, and the
//! split between an object's desired state ("spec") and its [`Status`].
//!
//! Everything kind-specific that is a pure property of the type (scope, names, API
//! version, what counts as spec) lives here so the rest of the crate can stay generic.

use std::fmt;
use std::str::FromStr;

use k8s_openapi::Metadata;
use k8s_openapi::Resource;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus, ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, NamespaceStatus, Pod, PodStatus, Secret, Service, ServiceStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::slice::EndpointSlice;

/// Declares the supported kinds once; every per-kind `match` below is generated from it
/// so adding a kind cannot forget one of them.
macro_rules! kinds {
    ($( $variant:ident: $ty:ty, singular $singular:literal, plural $plural:literal,
        aliases [$($alias:literal),*], namespaced $namespaced:literal; )*) => {
        /// A kind of object the store holds.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Kind { $($variant),* }

        impl Kind {
            /// Every supported kind, namespaces first (the order a batch is committed in).
            pub const ALL: &'static [Kind] = &[$(Kind::$variant),*];

            /// The `kind` field of a manifest (`Service`).
            pub fn as_str(self) -> &'static str {
                match self { $(Kind::$variant => <$ty as Resource>::KIND),* }
            }
            /// The `apiVersion` field of a manifest (`apps/v1`).
            pub fn api_version(self) -> &'static str {
                match self { $(Kind::$variant => <$ty as Resource>::API_VERSION),* }
            }
            /// kubectl's lower-case singular name, used in messages (`service/default/web`).
            pub fn singular(self) -> &'static str {
                match self { $(Kind::$variant => $singular),* }
            }
            /// The resource's plural name (`services`), also the persisted key prefix.
            pub fn plural(self) -> &'static str {
                match self { $(Kind::$variant => $plural),* }
            }
            /// Whether objects of this kind live in a namespace.
            pub fn is_namespaced(self) -> bool {
                match self { $(Kind::$variant => $namespaced),* }
            }
            /// Looks up a manifest's `apiVersion` + `kind`.
            pub fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
                $(if api_version == <$ty as Resource>::API_VERSION && kind == <$ty as Resource>::KIND {
                    return Some(Kind::$variant);
                })*
                None
            }
            /// Accepts the names kubectl accepts on its command line: singular, plural,
            /// short names, `Kind` and `plural.group`.
            pub fn from_cli_name(name: &str) -> Option<Kind> {
                let lower = name.to_ascii_lowercase();
                $(
                    let group = <$ty as Resource>::GROUP;
                    if lower == $singular || lower == $plural || lower == <$ty as Resource>::KIND.to_ascii_lowercase()
                        $(|| lower == $alias)*
                        || (!group.is_empty() && (lower == format!("{}.{}", $plural, group) || lower == format!("{}.{}", $singular, group)))
                    {
                        return Some(Kind::$variant);
                    }
                )*
                None
            }
        }

        /// One object of a supported kind, as k8s-openapi types it. Boxed: the
        /// types differ tenfold in size (a Pod's spec and status are kilobytes
        /// inline, an EndpointSlice's a few hundred bytes), and an unboxed enum
        /// would give every stored object the largest one's size.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Object { $($variant(Box<$ty>)),* }

        impl Object {
            /// The object's kind.
            pub fn kind(&self) -> Kind {
                match self { $(Object::$variant(_) => Kind::$variant),* }
            }
            /// The object's metadata.
            pub fn metadata(&self) -> &ObjectMeta {
                match self { $(Object::$variant(o) => o.metadata()),* }
            }
            /// The object's metadata, mutably.
            pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
                match self { $(Object::$variant(o) => o.metadata_mut()),* }
            }
            /// Serializes to the JSON a Kubernetes API server would return (with
            /// `apiVersion` and `kind`).
            pub fn to_json_value(&self) -> serde_json::Value {
                // Serializing these types to a Value cannot fail: they contain only
                // strings, numbers, maps with string keys and sequences.
                match self { $(Object::$variant(o) => serde_json::to_value(o).expect("k8s object serializes")),* }
            }
            /// Serializes to JSON bytes.
            pub fn to_json_bytes(&self) -> Vec<u8> {
                match self { $(Object::$variant(o) => serde_json::to_vec(o).expect("k8s object serializes")),* }
            }
            /// Decodes JSON bytes of a known kind (the persisted form).
            pub fn from_json_bytes(kind: Kind, bytes: &[u8]) -> Result<Object, serde_json::Error> {
                Ok(match kind { $(Kind::$variant => Object::$variant(Box::new(serde_json::from_slice(bytes)?))),* })
            }
            /// Whether the desired state (everything but metadata and status) equals
            /// `other`'s; a difference bumps `metadata.generation`.
            pub fn spec_eq(&self, other: &Object) -> bool {
                match (self, other) {
                    $((Object::$variant(a), Object::$variant(b)) => HasSpec::spec_eq(&**a, &**b),)*
                    _ => false,
                }
            }
            /// Removes and returns the status (the store keeps status apart from spec).
            pub fn take_status(&mut self) -> Option<Status> {
                match self { $(Object::$variant(o) => HasSpec::take_status(&mut **o)),* }
            }
        }

        /// Serializes as the Kubernetes JSON/YAML of the object (with apiVersion and kind),
        /// so API responses can stream objects without an intermediate `Value`.
        impl serde::Serialize for Object {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                match self { $(Object::$variant(o) => o.serialize(serializer)),* }
            }
        }

        $(impl From<$ty> for Object {
            fn from(o: $ty) -> Object { Object::$variant(Box::new(o)) }
        })*
    };
}

kinds! {
    Namespace: Namespace, singular "namespace", plural "namespaces", aliases ["ns"], namespaced false;
    Pod: Pod, singular "pod", plural "pods", aliases ["po"], namespaced true;
    Deployment: Deployment, singular "deployment", plural "deployments", aliases ["deploy"], namespaced true;
    ReplicaSet: ReplicaSet, singular "replicaset", plural "replicasets", aliases ["rs"], namespaced true;
    Service: Service, singular "service", plural "services", aliases ["svc"], namespaced true;
    EndpointSlice: EndpointSlice, singular "endpointslice", plural "endpointslices", aliases ["ep", "endpoints", "eps"], namespaced true;
    ConfigMap: ConfigMap, singular "configmap", plural "configmaps", aliases ["cm"], namespaced true;
    Secret: Secret, singular "secret", plural "secrets", aliases [], namespaced true;
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error of [`Kind::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown resource type {0:?}")]
pub struct UnknownKind(pub String);

impl FromStr for Kind {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Kind, UnknownKind> {
        Kind::from_cli_name(s).ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

/// The address of one object. A cluster-scoped kind has no namespace, a namespaced one
/// always has one: [`ObjectKey::new`] enforces that, so a key is never half-formed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    kind: Kind,
    namespace: Option<String>,
    name: String,
}

impl ObjectKey {
    /// A key; `namespace` is dropped for cluster-scoped kinds and defaults to `default`
    /// for namespaced ones (what kubectl does without `-n`).
    pub fn new(kind: Kind, namespace: Option<&str>, name: impl Into<String>) -> ObjectKey {
        let namespace = kind
            .is_namespaced()
            .then(|| namespace.unwrap_or(crate::DEFAULT_NAMESPACE).to_owned());
        ObjectKey {
            kind,
            namespace,
            name: name.into(),
        }
    }
    /// A namespaced key.
    pub fn namespaced(kind: Kind, namespace: &str, name: impl Into<String>) -> ObjectKey {
        ObjectKey::new(kind, Some(namespace), name)
    }
    /// The key of a Namespace object.
    pub fn namespace_object(name: impl Into<String>) -> ObjectKey {
        ObjectKey::new(Kind::Namespace, None, name)
    }
    /// The key of an object, from its kind and metadata (namespace defaulted).
    pub fn of(object: &Object) -> ObjectKey {
        let meta = object.metadata();
        ObjectKey::new(
            object.kind(),
            meta.namespace.as_deref(),
            meta.name.clone().unwrap_or_default(),
        )
    }
    pub fn kind(&self) -> Kind {
        self.kind
    }
    /// `None` exactly for cluster-scoped kinds.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The persisted form: `plural/namespace/name` or `plural//name`.
    pub(crate) fn storage_key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.kind.plural(),
            self.namespace.as_deref().unwrap_or(""),
            self.name
        )
    }
    /// The smallest key of `kind` (in `namespace`), where a range scan starts.
    pub(crate) fn range_start(kind: Kind, namespace: Option<&str>) -> ObjectKey {
        ObjectKey {
            kind,
            namespace: namespace.map(str::to_owned),
            name: String::new(),
        }
    }
    pub(crate) fn from_storage_key(s: &str) -> Option<ObjectKey> {
        let mut parts = s.splitn(3, '/');
        let plural = parts.next()?;
        let namespace = parts.next()?;
        let name = parts.next()?;
        let kind = Kind::ALL.iter().copied().find(|k| k.plural() == plural)?;
        Some(ObjectKey::new(
            kind,
            (!namespace.is_empty()).then_some(namespace),
            name,
        ))
    }
}

impl fmt::Display for ObjectKey {
    /// `service/default/web`, `namespace/prod`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}/{}/{}", self.kind.singular(), ns, self.name),
            None => write!(f, "{}/{}", self.kind.singular(), self.name),
        }
    }
}

/// The status part of an object, written by the runtime and controllers through
/// [`crate::Store::update_status`]; kinds without a status have no variant, so a status
/// update for them cannot be expressed.
#[derive(Debug, Clone, PartialEq)]
// A Status is built once per update and moved straight into the stored object; boxing
// the large pod status would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Status {
    Namespace(NamespaceStatus),
    Pod(PodStatus),
    Deployment(DeploymentStatus),
    ReplicaSet(ReplicaSetStatus),
    Service(ServiceStatus),
}

impl Status {
    /// The kind this status belongs to.
    pub fn kind(&self) -> Kind {
        match self {
            Status::Namespace(_) => Kind::Namespace,
            Status::Pod(_) => Kind::Pod,
            Status::Deployment(_) => Kind::Deployment,
            Status::ReplicaSet(_) => Kind::ReplicaSet,
            Status::Service(_) => Kind::Service,
        }
    }
}

impl Object {
    /// Puts a status back; `None` clears it. A status of another kind is ignored
    /// (callers check [`Status::kind`] first).
    pub(crate) fn set_status(&mut self, status: Option<Status>) {
        match (self, status) {
            (Object::Namespace(o), Some(Status::Namespace(s))) => o.status = Some(s),
            (Object::Pod(o), Some(Status::Pod(s))) => o.status = Some(s),
            (Object::Deployment(o), Some(Status::Deployment(s))) => o.status = Some(s),
            (Object::ReplicaSet(o), Some(Status::ReplicaSet(s))) => o.status = Some(s),
            (Object::Service(o), Some(Status::Service(s))) => o.status = Some(s),
            (object, None) => {
                object.take_status();
            }
            _ => {}
        }
    }

    /// The object's key.
    pub fn key(&self) -> ObjectKey {
        ObjectKey::of(self)
    }

    /// The store-wide revision this object was last written at (0 if never stored).
    pub fn resource_version(&self) -> u64 {
        self.metadata()
            .resource_version
            .as_deref()
            .and_then(|rv| rv.parse().ok())
            .unwrap_or(0)
    }

    pub fn as_pod(&self) -> Option<&Pod> {
        match self {
            Object::Pod(p) => Some(p),
            _ => None,
        }
    }
    pub fn as_service(&self) -> Option<&Service> {
        match self {
            Object::Service(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_endpoint_slice(&self) -> Option<&EndpointSlice> {
        match self {
            Object::EndpointSlice(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_deployment(&self) -> Option<&Deployment> {
        match self {
            Object::Deployment(d) => Some(d),
            _ => None,
        }
    }
}

/// What part of a type is its desired state; implemented per kind because the
/// k8s-openapi types differ in shape (ConfigMap has `data`, Service has `spec`...).
trait HasSpec {
    fn spec_eq(&self, other: &Self) -> bool;
    fn take_status(&mut self) -> Option<Status>;
}

macro_rules! spec_status {
    ($ty:ty, $status:ident) => {
        impl HasSpec for $ty {
            fn spec_eq(&self, other: &Self) -> bool {
                self.spec == other.spec
            }
            fn take_status(&mut self) -> Option<Status> {
                self.status.take().map(Status::$status)
            }
        }
    };
}
spec_status!(Namespace, Namespace);
spec_status!(Pod, Pod);
spec_status!(Deployment, Deployment);
spec_status!(ReplicaSet, ReplicaSet);
spec_status!(Service, Service);

impl HasSpec for EndpointSlice {
    fn spec_eq(&self, other: &Self) -> bool {
        self.address_type == other.address_type
            && self.endpoints == other.endpoints
            && self.ports == other.ports
    }
    fn take_status(&mut self) -> Option<Status> {
        None
    }
}

impl HasSpec for ConfigMap {
    fn spec_eq(&self, other: &Self) -> bool {
        self.data == other.data
            && self.binary_data == other.binary_data
            && self.immutable == other.immutable
    }
    fn take_status(&mut self) -> Option<Status> {
        None
    }
}

impl HasSpec for Secret {
    fn spec_eq(&self, other: &Self) -> bool {
        self.data == other.data
            && self.string_data == other.string_data
            && self.type_ == other.type_
            && self.immutable == other.immutable
    }
    fn take_status(&mut self) -> Option<Status> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_names_resolve_like_kubectl() {
        assert_eq!(Kind::from_cli_name("svc"), Some(Kind::Service));
        assert_eq!(Kind::from_cli_name("po"), Some(Kind::Pod));
        assert_eq!(Kind::from_cli_name("deploy"), Some(Kind::Deployment));
        assert_eq!(
            Kind::from_cli_name("deployments.apps"),
            Some(Kind::Deployment)
        );
        assert_eq!(Kind::from_cli_name("cm"), Some(Kind::ConfigMap));
        assert_eq!(Kind::from_cli_name("ep"), Some(Kind::EndpointSlice));
        assert_eq!(Kind::from_cli_name("Secret"), Some(Kind::Secret));
        assert_eq!(Kind::from_cli_name("ns"), Some(Kind::Namespace));
        assert!("nope".parse::<Kind>().is_err());
    }

    #[test]
    fn keys_display_and_round_trip_through_storage_form() {
        let k = ObjectKey::new(Kind::Service, None, "web");
        assert_eq!(k.to_string(), "service/default/web");
        assert_eq!(ObjectKey::from_storage_key(&k.storage_key()), Some(k));
        let ns = ObjectKey::new(Kind::Namespace, Some("ignored"), "prod");
        assert_eq!(ns.to_string(), "namespace/prod");
        assert_eq!(ObjectKey::from_storage_key(&ns.storage_key()), Some(ns));
    }

    #[test]
    fn type_lookup_uses_api_version_and_kind() {
        assert_eq!(
            Kind::from_type("apps/v1", "Deployment"),
            Some(Kind::Deployment)
        );
        assert_eq!(Kind::from_type("v1", "Deployment"), None);
        assert_eq!(
            Kind::from_type("discovery.k8s.io/v1", "EndpointSlice"),
            Some(Kind::EndpointSlice)
        );
    }
}
