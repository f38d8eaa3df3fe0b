//! The serving side: sockets, worker tasks and the [`DnsHandle`] the agent keeps.
//!
//! UDP: one SO_REUSEPORT socket per worker task (the kernel spreads clients; no
//! thundering herd of tasks on one socket), datagrams moved in batches (`batch`);
//! in-zone answers are computed inline (no task per query), forwarded queries get
//! their own task, bounded
//! by a semaphore so a flood of out-of-zone names cannot exhaust memory. TCP: one
//! task per connection (bounded), RFC 7766 length-prefixed messages, idle timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::DNSClass;
use std::os::fd::AsRawFd;

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::batch::{self, BATCH, RecvBatch};
use crate::config::DnsConfig;
use crate::error::DnsError;
use crate::forward::{Forwarder, UpstreamAnswer};
use crate::index::{IndexSummary, ZoneIndex};
use crate::snapshot::ClusterSnapshot;
use crate::stats::{Counters, DnsStats};
use crate::wire::{self, Parsed, Request};

/// Largest DNS message over TCP (16-bit length prefix).
const TCP_MAX: usize = 65535;
/// UDP socket buffers: a burst of queries must queue in the kernel rather than be
/// dropped while workers are busy (the 208 KiB default loses packets at ~100k qps).
const UDP_BUFFER_BYTES: libc::c_int = 4 << 20;
/// How long [`DnsHandle::shutdown`] waits for tasks before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Entry point: see [`DnsServer::start`].
pub struct DnsServer;

/// A running server. Dropping it stops the server (without waiting).
pub struct DnsHandle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// State shared by every task.
struct Shared {
    index: ArcSwap<ZoneIndex>,
    config: DnsConfig,
    counters: Counters,
    forwarder: Forwarder,
    forward_slots: Arc<Semaphore>,
    tcp_slots: Arc<Semaphore>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// The outcome of the synchronous part of handling a message.
enum Step {
    Reply(Vec<u8>),
    Drop,
    Forward(Request),
}

impl DnsServer {
    /// Builds the index from `snapshot`, binds UDP and TCP on `config.listen` (the
    /// same port for both, also when it is 0) and starts serving on the current tokio
    /// runtime.
    pub async fn start(
        config: DnsConfig,
        snapshot: &ClusterSnapshot,
    ) -> Result<DnsHandle, DnsError> {
        let index = ZoneIndex::build(&config.zone, config.ttl, snapshot)?;
        let upstreams = config.upstream_addrs().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "no upstream resolvers; out-of-zone names will get SERVFAIL");
            Vec::new()
        });
        let (udp, tcp) = bind_sockets(config.listen, config.udp_workers.max(1)).await?;
        let local_addr = tcp.local_addr().map_err(|source| DnsError::Bind {
            transport: "udp",
            addr: config.listen,
            source,
        })?;
        tracing::info!(%local_addr, zone = %config.zone, ?upstreams, "DNS server listening");
        let shared = Arc::new(Shared {
            index: ArcSwap::from_pointee(index),
            forwarder: Forwarder::new(
                upstreams,
                config.upstream_timeout,
                config.cache_max_ttl,
                config.cache_size,
            ),
            forward_slots: Arc::new(Semaphore::new(config.max_inflight_forwards)),
            tcp_slots: Arc::new(Semaphore::new(config.max_tcp_connections)),
            counters: Counters::default(),
            config,
        });
        let (shutdown, rx) = watch::channel(false);
        let mut tasks: Vec<JoinHandle<()>> = udp
            .into_iter()
            .map(|sock| tokio::spawn(udp_worker(shared.clone(), Arc::new(sock), rx.clone())))
            .collect();
        tasks.push(tokio::spawn(tcp_acceptor(shared.clone(), tcp, rx)));
        Ok(DnsHandle {
            shared,
            local_addr,
            shutdown,
            tasks,
        })
    }
}

