//! The store: the in-memory view of all objects, the write path (stage a batch,
//! validate it against the store, commit it to disk in one transaction, then publish
//! it), the read path (get/list/snapshot) and the change feed.
//!
//! Concurrency: one `RwLock`. Writers hold it for a whole batch so staging sees a
//! stable store and the disk order equals the event order; readers only clone `Arc`s
//! out of a `BTreeMap`, which keeps `list` of thousands of objects in microseconds.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use rand::Rng;

use crate::alloc::{self, AllocTxn, Allocator, ServiceNetwork};
use crate::error::{Result, StoreError};
use crate::feed::{Event, EventType, Feed, Watcher};
use crate::manifest;
use crate::object::{Kind, Object, ObjectKey, Status};
use crate::persist::{Disk, Write};
use crate::validation;

/// Namespaces that exist from the start and cannot be deleted.
pub const SYSTEM_NAMESPACES: &[&str] = &[crate::DEFAULT_NAMESPACE, "kube-system"];

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub state_dir: PathBuf,
    pub service_network: ServiceNetwork,
    /// How many events the change feed keeps for watchers that fall behind.
    pub feed_capacity: usize,
}

impl StoreConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            state_dir: state_dir.into(),
            service_network: ServiceNetwork::default(),
            feed_capacity: 65_536,
        }
    }
}

/// What an apply did to one object (kubectl's words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
        })
    }
}

/// The result of applying one object: its key, what happened and the stored state.
#[derive(Debug, Clone)]
pub struct Applied {
    pub key: ObjectKey,
    pub outcome: Outcome,
    pub object: Arc<Object>,
}

/// Every object at one revision: list this, then watch from `revision`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub revision: u64,
    pub objects: Vec<Arc<Object>>,
}

struct State {
    objects: Objects,
    revision: u64,
    alloc: Allocator,
}

/// The embedded API store. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Store {
    state: RwLock<State>,
    disk: Disk,
    feed: Arc<Feed>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.disk.path())
            .field("revision", &self.revision())
            .finish()
    }
}

impl Store {
    /// Opens (or creates) the store under `config.state_dir` and makes sure the system
    /// namespaces exist.
    pub fn open(config: StoreConfig) -> Result<Store> {
        let (disk, loaded) = Disk::open(&config.state_dir)?;
        let mut alloc = Allocator::new(config.service_network.clone());
        let mut objects = Objects::default();
        for (key, object) in loaded.objects {
            if let Object::Service(svc) = &object
                && let Some(spec) = &svc.spec
            {
                alloc::restore_service(&mut alloc, &key, spec);
            }
            objects.insert(key, Arc::new(object));
        }
        let feed = Feed::new(loaded.revision, config.feed_capacity);
        let store = Store {
            state: RwLock::new(State {
                objects,
                revision: loaded.revision,
                alloc,
            }),
            disk,
            feed,
        };
        store.ensure_system_namespaces()?;
        Ok(store)
    }

    fn ensure_system_namespaces(&self) -> Result<()> {
        let missing: Vec<Object> = SYSTEM_NAMESPACES
            .iter()
            .filter(|ns| self.get(&ObjectKey::namespace_object(**ns)).is_none())
            .map(|ns| {
                Object::from(Namespace {
                    metadata: ObjectMeta {
                        name: Some((*ns).into()),
                        ..Default::default()
                    },
                    ..Default::default()
                })
            })
            .collect();
        if !missing.is_empty() {
            self.apply(missing)?;
        }
        Ok(())
    }

    /// The path of the database file.
    pub fn path(&self) -> &Path {
        self.disk.path()
    }

