//! Brokers that misbehave, played by a raw socket server on loopback.
//!
//! Malformed frames: the server accepts the client's connections and, on each,
//! answers the handshake and then writes one kind of broken bytes. The client must
//! log an error, drop that connection, reconnect, re-subscribe, and deliver the valid
//! message that finally comes, without a panic.
//!
//! A broker that stops reading while it writes (ActiveMQ does: a connection's reads
//! wait while a write to that connection waits): the client must go on reading its
//! socket even when its own writes are stuck, or the two wait for each other forever.

use bytes::BytesMut;
use futures_util::StreamExt;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::FramedRead;
use vmc_protocol::stomp::{
    BrokerAddress, Command, SessionConfig, SessionEvent, StompClient, StompCodec, StompItem,
    Subscription,
};
use vmc_tests::{init_logging, within};

/// Broken things a broker could send after a good handshake and subscription receipt.
const GARBAGE: &[&[u8]] = &[
    b"NOT-A-COMMAND\n\n\0",
    b"MESSAGE\nheader-without-colon\n\n\0",
    b"MESSAGE\nbad:\\escape\n\n\0",
    b"MESSAGE\ncontent-length:3\n\nabcdef\0",
    b"MESSAGE\ncontent-length:nope\n\n\0",
    b"MESSAGE\ncontent-length:999999999\n\n",
    b"MESSAGE\ndestination:/queue/x\n\n\xff\xfe",
    b"\xff\xfe\xfd\n\n\0",
    b"MESSAGE\n\xc3\x28:x\n\n\0",
];

/// Reads client frames until one with this command arrives.
async fn expect(
    reader: &mut FramedRead<tokio::net::tcp::OwnedReadHalf, StompCodec>,
    command: Command,
) -> vmc_protocol::stomp::Frame {
    loop {
        match reader.next().await {
            Some(Ok(StompItem::Frame(frame))) if frame.command == command => return frame,
            Some(Ok(_)) => continue,
            other => panic!("expected {command} from the client, got {other:?}"),
        }
    }
}

/// The broker's side of a connection up to the subscription's receipt: the reader,
/// the writer and the SUBSCRIBE frame.
async fn accept_subscriber(
    stream: TcpStream,
) -> (
    FramedRead<tokio::net::tcp::OwnedReadHalf, StompCodec>,
    tokio::net::tcp::OwnedWriteHalf,
    vmc_protocol::stomp::Frame,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = FramedRead::new(read, StompCodec::default());
    let connect = expect(&mut reader, Command::Connect).await;
    assert_eq!(connect.header("accept-version"), Some("1.2"));
    write
        .write_all(b"CONNECTED\nversion:1.2\nheart-beat:0,0\n\n\0")
        .await
        .unwrap();
    let subscribe = expect(&mut reader, Command::Subscribe).await;
    let receipt = receipt_for(&subscribe);
    write.write_all(&receipt).await.unwrap();
    (reader, write, subscribe)
}

/// The RECEIPT frame answering `frame`'s `receipt` header.
fn receipt_for(frame: &vmc_protocol::stomp::Frame) -> Vec<u8> {
    let id = frame.header("receipt").unwrap_or_default();
    format!("RECEIPT\nreceipt-id:{id}\n\n\0").into_bytes()
}

/// Starts a client session and waits until its subscription to `/queue/q` is
/// receipted.
async fn subscribed_client(
    config: SessionConfig,
) -> (
    StompClient,
    tokio::sync::mpsc::UnboundedReceiver<SessionEvent>,
) {
    let (client, events) = StompClient::start(config);
    within(
        Duration::from_secs(10),
        "the subscription",
        client.subscribe(Subscription::new("/queue/q")),
    )
    .await
    .unwrap();
    (client, events)
}

/// Serves one connection: handshake, subscription receipt, then `payload`.
async fn serve(stream: TcpStream, payload: Vec<u8>) -> String {
    let (_reader, mut write, subscribe) = accept_subscriber(stream).await;
    let id = subscribe.header("id").unwrap();
    write
        .write_all(&with_subscription_id(payload, id))
        .await
        .unwrap();
    // Keep the socket open a little: the client, not the server, must end the link.
    tokio::time::sleep(Duration::from_millis(300)).await;
    subscribe.header("destination").unwrap().to_owned()
}

