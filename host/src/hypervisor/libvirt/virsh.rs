//! The `virsh` command line, run as a child process per call: the libvirt backend's
//! only way to libvirtd, so the host agent links no C library.
//!
//! Every call names its connection (`-c URI`) and runs with `LC_ALL=C`, so the
//! answers parsed here are libvirt's untranslated ones; `-q` drops the chatter
//! ("Domain 'x' started") that is not an answer. A call that outlives its
//! deadline is killed. A failure carries libvirt's own message (virsh's `error:`
//! lines, joined). Parsers for the two answer shapes the backend reads, `key=value`
//! lines (`domstats`) and `Key: value` lines (`dominfo`), and for the bits of XML
//! it reads back (`snapshot-dumpxml --xpath ... --wrap`), live here too.
//! What it does not do: build commands (the backend does), or retry.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Why a `virsh` call failed.
#[derive(Debug, thiserror::Error)]
pub enum VirshError {
    #[error("cannot run {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    /// virsh ran and libvirt refused; `message` is libvirt's own.
    #[error("`virsh {command}` failed: {message}")]
    Failed { command: String, message: String },
    #[error("`virsh {command}` did not answer within {secs} s")]
    Timeout { command: String, secs: u64 },
}

/// `virsh` on one libvirt connection.
#[derive(Clone, Debug)]
pub struct Virsh {
    binary: PathBuf,
    uri: String,
    timeout: Duration,
}

impl Virsh {
    pub fn new(binary: impl Into<PathBuf>, uri: impl Into<String>, timeout: Duration) -> Virsh {
        Virsh {
            binary: binary.into(),
            uri: uri.into(),
            timeout,
        }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Runs `virsh -q -c URI ARGS...` and returns its standard output.
    pub fn run(&self, args: &[&str]) -> Result<String, VirshError> {
        self.run_within(args, self.timeout)
    }

    /// [`run`](Self::run) with its own deadline.
    pub fn run_within(&self, args: &[&str], timeout: Duration) -> Result<String, VirshError> {
        let command = args.join(" ");
        let child = Command::new(&self.binary)
            .args(["-q", "-c", &self.uri])
            .args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| VirshError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        let (status, stdout, stderr) = wait_with_deadline(child, timeout).map_err(|e| match e {
            WaitError::Io(source) => VirshError::Spawn {
                binary: self.binary.clone(),
                source,
            },
            WaitError::Timeout => VirshError::Timeout {
                command: command.clone(),
                secs: timeout.as_secs(),
            },
        })?;
        if status.success() {
            Ok(stdout)
        } else {
            let mut message = error_message(&stderr);
            if message.is_empty() {
                message = format!("virsh exited with {status} and said nothing");
            }
            Err(VirshError::Failed { command, message })
        }
    }
}

enum WaitError {
    Io(io::Error),
    Timeout,
}

/// Waits for `child`, reading both pipes as it goes; kills it at the deadline.
fn wait_with_deadline(
    mut child: Child,
    timeout: Duration,
) -> Result<(std::process::ExitStatus, String, String), WaitError> {
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                // A read error leaves what was read; the exit status tells the rest.
                let _ = pipe.read_to_end(&mut bytes);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().map_err(WaitError::Io)? {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                // Best effort: it may have exited this very moment.
                let _ = child.kill();
                let _ = child.wait();
                return Err(WaitError::Timeout);
            }
            None => thread::sleep(Duration::from_millis(5)),
        }
    };
    // The pipes close when virsh exits; a reader thread cannot panic.
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    Ok((status, stdout, stderr))
}

/// libvirt's message from virsh's standard error: the `error:` lines without that
/// word, joined with `: ` (virsh prints the failed action first, then the cause).
pub fn error_message(stderr: &str) -> String {
    stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.strip_prefix("error:").map_or(l, str::trim))
        .collect::<Vec<_>>()
        .join(": ")
}

/// `key=value` lines (`virsh domstats`), other lines ignored.
pub fn key_values(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.trim().split_once('=')?;
            Some((key.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// `Key: value` lines (`virsh dominfo`), other lines ignored.
pub fn colon_fields(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            Some((key.trim().to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// The text of the first `<tag>...</tag>` element in `xml`, unescaped; `None` when
/// absent. Only for libvirt's own output, where `<` in text is always escaped.
pub fn element_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some(unescape(&xml[start..end]))
}

/// The value of `attribute` on the first `<tag ...>` element in `xml`, unescaped.
pub fn element_attribute(xml: &str, tag: &str, attribute: &str) -> Option<String> {
    let open = format!("<{tag} ");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find('>')?;
    let attributes = &xml[start..end];
    for quote in ['"', '\''] {
        let key = format!("{attribute}={quote}");
        if let Some(at) = attributes.find(&key) {
            let value = &attributes[at + key.len()..];
            return Some(unescape(&value[..value.find(quote)?]));
        }
    }
    None
}

/// Escapes text for an XML attribute value or element content.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Undoes XML escaping: the five named entities and numeric character references.
/// An unknown or malformed reference is kept as written.
pub fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let decoded = rest.find(';').and_then(|end| {
            let entity = &rest[1..end];
            let c = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => {
                    let number = entity.strip_prefix('#')?;
                    let code = match number.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                        None => number.parse().ok()?,
                    };
                    char::from_u32(code)
                }
            }?;
            Some((c, end + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirts_message_is_the_error_lines_joined() {
        let stderr = "error: Failed to start domain 'vmc-a'\nerror: internal error: \
                      qemu unexpectedly closed the monitor\n\n";
        assert_eq!(
            error_message(stderr),
            "Failed to start domain 'vmc-a': internal error: qemu unexpectedly closed the monitor"
        );
    }

    #[test]
    fn domstats_and_dominfo_answers_are_read() {
        let stats = key_values("Domain: 'vmc-a'\n  state.state=5\n  state.reason=3\n\n");
        assert_eq!(stats.get("state.state").map(String::as_str), Some("5"));
        assert_eq!(stats.get("state.reason").map(String::as_str), Some("3"));
        let info = colon_fields("Id:             -\nName:           vmc-a\nManaged save:   yes\n");
        assert_eq!(info.get("Managed save").map(String::as_str), Some("yes"));
        assert_eq!(info.get("Name").map(String::as_str), Some("vmc-a"));
    }

    #[test]
    fn escaping_round_trips_and_entities_are_decoded() {
        let text = "a <b> & \"c\" 'd' \u{e9}";
        assert_eq!(
            escape(text),
            "a &lt;b&gt; &amp; &quot;c&quot; &apos;d&apos; \u{e9}"
        );
        assert_eq!(unescape(&escape(text)), text);
        assert_eq!(unescape("&#65;&#x42;&unknown; & x"), "AB&unknown; & x");
    }

    #[test]
    fn elements_of_libvirts_xml_are_found() {
        let xml = "<nodes>\n  <description>multi\nline &amp; &lt;b&gt;</description>\n  \
                   <state>running</state>\n  <creationTime>1795328109</creationTime>\n  \
                   <memory snapshot=\"internal\"/>\n</nodes>";
        assert_eq!(
            element_text(xml, "description").as_deref(),
            Some("multi\nline & <b>")
        );
        assert_eq!(
            element_text(xml, "creationTime").as_deref(),
            Some("1795328109")
        );
        assert_eq!(element_text(xml, "name"), None);
        assert_eq!(
            element_attribute(xml, "memory", "snapshot").as_deref(),
            Some("internal")
        );
        assert_eq!(element_attribute(xml, "memory", "file"), None);
    }
}
