//! The per-pod shim: a small, single-threaded process that holds the pod's network
//! and UTS namespaces (the "pause" role) and is the parent of the pod's containers.
//!
//! Why a shim: containers must survive the agent (an agent restart adopts running pods
//! without restarting them), so they cannot be the agent's children. The agent
//! re-executes its own binary with a hidden argument; that binary calls [`main`]. The
//! shim double-forks (so it is reparented away from the agent at once), unshares net
//! and UTS, sets the hostname, and serves JSON-line requests on `<pod_dir>/shim.sock`:
//! start a container, signal one, report status, shut down. It reaps its children and
//! keeps their exit status until the agent asks. If the shim dies its containers get
//! SIGKILL (PR_SET_PDEATHSIG): a pod without its sandbox is gone.
//!
//! Being single-threaded matters: after `fork` the container child can allocate, open
//! files and mount freely before `execve`, which a multi-threaded agent could not.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The hidden first argument the agent binary dispatches on to [`main`].
pub const SHIM_ARG: &str = "__pod-shim";
pub const SOCKET: &str = "shim.sock";
pub const PIDFILE: &str = "shim.pid";

/// How one mount is made inside the container's mount namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MountKind {
    Bind,
    Tmpfs { size: Option<u64> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MountSpec {
    pub kind: MountKind,
    pub source: PathBuf,
    /// Absolute path inside the container.
    pub target: String,
    pub readonly: bool,
    /// Bind a single file (the target is created as a file, not a folder).
    pub file: bool,
}

/// Everything the shim needs to start one container instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub name: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// None = the node's filesystem (`image: host`).
    pub rootfs: Option<PathBuf>,
    pub mounts: Vec<MountSpec>,
    /// stdout and stderr both go here, appended (one file per container, all restarts).
    pub log: PathBuf,
    /// cgroup folders to join before exec (v2 and any v1 controller folders).
    pub cgroups: Vec<PathBuf>,
    /// For `image: host`: an empty folder (in the pod folder) where the container's
    /// view of the node's root is assembled in memory, so mount points that do not
    /// exist on the node are never created on the node's disk.
    #[serde(default)]
    pub host_root: Option<PathBuf>,
    /// securityContext runAsUser / runAsGroup / supplementalGroups.
    #[serde(default)]
    pub run_as_user: Option<u32>,
    #[serde(default)]
    pub run_as_group: Option<u32>,
    #[serde(default)]
    pub supplemental_groups: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    Hello,
    Start(Box<LaunchSpec>),
    Signal {
        name: String,
        signal: i32,
    },
    Status,
    /// SIGKILL every container and exit.
    Shutdown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub code: i32,
    pub signal: Option<i32>,
    pub finished_at: i64,
}

/// The latest instance of one container as the shim knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CtrRecord {
    pub pid: i32,
    /// Counts starts of this container name (1 = first), so the agent can tell a
    /// new exit from one it already handled.
    pub instance: u64,
    pub started_at: i64,
    pub exit: Option<ExitInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    Hello { pid: i32 },
    Started { pid: i32, instance: u64 },
    Ok,
    Status(BTreeMap<String, CtrRecord>),
    Error(String),
}

// ---------------------------------------------------------------- client side

/// Talk to the shim of the pod in `pod_dir`: one request per connection.
pub fn call(pod_dir: &Path, req: &Request, timeout: Duration) -> Result<Response> {
    let path = pod_dir.join(SOCKET);
    let io = |e: std::io::Error| Error::Shim(format!("{}: {e}", path.display()));
    let mut s = UnixStream::connect(&path).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(req).expect("request serializes");
    line.push(b'\n');
    s.write_all(&line).map_err(io)?;
    let mut resp = String::new();
    BufReader::new(s).read_line(&mut resp).map_err(io)?;
    match serde_json::from_str(&resp) {
        Ok(Response::Error(e)) => Err(Error::Shim(e)),
        Ok(r) => Ok(r),
        Err(e) => Err(Error::Shim(format!("bad response {resp:?}: {e}"))),
    }
}

// ---------------------------------------------------------------- shim side

