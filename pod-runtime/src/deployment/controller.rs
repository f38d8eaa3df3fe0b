//! The step function: one Deployment's observed state (itself, the
//! ReplicaSets it controls, their pods, the time) in, the [`Action`]s that
//! move it toward its spec out. It is level-triggered and idempotent: the
//! agent runs it on every relevant change and applies what it returns; the
//! next run sees the result.
//!
//! One step does the work of Kubernetes' Deployment controller (which
//! ReplicaSet is the current revision, how many replicas each gets under
//! the strategy, history cleanup, status and conditions) and of its
//! ReplicaSet controller (pods to create and delete per ReplicaSet).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec, ReplicaSetStatus,
};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;

use super::strategy::{self, BadValue, Strategy};
use super::{
    CHANGE_CAUSE, DESIRED_REPLICAS, MAX_REPLICAS, POD_TEMPLATE_HASH, REVISION, change_cause,
    owner_reference, pod_template_hash, revision, spec_replicas,
};

/// What the controller sees of one Deployment.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub deployment: &'a Deployment,
    /// The ReplicaSets the Deployment controls (ownerReference with its uid).
    pub replica_sets: &'a [ReplicaSet],
    /// The pods those ReplicaSets control, terminating ones included.
    pub pods: &'a [Pod],
    pub now: Timestamp,
}

/// One change to make through the store.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // built once per change, moved straight into the store
pub enum Action {
    /// A new revision. Its pods come in a later step, once it has a uid.
    CreateReplicaSet(ReplicaSet),
    /// A stored ReplicaSet with new replicas or annotations.
    UpdateReplicaSet(ReplicaSet),
    /// An old revision beyond `revisionHistoryLimit`.
    DeleteReplicaSet(String),
    /// A pod of a ReplicaSet (named by the store from `generateName`).
    CreatePod(Pod),
    /// A pod to terminate gracefully.
    DeletePod(String),
    SetReplicaSetStatus(String, ReplicaSetStatus),
    SetDeploymentStatus(DeploymentStatus),
    /// The Deployment's `deployment.kubernetes.io/revision` annotation.
    SetDeploymentRevision(String),
}

/// The actions of one step and when to look again without a change (a pod
/// becoming available after `minReadySeconds`, the progress deadline).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub recheck_after: Option<Duration>,
}

impl Plan {
    fn recheck_in(&mut self, millis: i64) {
        let after = Duration::from_millis(millis.max(0) as u64);
        self.recheck_after = Some(self.recheck_after.map_or(after, |d| d.min(after)));
    }
}

pub const AVAILABLE: &str = "Available";
pub const PROGRESSING: &str = "Progressing";
pub const NEW_RS_AVAILABLE: &str = "NewReplicaSetAvailable";
pub const TIMED_OUT: &str = "ProgressDeadlineExceeded";
pub const PAUSED: &str = "DeploymentPaused";

/// One step for `observed`. Fails only on a strategy value validation lets
/// through nowhere (the store rejects it on apply).
pub fn step(observed: &Observed<'_>) -> Result<Plan, BadValue> {
    let d = observed.deployment;
    let mut plan = Plan::default();
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(plan);
    }
    let desired = d.spec.replicas.unwrap_or(1).max(0);
    let strategy = strategy::resolve(d, desired)?;
    let paused = d.spec.paused == Some(true);
    let min_ready_ms = i64::from(d.spec.min_ready_seconds.unwrap_or(0)) * 1000;
    let now_ms = observed.now.as_millisecond();

    let mut sets = revisions(observed, min_ready_ms, now_ms, &mut plan);
    let new = sets
        .iter()
        .position(|s| template_matches(s.stored, &d.spec.template));
    let max_old_revision = sets
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != new)
        .map(|(_, s)| s.revision)
        .max()
        .unwrap_or(0);

    let Some(new) = new else {
        if paused {
            // A paused rollout makes no new revision; it only keeps pods.
            reconcile_pods(&sets, &mut plan);
            set_statuses(observed, &sets, None, strategy, &mut plan, None);
            return Ok(plan);
        }
        let rs = new_replica_set(observed, strategy, &sets, max_old_revision + 1);
        let name = rs.metadata.name.clone().unwrap_or_default();
        plan.actions.push(Action::CreateReplicaSet(rs));
        set_statuses(observed, &sets, None, strategy, &mut plan, Some(&name));
        return Ok(plan);
    };

    // The current template's revision is always the newest (also after an undo).
    if sets[new].revision <= max_old_revision {
        sets[new].revision = max_old_revision + 1;
    }
    let change_cause = change_cause(&d.metadata);
    sets[new].change_cause = change_cause.cloned().or(sets[new].change_cause.take());

    if paused {
        // Scaling still applies to a Deployment that is not mid-rollout.
        if sets
            .iter()
            .enumerate()
            .all(|(i, s)| i == new || s.replicas == 0)
        {
            sets[new].replicas = desired;
        }
    } else {
        scale(&mut sets, new, desired, strategy);
    }
    for set in &sets {
        if let Some(updated) = set.updated(desired, strategy) {
            plan.actions.push(Action::UpdateReplicaSet(updated));
        }
    }
    reconcile_pods(&sets, &mut plan);
    if !paused {
        clean_up_history(d, &sets, new, &mut plan);
    }
    let revision = sets[new].revision.to_string();
    if d.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        != Some(&revision)
    {
        plan.actions.push(Action::SetDeploymentRevision(revision));
    }
    set_statuses(observed, &sets, Some(new), strategy, &mut plan, None);
    Ok(plan)
}

/// One ReplicaSet with its pods, and what this step plans for it.
struct Revision<'a> {
    stored: &'a ReplicaSet,
    name: &'a str,
    revision: i64,
    change_cause: Option<String>,
    /// Planned `spec.replicas`.
    replicas: i32,
    /// Pods not terminating, in the order they should be removed.
    active: Vec<&'a Pod>,
    ready: i32,
    available: i32,
    terminating: i32,
}

