//! The HTTP side: a minimal HTTP/1.1 server, one request per connection.
//!
//! Only the request line is interpreted (headers are read and ignored, a
//! body is never needed). Every response carries `Content-Length` and
//! `Connection: close`, and the server closes the connection after it, so
//! clients that reuse connections still see one response per request.
//!
//! Endpoints, as agnhost netexec:
//! - `/hostname`: the hostname;
//! - `/clientip`: the peer `IP:PORT` this server saw;
//! - `/echo?msg=X`: `X`, percent-decoded;
//! - `/exit?code=N`: replies, then exits with status N (0..=255, default 0);
//! - `/healthz`: 200;
//! - `/ready`: 200 while ready, 503 once `/ready?set=false` was requested,
//!   200 again after `/ready?set=true` (the `set` requests themselves get 200);
//! - anything else: 404.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::Shared;

/// Request heads longer than this are refused: the endpoints need a few
/// dozen bytes, and a bound keeps a misbehaving client from growing memory.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// After a stop request, the listener stays open while connections keep
/// arriving this often: those already queued or racing the endpoint
/// removal are served instead of reset.
const DRAIN_IDLE: Duration = Duration::from_millis(250);
/// The longest the listener stays open after a stop request.
const DRAIN_MAX: Duration = Duration::from_secs(5);

/// Accepts connections until `stop` turns true (SIGTERM), then drains:
/// connections still arriving are served until none came for
/// [`DRAIN_IDLE`], and every open one is finished before returning.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut open = JoinSet::new();
    let serve_one = |open: &mut JoinSet<()>, stream: TcpStream, peer: SocketAddr| {
        let shared = shared.clone();
        open.spawn(async move {
            match handle(stream, peer, &shared).await {
                // A client that resets or leaves early is ordinary (load
                // generators do it on every connection): not worth a line.
                Err(e) if is_client_gone(&e) => {}
                Err(e) => eprintln!("vipr-netexec: http {peer}: {e}"),
                Ok(()) => {}
            }
        });
    };
    while !*stop.borrow() {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = accepted?;
                serve_one(&mut open, stream, peer);
            }
            _ = stop.changed() => {}
            Some(_) = open.join_next(), if !open.is_empty() => {}
        }
    }
    let closes_at = tokio::time::Instant::now() + DRAIN_MAX;
    while tokio::time::Instant::now() < closes_at {
        match timeout(DRAIN_IDLE, listener.accept()).await {
            Ok(Ok((stream, peer))) => serve_one(&mut open, stream, peer),
            _ => break,
        }
    }
    drop(listener);
    // Each connection is bounded by READ_TIMEOUT and the drain of its socket.
    while open.join_next().await.is_some() {}
    Ok(())
}

fn is_client_gone(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionReset | BrokenPipe | UnexpectedEof | ConnectionAborted
    )
}

async fn handle(mut stream: TcpStream, peer: SocketAddr, shared: &Shared) -> std::io::Result<()> {
    let outcome = match timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => match parse_request(&head) {
            Some(req) => route(&req, peer, shared),
            None => Outcome::reply(Response::text(400, "malformed request\n")),
        },
        Ok(Ok(None)) => {
            Outcome::reply(Response::text(400, "request head too large or truncated\n"))
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => Outcome::reply(Response::text(408, "request timeout\n")),
    };
    stream.write_all(&outcome.response.render()).await?;
    stream.shutdown().await?;
    if let Some(code) = outcome.exit {
        eprintln!("vipr-netexec: /exit requested, exiting with code {code}");
        std::process::exit(code);
    }
    drain(&mut stream).await;
    Ok(())
}

/// Reads until the blank line ending the head. `None` if the client closed
/// first or the head exceeds [`MAX_HEAD`].
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            return Ok(Some(String::from_utf8_lossy(&buf[..end]).into_owned()));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

/// Reads and discards what the client still sends (a body we ignored), for
/// a short while: closing a socket with unread data makes the kernel send a
/// RST, which can destroy the response before the client has read it.
async fn drain(stream: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    let _ = timeout(Duration::from_secs(1), async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The parts of a request the endpoints look at.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Decoded `key=value` pairs of the query string, in order.
    pub query: Vec<(String, String)>,
}

impl Request {
    fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `METHOD TARGET HTTP/1.x` from the head's first line.
pub fn parse_request(head: &str) -> Option<Request> {
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || method.is_empty() {
        return None;
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Some(Request {
        method: method.to_owned(),
        path: percent_decode(path, false)?,
        query: parse_query(query)?,
    })
}

fn parse_query(query: &str) -> Option<Vec<(String, String)>> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(k, true)?, percent_decode(v, true)?))
        })
        .collect()
}

