//! The debugging commands end to end, through the agent and real traffic
//! (from outside the node through a NodePort: the XDP path with conntrack;
//! from a pod: the socket-level hooks, which see flows but no packets):
//! `vipr service list` (backends, their state, counters that grow), the
//! per-service Prometheus counters, `vipr lb list` (agrees with the intent,
//! flags a tampered map), `vipr trace` (an existing flow's backend as the
//! traffic shows it; the no-endpoint and unknown-VIP outcomes, checked
//! against what real packets get) and `vipr monitor -o json` (a translate
//! event for a real connection, drop events with their reason).

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::Value;
use vipr_e2e::{
    agent::{AgentNode, NODE_IP, OUTSIDE_IP, bin_dir, client_pod, netexec_pod},
    maps::PinnedServices,
    require_root,
};

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080}
  - {name: udp, port: 81, targetPort: udp, protocol: UDP, nodePort: 30081}
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  selector: {app: nothing}
  ports: [{port: 80}]
"#;

/// An address in the service CIDR (10.96.0.0/12) no service has.
const UNKNOWN_VIP: &str = "10.96.200.200";

fn start() -> Result<AgentNode> {
    require_root();
    let node = AgentNode::start("dbg")?;
    let manifest = netexec_pod("web-1", "web")
        + &netexec_pod("web-2", "web")
        + &client_pod("client")
        + SERVICES;
    node.apply(&manifest)?;
    node.wait_ready(&["web-1", "web-2", "client"], Duration::from_secs(30))?;
    Ok(node)
}

fn json(node: &AgentNode, args: &[&str]) -> Result<Value> {
    let out = node.vipr_ok(args)?;
    serde_json::from_str(&out).with_context(|| format!("vipr {}: {out}", args.join(" ")))
}

fn pod_ip(node: &AgentNode, pod: &str) -> Result<String> {
    node.pod(pod)?["status"]["podIP"]
        .as_str()
        .map(str::to_owned)
        .context("pod has no IP")
}

/// `vipr trace --src SRC --dst DST [--proto P] -o json`.
fn trace_json(node: &AgentNode, src: &str, dst: &str, proto: Option<&str>) -> Result<Value> {
    let mut args = vec!["trace", "--src", src, "--dst", dst, "-o", "json"];
    if let Some(proto) = proto {
        args.extend(["--proto", proto]);
    }
    json(node, &args)
}

/// The `service list` entry of frontend `frontend`.
fn frontend(list: &Value, frontend: &str) -> Value {
    list["frontends"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| f["frontend"] == frontend)
        .cloned()
        .unwrap_or_else(|| panic!("no frontend {frontend} in {list:#}"))
}

fn curl(node: &AgentNode, url: &str) -> Result<(bool, String)> {
    node.exec("client", &["curl", "-s", "-m", "2", url])
}

/// An HTTP request from the outside namespace (through the uplink's XDP).
fn curl_outside(node: &AgentNode, url: &str) -> Result<bool> {
    let out = node
        .outside
        .command("curl")
        .args(["-s", "-m", "2", url])
        .output()?;
    Ok(out.status.success())
}

