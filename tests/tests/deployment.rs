//! Deployments end to end: a 3-replica Deployment of vipr-netexec behind a
//! ClusterIP, rolled out (`set env`) and rolled back (`rollout undo`) while
//! a real client keeps sending HTTP requests to the ClusterIP: not one may
//! fail. Also scaling (the endpoints follow), `rollout status`, `history`,
//! a rollout that cannot progress, and bad input rejected by field.

use std::{
    collections::BTreeSet,
    io::Read,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use vipr_e2e::{agent::AgentNode, require_root};

/// The shipped example: 3 replicas (maxSurge 1, maxUnavailable 0) behind a
/// ClusterIP named `web`.
const MANIFEST: &str = include_str!("../../examples/deployment.yaml");

/// The most requests one client run sends (it is stopped earlier).
const MAX_REQUESTS: u32 = 500_000;

/// A node process (in a cgroup under the agent's `--cgroup-root`, so the
/// socket hooks translate the ClusterIP) sending one HTTP request after the
/// other, each on a new connection, until stopped.
struct Client {
    child: Child,
    cgroup: PathBuf,
    /// Reads the client's output as it comes (a full pipe would stall it).
    output: Option<std::thread::JoinHandle<String>>,
}

/// What the client saw: answers by pod hostname, and the failures.
struct Outcome {
    by_host: std::collections::BTreeMap<String, u32>,
    failures: Vec<String>,
}

impl Client {
    fn start(node: &AgentNode, vip: &str) -> Result<Client> {
        let cgroup = node.cgroup_root.join("rollout-client");
        std::fs::create_dir_all(&cgroup)?;
        // curl's URL globbing: one process, MAX_REQUESTS sequential requests;
        // per request the body (the pod's hostname), status and exit code.
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec curl -s --connect-timeout 2 -m 5 \
             -w ' %{{http_code}} %{{exitcode}}\\n' 'http://{vip}/hostname?n=[1-{MAX_REQUESTS}]'",
            cgroup.display()
        );
        let mut child = node
            .node
            .net_command("sh")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the client")?;
        let mut stdout = child.stdout.take().context("client stdout")?;
        let output = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        Ok(Client {
            child,
            cgroup,
            output: Some(output),
        })
    }

    /// Stops the client and counts what it got (the last, possibly cut
    /// line is ignored: the client was interrupted writing it).
    fn stop(mut self) -> Result<Outcome> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let output = self
            .output
            .take()
            .context("client output")?
            .join()
            .map_err(|_| anyhow::anyhow!("client reader panicked"))?;
        let mut outcome = Outcome {
            by_host: Default::default(),
            failures: Vec::new(),
        };
        let complete = output.rfind('\n').map_or("", |end| &output[..end]);
        for line in complete.lines() {
            let mut fields = line.rsplitn(3, ' ');
            let (exit, code, host) = (fields.next(), fields.next(), fields.next());
            match (exit, code, host) {
                (Some("0"), Some("200"), Some(host)) if host.starts_with("web-") => {
                    *outcome.by_host.entry(host.to_owned()).or_default() += 1;
                }
                _ => outcome.failures.push(line.to_owned()),
            }
        }
        Ok(outcome)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

fn json(node: &AgentNode, args: &[&str]) -> Result<Value> {
    let mut full = args.to_vec();
    full.extend(["-o", "json"]);
    Ok(serde_json::from_str(&node.vipr_ok(&full)?)?)
}

fn items(list: &Value) -> Vec<Value> {
    list["items"].as_array().cloned().unwrap_or_default()
}

/// The pod-template-hash of the newest revision.
fn newest_hash(node: &AgentNode) -> Result<String> {
    let newest = items(&json(node, &["get", "rs"])?)
        .into_iter()
        .max_by_key(|rs| {
            rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
                .as_str()
                .and_then(|r| r.parse::<i64>().ok())
        })
        .context("no replicaset")?;
    Ok(newest["metadata"]["labels"]["pod-template-hash"]
        .as_str()
        .context("replicaset without a hash")?
        .to_owned())
}

/// Waits until the Deployment's pods are exactly `replicas` ready pods of
/// the newest revision, none terminating; returns their names.
fn wait_rolled_out(node: &AgentNode, replicas: usize, timeout: Duration) -> Result<Vec<String>> {
    let deadline = Instant::now() + timeout;
    loop {
        let hash = newest_hash(node)?;
        let pods = items(&json(node, &["get", "pods"])?);
        let names: Vec<String> = pods
            .iter()
            .filter(|p| p["metadata"]["labels"]["app"] == "web")
            .map(|p| {
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        let done = names.len() == replicas
            && pods
                .iter()
                .filter(|p| p["metadata"]["labels"]["app"] == "web")
                .all(|p| {
                    p["metadata"]["labels"]["pod-template-hash"] == hash.as_str()
                        && p["metadata"]["deletionTimestamp"].is_null()
                        && vipr_e2e::agent::is_ready(p)
                });
        if done {
            return Ok(names);
        }
        if Instant::now() > deadline {
            bail!(
                "not rolled out to {replicas} pods of {hash} within {timeout:?}: {names:?}\n{}",
                node.vipr_ok(&["get", "pods"])?
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The ready addresses in the service's EndpointSlices.
fn ready_endpoints(node: &AgentNode) -> Result<BTreeSet<String>> {
    let mut ready = BTreeSet::new();
    for slice in items(&json(node, &["get", "endpointslices"])?) {
        if slice["metadata"]["labels"]["kubernetes.io/service-name"] != "web" {
            continue;
        }
        for endpoint in slice["endpoints"].as_array().into_iter().flatten() {
            if endpoint["conditions"]["ready"] != false {
                for address in endpoint["addresses"].as_array().into_iter().flatten() {
                    ready.insert(address.as_str().unwrap_or_default().to_owned());
                }
            }
        }
    }
    Ok(ready)
}

fn wait_endpoints(node: &AgentNode, count: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready_endpoints(node)?.len() != count {
        if Instant::now() > deadline {
            bail!(
                "the service does not have {count} ready endpoints: {:?}",
                ready_endpoints(node)?
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Hostnames answering `n` requests to the ClusterIP from a node process.
fn answering(node: &AgentNode, vip: &str, n: u32) -> Result<BTreeSet<String>> {
    let cgroup = node.cgroup_root.join("probe-client");
    std::fs::create_dir_all(&cgroup)?;
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec curl -s -m 2 -w '\\n' 'http://{vip}/hostname?n=[1-{n}]'",
        cgroup.display()
    );
    let out = vipr_e2e::run(node.node.net_command("sh").args(["-c", &script]));
    let _ = std::fs::remove_dir(&cgroup);
    Ok(String::from_utf8_lossy(&out?.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

#[test]
fn rolling_update_and_undo_fail_no_request() -> Result<()> {
    require_root();
    let node = AgentNode::start("dro")?;
    node.apply(MANIFEST)?;
    let status = node.vipr_ok(&["rollout", "status", "deployment/web", "--timeout", "40s"])?;
    assert!(
        status.ends_with("deployment \"web\" successfully rolled out\n"),
        "{status}"
    );
    let first = wait_rolled_out(&node, 3, Duration::from_secs(10))?;
    let first_hash = newest_hash(&node)?;
    for name in &first {
        let suffix = name
            .strip_prefix(&format!("web-{first_hash}-"))
            .with_context(|| format!("pod name {name} is not web-<hash>-<suffix>"))?;
        assert_eq!(suffix.len(), 5, "{name}");
    }
    let vip = node.cluster_ip("web")?;
    wait_endpoints(&node, 3)?;

    let client = Client::start(&node, &vip)?;
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let out = node.vipr_ok(&["set", "env", "deployment/web", "VERSION=2"])?;
    assert_eq!(out.trim(), "deployment.apps/web env updated");
    let status = node.vipr_ok(&["rollout", "status", "deployment/web", "--timeout", "40s"])?;
    assert!(status.contains("successfully rolled out"), "{status}");
    let second = wait_rolled_out(&node, 3, Duration::from_secs(20))?;
    let rollout = started.elapsed();
    let second_hash = newest_hash(&node)?;
    assert_ne!(first_hash, second_hash, "set env made no new revision");
    assert!(
        second.iter().all(|n| !first.contains(n)),
        "old pods left: {second:?}"
    );
    std::thread::sleep(Duration::from_millis(500));

    let started = Instant::now();
    let out = node.vipr_ok(&["rollout", "undo", "deployment/web"])?;
    assert_eq!(out.trim(), "deployment.apps/web rolled back");
    node.vipr_ok(&["rollout", "status", "deployment/web", "--timeout", "40s"])?;
    let third = wait_rolled_out(&node, 3, Duration::from_secs(20))?;
    let undo = started.elapsed();
    assert_eq!(
        newest_hash(&node)?,
        first_hash,
        "undo did not return to the first template"
    );
    std::thread::sleep(Duration::from_millis(500));
    let outcome = client.stop()?;

    let total: u32 = outcome.by_host.values().sum();
    println!(
        "client: {total} requests answered, {} failed, during a rolling update ({rollout:?}) and an undo ({undo:?}); answers by pod: {:?}",
        outcome.failures.len(),
        outcome.by_host
    );
    assert!(
        outcome.failures.is_empty(),
        "failed requests: {:?}",
        &outcome.failures[..outcome.failures.len().min(20)]
    );
    assert!(total > 200, "the client sent only {total} requests");
    // Every revision served: old pods until they left, new ones once ready.
    for (revision, pods) in [("first", &first), ("second", &second), ("third", &third)] {
        assert!(
            pods.iter().any(|p| outcome.by_host.contains_key(p)),
            "no {revision} revision pod answered: {pods:?} vs {:?}",
            outcome.by_host
        );
    }

    let history = node.vipr_ok(&["rollout", "history", "deployment/web"])?;
    let revisions: Vec<&str> = history
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(revisions, ["2", "3"], "{history}");
    let d = json(&node, &["get", "deploy", "web"])?;
    let status = &d["status"];
    assert_eq!(status["observedGeneration"], d["metadata"]["generation"]);
    for field in [
        "replicas",
        "updatedReplicas",
        "readyReplicas",
        "availableReplicas",
    ] {
        assert_eq!(status[field], 3, "{field}: {status}");
    }
    assert_eq!(status["unavailableReplicas"], 0, "{status}");
    let condition = |type_: &str| {
        status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == type_)
            .map(|c| (c["status"].clone(), c["reason"].clone()))
    };
    assert_eq!(
        condition("Available"),
        Some(("True".into(), "MinimumReplicasAvailable".into()))
    );
    assert_eq!(
        condition("Progressing"),
        Some(("True".into(), "NewReplicaSetAvailable".into()))
    );
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );
    let rs = node.vipr_ok(&["get", "rs"])?;
    assert!(
        rs.starts_with("NAME   ") && rs.contains("DESIRED   CURRENT   READY"),
        "{rs}"
    );
    assert_eq!(
        row(&rs, &format!("web-{first_hash}")),
        ["3", "3", "3"],
        "{rs}"
    );
    assert_eq!(
        row(&rs, &format!("web-{second_hash}")),
        ["0", "0", "0"],
        "{rs}"
    );
    Ok(())
}

/// The three columns after NAME of the table row for `name`.
fn row<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&name))
        .map(|cells| cells[1..4].to_vec())
        .unwrap_or_default()
}

/// A connection opened to an old pod before the rollout is answered by
/// that pod after the rollout replaced it: the pod left the endpoints, but
/// flows already open finish within its grace period.
#[test]
fn an_open_flow_finishes_on_a_replaced_pod() -> Result<()> {
    require_root();
    let node = AgentNode::start("dfl")?;
    node.apply(&MANIFEST.replace("  replicas: 3", "  replicas: 1"))?;
    node.vipr_ok(&["rollout", "status", "deployment/web", "--timeout", "40s"])?;
    let old = wait_rolled_out(&node, 1, Duration::from_secs(10))?;
    wait_endpoints(&node, 1)?;
    let vip = node.cluster_ip("web")?;

    // Connect now, send the request only once the rollout is over.
    let cgroup = node.cgroup_root.join("open-flow");
    std::fs::create_dir_all(&cgroup)?;
    let go = node.state_dir.join("send-now");
    let script = format!(
        "echo $$ > {cgroup}/cgroup.procs && exec 3<>/dev/tcp/{vip}/80 && \
         for i in $(seq 100); do [ -e {go} ] && break; sleep 0.1; done && \
         printf 'GET /hostname HTTP/1.1\r\nHost: web\r\n\r\n' >&3 && cat <&3",
        cgroup = cgroup.display(),
        go = go.display(),
    );
    let flow = node
        .node
        .net_command("bash")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    node.vipr_ok(&["set", "env", "deployment/web", "VERSION=2"])?;
    node.vipr_ok(&["rollout", "status", "deployment/web", "--timeout", "30s"])?;
    let pods = items(&json(&node, &["get", "pods"])?);
    let draining = pods
        .iter()
        .find(|p| p["metadata"]["name"] == old[0].as_str())
        .with_context(|| format!("the old pod {} is gone with a flow open", old[0]))?;
    assert!(!draining["metadata"]["deletionTimestamp"].is_null());
    std::fs::write(&go, "")?;
    let answer = flow.wait_with_output()?;
    let _ = std::fs::remove_dir(&cgroup);
    let text = String::from_utf8_lossy(&answer.stdout);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{text} {}",
        String::from_utf8_lossy(&answer.stderr)
    );
    assert!(text.ends_with(&old[0]), "answered by another pod: {text}");
    wait_rolled_out(&node, 1, Duration::from_secs(10))?;
    Ok(())
}

#[test]
fn scale_moves_the_endpoints_and_rollout_status_waits() -> Result<()> {
    require_root();
    let node = AgentNode::start("dsc")?;
    node.apply(&MANIFEST.replace("  replicas: 3", "  replicas: 1"))?;
    let status = node.vipr_ok(&["rollout", "status", "deployment/web", "--timeout", "40s"])?;
    assert!(
        status.ends_with("deployment \"web\" successfully rolled out\n"),
        "{status}"
    );
    wait_endpoints(&node, 1)?;
    let vip = node.cluster_ip("web")?;

    let out = node.vipr_ok(&["scale", "deployment/web", "--replicas", "3"])?;
    assert_eq!(out.trim(), "deployment.apps/web scaled");
    let status = node.vipr_ok(&["rollout", "status", "deployment/web", "--timeout", "40s"])?;
    // Its first look sees the scale not yet observed, or pods not yet there.
    assert!(
        status.starts_with("Waiting for deployment spec update to be observed...\n")
            || status.starts_with("Waiting for deployment \"web\" rollout to finish: "),
        "rollout status did not wait: {status}"
    );
    assert!(
        status.ends_with("deployment \"web\" successfully rolled out\n"),
        "{status}"
    );
    let pods = wait_rolled_out(&node, 3, Duration::from_secs(10))?;
    wait_endpoints(&node, 3)?;
    let seen = answering(&node, &vip, 40)?;
    assert_eq!(
        seen,
        pods.iter().cloned().collect(),
        "traffic does not reach the 3 replicas"
    );
    let deploy = node.vipr_ok(&["get", "deploy"])?;
    assert!(
        deploy.starts_with("NAME   READY   UP-TO-DATE   AVAILABLE   AGE\n"),
        "{deploy}"
    );
    assert_eq!(row(&deploy, "web"), ["3/3", "3", "3"], "{deploy}");
    assert_eq!(
        items(&json(&node, &["get", "rs"])?).len(),
        1,
        "scaling made a revision"
    );

    node.vipr_ok(&["scale", "deployment/web", "--replicas", "1"])?;
    wait_endpoints(&node, 1)?;
    let left = wait_rolled_out(&node, 1, Duration::from_secs(20))?;
    assert_eq!(answering(&node, &vip, 10)?, left.into_iter().collect());

    // A rollout that cannot progress (the image does not exist) stops at
    // the surge pod: the old pod keeps serving, and rollout status reports
    // the deadline; undo recovers.
    node.apply(&MANIFEST.replace(
        "  replicas: 3",
        "  replicas: 1\n  progressDeadlineSeconds: 4",
    ))?;
    node.vipr_ok(&["set", "image", "deployment/web", "netexec=missing:1"])?;
    let stuck = node.vipr(&["rollout", "status", "deployment/web", "--timeout", "30s"])?;
    assert!(!stuck.status.success());
    let error = String::from_utf8_lossy(&stuck.stderr);
    assert!(
        error.contains("deployment \"web\" exceeded its progress deadline"),
        "{error}"
    );
    assert_eq!(
        ready_endpoints(&node)?.len(),
        1,
        "the old pod stopped serving"
    );
    assert!(answering(&node, &vip, 5)?.len() == 1);
    node.vipr_ok(&["rollout", "undo", "deployment/web"])?;
    node.vipr_ok(&["rollout", "status", "deployment/web", "--timeout", "30s"])?;
    wait_rolled_out(&node, 1, Duration::from_secs(20))?;

    // pause: template changes wait; resume rolls them out.
    assert_eq!(
        node.vipr_ok(&["rollout", "pause", "deployment/web"])?
            .trim(),
        "deployment.apps/web paused"
    );
    node.vipr_ok(&["set", "env", "deployment/web", "PAUSED=yes"])?;
    std::thread::sleep(Duration::from_millis(1500));
    let revisions = items(&json(&node, &["get", "rs"])?).len();
    assert_eq!(revisions, 2, "a paused deployment rolled out");
    node.vipr_ok(&["rollout", "resume", "deployment/web"])?;
    node.vipr_ok(&["rollout", "status", "deployment/web", "--timeout", "30s"])?;
    assert_eq!(items(&json(&node, &["get", "rs"])?).len(), 3);

    // Deleting the Deployment takes its ReplicaSets and pods along.
    node.vipr_ok(&["delete", "deploy", "web"])?;
    assert!(items(&json(&node, &["get", "rs"])?).is_empty());
    wait_endpoints(&node, 0)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !items(&json(&node, &["get", "pods"])?).is_empty() {
        assert!(Instant::now() < deadline, "pods outlived their Deployment");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn bad_deployment_input_names_the_field() -> Result<()> {
    require_root();
    let node = AgentNode::start("dbd")?;
    node.apply(&MANIFEST.replace("  replicas: 3", "  replicas: 1"))?;
    let before = json(&node, &["get", "deploy", "web"])?["spec"].clone();
    let cases: [(&[&str], &str); 4] = [
        (&["set", "image", "deployment/web", "nope=x"], "\"nope\""),
        (
            &["scale", "deployment/web", "--replicas", "-1"],
            "spec.replicas",
        ),
        (
            &["scale", "deployment/nothing", "--replicas", "1"],
            "\"nothing\" not found",
        ),
        (
            &["rollout", "undo", "deployment/web", "--to-revision", "9"],
            "revision 9",
        ),
    ];
    for (args, named) in cases {
        let out = node.vipr(args)?;
        let error = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && error.contains(named),
            "vipr {args:?}: {error}"
        );
    }
    let manifests = [
        (
            MANIFEST.replace(
                "maxSurge: 1, maxUnavailable: 0",
                "maxSurge: 0, maxUnavailable: 0",
            ),
            "spec.strategy.rollingUpdate.maxUnavailable",
        ),
        (
            MANIFEST.replace("  replicas: 3", "  replicas: -3"),
            "spec.replicas",
        ),
        (
            MANIFEST.replace("      labels: {app: web}", "      labels: {app: api}"),
            "spec.template.metadata.labels",
        ),
    ];
    for (manifest, named) in manifests {
        let error = node.apply(&manifest).expect_err("accepted").to_string();
        assert!(error.contains(named), "{named}: {error}");
    }
    assert_eq!(
        json(&node, &["get", "deploy", "web"])?["spec"],
        before,
        "a rejected change was stored"
    );
    Ok(())
}

/// kill -9 of the agent: the restarted agent adopts the Deployment's pods
/// (no pod replaced, no new revision) and still rolls out changes.
#[test]
fn a_restarted_agent_keeps_the_deployments_pods() -> Result<()> {
    require_root();
    let mut node = AgentNode::start("drs")?;
    node.apply(MANIFEST)?;
    node.vipr_ok(&["rollout", "status", "deployment/web", "--timeout", "40s"])?;
    let before = wait_rolled_out(&node, 3, Duration::from_secs(10))?;
    node.restart_agent()?;
    node.vipr_ok(&["rollout", "status", "deployment/web", "--timeout", "30s"])?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(wait_rolled_out(&node, 3, Duration::from_secs(10))?, before);
    assert_eq!(items(&json(&node, &["get", "rs"])?).len(), 1);
    node.vipr_ok(&["set", "env", "deployment/web", "AFTER=restart"])?;
    node.vipr_ok(&["rollout", "status", "deployment/web", "--timeout", "30s"])?;
    let after = wait_rolled_out(&node, 3, Duration::from_secs(20))?;
    assert!(after.iter().all(|p| !before.contains(p)), "{after:?}");
    Ok(())
}
