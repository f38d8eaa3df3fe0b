//! The data plane debugging commands: `vipr service list`, `vipr lb list`,
//! `vipr trace` and `vipr monitor`. The agent does the work (it holds the
//! maps and the intent); these print its answers as tables or JSON.

use std::{path::Path, process::ExitCode};

use anyhow::{Result, bail};
use serde_json::Value;

use super::get::{Rows, print_table};
use crate::{
    api::{self, MonitorFilter, Request, Response},
    cli::{DataOutput, MonitorArgs, MonitorType, TraceArgs},
};

/// Asks for data; prints it as JSON when asked, else with `text`.
fn show(
    socket: &Path,
    request: &Request,
    output: Option<DataOutput>,
    text: impl FnOnce(&Value),
) -> Result<ExitCode> {
    match api::call(socket, request)? {
        Response::Data { value } => {
            match output {
                Some(DataOutput::Json) => println!("{}", serde_json::to_string_pretty(&value)?),
                None => text(&value),
            }
            Ok(ExitCode::SUCCESS)
        }
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the agent: {other:?}"),
    }
}

fn s(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Bytes in kubectl-ish short units (1.5K, 3.2M).
fn bytes(value: &Value) -> String {
    let Some(n) = value.as_u64() else {
        return "-".into();
    };
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.1}G", n as f64 / 1e9),
    }
}

