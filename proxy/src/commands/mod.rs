//! The client commands: each turns its arguments into one API request and
//! prints the answer the way kubectl would.

mod datapath;
mod get;
mod rollout;

pub use bench::bench;

mod bench;

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result, bail};

use crate::{
    api::{self, Request, Response},
    cli::{Command, LbCommand, ServiceCommand},
};

pub fn run(command: Command, socket: &Path) -> Result<ExitCode> {
    match command {
        Command::Agent(_) | Command::Bench(_) => {
            unreachable!("the agent and the benchmark are not client commands")
        }
        Command::Apply { files } => {
            let manifests = read_manifests(&files)?;
            print_done(api::call(socket, &Request::Apply { manifests })?)
        }
        Command::Delete {
            files,
            kind,
            name,
            namespace,
        } => {
            let request = match (files.is_empty(), kind, name) {
                (false, _, _) => Request::DeleteManifests {
                    manifests: read_manifests(&files)?,
                },
                (true, Some(kind), Some(name)) => Request::Delete {
                    kind,
                    namespace,
                    name,
                },
                _ => bail!("give -f FILE, or KIND NAME"),
            };
            print_done(api::call(socket, &request)?)
        }
        Command::Get(args) => get::run(socket, args),
        Command::Describe {
            kind,
            name,
            namespace,
        } => get::describe(socket, kind, name, namespace),
        Command::Logs {
            pod,
            container,
            namespace,
        } => print_done(api::call(
            socket,
            &Request::Logs {
                namespace,
                pod,
                container,
            },
        )?),
        Command::Exec {
            pod,
            container,
            namespace,
            command,
        } => exec(socket, pod, container, namespace, command),
        Command::Scale(args) => rollout::scale(socket, args),
        Command::Set(command) => rollout::set(socket, command),
        Command::Rollout(command) => rollout::rollout(socket, command),
        Command::Service {
            command: ServiceCommand::List { output },
        } => datapath::service_list(socket, output),
        Command::Lb {
            command: LbCommand::List { raw, output },
        } => datapath::lb_list(socket, raw, output),
        Command::Trace(args) => datapath::trace(socket, args),
        Command::Monitor(args) => datapath::monitor(socket, args),
    }
}

fn exec(
    socket: &Path,
    pod: String,
    container: Option<String>,
    namespace: Option<String>,
    command: Vec<String>,
) -> Result<ExitCode> {
    let request = Request::Exec {
        namespace,
        pod,
        container,
        command,
    };
    match api::call(socket, &request)? {
        Response::Exec {
            code,
            stdout,
            stderr,
        } => {
            print!("{stdout}");
            eprint!("{stderr}");
            Ok(match code {
                Some(0) => ExitCode::SUCCESS,
                Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                None => {
                    eprintln!("error: the command timed out and was killed");
                    ExitCode::FAILURE
                }
            })
        }
        other => print_done(other),
    }
}

/// Prints a `Done` answer's lines; turns an error answer into an error.
pub(crate) fn print_done(response: Response) -> Result<ExitCode> {
    match response {
        Response::Done { lines } => {
            for line in lines {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the agent: {other:?}"),
    }
}

/// Concatenates the manifests in files, folders (their .yaml/.yml/.json
/// files, sorted) and `-` (stdin) into one multi-document stream.
fn read_manifests(paths: &[PathBuf]) -> Result<String> {
    let mut documents = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading manifests from stdin")?;
            documents.push(text);
        } else if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
                })
                .collect();
            files.sort();
            for file in files {
                documents.push(read_file(&file)?);
            }
        } else {
            documents.push(read_file(path)?);
        }
    }
    Ok(documents.join("\n---\n"))
}

fn read_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}