    /// The service CIDR and node-port range allocations come from.
    pub fn service_network(&self) -> ServiceNetwork {
        self.read().alloc.network().clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated: all updates
        // are staged outside it and applied with infallible map operations.
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The last committed revision (the store-wide resourceVersion counter).
    pub fn revision(&self) -> u64 {
        self.read().revision
    }

    pub fn get(&self, key: &ObjectKey) -> Option<Arc<Object>> {
        self.read().objects.get(key).cloned()
    }

    /// Objects of `kind`, in one namespace or (with `None`) all, sorted by namespace
    /// then name. For cluster-scoped kinds the namespace is ignored.
    pub fn list(&self, kind: Kind, namespace: Option<&str>) -> Vec<Arc<Object>> {
        let state = self.read();
        let namespace = namespace.filter(|_| kind.is_namespaced());
        range(&state.objects.by_key, kind, namespace)
            .cloned()
            .collect()
    }

    /// Every object at one revision.
    pub fn snapshot(&self) -> Snapshot {
        let state = self.read();
        Snapshot {
            revision: state.revision,
            objects: state.objects.by_key.values().cloned().collect(),
        }
    }

    /// Follows the change feed from `revision` (usually a [`Snapshot`]'s).
    pub fn watch(&self, revision: u64) -> Watcher {
        self.feed.watch(revision)
    }

    /// Parses a manifest and applies every object in it, all or nothing.
    pub fn apply_manifest(&self, text: &str) -> Result<Vec<Applied>> {
        self.apply(manifest::parse(text)?)
    }

    /// Creates or updates objects, all or nothing: everything is validated against the
    /// store (and the earlier objects of the batch) first, then committed in one durable
    /// transaction. Namespaces in the batch are applied first so objects can be in a
    /// namespace created by the same manifest. Status in the input is ignored (see
    /// [`Store::update_status`]). Results are in input order.
    pub fn apply(&self, objects: Vec<Object>) -> Result<Vec<Applied>> {
        let mut order: Vec<usize> = (0..objects.len()).collect();
        order.sort_by_key(|i| objects[*i].kind() != Kind::Namespace);
        let mut objects: Vec<Option<Object>> = objects.into_iter().map(Some).collect();
        let mut guard = self.write();
        let State {
            objects: stored,
            revision,
            alloc,
        } = &mut *guard;
        let mut batch = Batch::new(stored, alloc, *revision);
        let mut results: Vec<Option<Applied>> = vec![None; objects.len()];
        for i in order {
            let object = objects[i].take().expect("each index once");
            results[i] = Some(batch.apply(object)?);
        }
        let (changes, new_revision, alloc_txn) = batch.finish();
        let mut staged = StagedState {
            objects: stored,
            revision,
        };
        commit_to(
            &self.disk,
            &self.feed,
            &mut staged,
            changes,
            new_revision,
            alloc_txn,
        )?;
        Ok(results
            .into_iter()
            .map(|r| r.expect("every object applied"))
            .collect())
    }

    /// Replaces the status of a stored object; bumps resourceVersion, not generation.
    pub fn update_status(&self, key: &ObjectKey, status: Status) -> Result<Arc<Object>> {
        if status.kind() != key.kind() {
            return Err(StoreError::StatusKindMismatch {
                key: key.clone(),
                status: status.kind(),
                kind: key.kind(),
            });
        }
        self.modify(key, |object| object.set_status(Some(status)))
    }

    /// Starts a graceful deletion: sets `deletionTimestamp` (endpoints then report the
    /// object as terminating). The runtime calls [`Store::delete`] when it is gone.
    pub fn mark_terminating(
        &self,
        key: &ObjectKey,
        grace_period_seconds: i64,
    ) -> Result<Arc<Object>> {
        self.modify(key, |object| {
            let meta = object.metadata_mut();
            if meta.deletion_timestamp.is_none() {
                meta.deletion_timestamp = Some(Time(Timestamp::now()));
                meta.deletion_grace_period_seconds = Some(grace_period_seconds);
            }
        })
    }

    /// Read-modify-write of one stored object outside the spec path.
    fn modify(&self, key: &ObjectKey, change: impl FnOnce(&mut Object)) -> Result<Arc<Object>> {
        let mut guard = self.write();
        let state = &mut *guard;
        let old = state
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound { key: key.clone() })?;
        let mut object = (*old).clone();
        change(&mut object);
        if object == *old {
            return Ok(old);
        }
        let revision = state.revision + 1;
        object.metadata_mut().resource_version = Some(revision.to_string());
        let object = Arc::new(object);
        let change = Change {
            key: key.clone(),
            event_type: EventType::Modified,
            object: Arc::clone(&object),
            revision,
        };
        let alloc_txn = AllocTxn::new(&mut state.alloc);
        let mut staged = StagedState {
            objects: &mut state.objects,
            revision: &mut state.revision,
        };
        commit_to(
            &self.disk,
            &self.feed,
            &mut staged,
            vec![change],
            revision,
            alloc_txn,
        )?;
        Ok(object)
    }

