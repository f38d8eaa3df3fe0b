//! Turning Kubernetes objects into what the shim runs (pure logic plus writes into the
//! pod folder): environment (ConfigMap/Secret refs, envFrom, Downward API, `$(VAR)`
//! expansion), image resolution, volumes, and the per-pod /etc/hosts and
//! /etc/resolv.conf. Nothing here touches the node's own files.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Container, KeyToPath, Pod, Secret, Volume};

use crate::error::{IoContext, Result};
use crate::shim::{MountKind, MountSpec};

/// The caller's view of ConfigMaps and Secrets (the agent's store or the API server).
pub trait ObjectLookup: Send + Sync {
    fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap>;
    fn secret(&self, namespace: &str, name: &str) -> Option<Secret>;
    /// Docker-link style service variables (`FOO_SERVICE_HOST`, `FOO_SERVICE_PORT`...)
    /// for pods with `enableServiceLinks` (the default), plus `KUBERNETES_SERVICE_*`.
    /// The runtime knows no Services: the agent supplies them.
    fn service_env(&self, _namespace: &str) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// A lookup that knows no objects.
pub struct NoObjects;
impl ObjectLookup for NoObjects {
    fn config_map(&self, _: &str, _: &str) -> Option<ConfigMap> {
        None
    }
    fn secret(&self, _: &str, _: &str) -> Option<Secret> {
        None
    }
}

/// Why a container cannot start yet: becomes `state.waiting` (reason, message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
}

impl Waiting {
    fn config(message: String) -> Self {
        Waiting {
            reason: "CreateContainerConfigError".into(),
            message,
        }
    }
}

/// Facts about the pod that the Downward API and the /etc files need.
#[derive(Debug, Clone)]
pub struct PodFacts<'a> {
    pub pod: &'a Pod,
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub pod_ip: Option<IpAddr>,
    pub node_name: &'a str,
}

fn cm_data(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in cm.binary_data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    out
}

fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

/// Value of a Downward API field path.
pub fn field_value(facts: &PodFacts, path: &str) -> Option<String> {
    let md = &facts.pod.metadata;
    let spec = facts.pod.spec.as_ref();
    let quoted = |prefix: &str| -> Option<String> {
        path.strip_prefix(prefix)?
            .strip_suffix("']")
            .map(str::to_string)
    };
    Some(match path {
        "metadata.name" => facts.name.to_string(),
        "metadata.namespace" => facts.namespace.to_string(),
        "metadata.uid" => facts.uid.to_string(),
        "spec.nodeName" => facts.node_name.to_string(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" => facts.pod_ip.map(|i| i.to_string()).unwrap_or_default(),
        "status.hostIP" | "status.hostIPs" => String::new(),
        _ => {
            if let Some(k) = quoted("metadata.labels['") {
                md.labels.as_ref()?.get(&k)?.clone()
            } else if let Some(k) = quoted("metadata.annotations['") {
                md.annotations.as_ref()?.get(&k)?.clone()
            } else {
                return None;
            }
        }
    })
}

/// Kubernetes' `$(VAR)` expansion: defined names are replaced, `$$` escapes, anything
/// else is left as written.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn set(env: &mut Vec<(String, String)>, k: String, v: String) {
    if let Some(e) = env.iter_mut().find(|(ek, _)| *ek == k) {
        e.1 = v;
    } else {
        env.push((k, v));
    }
}

