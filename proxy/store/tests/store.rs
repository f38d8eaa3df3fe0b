//! Store behaviour through the public API: apply/update/delete semantics, validation
//! that needs the store, allocation, status, cascading deletes, the change feed and
//! persistence across reopen.

use std::sync::Arc;
use std::time::Duration;

use vipr_store::k8s_openapi::api::core::v1::{PodCondition, PodStatus};
use vipr_store::{
    EventType, Kind, Object, ObjectKey, Outcome, ServiceNetwork, Status, Store, StoreConfig,
    StoreError, WatchError,
};

fn open(dir: &std::path::Path) -> Store {
    let mut config = StoreConfig::new(dir);
    config.service_network = ServiceNetwork {
        cidr: "10.96.0.0/16".parse().unwrap(),
        node_ports: 30000..=32767,
    };
    Store::open(config).unwrap()
}

fn fresh() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    (dir, store)
}

fn svc_key(name: &str) -> ObjectKey {
    ObjectKey::new(Kind::Service, None, name)
}

fn service(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  selector: {{app: {name}}}\n  ports:\n  - {{name: http, port: 80}}\n{extra}"
    )
}

fn cluster_ip(store: &Store, name: &str) -> String {
    let o = store.get(&svc_key(name)).unwrap();
    o.as_service()
        .unwrap()
        .spec
        .as_ref()
        .unwrap()
        .cluster_ip
        .clone()
        .unwrap()
}

fn err(store: &Store, yaml: &str) -> String {
    store.apply_manifest(yaml).unwrap_err().to_string()
}

#[test]
fn system_namespaces_exist_from_the_start() {
    let (_d, store) = fresh();
    let names: Vec<String> = store
        .list(Kind::Namespace, None)
        .iter()
        .map(|o| o.metadata().name.clone().unwrap())
        .collect();
    assert_eq!(names, ["default", "kube-system"]);
    let e = store
        .delete(&ObjectKey::namespace_object("default"))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "namespace/default: this namespace may not be deleted"
    );
}

#[test]
fn apply_maintains_metadata_and_reports_outcomes() {
    let (_d, store) = fresh();
    let yaml =
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg, labels: {a: b}}\ndata: {k: v}\n";
    let first = store.apply_manifest(yaml).unwrap().remove(0);
    assert_eq!(first.outcome, Outcome::Created);
    let meta = first.object.metadata().clone();
    assert_eq!(meta.generation, Some(1));
    assert_eq!(meta.namespace.as_deref(), Some("default"));
    assert_eq!(meta.uid.as_ref().unwrap().len(), 36);
    assert!(meta.creation_timestamp.is_some());
    let rv1 = first.object.resource_version();
    assert_eq!(rv1, store.revision());

    let again = store.apply_manifest(yaml).unwrap().remove(0);
    assert_eq!(again.outcome, Outcome::Unchanged);
    assert_eq!(again.object.resource_version(), rv1);

    let relabelled = store
        .apply_manifest(&yaml.replace("a: b", "a: c"))
        .unwrap()
        .remove(0);
    assert_eq!(relabelled.outcome, Outcome::Configured);
    assert_eq!(
        relabelled.object.metadata().generation,
        Some(1),
        "labels are not spec"
    );
    assert!(relabelled.object.resource_version() > rv1);

    let changed = store
        .apply_manifest(&yaml.replace("k: v", "k: w"))
        .unwrap()
        .remove(0);
    assert_eq!(changed.object.metadata().generation, Some(2));
    assert_eq!(changed.object.metadata().uid, meta.uid);
    assert_eq!(
        changed.object.metadata().creation_timestamp,
        meta.creation_timestamp
    );
}

#[test]
fn namespaces_must_exist_unless_created_in_the_same_batch() {
    let (_d, store) = fresh();
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: shop}\n";
    assert_eq!(
        err(&store, cm),
        "configmap/shop/c: namespace \"shop\" not found"
    );
    // Namespace after its object in the file still works: namespaces go first.
    let both = format!("{cm}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n");
    let applied = store.apply_manifest(&both).unwrap();
    assert_eq!(
        applied[0].key.to_string(),
        "configmap/shop/c",
        "results keep input order"
    );
    assert_eq!(applied[1].key.to_string(), "namespace/shop");
}