    /// Deletes an object and, transitively, everything it owns (ownerReferences) or,
    /// for a namespace, contains. Returns every deleted key, the requested one first.
    pub fn delete(&self, key: &ObjectKey) -> Result<Vec<ObjectKey>> {
        self.delete_many(std::slice::from_ref(key), false)
    }

    /// Deletes several objects (with their dependents) in one transaction; with
    /// `missing_ok`, keys that do not exist are skipped instead of failing the batch.
    pub fn delete_many(&self, keys: &[ObjectKey], missing_ok: bool) -> Result<Vec<ObjectKey>> {
        let mut guard = self.write();
        let State {
            objects: stored,
            revision,
            alloc,
        } = &mut *guard;
        let mut batch = Batch::new(stored, alloc, *revision);
        for key in keys {
            if batch.current(key).is_none() {
                if missing_ok || batch.staged.contains_key(key) {
                    continue;
                }
                return Err(StoreError::NotFound { key: key.clone() });
            }
            if key.kind() == Kind::Namespace && SYSTEM_NAMESPACES.contains(&key.name()) {
                return Err(StoreError::Forbidden {
                    key: key.clone(),
                    reason: "this namespace may not be deleted".into(),
                });
            }
            batch.delete_cascading(key);
        }
        let (changes, new_revision, alloc_txn) = batch.finish();
        let deleted = changes.iter().map(|c| c.key.clone()).collect();
        let mut staged = StagedState {
            objects: stored,
            revision,
        };
        commit_to(
            &self.disk,
            &self.feed,
            &mut staged,
            changes,
            new_revision,
            alloc_txn,
        )?;
        Ok(deleted)
    }
}

/// The parts of [`State`] a commit writes, borrowed apart from the allocator (which
/// the batch's [`AllocTxn`] already borrows).
struct StagedState<'a> {
    objects: &'a mut Objects,
    revision: &'a mut u64,
}

/// Disk first, memory and feed second: if the disk write fails nothing is visible and
/// the allocation changes roll back when `alloc_txn` drops.
fn commit_to(
    disk: &Disk,
    feed: &Feed,
    state: &mut StagedState<'_>,
    changes: Vec<Change>,
    revision: u64,
    alloc_txn: AllocTxn<'_>,
) -> Result<()> {
    if changes.is_empty() {
        alloc_txn.commit();
        return Ok(());
    }
    let writes: Vec<Write<'_>> = changes
        .iter()
        .map(|c| match c.event_type {
            EventType::Deleted => Write::Delete(&c.key),
            EventType::Added | EventType::Modified => Write::Put(&c.key, &c.object),
        })
        .collect();
    disk.commit(&writes, revision)?;
    alloc_txn.commit();
    let mut events = Vec::with_capacity(changes.len());
    for change in changes {
        match change.event_type {
            EventType::Deleted => state.objects.remove(&change.key),
            EventType::Added | EventType::Modified => {
                state.objects.insert(change.key, Arc::clone(&change.object))
            }
        };
        events.push(Event {
            event_type: change.event_type,
            object: change.object,
            revision: change.revision,
        });
    }
    *state.revision = revision;
    feed.publish(events);
    Ok(())
}

/// The committed objects by key, with an index of who owns what, so a
/// cascading delete finds an owner's dependents without walking its
/// namespace (deleting 100,000 objects would otherwise be quadratic).
#[derive(Default)]
struct Objects {
    by_key: BTreeMap<ObjectKey, Arc<Object>>,
    /// Owner uid -> keys of the objects whose ownerReferences name it.
    dependents: HashMap<String, BTreeSet<ObjectKey>>,
}

impl Objects {
    fn get(&self, key: &ObjectKey) -> Option<&Arc<Object>> {
        self.by_key.get(key)
    }

