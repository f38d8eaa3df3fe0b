//! The agent side of the API socket.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::mpsc,
};

use super::{MAX_REQUEST_BYTES, Request, Response};

/// Answers API requests; implemented by the agent.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> impl Future<Output = Response> + Send;

    /// For a request answered with a stream of lines (`monitor`): the
    /// answers, until the handler drops its sender or the client leaves.
    fn stream(&self, _request: &Request) -> Option<Result<mpsc::Receiver<Response>, String>> {
        None
    }
}

/// Listens on `path` (replacing a stale socket) until the task is dropped.
pub async fn serve<H: Handler>(path: &Path, handler: Arc<H>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to root", path.display()))?;
    loop {
        let (stream, _) = listener
            .accept()
            .await
            .context("accepting on the API socket")?;
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Err(error) = answer(stream, handler).await {
                tracing::debug!(error = %format!("{error:#}"), "API connection failed");
            }
        });
    }
}

async fn answer<H: Handler>(stream: UnixStream, handler: Arc<H>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    reader.read_line(&mut line).await?;
    let response = if line.len() > MAX_REQUEST_BYTES {
        Response::Error {
            message: format!("request larger than {} MiB", MAX_REQUEST_BYTES >> 20),
        }
    } else {
        let request = serde_json::from_str::<Request>(&line);
        // A big apply's text is in the request now: one copy is enough.
        drop(line);
        match request {
            Ok(request) => match handler.stream(&request) {
                Some(Ok(answers)) => return stream_answers(reader, write, answers).await,
                Some(Err(message)) => Response::Error { message },
                None => handler.handle(request).await,
            },
            Err(error) => Response::Error {
                message: format!("malformed API request: {error}"),
            },
        }
    };
    write_line(&mut write, &response).await
}

async fn write_line(write: &mut (impl AsyncWrite + Unpin), response: &Response) -> Result<()> {
    let mut out = serde_json::to_vec(response)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

/// Writes each answer as it comes, until there are no more or the client
/// closes its end (seen as end of file on the read side).
async fn stream_answers(
    mut read: impl AsyncRead + Unpin,
    mut write: impl AsyncWrite + Unpin,
    mut answers: mpsc::Receiver<Response>,
) -> Result<()> {
    let mut scratch = [0u8; 64];
    loop {
        tokio::select! {
            answer = answers.recv() => match answer {
                Some(response) => write_line(&mut write, &response).await?,
                None => return Ok(()),
            },
            read = read.read(&mut scratch) => {
                if matches!(read, Ok(0) | Err(_)) {
                    return Ok(());
                }
            }
        }
    }
}
