//! Socket-level load balancing for clients in the node's own network
//! namespace: the cgroup sock_addr programs attached to a cgroup this test
//! creates, and a client process (this test binary, re-executed) placed in
//! that cgroup and in the test's node namespace.
//!
//!   node ns (client process, 10.244.1.1) ==veth== backend ns (10.244.1.2)
//!                     no XDP anywhere
//!
//! The client dials the VIP 10.96.0.10; its connect() / sendto() is given
//! the backend's address, and UDP replies (and getpeername) show the VIP.
//!
//! Safety: the programs are attached only to `/sys/fs/cgroup/unified/<unique
//! name>`, a cgroup created here and removed on drop (also on failure); the
//! only processes ever put in it are the client children this test spawns.
//! All traffic stays between the two namespaces the test creates.

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use vipr_dataplane::{
    BackendAddr, Counter, Dataplane, DataplaneOptions, ExternalTrafficPolicy, Frontend,
    FrontendOptions, Port, Protocol,
};
use vipr_e2e::{BpfPinDir, Netns, VethEnd, require_root, unique_prefix, veth_pair};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// A frontend programmed with no backend at all.
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client child may run before it is killed.
const CHILD_TIMEOUT: Duration = Duration::from_secs(15);
const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";
/// The environment variable that turns this binary into a client.
const CLIENT_ENV: &str = "VIPR_SOCK_CLIENT";
const RESULT_MARK: &str = "SOCKRESULT ";

/// A cgroup v2 folder of this test's own, removed on drop. Any process
/// still in it (only ever a client child of this test) is killed first.
struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    fn new(name: &str) -> Result<Self> {
        let root = Path::new(CGROUP2_ROOT);
        let statfs = nix::sys::statfs::statfs(root).context("statfs cgroup2 root")?;
        ensure!(
            statfs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC,
            "{CGROUP2_ROOT} is not a cgroup v2 mount"
        );
        let path = root.join(name);
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TestCgroup { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn procs(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for pid in self.procs() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // A killed process leaves the cgroup asynchronously; bounded retry.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove test cgroup {}", self.path.display());
    }
}

struct Rig {
    // Field order is drop order: namespaces go last.
    backend: Netns,
    node: Netns,
}

fn rig(tag: &str) -> Result<(Rig, String)> {
    let prefix = unique_prefix(tag);
    let node = Netns::new(format!("{prefix}-node"))?;
    let backend = Netns::new(format!("{prefix}-be"))?;
    veth_pair(
        &VethEnd {
            ns: &node,
            ifname: format!("{prefix}b"),
            addr: NODE_IP,
            prefix_len: 24,
        },
        &VethEnd {
            ns: &backend,
            ifname: "eth0".into(),
            addr: BACKEND_IP,
            prefix_len: 24,
        },
    )?;
    backend.ip(&["route", "add", "default", "via", &NODE_IP.to_string()])?;
    Ok((Rig { backend, node }, prefix))
}

fn port(p: u16) -> Port {
    Port::new(p).unwrap()
}

/// What a client child reports: `Ok(fields)` or `Err(errno)`.
type ClientResult = std::result::Result<String, i32>;

/// Runs one client operation in a child process (this binary re-executed)
/// inside the node namespace and, when `cgroup` is given, inside that cgroup.
///
/// The child joins both between fork and exec (`pre_exec`), with fds opened
/// here, so the only syscalls it makes there are setns and write: it is
/// single-threaded then, so writing "0" to cgroup.procs moves only itself.
fn run_client(
    rig: &Rig,
    cgroup: Option<&TestCgroup>,
    op: &str,
    to: SocketAddr,
) -> Result<ClientResult> {
    let netns: OwnedFd = File::open(format!("/run/netns/{}", rig.node.name()))?.into();
    let procs: Option<OwnedFd> = cgroup
        .map(|c| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(c.path().join("cgroup.procs"))
        })
        .transpose()?
        .map(Into::into);
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "sock_client_entry",
        "--nocapture",
        "--test-threads=1",
        "--quiet",
    ])
    .env(CLIENT_ENV, format!("{op} {to}"))
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let netns_fd = netns.as_raw_fd();
    let procs_fd = procs.as_ref().map(AsRawFd::as_raw_fd);
    // SAFETY: the closure only makes async-signal-safe syscalls on fds that
    // stay open in the parent until the child has been spawned.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = procs_fd
                && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("spawning the client child")?;
    drop((netns, procs));
    let deadline = Instant::now() + CHILD_TIMEOUT;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("client {op} {to} did not finish in {CHILD_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let Some(line) = stdout.lines().find_map(|l| l.strip_prefix(RESULT_MARK)) else {
        bail!(
            "client {op} {to} reported nothing ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    };
    Ok(match line.strip_prefix("err ") {
        Some(errno) => Err(errno.trim().parse()?),
        None => Ok(line.trim_start_matches("ok ").to_owned()),
    })
}

/// The client side, run in a child process (see [`run_client`]). Without
/// the environment variable set, a normal test run, it does nothing.
#[test]
fn sock_client_entry() {
    let Ok(spec) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let (op, to) = spec.split_once(' ').expect("op and address");
    let to: SocketAddr = to.parse().expect("address");
    let result = match op {
        "tcp" => client_tcp(to),
        "udp" => client_udp(to),
        "udp-connected" => client_udp_connected(to),
        other => panic!("unknown client op {other}"),
    };
    match result {
        Ok(fields) => println!("{RESULT_MARK}ok {fields}"),
        Err(error) => println!("{RESULT_MARK}err {}", error.raw_os_error().unwrap_or(-1)),
    }
}

/// TCP connect, getpeername, one line each way.
fn client_tcp(to: SocketAddr) -> std::io::Result<String> {
    let mut conn = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    let peer = conn.peer_addr()?;
    writeln!(conn, "hello")?;
    let mut reply = String::new();
    BufReader::new(conn).read_line(&mut reply)?;
    Ok(format!("getpeername={peer} reply={}", reply.trim()))
}

/// Unconnected UDP: sendto the address, recvfrom the answer.
fn client_udp(to: SocketAddr) -> std::io::Result<String> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.send_to(b"who am i", to)?;
    let mut buf = [0u8; 512];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok(format!(
        "from={from} reply={}",
        String::from_utf8_lossy(&buf[..n])
    ))
}

