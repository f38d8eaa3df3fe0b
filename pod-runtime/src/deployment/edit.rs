//! What the kubectl-like commands change in a Deployment (`scale`, `set
//! image`, `set env`, `rollout pause|resume|undo`) and what `rollout
//! history` and `rollout status` read, with kubectl's wording. The agent
//! stores the edited Deployment; the store bumps its generation when the
//! spec changed, and the controller makes a new revision only when the pod
//! template did.

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Container, EnvVar};

use super::controller::{PROGRESSING, TIMED_OUT};
use super::{CHANGE_CAUSE, POD_TEMPLATE_HASH, change_cause, revision};

/// A command that cannot be applied; the message names the field or object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EditError(pub String);

fn name(d: &Deployment) -> &str {
    d.metadata.name.as_deref().unwrap_or_default()
}

/// `vipr scale deployment/NAME --replicas N`.
pub fn scale(d: &mut Deployment, replicas: i64) -> Result<(), EditError> {
    let replicas = i32::try_from(replicas)
        .ok()
        .filter(|r| *r >= 0)
        .ok_or_else(|| {
            EditError(format!(
                "spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0"
            ))
        })?;
    d.spec.replicas = Some(replicas);
    Ok(())
}

/// `vipr set image deployment/NAME CONTAINER=IMAGE...` (`*` for every
/// container). An unknown container changes nothing.
pub fn set_image(d: &mut Deployment, images: &[(String, String)]) -> Result<(), EditError> {
    let mut spec = d.spec.template.spec.clone().unwrap_or_default();
    for (container, image) in images {
        let mut found = false;
        let all = spec
            .init_containers
            .iter_mut()
            .flatten()
            .chain(spec.containers.iter_mut());
        for c in all.filter(|c| container == "*" || c.name == *container) {
            c.image = Some(image.clone());
            found = true;
        }
        if !found {
            return Err(EditError(format!(
                "unable to find container named {container:?} in deployment {:?} (spec.template.spec.containers)",
                name(d)
            )));
        }
    }
    d.spec.template.spec = Some(spec);
    Ok(())
}

/// One `set env` argument: `KEY=VALUE` sets, `KEY-` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvEdit {
    Set(String, String),
    Remove(String),
}

impl std::str::FromStr for EnvEdit {
    type Err = EditError;
    fn from_str(s: &str) -> Result<EnvEdit, EditError> {
        if let Some((key, value)) = s.split_once('=') {
            if !key.is_empty() {
                return Ok(EnvEdit::Set(key.into(), value.into()));
            }
        } else if let Some(key) = s.strip_suffix('-').filter(|k| !k.is_empty()) {
            return Ok(EnvEdit::Remove(key.into()));
        }
        Err(EditError(format!(
            "invalid environment variable {s:?}: expected KEY=VALUE or KEY-"
        )))
    }
}

/// `vipr set env deployment/NAME [-c CONTAINER] KEY=VALUE... KEY-...`:
/// every container, or the one named.
pub fn set_env(
    d: &mut Deployment,
    container: Option<&str>,
    edits: &[EnvEdit],
) -> Result<(), EditError> {
    let mut spec = d.spec.template.spec.clone().unwrap_or_default();
    let targets: Vec<&mut Container> = spec
        .containers
        .iter_mut()
        .filter(|c| container.is_none_or(|n| n == "*" || c.name == n))
        .collect();
    if targets.is_empty() {
        return Err(EditError(format!(
            "unable to find container named {:?} in deployment {:?} (spec.template.spec.containers)",
            container.unwrap_or_default(),
            name(d)
        )));
    }
    for c in targets {
        let env = c.env.get_or_insert_with(Vec::new);
        for edit in edits {
            match edit {
                EnvEdit::Set(key, value) => match env.iter_mut().find(|e| e.name == *key) {
                    Some(var) => {
                        var.value = Some(value.clone());
                        var.value_from = None;
                    }
                    None => env.push(EnvVar {
                        name: key.clone(),
                        value: Some(value.clone()),
                        value_from: None,
                    }),
                },
                EnvEdit::Remove(key) => env.retain(|e| e.name != *key),
            }
        }
        if env.is_empty() {
            c.env = None;
        }
    }
    d.spec.template.spec = Some(spec);
    Ok(())
}

