//! A fresh network namespace for one test thread: BPF_PROG_TEST_RUN runs
//! the program in the calling thread's namespace, so route lookups from the
//! program (the fast path's FIB lookup) see the routes and neighbours built
//! there. The namespace vanishes with the thread, also when the test fails.

#![allow(dead_code)]

use std::{net::Ipv4Addr, process::Command};

/// Runs `test` on a thread of its own in a fresh network namespace.
pub fn in_fresh_netns(test: impl FnOnce() + Send) {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare of the calling thread's network namespace only.
                let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
                test();
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    });
}

/// Runs `ip` in the calling thread's namespace (a child forked from this
/// thread shares it).
pub fn ip(args: &str) {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("running ip");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn mac(bytes: [u8; 6]) -> String {
    bytes.map(|b| format!("{b:02x}")).join(":")
}

/// Forwarding on and loopback (BPF_PROG_TEST_RUN's ingress) up.
pub fn enable_forwarding() {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
    ip("link set lo up");
}

/// A veth `name` with address `mac`, its peer (`<name>-peer`) kept in the
/// namespace, both up.
pub fn veth(name: &str, address: [u8; 6]) {
    ip(&format!(
        "link add {name} address {} type veth peer name {name}-peer",
        mac(address)
    ));
    ip(&format!("link set {name}-peer up"));
    ip(&format!("link set {name} up"));
}

/// A /32 route to `addr` through `dev`, with its neighbour at `address`
/// when given (else the neighbour stays unresolved).
pub fn routed_host(addr: Ipv4Addr, dev: &str, address: Option<[u8; 6]>) {
    ip(&format!("route add {addr}/32 dev {dev}"));
    if let Some(address) = address {
        ip(&format!(
            "neigh add {addr} lladdr {} dev {dev} nud permanent",
            mac(address)
        ));
    }
}
