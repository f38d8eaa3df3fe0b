//! Deployments between the store and the controller logic
//! ([`vipr_pod_runtime::deployment`]): a thread follows the store's change
//! feed, and whenever a Deployment, one of its ReplicaSets or one of their
//! pods changes it runs the controller's step for that Deployment and
//! applies the actions through the store. Pods it creates are then started
//! by the pod controller like any other; pods it removes terminate
//! gracefully (they leave the endpoints first).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use vipr_pod_runtime::deployment::{self, Action, Observed, Rollback, edit as edits};
use vipr_store::{Event, Kind, Object, ObjectKey, Status, Store, WatchError};

use crate::api::DeploymentEdit;

/// How long a failed step waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest the loop sleeps without a change.
const IDLE_WAKE: Duration = Duration::from_secs(1);

/// The controller thread: step every Deployment, then follow the feed.
pub fn run_loop(store: &Store) {
    'relist: loop {
        let snapshot = store.snapshot();
        let now = Instant::now();
        let mut due: BTreeMap<ObjectKey, Instant> = snapshot
            .objects
            .iter()
            .filter(|o| o.kind() == Kind::Deployment)
            .map(|o| (o.key(), now))
            .collect();
        let mut watcher = store.watch(snapshot.revision);
        loop {
            run_due(store, &mut due);
            let now = Instant::now();
            let wait = due
                .values()
                .min()
                .map_or(IDLE_WAKE, |at| at.saturating_duration_since(now))
                .min(IDLE_WAKE);
            match watcher.next_timeout(wait) {
                Ok(events) => {
                    let now = Instant::now();
                    for key in events.iter().filter_map(|e| deployment_of(store, e)) {
                        due.insert(key, now);
                    }
                }
                Err(WatchError::Compacted { .. }) => {
                    tracing::warn!("deployments fell behind the change feed; listing again");
                    continue 'relist;
                }
            }
        }
    }
}

/// Steps every Deployment whose time came; keeps the ones that asked to be
/// looked at again later.
fn run_due(store: &Store, due: &mut BTreeMap<ObjectKey, Instant>) {
    let now = Instant::now();
    let ready: Vec<ObjectKey> = due
        .iter()
        .filter(|(_, at)| **at <= now)
        .map(|(key, _)| key.clone())
        .collect();
    for key in ready {
        due.remove(&key);
        match sync(store, &key) {
            Ok(Some(after)) => {
                due.insert(key, now + after);
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(deployment = %key, error = %format!("{error:#}"), "deployment step failed; retrying");
                due.insert(key, now + RETRY_AFTER);
            }
        }
    }
}

/// The Deployment an event concerns: itself, the owner of a ReplicaSet, or
/// the owner of a pod's ReplicaSet.
fn deployment_of(store: &Store, event: &Event) -> Option<ObjectKey> {
    let object = event.object.as_ref();
    let namespace = object.metadata().namespace.as_deref()?;
    let owner_named = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
                       kind: &str| {
        deployment::controller_of(meta)
            .filter(|r| r.kind == kind)
            .map(|r| r.name.clone())
    };
    match object {
        Object::Deployment(_) => Some(object.key()),
        Object::ReplicaSet(rs) => owner_named(&rs.metadata, "Deployment")
            .map(|name| ObjectKey::namespaced(Kind::Deployment, namespace, name)),
        Object::Pod(pod) => {
            let rs_name = owner_named(&pod.metadata, "ReplicaSet")?;
            let rs = store.get(&ObjectKey::namespaced(Kind::ReplicaSet, namespace, rs_name))?;
            owner_named(rs.metadata(), "Deployment")
                .map(|name| ObjectKey::namespaced(Kind::Deployment, namespace, name))
        }
        _ => None,
    }
}

/// The ReplicaSets `d` controls, and their pods.
pub fn owned(store: &Store, d: &Deployment) -> (Vec<ReplicaSet>, Vec<Pod>) {
    let namespace = d.metadata.namespace.as_deref();
    let uid = d.metadata.uid.as_deref().unwrap_or_default();
    let replica_sets: Vec<ReplicaSet> = store
        .list(Kind::ReplicaSet, namespace)
        .iter()
        .filter_map(|o| match o.as_ref() {
            Object::ReplicaSet(rs) if deployment::is_controlled_by(&rs.metadata, uid) => {
                Some((**rs).clone())
            }
            _ => None,
        })
        .collect();
    let pods = store
        .list(Kind::Pod, namespace)
        .iter()
        .filter_map(|o| match o.as_ref() {
            Object::Pod(pod)
                if replica_sets.iter().any(|rs| {
                    deployment::is_controlled_by(
                        &pod.metadata,
                        rs.metadata.uid.as_deref().unwrap_or_default(),
                    )
                }) =>
            {
                Some((**pod).clone())
            }
            _ => None,
        })
        .collect();
    (replica_sets, pods)
}

