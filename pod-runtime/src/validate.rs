//! Validation of incoming Pod objects before anything is created. Errors name the
//! field with Kubernetes' path notation so `vipr apply` can point at the mistake.

use std::collections::HashSet;

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::error::{Error, Result};

/// RFC 1123 label: lowercase alphanumerics and '-', starts and ends alphanumeric, <= 63.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: dot-separated labels, <= 253 (pod and object names).
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn check_port(field: String, port: i32, allow_zero: bool) -> Result<()> {
    let lo = if allow_zero { 0 } else { 1 };
    if port < lo || port > 65535 {
        return Err(Error::invalid(
            field,
            format!("must be between {lo} and 65535, inclusive (got {port})"),
        ));
    }
    Ok(())
}

fn check_container(c: &Container, field: &str, names: &mut HashSet<String>) -> Result<()> {
    if !is_dns1123_label(&c.name) {
        return Err(Error::invalid(
            format!("{field}.name"),
            format!("{:?} is not a valid DNS-1123 label", c.name),
        ));
    }
    if !names.insert(c.name.clone()) {
        return Err(Error::invalid(
            format!("{field}.name"),
            format!("duplicate container name {:?}", c.name),
        ));
    }
    for (i, p) in c.ports.iter().flatten().enumerate() {
        check_port(
            format!("{field}.ports[{i}].containerPort"),
            p.container_port,
            false,
        )?;
        if let Some(hp) = p.host_port {
            check_port(format!("{field}.ports[{i}].hostPort"), hp, true)?;
        }
        if let Some(proto) = &p.protocol
            && !matches!(proto.as_str(), "TCP" | "UDP" | "SCTP")
        {
            return Err(Error::invalid(
                format!("{field}.ports[{i}].protocol"),
                format!("unsupported value {proto:?}: TCP, UDP or SCTP"),
            ));
        }
    }
    let has_cmd = c.command.as_ref().is_some_and(|v| !v.is_empty());
    let image_host = c
        .image
        .as_deref()
        .is_none_or(|i| i.is_empty() || i == "host");
    if !has_cmd && image_host {
        // A rootfs image has no entrypoint metadata here either, but the host "image"
        // certainly has none: without a command there is nothing to run.
        return Err(Error::invalid(
            format!("{field}.command"),
            "required when the image is `host` (there is no image entrypoint)",
        ));
    }
    Ok(())
}

/// Validate a pod; returns the first error found.
pub fn validate_pod(pod: &Pod) -> Result<()> {
    let name = pod.metadata.name.as_deref().unwrap_or("");
    if !is_dns1123_subdomain(name) {
        return Err(Error::invalid(
            "metadata.name",
            format!("{name:?} is not a valid DNS-1123 subdomain"),
        ));
    }
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    if !is_dns1123_label(ns) {
        return Err(Error::invalid(
            "metadata.namespace",
            format!("{ns:?} is not a valid DNS-1123 label"),
        ));
    }
    let Some(spec) = &pod.spec else {
        return Err(Error::invalid("spec", "required"));
    };
    if spec.containers.is_empty() {
        return Err(Error::invalid(
            "spec.containers",
            "at least one container is required",
        ));
    }
    if let Some(h) = &spec.hostname
        && !is_dns1123_label(h)
    {
        return Err(Error::invalid(
            "spec.hostname",
            format!("{h:?} is not a valid DNS-1123 label"),
        ));
    }
    if let Some(rp) = &spec.restart_policy
        && !matches!(rp.as_str(), "Always" | "OnFailure" | "Never")
    {
        return Err(Error::invalid(
            "spec.restartPolicy",
            format!("unsupported value {rp:?}: Always, OnFailure or Never"),
        ));
    }
    let mut names = HashSet::new();
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        check_container(c, &format!("spec.initContainers[{i}]"), &mut names)?;
    }
    for (i, c) in spec.containers.iter().enumerate() {
        check_container(c, &format!("spec.containers[{i}]"), &mut names)?;
    }
    let mut vols = HashSet::new();
    for (i, v) in spec.volumes.iter().flatten().enumerate() {
        if !is_dns1123_label(&v.name) {
            return Err(Error::invalid(
                format!("spec.volumes[{i}].name"),
                format!("{:?} is not a valid DNS-1123 label", v.name),
            ));
        }
        if !vols.insert(v.name.clone()) {
            return Err(Error::invalid(
                format!("spec.volumes[{i}].name"),
                format!("duplicate volume name {:?}", v.name),
            ));
        }
    }
    let all = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| ("initContainers", c))
        .enumerate()
        .chain(
            spec.containers
                .iter()
                .map(|c| ("containers", c))
                .enumerate(),
        );
    for (i, (kind, c)) in all {
        for (j, m) in c.volume_mounts.iter().flatten().enumerate() {
            if !vols.contains(&m.name) {
                return Err(Error::invalid(
                    format!("spec.{kind}[{i}].volumeMounts[{j}].name"),
                    format!("volume {:?} not found in spec.volumes", m.name),
                ));
            }
            if !m.mount_path.starts_with('/') {
                return Err(Error::invalid(
                    format!("spec.{kind}[{i}].volumeMounts[{j}].mountPath"),
                    "must be an absolute path",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn field_of(e: Error) -> String {
        match e {
            Error::Invalid { field, .. } => field,
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn dns1123() {
        assert!(is_dns1123_label("a-b1"));
        assert!(!is_dns1123_label("A"));
        assert!(!is_dns1123_label("-a"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(is_dns1123_subdomain("web.default"));
        assert!(!is_dns1123_subdomain("web..x"));
    }

    #[test]
    fn good_pod_passes() {
        validate_pod(&pod(serde_json::json!({
            "metadata": {"name": "web-1"},
            "spec": {"containers": [{"name": "c", "command": ["sleep", "1"],
                      "ports": [{"containerPort": 80}]}]}
        })))
        .unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let bad_name = pod(serde_json::json!({
            "metadata": {"name": "Web_1"},
            "spec": {"containers": [{"name": "c", "command": ["x"]}]}
        }));
        assert_eq!(
            field_of(validate_pod(&bad_name).unwrap_err()),
            "metadata.name"
        );

        let dup = pod(serde_json::json!({
            "metadata": {"name": "w"},
            "spec": {"containers": [{"name": "c", "command": ["x"]}, {"name": "c", "command": ["x"]}]}
        }));
        assert_eq!(
            field_of(validate_pod(&dup).unwrap_err()),
            "spec.containers[1].name"
        );

        let port = pod(serde_json::json!({
            "metadata": {"name": "w"},
            "spec": {"containers": [{"name": "c", "command": ["x"],
                      "ports": [{"containerPort": 70000}]}]}
        }));
        assert_eq!(
            field_of(validate_pod(&port).unwrap_err()),
            "spec.containers[0].ports[0].containerPort"
        );

        let cname = pod(serde_json::json!({
            "metadata": {"name": "w"},
            "spec": {"containers": [{"name": "C_1", "command": ["x"]}]}
        }));
        assert_eq!(
            field_of(validate_pod(&cname).unwrap_err()),
            "spec.containers[0].name"
        );

        let vm = pod(serde_json::json!({
            "metadata": {"name": "w"},
            "spec": {"containers": [{"name": "c", "command": ["x"],
                      "volumeMounts": [{"name": "nope", "mountPath": "/d"}]}]}
        }));
        assert_eq!(
            field_of(validate_pod(&vm).unwrap_err()),
            "spec.containers[0].volumeMounts[0].name"
        );
    }
}