#[test]
fn service_list_counters_and_lb_list_against_the_maps() -> Result<()> {
    let node = start()?;
    let vip = node.cluster_ip("web")?;
    let web = format!("{vip}:80/TCP");
    let node_port = format!("{NODE_IP}:30080/TCP");
    let ips = [pod_ip(&node, "web-1")?, pod_ip(&node, "web-2")?];

    let list = json(&node, &["service", "list", "-o", "json"])?;
    assert_eq!(frontend(&list, &node_port)["type"], "NodePort");
    let entry = frontend(&list, &web);
    assert_eq!(entry["service"], "web");
    assert_eq!(entry["type"], "ClusterIP");
    assert_eq!(entry["algorithm"], "random");
    assert_eq!(entry["affinity"], "None");
    assert_eq!(entry["traffic_policy"], "Cluster");
    let backends = entry["backends"].as_array().unwrap();
    let mut pods: Vec<&str> = backends
        .iter()
        .map(|b| b["pod"].as_str().unwrap())
        .collect();
    pods.sort();
    assert_eq!(pods, ["web-1", "web-2"]);
    for backend in backends {
        assert_eq!(backend["state"], "ready", "{backend}");
        assert_eq!(backend["active"], true);
        let addr = backend["address"].as_str().unwrap();
        assert!(ips.iter().any(|ip| addr == format!("{ip}:8080")), "{addr}");
    }
    assert_eq!(entry["counters"]["new_flows"], 0);

    // From outside through the NodePort: XDP sees every packet.
    let requests = 10;
    for _ in 0..requests {
        assert!(curl_outside(
            &node,
            &format!("http://{NODE_IP}:30080/hostname")
        )?);
    }
    // From a pod to the ClusterIP: balanced at connect(), one flow each.
    let pod_requests = 4;
    for _ in 0..pod_requests {
        assert!(curl(&node, &format!("http://{vip}/hostname"))?.0);
    }
    let list = json(&node, &["service", "list", "-o", "json"])?;
    let entry = frontend(&list, &node_port);
    let flows = entry["counters"]["new_flows"].as_u64().unwrap();
    assert_eq!(flows, requests, "one new flow per request: {entry:#}");
    // A request is at least SYN, ACK, request, FIN each way: packets grew by
    // at least 6 per request, both directions counted.
    let packets = entry["counters"]["packets"].as_u64().unwrap();
    assert!(packets >= 6 * requests, "{entry:#}");
    assert!(entry["counters"]["bytes"].as_u64().unwrap() > packets * 40);
    let per_backend: u64 = entry["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["counters"]["new_flows"].as_u64().unwrap())
        .sum();
    assert_eq!(per_backend, flows, "backends add up to their frontend");
    let cluster_ip = frontend(&list, &web);
    assert_eq!(
        cluster_ip["counters"]["new_flows"], pod_requests,
        "{cluster_ip:#}"
    );

    // A refused connection is a drop of that service, by reason.
    let empty = node.cluster_ip("empty")?;
    assert!(!curl(&node, &format!("http://{empty}/"))?.0);
    let entry = frontend(
        &json(&node, &["service", "list", "-o", "json"])?,
        &format!("{empty}:80/TCP"),
    );
    assert!(
        entry["drops"]["sock_rejected"].as_u64() >= Some(1),
        "{entry:#}"
    );
    assert!(entry["backends"].as_array().unwrap().is_empty());

    // The same counters in Prometheus, labelled with the service.
    let series = format!(
        "vipr_service_new_flows_total{{frontend=\"{node_port}\",namespace=\"default\",service=\"web\"}} {requests}"
    );
    let drops = "vipr_service_drops_total{frontend=\"".to_owned()
        + &empty
        + ":80/TCP\",namespace=\"default\",reason=\"sock_rejected\",service=\"empty\"}";
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let out = vipr_e2e::run(node.node.net_command("curl").args([
            "-s",
            "-m",
            "2",
            "http://127.0.0.1:10249/metrics",
        ]))?;
        let metrics = String::from_utf8_lossy(&out.stdout).into_owned();
        if metrics.contains(&series) && metrics.contains(&drops) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no {series} / {drops} in\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // lb list: the maps hold what the agent meant, including the flows.
    let lb = json(&node, &["lb", "list", "-o", "json"])?;
    assert_eq!(
        lb["differences"],
        serde_json::json!([]),
        "{:#}",
        lb["differences"]
    );
    let service = lb["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["frontend"] == web)
        .expect("web's frontend in SERVICES")
        .clone();
    assert_eq!(service["backend_count"], 2);
    assert_eq!(service["service"], "default/web");
    let id = service["service_id"].as_u64().unwrap();
    let slots = lb["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["service_id"].as_u64() == Some(id))
        .count();
    assert_eq!(slots, 2);

    // --raw: the SERVICES key of the frontend in bpftool's hex.
    let raw = json(&node, &["lb", "list", "--raw", "-o", "json"])?;
    let octets: Vec<String> = vip
        .split('.')
        .map(|o| format!("{:02x}", o.parse::<u8>().unwrap()))
        .collect();
    let key = format!("{} 00 50 06 00", octets.join(" "));
    assert!(
        raw["raw"]["SERVICES"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["key"] == key),
        "no SERVICES key {key} in {:#}",
        raw["raw"]["SERVICES"]
    );

    // Tamper with the kernel's copy: lb list says so; put back, it agrees.
    let mut pinned = PinnedServices::open(&node.pin_dir())?;
    let addr = vip.parse()?;
    let old = pinned.set_backends(addr, 80, true, 1)?;
    let lb = json(&node, &["lb", "list", "-o", "json"])?;
    let differences = lb["differences"].as_array().unwrap();
    assert!(
        differences
            .iter()
            .any(|d| d.as_str().unwrap().contains(&format!(
                "frontend {web} (default/web): SERVICES counts 1 backends, the agent wants 2"
            ))),
        "{differences:#?}"
    );
    pinned.set_backends(addr, 80, true, old)?;
    let lb = json(&node, &["lb", "list", "-o", "json"])?;
    assert_eq!(lb["differences"], serde_json::json!([]));
    // The text form prints the same.
    let text = node.vipr_ok(&["lb", "list"])?;
    assert!(
        text.contains("DIFFERENCES from the agent's intent: none"),
        "{text}"
    );
    Ok(())
}

/// `vipr monitor -o json`, its lines read on a thread; killed on drop.
struct Monitor {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Monitor {
    fn start(node: &AgentNode, args: &[&str]) -> Result<Self> {
        let mut child = Command::new(bin_dir().join("vipr"))
            .args(["monitor", "-o", "json"])
            .args(args)
            .env("VIPR_SOCKET", &node.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str(&line)
                    && tx.send(value).is_err()
                {
                    break;
                }
            }
        });
        // The agent turns events on when the monitor's request arrives.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Monitor { child, lines })
    }

    /// The first event matching `wanted` within a few seconds.
    fn expect(&self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(event) if wanted(&event) => return event,
                Ok(event) => seen.push(event),
                Err(_) => break,
            }
        }
        panic!("no {what} event; saw {seen:#?}");
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn trace_predicts_real_traffic_and_monitor_shows_it() -> Result<()> {
    let node = start()?;
    let vip = node.cluster_ip("web")?;
    let client = pod_ip(&node, "client")?;
    let monitor = Monitor::start(&node, &["--service", "web"])?;
    let drops = Monitor::start(&node, &["--type", "drop"])?;
    let of_client = Monitor::start(&node, &["--pod", "client"])?;
    let replies = Monitor::start(&node, &["--type", "reply", "--service", "web"])?;

    // A UDP flow from outside, from a fixed port, through the NodePort: it
    // stays in conntrack.
    let send = || -> Result<String> {
        let out = node
            .outside
            .command("sh")
            .args([
                "-c",
                &format!("echo hostname | nc -u -w1 -p 40123 {NODE_IP} 30081"),
            ])
            .output()?;
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(answer.starts_with("web-"), "UDP answer {answer:?}");
        Ok(answer)
    };
    let answered = send()?;
    let backend_ip = pod_ip(&node, &answered)?;
    let outside_client = format!("{OUTSIDE_IP}:40123");

    let event = monitor.expect("translate", |e| {
        e["type"] == "translate" && e["client"] == outside_client
    });
    assert_eq!(event["frontend"], format!("{NODE_IP}:30081"));
    assert_eq!(event["backend"], format!("{backend_ip}:8081"));
    assert_eq!(event["service"], "default/web");
    assert_eq!(event["protocol"], "UDP");
    assert_eq!(event["path"], "xdp");
    // externalTrafficPolicy Cluster: the backend sees the node as source.
    let seen = event["source_seen"].as_str().unwrap();
    assert!(seen.starts_with(&format!("{NODE_IP}:")), "{event}");
    // The backend's answer, translated back, on demand.
    let reply = replies.expect("reply", |e| e["client"] == outside_client);
    assert_eq!(reply["type"], "reply");
    assert_eq!(reply["frontend"], format!("{NODE_IP}:30081"));
    assert_eq!(reply["backend"], format!("{backend_ip}:8081"));

    // The trace of that tuple names the backend that answered, and so does
    // every datagram that follows.
    let dst = format!("{NODE_IP}:30081");
    let trace = trace_json(&node, &outside_client, &dst, Some("udp"))?;
    assert_eq!(trace["verdict"], "forwarded", "{trace:#}");
    assert_eq!(trace["backend"], format!("{backend_ip}:8081"), "{trace:#}");
    for _ in 0..3 {
        assert_eq!(send()?, answered, "the flow moved off the traced backend");
    }
    let text = node.vipr_ok(&[
        "trace",
        "--src",
        &outside_client,
        "--dst",
        &dst,
        "--proto",
        "udp",
    ])?;
    assert!(text.contains("existing flow"), "{text}");

    // A new flow from a pod: random over both ready backends, even odds,
    // decided at connect() by the socket hook, which the monitor shows.
    let trace = trace_json(&node, &client, &format!("{vip}:80"), None)?;
    let candidates = trace["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 2, "{trace:#}");
    for c in candidates {
        assert!((c["probability"].as_f64().unwrap() - 0.5).abs() < 1e-9);
    }
    assert!(
        trace["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["step"] == "socket"),
        "{trace:#}"
    );
    assert!(curl(&node, &format!("http://{vip}/hostname"))?.0);
    let event = monitor.expect("socket translate", |e| {
        e["type"] == "translate" && e["path"] == "socket" && e["frontend"] == format!("{vip}:80")
    });
    let backend = event["backend"].as_str().unwrap();
    let ips = [pod_ip(&node, "web-1")?, pod_ip(&node, "web-2")?];
    assert!(
        ips.iter().any(|ip| backend == format!("{ip}:8080")),
        "{event}"
    );

    // No endpoints: the trace says refused, a real connection is refused at
    // once, and the monitor reports it with its reason.
    let empty = node.cluster_ip("empty")?;
    let trace = trace_json(&node, &client, &format!("{empty}:80"), None)?;
    assert_eq!(trace["verdict"], "refused: no endpoints", "{trace:#}");
    let started = Instant::now();
    assert!(!curl(&node, &format!("http://{empty}/"))?.0);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once"
    );
    let event = drops.expect("refusal", |e| {
        e["type"] == "drop" && e["destination"] == format!("{empty}:80")
    });
    assert_eq!(event["reason"], "sock_rejected");
    assert_eq!(event["service"], "default/empty");

    // An unknown address in the service CIDR: dropped by XDP on the pod's
    // veth, never routed.
    let trace = trace_json(&node, &client, &format!("{UNKNOWN_VIP}:80"), None)?;
    assert_eq!(
        trace["verdict"], "dropped: unknown VIP in the service CIDR",
        "{trace:#}"
    );
    assert!(
        !node
            .exec(
                "client",
                &["curl", "-s", "-m", "1", &format!("http://{UNKNOWN_VIP}/")]
            )?
            .0
    );
    let event = drops.expect("unknown VIP drop", |e| {
        e["type"] == "drop" && e["destination"] == format!("{UNKNOWN_VIP}:80")
    });
    assert_eq!(event["reason"], "drop_unknown_vip");
    assert_eq!(event["path"], "xdp");
    // The pod filter: that drop is the client pod's; nothing of outside's.
    let mine = of_client.expect("the client pod's drop", |e| {
        e["destination"] == format!("{UNKNOWN_VIP}:80")
    });
    assert_eq!(mine["reason"], "drop_unknown_vip");
    assert_eq!(
        event["source"]
            .as_str()
            .map(|s| s.starts_with(&format!("{client}:"))),
        Some(true)
    );

    // Outside the service CIDR: passed to the kernel untouched.
    let trace = trace_json(&node, &client, "192.0.2.1:80", None)?;
    assert_eq!(trace["verdict"], "passed");

    // The service filter kept the other services' events away, the pod
    // filter the outside client's.
    while let Ok(event) = monitor.lines.try_recv() {
        assert_eq!(event["service"], "default/web", "{event}");
    }
    while let Ok(event) = of_client.lines.try_recv() {
        assert_ne!(event["client"], outside_client, "{event}");
    }
    Ok(())
}

const BALANCED: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: mag, annotations: {vipr.io/lb-algorithm: maglev}}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: http, nodePort: 30090}]
---
apiVersion: v1
kind: Service
metadata: {name: by-source, annotations: {vipr.io/lb-algorithm: sh}}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: http, nodePort: 30091}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky}
spec:
  type: NodePort
  sessionAffinity: ClientIP
  selector: {app: web}
  ports: [{port: 80, targetPort: http, nodePort: 30092}]
