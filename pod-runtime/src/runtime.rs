//! The runtime: owns the state dir, the IPAM, and one supervisor thread per pod.
//!
//! Each pod's supervisor thread enters the node network namespace once (setns is per
//! thread), creates the sandbox (shim + veth), starts init then app containers through
//! the shim, runs probes and hooks, restarts with back-off, computes the `PodStatus`,
//! and publishes a [`PodChange`] whenever it changes. What must survive an agent
//! restart is in `<state_dir>/pods/<uid>/pod.json`; a new `Runtime` on the same state
//! dir adopts every pod whose shim still answers, without restarting containers.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, LifecycleHandler, Pod, PodCondition, PodIP, PodStatus,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::backoff::Backoff;
use crate::cgroup::{Cgroups, Limits};
use crate::error::{Error, IoContext, Result};
use crate::events::{EventLog, PodEvent};
use crate::net::{IpRoute2, NetOps};
use crate::phase::{self, CState, InitProgress, Phase, RestartPolicy};
use crate::probe::{self, Outcome, ProbeAction, ProbeState, ProbeTiming};
use crate::shim::{self, CtrRecord, LaunchSpec, Request, Response};
use crate::spec::{self, ObjectLookup, PodFacts, PreparedVolume, Waiting};
use crate::util::{k8s_time, k8s_time_now, now_unix, write_atomic};

/// Runtime configuration (the agent fills it from its flags).
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub state_dir: PathBuf,
    pub pod_cidr: Ipv4Net,
    pub node_name: String,
    pub cluster_dns: Vec<IpAddr>,
    pub cluster_domain: String,
    /// Pod cgroups go under here; None = no cgroups (no limits, no OOM reason).
    pub cgroup_root: Option<PathBuf>,
    /// Folders put first on every container's PATH (the agent's own bin folder).
    pub extra_path: Vec<PathBuf>,
    /// The node network namespace; None = the netns of the thread calling `new`.
    pub node_netns: Option<PathBuf>,
    /// Binary and leading args that run [`crate::shim::main`] (e.g. the agent's own
    /// binary and its hidden `__pod-shim` command).
    pub shim_command: Vec<String>,
    /// Pod-side default gateway (link-local, answered by the node side's MAC).
    pub gateway: Ipv4Addr,
    /// Prefix of node-side veth names (<= 15 bytes in all).
    pub veth_prefix: String,
    /// The node's address: the pod IP of hostNetwork pods (127.0.0.1 when unset).
    pub node_ip: Option<Ipv4Addr>,
    /// Supervisor period.
    pub tick: Duration,
}

impl RuntimeConfig {
    pub fn new(state_dir: impl Into<PathBuf>, pod_cidr: Ipv4Net) -> Self {
        RuntimeConfig {
            state_dir: state_dir.into(),
            pod_cidr,
            node_name: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "node".into()),
            cluster_dns: vec![],
            cluster_domain: "cluster.local".into(),
            cgroup_root: None,
            extra_path: vec![],
            node_netns: None,
            shim_command: vec!["/proc/self/exe".into(), shim::SHIM_ARG.into()],
            gateway: Ipv4Addr::new(169, 254, 1, 1),
            veth_prefix: "vp".into(),
            node_ip: None,
            tick: Duration::from_millis(100),
        }
    }
}

/// Pods are named by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl PodKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        PodKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Published whenever a pod's status changes (readiness, IP, phase, restarts...),
/// and once with `deleted` when it is gone. Endpoints follow `ready` and `ip`.
#[derive(Debug, Clone, PartialEq)]
pub struct PodChange {
    pub key: PodKey,
    pub uid: String,
    pub ip: Option<Ipv4Addr>,
    /// The Ready condition: serving and not terminating.
    pub ready: bool,
    /// All containers running and passing readiness, terminating or not
    /// (EndpointSlice `serving`).
    pub serving: bool,
    /// Deletion in progress (EndpointSlice `terminating`).
    pub terminating: bool,
    pub phase: String,
    pub deleted: bool,
}

/// A snapshot of one pod for the agent and the CLI.
#[derive(Debug, Clone)]
pub struct PodInfo {
    pub key: PodKey,
    pub uid: String,
    pub pod: Pod,
    pub status: PodStatus,
    pub ip: Option<Ipv4Addr>,
    /// Node-side veth (XDP attach point) and its ifindex in the node netns; empty
    /// and None for hostNetwork pods.
    pub host_ifname: String,
    pub host_ifindex: Option<u32>,
    pub shim_pid: Option<i32>,
    pub deleting: bool,
    /// See [`PodChange::serving`].
    pub serving: bool,
}