#[test]
fn multi_document_apply_is_all_or_nothing() {
    let (_d, store) = fresh();
    let before = store.revision();
    let yaml = format!(
        "{}---\n{}",
        service("a", "  clusterIP: 10.96.0.10\n"),
        service("b", "  type: NodePort\n").replace("port: 80", "port: 0")
    );
    let e = err(&store, &yaml);
    assert!(
        e.starts_with("service/default/b: spec.ports[0].port: Invalid value: 0"),
        "{e}"
    );
    assert_eq!(store.revision(), before);
    assert!(store.get(&svc_key("a")).is_none());
    // The IP staged for `a` was rolled back, not leaked.
    store
        .apply_manifest(&service("c", "  clusterIP: 10.96.0.10\n"))
        .unwrap();
}

#[test]
fn cluster_ips_are_allocated_honoured_and_immutable() {
    let (_d, store) = fresh();
    store.apply_manifest(&service("auto", "")).unwrap();
    let ip: std::net::Ipv4Addr = cluster_ip(&store, "auto").parse().unwrap();
    assert_eq!(&ip.octets()[..2], &[10, 96]);
    let o = store.get(&svc_key("auto")).unwrap();
    let spec = o.as_service().unwrap().spec.clone().unwrap();
    assert_eq!(spec.cluster_ips, Some(vec![ip.to_string()]));
    assert_eq!(spec.ip_families, Some(vec!["IPv4".to_string()]));

    store
        .apply_manifest(&service("dns", "  clusterIP: 10.96.0.10\n"))
        .unwrap();
    assert_eq!(cluster_ip(&store, "dns"), "10.96.0.10");
    let e = err(&store, &service("dup", "  clusterIP: 10.96.0.10\n"));
    assert_eq!(
        e,
        "service/default/dup: spec.clusterIP: Invalid value: \"10.96.0.10\": provided IP is already allocated (to service/default/dns)"
    );
    let e = err(&store, &service("out", "  clusterIP: 192.168.0.1\n"));
    assert!(e.contains("not in the valid range"), "{e}");

    // Re-applying without clusterIP keeps it; changing it is rejected.
    assert_eq!(
        store.apply_manifest(&service("dns", "")).unwrap()[0].outcome,
        Outcome::Unchanged
    );
    let e = err(&store, &service("dns", "  clusterIP: 10.96.0.11\n"));
    assert_eq!(e, "service/default/dns: spec.clusterIP: field is immutable");

    store
        .apply_manifest(&service("headless", "  clusterIP: None\n"))
        .unwrap();
    assert_eq!(cluster_ip(&store, "headless"), "None");

    // Deleting frees the address.
    store.delete(&svc_key("dns")).unwrap();
    store
        .apply_manifest(&service("dup", "  clusterIP: 10.96.0.10\n"))
        .unwrap();
}

#[test]
fn external_name_services_need_a_name_and_get_no_ip() {
    let (_d, store) = fresh();
    let e = err(
        &store,
        "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName}\n",
    );
    assert_eq!(e, "service/default/ext: spec.externalName: Required value");
    store.apply_manifest("apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: db.example.com}\n").unwrap();
    let o = store.get(&svc_key("ext")).unwrap();
    assert_eq!(
        o.as_service().unwrap().spec.as_ref().unwrap().cluster_ip,
        None
    );
}

fn node_ports(store: &Store, name: &str) -> Vec<i32> {
    let o = store.get(&svc_key(name)).unwrap();
    o.as_service()
        .unwrap()
        .spec
        .as_ref()
        .unwrap()
        .ports
        .iter()
        .flatten()
        .map(|p| p.node_port.unwrap())
        .collect()
}

#[test]
fn node_ports_are_allocated_with_clash_detection() {
    let (_d, store) = fresh();
    store
        .apply_manifest(&service("np", "  type: NodePort\n"))
        .unwrap();
    let port = node_ports(&store, "np")[0];
    assert!((30000..=32767).contains(&port));
    // Stable across re-apply.
    store
        .apply_manifest(&service("np", "  type: NodePort\n"))
        .unwrap();
    assert_eq!(node_ports(&store, "np"), [port]);

    store
        .apply_manifest(
            &service("fixed", "  type: NodePort\n")
                .replace("port: 80}", "port: 80, nodePort: 30080}"),
        )
        .unwrap();
    assert_eq!(node_ports(&store, "fixed"), [30080]);
    let e = err(
        &store,
        &service("clash", "  type: NodePort\n").replace("port: 80}", "port: 80, nodePort: 30080}"),
    );
    assert_eq!(
        e,
        "service/default/clash: spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated (to service/default/fixed)"
    );
    let e = err(
        &store,
        &service("range", "  type: NodePort\n").replace("port: 80}", "port: 80, nodePort: 8080}"),
    );
    assert!(e.contains("30000-32767"), "{e}");
    let e = err(
        &store,
        &service("cip", "").replace("port: 80}", "port: 80, nodePort: 30081}"),
    );
    assert!(e.starts_with("service/default/cip: spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'"), "{e}");

    // Switching back to ClusterIP releases the port.
    store.apply_manifest(&service("fixed", "")).unwrap();
    store
        .apply_manifest(
            &service("clash", "  type: NodePort\n")
                .replace("port: 80}", "port: 80, nodePort: 30080}"),
        )
        .unwrap();
}