/// `rollout pause` (`true`) and `rollout resume` (`false`).
pub fn set_paused(d: &mut Deployment, paused: bool) -> Result<(), EditError> {
    let is_paused = d.spec.paused == Some(true);
    if is_paused == paused {
        let state = if paused {
            "already paused"
        } else {
            "not paused"
        };
        return Err(EditError(format!(
            "deployments.apps {:?} is {state}",
            name(d)
        )));
    }
    d.spec.paused = paused.then_some(true);
    Ok(())
}

/// What `rollout undo` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rollback {
    /// The template of this revision is the Deployment's again.
    RolledBack(i64),
    /// The current template already is that revision's.
    Skipped(i64),
}

/// `rollout undo [--to-revision N]` (0: the previous revision): copies the
/// revision's template (and change-cause) back into the Deployment.
pub fn rollback(
    d: &mut Deployment,
    replica_sets: &[ReplicaSet],
    to_revision: i64,
) -> Result<Rollback, EditError> {
    if d.spec.paused == Some(true) {
        return Err(EditError(format!(
            "you cannot rollback a paused deployment; resume it first with 'vipr rollout resume deployment/{}' and try again",
            name(d)
        )));
    }
    let mut by_revision: Vec<&ReplicaSet> = replica_sets.iter().collect();
    by_revision.sort_by_key(|rs| std::cmp::Reverse(revision(&rs.metadata)));
    let target = if to_revision == 0 {
        by_revision.get(1).copied().ok_or_else(|| {
            EditError(format!(
                "no rollout history found for deployment {:?}",
                name(d)
            ))
        })?
    } else {
        by_revision
            .iter()
            .copied()
            .find(|rs| revision(&rs.metadata) == to_revision)
            .ok_or_else(|| {
                EditError(format!(
                    "unable to find specified revision {to_revision} in history"
                ))
            })?
    };
    let target_revision = revision(&target.metadata);
    let mut template = target.spec.template.clone().unwrap_or_default();
    if let Some(labels) = template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.remove(POD_TEMPLATE_HASH);
    }
    if template == d.spec.template {
        return Ok(Rollback::Skipped(target_revision));
    }
    d.spec.template = template;
    let cause = change_cause(&target.metadata);
    let annotations = d.metadata.annotations.get_or_insert_with(Default::default);
    match cause {
        Some(cause) => annotations.insert(CHANGE_CAUSE.into(), cause.clone()),
        None => annotations.remove(CHANGE_CAUSE),
    };
    Ok(Rollback::RolledBack(target_revision))
}

/// One line of `rollout history`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    pub revision: i64,
    pub change_cause: Option<String>,
}

/// The revisions of `replica_sets` (a Deployment's), oldest first.
pub fn history(replica_sets: &[ReplicaSet]) -> Vec<History> {
    let mut lines: Vec<History> = replica_sets
        .iter()
        .map(|rs| History {
            revision: revision(&rs.metadata),
            change_cause: change_cause(&rs.metadata).cloned(),
        })
        .filter(|h| h.revision > 0)
        .collect();
    lines.sort_by_key(|h| h.revision);
    lines
}

