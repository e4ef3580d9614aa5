//! What the two agent binaries (`vmc-host`, `vmc-guest`) share around their
//! `main`: the command line (`--config FILE`, `--version`, `--help`), which `VMC_*`
//! variables are an agent's own, the one-line rendering of an error with its
//! causes, and the shutdown signal.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

/// What an agent's command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentArgs {
    /// Run, with settings from this TOML file if one was named.
    Run {
        config_file: Option<PathBuf>,
    },
    Help,
    Version,
}

/// Parses an agent's arguments (without the program name). The error is a
/// sentence for the user; print it with the usage and exit 2.
pub fn parse_agent_args(args: impl IntoIterator<Item = String>) -> Result<AgentArgs, String> {
    let mut config_file = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(AgentArgs::Help),
            "-V" | "--version" => return Ok(AgentArgs::Version),
            "-c" | "--config" => match args.next() {
                Some(file) => config_file = Some(PathBuf::from(file)),
                None => return Err("--config needs a file name".to_owned()),
            },
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(AgentArgs::Run { config_file })
}

/// The command line of the agent `name`, for `main`: `Ok(config file)` to run;
/// otherwise it has printed the help (`usage` then `settings`), the version line
/// (`version`) or, for bad arguments, the reason and the usage, and answers the
/// process's exit code (0, or 2 for bad arguments).
pub fn config_file_or_exit(
    name: &str,
    usage: &str,
    settings: &str,
    version: &str,
) -> Result<Option<PathBuf>, std::process::ExitCode> {
    match parse_agent_args(std::env::args().skip(1)) {
        Ok(AgentArgs::Run { config_file }) => Ok(config_file),
        // A closed stdout (`--help | head`) is no error: print! would panic on it.
        Ok(AgentArgs::Help) => {
            let _ = write!(std::io::stdout(), "{usage}\n{settings}");
            Err(std::process::ExitCode::SUCCESS)
        }
        Ok(AgentArgs::Version) => {
            let _ = writeln!(std::io::stdout(), "{version}");
            Err(std::process::ExitCode::SUCCESS)
        }
        Err(message) => {
            eprintln!("{name}: {message}\n\n{usage}");
            Err(std::process::ExitCode::from(2))
        }
    }
}

/// This agent's own settings among the `VMC_*` environment variables: those whose
/// `<KEY>` (any case) is one of `keys` (lower-case), named `VMC_<KEY>` upper-case
/// for the settings loader. Other `VMC_*` variables belong to the other agent or to
/// the deployment scripts and are left alone.
pub fn own_vmc_variables(
    vars: impl IntoIterator<Item = (String, String)>,
    keys: &[&str],
) -> HashMap<String, String> {
    vars.into_iter()
        .filter_map(|(name, value)| {
            let key = name.strip_prefix("VMC_")?.to_ascii_lowercase();
            keys.contains(&key.as_str())
                .then(|| (format!("VMC_{}", key.to_ascii_uppercase()), value))
        })
        .collect()
}

/// An error and its sources, as one line: `outer: cause: root cause`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Completes on SIGTERM or SIGINT. Without signal handlers (they could not be
/// installed) it never completes, and Ctrl-C ends the process the hard way.
pub async fn shutdown_signal() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<AgentArgs, String> {
        parse_agent_args(args.iter().map(|a| (*a).to_owned()))
    }

    #[test]
    fn arguments_are_understood_or_refused_with_a_reason() {
        assert_eq!(parse(&[]), Ok(AgentArgs::Run { config_file: None }));
        assert_eq!(
            parse(&["-c", "/etc/vmc.toml"]),
            Ok(AgentArgs::Run {
                config_file: Some(PathBuf::from("/etc/vmc.toml"))
            })
        );
        assert_eq!(parse(&["--config", "a", "--help"]), Ok(AgentArgs::Help));
        assert_eq!(parse(&["-V"]), Ok(AgentArgs::Version));
        assert_eq!(
            parse(&["--config"]),
            Err("--config needs a file name".into())
        );
        assert_eq!(
            parse(&["--frobnicate"]),
            Err("unknown argument \"--frobnicate\"".into())
        );
    }

    #[test]
    fn only_this_agents_own_variables_are_taken() {
        let vars = [
            ("VMC_BROKER", "stomp://127.0.0.1:61613"),
            ("VMC_beacon_interval", "2"),
            ("VMC_LISTEN", "127.0.0.1:1"),
            ("PATH", "/bin"),
            ("VMCX_BROKER", "x"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let ours = own_vmc_variables(vars, &["broker", "beacon_interval"]);
        let mut names: Vec<_> = ours.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["VMC_BEACON_INTERVAL", "VMC_BROKER"]);
        assert_eq!(ours["VMC_BEACON_INTERVAL"], "2");
    }

    #[test]
    fn an_error_chain_names_every_cause() {
        let root = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let outer = std::io::Error::other(Wrapped(root));
        assert_eq!(error_chain(&outer), "cannot open: no such file");
    }

    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("cannot open")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
