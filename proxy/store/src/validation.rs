//! Defaulting and validation of single objects, the way the API server does it before
//! anything is stored: name and label syntax, port ranges and protocols, selectors,
//! per-kind required fields, and the immutable fields of an update.
//!
//! Everything here is pure (no store access): checks that need the rest of the store
//! (namespace existence, IP/port allocation) live in [`crate::store`] and
//! [`crate::alloc`].

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentStrategy, ReplicaSet, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, Pod, PodSpec, PodTemplateSpec, Secret, Service, ServicePort,
    ServiceSpec,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use crate::names;
use crate::object::{Kind, Object};

/// One invalid field: `spec.ports[0].port: Invalid value: 0: must be between 1 and 65535`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

pub(crate) type Checked = Result<(), FieldError>;

/// A field path, given either ready-made or as a closure that formats it; the closure
/// form keeps the success path of hot loops (endpoints, ports) free of allocations.
pub(crate) trait IntoField {
    fn into_field(self) -> String;
}
impl IntoField for String {
    fn into_field(self) -> String {
        self
    }
}
impl IntoField for &str {
    fn into_field(self) -> String {
        self.to_owned()
    }
}
impl IntoField for &String {
    fn into_field(self) -> String {
        self.clone()
    }
}
impl<F: FnOnce() -> String> IntoField for F {
    fn into_field(self) -> String {
        self()
    }
}

pub(crate) fn invalid(
    field: impl IntoField,
    value: impl fmt::Debug,
    why: impl fmt::Display,
) -> FieldError {
    FieldError {
        field: field.into_field(),
        message: format!("Invalid value: {value:?}: {why}"),
    }
}
pub(crate) fn required(field: impl IntoField) -> FieldError {
    FieldError {
        field: field.into_field(),
        message: "Required value".into(),
    }
}
pub(crate) fn duplicate(field: impl IntoField, value: impl fmt::Debug) -> FieldError {
    FieldError {
        field: field.into_field(),
        message: format!("Duplicate value: {value:?}"),
    }
}
pub(crate) fn forbidden(field: impl IntoField, why: impl fmt::Display) -> FieldError {
    FieldError {
        field: field.into_field(),
        message: format!("Forbidden: {why}"),
    }
}
pub(crate) fn immutable(field: impl IntoField) -> FieldError {
    FieldError {
        field: field.into_field(),
        message: "field is immutable".into(),
    }
}
fn unsupported(field: impl IntoField, value: &str, allowed: &[&str]) -> FieldError {
    let allowed: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
    FieldError {
        field: field.into_field(),
        message: format!(
            "Unsupported value: {value:?}: supported values: {}",
            allowed.join(", ")
        ),
    }
}

fn one_of(field: impl IntoField, value: &str, allowed: &[&str]) -> Checked {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(unsupported(field, value, allowed))
    }
}

fn syntax(field: impl IntoField, value: &str, rule: fn(&str) -> Result<(), String>) -> Checked {
    rule(value).map_err(|why| invalid(field, value, why))
}

const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP"];

/// Defaults the protocol to TCP and checks it.
fn default_protocol(field: impl IntoField, protocol: &mut Option<String>) -> Checked {
    one_of(
        field,
        protocol.get_or_insert_with(|| "TCP".into()),
        PROTOCOLS,
    )
}

fn port_number(field: impl IntoField, port: i32) -> Checked {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(invalid(
            field,
            port,
            "must be between 1 and 65535, inclusive",
        ))
    }
}

/// Defaults, then validates one object on its own (create and update alike).
pub fn default_and_validate(object: &mut Object) -> Checked {
    validate_meta(object.kind(), object.metadata())?;
    match object {
        Object::Namespace(o) => namespace(o),
        Object::Pod(o) => pod(o),
        Object::Deployment(o) => deployment(o),
        Object::ReplicaSet(o) => replica_set(o),
        Object::Service(o) => service(o),
        Object::EndpointSlice(o) => endpoint_slice(o),
        Object::ConfigMap(o) => config_map(o),
        Object::Secret(o) => secret(o),
    }
}

/// The name rule each kind's API uses.
fn name_rule(kind: Kind) -> fn(&str) -> Result<(), String> {
    match kind {
        Kind::Namespace => names::dns1123_label,
        Kind::Service => names::dns1035_label,
        _ => names::dns1123_subdomain,
    }
}

fn validate_meta(kind: Kind, meta: &ObjectMeta) -> Checked {
    let name = meta.name.as_deref().unwrap_or("");
    if name.is_empty() {
        return Err(required("metadata.name"));
    }
    syntax("metadata.name", name, name_rule(kind))?;
    if let Some(ns) = meta.namespace.as_deref().filter(|_| kind.is_namespaced()) {
        syntax("metadata.namespace", ns, names::dns1123_label)?;
    }
    labels("metadata.labels", meta.labels.as_ref())?;
    for key in meta.annotations.iter().flatten().map(|(k, _)| k) {
        syntax(
            format!("metadata.annotations[{key}]"),
            key,
            names::qualified_name,
        )?;
    }
    for (i, owner) in meta.owner_references.iter().flatten().enumerate() {
        let field = format!("metadata.ownerReferences[{i}]");
        for (what, value) in [
            ("apiVersion", &owner.api_version),
            ("kind", &owner.kind),
            ("name", &owner.name),
            ("uid", &owner.uid),
        ] {
            if value.is_empty() {
                return Err(required(format!("{field}.{what}")));
            }
        }
    }
    Ok(())
}

