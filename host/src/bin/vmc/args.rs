//! The command line of `vmc`, parsed by hand into an [`Invocation`]: the global
//! options (anywhere before `--`) and one [`Command`] with its own arguments.
//! Every mistake is a [`CliError::Usage`] naming it.

use crate::CliError;
use std::path::PathBuf;

/// Where `vmc` looks for the API when neither `--url` nor `VMC_URL` says.
pub const DEFAULT_URL: &str = "http://127.0.0.1:50505";

pub const USAGE: &str = "\
vmc: the command-line client of the vmcontroller host agent (vmc-host), speaking
its JSON API.

Usage: vmc [--url URL] [--json] COMMAND [ARGS...]

VMs:
  vms                              list the VMs (unmanaged guests included)
  vm VM                            one VM, its guest and presence
  create VM [IMAGE]                create a VM booting from a disk image on the host
  remove VM                        remove a VM and its files
  start|shutdown|sleep|reset|poweroff|pause|resume|savestate|discardstate VM
                                   a lifecycle action; prints the VM's state
  snapshots VM                     list a VM's snapshots
  snapshot take VM SNAP [--description TEXT]
  snapshot restore VM SNAP
  snapshot delete VM SNAP
  guests                           every guest's presence
  ping VM [--timeout SECS]         does the guest agent answer? (exit 1 if not)
Commands:
  run [OPTIONS] VM -- CMD [ARGS...]
  run [OPTIONS] --glob GLOB -- CMD [ARGS...]
                                   run a command (no shell), stream its output live
                                   and exit with its exit code; with --glob on every
                                   VM the glob matches, output lines prefixed [VM]
      -e, --env NAME=VALUE         add to its environment (repeatable)
      --cwd DIR                    its working directory on the guest
      --stdin FILE                 feed it this file of the guest
      --timeout SECS               have the guest kill it after SECS
      -d, --detach                 print the command id(s) and return at once
  commands [--vm VM] [--state STATE[,STATE]] [--limit N]
                                   the newest commands
  command CMD                      a command's details (live usage while it runs)
  result CMD [--wait SECS]         a finished command's result and output
  cancel CMD                       cancel a command
Files:
  cp LOCAL VM:REMOTE               copy a file to a guest (LOCAL - reads stdin)
  cp VM:REMOTE LOCAL               copy a guest's file here (LOCAL - writes stdout)
      --progress, --no-progress    show a progress bar on stderr (default: when
                                   stderr is a terminal)
  transfers [--vm VM]              file transfers
  transfer ID                      one transfer's progress
Host:
  events [--vm VM[,VM]] [--cmd CMD[,CMD]]
                                   follow the live event stream
  health                           the host agent's health (exit 1 if degraded)
  host                             version, backend, broker and counts
  version                          this client's and the host agent's versions

Options:
  --url URL       the API (default $VMC_URL, else http://127.0.0.1:50505)
  --json          print the API's JSON instead of tables (one object per line
                  for `events`)
  -h, --help      print this help
  -V, --version   print this client's version

Exit codes:
  0    success
  1    the host agent answered with an error (unknown VM, not supported, ...),
       a ping was not answered, or the health is degraded
  2    the command line is wrong
  3    the host agent cannot be reached, or its answer broke off
  4    a local file cannot be read or written
  run: the remote command's exit code; 128+N when signal N ended it; 124 when
       it timed out; 127 when it failed to start; 125 when it was cancelled or
       lost. With --glob: the highest of its targets' codes.
";

/// The global options and the command.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    pub url: String,
    pub json: bool,
    /// `--progress` / `--no-progress`; `None`: when stderr is a terminal.
    pub progress: Option<bool>,
    pub command: Command,
}

/// What to run a command on.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Vm(String),
    Glob(String),
}

/// `vmc run`'s arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub target: Target,
    pub cmd: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub stdin: Option<String>,
    pub timeout: Option<f64>,
    pub detach: bool,
}