impl DnsHandle {
    /// Replaces the served snapshot. The index is built here, in the caller's thread
    /// (call it from `spawn_blocking` for big clusters), then swapped in atomically:
    /// queries see either the old or the new snapshot, never a mix, and never wait.
    pub fn update(&self, snapshot: &ClusterSnapshot) -> Result<IndexSummary, DnsError> {
        let config = &self.shared.config;
        let index = ZoneIndex::build(&config.zone, config.ttl, snapshot)?;
        let summary = index.summary();
        self.shared.index.store(Arc::new(index));
        Counters::inc(&self.shared.counters.updates);
        Ok(summary)
    }

    /// The address the server answers on (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Current counters.
    pub fn stats(&self) -> DnsStats {
        self.shared.counters.snapshot()
    }

    /// Stops accepting queries, lets tasks finish their current message and waits
    /// for them (aborting any still running after a grace period).
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let abort = task.abort_handle();
            if tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for DnsHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Binds `workers` UDP sockets (SO_REUSEPORT) and one TCP listener on the same port.
/// With port 0 the kernel picks the UDP port, which may be taken for TCP: retry a few
/// times with a fresh port.
async fn bind_sockets(
    listen: SocketAddr,
    workers: usize,
) -> Result<(Vec<UdpSocket>, TcpListener), DnsError> {
    let attempts = if listen.port() == 0 { 8 } else { 1 };
    let mut last_err = None;
    for _ in 0..attempts {
        let first = reuseport_udp(listen)?;
        let port = first.local_addr().map_or(listen.port(), |a| a.port());
        let addr = SocketAddr::new(listen.ip(), port);
        match TcpListener::bind(addr).await {
            Ok(tcp) => {
                let mut udp = vec![first];
                for _ in 1..workers {
                    udp.push(reuseport_udp(addr)?);
                }
                return Ok((udp, tcp));
            }
            Err(source) => {
                last_err = Some(DnsError::Bind {
                    transport: "tcp",
                    addr,
                    source,
                })
            }
        }
    }
    Err(last_err.expect("at least one attempt"))
}

/// A non-blocking UDP socket with SO_REUSEPORT and large buffers, registered with
/// the current tokio runtime.
fn reuseport_udp(addr: SocketAddr) -> Result<UdpSocket, DnsError> {
    use socket2::{Domain, Socket, Type};
    let err = |source| DnsError::Bind {
        transport: "udp",
        addr,
        source,
    };
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, None).map_err(err)?;
    sock.set_reuse_port(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    sock.set_nonblocking(true).map_err(err)?;
    let sock = UdpSocket::from_std(sock.into()).map_err(err)?;
    enlarge_udp_buffers(&sock);
    Ok(sock)
}

/// Best effort: SO_RCVBUFFORCE/SO_SNDBUFFORCE (root may exceed `rmem_max`), else the
/// plain options, which the kernel caps at `rmem_max`/`wmem_max`.
fn enlarge_udp_buffers(sock: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    let set = |opt: libc::c_int| {
        let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `fd` is a live socket owned by `sock`; the value is a c_int of `len` bytes.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&UDP_BUFFER_BYTES as *const libc::c_int).cast(),
                len,
            ) == 0
        }
    };
    if !set(libc::SO_RCVBUFFORCE) && !set(libc::SO_RCVBUF) {
        tracing::debug!("could not enlarge the UDP receive buffer");
    }
    if !set(libc::SO_SNDBUFFORCE) && !set(libc::SO_SNDBUF) {
        tracing::debug!("could not enlarge the UDP send buffer");
    }
}

/// Reads batches of datagrams, answers what it can inline and sends the replies as a
/// batch; out-of-zone queries are handed to forwarding tasks.
async fn udp_worker(
    shared: Arc<Shared>,
    sock: Arc<UdpSocket>,
    mut shutdown: watch::Receiver<bool>,
) {
    let fd = sock.as_raw_fd();
    let mut batch = RecvBatch::new();
    let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(BATCH);
    loop {
        let n = tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            r = sock.async_io(Interest::READABLE, || batch.recv(fd)) => match r {
                Ok(n) => n,
                Err(e) => {
                    // ICMP errors from earlier sends surface here: not fatal, but pause
                    // briefly so that a persistent error cannot spin a core.
                    tracing::debug!(error = %e, "udp recv");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            },
        };
        for i in 0..n {
            let dgram = batch.get(i);
            let Some(peer) = dgram.peer else { continue };
            let step = if dgram.truncated {
                handle_oversized(&shared, dgram.bytes)
            } else {
                handle_local(&shared, dgram.bytes, peer, Transport::Udp)
            };
            match step {
                Step::Reply(bytes) => replies.push((bytes, peer)),
                Step::Drop => {}
                Step::Forward(req) => spawn_udp_forward(&shared, &sock, req, peer),
            }
        }
        send_batch(&sock, &mut replies).await;
    }
}

