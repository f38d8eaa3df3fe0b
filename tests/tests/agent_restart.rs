//! A restarted agent (SIGKILL included) drops no packet and restarts no
//! container: a client pod keeps talking to a ClusterIP, over UDP (numbered
//! datagrams, one answer each) and TCP (a new connection per request),
//! while the agent is killed, stays down, comes back and resyncs, twice.
//! Every request must be answered, none late (a lost SYN or datagram shows
//! as a retransmit or a timeout of a second), and every pod keeps its uid,
//! start time and restart count.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use vipr_e2e::{
    agent::{AgentNode, client_pod, netexec_pod},
    require_root, spawn_in_netns,
};

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: udp, port: 81, targetPort: udp, protocol: UDP}
"#;

const PODS: [&str; 3] = ["web-1", "web-2", "client"];
/// A request not answered within this is lost (the kernel's first SYN
/// retransmit comes after 1 s, so a dropped SYN also lands here).
const ANSWER_TIMEOUT: Duration = Duration::from_millis(900);
/// Upper bound on the traffic, whatever the test does meanwhile.
const TRAFFIC_LIMIT: Duration = Duration::from_secs(90);
const MAX_REQUESTS: u64 = 100_000;
/// Between two requests: about a thousand a second, a few thousand across
/// each restart, without flooding the agent's debug log.
const PAUSE: Duration = Duration::from_micros(500);

/// What one client saw.
#[derive(Default)]
struct Tally {
    answered: u64,
    /// Requests without a (correct) answer in time: (number, what happened).
    lost: Vec<(u64, String)>,
    slowest: Duration,
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = &self.lost[..self.lost.len().min(5)];
        write!(
            f,
            "{} answered, {} lost (first: {shown:?}), slowest {:?}",
            self.answered,
            self.lost.len(),
            self.slowest
        )
    }
}

impl Tally {
    fn record(&mut self, number: u64, started: Instant, outcome: Result<()>) {
        let took = started.elapsed();
        self.slowest = self.slowest.max(took);
        match outcome {
            Ok(()) if took < ANSWER_TIMEOUT => self.answered += 1,
            Ok(()) => self.lost.push((number, format!("answered after {took:?}"))),
            Err(error) => self.lost.push((number, format!("{error:#}"))),
        }
    }
}

/// Numbered datagrams to `vip`, one at a time: `echo N` must come back as `N`.
fn udp_client(vip: SocketAddr, stop: Arc<AtomicBool>) -> Result<Tally> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(vip)?;
    socket.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let mut tally = Tally::default();
    let deadline = Instant::now() + TRAFFIC_LIMIT;
    let mut buf = [0u8; 64];
    for number in 0..MAX_REQUESTS {
        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
            break;
        }
        let started = Instant::now();
        let outcome = (|| -> Result<()> {
            socket.send(format!("echo {number}").as_bytes())?;
            // A late answer to an earlier datagram is skipped, not taken
            // for this one (that earlier one is already counted as lost).
            loop {
                let len = socket.recv(&mut buf).context("no answer")?;
                let answer: u64 = std::str::from_utf8(&buf[..len])?.trim().parse()?;
                if answer == number {
                    return Ok(());
                }
                ensure!(answer < number, "answer {answer} to datagram {number}");
            }
        })();
        tally.record(number, started, outcome);
        std::thread::sleep(PAUSE);
    }
    Ok(tally)
}

