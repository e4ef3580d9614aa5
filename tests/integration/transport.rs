//! The STOMP transport against the real RabbitMQ and the real ActiveMQ.
//!
//! Each scenario is written once as an `async fn` taking the broker kind and
//! instantiated for both brokers by `broker_tests!`. Scenarios that restart a broker
//! use a private instance so that the shared ones keep serving the other tests.

use bytes::Bytes;
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use vmc_protocol::stomp::session::{LinkState, TlsSettings};
use vmc_protocol::stomp::{
    BrokerAddress, Command, Frame, Message, SessionConfig, SessionEvent, StompClient, StompError,
    Subscription,
};
use vmc_tests::{
    broker_tls_ca_file, init_logging, shared_broker, unique_name, within, BrokerKind,
    PrivateBroker, TcpProxy, RABBITMQ_TLS_PORT,
};

const PATIENCE: Duration = Duration::from_secs(30);

type Events = UnboundedReceiver<SessionEvent>;

async fn connect(config: SessionConfig) -> (StompClient, Events) {
    let (client, events) = StompClient::start(config);
    within(PATIENCE, "the first connection", client.wait_connected()).await;
    (client, events)
}

async fn shared_session(kind: BrokerKind) -> (StompClient, Events) {
    init_logging();
    let port = shared_broker(kind);
    connect(kind.session_config(port)).await
}

fn send_frame(destination: &str, body: impl Into<Bytes>) -> Frame {
    Frame::new(Command::Send)
        .with_header("destination", destination)
        .with_header("persistent", "true")
        .with_body(body)
}

/// The next MESSAGE event, skipping connection events.
async fn next_message(events: &mut Events) -> Message {
    within(PATIENCE, "a message", async {
        loop {
            match events.recv().await {
                Some(SessionEvent::Message(message)) => return message,
                Some(_) => continue,
                None => panic!("the session ended"),
            }
        }
    })
    .await
}

/// Asserts that no message arrives for `quiet`.
async fn assert_no_message(events: &mut Events, quiet: Duration) {
    let got = tokio::time::timeout(quiet, async {
        loop {
            if let Some(SessionEvent::Message(m)) = events.recv().await {
                return m;
            }
        }
    })
    .await;
    if let Ok(message) = got {
        panic!("unexpected message {:?}", message.frame);
    }
}

async fn ten_thousand_messages_arrive_in_order(kind: BrokerKind) {
    let queue = format!("/queue/{}", unique_name("vmc-test.order"));
    let (consumer, mut inbox) = shared_session(kind).await;
    consumer
        .subscribe(Subscription::new(&queue).with_prefetch(Some(1000)))
        .await
        .unwrap();
    let (producer, _producer_events) = shared_session(kind).await;
    let sender = tokio::spawn(async move {
        for i in 0..10_000u32 {
            producer
                .send(send_frame(&queue, i.to_string()))
                .await
                .unwrap();
        }
        producer
    });
    for expected in 0..10_000u32 {
        let message = next_message(&mut inbox).await;
        assert_eq!(
            std::str::from_utf8(&message.frame.body).unwrap(),
            expected.to_string()
        );
        consumer.ack(&message).await.unwrap();
    }
    let producer = sender.await.unwrap();
    producer.shutdown().await.unwrap();
    consumer.shutdown().await.unwrap();
}

async fn binary_body_of_4_mib_arrives_intact(kind: BrokerKind) {
    let queue = format!("/queue/{}", unique_name("vmc-test.binary"));
    let (client, mut events) = shared_session(kind).await;
    client.subscribe(Subscription::new(&queue)).await.unwrap();
    // Every byte value, NULs and newlines included, in a pattern that is not periodic
    // in any small power of two.
    let body: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    client
        .send_with_receipt(send_frame(&queue, body.clone()))
        .await
        .unwrap();
    let message = next_message(&mut events).await;
    assert_eq!(message.frame.body.len(), body.len());
    assert!(
        message.frame.body[..] == body[..],
        "the 4 MiB body changed in transit"
    );
    client.ack(&message).await.unwrap();
    client.shutdown().await.unwrap();
}