/// One end of a copy.
#[derive(Debug, Clone, PartialEq)]
pub enum Place {
    /// A local file; `-` is stdin or stdout.
    Local(PathBuf),
    Guest {
        vm: String,
        path: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum SnapshotOp {
    Take { description: String },
    Restore,
    Delete,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Help,
    Version,
    Vms,
    Vm(String),
    Create {
        vm: String,
        image: String,
    },
    Remove(String),
    /// A lifecycle action, named as the API names it.
    Action {
        action: &'static str,
        vm: String,
    },
    Snapshots(String),
    Snapshot {
        op: SnapshotOp,
        vm: String,
        name: String,
    },
    Guests,
    Ping {
        vm: String,
        timeout: Option<f64>,
    },
    Run(Run),
    Commands {
        vm: Option<String>,
        state: Option<String>,
        limit: Option<u32>,
    },
    Details(String),
    Result {
        cmd: String,
        wait: Option<f64>,
    },
    Cancel(String),
    Cp {
        from: Place,
        to: Place,
    },
    Transfers {
        vm: Option<String>,
    },
    Transfer(String),
    Events {
        vm: Option<String>,
        cmd: Option<String>,
    },
    Health,
    Host,
}

/// The API's action for a command-line word (several spellings each).
fn action(word: &str) -> Option<&'static str> {
    let action = match word.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
        "start" => "start",
        "shutdown" => "shutdown",
        "sleep" => "sleep",
        "reset" => "reset",
        "poweroff" => "powerOff",
        "pause" => "pause",
        "resume" | "unpause" => "resume",
        "savestate" => "saveState",
        "discardstate" => "discardState",
        _ => return None,
    };
    Some(action)
}

fn usage(message: impl Into<String>) -> CliError {
    CliError::Usage(message.into())
}

/// The words after the command name, consumed in order.
struct Words<'a> {
    command: &'a str,
    words: std::collections::VecDeque<&'a str>,
}

impl<'a> Words<'a> {
    fn positional(&mut self, what: &str) -> Result<String, CliError> {
        match self.words.pop_front() {
            Some(word) if !word.starts_with('-') || word == "-" => Ok(word.to_owned()),
            Some(word) => Err(usage(format!(
                "{}: unknown option {word:?} (expected {what})",
                self.command
            ))),
            None => Err(usage(format!("{}: {what} is missing", self.command))),
        }
    }

    fn optional_positional(&mut self) -> Option<String> {
        match self.words.front() {
            Some(word) if !word.starts_with('-') => self.words.pop_front().map(str::to_owned),
            _ => None,
        }
    }

    /// The value of an option just taken.
    fn value(&mut self, option: &str) -> Result<String, CliError> {
        self.words
            .pop_front()
            .map(str::to_owned)
            .ok_or_else(|| usage(format!("{}: {option} needs a value", self.command)))
    }

    fn number(&mut self, option: &str) -> Result<f64, CliError> {
        let text = self.value(option)?;
        text.parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && *n >= 0.0)
            .ok_or_else(|| {
                usage(format!(
                    "{}: {option} needs a number of seconds, not {text:?}",
                    self.command
                ))
            })
    }

    fn next_option(&mut self) -> Option<&'a str> {
        self.words.pop_front()
    }

    fn unknown(&self, word: &str) -> CliError {
        usage(format!("{}: unexpected argument {word:?}", self.command))
    }

    fn done(&self) -> Result<(), CliError> {
        match self.words.front() {
            None => Ok(()),
            Some(word) => Err(self.unknown(word)),
        }
    }
}

/// Parses the arguments after the program name; `env_url` is `$VMC_URL`.
pub fn parse(argv: &[String], env_url: Option<String>) -> Result<Invocation, CliError> {
    let mut url = env_url.filter(|u| !u.is_empty());
    let mut json = false;
    let mut progress = None;
    let mut help = false;
    let mut rest: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        let arg = argv[i].as_str();
        if arg == "--" {
            rest.extend(argv[i..].iter().map(String::as_str));
            break;
        }
        match arg {
            "--url" => {
                i += 1;
                url = Some(
                    argv.get(i)
                        .cloned()
                        .ok_or_else(|| usage("--url needs a URL"))?,
                );
            }
            "--json" => json = true,
            "--progress" => progress = Some(true),
            "--no-progress" => progress = Some(false),
            "-h" | "--help" => help = true,
            "-V" | "--version" => {
                return Ok(Invocation {
                    url: String::new(),
                    json,
                    progress,
                    command: Command::Version,
                })
            }
            other => match other.strip_prefix("--url=") {
                Some(value) => url = Some(value.to_owned()),
                None => rest.push(other),
            },
        }
        i += 1;
    }
    let command = if help { Command::Help } else { command(&rest)? };
    Ok(Invocation {
        url: url.unwrap_or_else(|| DEFAULT_URL.to_owned()),
        json,
        progress,
        command,
    })
}