impl Revision<'_> {
    /// The ReplicaSet as it should be stored, if that differs.
    fn updated(&self, desired: i32, strategy: Strategy) -> Option<ReplicaSet> {
        let mut rs = self.stored.clone();
        rs.spec.replicas = Some(self.replicas);
        let annotations = rs.metadata.annotations.get_or_insert_with(Default::default);
        annotations.insert(REVISION.into(), self.revision.to_string());
        if let Some(cause) = &self.change_cause {
            annotations.insert(CHANGE_CAUSE.into(), cause.clone());
        }
        if spec_replicas(self.stored) != self.replicas {
            annotations.insert(DESIRED_REPLICAS.into(), desired.to_string());
            annotations.insert(
                MAX_REPLICAS.into(),
                (desired + strategy.max_surge()).to_string(),
            );
        }
        (rs != *self.stored).then_some(rs)
    }
}

/// The ReplicaSets oldest revision first, each with its pods counted.
fn revisions<'a>(
    observed: &Observed<'a>,
    min_ready_ms: i64,
    now_ms: i64,
    plan: &mut Plan,
) -> Vec<Revision<'a>> {
    let mut by_owner: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
    for pod in observed.pods {
        if let Some(owner) = super::controller_of(&pod.metadata) {
            by_owner.entry(owner.uid.as_str()).or_default().push(pod);
        }
    }
    let mut sets: Vec<Revision<'a>> = observed
        .replica_sets
        .iter()
        .map(|rs| {
            let uid = rs.metadata.uid.as_deref().unwrap_or_default();
            let pods = by_owner.remove(uid).unwrap_or_default();
            let (terminating, mut active): (Vec<&Pod>, Vec<&Pod>) = pods
                .into_iter()
                .partition(|p| p.metadata.deletion_timestamp.is_some());
            active.sort_by(|a, b| removal_order(a, b));
            let mut ready = 0;
            let mut available = 0;
            for pod in &active {
                if let Some(since) = ready_since_ms(pod) {
                    ready += 1;
                    let available_at = since + min_ready_ms;
                    if available_at <= now_ms {
                        available += 1;
                    } else {
                        plan.recheck_in(available_at - now_ms);
                    }
                }
            }
            Revision {
                stored: rs,
                name: rs.metadata.name.as_deref().unwrap_or_default(),
                revision: revision(&rs.metadata),
                change_cause: change_cause(&rs.metadata).cloned(),
                replicas: spec_replicas(rs),
                active,
                ready,
                available,
                terminating: terminating.len() as i32,
            }
        })
        .collect();
    sets.sort_by(|a, b| {
        (a.revision, created(&a.stored.metadata), a.name).cmp(&(
            b.revision,
            created(&b.stored.metadata),
            b.name,
        ))
    });
    sets
}

/// Scale-down order: pods that are not ready first, then the newest.
fn removal_order(a: &Pod, b: &Pod) -> std::cmp::Ordering {
    let ready = |p: &Pod| ready_since_ms(p).is_some();
    ready(a)
        .cmp(&ready(b))
        .then_with(|| created(&b.metadata).cmp(&created(&a.metadata)))
        .then_with(|| b.metadata.name.cmp(&a.metadata.name))
}

fn created(meta: &ObjectMeta) -> Option<Timestamp> {
    meta.creation_timestamp.as_ref().map(|t| t.0)
}

/// When the pod's Ready condition last turned True, if it is ready now.
fn ready_since_ms(pod: &Pod) -> Option<i64> {
    let condition = pod
        .status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready" && c.status == "True")?;
    Some(
        condition
            .last_transition_time
            .as_ref()
            .map_or(i64::MIN / 2, |t| t.0.as_millisecond()),
    )
}

/// Whether the ReplicaSet runs `template` (its own hash label aside).
fn template_matches(rs: &ReplicaSet, template: &PodTemplateSpec) -> bool {
    let Some(mut own) = rs.spec.template.clone() else {
        return false;
    };
    if let Some(labels) = own.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.remove(POD_TEMPLATE_HASH);
    }
    own == *template
}

/// The ReplicaSet of the Deployment's current template. Its name is
/// `<deployment>-<hash>`; a name some older revision already has (a hash
/// collision) is resolved by counting collisions into the hash.
fn new_replica_set(
    observed: &Observed<'_>,
    strategy: Strategy,
    sets: &[Revision<'_>],
    revision: i64,
) -> ReplicaSet {
    let d = observed.deployment;
    let desired = d.spec.replicas.unwrap_or(1).max(0);
    let mut collisions = d.status.as_ref().and_then(|s| s.collision_count);
    let (name, hash) = loop {
        let hash = pod_template_hash(&d.spec.template, collisions);
        let name = format!("{}-{hash}", d.metadata.name.as_deref().unwrap_or_default());
        if !sets.iter().any(|s| s.name == name) {
            break (name, hash);
        }
        collisions = Some(collisions.unwrap_or(0) + 1);
    };
    let mut template = d.spec.template.clone();
    let template_meta = template.metadata.get_or_insert_with(Default::default);
    let labels = template_meta.labels.get_or_insert_with(Default::default);
    labels.insert(POD_TEMPLATE_HASH.into(), hash.clone());
    let labels = labels.clone();
    let mut selector = d.spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(Default::default)
        .insert(POD_TEMPLATE_HASH.into(), hash);
    let all: i32 = sets.iter().map(|s| s.replicas).sum();
    let replicas = match strategy {
        Strategy::RollingUpdate { max_surge, .. } => {
            strategy::new_replicas(desired, max_surge, all, 0)
        }
        // Recreate scales it up once every old pod is gone.
        Strategy::Recreate
            if sets
                .iter()
                .all(|s| s.active.is_empty() && s.terminating == 0) =>
        {
            desired
        }
        Strategy::Recreate => 0,
    };
    let mut annotations = BTreeMap::from([
        (REVISION.to_owned(), revision.to_string()),
        (DESIRED_REPLICAS.to_owned(), desired.to_string()),
        (
            MAX_REPLICAS.to_owned(),
            (desired + strategy.max_surge()).to_string(),
        ),
    ]);
    if let Some(cause) = change_cause(&d.metadata) {
        annotations.insert(CHANGE_CAUSE.into(), cause.clone());
    }
    ReplicaSet {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: d.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![owner_reference("Deployment", &d.metadata)]),
            ..Default::default()
        },
        spec: ReplicaSetSpec {
            replicas: Some(replicas),
            min_ready_seconds: d.spec.min_ready_seconds,
            selector,
            template: Some(template),
        },
        status: None,
    }
}