/// One step of one Deployment, applied. Returns when to look again.
pub fn sync(store: &Store, key: &ObjectKey) -> Result<Option<Duration>> {
    let Some(object) = store.get(key) else {
        return Ok(None);
    };
    let Object::Deployment(d) = object.as_ref() else {
        return Ok(None);
    };
    let (replica_sets, pods) = owned(store, d);
    let plan = deployment::step(&Observed {
        deployment: d,
        replica_sets: &replica_sets,
        pods: &pods,
        now: Timestamp::now(),
    })?;
    let namespace = key.namespace().unwrap_or(vipr_store::DEFAULT_NAMESPACE);
    let rs_key = |name: &str| ObjectKey::namespaced(Kind::ReplicaSet, namespace, name);
    let mut new_pods = Vec::new();
    for action in plan.actions {
        match action {
            Action::CreateReplicaSet(rs) => {
                let name = rs.metadata.name.clone().unwrap_or_default();
                if store.get(&rs_key(&name)).is_some() {
                    // Someone else's ReplicaSet has the name: count a collision,
                    // which changes the hash next step.
                    count_collision(store, key, d)?;
                    return Ok(Some(Duration::ZERO));
                }
                tracing::info!(deployment = %key, replicaset = %name, "new revision");
                store.apply(vec![rs.into()])?;
            }
            Action::UpdateReplicaSet(rs) => {
                store.apply(vec![rs.into()])?;
            }
            Action::DeleteReplicaSet(name) => {
                store.delete(&rs_key(&name))?;
            }
            Action::CreatePod(pod) => new_pods.push(pod.into()),
            Action::DeletePod(name) => {
                super::pods::terminate(store, &ObjectKey::namespaced(Kind::Pod, namespace, name))?;
            }
            Action::SetReplicaSetStatus(name, status) => {
                store.update_status(&rs_key(&name), Status::ReplicaSet(status))?;
            }
            Action::SetDeploymentRevision(revision) => {
                let mut edited = store
                    .get(key)
                    .and_then(|o| o.as_deployment().cloned())
                    .context("the deployment went away")?;
                edited
                    .metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert(deployment::REVISION.into(), revision);
                edited.status = None;
                store.apply(vec![edited.into()])?;
            }
            Action::SetDeploymentStatus(status) => {
                store.update_status(key, Status::Deployment(status))?;
            }
        }
    }
    if !new_pods.is_empty() {
        tracing::info!(deployment = %key, pods = new_pods.len(), "creating pods");
        store.apply(new_pods).context("creating pods")?;
    }
    Ok(plan.recheck_after)
}

/// How often an edit is retried when the controller wrote the Deployment
/// (its status) between our read and our write.
const EDIT_ATTEMPTS: usize = 5;

/// Applies one kubectl-like edit to a stored Deployment and stores it (with
/// its resourceVersion: a concurrent write makes us read again and redo the
/// edit, as kubectl does, instead of overwriting it). Returns kubectl's
/// outcome line.
pub fn edit(
    store: &Store,
    namespace: &str,
    name: &str,
    edit: DeploymentEdit,
) -> Result<Vec<String>, String> {
    let key = ObjectKey::namespaced(Kind::Deployment, namespace, name);
    for attempt in 1.. {
        let mut d = store
            .get(&key)
            .and_then(|o| o.as_deployment().cloned())
            .ok_or_else(|| format!("deployments.apps {name:?} not found"))?;
        let done = apply_edit(store, &mut d, &edit).map_err(|e| e.to_string())?;
        d.status = None;
        match store.apply(vec![d.into()]) {
            Ok(_) => return Ok(vec![format!("deployment.apps/{name} {done}")]),
            Err(vipr_store::StoreError::Conflict { .. }) if attempt < EDIT_ATTEMPTS => continue,
            Err(error) => return Err(error.to_string()),
        }
    }
    unreachable!("the loop returns")
}

