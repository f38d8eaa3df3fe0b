//! Socket-level load balancing for the node's own clients: attaching the
//! cgroup v2 sock_addr programs (connect4, sendmsg4, recvmsg4,
//! getpeername4) and the sock_release program (uncounting connections for
//! `lc` / `sed` / `nq`) to a cgroup folder, detaching them, and, when links
//! are pinned, keeping them attached across an agent restart.
//!
//! XDP never sees what the node itself sends, so a process on the node
//! dialing a ClusterIP is translated where the address is chosen instead
//! (see the eBPF `sock` module). The programs act on every socket of every
//! process in the cgroup's subtree, whatever its network namespace; the
//! agent attaches them to the cgroup holding the node's own processes
//! (`--cgroup-root`).
//!
//! Pinned attachments live under `pin_dir/cgroup-links/<cgroup>/<program>`
//! (the cgroup path escaped into one file name). A later load with the same
//! pin folder swaps its freshly loaded programs into them (`bpf_link_update`,
//! atomic per program), so node-local clients are never left untranslated.

use std::{
    collections::HashMap,
    fs::File,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramFd,
        links::{FdLink, PinnedLink},
    },
};
use vipr_common::sock_programs;

use crate::{Dataplane, DataplaneError, load_retrying_interrupted};

/// Every program attached to a cgroup: the sock_addr ones, then release.
const CGROUP_PROGRAMS: [&str; 5] = [
    sock_programs::CONNECT4,
    sock_programs::SENDMSG4,
    sock_programs::RECVMSG4,
    sock_programs::GETPEERNAME4,
    sock_programs::SOCK_RELEASE,
];

/// How one program is attached to one cgroup.
pub(crate) enum ProgramLink {
    /// Held by the data plane only: detached when it drops (or on detach).
    Owned(FdLink),
    /// Pinned at `path`: outlives the data plane until detached.
    Pinned { link: FdLink, path: PathBuf },
}

