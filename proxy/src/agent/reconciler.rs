//! The reconciler: follows the store's change feed and keeps the data plane
//! and the DNS snapshot equal to what the services and pods say.
//!
//! One full sync at start (list at a revision), then increments: a change to
//! a service recomputes that service; a change to a pod recomputes the
//! selector services of its namespace; a user EndpointSlice recomputes its
//! service. Only frontends whose backends changed reach the maps.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::Ipv4Addr,
    sync::{Arc, Mutex, RwLock},
    time::{Instant, SystemTime},
};

use anyhow::Result;
use k8s_openapi::api::core::v1::Service;
use vipr_dataplane::{BackendAddr, Dataplane, Frontend, Port, Protocol};
use vipr_dns::DnsHandle;
use vipr_store::{
    Event, Kind, Object, Store,
    endpoints::{self, EndpointGroup},
    slice::EndpointSlice,
};

use super::health_check::HealthChecks;
use super::{
    dns_snapshot::cluster_snapshot,
    frontends::{
        FrontendKind, FrontendSpec, FrontendTable, NodeAddresses, pod_weights, service_frontends,
    },
    memory,
    slice_index::SliceIndex,
    sync::{DataplaneSync, ServiceName},
};
use crate::metrics::Metrics;

/// The service the agent's own DNS server answers for.
pub const DNS_SERVICE: (&str, &str) = ("kube-system", "kube-dns");

/// EndpointSlices computed for selector services, by service; shared with
/// the API so `vipr get endpointslices` shows what the data plane uses.
pub type ComputedSlices = Arc<RwLock<BTreeMap<ServiceName, Vec<EndpointSlice>>>>;

pub struct Reconciler {
    pub store: Arc<Store>,
    pub dataplane: Arc<Mutex<Dataplane>>,
    pub dns: Option<DnsPublisher>,
    pub metrics: Arc<Metrics>,
    pub node: NodeAddresses,
    /// Where the cluster DNS address is served (bound locally by the agent).
    pub cluster_dns: Ipv4Addr,
    pub slices: ComputedSlices,
    pub sync: DataplaneSync,
    /// healthCheckNodePort answers, by port.
    pub health_checks: tokio::sync::watch::Sender<HealthChecks>,
    /// User EndpointSlices by service (rebuilt by each full sync).
    pub slice_index: SliceIndex,
    /// When the last sync started: changes dated before it are programmed.
    pub last_sync: SystemTime,
}

impl Reconciler {
    /// Programs every service from scratch and removes frontends left in
    /// pinned maps that no service wants any more.
    pub fn full_sync(&mut self) -> Result<()> {
        let started = Instant::now();
        self.last_sync = SystemTime::now();
        self.slice_index = SliceIndex::from_store(&self.store);
        let services: Vec<ServiceName> = self
            .store
            .list(Kind::Service, None)
            .iter()
            .filter_map(|o| o.as_service().map(service_name))
            .collect();
        // Services gone from the store while the reconciler was not
        // following it (it fell behind the change feed, or restarted) still
        // have frontends programmed: syncing them removes those.
        let stored: HashSet<&ServiceName> = services.iter().collect();
        let gone: Vec<ServiceName> = self
            .sync
            .programmed_services()
            .into_iter()
            .filter(|s| !stored.contains(s))
            .collect();
        let strays = self.with_batched_flow_clears(|this| {
            for service in services.iter().chain(&gone) {
                this.sync_service(service)?;
            }
            Ok(this
                .sync
                .remove_strays(&mut this.dataplane.lock().unwrap())?)
        })?;
        self.publish_dns();
        self.metrics
            .sync_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics.synced();
        tracing::info!(
            services = services.len(),
            frontends = self.sync.frontend_count(),
            removed_stale = strays,
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "full sync done"
        );
        Ok(())
    }

