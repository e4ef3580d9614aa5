//! How `vmc` shows the API's answers to people: aligned tables, `key: value`
//! lines, one line per live event, sizes in KiB/MiB, times as "3s ago", and a
//! progress bar for copies. Everything reads the API's JSON (`serde_json::Value`)
//! and tolerates absent keys (shown as `-`); `--json` bypasses this module.

use base64::Engine as _;
use serde_json::Value;
use std::io::Write;
use std::time::{Duration, Instant};

/// A string member, or `-`.
pub fn text(value: &Value, key: &str) -> String {
    match &value[key] {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn number(value: &Value, key: &str) -> Option<u64> {
    value[key].as_u64()
}

/// Rows under headers, each column as wide as its widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

/// `key: value` lines, keys aligned.
fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    pairs
        .iter()
        .filter(|(_, v)| v != "-")
        .map(|(k, v)| format!("{:<width$}  {v}\n", format!("{k}:")))
        .collect()
}

/// A byte count for people: `512 B`, `3.0 MiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// How long ago an RFC 3339 time was: `4s ago`, `3m ago`, `2h ago`, `5d ago`.
pub fn ago(time: &str) -> String {
    let Ok(then) = chrono::DateTime::parse_from_rfc3339(time) else {
        return "-".to_owned();
    };
    let secs = (chrono::Utc::now() - then.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        7200..=172_799 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// A time without its fractions: `2024-05-01 12:00:01`.
fn when(value: &Value, key: &str) -> String {
    match value[key].as_str() {
        Some(t) if t.len() >= 19 => t[..19].replace('T', " "),
        Some(t) => t.to_owned(),
        None => "-".to_owned(),
    }
}

fn items(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

pub fn vms(list: &Value) -> String {
    let rows: Vec<Vec<String>> = items(list)
        .iter()
        .map(|vm| {
            vec![
                text(vm, "name"),
                text(vm, "state"),
                text(vm, "presence"),
                vm["lastHeard"].as_str().map_or("-".to_owned(), ago),
                text(vm, "backend"),
                text(vm, "id"),
            ]
        })
        .collect();
    table(
        &["NAME", "STATE", "PRESENCE", "HEARD", "BACKEND", "ID"],
        &rows,
    )
}

pub fn vm(vm: &Value) -> String {
    let guest = &vm["guest"];
    let mut pairs = vec![
        ("name", text(vm, "name")),
        ("id", text(vm, "id")),
        ("backend", text(vm, "backend")),
        ("state", text(vm, "state")),
        (
            "presence",
            format!(
                "{} since {}",
                text(vm, "presence"),
                when(vm, "presenceSince")
            ),
        ),
        (
            "last heard",
            vm["lastHeard"].as_str().map_or("-".to_owned(), ago),
        ),
        ("running", text(vm, "running")),
    ];
    if guest.is_object() {
        let ips: Vec<&str> = items(&guest["ips"])
            .iter()
            .filter_map(Value::as_str)
            .collect();
        pairs.extend([
            ("hostname", text(guest, "hostname")),
            (
                "os",
                format!("{} {}", text(guest, "os"), text(guest, "kernel")),
            ),
            ("ips", ips.join(", ")),
            (
                "agent",
                format!(
                    "{} (protocol {})",
                    text(guest, "agentVersion"),
                    text(guest, "protocol")
                ),
            ),
            ("cpus", text(guest, "cpus")),
            (
                "memory",
                number(guest, "memoryBytes").map_or("-".to_owned(), size),
            ),
        ]);
    }
    fields(&pairs)
}

pub fn guests(list: &Value) -> String {
    let rows: Vec<Vec<String>> = items(list)
        .iter()
        .map(|g| {
            vec![
                text(g, "vm"),
                text(g, "presence"),
                when(g, "since"),
                g["lastHeard"].as_str().map_or("-".to_owned(), ago),
                text(g, "state"),
                text(g, "id"),
            ]
        })
        .collect();
    table(&["VM", "PRESENCE", "SINCE", "HEARD", "STATE", "ID"], &rows)
}

pub fn snapshots(list: &Value) -> String {
    let rows: Vec<Vec<String>> = items(list)
        .iter()
        .map(|s| {
            vec![
                text(s, "name"),
                when(s, "createdAt"),
                number(s, "vmStateBytes").map_or("-".to_owned(), size),
                text(s, "description"),
            ]
        })
        .collect();
    table(&["NAME", "CREATED", "STATE", "DESCRIPTION"], &rows)
}

/// A command line as typed: words with spaces or quotes are quoted.
fn command_line(command: &Value) -> String {
    std::iter::once(&command["cmd"])
        .chain(items(&command["args"]))
        .filter_map(Value::as_str)
        .map(|word| {
            if !word.is_empty()
                && word
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                word.to_owned()
            } else {
                format!("'{}'", word.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn exit(command: &Value) -> String {
    match (
        command["outcome"].as_str(),
        command["exitCodeOrSignal"].as_i64(),
    ) {
        (Some("exited"), Some(code)) => code.to_string(),
        (Some("signalled"), Some(signal)) => format!("signal {signal}"),
        (Some(outcome), _) => outcome.to_owned(),
        (None, _) => "-".to_owned(),
    }
}

pub fn commands(list: &Value) -> String {
    let rows: Vec<Vec<String>> = items(list)
        .iter()
        .map(|c| {
            vec![
                text(c, "cmdId"),
                text(c, "vm"),
                text(c, "state"),
                exit(c),
                when(c, "createdAt"),
                command_line(c),
            ]
        })
        .collect();
    table(&["COMMAND", "VM", "STATE", "EXIT", "CREATED", "CMD"], &rows)
}

pub fn command(c: &Value) -> String {
    let live = &c["live"];
    let resources = &c["resources"];
    let mut pairs = vec![
        ("command", text(c, "cmdId")),
        ("vm", text(c, "vm")),
        ("state", text(c, "state")),
        ("exit", exit(c)),
        ("cmd", command_line(c)),
        ("cwd", text(c, "path")),
        ("stdin", text(c, "stdin")),
        ("pid", text(c, "pid")),
        ("created", when(c, "createdAt")),
        ("started", when(c, "startedAt")),
        ("finished", when(c, "finishedAt")),
        (
            "output",
            format!(
                "{} out, {} err",
                size(number(c, "outBytes").unwrap_or(0)),
                size(number(c, "errBytes").unwrap_or(0))
            ),
        ),
        ("error", text(c, "error")),
        ("fanout", text(c, "fanoutId")),
    ];
    if resources.is_object() {
        pairs.push((
            "cpu",
            format!(
                "{:.3}s user, {:.3}s system, max rss {}",
                resources["ru_utime"].as_f64().unwrap_or(0.0),
                resources["ru_stime"].as_f64().unwrap_or(0.0),
                size(number(resources, "ru_maxrss").unwrap_or(0) * 1024)
            ),
        ));
    }
    if live.is_object() {
        pairs.push(("live", format!("{} (guest's report)", text(live, "state"))));
    }
    fields(&pairs)
}

/// A result's summary line (its output is printed as it is).
pub fn result_summary(r: &Value) -> String {
    let how = match r["outcome"].as_str() {
        Some("exited") => format!("exited with {}", text(r, "exitCodeOrSignal")),
        Some("signalled") => format!("killed by signal {}", text(r, "exitCodeOrSignal")),
        Some(other) => other.to_owned(),
        None => "-".to_owned(),
    };
    let mut line = format!(
        "{} on {}: {how} after {:.2}s",
        text(r, "cmdId"),
        text(r, "vm"),
        r["wallSecs"].as_f64().unwrap_or(0.0)
    );
    if let Some(error) = r["error"].as_str() {
        line += &format!(" ({error})");
    }
    line
}

pub fn transfers(list: &Value) -> String {
    let rows: Vec<Vec<String>> = items(list)
        .iter()
        .map(|t| {
            vec![
                text(t, "transferId"),
                text(t, "vm"),
                text(t, "direction"),
                text(t, "state"),
                progress_text(t),
                text(t, "guestPath"),
            ]
        })
        .collect();
    table(
        &[
            "TRANSFER",
            "VM",
            "DIRECTION",
            "STATE",
            "BYTES",
            "GUEST PATH",
        ],
        &rows,
    )
}

fn progress_text(t: &Value) -> String {
    let done = size(number(t, "bytesDone").unwrap_or(0));
    match number(t, "size") {
        Some(total) => format!("{done} / {}", size(total)),
        None => done,
    }
}

pub fn transfer(t: &Value) -> String {
    fields(&[
        ("transfer", text(t, "transferId")),
        ("vm", text(t, "vm")),
        ("direction", text(t, "direction")),
        ("state", text(t, "state")),
        ("bytes", progress_text(t)),
        ("host path", text(t, "hostPath")),
        ("guest path", text(t, "guestPath")),
        ("sha256", text(t, "sha256")),
        ("error", text(t, "error")),
        ("created", when(t, "createdAt")),
        ("finished", when(t, "finishedAt")),
    ])
}

/// Counts as `3 alive, 1 lost`, zeros left out.
fn counts(value: &Value) -> String {
    let parts: Vec<String> = value
        .as_object()
        .map(|map| {
            map.iter()
                .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
                .map(|(k, n)| format!("{n} {k}"))
                .collect()
        })
        .unwrap_or_default();
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    }
}

fn broker(b: &Value) -> String {
    format!(
        "{} {} ({} connection(s), {} reconnect(s), {} failed attempt(s))",
        text(b, "state"),
        text(b, "address"),
        text(b, "connections"),
        text(b, "reconnects"),
        text(b, "connectFailures")
    )
}

pub fn host(h: &Value) -> String {
    fields(&[
        ("version", text(h, "version")),
        ("protocol", text(h, "protocol")),
        ("host id", text(h, "hostId")),
        ("backend", text(h, "backend")),
        ("broker", broker(&h["broker"])),
        (
            "vms",
            format!("{} ({})", text(h, "vms"), counts(&h["vmsByState"])),
        ),
        ("guests", counts(&h["guestsByPresence"])),
        ("commands", counts(&h["commandsByState"])),
        ("transfers", counts(&h["transfersByState"])),
        (
            "moved",
            format!(
                "{} to guests, {} from guests",
                size(number(&h["transferBytes"], "toGuest").unwrap_or(0)),
                size(number(&h["transferBytes"], "fromGuest").unwrap_or(0))
            ),
        ),
    ])
}

pub fn health(h: &Value) -> String {
    fields(&[
        ("status", text(h, "status")),
        ("broker", broker(&h["broker"])),
        ("vms", text(h, "vms")),
        ("guests", counts(&h["guestsByPresence"])),
        ("commands", counts(&h["commandsByState"])),
    ])
}

/// One live event as one line.
pub fn event(name: &str, data: &Value) -> String {
    let now = chrono::Local::now().format("%H:%M:%S");
    let detail = match name {
        "vm" => format!(
            "{} state={} presence={}",
            text(data, "vm"),
            text(data, "state"),
            text(data, "presence")
        ),
        "command" => {
            let mut line = format!(
                "{} vm={} state={}",
                text(data, "cmdId"),
                text(data, "vm"),
                text(data, "state")
            );
            if data["outcome"].is_string() {
                line += &format!(" exit={}", exit(data));
            }
            if let Some(error) = data["error"].as_str() {
                line += &format!(" error={error:?}");
            }
            line
        }
        "output" => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data["data"].as_str().unwrap_or(""))
                .unwrap_or_default();
            format!(
                "{} {} @{}: {:?}",
                text(data, "cmdId"),
                text(data, "stream"),
                text(data, "offset"),
                String::from_utf8_lossy(&bytes)
            )
        }
        "transfer" => format!(
            "{} vm={} {} {} {}",
            text(data, "transferId"),
            text(data, "vm"),
            text(data, "direction"),
            progress_text(data),
            text(data, "state")
        ),
        "lagged" => format!(
            "this stream fell behind and missed {} event(s)",
            text(data, "missed")
        ),
        _ => data.to_string(),
    };
    format!("{now} {name:<8} {detail}")
}

/// A progress bar on stderr, redrawn at most ten times a second.
#[derive(Debug)]
pub struct Progress {
    label: String,
    total: Option<u64>,
    done: u64,
    started: Instant,
    drawn: Option<Instant>,
    enabled: bool,
}

impl Progress {
    pub fn new(label: &str, total: Option<u64>, enabled: bool) -> Progress {
        Progress {
            label: label.to_owned(),
            total,
            done: 0,
            started: Instant::now(),
            drawn: None,
            enabled,
        }
    }

    /// A message in place of the bar (e.g. while the host fetches from the guest).
    pub fn note(&mut self, message: &str) {
        if self.enabled {
            eprint!("\r{}: {message}\x1b[K", self.label);
            let _ = std::io::stderr().flush();
        }
    }

    pub fn set_total(&mut self, total: Option<u64>) {
        self.total = total;
        self.started = Instant::now();
    }

    pub fn update(&mut self, done: u64) {
        self.done = done;
        let due = self
            .drawn
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
        if due {
            self.draw();
        }
    }

    fn draw(&mut self) {
        if !self.enabled {
            return;
        }
        self.drawn = Some(Instant::now());
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = size((self.done as f64 / secs) as u64);
        let line = match self.total {
            Some(total) if total > 0 => {
                let fraction = (self.done as f64 / total as f64).min(1.0);
                let filled = (fraction * 30.0) as usize;
                format!(
                    "{}: {:>3}% [{}{}] {} / {} {rate}/s",
                    self.label,
                    (fraction * 100.0) as u32,
                    "=".repeat(filled),
                    " ".repeat(30 - filled),
                    size(self.done),
                    size(total)
                )
            }
            _ => format!("{}: {} {rate}/s", self.label, size(self.done)),
        };
        eprint!("\r{line}\x1b[K");
        let _ = std::io::stderr().flush();
    }

    /// Draws the final state and ends the line.
    pub fn finish(&mut self) {
        if self.enabled {
            if self.total == Some(0) {
                self.total = None;
            }
            self.draw();
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_their_columns() {
        let text = table(
            &["NAME", "STATE"],
            &[
                vec!["a-long-name".into(), "Running".into()],
                vec!["b".into(), "-".into()],
            ],
        );
        assert_eq!(
            text,
            "NAME         STATE\na-long-name  Running\nb            -\n"
        );
    }

    #[test]
    fn sizes_and_command_lines_read_well() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(3 * 1024 * 1024), "3.0 MiB");
        let command = json!({"cmd": "/bin/sh", "args": ["-c", "echo 'hi' there", ""]});
        assert_eq!(
            command_line(&command),
            "/bin/sh -c 'echo '\\''hi'\\'' there' ''"
        );
    }

    #[test]
    fn events_are_one_line_each() {
        let line = event(
            "output",
            &json!({"cmdId": "c", "stream": "out", "offset": 3, "data": "aGkK"}),
        );
        assert!(line.ends_with("output   c out @3: \"hi\\n\""), "{line}");
        let line = event(
            "command",
            &json!({"cmdId": "c", "vm": "b", "state": "finished", "outcome": "signalled", "exitCodeOrSignal": 9}),
        );
        assert!(
            line.ends_with("command  c vm=b state=finished exit=signal 9"),
            "{line}"
        );
    }
}
