//! `vmc-host`: the host agent service. Parses the command line, loads and validates
//! the settings, starts the engine on an actix system and the XML-RPC/JSON API on
//! its listen address, prunes old records once an hour, and runs until SIGTERM or
//! SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use vmc_host::engine::Engine;
use vmc_host::settings::{RawSettings, Settings, HELP};

const USAGE: &str = "\
vmc-host: the vmcontroller host agent. Drives this host's VMs and talks to their
guest agents through a STOMP broker.

Usage: vmc-host [--config FILE]
       vmc-host --version | --help

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
                    "vmc-host {} (protocol {})",
                    vmc_host::VERSION,
                    vmc_host::protocol::PROTOCOL_VERSION
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
    let settings = match RawSettings::load(config_file.as_deref()).and_then(RawSettings::validate) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("vmc-host: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    match actix_rt::System::new().block_on(serve(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmc-host: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> Result<(), String> {
    let engine = Engine::start(settings.engine)
        .await
        .map_err(|e| error_chain(&e))?;
    let server = vmc_host::api::server::serve(engine.clone(), settings.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
    let server_handle = server.handle();
    actix_rt::spawn(server); // a server runs only once spawned or awaited
    log::info!(
        "vmc-host {} is serving XML-RPC and JSON on {}",
        vmc_host::VERSION,
        settings.listen
    );
    let retention = settings.retention;
    let pruner = engine.clone();
    actix_rt::spawn(async move {
        let mut hourly = tokio::time::interval(Duration::from_secs(3600));
        loop {
            hourly.tick().await;
            let cutoff = chrono::Utc::now()
                - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::days(30));
            match pruner.store().prune(cutoff) {
                Ok(report) => log::info!("retention: {report:?}"),
                Err(e) => log::error!("retention pruning failed: {}", error_chain(&e)),
            }
        }
    });
    shutdown_signal().await;
    log::info!("shutting down");
    server_handle.stop(true).await;
    engine.shutdown().await;
    Ok(())
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("vmc-host: {message}\n\n{USAGE}");
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
        _ => std::future::pending::<()>().await,
    }
}