/// Entry point of the hidden `shim` command:
/// `args` = `[--host-network] POD_DIR HOSTNAME [CGROUP...]`.
/// With `--host-network` the shim keeps the node's net and UTS namespaces.
/// The shim moves itself into the CGROUP folders so that stopping the agent's own
/// service cgroup (systemd) does not take the pods with it.
/// Returns the process exit code of the first (short-lived) process; the long-lived
/// shim never returns.
pub fn main(args: &[String]) -> i32 {
    let (host_network, args) = match args.first().map(String::as_str) {
        Some("--host-network") => (true, &args[1..]),
        _ => (false, args),
    };
    let [pod_dir, hostname, cgroups @ ..] = args else {
        eprintln!("usage: <shim> POD_DIR HOSTNAME [CGROUP_DIR...]");
        return 2;
    };
    for cg in cgroups {
        if let Err(e) = std::fs::write(Path::new(cg).join("cgroup.procs"), "0") {
            eprintln!("join cgroup {cg}: {e}");
            return 1;
        }
    }
    let pod_dir = PathBuf::from(pod_dir);
    // Readiness pipe: the grandchild writes "ok" or an error once it serves requests.
    let (rd, wr) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pipe: {e}");
            return 1;
        }
    };
    // SAFETY: the caller is the freshly exec'd shim binary; nothing else runs yet
    // that a fork could leave in a bad state.
    match unsafe { nix::unistd::fork() } {
        Err(e) => {
            eprintln!("fork: {e}");
            1
        }
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            drop(wr);
            let mut msg = String::new();
            let _ = std::fs::File::from(rd).read_to_string(&mut msg);
            if msg == "ok" {
                0
            } else {
                eprintln!("shim failed: {msg}");
                1
            }
        }
        Ok(nix::unistd::ForkResult::Child) => {
            drop(rd);
            let mut wr = std::fs::File::from(wr);
            match setup(&pod_dir, hostname, host_network) {
                Ok(listener) => {
                    let _ = wr.write_all(b"ok");
                    drop(wr);
                    serve(listener);
                    std::process::exit(0)
                }
                Err(e) => {
                    let _ = wr.write_all(e.as_bytes());
                    std::process::exit(1)
                }
            }
        }
    }
}

fn setup(
    pod_dir: &Path,
    hostname: &str,
    host_network: bool,
) -> std::result::Result<UnixListener, String> {
    use nix::sched::{CloneFlags, unshare};
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    if !host_network {
        unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWUTS)
            .map_err(|e| format!("unshare(net, uts): {e}"))?;
        nix::unistd::sethostname(hostname).map_err(|e| format!("sethostname: {e}"))?;
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    // stdio: nothing reads our output; keep a log for post-mortems.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(pod_dir.join("shim.log"))
        .map_err(|e| format!("shim.log: {e}"))?;
    let null = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    // SAFETY: dup2 on fds we own onto the standard descriptors.
    unsafe {
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(log.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
    }
    let sock = pod_dir.join(SOCKET);
    let _ = std::fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).map_err(|e| format!("bind {}: {e}", sock.display()))?;
    std::fs::write(pod_dir.join(PIDFILE), std::process::id().to_string())
        .map_err(|e| format!("pidfile: {e}"))?;
    Ok(listener)
}

struct Shim {
    ctrs: BTreeMap<String, CtrRecord>,
    shutting_down: bool,
}

fn serve(listener: UnixListener) {
    // SIGCHLD arrives through a signalfd so one poll() waits for both requests and
    // exits: an idle shim sleeps without timers.
    let mut mask = nix::sys::signal::SigSet::empty();
    mask.add(nix::sys::signal::Signal::SIGCHLD);
    let _ = mask.thread_block();
    let sfd = nix::sys::signalfd::SignalFd::with_flags(
        &mask,
        nix::sys::signalfd::SfdFlags::SFD_NONBLOCK | nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
    )
    .expect("signalfd");
    let mut shim = Shim {
        ctrs: BTreeMap::new(),
        shutting_down: false,
    };
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfd.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                2,
                if shim.shutting_down { 50 } else { 60_000 },
            )
        };
        while let Ok(Some(_)) = sfd.read_signal() {}
        shim.reap();
        if fds[0].revents & libc::POLLIN != 0
            && let Ok((conn, _)) = listener.accept()
        {
            shim.handle(conn);
        }
        if shim.shutting_down && shim.ctrs.values().all(|c| c.exit.is_some()) {
            return;
        }
    }
}

