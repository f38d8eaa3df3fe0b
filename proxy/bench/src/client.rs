//! The connection load: new TCP connections timed one by one, from a
//! thread inside the outside namespace, so every packet crosses the node's
//! uplink like a real client's. (The UDP flood is `flood`.)

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use rand::Rng;

/// A connection that takes longer than this counts as failed. Three
/// seconds leaves room for one SYN retransmit (the first comes after 1 s):
/// a single lost packet makes a slow connection, counted as such, not a
/// failed one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A connection slower than this waited for a SYN or SYN-ACK retransmit.
const RETRANSMIT_LATENCY: Duration = Duration::from_millis(900);
/// Failures tolerated before a mode's figures are called broken.
const MAX_FAILURES: usize = 5;

pub struct Connections {
    /// Time from `connect()` to established, per connection, in µs.
    pub latencies_us: Vec<f64>,
    /// Connections a second one client opens back to back (each timed
    /// from `connect()` to its close).
    pub per_second: f64,
    pub failures: usize,
    /// Connections that needed a SYN retransmit (a packet was lost).
    pub retransmitted: usize,
}

impl Connections {
    fn new(count: usize) -> Self {
        Connections {
            latencies_us: Vec::with_capacity(count),
            per_second: 0.0,
            failures: 0,
            retransmitted: 0,
        }
    }
}

/// Opens `count` connections one after another, each to a target `pick`
/// chooses at random among `targets`, and closes each at once. With
/// `alongside`, each is followed by one to the target `alongside` picks
/// (a pod, directly), timed on its own: the two paths are measured at the
/// same moments, so the machine's drift (on a shared VM, the rounds' medians
/// move by more than the difference measured) hits both alike.
pub fn connect_many(
    count: usize,
    targets: usize,
    pick: impl Fn(usize) -> (Ipv4Addr, u16),
    alongside: Option<&(dyn Fn(usize) -> (Ipv4Addr, u16) + Sync)>,
) -> Result<(Connections, Option<Connections>)> {
    let mut rng = rand::rng();
    let mut main = Connections::new(count);
    let mut paired = alongside.map(|_| Connections::new(count));
    let (mut main_time, mut paired_time) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..count {
        let i = rng.random_range(0..targets);
        main_time += connect_once(pick(i), &mut main)?;
        if let (Some(direct), Some(paired)) = (alongside, paired.as_mut()) {
            paired_time += connect_once(direct(i), paired)?;
        }
    }
    main.per_second = main.latencies_us.len() as f64 / main_time.as_secs_f64().max(1e-9);
    if let Some(paired) = paired.as_mut() {
        paired.per_second = paired.latencies_us.len() as f64 / paired_time.as_secs_f64().max(1e-9);
    }
    Ok((main, paired))
}

/// One connection to `target`, timed into `tally`; returns how long the
/// whole open and close took.
fn connect_once((addr, port): (Ipv4Addr, u16), tally: &mut Connections) -> Result<Duration> {
    let begin = Instant::now();
    match TcpStream::connect_timeout(&SocketAddr::from((addr, port)), CONNECT_TIMEOUT) {
        Ok(stream) => {
            let took = begin.elapsed();
            tally.retransmitted += usize::from(took > RETRANSMIT_LATENCY);
            tally.latencies_us.push(took.as_secs_f64() * 1e6);
            reset_on_close(&stream);
        }
        Err(error) => {
            tally.failures += 1;
            if tally.failures > MAX_FAILURES {
                bail!("connections to {addr}:{port} fail: {error}");
            }
        }
    }
    Ok(begin.elapsed())
}

/// Makes closing send RST instead of FIN, so thousands of timed
/// connections leave no TIME_WAIT entries behind on the client.
fn reset_on_close(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