    fn insert(&mut self, key: ObjectKey, object: Arc<Object>) {
        self.unindex(&key);
        for uid in owner_uids(&object) {
            self.dependents
                .entry(uid.to_owned())
                .or_default()
                .insert(key.clone());
        }
        self.by_key.insert(key, object);
    }

    fn remove(&mut self, key: &ObjectKey) {
        self.unindex(key);
        self.by_key.remove(key);
    }

    fn unindex(&mut self, key: &ObjectKey) {
        let Some(old) = self.by_key.get(key) else {
            return;
        };
        for uid in owner_uids(old) {
            if let Some(keys) = self.dependents.get_mut(uid) {
                keys.remove(key);
                if keys.is_empty() {
                    self.dependents.remove(uid);
                }
            }
        }
    }

    /// Committed objects whose ownerReferences name `uid`.
    fn owned_by(&self, uid: &str) -> impl Iterator<Item = &ObjectKey> {
        self.dependents.get(uid).into_iter().flatten()
    }
}

fn owner_uids(object: &Object) -> impl Iterator<Item = &str> {
    object
        .metadata()
        .owner_references
        .iter()
        .flatten()
        .map(|r| r.uid.as_str())
}

/// Objects of one kind (and namespace), in key order, via a BTreeMap range.
fn range<'a>(
    objects: &'a BTreeMap<ObjectKey, Arc<Object>>,
    kind: Kind,
    namespace: Option<&'a str>,
) -> impl Iterator<Item = &'a Arc<Object>> + 'a {
    let start = ObjectKey::range_start(kind, namespace);
    objects
        .range(start..)
        .take_while(move |(k, _)| {
            k.kind() == kind && namespace.is_none_or(|ns| k.namespace() == Some(ns))
        })
        .map(|(_, v)| v)
}

/// One staged change of a batch.
struct Change {
    key: ObjectKey,
    event_type: EventType,
    object: Arc<Object>,
    revision: u64,
}

/// A batch being staged: reads see the store plus the batch's own earlier changes.
struct Batch<'b, 'a> {
    base: &'b Objects,
    alloc: AllocTxn<'a>,
    staged: HashMap<ObjectKey, Option<Arc<Object>>>,
    /// Owner uid -> objects this batch staged with an ownerReference to it
    /// (the batch's part of [`Objects::dependents`]).
    staged_dependents: HashMap<String, BTreeSet<ObjectKey>>,
    changes: Vec<Change>,
    revision: u64,
}

impl<'b, 'a> Batch<'b, 'a> {
    fn new(base: &'b Objects, alloc: &'a mut Allocator, revision: u64) -> Batch<'b, 'a> {
        Batch {
            base,
            alloc: AllocTxn::new(alloc),
            staged: HashMap::new(),
            staged_dependents: HashMap::new(),
            changes: Vec::new(),
            revision,
        }
    }

    fn finish(self) -> (Vec<Change>, u64, AllocTxn<'a>) {
        (self.changes, self.revision, self.alloc)
    }

    fn current(&self, key: &ObjectKey) -> Option<&Arc<Object>> {
        match self.staged.get(key) {
            Some(staged) => staged.as_ref(),
            None => self.base.get(key),
        }
    }

    fn stage(&mut self, key: ObjectKey, event_type: EventType, object: Arc<Object>) {
        self.revision += 1;
        let staged = (event_type != EventType::Deleted).then(|| Arc::clone(&object));
        if staged.is_some() {
            for uid in owner_uids(&object) {
                self.staged_dependents
                    .entry(uid.to_owned())
                    .or_default()
                    .insert(key.clone());
            }
        }
        self.staged.insert(key.clone(), staged);
        self.changes.push(Change {
            key,
            event_type,
            object,
            revision: self.revision,
        });
    }