/// Connected UDP: connect, send, recvfrom, getpeername.
fn client_udp_connected(to: SocketAddr) -> std::io::Result<String> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.connect(to)?;
    socket.send(b"who am i")?;
    let mut buf = [0u8; 512];
    let (n, from) = socket.recv_from(&mut buf)?;
    let peer = socket.peer_addr()?;
    Ok(format!(
        "from={from} getpeername={peer} reply={}",
        String::from_utf8_lossy(&buf[..n])
    ))
}

fn program_services(dp: &mut Dataplane) -> Result<()> {
    let backend = |p| BackendAddr {
        addr: BACKEND_IP,
        port: port(p),
    };
    for (addr, p, protocol, backends) in [
        (VIP, 80, Protocol::Tcp, vec![backend(8080)]),
        (VIP, 53, Protocol::Udp, vec![backend(5353)]),
        (EMPTY_VIP, 80, Protocol::Tcp, vec![]),
        (EMPTY_VIP, 53, Protocol::Udp, vec![]),
    ] {
        dp.program_service(
            Frontend {
                addr,
                port: port(p),
                protocol,
            },
            &backends,
        )?;
    }
    Ok(())
}

fn tcp_vip() -> SocketAddr {
    SocketAddr::from((VIP, 80))
}

fn udp_vip() -> SocketAddr {
    SocketAddr::from((VIP, 53))
}