fn labels(field: &str, labels: Option<&BTreeMap<String, String>>) -> Checked {
    for (k, v) in labels.into_iter().flatten() {
        syntax(|| format!("{field}[{k}]"), k, names::qualified_name)?;
        syntax(|| format!("{field}[{k}]"), v, names::label_value)?;
    }
    Ok(())
}

fn namespace(_ns: &mut Namespace) -> Checked {
    // Nothing beyond the name: `spec.finalizers` are accepted as given.
    Ok(())
}

fn pod(pod: &mut Pod) -> Checked {
    backend_weight("metadata", &pod.metadata)?;
    let spec = pod.spec.as_mut().ok_or_else(|| required("spec"))?;
    pod_spec("spec", spec)
}

/// `vipr.io/weight` on a pod (or pod template): the backend's weight for
/// `wrr`, `sed`, `maglev` and the hashes.
fn backend_weight(field: &str, meta: &ObjectMeta) -> Checked {
    let Some(annotations) = meta.annotations.as_ref() else {
        return Ok(());
    };
    vipr_balancer::Weight::from_pod_annotations(annotations)
        .map(|_| ())
        .map_err(|e| FieldError {
            field: format!("{field}.annotations[{}]", vipr_balancer::WEIGHT_ANNOTATION),
            message: e.to_string(),
        })
}

/// The balancing annotations of a Service (`vipr.io/lb-algorithm`,
/// `vipr.io/maglev-table-size`) and its affinity, as the data plane will
/// read them: anything it could not program is refused here, at apply.
fn service_balancing(meta: &ObjectMeta, spec: &ServiceSpec) -> Checked {
    use vipr_balancer::{
        AFFINITY_TIMEOUT_FIELD, ALGORITHM_ANNOTATION, ConfigError, MAGLEV_TABLE_SIZE_ANNOTATION,
        NodeDefaults, SESSION_AFFINITY_FIELD, ServiceAffinitySpec, ServiceBalancing,
    };
    let empty = BTreeMap::new();
    let affinity = ServiceAffinitySpec {
        session_affinity: spec.session_affinity.as_deref(),
        timeout_seconds: spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map(i64::from),
    };
    let annotations = meta.annotations.as_ref().unwrap_or(&empty);
    ServiceBalancing::from_service(annotations, affinity, &NodeDefaults::default())
        .map(|_| ())
        .map_err(|e| {
            let field = match &e {
                ConfigError::Algorithm(_) => {
                    format!("metadata.annotations[{ALGORITHM_ANNOTATION}]")
                }
                ConfigError::MaglevTableSize(_) => {
                    format!("metadata.annotations[{MAGLEV_TABLE_SIZE_ANNOTATION}]")
                }
                ConfigError::SessionAffinity { .. } => SESSION_AFFINITY_FIELD.to_owned(),
                ConfigError::AffinityTimeout { .. } => AFFINITY_TIMEOUT_FIELD.to_owned(),
            };
            FieldError {
                field,
                message: e.to_string(),
            }
        })
}

/// Shared by Pod, and the pod templates of Deployment and ReplicaSet.
fn pod_spec(field: &str, spec: &mut PodSpec) -> Checked {
    if spec.containers.is_empty() {
        return Err(required(format!("{field}.containers")));
    }
    let restart = spec.restart_policy.get_or_insert_with(|| "Always".into());
    one_of(
        format!("{field}.restartPolicy"),
        restart,
        &["Always", "OnFailure", "Never"],
    )?;
    if let Some(h) = spec.hostname.as_deref() {
        syntax(format!("{field}.hostname"), h, names::dns1123_label)?;
    }
    if let Some(s) = spec.subdomain.as_deref() {
        syntax(format!("{field}.subdomain"), s, names::dns1123_label)?;
    }
    if let Some(g) = spec.termination_grace_period_seconds.filter(|g| *g < 0) {
        return Err(invalid(
            format!("{field}.terminationGracePeriodSeconds"),
            g,
            "must be greater than or equal to 0",
        ));
    }
    let volumes = volume_names(field, spec)?;
    let mut container_names = HashSet::new();
    let mut port_names = HashSet::new();
    let groups = [
        ("initContainers", spec.init_containers.as_mut()),
        ("containers", Some(&mut spec.containers)),
    ];
    for (group, containers) in groups {
        for (i, c) in containers.into_iter().flatten().enumerate() {
            let field = format!("{field}.{group}[{i}]");
            container(&field, c, &volumes, &mut port_names)?;
            if !container_names.insert(c.name.clone()) {
                return Err(duplicate(format!("{field}.name"), &c.name));
            }
        }
    }
    Ok(())
}

