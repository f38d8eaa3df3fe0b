//! The end-to-end harness: network namespaces, veth pairs and code run inside
//! a namespace, each removed again when its guard drops (also on panic).
//!
//! Names carry a per-test prefix built from the test's tag and the process
//! id, so tests running in parallel, or a rerun while a crashed run's
//! leftovers linger, never collide. Nothing here touches the machine's own
//! namespace beyond creating and deleting named namespaces.

use std::{
    fs::File,
    net::Ipv4Addr,
    os::fd::AsFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail, ensure};

/// Fails the calling test with a clear message when not run as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "end-to-end tests create namespaces and load eBPF: run as root"
    );
}

/// A short unique name stem: `v<tag><pid><n>`, at most 11 characters, which
/// leaves room for a 4-character suffix within the 15-byte interface limit.
pub fn unique_prefix(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tag: String = tag
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(3)
        .collect();
    format!("v{tag}{}{n}", std::process::id() % 100_000)
}

/// Runs a command, failing with its output when it does not succeed.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let output = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// A named network namespace, deleted (with every process in it) on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A guard for a namespace that already exists (one a killed process
    /// left behind), if it does.
    pub fn existing(name: impl Into<String>) -> Option<Self> {
        let name = name.into();
        std::path::Path::new("/run/netns")
            .join(&name)
            .exists()
            .then_some(Netns { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Kills every process in the namespace and waits (at most 2 s) until
    /// they are gone.
    pub fn kill_processes(&self) {
        let pids = || {
            Command::new("ip")
                .args(["netns", "pids", &self.name])
                .output()
                .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                .unwrap_or_default()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let listed = pids();
            if listed.trim().is_empty() || std::time::Instant::now() > deadline {
                return;
            }
            for pid in listed.split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).output();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// A command that runs inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// A command that runs inside this namespace's network only, keeping the
    /// host's mounts (`ip netns exec` remounts /sys, which hides the cgroup
    /// and bpf file systems).
    pub fn net_command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name))
            .arg(program);
        cmd
    }

    /// `ip ARGS` inside this namespace.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Sets a per-namespace sysctl (e.g. `net.ipv4.ip_forward`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(self
            .command("sysctl")
            .args(["-qw", &format!("{key}={value}")]))?;
        Ok(())
    }

    /// Runs `f` on a thread that has entered this namespace, so sockets it
    /// opens and netlink calls it makes happen here.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("opening netns {}", self.name))?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<T> {
                    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .context("setns")?;
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
        })
    }

    /// Like [`Netns::enter`] but on a background thread the caller joins.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<T>>> {
        spawn_in_netns(std::path::Path::new("/run/netns").join(&self.name), f)
    }
}

/// Runs `f` on a background thread that has entered the network namespace
/// at `path` (a `/run/netns/NAME` or `/proc/PID/ns/net` file), e.g. a pod's.
pub fn spawn_in_netns<T: Send + 'static>(
    path: impl AsRef<std::path::Path>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<T>>> {
    let path = path.as_ref();
    let file = File::open(path).with_context(|| format!("opening netns {}", path.display()))?;
    Ok(std::thread::spawn(move || -> Result<T> {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(f())
    }))
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes left in the namespace would keep it alive.
        self.kill_processes();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// One end of a veth pair with an address.
pub struct VethEnd<'a> {
    pub ns: &'a Netns,
    pub ifname: String,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

/// Creates a veth pair between two namespaces, addresses and raises both
/// ends. Deleting either namespace removes the pair.
pub fn veth_pair(a: &VethEnd<'_>, b: &VethEnd<'_>) -> Result<()> {
    ensure!(
        a.ifname.len() <= 15 && b.ifname.len() <= 15,
        "interface names over 15 bytes"
    );
    a.ns.ip(&[
        "link",
        "add",
        &a.ifname,
        "type",
        "veth",
        "peer",
        "name",
        &b.ifname,
        "netns",
        b.ns.name(),
    ])?;
    for end in [a, b] {
        let cidr = format!("{}/{}", end.addr, end.prefix_len);
        end.ns.ip(&["addr", "add", &cidr, "dev", &end.ifname])?;
        end.ns.ip(&["link", "set", &end.ifname, "up"])?;
    }
    Ok(())
}

pub mod agent;
pub mod leftovers;
pub mod maps;

/// A folder on bpffs (`/sys/fs/bpf/<name>`) for one test's pinned maps and
/// links, removed with everything in it on drop.
pub struct BpfPinDir {
    path: std::path::PathBuf,
}

impl BpfPinDir {
    /// Creates `/sys/fs/bpf/<name>`; fails when bpffs is not mounted there.
    pub fn new(name: &str) -> Result<Self> {
        let root = std::path::Path::new("/sys/fs/bpf");
        let statfs = nix::sys::statfs::statfs(root).context("statfs /sys/fs/bpf")?;
        ensure!(
            statfs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC,
            "bpffs is not mounted at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)"
        );
        let path = root.join(name);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(BpfPinDir { path })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for BpfPinDir {
    fn drop(&mut self) {
        // Unlinking a pin drops the kernel object once nothing else holds it.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A backend that tells each client the address it saw: TCP on 8080 (one
/// line in, `peer=IP:PORT` out) and UDP on 5353 (any datagram in, the same
/// answer out). Runs in `ns` until `stop` is set or 90 s pass.
pub fn spawn_peer_echo(
    ns: &Netns,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::thread::JoinHandle<Result<Result<()>>>> {
    use std::io::{BufRead, BufReader, Write};
    use std::time::{Duration, Instant};
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = ns.spawn(move || -> Result<()> {
        let tcp = std::net::TcpListener::bind("0.0.0.0:8080")?;
        let udp = std::net::UdpSocket::bind("0.0.0.0:5353")?;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(20)))?;
        ready_tx.send(()).ok();
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut buf = [0u8; 512];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            if let Ok((mut conn, peer)) = tcp.accept() {
                conn.set_nonblocking(false)?;
                conn.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut line = String::new();
                BufReader::new(conn.try_clone()?).read_line(&mut line)?;
                writeln!(conn, "peer={peer}")?;
            }
            if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                udp.send_to(format!("peer={peer}").as_bytes(), peer)?;
            }
        }
        Ok(())
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("the echo backend did not start")?;
    Ok(handle)
}
