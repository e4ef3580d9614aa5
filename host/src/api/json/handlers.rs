//! The JSON API's handlers for VMs, snapshots, commands, transfers, guests and the
//! host: each decodes its path, query and body, calls one operation of
//! [`ops`](crate::api::ops) and answers the [`wire`](super::wire) form of the
//! result with the status that fits (201 for what it created, 202 for what it
//! started, 204 for what it removed). Nothing here decides anything an operation
//! means; see `super` for errors and the route table.

use super::wire::{self, CommandRequest};
use super::{json_body, optional_json_body, Answer, JsonError};
use crate::api::ops::{self, ApiError};
use crate::engine::vm::LifecycleOp;
use crate::engine::Engine;
use crate::store::{CommandQuery, CommandState, TransferDirection};
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use std::str::FromStr;
use vmc_protocol::words::OutputStream;

/// The lifecycle actions of `POST /api/v1/vms/{vm}/actions/{action}`, named as
/// the XML-RPC methods.
pub const ACTIONS: [&str; 9] = [
    "start",
    "shutdown",
    "sleep",
    "reset",
    "powerOff",
    "pause",
    "resume",
    "saveState",
    "discardState",
];

/// The lifecycle operation an action names.
fn action_op(name: &str) -> Option<LifecycleOp> {
    let op = match name {
        "start" => LifecycleOp::Start,
        "shutdown" => LifecycleOp::Shutdown,
        "sleep" => LifecycleOp::Sleep,
        "reset" => LifecycleOp::Reset,
        "powerOff" => LifecycleOp::PowerOff,
        "pause" => LifecycleOp::Pause,
        "resume" => LifecycleOp::Resume,
        "saveState" => LifecycleOp::SaveState,
        "discardState" => LifecycleOp::DiscardState,
        _ => return None,
    };
    Some(op)
}

/// The default of `limit` when listing commands.
const DEFAULT_LIST: usize = 100;

/// The default of `maxBytes` when reading output (as `getCmdOutput`'s).
const DEFAULT_OUTPUT_PAGE: usize = 1024 * 1024;

/// The default ping timeout (as `ping`'s).
const DEFAULT_PING_SECS: f64 = 5.0;

fn bad(message: impl Into<String>) -> JsonError {
    JsonError::Api(ApiError::BadArgument(message.into()))
}

fn ok<T: serde::Serialize>(value: T) -> Answer {
    Ok(HttpResponse::Ok().json(value))
}

/// `201 Created` (or another status) with a `Location`.
fn located<T: serde::Serialize>(
    mut response: actix_web::HttpResponseBuilder,
    location: String,
    value: T,
) -> Answer {
    Ok(response
        .insert_header((header::LOCATION, location))
        .json(value))
}

/// A path segment as it goes into a `Location` (ids and names are URL-safe but
/// for a few characters).
fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~:@".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The host and its VMs.

pub async fn host(engine: web::Data<Engine>) -> Answer {
    let status = ops::host_status(&engine).await?;
    ok(wire::HostInfo::from(&status))
}

pub async fn list_vms(engine: web::Data<Engine>) -> Answer {
    let vms = ops::vms(&engine).await?;
    ok(vms.iter().map(wire::Vm::from).collect::<Vec<_>>())
}

pub async fn create_vm(
    engine: web::Data<Engine>,
    req: HttpRequest,
    payload: web::Payload,
) -> Answer {
    let request: wire::CreateVm = json_body(&req, payload).await?;
    let vm = ops::create_vm(&engine, &request.name, &request.image).await?;
    located(
        HttpResponse::Created(),
        format!("/api/v1/vms/{}", segment(&vm.name)),
        wire::Vm::from(&vm),
    )
}

pub async fn get_vm(engine: web::Data<Engine>, vm: web::Path<String>) -> Answer {
    let vm = ops::vm(&engine, &vm).await?;
    ok(wire::Vm::from(&vm))
}

pub async fn remove_vm(engine: web::Data<Engine>, vm: web::Path<String>) -> Answer {
    ops::remove_vm(&engine, &vm).await?;
    Ok(HttpResponse::NoContent().finish())
}

pub async fn action(
    engine: web::Data<Engine>,
    path: web::Path<(String, String)>,
    req: HttpRequest,
    payload: web::Payload,
) -> Answer {
    let (vm, action) = path.into_inner();
    let op = action_op(&action).ok_or(JsonError::UnknownAction(action))?;
    // No options yet; an empty object is fine, anything else is a mistake.
    let _: NoOptions = optional_json_body(&req, payload).await?;
    let state = ops::lifecycle(&engine, &vm, op).await?;
    ok(wire::VmState {
        vm,
        state: state.as_str(),
    })
}

