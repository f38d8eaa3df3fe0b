//! End-to-end: real pods (shim, namespaces, veths, cgroups) inside a node netns the
//! test creates. Root only.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use vipr_pod_runtime::PodKey;

fn http_get(addr: String) -> String {
    let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn pod_runs_with_routed_network_env_and_etc_files() {
    let mut rig = Rig::new("net", 1);
    rig.objects.add_cm(
        "shop",
        json!({"metadata": {"name": "cfg"}, "data": {"GREETING": "hi"}}),
    );
    let rt = rig.start();
    let mut changes = rt.subscribe();
    let node_resolv = std::fs::read("/etc/resolv.conf").unwrap_or_default();
    let node_hosts = std::fs::read("/etc/hosts").unwrap_or_default();
    let started = Instant::now();
    let key = rt
        .create_pod(pod(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "hostAliases": [{"ip": "10.9.9.9", "hostnames": ["db.local"]}],
                "containers": [{
                    "name": "http",
                    "command": ["python3", "-m", "http.server", "8080"],
                    "workingDir": "/tmp",
                    "env": [
                        {"name": "MY_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "GREET", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "GREETING"}}}
                    ],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"port": "http", "path": "/"}, "periodSeconds": 1}
                }]
            }
        })))
        .unwrap();
    let st = rig.wait_status(&key, Duration::from_secs(20), is_ready);
    eprintln!("pod Ready after {:?}", started.elapsed());
    assert_eq!(phase(&st), "Running");
    let ip = st.pod_ip.clone().unwrap();
    assert!(ip.starts_with("10.251.1."), "{ip}");
    let info = rt.pod(&key).unwrap();
    assert!(info.host_ifname.starts_with("vp") && info.host_ifname.len() <= 15);
    let ifindex = info.host_ifindex.expect("ifindex");
    // Node side: no address, /32 route, proxy ARP; XDP would attach at ifindex.
    let link = rig.ip(&format!("-o link show dev {}", info.host_ifname));
    assert!(link.starts_with(&format!("{ifindex}: ")), "{link}");
    assert!(
        rig.ip(&format!("-o -4 addr show dev {}", info.host_ifname))
            .is_empty()
    );
    assert!(
        rig.ip("route")
            .contains(&format!("{ip} dev {}", info.host_ifname))
    );

    // The readiness change reached subscribers.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut saw_ready = false;
    while Instant::now() < deadline && !saw_ready {
        match changes.try_recv() {
            Ok(c) => {
                saw_ready |=
                    c.ready && c.key == key && c.ip.map(|i| i.to_string()) == Some(ip.clone())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    assert!(saw_ready, "no ready PodChange");

    // Traffic from the node netns to the pod over the veth.
    let addr = format!("{ip}:8080");
    let body = rig.in_node(move || http_get(addr));
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");

    // exec sees the container's view.
    let run = |cmd: &str| {
        let o = rt
            .exec(
                &key,
                None,
                &["sh".into(), "-c".into(), cmd.into()],
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(
            o.code,
            Some(0),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(run("hostname").trim(), "web");
    assert_eq!(
        run("cat /etc/resolv.conf"),
        "search shop.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
    );
    let hosts = run("cat /etc/hosts");
    assert!(
        hosts.contains(&format!("{ip}\tweb")) && hosts.contains("10.9.9.9\tdb.local"),
        "{hosts}"
    );
    assert_eq!(run("echo $MY_POD $MY_IP $GREET"), format!("web {ip} hi\n"));
    assert!(run("echo $PATH").starts_with("/opt/vipr-test-bin:"));
    assert_eq!(run("pwd").trim(), "/tmp");
    let routes = run("ip route");
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    // The pod reaches the node-side gateway address via the static neighbour, and
    // the node's dummy address through the node netns.
    assert!(run("ip -o addr show dev eth0").contains(&format!("inet {ip}/32")));

    // Logs: python logs requests to stderr.
    let log = std::fs::read_to_string(rt.log_path(&key, "http").unwrap()).unwrap();
    assert!(log.contains("\"GET / HTTP/1.0\" 200"), "{log}");

    // The node's own files were never touched.
    assert_eq!(
        std::fs::read("/etc/resolv.conf").unwrap_or_default(),
        node_resolv
    );
    assert_eq!(std::fs::read("/etc/hosts").unwrap_or_default(), node_hosts);

    // Delete: veth, route and IP go away.
    let ifname = info.host_ifname.clone();
    rt.delete_pod(&key, Some(2)).unwrap();
    assert!(rt.wait_deleted(&key, Duration::from_secs(10)));
    assert!(rig.ip(&format!("link show dev {ifname}")).is_empty());
    assert!(!rig.ip("route").contains(&ip));
    assert!(rt.pod(&key).is_none());
}

#[test]
fn restart_policy_rows_end_to_end() {
    let mut rig = Rig::new("rst", 2);
    let rt = rig.start();
    let mk = |name: &str, policy: &str, code: i32| {
        rt.create_pod(pod(json!({
            "metadata": {"name": name},
            "spec": {"restartPolicy": policy, "containers": [{
                "name": "c", "command": ["sh", "-c", format!("echo run; exit {code}")]
            }]}
        })))
        .unwrap()
    };
    let never_fail = mk("never-fail", "Never", 1);
    let onfail_ok = mk("onfail-ok", "OnFailure", 0);
    let always_fail = mk("always-fail", "Always", 3);

    let st = rig.wait_status(&never_fail, Duration::from_secs(15), |s| {
        phase(s) == "Failed"
    });
    let t = ctr(&st, 0)
        .state
        .as_ref()
        .unwrap()
        .terminated
        .clone()
        .unwrap();
    assert_eq!((t.exit_code, t.reason.as_deref()), (1, Some("Error")));
    assert_eq!(ctr(&st, 0).restart_count, 0);
    assert!(!is_ready(&st));

    let st = rig.wait_status(&onfail_ok, Duration::from_secs(15), |s| {
        phase(s) == "Succeeded"
    });
    let t = ctr(&st, 0)
        .state
        .as_ref()
        .unwrap()
        .terminated
        .clone()
        .unwrap();
    assert_eq!((t.exit_code, t.reason.as_deref()), (0, Some("Completed")));

    // Always: immediate first restart, then CrashLoopBackOff (10 s) with lastState.
    let st = rig.wait_status(&always_fail, Duration::from_secs(15), |s| {
        ctr(s, 0)
            .state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .is_some_and(|w| w.reason.as_deref() == Some("CrashLoopBackOff"))
    });
    assert_eq!(phase(&st), "Running");
    assert_eq!(ctr(&st, 0).restart_count, 1);
    let last = ctr(&st, 0).last_state.clone().unwrap().terminated.unwrap();
    assert_eq!(last.exit_code, 3);
    assert!(
        rt.events(&always_fail)
            .iter()
            .any(|e| e.reason == "BackOff")
    );
    let log = std::fs::read_to_string(rt.log_path(&always_fail, "c").unwrap()).unwrap();
    assert_eq!(log, "run\nrun\n", "both runs append to one log");
}

#[test]
fn missing_image_and_config_wait_with_reasons() {
    let mut rig = Rig::new("wait", 3);
    let rt = rig.start();
    let img = rt
        .create_pod(pod(
            json!({"metadata": {"name": "img"}, "spec": {"containers": [
            {"name": "c", "image": "nosuch:1.0", "command": ["sleep", "100"]}]}}),
        ))
        .unwrap();
    let cfg = rt
        .create_pod(pod(json!({"metadata": {"name": "cfg"}, "spec": {"containers": [
            {"name": "c", "command": ["sleep", "100"], "envFrom": [{"configMapRef": {"name": "later"}}]}]}})))
        .unwrap();
    let waiting = |s: &k8s_openapi::api::core::v1::PodStatus| {
        ctr(s, 0)
            .state
            .as_ref()
            .and_then(|s| s.waiting.clone())
            .and_then(|w| w.reason)
    };
    let st = rig.wait_status(&img, Duration::from_secs(10), |s| {
        waiting(s).as_deref() == Some("ErrImageNeverPull")
    });
    assert_eq!(phase(&st), "Pending");
    let msg = ctr(&st, 0)
        .state
        .clone()
        .unwrap()
        .waiting
        .unwrap()
        .message
        .unwrap();
    assert!(
        msg.contains("nosuch:1.0") && msg.contains("images/nosuch:1.0/rootfs"),
        "{msg}"
    );
    rig.wait_status(&cfg, Duration::from_secs(10), |s| {
        waiting(s).as_deref() == Some("CreateContainerConfigError")
    });
    // The ConfigMap appears: the container starts without re-creating the pod.
    rig.objects.add_cm(
        "default",
        json!({"metadata": {"name": "later"}, "data": {"A": "1"}}),
    );
    rig.wait_status(&cfg, Duration::from_secs(10), |s| {
        phase(s) == "Running" && is_ready(s)
    });
}

#[test]
fn init_containers_volumes_probes_and_hooks() {
    let mut rig = Rig::new("init", 4);
    rig.objects.add_cm(
        "default",
        json!({"metadata": {"name": "files"}, "data": {"app.conf": "x=1\n"}}),
    );
    rig.objects.secrets.lock().unwrap().insert(
        ("default".into(), "creds".into()),
        serde_json::from_value(
            json!({"metadata": {"name": "creds"}, "stringData": {"password": "hunter2"}}),
        )
        .unwrap(),
    );
    let rt = rig.start();
    let key = rt
        .create_pod(pod(json!({
            "metadata": {"name": "vols"},
            "spec": {
                "volumes": [
                    {"name": "work", "emptyDir": {}},
                    {"name": "mem", "emptyDir": {"medium": "Memory", "sizeLimit": "8Mi"}},
                    {"name": "conf", "configMap": {"name": "files"}},
                    {"name": "sec", "secret": {"secretName": "creds"}},
                    {"name": "info", "projected": {"sources": [
                        {"downwardAPI": {"items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}},
                        {"configMap": {"name": "files"}}
                    ]}}
                ],
                "initContainers": [
                    {"name": "one", "command": ["sh", "-c", "echo one > /work/order"],
                     "volumeMounts": [{"name": "work", "mountPath": "/work"}]},
                    {"name": "two", "command": ["sh", "-c", "echo two >> /work/order"],
                     "volumeMounts": [{"name": "work", "mountPath": "/work"}]}
                ],
                "containers": [{
                    "name": "app",
                    "command": ["sh", "-c", "echo started > /mem/flag; exec sleep 1000"],
                    "volumeMounts": [
                        {"name": "work", "mountPath": "/work"},
                        {"name": "mem", "mountPath": "/mem"},
                        {"name": "conf", "mountPath": "/etc/app"},
                        {"name": "sec", "mountPath": "/secrets"},
                        {"name": "info", "mountPath": "/info"}
                    ],
                    "lifecycle": {"postStart": {"exec": {"command": ["sh", "-c", "echo hook > /work/poststart"]}}},
                    "startupProbe": {"exec": {"command": ["test", "-f", "/mem/flag"]}, "periodSeconds": 1, "failureThreshold": 10},
                    "livenessProbe": {"exec": {"command": ["test", "!", "-f", "/work/die"]}, "periodSeconds": 1, "failureThreshold": 1},
                    "readinessProbe": {"exec": {"command": ["test", "!", "-f", "/work/unready"]}, "periodSeconds": 1}
                }]
            }
        })))
        .unwrap();
    let st = rig.wait_status(&key, Duration::from_secs(20), is_ready);
    let inits = st.init_container_statuses.clone().unwrap();
    assert!(inits.iter().all(|c| {
        c.state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap()
            .exit_code
            == 0
    }));
    let run = |cmd: &str| {
        let o = rt
            .exec(
                &key,
                Some("app"),
                &["sh".into(), "-c".into(), cmd.into()],
                Duration::from_secs(5),
            )
            .unwrap();
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(run("cat /work/order"), "one\ntwo\n");
    assert_eq!(run("cat /work/poststart"), "hook\n");
    assert_eq!(run("cat /etc/app/app.conf"), "x=1\n");
    assert_eq!(run("cat /secrets/password"), "hunter2");
    let info = rt.pod(&key).unwrap();
    let sec_dir = rig
        .state_dir
        .join("pods")
        .join(&info.uid)
        .join("volumes/sec");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(&format!(" {} ", sec_dir.display())) && l.contains(" - tmpfs ")),
        "secret volume must be a tmpfs"
    );
    assert_eq!(
        run("cat /info/name; echo; cat /info/app.conf"),
        "vols\nx=1\n"
    );
    assert!(run("grep ' /mem ' /proc/self/mounts").starts_with("tmpfs /mem tmpfs"));
    assert!(
        run("touch /etc/app/x 2>&1; echo $?").trim().ends_with('1'),
        "configMap is read-only"
    );

    // Readiness flips without a restart.
    run("touch /work/unready");
    rig.wait_status(&key, Duration::from_secs(10), |s| {
        !is_ready(s) && phase(s) == "Running"
    });
    run("rm /work/unready");
    rig.wait_status(&key, Duration::from_secs(10), is_ready);

    // Liveness failure: Unhealthy + Killing, restart (emptyDir survives).
    run("touch /work/die");
    let st = rig.wait_status(&key, Duration::from_secs(45), |s| {
        ctr(s, 0).restart_count >= 1
    });
    assert_eq!(phase(&st), "Running");
    let ev = rt.events(&key);
    assert!(
        ev.iter()
            .any(|e| e.reason == "Unhealthy" && e.message.contains("Liveness")),
        "{ev:#?}"
    );
    assert!(ev.iter().any(|e| e.reason == "Killing"), "{ev:#?}");
}

#[test]
fn agent_restart_adopts_running_pods() {
    let mut rig = Rig::new("adopt", 5);
    let rt = rig.start();
    let key = rt
        .create_pod(pod(
            json!({"metadata": {"name": "keep"}, "spec": {"containers": [
            {"name": "c", "command": ["sleep", "1000"]}]}}),
        ))
        .unwrap();
    let st = rig.wait_status(&key, Duration::from_secs(10), is_ready);
    let before = ctr(&st, 0).container_id.clone();
    let shim = rt.pod(&key).unwrap().shim_pid;
    let ip = st.pod_ip.clone();
    rt.detach();
    rig.rt = None;
    // The agent is "down": the container keeps running.
    std::thread::sleep(Duration::from_millis(300));
    let rt2 = rig.start();
    let st = rig.wait_status(&key, Duration::from_secs(10), is_ready);
    assert_eq!(ctr(&st, 0).container_id, before, "same container instance");
    assert_eq!(ctr(&st, 0).restart_count, 0);
    assert_eq!(st.pod_ip, ip);
    assert_eq!(rt2.pod(&key).unwrap().shim_pid, shim);
    // A second pod does not get the adopted pod's address.
    let k2 = rt2
        .create_pod(pod(
            json!({"metadata": {"name": "other"}, "spec": {"containers": [
            {"name": "c", "command": ["sleep", "1000"]}]}}),
        ))
        .unwrap();
    let st2 = rig.wait_status(&k2, Duration::from_secs(10), is_ready);
    assert_ne!(st2.pod_ip, ip);
}

#[test]
fn delete_runs_prestop_and_kills_at_grace_end() {
    let mut rig = Rig::new("del", 6);
    let rt = rig.start();
    let marker = rig.state_dir.join("prestop-ran");
    let key = rt
        .create_pod(pod(json!({"metadata": {"name": "stubborn"}, "spec": {
            "terminationGracePeriodSeconds": 2,
            "volumes": [{"name": "host", "hostPath": {"path": rig.state_dir.display().to_string()}}],
            "containers": [{
                "name": "c", "command": ["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"],
                "volumeMounts": [{"name": "host", "mountPath": "/host"}],
                "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "echo bye > /host/prestop-ran"]}}}
            }]}})))
        .unwrap();
    let st = rig.wait_status(&key, Duration::from_secs(10), is_ready);
    let ip = st.pod_ip.unwrap();
    let mut changes = rt.subscribe();
    let t = Instant::now();
    rt.delete_pod(&key, None).unwrap();
    assert!(rt.wait_deleted(&key, Duration::from_secs(15)));
    // Endpoint semantics: terminating+serving (not ready), then gone.
    let mut seen = vec![];
    while let Ok(c) = changes.try_recv() {
        seen.push((c.ready, c.serving, c.terminating, c.deleted));
    }
    // (A change published just before the delete may come first: look for the state.)
    assert!(seen.contains(&(false, true, true, false)), "{seen:?}");
    assert_eq!(seen.last(), Some(&(false, false, true, true)), "{seen:?}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "bye\n");
    // The IP is free again.
    let k2 = rt
        .create_pod(pod(
            json!({"metadata": {"name": "next"}, "spec": {"containers": [
            {"name": "c", "command": ["sleep", "100"]}]}}),
        ))
        .unwrap();
    let st = rig.wait_status(&k2, Duration::from_secs(10), is_ready);
    assert_eq!(st.pod_ip.unwrap(), ip);
}

#[test]
fn memory_limit_gives_oomkilled() {
    let mut rig = Rig::new("oom", 7);
    let rt = rig.start();
    let key = rt
        .create_pod(pod(
            json!({"metadata": {"name": "hog"}, "spec": {"restartPolicy": "Never", "containers": [{
                "name": "c",
                "command": ["python3", "-c", "b = bytearray(400 * 1024 * 1024); print(len(b))"],
                "resources": {"limits": {"memory": "64Mi"}}
            }]}}),
        ))
        .unwrap();
    let st = rig.wait_status(&key, Duration::from_secs(20), |s| phase(s) == "Failed");
    let t = ctr(&st, 0).state.clone().unwrap().terminated.unwrap();
    assert_eq!(t.reason.as_deref(), Some("OOMKilled"), "{t:?}");
    assert_eq!(t.exit_code, 137);
}

#[test]
fn invalid_pods_are_rejected_naming_the_field() {
    let mut rig = Rig::new("inv", 8);
    let rt = rig.start();
    let err = rt
        .create_pod(pod(
            json!({"metadata": {"name": "x"}, "spec": {"containers": [
            {"name": "a", "command": ["true"]}, {"name": "a", "command": ["true"]}]}}),
        ))
        .unwrap_err();
    assert!(err.to_string().contains("spec.containers[1].name"), "{err}");
    let _ = PodKey::new("default", "x");
    assert!(rt.list().is_empty());
}

#[test]
fn lost_sandbox_is_recreated_and_containers_restarted() {
    let mut rig = Rig::new("lost", 9);
    let rt = rig.start();
    let key = rt
        .create_pod(pod(
            json!({"metadata": {"name": "phoenix"}, "spec": {"containers": [
            {"name": "c", "command": ["sleep", "1000"]}]}}),
        ))
        .unwrap();
    let st = rig.wait_status(&key, Duration::from_secs(10), is_ready);
    let ip = st.pod_ip.clone();
    let shim = rt.pod(&key).unwrap().shim_pid.unwrap();
    // SAFETY: kill(2) of the shim this test's runtime started.
    unsafe { libc::kill(shim, libc::SIGKILL) };
    let st = rig.wait_status(&key, Duration::from_secs(20), |s| {
        is_ready(s) && ctr(s, 0).restart_count == 1
    });
    assert_eq!(st.pod_ip, ip);
    assert_ne!(rt.pod(&key).unwrap().shim_pid, Some(shim));
    assert!(rt.events(&key).iter().any(|e| e.reason == "SandboxChanged"));
}

#[test]
fn image_rootfs_is_used() {
    let mut rig = Rig::new("img", 10);
    // A tiny image: dash and the libraries it links, copied from the node.
    let rootfs = rig.state_dir.join("images/mini/rootfs");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "set -e; r={r}; mkdir -p $r/bin $r/etc $r/proc $r/tmp; cp /bin/dash $r/bin/sh; \
             for l in $(ldd /bin/dash | grep -o '/[^ ]*'); do mkdir -p $r$(dirname $l); cp $l $r$l; done; \
             echo mini > $r/etc/image-name",
            r = rootfs.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rt = rig.start();
    let key = rt
        .create_pod(pod(json!({"metadata": {"name": "mini"}, "spec": {"containers": [{
            "name": "c", "image": "mini",
            "command": ["sh", "-c", "read n < /etc/image-name; echo image=$n; while :; do read x < /etc/hostname; done"]
        }]}})))
        .unwrap();
    rig.wait_status(&key, Duration::from_secs(10), is_ready);
    let o = rt
        .exec(
            &key,
            None,
            &[
                "sh".into(),
                "-c".into(),
                "read n < /etc/image-name; echo $n; read h < /etc/hostname; echo $h".into(),
            ],
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "mini\nmini\n");
    let log = std::fs::read_to_string(rt.log_path(&key, "c").unwrap()).unwrap();
    assert_eq!(log, "image=mini\n");
}

/// Measures: time for N pods to become Ready, RSS per idle shim. Prints figures.
#[test]
fn measure_pods_to_running_and_shim_rss() {
    // 20 in the suite; `VIPR_MEASURE_PODS=100` for the figure.
    let n: usize = std::env::var("VIPR_MEASURE_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut rig = Rig::new("meas", 11);
    let rt = rig.start();
    let t = Instant::now();
    let keys: Vec<PodKey> = (0..n)
        .map(|i| {
            rt.create_pod(pod(
                json!({"metadata": {"name": format!("p{i}")}, "spec": {"containers": [
                {"name": "c", "command": ["sleep", "1000"]}]}}),
            ))
            .unwrap()
        })
        .collect();
    // Each pod's readiness as first observed (waits are in creation order).
    let mut ready_after: Vec<Duration> = keys
        .iter()
        .map(|k| {
            rig.wait_status(k, Duration::from_secs(60), is_ready);
            t.elapsed()
        })
        .collect();
    let elapsed = t.elapsed();
    ready_after.sort();
    let pct = |p: usize| ready_after[(ready_after.len() * p / 100).min(ready_after.len() - 1)];
    eprintln!(
        "MEASURE: apply->Ready per pod p50 {:?} p99 {:?} max {:?}",
        pct(50),
        pct(99),
        ready_after[ready_after.len() - 1]
    );
    let rss: Vec<u64> = rt
        .list()
        .iter()
        .filter_map(|p| p.shim_pid)
        .filter_map(|pid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .collect();
    let avg = rss.iter().sum::<u64>() / rss.len().max(1) as u64;
    eprintln!(
        "MEASURE: {n} pods Ready in {:?} ({:?}/pod); shim VmRSS avg {avg} kB (n={})",
        elapsed,
        elapsed / n as u32,
        rss.len()
    );
    let t = Instant::now();
    for k in &keys {
        rt.delete_pod(k, Some(0)).unwrap();
    }
    for k in &keys {
        assert!(rt.wait_deleted(k, Duration::from_secs(30)));
    }
    eprintln!("MEASURE: {n} pods deleted in {:?}", t.elapsed());
}

#[test]
fn pods_reach_each_other_through_the_node() {
    let mut rig = Rig::new("p2p", 12);
    let rt = rig.start();
    let mk = |name: &str| {
        rt.create_pod(pod(
            json!({"metadata": {"name": name}, "spec": {"containers": [{
                "name": "c", "command": ["python3", "-m", "http.server", "8080"],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
            }]}}),
        ))
        .unwrap()
    };
    let a = mk("a");
    let b = mk("b");
    rig.wait_status(&a, Duration::from_secs(20), is_ready);
    let ip_b = rig
        .wait_status(&b, Duration::from_secs(20), is_ready)
        .pod_ip
        .unwrap();
    let o = rt
        .exec(
            &a,
            None,
            &[
                "python3".into(),
                "-c".into(),
                format!("import urllib.request as u; print(u.urlopen('http://{ip_b}:8080/', timeout=3).status)"),
            ],
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "200",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The shim and the containers live under the test's cgroup root, not ours.
    let shim = rt.pod(&a).unwrap().shim_pid.unwrap();
    let cg = std::fs::read_to_string(format!("/proc/{shim}/cgroup")).unwrap();
    assert!(cg.contains("/_sandbox"), "{cg}");
}

#[test]
fn host_network_pod_security_context_and_cpu_limit() {
    let mut rig = Rig::new("hnet", 13);
    let mut cfg = rig.config();
    cfg.node_ip = Some("10.251.13.254".parse().unwrap());
    let rt = rig.start_with(cfg);
    let key = rt
        .create_pod(pod(json!({"metadata": {"name": "hostnet"}, "spec": {
        "hostNetwork": true,
        "securityContext": {"runAsUser": 65534, "runAsGroup": 65534},
        "containers": [{
            "name": "c", "command": ["python3", "-m", "http.server", "18081"],
            "workingDir": "/",
            "resources": {"limits": {"cpu": "250m"}},
            "readinessProbe": {"tcpSocket": {"port": 18081}, "periodSeconds": 1}
        }]}})))
        .unwrap();
    let st = rig.wait_status(&key, Duration::from_secs(20), is_ready);
    assert_eq!(st.pod_ip.as_deref(), Some("10.251.13.254"));
    let info = rt.pod(&key).unwrap();
    assert!(info.host_ifname.is_empty() && info.host_ifindex.is_none());
    // Listening in the node netns itself.
    let body = rig.in_node(|| http_get("10.251.13.254:18081".into()));
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    let o = rt
        .exec(
            &key,
            None,
            &["sh".into(), "-c".into(), "id -u; id -g; hostname".into()],
            Duration::from_secs(5),
        )
        .unwrap();
    let host = nix::unistd::gethostname()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("65534\n65534\n{host}\n")
    );
    // The CPU limit landed in a cgroup the container is in (v2 or v1 cpu).
    let pid = std::fs::read_to_string(format!(
        "/proc/{}/task/{}/children",
        info.shim_pid.unwrap(),
        info.shim_pid.unwrap()
    ))
    .unwrap();
    let pid: i32 = pid.split_whitespace().next().unwrap().parse().unwrap();
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let quota = cg
        .lines()
        .find_map(|l| {
            let (_, rest) = l.split_once(':')?;
            let (ctrls, path) = rest.split_once(':')?;
            if ctrls.split(',').any(|c| c == "cpu") {
                std::fs::read_to_string(format!("/sys/fs/cgroup/cpu{path}/cpu.cfs_quota_us")).ok()
            } else if ctrls.is_empty() {
                std::fs::read_to_string(format!("/sys/fs/cgroup/unified{path}/cpu.max"))
                    .ok()
                    .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
            } else {
                None
            }
        })
        .unwrap_or_default();
    assert_eq!(quota.trim(), "25000", "{cg}");
}

/// A node reboot under a stopped agent: the shim and containers are gone when the
/// next agent starts. The pod gets a new sandbox (same IP), init containers run
/// again, and the app container restarts with restartCount 1.
#[test]
fn dead_shim_at_adoption_recreates_the_pod() {
    let mut rig = Rig::new("boot", 14);
    let rt = rig.start();
    let key = rt
        .create_pod(pod(json!({"metadata": {"name": "reboot"}, "spec": {
            "volumes": [{"name": "w", "emptyDir": {}}],
            "initContainers": [{"name": "init", "command": ["sh", "-c", "echo x >> /w/runs"],
                "volumeMounts": [{"name": "w", "mountPath": "/w"}]}],
            "containers": [{"name": "c", "command": ["sleep", "1000"],
                "volumeMounts": [{"name": "w", "mountPath": "/w"}]}]}})))
        .unwrap();
    let st = rig.wait_status(&key, Duration::from_secs(10), is_ready);
    let ip = st.pod_ip.clone();
    let shim = rt.pod(&key).unwrap().shim_pid.unwrap();
    rt.detach();
    rig.rt = None;
    // SAFETY: kill(2) of the shim this test's runtime started.
    unsafe { libc::kill(shim, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(200));
    let rt2 = rig.start();
    let st = rig.wait_status(&key, Duration::from_secs(15), |s| {
        is_ready(s) && ctr(s, 0).restart_count == 1
    });
    assert_eq!(st.pod_ip, ip);
    let last = ctr(&st, 0).last_state.clone().unwrap().terminated.unwrap();
    assert_eq!(last.reason.as_deref(), Some("ContainerStatusUnknown"));
    let o = rt2
        .exec(
            &key,
            None,
            &["cat".into(), "/w/runs".into()],
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "x\nx\n",
        "init ran again"
    );
}
