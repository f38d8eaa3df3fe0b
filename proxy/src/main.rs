//! `vipr`: the node agent and the command line that talks to it.

mod agent;
mod api;
mod cli;
mod commands;
mod metrics;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command, LogFormat};

/// argv[1] that makes this binary a pod shim (the runtime re-executes the
/// agent's own binary as each pod's holder process). Not a clap subcommand:
/// people never type it, and `--help` lists only what they use.
pub const POD_SHIM_COMMAND: &str = "__pod-shim";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(POD_SHIM_COMMAND) {
        let code = vipr_pod_runtime::shim::main(&args[2..]);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Agent(args) => agent::run(*args, cli.api_socket),
        Command::Bench(args) => commands::bench(args),
        other => commands::run(other, &cli.api_socket),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr; `RUST_LOG` filters (default info; eBPF log lines are
/// forwarded at debug).
fn init_tracing(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
