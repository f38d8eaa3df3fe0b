//! `vipr agent` end to end: real pods (vipr-netexec) behind a ClusterIP,
//! reached from another pod by address and by name, readiness followed by
//! the data plane, an agent killed with SIGKILL adopting its pods, and bad
//! manifests rejected without touching what is stored.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::Result;
use vipr_e2e::{
    agent::{AgentNode, client_pod, netexec_pod},
    require_root,
};

/// Two netexec pods behind three services, and a client pod.
fn manifest() -> String {
    [
        netexec_pod("web-1", "web"),
        netexec_pod("web-2", "web"),
        client_pod("client"),
        SERVICES.into(),
    ]
    .concat()
}

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080}
  - {name: udp, port: 81, targetPort: udp, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: web-local}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  selector: {app: nothing}
  ports: [{port: 80}]
"#;

/// The set of hostnames that answered `n` HTTP requests to `url` from the client pod.
fn answering(node: &AgentNode, url: &str, n: usize) -> Result<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let (ok, out) = node.exec("client", &["curl", "-s", "-m", "2", url])?;
        if ok {
            seen.insert(out.trim().to_owned());
        }
    }
    Ok(seen)
}

#[test]
fn pods_behind_a_clusterip_by_address_and_name() -> Result<()> {
    require_root();
    let mut node = AgentNode::start("agt")?;
    let applied = node.apply(&manifest())?;
    assert!(applied.contains("service/web created"), "{applied}");
    node.wait_ready(&["web-1", "web-2", "client"], Duration::from_secs(30))?;
    let vip = node.cluster_ip("web")?;

    // TCP through the VIP reaches both backends.
    let both: BTreeSet<String> = ["web-1", "web-2"].map(String::from).into();
    let url = format!("http://{vip}/hostname");
    assert_eq!(answering(&node, &url, 20)?, both);

    // The cluster DNS answers the service name through the pod's search path.
    let (ok, hosts) = node.exec("client", &["getent", "hosts", "web"])?;
    assert!(ok && hosts.starts_with(&vip), "getent hosts web: {hosts:?}");
    assert_eq!(answering(&node, "http://web/hostname", 10)?.len(), 2);

    // UDP through the VIP. A datagram may be lost on a loaded machine, so the
    // client asks up to three times, as a real UDP client would.
    let mut answer = String::new();
    for _ in 0..3 {
        let (ok, out) = node.exec(
            "client",
            &["sh", "-c", &format!("echo hostname | nc -u -w2 {vip} 81")],
        )?;
        answer = out;
        if ok && answer.starts_with("web-") {
            break;
        }
    }
    assert!(answer.starts_with("web-"), "UDP answer {answer:?}");

    // A pod reaching its own service can get itself (hairpin).
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let (ok, out) = node.exec("web-1", &["curl", "-s", "-m", "2", &url])?;
        if ok {
            seen.insert(out.trim().to_owned());
        }
    }
    assert_eq!(seen, both, "hairpin: web-1 through its own service");

    // From outside the node through the uplink: the NodePort, SNATed to the
    // node address (externalTrafficPolicy Cluster).
    let outside = vipr_e2e::run(node.outside.command("curl").args([
        "-s",
        "-m",
        "2",
        &format!("http://{}:30080/clientip", vipr_e2e::agent::NODE_IP),
    ]))?;
    let client = String::from_utf8_lossy(&outside.stdout);
    assert!(
        client.starts_with(&format!("{}:", vipr_e2e::agent::NODE_IP)),
        "NodePort client address {client:?}"
    );

    // A process of the node itself (in a cgroup under --cgroup-root) reaches
    // the ClusterIP through the socket hooks.
    let node_client = node.cgroup_root.join("node-client");
    std::fs::create_dir_all(&node_client)?;
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec curl -s -m 2 {url}",
        node_client.display()
    );
    let from_node = vipr_e2e::run(node.node.net_command("sh").args(["-c", &script]))?;
    let answer = String::from_utf8_lossy(&from_node.stdout);
    assert!(
        answer.starts_with("web-"),
        "node-local client got {answer:?}"
    );
    std::fs::remove_dir(&node_client)?;

    // healthCheckNodePort of a Local service: 200 with the local endpoint count.
    let svc: serde_json::Value =
        serde_json::from_str(&node.vipr_ok(&["get", "svc", "web-local", "-o", "json"])?)?;
    let hc_port = svc["spec"]["healthCheckNodePort"]
        .as_u64()
        .expect("healthCheckNodePort");
    let hc = vipr_e2e::run(node.outside.command("curl").args([
        "-s",
        "-i",
        "-m",
        "2",
        &format!("http://{}:{hc_port}/", vipr_e2e::agent::NODE_IP),
    ]))?;
    let hc = String::from_utf8_lossy(&hc.stdout);
    assert!(hc.starts_with("HTTP/1.1 200"), "{hc}");
    assert!(hc.contains("\"localEndpoints\":2"), "{hc}");

    // A service without endpoints refuses at once (kube-proxy's REJECT).
    let empty = node.cluster_ip("empty")?;
    let started = Instant::now();
    let (ok, _) = node.exec(
        "client",
        &["curl", "-s", "-m", "5", &format!("http://{empty}/")],
    )?;
    assert!(!ok);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no-endpoint VIP timed out instead of refusing"
    );

    // A pod that turns unready leaves the backends within about a probe period.
    let web1_ip = node.pod("web-1")?["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_owned();
    node.exec(
        "client",
        &[
            "curl",
            "-s",
            &format!("http://{web1_ip}:8080/ready?set=false"),
        ],
    )?;
    let only_web2: BTreeSet<String> = ["web-2".to_string()].into();
    let deadline = Instant::now() + Duration::from_secs(5);
    while answering(&node, &url, 10)? != only_web2 {
        assert!(
            Instant::now() < deadline,
            "web-1 still serves 5s after turning unready"
        );
    }
    node.exec(
        "client",
        &[
            "curl",
            "-s",
            &format!("http://{web1_ip}:8080/ready?set=true"),
        ],
    )?;

    // kill -9 of the agent: pods keep running, the new agent adopts them
    // without restarting a container, and traffic flows again.
    let before = node.pod("web-2")?;
    node.kill_agent();
    // Pinned links: with no agent running, the pod side still has the pass
    // program XDP_TX'd refusals need.
    assert!(
        node.pod_eth0(before["metadata"]["uid"].as_str().unwrap())?
            .contains("prog/xdp"),
        "the pod's eth0 lost its XDP program with the agent"
    );
    node.restart_agent()?;
    node.wait_ready(&["web-1", "web-2"], Duration::from_secs(30))?;
    let after = node.pod("web-2")?;
    assert_eq!(
        before["status"]["containerStatuses"][0]["restartCount"],
        after["status"]["containerStatuses"][0]["restartCount"]
    );
    assert_eq!(
        before["status"]["containerStatuses"][0]["state"],
        after["status"]["containerStatuses"][0]["state"],
        "the container was restarted"
    );
    assert_eq!(answering(&node, &url, 20)?, both);

    // A deleted service stops answering.
    node.vipr_ok(&["delete", "svc", "web"])?;
    std::thread::sleep(Duration::from_millis(200));
    assert!(answering(&node, &url, 2)?.is_empty());
    Ok(())
}