fn command(rest: &[&str]) -> Result<Command, CliError> {
    let Some((&name, tail)) = rest.split_first() else {
        return Err(usage("which command? (vms, run, cp, events, ...)"));
    };
    let mut w = Words {
        command: name,
        words: tail.iter().copied().collect(),
    };
    let command = match name {
        "help" => Command::Help,
        "version" => Command::Version,
        "vms" | "ls" => Command::Vms,
        "vm" => Command::Vm(w.positional("the VM")?),
        "create" => {
            let vm = w.positional("the VM's name")?;
            let image = w.optional_positional().unwrap_or_default();
            Command::Create { vm, image }
        }
        "remove" | "rm" => Command::Remove(w.positional("the VM")?),
        "snapshots" => Command::Snapshots(w.positional("the VM")?),
        "snapshot" => snapshot(&mut w)?,
        "guests" => Command::Guests,
        "ping" => {
            let vm = w.positional("the VM")?;
            let mut timeout = None;
            while let Some(option) = w.next_option() {
                match option {
                    "--timeout" | "-t" => timeout = Some(w.number(option)?),
                    other => return Err(w.unknown(other)),
                }
            }
            Command::Ping { vm, timeout }
        }
        "run" => return run(&mut w).map(Command::Run),
        "commands" => {
            let (mut vm, mut state, mut limit) = (None, None, None);
            while let Some(option) = w.next_option() {
                match option {
                    "--vm" => vm = Some(w.value(option)?),
                    "--state" => state = Some(w.value(option)?),
                    "--limit" | "-n" => {
                        let text = w.value(option)?;
                        limit = Some(text.parse().map_err(|_| {
                            usage(format!("commands: --limit needs a number, not {text:?}"))
                        })?);
                    }
                    other => return Err(w.unknown(other)),
                }
            }
            Command::Commands { vm, state, limit }
        }
        "command" => Command::Details(w.positional("the command id")?),
        "result" => {
            let cmd = w.positional("the command id")?;
            let mut wait = None;
            while let Some(option) = w.next_option() {
                match option {
                    "--wait" | "-w" => wait = Some(w.number(option)?),
                    other => return Err(w.unknown(other)),
                }
            }
            Command::Result { cmd, wait }
        }
        "cancel" => Command::Cancel(w.positional("the command id")?),
        "cp" => {
            let from = place(&w.positional("the source")?)?;
            let to = place(&w.positional("the target")?)?;
            match (&from, &to) {
                (Place::Local(_), Place::Guest { .. }) | (Place::Guest { .. }, Place::Local(_)) => {
                }
                _ => {
                    return Err(usage(
                        "cp: copy between a local file and VM:/path, one of each",
                    ))
                }
            }
            Command::Cp { from, to }
        }
        "transfers" => {
            let mut vm = None;
            while let Some(option) = w.next_option() {
                match option {
                    "--vm" => vm = Some(w.value(option)?),
                    other => return Err(w.unknown(other)),
                }
            }
            Command::Transfers { vm }
        }
        "transfer" => Command::Transfer(w.positional("the transfer id")?),
        "events" => {
            let (mut vm, mut cmd) = (None, None);
            while let Some(option) = w.next_option() {
                match option {
                    "--vm" => vm = Some(w.value(option)?),
                    "--cmd" => cmd = Some(w.value(option)?),
                    other => return Err(w.unknown(other)),
                }
            }
            Command::Events { vm, cmd }
        }
        "health" => Command::Health,
        "host" => Command::Host,
        other => match action(other) {
            Some(action) => Command::Action {
                action,
                vm: w.positional("the VM")?,
            },
            None => return Err(usage(format!("unknown command {other:?}"))),
        },
    };
    w.done()?;
    Ok(command)
}

