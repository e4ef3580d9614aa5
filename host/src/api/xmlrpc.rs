//! XML-RPC: the original VMController's API, name for name, argument for argument,
//! at `POST /RPC2` and `POST /`, plus the methods the original lacked and the
//! introspection methods.
//!
//! One table, [`METHODS`] (with [`ALIASES`] for the predecessor's old names), says
//! for every method its parameters with their types and defaults, its result type,
//! one line of meaning and the function that calls the operation in [`ops`]; the
//! arity and type checks, `help`, `system.listMethods`, `system.methodHelp` and
//! `system.methodSignature` are all read from it. A request is parsed with `dxr`'s
//! value types after two checks of our own (UTF-8; element nesting at most
//! [`MAX_DEPTH`], checked without recursion, so a deeply nested body is refused with
//! its reason before any parsing: `dxr` itself gives up near 40 nested arrays); every
//! failure, from malformed XML to a hypervisor error, is answered as a fault with a
//! stable [`FaultCode`] and a sentence a person can act on. `system.multicall` runs
//! its calls in order, each answering a value or a fault of its own.
//! Values: timestamps are `dateTime.iso8601` in UTC; integers are `i4`, or `i8`
//! beyond 32 bits; raw output bytes are `base64`; `nil` is accepted for any optional
//! argument (meaning its default) but never sent: an absent value is an absent
//! struct member, so clients without the `nil` extension understand every answer.
//! Strings are text: characters XML 1.0 cannot carry (control characters other
//! than tab, newline and carriage return) are sent as U+FFFD; `getCmdOutput` gives
//! the exact bytes. This module holds no logic of an operation.

use super::ops::{self, ApiError};
use super::{FaultCode, MAX_REQUEST_BYTES};
use crate::engine::command::CommandDetails;
use crate::engine::vm::LifecycleOp;
use crate::engine::{Engine, FanoutView, VmView};
use crate::hypervisor::{PerformanceData, SnapshotInfo};
use crate::store::{CommandRecord, TransferDirection, TransferRecord};
use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use dxr::{Fault, FaultResponse, MethodCall, MethodResponse, Value};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use vmc_protocol::words::{CommandSpec, GuestInfo, OutputStream, ResourceUsage};

/// The deepest element nesting a request may have (a call with a struct in an
/// array in a struct is about 12 deep).
pub const MAX_DEPTH: usize = 100;

/// Why a call could not be answered with a value.
#[derive(Debug, thiserror::Error)]
pub enum XmlRpcError {
    #[error("the request is not an XML-RPC method call: {0}")]
    Malformed(String),
    #[error("there is no method named {0:?} (system.listMethods lists them)")]
    UnknownMethod(String),
    #[error("{method}: {message}")]
    InvalidParams { method: String, message: String },
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl XmlRpcError {
    /// The stable code of this failure.
    pub fn fault_code(&self) -> FaultCode {
        match self {
            XmlRpcError::Malformed(_) => FaultCode::MalformedRequest,
            XmlRpcError::UnknownMethod(_) => FaultCode::UnknownMethod,
            XmlRpcError::InvalidParams { .. } => FaultCode::InvalidParams,
            XmlRpcError::Api(e) => e.fault_code(),
        }
    }

    /// The fault a client receives.
    pub fn to_fault(&self) -> Fault {
        let message = match self {
            XmlRpcError::Api(e) => e.message(),
            other => other.to_string(),
        };
        Fault::new(self.fault_code().code(), message)
    }
}

// ---------------------------------------------------------------------------
// The method table.

/// The XML-RPC type of a parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ty {
    String,
    Int,
    /// A double; an integer is accepted too.
    Double,
    /// An array of strings.
    Strings,
    /// A struct of strings.
    Env,
    /// `system.multicall`'s array of calls.
    Calls,
}

impl Ty {
    fn xml_name(self) -> &'static str {
        match self {
            Ty::String => "string",
            Ty::Int => "int",
            Ty::Double => "double",
            Ty::Strings | Ty::Calls => "array",
            Ty::Env => "struct",
        }
    }

    /// Checks a value given for a parameter of this type.
    fn check(self, value: &Value) -> Result<(), String> {
        match self {
            Ty::String => decode_string(value).map(drop),
            Ty::Int => decode_int(value).map(drop),
            Ty::Double => decode_double(value).map(drop),
            Ty::Strings => decode_strings(value).map(drop),
            Ty::Env => decode_env(value).map(drop),
            Ty::Calls => decode_array(value).map(drop),
        }
    }
}

/// The default of an optional parameter.
#[derive(Clone, Copy, Debug)]
enum Fallback {
    Nil,
    Str(&'static str),
    Int(i32),
    Double(f64),
    EmptyArray,
    EmptyStruct,
}

impl Fallback {
    fn value(self) -> Value {
        match self {
            Fallback::Nil => Value::Nil,
            Fallback::Str(s) => Value::String(s.to_owned()),
            Fallback::Int(n) => Value::Integer(n),
            Fallback::Double(x) => Value::Double(x),
            Fallback::EmptyArray => Value::Array(Vec::new()),
            Fallback::EmptyStruct => Value::Struct(BTreeMap::new()),
        }
    }

