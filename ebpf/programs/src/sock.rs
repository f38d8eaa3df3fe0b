//! Socket-level load balancing for clients in the node's own network
//! namespace (cgroup v2 sock_addr hooks), Cilium's "host-reachable services".
//!
//! XDP only sees packets arriving on an interface, never those the node's
//! own processes send, so for those the translation happens where the
//! address is chosen: `connect()` (TCP and connected UDP) and `sendmsg()`
//! (unconnected UDP) swap the frontend in the user's sockaddr for a backend
//! picked from the same `SERVICES` / `BACKENDS` maps by the same
//! `balance::choose` as XDP (the client being the socket's network
//! namespace: no source address exists yet at `connect()`). No packet is ever rewritten, so no conntrack entry is
//! needed: the socket simply talks to the backend. What the application must
//! not notice is undone per socket with `SOCK_REVNAT` (socket cookie +
//! backend -> frontend): `recvmsg()` gives UDP replies the frontend as
//! source, `getpeername()` shows the frontend as peer.
//!
//! Frontends with loadBalancerSourceRanges are left untouched (the client
//! address is not known at connect time, so the ranges cannot be checked);
//! such traffic leaves the node and comes back through XDP like anyone's.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::{SockAddrContext, SockContext},
};
use vipr_common::{
    Counter, FlowKey, IPPROTO_TCP, IPPROTO_UDP, ServiceKey, SockRevNatKey, SockRevNatValue,
    service_flags,
};

use crate::{
    SERVICES, SOCK_CONNECTIONS, SOCK_REVNAT,
    balance::{self, NewFlow},
    count, monitor, stats,
};

/// Verdicts of a sock_addr program: let the syscall go on, or fail it (with
/// EPERM, unless the program set another error with `bpf_set_retval`).
const SYS_PROCEED: i32 = 1;
const SYS_REJECT: i32 = 0;
const AF_INET: u32 = 2;
const ECONNREFUSED: i32 = 111;

/// Which hook runs: what to count and whether UDP replies need reversing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect,
    Sendmsg,
}

/// connect4 / sendmsg4: a destination that is a frontend becomes one of its
/// backends; a frontend without backends fails the call with ECONNREFUSED.
#[inline(always)]
pub fn translate_destination(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run; these
    // fields are readable by connect4 and sendmsg4 programs.
    let (family, addr, port, proto) = unsafe {
        (
            (*sa).user_family,
            (*sa).user_ip4,
            (*sa).user_port,
            (*sa).protocol,
        )
    };
    if family != AF_INET || (proto != u32::from(IPPROTO_TCP) && proto != u32::from(IPPROTO_UDP)) {
        return SYS_PROCEED;
    }
    // The kernel hands user_port as the 16-bit network-order port widened to
    // 32 bits: the same value ServiceKey holds.
    let key = ServiceKey {
        addr,
        port: port as u16,
        proto: proto as u8,
        _pad: 0,
    };
    // SAFETY: map values are plain data.
    let Some(service) = (unsafe { SERVICES.get(key) }).copied() else {
        return SYS_PROCEED;
    };
    if service.flags & service_flags::SOURCE_RANGES != 0 {
        return SYS_PROCEED;
    }
    let backend = if service.backend_count == 0 {
        None
    } else {
        // SAFETY: the helper accepts a sock_addr context.
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        balance::choose(
            &service,
            &NewFlow::of_socket(netns, addr, port as u16, proto as u8),
        )
    };
    // What the monitor shows: the socket's source is not known yet.
    let before = FlowKey {
        src_addr: 0,
        dst_addr: addr,
        src_port: 0,
        dst_port: port as u16,
        proto: proto as u8,
        _pad: 0,
        _pad2: 0,
    };
    let Some(chosen) = backend else {
        // No endpoint (or a slot vanishing under an update): refuse now, as
        // the XDP path answers a remote client with RST / port unreachable.
        // SAFETY: plain helper call; a negative errno is what it takes.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        count(Counter::SockRejected, 0);
        stats::count_service_outcome(service.service_id, Counter::SockRejected, 0);
        monitor::emit_socket(Counter::SockRejected, &before, &before);
        return SYS_REJECT;
    };
    let backend = chosen.endpoint;
    // SAFETY: the helper accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A TCP connection of a service balanced by load counts until its
    // socket is released (`release`). Unconnected UDP has no connection.
    if hook == Hook::Connect
        && proto == u32::from(IPPROTO_TCP)
        && balance::counts_connections(&service)
        && SOCK_CONNECTIONS
            .insert(&cookie, &backend, u64::from(BPF_NOEXIST))
            .is_ok()
    {
        balance::connection_opened(&backend);
    }
    // Record before rewriting: getpeername and recvmsg need the way back.
    // Losing the record (map full is impossible for an LRU) only costs the
    // application seeing the backend's address.
    let rev_key = SockRevNatKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: 0,
    };
    let rev_value = SockRevNatValue {
        addr,
        port: port as u16,
        _pad: 0,
    };
    let _ = SOCK_REVNAT.insert(&rev_key, &rev_value, 0);
    // SAFETY: as above; both fields are writable by these programs.
    unsafe {
        (*sa).user_ip4 = backend.addr;
        (*sa).user_port = u32::from(backend.port);
    }
    let counter = match hook {
        Hook::Connect => Counter::SockConnectTranslated,
        Hook::Sendmsg => Counter::SockSendmsgTranslated,
    };
    count(counter, 0);
    stats::count_socket_flow(chosen.stats_id(service.service_id));
    let after = FlowKey {
        dst_addr: backend.addr,
        dst_port: backend.port,
        ..before
    };
    monitor::emit_socket(counter, &before, &after);
    SYS_PROCEED
}

/// sock_release: a socket counted for its backend's load at connect is
/// uncounted. Must always let the release proceed.
#[inline(always)]
pub fn release(ctx: &SockContext) -> i32 {
    // SAFETY: the helper accepts a cgroup sock context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain data.
    if let Some(backend) = unsafe { SOCK_CONNECTIONS.get(&cookie) }.copied()
        && SOCK_CONNECTIONS.remove(&cookie).is_ok()
    {
        balance::connection_closed(&backend);
    }
    SYS_PROCEED
}

/// recvmsg4 / getpeername4: a backend this socket was sent to by
/// [`translate_destination`] shows as the frontend the client asked for.
/// These hooks must always let the call proceed.
#[inline(always)]
pub fn restore_frontend(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: valid context; readable fields for these hooks.
    let (family, addr, port) = unsafe { ((*sa).user_family, (*sa).user_ip4, (*sa).user_port) };
    if family != AF_INET {
        return SYS_PROCEED;
    }
    let key = SockRevNatKey {
        // SAFETY: the helper accepts a sock_addr context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr,
        port: port as u16,
        _pad: 0,
    };
    // SAFETY: plain data.
    if let Some(frontend) = unsafe { SOCK_REVNAT.get(&key) }.copied() {
        // SAFETY: both fields are writable by these programs.
        unsafe {
            (*sa).user_ip4 = frontend.addr;
            (*sa).user_port = u32::from(frontend.port);
        }
        count(Counter::SockReverseTranslated, 0);
    }
    SYS_PROCEED
}