    fn apply(&mut self, mut object: Object) -> Result<Applied> {
        assign_generated_name(&mut object, |k| self.current(k).is_some());
        let key = ObjectKey::of(&object);
        normalize_namespace(&mut object, &key);
        object.take_status();
        let invalid = |error| StoreError::Invalid {
            key: key.clone(),
            error,
        };
        validation::default_and_validate(&mut object).map_err(invalid)?;
        self.check_namespace(&key)?;
        let old = self.current(&key).cloned();
        if let Some(old) = &old {
            check_preconditions(&key, old, &object)?;
            validation::validate_update(old, &object).map_err(invalid)?;
        }
        if let Object::Service(svc) = &mut object {
            let old_spec = old
                .as_deref()
                .and_then(Object::as_service)
                .and_then(|s| s.spec.as_ref());
            let spec = svc.spec.get_or_insert_with(Default::default);
            alloc::assign_service(&mut self.alloc, &key, old_spec, spec).map_err(invalid)?;
        }
        fill_system_metadata(&mut object, old.as_deref());
        if let Some(old) = old.filter(|old| **old == object) {
            return Ok(Applied {
                key,
                outcome: Outcome::Unchanged,
                object: old,
            });
        }
        let (outcome, event_type) = if self.current(&key).is_some() {
            (Outcome::Configured, EventType::Modified)
        } else {
            (Outcome::Created, EventType::Added)
        };
        object.metadata_mut().resource_version = Some((self.revision + 1).to_string());
        let object = Arc::new(object);
        self.stage(key.clone(), event_type, Arc::clone(&object));
        Ok(Applied {
            key,
            outcome,
            object,
        })
    }

    fn check_namespace(&self, key: &ObjectKey) -> Result<()> {
        let Some(ns) = key.namespace() else {
            return Ok(());
        };
        let ns_key = ObjectKey::namespace_object(ns);
        match self.current(&ns_key) {
            Some(obj) if obj.metadata().deletion_timestamp.is_some() => {
                Err(StoreError::Forbidden {
                    key: key.clone(),
                    reason: format!("namespace {ns:?} is being terminated"),
                })
            }
            Some(_) => Ok(()),
            None => Err(StoreError::NamespaceNotFound {
                key: key.clone(),
                namespace: ns.to_owned(),
            }),
        }
    }

    /// Deletes `key` and everything that depends on it, depth first, dependents first
    /// recorded after their owner (the order watchers see).
    fn delete_cascading(&mut self, key: &ObjectKey) {
        let Some(object) = self.current(key).cloned() else {
            return;
        };
        let dependents = self.dependents(key, &object);
        if let Object::Service(svc) = &*object
            && let Some(spec) = &svc.spec
        {
            alloc::release_service(&mut self.alloc, key, spec);
        }
        let mut last = (*object).clone();
        last.metadata_mut().resource_version = Some((self.revision + 1).to_string());
        self.stage(key.clone(), EventType::Deleted, Arc::new(last));
        for dependent in dependents {
            self.delete_cascading(&dependent);
        }
    }

    /// Objects owned by `object` (ownerReferences naming its uid) in its namespace; for
    /// a namespace, everything in it.
    fn dependents(&self, key: &ObjectKey, object: &Object) -> Vec<ObjectKey> {
        if key.kind() == Kind::Namespace {
            let namespace = key.name();
            return Kind::ALL
                .iter()
                .filter(|k| k.is_namespaced())
                .flat_map(|kind| range(&self.base.by_key, *kind, Some(namespace)))
                .map(|o| o.key())
                .filter(|k| self.current(k).is_some())
                .collect();
        }
        let (Some(namespace), Some(uid)) = (key.namespace(), object.metadata().uid.as_deref())
        else {
            return Vec::new();
        };
        // Committed dependents from the index, and any this batch staged.
        let staged = self.staged_dependents.get(uid).into_iter().flatten();
        let candidates: BTreeSet<&ObjectKey> = self.base.owned_by(uid).chain(staged).collect();
        candidates
            .into_iter()
            .filter(|k| k.namespace() == Some(namespace))
            // Still there and still owned, as this batch left it.
            .filter(|k| {
                self.current(k)
                    .is_some_and(|o| owner_uids(o).any(|u| u == uid))
            })
            .cloned()
            .collect()
    }
}