#[test]
fn local_load_balancers_get_a_health_check_node_port() {
    let (_d, store) = fresh();
    store
        .apply_manifest(&service(
            "lb",
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n",
        ))
        .unwrap();
    let o = store.get(&svc_key("lb")).unwrap();
    let spec = o.as_service().unwrap().spec.clone().unwrap();
    let hc = spec.health_check_node_port.unwrap();
    assert!((30000..=32767).contains(&hc));
    assert_ne!(hc, spec.ports.unwrap()[0].node_port.unwrap());
    let e = err(
        &store,
        &service("cl", "  type: LoadBalancer\n  healthCheckNodePort: 31000\n"),
    );
    assert!(
        e.starts_with("service/default/cl: spec.healthCheckNodePort"),
        "{e}"
    );
    let e = err(
        &store,
        &service(
            "lb2",
            &format!(
                "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: {hc}\n"
            ),
        ),
    );
    assert!(e.contains("already allocated"), "{e}");
}

const DEPLOY: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: web, image: host}]\n";

#[test]
fn deployment_selector_is_immutable() {
    let (_d, store) = fresh();
    store.apply_manifest(DEPLOY).unwrap();
    let scaled = store
        .apply_manifest(&DEPLOY.replace("replicas: 2", "replicas: 3"))
        .unwrap()
        .remove(0);
    assert_eq!(scaled.object.metadata().generation, Some(2));
    let e = err(&store, &DEPLOY.replace("{app: web}", "{app: api}"));
    assert_eq!(
        e,
        "deployment/default/web: spec.selector: field is immutable"
    );
}

#[test]
fn stale_resource_version_is_a_conflict() {
    let (_d, store) = fresh();
    let stored = store.apply_manifest(DEPLOY).unwrap().remove(0).object;
    let mut stale = (*stored).clone();
    store
        .apply_manifest(&DEPLOY.replace("replicas: 2", "replicas: 5"))
        .unwrap();
    if let Object::Deployment(d) = &mut stale {
        d.spec.replicas = Some(1);
    }
    let e = store.apply(vec![stale]).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::Conflict {
                field: "resourceVersion",
                ..
            }
        ),
        "{e}"
    );
}

fn pod_yaml(name: &str, owner_uid: Option<&str>) -> String {
    let owner = owner_uid.map_or(String::new(), |uid| {
        format!(
            ", ownerReferences: [{{apiVersion: apps/v1, kind: Deployment, name: web, uid: {uid}}}]"
        )
    });
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: web}}{owner}}}\nspec:\n  containers: [{{name: web}}]\n"
    )
}

#[test]
fn status_is_kept_apart_from_spec() {
    let (_d, store) = fresh();
    store.apply_manifest(&pod_yaml("p", None)).unwrap();
    let key = ObjectKey::new(Kind::Pod, None, "p");
    let status = PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some("10.244.0.5".into()),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let before = store.get(&key).unwrap();
    let updated = store
        .update_status(&key, Status::Pod(status.clone()))
        .unwrap();
    assert_eq!(updated.metadata().generation, before.metadata().generation);
    assert!(updated.resource_version() > before.resource_version());
    // Applying the manifest again (no status) keeps the status and changes nothing.
    let again = store
        .apply_manifest(&pod_yaml("p", None))
        .unwrap()
        .remove(0);
    assert_eq!(again.outcome, Outcome::Unchanged);
    assert_eq!(
        again.object.as_pod().unwrap().status.as_ref(),
        Some(&status)
    );
    // Status in an applied manifest is ignored.
    let with_status = pod_yaml("p", None) + "status: {phase: Failed}\n";
    let applied = store.apply_manifest(&with_status).unwrap().remove(0);
    assert_eq!(
        applied
            .object
            .as_pod()
            .unwrap()
            .status
            .as_ref()
            .unwrap()
            .phase
            .as_deref(),
        Some("Running")
    );
    let e = store
        .update_status(
            &ObjectKey::new(Kind::Service, None, "p"),
            Status::Pod(status),
        )
        .unwrap_err();
    assert!(matches!(e, StoreError::StatusKindMismatch { .. }));
}