fn snapshot(w: &mut Words<'_>) -> Result<Command, CliError> {
    let op = w.positional("take, restore or delete")?;
    let vm = w.positional("the VM")?;
    let name = w.positional("the snapshot's name")?;
    let op = match op.as_str() {
        "take" => {
            let mut description = String::new();
            while let Some(option) = w.next_option() {
                match option {
                    "--description" | "-m" => description = w.value(option)?,
                    other => return Err(w.unknown(other)),
                }
            }
            SnapshotOp::Take { description }
        }
        "restore" => SnapshotOp::Restore,
        "delete" => SnapshotOp::Delete,
        other => {
            return Err(usage(format!(
                "snapshot: {other:?} is not take, restore or delete"
            )))
        }
    };
    Ok(Command::Snapshot { op, vm, name })
}

fn run(w: &mut Words<'_>) -> Result<Run, CliError> {
    let (mut target, mut env, mut cwd, mut stdin, mut timeout, mut detach) =
        (None, Vec::new(), None, None, None, false);
    loop {
        let Some(word) = w.next_option() else {
            return Err(usage(
                "run: the command is missing: vmc run VM -- CMD [ARGS...]",
            ));
        };
        match word {
            "--" => break,
            "--glob" | "-g" => set_target(&mut target, Target::Glob(w.value(word)?))?,
            "--env" | "-e" => {
                let pair = w.value(word)?;
                let (name, value) = pair
                    .split_once('=')
                    .ok_or_else(|| usage(format!("run: --env needs NAME=VALUE, not {pair:?}")))?;
                env.push((name.to_owned(), value.to_owned()));
            }
            "--cwd" => cwd = Some(w.value(word)?),
            "--stdin" => stdin = Some(w.value(word)?),
            "--timeout" => timeout = Some(w.number(word)?),
            "--detach" | "-d" => detach = true,
            option if option.starts_with('-') => {
                return Err(usage(format!("run: unknown option {option:?}")))
            }
            vm => set_target(&mut target, Target::Vm(vm.to_owned()))?,
        }
    }
    let target =
        target.ok_or_else(|| usage("run: which VM? (vmc run VM -- CMD, or --glob GLOB)"))?;
    let mut words = w.words.drain(..);
    let cmd = words
        .next()
        .ok_or_else(|| usage("run: the command after -- is missing"))?
        .to_owned();
    let args = words.map(str::to_owned).collect();
    Ok(Run {
        target,
        cmd,
        args,
        env,
        cwd,
        stdin,
        timeout,
        detach,
    })
}

fn set_target(target: &mut Option<Target>, new: Target) -> Result<(), CliError> {
    if target.is_some() {
        return Err(usage("run: give one VM or one --glob"));
    }
    *target = Some(new);
    Ok(())
}