impl Shim {
    fn reap(&mut self) {
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.exited(pid.as_raw(), code, None),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.exited(pid.as_raw(), 128 + sig as i32, Some(sig as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    }

    fn exited(&mut self, pid: i32, code: i32, signal: Option<i32>) {
        for c in self.ctrs.values_mut() {
            if c.pid == pid && c.exit.is_none() {
                c.exit = Some(ExitInfo {
                    code,
                    signal,
                    finished_at: crate::util::now_unix(),
                });
            }
        }
    }

    fn handle(&mut self, conn: UnixStream) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let mut line = String::new();
        let mut rd = BufReader::new(&conn);
        if rd.read_line(&mut line).is_err() {
            return;
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::Error(format!("bad request: {e}")),
            Ok(Request::Hello) => Response::Hello {
                pid: std::process::id() as i32,
            },
            Ok(Request::Status) => Response::Status(self.ctrs.clone()),
            Ok(Request::Signal { name, signal }) => match self.ctrs.get(&name) {
                Some(c) if c.exit.is_none() => {
                    // SAFETY: plain kill(2) of our own child.
                    unsafe { libc::kill(c.pid, signal) };
                    Response::Ok
                }
                _ => Response::Ok,
            },
            Ok(Request::Shutdown) => {
                self.shutting_down = true;
                for c in self.ctrs.values().filter(|c| c.exit.is_none()) {
                    // SAFETY: plain kill(2) of our own child.
                    unsafe { libc::kill(c.pid, libc::SIGKILL) };
                }
                Response::Ok
            }
            Ok(Request::Start(spec)) => {
                if self.ctrs.get(&spec.name).is_some_and(|c| c.exit.is_none()) {
                    Response::Error(format!("container {} is already running", spec.name))
                } else {
                    match spawn_container(&spec) {
                        Ok(pid) => {
                            let instance = self.ctrs.get(&spec.name).map_or(0, |c| c.instance) + 1;
                            self.ctrs.insert(
                                spec.name.clone(),
                                CtrRecord {
                                    pid,
                                    instance,
                                    started_at: crate::util::now_unix(),
                                    exit: None,
                                },
                            );
                            Response::Started { pid, instance }
                        }
                        Err(e) => Response::Error(e),
                    }
                }
            }
        };
        let mut out = serde_json::to_vec(&resp).expect("response serializes");
        out.push(b'\n');
        let _ = (&conn).write_all(&out);
    }
}

/// Fork and exec one container. Errors in the child before exec come back through a
/// close-on-exec pipe (EOF without data = exec succeeded), like std's Command does.
fn spawn_container(spec: &LaunchSpec) -> std::result::Result<i32, String> {
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| e.to_string())?;
    // SAFETY: the shim is single-threaded, so the child may do anything before exec.
    match unsafe { nix::unistd::fork() }.map_err(|e| e.to_string())? {
        nix::unistd::ForkResult::Child => {
            drop(rd);
            let err = child_setup_and_exec(spec);
            let mut w = std::fs::File::from(wr);
            let _ = w.write_all(err.as_bytes());
            // SAFETY: leave the forked child without running the shim's destructors.
            unsafe { libc::_exit(127) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(wr);
            let mut msg = String::new();
            let _ = std::fs::File::from(rd).read_to_string(&mut msg);
            if msg.is_empty() {
                Ok(child.as_raw())
            } else {
                let _ = nix::sys::wait::waitpid(child, None);
                Err(msg)
            }
        }
    }
}

fn cstr(s: &str) -> std::result::Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"))
}

