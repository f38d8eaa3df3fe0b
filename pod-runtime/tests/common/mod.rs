//! Test rig: a node network namespace, a state dir and a cgroup root per test, all
//! removed on drop (also when the test panics).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodStatus, Secret};
use vipr_pod_runtime::{ObjectLookup, PodKey, Runtime, RuntimeConfig};

#[derive(Default)]
pub struct Objects {
    pub cms: Mutex<BTreeMap<(String, String), ConfigMap>>,
    pub secrets: Mutex<BTreeMap<(String, String), Secret>>,
}

impl Objects {
    pub fn add_cm(&self, ns: &str, json: serde_json::Value) {
        let cm: ConfigMap = serde_json::from_value(json).unwrap();
        let name = cm.metadata.name.clone().unwrap();
        self.cms.lock().unwrap().insert((ns.into(), name), cm);
    }
}

impl ObjectLookup for Objects {
    fn config_map(&self, ns: &str, name: &str) -> Option<ConfigMap> {
        self.cms
            .lock()
            .unwrap()
            .get(&(ns.into(), name.into()))
            .cloned()
    }
    fn secret(&self, ns: &str, name: &str) -> Option<Secret> {
        self.secrets
            .lock()
            .unwrap()
            .get(&(ns.into(), name.into()))
            .cloned()
    }
}

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").args(["-c", cmd]).output().unwrap()
}

pub struct Rig {
    pub netns: String,
    pub state_dir: PathBuf,
    pub cgroup_root: PathBuf,
    pub objects: Arc<Objects>,
    pub cidr: String,
    pub rt: Option<Runtime>,
    cgroup_roots: Vec<PathBuf>,
}

impl Rig {
    /// `tag` <= 6 chars; `net` picks a distinct 10.251.net.0/24 per test.
    pub fn new(tag: &str, net: u8) -> Rig {
        let pid = std::process::id();
        let netns = format!("vpr{tag}{pid}");
        let state_dir = std::env::temp_dir().join(format!("vpr-{tag}-{pid}"));
        let cgroup_root = PathBuf::from(format!("/sys/fs/cgroup/unified/vpr-{tag}-{pid}"));
        let _ = std::fs::remove_dir_all(&state_dir);
        std::fs::create_dir_all(&state_dir).unwrap();
        let out = sh(&format!(
            "ip netns add {netns} && ip -n {netns} link set lo up && \
             ip -n {netns} addr add 10.251.{net}.254/32 dev lo && \
             ip netns exec {netns} sysctl -qw net.ipv4.ip_forward=1"
        ));
        let rig = Rig {
            netns,
            state_dir,
            cgroup_root,
            objects: Arc::new(Objects::default()),
            cidr: format!("10.251.{net}.0/24"),
            rt: None,
            cgroup_roots: vec![],
        };
        assert!(
            out.status.success(),
            "rig: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        rig
    }

    pub fn config(&self) -> RuntimeConfig {
        let mut cfg = RuntimeConfig::new(&self.state_dir, self.cidr.parse().unwrap());
        cfg.node_name = "node-1".into();
        cfg.cluster_dns = vec!["10.96.0.10".parse().unwrap()];
        cfg.cgroup_root = Some(self.cgroup_root.clone());
        cfg.node_netns = Some(PathBuf::from(format!("/run/netns/{}", self.netns)));
        cfg.shim_command = vec![env!("CARGO_BIN_EXE_vipr-pod-shim").into()];
        cfg.extra_path = vec![PathBuf::from("/opt/vipr-test-bin")];
        cfg.tick = Duration::from_millis(50);
        cfg
    }

    pub fn start(&mut self) -> Runtime {
        self.start_with(self.config())
    }

    pub fn start_with(&mut self, cfg: RuntimeConfig) -> Runtime {
        let rt = Runtime::new(cfg, self.objects.clone()).unwrap();
        self.cgroup_roots = rt.cgroup_roots();
        self.rt = Some(rt.clone());
        rt
    }

    pub fn rt(&self) -> &Runtime {
        self.rt.as_ref().unwrap()
    }

    /// Run `f` on a thread inside the node netns.
    pub fn in_node<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.netns);
        std::thread::spawn(move || {
            let f2 = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this new thread only.
            assert_eq!(
                unsafe { libc::setns(f2.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            f()
        })
        .join()
        .unwrap()
    }

    /// `ip -n <node netns> ...` output.
    pub fn ip(&self, args: &str) -> String {
        let o = sh(&format!("ip -n {} {args}", self.netns));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn wait_status(
        &self,
        key: &PodKey,
        timeout: Duration,
        mut pred: impl FnMut(&PodStatus) -> bool,
    ) -> PodStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.rt().pod_status(key).expect("pod exists");
            if pred(&st) {
                return st;
            }
            if Instant::now() > deadline {
                panic!(
                    "timeout waiting on {key}: {}\nevents: {:#?}",
                    serde_json::to_string_pretty(&st).unwrap(),
                    self.rt().events(key)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn pod(json: serde_json::Value) -> Pod {
    serde_json::from_value(json).unwrap()
}

pub fn is_ready(st: &PodStatus) -> bool {
    st.conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

pub fn phase(st: &PodStatus) -> &str {
    st.phase.as_deref().unwrap_or("")
}

pub fn ctr(st: &PodStatus, i: usize) -> &k8s_openapi::api::core::v1::ContainerStatus {
    &st.container_statuses.as_ref().unwrap()[i]
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            let keys: Vec<PodKey> = rt.list().into_iter().map(|p| p.key).collect();
            for k in &keys {
                let _ = rt.delete_pod(k, Some(0));
            }
            for k in &keys {
                rt.wait_deleted(k, Duration::from_secs(15));
            }
            rt.detach();
        }
        // Anything left (a failed test mid-way): kill shims, whose containers follow.
        if let Ok(rd) = std::fs::read_dir(self.state_dir.join("pods")) {
            for e in rd.flatten() {
                if let Ok(pid) = std::fs::read_to_string(e.path().join("shim.pid"))
                    && let Ok(pid) = pid.trim().parse::<i32>()
                {
                    let cmdline =
                        std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    if cmdline.contains("vipr-pod-shim") {
                        // SAFETY: kill(2) of a shim this test started.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
                let _ = sh(&format!(
                    "grep -F ' {}/' /proc/self/mountinfo | cut -d' ' -f5 | xargs -r -n1 umount -l",
                    e.path().display()
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        let _ = sh(&format!("ip netns del {}", self.netns));
        let mut roots = self.cgroup_roots.clone();
        roots.push(self.cgroup_root.clone());
        for r in roots {
            vipr_pod_runtime::cgroup::remove_tree(&r);
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}
