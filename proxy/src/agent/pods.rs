//! Pods between the store and the runtime: starting and stopping them as
//! the store says, copying their status back, attaching XDP to their veths,
//! and the reconciler's main loop that drives both.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use vipr_dataplane::{Dataplane, XdpMode};
use vipr_pod_runtime::{ObjectLookup, PodInfo, PodKey, Runtime};
use vipr_store::{Event, EventType, Kind, Object, ObjectKey, Status, Store, WatchError};

use super::reconciler::{DNS_SERVICE, Reconciler};

/// ConfigMaps and Secrets for the runtime, read from the store.
pub struct StoreLookup(pub Arc<Store>);

impl ObjectLookup for StoreLookup {
    fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap> {
        let key = ObjectKey::namespaced(Kind::ConfigMap, namespace, name);
        match self.0.get(&key)?.as_ref() {
            Object::ConfigMap(cm) => Some((**cm).clone()),
            _ => None,
        }
    }

    fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        let key = ObjectKey::namespaced(Kind::Secret, namespace, name);
        match self.0.get(&key)?.as_ref() {
            Object::Secret(secret) => Some((**secret).clone()),
            _ => None,
        }
    }
}

/// Makes sure `kube-system/kube-dns` exists with the cluster DNS address, as
/// in a real cluster; this also reserves the address in the allocator.
pub fn ensure_dns_service(store: &Store, cluster_dns: std::net::Ipv4Addr) -> Result<()> {
    let key = ObjectKey::namespaced(Kind::Service, DNS_SERVICE.0, DNS_SERVICE.1);
    if store.get(&key).is_some() {
        return Ok(());
    }
    let service: Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": DNS_SERVICE.1,
            "namespace": DNS_SERVICE.0,
            "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"},
        },
        "spec": {
            "clusterIP": cluster_dns.to_string(),
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            ],
        },
    }))?;
    store.apply(vec![service.into()])?;
    Ok(())
}

/// Grace period of a pod that does not set `terminationGracePeriodSeconds`.
const DEFAULT_GRACE_SECONDS: i64 = 30;

/// Starts a pod's graceful deletion (as `kubectl delete pod` does): it
/// leaves the endpoints at once, then the runtime stops it within its grace
/// period and removes the object.
pub fn terminate(store: &Store, key: &ObjectKey) -> Result<()> {
    let object = store
        .get(key)
        .ok_or_else(|| anyhow::anyhow!("{key} not found"))?;
    let grace = object
        .as_pod()
        .and_then(|p| p.spec.as_ref())
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(DEFAULT_GRACE_SECONDS);
    store.mark_terminating(key, grace)?;
    Ok(())
}

/// Starts and stops pods in the runtime as the store's Pod objects say.
pub struct PodController {
    store: Arc<Store>,
    runtime: Runtime,
}

impl PodController {
    pub fn new(store: Arc<Store>, runtime: Runtime) -> Self {
        PodController { store, runtime }
    }

    /// Pods the runtime adopted but the store no longer has are stopped.
    pub fn adopt_existing(&self) {
        for info in self.runtime.list() {
            let key = ObjectKey::namespaced(Kind::Pod, &info.key.namespace, info.key.name.clone());
            if self.store.get(&key).is_none() {
                tracing::info!(pod = %info.key, "stopping a pod the store no longer has");
                let _ = self.runtime.delete_pod(&info.key, None);
            }
        }
    }

    fn ensure(&self, pod: &Pod) {
        let Some(key) = pod_key(pod) else {
            return;
        };
        let known = self.runtime.pod(&key);
        if pod.metadata.deletion_timestamp.is_some() {
            if known.as_ref().is_some_and(|p| !p.deleting) {
                let grace = pod.metadata.deletion_grace_period_seconds;
                if let Err(error) = self.runtime.delete_pod(&key, grace) {
                    tracing::warn!(pod = %key, error = %error, "stopping pod");
                }
            } else if known.is_none() {
                // Nothing runs: the deletion completes at once.
                let _ = self.store.delete(&store_key(&key));
            }
            return;
        }
        if known.is_none() {
            match self.runtime.create_pod(pod.clone()) {
                Ok(_) => tracing::info!(pod = %key, "pod started"),
                Err(error) => {
                    tracing::warn!(pod = %key, error = %error, "pod rejected by the runtime");
                    let status = failed_status(&error.to_string());
                    let _ = self
                        .store
                        .update_status(&store_key(&key), Status::Pod(status));
                }
            }
        }
    }

    fn handle(&self, event: &Event) {
        let Object::Pod(pod) = event.object.as_ref() else {
            return;
        };
        match event.event_type {
            EventType::Added | EventType::Modified => self.ensure(pod),
            EventType::Deleted => {
                if let Some(key) = pod_key(pod)
                    && self.runtime.pod(&key).is_some_and(|p| !p.deleting)
                {
                    let _ = self
                        .runtime
                        .delete_pod(&key, pod.metadata.deletion_grace_period_seconds);
                }
            }
        }
    }
}