// ------------------------------------------------------------ persisted state

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct TermInfo {
    exit_code: i32,
    signal: Option<i32>,
    reason: String,
    message: Option<String>,
    started_at: i64,
    finished_at: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CtrPersist {
    restart_count: i32,
    last_terminated: Option<TermInfo>,
    /// Latest shim instance whose exit we processed (0 = none).
    handled_instance: u64,
    /// Latest shim instance we know of.
    seen_instance: u64,
    backoff: Backoff,
    /// Every start attempt so far failed before exec (counts as a crash).
    #[serde(default)]
    ever_started: bool,
    /// The shim instance last known ready (0 = none): an agent restart that
    /// finds it still running keeps it ready until its next probe says
    /// otherwise, so its endpoints stay programmed and no traffic is refused.
    #[serde(default)]
    ready_instance: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PodRecord {
    key: PodKey,
    uid: String,
    pod: Pod,
    ip: Ipv4Addr,
    host_if: String,
    created_at: i64,
    init_done: usize,
    containers: BTreeMap<String, CtrPersist>,
}

// ------------------------------------------------------------ shared per pod

struct Shared {
    status: PodStatus,
    events: EventLog,
    host_ifindex: Option<u32>,
    shim_pid: Option<i32>,
    /// Running container main pids (for exec).
    pids: BTreeMap<String, i32>,
    grace_override: Option<i64>,
    gone: bool,
    serving: bool,
}

struct PodShared {
    key: PodKey,
    uid: String,
    pod: Pod,
    ip: Ipv4Addr,
    host_if: String,
    dir: PathBuf,
    deleting: AtomicBool,
    state: Mutex<Shared>,
    gone_cv: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl PodShared {
    /// Wakes the supervisor thread from its wait so it acts on a request now.
    fn wake(&self) {
        if let Some(handle) = self.thread.lock().unwrap().as_ref() {
            handle.thread().unpark();
        }
    }

    fn event(&self, warning: bool, reason: &str, ctr: Option<&str>, msg: String) {
        self.state
            .lock()
            .unwrap()
            .events
            .push(warning, reason, ctr, msg);
    }
}

struct Inner {
    cfg: RuntimeConfig,
    lookup: Arc<dyn ObjectLookup>,
    net: Arc<dyn NetOps>,
    cgroups: Option<Cgroups>,
    ipam: Mutex<crate::ipam::Ipam>,
    pods: Mutex<BTreeMap<PodKey, Arc<PodShared>>>,
    tx: broadcast::Sender<PodChange>,
    node_netns: OwnedFd,
    /// Set by `detach`: supervisors return and leave their pods running.
    detached: AtomicBool,
}

/// The pod runtime. Cheap to clone; all methods are non-blocking except `exec`,
/// `wait_*` and `detach`.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl Runtime {
    /// Open (or create) the state dir and adopt the pods recorded there whose shims
    /// are alive; records of dead shims are sandboxed anew (their containers restart).
    pub fn new(cfg: RuntimeConfig, lookup: Arc<dyn ObjectLookup>) -> Result<Self> {
        Self::with_net(cfg, lookup, Arc::new(IpRoute2))
    }

    /// As `new`, with a custom network implementation.
    pub fn with_net(
        cfg: RuntimeConfig,
        lookup: Arc<dyn ObjectLookup>,
        net: Arc<dyn NetOps>,
    ) -> Result<Self> {
        let pods_dir = cfg.state_dir.join("pods");
        // <pods_dir>/<36-char uid>/shim.sock must fit in sun_path (108 bytes).
        let sock_len = pods_dir.as_os_str().len() + 1 + 36 + 1 + shim::SOCKET.len();
        if sock_len >= 108 {
            return Err(Error::invalid(
                "state_dir",
                format!(
                    "{} is too long for the pods' unix sockets (at most {} bytes)",
                    cfg.state_dir.display(),
                    cfg.state_dir.as_os_str().len() - (sock_len - 107)
                ),
            ));
        }
        std::fs::create_dir_all(&pods_dir).ctx(|| format!("mkdir {}", pods_dir.display()))?;
        let ns_path = cfg
            .node_netns
            .clone()
            .unwrap_or_else(|| PathBuf::from("/proc/thread-self/ns/net"));
        let node_netns = std::fs::File::open(&ns_path)
            .map(OwnedFd::from)
            .ctx(|| format!("open node netns {}", ns_path.display()))?;
        let cgroups = cfg.cgroup_root.as_deref().map(Cgroups::new).transpose()?;
        let ipam = crate::ipam::Ipam::open(cfg.pod_cidr, &cfg.state_dir.join("ipam.json"))?;
        let (tx, _) = broadcast::channel(1024);
        let rt = Runtime {
            inner: Arc::new(Inner {
                cfg,
                lookup,
                net,
                cgroups,
                ipam: Mutex::new(ipam),
                pods: Mutex::new(BTreeMap::new()),
                tx,
                node_netns,
                detached: AtomicBool::new(false),
            }),
        };
        rt.adopt(&pods_dir)?;
        Ok(rt)
    }

    fn adopt(&self, pods_dir: &Path) -> Result<()> {
        let Ok(rd) = std::fs::read_dir(pods_dir) else {
            return Ok(());
        };
        for e in rd.flatten() {
            let dir = e.path();
            let Ok(bytes) = std::fs::read(dir.join("pod.json")) else {
                continue;
            };
            let rec: PodRecord = match serde_json::from_slice(&bytes) {
                Ok(r) => r,
                Err(err) => {
                    tracing::warn!(dir = %dir.display(), %err, "unreadable pod record, skipped");
                    continue;
                }
            };
            tracing::info!(pod = %rec.key, "adopting pod");
            self.spawn_supervisor(rec, dir, true);
        }
        Ok(())
    }

    /// Receive a [`PodChange`] for every status change. A receiver that falls more
    /// than 1024 changes behind gets `Lagged`: it should then resync from [`Self::list`].
    pub fn subscribe(&self) -> broadcast::Receiver<PodChange> {
        self.inner.tx.subscribe()
    }

    /// Validate and start a pod. Returns once the pod is recorded (IP allocated); the
    /// sandbox and containers come up in the background.
    pub fn create_pod(&self, mut pod: Pod) -> Result<PodKey> {
        crate::validate::validate_pod(&pod)?;
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        pod.metadata.namespace = Some(ns.clone());
        let key = PodKey::new(&ns, pod.metadata.name.as_deref().unwrap_or_default());
        if self.inner.pods.lock().unwrap().contains_key(&key) {
            return Err(Error::AlreadyExists(key.to_string()));
        }
        let uid = match &pod.metadata.uid {
            Some(u) if !u.is_empty() && !u.contains('/') => u.clone(),
            _ => std::fs::read_to_string("/proc/sys/kernel/random/uuid")
                .ctx(|| "generate uid".into())?
                .trim()
                .to_string(),
        };
        pod.metadata.uid = Some(uid.clone());
        let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
        let ip = if host_network {
            self.inner.cfg.node_ip.unwrap_or(Ipv4Addr::LOCALHOST)
        } else {
            self.inner.ipam.lock().unwrap().allocate(&uid)?
        };
        let dir = self.inner.cfg.state_dir.join("pods").join(&uid);
        let rec = PodRecord {
            key: key.clone(),
            host_if: if host_network {
                String::new()
            } else {
                crate::net::host_ifname(&self.inner.cfg.veth_prefix, &uid)
            },
            uid: uid.clone(),
            pod,
            ip,
            created_at: now_unix(),
            init_done: 0,
            containers: BTreeMap::new(),
        };
        let setup = || -> Result<()> {
            std::fs::create_dir_all(&dir).ctx(|| format!("mkdir {}", dir.display()))?;
            save_record(&dir, &rec)
        };
        if let Err(e) = setup() {
            let _ = self.inner.ipam.lock().unwrap().release(&uid);
            return Err(e);
        }
        self.spawn_supervisor(rec, dir, false);
        Ok(key)
    }

    fn spawn_supervisor(&self, rec: PodRecord, dir: PathBuf, adopted: bool) {
        let shared = Arc::new(PodShared {
            key: rec.key.clone(),
            uid: rec.uid.clone(),
            pod: rec.pod.clone(),
            ip: rec.ip,
            host_if: rec.host_if.clone(),
            dir: dir.clone(),
            deleting: AtomicBool::new(false),
            state: Mutex::new(Shared {
                status: PodStatus {
                    phase: Some("Pending".into()),
                    ..Default::default()
                },
                events: EventLog::default(),
                host_ifindex: None,
                shim_pid: None,
                pids: BTreeMap::new(),
                grace_override: None,
                gone: false,
                serving: false,
            }),
            gone_cv: Condvar::new(),
            thread: Mutex::new(None),
        });
        self.inner
            .pods
            .lock()
            .unwrap()
            .insert(rec.key.clone(), shared.clone());
        let inner = self.inner.clone();
        let sh = shared.clone();
        // Build the supervisor here so the pod has a full (Pending) status before
        // `create_pod` returns.
        let mut sup = Supervisor::new(inner.clone(), sh.clone(), rec.clone(), adopted);
        sup.compute_status();
        let handle = std::thread::Builder::new()
            .name(format!("pod-{}", rec.key.name))
            .spawn(move || {
                // SAFETY: setns on this thread only, with a valid netns fd.
                let rc = unsafe { libc::setns(inner.node_netns.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    sh.event(
                        true,
                        "FailedCreatePodSandBox",
                        None,
                        format!("enter node netns: {}", std::io::Error::last_os_error()),
                    );
                    return;
                }
                sup.run();
            })
            .expect("spawn pod thread");
        *shared.thread.lock().unwrap() = Some(handle);
    }

    fn get(&self, key: &PodKey) -> Option<Arc<PodShared>> {
        self.inner.pods.lock().unwrap().get(key).cloned()
    }

    /// Start deleting a pod (preStop, SIGTERM, SIGKILL at the end of the grace period,
    /// then the sandbox, IP and files go). `grace_seconds` overrides the pod's.
    pub fn delete_pod(&self, key: &PodKey, grace_seconds: Option<i64>) -> Result<()> {
        let p = self
            .get(key)
            .ok_or_else(|| Error::NotFound(key.to_string()))?;
        p.state.lock().unwrap().grace_override = grace_seconds;
        p.deleting.store(true, Ordering::SeqCst);
        p.wake();
        Ok(())
    }

    /// Wait until a deleted pod is completely gone. Returns false on timeout.
    pub fn wait_deleted(&self, key: &PodKey, timeout: Duration) -> bool {
        let Some(p) = self.get(key) else { return true };
        let deadline = Instant::now() + timeout;
        let mut st = p.state.lock().unwrap();
        while !st.gone {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = p.gone_cv.wait_timeout(st, deadline - now).unwrap().0;
        }
        true
    }

    pub fn pod(&self, key: &PodKey) -> Option<PodInfo> {
        self.get(key).map(|p| info(&p))
    }

    pub fn pod_status(&self, key: &PodKey) -> Option<PodStatus> {
        self.get(key)
            .map(|p| p.state.lock().unwrap().status.clone())
    }

    pub fn list(&self) -> Vec<PodInfo> {
        let pods: Vec<_> = self.inner.pods.lock().unwrap().values().cloned().collect();
        pods.iter().map(|p| info(p)).collect()
    }

    pub fn events(&self, key: &PodKey) -> Vec<PodEvent> {
        self.get(key)
            .map(|p| p.state.lock().unwrap().events.list())
            .unwrap_or_default()
    }

    /// The container's log file (stdout and stderr of all its runs, appended).
    pub fn log_path(&self, key: &PodKey, container: &str) -> Option<PathBuf> {
        let p = self.get(key)?;
        let c = all_containers(&p.pod).find(|c| c.name == container)?;
        Some(p.dir.join("logs").join(format!("{}.log", c.name)))
    }

    /// Run a command in a running container (`vipr exec`). `container` None = first.
    pub fn exec(
        &self,
        key: &PodKey,
        container: Option<&str>,
        argv: &[String],
        timeout: Duration,
    ) -> Result<crate::exec::ExecOutput> {
        let p = self
            .get(key)
            .ok_or_else(|| Error::NotFound(key.to_string()))?;
        let name = match container {
            Some(c) => c.to_string(),
            None => p
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .map(|c| c.name.clone())
                .unwrap_or_default(),
        };
        let pid = p
            .state
            .lock()
            .unwrap()
            .pids
            .get(&name)
            .copied()
            .ok_or_else(|| Error::Shim(format!("container {name} of {key} is not running")))?;
        let cgroups = self.container_cgroups(&p.uid, &name);
        crate::exec::run(pid, argv, &cgroups, timeout)
    }

    /// A `Command` for `argv` in a running container, for interactive `vipr exec`
    /// (the caller wires stdin/stdout). Keep the fds until it is spawned.
    pub fn exec_command(
        &self,
        key: &PodKey,
        container: &str,
        argv: &[String],
    ) -> Result<(std::process::Command, Vec<OwnedFd>)> {
        let p = self
            .get(key)
            .ok_or_else(|| Error::NotFound(key.to_string()))?;
        let pid = p
            .state
            .lock()
            .unwrap()
            .pids
            .get(container)
            .copied()
            .ok_or_else(|| Error::Shim(format!("container {container} of {key} is not running")))?;
        let cgroups = self.container_cgroups(&p.uid, container);
        crate::exec::command_in(pid, argv, &cgroups)
    }

    fn container_cgroups(&self, uid: &str, ctr: &str) -> Vec<PathBuf> {
        self.inner
            .cgroups
            .as_ref()
            .map(|c| c.dirs(uid, ctr))
            .unwrap_or_default()
    }

    /// Stop supervising without touching the pods (agent shutdown before an upgrade):
    /// containers keep running and the next `Runtime` adopts them.
    pub fn detach(&self) {
        self.inner.detached.store(true, Ordering::SeqCst);
        let pods: Vec<_> = std::mem::take(&mut *self.inner.pods.lock().unwrap())
            .into_values()
            .collect();
        for p in &pods {
            p.wake();
        }
        for p in pods {
            if let Some(h) = p.thread.lock().unwrap().take() {
                let _ = h.join();
            }
        }
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.cfg
    }

    /// Folders of every cgroup hierarchy the runtime uses for `cgroup_root`.
    pub fn cgroup_roots(&self) -> Vec<PathBuf> {
        self.inner
            .cgroups
            .as_ref()
            .map(|c| c.all_roots())
            .unwrap_or_default()
    }
}

fn info(p: &PodShared) -> PodInfo {
    let st = p.state.lock().unwrap();
    PodInfo {
        key: p.key.clone(),
        uid: p.uid.clone(),
        pod: p.pod.clone(),
        status: st.status.clone(),
        ip: Some(p.ip),
        host_ifname: p.host_if.clone(),
        host_ifindex: st.host_ifindex,
        shim_pid: st.shim_pid,
        deleting: p.deleting.load(Ordering::SeqCst),
        serving: st.serving,
    }
}

fn save_record(dir: &Path, rec: &PodRecord) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(rec).expect("record serializes");
    write_atomic(&dir.join("pod.json"), &bytes)
}

fn all_containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    let spec = pod.spec.as_ref();
    spec.into_iter().flat_map(|s| {
        s.init_containers
            .iter()
            .flatten()
            .chain(s.containers.iter())
    })
}

// ------------------------------------------------------------ supervisor

#[derive(Debug, Clone)]
enum CtrPhase {
    Waiting { reason: String, message: String },
    Running { started_at: i64 },
    Terminated(TermInfo),
}

struct Ctr {
    spec: Container,
    init: bool,
    phase: CtrPhase,
    /// When to (re)start it; None = do not.
    next_start: Option<Instant>,
    /// Shim record of the current instance.
    current: Option<CtrRecord>,
    /// Monotonic time the current instance started (probe clock).
    started_mono: Instant,
    probe_instance: u64,
    startup: Option<(ProbeAction, ProbeState)>,
    liveness: Option<(ProbeAction, ProbeState)>,
    readiness: Option<(ProbeAction, ProbeState)>,
    started: bool,
    ready: bool,
    /// SIGKILL deadline of a kill in progress.
    kill_deadline: Option<Instant>,
    oom_before: u64,
}

/// Quiet steps (nothing written, published or under way) before a pod
/// supervisor slows from the runtime's tick to [`IDLE_TICK`].
const QUIET_TICKS_BEFORE_IDLE: u32 = 10;
/// How often a quiet pod's shim is asked for its containers' state.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// The shortest wait between steps, so a probe due now cannot spin the loop.
const MIN_WAIT: Duration = Duration::from_millis(10);

struct Supervisor {
    inner: Arc<Inner>,
    sh: Arc<PodShared>,
    rec: PodRecord,
    ctrs: Vec<Ctr>,
    policy: RestartPolicy,
    hostname: String,
    volumes: Option<BTreeMap<String, PreparedVolume>>,
    sandbox_error: Option<String>,
    /// Init containers run again after a sandbox change.
    init_rerun: bool,
    terminating: bool,
    shim_failures: u32,
    init_failed: bool,
    last_change: Option<PodChange>,
    dirty: bool,
    sandbox_ready: bool,
    sandbox_retry_at: Instant,
}

impl Supervisor {
    fn new(inner: Arc<Inner>, sh: Arc<PodShared>, rec: PodRecord, adopted: bool) -> Self {
        let spec = rec.pod.spec.clone().unwrap_or_default();
        let policy = RestartPolicy::parse(spec.restart_policy.as_deref());
        let now = Instant::now();
        let mk = |c: &Container, init: bool| Ctr {
            spec: c.clone(),
            init,
            phase: CtrPhase::Waiting {
                reason: if init {
                    "PodInitializing"
                } else {
                    "ContainerCreating"
                }
                .into(),
                message: String::new(),
            },
            next_start: None,
            current: None,
            started_mono: now,
            probe_instance: 0,
            startup: None,
            liveness: None,
            readiness: None,
            started: false,
            ready: false,
            kill_deadline: None,
            oom_before: 0,
        };
        let mut ctrs: Vec<Ctr> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| mk(c, true))
            .chain(spec.containers.iter().map(|c| mk(c, false)))
            .collect();
        for c in &mut ctrs {
            if let Some(t) = rec
                .containers
                .get(&c.spec.name)
                .and_then(|p| p.last_terminated.clone())
            {
                c.phase = CtrPhase::Terminated(t);
            }
        }
        // hostNetwork pods share the node's UTS namespace, hence its hostname.
        let node_hostname = (spec.host_network == Some(true))
            .then(|| nix::unistd::gethostname().ok())
            .flatten()
            .map(|h| h.to_string_lossy().into_owned());
        let hostname = node_hostname
            .or_else(|| spec.hostname.clone())
            .unwrap_or_else(|| rec.key.name.chars().take(63).collect::<String>())
            .trim_end_matches(['-', '.'])
            .to_string();
        let _ = adopted;
        Supervisor {
            inner,
            sh,
            rec,
            ctrs,
            policy,
            hostname,
            volumes: None,
            sandbox_error: None,
            init_rerun: false,
            terminating: false,
            shim_failures: 0,
            init_failed: false,
            last_change: None,
            dirty: false,
            sandbox_ready: false,
            sandbox_retry_at: now,
        }
    }

    fn event(&self, warning: bool, reason: &str, ctr: Option<&str>, msg: String) {
        self.sh.event(warning, reason, ctr, msg);
    }

    fn persist(&mut self, name: &str) -> &mut CtrPersist {
        self.dirty = true;
        self.rec.containers.entry(name.to_string()).or_default()
    }

    /// Records which instance of each container is ready (see
    /// [`CtrPersist::ready_instance`]).
    fn remember_readiness(&mut self) {
        for i in 0..self.ctrs.len() {
            let c = &self.ctrs[i];
            if c.probe_instance == 0 {
                // Not observed running (yet): nothing to learn.
                continue;
            }
            let ready_instance = if c.ready { c.probe_instance } else { 0 };
            let known = self.rec.containers.get(&c.spec.name);
            if known.map_or(0, |p| p.ready_instance) != ready_instance {
                let name = c.spec.name.clone();
                self.persist(&name).ready_instance = ready_instance;
            }
        }
    }

    fn pers(&self, name: &str) -> CtrPersist {
        self.rec.containers.get(name).cloned().unwrap_or_default()
    }

    fn run(mut self) {
        let tick = self.inner.cfg.tick;
        let mut quiet_ticks = 0u32;
        loop {
            if self.inner.detached.load(Ordering::SeqCst) {
                self.flush();
                return;
            }
            if self.sh.deleting.load(Ordering::SeqCst) {
                self.terminate_pod();
                return;
            }
            if !self.sandbox_ready && Instant::now() >= self.sandbox_retry_at {
                self.ensure_sandbox();
            }
            // Straight after the sandbox is found (adoption) or made: the
            // first status published must be the observed one, or an
            // adopted ready pod would flap unready and leave its endpoints.
            if self.sandbox_ready {
                self.step();
            } else {
                self.compute_status();
            }
            let wrote = self.dirty;
            self.flush();
            let published = self.publish();
            if wrote || published || self.busy() {
                quiet_ticks = 0;
            } else {
                quiet_ticks = quiet_ticks.saturating_add(1);
            }
            // Woken early by `PodShared::wake` (delete, detach).
            std::thread::park_timeout(self.next_wait(tick, quiet_ticks));
        }
    }

    /// Whether something is under way that needs the short tick: no sandbox
    /// yet, a (re)start scheduled, a kill in progress.
    fn busy(&self) -> bool {
        !self.sandbox_ready
            || self
                .ctrs
                .iter()
                .any(|c| c.next_start.is_some() || c.kill_deadline.is_some())
    }

    /// How long to wait before the next step. A pod that has been quiet for
    /// a second polls its shim once a second (kubelet's PLEG relists at the
    /// same period) instead of ten times: at a thousand pods that is the
    /// difference between an idle agent and one busy core. Probes still run
    /// on time: the wait never passes the next probe that falls due.
    fn next_wait(&self, tick: Duration, quiet_ticks: u32) -> Duration {
        if quiet_ticks < QUIET_TICKS_BEFORE_IDLE {
            return tick;
        }
        let mut wait = IDLE_TICK.max(tick);
        for c in &self.ctrs {
            if c.current.as_ref().is_none_or(|r| r.exit.is_some()) {
                continue;
            }
            let since = c.started_mono.elapsed();
            let probes = [&c.startup, &c.liveness, &c.readiness];
            for (_, state) in probes.into_iter().flatten() {
                wait = wait.min(state.until_due(since));
            }
        }
        wait.max(tick.min(MIN_WAIT))
    }

    fn flush(&mut self) {
        if self.dirty {
            self.dirty = false;
            if let Err(e) = save_record(&self.sh.dir, &self.rec) {
                tracing::warn!(pod = %self.rec.key, %e, "persist pod record");
            }
        }
    }

    // ---------------------------------------------------------- sandbox

    fn pod_dir(&self) -> &Path {
        &self.sh.dir
    }

    /// Find a live shim (adoption) or create the sandbox: shim, veth, /etc files.
    fn ensure_sandbox(&mut self) {
        let dir = self.pod_dir().to_path_buf();
        if let Some(pid) = shim::alive_pid(&dir) {
            let ifindex = (!self.rec.host_if.is_empty())
                .then(|| self.inner.net.ifindex(&self.rec.host_if))
                .flatten();
            let mut st = self.sh.state.lock().unwrap();
            st.shim_pid = Some(pid);
            st.host_ifindex = ifindex;
            drop(st);
            self.sandbox_ready = true;
            self.write_etc();
            return;
        }
        if self.rec.containers.values().any(|p| p.seen_instance > 0) {
            self.event(
                true,
                "SandboxChanged",
                None,
                "Pod sandbox (shim) is gone; it will be re-created".into(),
            );
            self.reset_for_new_sandbox();
        }
        match self.create_sandbox(&dir) {
            Ok(()) => {
                self.sandbox_ready = true;
                self.sandbox_error = None;
            }
            Err(e) => {
                self.event(true, "FailedCreatePodSandBox", None, e.to_string());
                self.sandbox_retry_at = Instant::now() + Duration::from_secs(5);
                self.sandbox_error = Some(format!("sandbox: {e}"));
            }
        }
    }

    fn write_etc(&self) {
        let spec = self.rec.pod.spec.as_ref();
        let etc = self.pod_dir().join("etc");
        let _ = std::fs::create_dir_all(&etc);
        let cfg = &self.inner.cfg;
        let ns = &self.rec.key.namespace;
        let fqdn = spec
            .and_then(|s| s.subdomain.as_ref())
            .map(|sub| format!("{}.{sub}.{ns}.svc.{}", self.hostname, cfg.cluster_domain));
        let aliases: Vec<(String, Vec<String>)> = spec
            .and_then(|s| s.host_aliases.as_ref())
            .into_iter()
            .flatten()
            .map(|a| (a.ip.clone(), a.hostnames.clone().unwrap_or_default()))
            .collect();
        let hosts = spec::hosts_file(
            Some(IpAddr::V4(self.rec.ip)),
            &self.hostname,
            fqdn.as_deref(),
            &aliases,
        );
        let node_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let resolv = spec::resolv_conf(
            &self.rec.pod,
            ns,
            &cfg.cluster_dns,
            &cfg.cluster_domain,
            &node_resolv,
        );
        let _ = write_atomic(&etc.join("hosts"), hosts.as_bytes());
        let _ = write_atomic(&etc.join("resolv.conf"), resolv.as_bytes());
        let _ = write_atomic(
            &etc.join("hostname"),
            format!("{}\n", self.hostname).as_bytes(),
        );
    }

    fn create_sandbox(&mut self, dir: &Path) -> Result<()> {
        for sub in ["logs", "etc", "volumes"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).ctx(|| format!("mkdir {}", d.display()))?;
        }
        self.write_etc();
        let cfg = &self.inner.cfg;
        let Some((exe, args)) = cfg.shim_command.split_first() else {
            return Err(Error::Shim("empty shim_command".into()));
        };
        // "_sandbox" is not a DNS label, so it never collides with a container name.
        let cgroups = match &self.inner.cgroups {
            Some(cg) => cg.create(&self.rec.uid, "_sandbox", &Limits::default())?,
            None => vec![],
        };
        let mut child = std::process::Command::new(exe)
            .args(args)
            .args(self.rec.host_if.is_empty().then_some("--host-network"))
            .arg(dir)
            .arg(&self.hostname)
            .args(&cgroups)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| Error::Shim(format!("spawn {exe}: {e}")))?;
        // The first shim process exits as soon as the long-lived one serves requests.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Shim("shim did not come up within 10s".into()));
                }
            }
        }
        let out = child
            .wait_with_output()
            .map_err(|e| Error::Shim(e.to_string()))?;
        if !out.status.success() {
            return Err(Error::Shim(format!(
                "shim exited {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let pid = shim::alive_pid(dir).ok_or_else(|| Error::Shim("shim does not answer".into()))?;
        self.sh.state.lock().unwrap().shim_pid = Some(pid);
        if self.rec.host_if.is_empty() {
            self.event(
                false,
                "SandboxReady",
                None,
                format!("host network, shim pid {pid}"),
            );
            return Ok(());
        }
        let ifindex = match self
            .inner
            .net
            .setup(pid, &self.rec.host_if, self.rec.ip, cfg.gateway)
        {
            Ok(i) => i,
            Err(e) => {
                let _ = shim::call(dir, &Request::Shutdown, Duration::from_secs(2));
                let _ = self.inner.net.teardown(&self.rec.host_if, self.rec.ip);
                return Err(e);
            }
        };
        self.sh.state.lock().unwrap().host_ifindex = Some(ifindex);
        self.event(
            false,
            "SandboxReady",
            None,
            format!(
                "IP {} on {} (ifindex {ifindex}), shim pid {pid}",
                self.rec.ip, self.rec.host_if
            ),
        );
        Ok(())
    }

    // ---------------------------------------------------------- main step

    fn step(&mut self) {
        let dir = self.pod_dir().to_path_buf();
        let recs = match shim::call(&dir, &Request::Status, Duration::from_secs(2)) {
            Ok(Response::Status(r)) => {
                self.shim_failures = 0;
                r
            }
            _ => {
                self.shim_failures += 1;
                if self.shim_failures >= 3 {
                    self.sandbox_lost();
                    self.shim_failures = 0;
                } else {
                    self.compute_status();
                }
                return;
            }
        };
        let now = Instant::now();
        // Observe the shim's view of each container.
        for i in 0..self.ctrs.len() {
            let name = self.ctrs[i].spec.name.clone();
            let r = recs.get(&name).cloned();
            self.observe(i, r, now);
        }
        // Init containers in order, then all app containers.
        let n_init = self.ctrs.iter().filter(|c| c.init).count();
        let mut init_done = self.rec.init_done.min(n_init);
        while init_done < n_init {
            let c = &self.ctrs[init_done];
            match &c.phase {
                CtrPhase::Terminated(t) if t.exit_code == 0 && c.next_start.is_none() => {
                    init_done += 1;
                }
                _ => break,
            }
        }
        if init_done != self.rec.init_done {
            self.rec.init_done = init_done;
            self.dirty = true;
        }
        if init_done < n_init {
            let c = &mut self.ctrs[init_done];
            let p = self.rec.containers.get(&c.spec.name);
            let never_started = p.is_none_or(|p| !p.ever_started && p.seen_instance == 0);
            if (never_started || self.init_rerun) && c.next_start.is_none() && c.current.is_none() {
                c.next_start = Some(now);
            }
        } else {
            self.init_rerun = false;
            for i in n_init..self.ctrs.len() {
                let c = &self.ctrs[i];
                let p = self.rec.containers.get(&c.spec.name);
                let never_started = p.is_none_or(|p| !p.ever_started && p.seen_instance == 0);
                if never_started && c.next_start.is_none() && c.current.is_none() {
                    self.ctrs[i].next_start = Some(now);
                }
            }
        }
        for i in 0..self.ctrs.len() {
            if self.ctrs[i].next_start.is_some_and(|t| t <= now)
                && self.ctrs[i]
                    .current
                    .as_ref()
                    .is_none_or(|r| r.exit.is_some())
            {
                self.start(i);
            }
        }
        for i in 0..self.ctrs.len() {
            self.kill_progress(i, now);
            if !self.ctrs[i].init {
                self.probe(i);
            }
        }
        self.compute_status();
    }

    /// Fold one shim record into the container's state; handles exits.
    fn observe(&mut self, i: usize, r: Option<CtrRecord>, now: Instant) {
        let name = self.ctrs[i].spec.name.clone();
        let Some(r) = r else {
            self.ctrs[i].current = None;
            return;
        };
        let pers = self.pers(&name);
        if r.instance > pers.seen_instance {
            self.persist(&name).seen_instance = r.instance;
        }
        match &r.exit {
            None => {
                let c = &mut self.ctrs[i];
                if c.probe_instance != r.instance {
                    // A new instance (started by us, or found running at adoption).
                    c.probe_instance = r.instance;
                    let age = Duration::from_secs((now_unix() - r.started_at).max(0) as u64);
                    c.started_mono = now.checked_sub(age).unwrap_or(now);
                    let mk = |p: Option<&k8s_openapi::api::core::v1::Probe>| {
                        p.and_then(|p| {
                            probe::probe_action(p, &c.spec)
                                .ok()
                                .map(|a| (a, ProbeState::new(ProbeTiming::from_probe(p))))
                        })
                    };
                    c.startup = mk(c.spec.startup_probe.as_ref());
                    c.liveness = mk(c.spec.liveness_probe.as_ref());
                    c.readiness = mk(c.spec.readiness_probe.as_ref());
                    // Found running at adoption and ready before: a ready
                    // container had passed its startup probe too.
                    let was_ready = pers.ready_instance == r.instance;
                    c.started = c.startup.is_none() || was_ready;
                    c.ready = was_ready;
                    c.kill_deadline = None;
                    c.next_start = None;
                    c.phase = CtrPhase::Running {
                        started_at: r.started_at,
                    };
                }
                self.sh
                    .state
                    .lock()
                    .unwrap()
                    .pids
                    .insert(name.clone(), r.pid);
            }
            Some(exit) if r.instance > pers.handled_instance => {
                self.sh.state.lock().unwrap().pids.remove(&name);
                let ooms = self
                    .inner
                    .cgroups
                    .as_ref()
                    .map_or(0, |cg| cg.oom_kills(&self.rec.uid, &name));
                let c = &mut self.ctrs[i];
                let reason = if ooms > c.oom_before {
                    "OOMKilled"
                } else if exit.code == 0 {
                    "Completed"
                } else {
                    "Error"
                };
                c.oom_before = ooms;
                let term = TermInfo {
                    exit_code: exit.code,
                    signal: exit.signal,
                    reason: reason.into(),
                    message: None,
                    started_at: r.started_at,
                    finished_at: exit.finished_at,
                };
                c.phase = CtrPhase::Terminated(term.clone());
                c.ready = false;
                c.started = false;
                c.kill_deadline = None;
                c.probe_instance = 0;
                let init = c.init;
                let ran = Duration::from_secs((exit.finished_at - r.started_at).max(0) as u64);
                let restart = if init {
                    self.policy.restarts_init(exit.code)
                } else {
                    self.policy.restarts(exit.code)
                };
                let p = self.persist(&name);
                p.handled_instance = r.instance;
                p.last_terminated = Some(term);
                let delay = if restart {
                    Some(p.backoff.on_exit(ran))
                } else {
                    None
                };
                if init && !restart && exit.code != 0 {
                    self.init_failed = true;
                }
                let c = &mut self.ctrs[i];
                c.current = Some(r);
                match delay {
                    Some(d) => {
                        c.next_start = Some(now + d);
                        if !d.is_zero() {
                            c.phase = CtrPhase::Waiting {
                                reason: "CrashLoopBackOff".into(),
                                message: format!(
                                    "back-off {}s restarting failed container={name} pod={}",
                                    d.as_secs(),
                                    self.rec.key.name
                                ),
                            };
                            self.event(
                                true,
                                "BackOff",
                                Some(&name),
                                "Back-off restarting failed container".into(),
                            );
                        }
                    }
                    None => c.next_start = None,
                }
                return;
            }
            Some(_) => {
                // Exit already handled. After adoption the restart timer was lost.
                let c = &mut self.ctrs[i];
                if c.next_start.is_none() && c.current.is_none() {
                    let code = match &c.phase {
                        CtrPhase::Terminated(t) => t.exit_code,
                        _ => 0,
                    };
                    let restart = if c.init {
                        self.policy.restarts_init(code)
                    } else {
                        self.policy.restarts(code)
                    };
                    if restart {
                        c.next_start = Some(now);
                    }
                }
                self.sh.state.lock().unwrap().pids.remove(&name);
            }
        }
        self.ctrs[i].current = Some(r);
    }

    fn facts_ip(&self) -> Option<IpAddr> {
        Some(IpAddr::V4(self.rec.ip))
    }

    fn prepare_volumes(&mut self) -> std::result::Result<(), Waiting> {
        if self.volumes.is_some() {
            return Ok(());
        }
        let spec = self.rec.pod.spec.clone().unwrap_or_default();
        let facts = PodFacts {
            pod: &self.rec.pod,
            namespace: &self.rec.key.namespace,
            name: &self.rec.key.name,
            uid: &self.rec.uid,
            pod_ip: self.facts_ip(),
            node_name: &self.inner.cfg.node_name,
        };
        let mut out = BTreeMap::new();
        for v in spec.volumes.iter().flatten() {
            let vdir = self.sh.dir.join("volumes").join(&v.name);
            // Secrets live in memory, as with the kubelet: never on the node's disk.
            let has_secret = v.secret.is_some()
                || v.projected
                    .as_ref()
                    .is_some_and(|p| p.sources.iter().flatten().any(|s| s.secret.is_some()));
            if has_secret && !is_mountpoint(&vdir) {
                let _ = std::fs::create_dir_all(&vdir);
                nix::mount::mount(
                    Some("tmpfs"),
                    &vdir,
                    Some("tmpfs"),
                    nix::mount::MsFlags::MS_NOEXEC | nix::mount::MsFlags::MS_NOSUID,
                    Some("mode=0755,size=16m"),
                )
                .map_err(|e| Waiting {
                    reason: "CreateContainerConfigError".into(),
                    message: format!("volume {}: mount tmpfs: {e}", v.name),
                })?;
            }
            let pv = spec::prepare_volume(v, &vdir, &facts, self.inner.lookup.as_ref())?;
            if pv.node_tmpfs && !is_mountpoint(&vdir) {
                let opts = match &pv.kind {
                    shim::MountKind::Tmpfs { size: Some(s) } => format!("size={s},mode=0777"),
                    _ => "mode=0777".into(),
                };
                nix::mount::mount(
                    Some("tmpfs"),
                    &vdir,
                    Some("tmpfs"),
                    nix::mount::MsFlags::empty(),
                    Some(opts.as_str()),
                )
                .map_err(|e| Waiting {
                    reason: "CreateContainerConfigError".into(),
                    message: format!("volume {}: mount tmpfs: {e}", v.name),
                })?;
            }
            out.insert(v.name.clone(), pv);
        }
        self.volumes = Some(out);
        Ok(())
    }

    fn launch_spec(&mut self, i: usize) -> std::result::Result<LaunchSpec, Waiting> {
        self.prepare_volumes()?;
        let c = &self.ctrs[i].spec;
        let cfg = &self.inner.cfg;
        let facts = PodFacts {
            pod: &self.rec.pod,
            namespace: &self.rec.key.namespace,
            name: &self.rec.key.name,
            uid: &self.rec.uid,
            pod_ip: self.facts_ip(),
            node_name: &cfg.node_name,
        };
        let rootfs = spec::resolve_image(c.image.as_deref(), &cfg.state_dir)?;
        let env = spec::container_env(
            c,
            &facts,
            &self.hostname,
            &cfg.extra_path,
            self.inner.lookup.as_ref(),
        )?;
        let argv = spec::container_argv(c, &env);
        if argv.is_empty() {
            return Err(Waiting {
                reason: "CreateContainerConfigError".into(),
                message: "no command specified".into(),
            });
        }
        let mounts = spec::container_mounts(
            c,
            self.volumes.as_ref().expect("prepared"),
            &self.sh.dir.join("etc"),
        );
        let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref());
        let limits = Limits {
            memory_bytes: limits
                .and_then(|l| l.get("memory"))
                .and_then(|q| spec::parse_quantity(&q.0)),
            cpu_millis: limits
                .and_then(|l| l.get("cpu"))
                .and_then(|q| spec::parse_cpu_millis(&q.0)),
        };
        let cgroups = match &self.inner.cgroups {
            Some(cg) => cg
                .create(&self.rec.uid, &c.name, &limits)
                .map_err(|e| Waiting {
                    reason: "CreateContainerError".into(),
                    message: format!("cgroup: {e}"),
                })?,
            None => vec![],
        };
        let host_root = if rootfs.is_none() {
            let d = self.sh.dir.join("roots").join(&c.name);
            std::fs::create_dir_all(&d).map_err(|e| Waiting {
                reason: "CreateContainerError".into(),
                message: format!("mkdir {}: {e}", d.display()),
            })?;
            Some(d)
        } else {
            None
        };
        let psc = self
            .rec
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref());
        let csc = c.security_context.as_ref();
        let to_u32 = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok());
        Ok(LaunchSpec {
            host_root,
            run_as_user: to_u32(
                csc.and_then(|s| s.run_as_user)
                    .or_else(|| psc.and_then(|s| s.run_as_user)),
            ),
            run_as_group: to_u32(
                csc.and_then(|s| s.run_as_group)
                    .or_else(|| psc.and_then(|s| s.run_as_group)),
            ),
            supplemental_groups: psc
                .and_then(|s| s.supplemental_groups.clone())
                .unwrap_or_default()
                .into_iter()
                .filter_map(|g| u32::try_from(g).ok())
                .collect(),
            name: c.name.clone(),
            argv,
            env,
            cwd: c.working_dir.clone().filter(|w| !w.is_empty()),
            rootfs,
            mounts,
            log: self.sh.dir.join("logs").join(format!("{}.log", c.name)),
            cgroups,
        })
    }

    fn start(&mut self, i: usize) {
        let name = self.ctrs[i].spec.name.clone();
        let now = Instant::now();
        let spec = match self.launch_spec(i) {
            Ok(s) => s,
            Err(w) => {
                if !matches!(&self.ctrs[i].phase, CtrPhase::Waiting { reason, .. } if *reason == w.reason)
                {
                    self.event(true, "Failed", Some(&name), format!("Error: {}", w.message));
                }
                let c = &mut self.ctrs[i];
                c.phase = CtrPhase::Waiting {
                    reason: w.reason,
                    message: w.message,
                };
                // Config may appear (ConfigMap applied, image unpacked): retry soon.
                c.next_start = Some(now + Duration::from_secs(2));
                return;
            }
        };
        let oom = self
            .inner
            .cgroups
            .as_ref()
            .map_or(0, |cg| cg.oom_kills(&self.rec.uid, &name));
        self.ctrs[i].oom_before = oom;
        let dir = self.pod_dir().to_path_buf();
        match shim::call(
            &dir,
            &Request::Start(Box::new(spec)),
            Duration::from_secs(10),
        ) {
            Ok(Response::Started { pid, instance }) => {
                let p = self.persist(&name);
                let restarted = p.ever_started;
                p.ever_started = true;
                if restarted {
                    p.restart_count += 1;
                }
                p.seen_instance = instance;
                self.event(
                    false,
                    "Created",
                    Some(&name),
                    format!("Created container {name}"),
                );
                self.event(
                    false,
                    "Started",
                    Some(&name),
                    format!("Started container {name}"),
                );
                let c = &mut self.ctrs[i];
                c.next_start = None;
                c.current = Some(CtrRecord {
                    pid,
                    instance,
                    started_at: now_unix(),
                    exit: None,
                });
                self.sh.state.lock().unwrap().pids.insert(name.clone(), pid);
                let r = c.current.clone();
                self.observe(i, r, now);
                self.post_start(i, pid);
            }
            Ok(other) => {
                self.event(
                    true,
                    "Failed",
                    Some(&name),
                    format!("unexpected shim reply {other:?}"),
                );
                self.ctrs[i].next_start = Some(now + Duration::from_secs(2));
            }
            Err(e) => {
                // The process never ran: a crash for restart purposes.
                let msg = e.to_string();
                self.event(true, "Failed", Some(&name), format!("Error: {msg}"));
                let p = self.persist(&name);
                let restarted = p.ever_started;
                p.ever_started = true;
                if restarted {
                    p.restart_count += 1;
                }
                let term = TermInfo {
                    exit_code: 128,
                    signal: None,
                    reason: "StartError".into(),
                    message: Some(msg.clone()),
                    started_at: 0,
                    finished_at: now_unix(),
                };
                p.last_terminated = Some(term.clone());
                let init = self.ctrs[i].init;
                let restart = if init {
                    self.policy.restarts_init(128)
                } else {
                    self.policy.restarts(128)
                };
                let delay = restart.then(|| self.persist(&name).backoff.on_exit(Duration::ZERO));
                if init && !restart {
                    self.init_failed = true;
                }
                let c = &mut self.ctrs[i];
                c.phase = match delay {
                    Some(d) if !d.is_zero() => CtrPhase::Waiting {
                        reason: "CrashLoopBackOff".into(),
                        message: msg,
                    },
                    _ => CtrPhase::Terminated(term),
                };
                c.next_start = delay.map(|d| now + d.max(Duration::from_secs(1)));
            }
        }
    }

    fn handler_action(&self, i: usize, h: &LifecycleHandler) -> Option<ProbeAction> {
        probe::action_of(
            h.exec.as_ref(),
            h.http_get.as_ref(),
            h.tcp_socket.as_ref(),
            &self.ctrs[i].spec,
        )
        .ok()
    }

    fn run_action(&self, action: &ProbeAction, pid: i32, timeout: Duration) -> Outcome {
        let ip = IpAddr::V4(self.rec.ip);
        match action {
            ProbeAction::Exec(argv) => {
                match crate::exec::run(pid, argv, &self.exec_cgroups(pid), timeout) {
                    Ok(o) if o.code == Some(0) => Outcome {
                        ok: true,
                        message: String::new(),
                    },
                    Ok(o) if o.timed_out => Outcome {
                        ok: false,
                        message: format!("command {argv:?} timed out after {timeout:?}"),
                    },
                    Ok(o) => Outcome {
                        ok: false,
                        message: format!(
                            "command {argv:?} exited with {:?}: {}",
                            o.code,
                            String::from_utf8_lossy(&o.stdout).trim()
                        ),
                    },
                    Err(e) => Outcome {
                        ok: false,
                        message: e.to_string(),
                    },
                }
            }
            ProbeAction::Http {
                host,
                port,
                path,
                https,
                headers,
            } => probe::http_get(ip, host.as_deref(), *port, path, *https, headers, timeout),
            ProbeAction::Tcp { host, port } => {
                probe::tcp_connect(ip, host.as_deref(), *port, timeout)
            }
        }
    }

    fn exec_cgroups(&self, pid: i32) -> Vec<PathBuf> {
        let Some(cg) = &self.inner.cgroups else {
            return vec![];
        };
        self.ctrs
            .iter()
            .find(|c| c.current.as_ref().is_some_and(|r| r.pid == pid))
            .map(|c| cg.dirs(&self.rec.uid, &c.spec.name))
            .unwrap_or_default()
    }

    fn post_start(&mut self, i: usize, pid: i32) {
        let Some(h) = self.ctrs[i]
            .spec
            .lifecycle
            .as_ref()
            .and_then(|l| l.post_start.clone())
        else {
            return;
        };
        let name = self.ctrs[i].spec.name.clone();
        let Some(action) = self.handler_action(i, &h) else {
            return;
        };
        let out = self.run_action(&action, pid, Duration::from_secs(30));
        if !out.ok {
            self.event(
                true,
                "FailedPostStartHook",
                Some(&name),
                format!("PostStartHook failed: {}", out.message),
            );
            self.event(
                false,
                "Killing",
                Some(&name),
                format!("FailedPostStartHook: stopping container {name}"),
            );
            self.signal(&name, libc::SIGKILL);
        }
    }

    fn grace(&self) -> Duration {
        let o = self.sh.state.lock().unwrap().grace_override;
        let g = o
            .or_else(|| {
                self.rec
                    .pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .max(0);
        Duration::from_secs(g as u64)
    }

    fn signal(&self, name: &str, signal: i32) {
        let _ = shim::call(
            self.pod_dir(),
            &Request::Signal {
                name: name.into(),
                signal,
            },
            Duration::from_secs(2),
        );
    }

    /// preStop then SIGTERM now; SIGKILL at the end of the grace period (see
    /// `kill_progress`). Used for liveness/startup failures.
    fn kill(&mut self, i: usize, why: String, probe_grace: Option<i64>) {
        let name = self.ctrs[i].spec.name.clone();
        self.event(
            false,
            "Killing",
            Some(&name),
            format!("Container {name} {why}, will be restarted"),
        );
        // A probe's own terminationGracePeriodSeconds wins over the pod's.
        let grace =
            probe_grace.map_or_else(|| self.grace(), |g| Duration::from_secs(g.max(0) as u64));
        let start = Instant::now();
        if let Some(pid) = self.ctrs[i].current.as_ref().map(|r| r.pid) {
            self.pre_stop(i, pid, grace);
        }
        self.signal(&name, libc::SIGTERM);
        self.ctrs[i].kill_deadline = Some(start + grace);
        self.ctrs[i].ready = false;
    }

    fn pre_stop(&self, i: usize, pid: i32, grace: Duration) {
        let Some(h) = self.ctrs[i]
            .spec
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.clone())
        else {
            return;
        };
        if let Some(a) = self.handler_action(i, &h) {
            let out = self.run_action(&a, pid, grace.max(Duration::from_secs(1)));
            if !out.ok {
                let name = &self.ctrs[i].spec.name;
                self.event(
                    true,
                    "FailedPreStopHook",
                    Some(name),
                    format!("PreStopHook failed: {}", out.message),
                );
            }
        }
    }

    fn kill_progress(&mut self, i: usize, now: Instant) {
        let c = &self.ctrs[i];
        if let Some(d) = c.kill_deadline
            && now >= d
            && c.current.as_ref().is_some_and(|r| r.exit.is_none())
        {
            let name = c.spec.name.clone();
            self.signal(&name, libc::SIGKILL);
            self.ctrs[i].kill_deadline = None;
        }
    }

    fn probe(&mut self, i: usize) {
        let c = &self.ctrs[i];
        let Some(r) = c.current.clone() else { return };
        if r.exit.is_some() || c.kill_deadline.is_some() {
            return;
        }
        let since = c.started_mono.elapsed();
        let name = c.spec.name.clone();
        // Startup gates the other two.
        if !c.started {
            let Some((a, st)) = c.startup.clone() else {
                return;
            };
            if !st.due(since) {
                return;
            }
            let out = self.run_action(&a, r.pid, st.timing.timeout);
            if !out.ok {
                self.event(
                    true,
                    "Unhealthy",
                    Some(&name),
                    format!("Startup probe failed: {}", out.message),
                );
            }
            let c = &mut self.ctrs[i];
            let (_, st) = c.startup.as_mut().expect("startup probe");
            match st.record(since, out.ok) {
                Some(true) => c.started = true,
                Some(false) => {
                    let g = c
                        .spec
                        .startup_probe
                        .as_ref()
                        .and_then(|p| p.termination_grace_period_seconds);
                    self.kill(i, "failed startup probe".into(), g)
                }
                None => {}
            }
            return;
        }
        if let Some((a, st)) = self.ctrs[i].liveness.clone()
            && st.due(since)
        {
            let out = self.run_action(&a, r.pid, st.timing.timeout);
            if !out.ok {
                self.event(
                    true,
                    "Unhealthy",
                    Some(&name),
                    format!("Liveness probe failed: {}", out.message),
                );
            }
            let (_, st) = self.ctrs[i].liveness.as_mut().expect("liveness probe");
            if st.record(since, out.ok) == Some(false) {
                let g = self.ctrs[i]
                    .spec
                    .liveness_probe
                    .as_ref()
                    .and_then(|p| p.termination_grace_period_seconds);
                self.kill(i, "failed liveness probe".into(), g);
                return;
            }
        }
        match self.ctrs[i].readiness.clone() {
            None => self.ctrs[i].ready = true,
            Some((a, st)) => {
                if st.due(since) {
                    let out = self.run_action(&a, r.pid, st.timing.timeout);
                    if !out.ok {
                        self.event(
                            true,
                            "Unhealthy",
                            Some(&name),
                            format!("Readiness probe failed: {}", out.message),
                        );
                    }
                    let c = &mut self.ctrs[i];
                    let (_, st) = c.readiness.as_mut().expect("readiness probe");
                    if let Some(v) = st.record(since, out.ok) {
                        c.ready = v;
                    }
                }
            }
        }
    }

    fn sandbox_lost(&mut self) {
        self.event(
            true,
            "SandboxChanged",
            None,
            "Pod sandbox (shim) is gone; it will be killed and re-created".into(),
        );
        if !self.rec.host_if.is_empty() {
            let _ = self.inner.net.teardown(&self.rec.host_if, self.rec.ip);
        }
        self.reset_for_new_sandbox();
        self.sandbox_ready = false;
        self.sandbox_retry_at = Instant::now();
        self.compute_status();
    }

    /// The containers' shim is gone (killed, or the node rebooted under a stopped
    /// agent): what ran is lost. As the kubelet does on a sandbox change: running
    /// containers count as terminated (ContainerStatusUnknown) and restart per the
    /// restart policy; init containers run again unless the pod is already terminal.
    fn reset_for_new_sandbox(&mut self) {
        self.sh.state.lock().unwrap().pids.clear();
        let terminal = matches!(
            self.sh.state.lock().unwrap().status.phase.as_deref(),
            Some("Succeeded" | "Failed")
        );
        let now = Instant::now();
        let mut any_restart = false;
        for c in &mut self.ctrs {
            let p = self.rec.containers.entry(c.spec.name.clone()).or_default();
            let was_running =
                p.seen_instance > p.handled_instance || matches!(c.phase, CtrPhase::Running { .. });
            // The new shim numbers instances from 1 again.
            p.handled_instance = 0;
            p.seen_instance = 0;
            if was_running {
                let t = TermInfo {
                    exit_code: 137,
                    signal: Some(9),
                    reason: "ContainerStatusUnknown".into(),
                    message: Some(
                        "The container could not be located when the pod was terminated".into(),
                    ),
                    started_at: c.current.as_ref().map_or(0, |r| r.started_at),
                    finished_at: now_unix(),
                };
                p.last_terminated = Some(t.clone());
                c.phase = CtrPhase::Terminated(t);
                let restart = !c.init && self.policy.restarts(137);
                any_restart |= restart;
                c.next_start = restart.then_some(now);
            }
            c.current = None;
            c.probe_instance = 0;
            c.ready = false;
        }
        let n_init = self.ctrs.iter().filter(|c| c.init).count();
        if n_init > 0 && !terminal && (any_restart || self.rec.init_done < n_init) {
            self.rec.init_done = 0;
            for c in self.ctrs.iter_mut().filter(|c| c.init) {
                c.next_start = None;
                c.phase = CtrPhase::Waiting {
                    reason: "PodInitializing".into(),
                    message: String::new(),
                };
            }
            self.init_rerun = true;
        }
        self.dirty = true;
    }

    // ---------------------------------------------------------- status

    fn compute_status(&mut self) {
        self.remember_readiness();
        let n_init = self.ctrs.iter().filter(|c| c.init).count();
        let init = if self.init_failed {
            InitProgress::Failed
        } else if self.rec.init_done >= n_init {
            InitProgress::Done
        } else {
            InitProgress::InProgress
        };
        let app: Vec<&Ctr> = self.ctrs.iter().filter(|c| !c.init).collect();
        let cstates: Vec<CState> = app
            .iter()
            .map(|c| {
                if self.shim_failures > 0 {
                    return CState::Unknown;
                }
                match &c.phase {
                    CtrPhase::Running { .. } => CState::Running,
                    CtrPhase::Terminated(t) if c.next_start.is_none() => CState::Terminated {
                        exit_code: t.exit_code,
                    },
                    _ => CState::Waiting {
                        ran_before: self
                            .rec
                            .containers
                            .get(&c.spec.name)
                            .is_some_and(|p| p.last_terminated.is_some()),
                    },
                }
            })
            .collect();
        let ph = phase::pod_phase(self.policy, init, &cstates);
        let all_ready = app
            .iter()
            .all(|c| c.ready && matches!(c.phase, CtrPhase::Running { .. }));
        let serving = all_ready && !matches!(ph, Phase::Succeeded | Phase::Failed);
        let (initialized, cready, ready) =
            phase::conditions(init, ph, all_ready && !self.terminating);
        let created = k8s_time(self.rec.created_at);
        let cond = |t: &str, v: bool, reason: Option<&str>| PodCondition {
            type_: t.into(),
            status: if v { "True" } else { "False" }.into(),
            last_transition_time: Some(created.clone()),
            reason: if v { None } else { reason.map(str::to_string) },
            ..Default::default()
        };
        let not_ready_reason = if matches!(ph, Phase::Succeeded | Phase::Failed) {
            "PodCompleted"
        } else {
            "ContainersNotReady"
        };
        let mut conditions = vec![
            cond("PodReadyToStartContainers", self.sandbox_ready, None),
            cond("Initialized", initialized, Some("ContainersNotInitialized")),
            cond("Ready", ready, Some(not_ready_reason)),
            cond("ContainersReady", cready, Some(not_ready_reason)),
            cond("PodScheduled", true, None),
        ];
        // Keep transition times of unchanged conditions; stamp changed ones now.
        {
            let st = self.sh.state.lock().unwrap();
            for c in &mut conditions {
                let prev = st
                    .status
                    .conditions
                    .iter()
                    .flatten()
                    .find(|p| p.type_ == c.type_);
                c.last_transition_time = match prev {
                    Some(p) if p.status == c.status => p.last_transition_time.clone(),
                    Some(_) => Some(k8s_time_now()),
                    None => c.last_transition_time.clone(),
                };
            }
        }
        let cs = |c: &Ctr| -> ContainerStatus {
            let p = self
                .rec
                .containers
                .get(&c.spec.name)
                .cloned()
                .unwrap_or_default();
            let term = |t: &TermInfo| ContainerStateTerminated {
                exit_code: t.exit_code,
                signal: t.signal,
                reason: Some(t.reason.clone()),
                message: t.message.clone(),
                started_at: Some(k8s_time(t.started_at)),
                finished_at: Some(k8s_time(t.finished_at)),
                container_id: None,
            };
            let state = match &c.phase {
                CtrPhase::Running { started_at } => ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(k8s_time(*started_at)),
                    }),
                    ..Default::default()
                },
                CtrPhase::Waiting { reason, message } => ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.clone()),
                        message: (!message.is_empty()).then(|| message.clone()),
                    }),
                    ..Default::default()
                },
                CtrPhase::Terminated(t) => ContainerState {
                    terminated: Some(term(t)),
                    ..Default::default()
                },
            };
            // lastState is the previous run's end when the current state is not it.
            let last_state = match (&c.phase, &p.last_terminated) {
                (CtrPhase::Terminated(_), _) | (_, None) => None,
                (_, Some(t)) => Some(ContainerState {
                    terminated: Some(term(t)),
                    ..Default::default()
                }),
            };
            let running = matches!(c.phase, CtrPhase::Running { .. });
            ContainerStatus {
                name: c.spec.name.clone(),
                image: c.spec.image.clone().unwrap_or_else(|| "host".into()),
                image_id: String::new(),
                container_id: c
                    .current
                    .as_ref()
                    .map(|r| format!("vipr://{}/{}/{}", self.rec.uid, c.spec.name, r.instance)),
                ready: running && c.ready,
                started: Some(running && c.started),
                restart_count: p.restart_count,
                state: Some(state),
                last_state,
                ..Default::default()
            }
        };
        let ip = self.rec.ip.to_string();
        let status = PodStatus {
            phase: Some(ph.to_string()),
            conditions: Some(conditions),
            pod_ip: self.sandbox_ready.then(|| ip.clone()),
            pod_ips: self.sandbox_ready.then(|| vec![PodIP { ip: ip.clone() }]),
            start_time: Some(created),
            init_container_statuses: (n_init > 0)
                .then(|| self.ctrs.iter().filter(|c| c.init).map(cs).collect()),
            container_statuses: Some(app.iter().map(|c| cs(c)).collect()),
            qos_class: Some(qos_class(&self.rec.pod)),
            message: self.sandbox_error.clone(),
            reason: self
                .sandbox_error
                .as_ref()
                .map(|_| "FailedCreatePodSandBox".to_string()),
            ..Default::default()
        };
        let mut st = self.sh.state.lock().unwrap();
        st.status = status;
        st.serving = serving;
    }

    /// Sends the pod's change to the agent when it differs from the last
    /// one sent; returns whether it did.
    fn publish(&mut self) -> bool {
        let st = self.sh.state.lock().unwrap();
        let ready = st
            .status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let change = PodChange {
            key: self.rec.key.clone(),
            uid: self.rec.uid.clone(),
            ip: st.status.pod_ip.as_ref().and_then(|s| s.parse().ok()),
            ready,
            serving: st.serving,
            terminating: self.terminating,
            phase: st.status.phase.clone().unwrap_or_default(),
            deleted: false,
        };
        drop(st);
        if self.last_change.as_ref() == Some(&change) {
            return false;
        }
        let _ = self.inner.tx.send(change.clone());
        self.last_change = Some(change);
        true
    }

    // ---------------------------------------------------------- deletion

    fn terminate_pod(mut self) {
        let grace = self.grace();
        let deadline = Instant::now() + grace;
        let dir = self.pod_dir().to_path_buf();
        // Not Ready from the first moment of deletion, but still serving until its
        // containers exit: endpoints keep it as terminating+serving meanwhile.
        self.terminating = true;
        if self.sandbox_ready {
            self.compute_status();
        }
        self.publish();
        let running: Vec<(usize, i32)> = self
            .ctrs
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                c.current
                    .as_ref()
                    .filter(|r| r.exit.is_none())
                    .map(|r| (i, r.pid))
            })
            .collect();
        for (i, pid) in &running {
            let name = self.ctrs[*i].spec.name.clone();
            self.event(
                false,
                "Killing",
                Some(&name),
                format!("Stopping container {name}"),
            );
            self.pre_stop(*i, *pid, deadline.saturating_duration_since(Instant::now()));
        }
        for (i, _) in &running {
            let name = self.ctrs[*i].spec.name.clone();
            self.signal(&name, libc::SIGTERM);
        }
        while Instant::now() < deadline {
            let recs = match shim::call(&dir, &Request::Status, Duration::from_secs(2)) {
                Ok(Response::Status(r)) => r,
                _ => break,
            };
            if recs.values().all(|c| c.exit.is_some()) {
                break;
            }
            // A container that exited stops serving.
            let mut changed = false;
            for c in &mut self.ctrs {
                if c.ready && recs.get(&c.spec.name).is_some_and(|r| r.exit.is_some()) {
                    c.ready = false;
                    changed = true;
                }
            }
            if changed {
                self.compute_status();
                self.publish();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for c in &mut self.ctrs {
            c.ready = false;
        }
        if self.sandbox_ready {
            self.compute_status();
        }
        self.publish();
        // Shutdown SIGKILLs what is left; the shim exits once all are reaped.
        let shim_pid = self.sh.state.lock().unwrap().shim_pid;
        let _ = shim::call(&dir, &Request::Shutdown, Duration::from_secs(2));
        if let Some(pid) = shim_pid {
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until
                && Path::new(&format!("/proc/{pid}")).exists()
                && !is_zombie(pid)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            if Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
                // SAFETY: kill(2) of the shim we started (verified via its socket).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if self.rec.host_if.is_empty() {
            // hostNetwork: nothing to tear down.
        } else if let Err(e) = self.inner.net.teardown(&self.rec.host_if, self.rec.ip) {
            tracing::warn!(pod = %self.rec.key, %e, "network teardown");
        }
        if let Some(vols) = &self.volumes {
            for (name, v) in vols {
                if v.node_tmpfs {
                    let _ = nix::mount::umount2(
                        &dir.join("volumes").join(name),
                        nix::mount::MntFlags::MNT_DETACH,
                    );
                }
            }
        }
        // Volumes from a previous agent run may still be mounted (adoption).
        if let Ok(rd) = std::fs::read_dir(dir.join("volumes")) {
            for e in rd.flatten() {
                if is_mountpoint(&e.path()) {
                    let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
        if let Some(cg) = &self.inner.cgroups {
            cg.remove_pod(&self.rec.uid);
        }
        if let Err(e) = self.inner.ipam.lock().unwrap().release(&self.rec.uid) {
            tracing::warn!(pod = %self.rec.key, %e, "release IP");
        }
        let _ = std::fs::remove_dir_all(&dir);
        self.inner.pods.lock().unwrap().remove(&self.rec.key);
        let _ = self.inner.tx.send(PodChange {
            key: self.rec.key.clone(),
            uid: self.rec.uid.clone(),
            ip: None,
            ready: false,
            serving: false,
            terminating: true,
            phase: "Deleted".into(),
            deleted: true,
        });
        let mut st = self.sh.state.lock().unwrap();
        st.gone = true;
        self.sh.gone_cv.notify_all();
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('Z')))
        .unwrap_or(true)
}

fn is_mountpoint(p: &Path) -> bool {
    let Ok(m) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let p = p.to_string_lossy();
    m.lines().any(|l| l.split(' ').nth(4) == Some(&*p))
}

/// Kubernetes QoS class from requests and limits.
pub fn qos_class(pod: &Pod) -> String {
    let Some(spec) = &pod.spec else {
        return "BestEffort".into();
    };
    let mut any = false;
    let mut guaranteed = true;
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let r = c.resources.as_ref();
        let lim = r.and_then(|r| r.limits.as_ref());
        let req = r.and_then(|r| r.requests.as_ref());
        if lim.is_some_and(|l| !l.is_empty()) || req.is_some_and(|q| !q.is_empty()) {
            any = true;
        }
        for res in ["cpu", "memory"] {
            let l = lim.and_then(|l| l.get(res));
            let q = req.and_then(|q| q.get(res)).or(l);
            if l.is_none() || q != l {
                guaranteed = false;
            }
        }
    }
    if !any {
        "BestEffort".into()
    } else if guaranteed {
        "Guaranteed".into()
    } else {
        "Burstable".into()
    }
}