/// A body that must be empty or `{}`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoOptions {}

pub async fn presence(engine: web::Data<Engine>, vm: web::Path<String>) -> Answer {
    let vm = ops::vm(&engine, &vm).await?;
    ok(wire::GuestPresence::from(&vm))
}

pub async fn guests(engine: web::Data<Engine>) -> Answer {
    let vms = ops::vms(&engine).await?;
    ok(vms
        .iter()
        .map(wire::GuestPresence::from)
        .collect::<Vec<_>>())
}

pub async fn performance(engine: web::Data<Engine>, vm: web::Path<String>) -> Answer {
    let data = ops::performance(&engine, &vm).await?;
    ok(wire::Performance::from(&data))
}

pub async fn ping(
    engine: web::Data<Engine>,
    vm: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Answer {
    let request: wire::PingRequest = optional_json_body(&req, payload).await?;
    let timeout = ops::wait_secs(
        "timeoutSecs",
        request.timeout_secs.unwrap_or(DEFAULT_PING_SECS),
    )?;
    let rtt = ops::ping(&engine, &vm, timeout).await?;
    ok(wire::Ping {
        vm: vm.into_inner(),
        alive: rtt.is_some(),
        rtt_ms: rtt.map(|d| d.as_secs_f64() * 1000.0),
    })
}

// ---------------------------------------------------------------------------
// Snapshots.

pub async fn snapshots(engine: web::Data<Engine>, vm: web::Path<String>) -> Answer {
    let snapshots = ops::snapshots(&engine, &vm).await?;
    ok(snapshots
        .iter()
        .map(wire::Snapshot::from)
        .collect::<Vec<_>>())
}

pub async fn take_snapshot(
    engine: web::Data<Engine>,
    vm: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Answer {
    let request: wire::TakeSnapshot = json_body(&req, payload).await?;
    let op = LifecycleOp::TakeSnapshot {
        name: request.name.clone(),
        description: request.description,
    };
    let state = ops::lifecycle(&engine, &vm, op).await?;
    located(
        HttpResponse::Created(),
        format!("/api/v1/vms/{}/snapshots", segment(&vm)),
        wire::VmState {
            vm: vm.into_inner(),
            state: state.as_str(),
        },
    )
}

pub async fn restore_snapshot(
    engine: web::Data<Engine>,
    path: web::Path<(String, String)>,
) -> Answer {
    let (vm, name) = path.into_inner();
    let state = ops::lifecycle(&engine, &vm, LifecycleOp::RestoreSnapshot { name }).await?;
    ok(wire::VmState {
        vm,
        state: state.as_str(),
    })
}

pub async fn delete_snapshot(
    engine: web::Data<Engine>,
    path: web::Path<(String, String)>,
) -> Answer {
    let (vm, name) = path.into_inner();
    let state = ops::lifecycle(&engine, &vm, LifecycleOp::DeleteSnapshot { name }).await?;
    ok(wire::VmState {
        vm,
        state: state.as_str(),
    })
}

// ---------------------------------------------------------------------------
// Commands.

fn command_location(cmd_id: &str) -> String {
    format!("/api/v1/commands/{}", segment(cmd_id))
}

pub async fn run_command(
    engine: web::Data<Engine>,
    vm: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Answer {
    let request: CommandRequest = json_body(&req, payload).await?;
    if request.glob.is_some() {
        return Err(bad(
            "glob belongs to POST /api/v1/commands; this route runs on its VM only",
        ));
    }
    let cmd_id = ops::run_command(&engine, &vm, request.spec()).await?;
    let record = ops::command_record(&engine, &cmd_id)?;
    located(
        HttpResponse::Accepted(),
        command_location(&cmd_id),
        wire::Command::from(&record),
    )
}

pub async fn run_multicast(
    engine: web::Data<Engine>,
    req: HttpRequest,
    payload: web::Payload,
) -> Answer {
    let request: CommandRequest = json_body(&req, payload).await?;
    let Some(glob) = request.glob.as_deref() else {
        return Err(bad(
            "glob is missing: POST /api/v1/commands runs on every VM a glob matches \
             (POST /api/v1/vms/{vm}/commands runs on one)",
        ));
    };
    let fanout = ops::run_multicast(&engine, glob, request.spec()).await?;
    Ok(HttpResponse::Accepted().json(wire::Fanout::from(&fanout)))
}

pub async fn list_commands(
    engine: web::Data<Engine>,
    query: web::Query<wire::CommandsQuery>,
) -> Answer {
    let query = query.into_inner();
    let states = match query.state.as_deref() {
        None | Some("") => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|name| {
                CommandState::parse(name.trim())
                    .ok_or_else(|| bad(format!("{name:?} is not a command state")))
            })
            .collect::<Result<_, _>>()?,
    };
    let records = ops::commands(
        &engine,
        &CommandQuery {
            vm: query.vm,
            fanout_id: query.fanout,
            states,
            limit: Some(query.limit.unwrap_or(DEFAULT_LIST)),
            finished_only: query.finished.unwrap_or(false),
        },
    )?;
    ok(records.iter().map(wire::Command::from).collect::<Vec<_>>())
}

pub async fn command(engine: web::Data<Engine>, cmd: web::Path<String>) -> Answer {
    let details = ops::command_details(&engine, &cmd).await?;
    ok(wire::Command::from(&details))
}

pub async fn command_result(
    engine: web::Data<Engine>,
    cmd: web::Path<String>,
    query: web::Query<wire::ResultQuery>,
) -> Answer {
    let wait = ops::wait_secs("wait", query.wait.unwrap_or(0.0))?;
    let results = ops::command_results(&engine, &cmd, wait).await?;
    ok(wire::CommandResult::from(&results))
}

pub async fn command_output(
    engine: web::Data<Engine>,
    cmd: web::Path<String>,
    query: web::Query<wire::OutputQuery>,
) -> Answer {
    let name = query.stream.as_deref().unwrap_or("out");
    let stream = OutputStream::from_str(name)
        .map_err(|()| bad(format!("stream must be \"out\" or \"err\", not {name:?}")))?;
    let page = ops::command_output(
        &engine,
        &cmd,
        stream,
        query.offset.unwrap_or(0),
        query.max_bytes.unwrap_or(DEFAULT_OUTPUT_PAGE),
    )?;
    ok(wire::OutputPage::new(&cmd, stream.as_str(), &page))
}

pub async fn cancel_command(engine: web::Data<Engine>, cmd: web::Path<String>) -> Answer {
    ops::cancel_command(&engine, &cmd).await?;
    let record = ops::command_record(&engine, &cmd)?;
    Ok(HttpResponse::Accepted().json(wire::Command::from(&record)))
}

// ---------------------------------------------------------------------------
// Transfers.

pub async fn list_transfers(
    engine: web::Data<Engine>,
    query: web::Query<wire::TransfersQuery>,
) -> Answer {
    let transfers = ops::transfers(
        &engine,
        query.vm.as_deref(),
        query.unfinished.unwrap_or(false),
    )?;
    ok(transfers
        .iter()
        .map(wire::Transfer::from)
        .collect::<Vec<_>>())
}

pub async fn start_transfer(
    engine: web::Data<Engine>,
    req: HttpRequest,
    payload: web::Payload,
) -> Answer {
    let request: wire::StartTransfer = json_body(&req, payload).await?;
    let direction = TransferDirection::parse(&request.direction).ok_or_else(|| {
        bad(format!(
            "direction must be \"to-guest\" or \"from-guest\", not {:?}",
            request.direction
        ))
    })?;
    let (source, target, source_name) = match direction {
        TransferDirection::ToGuest => (&request.host_path, &request.guest_path, "hostPath"),
        TransferDirection::FromGuest => (&request.guest_path, &request.host_path, "guestPath"),
    };
    let source = source.as_deref().ok_or_else(|| {
        bad(format!(
            "{source_name} is missing: it is the source of a {direction} copy"
        ))
    })?;
    if request.wait {
        let done = ops::copy(&engine, &request.vm, direction, source, target.as_deref()).await?;
        return ok(wire::Transfer::from(&done));
    }
    let id = ops::start_copy(&engine, &request.vm, direction, source, target.as_deref()).await?;
    let record = ops::transfer(&engine, &id)?;
    located(
        HttpResponse::Accepted(),
        format!("/api/v1/transfers/{}", segment(&id)),
        wire::Transfer::from(&record),
    )
}

pub async fn transfer(engine: web::Data<Engine>, id: web::Path<String>) -> Answer {
    let record = ops::transfer(&engine, &id)?;
    ok(wire::Transfer::from(&record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_is_a_lifecycle_operation_of_the_same_name() {
        for name in ACTIONS {
            let op = action_op(name).expect(name);
            assert_eq!(op.name(), name);
        }
        assert!(action_op("takeSnapshot").is_none());
        assert!(action_op("Start").is_none());
    }

    #[test]
    fn locations_escape_what_a_path_cannot_carry() {
        assert_eq!(segment("cmd-0af3"), "cmd-0af3");
        assert_eq!(segment("52:54:00:AA"), "52:54:00:AA");
        assert_eq!(segment("a b/c?"), "a%20b%2Fc%3F");
    }
}