/// The sock_addr programs attached to one cgroup.
pub(crate) struct CgroupAttachment {
    links: Vec<(&'static str, ProgramLink)>,
    /// Folder of the pinned links, removed on detach.
    pin_dir: Option<PathBuf>,
}

fn cgroup_error(
    path: &Path,
    source: impl std::error::Error + Send + Sync + 'static,
) -> DataplaneError {
    DataplaneError::Cgroup {
        path: path.to_owned(),
        source: Box::new(source),
    }
}

fn sock_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, DataplaneError> {
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

fn release_program(ebpf: &mut Ebpf) -> Result<&mut CgroupSock, DataplaneError> {
    let name = sock_programs::SOCK_RELEASE;
    ebpf.program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

/// Loads (verifies) every cgroup program of the object.
pub(crate) fn load_programs(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    for name in sock_programs::ALL {
        let program = sock_program(ebpf, name)?;
        load_retrying_interrupted(|| program.load())
            .map_err(|source| DataplaneError::Program { name, source })?;
    }
    let name = sock_programs::SOCK_RELEASE;
    let program = release_program(ebpf)?;
    load_retrying_interrupted(|| program.load())
        .map_err(|source| DataplaneError::Program { name, source })
}

/// The loaded program `name`'s fd (for a link update).
fn program_fd<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a ProgramFd, DataplaneError> {
    let fd = if name == sock_programs::SOCK_RELEASE {
        release_program(ebpf)?.fd()
    } else {
        sock_program(ebpf, name)?.fd()
    };
    fd.map_err(|source| DataplaneError::Program { name, source })
}

/// Attaches program `name` to `cgroup` (at `cgroup_path`) with a link of
/// its own, held by the returned fd.
fn attach_link(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    cgroup_path: &Path,
) -> Result<FdLink, DataplaneError> {
    let program_error = |source| DataplaneError::Program { name, source };
    let link_error = |e| cgroup_error(cgroup_path, e);
    if name == sock_programs::SOCK_RELEASE {
        let program = release_program(ebpf)?;
        let id = program
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(program_error)?;
        FdLink::try_from(program.take_link(id).map_err(program_error)?).map_err(link_error)
    } else {
        let program = sock_program(ebpf, name)?;
        let id = program
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(program_error)?;
        FdLink::try_from(program.take_link(id).map_err(program_error)?).map_err(link_error)
    }
}

/// One file name for a cgroup path: `/` and `%` percent-escaped, so the
/// mapping is reversible and two cgroups never share a folder.
fn escape(cgroup: &Path) -> String {
    let mut out = String::new();
    for c in cgroup.to_string_lossy().chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
    out
}

fn unescape(name: &str) -> PathBuf {
    PathBuf::from(name.replace("%2F", "/").replace("%25", "%"))
}

/// Points the link pinned at `path` at another program. aya 0.14 offers
/// this for XDP and tc links only, and keeps a link's fd private, so both
/// the pin lookup (BPF_OBJ_GET) and BPF_LINK_UPDATE are made here.
fn link_update(path: &Path, prog_fd: &ProgramFd) -> std::io::Result<()> {
    use std::os::{
        fd::{FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    let get_attr: [u64; 2] = [c_path.as_ptr() as u64, 0];
    // SAFETY: a valid bpf_attr prefix of the size passed; the kernel reads
    // it and the NUL-terminated path it points to, which outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            get_attr.as_ptr(),
            std::mem::size_of_val(&get_attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    let link_fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct { __u32 link_fd; __u32 new_prog_fd; __u32 flags; __u32 old_prog_fd; }
    let update_attr: [u32; 4] = [
        link_fd.as_raw_fd() as u32,
        prog_fd.as_fd().as_raw_fd() as u32,
        0,
        0,
    ];
    // SAFETY: as above; both fds are open for the call's duration.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            update_attr.as_ptr(),
            std::mem::size_of_val(&update_attr),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Dataplane {
    /// Attaches the socket-level translation (cgroup sock_addr programs
    /// connect4, sendmsg4, recvmsg4, getpeername4) to the cgroup v2 folder
    /// `cgroup_path`: processes in it and below reach frontends without any
    /// packet passing XDP. Attaching where they already are (e.g. pinned
    /// attachments taken over at load) is a no-op.
    ///
    /// Each program is attached with a bpf link, which coexists with other
    /// programs on the same cgroup (the kernel treats cgroup links as
    /// `BPF_F_ALLOW_MULTI`). With `pin_links`, the links are pinned and stay
    /// attached when the data plane drops.
    pub fn attach_cgroup(&mut self, cgroup_path: &Path) -> Result<(), DataplaneError> {
        if self.cgroups.contains_key(cgroup_path) {
            return Ok(());
        }
        let cgroup = File::open(cgroup_path).map_err(|e| cgroup_error(cgroup_path, e))?;
        let pin_dir = self
            .cgroup_link_dir
            .as_ref()
            .map(|dir| dir.join(escape(cgroup_path)));
        if let Some(dir) = &pin_dir {
            std::fs::create_dir_all(dir).map_err(|source| DataplaneError::PinDir {
                path: dir.clone(),
                source,
            })?;
        }
        let mut attachment = CgroupAttachment {
            links: Vec::new(),
            pin_dir,
        };
        for name in CGROUP_PROGRAMS {
            match attach_one(
                self.ebpf_mut(),
                name,
                &cgroup,
                cgroup_path,
                &attachment.pin_dir,
            ) {
                Ok(link) => attachment.links.push((name, link)),
                Err(error) => {
                    // All or nothing: a half-attached cgroup would translate
                    // requests but not replies.
                    let _ = release(attachment, cgroup_path);
                    return Err(error);
                }
            }
        }
        self.cgroups.insert(cgroup_path.to_owned(), attachment);
        Ok(())
    }

    /// Detaches the socket-level translation from `cgroup_path` (pinned
    /// attachments included, for good).
    pub fn detach_cgroup(&mut self, cgroup_path: &Path) -> Result<(), DataplaneError> {
        let attachment = self
            .cgroups
            .remove(cgroup_path)
            .ok_or_else(|| DataplaneError::CgroupNotAttached(cgroup_path.to_owned()))?;
        release(attachment, cgroup_path)
    }

    /// Cgroups the socket-level programs are attached to, sorted.
    pub fn attached_cgroups(&self) -> Vec<&Path> {
        let mut paths: Vec<&Path> = self.cgroups.keys().map(PathBuf::as_path).collect();
        paths.sort_unstable();
        paths
    }
}

fn attach_one(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    cgroup_path: &Path,
    pin_dir: &Option<PathBuf>,
) -> Result<ProgramLink, DataplaneError> {
    let fd = attach_link(ebpf, name, cgroup, cgroup_path)?;
    let Some(dir) = pin_dir else {
        return Ok(ProgramLink::Owned(fd));
    };
    let path = dir.join(name);
    let pinned = fd.pin(&path).map_err(|e| cgroup_error(&path, e))?;
    Ok(ProgramLink::Pinned {
        link: FdLink::from(pinned),
        path,
    })
}

fn release(attachment: CgroupAttachment, cgroup_path: &Path) -> Result<(), DataplaneError> {
    let mut first_error = None;
    for (_, link) in attachment.links {
        let result = match link {
            // The only holder of an unpinned link: closing it detaches.
            ProgramLink::Owned(link) => {
                drop(link);
                Ok(())
            }
            ProgramLink::Pinned { link, path } => {
                // The pin and our fd are the only holders; both go, so does
                // the attachment.
                let removed = std::fs::remove_file(&path).map_err(|e| cgroup_error(&path, e));
                drop(link);
                removed
            }
        };
        if let Err(error) = result {
            first_error.get_or_insert(error);
        }
    }
    if let Some(dir) = attachment.pin_dir {
        let _ = std::fs::remove_dir(dir);
    }
    match first_error {
        Some(error) => Err(error),
        None => {
            tracing::debug!(cgroup = %cgroup_path.display(), "socket-level translation detached");
            Ok(())
        }
    }
}

/// Takes over every cgroup attachment pinned under `dir`, pointing each
/// link at the freshly loaded programs. A program the pins lack (an older
/// build) is attached and pinned anew.
pub(crate) fn adopt(
    ebpf: &mut Ebpf,
    dir: &Path,
) -> Result<HashMap<PathBuf, CgroupAttachment>, DataplaneError> {
    let mut adopted = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(adopted);
    };
    for entry in entries.flatten() {
        let pin_dir = entry.path();
        let cgroup_path = unescape(&entry.file_name().to_string_lossy());
        if !cgroup_path.is_dir() {
            // The cgroup went away while no agent ran; its links are
            // defunct. Forget them rather than fail the whole load.
            tracing::warn!(
                cgroup = %cgroup_path.display(),
                "pinned socket-level attachment of a cgroup that no longer exists: removing it"
            );
            let _ = std::fs::remove_dir_all(&pin_dir);
            continue;
        }
        let mut attachment = CgroupAttachment {
            links: Vec::new(),
            pin_dir: Some(pin_dir.clone()),
        };
        for name in CGROUP_PROGRAMS {
            let path = pin_dir.join(name);
            let link = if path.exists() {
                let pinned = PinnedLink::from_pin(&path).map_err(|e| cgroup_error(&path, e))?;
                let link = FdLink::from(pinned);
                link_update(&path, program_fd(ebpf, name)?).map_err(|e| cgroup_error(&path, e))?;
                ProgramLink::Pinned { link, path }
            } else {
                let cgroup = File::open(&cgroup_path).map_err(|e| cgroup_error(&cgroup_path, e))?;
                attach_one(ebpf, name, &cgroup, &cgroup_path, &attachment.pin_dir)?
            };
            attachment.links.push((name, link));
        }
        adopted.insert(cgroup_path, attachment);
    }
    Ok(adopted)
}