    /// Applies one batch of store events.
    pub fn apply_events(&mut self, events: &[Event]) -> Result<()> {
        let started = Instant::now();
        let previous_sync = std::mem::replace(&mut self.last_sync, SystemTime::now());
        self.metrics.change_pending();
        let mut affected = BTreeSet::new();
        for event in events {
            if event.object.kind() == Kind::EndpointSlice {
                self.metrics.endpoint_changes.inc();
                affected.extend(self.slice_index.update(event));
            } else {
                self.affected_services(&event.object, &mut affected);
            }
        }
        self.with_batched_flow_clears(|this| {
            affected
                .iter()
                .try_for_each(|service| this.sync_service(service))
        })?;
        self.publish_dns();
        let took = started.elapsed().as_secs_f64();
        if events.len() >= memory::TRIM_AFTER_OBJECTS {
            memory::release_freed();
        }
        self.metrics.sync_duration.observe(took);
        if let Some(triggered) = oldest_change_time(events, previous_sync) {
            // As kube-proxy: from the change itself (not from when the
            // agent heard of it) to the data plane serving it.
            let since = SystemTime::now().duration_since(triggered);
            self.metrics
                .programming_duration
                .observe(since.unwrap_or_default().as_secs_f64());
        }
        self.metrics.synced();
        tracing::debug!(
            events = events.len(),
            services = affected.len(),
            took_ms = took * 1e3,
            "synced"
        );
        Ok(())
    }

    /// Runs `sync` with the data plane's UDP flow clears deferred to its
    /// end: one walk of the conntrack table for the whole batch, not one
    /// per UDP frontend that lost a backend. The clears run also when
    /// `sync` fails part-way.
    fn with_batched_flow_clears<T>(
        &mut self,
        sync: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        self.dataplane.lock().unwrap().defer_udp_flow_clears();
        let synced = sync(self);
        let cleared = self.dataplane.lock().unwrap().clear_deferred_udp_flows();
        let value = synced?;
        cleared?;
        Ok(value)
    }

    fn affected_services(&self, object: &Object, affected: &mut BTreeSet<ServiceName>) {
        match object {
            Object::Service(service) => {
                self.metrics.service_changes.inc();
                affected.insert(service_name(service));
            }
            Object::Pod(pod) => {
                self.metrics.endpoint_changes.inc();
                let namespace = pod.metadata.namespace.as_deref();
                for other in self.store.list(Kind::Service, namespace) {
                    if let Some(service) = other.as_service()
                        && endpoints::is_selector_managed(service)
                    {
                        affected.insert(service_name(service));
                    }
                }
            }
            _ => {}
        }
    }

    /// Recomputes one service's endpoints and frontends and programs the diff.
    fn sync_service(&mut self, name: &ServiceName) -> Result<()> {
        let object = self.store.get(&vipr_store::ObjectKey::namespaced(
            Kind::Service,
            &name.0,
            name.1.clone(),
        ));
        let Some(service) = object.as_deref().and_then(Object::as_service) else {
            self.health_checks
                .send_if_modified(|checks| remove_health_check(checks, name));
            self.slices.write().unwrap().remove(name);
            self.sync.sync_service(
                &mut self.dataplane.lock().unwrap(),
                name,
                FrontendTable::new(),
            )?;
            return Ok(());
        };
        let groups = self.endpoint_groups(service, &name.0);
        let table = if (name.0.as_str(), name.1.as_str()) == DNS_SERVICE {
            self.dns_frontends(service)
        } else {
            let pods = self.store.list(Kind::Pod, Some(&name.0));
            let weights = pod_weights(pods.iter().filter_map(|o| o.as_pod()));
            service_frontends(service, &groups, &weights, &self.node)
        };
        if endpoints::is_selector_managed(service) {
            let mut slices = endpoints::to_endpoint_slices(service, &groups);
            // Computed slices live as long as their service, as far as a
            // reader can tell: give them its creation time.
            for slice in &mut slices {
                slice.metadata.creation_timestamp = service.metadata.creation_timestamp.clone();
            }
            self.slices.write().unwrap().insert(name.clone(), slices);
        }
        self.sync
            .sync_service(&mut self.dataplane.lock().unwrap(), name, table)?;
        self.update_health_check(name, service, &groups);
        Ok(())
    }