/// Runs in the forked child; returns only on failure, with the reason.
fn child_setup_and_exec(spec: &LaunchSpec) -> String {
    match child_inner(spec) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

fn child_inner(spec: &LaunchSpec) -> std::result::Result<Never, String> {
    use nix::mount::{MsFlags, mount};
    let none: Option<&str> = None;
    // SAFETY: prctl/sigprocmask are plain syscalls on this (the child) process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
    }
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    for cg in &spec.cgroups {
        std::fs::write(cg.join("cgroup.procs"), "0")
            .map_err(|e| format!("join cgroup {}: {e}", cg.display()))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .map_err(|e| format!("open log {}: {e}", spec.log.display()))?;
    let null = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;

    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("unshare(mount): {e}"))?;
    // Slave: the node's later mounts still appear, ours never leak back to the node.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_SLAVE, none)
        .map_err(|e| format!("make / rslave: {e}"))?;
    let (root, mut ours) = match (&spec.rootfs, &spec.host_root) {
        (Some(r), _) => {
            mount(Some(r), r, none, MsFlags::MS_BIND | MsFlags::MS_REC, none)
                .map_err(|e| format!("bind rootfs {}: {e}", r.display()))?;
            for (src, dst, fstype) in [
                ("proc", "proc", Some("proc")),
                ("/dev", "dev", None),
                ("/sys", "sys", None),
            ] {
                let t = r.join(dst);
                if !t.is_dir() {
                    continue;
                }
                let res = match fstype {
                    Some(fs) => mount(Some(src), &t, Some(fs), MsFlags::empty(), none),
                    None => mount(
                        Some(src),
                        &t,
                        none,
                        MsFlags::MS_BIND | MsFlags::MS_REC,
                        none,
                    ),
                };
                res.map_err(|e| format!("mount {dst}: {e}"))?;
            }
            // The image folder is the pod's own: mount points may be created in it.
            (r.clone(), None)
        }
        (None, Some(h)) => {
            shadow(h, Path::new("/"))?;
            (
                h.clone(),
                Some(std::collections::HashSet::from([h.clone()])),
            )
        }
        (None, None) => (PathBuf::from("/"), None),
    };
    // Mount points first (shadowing a folder hides mounts made inside it), then mounts.
    let mut targets = Vec::with_capacity(spec.mounts.len());
    for m in &spec.mounts {
        let target = ensure_target(&root, &m.target, m.file, ours.as_mut())?;
        targets.push(target);
    }
    for (m, target) in spec.mounts.iter().zip(&targets) {
        match &m.kind {
            MountKind::Bind => {
                mount(
                    Some(&m.source),
                    target,
                    none,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    none,
                )
                .map_err(|e| format!("bind {} on {}: {e}", m.source.display(), m.target))?;
            }
            MountKind::Tmpfs { size } => {
                let opts = size.map(|s| format!("size={s}"));
                mount(
                    Some("tmpfs"),
                    target,
                    Some("tmpfs"),
                    MsFlags::empty(),
                    opts.as_deref(),
                )
                .map_err(|e| format!("tmpfs on {}: {e}", m.target))?;
            }
        }
        if m.readonly {
            mount(
                none,
                target,
                none,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                none,
            )
            .map_err(|e| format!("remount ro {}: {e}", m.target))?;
        }
    }
    if root != Path::new("/") {
        nix::unistd::chroot(&root).map_err(|e| format!("chroot: {e}"))?;
    }
    let cwd = spec.cwd.as_deref().unwrap_or("/");
    std::env::set_current_dir(cwd).map_err(|e| format!("workingDir {cwd}: {e}"))?;

    let path_env = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let Some(arg0) = spec.argv.first() else {
        return Err("no command given".into());
    };
    let prog = find_program(arg0, path_env)
        .ok_or_else(|| format!("exec: {arg0:?}: executable file not found in $PATH"))?;
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| cstr(a))
        .collect::<Result<_, _>>()?;
    let envp: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| cstr(&format!("{k}={v}")))
        .collect::<Result<_, _>>()?;
    let prog_c = cstr(&prog.to_string_lossy())?;
    // Drop privileges last: everything above needed root.
    if spec.run_as_user.is_some() || spec.run_as_group.is_some() {
        let gid = spec.run_as_group.unwrap_or(0);
        let groups: Vec<nix::unistd::Gid> = std::iter::once(gid)
            .chain(spec.supplemental_groups.iter().copied())
            .map(nix::unistd::Gid::from_raw)
            .collect();
        nix::unistd::setgroups(&groups).map_err(|e| format!("setgroups: {e}"))?;
        nix::unistd::setgid(nix::unistd::Gid::from_raw(gid)).map_err(|e| format!("setgid: {e}"))?;
        if let Some(uid) = spec.run_as_user {
            nix::unistd::setuid(nix::unistd::Uid::from_raw(uid))
                .map_err(|e| format!("setuid: {e}"))?;
        }
    }
    // SAFETY: dup2 onto the standard descriptors of this child.
    unsafe {
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(log.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
    }
    let e = nix::unistd::execve(&prog_c, &argv, &envp).unwrap_err();
    // stderr is the log now: say it there too.
    eprintln!("exec {}: {e}", prog.display());
    Err(format!("exec {}: {e}", prog.display()))
}

