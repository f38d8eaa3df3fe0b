//! Batched UDP I/O with `recvmmsg`/`sendmmsg` (Linux): one system call moves up to
//! [`BATCH`] datagrams, which is what lets a busy server spend its time answering
//! rather than in syscalls and wakeups (NSD does the same).
//!
//! The `mmsghdr`/`iovec` arrays hold raw pointers, so they are built on the stack
//! inside each call and never live across an `.await` (the worker future stays `Send`).

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Datagrams per system call.
pub(crate) const BATCH: usize = 32;
/// Receive buffer per datagram. Real queries are far smaller; a bigger datagram is
/// flagged truncated (MSG_TRUNC) and answered FORMERR from its header.
pub(crate) const RECV_BUF: usize = 4096;

/// Receive-side storage, reused across batches.
pub(crate) struct RecvBatch {
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    lens: [usize; BATCH],
    truncated: [bool; BATCH],
}

/// One received datagram.
pub(crate) struct Datagram<'a> {
    pub bytes: &'a [u8],
    pub peer: Option<SocketAddr>,
    /// Larger than [`RECV_BUF`]: `bytes` holds only its beginning.
    pub truncated: bool,
}

impl RecvBatch {
    pub fn new() -> Self {
        RecvBatch {
            bufs: vec![0u8; BATCH * RECV_BUF],
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            addrs: vec![unsafe { zeroed() }; BATCH],
            lens: [0; BATCH],
            truncated: [false; BATCH],
        }
    }

    /// Non-blocking `recvmmsg`: `Ok(n)` datagrams, `WouldBlock` when none is queued.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: zeroed iovec/mmsghdr are valid "empty" values; they are filled below.
        let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for (i, (buf, addr)) in self
            .bufs
            .chunks_exact_mut(RECV_BUF)
            .zip(&mut self.addrs)
            .enumerate()
        {
            iov[i] = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: RECV_BUF,
            };
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = (addr as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
        }
        // SAFETY: every pointer in `hdrs` points into `iov`, `self.bufs` or
        // `self.addrs`, all alive and unmoved for the duration of the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, h) in hdrs.iter().enumerate().take(n) {
            self.lens[i] = (h.msg_len as usize).min(RECV_BUF);
            self.truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        }
        Ok(n)
    }

    /// The `i`-th datagram of the last [`RecvBatch::recv`].
    pub fn get(&self, i: usize) -> Datagram<'_> {
        Datagram {
            bytes: &self.bufs[i * RECV_BUF..i * RECV_BUF + self.lens[i]],
            peer: from_sockaddr(&self.addrs[i]),
            truncated: self.truncated[i],
        }
    }
}

/// Non-blocking `sendmmsg` of `replies`: `Ok(k)` were sent (k >= 1), `WouldBlock` when
/// the socket buffer is full. An error concerns the first datagram.
pub(crate) fn send(fd: RawFd, replies: &[(Vec<u8>, SocketAddr)]) -> io::Result<usize> {
    let n = replies.len().min(BATCH);
    // SAFETY: as in `recv`: zeroed values are valid and are filled before use.
    let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    let mut addrs: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
    for (i, (bytes, peer)) in replies.iter().take(n).enumerate() {
        let len = to_sockaddr(*peer, &mut addrs[i]);
        iov[i] = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        let h = &mut hdrs[i].msg_hdr;
        h.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = len;
        h.msg_iov = &mut iov[i];
        h.msg_iovlen = 1;
    }
    // SAFETY: pointers reference `iov`, `addrs` and `replies`, alive during the call;
    // the kernel only reads the payloads.
    let sent =
        unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                port,
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn to_sockaddr(addr: SocketAddr, ss: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin =
                unsafe { &mut *(ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(v6) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 =
                unsafe { &mut *(ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_flowinfo = v6.flowinfo();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: v6.ip().octets(),
            };
            sin6.sin6_scope_id = v6.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_round_trips() {
        for s in ["127.0.0.1:5353", "[fd00::1]:53"] {
            let addr: SocketAddr = s.parse().unwrap();
            // SAFETY: all-zero sockaddr_storage is valid.
            let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
            to_sockaddr(addr, &mut ss);
            assert_eq!(from_sockaddr(&ss), Some(addr));
        }
    }
}
