//! Balancing through `vipr agent`, end to end: real pods (vipr-netexec)
//! behind services whose `vipr.io/lb-algorithm` annotation and
//! `sessionAffinity` the data plane follows, reached from a client pod
//! (socket path: the cgroup hooks) and from outside the node through a
//! NodePort (XDP path); bad balancing settings refused at apply.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use vipr_common::Counter;
use vipr_e2e::{
    agent::{AgentNode, NODE_IP},
    maps::{pinned_counter, pinned_maglev_table},
    require_root,
};

/// Three netexec pods labelled app=web, and a client pod.
fn pods() -> String {
    let mut manifest = String::new();
    for i in 1..=3 {
        manifest += &format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: web-{i}, labels: {{app: web}}}}
spec:
  containers:
  - name: netexec
    image: host
    command: [vipr-netexec, --http-port, "8080"]
    ports: [{{name: http, containerPort: 8080}}]
    readinessProbe: {{httpGet: {{path: /ready, port: http}}, periodSeconds: 1}}
---
"#
        );
    }
    manifest += r#"
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  containers:
  - name: shell
    image: host
    command: [sleep, "3600"]
"#;
    manifest
}

const WEB: [&str; 3] = ["web-1", "web-2", "web-3"];

/// A NodePort service over the web pods with `extra` spec lines and
/// `annotations` (a YAML flow map body).
fn service(name: &str, node_port: u16, annotations: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: {name}, annotations: {{{annotations}}}}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: http, nodePort: {node_port}}}]
{extra}
"#
    )
}

/// The pod names that answered `n` requests from the client pod, in order.
fn from_client(node: &AgentNode, url: &str, n: usize) -> Result<Vec<String>> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let (ok, out) = node.exec("client", &["curl", "-s", "-m", "2", url])?;
        if !ok {
            bail!("curl {url} from the client pod failed");
        }
        seen.push(out.trim().to_owned());
    }
    Ok(seen)
}

/// The pod names that answered `n` requests from outside the node.
fn from_outside(node: &AgentNode, node_port: u16, n: usize) -> Result<Vec<String>> {
    let url = format!("http://{NODE_IP}:{node_port}/hostname");
    let mut seen = Vec::new();
    for _ in 0..n {
        let out = vipr_e2e::run(node.outside.command("curl").args(["-s", "-m", "2", &url]))?;
        seen.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }
    Ok(seen)
}

fn distinct(names: &[String]) -> BTreeSet<&str> {
    names.iter().map(String::as_str).collect()
}

/// Makes netexec pod `pod` answer its readiness probe with `ready`.
fn set_ready(node: &AgentNode, pod: &str, ready: bool) -> Result<()> {
    let url = format!("http://127.0.0.1:8080/ready?set={ready}");
    let (ok, _) = node.exec(pod, &["curl", "-s", "-m", "2", &url])?;
    if !ok {
        bail!("setting {pod} ready={ready} failed");
    }
    Ok(())
}

/// Waits until the frontend of `service` has `count` backends.
fn wait_backends(node: &AgentNode, vip: &str, count: u32) -> Result<()> {
    let pinned = vipr_e2e::maps::PinnedServices::open(&node.pin_dir())?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if pinned.backends(vip.parse()?, 80, true)? == Some(count) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{vip}:80 did not get {count} backends")
}