    /// As the original documented it, in Python.
    fn python(self) -> String {
        match self {
            Fallback::Nil => "None".into(),
            Fallback::Str(s) => format!("'{s}'"),
            Fallback::Int(n) => n.to_string(),
            Fallback::Double(x) => format!("{x:?}"),
            Fallback::EmptyArray => "()".into(),
            Fallback::EmptyStruct => "{}".into(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Param {
    name: &'static str,
    ty: Ty,
    default: Option<Fallback>,
}

const fn req(name: &'static str, ty: Ty) -> Param {
    Param {
        name,
        ty,
        default: None,
    }
}

const fn opt(name: &'static str, ty: Ty, default: Fallback) -> Param {
    Param {
        name,
        ty,
        default: Some(default),
    }
}

type Reply = Pin<Box<dyn Future<Output = Result<Value, XmlRpcError>>>>;

/// One method: what `help` and the introspection methods tell, and what runs.
struct Method {
    name: &'static str,
    params: &'static [Param],
    /// The XML-RPC type of the result.
    returns: &'static str,
    /// One line of meaning.
    summary: &'static str,
    call: fn(Engine, Args) -> Reply,
}

impl std::fmt::Debug for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl Method {
    /// `name(a, b='x') -> type`, as `help` shows it.
    fn signature(&self, name: &str) -> String {
        let params: Vec<String> = self
            .params
            .iter()
            .map(|p| match p.default {
                Some(d) => format!("{}={}", p.name, d.python()),
                None => p.name.to_owned(),
            })
            .collect();
        format!("{name}({}) -> {}", params.join(", "), self.returns)
    }

    fn required(&self) -> usize {
        self.params.iter().filter(|p| p.default.is_none()).count()
    }

    /// `system.methodSignature`: one `[result, param...]` list per accepted arity.
    fn signatures(&self) -> Vec<Vec<&'static str>> {
        (self.required()..=self.params.len())
            .map(|n| {
                std::iter::once(self.returns)
                    .chain(self.params[..n].iter().map(|p| p.ty.xml_name()))
                    .collect()
            })
            .collect()
    }
}

/// Boxes an `async fn(Engine, Args)` as a table entry.
macro_rules! call {
    ($f:path) => {
        |engine, args| -> Reply { Box::pin($f(engine, args)) }
    };
}

const VM: Param = req("vm", Ty::String);
const CMD_ID: Param = req("cmdId", Ty::String);
/// `runCmd`'s parameters after the target.
const COMMAND: [Param; 5] = [
    req("cmd", Ty::String),
    opt("args", Ty::Strings, Fallback::EmptyArray),
    opt("env", Ty::Env, Fallback::EmptyStruct),
    opt("path", Ty::String, Fallback::Nil),
    opt("fileForStdin", Ty::String, Fallback::Str("")),
];

/// Every method: the original's first, then the new ones, then introspection.
static METHODS: &[Method] = &[
    Method {
        name: "createVM",
        params: &[req("name", Ty::String), req("hddImagePath", Ty::String)],
        returns: "struct",
        summary: "Creates a VM that boots from the disk image at hddImagePath (the backend \
                  works on its own copy-on-write overlay, never on the image); returns the \
                  VM as getPresence and listVMsWithState describe it.",
        call: call!(create_vm),
    },
    Method {
        name: "removeVM",
        params: &[VM],
        returns: "boolean",
        summary: "Removes a VM and its files (its command history stays); an unmanaged \
                  guest comes back when its agent next speaks. Returns true.",
        call: call!(remove_vm),
    },
    Method {
        name: "start",
        params: &[VM],
        returns: "string",
        summary: "Starts a VM, from its saved state if it has one; returns its state.",
        call: call!(start),
    },
    Method {
        name: "shutdown",
        params: &[VM],
        returns: "string",
        summary: "Presses the VM's ACPI power button (the guest decides); returns its state.",
        call: call!(shutdown),
    },
    Method {
        name: "sleep",
        params: &[VM],
        returns: "string",
        summary: "Puts a VM to sleep (ACPI S3) where the backend can; returns its state.",
        call: call!(sleep),
    },
    Method {
        name: "reset",
        params: &[VM],
        returns: "string",
        summary: "Resets (reboots) a VM at once; returns its state.",
        call: call!(reset),
    },
    Method {
        name: "powerOff",
        params: &[VM],
        returns: "string",
        summary: "Cuts a VM's power at once; returns its state.",
        call: call!(power_off),
    },
    Method {
        name: "pause",
        params: &[VM],
        returns: "string",
        summary: "Pauses a running VM; returns its state.",
        call: call!(pause),
    },
    Method {
        name: "resume",
        params: &[VM],
        returns: "string",
        summary: "Resumes a paused VM; returns its state.",
        call: call!(resume),
    },
    Method {
        name: "getState",
        params: &[VM],
        returns: "string",
        summary: "A VM's state: Unknown, PoweredOff, Saved, Aborted, Running, Paused, Stuck, \
                  Starting, Stopping, Saving, Restoring or Discarding (unmanaged guests are \
                  Unknown: see getPresence).",
        call: call!(get_state),
    },
    Method {
        name: "saveState",
        params: &[VM],
        returns: "string",
        summary: "Saves a running VM's memory and devices and stops it; the next start \
                  resumes from there. Returns its state.",
        call: call!(save_state),
    },
    Method {
        name: "discardState",
        params: &[VM],
        returns: "string",
        summary: "Forgets a VM's saved state, so the next start boots afresh; returns its \
                  state.",
        call: call!(discard_state),
    },
    Method {
        name: "takeSnapshot",
        params: &[
            VM,
            req("name", Ty::String),
            opt("desc", Ty::String, Fallback::Str("")),
        ],
        returns: "string",
        summary: "Takes a snapshot of a VM named name, described by desc; returns its state.",
        call: call!(take_snapshot),
    },
    Method {
        name: "restoreSnapshot",
        params: &[VM, req("name", Ty::String)],
        returns: "string",
        summary: "Restores a VM's snapshot; returns its state.",
        call: call!(restore_snapshot),
    },
    Method {
        name: "deleteSnapshot",
        params: &[VM, req("name", Ty::String)],
        returns: "string",
        summary: "Deletes a VM's snapshot; returns its state.",
        call: call!(delete_snapshot),
    },
    Method {
        name: "ping",
        params: &[VM, opt("timeout_secs", Ty::Double, Fallback::Double(5.0))],
        returns: "boolean",
        summary: "True when the VM's guest agent answers within timeout_secs, false when it \
                  does not.",
        call: call!(ping),
    },
    Method {
        name: "runCmd",
        params: &[
            req("toVmName", Ty::String),
            COMMAND[0],
            COMMAND[1],
            COMMAND[2],
            COMMAND[3],
            COMMAND[4],
        ],
        returns: "string",
        summary: "Runs cmd with args on the VM's guest, with env added to its environment, \
                  in directory path, stdin read from the guest's file fileForStdin; returns \
                  the command id at once.",
        call: call!(run_cmd),
    },
    Method {
        name: "listFinishedCmds",
        params: &[opt("limit", Ty::Int, Fallback::Int(1000))],
        returns: "struct",
        summary: "The newest limit finished commands: command id -> struct of vm, cmd, args, \
                  state, finished, exitCodeOrSignal, createdAt, finishedAt.",
        call: call!(list_finished_cmds),
    },
    Method {
        name: "getCmdResults",
        params: &[
            CMD_ID,
            opt("timeout_secs", Ty::Double, Fallback::Double(0.0)),
        ],
        returns: "struct",
        summary: "A finished command's result (cmd-id, out, err, finished, exitCodeOrSignal, \
                  resources, and state, outcome, error, ...), as often as asked; waits up to \
                  timeout_secs for the end, then faults not-finished (11).",
        call: call!(get_cmd_results),
    },
    Method {
        name: "getCmdDetails",
        params: &[CMD_ID],
        returns: "struct",
        summary: "A command's state, spec, timestamps (UTC), pid and resources: live usage \
                  from its guest while it runs, the final usage once finished.",
        call: call!(get_cmd_details),
    },
    Method {
        name: "cpFileToVM",
        params: &[
            req("vmName", Ty::String),
            req("pathToLocalFileName", Ty::String),
            opt("pathToRemoteFileName", Ty::String, Fallback::Nil),
        ],
        returns: "struct",
        summary: "Copies a host file into the VM (to the same path when no remote path is \
                  given) and returns once the guest verified its size and SHA-256: the \
                  transfer, as getTransferProgress.",
        call: call!(cp_file_to_vm),
    },
    Method {
        name: "cpFileFromVM",
        params: &[
            req("vmName", Ty::String),
            req("pathToRemoteFileName", Ty::String),
            opt("pathToLocalFileName", Ty::String, Fallback::Nil),
        ],
        returns: "struct",
        summary: "Copies a file of the VM to the host (to the same path when no local path \
                  is given) and returns once its size and SHA-256 are verified: the \
                  transfer, as getTransferProgress.",
        call: call!(cp_file_from_vm),
    },
    Method {
        name: "help",
        params: &[opt("methodName", Ty::String, Fallback::Nil)],
        returns: "string",
        summary: "Every method with its signature and meaning, or one method's.",
        call: call!(help),
    },
    Method {
        name: "listVMs",
        params: &[],
        returns: "array",
        summary: "The names of all VMs, unmanaged guests included.",
        call: call!(list_vms),
    },
    Method {
        name: "listVMsWithState",
        params: &[],
        returns: "struct",
        summary: "VM name -> state name.",
        call: call!(list_vms_with_state),
    },
    Method {
        name: "listRunningVMs",
        params: &[],
        returns: "array",
        summary: "The names of the VMs that are Running, and of the unmanaged guests whose \
                  agent is alive.",
        call: call!(list_running_vms),
    },
    Method {
        name: "listSnapshots",
        params: &[VM],
        returns: "array",
        summary: "A VM's snapshots: structs of name, description, createdAt, vmStateBytes.",
        call: call!(list_snapshots),
    },
    Method {
        name: "getIdsToNamesMapping",
        params: &[],
        returns: "struct",
        summary: "Guest id (the NIC's MAC address, or an unmanaged guest's own id) -> VM name.",
        call: call!(ids_to_names),
    },
    Method {
        name: "getNamesToIdsMapping",
        params: &[],
        returns: "struct",
        summary: "VM name -> guest id.",
        call: call!(names_to_ids),
    },
    Method {
        name: "getPerformanceData",
        params: &[VM],
        returns: "struct",
        summary: "A VM's figures: cpuSecs, rssBytes, diskReadBytes, diskWriteBytes, \
                  diskReadOps, diskWriteOps, uptimeSecs, extra.",
        call: call!(get_performance_data),
    },
    Method {
        name: "version",
        params: &[],
        returns: "string",
        summary: "The version of this host agent.",
        call: call!(version),
    },
    Method {
        name: "runCmdOnVMs",
        params: &[
            req("glob", Ty::String),
            COMMAND[0],
            COMMAND[1],
            COMMAND[2],
            COMMAND[3],
            COMMAND[4],
        ],
        returns: "struct",
        summary: "Runs a command on every VM whose name or guest id matches the glob (*, ?, \
                  [..]); returns fanoutId, cmds (VM -> command id) and failed (VM -> why).",
        call: call!(run_cmd_on_vms),
    },
    Method {
        name: "cancelCmd",
        params: &[CMD_ID],
        returns: "boolean",
        summary: "Cancels a command: its guest kills the command's whole process group. \
                  Returns true.",
        call: call!(cancel_cmd),
    },
    Method {
        name: "getCmdOutput",
        params: &[
            CMD_ID,
            opt("stream", Ty::String, Fallback::Str("out")),
            opt("offset", Ty::Int, Fallback::Int(0)),
            opt("maxBytes", Ty::Int, Fallback::Int(1024 * 1024)),
        ],
        returns: "struct",
        summary: "Up to maxBytes (at most 8 MiB) of a command's stream ('out' or 'err') from \
                  byte offset: data (base64), nextOffset, totalBytes, state, finished; read \
                  until finished is true and data is empty.",
        call: call!(get_cmd_output),
    },
    Method {
        name: "startCpFileToVM",
        params: &[
            req("vmName", Ty::String),
            req("pathToLocalFileName", Ty::String),
            opt("pathToRemoteFileName", Ty::String, Fallback::Nil),
        ],
        returns: "string",
        summary: "As cpFileToVM, but returns the transfer id at once (see \
                  getTransferProgress).",
        call: call!(start_cp_file_to_vm),
    },
    Method {
        name: "startCpFileFromVM",
        params: &[
            req("vmName", Ty::String),
            req("pathToRemoteFileName", Ty::String),
            opt("pathToLocalFileName", Ty::String, Fallback::Nil),
        ],
        returns: "string",
        summary: "As cpFileFromVM, but returns the transfer id at once (see \
                  getTransferProgress).",
        call: call!(start_cp_file_from_vm),
    },
    Method {
        name: "getTransferProgress",
        params: &[req("transferId", Ty::String)],
        returns: "struct",
        summary: "A transfer: state (pending, running, done, failed, cancelled), bytesDone, \
                  size, sha256 once known, paths, error, createdAt, finishedAt.",
        call: call!(get_transfer_progress),
    },
    Method {
        name: "getPresence",
        params: &[VM],
        returns: "struct",
        summary: "Where a VM's guest agent stands: presence (unknown, booting, alive, suspect, \
                  lost, gone), since, lastHeard, and the VM's state.",
        call: call!(get_presence),
    },
    Method {
        name: "getVMInfo",
        params: &[VM],
        returns: "struct",
        summary: "One VM as createVM returns it: name, id (its NIC's MAC), backend, state, \
                  presence, presenceSince, lastHeard, and guest (what its agent said in HELLO: \
                  hostname, os, kernel, agentVersion, ips, mac, bootTime, ...).",
        call: call!(get_vm_info),
    },
    Method {
        name: "system.listMethods",
        params: &[],
        returns: "array",
        summary: "The names of every method, aliases included.",
        call: call!(system_list_methods),
    },
    Method {
        name: "system.methodHelp",
        params: &[req("methodName", Ty::String)],
        returns: "string",
        summary: "A method's signature and meaning.",
        call: call!(system_method_help),
    },
    Method {
        name: "system.methodSignature",
        params: &[req("methodName", Ty::String)],
        returns: "array",
        summary: "A method's signatures: one [result type, parameter types...] per accepted \
                  number of arguments.",
        call: call!(system_method_signature),
    },
    Method {
        name: "system.multicall",
        params: &[req("calls", Ty::Calls)],
        returns: "array",
        summary: "Runs calls ({methodName, params} structs) in order; answers for each \
                  [result] or {faultCode, faultString}.",
        call: call!(system_multicall),
    },
];

/// Old names that clients of the predecessor used, and what they mean now.
static ALIASES: &[(&str, &str)] = &[
    ("unpause", "resume"),
    ("listAvailableVMs", "listVMs"),
    ("listRegisteredVMs", "listVMs"),
    ("saveSnapshot", "takeSnapshot"),
    ("getStats", "getPerformanceData"),
];

/// The method a name (or an alias) calls.
fn find(name: &str) -> Option<&'static Method> {
    let name = alias_target(name).unwrap_or(name);
    METHODS.iter().find(|m| m.name == name)
}

/// The method an old name stands for.
fn alias_target(name: &str) -> Option<&'static str> {
    ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map(|(_, target)| *target)
}

/// `help()`: every method, two lines each.
fn help_text() -> String {
    let mut text = format!(
        "vmcontroller host agent {}: XML-RPC methods (help('name') or \
         system.methodHelp('name') tells one). Faults carry a stable faultCode, listed \
         in docs/API.md.\n\n",
        crate::VERSION
    );
    for method in METHODS {
        text += &format!(
            "{}\n    {}\n",
            method.signature(method.name),
            method.summary
        );
    }
    text += "\nOld names, still answered:\n";
    for (alias, target) in ALIASES {
        if let Some(method) = find(target) {
            text += &format!("{}\n    Alias of {target}.\n", method.signature(alias));
        }
    }
    text
}

/// `help(name)`, `system.methodHelp(name)`.
fn method_help(name: &str) -> Result<String, XmlRpcError> {
    let method = find(name).ok_or_else(|| XmlRpcError::UnknownMethod(name.to_owned()))?;
    let mut text = format!("{}\n\n{}", method.signature(name), method.summary);
    if let Some(target) = alias_target(name) {
        text += &format!("\n\nAn old name of {target}.");
    }
    Ok(text)
}

// ---------------------------------------------------------------------------
// Arguments.

/// A call's arguments, checked against its method's parameters: their number and
/// types are right; absent optional ones (or `nil`) read as their defaults.
#[derive(Debug)]
struct Args {
    /// The name the caller used (an alias, maybe), for messages.
    called: String,
    method: &'static Method,
    values: Vec<Value>,
}

impl Args {
    fn new(called: &str, method: &'static Method, values: Vec<Value>) -> Result<Args, XmlRpcError> {
        let invalid = |message: String| XmlRpcError::InvalidParams {
            method: called.to_owned(),
            message,
        };
        let (min, max) = (method.required(), method.params.len());
        if values.len() < min || values.len() > max {
            let wanted = match (min, max) {
                (0, 0) => "no arguments".to_owned(),
                (1, 1) => "1 argument".to_owned(),
                (a, b) if a == b => format!("{a} arguments"),
                (a, b) => format!("{a} to {b} arguments"),
            };
            return Err(invalid(format!(
                "takes {wanted} ({}), not {}",
                method.signature(called),
                values.len()
            )));
        }
        for (i, (param, value)) in method.params.iter().zip(&values).enumerate() {
            if param.default.is_some() && matches!(value, Value::Nil) {
                continue;
            }
            param
                .ty
                .check(value)
                .map_err(|why| invalid(format!("argument {} ({}) {why}", i + 1, param.name)))?;
        }
        Ok(Args {
            called: called.to_owned(),
            method,
            values,
        })
    }

