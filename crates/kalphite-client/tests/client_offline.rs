//! The offline queue lives in the local database: a client edits while the server is
//! unreachable, the app restarts (store and client dropped, the SQLite file reopened),
//! reconnects, and nothing is lost. Also: `durable(Server)` waits for the server's ack.

#[path = "../../kalphite-server/tests/common/mod.rs"]
mod common;

use common::*;
use kalphite::Durability;
use kalphite_client::ConnectionStatus;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_survive_an_app_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server_db = dir.path().join("server.db");
    let server = start(config(sqlite(&server_db).await)).await;
    let addr = server.addr;
    let url = server.url();
    let app_file = dir.path().join("app.db");

    // Session 1: online, one change acknowledged.
    {
        let db = sqlite(&app_file).await;
        let (store, client) = client(&db, client_config(&url, "r", "alice", "laptop")).await;
        wait_connected(&client).await;
        store
            .dynamic("todo")
            .put("t0", json!({"title": "online"}))
            .expect("put");
        guard(store.durable(Durability::Server))
            .await
            .expect("durable");
        assert_eq!(client.offline_queue_size(), 0);
        client.close().await;
        guard(store.close()).await.expect("store close");
        db.close().await.expect("db close");
    }
    server.stop().await;

    // Session 2: the server is down; edits and a delete queue up, then the app exits.
    {
        let db = sqlite(&app_file).await;
        let (store, client) = client(&db, client_config(&url, "r", "alice", "laptop")).await;
        assert_eq!(
            snapshot(&store).len(),
            1,
            "hydrated from the local database"
        );
        assert_ne!(client.connection_status(), ConnectionStatus::Connected);
        for i in 1..=5 {
            store
                .dynamic("todo")
                .put(format!("t{i}"), json!({"title": format!("offline {i}")}))
                .expect("put");
        }
        store.dynamic("todo").delete("t0");
        assert_eq!(client.offline_queue_size(), 6);
        client.close().await;
        // The server never acknowledged: the Server-level engine reports them unwritten,
        // the local database has them.
        let _ = guard(store.close()).await;
        db.close().await.expect("db close");
    }

    // Session 3: the app restarts; the server is back on the same port and database.
    let server = start_at(addr, config(sqlite(&server_db).await)).await;
    let db = sqlite(&app_file).await;
    let (store, client) = client(&db, client_config(&url, "r", "alice", "laptop")).await;
    assert_eq!(client.offline_queue_size(), 6, "the queue was persisted");
    wait_connected(&client).await;
    wait_for("queue drains", || client.offline_queue_size() == 0).await;

    // Another device sees exactly the offline work.
    let (other, other_client) = common::client(
        &memory_db().await,
        client_config(&url, "r", "alice", "phone"),
    )
    .await;
    let state = converge(&[(&store, &client), (&other, &other_client)]).await;
    assert_eq!(state.len(), 5);
    assert!(!state.contains_key(&("todo".to_owned(), "t0".to_owned())));
    assert_eq!(
        state[&("todo".to_owned(), "t3".to_owned())],
        json!({"title": "offline 3"})
    );
    client.close().await;
    other_client.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_server_waits_for_the_ack() {
    let server = start(config(memory_db().await)).await;
    let db = memory_db().await;
    let (store, client) = client(&db, client_config(&server.url(), "r", "u", "a")).await;
    wait_connected(&client).await;
    client.disconnect().await;
    store.dynamic("todo").put("t1", json!({})).expect("put");
    let durable = tokio::spawn(store.durable(Durability::Server));
    // Local durability does not need the server.
    guard(store.durable(Durability::Local))
        .await
        .expect("local");
    assert!(
        !durable.is_finished(),
        "not durable on the server while disconnected"
    );
    assert_eq!(client.offline_queue_size(), 1);
    client.connect();
    guard(durable)
        .await
        .expect("join")
        .expect("durable after reconnect");
    assert_eq!(client.offline_queue_size(), 0);
    client.close().await;
    server.stop().await;
}
