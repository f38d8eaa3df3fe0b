//! The CLI side of the API socket.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::{Context, Result};

use super::{Request, Response};

/// Sends one request and waits for its answer.
pub fn call(socket: &Path, request: &Request) -> Result<Response> {
    let stream = send(socket, request)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .context("reading the agent's answer")?;
    serde_json::from_str(&answer).context("the agent's answer is malformed")
}

/// Sends a streaming request; hands each answer line to `each` until the
/// agent ends the stream or `each` returns false.
pub fn stream(
    socket: &Path,
    request: &Request,
    mut each: impl FnMut(Response) -> Result<bool>,
) -> Result<()> {
    let stream = send(socket, request)?;
    for line in BufReader::new(stream).lines() {
        let line = line.context("reading the agent's stream")?;
        let response = serde_json::from_str(&line).context("the agent's answer is malformed")?;
        if !each(response)? {
            break;
        }
    }
    Ok(())
}

fn send(socket: &Path, request: &Request) -> Result<UnixStream> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the vipr agent at {} (is `vipr agent` running? set --api-socket or VIPR_SOCKET)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line).context("sending the request")?;
    Ok(stream)
}
