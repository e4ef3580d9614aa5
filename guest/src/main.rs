//! `vmc-guest`: the guest agent binary. Parses the command line, loads and
//! validates the settings, and runs the agent until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;
use vmc_guest::identity::LocalSystem;
use vmc_guest::settings::{RawSettings, HELP};

const USAGE: &str = "\
vmc-guest: the vmcontroller guest agent. Runs commands and moves files for the
host agent, which it reaches through a STOMP broker. It needs no configuration
inside a VM; see the settings below to change anything.

Usage: vmc-guest [--config FILE]
       vmc-guest --version | --help

Options:
  -c, --config FILE   read settings from this TOML file
  -V, --version       print the version and the protocol version, and exit
  -h, --help          print this help, and exit

Logging: RUST_LOG=debug|info|warn|error (default info).
";

fn main() -> ExitCode {
    let mut config_file: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}\n{HELP}");
                return ExitCode::SUCCESS;
            }
            "-V" | "--version" => {
                println!(
                    "vmc-guest {} (protocol {})",
                    vmc_guest::VERSION,
                    vmc_guest::protocol::PROTOCOL_VERSION
                );
                return ExitCode::SUCCESS;
            }
            "-c" | "--config" => match args.next() {
                Some(file) => config_file = Some(PathBuf::from(file)),
                None => return usage_error("--config needs a file name"),
            },
            other => return usage_error(&format!("unknown argument {other:?}")),
        }
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let settings = match RawSettings::load(config_file.as_deref())
        .and_then(|raw| raw.validate(&LocalSystem))
    {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("vmc-guest: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("vmc-guest: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(vmc_guest::agent::run(settings, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmc-guest: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("vmc-guest: {message}\n\n{USAGE}");
    ExitCode::from(2)
}

/// An error and its sources, as one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers, Ctrl-C still ends the process the hard way.
            std::future::pending::<()>().await;
        }
    }
}