fn volume_names(field: &str, spec: &PodSpec) -> Result<HashSet<String>, FieldError> {
    let mut seen = HashSet::new();
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        let f = format!("{field}.volumes[{i}].name");
        syntax(&f, &v.name, names::dns1123_label)?;
        if !seen.insert(v.name.clone()) {
            return Err(duplicate(f, &v.name));
        }
    }
    Ok(seen)
}

fn container(
    field: &str,
    c: &mut Container,
    volumes: &HashSet<String>,
    port_names: &mut HashSet<String>,
) -> Checked {
    syntax(format!("{field}.name"), &c.name, names::dns1123_label)?;
    for (i, p) in c.ports.iter_mut().flatten().enumerate() {
        let f = format!("{field}.ports[{i}]");
        port_number(format!("{f}.containerPort"), p.container_port)?;
        if let Some(hp) = p.host_port.filter(|hp| !(0..=65535).contains(hp)) {
            return Err(invalid(
                format!("{f}.hostPort"),
                hp,
                "must be between 0 and 65535, inclusive",
            ));
        }
        default_protocol(format!("{f}.protocol"), &mut p.protocol)?;
        if let Some(name) = p.name.as_deref() {
            syntax(format!("{f}.name"), name, names::iana_svc_name)?;
            if !port_names.insert(name.to_owned()) {
                return Err(duplicate(format!("{f}.name"), name));
            }
        }
    }
    for (i, m) in c.volume_mounts.iter().flatten().enumerate() {
        if !volumes.contains(&m.name) {
            return Err(FieldError {
                field: format!("{field}.volumeMounts[{i}].name"),
                message: format!("Not found: {:?}", m.name),
            });
        }
    }
    Ok(())
}

fn selector(field: &str, sel: &LabelSelector) -> Checked {
    let empty = sel.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
        && sel.match_expressions.as_ref().is_none_or(Vec::is_empty);
    if empty {
        return Err(invalid(
            field,
            "{}",
            "empty selector is invalid for deployment",
        ));
    }
    labels(&format!("{field}.matchLabels"), sel.match_labels.as_ref())?;
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        syntax(format!("{f}.key"), &e.key, names::qualified_name)?;
        one_of(
            format!("{f}.operator"),
            &e.operator,
            &["In", "NotIn", "Exists", "DoesNotExist"],
        )?;
        let has_values = e.values.as_ref().is_some_and(|v| !v.is_empty());
        let wants_values = matches!(e.operator.as_str(), "In" | "NotIn");
        if has_values != wants_values {
            let why = if wants_values {
                "must be specified when `operator` is 'In' or 'NotIn'"
            } else {
                "may not be specified when `operator` is 'Exists' or 'DoesNotExist'"
            };
            return Err(forbidden(format!("{f}.values"), why));
        }
    }
    Ok(())
}

/// Whether a label selector matches a label set (matchLabels AND matchExpressions).
pub fn label_selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    labels_ok
        && sel.match_expressions.iter().flatten().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            match e.operator.as_str() {
                "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
                "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
                "Exists" => labels.contains_key(&e.key),
                "DoesNotExist" => !labels.contains_key(&e.key),
                _ => false,
            }
        })
}

/// Selector + template checks shared by Deployment and ReplicaSet.
fn workload(
    field: &str,
    sel: &LabelSelector,
    template: &mut PodTemplateSpec,
    replicas: &mut Option<i32>,
) -> Checked {
    selector(&format!("{field}.selector"), sel)?;
    let replicas = *replicas.get_or_insert(1);
    if replicas < 0 {
        return Err(invalid(
            format!("{field}.replicas"),
            replicas,
            "must be greater than or equal to 0",
        ));
    }
    let meta = template.metadata.get_or_insert_with(Default::default);
    labels(
        &format!("{field}.template.metadata.labels"),
        meta.labels.as_ref(),
    )?;
    backend_weight(&format!("{field}.template.metadata"), meta)?;
    let template_labels = meta.labels.clone().unwrap_or_default();
    if !label_selector_matches(sel, &template_labels) {
        return Err(invalid(
            format!("{field}.template.metadata.labels"),
            template_labels,
            "`selector` does not match template `labels`",
        ));
    }
    let spec = template
        .spec
        .as_mut()
        .ok_or_else(|| required(format!("{field}.template.spec")))?;
    pod_spec(&format!("{field}.template.spec"), spec)?;
    if spec.restart_policy.as_deref() != Some("Always") {
        return Err(unsupported(
            format!("{field}.template.spec.restartPolicy"),
            spec.restart_policy.as_deref().unwrap_or(""),
            &["Always"],
        ));
    }
    Ok(())
}