/// The reconciler thread: list, sync everything, then follow the feed.
pub fn run_loop(reconciler: &mut Reconciler, pods: &PodController) -> Result<()> {
    'relist: loop {
        let snapshot = reconciler.store.snapshot();
        for object in &snapshot.objects {
            if let Object::Pod(pod) = object.as_ref() {
                pods.ensure(pod);
            }
        }
        reconciler.full_sync()?;
        let mut watcher = reconciler.store.watch(snapshot.revision);
        loop {
            let events = match watcher.next_timeout(Duration::from_secs(1)) {
                Ok(events) => events,
                Err(WatchError::Compacted { .. }) => {
                    tracing::warn!("fell behind the change feed; listing again");
                    continue 'relist;
                }
            };
            if events.is_empty() {
                continue;
            }
            // The data plane first: a pod marked for deletion has left the
            // backends (no new connection can pick it) before it is signalled.
            let synced = reconciler.apply_events(&events);
            for event in &events {
                pods.handle(event);
            }
            if let Err(error) = synced {
                tracing::error!(error = %format!("{error:#}"), "sync failed; full sync");
                continue 'relist;
            }
        }
    }
}

/// Copies each pod's status from the runtime into the store (waking the
/// reconciler) and attaches XDP to each new pod's node-side veth.
pub async fn follow_pod_status(
    store: Arc<Store>,
    runtime: Runtime,
    dataplane: Arc<Mutex<Dataplane>>,
) {
    let mut changes = runtime.subscribe();
    let mut attached = BTreeSet::new();
    // Pods adopted before we subscribed get their veths attached now.
    for info in runtime.list() {
        attach(&dataplane, &mut attached, &info);
    }
    loop {
        let change = match changes.recv().await {
            Ok(change) => change,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "pod status changes missed; refreshing all");
                for info in runtime.list() {
                    write_status(&store, &info.key, Some(info.status));
                }
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        if change.deleted {
            if attached.remove(&change.key.to_string()) {
                let _ = dataplane.lock().unwrap().detach(&pass_key(&change.key));
            }
            let key = store_key(&change.key);
            if store.get(&key).is_some() {
                let _ = store.delete(&key);
            }
            continue;
        }
        if let Some(info) = runtime.pod(&change.key) {
            attach(&dataplane, &mut attached, &info);
        }
        write_status(&store, &change.key, runtime.pod_status(&change.key));
    }
}

/// Attaches the translation to the pod's node-side veth and the pass
/// program to its `eth0` (so refusals sent back with XDP_TX arrive), once
/// the sandbox exists.
fn attach(dataplane: &Mutex<Dataplane>, attached: &mut BTreeSet<String>, info: &PodInfo) {
    let (Some(_), Some(shim_pid)) = (info.host_ifindex, info.shim_pid) else {
        return;
    };
    if attached.contains(&info.key.to_string()) {
        return;
    }
    let mut dataplane = dataplane.lock().unwrap();
    if let Err(error) = dataplane.attach(&info.host_ifname, XdpMode::Default) {
        tracing::warn!(interface = %info.host_ifname, error = %error, "attaching XDP");
        return;
    }
    let key = pass_key(&info.key);
    let dataplane = &mut *dataplane;
    let fast_path = dataplane.xdp_redirect();
    let in_pod = in_netns(shim_pid, || {
        dataplane.attach_pass_as(&key, "eth0", XdpMode::Default)?;
        // Packets the fast path redirects must carry complete checksums.
        if fast_path {
            vipr_dataplane::disable_tx_checksum_offload("eth0")?;
        }
        Ok::<_, vipr_dataplane::DataplaneError>(())
    });
    match in_pod {
        Ok(Ok(())) => {
            // Its eth0 runs XDP now, so frames redirected to the veth arrive.
            if fast_path
                && let Some(ifindex) = info.host_ifindex
                && let Err(error) = dataplane.allow_redirect_ifindex(&info.host_ifname, ifindex)
            {
                tracing::warn!(pod = %info.key, error = %error, "listing the veth for the XDP fast path");
            }
            tracing::debug!(pod = %info.key, "XDP attached")
        }
        Ok(Err(error)) => {
            tracing::warn!(pod = %info.key, error = %error, "attaching XDP in the pod")
        }
        Err(error) => {
            tracing::warn!(pod = %info.key, error = %format!("{error:#}"), "entering the pod")
        }
    }
    attached.insert(info.key.to_string());
}

fn pass_key(pod: &PodKey) -> String {
    format!("pod:{pod}")
}

/// Runs `f` on a thread inside the network namespace of process `pid`.
fn in_netns<T: Send>(pid: i32, f: impl FnOnce() -> T + Send) -> Result<T> {
    let netns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<T> {
                nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in pod netns panicked"))?
    })
}

fn write_status(
    store: &Store,
    key: &PodKey,
    status: Option<k8s_openapi::api::core::v1::PodStatus>,
) {
    let Some(status) = status else {
        return;
    };
    let key = store_key(key);
    if let Err(error) = store.update_status(&key, Status::Pod(status)) {
        tracing::debug!(pod = %key, error = %error, "pod status not stored");
    }
}

fn failed_status(message: &str) -> k8s_openapi::api::core::v1::PodStatus {
    k8s_openapi::api::core::v1::PodStatus {
        phase: Some("Failed".into()),
        reason: Some("Rejected".into()),
        message: Some(message.to_owned()),
        ..Default::default()
    }
}

fn pod_key(pod: &Pod) -> Option<PodKey> {
    Some(PodKey::new(
        pod.metadata.namespace.as_deref()?,
        pod.metadata.name.as_deref()?,
    ))
}

fn store_key(key: &PodKey) -> ObjectKey {
    ObjectKey::namespaced(Kind::Pod, &key.namespace, key.name.clone())
}
