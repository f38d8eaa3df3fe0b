//! `vipr scale`, `vipr set image|env` and `vipr rollout
//! status|history|undo|pause|resume`: kubectl's commands for Deployments.
//! Changes are made by the agent (one `EditDeployment` request); `rollout
//! status` and `history` read the Deployment and its ReplicaSets.

use std::{
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use serde::Deserialize;
use serde_json::Value;
use vipr_pod_runtime::deployment::{self, edit};
use vipr_store::Kind;

use super::print_done;
use crate::{
    api::{self, DeploymentEdit, Request, Response},
    cli::{DeploymentTarget, RolloutCommand, ScaleArgs, SetCommand},
};

/// How often `rollout status` looks again.
const POLL: Duration = Duration::from_millis(200);

pub fn scale(socket: &Path, args: ScaleArgs) -> Result<ExitCode> {
    let replicas = args.replicas;
    send(socket, &args.deployment, DeploymentEdit::Scale { replicas })
}

pub fn set(socket: &Path, command: SetCommand) -> Result<ExitCode> {
    match command {
        SetCommand::Image {
            target,
            images,
            namespace,
        } => {
            let images = images
                .iter()
                .map(|pair| {
                    pair.split_once('=')
                        .filter(|(c, i)| !c.is_empty() && !i.is_empty())
                        .map(|(c, i)| (c.to_owned(), i.to_owned()))
                        .with_context(|| {
                            format!("invalid image {pair:?}: expected CONTAINER=IMAGE")
                        })
                })
                .collect::<Result<_>>()?;
            let target = DeploymentTarget {
                target,
                name: None,
                namespace,
            };
            send(socket, &target, DeploymentEdit::SetImage { images })
        }
        SetCommand::Env {
            target,
            env,
            container,
            namespace,
        } => {
            let target = DeploymentTarget {
                target,
                name: None,
                namespace,
            };
            send(socket, &target, DeploymentEdit::SetEnv { container, env })
        }
    }
}

pub fn rollout(socket: &Path, command: RolloutCommand) -> Result<ExitCode> {
    match command {
        RolloutCommand::Status {
            deployment,
            timeout,
        } => status(socket, &deployment, parse_duration(&timeout)?),
        RolloutCommand::History { deployment } => history(socket, &deployment),
        RolloutCommand::Undo {
            deployment,
            to_revision,
        } => send(socket, &deployment, DeploymentEdit::Undo { to_revision }),
        RolloutCommand::Pause { deployment } => send(socket, &deployment, DeploymentEdit::Pause),
        RolloutCommand::Resume { deployment } => send(socket, &deployment, DeploymentEdit::Resume),
    }
}

/// The Deployment's name from `deployment/NAME` or `deployment NAME`.
fn deployment_name(target: &DeploymentTarget) -> Result<String> {
    let (kind, name) = match (&target.name, target.target.split_once('/')) {
        (Some(name), None) => (target.target.as_str(), name.as_str()),
        (None, Some((kind, name))) if !name.is_empty() => (kind, name),
        _ => bail!(
            "expected deployment/NAME or deployment NAME, got {:?}",
            target.target
        ),
    };
    if Kind::from_cli_name(kind) != Some(Kind::Deployment) {
        bail!("only deployments are supported, got {kind:?}");
    }
    Ok(name.to_owned())
}

fn send(socket: &Path, target: &DeploymentTarget, edit: DeploymentEdit) -> Result<ExitCode> {
    let request = Request::EditDeployment {
        namespace: target.namespace.clone(),
        name: deployment_name(target)?,
        edit,
    };
    print_done(api::call(socket, &request)?)
}

fn get(socket: &Path, kind: &str, namespace: Option<&String>, name: Option<&str>) -> Result<Value> {
    let request = Request::Get {
        kind: kind.into(),
        namespace: namespace.cloned(),
        all_namespaces: false,
        name: name.map(str::to_owned),
    };
    match api::call(socket, &request)? {
        Response::Data { value } => Ok(value),
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the agent: {other:?}"),
    }
}

fn get_deployment(socket: &Path, target: &DeploymentTarget) -> Result<Deployment> {
    let name = deployment_name(target)?;
    let value = get(socket, "deployment", target.namespace.as_ref(), Some(&name))
        .map_err(|_| anyhow::anyhow!("deployments.apps {name:?} not found"))?;
    Ok(serde_json::from_value(value)?)
}

/// Prints kubectl's progress lines (each once) until the rollout finished,
/// failed its progress deadline, or `timeout` (zero: none) passed.
fn status(socket: &Path, target: &DeploymentTarget, timeout: Duration) -> Result<ExitCode> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let d = get_deployment(socket, target)?;
        let (line, done) = edit::rollout_status(&d)?;
        if line != last {
            println!("{line}");
            last = line;
        }
        if done {
            return Ok(ExitCode::SUCCESS);
        }
        if !timeout.is_zero() && started.elapsed() >= timeout {
            bail!("timed out waiting for the condition");
        }
        std::thread::sleep(POLL);
    }
}

fn history(socket: &Path, target: &DeploymentTarget) -> Result<ExitCode> {
    let d = get_deployment(socket, target)?;
    let uid = d.metadata.uid.clone().unwrap_or_default();
    let list = get(socket, "replicaset", target.namespace.as_ref(), None)?;
    let replica_sets: Vec<ReplicaSet> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| ReplicaSet::deserialize(item).ok())
        .filter(|rs| deployment::is_controlled_by(&rs.metadata, &uid))
        .collect();
    println!(
        "deployment.apps/{}",
        d.metadata.name.as_deref().unwrap_or_default()
    );
    let mut rows = vec![vec!["REVISION".to_owned(), "CHANGE-CAUSE".to_owned()]];
    for line in edit::history(&replica_sets) {
        rows.push(vec![
            line.revision.to_string(),
            line.change_cause.unwrap_or_else(|| "<none>".into()),
        ]);
    }
    super::get::print_table(&rows);
    Ok(ExitCode::SUCCESS)
}

/// kubectl's durations: `90s`, `5m`, `1h`, `500ms`, a bare number of
/// seconds; `0` for no limit.
fn parse_duration(text: &str) -> Result<Duration> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .with_context(|| format!("invalid duration {text:?}: expected e.g. 90s, 5m, 1h"))?;
    let seconds = match unit {
        "" | "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        "ms" => return Ok(Duration::from_millis(number)),
        _ => bail!("invalid duration {text:?}: expected e.g. 90s, 5m, 1h"),
    };
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_like_kubectl() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn targets_name_a_deployment() {
        let target = |t: &str, n: Option<&str>| DeploymentTarget {
            target: t.into(),
            name: n.map(str::to_owned),
            namespace: None,
        };
        assert_eq!(
            deployment_name(&target("deployment/web", None)).unwrap(),
            "web"
        );
        assert_eq!(
            deployment_name(&target("deploy", Some("web"))).unwrap(),
            "web"
        );
        assert!(deployment_name(&target("svc/web", None)).is_err());
        assert!(deployment_name(&target("web", None)).is_err());
    }
}
