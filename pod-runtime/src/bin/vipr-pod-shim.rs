//! Stand-in for the `vipr` binary's hidden shim command, used by this crate's tests:
//! `vipr-pod-shim POD_DIR HOSTNAME`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(vipr_pod_runtime::shim::main(&args));
}