/// Asserts a client in the cgroup reaches the VIP over TCP and sees the VIP
/// as its peer, while the backend sees the node's address.
fn assert_tcp_translated(rig: &Rig, cgroup: &TestCgroup) -> Result<()> {
    let fields = run_client(rig, Some(cgroup), "tcp", tcp_vip())?
        .map_err(|errno| anyhow::anyhow!("TCP to the VIP failed: errno {errno}"))?;
    assert!(
        fields.starts_with(&format!("getpeername={VIP}:80 reply=peer={NODE_IP}:")),
        "TCP client: {fields}"
    );
    Ok(())
}

/// Asserts a client's connect to the VIP is left alone: the node namespace
/// has no route there, so it fails at once with ENETUNREACH.
fn assert_untranslated(rig: &Rig, cgroup: Option<&TestCgroup>) -> Result<()> {
    let result = run_client(rig, cgroup, "tcp", tcp_vip())?;
    assert_eq!(result, Err(libc::ENETUNREACH), "untranslated connect");
    Ok(())
}

#[test]
fn node_local_clients_reach_clusterips_through_cgroup_hooks() -> Result<()> {
    require_root();
    let (rig, prefix) = rig("sck")?;
    let cgroup = TestCgroup::new(&prefix)?;
    // Declared after the cgroup: dropped (and detached) before it goes.
    let mut dp = Dataplane::load(&DataplaneOptions::default())?;
    program_services(&mut dp)?;
    dp.attach_cgroup(cgroup.path())?;
    assert_eq!(dp.attached_cgroups(), vec![cgroup.path()]);
    // Attaching again is a no-op.
    dp.attach_cgroup(cgroup.path())?;

    let stop = Arc::new(AtomicBool::new(false));
    let server = vipr_e2e::spawn_peer_echo(&rig.backend, stop.clone())?;

    // TCP: connected to the backend, but getpeername says VIP:80; the backend
    // saw the node's own address (no NAT of the source at all).
    for _ in 0..3 {
        assert_tcp_translated(&rig, &cgroup)?;
    }

    // Unconnected UDP: the reply's source is the VIP, not the backend.
    let fields = run_client(&rig, Some(&cgroup), "udp", udp_vip())?
        .map_err(|errno| anyhow::anyhow!("UDP to the VIP failed: errno {errno}"))?;
    assert!(
        fields.starts_with(&format!("from={VIP}:53 reply=peer={NODE_IP}:")),
        "unconnected UDP client: {fields}"
    );

    // Connected UDP: translated at connect; recvfrom and getpeername say VIP.
    let fields = run_client(&rig, Some(&cgroup), "udp-connected", udp_vip())?
        .map_err(|errno| anyhow::anyhow!("connected UDP to the VIP failed: errno {errno}"))?;
    assert!(
        fields.starts_with(&format!(
            "from={VIP}:53 getpeername={VIP}:53 reply=peer={NODE_IP}:"
        )),
        "connected UDP client: {fields}"
    );

    // A NodePort on the node's own address (externalTrafficPolicy Cluster)
    // is balanced the same way; nothing listens on that port.
    dp.program_service_with(
        Frontend {
            addr: NODE_IP,
            port: port(30080),
            protocol: Protocol::Tcp,
        },
        &[BackendAddr {
            addr: BACKEND_IP,
            port: port(8080),
        }],
        &FrontendOptions::external(ExternalTrafficPolicy::Cluster),
    )?;
    let fields = run_client(
        &rig,
        Some(&cgroup),
        "tcp",
        SocketAddr::from((NODE_IP, 30080)),
    )?
    .map_err(|errno| anyhow::anyhow!("TCP to the NodePort failed: errno {errno}"))?;
    assert!(
        fields.starts_with(&format!(
            "getpeername={NODE_IP}:30080 reply=peer={NODE_IP}:"
        )),
        "NodePort client: {fields}"
    );

    // A frontend without endpoints is refused at once, TCP and UDP alike.
    let started = Instant::now();
    let refused = run_client(
        &rig,
        Some(&cgroup),
        "tcp",
        SocketAddr::from((EMPTY_VIP, 80)),
    )?;
    assert_eq!(refused, Err(libc::ECONNREFUSED), "TCP to an empty frontend");
    let refused = run_client(
        &rig,
        Some(&cgroup),
        "udp",
        SocketAddr::from((EMPTY_VIP, 53)),
    )?;
    assert_eq!(refused, Err(libc::ECONNREFUSED), "UDP to an empty frontend");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refusals took {:?}",
        started.elapsed()
    );

    // A process outside the cgroup, in the same namespace, is not translated.
    let before = dp.counters()?;
    assert_untranslated(&rig, None)?;
    let after = dp.counters()?;
    for counter in [
        Counter::SockConnectTranslated,
        Counter::SockSendmsgTranslated,
        Counter::SockRejected,
    ] {
        assert_eq!(
            before.packets(counter),
            after.packets(counter),
            "{}",
            counter.name()
        );
    }

    let counters = dp.counters()?;
    assert_eq!(
        counters.packets(Counter::SockConnectTranslated),
        5,
        "3 TCP + 1 connected UDP + 1 NodePort"
    );
    assert_eq!(counters.packets(Counter::SockSendmsgTranslated), 1);
    assert_eq!(counters.packets(Counter::SockRejected), 2);
    // 4 getpeername (TCP) + recvfrom (unconnected) + recvfrom and
    // getpeername (connected UDP).
    assert!(counters.packets(Counter::SockReverseTranslated) >= 7);
    // XDP is attached nowhere: nothing went through it.
    assert_eq!(counters.packets(Counter::NewFlow), 0);

    // Detached, the cgroup's clients are left alone again.
    dp.detach_cgroup(cgroup.path())?;
    assert!(dp.attached_cgroups().is_empty());
    assert_untranslated(&rig, Some(&cgroup))?;
    assert!(dp.detach_cgroup(cgroup.path()).is_err());

    stop.store(true, Ordering::Relaxed);
    server.join().expect("backend thread")??;
    Ok(())
}