/// `VM:/path` is a guest's file; anything else (`./x`, `/x`, `-`) a local one.
fn place(word: &str) -> Result<Place, CliError> {
    if let Some((vm, path)) = word.split_once(':') {
        if !vm.is_empty() && !vm.contains('/') {
            if !path.starts_with('/') {
                return Err(usage(format!(
                    "cp: the guest path in {word:?} must be absolute (VM:/path)"
                )));
            }
            return Ok(Place::Guest {
                vm: vm.to_owned(),
                path: path.to_owned(),
            });
        }
    }
    Ok(Place::Local(PathBuf::from(word)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_words(words: &[&str]) -> Result<Invocation, CliError> {
        let argv: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        parse(&argv, None)
    }

    fn command_of(words: &[&str]) -> Command {
        parse_words(words).unwrap().command
    }

    #[test]
    fn global_options_go_anywhere_before_the_double_dash() {
        let inv = parse_words(&["vms", "--json", "--url", "http://h:1"]).unwrap();
        assert_eq!((inv.url.as_str(), inv.json), ("http://h:1", true));
        let inv = parse_words(&["--url=http://x:2", "run", "vm", "--", "ls", "--json"]).unwrap();
        assert!(!inv.json, "--json after -- belongs to the remote command");
        assert_eq!(inv.url, "http://x:2");
        let Command::Run(run) = inv.command else {
            panic!("a run")
        };
        assert_eq!(
            (run.cmd.as_str(), run.args),
            ("ls", vec!["--json".to_owned()])
        );
        let argv = vec!["vms".to_owned()];
        assert_eq!(
            parse(&argv, Some("http://env:3".into())).unwrap().url,
            "http://env:3"
        );
        assert_eq!(parse(&argv, None).unwrap().url, DEFAULT_URL);
    }

    #[test]
    fn run_takes_its_options_then_the_command() {
        let Command::Run(run) = command_of(&[
            "run",
            "-e",
            "A=1",
            "--env",
            "B=x=y",
            "--cwd",
            "/tmp",
            "--timeout",
            "2.5",
            "box",
            "--",
            "/bin/sh",
            "-c",
            "echo $A",
        ]) else {
            panic!("a run")
        };
        assert_eq!(run.target, Target::Vm("box".into()));
        assert_eq!(
            run.env,
            [("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!((run.cwd.as_deref(), run.timeout), (Some("/tmp"), Some(2.5)));
        assert_eq!(run.args, ["-c", "echo $A"]);
        let Command::Run(run) = command_of(&["run", "--glob", "web-*", "-d", "--", "true"]) else {
            panic!("a run")
        };
        assert_eq!(
            (run.target, run.detach),
            (Target::Glob("web-*".into()), true)
        );
    }

    #[test]
    fn usage_errors_say_what_is_wrong() {
        for (words, wanted) in [
            (&[][..], "which command"),
            (&["frobnicate"][..], "unknown command"),
            (&["vm"][..], "the VM is missing"),
            (&["vm", "a", "b"][..], "unexpected argument \"b\""),
            (&["run", "box"][..], "the command is missing"),
            (&["run", "box", "--"][..], "the command after -- is missing"),
            (&["run", "--", "ls"][..], "which VM"),
            (&["run", "a", "b", "--", "ls"][..], "one VM"),
            (&["run", "-e", "novalue", "a", "--", "ls"][..], "NAME=VALUE"),
            (&["run", "--bogus", "a", "--", "ls"][..], "unknown option"),
            (&["ping", "a", "--timeout", "soon"][..], "number of seconds"),
            (&["cp", "a", "b"][..], "one of each"),
            (&["cp", "a", "vm:rel"][..], "must be absolute"),
            (
                &["snapshot", "frob", "vm", "s"][..],
                "not take, restore or delete",
            ),
            (&["--url"][..], "--url needs a URL"),
        ] {
            let error = parse_words(words).unwrap_err();
            assert_eq!(error.exit_code(), crate::EXIT_USAGE);
            assert!(error.to_string().contains(wanted), "{words:?}: {error}");
        }
    }

    #[test]
    fn actions_have_several_spellings() {
        for word in ["poweroff", "powerOff", "power-off"] {
            assert_eq!(
                command_of(&[word, "vm"]),
                Command::Action {
                    action: "powerOff",
                    vm: "vm".into()
                }
            );
        }
        assert_eq!(action("save-state"), Some("saveState"));
        assert_eq!(action("unpause"), Some("resume"));
        assert_eq!(action("explode"), None);
    }

    #[test]
    fn copies_tell_guest_files_from_local_ones() {
        assert_eq!(
            command_of(&["cp", "./a:b", "box:/tmp/x"]),
            Command::Cp {
                from: Place::Local("./a:b".into()),
                to: Place::Guest {
                    vm: "box".into(),
                    path: "/tmp/x".into()
                }
            }
        );
        assert_eq!(
            command_of(&["cp", "box:/tmp/x", "-"]),
            Command::Cp {
                from: Place::Guest {
                    vm: "box".into(),
                    path: "/tmp/x".into()
                },
                to: Place::Local("-".into())
            }
        );
    }
}