pub fn service_list(socket: &Path, output: Option<DataOutput>) -> Result<ExitCode> {
    show(socket, &Request::ServiceList, output, |value| {
        let mut rows: Rows = vec![
            [
                "FRONTEND",
                "TYPE",
                "SERVICE",
                "ALGORITHM",
                "AFFINITY",
                "POLICY",
                "PACKETS",
                "BYTES",
                "FLOWS",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for fe in value["frontends"].as_array().into_iter().flatten() {
            let counters = &fe["counters"];
            rows.push(vec![
                s(&fe["frontend"]),
                s(&fe["type"]),
                format!("{}/{}", s(&fe["namespace"]), s(&fe["service"])),
                s(&fe["algorithm"]),
                s(&fe["affinity"]),
                s(&fe["traffic_policy"]),
                s(&counters["packets"]),
                bytes(&counters["bytes"]),
                s(&counters["new_flows"]),
            ]);
            if let Some(drops) = fe["drops"].as_object().filter(|d| !d.is_empty()) {
                let listed: Vec<String> = drops.iter().map(|(r, n)| format!("{r}={n}")).collect();
                rows.push(vec![format!("  drops: {}", listed.join(" "))]);
            }
            for be in fe["backends"].as_array().into_iter().flatten() {
                let counters = &be["counters"];
                rows.push(vec![
                    format!("  => {}", s(&be["address"])),
                    if be["active"] == true {
                        "active"
                    } else {
                        "unused"
                    }
                    .into(),
                    s(&be["pod"]),
                    s(&be["state"]),
                    String::new(),
                    String::new(),
                    s(&counters["packets"]),
                    bytes(&counters["bytes"]),
                    s(&counters["new_flows"]),
                ]);
            }
        }
        print_table(&rows);
    })
}

pub fn lb_list(socket: &Path, raw: bool, output: Option<DataOutput>) -> Result<ExitCode> {
    show(socket, &Request::LbList { raw }, output, |value| {
        if raw {
            print_raw(&value["raw"]);
        } else {
            print_decoded(value);
        }
        let differences = value["differences"].as_array().cloned().unwrap_or_default();
        if differences.is_empty() {
            println!("\nDIFFERENCES from the agent's intent: none");
        } else {
            println!(
                "\nDIFFERENCES from the agent's intent: {}",
                differences.len()
            );
            for d in differences {
                println!("  ! {}", s(&d));
            }
        }
    })
}

fn section(title: &str, items: &Value, columns: &[&str], row: impl Fn(&Value) -> Vec<String>) {
    let items = items.as_array().cloned().unwrap_or_default();
    println!("{title} ({} entries)", items.len());
    let mut rows: Rows = vec![columns.iter().map(|c| c.to_string()).collect()];
    rows.extend(items.iter().map(row));
    print_table(&rows);
    println!();
}

fn print_decoded(value: &Value) {
    let c = &value["config"];
    println!(
        "CONFIG service CIDR {}, node {}, hairpin {}, SNAT ports {}\n",
        s(&c["service_cidr"]),
        s(&c["node_addr"]),
        s(&c["hairpin_addr"]),
        s(&c["snat_ports"])
    );
    section(
        "SERVICES",
        &value["services"],
        &["ID", "FRONTEND", "BACKENDS", "FLAGS", "SERVICE"],
        |e| {
            let flags: Vec<String> = e["flags"].as_array().into_iter().flatten().map(s).collect();
            vec![
                s(&e["service_id"]),
                s(&e["frontend"]),
                s(&e["backend_count"]),
                if flags.is_empty() {
                    "-".into()
                } else {
                    flags.join(",")
                },
                s(&e["service"]),
            ]
        },
    );
    section(
        "BACKENDS",
        &value["backends"],
        &["SERVICE-ID", "SLOT", "BACKEND", "WEIGHT", "WEIGHT-START"],
        |e| {
            ["service_id", "slot", "backend", "weight", "weight_start"]
                .iter()
                .map(|k| s(&e[*k]))
                .collect()
        },
    );
    let flow_columns = ["PROTO", "FROM", "TO", "REWRITTEN", "IDLE", "FLAGS"];
    let flow_row = |e: &Value| {
        let mut flags = Vec::new();
        if e["snat"] == true {
            flags.push("snat");
        }
        if e["fin_seen"] == true {
            flags.push("fin");
        }
        if e["established"] == true {
            flags.push("seen");
        }
        vec![
            s(&e["protocol"]),
            s(&e["from"]),
            s(&e["to"]),
            format!("{} -> {}", s(&e["rewritten_from"]), s(&e["rewritten_to"])),
            format!("{:.1}s", e["idle_s"].as_f64().unwrap_or(0.0)),
            if flags.is_empty() {
                "-".into()
            } else {
                flags.join(",")
            },
        ]
    };
    section(
        "FLOWS (conntrack, forward)",
        &value["flows"],
        &flow_columns,
        flow_row,
    );
    section(
        "REVERSE_FLOWS (conntrack, replies)",
        &value["reverse_flows"],
        &flow_columns,
        flow_row,
    );
    section(
        "MAGLEV (tables in summary)",
        &value["maglev"],
        &["SERVICE-ID", "FRONTEND", "SIZE", "SLOTS PER BACKEND"],
        |e| {
            let shares: Vec<String> = e["slots"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(b, n)| format!("{b}={n}"))
                .collect();
            vec![
                s(&e["service_id"]),
                s(&e["frontend"]),
                s(&e["size"]),
                shares.join(" "),
            ]
        },
    );
    section(
        "AFFINITY (ClientIP)",
        &value["affinity"],
        &["SERVICE-ID", "FRONTEND", "CLIENT", "BACKEND", "IDLE"],
        |e| {
            vec![
                s(&e["service_id"]),
                s(&e["frontend"]),
                s(&e["client"]),
                s(&e["backend"]),
                format!("{:.1}s", e["idle_s"].as_f64().unwrap_or(0.0)),
            ]
        },
    );
    section(
        "SOURCE_RANGES",
        &value["source_ranges"],
        &["SERVICE-ID", "RANGE"],
        |e| vec![s(&e["service_id"]), s(&e["range"])],
    );
}

fn print_raw(raw: &Value) {
    for (map, entries) in raw.as_object().into_iter().flatten() {
        let entries = entries.as_array().cloned().unwrap_or_default();
        println!("{map} ({} entries)", entries.len());
        for e in entries {
            println!("key: {}  value: {}", s(&e["key"]), s(&e["value"]));
        }
        println!();
    }
}

pub fn trace(socket: &Path, args: TraceArgs) -> Result<ExitCode> {
    let request = Request::Trace {
        src: args.src,
        dst: args.dst,
        protocol: Some(args.protocol),
    };
    show(socket, &request, args.output, |value| {
        for (i, step) in value["steps"].as_array().into_iter().flatten().enumerate() {
            println!(
                "{:>2}. {:<15} {}",
                i + 1,
                s(&step["step"]),
                s(&step["detail"])
            );
        }
        match value["backend"].as_str() {
            Some(backend) => println!("=> {}: {backend}", s(&value["verdict"])),
            None => println!("=> {}", s(&value["verdict"])),
        }
    })
}

pub fn monitor(socket: &Path, args: MonitorArgs) -> Result<ExitCode> {
    let filter = MonitorFilter {
        service: args.service,
        namespace: args.namespace,
        pod: args.pod,
        types: args
            .types
            .iter()
            .map(|t| match t {
                MonitorType::Translate => "translate",
                MonitorType::Drop => "drop",
                MonitorType::Reply => "reply",
            })
            .map(String::from)
            .collect(),
    };
    let json = args.output == Some(DataOutput::Json);
    api::stream(socket, &Request::Monitor(filter), |response| {
        match response {
            Response::Data { value } if json => println!("{value}"),
            Response::Data { value } => println!("{}", event_line(&value)),
            Response::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer from the agent: {other:?}"),
        }
        // A closed stdout (e.g. `| head`) ends the monitor.
        use std::io::Write;
        Ok(std::io::stdout().flush().is_ok())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn event_line(e: &Value) -> String {
    let service = e["service"]
        .as_str()
        .map_or(String::new(), |s| format!(" ({s})"));
    let on = s(&e["interface"]);
    match e["type"].as_str() {
        Some("translate") if e["path"] == "socket" => format!(
            "-> translate {} {} -> {}{service} => {} at connect()/sendmsg() (socket hook)",
            s(&e["protocol"]),
            s(&e["client"]),
            s(&e["frontend"]),
            s(&e["backend"]),
        ),
        Some("translate") => format!(
            "-> translate {} {} -> {}{service} => {} as {} on {on}",
            s(&e["protocol"]),
            s(&e["client"]),
            s(&e["frontend"]),
            s(&e["backend"]),
            s(&e["source_seen"])
        ),
        Some("reply") => format!(
            "<- reply     {} {} => {}{service} -> {} on {on}",
            s(&e["protocol"]),
            s(&e["backend"]),
            s(&e["frontend"]),
            s(&e["client"])
        ),
        Some("drop") => format!(
            "xx drop      {} {} -> {}{service}: {} on {on}",
            s(&e["protocol"]),
            s(&e["source"]),
            s(&e["destination"]),
            s(&e["reason"])
        ),
        Some("lost") => format!(
            "!! lost events: {} (ring buffer full), {} (this monitor too slow)",
            s(&e["ring_full"]),
            s(&e["client_too_slow"])
        ),
        _ => e.to_string(),
    }
}