/// The edit on `d`; kubectl's past-tense word for it.
fn apply_edit(
    store: &Store,
    d: &mut Deployment,
    edit: &DeploymentEdit,
) -> Result<String, edits::EditError> {
    Ok(match edit {
        DeploymentEdit::Scale { replicas } => {
            edits::scale(d, *replicas)?;
            "scaled".into()
        }
        DeploymentEdit::SetImage { images } => {
            edits::set_image(d, images)?;
            "image updated".into()
        }
        DeploymentEdit::SetEnv { container, env } => {
            let env = env
                .iter()
                .map(|e| e.parse())
                .collect::<Result<Vec<edits::EnvEdit>, _>>()?;
            edits::set_env(d, container.as_deref(), &env)?;
            "env updated".into()
        }
        DeploymentEdit::Pause => {
            edits::set_paused(d, true)?;
            "paused".into()
        }
        DeploymentEdit::Resume => {
            edits::set_paused(d, false)?;
            "resumed".into()
        }
        DeploymentEdit::Undo { to_revision } => {
            let (replica_sets, _) = owned(store, d);
            match edits::rollback(d, &replica_sets, *to_revision)? {
                Rollback::RolledBack(_) => "rolled back".into(),
                Rollback::Skipped(revision) => format!(
                    "skipped rollback (current template already matches revision {revision})"
                ),
            }
        }
    })
}