fn deployment(d: &mut Deployment) -> Checked {
    let spec = &mut d.spec;
    workload(
        "spec",
        &spec.selector,
        &mut spec.template,
        &mut spec.replicas,
    )?;
    let strategy = spec
        .strategy
        .get_or_insert_with(DeploymentStrategy::default);
    let kind = strategy.type_.get_or_insert_with(|| "RollingUpdate".into());
    one_of("spec.strategy.type", kind, &["RollingUpdate", "Recreate"])?;
    if kind == "RollingUpdate" {
        let ru = strategy
            .rolling_update
            .get_or_insert_with(RollingUpdateDeployment::default);
        let quarter = || IntOrString::String("25%".into());
        ru.max_surge.get_or_insert_with(quarter);
        ru.max_unavailable.get_or_insert_with(quarter);
    } else if strategy.rolling_update.is_some() {
        return Err(forbidden(
            "spec.strategy.rollingUpdate",
            "may not be specified when strategy `type` is 'Recreate'",
        ));
    }
    spec.revision_history_limit.get_or_insert(10);
    spec.progress_deadline_seconds.get_or_insert(600);
    non_negative("spec.minReadySeconds", spec.min_ready_seconds)?;
    non_negative("spec.revisionHistoryLimit", spec.revision_history_limit)
}

fn non_negative(field: &str, v: Option<i32>) -> Checked {
    match v {
        Some(v) if v < 0 => Err(invalid(field, v, "must be greater than or equal to 0")),
        _ => Ok(()),
    }
}

fn replica_set(rs: &mut ReplicaSet) -> Checked {
    let spec = &mut rs.spec;
    let mut template = spec
        .template
        .take()
        .ok_or_else(|| required("spec.template"))?;
    let result = workload("spec", &spec.selector, &mut template, &mut spec.replicas);
    spec.template = Some(template);
    result
}

pub(crate) const SERVICE_TYPES: &[&str] =
    &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];

fn service(svc: &mut Service) -> Checked {
    let meta = &svc.metadata;
    let spec = svc.spec.get_or_insert_with(ServiceSpec::default);
    let kind = spec.type_.get_or_insert_with(|| "ClusterIP".into()).clone();
    one_of("spec.type", &kind, SERVICE_TYPES)?;
    if kind == "ExternalName" {
        external_name_service(spec)?;
    } else {
        cluster_ip_syntax(spec)?;
    }
    let headless = spec.cluster_ip.as_deref() == Some("None");
    if spec.ports.as_ref().is_none_or(Vec::is_empty) && kind != "ExternalName" && !headless {
        return Err(required("spec.ports"));
    }
    service_ports(spec)?;
    labels("spec.selector", spec.selector.as_ref())?;
    traffic_policies(spec, &kind)?;
    session_affinity(spec)?;
    service_balancing(meta, spec)?;
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        ip.parse::<IpAddr>().map_err(|_| {
            invalid(
                format!("spec.externalIPs[{i}]"),
                ip,
                "must be a valid IP address",
            )
        })?;
    }
    for (i, cidr) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        cidr.parse::<ipnet::IpNet>().map_err(|_| {
            invalid(
                format!("spec.loadBalancerSourceRanges[{i}]"),
                cidr,
                "must be a valid CIDR",
            )
        })?;
    }
    Ok(())
}

fn external_name_service(spec: &ServiceSpec) -> Checked {
    let name = spec.external_name.as_deref().unwrap_or("");
    if name.is_empty() {
        return Err(required("spec.externalName"));
    }
    // Kubernetes tolerates one trailing dot (an absolute name).
    syntax(
        "spec.externalName",
        name.strip_suffix('.').unwrap_or(name),
        names::dns1123_subdomain,
    )?;
    if spec.cluster_ip.as_deref().is_some_and(|ip| !ip.is_empty()) {
        return Err(forbidden(
            "spec.clusterIP",
            "may not be set for ExternalName services",
        ));
    }
    Ok(())
}

fn cluster_ip_syntax(spec: &ServiceSpec) -> Checked {
    let ip = spec.cluster_ip.as_deref().unwrap_or("");
    if !ip.is_empty() && ip != "None" {
        ip.parse::<IpAddr>().map_err(|_| {
            invalid(
                "spec.clusterIP",
                ip,
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            )
        })?;
    }
    if let Some(ips) = spec.cluster_ips.as_ref().filter(|ips| !ips.is_empty()) {
        if !ip.is_empty() && ips[0] != ip {
            return Err(invalid(
                "spec.clusterIPs[0]",
                &ips[0],
                "must match `spec.clusterIP`",
            ));
        }
        if ips.len() > 1 {
            return Err(invalid(
                "spec.clusterIPs",
                ips,
                "dual-stack services are not supported by this store",
            ));
        }
    }
    if spec.external_name.is_some() {
        return Err(forbidden(
            "spec.externalName",
            "may only be set when `type` is 'ExternalName'",
        ));
    }
    Ok(())
}

fn service_ports(spec: &mut ServiceSpec) -> Checked {
    let ports = spec.ports.get_or_insert_with(Vec::new);
    let multiple = ports.len() > 1;
    let mut names = HashSet::new();
    let mut numbers = HashSet::new();
    for (i, p) in ports.iter_mut().enumerate() {
        service_port(i, p, multiple)?;
        if let Some(name) = p.name.as_deref().filter(|n| !n.is_empty())
            && !names.insert(name.to_owned())
        {
            return Err(duplicate(format!("spec.ports[{i}].name"), name));
        }
        let protocol = p.protocol.clone().unwrap_or_default();
        if !numbers.insert((p.port, protocol.clone())) {
            return Err(duplicate(
                format!("spec.ports[{i}]"),
                format!("{}/{protocol}", p.port),
            ));
        }
    }
    Ok(())
}

