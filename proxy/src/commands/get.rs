//! `vipr get` and `vipr describe`: kubectl's columns for each kind, or the
//! Kubernetes-shaped objects as JSON or YAML.

use std::{path::Path, process::ExitCode};

use anyhow::{Result, bail};
use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    core::v1::{ConfigMap, Pod, Secret, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::Value;
use vipr_store::Kind;

use crate::{
    api::{self, Request, Response},
    cli::{GetArgs, OutputFormat},
};

pub fn run(socket: &Path, args: GetArgs) -> Result<ExitCode> {
    let Some(kind) = Kind::from_cli_name(&args.kind) else {
        bail!("the server doesn't have a resource type \"{}\"", args.kind);
    };
    let request = Request::Get {
        kind: args.kind.clone(),
        namespace: args.namespace.clone(),
        all_namespaces: args.all_namespaces,
        name: args.name.clone(),
    };
    let value = match api::call(socket, &request)? {
        Response::Data { value } => value,
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the agent: {other:?}"),
    };
    match args.output {
        Some(OutputFormat::Json) => println!("{}", serde_json::to_string_pretty(&value)?),
        Some(OutputFormat::Yaml) => print!("{}", serde_yaml_ng::to_string(&value)?),
        format => {
            let items = match value {
                Value::Object(mut list) if list.get("items").is_some_and(Value::is_array) => {
                    match list.remove("items") {
                        Some(Value::Array(items)) => items,
                        _ => unreachable!("checked to be an array"),
                    }
                }
                value => vec![value],
            };
            if items.is_empty() {
                let scope = match &args.namespace {
                    _ if args.all_namespaces || !kind.is_namespaced() => String::new(),
                    Some(ns) => format!(" in {ns} namespace"),
                    None => " in default namespace".into(),
                };
                eprintln!("No resources found{scope}.");
                return Ok(ExitCode::SUCCESS);
            }
            let wide = format == Some(OutputFormat::Wide);
            print_table(&table(kind, &items, wide, args.all_namespaces)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn describe(
    socket: &Path,
    kind: String,
    name: String,
    namespace: Option<String>,
) -> Result<ExitCode> {
    let request = Request::Describe {
        kind,
        namespace,
        name,
    };
    let value = match api::call(socket, &request)? {
        Response::Data { value } => value,
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the agent: {other:?}"),
    };
    print!("{}", serde_yaml_ng::to_string(&value["object"])?);
    println!("Events:");
    match value["events"].as_array() {
        Some(events) if !events.is_empty() => {
            let mut rows = vec![vec![
                "  Type".into(),
                "Reason".into(),
                "Count".into(),
                "Message".into(),
            ]];
            for e in events {
                rows.push(vec![
                    format!("  {}", e["type"].as_str().unwrap_or("")),
                    e["reason"].as_str().unwrap_or("").into(),
                    e["count"].to_string(),
                    e["message"].as_str().unwrap_or("").into(),
                ]);
            }
            print_table(&rows);
        }
        _ => println!("  <none>"),
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) type Rows = Vec<Vec<String>>;

fn table(kind: Kind, items: &[Value], wide: bool, all_namespaces: bool) -> Result<Rows> {
    let mut rows = match kind {
        Kind::Pod => typed(items, |p: Pod| pod_row(&p, wide), pod_header(wide))?,
        Kind::Service => typed(
            items,
            |s: Service| service_row(&s, wide),
            service_header(wide),
        )?,
        Kind::Deployment => typed(
            items,
            |d: Deployment| deployment_row(&d),
            header(&["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]),
        )?,
        Kind::ReplicaSet => typed(
            items,
            |rs: ReplicaSet| replica_set_row(&rs),
            header(&["NAME", "DESIRED", "CURRENT", "READY", "AGE"]),
        )?,
        Kind::EndpointSlice => typed(
            items,
            |s: EndpointSlice| slice_row(&s),
            header(&["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"]),
        )?,
        Kind::ConfigMap => typed(
            items,
            |c: ConfigMap| {
                vec![
                    name(&c.metadata),
                    c.data.map_or(0, |d| d.len()).to_string(),
                    age(&c.metadata),
                ]
            },
            header(&["NAME", "DATA", "AGE"]),
        )?,
        Kind::Secret => typed(
            items,
            |s: Secret| {
                vec![
                    name(&s.metadata),
                    s.type_.unwrap_or_else(|| "Opaque".into()),
                    s.data.map_or(0, |d| d.len()).to_string(),
                    age(&s.metadata),
                ]
            },
            header(&["NAME", "TYPE", "DATA", "AGE"]),
        )?,
        _ => {
            let mut rows = header(&["NAME", "AGE"]);
            for item in items {
                let meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta =
                    serde_json::from_value(item["metadata"].clone()).unwrap_or_default();
                let status = if kind == Kind::Namespace {
                    if meta.deletion_timestamp.is_some() {
                        "Terminating"
                    } else {
                        "Active"
                    }
                } else {
                    ""
                };
                let mut row = vec![name(&meta)];
                if kind == Kind::Namespace {
                    row.push(status.into());
                }
                row.push(age(&meta));
                rows.push(row);
            }
            if kind == Kind::Namespace {
                rows[0] = vec!["NAME".into(), "STATUS".into(), "AGE".into()];
            }
            rows
        }
    };
    if all_namespaces && kind.is_namespaced() {
        rows[0].insert(0, "NAMESPACE".into());
        for (row, item) in rows.iter_mut().skip(1).zip(items) {
            row.insert(
                0,
                item["metadata"]["namespace"].as_str().unwrap_or("").into(),
            );
        }
    }
    Ok(rows)
}

fn typed<T: serde::de::DeserializeOwned>(
    items: &[Value],
    row: impl Fn(T) -> Vec<String>,
    mut rows: Rows,
) -> Result<Rows> {
    for item in items {
        // From the borrowed value: cloning a thousand pods' JSON first
        // cost more than deserializing them.
        rows.push(row(T::deserialize(item)?));
    }
    Ok(rows)
}

fn header(columns: &[&str]) -> Rows {
    vec![columns.iter().map(|c| (*c).to_owned()).collect()]
}

fn pod_header(wide: bool) -> Rows {
    let mut columns = vec!["NAME", "READY", "STATUS", "RESTARTS", "AGE"];
    if wide {
        columns.extend(["IP", "NODE"]);
    }
    header(&columns)
}

fn pod_row(pod: &Pod, wide: bool) -> Vec<String> {
    let status = pod.status.clone().unwrap_or_default();
    let containers = pod.spec.as_ref().map_or(0, |s| s.containers.len());
    let statuses = status.container_statuses.clone().unwrap_or_default();
    let ready = statuses.iter().filter(|c| c.ready).count();
    let restarts: i32 = statuses.iter().map(|c| c.restart_count).sum();
    let mut row = vec![
        name(&pod.metadata),
        format!("{ready}/{containers}"),
        pod_status_word(pod),
        restarts.to_string(),
        age(&pod.metadata),
    ];
    if wide {
        row.push(status.pod_ip.unwrap_or_else(|| "<none>".into()));
        row.push(
            pod.spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_else(|| "<none>".into()),
        );
    }
    row
}

/// kubectl's STATUS column: a waiting or terminated reason wins over the phase.
fn pod_status_word(pod: &Pod) -> String {
    if pod.metadata.deletion_timestamp.is_some() {
        return "Terminating".into();
    }
    let status = pod.status.clone().unwrap_or_default();
    for c in status.container_statuses.iter().flatten() {
        let state = c.state.clone().unwrap_or_default();
        if let Some(reason) = state.waiting.and_then(|w| w.reason) {
            return reason;
        }
        if let Some(reason) = state.terminated.and_then(|t| t.reason) {
            return reason;
        }
    }
    status
        .reason
        .or(status.phase)
        .unwrap_or_else(|| "Pending".into())
}

fn service_header(wide: bool) -> Rows {
    let mut columns = vec![
        "NAME",
        "TYPE",
        "CLUSTER-IP",
        "EXTERNAL-IP",
        "PORT(S)",
        "AGE",
    ];
    if wide {
        columns.push("SELECTOR");
    }
    header(&columns)
}

fn service_row(service: &Service, wide: bool) -> Vec<String> {
    let spec = service.spec.clone().unwrap_or_default();
    let type_ = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
    let external = match (&spec.external_ips, type_.as_str()) {
        (Some(ips), _) if !ips.is_empty() => ips.join(","),
        (_, "ExternalName") => spec.external_name.clone().unwrap_or_default(),
        (_, "LoadBalancer") => "<pending>".into(),
        _ => "<none>".into(),
    };
    let ports: Vec<String> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| {
            let node_port = p.node_port.map(|n| format!(":{n}")).unwrap_or_default();
            format!(
                "{}{node_port}/{}",
                p.port,
                p.protocol.as_deref().unwrap_or("TCP")
            )
        })
        .collect();
    let mut row = vec![
        name(&service.metadata),
        type_,
        spec.cluster_ip.clone().unwrap_or_else(|| "<none>".into()),
        external,
        if ports.is_empty() {
            "<none>".into()
        } else {
            ports.join(",")
        },
        age(&service.metadata),
    ];
    if wide {
        let selector = spec.selector.unwrap_or_default();
        let text: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
        row.push(if text.is_empty() {
            "<none>".into()
        } else {
            text.join(",")
        });
    }
    row
}

fn deployment_row(deployment: &Deployment) -> Vec<String> {
    let status = deployment.status.clone().unwrap_or_default();
    let desired = deployment.spec.replicas.unwrap_or(1);
    vec![
        name(&deployment.metadata),
        format!("{}/{desired}", status.ready_replicas.unwrap_or(0)),
        status.updated_replicas.unwrap_or(0).to_string(),
        status.available_replicas.unwrap_or(0).to_string(),
        age(&deployment.metadata),
    ]
}

fn replica_set_row(rs: &ReplicaSet) -> Vec<String> {
    let status = rs.status.clone().unwrap_or_default();
    vec![
        name(&rs.metadata),
        rs.spec.replicas.unwrap_or(1).to_string(),
        status.replicas.to_string(),
        status.ready_replicas.unwrap_or(0).to_string(),
        age(&rs.metadata),
    ]
}

fn slice_row(slice: &EndpointSlice) -> Vec<String> {
    let ports: Vec<String> = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.port.map(|n| n.to_string()))
        .collect();
    let addresses: Vec<String> = slice
        .endpoints
        .iter()
        .flatten()
        .flat_map(|e| e.addresses.iter().cloned())
        .collect();
    let shown = if addresses.len() > 3 {
        format!(
            "{} + {} more...",
            addresses[..3].join(","),
            addresses.len() - 3
        )
    } else if addresses.is_empty() {
        "<none>".into()
    } else {
        addresses.join(",")
    };
    vec![
        name(&slice.metadata),
        slice.address_type.clone(),
        if ports.is_empty() {
            "<unset>".into()
        } else {
            ports.join(",")
        },
        shown,
        age(&slice.metadata),
    ]
}

fn name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

/// kubectl's short age: 45s, 3m12s, 5h, 2d.
fn age(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    let Some(created) = &meta.creation_timestamp else {
        return "<unknown>".into();
    };
    let seconds = (k8s_openapi::jiff::Timestamp::now().as_second() - created.0.as_second()).max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Left-aligned columns separated by three spaces, as kubectl prints them.
pub(super) fn print_table(rows: &Rows) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}   ", width = widths[c]));
            }
        }
        println!("{line}");
    }
}