/// Cover `dst` with a tmpfs holding one bind mount (or symlink copy) per entry of the
/// node folder `src`: the same view, but new entries land in memory.
fn shadow(dst: &Path, src: &Path) -> std::result::Result<(), String> {
    use nix::mount::{MsFlags, mount};
    let none: Option<&str> = None;
    mount(
        Some("tmpfs"),
        dst,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|e| format!("tmpfs on {}: {e}", dst.display()))?;
    let rd = std::fs::read_dir(src).map_err(|e| format!("read {}: {e}", src.display()))?;
    for e in rd.flatten() {
        let (s, d) = (e.path(), dst.join(e.file_name()));
        let Ok(ft) = e.file_type() else { continue };
        // Entries that vanish or refuse a bind (sockets, races) are skipped: the view
        // is best effort outside the paths the container asked for.
        if ft.is_symlink() {
            if let Ok(t) = std::fs::read_link(&s) {
                let _ = std::os::unix::fs::symlink(t, &d);
            }
        } else if ft.is_dir() {
            if std::fs::create_dir(&d).is_ok() {
                let _ = mount(Some(&s), &d, none, MsFlags::MS_BIND | MsFlags::MS_REC, none);
            }
        } else if std::fs::File::create(&d).is_ok() {
            let _ = mount(Some(&s), &d, none, MsFlags::MS_BIND, none);
        }
    }
    Ok(())
}

/// Make sure the mount point `target` exists under `root`. `ours` = folders we may
/// write into (tmpfs we made); None = anywhere (an image folder of the pod). A
/// missing component under a node folder shadows that folder first.
fn ensure_target(
    root: &Path,
    target: &str,
    file: bool,
    ours: Option<&mut std::collections::HashSet<PathBuf>>,
) -> std::result::Result<PathBuf, String> {
    let full = root.join(target.trim_start_matches('/'));
    let Some(ours) = ours else {
        if file {
            if !full.exists() {
                if let Some(p) = full.parent() {
                    std::fs::create_dir_all(p)
                        .map_err(|e| format!("mkdir {}: {e}", p.display()))?;
                }
                std::fs::File::create(&full)
                    .map_err(|e| format!("create {}: {e}", full.display()))?;
            }
        } else {
            std::fs::create_dir_all(&full).map_err(|e| format!("mkdir {}: {e}", full.display()))?;
        }
        return Ok(full);
    };
    let comps: Vec<_> = Path::new(target)
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect();
    let (mut cur, mut host) = (root.to_path_buf(), PathBuf::from("/"));
    for (i, c) in comps.iter().enumerate() {
        let (next, hnext) = (cur.join(c), host.join(c));
        if next.symlink_metadata().is_err() {
            if !ours.contains(&cur) {
                shadow(&cur, &host)?;
                ours.insert(cur.clone());
            }
            if i + 1 == comps.len() && file {
                std::fs::File::create(&next)
                    .map_err(|e| format!("create {}: {e}", next.display()))?;
            } else {
                std::fs::create_dir(&next).map_err(|e| format!("mkdir {}: {e}", next.display()))?;
                ours.insert(next.clone());
            }
        }
        cur = next;
        host = hnext;
    }
    Ok(full)
}

/// `execvp`'s search, but over the container's PATH (glibc would use ours).
pub fn find_program(arg0: &str, path: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if arg0.contains('/') {
        return Some(PathBuf::from(arg0));
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(arg0))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Pid recorded by the shim of `pod_dir`, if it is still alive and still a shim
/// (its socket answers).
pub fn alive_pid(pod_dir: &Path) -> Option<i32> {
    match call(pod_dir, &Request::Hello, Duration::from_secs(2)) {
        Ok(Response::Hello { pid }) => Some(pid),
        _ => None,
    }
}

/// Open a namespace file of `pid` (e.g. "net").
pub fn ns_fd(pid: i32, ns: &str) -> Result<OwnedFd> {
    let p = format!("/proc/{pid}/ns/{ns}");
    let f = std::fs::File::open(&p).map_err(|e| Error::Shim(format!("{p}: {e}")))?;
    // SAFETY: into_raw_fd transfers ownership of a valid fd.
    Ok(unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(f)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_search_uses_given_path() {
        assert_eq!(find_program("/x/y", ""), Some(PathBuf::from("/x/y")));
        let sh = find_program("sh", "/nonexistent:/usr/bin:/bin").unwrap();
        assert!(sh.ends_with("sh"));
        assert_eq!(find_program("sh", "/nonexistent"), None);
    }
}
