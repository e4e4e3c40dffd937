//! Issue 10, item 8: rooms were never unloaded (3,000 rooms opened and left stayed 3,000 in
//! memory). A room with no connection and no write in flight is unloaded after
//! `room_unload_after` and restored from the log on the next hello, with nothing lost; a
//! room in use never is.

mod common;

use std::time::Duration;

use common::{Raw, change_frame, config, metric, sqlite, start, token, wait_metric};
use kalphite_sync::ServerMessage;
use serde_json::json;

/// Joins `room`, writes one todo, waits for its ack, and leaves.
async fn write_one(url: &str, room: &str, user: &str, id: &str) {
    let mut raw = Raw::connect(url).await;
    raw.join(room, user).await;
    raw.send_json(change_frame(
        &format!("{user}-1"),
        user,
        id,
        json!({"t": id}),
        1,
    ))
    .await;
    raw.recv_until(|m| match m {
        ServerMessage::Ack(_) => Some(()),
        ServerMessage::Error(e) => panic!("change refused: {:?}", e.payload),
        _ => None,
    })
    .await;
    raw.ws.close(None).await.expect("close");
}

#[tokio::test]
async fn rooms_left_by_everyone_are_unloaded_and_restored_from_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sqlite(&dir.path().join("rooms.db")).await;
    let server = start(config(db).room_unload_after(Duration::from_millis(100))).await;
    let url = server.url();

    for i in 0..200 {
        write_one(&url, &format!("room-{i}"), "alice", &format!("t{i}")).await;
    }
    // Every room was left: all of them go, none stays loaded.
    wait_metric(&server, "kalphite_sync_rooms", |n| n == 0).await;
    assert_eq!(
        metric(&server, "kalphite_sync_rooms_unloaded_total").await,
        200
    );

    // The next hello restores the room from the log: its todo is in the catch-up.
    let mut raw = Raw::connect(&url).await;
    raw.hello("room-7", "bob", Some(&token("bob", &["room-7"])))
        .await;
    let ids = raw
        .recv_until(|m| match m {
            ServerMessage::CatchUp(c) if c.payload.complete => Some(
                c.payload
                    .changes
                    .iter()
                    .map(|c| c.entity_id.to_string())
                    .collect::<Vec<_>>(),
            ),
            ServerMessage::Error(e) => panic!("join refused: {:?}", e.payload),
            _ => None,
        })
        .await;
    assert_eq!(ids, vec!["t7".to_owned()]);
    assert_eq!(metric(&server, "kalphite_sync_rooms").await, 1);
    // A restored room continues its versions: the next change is version 2.
    raw.send_json(change_frame("bob-1", "bob", "t7b", json!({"t": "b"}), 1))
        .await;
    let version = raw
        .recv_until(|m| match m {
            ServerMessage::Ack(a) => Some(a.payload.version),
            ServerMessage::Error(e) => panic!("change refused: {:?}", e.payload),
            _ => None,
        })
        .await;
    assert_eq!(version, 2);
    drop(raw);
    server.stop().await;
}

#[tokio::test]
async fn a_room_with_a_connection_stays_loaded_and_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sqlite(&dir.path().join("rooms.db")).await;
    let server = start(config(db).room_unload_after(Duration::from_millis(50))).await;
    let url = server.url();

    let mut watcher = Raw::connect(&url).await;
    watcher.join("busy", "carol").await;
    // Many unload periods pass while the watcher stays (it heartbeats, as clients do).
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        watcher
            .send_json(
                json!({"type": "heartbeat", "messageId": "hb", "userId": "carol",
                "timestamp": 1, "payload": {}}),
            )
            .await;
    }
    assert_eq!(metric(&server, "kalphite_sync_rooms").await, 1);
    assert_eq!(
        metric(&server, "kalphite_sync_rooms_unloaded_total").await,
        0
    );
    // The room is still the one the watcher is in: another writer's change reaches it.
    write_one(&url, "busy", "dave", "d1").await;
    let got = watcher
        .recv_until(|m| match m {
            ServerMessage::Change(c) => Some(c.payload.entity_id.to_string()),
            _ => None,
        })
        .await;
    assert_eq!(got, "d1");
    server.stop().await;
}
