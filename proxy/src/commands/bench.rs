//! `vipr bench`: runs the benchmark (proxy/bench) and prints its table.

use std::process::ExitCode;

use anyhow::Result;
use vipr_bench::BenchOptions;

use crate::cli::BenchArgs;

pub fn bench(args: BenchArgs) -> Result<ExitCode> {
    let mut options = if args.quick {
        BenchOptions::quick(args.output)
    } else {
        BenchOptions::full(args.output)
    };
    if let Some(services) = args.services {
        options.services = services;
    }
    options.endpoints = usize::from(args.endpoints);
    if let Some(rounds) = args.rounds {
        options.rounds = usize::from(rounds);
    }
    if let Some(connections) = args.connections {
        options.connections = connections;
    }
    options.skip = args.skip;
    options.xdp_redirect = args.xdp_redirect;
    let results = vipr_bench::run(&options)?;
    print!("{}", results.table());
    println!(
        "results: {} and {}",
        options.output.join("results.json").display(),
        options.output.join("results.svg").display()
    );
    Ok(ExitCode::SUCCESS)
}