fn service_port(i: usize, p: &mut ServicePort, multiple: bool) -> Checked {
    let field = |leaf: &'static str| move || format!("spec.ports[{i}].{leaf}");
    match p.name.as_deref() {
        None | Some("") if multiple => return Err(required(field("name"))),
        Some(name) if !name.is_empty() => syntax(field("name"), name, names::dns1123_label)?,
        _ => {}
    }
    port_number(field("port"), p.port)?;
    default_protocol(field("protocol"), &mut p.protocol)?;
    match p.target_port.get_or_insert(IntOrString::Int(p.port)) {
        IntOrString::Int(t) => port_number(field("targetPort"), *t)?,
        IntOrString::String(name) => syntax(field("targetPort"), name, names::iana_svc_name)?,
    }
    if let Some(np) = p.node_port.filter(|np| *np != 0) {
        port_number(field("nodePort"), np)?;
    }
    Ok(())
}

fn traffic_policies(spec: &mut ServiceSpec, kind: &str) -> Checked {
    let external = matches!(kind, "NodePort" | "LoadBalancer");
    if external {
        let etp = spec
            .external_traffic_policy
            .get_or_insert_with(|| "Cluster".into());
        one_of("spec.externalTrafficPolicy", etp, &["Cluster", "Local"])?;
    } else if spec.external_traffic_policy.is_some()
        && spec.external_ips.as_ref().is_none_or(Vec::is_empty)
    {
        return Err(invalid(
            "spec.externalTrafficPolicy",
            spec.external_traffic_policy.as_deref().unwrap_or(""),
            "may only be set for externally-accessible services",
        ));
    }
    if kind != "ExternalName" {
        let itp = spec
            .internal_traffic_policy
            .get_or_insert_with(|| "Cluster".into());
        one_of("spec.internalTrafficPolicy", itp, &["Cluster", "Local"])?;
    }
    Ok(())
}

/// Kubernetes' default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: i32 = 10800;

fn session_affinity(spec: &mut ServiceSpec) -> Checked {
    let affinity = spec
        .session_affinity
        .get_or_insert_with(|| "None".into())
        .clone();
    one_of("spec.sessionAffinity", &affinity, &["None", "ClientIP"])?;
    if affinity == "ClientIP" {
        let timeout = *spec
            .session_affinity_config
            .get_or_insert_with(Default::default)
            .client_ip
            .get_or_insert_with(Default::default)
            .timeout_seconds
            .get_or_insert(DEFAULT_AFFINITY_TIMEOUT_SECONDS);
        if !(1..=86400).contains(&timeout) {
            return Err(invalid(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                timeout,
                "must be greater than 0 and less than 86400",
            ));
        }
    } else if spec
        .session_affinity_config
        .as_ref()
        .is_some_and(|c| c.client_ip.is_some())
    {
        return Err(forbidden(
            "spec.sessionAffinityConfig",
            "must not be set when `sessionAffinity` is None",
        ));
    }
    Ok(())
}

/// The API server's per-slice limits.
const MAX_SLICE_ENDPOINTS: usize = 1000;
const MAX_SLICE_PORTS: usize = 100;
const MAX_ENDPOINT_ADDRESSES: usize = 100;

fn endpoint_slice(slice: &mut EndpointSlice) -> Checked {
    let address_type = slice.address_type.clone();
    one_of("addressType", &address_type, &["IPv4", "IPv6", "FQDN"])?;
    let endpoints = slice.endpoints.get_or_insert_with(Vec::new);
    if endpoints.len() > MAX_SLICE_ENDPOINTS {
        return Err(FieldError {
            field: "endpoints".into(),
            message: format!(
                "Too many: {}: must have at most {MAX_SLICE_ENDPOINTS} items",
                endpoints.len()
            ),
        });
    }
    for (i, ep) in endpoints.iter().enumerate() {
        if ep.addresses.is_empty() || ep.addresses.len() > MAX_ENDPOINT_ADDRESSES {
            return Err(invalid(
                format!("endpoints[{i}].addresses"),
                ep.addresses.len(),
                "must contain between 1 and 100 addresses",
            ));
        }
        for (j, a) in ep.addresses.iter().enumerate() {
            endpoint_address(
                || format!("endpoints[{i}].addresses[{j}]"),
                &address_type,
                a,
            )?;
        }
        if let Some(h) = ep.hostname.as_deref() {
            syntax(
                || format!("endpoints[{i}].hostname"),
                h,
                names::dns1123_label,
            )?;
        }
        if let Some(n) = ep.node_name.as_deref() {
            syntax(
                || format!("endpoints[{i}].nodeName"),
                n,
                names::dns1123_subdomain,
            )?;
        }
    }
    let ports = slice.ports.get_or_insert_with(Vec::new);
    if ports.len() > MAX_SLICE_PORTS {
        return Err(FieldError {
            field: "ports".into(),
            message: format!(
                "Too many: {}: must have at most {MAX_SLICE_PORTS} items",
                ports.len()
            ),
        });
    }
    let mut names = HashSet::new();
    for (i, p) in ports.iter_mut().enumerate() {
        let name = p.name.get_or_insert_with(String::new).clone();
        if !name.is_empty() {
            syntax(|| format!("ports[{i}].name"), &name, names::dns1123_label)?;
        }
        if !names.insert(name.clone()) {
            return Err(duplicate(format!("ports[{i}].name"), name));
        }
        if let Some(port) = p.port {
            port_number(|| format!("ports[{i}].port"), port)?;
        }
        default_protocol(|| format!("ports[{i}].protocol"), &mut p.protocol)?;
    }
    Ok(())
}