/// Plans every ReplicaSet's replicas under the strategy (Kubernetes'
/// `rolloutRolling` / `rolloutRecreate`, both halves in one step).
fn scale(sets: &mut [Revision<'_>], new: usize, desired: i32, strategy: Strategy) {
    let count = sets.len();
    let olds = || (0..count).filter(move |i| *i != new);
    match strategy {
        Strategy::Recreate => {
            for i in olds() {
                sets[i].replicas = 0;
            }
            let old_pods_left =
                olds().any(|i| !sets[i].active.is_empty() || sets[i].terminating > 0);
            if !old_pods_left {
                sets[new].replicas = desired;
            }
        }
        Strategy::RollingUpdate {
            max_surge,
            max_unavailable,
        } => {
            let all: i32 = sets.iter().map(|s| s.replicas).sum();
            sets[new].replicas =
                strategy::new_replicas(desired, max_surge, all, sets[new].replicas);
            if olds().all(|i| sets[i].replicas == 0) {
                return;
            }
            let all: i32 = sets.iter().map(|s| s.replicas).sum();
            // Unhealthy old pods first: they would otherwise block the rollout.
            let mut budget = strategy::max_scale_down(
                desired,
                max_unavailable,
                all,
                sets[new].replicas,
                sets[new].available,
            );
            for i in olds().collect::<Vec<_>>() {
                let unhealthy = (sets[i].replicas - sets[i].available).max(0);
                let take = unhealthy.min(budget);
                sets[i].replicas -= take;
                budget -= take;
            }
            // Then available ones, as long as enough stay available.
            let available: i32 = sets.iter().map(|s| s.available).sum();
            let mut removable = (available - (desired - max_unavailable)).max(0);
            for i in olds().collect::<Vec<_>>() {
                let take = sets[i].replicas.min(removable);
                sets[i].replicas -= take;
                removable -= take;
            }
        }
    }
}

/// The ReplicaSet controller's half: pods to create or remove so each
/// ReplicaSet has its planned replicas.
fn reconcile_pods(sets: &[Revision<'_>], plan: &mut Plan) {
    for set in sets {
        let have = set.active.len() as i32;
        if set.replicas > have && set.stored.metadata.uid.is_some() {
            for _ in have..set.replicas {
                plan.actions.push(Action::CreatePod(pod_for(set.stored)));
            }
        }
        for pod in set
            .active
            .iter()
            .take((have - set.replicas).max(0) as usize)
        {
            let name = pod.metadata.name.clone().unwrap_or_default();
            plan.actions.push(Action::DeletePod(name));
        }
    }
}

/// A pod of `rs`'s template, owned by it.
fn pod_for(rs: &ReplicaSet) -> Pod {
    let template = rs.spec.template.clone().unwrap_or_default();
    let meta = template.metadata.unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!(
                "{}-",
                rs.metadata.name.as_deref().unwrap_or_default()
            )),
            namespace: rs.metadata.namespace.clone(),
            labels: meta.labels,
            annotations: meta.annotations,
            owner_references: Some(vec![owner_reference("ReplicaSet", &rs.metadata)]),
            ..Default::default()
        },
        spec: template.spec,
        status: None,
    }
}