#[test]
fn bad_manifests_are_rejected_whole() -> Result<()> {
    require_root();
    let node = AgentNode::start("bad")?;
    node.apply("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: keep}\ndata: {a: b}\n")?;

    let cases = [
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: x\n", "YAML"),
        (
            "apiVersion: v1\nkind: Gadget\nmetadata: {name: x}\n",
            "Gadget",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec:\n  containers:\n  - {name: c, imagee: host}\n",
            "imagee",
        ),
        (
            // Valid first document, invalid second: nothing of the batch is stored.
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: new}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: BAD_NAME}\nspec: {ports: [{port: 80}]}\n",
            "BAD_NAME",
        ),
    ];
    for (manifest, named) in cases {
        let error = node
            .apply(manifest)
            .expect_err("a bad manifest was accepted");
        assert!(
            error.to_string().contains(named),
            "the error does not name {named:?}: {error}"
        );
    }
    let configmaps = node.vipr_ok(&["get", "cm"])?;
    assert!(configmaps.contains("keep"), "{configmaps}");
    assert!(
        !configmaps.contains("new"),
        "half of a failed batch was stored: {configmaps}"
    );

    let unknown = node.vipr(&["get", "gadgets"])?;
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("gadgets"));
    Ok(())
}

#[test]
fn metrics_and_healthz_like_kube_proxy() -> Result<()> {
    require_root();
    let node = AgentNode::start("met")?;
    node.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: m}\nspec: {ports: [{port: 80}]}\n",
    )?;
    let get = |url: &str| -> Result<String> {
        let out = vipr_e2e::run(node.node.command("curl").args(["-s", "-i", "-m", "2", url]))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let healthz = get("http://127.0.0.1:10256/healthz")?;
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    assert!(healthz.contains("lastUpdated"), "{healthz}");
    // The data plane counters are exported every few seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = get("http://127.0.0.1:10249/metrics")?;
        assert!(
            metrics.contains("kubeproxy_sync_proxy_rules_duration_seconds_count"),
            "{metrics}"
        );
        assert!(
            metrics.contains("kubeproxy_network_programming_duration_seconds"),
            "{metrics}"
        );
        if metrics.contains("vipr_datapath_packets_total{outcome=\"passed\"}") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no data plane counters in {metrics}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(get("http://127.0.0.1:10249/nothing")?.starts_with("HTTP/1.1 404"));
    Ok(())
}

/// The shipped example: container "caller" reaches container "server" of the
/// same pod on 127.0.0.1.
#[test]
fn two_container_example_shares_localhost() -> Result<()> {
    require_root();
    let node = AgentNode::start("two")?;
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/two-containers.yaml");
    node.apply(&std::fs::read_to_string(example)?)?;
    node.wait_ready(&["pair"], Duration::from_secs(30))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let logs = node.vipr_ok(&["logs", "pair", "-c", "caller"])?;
        if logs.contains("server says: pair") {
            return Ok(());
        }
        assert!(
            Instant::now() < deadline,
            "caller never reached server: {logs:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