"#;

/// The pod that answered `/hostname` from outside, from client port `port`.
fn answered_from_outside(node: &AgentNode, node_port: u16, port: Option<u16>) -> Result<String> {
    let mut cmd = node.outside.command("curl");
    cmd.args(["-s", "-m", "2"]);
    if let Some(port) = port {
        cmd.args(["--local-port", &port.to_string()]);
    }
    let out = cmd
        .arg(format!("http://{NODE_IP}:{node_port}/hostname"))
        .output()?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    anyhow::ensure!(
        name.starts_with("web-"),
        "no answer from :{node_port} ({name:?})"
    );
    Ok(name)
}

/// The backend address `vipr trace` predicts for a new flow.
fn predicted(node: &AgentNode, src: &str, node_port: u16) -> Result<String> {
    let dst = format!("{NODE_IP}:{node_port}");
    let trace = trace_json(node, src, &dst, None)?;
    trace["backend"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no prediction: {trace:#}"))
}

#[test]
fn trace_predicts_maglev_source_hash_and_affinity() -> Result<()> {
    let node = start()?;
    node.apply(BALANCED)?;
    let ip_of = |pod: &str| -> Result<String> { Ok(format!("{}:8080", pod_ip(&node, pod)?)) };
    // Applied is stored; wait until the reconciler has programmed all three.
    let deadline = Instant::now() + Duration::from_secs(5);
    let list = loop {
        let list = json(&node, &["service", "list", "-o", "json"])?;
        let programmed = list["frontends"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| ["mag", "by-source", "sticky"].contains(&f["service"].as_str().unwrap()))
            .count();
        if programmed == 6 {
            break list;
        }
        assert!(Instant::now() < deadline, "not programmed: {list:#}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        frontend(&list, &format!("{NODE_IP}:30090/TCP"))["algorithm"],
        "maglev(16381)"
    );
    assert_eq!(
        frontend(&list, &format!("{NODE_IP}:30092/TCP"))["affinity"],
        "ClientIP 10800s"
    );

    // Maglev: the 5-tuple's slot in the table, predicted before the flow
    // exists, for several client ports; both backends come up.
    let mut seen = std::collections::BTreeSet::new();
    for port in 41000..41008u16 {
        let want = predicted(&node, &format!("{OUTSIDE_IP}:{port}"), 30090)?;
        let got = ip_of(&answered_from_outside(&node, 30090, Some(port))?)?;
        assert_eq!(got, want, "maglev from client port {port}");
        seen.insert(got);
    }
    assert_eq!(
        seen.len(),
        2,
        "eight ports all hashed to one backend: {seen:?}"
    );
    let lb = json(&node, &["lb", "list", "-o", "json"])?;
    let table = lb["maglev"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["frontend"] == format!("{NODE_IP}:30090/TCP"))
        .expect("the maglev table in lb list")
        .clone();
    assert_eq!(table["size"], 16381, "{table:#}");
    assert_eq!(
        lb["differences"],
        serde_json::json!([]),
        "{:#}",
        lb["differences"]
    );

    // Source hash: the client address decides, whatever the port.
    let want = predicted(&node, &OUTSIDE_IP.to_string(), 30091)?;
    for _ in 0..3 {
        assert_eq!(ip_of(&answered_from_outside(&node, 30091, None)?)?, want);
    }

    // ClientIP affinity: after one request, the trace finds the entry and
    // names its backend, which the next requests get.
    let first = ip_of(&answered_from_outside(&node, 30092, None)?)?;
    let dst = format!("{NODE_IP}:30092");
    let trace = trace_json(&node, &OUTSIDE_IP.to_string(), &dst, None)?;
    assert_eq!(trace["backend"], first, "{trace:#}");
    assert!(
        trace["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["step"] == "affinity" && s["detail"].as_str().unwrap().contains("again")),
        "{trace:#}"
    );
    for _ in 0..3 {
        assert_eq!(ip_of(&answered_from_outside(&node, 30092, None)?)?, first);
    }
    let lb = json(&node, &["lb", "list", "-o", "json"])?;
    assert!(
        lb["affinity"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["client"] == OUTSIDE_IP.to_string() && a["backend"] == first),
        "{:#}",
        lb["affinity"]
    );
    Ok(())
}