/// Old revisions scaled to zero and empty, beyond `revisionHistoryLimit`,
/// oldest first.
fn clean_up_history(d: &Deployment, sets: &[Revision<'_>], new: usize, plan: &mut Plan) {
    let limit = d.spec.revision_history_limit.unwrap_or(10).max(0) as usize;
    let idle: Vec<&Revision<'_>> = sets
        .iter()
        .enumerate()
        .filter(|(i, s)| {
            *i != new
                && s.replicas == 0
                && s.active.is_empty()
                && s.terminating == 0
                && s.stored.metadata.deletion_timestamp.is_none()
        })
        .map(|(_, s)| s)
        .collect();
    let excess = idle.len().saturating_sub(limit);
    for set in idle.into_iter().take(excess) {
        plan.actions
            .push(Action::DeleteReplicaSet(set.name.to_owned()));
    }
}

/// ReplicaSet statuses from their pods, and the Deployment's status with
/// kubectl's conditions.
fn set_statuses(
    observed: &Observed<'_>,
    sets: &[Revision<'_>],
    new: Option<usize>,
    strategy: Strategy,
    plan: &mut Plan,
    created: Option<&str>,
) {
    for set in sets {
        let status = ReplicaSetStatus {
            replicas: set.active.len() as i32,
            fully_labeled_replicas: Some(set.active.len() as i32),
            ready_replicas: Some(set.ready),
            available_replicas: Some(set.available),
            terminating_replicas: Some(set.terminating),
            observed_generation: set.stored.metadata.generation,
            conditions: None,
        };
        if set.stored.status.as_ref() != Some(&status) {
            plan.actions
                .push(Action::SetReplicaSetStatus(set.name.to_owned(), status));
        }
    }
    let status = deployment_status(observed, sets, new, strategy, created, plan);
    if observed.deployment.status.as_ref() != Some(&status) {
        plan.actions.push(Action::SetDeploymentStatus(status));
    }
}

fn deployment_status(
    observed: &Observed<'_>,
    sets: &[Revision<'_>],
    new: Option<usize>,
    strategy: Strategy,
    created: Option<&str>,
    plan: &mut Plan,
) -> DeploymentStatus {
    let d = observed.deployment;
    let old = d.status.clone().unwrap_or_default();
    let desired = d.spec.replicas.unwrap_or(1).max(0);
    let sum = |f: fn(&Revision<'_>) -> i32| sets.iter().map(f).sum::<i32>();
    let replicas = sum(|s| s.active.len() as i32);
    let available = sum(|s| s.available);
    let updated = new.map_or(0, |n| sets[n].active.len() as i32);
    let planned = sum(|s| s.replicas);
    let mut status = DeploymentStatus {
        replicas: Some(replicas),
        updated_replicas: Some(updated),
        ready_replicas: Some(sum(|s| s.ready)),
        available_replicas: Some(available),
        unavailable_replicas: Some((planned.max(desired) - available).max(0)),
        terminating_replicas: Some(sum(|s| s.terminating)),
        observed_generation: d.metadata.generation,
        collision_count: old.collision_count,
        conditions: old.conditions.clone(),
    };
    let now = Time(observed.now);
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    if available >= desired - strategy.max_unavailable() {
        set_condition(
            conditions,
            condition(
                AVAILABLE,
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
                &now,
            ),
            false,
        );
    } else {
        set_condition(
            conditions,
            condition(
                AVAILABLE,
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
                &now,
            ),
            false,
        );
    }
    let rs_name = created.or(new.map(|n| sets[n].name)).unwrap_or_default();
    let reason = |c: &[DeploymentCondition]| find(c, PROGRESSING).and_then(|c| c.reason.clone());
    if d.spec.paused == Some(true) {
        if reason(conditions).as_deref() != Some(PAUSED) {
            set_condition(
                conditions,
                condition(PROGRESSING, "Unknown", PAUSED, "Deployment is paused", &now),
                false,
            );
        }
        return status;
    }
    if reason(conditions).as_deref() == Some(PAUSED) {
        set_condition(
            conditions,
            condition(
                PROGRESSING,
                "Unknown",
                "DeploymentResumed",
                "Deployment is resumed",
                &now,
            ),
            false,
        );
    }
    if created.is_none() && timed_out_on_another(conditions, rs_name) {
        // The template moved on (`rollout undo` to a revision that still
        // has its ReplicaSet): the old rollout's deadline says nothing of
        // this one, which gets a deadline of its own from now.
        let message = format!("Found new replica set {rs_name:?}");
        set_condition(
            conditions,
            condition(PROGRESSING, "True", "FoundNewReplicaSet", &message, &now),
            false,
        );
    }
    if let Some(name) = created {
        let message = format!("Created new replica set {name:?}");
        set_condition(
            conditions,
            condition(PROGRESSING, "True", "NewReplicaSetCreated", &message, &now),
            false,
        );
        return status;
    }
    if find(conditions, PROGRESSING).is_none() {
        let message = format!("Found new replica set {rs_name:?}");
        set_condition(
            conditions,
            condition(PROGRESSING, "True", "FoundNewReplicaSet", &message, &now),
            false,
        );
    }
    let complete = updated == desired
        && replicas == desired
        && available == desired
        && status.observed_generation >= d.metadata.generation;
    let already_complete =
        replicas == updated && reason(conditions).as_deref() == Some(NEW_RS_AVAILABLE);
    if !already_complete {
        let progressed = updated > old.updated_replicas.unwrap_or(0)
            || replicas - updated < old.replicas.unwrap_or(0) - old.updated_replicas.unwrap_or(0)
            || status.ready_replicas > Some(old.ready_replicas.unwrap_or(0))
            || available > old.available_replicas.unwrap_or(0);
        if complete {
            let message = format!("ReplicaSet {rs_name:?} has successfully progressed.");
            set_condition(
                conditions,
                condition(PROGRESSING, "True", NEW_RS_AVAILABLE, &message, &now),
                false,
            );
        } else if progressed {
            let message = format!("ReplicaSet {rs_name:?} is progressing.");
            set_condition(
                conditions,
                condition(PROGRESSING, "True", "ReplicaSetUpdated", &message, &now),
                true,
            );
        } else if let Some(deadline_ms) = progress_deadline_ms(d, conditions) {
            let left = deadline_ms - observed.now.as_millisecond();
            if left <= 0 {
                let message = format!("ReplicaSet {rs_name:?} has timed out progressing.");
                set_condition(
                    conditions,
                    condition(PROGRESSING, "False", TIMED_OUT, &message, &now),
                    false,
                );
            } else {
                plan.recheck_in(left);
            }
        }
        if !complete && let Some(deadline_ms) = progress_deadline_ms(d, conditions) {
            plan.recheck_in(deadline_ms - observed.now.as_millisecond());
        }
    }
    status
}

/// Whether the Progressing condition is a timeout of a ReplicaSet other than
/// `rs_name` (its message names the ReplicaSet, as Kubernetes writes it).
fn timed_out_on_another(conditions: &[DeploymentCondition], rs_name: &str) -> bool {
    find(conditions, PROGRESSING).is_some_and(|c| {
        c.reason.as_deref() == Some(TIMED_OUT)
            && !c
                .message
                .as_deref()
                .unwrap_or_default()
                .contains(&format!("{rs_name:?}"))
    })
}

/// When a rollout still in progress times out (its last progress plus
/// `progressDeadlineSeconds`), unless it already has.
fn progress_deadline_ms(d: &Deployment, conditions: &[DeploymentCondition]) -> Option<i64> {
    let seconds = d.spec.progress_deadline_seconds?;
    let c = find(conditions, PROGRESSING)?;
    if matches!(c.reason.as_deref(), Some(NEW_RS_AVAILABLE | TIMED_OUT)) {
        return None;
    }
    let since = c.last_update_time.as_ref()?.0.as_millisecond();
    Some(since + i64::from(seconds) * 1000)
}

fn find<'c>(conditions: &'c [DeploymentCondition], type_: &str) -> Option<&'c DeploymentCondition> {
    conditions
        .iter()
        .find(|c| c.type_.as_deref() == Some(type_))
}

fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: &Time,
) -> DeploymentCondition {
    DeploymentCondition {
        type_: Some(type_.into()),
        status: Some(status.into()),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now.clone()),
    }
}

