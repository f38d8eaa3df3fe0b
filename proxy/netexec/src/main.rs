//! `vipr-netexec`: the test workload of vipr's pods, after Kubernetes'
//! agnhost `netexec`.
//!
//! - [`http`] owns the HTTP/1.1 endpoints (`/hostname`, `/clientip`, `/echo`,
//!   `/exit`, `/healthz`, `/ready`): a deliberately minimal server, one
//!   request per connection, always `Connection: close`.
//! - [`udp`] owns the UDP commands (`hostname`, `echo X`, `clientip`).
//! - [`lines`] serves the same commands line by line over long-lived TCP
//!   connections (`--tcp-port`, off by default).
//! - This file owns the command line, the listeners and shutdown: SIGTERM or
//!   SIGINT ends the process with status 0 once open HTTP connections (and
//!   any still arriving for a moment, see [`http::serve`]) are answered, so a
//!   pod removed from its service's endpoints fails no request.
//!
//! On start it prints one line to stdout, `listening http=ADDR udp=ADDR`
//! (and ` tcp=ADDR` with `--tcp-port`), so whoever started it with port 0
//! learns the ports the kernel chose.

mod http;
mod lines;
mod udp;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::net::{TcpListener, UdpSocket};
use tokio::signal::unix::{SignalKind, signal};

/// Test workload: answers hostname, client IP and echo requests over HTTP and UDP.
#[derive(Debug, Parser)]
#[command(name = "vipr-netexec", version)]
struct Args {
    /// TCP port of the HTTP server (0: any free port).
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    /// UDP port of the datagram server (0: any free port).
    #[arg(long, default_value_t = 8081)]
    udp_port: u16,
    /// TCP port of the line server (commands as over UDP, one per line, on
    /// long-lived connections). Off unless given; 0: any free port.
    #[arg(long)]
    tcp_port: Option<u16>,
    /// Address the servers listen on.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    address: IpAddr,
}

/// What every handler may need to know about this process.
#[derive(Debug)]
pub struct Shared {
    /// Read once at start: a pod's hostname does not change.
    pub hostname: String,
    /// Flipped by `/ready?set=...`.
    pub ready: std::sync::atomic::AtomicBool,
}

/// Accept-queue length: Go servers such as agnhost get the kernel's
/// `somaxconn` (4096); std's and tokio's 128 overflows (a dropped SYN, a
/// one-second retransmit) as soon as a load generator outpaces a briefly
/// descheduled server.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Handlers first: a SIGTERM that arrives once the ports are announced
    // (a pod deleted right after it turned ready) must drain, not kill.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shared = Arc::new(Shared {
        hostname: hostname()?,
        ready: std::sync::atomic::AtomicBool::new(true),
    });
    let tcp = listen(SocketAddr::new(args.address, args.http_port))
        .with_context(|| format!("binding HTTP port {}", args.http_port))?;
    let udp = UdpSocket::bind(SocketAddr::new(args.address, args.udp_port))
        .await
        .with_context(|| format!("binding UDP port {}", args.udp_port))?;
    let lines = match args.tcp_port {
        Some(port) => Some(
            listen(SocketAddr::new(args.address, port))
                .with_context(|| format!("binding TCP line port {port}"))?,
        ),
        None => None,
    };
    announce(
        tcp.local_addr()?,
        udp.local_addr()?,
        lines.as_ref().map(TcpListener::local_addr).transpose()?,
    )?;
    let line_server = async {
        match lines {
            Some(listener) => lines::serve(listener, shared.clone()).await,
            None => std::future::pending().await,
        }
    };

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut http = tokio::spawn(http::serve(tcp, shared.clone(), stopped));
    let signal = tokio::select! {
        r = &mut http => return r.context("HTTP server task")?.context("HTTP server"),
        r = udp::serve(udp, shared.clone()) => return r.context("UDP server"),
        r = line_server => return r.context("TCP line server"),
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    eprintln!("vipr-netexec: {signal}, finishing open connections");
    let _ = stop.send(true);
    http.await
        .context("HTTP server task")?
        .context("HTTP server")?;
    eprintln!("vipr-netexec: exiting");
    Ok(())
}

fn hostname() -> anyhow::Result<String> {
    let name = nix::unistd::gethostname().context("reading the hostname")?;
    Ok(name.to_string_lossy().into_owned())
}

/// The readiness line tests and humans wait for; flushed because stdout is
/// a pipe (block buffered) when a test or the pod runtime reads it.
fn announce(http: SocketAddr, udp: SocketAddr, lines: Option<SocketAddr>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match lines {
        Some(tcp) => writeln!(out, "listening http={http} udp={udp} tcp={tcp}")?,
        None => writeln!(out, "listening http={http} udp={udp}")?,
    }
    out.flush()?;
    Ok(())
}