/// Puts the client's subscription id where a payload says `{sub}`; binary garbage
/// (not UTF-8) is left byte for byte as it is.
fn with_subscription_id(payload: Vec<u8>, id: &str) -> Vec<u8> {
    match String::from_utf8(payload) {
        Ok(text) => text.replace("{sub}", id).into_bytes(),
        Err(e) => e.into_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_from_the_broker_are_survived() {
    init_logging();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let mut destinations = Vec::new();
        for garbage in GARBAGE {
            let (stream, _) = listener.accept().await.unwrap();
            destinations.push(serve(stream, garbage.to_vec()).await);
        }
        // Finally a well-formed message on the re-established subscription.
        let (stream, _) = listener.accept().await.unwrap();
        let good =
            b"MESSAGE\nsubscription:{sub}\nmessage-id:m1\ndestination:/queue/q\nack:a1\n\nfine\0";
        destinations.push(serve(stream, good.to_vec()).await);
        destinations
    });

    let mut config = SessionConfig::new(BrokerAddress::tcp("127.0.0.1", port));
    config.reconnect_initial = Duration::from_millis(10);
    config.reconnect_max = Duration::from_millis(50);
    config.max_frame_size = 1024 * 1024;
    let (client, mut events) = subscribed_client(config).await;
    let mut disconnects = Vec::new();
    let message = within(Duration::from_secs(30), "the good message", async {
        loop {
            match events.recv().await {
                Some(SessionEvent::Message(m)) => return m,
                Some(SessionEvent::Disconnected { reason, .. }) => disconnects.push(reason),
                Some(_) => {}
                None => panic!("the session ended"),
            }
        }
    })
    .await;
    assert_eq!(&message.frame.body[..], b"fine");
    assert_eq!(
        disconnects.len(),
        GARBAGE.len(),
        "one dropped link per broken frame: {disconnects:#?}"
    );
    for reason in &disconnects {
        assert!(
            reason.contains("malformed") || reason.contains("closed"),
            "unexpected reason {reason}"
        );
    }
    let destinations = server.await.unwrap();
    assert!(
        destinations.iter().all(|d| d == "/queue/q"),
        "re-subscribed each time: {destinations:?}"
    );
    client.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_reading_while_it_writes_is_still_read_from() {
    const MESSAGES: usize = 40_000;
    const BODY: usize = 1024;
    init_logging();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (flooded_tx, flooded) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (mut reader, mut write, subscribe) = accept_subscriber(stream).await;
        let id = subscribe.header("id").unwrap().to_owned();
        // From here on nothing is read until all the messages are written: 40 MiB,
        // far more than the socket buffers on both sides hold.
        let body = "x".repeat(BODY);
        let mut flood = BytesMut::new();
        for n in 0..MESSAGES {
            flood.extend_from_slice(
                format!(
                    "MESSAGE\nsubscription:{id}\nmessage-id:m{n}\ndestination:/queue/q\n\n{body}\0"
                )
                .as_bytes(),
            );
        }
        let started = tokio::time::Instant::now();
        write.write_all(&flood).await.unwrap();
        let _ = flooded_tx.send(started.elapsed());
        // Then read again: whatever the client wrote meanwhile, up to its DISCONNECT.
        let mut sends = 0;
        loop {
            match reader.next().await {
                Some(Ok(StompItem::Frame(frame))) if frame.command == Command::Send => sends += 1,
                Some(Ok(StompItem::Frame(frame))) if frame.command == Command::Disconnect => {
                    let _ = write.write_all(&receipt_for(&frame)).await;
                    return sends;
                }
                Some(Ok(_)) => {}
                other => panic!("the client's link ended early: {other:?}"),
            }
        }
    });

    let (client, mut events) =
        subscribed_client(SessionConfig::new(BrokerAddress::tcp("127.0.0.1", port))).await;
    // The client writes 16 MiB the server does not read yet, so its writes are stuck.
    const SENDS: usize = 256;
    let sender = client.clone();
    let writes = tokio::spawn(async move {
        let body = vec![b'y'; 64 * 1024];
        for _ in 0..SENDS {
            let frame = vmc_protocol::stomp::Frame::new(Command::Send)
                .with_header("destination", "/queue/elsewhere")
                .with_body(body.clone());
            sender.send(frame).await.unwrap();
        }
    });
    let took = within(
        Duration::from_secs(20),
        "the server's 40 MiB of messages to be taken off its socket",
        flooded,
    )
    .await
    .unwrap();
    log::info!("the client took all messages off the socket in {took:?}");
    let delivered = within(Duration::from_secs(30), "every message delivered", async {
        let mut delivered = 0;
        while delivered < MESSAGES {
            match events.recv().await {
                Some(SessionEvent::Message(m)) => {
                    assert_eq!(m.message_id(), Some(format!("m{delivered}").as_str()));
                    delivered += 1;
                }
                Some(SessionEvent::Disconnected { reason, .. }) => {
                    panic!("the link dropped: {reason}")
                }
                Some(_) => {}
                None => panic!("the session ended"),
            }
        }
        delivered
    })
    .await;
    assert_eq!(delivered, MESSAGES);
    within(Duration::from_secs(30), "the client's writes", writes)
        .await
        .unwrap();
    within(Duration::from_secs(30), "the shutdown", client.shutdown())
        .await
        .unwrap();
    let sends = within(Duration::from_secs(10), "the server", server)
        .await
        .unwrap();
    assert_eq!(sends, SENDS, "every SEND of the client reached the server");
}
