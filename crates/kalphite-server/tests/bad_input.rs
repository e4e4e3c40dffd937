//! Bad input gets an error reply, never a panic, and never disturbs other clients:
//! malformed JSON, an unknown type, a missing field, a binary frame, a message before the
//! hello, an oversized frame, and a burst over the rate limit.

mod common;

use common::*;
use futures_util::SinkExt;
use kalphite_sync::{ErrorCode, ServerMessage};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

async fn expect_error(raw: &mut Raw) -> ErrorCode {
    raw.recv_until(|m| match m {
        ServerMessage::Error(e) => Some(e.payload.code),
        _ => None,
    })
    .await
}

/// A healthy client in the same room: one change, acked and seen by a reader.
async fn healthy_round_trip(writer: &mut Raw, reader: &mut Raw, n: u64) {
    let id = format!("ok{n}");
    writer
        .send_json(change_frame(
            &format!("w-{n}"),
            "w",
            &id,
            json!({"n": n}),
            n,
        ))
        .await;
    writer
        .recv_until(|m| matches!(m, ServerMessage::Ack(_)).then_some(()))
        .await;
    reader
        .recv_until(|m| match m {
            ServerMessage::Change(c) if c.payload.entity_id.as_str() == id => Some(()),
            _ => None,
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_error_replies_and_others_are_unaffected() {
    let server = start(config(memory_db().await).max_frame_bytes(4096)).await;
    let url = server.url();
    let mut writer = Raw::connect(&url).await;
    writer.join("r", "w").await;
    let mut reader = Raw::connect(&url).await;
    reader.join("r", "reader").await;
    let mut bad = Raw::connect(&url).await;

    // Before joining.
    bad.send("{not json").await;
    assert_eq!(expect_error(&mut bad).await, ErrorCode::MalformedJson);
    bad.send_json(change_frame("b-0", "b", "x", json!({}), 1))
        .await;
    assert_eq!(expect_error(&mut bad).await, ErrorCode::NotJoined);

    bad.join("r", "b").await;
    healthy_round_trip(&mut writer, &mut reader, 1).await;

    let cases: Vec<(String, ErrorCode)> = vec![
        ("{not json".into(), ErrorCode::MalformedJson),
        ("[1, 2, 3]".into(), ErrorCode::InvalidMessage),
        (
            json!({"type": "presence", "messageId": "b-1", "userId": "b", "timestamp": 1, "payload": {}})
                .to_string(),
            ErrorCode::UnknownType,
        ),
        (
            json!({"type": "change", "messageId": "b-2", "userId": "b", "timestamp": 1}).to_string(),
            ErrorCode::MissingField,
        ),
        (
            format!(r#"{{"type":"heartbeat","pad":"{}"}}"#, "x".repeat(6000)),
            ErrorCode::Oversized,
        ),
        (
            json!({"type": "change", "messageId": "b-3", "userId": "b", "timestamp": 1,
                   "payload": {"operation": "upsert", "entityType": "todo", "entityId": "x"}})
                .to_string(),
            ErrorCode::InvalidEntity,
        ),
    ];
    for (i, (frame, code)) in cases.into_iter().enumerate() {
        bad.send(frame).await;
        assert_eq!(expect_error(&mut bad).await, code, "case {i}");
        healthy_round_trip(&mut writer, &mut reader, 10 + i as u64).await;
    }
    bad.ws
        .send(Message::Binary(vec![1u8, 2, 3].into()))
        .await
        .expect("send binary");
    assert_eq!(expect_error(&mut bad).await, ErrorCode::InvalidMessage);

    // The bad connection still works after all of that.
    bad.send_json(change_frame("b-9", "b", "fine", json!({}), 1))
        .await;
    bad.recv_until(|m| matches!(m, ServerMessage::Ack(_)).then_some(()))
        .await;

    // A frame past the hard limit (4× the limit) closes that connection cleanly, with an
    // `oversized` error and close 1009 (more cases in hostile.rs)...
    bad.send(format!(
        r#"{{"type":"heartbeat","pad":"{}"}}"#,
        "x".repeat(70_000)
    ))
    .await;
    assert_eq!(expect_error(&mut bad).await, ErrorCode::Oversized);
    match guard(futures_util::StreamExt::next(&mut bad.ws)).await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1009),
        other => panic!("expected close 1009, got {other:?}"),
    }
    // ...and nobody else notices.
    healthy_round_trip(&mut writer, &mut reader, 99).await;
    let (_, metrics) = http_get(server.addr, "/metrics").await;
    assert!(metrics.contains("kalphite_sync_connections 2"), "{metrics}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_with_an_error_and_keeps_the_connection() {
    let server = start(config(memory_db().await).rate_limit(1, 5)).await;
    let mut raw = Raw::connect(&server.url()).await;
    raw.join("r", "u").await; // one token used by the hello
    for i in 0..10 {
        raw.send_json(json!({"type": "heartbeat", "messageId": format!("h{i}"), "userId": "u", "timestamp": 1}))
            .await;
    }
    let mut limited = 0;
    let mut beats = 0;
    while limited + beats < 10 {
        match raw.recv().await.expect("still connected") {
            ServerMessage::Error(e) => {
                assert_eq!(e.payload.code, ErrorCode::RateLimited);
                limited += 1;
            }
            ServerMessage::Heartbeat(_) => beats += 1,
            _ => {}
        }
    }
    assert!(limited >= 5, "limited {limited}, answered {beats}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_change_is_named_in_refers_to() {
    // Bug: the server's `oversized` error had no `refersTo`, so a client could not tell
    // which of its changes was refused.
    let server = start(config(memory_db().await).max_frame_bytes(4096)).await;
    let mut raw = Raw::connect(&server.url()).await;
    raw.join("r", "u").await;
    let big = json!({"blob": "x".repeat(6000)});
    raw.send_json(change_frame("raw-u-7-1", "u", "big", big, 1))
        .await;
    let (code, refers_to) = raw
        .recv_until(|m| match m {
            ServerMessage::Error(e) => Some((e.payload.code, e.payload.refers_to.clone())),
            _ => None,
        })
        .await;
    assert_eq!(code, ErrorCode::Oversized);
    assert_eq!(refers_to.as_deref(), Some("raw-u-7-1"));
    // The connection goes on.
    raw.send_json(change_frame("raw-u-7-2", "u", "small", json!({}), 1))
        .await;
    raw.recv_until(|m| matches!(m, ServerMessage::Ack(_)).then_some(()))
        .await;
    server.stop().await;
}