fn endpoint_address(field: impl IntoField, address_type: &str, a: &str) -> Checked {
    let ok = match address_type {
        "IPv4" => a.parse::<std::net::Ipv4Addr>().is_ok(),
        "IPv6" => a.parse::<std::net::Ipv6Addr>().is_ok(),
        _ => names::dns1123_subdomain(a).is_ok(),
    };
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            a,
            format!("must be a valid {address_type} address"),
        ))
    }
}

/// The API server's limit on a ConfigMap's or Secret's total data size.
const MAX_DATA_BYTES: usize = 1024 * 1024;

fn config_map(cm: &mut ConfigMap) -> Checked {
    let mut total = 0;
    for (k, v) in cm.data.iter().flatten() {
        syntax(format!("data[{k}]"), k, names::config_map_key)?;
        total += v.len();
    }
    for (k, v) in cm.binary_data.iter().flatten() {
        syntax(format!("binaryData[{k}]"), k, names::config_map_key)?;
        if cm.data.as_ref().is_some_and(|d| d.contains_key(k)) {
            return Err(invalid(
                format!("data[{k}]"),
                k,
                "duplicate of key present in binaryData",
            ));
        }
        total += v.0.len();
    }
    data_size(total)
}

fn data_size(total: usize) -> Checked {
    if total > MAX_DATA_BYTES {
        return Err(FieldError {
            field: "data".into(),
            message: format!("Too long: must have at most {MAX_DATA_BYTES} bytes"),
        });
    }
    Ok(())
}

fn secret(s: &mut Secret) -> Checked {
    // Like the API server: stringData is a write-only convenience merged into data.
    if let Some(string_data) = s.string_data.take() {
        let data = s.data.get_or_insert_with(BTreeMap::new);
        for (k, v) in string_data {
            data.insert(k, k8s_openapi::ByteString(v.into_bytes()));
        }
    }
    let kind = s.type_.get_or_insert_with(|| "Opaque".into()).clone();
    let mut total = 0;
    for (k, v) in s.data.iter().flatten() {
        syntax(format!("data[{k}]"), k, names::config_map_key)?;
        total += v.0.len();
    }
    data_size(total)?;
    let required_keys: &[&str] = match kind.as_str() {
        "kubernetes.io/tls" => &["tls.crt", "tls.key"],
        "kubernetes.io/dockerconfigjson" => &[".dockerconfigjson"],
        _ => &[],
    };
    for key in required_keys {
        if !s.data.as_ref().is_some_and(|d| d.contains_key(*key)) {
            return Err(required(format!("data[{key}]")));
        }
    }
    Ok(())
}

