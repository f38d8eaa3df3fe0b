//! eBPF log lines reach the `log` facade (and so the agent's tracing output)
//! at debug level, and cost nothing but a comparison when debug is off.

mod packet;

use std::{
    net::Ipv4Addr,
    sync::{Mutex, OnceLock},
};

use packet::Ipv4Packet;
use vipr_dataplane::{BackendAddr, Dataplane, DataplaneOptions, Frontend, Port, Protocol};

/// Captures every record handed to the `log` facade.
struct Capture(Mutex<Vec<(log::Level, String)>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let line = record.args().to_string();
        self.0.lock().unwrap().push((record.level(), line));
    }
    fn flush(&self) {}
}

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        log::set_logger(capture).unwrap();
        capture
    })
}

fn new_flow_lines(level: log::LevelFilter) -> Vec<(log::Level, String)> {
    let capture = capture();
    let mut dp = Dataplane::load(&DataplaneOptions {
        ebpf_log_level: level,
        ..DataplaneOptions::default()
    })
    .expect("load (needs root)");
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    dp.program_service(
        Frontend {
            addr: vip,
            port: Port::new(80).unwrap(),
            protocol: Protocol::Tcp,
        },
        &[BackendAddr {
            addr: Ipv4Addr::new(10, 244, 1, 5),
            port: Port::new(8080).unwrap(),
        }],
    )
    .unwrap();
    capture.0.lock().unwrap().clear();
    let packet = Ipv4Packet::tcp((Ipv4Addr::new(10, 244, 0, 7), 40000), (vip, 80)).build();
    let mut out = vec![0u8; packet.len() + 64];
    dp.test_run(&packet, &mut out, 1).unwrap();
    dp.flush_logs();
    capture.0.lock().unwrap().drain(..).collect()
}

#[test]
fn new_flows_are_logged_at_debug_only_when_enabled() {
    log::set_max_level(log::LevelFilter::Debug);
    let lines = new_flow_lines(log::LevelFilter::Debug);
    assert!(
        lines.iter().any(|(level, line)| *level == log::Level::Debug
            && line.contains("new flow 10.244.0.7:40000 -> 10.244.1.5:8080 via 10.96.0.10:80")),
        "no debug line for the new flow in {lines:?}"
    );
    let lines = new_flow_lines(log::LevelFilter::Info);
    assert!(lines.is_empty(), "info level still logged {lines:?}");
}
