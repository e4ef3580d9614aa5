//! A guest simulator: registers many unmanaged VMs with a host by sending the
//! real protocol's HELLO word (`vmc_protocol::words::encode`) for each simulated
//! guest over one STOMP session. Simulated guests never beacon nor answer
//! commands: figures measured with them are labelled "simulated".

use crate::BenchError;
use std::time::Duration;
use vmc_protocol::destinations::Destinations;
use vmc_protocol::identity::GuestId;
use vmc_protocol::stomp::{BrokerAddress, SessionConfig, StompClient};
use vmc_protocol::words::{self, GuestInfo, Message};

/// The id of the `n`th simulated guest.
pub fn simulated_id(n: usize) -> String {
    format!("sim-{n:05}")
}

/// Sends HELLO for `count` simulated guests under `prefix` and waits for the
/// broker's receipts.
pub async fn register(broker_port: u16, prefix: &str, count: usize) -> Result<(), BenchError> {
    let stomp = |e: &dyn std::fmt::Display| BenchError::Stomp(e.to_string());
    let config = SessionConfig::new(BrokerAddress::tcp("127.0.0.1", broker_port))
        .with_credentials("guest", "guest");
    let max = config.max_frame_size;
    let destinations = Destinations::new(prefix).map_err(|e| stomp(&e))?;
    let topic = destinations.connections_topic();
    let (client, _events) = StompClient::start(config);
    let mut receipts = Vec::with_capacity(count);
    for n in 0..count {
        let id = GuestId::new(simulated_id(n)).map_err(|e| stomp(&e))?;
        let reply_to = destinations.guest_queue(&id);
        let info = GuestInfo {
            id: id.clone(),
            ips: vec![format!("10.{}.{}.{}", n >> 16 & 255, n >> 8 & 255, n & 255)],
            mac: None,
            hostname: id.as_str().to_owned(),
            os: "Linux".into(),
            kernel: "simulated".into(),
            agent_version: "vmc-bench simulator".into(),
            protocol: 1,
            cpus: 1,
            memory_bytes: 1 << 30,
            boot_time: 1_700_000_000,
            capabilities: Vec::new(),
        };
        let mut frame = words::encode(&Message::Hello(info), id.as_str(), Some(&reply_to), max)
            .map_err(|e| stomp(&e))?;
        frame.set_header("destination", topic.as_str());
        receipts.push(
            client
                .queue_with_receipt(frame)
                .await
                .map_err(|e| stomp(&e))?,
        );
    }
    let all = async {
        for receipt in receipts {
            receipt.wait().await?;
        }
        Ok::<(), vmc_protocol::stomp::StompError>(())
    };
    match tokio::time::timeout(Duration::from_secs(60), all).await {
        Ok(result) => result.map_err(|e| stomp(&e))?,
        Err(_) => {
            return Err(BenchError::Timeout {
                what: "the broker's receipts for the simulated HELLOs".into(),
                secs: 60.0,
            })
        }
    }
    let _ = client.shutdown().await;
    Ok(())
}
