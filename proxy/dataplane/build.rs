//! Builds the eBPF programs (ebpf/programs) with nightly for bpfel-unknown-none
//! and hands the objects to this crate through OUT_DIR, so a plain
//! `cargo build` of the workspace always embeds current objects: the data
//! plane's, and `vipr bench`'s packet tools.
//!
//! `VIPR_EBPF_OBJECT=/path/to/object` skips the nested build and embeds that
//! file instead (for machines without the eBPF toolchain), and
//! `VIPR_BENCH_EBPF_OBJECT` the bench tools' (without it, none: `vipr
//! bench` then says so).

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const EBPF_BIN: &str = "vipr-ebpf";
const BENCH_EBPF_BIN: &str = "vipr-bench-ebpf";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let workspace = manifest_dir.join("../..");
    let programs = workspace.join("ebpf/programs");
    println!("cargo:rerun-if-env-changed=VIPR_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=VIPR_BENCH_EBPF_OBJECT");

    let (object, bench_object) = match env::var_os("VIPR_EBPF_OBJECT") {
        Some(path) => (
            PathBuf::from(path),
            env::var_os("VIPR_BENCH_EBPF_OBJECT").map(PathBuf::from),
        ),
        None => {
            let built = build_ebpf(&workspace, &programs);
            (built.join(EBPF_BIN), Some(built.join(BENCH_EBPF_BIN)))
        }
    };
    std::fs::copy(&object, out_dir.join("vipr-ebpf.o"))
        .unwrap_or_else(|e| panic!("copying the eBPF object {}: {e}", object.display()));
    let bench_out = out_dir.join("vipr-bench-ebpf.o");
    match bench_object {
        Some(path) => std::fs::copy(&path, &bench_out)
            .map(drop)
            .unwrap_or_else(|e| panic!("copying the eBPF object {}: {e}", path.display())),
        None => std::fs::write(&bench_out, b"")
            .unwrap_or_else(|e| panic!("writing {}: {e}", bench_out.display())),
    }
}

fn build_ebpf(workspace: &Path, programs: &Path) -> PathBuf {
    for watched in [
        "src",
        "bench",
        "Cargo.toml",
        "Cargo.lock",
        ".cargo/config.toml",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            programs.join(watched).display()
        );
    }
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("ebpf/common/src").display()
    );

    // A target dir of its own that outlives this build script's OUT_DIR, so
    // `cargo build`, `clippy` and `test` share one eBPF build.
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("ebpf");

    let mut cargo = Command::new("rustup");
    cargo
        .current_dir(programs)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--release",
            "-Z",
            "build-std=core",
        ])
        .args(["--target", "bpfel-unknown-none", "--target-dir"])
        .arg(&target_dir);
    // The outer cargo's settings are for the host build, not this one.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("RUSTC")
            || (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key.starts_with("RUSTUP_TOOLCHAIN")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS"
        {
            cargo.env_remove(key.as_ref());
        }
    }
    let status = cargo.status().unwrap_or_else(|e| {
        panic!(
            "running `rustup run nightly cargo` for the eBPF programs: {e}; run `cargo xtask setup`"
        )
    });
    if !status.success() {
        panic!(
            "building the eBPF programs in {} failed ({status}); if nightly's rust-src or bpf-linker \
             is missing, run `cargo xtask setup`",
            programs.display()
        );
    }
    target_dir.join("bpfel-unknown-none/release")
}
