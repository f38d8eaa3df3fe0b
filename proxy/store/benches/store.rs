//! Store speed: `list` at 1,000 pods (what `vipr get pods` does), and applying 10,000
//! selector-less services with 100,000 endpoints in EndpointSlices (10 per service),
//! both as typed objects and from manifest text (parse + validate + commit).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use vipr_store::k8s_openapi::api::core::v1::{PodCondition, PodIP, PodStatus};
use vipr_store::{Kind, Object, ObjectKey, Status, Store, StoreConfig, parse_manifests};

const PODS: usize = 1_000;
const SERVICES: usize = 10_000;
const ENDPOINTS_PER_SERVICE: usize = 10;

fn fresh_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreConfig::new(dir.path())).unwrap();
    (dir, store)
}

fn pod_manifest(i: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: web-{i}, labels: {{app: web}}}}\nspec:\n  nodeName: node-a\n  containers:\n  - name: web\n    image: host\n    command: [vipr-netexec]\n    ports: [{{name: http, containerPort: 8080}}]\n---\n"
    )
}

fn store_with_pods() -> (tempfile::TempDir, Store) {
    let (dir, store) = fresh_store();
    let text: String = (0..PODS).map(pod_manifest).collect();
    store.apply_manifest(&text).unwrap();
    for i in 0..PODS {
        let status = PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(format!("10.244.{}.{}", i / 250, i % 250 + 1)),
            pod_ips: Some(vec![PodIP {
                ip: format!("10.244.{}.{}", i / 250, i % 250 + 1),
            }]),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        };
        store
            .update_status(
                &ObjectKey::new(Kind::Pod, None, format!("web-{i}")),
                Status::Pod(status),
            )
            .unwrap();
    }
    (dir, store)
}

fn services_manifest() -> String {
    let mut out = String::with_capacity(SERVICES * 700);
    for s in 0..SERVICES {
        out.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}}}\nspec:\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{s}-1, labels: {{kubernetes.io/service-name: svc-{s}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
        ));
        for e in 0..ENDPOINTS_PER_SERVICE {
            let n = s * ENDPOINTS_PER_SERVICE + e;
            out.push_str(&format!(
                "- addresses: [10.{}.{}.{}]\n  conditions: {{ready: true}}\n",
                n >> 16 & 255,
                n >> 8 & 255,
                n & 255
            ));
        }
        out.push_str("---\n");
    }
    out
}

fn bench_list(c: &mut Criterion) {
    let (_dir, store) = store_with_pods();
    let store = Arc::new(store);
    let mut group = c.benchmark_group("list_1000_pods");
    group.bench_function("list", |b| {
        b.iter(|| black_box(store.list(Kind::Pod, Some("default"))))
    });
    // What the agent does for `vipr get pods -o json`: list and serialize everything.
    group.bench_function("list_and_serialize_json", |b| {
        b.iter(|| {
            let items: Vec<serde_json::Value> = store
                .list(Kind::Pod, Some("default"))
                .iter()
                .map(|o| o.to_json_value())
                .collect();
            black_box(serde_json::to_vec(&items).unwrap())
        })
    });
    group.finish();
}

fn bench_apply(c: &mut Criterion) {
    let text = services_manifest();
    let objects: Vec<Object> = parse_manifests(&text).unwrap();
    assert_eq!(objects.len(), 2 * SERVICES);
    let mut group = c.benchmark_group("apply_10k_services_100k_endpoints");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .warm_up_time(Duration::from_secs(1));
    group.bench_function("parse_manifest", |b| {
        b.iter(|| black_box(parse_manifests(&text).unwrap()))
    });
    group.bench_function("apply_typed", |b| {
        b.iter_batched(
            || (fresh_store(), objects.clone()),
            |((_dir, store), objects)| black_box(store.apply(objects).unwrap().len()),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("parse_and_apply_manifest", |b| {
        b.iter_batched(
            fresh_store,
            |(_dir, store)| black_box(store.apply_manifest(&text).unwrap().len()),
            BatchSize::PerIteration,
        )
    });
    // Deleting everything: each delete looks up the object's dependents
    // (the owner index keeps that from walking the namespace per object).
    group.bench_function("delete_20k_objects", |b| {
        let keys: Vec<_> = objects.iter().map(|o| o.key()).collect();
        b.iter_batched(
            || {
                let (dir, store) = fresh_store();
                store.apply(objects.clone()).unwrap();
                (dir, store)
            },
            |(_dir, store)| black_box(store.delete_many(&keys, false).unwrap().len()),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("reopen_20k_objects", |b| {
        let (dir, store) = fresh_store();
        store.apply(objects.clone()).unwrap();
        drop(store);
        b.iter(|| {
            black_box(
                Store::open(StoreConfig::new(dir.path()))
                    .unwrap()
                    .revision(),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench_list, bench_apply);
criterion_main!(benches);