    /// Argument `i` as given, or its default when absent or `nil`.
    fn value(&self, i: usize) -> Value {
        let default = self
            .method
            .params
            .get(i)
            .and_then(|p| p.default)
            .map_or(Value::Nil, Fallback::value);
        match self.values.get(i) {
            Some(Value::Nil) | None => default,
            Some(value) => value.clone(),
        }
    }

    fn decode<T>(
        &self,
        i: usize,
        decode: fn(&Value) -> Result<T, String>,
    ) -> Result<T, XmlRpcError> {
        decode(&self.value(i)).map_err(|why| XmlRpcError::InvalidParams {
            method: self.called.clone(),
            message: format!(
                "argument {} ({}) {why}",
                i + 1,
                self.method.params.get(i).map_or("?", |p| p.name)
            ),
        })
    }

    fn string(&self, i: usize) -> Result<String, XmlRpcError> {
        self.decode(i, decode_string)
    }

    /// An optional string: `None` when absent, `nil` or empty.
    fn opt_string(&self, i: usize) -> Result<Option<String>, XmlRpcError> {
        match self.value(i) {
            Value::Nil => Ok(None),
            _ => Ok(Some(self.string(i)?).filter(|s| !s.is_empty())),
        }
    }

    fn int(&self, i: usize) -> Result<i64, XmlRpcError> {
        self.decode(i, decode_int)
    }

    fn double(&self, i: usize) -> Result<f64, XmlRpcError> {
        self.decode(i, decode_double)
    }

    /// `runCmd`'s command, from its parameters starting at `first`.
    fn command_spec(&self, first: usize) -> Result<CommandSpec, XmlRpcError> {
        let mut spec = CommandSpec::new(self.string(first)?);
        spec.args = self.decode(first + 1, decode_strings)?;
        spec.env = self.decode(first + 2, decode_env)?;
        spec.path = self.opt_string(first + 3)?;
        spec.file_for_stdin = self.opt_string(first + 4)?;
        Ok(spec)
    }
}

/// The XML-RPC name of a value's type, for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Integer(_) => "an int",
        Value::Long(_) => "an i8",
        Value::Boolean(_) => "a boolean",
        Value::String(_) => "a string",
        Value::Double(_) => "a double",
        Value::DateTime(_) => "a dateTime.iso8601",
        Value::Base64(_) => "a base64",
        Value::Struct(_) => "a struct",
        Value::Array(_) => "an array",
        Value::Nil => "nil",
        _ => "a value of an unknown type",
    }
}

