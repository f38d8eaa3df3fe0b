//! Probes: the pure per-probe state machine (thresholds, periods, initial delay) and
//! the three actions (exec, httpGet, tcpSocket). Time is passed in as "time since the
//! container started" so the state machine is testable without clocks.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Timing and thresholds with the Kubernetes defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTiming {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl ProbeTiming {
    pub fn from_probe(p: &Probe) -> Self {
        let secs = |v: Option<i32>, d: i32| Duration::from_secs(v.unwrap_or(d).max(0) as u64);
        ProbeTiming {
            initial_delay: secs(p.initial_delay_seconds, 0),
            period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
            failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
        }
    }
}

/// What a probe does.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeAction {
    Exec(Vec<String>),
    Http {
        host: Option<String>,
        port: u16,
        path: String,
        https: bool,
        headers: Vec<(String, String)>,
    },
    Tcp {
        host: Option<String>,
        port: u16,
    },
}

/// Resolve a numeric or named port against the container's ports.
pub fn resolve_port(p: &IntOrString, c: &Container) -> Option<u16> {
    match p {
        IntOrString::Int(i) => u16::try_from(*i).ok().filter(|p| *p > 0),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .and_then(|cp| u16::try_from(cp.container_port).ok()),
    }
}

/// The action of a probe or lifecycle handler; `Err` explains what is unsupported.
pub fn action_of(
    exec: Option<&k8s_openapi::api::core::v1::ExecAction>,
    http: Option<&k8s_openapi::api::core::v1::HTTPGetAction>,
    tcp: Option<&k8s_openapi::api::core::v1::TCPSocketAction>,
    c: &Container,
) -> Result<ProbeAction, String> {
    if let Some(e) = exec {
        return Ok(ProbeAction::Exec(e.command.clone().unwrap_or_default()));
    }
    if let Some(h) = http {
        let port = resolve_port(&h.port, c).ok_or_else(|| format!("unknown port {:?}", h.port))?;
        return Ok(ProbeAction::Http {
            host: h.host.clone(),
            port,
            path: h.path.clone().unwrap_or_else(|| "/".into()),
            https: h.scheme.as_deref() == Some("HTTPS"),
            headers: h
                .http_headers
                .iter()
                .flatten()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect(),
        });
    }
    if let Some(t) = tcp {
        let port = resolve_port(&t.port, c).ok_or_else(|| format!("unknown port {:?}", t.port))?;
        return Ok(ProbeAction::Tcp {
            host: t.host.clone(),
            port,
        });
    }
    Err("no handler (exec, httpGet or tcpSocket) given".into())
}

pub fn probe_action(p: &Probe, c: &Container) -> Result<ProbeAction, String> {
    action_of(
        p.exec.as_ref(),
        p.http_get.as_ref(),
        p.tcp_socket.as_ref(),
        c,
    )
}

/// Result state of one probe of one container instance.
#[derive(Debug, Clone)]
pub struct ProbeState {
    pub timing: ProbeTiming,
    last_run: Option<Duration>,
    ok_streak: u32,
    fail_streak: u32,
    /// Current verdict: None until the thresholds decide one.
    pub result: Option<bool>,
}

impl ProbeState {
    pub fn new(timing: ProbeTiming) -> Self {
        ProbeState {
            timing,
            last_run: None,
            ok_streak: 0,
            fail_streak: 0,
            result: None,
        }
    }

    /// Should the probe run now, `since_start` after the container started?
    pub fn due(&self, since_start: Duration) -> bool {
        match self.last_run {
            None => since_start >= self.timing.initial_delay,
            Some(t) => since_start >= t + self.timing.period,
        }
    }

    /// How long until [`ProbeState::due`] turns true (zero when it is).
    pub fn until_due(&self, since_start: Duration) -> Duration {
        let at = match self.last_run {
            None => self.timing.initial_delay,
            Some(t) => t + self.timing.period,
        };
        at.saturating_sub(since_start)
    }

    /// Record one attempt's outcome; returns the new verdict when it changed.
    pub fn record(&mut self, since_start: Duration, ok: bool) -> Option<bool> {
        self.last_run = Some(since_start);
        if ok {
            self.ok_streak += 1;
            self.fail_streak = 0;
        } else {
            self.fail_streak += 1;
            self.ok_streak = 0;
        }
        let verdict = if ok && self.ok_streak >= self.timing.success_threshold {
            Some(true)
        } else if !ok && self.fail_streak >= self.timing.failure_threshold {
            Some(false)
        } else {
            None
        };
        match verdict {
            Some(v) if self.result != Some(v) => {
                self.result = Some(v);
                Some(v)
            }
            _ => None,
        }
    }
}