#[test]
fn pod_spec_updates_are_limited() {
    let (_d, store) = fresh();
    store.apply_manifest(&pod_yaml("p", None)).unwrap();
    let e = err(
        &store,
        &pod_yaml("p", None).replace("{name: web}", "{name: web, args: [x]}"),
    );
    assert!(
        e.starts_with("pod/default/p: spec.containers[0].args: field is immutable"),
        "{e}"
    );
    store
        .apply_manifest(&pod_yaml("p", None).replace("{name: web}", "{name: web, image: new}"))
        .unwrap();
}

#[test]
fn deletes_cascade_through_owner_references_and_namespaces() {
    let (_d, store) = fresh();
    let deploy = store.apply_manifest(DEPLOY).unwrap().remove(0).object;
    let uid = deploy.metadata().uid.clone().unwrap();
    let generated = pod_yaml("", Some(&uid)).replace("name: ,", "generateName: web-,");
    let a = store.apply_manifest(&generated).unwrap().remove(0).key;
    let b = store.apply_manifest(&generated).unwrap().remove(0).key;
    assert_ne!(a, b);
    assert!(a.name().starts_with("web-") && a.name().len() == 9, "{a}");
    store.apply_manifest(&pod_yaml("orphan", None)).unwrap();
    let deleted = store
        .delete(&ObjectKey::new(Kind::Deployment, None, "web"))
        .unwrap();
    assert_eq!(deleted.len(), 3, "{deleted:?}");
    let left: Vec<String> = store
        .list(Kind::Pod, None)
        .iter()
        .map(|p| p.metadata().name.clone().unwrap())
        .collect();
    assert_eq!(left, ["orphan"]);

    store.apply_manifest("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c, namespace: shop}\n---\n".to_string().as_str()).unwrap();
    store
        .apply_manifest(&service("web", "").replace("{name: web}", "{name: web, namespace: shop}"))
        .unwrap();
    let deleted = store.delete(&ObjectKey::namespace_object("shop")).unwrap();
    assert_eq!(deleted.len(), 3);
    assert!(store.list(Kind::Service, Some("shop")).is_empty());
    assert!(matches!(
        store.delete(&ObjectKey::namespace_object("shop")),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn a_dependent_that_drops_its_owner_reference_survives_the_owner() {
    let (_d, store) = fresh();
    let deploy = store.apply_manifest(DEPLOY).unwrap().remove(0).object;
    let uid = deploy.metadata().uid.clone().unwrap();
    store.apply_manifest(&pod_yaml("kept", Some(&uid))).unwrap();
    store
        .apply_manifest(&pod_yaml("owned", Some(&uid)))
        .unwrap();
    // Re-applied without the reference: no longer the Deployment's.
    store.apply_manifest(&pod_yaml("kept", None)).unwrap();
    let deleted = store
        .delete(&ObjectKey::new(Kind::Deployment, None, "web"))
        .unwrap();
    let names: Vec<&str> = deleted.iter().map(|k| k.name()).collect();
    assert_eq!(names, ["web", "owned"]);
    assert!(
        store
            .get(&ObjectKey::new(Kind::Pod, None, "kept"))
            .is_some()
    );
}

#[test]
fn list_filters_by_kind_and_namespace() {
    let (_d, store) = fresh();
    store
        .apply_manifest("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")
        .unwrap();
    for ns in ["default", "a"] {
        for name in ["x", "y"] {
            store
                .apply_manifest(&format!(
                    "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: {ns}}}\n"
                ))
                .unwrap();
        }
    }
    assert_eq!(store.list(Kind::ConfigMap, None).len(), 4);
    let in_a: Vec<String> = store
        .list(Kind::ConfigMap, Some("a"))
        .iter()
        .map(|o| o.key().to_string())
        .collect();
    assert_eq!(in_a, ["configmap/a/x", "configmap/a/y"]);
    assert!(store.list(Kind::Secret, None).is_empty());
    assert_eq!(store.list(Kind::Namespace, Some("ignored")).len(), 3);
}

#[test]
fn watchers_see_list_then_increments() {
    let (_d, store) = fresh();
    store.apply_manifest(&service("before", "")).unwrap();
    let snapshot = store.snapshot();
    assert!(
        snapshot
            .objects
            .iter()
            .any(|o| o.key() == svc_key("before"))
    );
    let mut watcher = store.watch(snapshot.revision);
    assert!(watcher.try_next().unwrap().is_empty());

    store
        .apply_manifest(&format!("{}---\n{}", service("a", ""), service("b", "")))
        .unwrap();
    store
        .apply_manifest(&service("a", "  sessionAffinity: ClientIP\n"))
        .unwrap();
    store.delete(&svc_key("b")).unwrap();
    let events = watcher.next_timeout(Duration::from_secs(1)).unwrap();
    let seen: Vec<(EventType, String)> = events
        .iter()
        .map(|e| (e.event_type, e.object.key().to_string()))
        .collect();
    assert_eq!(
        seen,
        [
            (EventType::Added, "service/default/a".into()),
            (EventType::Added, "service/default/b".into()),
            (EventType::Modified, "service/default/a".into()),
            (EventType::Deleted, "service/default/b".into()),
        ]
    );
    assert!(events.windows(2).all(|w| w[0].revision < w[1].revision));
    assert!(
        events
            .iter()
            .all(|e| e.object.resource_version() == e.revision)
    );
    assert_eq!(watcher.revision(), store.revision());
    assert!(
        watcher
            .next_timeout(Duration::from_millis(10))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn async_watchers_wake_up() {
    let (_d, store) = fresh();
    let store = Arc::new(store);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut watcher = store.watch(store.revision());
    let writer = Arc::clone(&store);
    let handle = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        writer.apply_manifest(&service("late", "")).unwrap();
    });
    let events = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(5), watcher.next()).await })
        .unwrap()
        .unwrap();
    assert_eq!(events[0].object.key(), svc_key("late"));
    handle.join().unwrap();
}