    /// Tracks the local endpoint count a Local service's healthCheckNodePort reports.
    fn update_health_check(&self, name: &ServiceName, service: &Service, groups: &[EndpointGroup]) {
        let spec = service.spec.as_ref();
        let local_policy = spec.and_then(|s| s.external_traffic_policy.as_deref()) == Some("Local");
        let port = spec
            .and_then(|s| s.health_check_node_port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|_| local_policy);
        let local: BTreeSet<_> = groups
            .iter()
            .flat_map(|g| g.endpoints.iter())
            .filter(|e| e.conditions.ready)
            .filter(|e| {
                e.node_name
                    .as_deref()
                    .is_none_or(|n| n == self.node.node_name)
            })
            .map(|e| e.address)
            .collect();
        self.health_checks.send_if_modified(|checks| {
            let removed = remove_health_check(checks, name);
            let Some(port) = port else {
                return removed;
            };
            let entry = (name.clone(), local.len());
            checks.insert(port, entry);
            true
        });
    }

    fn endpoint_groups(&self, service: &Service, namespace: &str) -> Vec<EndpointGroup> {
        if endpoints::is_selector_managed(service) {
            let pods = self.store.list(Kind::Pod, Some(namespace));
            endpoints::compute(service, pods.iter().filter_map(|o| o.as_pod()))
        } else {
            let name = (
                namespace.to_owned(),
                service.metadata.name.clone().unwrap_or_default(),
            );
            self.slice_index
                .slices_of(&name)
                .filter_map(endpoints::from_endpoint_slice)
                .collect()
        }
    }

    /// The agent's own DNS service: its ports translate to the address the
    /// DNS server itself listens on (the cluster DNS address, bound locally),
    /// so replies need no reverse translation.
    fn dns_frontends(&self, service: &Service) -> FrontendTable {
        let mut table = FrontendTable::new();
        for port in service.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
            let protocol = port
                .protocol
                .as_deref()
                .unwrap_or("TCP")
                .parse::<Protocol>();
            let port_name = port.name.clone().unwrap_or_default();
            let port = u16::try_from(port.port).ok().and_then(Port::new);
            if let (Ok(protocol), Some(port)) = (protocol, port) {
                let backend = BackendAddr {
                    addr: self.cluster_dns,
                    port,
                };
                table.insert(
                    Frontend {
                        addr: self.cluster_dns,
                        port,
                        protocol,
                    },
                    FrontendSpec {
                        backends: vec![backend],
                        options: Default::default(),
                        kind: FrontendKind::ClusterIp,
                        port_name,
                    },
                );
            }
        }
        table
    }

    /// Asks for a fresh DNS snapshot (built on the publisher's thread, so a
    /// large index rebuild never delays the next map update).
    fn publish_dns(&self) {
        if let Some(dns) = &self.dns {
            dns.changed();
        }
    }
}

/// Rebuilds the DNS snapshot on its own thread when asked; requests that
/// arrive during a rebuild coalesce into one more.
pub struct DnsPublisher {
    wake: std::sync::mpsc::SyncSender<()>,
}

impl DnsPublisher {
    pub fn start(store: Arc<Store>, slices: ComputedSlices, dns: Arc<DnsHandle>) -> Result<Self> {
        let (wake, requests) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("dns-publisher".into())
            .spawn(move || {
                while requests.recv().is_ok() {
                    let snapshot = dns_snapshot_of(&store, &slices);
                    if let Err(error) = dns.update(&snapshot) {
                        tracing::warn!(error = %error, "DNS snapshot rejected");
                    }
                    let size = snapshot.services.len() + snapshot.pods.len();
                    drop(snapshot);
                    // Each rebuild frees the previous index, as large as this one.
                    if size >= memory::TRIM_AFTER_OBJECTS {
                        memory::release_freed();
                    }
                }
            })?;
        Ok(DnsPublisher { wake })
    }

    fn changed(&self) {
        // Full means a rebuild is already queued: it will see this change too.
        let _ = self.wake.try_send(());
    }
}