/// The container's environment in order: PATH (with `extra_path` first), HOSTNAME,
/// envFrom, then env (later entries override earlier ones, as in Kubernetes).
pub fn container_env(
    c: &Container,
    facts: &PodFacts,
    hostname: &str,
    extra_path: &[PathBuf],
    lookup: &dyn ObjectLookup,
) -> std::result::Result<Vec<(String, String)>, Waiting> {
    let ns = facts.namespace;
    let mut path: Vec<String> = extra_path.iter().map(|p| p.display().to_string()).collect();
    path.push("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    let mut env = vec![
        ("PATH".to_string(), path.join(":")),
        ("HOSTNAME".to_string(), hostname.to_string()),
    ];
    let links = facts
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.enable_service_links)
        .unwrap_or(true);
    for (k, v) in lookup.service_env(ns) {
        if links || k.starts_with("KUBERNETES_") {
            set(&mut env, k, v);
        }
    }
    for ef in c.env_from.iter().flatten() {
        let prefix = ef.prefix.clone().unwrap_or_default();
        if let Some(r) = &ef.config_map_ref {
            match lookup.config_map(ns, &r.name) {
                Some(cm) => {
                    for (k, v) in cm_data(&cm) {
                        set(
                            &mut env,
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v).into(),
                        );
                    }
                }
                None if r.optional == Some(true) => {}
                None => {
                    return Err(Waiting::config(format!(
                        "configmap \"{}\" not found",
                        r.name
                    )));
                }
            }
        }
        if let Some(r) = &ef.secret_ref {
            match lookup.secret(ns, &r.name) {
                Some(s) => {
                    for (k, v) in secret_data(&s) {
                        set(
                            &mut env,
                            format!("{prefix}{k}"),
                            String::from_utf8_lossy(&v).into(),
                        );
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(Waiting::config(format!("secret \"{}\" not found", r.name))),
            }
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(vf) = &e.value_from {
            if let Some(r) = &vf.config_map_key_ref {
                let v = lookup.config_map(ns, &r.name).map(|cm| cm_data(&cm));
                match v.as_ref().map(|d| d.get(&r.key)) {
                    Some(Some(v)) => String::from_utf8_lossy(v).into_owned(),
                    _ if r.optional == Some(true) => continue,
                    Some(None) => {
                        return Err(Waiting::config(format!(
                            "couldn't find key {} in ConfigMap {ns}/{}",
                            r.key, r.name
                        )));
                    }
                    None => {
                        return Err(Waiting::config(format!(
                            "configmap \"{}\" not found",
                            r.name
                        )));
                    }
                }
            } else if let Some(r) = &vf.secret_key_ref {
                let v = lookup.secret(ns, &r.name).map(|s| secret_data(&s));
                match v.as_ref().map(|d| d.get(&r.key)) {
                    Some(Some(v)) => String::from_utf8_lossy(v).into_owned(),
                    _ if r.optional == Some(true) => continue,
                    Some(None) => {
                        return Err(Waiting::config(format!(
                            "couldn't find key {} in Secret {ns}/{}",
                            r.key, r.name
                        )));
                    }
                    None => {
                        return Err(Waiting::config(format!("secret \"{}\" not found", r.name)));
                    }
                }
            } else if let Some(f) = &vf.field_ref {
                field_value(facts, &f.field_path).ok_or_else(|| {
                    Waiting::config(format!("unsupported fieldRef {:?}", f.field_path))
                })?
            } else if let Some(r) = &vf.resource_field_ref {
                resource_value(c, &r.resource)
            } else {
                String::new()
            }
        } else {
            expand(e.value.as_deref().unwrap_or(""), &env)
        };
        set(&mut env, e.name.clone(), value);
    }
    Ok(env)
}

fn resource_value(c: &Container, resource: &str) -> String {
    let (kind, name) = resource.split_once('.').unwrap_or(("limits", resource));
    let r = c.resources.as_ref();
    let map = if kind == "requests" {
        r.and_then(|r| r.requests.as_ref())
    } else {
        r.and_then(|r| r.limits.as_ref())
    };
    match map.and_then(|m| m.get(name)) {
        Some(q) if name == "cpu" => parse_cpu_millis(&q.0)
            .map(|m| m.div_ceil(1000).to_string())
            .unwrap_or_default(),
        Some(q) => parse_quantity(&q.0)
            .map(|b| b.to_string())
            .unwrap_or_default(),
        None => "0".into(),
    }
}

/// Command line: command (or, without one, args alone) with `$(VAR)` expanded.
pub fn container_argv(c: &Container, env: &[(String, String)]) -> Vec<String> {
    c.command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .map(|a| expand(a, env))
        .collect()
}

/// Where an image's root filesystem lives; None = the node's filesystem.
/// Err = the image is missing (reason ErrImageNeverPull).
pub fn resolve_image(
    image: Option<&str>,
    state_dir: &Path,
) -> std::result::Result<Option<PathBuf>, Waiting> {
    let image = image.unwrap_or("").trim();
    if image.is_empty() || image == "host" {
        return Ok(None);
    }
    let bad = image
        .split('/')
        .any(|p| p == ".." || p == "." || p.is_empty());
    let rootfs = state_dir.join("images").join(image).join("rootfs");
    if !bad && rootfs.is_dir() {
        return Ok(Some(rootfs));
    }
    Err(Waiting {
        reason: "ErrImageNeverPull".into(),
        message: format!(
            "Container image \"{image}\" is not present with pull policy of Never: expected a root filesystem at {}",
            rootfs.display()
        ),
    })
}

/// Parse a memory/storage quantity ("128Mi", "1G", "1e3", "512") into bytes.
pub fn parse_quantity(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "m" => 1e-3,
        _ => return None,
    };
    Some((n * mult).ceil() as u64)
}

