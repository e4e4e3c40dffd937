//! Regression: `store.durable(Durability::Server)` resolved at once after an app restart
//! even though changes from the earlier (offline) session were still waiting in the
//! persisted offline queue; a CLI that closed right after it lost the chance to send them
//! and its replica diverged. Now it waits for those too.

#[path = "../../kalphite-server/tests/common/mod.rs"]
mod common;

use common::{client, client_config, config, guard, memory_db, snapshot, sqlite, start};
use kalphite::Durability;
use serde_json::json;

#[tokio::test]
async fn durable_server_covers_changes_queued_by_an_earlier_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(memory_db().await)).await;

    // Session 1: offline by choice; the change goes into the persisted offline queue.
    let path = dir.path().join("alice.db");
    {
        let db = sqlite(&path).await;
        let offline =
            client_config(&server.url(), "room", "alice", "alice-1").connect_on_start(false);
        let (store, sync) = client(&db, offline).await;
        store
            .dynamic("todo")
            .put("t1", json!({"title": "made offline"}))
            .unwrap();
        assert_eq!(sync.offline_queue_size(), 1);
        sync.close().await;
        store.durable(Durability::Local).await.unwrap();
        db.close().await.unwrap();
    }

    // Session 2: online, no new change; durable(Server) must wait for the old one.
    let db = sqlite(&path).await;
    let (store, sync) = client(
        &db,
        client_config(&server.url(), "room", "alice", "alice-1"),
    )
    .await;
    guard(store.durable(Durability::Server)).await.unwrap();
    assert_eq!(
        sync.offline_queue_size(),
        0,
        "durable(Server) resolved before the ack"
    );

    // And the server really has it: a fresh client catches it up.
    let (bob, bob_sync) = client(
        &memory_db().await,
        client_config(&server.url(), "room", "bob", "bob-1"),
    )
    .await;
    common::wait_for("bob to see t1", || bob.dynamic("todo").len() == 1).await;
    assert_eq!(snapshot(&bob), snapshot(&store));
    bob_sync.close().await;
    sync.close().await;
    server.stop().await;
}