/// Sends (and clears) `replies`, a batch per system call. A datagram the kernel
/// refuses (e.g. unreachable peer) is skipped, so the loop always progresses.
async fn send_batch(sock: &UdpSocket, replies: &mut Vec<(Vec<u8>, SocketAddr)>) {
    let fd = sock.as_raw_fd();
    let mut sent = 0;
    while sent < replies.len() {
        match sock
            .async_io(Interest::WRITABLE, || batch::send(fd, &replies[sent..]))
            .await
        {
            Ok(k) => sent += k.max(1),
            Err(e) => {
                tracing::debug!(error = %e, peer = %replies[sent].1, "udp send");
                sent += 1;
            }
        }
    }
    replies.clear();
}

/// A datagram larger than any real query: FORMERR from its header if it has one.
fn handle_oversized(shared: &Shared, bytes: &[u8]) -> Step {
    match wire::parse_oversized(bytes) {
        Parsed::Reply(reply) => {
            Counters::inc(&shared.counters.queries);
            Counters::inc(&shared.counters.formerr);
            Step::Reply(reply)
        }
        _ => {
            Counters::inc(&shared.counters.dropped);
            Step::Drop
        }
    }
}

async fn send_udp(sock: &UdpSocket, bytes: &[u8], peer: SocketAddr) {
    if let Err(e) = sock.send_to(bytes, peer).await {
        tracing::debug!(error = %e, %peer, "udp send");
    }
}

/// Forwarding awaits an upstream: run it in its own task so the worker keeps serving.
fn spawn_udp_forward(shared: &Arc<Shared>, sock: &Arc<UdpSocket>, req: Request, peer: SocketAddr) {
    let Ok(permit) = shared.forward_slots.clone().try_acquire_owned() else {
        let bytes = servfail(shared, &req, Transport::Udp);
        let sock = sock.clone();
        tokio::spawn(async move { send_udp(&sock, &bytes, peer).await });
        return;
    };
    let (shared, sock) = (shared.clone(), sock.clone());
    tokio::spawn(async move {
        let bytes = forward(&shared, &req, Transport::Udp).await;
        drop(permit);
        send_udp(&sock, &bytes, peer).await;
    });
}

async fn tcp_acceptor(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "tcp accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = shared.tcp_slots.clone().try_acquire_owned() else {
            Counters::inc(&shared.counters.dropped);
            continue; // dropping `stream` closes it
        };
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        tokio::spawn(async move {
            tcp_connection(&shared, stream, peer, shutdown).await;
            drop(permit);
        });
    }
}

/// Serves length-prefixed queries on one connection until EOF, error, idle timeout
/// or shutdown.
async fn tcp_connection(
    shared: &Shared,
    mut stream: TcpStream,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let idle = shared.config.tcp_idle_timeout;
    let mut buf = vec![0u8; TCP_MAX];
    loop {
        let read = tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            r = tokio::time::timeout(idle, read_tcp_message(&mut stream, &mut buf)) => r,
        };
        let Ok(Ok(len)) = read else { return };
        let reply = match handle_local(shared, &buf[..len], peer, Transport::Tcp) {
            Step::Reply(bytes) => bytes,
            // Nothing sensible to say on a stream after a non-query: close it.
            Step::Drop => return,
            Step::Forward(req) => forward_bounded(shared, &req).await,
        };
        if write_tcp_message(&mut stream, &reply).await.is_err() {
            return;
        }
    }
}

async fn forward_bounded(shared: &Shared, req: &Request) -> Vec<u8> {
    match shared.forward_slots.try_acquire() {
        Ok(_permit) => forward(shared, req, Transport::Tcp).await,
        Err(_) => servfail(shared, req, Transport::Tcp),
    }
}

