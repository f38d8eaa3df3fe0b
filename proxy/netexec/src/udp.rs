//! The UDP side: one datagram in, at most one datagram out.
//!
//! Commands (surrounding whitespace, e.g. the newline `nc` adds, ignored):
//! `hostname` -> the hostname, `clientip` -> the sender's `IP:PORT`,
//! `echo X` -> `X`. Anything else gets no answer, as with agnhost, and a
//! line on stderr.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;

use crate::Shared;

/// Serves datagrams until an I/O error on the socket.
pub async fn serve(socket: UdpSocket, shared: Arc<Shared>) -> std::io::Result<()> {
    // The largest UDP payload; a bigger buffer is never needed.
    let mut buf = vec![0u8; 65_535];
    loop {
        let (len, peer) = socket.recv_from(&mut buf).await?;
        match answer(&buf[..len], peer, &shared.hostname) {
            Some(reply) => {
                // A failed send to one client must not stop the server.
                if let Err(e) = socket.send_to(reply.as_bytes(), peer).await {
                    eprintln!("vipr-netexec: udp reply to {peer}: {e}");
                }
            }
            None => eprintln!("vipr-netexec: unknown udp command from {peer}"),
        }
    }
}

/// The reply to one datagram, if it is a known command.
pub fn answer(datagram: &[u8], peer: SocketAddr, hostname: &str) -> Option<String> {
    let text = String::from_utf8_lossy(datagram);
    let command = text.trim();
    match command {
        "hostname" => Some(hostname.to_owned()),
        "clientip" => Some(peer.to_string()),
        "echo" => Some(String::new()),
        _ => command.strip_prefix("echo ").map(str::to_owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(
            answer(b"hostname\n", peer, "pod-a").as_deref(),
            Some("pod-a")
        );
        assert_eq!(
            answer(b"clientip", peer, "h").as_deref(),
            Some("127.0.0.1:4000")
        );
        assert_eq!(
            answer(b"echo hello world\n", peer, "h").as_deref(),
            Some("hello world")
        );
        assert_eq!(answer(b"echo", peer, "h").as_deref(), Some(""));
        assert_eq!(answer(b"shutdown", peer, "h"), None);
        assert_eq!(answer(b"echoes", peer, "h"), None);
    }
}