/// Parse a CPU quantity ("500m", "2", "0.5") into millicores.
pub fn parse_cpu_millis(q: &str) -> Option<u64> {
    let q = q.trim();
    if let Some(m) = q.strip_suffix('m') {
        return m.parse().ok();
    }
    q.parse::<f64>().ok().map(|c| (c * 1000.0).ceil() as u64)
}

fn write_file(dir: &Path, rel: &str, data: &[u8], mode: Option<i32>) -> Result<()> {
    let rel = rel.trim_start_matches('/');
    if rel.split('/').any(|p| p == "..") {
        return Ok(());
    }
    let p = dir.join(rel);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).ctx(|| format!("mkdir {}", parent.display()))?;
    }
    std::fs::write(&p, data).ctx(|| format!("write {}", p.display()))?;
    let mode = mode.unwrap_or(0o644) as u32 & 0o777;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
        .ctx(|| format!("chmod {}", p.display()))
}

fn project_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    mode: Option<i32>,
) -> Result<()> {
    match items {
        Some(items) => {
            for it in items {
                if let Some(v) = data.get(&it.key) {
                    write_file(dir, &it.path, v, it.mode.or(mode))?;
                }
            }
        }
        None => {
            for (k, v) in data {
                write_file(dir, k, v, mode)?;
            }
        }
    }
    Ok(())
}

/// A pod volume made ready on the node: what to mount for it.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedVolume {
    pub kind: MountKind,
    pub source: PathBuf,
    /// tmpfs the agent mounted on the node (unmounted on pod deletion).
    pub node_tmpfs: bool,
    pub readonly: bool,
}

