//! Ad-hoc phase timing of the 10k-services manifest (kept out of the report).
use std::time::Instant;
fn main() {
    let mut text = String::new();
    for s in 0..10_000 {
        text.push_str(&format!("apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}}}\nspec:\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{s}-1, labels: {{kubernetes.io/service-name: svc-{s}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"));
        for e in 0..10 { let n = s*10+e; text.push_str(&format!("- addresses: [10.{}.{}.{}]\n  conditions: {{ready: true}}\n", n>>16&255, n>>8&255, n&255)); }
        text.push_str("---\n");
    }
    for _ in 0..3 {
        let t = Instant::now();
        let objs = vipr_store::parse_manifests(&text).unwrap();
        let parse = t.elapsed();
        let dir = tempfile::tempdir().unwrap();
        let store = vipr_store::Store::open(vipr_store::StoreConfig::new(dir.path())).unwrap();
        let t = Instant::now();
        let mut objs2 = objs.clone();
        for o in &mut objs2 { vipr_store::validation::default_and_validate(o).unwrap(); }
        let validate = t.elapsed();
        let t = Instant::now();
        store.apply(objs).unwrap();
        eprintln!("parse {parse:?} validate-only {validate:?} apply {:?}", t.elapsed());
    }
}
