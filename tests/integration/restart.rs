//! The real `vmc-host` process killed with SIGKILL and started again: what had
//! finished is still there, and a command in flight at the kill still gets its
//! result (the guest kept it; the restarted host asks for it again).
//!
//! The test speaks XML-RPC over plain HTTP with a few lines of its own, as the
//! simplest old client would.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vmc_tests::agents::{GuestOptions, GuestProcess};
use vmc_tests::{init_logging, shared_broker, unique_name, BrokerKind};

/// A `vmc-host` process with the unmanaged backend, killed when dropped.
struct HostProcess {
    child: Child,
}

impl HostProcess {
    fn start(state_dir: &std::path::Path, prefix: &str, port: u16, broker: u16) -> HostProcess {
        let binary = vmc_tests::agents::guest_binary().with_file_name("vmc-host");
        let child = Command::new(binary)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .env("VMC_BACKEND", "unmanaged")
            .env("VMC_STATE_DIR", state_dir)
            .env("VMC_LISTEN", format!("127.0.0.1:{port}"))
            .env("VMC_PREFIX", prefix)
            .env("VMC_HOST_ID", "restart-test")
            .env("VMC_BROKER", format!("stomp://127.0.0.1:{broker}"))
            .env("VMC_LOGIN", "guest")
            .env("VMC_PASSCODE", "guest")
            .env("VMC_BEACON_INTERVAL", "1")
            .stdin(Stdio::null())
            .spawn()
            .expect("vmc-host starts");
        HostProcess { child }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One XML-RPC call with string/array-of-string parameters; the response body.
fn call(port: u16, method: &str, params: &[Param]) -> std::io::Result<String> {
    let params: String = params
        .iter()
        .map(|p| match p {
            Param::Str(s) => format!(
                "<param><value><string>{}</string></value></param>",
                escape(s)
            ),
            Param::List(items) => format!(
                "<param><value><array><data>{}</data></array></value></param>",
                items
                    .iter()
                    .map(|s| format!("<value><string>{}</string></value>", escape(s)))
                    .collect::<String>()
            ),
            Param::Double(d) => format!("<param><value><double>{d}</double></value></param>"),
        })
        .collect();
    let body = format!(
        "<?xml version=\"1.0\"?><methodCall><methodName>{method}</methodName><params>{params}</params></methodCall>"
    );
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

enum Param {
    Str(String),
    List(Vec<String>),
    Double(f64),
}

/// The text of the first `<string>` after `<name>member</name>`.
fn member(response: &str, member: &str) -> Option<String> {
    let at = response.find(&format!("<name>{member}</name>"))?;
    let rest = &response[at..];
    let start = rest.find("<string>")? + "<string>".len();
    let end = rest[start..].find("</string>")?;
    Some(rest[start..start + end].to_owned())
}

/// The single string a method returned.
fn returned_string(response: &str) -> Option<String> {
    let start = response.find("<string>")? + "<string>".len();
    let end = response[start..].find("</string>")?;
    Some(response[start..start + end].to_owned())
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_cmd(port: u16, vm: &str, script: &str) -> String {
    let response = call(
        port,
        "runCmd",
        &[
            Param::Str(vm.into()),
            Param::Str("/bin/sh".into()),
            Param::List(vec!["-c".into(), script.into()]),
        ],
    )
    .unwrap();
    returned_string(&response).unwrap_or_else(|| panic!("runCmd answered {response}"))
}

#[test]
fn results_survive_a_kill_9_of_vmc_host() {
    init_logging();
    let broker = shared_broker(BrokerKind::RabbitMq);
    let prefix = unique_name("vmcrestart").replace('.', "-");
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut host = HostProcess::start(state.path(), &prefix, port, broker);
    let mut options = GuestOptions::new(broker, &prefix, Some("durable-vm"));
    options.beacon_interval = 1.0;
    let _guest = GuestProcess::start(options);
    wait_for("the guest to be listed", || {
        call(port, "listVMs", &[])
            .map(|r| r.contains("durable-vm"))
            .unwrap_or(false)
    });

    let before = run_cmd(port, "durable-vm", "echo before");
    wait_for("the first result", || {
        call(port, "getCmdResults", &[Param::Str(before.clone())])
            .map(|r| member(&r, "out").as_deref() == Some("before\n"))
            .unwrap_or(false)
    });
    let during = run_cmd(port, "durable-vm", "sleep 3; echo during");
    std::thread::sleep(Duration::from_millis(300)); // sent, not finished
    host.kill9();

    let _host = HostProcess::start(state.path(), &prefix, port, broker);
    wait_for("the restarted host to answer", || {
        call(port, "version", &[]).is_ok()
    });
    let again = call(port, "getCmdResults", &[Param::Str(before.clone())]).unwrap();
    assert_eq!(
        member(&again, "out").as_deref(),
        Some("before\n"),
        "{again}"
    );
    let late = call(
        port,
        "getCmdResults",
        &[Param::Str(during.clone()), Param::Double(30.0)],
    )
    .unwrap();
    assert_eq!(member(&late, "out").as_deref(), Some("during\n"), "{late}");
}
