//! Client liveness: reconnect backoff grows exponentially with jitter and is capped; a
//! server that stops answering is noticed by the heartbeat and the client reconnects;
//! remote entities the local schema refuses are reported, not applied.

#[path = "../../kalphite-server/tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use kalphite::{Durability, FnSchema, Store};
use kalphite_client::{SyncEvent, backoff, connect_store};
use kalphite_sync::{
    CatchUpPayload, Envelope, ErrorCode, PROTOCOL_VERSION, SERVER_USER_ID, ServerMessage,
    WelcomePayload, encode,
};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[test]
fn backoff_doubles_with_jitter_and_is_capped() {
    let base = Duration::from_millis(100);
    let max = Duration::from_secs(10);
    assert_eq!(backoff(1, base, max, 0.0), Duration::from_millis(50));
    assert_eq!(backoff(1, base, max, 1.0), Duration::from_millis(100));
    assert_eq!(backoff(3, base, max, 1.0), Duration::from_millis(400));
    for attempt in 1..40 {
        for jitter in [0.0, 0.3, 0.99] {
            let d = backoff(attempt, base, max, jitter);
            let full = backoff(attempt, base, max, 1.0);
            assert!(
                d >= full / 2 && d <= full && d <= max,
                "{attempt} {jitter} {d:?}"
            );
        }
    }
    assert_eq!(backoff(30, base, max, 1.0), max);
}

/// A server that welcomes every client and then never says anything again.
async fn silent_server() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let _hello = ws.next().await;
                for msg in [
                    ServerMessage::Welcome(Envelope::new(
                        "w",
                        SERVER_USER_ID,
                        1,
                        WelcomePayload {
                            protocol_version: PROTOCOL_VERSION,
                            room_id: "r".into(),
                            room_version: 0,
                            catch_up_from: 0,
                            epoch: None,
                            snapshot: false,
                            collected_through: 0,
                            replica_counter: 0,
                        },
                    )),
                    ServerMessage::CatchUp(Envelope::new(
                        "c",
                        SERVER_USER_ID,
                        1,
                        CatchUpPayload {
                            from_version: 0,
                            to_version: 0,
                            changes: vec![],
                            complete: true,
                        },
                    )),
                ] {
                    let text = encode(&msg).expect("encode");
                    if ws.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                // Read (and ignore) heartbeats until the client gives up on us.
                while let Some(Ok(_)) = ws.next().await {}
            });
        }
    });
    (format!("ws://{addr}/sync"), accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_noticed_and_replaced() {
    let (url, accepted) = silent_server().await;
    let config = client_config(&url, "r", "u", "a").heartbeat_interval(Duration::from_millis(40));
    let (_store, client) = client(&memory_db().await, config).await;
    let mut events = client.events();
    let reason = guard(async {
        loop {
            match events.next().await {
                Some(SyncEvent::Disconnected { reason }) => break reason,
                Some(_) => {}
                None => panic!("event stream ended"),
            }
        }
    })
    .await;
    assert!(reason.contains("no answer from the server"), "{reason}");
    wait_for("a reconnect", || accepted.load(Ordering::SeqCst) >= 2).await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_entities_are_validated_by_the_local_schema() {
    let server = start(config(memory_db().await)).await;
    let url = server.url();
    let (writer, wc) = client(&memory_db().await, client_config(&url, "r", "w", "w")).await;
    // The reader's store only accepts todos with a string title.
    let schema = FnSchema(|kind: &kalphite::Kind, data: &serde_json::Value| {
        if kind.as_str() == "todo" && !data["title"].is_string() {
            Err(vec![kalphite::Issue::new("title", "must be a string")])
        } else {
            Ok(())
        }
    });
    let builder = Store::builder().schema(Arc::new(schema));
    let (reader, rc) = connect_store(
        builder,
        &memory_db().await,
        client_config(&url, "r", "r", "r"),
    )
    .await
    .expect("connect");
    wait_connected(&wc).await;
    wait_connected(&rc).await;
    let mut events = rc.events();
    writer
        .dynamic("todo")
        .put("bad", json!({"title": 42}))
        .expect("writer has no schema");
    writer
        .dynamic("todo")
        .put("good", json!({"title": "ok"}))
        .expect("put");
    guard(writer.durable(Durability::Server))
        .await
        .expect("durable");
    let refused = guard(async {
        loop {
            match events.next().await {
                Some(SyncEvent::Error {
                    code: Some(ErrorCode::InvalidEntity),
                    message,
                }) => break message,
                Some(_) => {}
                None => panic!("event stream ended"),
            }
        }
    })
    .await;
    assert!(refused.contains("todo/bad"), "{refused}");
    wait_for("the valid one arrives", || {
        reader.get("todo", "good").is_some()
    })
    .await;
    assert!(reader.get("todo", "bad").is_none());
    wc.close().await;
    rc.close().await;
    server.stop().await;
}