/// Outcome of running an action once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub ok: bool,
    pub message: String,
}

/// Run an httpGet action against `pod_ip` (or its `host`), in the calling thread's
/// network namespace. 2xx and 3xx are success, as in the kubelet.
pub fn http_get(
    pod_ip: IpAddr,
    host: Option<&str>,
    port: u16,
    path: &str,
    https: bool,
    headers: &[(String, String)],
    timeout: Duration,
) -> Outcome {
    if https {
        return Outcome {
            ok: false,
            message: "HTTPS probes are not supported by this runtime".into(),
        };
    }
    let ip = host.and_then(|h| h.parse().ok()).unwrap_or(pod_ip);
    let addr = SocketAddr::new(ip, port);
    let run = || -> std::io::Result<u16> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: kube-probe/1.34\r\nAccept: */*\r\nConnection: close\r\n",
            host.unwrap_or(&addr.to_string())
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())?;
        // Only the status line matters; read until we have it.
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        while !buf.contains(&b'\n') && buf.len() < 4096 {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&buf);
        line.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other("malformed HTTP response"))
    };
    match run() {
        Ok(code) if (200..400).contains(&code) => Outcome {
            ok: true,
            message: format!("HTTP {code}"),
        },
        Ok(code) => Outcome {
            ok: false,
            message: format!("HTTP probe failed with statuscode: {code}"),
        },
        Err(e) => Outcome {
            ok: false,
            message: format!("Get \"http://{addr}{path}\": {e}"),
        },
    }
}

/// Run a tcpSocket action: success when a connection opens within the timeout.
pub fn tcp_connect(pod_ip: IpAddr, host: Option<&str>, port: u16, timeout: Duration) -> Outcome {
    let ip = host.and_then(|h| h.parse().ok()).unwrap_or(pod_ip);
    let addr = SocketAddr::new(ip, port);
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(_) => Outcome {
            ok: true,
            message: String::new(),
        },
        Err(e) => Outcome {
            ok: false,
            message: format!("dial tcp {addr}: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(delay: u64, period: u64, succ: u32, fail: u32) -> ProbeTiming {
        ProbeTiming {
            initial_delay: Duration::from_secs(delay),
            period: Duration::from_secs(period),
            timeout: Duration::from_secs(1),
            success_threshold: succ,
            failure_threshold: fail,
        }
    }

    #[test]
    fn defaults() {
        let t = ProbeTiming::from_probe(&Probe::default());
        assert_eq!(t, timing(0, 10, 1, 3));
    }

    #[test]
    fn due_respects_initial_delay_and_period() {
        let mut p = ProbeState::new(timing(5, 10, 1, 3));
        let s = Duration::from_secs;
        assert!(!p.due(s(4)));
        assert!(p.due(s(5)));
        p.record(s(5), true);
        assert!(!p.due(s(14)));
        assert!(p.due(s(15)));
    }

    #[test]
    fn thresholds() {
        let s = Duration::from_secs;
        let mut p = ProbeState::new(timing(0, 1, 2, 3));
        assert_eq!(p.result, None);
        assert_eq!(p.record(s(0), true), None, "needs 2 successes");
        assert_eq!(p.record(s(1), true), Some(true));
        assert_eq!(p.record(s(2), false), None);
        assert_eq!(p.record(s(3), false), None);
        assert_eq!(
            p.record(s(4), true),
            None,
            "a success resets the failure streak"
        );
        assert_eq!(p.record(s(5), false), None);
        assert_eq!(p.record(s(6), false), None);
        assert_eq!(p.record(s(7), false), Some(false));
        assert_eq!(p.record(s(8), false), None, "no repeated transitions");
    }

    #[test]
    fn named_ports_resolve() {
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "c", "ports": [{"name": "http", "containerPort": 8080}]
        }))
        .unwrap();
        assert_eq!(
            resolve_port(&IntOrString::String("http".into()), &c),
            Some(8080)
        );
        assert_eq!(resolve_port(&IntOrString::String("x".into()), &c), None);
        assert_eq!(resolve_port(&IntOrString::Int(70000), &c), None);
    }
}
