//! `cargo xtask setup`: brings a fresh machine to what vipr's build and tests
//! need, and checks quickly when everything is already there.
//!
//! The eBPF toolchain recipe (nightly's own LLVM for bpf-linker) is the one
//! verified in ../shared/TOOLCHAIN.md.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// Debian packages the project uses, with the reason it needs each.
const PACKAGES: &[(&str, &str)] = &[
    (
        "iproute2",
        "tests build network namespaces and veths with `ip`",
    ),
    (
        "iptables",
        "`vipr bench` compares with kube-proxy's iptables rules",
    ),
    (
        "nftables",
        "`vipr bench` compares with kube-proxy's nftables rules",
    ),
    ("bpftool", "inspecting loaded programs and pinned maps"),
    ("dnsutils", "`dig` for the cluster DNS tests"),
    ("dnsperf", "the cluster DNS benchmark"),
    ("nsd", "the cluster DNS benchmark's reference server"),
    ("iputils-ping", "connectivity checks in the quickstart"),
    ("curl", "the quickstart's HTTP requests"),
    (
        "netcat-openbsd",
        "`nc -u` for UDP through a ClusterIP (quickstart, tests)",
    ),
    ("python3", "simple workloads in pod runtime tests"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const BPFFS: &str = "/sys/fs/bpf";

pub fn run() -> Result<()> {
    if !is_root() {
        bail!("setup installs packages and mounts bpffs: run it as root");
    }
    install_packages()?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_bpffs()?;
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn install_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !package_installed(name))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    run_quiet(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update (are Debian's package servers reachable?)")?;
    run_quiet(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("apt-get install {}", missing.join(" ")))
}

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn nightly_sysroot() -> Result<PathBuf> {
    let output = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("running rustup: is rustup installed?")?;
    if !output.status.success() {
        bail!(
            "the nightly toolchain is missing (the eBPF programs build with it); \
             install it with `rustup toolchain install nightly`: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8(output.stdout)?.trim()))
}

fn ensure_rust_src() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    let core = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if core.exists() {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to nightly (for -Z build-std=core)");
    if run_quiet(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
    .is_ok()
    {
        return Ok(());
    }
    // The offline copy shipped beside the project, for a machine whose
    // rustup cannot reach its server.
    let tarball = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/toolchain/rust-src-nightly-2026-05-20.tar.xz");
    if !tarball.exists() {
        bail!(
            "rustup could not add rust-src to nightly and no offline copy is at {}",
            tarball.display()
        );
    }
    eprintln!(
        "setup: rustup failed; unpacking the offline rust-src from {}",
        tarball.display()
    );
    run_quiet(
        Command::new("tar")
            .arg("-xJf")
            .arg(&tarball)
            .arg("-C")
            .arg(sysroot.join("lib/rustlib")),
    )?;
    if !core.exists() {
        bail!(
            "unpacked {} but {} is still missing",
            tarball.display(),
            core.display()
        );
    }
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    let works = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if works {
        return Ok(());
    }
    let sysroot = nightly_sysroot()?;
    let (llvm_major, linker_script, library) = nightly_llvm(&sysroot.join("lib"))?;
    // bpf-linker keeps an rpath to this prefix: it must outlive the build.
    let prefix = home()?
        .join(".cache/vipr")
        .join(format!("llvm-{llvm_major}"));
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    symlink_fresh(&linker_script, &lib.join("libLLVM.so"))?;
    symlink_fresh(&library, &lib.join(library.file_name().unwrap()))?;
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {llvm_major} \
         (about a minute)"
    );
    run_quiet(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{llvm_major}"))
            .env("LLVM_PREFIX", &prefix)
            .current_dir(std::env::temp_dir()),
    )
    .context("cargo install bpf-linker")
}

/// Finds nightly's LLVM: its major version, the `libLLVM-N-rust-*.so` linker
/// script and the versioned library that script names.
fn nightly_llvm(lib_dir: &Path) -> Result<(u32, PathBuf, PathBuf)> {
    let mut script = None;
    let mut library = None;
    for entry in
        std::fs::read_dir(lib_dir).with_context(|| format!("reading {}", lib_dir.display()))?
    {
        let path = entry?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("libLLVM-") && name.ends_with(".so") && name.contains("-rust-") {
            let major = name["libLLVM-".len()..]
                .split(['-', '.'])
                .next()
                .and_then(|m| m.parse::<u32>().ok());
            script = major.map(|m| (m, path.clone()));
        } else if name.starts_with("libLLVM.so.") && name.contains("-rust-") {
            library = Some(path);
        }
    }
    match (script, library) {
        (Some((major, script)), Some(library)) => Ok((major, script, library)),
        _ => bail!(
            "nightly's own LLVM (libLLVM-*-rust-*.so and libLLVM.so.*-rust-*) is not in {}; \
             bpf-linker needs it",
            lib_dir.display()
        ),
    }
}

fn symlink_fresh(target: &Path, link: &Path) -> Result<()> {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}

fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some(BPFFS) && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        return Ok(());
    }
    eprintln!("setup: mounting bpffs at {BPFFS} (for pinned maps)");
    run_quiet(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

fn home() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME is not set")
}

/// Runs a command, showing its output only when it fails.
fn run_quiet(cmd: &mut Command) -> Result<()> {
    let output = cmd
        .output()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !output.status.success() {
        bail!(
            "{:?} failed ({}):\n{}{}",
            cmd.get_program(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
