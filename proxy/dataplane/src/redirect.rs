//! The forwarding fast path's interfaces: which egress interfaces a
//! translated packet may be redirected to from XDP (`REDIRECT_TARGETS`).
//!
//! A frame redirected to an interface that cannot take XDP frames is lost
//! (a veth whose peer runs no XDP program drops it), so only interfaces the
//! caller vouches for are listed; a route through any other leaves the
//! packet to the kernel's forwarding. The kernel removes an interface's
//! entry when the interface goes away. The fast path as a whole is switched
//! by [`crate::DataplaneOptions::xdp_redirect`].
//!
//! Redirected packets must carry complete checksums: a local stack sending
//! over a veth leaves its TCP/UDP checksum to "hardware" (CHECKSUM_PARTIAL,
//! only the pseudo-header summed), which the kernel's own path never
//! verifies, but a redirected frame loses that mark and the receiver drops
//! it as corrupt. So whoever sends into a node interface from a local stack
//! (a pod's `eth0`) must checksum in software:
//! [`disable_tx_checksum_offload`]. Frames from a wire always arrive complete.

use aya::maps::DevMapHash;
use vipr_common::map_names;

use crate::{Dataplane, DataplaneError};

impl Dataplane {
    /// Lets the fast path run between `interface` (in the calling thread's
    /// network namespace) and the other listed ones: packets in from it are
    /// forwarded from XDP, packets out to it redirected. Vouch only for
    /// interfaces that take XDP frames and send complete checksums: a
    /// physical NIC, or a veth whose peer runs an XDP program (e.g.
    /// [`Dataplane::attach_pass`]) with transmit checksum offload off.
    pub fn allow_redirect(&mut self, interface: &str) -> Result<(), DataplaneError> {
        let ifindex = ifindex(interface)?;
        self.allow_redirect_ifindex(interface, ifindex)
    }

    /// [`Dataplane::allow_redirect`] by interface index (`name` for errors).
    pub fn allow_redirect_ifindex(
        &mut self,
        name: &str,
        ifindex: u32,
    ) -> Result<(), DataplaneError> {
        self.redirect_targets()?
            .insert(ifindex, ifindex, None, 0)
            .map_err(|source| DataplaneError::RedirectTarget {
                interface: name.to_owned(),
                source,
            })
    }

    /// Takes `interface` off the fast path's list.
    pub fn forbid_redirect(&mut self, interface: &str) -> Result<(), DataplaneError> {
        let ifindex = ifindex(interface)?;
        match self.redirect_targets()?.remove(ifindex) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DataplaneError::map(map_names::REDIRECT_TARGETS)(source)),
        }
    }

    /// Interface indexes the fast path may redirect to, sorted.
    pub fn redirect_target_ifindexes(&mut self) -> Result<Vec<u32>, DataplaneError> {
        let targets = self.redirect_targets()?;
        let mut ifindexes = targets
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(DataplaneError::map(map_names::REDIRECT_TARGETS))?;
        ifindexes.sort_unstable();
        Ok(ifindexes)
    }

    fn redirect_targets(&mut self) -> Result<DevMapHash<&mut aya::maps::MapData>, DataplaneError> {
        let map = self
            .ebpf_mut()
            .map_mut(map_names::REDIRECT_TARGETS)
            .ok_or(DataplaneError::MissingMap(map_names::REDIRECT_TARGETS))?;
        DevMapHash::try_from(map).map_err(DataplaneError::map(map_names::REDIRECT_TARGETS))
    }
}

/// The index of `interface` in the calling thread's network namespace.
fn ifindex(interface: &str) -> Result<u32, DataplaneError> {
    let not_found = || DataplaneError::NoSuchInterface(interface.to_owned());
    let name = std::ffi::CString::new(interface).map_err(|_| not_found())?;
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(not_found()),
        index => Ok(index),
    }
}

/// Makes the stack compute TCP/UDP checksums itself for packets sent on
/// `interface` (in the calling thread's network namespace), as
/// `ethtool -K <interface> tx off` does: needed on a veth whose packets the
/// fast path redirects (see the module docs).
pub fn disable_tx_checksum_offload(interface: &str) -> Result<(), DataplaneError> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let failed = |source: std::io::Error| DataplaneError::ChecksumOffload {
        interface: interface.to_owned(),
        source,
    };
    let name = interface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return Err(DataplaneError::NoSuchInterface(interface.to_owned()));
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: 0,
    };
    // SAFETY: all-zero is a valid ifreq; the name fits (checked above).
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name) {
        *slot = *byte as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&raw mut value).cast();
    // SAFETY: plain socket creation; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd nothing else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: a valid socket, and an ifreq pointing at a live ethtool_value
    // for the duration of the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            SIOCETHTOOL,
            &raw mut request,
        )
    };
    if rc < 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    Ok(())
}
