//! `vmc-guest`: the guest agent binary. Parses the command line, loads and
//! validates the settings, and runs the agent until SIGTERM or SIGINT.

use std::process::ExitCode;
use vmc_guest::identity::LocalSystem;
use vmc_guest::protocol::agent_main::{config_file_or_exit, error_chain, shutdown_signal};
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
    let version = format!(
        "vmc-guest {} (protocol {})",
        vmc_guest::VERSION,
        vmc_guest::protocol::PROTOCOL_VERSION
    );
    let config_file = match config_file_or_exit("vmc-guest", USAGE, HELP, &version) {
        Ok(config_file) => config_file,
        Err(code) => return code,
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
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