#[test]
fn pinned_cgroup_links_survive_a_restart() -> Result<()> {
    require_root();
    let (rig, prefix) = rig("scp")?;
    let cgroup = TestCgroup::new(&prefix)?;
    let pins = BpfPinDir::new(&prefix)?;
    let options = DataplaneOptions {
        pin_dir: Some(pins.path().to_owned()),
        pin_links: true,
        ..DataplaneOptions::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let server = vipr_e2e::spawn_peer_echo(&rig.backend, stop.clone())?;

    let mut dp = Dataplane::load(&options)?;
    program_services(&mut dp)?;
    dp.attach_cgroup(cgroup.path())?;
    assert_tcp_translated(&rig, &cgroup)?;

    // The agent goes away: pinned links and maps keep the translation on.
    drop(dp);
    assert_tcp_translated(&rig, &cgroup)?;

    // A new agent takes the attachment over with its own programs.
    let mut dp = Dataplane::load(&options)?;
    assert_eq!(dp.attached_cgroups(), vec![cgroup.path()]);
    assert_tcp_translated(&rig, &cgroup)?;
    assert!(dp.counters()?.packets(Counter::SockConnectTranslated) >= 3);

    // Detaching a pinned attachment removes it for good.
    dp.detach_cgroup(cgroup.path())?;
    drop(dp);
    assert_untranslated(&rig, Some(&cgroup))?;
    let mut dp = Dataplane::load(&options)?;
    assert!(dp.attached_cgroups().is_empty());

    // A cgroup removed while no agent ran does not keep the next one from
    // loading: its dead attachment is forgotten.
    let gone = TestCgroup::new(&format!("{prefix}-gone"))?;
    dp.attach_cgroup(gone.path())?;
    drop(dp);
    drop(gone);
    let dp = Dataplane::load(&options)?;
    assert!(dp.attached_cgroups().is_empty());

    stop.store(true, Ordering::Relaxed);
    server.join().expect("backend thread")??;
    Ok(())
}