/// kubectl's `rollout status` for a Deployment: the line to print and
/// whether the rollout is done; an error once the progress deadline passed.
pub fn rollout_status(d: &Deployment) -> Result<(String, bool), EditError> {
    let name = name(d);
    let status = d.status.clone().unwrap_or_default();
    if d.metadata.generation > status.observed_generation {
        return Ok((
            "Waiting for deployment spec update to be observed...".into(),
            false,
        ));
    }
    let timed_out =
        status.conditions.iter().flatten().any(|c| {
            c.type_.as_deref() == Some(PROGRESSING) && c.reason.as_deref() == Some(TIMED_OUT)
        });
    if timed_out {
        return Err(EditError(format!(
            "deployment {name:?} exceeded its progress deadline"
        )));
    }
    let desired = d.spec.replicas.unwrap_or(1);
    let updated = status.updated_replicas.unwrap_or(0);
    let replicas = status.replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    Ok(if updated < desired {
        (
            format!(
                "Waiting for deployment {name:?} rollout to finish: {updated} out of {desired} new replicas have been updated..."
            ),
            false,
        )
    } else if replicas > updated {
        (
            format!(
                "Waiting for deployment {name:?} rollout to finish: {} old replicas are pending termination...",
                replicas - updated
            ),
            false,
        )
    } else if available < updated {
        (
            format!(
                "Waiting for deployment {name:?} rollout to finish: {available} of {updated} updated replicas are available..."
            ),
            false,
        )
    } else {
        (format!("deployment {name:?} successfully rolled out"), true)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "generation": 3},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}},
                             "spec": {"containers": [{"name": "web", "image": "v1",
                                                      "env": [{"name": "A", "value": "1"}]}]}},
            },
            "status": {"observedGeneration": 3, "replicas": 4, "updatedReplicas": 3,
                       "availableReplicas": 2},
        }))
        .unwrap()
    }

    #[test]
    fn scale_rejects_negative_replicas_naming_the_field() {
        let mut d = web();
        let e = scale(&mut d, -1).unwrap_err().to_string();
        assert!(e.starts_with("spec.replicas: Invalid value: -1"), "{e}");
        assert_eq!(d.spec.replicas, Some(3));
        scale(&mut d, 5).unwrap();
        assert_eq!(d.spec.replicas, Some(5));
    }

    #[test]
    fn set_image_names_an_unknown_container_and_changes_nothing() {
        let mut d = web();
        let e = set_image(
            &mut d,
            &[("web".into(), "v2".into()), ("nope".into(), "x".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"nope\""), "{e}");
        assert_eq!(d, web());
        set_image(&mut d, &[("*".into(), "v3".into())]).unwrap();
        assert_eq!(
            d.spec.template.spec.unwrap().containers[0].image.as_deref(),
            Some("v3")
        );
    }

    #[test]
    fn set_env_sets_replaces_and_removes() {
        let mut d = web();
        let edits: Vec<EnvEdit> = ["B=2", "A=3"].iter().map(|s| s.parse().unwrap()).collect();
        set_env(&mut d, None, &edits).unwrap();
        let env = |d: &Deployment| {
            d.spec.template.spec.as_ref().unwrap().containers[0]
                .env
                .iter()
                .flatten()
                .map(|e| format!("{}={}", e.name, e.value.clone().unwrap_or_default()))
                .collect::<Vec<_>>()
        };
        assert_eq!(env(&d), ["A=3", "B=2"]);
        set_env(&mut d, Some("web"), &["A-".parse().unwrap()]).unwrap();
        assert_eq!(env(&d), ["B=2"]);
        assert!(set_env(&mut d, Some("nope"), &edits).is_err());
        assert!("=x".parse::<EnvEdit>().is_err());
    }

    #[test]
    fn pause_and_resume_refuse_the_state_they_are_in() {
        let mut d = web();
        assert!(
            set_paused(&mut d, false)
                .unwrap_err()
                .to_string()
                .contains("not paused")
        );
        set_paused(&mut d, true).unwrap();
        assert!(
            set_paused(&mut d, true)
                .unwrap_err()
                .to_string()
                .contains("already paused")
        );
        assert!(
            rollback(&mut d, &[], 0)
                .unwrap_err()
                .to_string()
                .contains("resume it first")
        );
    }

    #[test]
    fn rollout_status_speaks_kubectl() {
        let mut d = web();
        assert_eq!(
            rollout_status(&d).unwrap(),
            ("Waiting for deployment \"web\" rollout to finish: 1 old replicas are pending termination...".into(), false)
        );
        d.status.as_mut().unwrap().replicas = Some(3);
        assert_eq!(
            rollout_status(&d).unwrap().0,
            "Waiting for deployment \"web\" rollout to finish: 2 of 3 updated replicas are available..."
        );
        d.status.as_mut().unwrap().available_replicas = Some(3);
        assert_eq!(
            rollout_status(&d).unwrap(),
            ("deployment \"web\" successfully rolled out".into(), true)
        );
        d.status.as_mut().unwrap().updated_replicas = Some(1);
        assert_eq!(
            rollout_status(&d).unwrap().0,
            "Waiting for deployment \"web\" rollout to finish: 1 out of 3 new replicas have been updated..."
        );
        d.metadata.generation = Some(4);
        assert_eq!(
            rollout_status(&d).unwrap().0,
            "Waiting for deployment spec update to be observed..."
        );
    }
}