#[test]
fn algorithm_annotations_choose_the_balancing() -> Result<()> {
    require_root();
    let node = AgentNode::start("lbalg")?;
    node.apply(&pods())?;
    node.apply(&service("hashed", 30090, "vipr.io/lb-algorithm: sh", ""))?;
    node.apply(&service("turns", 30091, "vipr.io/lb-algorithm: rr", ""))?;
    let mut all = WEB.to_vec();
    all.push("client");
    node.wait_ready(&all, Duration::from_secs(30))?;
    let hashed = node.cluster_ip("hashed")?;
    let turns = node.cluster_ip("turns")?;
    wait_backends(&node, &hashed, 3)?;
    wait_backends(&node, &turns, 3)?;

    // sh: one client, one pod, connection after connection; both paths.
    let seen = from_client(&node, &format!("http://{hashed}/hostname"), 12)?;
    assert_eq!(distinct(&seen).len(), 1, "sh from a pod: {seen:?}");
    let seen = from_outside(&node, 30090, 12)?;
    assert_eq!(distinct(&seen).len(), 1, "sh from outside: {seen:?}");

    // rr over the same pods: every pod in turn.
    let seen = from_client(&node, &format!("http://{turns}/hostname"), 6)?;
    assert_eq!(distinct(&seen).len(), 3, "rr from a pod: {seen:?}");
    assert_eq!(seen[..3], seen[3..], "rr is a rotation: {seen:?}");
    let seen = from_outside(&node, 30091, 6)?;
    assert_eq!(distinct(&seen).len(), 3, "rr from outside: {seen:?}");

    // Changing the annotation re-programs the service: now maglev, keyed
    // by the 5-tuple, so a pod's connections (new source ports) spread.
    node.apply(&service(
        "hashed",
        30090,
        "vipr.io/lb-algorithm: maglev, vipr.io/maglev-table-size: \"251\"",
        "",
    ))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = from_outside(&node, 30090, 12)?;
        if distinct(&seen).len() > 1 {
            break;
        }
        if Instant::now() > deadline {
            bail!("maglev from outside still one pod: {seen:?}");
        }
    }

    // Bad settings are refused at apply, naming what to fix; nothing stored.
    for (bad, named) in [
        ("vipr.io/lb-algorithm: weighted", "vipr.io/lb-algorithm"),
        (
            "vipr.io/lb-algorithm: maglev, vipr.io/maglev-table-size: \"1000\"",
            "vipr.io/maglev-table-size",
        ),
    ] {
        let error = node
            .apply(&service("refused", 30092, bad, ""))
            .expect_err("bad balancing accepted");
        assert!(error.to_string().contains(named), "{error}");
    }
    let error = node
        .apply(&service(
            "refused",
            30092,
            "",
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}",
        ))
        .expect_err("timeout 0 accepted");
    assert!(
        error
            .to_string()
            .contains("spec.sessionAffinityConfig.clientIP.timeoutSeconds"),
        "{error}"
    );
    assert!(!node.vipr(&["get", "svc", "refused"])?.status.success());
    let error = node
        .apply(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: heavy, annotations: {vipr.io/weight: lots}}\n\
             spec: {containers: [{name: c, image: host, command: [sleep, \"60\"]}]}\n",
        )
        .expect_err("bad weight accepted");
    assert!(error.to_string().contains("vipr.io/weight"), "{error}");
    Ok(())
}

#[test]
fn client_ip_affinity_sticks_follows_readiness_and_expires() -> Result<()> {
    require_root();
    let node = AgentNode::start("lbaff")?;
    node.apply(&pods())?;
    // Round robin underneath: without affinity every connection would move.
    node.apply(&service(
        "sticky",
        30093,
        "vipr.io/lb-algorithm: rr",
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}",
    ))?;
    let mut all = WEB.to_vec();
    all.push("client");
    node.wait_ready(&all, Duration::from_secs(30))?;
    let vip = node.cluster_ip("sticky")?;
    wait_backends(&node, &vip, 3)?;
    let url = format!("http://{vip}/hostname");

    // Same client, same pod (requests well within the timeout).
    let seen = from_client(&node, &url, 10)?;
    assert_eq!(distinct(&seen).len(), 1, "from a pod: {seen:?}");
    let sticky = seen[0].clone();
    let outside = from_outside(&node, 30093, 10)?;
    assert_eq!(distinct(&outside).len(), 1, "from outside: {outside:?}");

    // The pod turns unready: the client moves to a ready pod, and stays.
    set_ready(&node, &sticky, false)?;
    wait_backends(&node, &vip, 2)?;
    let seen = from_client(&node, &url, 6)?;
    assert_eq!(distinct(&seen).len(), 1, "after unready: {seen:?}");
    assert_ne!(seen[0], sticky, "still sent to the unready pod");
    let moved = seen[0].clone();
    set_ready(&node, &sticky, true)?;
    wait_backends(&node, &vip, 3)?;
    assert_eq!(from_client(&node, &url, 3)?, vec![moved.clone(); 3]);

    // Idle past timeoutSeconds: the next connection is balanced afresh (no
    // affinity hit counted), the ones after it stick again (one hit each).
    let hits = || pinned_counter(&node.pin_dir(), Counter::AffinityHit);
    let before = hits()?;
    from_client(&node, &url, 1)?;
    assert_eq!(hits()? - before, 1, "within the timeout: a hit");
    std::thread::sleep(Duration::from_millis(3500));
    let before = hits()?;
    let fresh = from_client(&node, &url, 1)?;
    assert_eq!(hits()?, before, "affinity outlived its timeout");
    let seen = from_client(&node, &url, 4)?;
    assert_eq!(hits()? - before, 4);
    assert_eq!(seen, vec![fresh[0].clone(); 4], "sticks again after expiry");
    Ok(())
}

/// A selector-less maglev service over ten fixed addresses (an
/// EndpointSlice of its own): no pods needed, the same backends anywhere.
fn maglev_service(weights_from_slice_order: &str) -> String {
    let endpoints: String = (1..=10)
        .map(|i| format!("- addresses: [10.244.50.{i}]\n"))
        .collect();
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: consistent, annotations: {{vipr.io/lb-algorithm: maglev, vipr.io/maglev-table-size: "4093"}}}}
spec:
  clusterIP: 10.96.77.7
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: consistent-1, labels: {{kubernetes.io/service-name: consistent}}}}
addressType: IPv4
endpoints:
{weights_from_slice_order}{endpoints}ports:
- {{port: 8080}}
"#
    )
}