/// Update rules: fields that may not change once stored. `old` is the stored object and
/// `new` the defaulted incoming one (same kind). Service IPs and node ports are carried
/// over and checked by the allocator instead, because omitting them is allowed.
pub fn validate_update(old: &Object, new: &Object) -> Checked {
    match (old, new) {
        (Object::Deployment(a), Object::Deployment(b)) => {
            same("spec.selector", &a.spec.selector, &b.spec.selector)
        }
        (Object::ReplicaSet(a), Object::ReplicaSet(b)) => {
            same("spec.selector", &a.spec.selector, &b.spec.selector)
        }
        (Object::Pod(a), Object::Pod(b)) => pod_update(a, b),
        (Object::EndpointSlice(a), Object::EndpointSlice(b)) => {
            same("addressType", &a.address_type, &b.address_type)
        }
        (Object::ConfigMap(a), Object::ConfigMap(b)) if a.immutable == Some(true) => {
            same("immutable", &a.immutable, &b.immutable)?;
            same("data", &a.data, &b.data)?;
            same("binaryData", &a.binary_data, &b.binary_data)
        }
        (Object::Secret(a), Object::Secret(b)) => {
            same("type", &a.type_, &b.type_)?;
            if a.immutable == Some(true) {
                same("immutable", &a.immutable, &b.immutable)?;
                same("data", &a.data, &b.data)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn same<T: PartialEq>(field: &str, a: &T, b: &T) -> Checked {
    if a == b {
        Ok(())
    } else {
        Err(immutable(field))
    }
}

/// A pod's spec may only change in container images, activeDeadlineSeconds,
/// tolerations, terminationGracePeriodSeconds, and nodeName going from unset to set
/// (binding); the error names the first other field that differs.
fn pod_update(old: &Pod, new: &Pod) -> Checked {
    let (Some(old_spec), Some(new_spec)) = (old.spec.as_ref(), new.spec.as_ref()) else {
        return Ok(());
    };
    let mut masked = new_spec.clone();
    let copy_images = |from: &[Container], to: &mut [Container]| {
        for (f, t) in from.iter().zip(to.iter_mut()) {
            t.image.clone_from(&f.image);
        }
    };
    copy_images(&old_spec.containers, &mut masked.containers);
    if let (Some(from), Some(to)) = (
        old_spec.init_containers.as_ref(),
        masked.init_containers.as_mut(),
    ) {
        copy_images(from, to);
    }
    masked.active_deadline_seconds = old_spec.active_deadline_seconds;
    masked.tolerations.clone_from(&old_spec.tolerations);
    masked.termination_grace_period_seconds = old_spec.termination_grace_period_seconds;
    if old_spec.node_name.is_none() {
        masked.node_name = None;
    }
    if &masked == old_spec {
        return Ok(());
    }
    let a = serde_json::to_value(old_spec).unwrap_or_default();
    let b = serde_json::to_value(&masked).unwrap_or_default();
    let path = first_difference(&a, &b, "spec".into()).unwrap_or_else(|| "spec".into());
    Err(FieldError { field: path, message: "field is immutable (pod updates may only change container images, activeDeadlineSeconds, tolerations and terminationGracePeriodSeconds)".into() })
}

/// The path of the first place two JSON values differ, for precise messages.
pub(crate) fn first_difference(a: &Value, b: &Value, path: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let (va, vb) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                first_difference(va, vb, format!("{path}.{k}"))
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (va, vb))| first_difference(va, vb, format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse;

    fn one(yaml: &str) -> Object {
        parse(yaml).unwrap().remove(0)
    }

    fn check(yaml: &str) -> Result<Object, String> {
        let mut o = one(yaml);
        default_and_validate(&mut o)
            .map(|()| o)
            .map_err(|e| e.to_string())
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: http}\n";

    #[test]
    fn service_defaults_like_the_api_server() {
        let Object::Service(s) = check(SVC).unwrap() else {
            panic!()
        };
        let spec = s.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.session_affinity.as_deref(), Some("None"));
        assert_eq!(spec.ports.unwrap()[0].protocol.as_deref(), Some("TCP"));
        let Object::Service(s) = check("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports: [{port: 53, protocol: UDP}]\n  sessionAffinity: ClientIP\n").unwrap() else { panic!() };
        let spec = s.spec.unwrap();
        assert_eq!(
            spec.ports.unwrap()[0].target_port,
            Some(IntOrString::Int(53))
        );
        assert_eq!(
            spec.session_affinity_config
                .unwrap()
                .client_ip
                .unwrap()
                .timeout_seconds,
            Some(10800)
        );
    }

    #[test]
    fn balancing_annotations_are_checked_naming_the_annotation() {
        let annotated = |pairs: &str| {
            SVC.replace(
                "name: web}",
                &format!("name: web, annotations: {{{pairs}}}}}"),
            )
        };
        assert!(
            check(&annotated(
                "vipr.io/lb-algorithm: maglev, vipr.io/maglev-table-size: \"65521\""
            ))
            .is_ok()
        );
        let e = check(&annotated("vipr.io/lb-algorithm: weighted")).unwrap_err();
        assert!(
            e.starts_with("metadata.annotations[vipr.io/lb-algorithm]: unknown load-balancing algorithm \"weighted\""),
            "{e}"
        );
        let e = check(&annotated("vipr.io/maglev-table-size: \"16383\"")).unwrap_err();
        assert!(
            e.starts_with("metadata.annotations[vipr.io/maglev-table-size]: invalid"),
            "{e}"
        );
        let affinity = SVC.to_string()
            + "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}\n";
        let e = check(&affinity).unwrap_err();
        assert!(
            e.starts_with("spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
            "{e}"
        );
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {vipr.io/weight: heavy}}\nspec: {containers: [{name: c, image: host}]}\n";
        let e = check(pod).unwrap_err();
        assert!(e.starts_with("metadata.annotations[vipr.io/weight]: invalid pod annotation vipr.io/weight=\"heavy\""), "{e}");
        assert!(check(&pod.replace("heavy", "\"3\"")).is_ok());
    }

    #[test]
    fn service_port_errors_name_the_field() {
        let e = check(&SVC.replace("port: 80", "port: 0")).unwrap_err();
        assert_eq!(
            e,
            "spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive"
        );
        let e = check(&SVC.replace("port: 80", "port: 70000")).unwrap_err();
        assert!(e.starts_with("spec.ports[0].port"), "{e}");
        let e = check(&SVC.replace("targetPort: http", "protocol: ICMP")).unwrap_err();
        assert!(
            e.starts_with("spec.ports[0].protocol: Unsupported value: \"ICMP\""),
            "{e}"
        );
        let two = SVC.to_string() + "  - {name: http, port: 81}\n";
        assert_eq!(
            check(&two).unwrap_err(),
            "spec.ports[1].name: Duplicate value: \"http\""
        );
        let unnamed = SVC.replace("name: http, ", "") + "  - {name: b, port: 81}\n";
        assert_eq!(
            check(&unnamed).unwrap_err(),
            "spec.ports[0].name: Required value"
        );
        let e = check(&SVC.replace("targetPort: http", "targetPort: Bad--Name")).unwrap_err();
        assert!(e.starts_with("spec.ports[0].targetPort"), "{e}");
    }

    #[test]
    fn service_names_are_dns1035_and_types_checked() {
        assert!(
            check(&SVC.replace("name: web}", "name: 1web}"))
                .unwrap_err()
                .starts_with("metadata.name")
        );
        assert!(
            check(&SVC.replace("spec:\n", "spec:\n  type: Weird\n"))
                .unwrap_err()
                .starts_with("spec.type: Unsupported")
        );
        let e = check(
            "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName}\n",
        )
        .unwrap_err();
        assert_eq!(e, "spec.externalName: Required value");
        assert!(check("apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: db.example.com}\n").is_ok());
        assert!(check("apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec: {clusterIP: None, selector: {a: b}}\n").is_ok());
        assert!(
            check(&SVC.replace("selector: {app: web}", "selector: {app: -x}"))
                .unwrap_err()
                .starts_with("spec.selector[app]")
        );
        assert!(
            check(&SVC.replace("spec:\n", "spec:\n  clusterIP: 10.0.0.300\n"))
                .unwrap_err()
                .starts_with("spec.clusterIP")
        );
    }

    const DEPLOY: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n      - name: web\n        ports: [{name: http, containerPort: 8080}]\n";

    #[test]
    fn deployment_selector_must_match_template() {
        let Object::Deployment(d) = check(DEPLOY).unwrap() else {
            panic!()
        };
        assert_eq!(d.spec.replicas, Some(1));
        let e = check(&DEPLOY.replace("labels: {app: web}", "labels: {app: api}")).unwrap_err();
        assert!(e.starts_with("spec.template.metadata.labels"), "{e}");
        let e = check(&DEPLOY.replace("selector: {matchLabels: {app: web}}", "selector: {}"))
            .unwrap_err();
        assert!(e.starts_with("spec.selector"), "{e}");
    }

    #[test]
    fn pod_spec_rules() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: a\n    ports: [{name: http, containerPort: 80}]\n";
        assert!(check(pod).is_ok());
        let dup = pod.to_string() + "  - name: a\n";
        assert_eq!(
            check(&dup).unwrap_err(),
            "spec.containers[1].name: Duplicate value: \"a\""
        );
        let e = check(&pod.replace("containerPort: 80", "containerPort: 0")).unwrap_err();
        assert!(
            e.starts_with("spec.containers[0].ports[0].containerPort"),
            "{e}"
        );
        let e = check(&pod.replace("name: a", "name: A")).unwrap_err();
        assert!(e.starts_with("spec.containers[0].name"), "{e}");
        let dup_port =
            pod.to_string() + "  - name: b\n    ports: [{name: http, containerPort: 81}]\n";
        assert!(
            check(&dup_port)
                .unwrap_err()
                .starts_with("spec.containers[1].ports[0].name: Duplicate")
        );
    }

    #[test]
    fn pod_update_names_the_immutable_field() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: a\n    image: one\n    args: [x]\n";
        let old = check(pod).unwrap();
        let image_change = check(&pod.replace("image: one", "image: two")).unwrap();
        assert!(validate_update(&old, &image_change).is_ok());
        let args_change = check(&pod.replace("args: [x]", "args: [y]")).unwrap();
        let e = validate_update(&old, &args_change).unwrap_err();
        assert_eq!(e.field, "spec.containers[0].args[0]");
    }

    #[test]
    fn endpoint_slice_rules() {
        let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints:\n- addresses: [10.0.0.1]\nports:\n- {name: http, port: 80}\n";
        assert!(check(slice).is_ok());
        assert!(
            check(&slice.replace("10.0.0.1", "fe80::1"))
                .unwrap_err()
                .starts_with("endpoints[0].addresses[0]")
        );
        assert!(
            check(&slice.replace("port: 80", "port: 0"))
                .unwrap_err()
                .starts_with("ports[0].port")
        );
        assert!(
            check(&slice.replace("IPv4", "IPX"))
                .unwrap_err()
                .starts_with("addressType")
        );
    }

    #[test]
    fn secrets_merge_string_data_and_check_keys() {
        let Object::Secret(s) =
            check("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {user: admin}\n")
                .unwrap()
        else {
            panic!()
        };
        assert_eq!(s.data.unwrap()["user"].0, b"admin");
        assert!(s.string_data.is_none());
        assert!(
            check("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ntype: kubernetes.io/tls\n")
                .unwrap_err()
                .starts_with("data[tls.crt]")
        );
        assert!(
            check("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {\"a/b\": x}\n")
                .unwrap_err()
                .starts_with("data[a/b]")
        );
    }

    #[test]
    fn selector_matching_handles_expressions() {
        let sel: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}, {"key": "canary", "operator": "DoesNotExist"}]
        })).unwrap();
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(label_selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "a")])
        ));
        assert!(!label_selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "c")])
        ));
        assert!(!label_selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "a"), ("canary", "")])
        ));
    }
}
