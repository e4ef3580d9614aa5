//! `vmc`: the command-line client of the host agent's JSON API.
//!
//! Parses the command line into an [`args::Invocation`], runs it against the API
//! ([`commands`], over the small HTTP client of [`http`]) and prints what came back:
//! tables and sentences for people ([`show`]), the API's JSON with `--json` for
//! scripts. Every failure is a [`CliError`], printed once as `vmc: ...` on stderr,
//! with an exit code a script can test (see [`CliError::exit_code`] and the usage
//! text); `vmc run` exits with the remote command's own code. The client holds no
//! logic of an operation: the host agent does everything, the client only asks.

mod args;
mod commands;
mod http;
mod show;

use std::process::ExitCode;

/// Exit code: the API answered with an error (or a ping was not answered).
pub const EXIT_REMOTE: u8 = 1;
/// Exit code: the command line is wrong.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the host agent cannot be reached, or its answer broke off.
pub const EXIT_CONNECT: u8 = 3;
/// Exit code: a local file cannot be read or written (`vmc cp`).
pub const EXIT_LOCAL: u8 = 4;

/// Why `vmc` failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot connect to the host agent at {url}: {source} (is vmc-host running? set --url or VMC_URL)")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Broken(String),
    #[error("{name} ({code}): {message}")]
    Remote {
        status: u16,
        code: i64,
        name: String,
        message: String,
    },
    #[error("{0}")]
    Failed(String),
    #[error("{}: {source}", path.display())]
    Local {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the input: {0}")]
    Read(#[source] std::io::Error),
}

impl CliError {
    /// The exit code of this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Connect { .. } | CliError::Broken(_) => EXIT_CONNECT,
            CliError::Remote { .. } | CliError::Failed(_) => EXIT_REMOTE,
            CliError::Local { .. } | CliError::Read(_) => EXIT_LOCAL,
        }
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let invocation = match args::parse(&argv, std::env::var("VMC_URL").ok()) {
        Ok(invocation) => invocation,
        Err(e) => {
            eprintln!("vmc: {e}\nRun `vmc --help` for the commands.");
            return ExitCode::from(e.exit_code());
        }
    };
    match commands::run(&invocation) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Whatever was printed so far (a live output, a progress bar) ends first.
            eprintln!("vmc: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
