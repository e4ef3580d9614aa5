//! `vmc-host`: the host agent service. Parses the command line, loads and validates
//! the settings, starts the engine on an actix system and the XML-RPC/JSON API on
//! its listen address, prunes old records once an hour, and runs until SIGTERM or
//! SIGINT.

use std::process::ExitCode;
use std::time::Duration;
use vmc_host::engine::Engine;
use vmc_host::protocol::agent_main::{config_file_or_exit, error_chain, shutdown_signal};
use vmc_host::settings::{RawSettings, Settings, HELP};

const USAGE: &str = "\
vmc-host: the vmcontroller host agent. Drives this host's VMs and talks to their
guest agents through a STOMP broker.

Usage: vmc-host [--config FILE]
       vmc-host --version | --help
       vmc-host relay HOST:PORT   (run by QEMU: relays a guest's connection on
                                   stdin/stdout to the broker at HOST:PORT)

Options:
  -c, --config FILE   read settings from this TOML file
  -V, --version       print the version and the protocol version, and exit
  -h, --help          print this help, and exit

Logging: RUST_LOG=debug|info|warn|error (default info).
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [command, target] = args.as_slice() {
        if command == "relay" {
            return vmc_host::hypervisor::qemu::relay::run(target);
        }
    }
    let version = format!(
        "vmc-host {} (protocol {})",
        vmc_host::VERSION,
        vmc_host::protocol::PROTOCOL_VERSION
    );
    let config_file = match config_file_or_exit("vmc-host", USAGE, HELP, &version) {
        Ok(config_file) => config_file,
        Err(code) => return code,
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
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