async fn receipted_send_is_stored_before_any_subscriber(kind: BrokerKind) {
    let queue = format!("/queue/{}", unique_name("vmc-test.receipt"));
    let (producer, _p) = shared_session(kind).await;
    within(
        PATIENCE,
        "the receipt",
        producer.send_with_receipt(send_frame(&queue, "kept")),
    )
    .await
    .unwrap();
    producer.shutdown().await.unwrap();
    let (consumer, mut events) = shared_session(kind).await;
    consumer.subscribe(Subscription::new(&queue)).await.unwrap();
    let message = next_message(&mut events).await;
    assert_eq!(&message.frame.body[..], b"kept");
    consumer.ack(&message).await.unwrap();
    consumer.shutdown().await.unwrap();
}

async fn unacked_message_is_redelivered_and_acked_one_is_not(kind: BrokerKind) {
    let queue = format!("/queue/{}", unique_name("vmc-test.ack"));
    let (producer, _p) = shared_session(kind).await;
    producer
        .send_with_receipt(send_frame(&queue, "first"))
        .await
        .unwrap();
    producer
        .send_with_receipt(send_frame(&queue, "second"))
        .await
        .unwrap();

    // A consumer that acknowledges the first message and dies holding the second.
    let (consumer, mut events) = shared_session(kind).await;
    consumer.subscribe(Subscription::new(&queue)).await.unwrap();
    let first = next_message(&mut events).await;
    assert_eq!(&first.frame.body[..], b"first");
    consumer.ack(&first).await.unwrap();
    let second = next_message(&mut events).await;
    assert_eq!(&second.frame.body[..], b"second");
    consumer.shutdown().await.unwrap();

    let (again, mut events) = shared_session(kind).await;
    again.subscribe(Subscription::new(&queue)).await.unwrap();
    let redelivered = next_message(&mut events).await;
    assert_eq!(
        &redelivered.frame.body[..],
        b"second",
        "only the unacknowledged one comes back"
    );
    again.ack(&redelivered).await.unwrap();
    assert_no_message(&mut events, Duration::from_millis(500)).await;
    again.shutdown().await.unwrap();
    producer.shutdown().await.unwrap();
}

async fn nacked_message_is_not_lost(kind: BrokerKind) {
    let queue = format!("/queue/{}", unique_name("vmc-test.nack"));
    let (client, mut events) = shared_session(kind).await;
    client.subscribe(Subscription::new(&queue)).await.unwrap();
    client
        .send_with_receipt(send_frame(&queue, "refused"))
        .await
        .unwrap();
    let message = next_message(&mut events).await;
    client.nack(&message).await.unwrap();
    match kind {
        // RabbitMQ requeues a NACKed message and delivers it again.
        BrokerKind::RabbitMq => {
            let again = next_message(&mut events).await;
            assert_eq!(&again.frame.body[..], b"refused");
            assert!(again.redelivered(), "the broker marks it redelivered");
            client.ack(&again).await.unwrap();
        }
        // ActiveMQ treats a STOMP NACK as a poison message: it goes to the dead-letter
        // queue, where an operator can still find it.
        BrokerKind::ActiveMq => {
            let (dlq, mut dlq_events) = shared_session(kind).await;
            dlq.subscribe(Subscription::new("/queue/ActiveMQ.DLQ").with_header(
                "selector",
                format!("JMSMessageID = '{}'", message.message_id().unwrap()),
            ))
            .await
            .unwrap();
            let dead = next_message(&mut dlq_events).await;
            assert_eq!(&dead.frame.body[..], b"refused");
            dlq.ack(&dead).await.unwrap();
            dlq.shutdown().await.unwrap();
        }
    }
    client.shutdown().await.unwrap();
}

