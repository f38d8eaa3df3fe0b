//! Running a command inside a running container (for `vipr exec`, exec probes and
//! exec lifecycle hooks): the child enters the container's net, UTS and mount
//! namespaces and root, takes its environment and working directory, then execs.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code; None if killed at the timeout.
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub timed_out: bool,
}

fn open(p: String) -> Result<OwnedFd> {
    std::fs::File::open(&p)
        .map(OwnedFd::from)
        .map_err(|e| Error::Shim(format!("{p}: {e}")))
}

/// Environment of a process, from /proc/PID/environ.
pub fn process_env(pid: i32) -> Vec<(String, String)> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let s = String::from_utf8_lossy(kv);
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// Effective uid, gid and supplementary groups of a process.
fn process_ids(pid: i32) -> (u32, u32, Vec<libc::gid_t>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let uid = field("Uid:").get(1).copied().unwrap_or(0);
    let gid = field("Gid:").get(1).copied().unwrap_or(0);
    (uid, gid, field("Groups:"))
}

/// Prepare a `Command` that runs `argv` in the namespaces of container process `pid`
/// and joins `cgroups` (so limits apply to it too). Keep the returned fds alive until
/// the command is spawned. Callers wire stdio (e.g. to the API socket for `vipr exec`).
pub fn command_in(
    pid: i32,
    argv: &[String],
    cgroups: &[PathBuf],
) -> Result<(Command, Vec<OwnedFd>)> {
    let Some(prog) = argv.first() else {
        return Err(Error::Shim("empty command".into()));
    };
    let net = open(format!("/proc/{pid}/ns/net"))?;
    let uts = open(format!("/proc/{pid}/ns/uts"))?;
    let mnt = open(format!("/proc/{pid}/ns/mnt"))?;
    let root = open(format!("/proc/{pid}/root"))?;
    // Both links read as paths in our root: make the cwd relative to the container's.
    let croot = std::fs::read_link(format!("/proc/{pid}/root")).unwrap_or_else(|_| "/".into());
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
        .ok()
        .map(|p| match p.strip_prefix(&croot) {
            Ok(rel) => std::path::Path::new("/").join(rel),
            Err(_) => p,
        })
        .and_then(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok())
        .unwrap_or_else(|| c"/".into());
    let mut cmd = Command::new(prog);
    cmd.args(&argv[1..]).env_clear().envs(process_env(pid));
    let mut procs = Vec::new();
    for cg in cgroups {
        let p = cg.join("cgroup.procs");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(|e| Error::Shim(format!("{}: {e}", p.display())))?;
        procs.push(OwnedFd::from(f));
    }
    let proc_fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
    // Run as the container's user, as `kubectl exec` does.
    let (uid, gid, groups) = process_ids(pid);
    let (n, u, m, r) = (
        net.as_raw_fd(),
        uts.as_raw_fd(),
        mnt.as_raw_fd(),
        root.as_raw_fd(),
    );
    // SAFETY: only async-signal-safe syscalls run between fork and exec; the fds are
    // kept open by the returned Vec until the caller has spawned.
    unsafe {
        cmd.pre_exec(move || {
            let ok = |rc: libc::c_int| {
                if rc != 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            for fd in &proc_fds {
                // "0" = the writing process; done before setns(mnt) hides /sys.
                if libc::write(*fd, c"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            ok(libc::setns(n, libc::CLONE_NEWNET))?;
            ok(libc::setns(u, libc::CLONE_NEWUTS))?;
            ok(libc::setns(m, libc::CLONE_NEWNS))?;
            // setns(mnt) resets root to the namespace's root; the container may have
            // chrooted into an image: follow its root.
            ok(libc::fchdir(r))?;
            ok(libc::chroot(c".".as_ptr()))?;
            if uid != 0 || gid != 0 {
                ok(libc::setgroups(groups.len(), groups.as_ptr()))?;
                ok(libc::setgid(gid))?;
                ok(libc::setuid(uid))?;
            }
            if libc::chdir(cwd.as_ptr()) != 0 {
                ok(libc::chdir(c"/".as_ptr()))?;
            }
            Ok(())
        });
    }
    procs.extend([net, uts, mnt, root]);
    Ok((cmd, procs))
}

/// Run `argv` in container process `pid`'s namespaces, killed after `timeout`.
pub fn run(
    pid: i32,
    argv: &[String],
    cgroups: &[PathBuf],
    timeout: Duration,
) -> Result<ExecOutput> {
    let (mut cmd, fds) = command_in(pid, argv, cgroups)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Shim(format!("exec {argv:?}: {e}")))?;
    drop(fds);
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut b = vec![];
        let _ = out.read_to_end(&mut b);
        b
    });
    let t_err = std::thread::spawn(move || {
        let mut b = vec![];
        let _ = err.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                timed_out = true;
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(Error::Shim(format!("wait: {e}"))),
        }
    };
    // A grandchild holding the pipes open must not hang us past the timeout.
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    Ok(ExecOutput {
        code: status.and_then(|s| s.code()),
        stdout,
        stderr,
        timed_out,
    })
}