/// A new connection per request to `vip`: `GET /hostname` must answer 200.
fn tcp_client(vip: SocketAddr, stop: Arc<AtomicBool>) -> Result<Tally> {
    let mut tally = Tally::default();
    let deadline = Instant::now() + TRAFFIC_LIMIT;
    for number in 0..MAX_REQUESTS {
        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
            break;
        }
        let started = Instant::now();
        let outcome = (|| -> Result<()> {
            let mut conn = TcpStream::connect_timeout(&vip, ANSWER_TIMEOUT).context("connect")?;
            conn.set_read_timeout(Some(ANSWER_TIMEOUT))?;
            conn.write_all(b"GET /hostname HTTP/1.0\r\n\r\n")?;
            let mut answer = String::new();
            conn.read_to_string(&mut answer)
                .context("reading the answer")?;
            ensure!(answer.starts_with("HTTP/1.1 200"), "answer {answer:?}");
            Ok(())
        })();
        tally.record(number, started, outcome);
        std::thread::sleep(PAUSE);
    }
    Ok(tally)
}

/// What must not change about a pod across agent restarts.
fn identity(node: &AgentNode, pod: &str) -> Result<Value> {
    let pod = node.pod(pod)?;
    let status = &pod["status"];
    Ok(serde_json::json!({
        "uid": pod["metadata"]["uid"],
        "startTime": status["startTime"],
        "podIP": status["podIP"],
        "containers": status["containerStatuses"].as_array().map(|cs| cs.iter().map(|c| {
            serde_json::json!({"restartCount": c["restartCount"], "state": c["state"]})
        }).collect::<Vec<_>>()),
    }))
}

#[test]
fn a_killed_agent_drops_no_packet_and_restarts_no_container() -> Result<()> {
    require_root();
    let mut node = AgentNode::start("rst")?;
    node.apply(
        &[
            netexec_pod("web-1", "web"),
            netexec_pod("web-2", "web"),
            client_pod("client"),
            SERVICE.into(),
        ]
        .concat(),
    )?;
    node.wait_ready(&PODS, Duration::from_secs(30))?;
    let vip: std::net::Ipv4Addr = node.cluster_ip("web")?.parse()?;
    let before = PODS
        .iter()
        .map(|p| identity(&node, p))
        .collect::<Result<Vec<_>>>()?;
    for pod in &before {
        assert!(
            pod["containers"][0]["state"]["running"].is_object(),
            "{pod}"
        );
    }

    // The clients run in the client pod's network namespace: their packets
    // leave through its veth, where the node's XDP program translates them.
    let client_uid = before[2]["uid"].as_str().context("client uid")?;
    let netns = node.pod_netns(client_uid)?;
    let stop = Arc::new(AtomicBool::new(false));
    let udp = spawn_in_netns(&netns, {
        let stop = stop.clone();
        move || udp_client((vip, 81).into(), stop)
    })?;
    let tcp = spawn_in_netns(&netns, {
        let stop = stop.clone();
        move || tcp_client((vip, 80).into(), stop)
    })?;

    let traffic = (|| -> Result<()> {
        std::thread::sleep(Duration::from_secs(1));
        for _ in 0..2 {
            node.kill_agent();
            // Nobody programs anything meanwhile: the pinned maps and
            // links carry the traffic alone.
            std::thread::sleep(Duration::from_secs(1));
            // Back once it answers the CLI; its full sync runs meanwhile
            // and after, under traffic.
            node.restart_agent()?;
            node.wait_ready(&PODS, Duration::from_secs(30))?;
            std::thread::sleep(Duration::from_secs(2));
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let udp = udp.join().expect("UDP client thread")??;
    let tcp = tcp.join().expect("TCP client thread")??;
    traffic?;
    eprintln!("UDP: {udp:?}\nTCP: {tcp:?}");

    for (name, tally) in [("UDP", &udp), ("TCP", &tcp)] {
        assert!(
            tally.lost.is_empty(),
            "{name}: requests lost across agent restarts: {tally:?}"
        );
        // About seven seconds of back-to-back requests: far more than this
        // unless the clients stalled.
        assert!(tally.answered > 200, "{name}: only {tally:?}");
    }
    let after = PODS
        .iter()
        .map(|p| identity(&node, p))
        .collect::<Result<Vec<_>>>()?;
    assert_eq!(before, after, "a pod was restarted or replaced");
    Ok(())
}