async fn oversized_frame_is_refused_and_session_goes_on(kind: BrokerKind) {
    let queue = format!("/queue/{}", unique_name("vmc-test.size"));
    let port = shared_broker(kind);
    init_logging();
    let mut config = kind.session_config(port);
    config.max_frame_size = 64 * 1024;
    let (client, mut events) = connect(config).await;
    client.subscribe(Subscription::new(&queue)).await.unwrap();
    let err = client
        .send(send_frame(&queue, vec![1u8; 65 * 1024]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StompError::TooLarge { limit: 65536, .. }),
        "{err:?}"
    );
    client
        .send_with_receipt(send_frame(&queue, "small"))
        .await
        .unwrap();
    let message = next_message(&mut events).await;
    assert_eq!(&message.frame.body[..], b"small");
    client.ack(&message).await.unwrap();
    client.shutdown().await.unwrap();
}

/// A live broker with nothing to send sends only heart-beats, and may space them
/// nearly two intervals apart (ActiveMQ checks for idleness once per interval and
/// skips a check that follows a write): that is no reason to drop the link.
async fn an_idle_connection_to_a_live_broker_is_kept(kind: BrokerKind) {
    init_logging();
    let port = shared_broker(kind);
    let mut config = kind.session_config(port);
    config.heart_beat_send = Duration::from_millis(500);
    config.heart_beat_receive = Duration::from_millis(500);
    let (client, mut events) = connect(config).await;
    let queue = format!("/queue/{}", unique_name("vmc-test.idle"));
    client.subscribe(Subscription::new(&queue)).await.unwrap();
    let idle = tokio::time::sleep(Duration::from_secs(8));
    tokio::pin!(idle);
    loop {
        tokio::select! {
            _ = &mut idle => break,
            event = events.recv() => {
                if let Some(SessionEvent::Disconnected { reason, .. }) = event {
                    panic!("an idle link to a live broker was dropped: {reason}");
                }
            }
        }
    }
    client.shutdown().await.unwrap();
}

async fn silent_broker_is_detected_by_heart_beats(kind: BrokerKind) {
    init_logging();
    let port = shared_broker(kind);
    let proxy = TcpProxy::start(port).await;
    let mut config = kind.session_config(proxy.port);
    config.heart_beat_send = Duration::from_millis(300);
    config.heart_beat_receive = Duration::from_millis(300);
    let (client, mut events) = connect(config).await;
    let queue = format!("/queue/{}", unique_name("vmc-test.heartbeat"));
    client.subscribe(Subscription::new(&queue)).await.unwrap();

    proxy.freeze_existing_links();
    let started = tokio::time::Instant::now();
    let reason = within(PATIENCE, "the heart-beat timeout", async {
        loop {
            if let Some(SessionEvent::Disconnected { reason, .. }) = events.recv().await {
                return reason;
            }
        }
    })
    .await;
    assert!(reason.contains("heart-beat"), "{reason}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "detected after {:?}",
        started.elapsed()
    );

    // The session reconnects on a fresh link, re-subscribes and carries messages again.
    within(PATIENCE, "the reconnection", async {
        loop {
            if let Some(SessionEvent::Connected { generation: 2, .. }) = events.recv().await {
                return;
            }
        }
    })
    .await;
    client
        .send_with_receipt(send_frame(&queue, "after"))
        .await
        .unwrap();
    let message = next_message(&mut events).await;
    assert_eq!(&message.frame.body[..], b"after");
    client.ack(&message).await.unwrap();
    client.shutdown().await.unwrap();
}