fn decode_string(value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        other => Err(format!("must be a string, not {}", kind(other))),
    }
}

fn decode_int(value: &Value) -> Result<i64, String> {
    match value {
        Value::Integer(n) => Ok(i64::from(*n)),
        Value::Long(n) => Ok(*n),
        other => Err(format!("must be an int, not {}", kind(other))),
    }
}

fn decode_double(value: &Value) -> Result<f64, String> {
    match value {
        Value::Double(x) => Ok(*x),
        // Exact for every integer a timeout can sensibly be.
        Value::Integer(n) => Ok(f64::from(*n)),
        Value::Long(n) => Ok(*n as f64),
        other => Err(format!("must be a double, not {}", kind(other))),
    }
}

fn decode_array(value: &Value) -> Result<Vec<Value>, String> {
    match value {
        Value::Array(items) => Ok(items.clone()),
        other => Err(format!("must be an array, not {}", kind(other))),
    }
}

fn decode_strings(value: &Value) -> Result<Vec<String>, String> {
    let Value::Array(items) = value else {
        return Err(format!("must be an array of strings, not {}", kind(value)));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(s.clone()),
            other => Err(format!(
                "must be an array of strings, but item {} is {}",
                i + 1,
                kind(other)
            )),
        })
        .collect()
}

fn decode_env(value: &Value) -> Result<BTreeMap<String, String>, String> {
    let Value::Struct(members) = value else {
        return Err(format!("must be a struct of strings, not {}", kind(value)));
    };
    members
        .iter()
        .map(|(key, item)| match item {
            Value::String(s) => Ok((key.clone(), s.clone())),
            other => Err(format!(
                "must be a struct of strings, but {key:?} is {}",
                kind(other)
            )),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Values of answers.

fn string(s: impl Into<String>) -> Value {
    Value::String(s.into())
}

/// An `i4` when it fits, an `i8` beyond.
fn int(n: i64) -> Value {
    i32::try_from(n).map_or(Value::Long(n), Value::Integer)
}

fn uint(n: u64) -> Value {
    int(i64::try_from(n).unwrap_or(i64::MAX))
}

/// A UTC time as `dateTime.iso8601`; a time XML-RPC cannot write (before year 1
/// or after 9999) as its RFC 3339 string.
fn time(t: DateTime<Utc>) -> Value {
    dxr::DateTime::from_str(&t.format("%Y%m%dT%H:%M:%S").to_string())
        .map_or_else(|_| string(t.to_rfc3339()), Value::DateTime)
}

/// An RFC 3339 time written by a guest, as [`time`]; `None` if it is not one.
fn rfc3339(text: Option<&str>) -> Option<Value> {
    let parsed = DateTime::parse_from_rfc3339(text?).ok()?;
    Some(time(parsed.with_timezone(&Utc)))
}

fn strings<I: IntoIterator<Item = S>, S: Into<String>>(items: I) -> Value {
    Value::Array(items.into_iter().map(|s| string(s)).collect())
}

/// A struct under construction; absent optional members are left out.
#[derive(Debug, Default)]
struct Members(BTreeMap<String, Value>);

impl Members {
    fn new() -> Members {
        Members::default()
    }

    fn set(mut self, key: &str, value: Value) -> Members {
        self.0.insert(key.to_owned(), value);
        self
    }

    fn opt(self, key: &str, value: Option<Value>) -> Members {
        match value {
            Some(value) => self.set(key, value),
            None => self,
        }
    }

    fn done(self) -> Value {
        Value::Struct(self.0)
    }
}

fn vm_value(vm: &VmView) -> Value {
    Members::new()
        .set("name", string(&vm.name))
        .set("id", string(&vm.id))
        .set("backend", string(&vm.backend))
        .set("state", string(vm.state.as_str()))
        .set("presence", string(vm.presence.as_str()))
        .set("presenceSince", time(vm.presence_since))
        .opt("lastHeard", vm.last_heard.map(time))
        .opt("guest", vm.guest.as_ref().map(guest_value))
        .done()
}

fn guest_value(guest: &GuestInfo) -> Value {
    Members::new()
        .set("id", string(guest.id.as_str()))
        .set("ips", strings(&guest.ips))
        .opt("mac", guest.mac.as_deref().map(string))
        .set("hostname", string(&guest.hostname))
        .set("os", string(&guest.os))
        .set("kernel", string(&guest.kernel))
        .set("agentVersion", string(&guest.agent_version))
        .set("protocol", uint(u64::from(guest.protocol)))
        .set("cpus", uint(u64::from(guest.cpus)))
        .set("memoryBytes", uint(guest.memory_bytes))
        .set("bootTime", uint(guest.boot_time))
        .set("capabilities", strings(&guest.capabilities))
        .done()
}

fn presence_value(vm: &VmView) -> Value {
    Members::new()
        .set("vm", string(&vm.name))
        .set("presence", string(vm.presence.as_str()))
        .set("since", time(vm.presence_since))
        .opt("lastHeard", vm.last_heard.map(time))
        .set("state", string(vm.state.as_str()))
        .done()
}

fn resources_value(usage: &ResourceUsage) -> Value {
    let ints = [
        ("ru_maxrss", usage.ru_maxrss),
        ("ru_ixrss", usage.ru_ixrss),
        ("ru_idrss", usage.ru_idrss),
        ("ru_isrss", usage.ru_isrss),
        ("ru_minflt", usage.ru_minflt),
        ("ru_majflt", usage.ru_majflt),
        ("ru_nswap", usage.ru_nswap),
        ("ru_inblock", usage.ru_inblock),
        ("ru_oublock", usage.ru_oublock),
        ("ru_msgsnd", usage.ru_msgsnd),
        ("ru_msgrcv", usage.ru_msgrcv),
        ("ru_nsignals", usage.ru_nsignals),
        ("ru_nvcsw", usage.ru_nvcsw),
        ("ru_nivcsw", usage.ru_nivcsw),
    ];
    ints.into_iter()
        .fold(Members::new(), |m, (key, n)| m.set(key, int(n)))
        .set("ru_utime", Value::Double(usage.ru_utime))
        .set("ru_stime", Value::Double(usage.ru_stime))
        .done()
}

/// The original's result struct and this version's additions.
fn results_value(results: &ops::CommandResults) -> Value {
    let (record, result) = (&results.record, &results.result);
    Members::new()
        .set("cmd-id", string(&result.cmd_id))
        .set("out", string(&result.out))
        .set("err", string(&result.err))
        .set("finished", Value::Boolean(result.finished))
        .set(
            "exitCodeOrSignal",
            int(i64::from(result.exit_code_or_signal)),
        )
        .set("resources", resources_value(&result.resources))
        .set("state", string(record.state.as_str()))
        .set("outcome", string(result.state.as_str()))
        .opt("error", result.error.as_deref().map(string))
        .opt("vm", record.vm.as_deref().map(string))
        .opt("startedAt", rfc3339(result.started_at.as_deref()))
        .opt("endedAt", rfc3339(result.ended_at.as_deref()))
        .set("wallSecs", Value::Double(result.wall_secs))
        .set("outBytes", uint(result.out_bytes))
        .set("errBytes", uint(result.err_bytes))
        .set("outTruncated", Value::Boolean(result.out_truncated))
        .set("errTruncated", Value::Boolean(result.err_truncated))
        .opt("outFile", result.out_file.as_deref().map(string))
        .opt("errFile", result.err_file.as_deref().map(string))
        .done()
}

/// `listFinishedCmds`' summary of a command.
fn summary_value(record: &CommandRecord) -> Value {
    let result = record.result.as_ref();
    Members::new()
        .set("cmd-id", string(&record.cmd_id))
        .opt("vm", record.vm.as_deref().map(string))
        .set("guestId", string(&record.guest_id))
        .set("cmd", string(&record.spec.cmd))
        .set("args", strings(&record.spec.args))
        .set("state", string(record.state.as_str()))
        .set(
            "finished",
            Value::Boolean(result.is_some_and(|r| r.finished)),
        )
        .set(
            "exitCodeOrSignal",
            int(result.map_or(-1, |r| i64::from(r.exit_code_or_signal))),
        )
        .set("createdAt", time(record.created_at))
        .opt("finishedAt", record.finished_at.map(time))
        .opt("error", record.error.as_deref().map(string))
        .done()
}

fn details_value(details: &CommandDetails) -> Value {
    let record = &details.record;
    let resources = match (&record.result, &details.live) {
        (Some(result), _) => Some(resources_value(&result.resources)),
        (None, Some(live)) => Some(resources_value(&live.usage)),
        (None, None) => None,
    };
    let live = details.live.as_ref().map(|live| {
        Members::new()
            .set("state", string(live.state.as_str()))
            .opt("pid", live.pid.map(|p| uint(u64::from(p))))
            .set("resources", resources_value(&live.usage))
            .set("outBytes", uint(live.out_bytes))
            .set("errBytes", uint(live.err_bytes))
            .done()
    });
    let env = record
        .spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), string(v)))
        .collect();
    Members::new()
        .set("cmd-id", string(&record.cmd_id))
        .opt("vm", record.vm.as_deref().map(string))
        .set("guestId", string(&record.guest_id))
        .opt("fanoutId", record.fanout_id.as_deref().map(string))
        .set("state", string(record.state.as_str()))
        .set("cmd", string(&record.spec.cmd))
        .set("args", strings(&record.spec.args))
        .set("env", Value::Struct(env))
        .opt("path", record.spec.path.as_deref().map(string))
        .opt(
            "fileForStdin",
            record.spec.file_for_stdin.as_deref().map(string),
        )
        .opt("pid", record.pid.map(|p| uint(u64::from(p))))
        .set("createdAt", time(record.created_at))
        .opt("sentAt", record.sent_at.map(time))
        .opt("startedAt", record.started_at.map(time))
        .opt("finishedAt", record.finished_at.map(time))
        .opt("deadline", record.deadline.map(time))
        .set("outBytes", uint(record.out_bytes))
        .set("errBytes", uint(record.err_bytes))
        .opt("error", record.error.as_deref().map(string))
        .opt("resources", resources)
        .opt("live", live)
        .opt(
            "exitCodeOrSignal",
            record
                .result
                .as_ref()
                .map(|r| int(i64::from(r.exit_code_or_signal))),
        )
        .done()
}