/// Materialise one volume under `vol_dir` (= `<pod_dir>/volumes/<name>`).
/// ConfigMap/Secret/Downward API content is written as files; a missing non-optional
/// ConfigMap/Secret is a `Waiting` (the pod stays in ContainerCreating, as kubelet's).
pub fn prepare_volume(
    v: &Volume,
    vol_dir: &Path,
    facts: &PodFacts,
    lookup: &dyn ObjectLookup,
) -> std::result::Result<PreparedVolume, Waiting> {
    let io = |e: crate::Error| Waiting {
        reason: "CreateContainerConfigError".into(),
        message: format!("volume {}: {e}", v.name),
    };
    let ns = facts.namespace;
    let mkdir = |d: &Path| std::fs::create_dir_all(d).ctx(|| format!("mkdir {}", d.display()));
    let bind = |source: PathBuf, readonly| PreparedVolume {
        kind: MountKind::Bind,
        source,
        node_tmpfs: false,
        readonly,
    };
    if let Some(e) = &v.empty_dir {
        mkdir(vol_dir).map_err(io)?;
        let memory = e.medium.as_deref() == Some("Memory");
        return Ok(PreparedVolume {
            kind: if memory {
                MountKind::Tmpfs {
                    size: e.size_limit.as_ref().and_then(|q| parse_quantity(&q.0)),
                }
            } else {
                MountKind::Bind
            },
            source: vol_dir.to_path_buf(),
            node_tmpfs: memory,
            readonly: false,
        });
    }
    if let Some(h) = &v.host_path {
        let p = PathBuf::from(&h.path);
        match h.type_.as_deref() {
            Some("DirectoryOrCreate") => mkdir(&p).map_err(io)?,
            Some("Directory") if !p.is_dir() => {
                return Err(Waiting::config(format!(
                    "hostPath {} is not a directory",
                    h.path
                )));
            }
            Some("File") if !p.is_file() => {
                return Err(Waiting::config(format!(
                    "hostPath {} is not a file",
                    h.path
                )));
            }
            _ => {}
        }
        return Ok(bind(p, false));
    }
    // The rest are projections of API objects: rewrite the folder from scratch.
    let _ = std::fs::remove_dir_all(vol_dir);
    mkdir(vol_dir).map_err(io)?;
    if let Some(c) = &v.config_map {
        match lookup.config_map(ns, &c.name) {
            Some(cm) => project_keys(vol_dir, &cm_data(&cm), c.items.as_ref(), c.default_mode)
                .map_err(io)?,
            None if c.optional == Some(true) => {}
            None => {
                return Err(Waiting::config(format!(
                    "configmap \"{}\" not found",
                    c.name
                )));
            }
        }
        return Ok(bind(vol_dir.to_path_buf(), true));
    }
    if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        match lookup.secret(ns, &name) {
            Some(sec) => project_keys(
                vol_dir,
                &secret_data(&sec),
                s.items.as_ref(),
                s.default_mode,
            )
            .map_err(io)?,
            None if s.optional == Some(true) => {}
            None => return Err(Waiting::config(format!("secret \"{name}\" not found"))),
        }
        return Ok(bind(vol_dir.to_path_buf(), true));
    }
    if let Some(d) = &v.downward_api {
        for it in d.items.iter().flatten() {
            if let Some(f) = &it.field_ref {
                let val = field_value(facts, &f.field_path).unwrap_or_default();
                write_file(
                    vol_dir,
                    &it.path,
                    val.as_bytes(),
                    it.mode.or(d.default_mode),
                )
                .map_err(io)?;
            }
        }
        return Ok(bind(vol_dir.to_path_buf(), true));
    }
    if let Some(p) = &v.projected {
        for src in p.sources.iter().flatten() {
            if let Some(c) = &src.config_map {
                match lookup.config_map(ns, &c.name) {
                    Some(cm) => {
                        project_keys(vol_dir, &cm_data(&cm), c.items.as_ref(), p.default_mode)
                            .map_err(io)?
                    }
                    None if c.optional == Some(true) => {}
                    None => {
                        return Err(Waiting::config(format!(
                            "configmap \"{}\" not found",
                            c.name
                        )));
                    }
                }
            }
            if let Some(s) = &src.secret {
                match lookup.secret(ns, &s.name) {
                    Some(sec) => project_keys(
                        vol_dir,
                        &secret_data(&sec),
                        s.items.as_ref(),
                        p.default_mode,
                    )
                    .map_err(io)?,
                    None if s.optional == Some(true) => {}
                    None => {
                        return Err(Waiting::config(format!("secret \"{}\" not found", s.name)));
                    }
                }
            }
            if let Some(d) = &src.downward_api {
                for it in d.items.iter().flatten() {
                    if let Some(f) = &it.field_ref {
                        let val = field_value(facts, &f.field_path).unwrap_or_default();
                        write_file(
                            vol_dir,
                            &it.path,
                            val.as_bytes(),
                            it.mode.or(p.default_mode),
                        )
                        .map_err(io)?;
                    }
                }
            }
        }
        return Ok(bind(vol_dir.to_path_buf(), true));
    }
    Err(Waiting::config(format!(
        "volume {}: unsupported volume type (supported: emptyDir, hostPath, configMap, secret, downwardAPI, projected)",
        v.name
    )))
}

/// Mounts of one container: its volumeMounts plus the pod's /etc files.
pub fn container_mounts(
    c: &Container,
    volumes: &BTreeMap<String, PreparedVolume>,
    etc_dir: &Path,
) -> Vec<MountSpec> {
    let mut out: Vec<MountSpec> = ["hosts", "resolv.conf", "hostname"]
        .iter()
        .map(|f| MountSpec {
            kind: MountKind::Bind,
            source: etc_dir.join(f),
            target: format!("/etc/{f}"),
            readonly: false,
            file: true,
        })
        .collect();
    for m in c.volume_mounts.iter().flatten() {
        let Some(v) = volumes.get(&m.name) else {
            continue;
        };
        let mut source = v.source.clone();
        if let Some(sub) = m
            .sub_path
            .as_deref()
            .filter(|s| !s.is_empty() && !s.contains(".."))
        {
            source = source.join(sub);
        }
        // A node tmpfs is already mounted at the source: bind it so containers share it.
        let kind = if v.node_tmpfs {
            MountKind::Bind
        } else {
            v.kind.clone()
        };
        out.push(MountSpec {
            kind,
            file: source.is_file(),
            source,
            target: m.mount_path.clone(),
            readonly: v.readonly || m.read_only == Some(true),
        });
    }
    out
}

