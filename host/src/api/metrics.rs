//! Observability: `GET /healthz` (JSON) and `GET /metrics` (Prometheus text
//! format 0.0.4), both read from one [`ops::HostStatus`].
//!
//! `/healthz` answers 200 whenever the host agent can answer at all, with
//! `status` `ok` when its broker connection is up and `degraded` when it is not
//! (the agent keeps reconnecting; guests cannot be reached meanwhile), and the
//! host's figures. `/metrics` exposes gauges of VMs by state, guests by presence,
//! commands and transfers by state (every state, zeros included, so series never
//! vanish), the bytes moved by the transfers the host remembers, the broker
//! connection and its reconnections, and the event streams. Counts of commands and
//! transfers are those of the records the host keeps: retention pruning lowers them.
//! What this module does not do: keep history or rates (Prometheus does).

use super::json::{wire, Answer};
use super::{events, ops};
use crate::engine::Engine;
use crate::store::TransferDirection;
use actix_web::{web, HttpResponse};
use std::fmt::Write;
use vmc_protocol::stomp::session::LinkState;

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub async fn healthz(engine: web::Data<Engine>) -> Answer {
    let status = ops::host_status(&engine).await?;
    let up = matches!(status.engine.broker.link, LinkState::Up { .. });
    Ok(HttpResponse::Ok().json(wire::Health {
        status: if up { "ok" } else { "degraded" },
        host: wire::HostInfo::from(&status),
    }))
}

pub async fn metrics(engine: web::Data<Engine>) -> Answer {
    let status = ops::host_status(&engine).await?;
    Ok(HttpResponse::Ok()
        .content_type(CONTENT_TYPE)
        .body(exposition(
            &status,
            events::open_streams(),
            events::missed_events(),
        )))
}

/// A label value, escaped as the text format wants.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes one metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

fn labelled<T>(
    key: &str,
    counts: Vec<(T, u64)>,
    name: fn(T) -> &'static str,
) -> Vec<(String, u64)> {
    counts
        .into_iter()
        .map(|(t, n)| (format!("{{{key}=\"{}\"}}", label(name(t))), n))
        .collect()
}

/// The whole exposition.
pub fn exposition(status: &ops::HostStatus, open_streams: u64, missed_events: u64) -> String {
    let mut out = String::new();
    let broker = &status.engine.broker;
    family(
        &mut out,
        "vmc_host_info",
        "gauge",
        "The host agent: version, protocol, backend and host id, as labels.",
        &[(
            format!(
                "{{version=\"{}\",protocol=\"{}\",backend=\"{}\",host_id=\"{}\"}}",
                label(status.version),
                status.protocol,
                label(status.engine.backend),
                label(&status.engine.host_id)
            ),
            1,
        )],
    );
    family(
        &mut out,
        "vmc_vms",
        "gauge",
        "VMs by hypervisor state (unmanaged guests are Unknown).",
        &labelled("state", status.vms_by_state(), |s| s.as_str()),
    );
    family(
        &mut out,
        "vmc_guests",
        "gauge",
        "Guest agents by presence.",
        &labelled("presence", status.guests_by_presence(), |p| p.as_str()),
    );
    family(
        &mut out,
        "vmc_commands",
        "gauge",
        "Commands the host keeps records of, by state.",
        &labelled("state", status.commands.clone(), |s| s.as_str()),
    );
    family(
        &mut out,
        "vmc_transfers",
        "gauge",
        "File transfers the host keeps records of, by state.",
        &labelled("state", status.transfers_by_state(), |s| s.as_str()),
    );
    family(
        &mut out,
        "vmc_transfer_bytes",
        "gauge",
        "Bytes moved by the transfers the host keeps records of, by direction.",
        &[TransferDirection::ToGuest, TransferDirection::FromGuest].map(|d| {
            (
                format!("{{direction=\"{}\"}}", d.as_str()),
                status.transfer_bytes(d),
            )
        }),
    );
    family(
        &mut out,
        "vmc_broker_connected",
        "gauge",
        "1 while the STOMP connection to the broker is up.",
        &[(
            String::new(),
            u64::from(matches!(broker.link, LinkState::Up { .. })),
        )],
    );
    family(
        &mut out,
        "vmc_broker_connections_total",
        "counter",
        "Connections to the broker that came up since the host agent started.",
        &[(String::new(), broker.connects)],
    );
    family(
        &mut out,
        "vmc_broker_reconnects_total",
        "counter",
        "Connections to the broker after the first.",
        &[(String::new(), broker.reconnects())],
    );
    family(
        &mut out,
        "vmc_broker_disconnects_total",
        "counter",
        "Connections to the broker that went down.",
        &[(String::new(), broker.disconnects)],
    );
    family(
        &mut out,
        "vmc_broker_connect_failures_total",
        "counter",
        "Attempts to connect to the broker that failed.",
        &[(String::new(), broker.connect_failures)],
    );
    family(
        &mut out,
        "vmc_api_event_streams",
        "gauge",
        "Event streams (GET /api/v1/events) open now.",
        &[(String::new(), open_streams)],
    );
    family(
        &mut out,
        "vmc_api_events_missed_total",
        "counter",
        "Events that event streams missed because their callers read too slowly.",
        &[(String::new(), missed_events)],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::broker::BrokerStatus;
    use crate::engine::EngineStatus;
    use crate::store::{CommandState, TransferState, TransferTotal};

    fn status() -> ops::HostStatus {
        ops::HostStatus {
            version: "1.2.3",
            protocol: 1,
            engine: EngineStatus {
                host_id: "host \"a\"".into(),
                backend: "unmanaged",
                broker: BrokerStatus {
                    link: LinkState::Up { generation: 3 },
                    address: Some("stomp://127.0.0.1:61613".into()),
                    connects: 3,
                    disconnects: 2,
                    connect_failures: 5,
                },
            },
            vms: Vec::new(),
            commands: CommandState::ALL
                .into_iter()
                .map(|s| (s, u64::from(s == CommandState::Finished) * 7))
                .collect(),
            transfers: vec![TransferTotal {
                direction: TransferDirection::FromGuest,
                state: TransferState::Done,
                count: 2,
                bytes: 4096,
            }],
        }
    }

    #[test]
    fn the_exposition_has_every_family_with_help_and_type() {
        let text = exposition(&status(), 2, 9);
        for line in [
            "vmc_host_info{version=\"1.2.3\",protocol=\"1\",backend=\"unmanaged\",\
             host_id=\"host \\\"a\\\"\"} 1",
            "vmc_vms{state=\"Running\"} 0",
            "vmc_guests{presence=\"alive\"} 0",
            "vmc_commands{state=\"finished\"} 7",
            "vmc_commands{state=\"running\"} 0",
            "vmc_transfers{state=\"done\"} 2",
            "vmc_transfer_bytes{direction=\"from-guest\"} 4096",
            "vmc_transfer_bytes{direction=\"to-guest\"} 0",
            "vmc_broker_connected 1",
            "vmc_broker_connections_total 3",
            "vmc_broker_reconnects_total 2",
            "vmc_broker_disconnects_total 2",
            "vmc_broker_connect_failures_total 5",
            "vmc_api_event_streams 2",
            "vmc_api_events_missed_total 9",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
        // Every sample belongs to a family declared with HELP and TYPE before it.
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(declared.last().map(String::as_str), Some(name), "{line}");
            }
        }
        assert_eq!(text.matches("# HELP ").count(), declared.len());
    }
}
