//! What each `vmc` command does: one or a few calls of the JSON API, and the
//! answer printed ([`show`] for people, the API's own JSON with `--json`).
//!
//! `run` posts the command, then reads `GET /api/v1/events?cmd=ID`, which replays
//! the output from its start and ends once the command finished, so output is
//! streamed live, in order and without gaps; the exit code comes from the result.
//! `cp` streams the file through the host (`PUT`/`GET /api/v1/vms/{vm}/files`),
//! hashing what it sends or receives and checking it against the SHA-256 the guest
//! or the host verified; a download is written beside its target and renamed into
//! place only once verified.

use crate::args::{Command, Invocation, Place, Run, SnapshotOp, Target, USAGE};
use crate::http::{encode, Body, Client};
use crate::show::{self, Progress};
use crate::{CliError, EXIT_REMOTE};
use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

/// Exit code of `run` when the command timed out (as `timeout(1)`'s).
pub const EXIT_TIMED_OUT: u8 = 124;
/// Exit code of `run` when the command was cancelled or lost.
pub const EXIT_DID_NOT_COMPLETE: u8 = 125;
/// Exit code of `run` when the command failed to start (as a shell's "not found").
pub const EXIT_FAILED_TO_START: u8 = 127;

/// Runs an invocation; answers the exit code.
pub fn run(invocation: &Invocation) -> Result<u8, CliError> {
    match invocation.command {
        Command::Help => {
            out(USAGE);
            return Ok(0);
        }
        Command::Version if invocation.url.is_empty() => {
            out(&format!("vmc {}\n", vmc_host::VERSION));
            return Ok(0);
        }
        _ => {}
    }
    let api = Api {
        client: Client::new(&invocation.url)?,
        json: invocation.json,
        progress: invocation
            .progress
            .unwrap_or_else(|| std::io::stderr().is_terminal()),
    };
    api.dispatch(&invocation.command)
}

/// The API, and how to print its answers.
struct Api {
    client: Client,
    json: bool,
    progress: bool,
}