/// Reads the store's objects in place (copying 10,000 services and their
/// slices for each rebuild doubled the agent's peak memory); only the
/// computed slices, a few per selector service, are copied out of their lock.
fn dns_snapshot_of(store: &Store, computed: &ComputedSlices) -> vipr_dns::ClusterSnapshot {
    let namespaces = store
        .list(Kind::Namespace, None)
        .iter()
        .map(|o| o.key().name().to_owned())
        .collect();
    let services = store.list(Kind::Service, None);
    let user_slices = store.list(Kind::EndpointSlice, None);
    let computed: Vec<EndpointSlice> = computed
        .read()
        .unwrap()
        .values()
        .flatten()
        .cloned()
        .collect();
    let pods = store.list(Kind::Pod, None);
    let slices: Vec<&EndpointSlice> = user_slices
        .iter()
        .filter_map(|o| o.as_endpoint_slice())
        .chain(&computed)
        .collect();
    cluster_snapshot(
        namespaces,
        &services
            .iter()
            .filter_map(|o| o.as_service())
            .collect::<Vec<_>>(),
        &slices,
        &pods.iter().filter_map(|o| o.as_pod()).collect::<Vec<_>>(),
    )
}

/// The annotation the EndpointSlice controller dates a slice's change with.
const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// When the oldest datable change among `events` since `last_sync` happened:
/// a pod's Ready condition turning (what readiness programming is measured
/// from), or an EndpointSlice's last-change-trigger-time. Other changes
/// carry no time, and older times were programmed by an earlier sync (a pod
/// ready for an hour whose restart count changes is no new readiness).
fn oldest_change_time(events: &[Event], last_sync: SystemTime) -> Option<SystemTime> {
    events
        .iter()
        .filter_map(|event| match event.object.as_ref() {
            Object::Pod(pod) => pod
                .status
                .as_ref()?
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "Ready")?
                .last_transition_time
                .as_ref()
                .map(|t| t.0),
            Object::EndpointSlice(slice) => slice
                .metadata
                .annotations
                .as_ref()?
                .get(LAST_CHANGE_TRIGGER_TIME)?
                .parse()
                .ok(),
            _ => None,
        })
        .map(SystemTime::from)
        .filter(|t| *t >= last_sync)
        .min()
}

/// Forgets `name`'s health check port; returns whether it had one.
fn remove_health_check(checks: &mut HealthChecks, name: &ServiceName) -> bool {
    let before = checks.len();
    checks.retain(|_, (owner, _)| owner != name);
    checks.len() != before
}

pub fn service_name(service: &Service) -> ServiceName {
    (
        service.metadata.namespace.clone().unwrap_or_default(),
        service.metadata.name.clone().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use vipr_store::EventType;

    fn event(object: serde_json::Value) -> Event {
        let objects = vipr_store::parse_manifests(&object.to_string()).unwrap();
        Event {
            event_type: EventType::Modified,
            object: Arc::new(objects.into_iter().next().unwrap()),
            revision: 1,
        }
    }

    #[test]
    fn programming_is_dated_from_readiness_or_the_slice_trigger_time() {
        let pod = event(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "host"}]},
            "status": {"conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:05.250Z"},
            ]},
        }));
        let slice = event(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "s", "annotations": {LAST_CHANGE_TRIGGER_TIME: "2026-01-01T00:00:03Z"}},
            "addressType": "IPv4",
        }));
        let service = event(serde_json::json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"ports": [{"port": 80}]},
        }));
        let at = |t: &str| {
            Some(SystemTime::from(
                t.parse::<k8s_openapi::jiff::Timestamp>().unwrap(),
            ))
        };
        let synced = at("2026-01-01T00:00:01Z").unwrap();
        assert_eq!(
            oldest_change_time(std::slice::from_ref(&pod), synced),
            at("2026-01-01T00:00:05.250Z")
        );
        assert_eq!(
            oldest_change_time(&[pod.clone(), slice], synced),
            at("2026-01-01T00:00:03Z")
        );
        assert_eq!(oldest_change_time(&[service], synced), None);
        // Ready since before the last sync: already programmed.
        let later = at("2026-01-01T00:00:06Z").unwrap();
        assert_eq!(oldest_change_time(&[pod], later), None);
    }
}
