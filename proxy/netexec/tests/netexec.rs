//! Starts the real `vipr-netexec` binary on ephemeral loopback ports and
//! checks every endpoint over real TCP and UDP. Every request has a timeout
//! and every child is killed when its guard drops.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A running netexec on 127.0.0.1, killed on drop.
struct Netexec {
    child: Child,
    http: SocketAddr,
    udp: SocketAddr,
}

impl Netexec {
    fn start() -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vipr-netexec"))
            .args([
                "--address",
                "127.0.0.1",
                "--http-port",
                "0",
                "--udp-port",
                "0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vipr-netexec");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        // The line arrives once both sockets are bound; the binary is local,
        // so a missing line means it died, which read_line reports as EOF.
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read announce line");
        let (http, udp) =
            parse_announce(&line).unwrap_or_else(|| panic!("bad announce line {line:?}"));
        Netexec { child, http, udp }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) for the process to end by itself.
    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "vipr-netexec did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Netexec {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_announce(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = line.trim().strip_prefix("listening http=")?;
    let (http, udp) = rest.split_once(" udp=")?;
    Some((http.parse().ok()?, udp.parse().ok()?))
}

struct HttpReply {
    status: u16,
    headers: Vec<String>,
    body: String,
    /// The local address of the client socket, to compare with /clientip.
    client: SocketAddr,
}

/// Sends one raw request and reads until the server closes the connection.
fn raw_http(server: SocketAddr, request: &str) -> HttpReply {
    let mut s = TcpStream::connect_timeout(&server, IO_TIMEOUT).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let client = s.local_addr().unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = String::new();
    // read_to_string returning proves the server closed the connection.
    s.read_to_string(&mut raw)
        .expect("server closes the connection after one response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("complete head");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    HttpReply {
        status,
        headers: lines.map(str::to_owned).collect(),
        body: body.to_owned(),
        client,
    }
}

fn get(server: SocketAddr, target: &str) -> HttpReply {
    raw_http(
        server,
        &format!("GET {target} HTTP/1.1\r\nHost: test\r\n\r\n"),
    )
}

fn udp(server: SocketAddr, datagram: &str) -> Option<(String, SocketAddr)> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s.send_to(datagram.as_bytes(), server).unwrap();
    let mut buf = [0u8; 2048];
    let n = s.recv(&mut buf).ok()?;
    Some((
        String::from_utf8(buf[..n].to_vec()).unwrap(),
        s.local_addr().unwrap(),
    ))
}

fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn hostname_over_http_is_the_machine_hostname() {
    let n = Netexec::start();
    let r = get(n.http, "/hostname");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, machine_hostname());
}

#[test]
fn clientip_over_http_is_the_peer_address() {
    let n = Netexec::start();
    let r = get(n.http, "/clientip");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, r.client.to_string());
}

#[test]
fn echo_returns_the_decoded_message() {
    let n = Netexec::start();
    let r = get(n.http, "/echo?msg=hello%20vipr+again");
    assert_eq!((r.status, r.body.as_str()), (200, "hello vipr again"));
    assert_eq!(get(n.http, "/echo").body, "");
}

#[test]
fn healthz_is_200() {
    let n = Netexec::start();
    assert_eq!(get(n.http, "/healthz").status, 200);
}

#[test]
fn ready_is_503_after_set_false_and_200_after_set_true() {
    let n = Netexec::start();
    assert_eq!(get(n.http, "/ready").status, 200);
    assert_eq!(get(n.http, "/ready?set=false").status, 200);
    assert_eq!(get(n.http, "/ready").status, 503);
    assert_eq!(
        get(n.http, "/healthz").status,
        200,
        "liveness is independent of readiness"
    );
    assert_eq!(get(n.http, "/ready?set=true").status, 200);
    assert_eq!(get(n.http, "/ready").status, 200);
}

#[test]
fn unknown_path_is_404() {
    let n = Netexec::start();
    assert_eq!(get(n.http, "/nope").status, 404);
}

#[test]
fn responses_declare_length_and_close() {
    let n = Netexec::start();
    // A keep-alive request still gets exactly one response and a close.
    let r = raw_http(
        n.http,
        "GET /echo?msg=abc HTTP/1.1\r\nHost: t\r\nConnection: keep-alive\r\n\r\n",
    );
    assert!(
        r.headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case("connection: close")),
        "{:?}",
        r.headers
    );
    assert!(
        r.headers.iter().any(|h| h == "Content-Length: 3"),
        "{:?}",
        r.headers
    );
    assert_eq!(r.body, "abc");
}

#[test]
fn malformed_request_is_400() {
    let n = Netexec::start();
    assert_eq!(raw_http(n.http, "NONSENSE\r\n\r\n").status, 400);
}

#[test]
fn exit_replies_then_exits_with_the_code() {
    let mut n = Netexec::start();
    let r = get(n.http, "/exit?code=3");
    assert_eq!(r.status, 200);
    assert_eq!(n.wait_exit(IO_TIMEOUT).code(), Some(3));
}

#[test]
fn sigterm_exits_cleanly() {
    let mut n = Netexec::start();
    let status = Command::new("kill")
        .args(["-TERM", &n.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = n.wait_exit(IO_TIMEOUT);
    assert_eq!(exit.code(), Some(0), "{exit:?}");
}

#[test]
fn udp_hostname_echo_and_clientip() {
    let n = Netexec::start();
    assert_eq!(udp(n.udp, "hostname").unwrap().0, machine_hostname());
    assert_eq!(
        udp(n.udp, "echo hello over udp\n").unwrap().0,
        "hello over udp"
    );
    let (reply, client) = udp(n.udp, "clientip").unwrap();
    assert_eq!(reply, client.to_string());
}

#[test]
fn udp_unknown_command_gets_no_answer_and_the_server_keeps_going() {
    let n = Netexec::start();
    assert_eq!(udp(n.udp, "reboot"), None);
    assert_eq!(udp(n.udp, "echo still here").unwrap().0, "still here");
}