#[test]
fn slow_watchers_are_told_to_relist() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::new(dir.path());
    config.feed_capacity = 4;
    let store = Store::open(config).unwrap();
    let mut watcher = store.watch(store.revision());
    for i in 0..6 {
        store
            .apply_manifest(&service(&format!("s{i}"), ""))
            .unwrap();
    }
    assert!(matches!(
        watcher.try_next(),
        Err(WatchError::Compacted { .. })
    ));
}

#[test]
fn everything_survives_reopen_including_allocations() {
    let dir = tempfile::tempdir().unwrap();
    let (revision, uid) = {
        let store = open(dir.path());
        store
            .apply_manifest(
                &service("np", "  type: NodePort\n")
                    .replace("port: 80}", "port: 80, nodePort: 30080}"),
            )
            .unwrap();
        store
            .apply_manifest(&service("dns", "  clusterIP: 10.96.0.10\n"))
            .unwrap();
        store.apply_manifest("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {password: hunter2}\n").unwrap();
        (
            store.revision(),
            store.get(&svc_key("dns")).unwrap().metadata().uid.clone(),
        )
    };
    let store = open(dir.path());
    assert_eq!(store.revision(), revision);
    assert_eq!(store.get(&svc_key("dns")).unwrap().metadata().uid, uid);
    let Object::Secret(s) = &*store.get(&ObjectKey::new(Kind::Secret, None, "s")).unwrap() else {
        panic!()
    };
    assert_eq!(s.data.as_ref().unwrap()["password"].0, b"hunter2");
    assert!(err(&store, &service("x", "  clusterIP: 10.96.0.10\n")).contains("already allocated"));
    assert!(
        err(
            &store,
            &service("y", "  type: NodePort\n").replace("port: 80}", "port: 80, nodePort: 30080}")
        )
        .contains("already allocated")
    );
    let next = store.apply_manifest(&service("z", "")).unwrap().remove(0);
    assert_eq!(
        next.object.resource_version(),
        revision + 1,
        "the counter continues"
    );
}

#[test]
fn manifest_errors_surface_unchanged() {
    let (_d, store) = fresh();
    let e = err(
        &store,
        "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: x}\n",
    );
    assert_eq!(
        e,
        "document 1: unsupported kind \"CronJob\" with apiVersion \"batch/v1\""
    );
}