/// Waits for the Maglev table of 10.96.77.7:80 on `node`.
fn maglev_table(node: &AgentNode) -> Result<Vec<(std::net::Ipv4Addr, u16)>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let table = pinned_maglev_table(&node.pin_dir(), [10, 96, 77, 7].into(), 80)?;
        if table.len() == 4093 {
            return Ok(table);
        }
        if Instant::now() > deadline {
            bail!("no Maglev table programmed (have {} slots)", table.len());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every node with the same `--maglev-seed` builds the same table (so a
/// flow gets the same backend whichever node it enters), whatever order
/// the endpoints are listed in; another seed builds another table.
#[test]
fn maglev_tables_agree_across_agents_with_one_seed() -> Result<()> {
    require_root();
    let a = AgentNode::start_with("mgla", &["--maglev-seed", "0x5eed"])?;
    let b = AgentNode::start_with("mglb", &["--maglev-seed", "0x5eed"])?;
    let other = AgentNode::start_with("mglc", &["--maglev-seed", "42"])?;
    a.apply(&maglev_service(""))?;
    // b lists the endpoints in another order (one moved to the front).
    b.apply(&maglev_service("- addresses: [10.244.50.10]\n").replacen(
        "- addresses: [10.244.50.10]\nports",
        "ports",
        1,
    ))?;
    other.apply(&maglev_service(""))?;
    let (ta, tb, tc) = (maglev_table(&a)?, maglev_table(&b)?, maglev_table(&other)?);
    assert_eq!(ta, tb, "same seed, same table");
    let backends: BTreeSet<_> = ta.iter().collect();
    assert_eq!(backends.len(), 10, "every backend has slots");
    let differing = ta.iter().zip(&tc).filter(|(x, y)| x != y).count();
    assert!(
        differing > 4093 / 2,
        "another seed moved only {differing} slots"
    );
    Ok(())
}

/// `lc` on the socket path: a pod's open connections count for their pod
/// until the socket is released, so new ones go to the least loaded.
#[test]
fn least_connection_counts_a_pods_open_connections() -> Result<()> {
    require_root();
    let node = AgentNode::start("lbleast")?;
    node.apply(&pods())?;
    node.apply(&service("least", 30094, "vipr.io/lb-algorithm: lc", ""))?;
    let mut all = WEB.to_vec();
    all.push("client");
    node.wait_ready(&all, Duration::from_secs(30))?;
    let vip = node.cluster_ip("least")?;
    wait_backends(&node, &vip, 3)?;
    let url = format!("http://{vip}/hostname");

    // Nothing open: each request's connection is gone before the next one,
    // so every one goes to the first pod in the slots (ties go first).
    let idle = from_client(&node, &url, 4)?;
    assert_eq!(distinct(&idle).len(), 1, "{idle:?}");
    let first = idle[0].clone();

    // Two connections held open (for 6 s) take the first two pods; new
    // ones, made while they are open, go to the third, the least loaded.
    let script = format!(
        "timeout 6 nc {vip} 80 </dev/null >/dev/null & sleep 0.3; \
         timeout 6 nc {vip} 80 </dev/null >/dev/null & sleep 0.3; \
         for i in 1 2 3 4; do curl -s -m 2 {url}; echo; done"
    );
    let (ok, out) = node.exec("client", &["sh", "-c", &script])?;
    assert!(ok, "{out}");
    let loaded: Vec<String> = out.lines().map(str::to_owned).collect();
    assert_eq!(loaded.len(), 4, "{out}");
    assert_eq!(distinct(&loaded).len(), 1, "{loaded:?}");
    assert_ne!(loaded[0], first, "the held connections were not counted");

    // Released, they count no more: back to the first pod.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(from_client(&node, &url, 3)?, vec![first; 3]);
    Ok(())
}
