//! The long-lived TCP side (`--tcp-port`): one connection carries any number
//! of commands, one per line, each answered with one line. The commands are
//! the UDP ones (see [`crate::udp::answer`]); an unknown command gets an
//! empty line, so a client never waits for an answer that is not coming.
//!
//! HTTP here closes after every response; this is what a test needs to hold
//! one flow open across backend changes and ask who serves it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::{Shared, udp};

/// Longest command line read; longer lines end the connection.
const MAX_LINE: usize = 4096;

/// Accepts connections until the listener fails.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) -> std::io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = answer_lines(stream, peer, &shared).await {
                eprintln!("vipr-netexec: tcp connection from {peer}: {e}");
            }
        });
    }
}

async fn answer_lines(stream: TcpStream, peer: SocketAddr, shared: &Shared) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        if line.len() > MAX_LINE {
            return Err(std::io::Error::other("command line too long"));
        }
        let mut reply = udp::answer(line.as_bytes(), peer, &shared.hostname).unwrap_or_default();
        reply.push('\n');
        write.write_all(reply.as_bytes()).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn one_connection_answers_many_commands() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            hostname: "pod-a".into(),
            ready: true.into(),
        });
        tokio::spawn(serve(listener, shared));
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let local = conn.local_addr().unwrap();
        conn.write_all(b"hostname\nclientip\nnonsense\necho hi\n")
            .await
            .unwrap();
        conn.shutdown().await.unwrap();
        let mut replies = String::new();
        conn.read_to_string(&mut replies).await.unwrap();
        assert_eq!(replies, format!("pod-a\n{local}\n\nhi\n"));
    }
}