fn transfer_value(transfer: &TransferRecord) -> Value {
    Members::new()
        .set("transferId", string(&transfer.transfer_id))
        .set("vm", string(&transfer.vm))
        .set("guestId", string(&transfer.guest_id))
        .set("direction", string(transfer.direction.as_str()))
        .set("localPath", string(transfer.local_path.to_string_lossy()))
        .set("remotePath", string(&transfer.remote_path))
        .opt("size", transfer.size.map(uint))
        .opt("sha256", transfer.sha256.as_deref().map(string))
        .set("bytesDone", uint(transfer.bytes_done))
        .set("state", string(transfer.state.as_str()))
        .opt("error", transfer.error.as_deref().map(string))
        .set("createdAt", time(transfer.created_at))
        .opt("finishedAt", transfer.finished_at.map(time))
        .done()
}

fn snapshot_value(snapshot: &SnapshotInfo) -> Value {
    Members::new()
        .set("name", string(&snapshot.name))
        .set("description", string(&snapshot.description))
        .opt(
            "createdAt",
            DateTime::from_timestamp(snapshot.created_at, 0).map(time),
        )
        .set("vmStateBytes", uint(snapshot.vm_state_bytes))
        .done()
}

fn performance_value(data: &PerformanceData) -> Value {
    let extra = data
        .extra
        .iter()
        .map(|(k, v)| (k.clone(), Value::Double(*v)))
        .collect();
    Members::new()
        .set("cpuSecs", Value::Double(data.cpu_secs))
        .set("rssBytes", uint(data.rss_bytes))
        .set("diskReadBytes", uint(data.disk_read_bytes))
        .set("diskWriteBytes", uint(data.disk_write_bytes))
        .set("diskReadOps", uint(data.disk_read_ops))
        .set("diskWriteOps", uint(data.disk_write_ops))
        .set("uptimeSecs", Value::Double(data.uptime_secs))
        .set("extra", Value::Struct(extra))
        .done()
}

fn fanout_value(fanout: &FanoutView) -> Value {
    let mut cmds = BTreeMap::new();
    let mut failed = BTreeMap::new();
    for record in &fanout.commands {
        let vm = record.vm.clone().unwrap_or_else(|| record.guest_id.clone());
        if record.state == crate::store::CommandState::Failed {
            let why = record.error.clone().unwrap_or_default();
            failed.insert(vm.clone(), string(why));
        }
        cmds.insert(vm, string(&record.cmd_id));
    }
    Members::new()
        .set("fanoutId", string(&fanout.fanout_id))
        .set("cmds", Value::Struct(cmds))
        .set("failed", Value::Struct(failed))
        .done()
}

fn output_value(page: &ops::OutputPage) -> Value {
    Members::new()
        .set("data", Value::Base64(page.data.clone()))
        .set("offset", uint(page.offset))
        .set("nextOffset", uint(page.next_offset))
        .set("totalBytes", uint(page.total_bytes))
        .set("finished", Value::Boolean(page.finished))
        .set("state", string(page.state.as_str()))
        .done()
}

// ---------------------------------------------------------------------------
// The methods: decode, call the operation, encode.

type Answer = Result<Value, XmlRpcError>;

async fn create_vm(engine: Engine, args: Args) -> Answer {
    let vm = ops::create_vm(&engine, &args.string(0)?, &args.string(1)?).await?;
    Ok(vm_value(&vm))
}

async fn remove_vm(engine: Engine, args: Args) -> Answer {
    ops::remove_vm(&engine, &args.string(0)?).await?;
    Ok(Value::Boolean(true))
}

async fn lifecycle(engine: Engine, args: Args, op: LifecycleOp) -> Answer {
    let state = ops::lifecycle(&engine, &args.string(0)?, op).await?;
    Ok(string(state.as_str()))
}

async fn start(engine: Engine, args: Args) -> Answer {
    lifecycle(engine, args, LifecycleOp::Start).await
}

async fn shutdown(engine: Engine, args: Args) -> Answer {
    lifecycle(engine, args, LifecycleOp::Shutdown).await
}

async fn sleep(engine: Engine, args: Args) -> Answer {
    lifecycle(engine, args, LifecycleOp::Sleep).await
}

async fn reset(engine: Engine, args: Args) -> Answer {
    lifecycle(engine, args, LifecycleOp::Reset).await
}

async fn power_off(engine: Engine, args: Args) -> Answer {
    lifecycle(engine, args, LifecycleOp::PowerOff).await
}

async fn pause(engine: Engine, args: Args) -> Answer {
    lifecycle(engine, args, LifecycleOp::Pause).await
}

async fn resume(engine: Engine, args: Args) -> Answer {
    lifecycle(engine, args, LifecycleOp::Resume).await
}

async fn save_state(engine: Engine, args: Args) -> Answer {
    lifecycle(engine, args, LifecycleOp::SaveState).await
}

async fn discard_state(engine: Engine, args: Args) -> Answer {
    lifecycle(engine, args, LifecycleOp::DiscardState).await
}

async fn take_snapshot(engine: Engine, args: Args) -> Answer {
    let op = LifecycleOp::TakeSnapshot {
        name: args.string(1)?,
        description: args.string(2)?,
    };
    lifecycle(engine, args, op).await
}

async fn restore_snapshot(engine: Engine, args: Args) -> Answer {
    let op = LifecycleOp::RestoreSnapshot {
        name: args.string(1)?,
    };
    lifecycle(engine, args, op).await
}

async fn delete_snapshot(engine: Engine, args: Args) -> Answer {
    let op = LifecycleOp::DeleteSnapshot {
        name: args.string(1)?,
    };
    lifecycle(engine, args, op).await
}

async fn get_state(engine: Engine, args: Args) -> Answer {
    let vm = ops::vm(&engine, &args.string(0)?).await?;
    Ok(string(vm.state.as_str()))
}

async fn get_presence(engine: Engine, args: Args) -> Answer {
    let vm = ops::vm(&engine, &args.string(0)?).await?;
    Ok(presence_value(&vm))
}

async fn get_vm_info(engine: Engine, args: Args) -> Answer {
    let vm = ops::vm(&engine, &args.string(0)?).await?;
    Ok(vm_value(&vm))
}

async fn list_vms(engine: Engine, _args: Args) -> Answer {
    let vms = ops::vms(&engine).await?;
    Ok(strings(vms.into_iter().map(|vm| vm.name)))
}

async fn list_vms_with_state(engine: Engine, _args: Args) -> Answer {
    let vms = ops::vms(&engine).await?;
    let map = vms
        .into_iter()
        .map(|vm| (vm.name, string(vm.state.as_str())))
        .collect();
    Ok(Value::Struct(map))
}