/// `metadata.generateName` without a name: pick a free name with a random suffix, as
/// the API server does (controllers use this for pods).
fn assign_generated_name(object: &mut Object, taken: impl Fn(&ObjectKey) -> bool) {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let meta = object.metadata();
    if meta.name.as_deref().is_some_and(|n| !n.is_empty()) {
        return;
    }
    let Some(prefix) = meta.generate_name.clone().filter(|p| !p.is_empty()) else {
        return;
    };
    let mut rng = rand::rng();
    loop {
        let suffix: String = (0..5)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect();
        object.metadata_mut().name = Some(format!("{prefix}{suffix}"));
        if !taken(&ObjectKey::of(object)) {
            return;
        }
    }
}

/// Namespaced objects always carry their namespace; cluster-scoped ones never do.
fn normalize_namespace(object: &mut Object, key: &ObjectKey) {
    object.metadata_mut().namespace = key.namespace().map(str::to_owned);
}

/// Optimistic concurrency: a resourceVersion or uid in the input must match the stored
/// object (an exported-then-edited object must not overwrite a newer write, and a
/// controller must not update a re-created object).
fn check_preconditions(key: &ObjectKey, old: &Object, new: &Object) -> Result<()> {
    let (o, n) = (old.metadata(), new.metadata());
    let conflict = |field, given: &str, stored: Option<&String>| StoreError::Conflict {
        key: key.clone(),
        field,
        given: given.to_owned(),
        stored: stored.cloned().unwrap_or_default(),
    };
    if let Some(rv) = n.resource_version.as_deref().filter(|rv| !rv.is_empty())
        && Some(rv) != o.resource_version.as_deref()
    {
        return Err(conflict("resourceVersion", rv, o.resource_version.as_ref()));
    }
    if let Some(uid) = n.uid.as_deref().filter(|u| !u.is_empty())
        && Some(uid) != o.uid.as_deref()
    {
        return Err(conflict("uid", uid, o.uid.as_ref()));
    }
    Ok(())
}

/// The fields the store owns: uid, creationTimestamp, generation, deletion state and
/// status come from the stored object, never from the input.
fn fill_system_metadata(object: &mut Object, old: Option<&Object>) {
    let status = old.and_then(|o| o.clone().take_status());
    let spec_changed = old.is_none_or(|o| !o.spec_eq(object));
    object.set_status(status);
    let old_meta = old.map(Object::metadata);
    let meta = object.metadata_mut();
    meta.uid = Some(old_meta.and_then(|m| m.uid.clone()).unwrap_or_else(new_uid));
    meta.creation_timestamp = Some(
        old_meta
            .and_then(|m| m.creation_timestamp.clone())
            .unwrap_or_else(|| Time(Timestamp::now())),
    );
    let generation = old_meta.and_then(|m| m.generation).unwrap_or(0);
    meta.generation = Some(if spec_changed {
        generation + 1
    } else {
        generation
    });
    meta.deletion_timestamp = old_meta.and_then(|m| m.deletion_timestamp.clone());
    meta.deletion_grace_period_seconds = old_meta.and_then(|m| m.deletion_grace_period_seconds);
    meta.resource_version = old_meta.and_then(|m| m.resource_version.clone());
    meta.managed_fields = None;
    meta.self_link = None;
    keep_controller_annotations(meta, old_meta);
}

/// Annotations a controller writes on the objects it manages (a Deployment's
/// revision). A manifest applied again without them keeps them, as kubectl's
/// merge would, so re-applying an unchanged manifest is "unchanged".
const CONTROLLER_ANNOTATIONS: &[&str] = &["deployment.kubernetes.io/revision"];

fn keep_controller_annotations(meta: &mut ObjectMeta, old: Option<&ObjectMeta>) {
    let Some(old) = old.and_then(|m| m.annotations.as_ref()) else {
        return;
    };
    for key in CONTROLLER_ANNOTATIONS {
        if let Some(value) = old.get(*key)
            && meta
                .annotations
                .as_ref()
                .is_none_or(|a| !a.contains_key(*key))
        {
            meta.annotations
                .get_or_insert_with(Default::default)
                .insert((*key).to_owned(), value.clone());
        }
    }
}

/// A random (version 4) UUID in its usual text form.
fn new_uid() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push(HEX[usize::from(byte >> 4)] as char);
        out.push(HEX[usize::from(byte & 15)] as char);
    }
    out
}