/// The pod's /etc/hosts.
pub fn hosts_file(
    pod_ip: Option<IpAddr>,
    hostname: &str,
    fqdn: Option<&str>,
    aliases: &[(String, Vec<String>)],
) -> String {
    let mut s = String::from(
        "# Kubernetes-managed hosts file (vipr).\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    if let Some(ip) = pod_ip {
        match fqdn {
            Some(f) => s.push_str(&format!("{ip}\t{f}\t{hostname}\n")),
            None => s.push_str(&format!("{ip}\t{hostname}\n")),
        }
    }
    if !aliases.is_empty() {
        s.push_str("\n# Entries added by HostAliases.\n");
        for (ip, names) in aliases {
            s.push_str(&format!("{ip}\t{}\n", names.join("\t")));
        }
    }
    s
}

/// The pod's /etc/resolv.conf for dnsPolicy ClusterFirst (the default), Default
/// (the node's file, passed in) and None, with spec.dnsConfig merged in.
pub fn resolv_conf(
    pod: &Pod,
    namespace: &str,
    cluster_dns: &[IpAddr],
    cluster_domain: &str,
    node_resolv: &str,
) -> String {
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network) == Some(true);
    let policy = match spec.and_then(|s| s.dns_policy.as_deref()) {
        // As the kubelet: a hostNetwork pod gets the node's DNS unless it asks for
        // ClusterFirstWithHostNet.
        None | Some("ClusterFirst") if host_network => "Default",
        Some(p) => p,
        None => "ClusterFirst",
    };
    let (mut ns, mut search, mut opts): (Vec<String>, Vec<String>, Vec<String>) = match policy {
        "Default" => {
            let mut n = vec![];
            let mut s = vec![];
            let mut o = vec![];
            for line in node_resolv.lines() {
                let mut w = line.split_whitespace();
                match w.next() {
                    Some("nameserver") => n.extend(w.map(str::to_string)),
                    Some("search") => s.extend(w.map(str::to_string)),
                    Some("options") => o.extend(w.map(str::to_string)),
                    _ => {}
                }
            }
            (n, s, o)
        }
        "None" => (vec![], vec![], vec![]),
        // ClusterFirst and ClusterFirstWithHostNet
        _ => (
            cluster_dns.iter().map(|i| i.to_string()).collect(),
            vec![
                format!("{namespace}.svc.{cluster_domain}"),
                format!("svc.{cluster_domain}"),
                cluster_domain.to_string(),
            ],
            vec!["ndots:5".into()],
        ),
    };
    if let Some(dc) = spec.and_then(|s| s.dns_config.as_ref()) {
        ns.extend(dc.nameservers.iter().flatten().cloned());
        search.extend(dc.searches.iter().flatten().cloned());
        for o in dc.options.iter().flatten() {
            let v = match &o.value {
                Some(v) => format!("{}:{v}", o.name.as_deref().unwrap_or("")),
                None => o.name.clone().unwrap_or_default(),
            };
            let key = v.split(':').next().unwrap_or("").to_string();
            opts.retain(|x| x.split(':').next() != Some(key.as_str()));
            opts.push(v);
        }
    }
    let mut s = String::new();
    if !search.is_empty() {
        s.push_str(&format!("search {}\n", search.join(" ")));
    }
    for n in ns {
        s.push_str(&format!("nameserver {n}\n"));
    }
    if !opts.is_empty() {
        s.push_str(&format!("options {}\n", opts.join(" ")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Objs;
    impl ObjectLookup for Objs {
        fn config_map(&self, ns: &str, name: &str) -> Option<ConfigMap> {
            (ns == "default" && name == "cfg").then(|| {
                serde_json::from_value(json!({"metadata": {"name": "cfg"},
                    "data": {"MODE": "fast", "LEVEL": "3"}}))
                .unwrap()
            })
        }
        fn secret(&self, ns: &str, name: &str) -> Option<Secret> {
            (ns == "default" && name == "sec").then(|| {
                serde_json::from_value(json!({"metadata": {"name": "sec"},
                    "data": {"PASSWORD": "aHVudGVyMg=="}}))
                .unwrap()
            })
        }
    }

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "w"}},
            "spec": {"containers": [{"name": "c", "command": ["sh"]}]}
        }))
        .unwrap()
    }

    fn facts(p: &Pod) -> PodFacts<'_> {
        PodFacts {
            pod: p,
            namespace: "default",
            name: "web",
            uid: "u1",
            pod_ip: Some("10.1.0.5".parse().unwrap()),
            node_name: "node1",
        }
    }

    #[test]
    fn env_from_objects_and_downward_api() {
        let p = pod();
        let c: Container = serde_json::from_value(json!({
            "name": "c",
            "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
            "env": [
                {"name": "A", "value": "x"},
                {"name": "B", "value": "$(A)-$(MISSING)-$$"},
                {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "PASSWORD"}}},
                {"name": "M", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "MODE"}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}}
            ]
        }))
        .unwrap();
        let env =
            container_env(&c, &facts(&p), "web", &[PathBuf::from("/opt/vipr")], &Objs).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert!(get("PATH").unwrap().starts_with("/opt/vipr:"));
        assert_eq!(get("CFG_MODE"), Some("fast"));
        assert_eq!(get("B"), Some("x-$(MISSING)-$"));
        assert_eq!(get("PW"), Some("hunter2"));
        assert_eq!(get("M"), Some("fast"));
        assert_eq!(get("POD"), Some("web"));
        assert_eq!(get("NS"), Some("default"));
        assert_eq!(get("IP"), Some("10.1.0.5"));
        assert_eq!(get("NODE"), Some("node1"));
        assert_eq!(get("APP"), Some("w"));
    }

    #[test]
    fn missing_objects_wait_with_reason() {
        let p = pod();
        let c: Container = serde_json::from_value(json!({"name": "c",
            "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k"}}}]}))
        .unwrap();
        let w = container_env(&c, &facts(&p), "web", &[], &Objs).unwrap_err();
        assert_eq!(w.reason, "CreateContainerConfigError");
        assert!(w.message.contains("\"nope\""), "{}", w.message);
        let opt: Container = serde_json::from_value(json!({"name": "c",
            "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": true}}}]}))
        .unwrap();
        assert!(container_env(&opt, &facts(&p), "web", &[], &Objs).is_ok());
    }

    #[test]
    fn images() {
        let d = std::env::temp_dir().join(format!("vipr-img-{}", std::process::id()));
        std::fs::create_dir_all(d.join("images/busy/rootfs")).unwrap();
        assert_eq!(resolve_image(None, &d), Ok(None));
        assert_eq!(resolve_image(Some("host"), &d), Ok(None));
        assert_eq!(
            resolve_image(Some("busy"), &d),
            Ok(Some(d.join("images/busy/rootfs")))
        );
        let w = resolve_image(Some("nginx:1.25"), &d).unwrap_err();
        assert_eq!(w.reason, "ErrImageNeverPull");
        assert!(resolve_image(Some("../busy"), &d).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("128Mi"), Some(128 << 20));
        assert_eq!(parse_quantity("1G"), Some(1_000_000_000));
        assert_eq!(parse_quantity("1e3"), Some(1000));
        assert_eq!(parse_cpu_millis("500m"), Some(500));
        assert_eq!(parse_cpu_millis("1.5"), Some(1500));
    }

    #[test]
    fn etc_files() {
        let p = pod();
        let r = resolv_conf(
            &p,
            "shop",
            &["10.96.0.10".parse().unwrap()],
            "cluster.local",
            "",
        );
        assert_eq!(
            r,
            "search shop.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
        );
        let h = hosts_file(
            Some("10.1.0.5".parse().unwrap()),
            "web",
            None,
            &[("1.2.3.4".into(), vec!["foo".into(), "bar".into()])],
        );
        assert!(h.contains("10.1.0.5\tweb\n"));
        assert!(h.contains("1.2.3.4\tfoo\tbar\n"));
    }
}