async fn list_running_vms(engine: Engine, _args: Args) -> Answer {
    let vms = ops::running_vms(&engine).await?;
    Ok(strings(vms.into_iter().map(|vm| vm.name)))
}

async fn ids_to_names(engine: Engine, _args: Args) -> Answer {
    let vms = ops::vms(&engine).await?;
    let map = vms.into_iter().map(|vm| (vm.id, string(vm.name))).collect();
    Ok(Value::Struct(map))
}

async fn names_to_ids(engine: Engine, _args: Args) -> Answer {
    let vms = ops::vms(&engine).await?;
    let map = vms.into_iter().map(|vm| (vm.name, string(vm.id))).collect();
    Ok(Value::Struct(map))
}

async fn list_snapshots(engine: Engine, args: Args) -> Answer {
    let snapshots = ops::snapshots(&engine, &args.string(0)?).await?;
    Ok(Value::Array(snapshots.iter().map(snapshot_value).collect()))
}

async fn get_performance_data(engine: Engine, args: Args) -> Answer {
    let data = ops::performance(&engine, &args.string(0)?).await?;
    Ok(performance_value(&data))
}

async fn ping(engine: Engine, args: Args) -> Answer {
    let timeout = ops::wait_secs("timeout_secs", args.double(1)?)?;
    let rtt = ops::ping(&engine, &args.string(0)?, timeout).await?;
    Ok(Value::Boolean(rtt.is_some()))
}

async fn run_cmd(engine: Engine, args: Args) -> Answer {
    let spec = args.command_spec(1)?;
    let cmd_id = ops::run_command(&engine, &args.string(0)?, spec).await?;
    Ok(string(cmd_id))
}

async fn run_cmd_on_vms(engine: Engine, args: Args) -> Answer {
    let spec = args.command_spec(1)?;
    let fanout = ops::run_multicast(&engine, &args.string(0)?, spec).await?;
    Ok(fanout_value(&fanout))
}

async fn list_finished_cmds(engine: Engine, args: Args) -> Answer {
    let limit = usize::try_from(args.int(0)?)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| ApiError::BadArgument("limit must be more than 0".into()))?;
    let records = ops::finished_commands(&engine, limit)?;
    let map = records
        .iter()
        .map(|r| (r.cmd_id.clone(), summary_value(r)))
        .collect();
    Ok(Value::Struct(map))
}

async fn get_cmd_results(engine: Engine, args: Args) -> Answer {
    let wait = ops::wait_secs("timeout_secs", args.double(1)?)?;
    let results = ops::command_results(&engine, &args.string(0)?, wait).await?;
    Ok(results_value(&results))
}

async fn get_cmd_details(engine: Engine, args: Args) -> Answer {
    let details = ops::command_details(&engine, &args.string(0)?).await?;
    Ok(details_value(&details))
}

async fn cancel_cmd(engine: Engine, args: Args) -> Answer {
    ops::cancel_command(&engine, &args.string(0)?).await?;
    Ok(Value::Boolean(true))
}

async fn get_cmd_output(engine: Engine, args: Args) -> Answer {
    let stream = args.string(1)?;
    let stream = OutputStream::from_str(&stream).map_err(|()| {
        ApiError::BadArgument(format!("stream must be 'out' or 'err', not {stream:?}"))
    })?;
    let offset = u64::try_from(args.int(2)?)
        .map_err(|_| ApiError::BadArgument("offset must not be negative".into()))?;
    let max_bytes = usize::try_from(args.int(3)?)
        .map_err(|_| ApiError::BadArgument("maxBytes must not be negative".into()))?;
    let page = ops::command_output(&engine, &args.string(0)?, stream, offset, max_bytes)?;
    Ok(output_value(&page))
}

async fn copy(engine: Engine, args: Args, direction: TransferDirection, wait: bool) -> Answer {
    let (vm, path, target) = (args.string(0)?, args.string(1)?, args.opt_string(2)?);
    if wait {
        let done = ops::copy(&engine, &vm, direction, &path, target.as_deref()).await?;
        Ok(transfer_value(&done))
    } else {
        let id = ops::start_copy(&engine, &vm, direction, &path, target.as_deref()).await?;
        Ok(string(id))
    }
}

async fn cp_file_to_vm(engine: Engine, args: Args) -> Answer {
    copy(engine, args, TransferDirection::ToGuest, true).await
}

async fn cp_file_from_vm(engine: Engine, args: Args) -> Answer {
    copy(engine, args, TransferDirection::FromGuest, true).await
}

async fn start_cp_file_to_vm(engine: Engine, args: Args) -> Answer {
    copy(engine, args, TransferDirection::ToGuest, false).await
}

async fn start_cp_file_from_vm(engine: Engine, args: Args) -> Answer {
    copy(engine, args, TransferDirection::FromGuest, false).await
}

async fn get_transfer_progress(engine: Engine, args: Args) -> Answer {
    let transfer = ops::transfer(&engine, &args.string(0)?)?;
    Ok(transfer_value(&transfer))
}

async fn version(_engine: Engine, _args: Args) -> Answer {
    Ok(string(ops::version()))
}

async fn help(_engine: Engine, args: Args) -> Answer {
    match args.opt_string(0)? {
        None => Ok(string(help_text())),
        Some(name) => Ok(string(method_help(&name)?)),
    }
}

async fn system_list_methods(_engine: Engine, _args: Args) -> Answer {
    let mut names: Vec<&str> = METHODS
        .iter()
        .map(|m| m.name)
        .chain(ALIASES.iter().map(|(alias, _)| *alias))
        .collect();
    names.sort_unstable();
    Ok(strings(names))
}

async fn system_method_help(_engine: Engine, args: Args) -> Answer {
    Ok(string(method_help(&args.string(0)?)?))
}

async fn system_method_signature(_engine: Engine, args: Args) -> Answer {
    let name = args.string(0)?;
    let method = find(&name).ok_or(XmlRpcError::UnknownMethod(name))?;
    let signatures = method.signatures().into_iter().map(strings).collect();
    Ok(Value::Array(signatures))
}

async fn system_multicall(engine: Engine, args: Args) -> Answer {
    let calls = args.decode(0, decode_array)?;
    let mut answers = Vec::with_capacity(calls.len());
    for (i, call) in calls.into_iter().enumerate() {
        let answer = match multicall_entry(i, call) {
            Ok((name, params)) => dispatch(&engine, &name, params).await,
            Err(e) => Err(e),
        };
        answers.push(match answer {
            Ok(value) => Value::Array(vec![value]),
            Err(e) => {
                let fault = e.to_fault();
                Members::new()
                    .set("faultCode", Value::Integer(fault.code()))
                    .set("faultString", string(fault.string()))
                    .done()
            }
        });
    }
    Ok(Value::Array(answers))
}

/// One call of a `system.multicall`: `{methodName, params}`.
fn multicall_entry(i: usize, call: Value) -> Result<(String, Vec<Value>), XmlRpcError> {
    let invalid = |message: String| XmlRpcError::InvalidParams {
        method: "system.multicall".into(),
        message: format!("call {}: {message}", i + 1),
    };
    let Value::Struct(mut members) = call else {
        return Err(invalid(format!(
            "must be a struct of methodName and params, not {}",
            kind(&call)
        )));
    };
    let name = members
        .remove("methodName")
        .ok_or_else(|| invalid("has no methodName".into()))
        .and_then(|v| decode_string(&v).map_err(|why| invalid(format!("methodName {why}"))))?;
    if name == "system.multicall" {
        return Err(invalid(
            "system.multicall cannot be called inside itself".into(),
        ));
    }
    let params = match members.remove("params") {
        None => Vec::new(),
        Some(v) => decode_array(&v).map_err(|why| invalid(format!("params {why}")))?,
    };
    Ok((name, params))
}

// ---------------------------------------------------------------------------
// Requests and responses.

/// Calls a method by name (or alias) with its arguments.
pub async fn dispatch(engine: &Engine, name: &str, params: Vec<Value>) -> Answer {
    let method = find(name).ok_or_else(|| XmlRpcError::UnknownMethod(name.to_owned()))?;
    let args = Args::new(name, method, params)?;
    (method.call)(engine.clone(), args).await
}