/// `%XX` decoding; `+` is a space only in query strings (form encoding).
/// `None` for a broken escape or a result that is not UTF-8.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A response, always plain text.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
    /// HEAD: headers as for GET, no body.
    pub head_only: bool,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            body: body.into(),
            head_only: false,
        }
    }

    fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            503 => "Service Unavailable",
            _ => "Unknown",
        }
    }

    /// The bytes on the wire.
    pub fn render(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.status,
            self.reason(),
            self.body.len()
        )
        .into_bytes();
        if !self.head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

/// What to send, and whether to exit afterwards.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub response: Response,
    pub exit: Option<i32>,
}

impl Outcome {
    fn reply(response: Response) -> Self {
        Outcome {
            response,
            exit: None,
        }
    }
}

/// Maps a request to its outcome; the only side effect is the ready flag.
pub fn route(req: &Request, peer: SocketAddr, shared: &Shared) -> Outcome {
    if !matches!(req.method.as_str(), "GET" | "HEAD" | "POST") {
        return Outcome::reply(Response::text(405, "method not allowed\n"));
    }
    let mut outcome = match req.path.as_str() {
        "/hostname" => Outcome::reply(Response::text(200, shared.hostname.clone())),
        "/clientip" => Outcome::reply(Response::text(200, peer.to_string())),
        "/echo" => Outcome::reply(Response::text(200, req.param("msg").unwrap_or_default())),
        "/exit" => exit(req),
        "/healthz" => Outcome::reply(Response::text(200, "ok")),
        "/ready" => ready(req, shared),
        _ => Outcome::reply(Response::text(404, "404 page not found\n")),
    };
    outcome.response.head_only = req.method == "HEAD";
    outcome
}

fn exit(req: &Request) -> Outcome {
    match req.param("code").map_or(Ok(0), str::parse::<u8>) {
        Ok(code) => Outcome {
            response: Response::text(200, format!("exiting with code {code}\n")),
            exit: Some(i32::from(code)),
        },
        Err(_) => Outcome::reply(Response::text(400, "code must be an integer 0..=255\n")),
    }
}

fn ready(req: &Request, shared: &Shared) -> Outcome {
    let set = match req.param("set") {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => return Outcome::reply(Response::text(400, "set must be true or false\n")),
    };
    if let Some(value) = set {
        shared.ready.store(value, Ordering::SeqCst);
        return Outcome::reply(Response::text(200, format!("ready={value}\n")));
    }
    if shared.ready.load(Ordering::SeqCst) {
        Outcome::reply(Response::text(200, "ready\n"))
    } else {
        Outcome::reply(Response::text(503, "not ready\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn shared() -> Shared {
        Shared {
            hostname: "pod-a".into(),
            ready: AtomicBool::new(true),
        }
    }

    fn get(target: &str, s: &Shared) -> Outcome {
        let req = parse_request(&format!("GET {target} HTTP/1.1\r\nHost: x")).unwrap();
        route(&req, "10.0.0.9:5555".parse().unwrap(), s)
    }

    #[test]
    fn parses_the_request_line_and_query() {
        let r = parse_request("GET /echo?msg=a%20b+c&x HTTP/1.1\r\nHost: h").unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/echo");
        assert_eq!(
            r.query,
            vec![("msg".into(), "a b c".into()), ("x".into(), String::new())]
        );
        assert_eq!(parse_request("GET /\r\n"), None);
        assert_eq!(parse_request("GET / SPDY/3"), None);
        assert_eq!(parse_request("GET /echo?msg=%zz HTTP/1.1"), None);
    }

    #[test]
    fn routes() {
        let s = shared();
        assert_eq!(get("/hostname", &s).response.body, "pod-a");
        assert_eq!(get("/clientip", &s).response.body, "10.0.0.9:5555");
        assert_eq!(get("/echo?msg=hi", &s).response.body, "hi");
        assert_eq!(get("/healthz", &s).response.status, 200);
        assert_eq!(get("/nope", &s).response.status, 404);
        assert_eq!(get("/exit?code=7", &s).exit, Some(7));
        assert_eq!(get("/exit", &s).exit, Some(0));
        assert_eq!(get("/exit?code=300", &s).response.status, 400);
    }

    #[test]
    fn ready_toggles() {
        let s = shared();
        assert_eq!(get("/ready", &s).response.status, 200);
        assert_eq!(get("/ready?set=false", &s).response.status, 200);
        assert_eq!(get("/ready", &s).response.status, 503);
        assert_eq!(get("/ready?set=true", &s).response.status, 200);
        assert_eq!(get("/ready", &s).response.status, 200);
        assert_eq!(get("/ready?set=maybe", &s).response.status, 400);
    }

    #[test]
    fn renders_length_and_close() {
        let text = String::from_utf8(Response::text(200, "héllo").render()).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("\r\nContent-Length: 6\r\n"), "{text}");
        assert!(text.contains("\r\nConnection: close\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nhéllo"), "{text}");
    }
}