fn count_collision(store: &Store, key: &ObjectKey, d: &Deployment) -> Result<()> {
    let mut status: DeploymentStatus = d.status.clone().unwrap_or_default();
    status.collision_count = Some(status.collision_count.unwrap_or(0) + 1);
    store.update_status(key, Status::Deployment(status))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The controller against a real store (no pods run: tests play the
    //! runtime by writing pod status and removing terminated pods).
    use super::*;
    use k8s_openapi::api::core::v1::PodStatus;

    const WEB: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 3\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n      - {name: web, image: host, command: [vipr-netexec]}\n";

    struct Scratch(std::path::PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn store(tag: &str) -> (Scratch, Store) {
        let dir = std::env::temp_dir().join(format!("vipr-deploy-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(vipr_store::StoreConfig::new(&dir)).unwrap();
        (Scratch(dir), store)
    }

    fn key() -> ObjectKey {
        ObjectKey::namespaced(Kind::Deployment, "default", "web")
    }

    fn pods(store: &Store) -> Vec<Pod> {
        store
            .list(Kind::Pod, Some("default"))
            .iter()
            .filter_map(|o| o.as_pod().cloned())
            .collect()
    }

    fn replica_sets(store: &Store) -> Vec<ReplicaSet> {
        store
            .list(Kind::ReplicaSet, Some("default"))
            .iter()
            .filter_map(|o| match o.as_ref() {
                Object::ReplicaSet(rs) => Some((**rs).clone()),
                _ => None,
            })
            .collect()
    }

    fn deployment(store: &Store) -> Deployment {
        store.get(&key()).unwrap().as_deployment().unwrap().clone()
    }

    /// Plays the runtime: new pods turn ready, terminating ones go away;
    /// steps the controller until nothing changes.
    fn converge(store: &Store) {
        for _ in 0..50 {
            let before = store.revision();
            sync(store, &key()).unwrap();
            for pod in pods(store) {
                let key =
                    ObjectKey::namespaced(Kind::Pod, "default", pod.metadata.name.clone().unwrap());
                if pod.metadata.deletion_timestamp.is_some() {
                    store.delete(&key).unwrap();
                } else if pod.status.is_none() {
                    let status: PodStatus = serde_json::from_value(serde_json::json!({
                        "phase": "Running",
                        "conditions": [{"type": "Ready", "status": "True",
                                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                    }))
                    .unwrap();
                    store.update_status(&key, Status::Pod(status)).unwrap();
                }
            }
            if store.revision() == before {
                return;
            }
        }
        panic!("the deployment did not converge");
    }

    fn edit_ok(store: &Store, change: DeploymentEdit) -> String {
        edit(store, "default", "web", change).unwrap().remove(0)
    }

    #[test]
    fn rollout_scale_and_undo_through_the_store() {
        let (_dir, store) = store("flow");
        store.apply_manifest(WEB).unwrap();
        converge(&store);
        // The controller's revision annotation survives applying the manifest again.
        let again = store.apply_manifest(WEB).unwrap().remove(0);
        assert_eq!(again.outcome, vipr_store::Outcome::Unchanged);
        let rss = replica_sets(&store);
        assert_eq!(rss.len(), 1);
        let rs_name = rss[0].metadata.name.clone().unwrap();
        let hash = &rss[0].metadata.labels.as_ref().unwrap()[deployment::POD_TEMPLATE_HASH];
        assert_eq!(rs_name, format!("web-{hash}"));
        let running = pods(&store);
        assert_eq!(running.len(), 3);
        for pod in &running {
            let name = pod.metadata.name.as_deref().unwrap();
            let suffix = name.strip_prefix(&format!("{rs_name}-")).unwrap();
            assert_eq!(suffix.len(), 5, "{name}");
            assert_eq!(
                pod.metadata.labels.as_ref().unwrap()[deployment::POD_TEMPLATE_HASH],
                *hash
            );
        }
        let status = deployment(&store).status.unwrap();
        assert_eq!(
            (
                status.replicas,
                status.available_replicas,
                status.updated_replicas
            ),
            (Some(3), Some(3), Some(3))
        );
        assert!(edits::rollout_status(&deployment(&store)).unwrap().1);

        // Scaling changes the generation but makes no revision.
        let generation = deployment(&store).metadata.generation;
        assert_eq!(
            edit_ok(&store, DeploymentEdit::Scale { replicas: 5 }),
            "deployment.apps/web scaled"
        );
        assert!(deployment(&store).metadata.generation > generation);
        converge(&store);
        assert_eq!(replica_sets(&store).len(), 1);
        assert_eq!(pods(&store).len(), 5);
        edit_ok(&store, DeploymentEdit::Scale { replicas: 3 });
        converge(&store);
        assert_eq!(pods(&store).len(), 3);

        // A template change: a second revision replaces every pod.
        assert_eq!(
            edit_ok(
                &store,
                DeploymentEdit::SetEnv {
                    container: None,
                    env: vec!["COLOR=blue".into()]
                }
            ),
            "deployment.apps/web env updated"
        );
        converge(&store);
        let rss = replica_sets(&store);
        assert_eq!(rss.len(), 2);
        let new = rss
            .iter()
            .find(|rs| deployment::revision(&rs.metadata) == 2)
            .unwrap();
        assert_eq!(new.spec.replicas, Some(3));
        let new_uid = new.metadata.uid.clone().unwrap();
        assert!(
            pods(&store)
                .iter()
                .all(|p| deployment::is_controlled_by(&p.metadata, &new_uid))
        );
        assert_eq!(
            deployment(&store).metadata.annotations.unwrap()[deployment::REVISION],
            "2"
        );

        // Undo: back to the first template, as revision 3.
        assert_eq!(
            edit_ok(&store, DeploymentEdit::Undo { to_revision: 0 }),
            "deployment.apps/web rolled back"
        );
        converge(&store);
        let history: Vec<i64> = edits::history(&replica_sets(&store))
            .iter()
            .map(|h| h.revision)
            .collect();
        assert_eq!(history, [2, 3]);
        let current = replica_sets(&store)
            .into_iter()
            .find(|rs| deployment::revision(&rs.metadata) == 3)
            .unwrap();
        assert_eq!(current.metadata.name.as_deref(), Some(rs_name.as_str()));
        assert_eq!(pods(&store).len(), 3);

        // Deleting the Deployment removes its ReplicaSets and pods.
        store.delete(&key()).unwrap();
        assert!(replica_sets(&store).is_empty() && pods(&store).is_empty());
    }

    #[test]
    fn bad_edits_name_the_field_and_change_nothing() {
        let (_dir, store) = store("bad");
        store.apply_manifest(WEB).unwrap();
        converge(&store);
        let before = deployment(&store);
        let e = edit(
            &store,
            "default",
            "web",
            DeploymentEdit::SetImage {
                images: vec![("nope".into(), "x".into())],
            },
        )
        .unwrap_err();
        assert!(e.contains("\"nope\""), "{e}");
        let e = edit(
            &store,
            "default",
            "web",
            DeploymentEdit::Scale { replicas: -1 },
        )
        .unwrap_err();
        assert!(e.contains("spec.replicas"), "{e}");
        let e = edit(&store, "default", "nothing", DeploymentEdit::Pause).unwrap_err();
        assert!(e.contains("\"nothing\" not found"), "{e}");
        assert_eq!(deployment(&store), before);
        let both_zero = WEB.replace(
            "  replicas: 3\n",
            "  replicas: 3\n  strategy: {rollingUpdate: {maxSurge: 0, maxUnavailable: 0}}\n",
        );
        let e = store.apply_manifest(&both_zero).unwrap_err().to_string();
        assert!(
            e.contains("spec.strategy.rollingUpdate.maxUnavailable"),
            "{e}"
        );
        let mismatch = WEB.replace("labels: {app: web}", "labels: {app: api}");
        let e = store.apply_manifest(&mismatch).unwrap_err().to_string();
        assert!(e.contains("spec.template.metadata.labels"), "{e}");
        assert_eq!(deployment(&store), before);
    }
}