/// Checks that no element of `xml` nests deeper than [`MAX_DEPTH`], in one pass
/// with no recursion. Comments, CDATA, processing instructions and declarations
/// do not count; what is not well-formed is left to the parser to refuse.
fn check_depth(xml: &str) -> Result<(), XmlRpcError> {
    let mut depth = 0usize;
    let mut rest = xml;
    while let Some(start) = rest.find('<') {
        rest = &rest[start..];
        let (skip_to, opens) = if rest.starts_with("<!--") {
            ("-->", false)
        } else if rest.starts_with("<![CDATA[") {
            ("]]>", false)
        } else if rest.starts_with("<?") || rest.starts_with("<!") {
            (">", false)
        } else if rest.starts_with("</") {
            depth = depth.saturating_sub(1);
            (">", false)
        } else {
            (">", true)
        };
        let Some(end) = rest.find(skip_to) else {
            return Ok(()); // unterminated: the parser refuses it
        };
        if opens && !rest[..end].ends_with('/') {
            depth += 1;
            if depth > MAX_DEPTH {
                return Err(XmlRpcError::Malformed(format!(
                    "elements nest deeper than {MAX_DEPTH} levels"
                )));
            }
        }
        rest = &rest[end + skip_to.len()..];
    }
    Ok(())
}

/// Parses a request body into a method name and its arguments.
fn parse_call(body: &[u8]) -> Result<(String, Vec<Value>), XmlRpcError> {
    let xml = std::str::from_utf8(body)
        .map_err(|e| XmlRpcError::Malformed(format!("the body is not UTF-8 text ({e})")))?;
    check_depth(xml)?;
    let call = MethodCall::from_xml(xml).map_err(|_| {
        XmlRpcError::Malformed(
            "expected well-formed XML: <methodCall> with a <methodName> and <params> of \
             <param><value>...</value></param>"
                .into(),
        )
    })?;
    Ok((call.name.into_owned(), call.params))
}

/// Replaces what XML 1.0 cannot carry in text by U+FFFD.
fn xml_text(s: String) -> String {
    let illegal = |c: char| {
        (c < ' ' && !matches!(c, '\t' | '\n' | '\r')) || matches!(c, '\u{FFFE}' | '\u{FFFF}')
    };
    if s.contains(illegal) {
        s.replace(illegal, "\u{FFFD}")
    } else {
        s
    }
}

/// [`xml_text`] for every string and struct member name of a value.
fn xml_safe(value: Value) -> Value {
    let text = xml_text;
    match value {
        Value::String(s) => Value::String(text(s)),
        Value::Array(items) => Value::Array(items.into_iter().map(xml_safe).collect()),
        Value::Struct(members) => Value::Struct(
            members
                .into_iter()
                .map(|(k, v)| (text(k), xml_safe(v)))
                .collect(),
        ),
        other => other,
    }
}

/// A fault response written by hand, for when even writing a fault fails.
const LAST_RESORT: &str = "<?xml version=\"1.0\"?><methodResponse><fault><value><struct>\
    <member><name>faultCode</name><value><int>7</int></value></member>\
    <member><name>faultString</name><value><string>internal error: the answer could not \
    be written as XML</string></value></member></struct></value></fault></methodResponse>";

/// The XML of an answer.
fn respond(answer: Answer) -> String {
    let xml = match answer {
        Ok(value) => MethodResponse {
            value: xml_safe(value),
        }
        .to_xml(),
        Err(e) => {
            let fault = e.to_fault();
            let fault = Fault::new(fault.code(), xml_text(fault.string().to_owned()));
            FaultResponse { fault }.to_xml()
        }
    };
    match xml {
        Ok(xml) => format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{xml}"),
        Err(e) => {
            log::error!("cannot write an XML-RPC answer: {e}");
            LAST_RESORT.to_owned()
        }
    }
}

/// Answers one XML-RPC request body with the XML of a response or a fault.
pub async fn handle(engine: &Engine, body: &[u8]) -> String {
    let answer = match parse_call(body) {
        Ok((name, params)) => {
            let answer = dispatch(engine, &name, params).await;
            match &answer {
                Ok(_) => log::debug!("XML-RPC {name}: answered"),
                Err(e) if e.fault_code() == FaultCode::Internal => {
                    log::error!("XML-RPC {name}: {}", e.to_fault().string())
                }
                Err(e) => log::debug!("XML-RPC {name}: fault {}", e.fault_code().code()),
            }
            answer
        }
        Err(e) => {
            log::debug!("XML-RPC request refused: {e}");
            Err(e)
        }
    };
    respond(answer)
}

async fn rpc(engine: web::Data<Engine>, body: web::Bytes) -> HttpResponse {
    let xml = handle(&engine, &body).await;
    HttpResponse::Ok()
        .content_type("text/xml; charset=utf-8")
        .body(xml)
}

/// Where XML-RPC calls are posted.
pub const PATHS: [&str; 2] = ["/RPC2", "/"];