/// Keeps sending numbered messages with receipts while the broker is stopped (or
/// killed) and started again, and checks that the consumer receives every one of
/// them: those confirmed before the restart, those sent while it was down (queued by
/// the session and waiting for receipts), and those after.
async fn nothing_is_lost_across(broker: PrivateBroker, crash: bool) {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;
    init_logging();
    let queue = format!("/queue/{}", unique_name("vmc-test.restart"));
    let mut config = broker.session_config();
    config.reconnect_max = Duration::from_millis(500);
    let (consumer, mut inbox) = connect(config.clone()).await;
    consumer
        .subscribe(Subscription::new(&queue).with_prefetch(Some(100)))
        .await
        .unwrap();
    let (producer, mut producer_events) = connect(config).await;
    let confirmed = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sender = tokio::spawn({
        let (queue, confirmed, stop) = (queue.clone(), confirmed.clone(), stop.clone());
        async move {
            let mut i = 0u32;
            while !stop.load(Ordering::SeqCst) {
                producer
                    .send_with_receipt(send_frame(&queue, i.to_string()))
                    .await
                    .unwrap();
                i += 1;
                confirmed.store(i, Ordering::SeqCst);
            }
            (producer, i)
        }
    });
    let (seen_tx, seen_rx) = tokio::sync::watch::channel(BTreeSet::new());
    let receiver = tokio::spawn(async move {
        loop {
            let message = next_message(&mut inbox).await;
            let n: u32 = std::str::from_utf8(&message.frame.body)
                .unwrap()
                .parse()
                .unwrap();
            seen_tx.send_modify(|seen| {
                seen.insert(n);
            });
            consumer.ack(&message).await.unwrap();
        }
    });
    vmc_tests::wait_until(PATIENCE, "500 receipts", || {
        let n = confirmed.load(Ordering::SeqCst);
        async move { n >= 500 }
    })
    .await;
    let broker = tokio::task::spawn_blocking(move || {
        if crash {
            broker.kill();
        } else {
            broker.stop();
        }
        broker.start_again();
        broker
    })
    .await
    .unwrap();
    let after_restart = confirmed.load(Ordering::SeqCst);
    vmc_tests::wait_until(
        Duration::from_secs(60),
        "500 more receipts after the restart",
        || {
            let n = confirmed.load(Ordering::SeqCst);
            async move { n >= after_restart + 500 }
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let (producer, sent) = within(PATIENCE, "the producer to stop", sender)
        .await
        .unwrap();
    let mut seen = seen_rx.clone();
    within(
        Duration::from_secs(60),
        "every message",
        seen.wait_for(|s| s.len() >= sent as usize),
    )
    .await
    .unwrap();
    assert_eq!(*seen_rx.borrow(), (0..sent).collect::<BTreeSet<_>>());
    receiver.abort();
    let mut reconnected = false;
    while let Ok(event) = producer_events.try_recv() {
        reconnected |=
            matches!(event, SessionEvent::Connected { generation, .. } if generation > 1);
    }
    assert!(reconnected, "the producer went through a reconnection");
    producer.shutdown().await.unwrap();
    drop(broker);
}

async fn nothing_is_lost_across_a_broker_restart(kind: BrokerKind, port: u16) {
    let broker = PrivateBroker::start(kind, "restart", port);
    nothing_is_lost_across(broker, false).await;
}

async fn nothing_is_lost_across_a_broker_crash(kind: BrokerKind, port: u16) {
    let broker = PrivateBroker::start(kind, "crash", port);
    nothing_is_lost_across(broker, true).await;
}

async fn subscription_waits_for_a_broker_that_is_down(kind: BrokerKind, port: u16) {
    init_logging();
    let broker = PrivateBroker::start(kind, "late", port);
    broker.stop();
    let mut config = broker.session_config();
    config.reconnect_max = Duration::from_millis(500);
    let (client, mut events) = StompClient::start(config);
    let queue = format!("/queue/{}", unique_name("vmc-test.late"));
    let sent = tokio::spawn({
        let (client, queue) = (client.clone(), queue.clone());
        async move {
            client.subscribe(Subscription::new(&queue)).await.unwrap();
            client
                .send_with_receipt(send_frame(&queue, "waited"))
                .await
                .unwrap();
        }
    });
    // The dead broker is reported, with a bounded retry delay, while requests wait.
    let retry = within(PATIENCE, "a failed connection attempt", async {
        loop {
            if let Some(SessionEvent::ConnectFailed { retry_in, .. }) = events.recv().await {
                return retry_in;
            }
        }
    })
    .await;
    assert!(retry <= Duration::from_millis(600), "{retry:?}");
    assert!(!sent.is_finished());
    let broker = tokio::task::spawn_blocking(move || {
        broker.start_again();
        broker
    })
    .await
    .unwrap();
    within(PATIENCE, "the queued requests", sent).await.unwrap();
    let message = next_message(&mut events).await;
    assert_eq!(&message.frame.body[..], b"waited");
    client.ack(&message).await.unwrap();
    client.shutdown().await.unwrap();
    drop(broker);
}

macro_rules! broker_tests {
    ($module:ident, $kind:expr, $base_port:expr) => {
        mod $module {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ten_thousand_messages_arrive_in_order() {
                super::ten_thousand_messages_arrive_in_order($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn binary_body_of_4_mib_arrives_intact() {
                super::binary_body_of_4_mib_arrives_intact($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn receipted_send_is_stored_before_any_subscriber() {
                super::receipted_send_is_stored_before_any_subscriber($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unacked_message_is_redelivered_and_acked_one_is_not() {
                super::unacked_message_is_redelivered_and_acked_one_is_not($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nacked_message_is_not_lost() {
                super::nacked_message_is_not_lost($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn oversized_frame_is_refused_and_session_goes_on() {
                super::oversized_frame_is_refused_and_session_goes_on($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn an_idle_connection_to_a_live_broker_is_kept() {
                super::an_idle_connection_to_a_live_broker_is_kept($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn silent_broker_is_detected_by_heart_beats() {
                super::silent_broker_is_detected_by_heart_beats($kind).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nothing_is_lost_across_a_broker_restart() {
                super::nothing_is_lost_across_a_broker_restart($kind, $base_port).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nothing_is_lost_across_a_broker_crash() {
                super::nothing_is_lost_across_a_broker_crash($kind, $base_port + 1).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn subscription_waits_for_a_broker_that_is_down() {
                super::subscription_waits_for_a_broker_that_is_down($kind, $base_port + 2).await;
            }
        }
    };
}

broker_tests!(rabbitmq, BrokerKind::RabbitMq, 61710);
broker_tests!(activemq, BrokerKind::ActiveMq, 61720);

fn tls_config(server_name: Option<&str>) -> SessionConfig {
    let address =
        BrokerAddress::parse(&format!("stomp+ssl://127.0.0.1:{RABBITMQ_TLS_PORT}")).unwrap();
    let mut config = SessionConfig::new(address).with_credentials("guest", "guest");
    config.tls = Some(TlsSettings {
        ca_file: broker_tls_ca_file(),
        server_name: server_name.map(str::to_owned),
    });
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_session_carries_binary_messages() {
    init_logging();
    shared_broker(BrokerKind::RabbitMq);
    let (client, mut events) = connect(tls_config(Some("localhost"))).await;
    let queue = format!("/queue/{}", unique_name("vmc-test.tls"));
    client.subscribe(Subscription::new(&queue)).await.unwrap();
    let body: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    client
        .send_with_receipt(send_frame(&queue, body.clone()))
        .await
        .unwrap();
    let message = next_message(&mut events).await;
    assert!(message.frame.body[..] == body[..]);
    client.ack(&message).await.unwrap();
    client.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_a_broker_certificate_for_another_name() {
    init_logging();
    shared_broker(BrokerKind::RabbitMq);
    let (client, mut events) = StompClient::start(tls_config(Some("broker.invalid")));
    let reason = within(PATIENCE, "a failed TLS connection", async {
        loop {
            if let Some(SessionEvent::ConnectFailed { reason, .. }) = events.recv().await {
                return reason;
            }
        }
    })
    .await;
    assert!(reason.contains("TLS handshake"), "{reason}");
    assert_eq!(client.link_state(), LinkState::Down);
    client.shutdown().await.unwrap();
}