/// Kubernetes' `SetDeploymentCondition`: the same status and reason is left
/// alone (unless `refresh`, which moves `lastUpdateTime`: progress was
/// made); a transition time survives while the status stays the same.
fn set_condition(
    conditions: &mut Vec<DeploymentCondition>,
    mut new: DeploymentCondition,
    refresh: bool,
) {
    let existing = conditions.iter().position(|c| c.type_ == new.type_);
    if let Some(i) = existing {
        let old = &conditions[i];
        if old.status == new.status {
            if old.reason == new.reason && !refresh {
                return;
            }
            new.last_transition_time = old.last_transition_time.clone();
        }
        conditions[i] = new;
    } else {
        conditions.push(new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deployment::edit;
    use serde_json::json;

    const T0: i64 = 1_800_000_000;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(T0 + seconds).unwrap()
    }

    fn deployment(replicas: i32, strategy: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "d-uid", "generation": 1},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": "web"}},
                "strategy": strategy,
                "revisionHistoryLimit": 10,
                "progressDeadlineSeconds": 600,
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "web", "image": "v1"}]},
                },
            },
        }))
        .unwrap()
    }

    fn rolling(surge: serde_json::Value, unavailable: serde_json::Value) -> serde_json::Value {
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}})
    }

    /// A stand-in for the store and the runtime: applies plans like the
    /// agent does and lets tests make pods ready or finish terminating.
    struct World {
        d: Deployment,
        rss: Vec<ReplicaSet>,
        pods: Vec<Pod>,
        now: Timestamp,
        uids: u32,
        last: Plan,
    }

    impl World {
        fn new(d: Deployment) -> World {
            World {
                d,
                rss: Vec::new(),
                pods: Vec::new(),
                now: at(0),
                uids: 0,
                last: Plan::default(),
            }
        }

        fn uid(&mut self) -> String {
            self.uids += 1;
            format!("uid-{}", self.uids)
        }

        fn step(&mut self) -> Plan {
            let plan = step(&Observed {
                deployment: &self.d,
                replica_sets: &self.rss,
                pods: &self.pods,
                now: self.now,
            })
            .unwrap();
            for action in plan.actions.clone() {
                match action {
                    Action::CreateReplicaSet(mut rs) => {
                        rs.metadata.uid = Some(self.uid());
                        rs.metadata.creation_timestamp = Some(Time(self.now));
                        rs.metadata.generation = Some(1);
                        assert!(!self.rss.iter().any(|r| r.metadata.name == rs.metadata.name));
                        self.rss.push(rs);
                    }
                    Action::UpdateReplicaSet(rs) => {
                        let stored = self.rs_mut(rs.metadata.name.as_deref().unwrap());
                        let status = stored.status.take();
                        *stored = rs;
                        stored.status = status;
                    }
                    Action::DeleteReplicaSet(name) => self
                        .rss
                        .retain(|r| r.metadata.name.as_deref() != Some(&name)),
                    Action::CreatePod(mut pod) => {
                        let n = self.uid();
                        let prefix = pod.metadata.generate_name.take().unwrap();
                        pod.metadata.name = Some(format!("{prefix}{n}"));
                        pod.metadata.uid = Some(n);
                        pod.metadata.creation_timestamp = Some(Time(self.now));
                        self.pods.push(pod);
                    }
                    Action::DeletePod(name) => {
                        let now = self.now;
                        let pod = self.pod_mut(&name);
                        assert!(
                            pod.metadata.deletion_timestamp.is_none(),
                            "{name} deleted twice"
                        );
                        pod.metadata.deletion_timestamp = Some(Time(now));
                    }
                    Action::SetReplicaSetStatus(name, status) => {
                        self.rs_mut(&name).status = Some(status)
                    }
                    Action::SetDeploymentStatus(status) => self.d.status = Some(status),
                    Action::SetDeploymentRevision(r) => {
                        self.d
                            .metadata
                            .annotations
                            .get_or_insert_with(Default::default)
                            .insert(REVISION.into(), r);
                    }
                }
            }
            self.last = plan.clone();
            plan
        }

        /// Steps until nothing changes (at most 20 steps).
        fn settle(&mut self) {
            for _ in 0..20 {
                if self.step().actions.is_empty() {
                    return;
                }
            }
            panic!("no fixed point: last plan {:?}", self.last);
        }

        fn rs_mut(&mut self, name: &str) -> &mut ReplicaSet {
            self.rss
                .iter_mut()
                .find(|r| r.metadata.name.as_deref() == Some(name))
                .unwrap()
        }

        fn pod_mut(&mut self, name: &str) -> &mut Pod {
            self.pods
                .iter_mut()
                .find(|p| p.metadata.name.as_deref() == Some(name))
                .unwrap()
        }

        fn make_ready(&mut self, count: usize) {
            let now = self.now;
            for pod in self
                .pods
                .iter_mut()
                .filter(|p| p.metadata.deletion_timestamp.is_none() && ready_since_ms(p).is_none())
                .take(count)
            {
                pod.status = Some(
                    serde_json::from_value(json!({
                        "phase": "Running",
                        "conditions": [{"type": "Ready", "status": "True",
                                        "lastTransitionTime": Time(now)}],
                    }))
                    .unwrap(),
                );
            }
        }

        fn finish_terminating(&mut self) {
            self.pods
                .retain(|p| p.metadata.deletion_timestamp.is_none());
        }

        fn active(&self) -> Vec<&Pod> {
            self.pods
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect()
        }

        fn available(&self) -> usize {
            self.active()
                .iter()
                .filter(|p| ready_since_ms(p).is_some())
                .count()
        }

        fn image_of(pod: &Pod) -> &str {
            pod.spec.as_ref().unwrap().containers[0]
                .image
                .as_deref()
                .unwrap()
        }

        fn images(&self) -> Vec<&str> {
            let mut images: Vec<&str> = self.active().into_iter().map(World::image_of).collect();
            images.sort();
            images
        }

        fn condition(&self, type_: &str) -> (String, String) {
            let c = find(
                self.d.status.as_ref().unwrap().conditions.as_ref().unwrap(),
                type_,
            )
            .unwrap_or_else(|| panic!("no {type_} condition"));
            (c.status.clone().unwrap(), c.reason.clone().unwrap())
        }

        fn status(&self) -> DeploymentStatus {
            self.d.status.clone().unwrap()
        }

        /// Brings up a fresh Deployment: all pods created and ready.
        fn rolled_out(d: Deployment) -> World {
            let mut w = World::new(d);
            for _ in 0..10 {
                w.settle();
                w.make_ready(usize::MAX);
            }
            w.settle();
            w
        }

        /// Changes the template (a new image) as `set image` would.
        fn set_image(&mut self, image: &str) {
            edit::set_image(&mut self.d, &[("web".into(), image.into())]).unwrap();
            self.bump_generation();
        }

        fn bump_generation(&mut self) {
            self.d.metadata.generation = Some(self.d.metadata.generation.unwrap() + 1);
        }
    }

    #[test]
    fn a_new_deployment_gets_one_revision_and_its_pods() {
        let mut w = World::new(deployment(3, rolling(json!("25%"), json!("25%"))));
        let plan = w.step();
        let [
            Action::CreateReplicaSet(rs),
            Action::SetDeploymentStatus(status),
        ] = plan.actions.as_slice()
        else {
            panic!("{plan:?}");
        };
        let hash = rs.metadata.labels.as_ref().unwrap()[POD_TEMPLATE_HASH].clone();
        assert_eq!(
            rs.metadata.name.as_deref(),
            Some(format!("web-{hash}").as_str())
        );
        assert_eq!(revision(&rs.metadata), 1);
        assert_eq!(rs.spec.replicas, Some(3));
        assert_eq!(
            rs.spec.selector.match_labels.as_ref().unwrap()[POD_TEMPLATE_HASH],
            hash
        );
        assert_eq!(
            rs.metadata.owner_references.as_ref().unwrap()[0].uid,
            "d-uid"
        );
        let progressing = find(status.conditions.as_ref().unwrap(), PROGRESSING).unwrap();
        assert_eq!(progressing.reason.as_deref(), Some("NewReplicaSetCreated"));

        let plan = w.step();
        let created: Vec<&Pod> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::CreatePod(p) => Some(p),
                _ => None,
            })
            .collect();
        assert_eq!(created.len(), 3);
        for pod in created {
            assert_eq!(
                pod.metadata.generate_name.as_deref(),
                Some(format!("web-{hash}-").as_str())
            );
            assert_eq!(
                pod.metadata.labels.as_ref().unwrap()[POD_TEMPLATE_HASH],
                hash
            );
            assert_eq!(
                pod.metadata.owner_references.as_ref().unwrap()[0].kind,
                "ReplicaSet"
            );
        }
        w.settle();
        assert_eq!(w.status().replicas, Some(3));
        assert_eq!(w.status().available_replicas, Some(0));
        assert_eq!(
            w.condition(AVAILABLE),
            ("False".into(), "MinimumReplicasUnavailable".into())
        );
        w.make_ready(3);
        w.settle();
        assert_eq!(w.status().ready_replicas, Some(3));
        assert_eq!(w.status().updated_replicas, Some(3));
        assert_eq!(
            w.condition(AVAILABLE),
            ("True".into(), "MinimumReplicasAvailable".into())
        );
        assert_eq!(
            w.condition(PROGRESSING),
            ("True".into(), NEW_RS_AVAILABLE.into())
        );
        assert_eq!(w.d.metadata.annotations.as_ref().unwrap()[REVISION], "1");
        assert!(edit::rollout_status(&w.d).unwrap().1);
    }

    /// The step function as a table: a Deployment mid-rollout (old pods
    /// and new pods, some ready) and what one step plans.
    #[test]
    fn rolling_update_steps() {
        struct Row {
            desired: i32,
            surge: serde_json::Value,
            unavailable: serde_json::Value,
            /// (replicas, pods, ready pods) of the old and the new revision.
            old: (i32, usize, usize),
            new: (i32, usize, usize),
            /// Planned replicas of old and new, pods created, pods deleted.
            expect: (i32, i32, usize, usize),
        }
        let rows = [
            // 3 replicas, 25%/25%: surge 1, unavailable 0. Start: one new pod.
            Row {
                desired: 3,
                surge: json!("25%"),
                unavailable: json!("25%"),
                old: (3, 3, 3),
                new: (0, 0, 0),
                expect: (3, 1, 1, 0),
            },
            // The surge pod is not ready: nothing more.
            Row {
                desired: 3,
                surge: json!("25%"),
                unavailable: json!("25%"),
                old: (3, 3, 3),
                new: (1, 1, 0),
                expect: (3, 1, 0, 0),
            },
            // It is ready: one old pod goes.
            Row {
                desired: 3,
                surge: json!("25%"),
                unavailable: json!("25%"),
                old: (3, 3, 3),
                new: (1, 1, 1),
                expect: (2, 1, 0, 1),
            },
            // The old pod went: the next new one.
            Row {
                desired: 3,
                surge: json!("25%"),
                unavailable: json!("25%"),
                old: (2, 2, 2),
                new: (1, 1, 1),
                expect: (2, 2, 1, 0),
            },
            // maxSurge 0, maxUnavailable 1: an old pod goes first.
            Row {
                desired: 3,
                surge: json!(0),
                unavailable: json!(1),
                old: (3, 3, 3),
                new: (0, 0, 0),
                expect: (2, 0, 0, 1),
            },
            // ...and then a new one takes its place.
            Row {
                desired: 3,
                surge: json!(0),
                unavailable: json!(1),
                old: (2, 2, 2),
                new: (0, 0, 0),
                expect: (2, 1, 1, 0),
            },
            // 100% surge: every new pod at once, old ones stay until those are ready.
            Row {
                desired: 3,
                surge: json!("100%"),
                unavailable: json!(0),
                old: (3, 3, 3),
                new: (0, 0, 0),
                expect: (3, 3, 3, 0),
            },
            Row {
                desired: 3,
                surge: json!("100%"),
                unavailable: json!(0),
                old: (3, 3, 3),
                new: (3, 3, 3),
                expect: (0, 3, 0, 3),
            },
            // Old pods that are not ready: none may go while the new one is not ready...
            Row {
                desired: 3,
                surge: json!(1),
                unavailable: json!(0),
                old: (3, 3, 1),
                new: (1, 1, 0),
                expect: (3, 1, 0, 0),
            },
            // ...then an unready one goes although fewer than desired are available.
            Row {
                desired: 3,
                surge: json!(1),
                unavailable: json!(0),
                old: (3, 3, 1),
                new: (1, 1, 1),
                expect: (2, 1, 0, 1),
            },
            // 10 replicas, 25%/25%: surge 3, unavailable 2.
            Row {
                desired: 10,
                surge: json!("25%"),
                unavailable: json!("25%"),
                old: (10, 10, 10),
                new: (3, 3, 0),
                expect: (8, 3, 0, 2),
            },
        ];
        for (i, row) in rows.into_iter().enumerate() {
            let mut w =
                World::rolled_out(deployment(row.old.0, rolling(row.surge, row.unavailable)));
            // Shape the old revision: `pods` pods, `ready` of them ready.
            w.pods.truncate(row.old.1);
            for pod in w.pods.iter_mut().skip(row.old.2) {
                pod.status = None;
            }
            w.d.spec.replicas = Some(row.desired);
            w.set_image("v2");
            if row.new != (0, 0, 0) {
                w.step(); // creates the new ReplicaSet
                let new = w
                    .rss
                    .iter()
                    .position(|r| revision(&r.metadata) == 2)
                    .unwrap();
                w.rss[new].spec.replicas = Some(row.new.0);
                let old_replicas = row.old.0;
                w.rss[1 - new].spec.replicas = Some(old_replicas);
                let rs = w.rss[new].clone();
                for _ in 0..row.new.1 {
                    let mut pod = pod_for(&rs);
                    pod.metadata.name = Some(format!("new-{}", w.uid()));
                    w.pods.push(pod);
                }
                let ready: Vec<String> = w
                    .pods
                    .iter()
                    .filter(|p| p.metadata.name.as_deref().unwrap().starts_with("new-"))
                    .take(row.new.2)
                    .map(|p| p.metadata.name.clone().unwrap())
                    .collect();
                for name in ready {
                    w.pod_mut(&name).status = Some(serde_json::from_value(json!({
                        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": Time(at(-5))}],
                    })).unwrap());
                }
            } else {
                w.step();
            }
            let plan = w.step();
            let replicas = |rev: i64| {
                plan.actions
                    .iter()
                    .find_map(|a| match a {
                        Action::UpdateReplicaSet(rs) if revision(&rs.metadata) == rev => {
                            rs.spec.replicas
                        }
                        _ => None,
                    })
                    .or_else(|| {
                        w.rss
                            .iter()
                            .find(|r| revision(&r.metadata) == rev)
                            .and_then(|r| r.spec.replicas)
                    })
                    .unwrap()
            };
            let created = plan
                .actions
                .iter()
                .filter(|a| matches!(a, Action::CreatePod(_)))
                .count();
            let deleted = plan
                .actions
                .iter()
                .filter(|a| matches!(a, Action::DeletePod(_)))
                .count();
            assert_eq!(
                (replicas(1), replicas(2), created, deleted),
                row.expect,
                "row {i}: {plan:#?}"
            );
        }
    }

    /// A whole rolling update, stepped with pods becoming ready one at a
    /// time: the surge and availability bounds hold at every step.
    #[test]
    fn rolling_update_keeps_its_bounds_to_the_end() {
        for (surge, unavailable, max_total, min_available) in [
            (json!("25%"), json!("25%"), 4, 3),
            (json!(0), json!(1), 3, 2),
            (json!(2), json!(0), 5, 3),
            (json!("50%"), json!("50%"), 5, 2),
        ] {
            let mut w =
                World::rolled_out(deployment(3, rolling(surge.clone(), unavailable.clone())));
            w.set_image("v2");
            for round in 0..30 {
                w.settle();
                assert!(
                    w.active().len() <= max_total,
                    "{surge} {unavailable} round {round}: {} pods",
                    w.active().len()
                );
                assert!(
                    w.available() >= min_available,
                    "{surge} {unavailable} round {round}: {} available",
                    w.available()
                );
                if w.images() == ["v2", "v2", "v2"] && w.pods.len() == 3 && w.available() == 3 {
                    break;
                }
                w.finish_terminating();
                w.make_ready(1);
                w.now = at(round + 1);
            }
            w.settle();
            assert_eq!(w.images(), ["v2", "v2", "v2"], "{surge} {unavailable}");
            assert_eq!(w.condition(PROGRESSING).1, NEW_RS_AVAILABLE);
            assert_eq!(w.status().updated_replicas, Some(3));
            assert_eq!(w.d.metadata.annotations.as_ref().unwrap()[REVISION], "2");
            let old = w.rss.iter().find(|r| revision(&r.metadata) == 1).unwrap();
            assert_eq!(
                old.spec.replicas,
                Some(0),
                "the old revision is kept, scaled to zero"
            );
        }
    }

    #[test]
    fn recreate_stops_every_old_pod_before_starting_new_ones() {
        let mut w = World::rolled_out(deployment(2, json!({"type": "Recreate"})));
        w.set_image("v2");
        w.settle();
        assert_eq!(
            w.images(),
            Vec::<&str>::new(),
            "old pods are told to go first"
        );
        assert_eq!(w.pods.len(), 2, "terminating, not yet gone");
        w.finish_terminating();
        w.settle();
        assert_eq!(w.images(), ["v2", "v2"]);
    }

    #[test]
    fn scaling_makes_no_revision_and_removes_unready_then_newest() {
        let mut w = World::rolled_out(deployment(3, rolling(json!("25%"), json!("25%"))));
        w.d.spec.replicas = Some(5);
        w.bump_generation();
        w.now = at(10);
        w.settle();
        assert_eq!(w.rss.len(), 1, "scaling made a revision");
        assert_eq!(w.active().len(), 5);
        // One of the two new pods gets ready; scaling to 3 removes the
        // unready one, then the newest ready one.
        w.make_ready(1);
        let unready: Vec<String> = w
            .active()
            .iter()
            .filter(|p| ready_since_ms(p).is_none())
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(unready.len(), 1);
        let newest_ready = w
            .active()
            .iter()
            .filter(|p| ready_since_ms(p).is_some())
            .max_by_key(|p| created(&p.metadata))
            .unwrap()
            .metadata
            .name
            .clone()
            .unwrap();
        w.d.spec.replicas = Some(3);
        w.bump_generation();
        let plan = w.step();
        let mut deleted: Vec<&String> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::DeletePod(n) => Some(n),
                _ => None,
            })
            .collect();
        assert_eq!(deleted.len(), 2);
        assert_eq!(deleted[0], &unready[0], "the unready pod goes first");
        deleted.remove(0);
        assert_eq!(deleted[0], &newest_ready);
        assert_eq!(w.rss.len(), 1);
    }

    #[test]
    fn min_ready_seconds_delays_availability_and_asks_for_a_recheck() {
        let mut d = deployment(1, rolling(json!("25%"), json!("25%")));
        d.spec.min_ready_seconds = Some(5);
        let mut w = World::new(d);
        w.settle();
        w.make_ready(1);
        let plan = w.step();
        assert_eq!(w.status().ready_replicas, Some(1));
        assert_eq!(w.status().available_replicas, Some(0));
        assert_eq!(plan.recheck_after, Some(Duration::from_secs(5)));
        w.now = at(5);
        w.settle();
        assert_eq!(w.status().available_replicas, Some(1));
    }

    #[test]
    fn a_stuck_rollout_exceeds_its_progress_deadline() {
        let mut d = deployment(2, rolling(json!(1), json!(0)));
        d.spec.progress_deadline_seconds = Some(30);
        let mut w = World::rolled_out(d);
        w.set_image("broken");
        w.settle();
        assert_eq!(
            w.condition(PROGRESSING),
            ("True".into(), "ReplicaSetUpdated".into())
        );
        w.now = at(20);
        let plan = w.step();
        assert_eq!(plan.recheck_after, Some(Duration::from_secs(10)));
        w.now = at(31);
        w.settle();
        assert_eq!(w.condition(PROGRESSING), ("False".into(), TIMED_OUT.into()));
        assert_eq!(
            edit::rollout_status(&w.d).unwrap_err().to_string(),
            "deployment \"web\" exceeded its progress deadline"
        );
        // The old pods still serve: maxUnavailable 0.
        assert_eq!(w.available(), 2);

        // Undo goes back to a revision whose ReplicaSet still exists: the
        // first step that observes it no longer reports the old timeout.
        assert_eq!(
            edit::rollback(&mut w.d, &w.rss, 0),
            Ok(edit::Rollback::RolledBack(1))
        );
        w.bump_generation();
        w.step();
        assert_eq!(w.condition(PROGRESSING).0, "True");
        assert!(edit::rollout_status(&w.d).is_ok(), "{:?}", w.d.status);
    }

    #[test]
    fn paused_deployments_scale_but_do_not_roll_out() {
        let mut w = World::rolled_out(deployment(2, rolling(json!("25%"), json!("25%"))));
        edit::set_paused(&mut w.d, true).unwrap();
        w.set_image("v2");
        w.settle();
        assert_eq!(w.rss.len(), 1);
        assert_eq!(w.condition(PROGRESSING), ("Unknown".into(), PAUSED.into()));
        edit::set_paused(&mut w.d, false).unwrap();
        w.settle();
        assert_eq!(w.rss.len(), 2, "resuming starts the rollout");
    }

    #[test]
    fn undo_returns_to_the_old_revision_with_a_new_number() {
        let mut w = World::rolled_out(deployment(2, rolling(json!("25%"), json!("25%"))));
        w.set_image("v2");
        for _ in 0..10 {
            w.settle();
            w.finish_terminating();
            w.make_ready(usize::MAX);
        }
        assert_eq!(w.images(), ["v2", "v2"]);
        assert_eq!(
            edit::rollback(&mut w.d, &w.rss, 0),
            Ok(edit::Rollback::RolledBack(1))
        );
        w.bump_generation();
        for _ in 0..10 {
            w.settle();
            w.finish_terminating();
            w.make_ready(usize::MAX);
        }
        assert_eq!(w.images(), ["v1", "v1"]);
        assert_eq!(w.rss.len(), 2, "the old revision was reused");
        let revisions: Vec<i64> = edit::history(&w.rss).iter().map(|h| h.revision).collect();
        assert_eq!(revisions, [2, 3]);
        assert_eq!(w.d.metadata.annotations.as_ref().unwrap()[REVISION], "3");
        assert_eq!(
            edit::rollback(&mut w.d, &w.rss, 3),
            Ok(edit::Rollback::Skipped(3))
        );
        assert!(
            edit::rollback(&mut w.d, &w.rss, 7)
                .unwrap_err()
                .to_string()
                .contains("revision 7")
        );
    }

    #[test]
    fn history_is_limited() {
        let mut d = deployment(1, rolling(json!(1), json!(0)));
        d.spec.revision_history_limit = Some(2);
        let mut w = World::rolled_out(d);
        for v in 2..=6 {
            w.set_image(&format!("v{v}"));
            for _ in 0..6 {
                w.settle();
                w.finish_terminating();
                w.make_ready(usize::MAX);
            }
        }
        let revisions: Vec<i64> = edit::history(&w.rss).iter().map(|h| h.revision).collect();
        assert_eq!(revisions, [4, 5, 6]);
    }

    #[test]
    fn change_cause_is_copied_to_the_revision() {
        let mut d = deployment(1, rolling(json!(1), json!(0)));
        d.metadata.annotations = Some([(CHANGE_CAUSE.to_owned(), "first".to_owned())].into());
        let w = World::rolled_out(d);
        let history = edit::history(&w.rss);
        assert_eq!(history[0].change_cause.as_deref(), Some("first"));
    }

    #[test]
    fn both_limits_zero_never_deadlocks() {
        let d = deployment(4, rolling(json!(0), json!("0%")));
        assert_eq!(
            strategy::resolve(&d, 4),
            Ok(Strategy::RollingUpdate {
                max_surge: 0,
                max_unavailable: 1
            })
        );
        let d = deployment(4, json!(null));
        assert_eq!(
            strategy::resolve(&d, 4),
            Ok(Strategy::RollingUpdate {
                max_surge: 1,
                max_unavailable: 1
            })
        );
    }
}