/// The XML-RPC routes: `POST /RPC2` (the original's path) and `POST /` (where
/// `ServerProxy("http://host:port")` posts). Bodies over [`MAX_REQUEST_BYTES`] are
/// answered 413, other HTTP methods 405.
pub fn configure(cfg: &mut web::ServiceConfig) {
    for path in PATHS {
        cfg.service(
            web::resource(path)
                .app_data(web::PayloadConfig::new(MAX_REQUEST_BYTES))
                .route(web::post().to(rpc)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, params: &[Value]) -> String {
        let call = MethodCall {
            name: name.into(),
            params: params.to_vec(),
        };
        call.to_xml().unwrap()
    }

    fn args(name: &str, params: Vec<Value>) -> Result<Args, XmlRpcError> {
        Args::new(name, find(name).expect("a method of the table"), params)
    }

    fn s(text: &str) -> Value {
        string(text)
    }

    #[test]
    fn a_python_call_parses() {
        // As xmlrpc.client.dumps(('vm-1', 'echo', ('a b', '"q"'), {'K': 'v'}, None), 'runCmd',
        // allow_none=True) writes it.
        let xml = "<?xml version='1.0'?>\n<methodCall>\n<methodName>runCmd</methodName>\n\
            <params>\n<param>\n<value><string>vm-1</string></value>\n</param>\n\
            <param>\n<value><string>echo</string></value>\n</param>\n\
            <param>\n<value><array><data>\n<value><string>a b</string></value>\n\
            <value><string>\"q\"</string></value>\n</data></array></value>\n</param>\n\
            <param>\n<value><struct>\n<member>\n<name>K</name>\n<value><string>v</string></value>\n\
            </member>\n</struct></value>\n</param>\n<param>\n<value><nil/></value></param>\n\
            </params>\n</methodCall>\n";
        let (name, params) = parse_call(xml.as_bytes()).unwrap();
        assert_eq!(name, "runCmd");
        let args = args(&name, params).unwrap();
        let spec = args.command_spec(1).unwrap();
        assert_eq!(spec.cmd, "echo");
        assert_eq!(spec.args, ["a b", "\"q\""]);
        assert_eq!(spec.env.get("K").map(String::as_str), Some("v"));
        assert_eq!(spec.path, None, "nil is the default");
        assert_eq!(spec.file_for_stdin, None, "'' means no stdin file");
    }

    #[test]
    fn absent_optional_arguments_take_the_originals_defaults() {
        let a = args("ping", vec![s("vm")]).unwrap();
        assert_eq!(a.double(1).unwrap(), 5.0);
        let a = args("ping", vec![s("vm"), Value::Integer(2)]).unwrap();
        assert_eq!(a.double(1).unwrap(), 2.0, "an int is a fine timeout");
        let a = args("takeSnapshot", vec![s("vm"), s("snap")]).unwrap();
        assert_eq!(a.string(2).unwrap(), "");
        let a = args("getCmdOutput", vec![s("cmd-1")]).unwrap();
        assert_eq!(
            (a.string(1).unwrap(), a.int(2).unwrap(), a.int(3).unwrap()),
            ("out".to_owned(), 0, 1024 * 1024)
        );
        let a = args("cpFileToVM", vec![s("vm"), s("/a"), Value::Nil]).unwrap();
        assert_eq!(a.opt_string(2).unwrap(), None);
        let a = args(
            "getCmdOutput",
            vec![s("c"), s("err"), Value::Long(5_000_000_000)],
        )
        .unwrap();
        assert_eq!(a.int(2).unwrap(), 5_000_000_000, "i8 arguments");
    }

    #[test]
    fn wrong_arity_and_types_are_invalid_params_naming_the_argument() {
        let fault = |r: Result<Args, XmlRpcError>| r.unwrap_err().to_fault();

        let f = fault(args("runCmd", vec![s("vm")]));
        assert_eq!(f.code(), -32602);
        assert_eq!(
            f.string(),
            "runCmd: takes 2 to 6 arguments (runCmd(toVmName, cmd, args=(), env={}, \
             path=None, fileForStdin='') -> string), not 1"
        );
        let f = fault(args("listVMs", vec![s("extra")]));
        assert_eq!(
            f.string(),
            "listVMs: takes no arguments (listVMs() -> array), not 1"
        );
        let f = fault(args("getState", vec![Value::Integer(3)]));
        assert_eq!(
            f.string(),
            "getState: argument 1 (vm) must be a string, not an int"
        );
        let f = fault(args(
            "runCmd",
            vec![
                s("vm"),
                s("ls"),
                Value::Array(vec![s("-l"), Value::Integer(5)]),
            ],
        ));
        assert_eq!(
            f.string(),
            "runCmd: argument 3 (args) must be an array of strings, but item 2 is an int"
        );
        let f = fault(args(
            "runCmd",
            vec![s("vm"), s("ls"), Value::Array(vec![]), Value::Array(vec![])],
        ));
        assert_eq!(
            f.string(),
            "runCmd: argument 4 (env) must be a struct of strings, not an array"
        );
        let f = fault(args("ping", vec![s("vm"), s("soon")]));
        assert_eq!(
            f.string(),
            "ping: argument 2 (timeout_secs) must be a double, not a string"
        );
        assert!(find("getVm").is_none());
        assert_eq!(
            XmlRpcError::UnknownMethod("getVm".into()).to_fault().code(),
            -32601
        );
        // nil for a required argument is a wrong type, not a default.
        let f = fault(args("getState", vec![Value::Nil]));
        assert_eq!(
            f.string(),
            "getState: argument 1 (vm) must be a string, not nil"
        );
        // An alias is named as the caller called it.
        let f = fault(args("unpause", vec![]));
        assert_eq!(
            f.string(),
            "unpause: takes 1 argument (unpause(vm) -> string), not 0"
        );
    }

    #[test]
    fn malformed_bodies_are_malformed_request_faults() {
        for body in [
            &b"<methodCall><methodName>listVMs</methodName><params>"[..],
            b"not xml at all",
            b"<methodResponse><params/></methodResponse>",
            b"\xff\xfe<methodCall/>",
            b"",
        ] {
            let err = parse_call(body).unwrap_err();
            assert_eq!(err.to_fault().code(), -32700, "{body:?}: {err}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let depth = 1_000_000;
        let xml = format!(
            "<methodCall><methodName>help</methodName><params><param>{}{}</param></params>\
             </methodCall>",
            "<value><array><data>".repeat(depth),
            "</data></array></value>".repeat(depth)
        );
        let err = parse_call(xml.as_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the request is not an XML-RPC method call: elements nest deeper than 100 levels"
        );
        // A reasonable nesting parses.
        let xml = format!(
            "<methodCall><methodName>help</methodName><params><param>{}<value><string>x\
             </string></value>{}</param></params></methodCall>",
            "<value><array><data>".repeat(25),
            "</data></array></value>".repeat(25)
        );
        parse_call(xml.as_bytes()).unwrap();
        assert!(check_depth("<a><!-- <b><c><d> --><![CDATA[<<<<]]><?pi <x>?><e/></a>").is_ok());
    }

    #[test]
    fn integers_beyond_32_bits_are_i8_and_times_are_utc() {
        assert_eq!(uint(5), Value::Integer(5));
        assert_eq!(uint(5_000_000_000), Value::Long(5_000_000_000));
        assert_eq!(int(-5_000_000_000), Value::Long(-5_000_000_000));
        let t = DateTime::parse_from_rfc3339("2010-06-01T12:34:56.789+02:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            time(t).to_xml().unwrap(),
            "<value><dateTime.iso8601>20100601T10:34:56</dateTime.iso8601></value>"
        );
        let far = DateTime::from_timestamp(300_000_000_000, 0).unwrap(); // year 11476
        assert!(matches!(time(far), Value::String(_)));
    }

    #[test]
    fn control_characters_are_replaced_so_python_can_parse_the_answer() {
        let answer = respond(Ok(Members::new()
            .set("out", s("\u{1b}[31mred\u{0}\ttab\nline"))
            .done()));
        assert!(
            answer.contains("\u{FFFD}[31mred\u{FFFD}\ttab\nline"),
            "{answer}"
        );
    }

    #[test]
    fn faults_are_written_with_their_code() {
        let xml = respond(Err(XmlRpcError::UnknownMethod("nope".into())));
        let fault = FaultResponse::from_xml(xml.trim_start_matches(|c| c != '\n').trim())
            .unwrap()
            .fault;
        assert_eq!(fault.code(), -32601);
        assert_eq!(
            fault.string(),
            "there is no method named \"nope\" (system.listMethods lists them)"
        );
    }

    #[test]
    fn help_lists_every_method_and_alias_with_its_signature() {
        let text = help_text();
        for method in METHODS {
            assert!(
                text.contains(&format!(
                    "{}\n    {}",
                    method.signature(method.name),
                    method.summary
                )),
                "{}",
                method.name
            );
        }
        for (alias, _) in ALIASES {
            assert!(text.contains(&format!("\n{alias}(")), "{alias}");
        }
        assert!(text.contains(
            "runCmd(toVmName, cmd, args=(), env={}, path=None, fileForStdin='') -> string\n"
        ));
        assert!(text.contains("ping(vm, timeout_secs=5.0) -> boolean\n"));
        assert!(text.contains("takeSnapshot(vm, name, desc='') -> string\n"));
        assert!(
            text.contains("saveSnapshot(vm, name, desc='') -> string\n    Alias of takeSnapshot.")
        );
    }

    #[test]
    fn every_method_of_the_original_is_in_the_table() {
        let original = [
            "createVM",
            "removeVM",
            "start",
            "shutdown",
            "sleep",
            "reset",
            "powerOff",
            "pause",
            "resume",
            "getState",
            "saveState",
            "discardState",
            "takeSnapshot",
            "restoreSnapshot",
            "deleteSnapshot",
            "ping",
            "runCmd",
            "listFinishedCmds",
            "getCmdResults",
            "getCmdDetails",
            "cpFileToVM",
            "cpFileFromVM",
            "help",
            "listVMs",
            "listVMsWithState",
            "listRunningVMs",
            "listSnapshots",
            "getIdsToNamesMapping",
            "getNamesToIdsMapping",
            "getPerformanceData",
        ];
        for name in original
            .iter()
            .chain(&["unpause", "listAvailableVMs", "getStats"])
        {
            assert!(find(name).is_some(), "{name}");
        }
        let mut names: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), METHODS.len(), "no method twice");
    }

    #[test]
    fn signatures_cover_every_accepted_arity() {
        let method = find("cpFileToVM").unwrap();
        assert_eq!(
            method.signatures(),
            vec![
                vec!["struct", "string", "string"],
                vec!["struct", "string", "string", "string"]
            ]
        );
        assert_eq!(find("listVMs").unwrap().signatures(), vec![vec!["array"]]);
    }

    #[test]
    fn multicall_entries_are_checked() {
        let entry = |v| multicall_entry(0, v).map(|(n, p)| (n, p.len()));
        let ok = Members::new()
            .set("methodName", s("listVMs"))
            .set("params", Value::Array(vec![]))
            .done();
        assert_eq!(entry(ok).unwrap(), ("listVMs".to_owned(), 0));
        let nested = Members::new()
            .set("methodName", s("system.multicall"))
            .set("params", Value::Array(vec![]))
            .done();
        assert_eq!(
            entry(nested).unwrap_err().fault_code(),
            FaultCode::InvalidParams
        );
        assert_eq!(
            entry(s("listVMs")).unwrap_err().fault_code(),
            FaultCode::InvalidParams
        );
        assert_eq!(
            entry(Members::new().done())
                .unwrap_err()
                .to_fault()
                .string(),
            "system.multicall: call 1: has no methodName"
        );
    }

    #[test]
    fn the_python_client_request_round_trips_through_dxr() {
        let xml = call("getCmdOutput", &[s("cmd-1"), s("err"), Value::Integer(0)]);
        let (name, params) = parse_call(xml.as_bytes()).unwrap();
        assert_eq!((name.as_str(), params.len()), ("getCmdOutput", 3));
    }

    #[test]
    fn the_api_document_lists_every_method() {
        let doc = include_str!("../../../docs/API.md");
        for method in METHODS {
            assert!(
                doc.contains(&format!("`{}(", method.name)),
                "docs/API.md lacks {}",
                method.name
            );
        }
        for (alias, _) in ALIASES {
            assert!(
                doc.contains(&format!("`{alias}`")),
                "docs/API.md lacks {alias}"
            );
        }
    }
}
