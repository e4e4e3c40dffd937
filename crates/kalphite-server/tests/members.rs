//! One member of a room against another, over the real server: a member cannot have
//! another replica's edits acknowledged and dropped by sending their message ids first,
//! cannot join with another user's replica id (before or after a server restart), and
//! cannot plant a clock that swallows the others' later edits. Each refusal is a typed
//! error naming the message.

mod common;

use common::*;
use kalphite_sync::{ErrorCode, ServerMessage};
use serde_json::{Value, json};

/// A change frame of `todo/id` with this message id and clock.
// Callers hand over `json!(..)` values, as to `json!` itself.
#[allow(clippy::needless_pass_by_value)]
fn frame(message_id: &str, user: &str, id: &str, data: Value, vector: Value) -> Value {
    json!({
        "type": "change", "messageId": message_id, "userId": user, "timestamp": 1_700_000_000_000u64,
        "payload": {
            "operation": "upsert", "entityType": "todo", "entityId": id,
            "entity": {"id": id, "type": "todo", "data": data, "updatedAt": 1_700_000_000_000u64},
            "vector": vector, "baseVersion": 0
        }
    })
}

/// Joins `room` as `user` with replica id `replica`; waits for the complete catch-up.
async fn join_as(url: &str, room: &str, user: &str, replica: &str) -> Raw {
    let mut raw = Raw::connect(url).await;
    raw.hello_as(room, user, replica, Some(&token(user, &[room])))
        .await;
    raw.recv_until(|m| match m {
        ServerMessage::CatchUp(c) if c.payload.complete => Some(()),
        ServerMessage::Error(e) => panic!("join refused: {:?}", e.payload),
        _ => None,
    })
    .await;
    raw
}

/// The next ack's (ackOf, result data) or error's (code, refersTo).
async fn answer(raw: &mut Raw) -> Result<(String, Value), (ErrorCode, Option<String>)> {
    raw.recv_until(|m| match m {
        ServerMessage::Ack(a) => Some(Ok((
            a.payload.ack_of.clone(),
            a.payload
                .result
                .entity
                .as_ref()
                .map_or(Value::Null, |e| e.data.clone()),
        ))),
        ServerMessage::Error(e) => Some(Err((e.payload.code, e.payload.refers_to.clone()))),
        _ => None,
    })
    .await
}

/// Sends a hello with a replica id that belongs to someone else: refused, then closed.
async fn expect_replica_taken(url: &str, user: &str, replica: &str) {
    let mut raw = Raw::connect(url).await;
    raw.hello_as("r", user, replica, Some(&token(user, &["r"])))
        .await;
    let refused = raw
        .recv_until(|m| match m {
            ServerMessage::Error(e) => Some((e.payload.code, e.payload.refers_to.clone())),
            ServerMessage::Welcome(_) => panic!("{user} was welcomed with replica id {replica}"),
            _ => None,
        })
        .await;
    assert_eq!(
        refused,
        (ErrorCode::ReplicaTaken, Some(format!("{user}-hello")))
    );
    assert!(raw.recv().await.is_none(), "the connection is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_id_stays_bound_to_its_user_across_a_restart() {
    // Bug: any user could join with another user's replica id (visible in every broadcast
    // clock) and write under it; and a restarted server would have forgotten the owner.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("server.db");
    let server = start(config(sqlite(&path).await)).await;
    let url = server.url();
    let mut alice = join_as(&url, "r", "alice", "phone").await;
    alice
        .send_json(frame(
            "phone-1",
            "alice",
            "t1",
            json!({"n": 1}),
            json!({"phone": 1}),
        ))
        .await;
    assert!(answer(&mut alice).await.is_ok());
    expect_replica_taken(&url, "mallory", "phone").await;
    drop(alice);
    let addr = server.addr;
    server.stop().await;

    let server = start_at(addr, config(sqlite(&path).await)).await;
    expect_replica_taken(&url, "mallory", "phone").await;
    let _alice = join_as(&url, "r", "alice", "phone").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_swallow_anothers_edits() {
    // Bug: the room deduplicated message ids room-wide, so mallory's `phone-2` made
    // alice's `phone-2` come back acknowledged with mallory's entity and stored nowhere;
    // and mallory's clock {"phone": 1000000} made alice's later edits look stale.
    let server = start(config(memory_db().await)).await;
    let url = server.url();
    let mut alice = join_as(&url, "r", "alice", "phone").await;
    let mut mallory = join_as(&url, "r", "mallory", "laptop").await;
    alice
        .send_json(frame(
            "phone-1",
            "alice",
            "t",
            json!({"v": 1}),
            json!({"phone": 1}),
        ))
        .await;
    assert!(answer(&mut alice).await.is_ok());

    mallory
        .send_json(frame(
            "phone-2",
            "mallory",
            "junk",
            json!({}),
            json!({"laptop": 1}),
        ))
        .await;
    assert!(answer(&mut mallory).await.is_ok(), "her own change is fine");
    mallory
        .send_json(frame(
            "laptop-2",
            "mallory",
            "t",
            json!({"v": "pwned"}),
            json!({"phone": 1_000_000, "laptop": 2}),
        ))
        .await;
    assert_eq!(
        answer(&mut mallory).await,
        Err((ErrorCode::InvalidClock, Some("laptop-2".into())))
    );

    alice
        .send_json(frame(
            "phone-2",
            "alice",
            "t",
            json!({"v": 2}),
            json!({"phone": 2}),
        ))
        .await;
    assert_eq!(
        answer(&mut alice).await,
        Ok(("phone-2".into(), json!({"v": 2}))),
        "alice's edit is stored, and is what the ack shows"
    );
    server.stop().await;
}
