//! Crash safety for real: a child process (this test binary re-run in "child" mode)
//! applies objects in a loop and prints an acknowledgement after each successful
//! apply; the parent SIGKILLs it at a random moment, reopens the store and checks that
//! every acknowledged write is there and the store is consistent. Repeated on the same
//! state dir, so recovery after a crash is itself crashed into.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use rand::Rng;
use vipr_store::{Kind, Object, ObjectKey, Store, StoreConfig};

const CHILD_ENV: &str = "VIPR_STORE_CRASH_CHILD_DIR";
const ROUND_ENV: &str = "VIPR_STORE_CRASH_ROUND";
const ACK: &str = "ACK ";
const ROUNDS: usize = 8;

fn batch(round: usize, i: usize) -> String {
    // A multi-object batch (new service + new config map) plus an update of a counter
    // config map, so both creates and in-place updates are under test.
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s-{round}-{i}}}\nspec:\n  ports: [{{port: 80}}]\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c-{round}-{i}}}\ndata: {{payload: \"{}\"}}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: counter}}\ndata: {{value: \"{round}-{i}\", seq: \"{}\"}}\n",
        "x".repeat(i % 500),
        round * 1_000_000 + i
    )
}

/// Child mode: runs only when the parent sets the env var; otherwise a no-op test.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let round: usize = std::env::var(ROUND_ENV).unwrap().parse().unwrap();
    let store = Store::open(StoreConfig::new(dir)).unwrap();
    for i in 0.. {
        store.apply_manifest(&batch(round, i)).unwrap();
        // Printed only after apply returned: from here on the write must survive.
        println!("{ACK}{i}");
    }
}

#[test]
fn kill_9_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rng();
    let mut total_acked = 0;
    for round in 0..ROUNDS {
        let last_ack = run_and_kill(
            dir.path(),
            round,
            Duration::from_millis(rng.random_range(50..600)),
        );
        total_acked += last_ack.map_or(0, |i| i + 1);
        verify(dir.path(), round, last_ack);
    }
    assert!(
        total_acked > 0,
        "the child never acknowledged anything; the test tested nothing"
    );
    eprintln!("{ROUNDS} crashes, {total_acked} acknowledged batches, all present");
}

/// Runs the child until `after`, SIGKILLs it, returns the last acknowledged index.
fn run_and_kill(dir: &std::path::Path, round: usize, after: Duration) -> Option<usize> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .env(ROUND_ENV, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(i) = line.strip_prefix(ACK).and_then(|n| n.parse::<usize>().ok()) {
                let _ = tx.send(i);
            }
        }
    });
    std::thread::sleep(after);
    // Child::kill sends SIGKILL on Unix: no destructors, no flush, no clean close.
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    rx.try_iter().last()
}

fn verify(dir: &std::path::Path, round: usize, last_ack: Option<usize>) {
    let store = Store::open(StoreConfig::new(dir)).expect("store reopens cleanly after SIGKILL");
    if let Some(last) = last_ack {
        for i in 0..=last {
            let svc = ObjectKey::new(Kind::Service, None, format!("s-{round}-{i}"));
            let cm = ObjectKey::new(Kind::ConfigMap, None, format!("c-{round}-{i}"));
            assert!(
                store.get(&svc).is_some(),
                "round {round}: acknowledged {svc} lost"
            );
            let Some(cm_obj) = store.get(&cm) else {
                panic!("round {round}: acknowledged {cm} lost")
            };
            let Object::ConfigMap(c) = &*cm_obj else {
                panic!()
            };
            assert_eq!(c.data.as_ref().unwrap()["payload"].len(), i % 500);
        }
        let counter = store
            .get(&ObjectKey::new(Kind::ConfigMap, None, "counter"))
            .unwrap();
        let Object::ConfigMap(c) = &*counter else {
            panic!()
        };
        let seq: usize = c.data.as_ref().unwrap()["seq"].parse().unwrap();
        assert!(
            seq >= round * 1_000_000 + last,
            "round {round}: counter went back to {seq}"
        );
    }
    // Consistency: every batch is whole (a service without its config map, or the
    // reverse, would be a torn transaction), and no two services share a ClusterIP.
    let services = store.list(Kind::Service, None);
    for s in &services {
        let cm = s.metadata().name.as_ref().unwrap().replacen("s-", "c-", 1);
        assert!(
            store
                .get(&ObjectKey::new(Kind::ConfigMap, None, cm.clone()))
                .is_some(),
            "torn batch: {cm} missing"
        );
    }
    let mut ips: Vec<String> = services
        .iter()
        .map(|s| {
            s.as_service()
                .unwrap()
                .spec
                .as_ref()
                .unwrap()
                .cluster_ip
                .clone()
                .unwrap()
        })
        .collect();
    let n = ips.len();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), n, "duplicate ClusterIPs after recovery");
    assert_eq!(store.list(Kind::ConfigMap, None).len(), n + 1);
    let max_rv = store
        .snapshot()
        .objects
        .iter()
        .map(|o| o.resource_version())
        .max()
        .unwrap_or(0);
    assert!(
        store.revision() >= max_rv,
        "revision counter behind stored objects"
    );
}
