//! vipr's project tasks. `cargo xtask setup | build | test | run`.
//!
//! Every task first makes sure the machine has what it needs (`setup`), so a
//! fresh clone needs no manual step; on a machine that has everything, setup
//! takes well under a second.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "vipr's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks: Debian packages, nightly rust-src,
    /// bpf-linker, a mounted bpffs. Idempotent.
    Setup,
    /// Build the eBPF object and the userspace binaries (release).
    Build,
    /// Setup, build, format and lint gates, then every test tier.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// The quickstart: the agent on a demo node with the example manifests.
    Run,
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::run()?;
            build(&root)
        }
        Task::Test { cargo_args } => {
            setup::run()?;
            test(&root, &cargo_args)
        }
        Task::Run => {
            setup::run()?;
            // The debug profile: shared with `cargo xtask test`, so the
            // quickstart after the tests builds nothing new.
            step("build", || {
                cargo(&root, &["build", "--workspace", "--bins"])
            })?;
            quickstart(&root)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The eBPF object is built by proxy/dataplane's build script with nightly
/// and embedded into the `vipr` binary, so one cargo build does both.
fn build(root: &Path) -> Result<()> {
    step("build", || {
        cargo(root, &["build", "--release", "--workspace", "--bins"])
    })
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    if !setup::is_root() {
        bail!("the tests load eBPF programs and create network namespaces: run them as root");
    }
    step("format check", || {
        cargo(root, &["fmt", "--all", "--", "--check"])?;
        // The eBPF programs are a workspace of their own, which `--all`
        // does not reach: rustfmt follows each crate root's modules.
        let programs = root.join("ebpf/programs");
        let status = Command::new("rustfmt")
            .args(["--edition", "2024", "--check"])
            .arg(programs.join("src/main.rs"))
            .arg(programs.join("bench/main.rs"))
            .status()
            .context("running rustfmt on the eBPF programs")?;
        if !status.success() {
            bail!(
                "rustfmt: the eBPF programs are not formatted (run rustfmt --edition 2024 on ebpf/programs/src/main.rs and bench/main.rs)"
            );
        }
        Ok(())
    })?;
    step("clippy", || {
        cargo(
            root,
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        )
    })?;
    // Build the binaries the end-to-end tests run, then every tier at once:
    // unit tests, packet fixtures, end-to-end.
    step("build test binaries", || {
        cargo(root, &["build", "--workspace", "--bins"])
    })?;
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    step("tests", || cargo(root, &args))
}

fn quickstart(root: &Path) -> Result<()> {
    let script = root.join("examples/quickstart.sh");
    let status = Command::new("bash")
        .arg(&script)
        .current_dir(root)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("the quickstart failed ({status})");
    }
    Ok(())
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs one named step, printing how long it took.
fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    eprintln!("==> {name}");
    let start = Instant::now();
    let result = f();
    eprintln!(
        "==> {name}: {} in {:.1}s",
        if result.is_ok() { "ok" } else { "FAILED" },
        start.elapsed().as_secs_f64()
    );
    result
}