async fn read_tcp_message(stream: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    let len = usize::from(stream.read_u16().await?);
    stream.read_exact(&mut buf[..len]).await?;
    Ok(len)
}

async fn write_tcp_message(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await
}

/// Everything that needs no waiting: parsing, in-zone answers, ACL, cache hits.
fn handle_local(shared: &Shared, bytes: &[u8], peer: SocketAddr, transport: Transport) -> Step {
    let c = &shared.counters;
    let req = match wire::parse(bytes) {
        Parsed::Drop => {
            Counters::inc(&c.dropped);
            return Step::Drop;
        }
        Parsed::Reply(reply) => {
            Counters::inc(&c.queries);
            Counters::inc(&c.formerr);
            return Step::Reply(reply);
        }
        Parsed::Query(req) => req,
    };
    Counters::inc(&c.queries);
    let allowed = shared.config.is_allowed_client(peer.ip());
    if !matches!(req.query.query_class, DNSClass::IN | DNSClass::ANY) {
        return Step::Reply(finish_refused(shared, &req, transport));
    }
    if req.edns.as_ref().is_some_and(|e| e.version() > 0) {
        // RFC 6891 6.1.3: we speak EDNS version 0 only.
        Counters::inc(&c.formerr);
        return Step::Reply(finish(
            shared,
            &req.response(ResponseCode::BADVERS),
            &req,
            transport,
        ));
    }
    let index = shared.index.load();
    if let Some(ans) = index.lookup(&req.query.name, req.query.query_type) {
        Counters::inc(&c.local_answers);
        let mut msg = req.response_with(ans.rcode, ans.answers, ans.authorities, ans.additionals);
        msg.metadata.authoritative = true;
        msg.metadata.recursion_available = allowed;
        return Step::Reply(finish(shared, &msg, &req, transport));
    }
    if !allowed {
        return Step::Reply(finish_refused(shared, &req, transport));
    }
    match shared.forwarder.cached(&req.query) {
        Some(answer) => {
            Counters::inc(&c.cache_hits);
            Step::Reply(upstream_reply(shared, &req, answer, transport))
        }
        None => Step::Forward(req),
    }
}

async fn forward(shared: &Shared, req: &Request, transport: Transport) -> Vec<u8> {
    Counters::inc(&shared.counters.forwarded);
    match shared.forwarder.resolve(&req.query).await {
        Ok(answer) => upstream_reply(shared, req, answer, transport),
        Err(e) => {
            tracing::debug!(error = %e, name = %req.query.name, "forwarding failed");
            servfail(shared, req, transport)
        }
    }
}

fn upstream_reply(
    shared: &Shared,
    req: &Request,
    answer: UpstreamAnswer,
    transport: Transport,
) -> Vec<u8> {
    let mut msg = req.response_with(
        answer.rcode,
        answer.answers,
        answer.authorities,
        answer.additionals,
    );
    msg.metadata.recursion_available = true;
    finish(shared, &msg, req, transport)
}

fn servfail(shared: &Shared, req: &Request, transport: Transport) -> Vec<u8> {
    let mut msg = req.response(ResponseCode::ServFail);
    msg.metadata.recursion_available = true;
    finish(shared, &msg, req, transport)
}

fn finish_refused(shared: &Shared, req: &Request, transport: Transport) -> Vec<u8> {
    finish(shared, &req.response(ResponseCode::Refused), req, transport)
}

/// Encodes within the transport's size limit and counts the outcome.
fn finish(
    shared: &Shared,
    msg: &hickory_proto::op::Message,
    req: &Request,
    transport: Transport,
) -> Vec<u8> {
    let c = &shared.counters;
    match msg.metadata.response_code {
        ResponseCode::NXDomain => Counters::inc(&c.nxdomain),
        ResponseCode::Refused => Counters::inc(&c.refused),
        ResponseCode::ServFail => Counters::inc(&c.servfail),
        _ => {}
    }
    let limit = match transport {
        Transport::Udp => req.max_udp_payload(),
        Transport::Tcp => TCP_MAX,
    };
    let (bytes, truncated) = wire::encode(msg, limit);
    if truncated {
        Counters::inc(&c.truncated);
    }
    bytes
}