/// The error an API answer carries, or one made from a non-API answer.
fn remote_error(status: u16, body: &[u8]) -> CliError {
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        let error = &value["error"];
        if let (Some(code), Some(name), Some(message)) = (
            error["code"].as_i64(),
            error["name"].as_str(),
            error["message"].as_str(),
        ) {
            return CliError::Remote {
                status,
                code,
                name: name.to_owned(),
                message: message.to_owned(),
            };
        }
    }
    let snippet: String = String::from_utf8_lossy(body).chars().take(200).collect();
    CliError::Remote {
        status,
        code: 0,
        name: format!("http-{status}"),
        message: format!(
            "the server answered HTTP {status} without an API error: {}",
            snippet.trim()
        ),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Api {
    /// One JSON call: the answer's JSON (`null` when it has no body), or its error.
    fn call(&self, method: &str, target: &str, body: Option<Value>) -> Result<Value, CliError> {
        let body = match body {
            Some(value) => Body::Json(value.to_string().into_bytes()),
            None => Body::None,
        };
        let response = self.client.request(method, target, body)?;
        let status = response.status;
        let bytes = response.bytes()?;
        if !(200..300).contains(&status) {
            return Err(remote_error(status, &bytes));
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            CliError::Broken(format!(
                "the answer to {method} {target} is not JSON ({e}); is {} the host agent?",
                self.client.url()
            ))
        })
    }

    fn get(&self, target: &str) -> Result<Value, CliError> {
        self.call("GET", target, None)
    }

    /// Prints an answer: its JSON with `--json`, else what `human` makes of it.
    fn print(&self, value: &Value, human: impl FnOnce(&Value) -> String) {
        if self.json {
            out(&(serde_json::to_string_pretty(value).unwrap_or_default() + "\n"));
        } else {
            out(&human(value));
        }
    }

    fn dispatch(&self, command: &Command) -> Result<u8, CliError> {
        let vm_path = |vm: &str| format!("/api/v1/vms/{}", encode(vm));
        match command {
            Command::Help => out(USAGE),
            Command::Version => {
                out(&format!("vmc {}\n", vmc_host::VERSION));
                let host = self.get("/api/v1/host")?;
                out(&format!(
                    "vmc-host {} (protocol {}, {} backend) at {}\n",
                    show::text(&host, "version"),
                    show::text(&host, "protocol"),
                    show::text(&host, "backend"),
                    self.client.url()
                ));
            }
            Command::Vms => self.print(&self.get("/api/v1/vms")?, show::vms),
            Command::Vm(vm) => self.print(&self.get(&vm_path(vm))?, show::vm),
            Command::Create { vm, image } => {
                let created = self.call(
                    "POST",
                    "/api/v1/vms",
                    Some(json!({"name": vm, "image": image})),
                )?;
                self.print(&created, show::vm);
            }
            Command::Remove(vm) => {
                self.call("DELETE", &vm_path(vm), None)?;
                if !self.json {
                    out(&format!("removed VM {vm}\n"));
                }
            }
            Command::Action { action, vm } => {
                let target = format!("{}/actions/{action}", vm_path(vm));
                let state = self.call("POST", &target, None)?;
                self.print(&state, |s| format!("{vm}: {}\n", show::text(s, "state")));
            }
            Command::Snapshots(vm) => {
                let list = self.get(&format!("{}/snapshots", vm_path(vm)))?;
                self.print(&list, show::snapshots);
            }
            Command::Snapshot { op, vm, name } => {
                let (method, target, body, verb) = match op {
                    SnapshotOp::Take { description } => (
                        "POST",
                        format!("{}/snapshots", vm_path(vm)),
                        Some(json!({"name": name, "description": description})),
                        "took",
                    ),
                    SnapshotOp::Restore => (
                        "POST",
                        format!("{}/snapshots/{}/restore", vm_path(vm), encode(name)),
                        None,
                        "restored",
                    ),
                    SnapshotOp::Delete => (
                        "DELETE",
                        format!("{}/snapshots/{}", vm_path(vm), encode(name)),
                        None,
                        "deleted",
                    ),
                };
                let state = self.call(method, &target, body)?;
                self.print(&state, |s| {
                    format!(
                        "{verb} snapshot {name} of {vm}; {vm} is {}\n",
                        show::text(s, "state")
                    )
                });
            }
            Command::Guests => self.print(&self.get("/api/v1/guests")?, show::guests),
            Command::Ping { vm, timeout } => {
                let body = timeout.map(|t| json!({ "timeoutSecs": t }));
                let pong = self.call("POST", &format!("{}/ping", vm_path(vm)), body)?;
                let alive = pong["alive"].as_bool() == Some(true);
                self.print(&pong, |p| match p["rttMs"].as_f64() {
                    Some(ms) if alive => format!("{vm} answered in {ms:.1} ms\n"),
                    _ => format!("{vm} did not answer within {} s\n", timeout.unwrap_or(5.0)),
                });
                return Ok(if alive { 0 } else { EXIT_REMOTE });
            }
            Command::Run(run) => return self.run(run),
            Command::Commands { vm, state, limit } => {
                let mut query = Vec::new();
                if let Some(vm) = vm {
                    query.push(format!("vm={}", encode(vm)));
                }
                if let Some(state) = state {
                    query.push(format!("state={}", encode(state)));
                }
                if let Some(limit) = limit {
                    query.push(format!("limit={limit}"));
                }
                let list = self.get(&format!("/api/v1/commands?{}", query.join("&")))?;
                self.print(&list, show::commands);
            }
            Command::Details(cmd) => {
                let details = self.get(&format!("/api/v1/commands/{}", encode(cmd)))?;
                self.print(&details, show::command);
            }
            Command::Result { cmd, wait } => {
                let target = format!(
                    "/api/v1/commands/{}/result?wait={}",
                    encode(cmd),
                    wait.unwrap_or(0.0)
                );
                let result = self.get(&target)?;
                self.print(&result, |r| {
                    let mut text = show::result_summary(r) + "\n";
                    for (key, name) in [("out", "stdout"), ("err", "stderr")] {
                        let output = r[key].as_str().unwrap_or("");
                        if !output.is_empty() {
                            text += &format!("--- {name} ---\n{output}");
                            if !output.ends_with('\n') {
                                text.push('\n');
                            }
                        }
                    }
                    text
                });
            }
            Command::Cancel(cmd) => {
                let target = format!("/api/v1/commands/{}/cancel", encode(cmd));
                let command = self.call("POST", &target, None)?;
                self.print(&command, |c| {
                    format!("cancelling {cmd} (it is {})\n", show::text(c, "state"))
                });
            }
            Command::Cp { from, to } => match (from, to) {
                (Place::Local(local), Place::Guest { vm, path }) => {
                    self.upload(local, vm, path)?;
                }
                (Place::Guest { vm, path }, Place::Local(local)) => {
                    self.download(vm, path, local)?;
                }
                _ => {
                    return Err(CliError::Usage(
                        "cp: one local file and one VM:/path".into(),
                    ))
                }
            },
            Command::Transfers { vm } => {
                let target = match vm {
                    Some(vm) => format!("/api/v1/transfers?vm={}", encode(vm)),
                    None => "/api/v1/transfers".to_owned(),
                };
                self.print(&self.get(&target)?, show::transfers);
            }
            Command::Transfer(id) => {
                let transfer = self.get(&format!("/api/v1/transfers/{}", encode(id)))?;
                self.print(&transfer, show::transfer);
            }
            Command::Events { vm, cmd } => self.events(vm.as_deref(), cmd.as_deref())?,
            Command::Health => {
                let health = self.get("/healthz")?;
                self.print(&health, show::health);
                if health["status"].as_str() != Some("ok") {
                    return Ok(EXIT_REMOTE);
                }
            }
            Command::Host => self.print(&self.get("/api/v1/host")?, show::host),
        }
        Ok(0)
    }

    // -----------------------------------------------------------------------
    // run

    fn run(&self, run: &Run) -> Result<u8, CliError> {
        let env: BTreeMap<&str, &str> = run
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut body = json!({"cmd": run.cmd, "args": run.args, "env": env});
        for (key, value) in [("path", &run.cwd), ("stdin", &run.stdin)] {
            if let Some(value) = value {
                body[key] = json!(value);
            }
        }
        if let Some(timeout) = run.timeout {
            body["timeoutSecs"] = json!(timeout);
        }
        // The commands to follow, each with its VM.
        let (answer, targets): (Value, Vec<(String, String)>) = match &run.target {
            Target::Vm(vm) => {
                let command = self.call(
                    "POST",
                    &format!("/api/v1/vms/{}/commands", encode(vm)),
                    Some(body),
                )?;
                let id = show::text(&command, "cmdId");
                (command, vec![(id, vm.clone())])
            }
            Target::Glob(glob) => {
                body["glob"] = json!(glob);
                let fanout = self.call("POST", "/api/v1/commands", Some(body))?;
                let targets = fanout["commands"]
                    .as_array()
                    .map(|targets| {
                        targets
                            .iter()
                            .map(|t| (show::text(t, "cmdId"), show::text(t, "vm")))
                            .collect()
                    })
                    .unwrap_or_default();
                (fanout, targets)
            }
        };
        if run.detach {
            self.print(&answer, |_| {
                targets
                    .iter()
                    .map(|(id, vm)| match run.target {
                        Target::Vm(_) => format!("{id}\n"),
                        Target::Glob(_) => format!("{vm}\t{id}\n"),
                    })
                    .collect()
            });
            return Ok(0);
        }
        let prefixed = matches!(run.target, Target::Glob(_));
        self.follow(&targets, prefixed, !self.json)?;
        let mut code = 0;
        let mut results = Vec::new();
        for (id, vm) in &targets {
            let result = self.get(&format!("/api/v1/commands/{}/result", encode(id)))?;
            let (exit, why) = exit_code(&result);
            if let Some(why) = why {
                if !self.json {
                    let _ = std::io::stdout().flush();
                    if prefixed {
                        eprintln!("vmc: [{vm}] {why}");
                    } else {
                        eprintln!("vmc: {why}");
                    }
                }
            }
            code = code.max(exit);
            results.push(result);
        }
        if self.json {
            let value = match run.target {
                Target::Vm(_) => results.pop().unwrap_or(Value::Null),
                Target::Glob(_) => Value::Array(results),
            };
            out(&(serde_json::to_string_pretty(&value).unwrap_or_default() + "\n"));
        }
        Ok(code)
    }

    /// Follows commands to their end through the event stream, writing their
    /// output as it comes (when `write`): as it is for one command, line by line
    /// prefixed `[VM] ` for several.
    fn follow(
        &self,
        targets: &[(String, String)],
        prefixed: bool,
        write: bool,
    ) -> Result<(), CliError> {
        if targets.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = targets.iter().map(|(id, _)| id.as_str()).collect();
        let vm_of: HashMap<&str, &str> = targets
            .iter()
            .map(|(id, vm)| (id.as_str(), vm.as_str()))
            .collect();
        let target = format!("/api/v1/events?cmd={}", encode(&ids.join(",")));
        let response = self.client.request("GET", &target, Body::None)?;
        if !(200..300).contains(&response.status) {
            let status = response.status;
            return Err(remote_error(status, &response.bytes()?));
        }
        let mut events = response.events();
        let mut done: HashSet<String> = HashSet::new();
        let mut lines: HashMap<(String, bool), Vec<u8>> = HashMap::new();
        while let Some(event) = events.next_event()? {
            let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
            match event.name.as_str() {
                "output" if write => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(data["data"].as_str().unwrap_or(""))
                        .unwrap_or_default();
                    let cmd_id = show::text(&data, "cmdId");
                    let to_err = data["stream"].as_str() == Some("err");
                    if prefixed {
                        let vm = vm_of.get(cmd_id.as_str()).copied().unwrap_or("?");
                        let pending = lines.entry((cmd_id, to_err)).or_default();
                        pending.extend_from_slice(&bytes);
                        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = pending.drain(..=end).collect();
                            emit(to_err, &[format!("[{vm}] ").as_bytes(), &line].concat());
                        }
                    } else {
                        emit(to_err, &bytes);
                    }
                }
                "command" if data["done"].as_bool() == Some(true) => {
                    done.insert(show::text(&data, "cmdId"));
                }
                _ => {}
            }
        }
        for ((cmd_id, to_err), rest) in lines {
            if !rest.is_empty() {
                let vm = vm_of.get(cmd_id.as_str()).copied().unwrap_or("?");
                emit(
                    to_err,
                    &[format!("[{vm}] ").as_bytes(), &rest, b"\n"].concat(),
                );
            }
        }
        if ids.iter().any(|id| !done.contains(*id)) {
            return Err(CliError::Broken(
                "the event stream ended before the command finished; its result: vmc result ID"
                    .into(),
            ));
        }
        Ok(())
    }

    // -----------------------------------------------------------------------
    // events

    fn events(&self, vm: Option<&str>, cmd: Option<&str>) -> Result<(), CliError> {
        let mut query = Vec::new();
        if let Some(vm) = vm {
            query.push(format!("vm={}", encode(vm)));
        }
        if let Some(cmd) = cmd {
            query.push(format!("cmd={}", encode(cmd)));
        }
        let target = format!("/api/v1/events?{}", query.join("&"));
        let response = self.client.request("GET", &target, Body::None)?;
        if !(200..300).contains(&response.status) {
            let status = response.status;
            return Err(remote_error(status, &response.bytes()?));
        }
        let mut events = response.events();
        let mut stdout = std::io::stdout();
        while let Some(event) = events.next_event()? {
            let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
            let line = if self.json {
                json!({"event": event.name, "data": data}).to_string()
            } else {
                show::event(&event.name, &data)
            };
            if writeln!(stdout, "{line}")
                .and_then(|()| stdout.flush())
                .is_err()
            {
                break; // stdout closed: nobody reads on
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------
    // cp

    fn upload(&self, local: &Path, vm: &str, remote: &str) -> Result<(), CliError> {
        let local_error = |source| CliError::Local {
            path: local.to_owned(),
            source,
        };
        let stdin = local == Path::new("-");
        let (mut reader, len): (Box<dyn Read>, Option<u64>) = if stdin {
            (Box::new(std::io::stdin().lock()), None)
        } else {
            let file = std::fs::File::open(local).map_err(local_error)?;
            let meta = file.metadata().map_err(local_error)?;
            if meta.is_dir() {
                return Err(local_error(std::io::Error::other("is a directory")));
            }
            (Box::new(file), Some(meta.len()))
        };
        let name = local
            .file_name()
            .map_or("stdin".into(), |n| n.to_string_lossy().into_owned());
        let remote = if remote.ends_with('/') && !stdin {
            format!("{remote}{name}")
        } else {
            remote.to_owned()
        };
        let mut hashing = Hashing {
            inner: &mut reader,
            hasher: Sha256::new(),
        };
        let mut progress = Progress::new(&name, len, self.progress);
        let target = format!("/api/v1/vms/{}/files?path={}", encode(vm), encode(&remote));
        let response = {
            let mut sent = |n: u64| progress.update(n);
            let body = Body::Stream {
                reader: &mut hashing,
                len,
                sent: &mut sent,
            };
            self.client.request("PUT", &target, body)
        };
        progress.finish();
        let response = response?;
        let status = response.status;
        let bytes = response.bytes()?;
        if !(200..300).contains(&status) {
            return Err(remote_error(status, &bytes));
        }
        let transfer: Value = serde_json::from_slice(&bytes)
            .map_err(|e| CliError::Broken(format!("the answer to the upload is not JSON: {e}")))?;
        let sent = hex(&hashing.hasher.finalize());
        if transfer["sha256"].as_str() != Some(sent.as_str()) {
            return Err(CliError::Failed(format!(
                "the guest verified SHA-256 {}, but vmc sent {sent}",
                show::text(&transfer, "sha256")
            )));
        }
        self.print(&transfer, |t| {
            format!(
                "copied {} to {vm}:{remote} (sha256 {})\n",
                show::size(t["size"].as_u64().unwrap_or(0)),
                show::text(t, "sha256")
            )
        });
        Ok(())
    }

    fn download(&self, vm: &str, remote: &str, local: &Path) -> Result<(), CliError> {
        let name = remote
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .unwrap_or("download")
            .to_owned();
        let mut progress = Progress::new(&name, None, self.progress);
        progress.note("the host copies it from the guest...");
        let target = format!("/api/v1/vms/{}/files?path={}", encode(vm), encode(remote));
        let mut response = match self.client.request("GET", &target, Body::None) {
            Ok(response) => response,
            Err(e) => {
                progress.finish();
                return Err(e);
            }
        };
        if !(200..300).contains(&response.status) {
            progress.finish();
            let status = response.status;
            return Err(remote_error(status, &response.bytes()?));
        }
        let expected = response.header("x-vmc-sha256").unwrap_or("").to_owned();
        progress.set_total(response.content_length());
        let to_stdout = local == Path::new("-");
        let (path, part) = if to_stdout {
            (PathBuf::from("-"), None)
        } else {
            let path = if local.is_dir() {
                local.join(&name)
            } else {
                local.to_owned()
            };
            let file_name = path
                .file_name()
                .map_or(name.clone(), |n| n.to_string_lossy().into_owned());
            let part = path.with_file_name(format!(".{file_name}.vmc-part"));
            (path, Some(part))
        };
        let mut out: Box<dyn Write> = match &part {
            None => Box::new(std::io::stdout().lock()),
            Some(part) => {
                Box::new(
                    std::fs::File::create(part).map_err(|source| CliError::Local {
                        path: part.clone(),
                        source,
                    })?,
                )
            }
        };
        let outcome = (|| {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                let n = response
                    .body()
                    .read(&mut buf)
                    .map_err(|e| CliError::Broken(format!("the download broke off: {e}")))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(|source| CliError::Local {
                    path: part.clone().unwrap_or_else(|| path.clone()),
                    source,
                })?;
                total += n as u64;
                progress.update(total);
            }
            out.flush().map_err(|source| CliError::Local {
                path: path.clone(),
                source,
            })?;
            let got = hex(&hasher.finalize());
            if got != expected {
                return Err(CliError::Failed(format!(
                    "the host verified SHA-256 {expected}, but vmc received {got}"
                )));
            }
            Ok((total, got))
        })();
        progress.finish();
        drop(out);
        let (total, digest) = match outcome {
            Ok(done) => done,
            Err(e) => {
                if let Some(part) = &part {
                    let _ = std::fs::remove_file(part);
                }
                return Err(e);
            }
        };
        if let Some(part) = &part {
            std::fs::rename(part, &path).map_err(|source| CliError::Local {
                path: path.clone(),
                source,
            })?;
        }
        if !to_stdout {
            let answer = json!({"vm": vm, "guestPath": remote, "path": path, "size": total, "sha256": digest});
            self.print(&answer, |_| {
                format!(
                    "copied {} from {vm}:{remote} to {} (sha256 {digest})\n",
                    show::size(total),
                    path.display()
                )
            });
        }
        Ok(())
    }
}

/// Prints to stdout; a closed stdout (`vmc ... | head`) is not an error.
fn out(text: &str) {
    let mut stdout = std::io::stdout();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

/// Writes output to stdout or stderr at once; a closed one is ignored (the
/// command's end and exit code still count).
fn emit(to_err: bool, bytes: &[u8]) {
    if to_err {
        let mut err = std::io::stderr();
        let _ = err.write_all(bytes).and_then(|()| err.flush());
    } else {
        let mut out = std::io::stdout();
        let _ = out.write_all(bytes).and_then(|()| out.flush());
    }
}

/// `run`'s exit code for a result, and why the command did not exit by itself.
fn exit_code(result: &Value) -> (u8, Option<String>) {
    let n = result["exitCodeOrSignal"].as_i64().unwrap_or(-1);
    let error = result["error"].as_str().unwrap_or("no reason given");
    match result["outcome"].as_str() {
        Some("exited") => (u8::try_from(n.clamp(0, 255)).unwrap_or(255), None),
        Some("signalled") => (
            u8::try_from((128 + n).clamp(0, 255)).unwrap_or(255),
            Some(format!("the command was killed by signal {n}")),
        ),
        Some("timed-out") => (EXIT_TIMED_OUT, Some("the command timed out".to_owned())),
        Some("failed-to-start") => (
            EXIT_FAILED_TO_START,
            Some(format!("the command failed to start: {error}")),
        ),
        Some(other) => (
            EXIT_DID_NOT_COMPLETE,
            Some(format!("the command did not complete ({other}): {error}")),
        ),
        None => (
            EXIT_DID_NOT_COMPLETE,
            Some("the command has no outcome".to_owned()),
        ),
    }
}

/// Hashes what is read through it.
struct Hashing<'a> {
    inner: &'a mut dyn Read,
    hasher: Sha256,
}

impl Read for Hashing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shells_conventions() {
        let code = |outcome: &str, n: i64| {
            exit_code(&json!({"outcome": outcome, "exitCodeOrSignal": n})).0
        };
        assert_eq!(code("exited", 0), 0);
        assert_eq!(code("exited", 3), 3);
        assert_eq!(code("signalled", 9), 137);
        assert_eq!(code("timed-out", 9), EXIT_TIMED_OUT);
        assert_eq!(code("failed-to-start", -1), EXIT_FAILED_TO_START);
        assert_eq!(code("cancelled", 15), EXIT_DID_NOT_COMPLETE);
        assert_eq!(code("lost", -1), EXIT_DID_NOT_COMPLETE);
    }

    #[test]
    fn api_errors_keep_their_code_and_name() {
        let body =
            br#"{"error":{"code":1,"name":"unknown-vm","message":"there is no VM named \"x\""}}"#;
        let error = remote_error(404, body);
        assert_eq!(
            error.to_string(),
            "unknown-vm (1): there is no VM named \"x\""
        );
        assert_eq!(error.exit_code(), EXIT_REMOTE);
        let error = remote_error(502, b"<html>Bad Gateway</html>");
        assert!(error
            .to_string()
            .starts_with("http-502 (0): the server answered HTTP 502"));
    }
}
