//! End-to-end over loopback: a real server, real clients with SQLite files, real sockets.
//! Convergence on seeded random interleavings, durability across a server restart,
//! conflicts under every strategy, duplicate delivery, room isolation, health and metrics.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use kalphite::Durability;
use kalphite_sync::{ConflictPolicy, ServerMessage, Strategy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Each client applies `ops` random upserts/deletes over a small key space, interleaved
/// with random yields, then all must converge.
async fn random_convergence(clients_n: usize, seed: u64, ops: usize) {
    println!("seed {seed}");
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(config(sqlite(&dir.path().join("server.db")).await)).await;
    let mut clients = Vec::new();
    for i in 0..clients_n {
        let db = sqlite(&dir.path().join(format!("c{i}.db"))).await;
        let user = format!("u{i}");
        let (store, client) = client(
            &db,
            client_config(&server.url(), "r", &user, &format!("rep{i}")),
        )
        .await;
        clients.push((store, client, db));
    }
    for (_, c, _) in &clients {
        wait_connected(c).await;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    for step in 0..ops {
        let (store, _, _) = &clients[rng.random_range(0..clients_n)];
        let id = format!("t{}", rng.random_range(0..12));
        if rng.random_bool(0.25) {
            store.dynamic("todo").delete(&id);
        } else {
            store
                .dynamic("todo")
                .put(
                    &id,
                    json!({"title": format!("s{step}"), "n": rng.random_range(0..100)}),
                )
                .expect("put");
        }
        if rng.random_bool(0.3) {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..4))).await;
        }
    }
    for (store, _, _) in &clients {
        guard(store.durable(Durability::Server))
            .await
            .expect("durable");
    }
    let refs: Vec<_> = clients.iter().map(|(s, c, _)| (s, c)).collect();
    let state = converge(&refs).await;
    assert!(!state.is_empty() || ops == 0);
    for (_, c, _) in &clients {
        c.close().await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_converge_on_random_interleavings() {
    for seed in [1, 2, 3] {
        random_convergence(2, seed, 120).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_converge_on_random_interleavings() {
    for seed in [11, 12] {
        random_convergence(3, seed, 150).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_loses_no_acknowledged_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server_db = dir.path().join("server.db");
    let server = start(config(sqlite(&server_db).await)).await;
    let addr = server.addr;
    let url = server.url();
    let db_a = sqlite(&dir.path().join("a.db")).await;
    let db_b = sqlite(&dir.path().join("b.db")).await;
    let (a, ca) = client(&db_a, client_config(&url, "r", "alice", "a")).await;
    let (b, cb) = client(&db_b, client_config(&url, "r", "bob", "b")).await;
    wait_connected(&ca).await;
    wait_connected(&cb).await;
    for i in 0..20 {
        a.dynamic("todo")
            .put(format!("a{i}"), json!({"n": i}))
            .expect("put");
        b.dynamic("todo")
            .put(format!("b{i}"), json!({"n": i}))
            .expect("put");
    }
    guard(a.durable(Durability::Server))
        .await
        .expect("durable a");
    guard(b.durable(Durability::Server))
        .await
        .expect("durable b");
    a.dynamic("todo").delete("a0");
    guard(a.durable(Durability::Server))
        .await
        .expect("durable delete");
    let before = converge(&[(&a, &ca), (&b, &cb)]).await;
    assert_eq!(before.len(), 39);

    // The server goes away mid-session: both keep editing offline.
    server.stop().await;
    wait_for("clients notice", || {
        ca.connection_status() != kalphite_client::ConnectionStatus::Connected
            && cb.connection_status() != kalphite_client::ConnectionStatus::Connected
    })
    .await;
    a.dynamic("todo")
        .put("during", json!({"n": -1}))
        .expect("put offline");
    b.dynamic("todo").delete("b1");

    // Same database file, same port.
    let server = start_at(addr, config(sqlite(&server_db).await)).await;
    wait_connected(&ca).await;
    wait_connected(&cb).await;
    guard(a.durable(Durability::Server))
        .await
        .expect("durable after restart");
    guard(b.durable(Durability::Server))
        .await
        .expect("durable after restart");
    let after = converge(&[(&a, &ca), (&b, &cb)]).await;
    let mut expected = before.clone();
    expected.insert(("todo".into(), "during".into()), json!({"n": -1}));
    expected.remove(&("todo".to_owned(), "b1".to_owned()));
    assert_eq!(after, expected);

    // A newcomer sees exactly the acknowledged state, rebuilt from the room log.
    let db_c = memory_db().await;
    let (c, cc) = client(&db_c, client_config(&url, "r", "carol", "c")).await;
    let all = converge(&[(&a, &ca), (&c, &cc)]).await;
    assert_eq!(all, expected);
    for cl in [&ca, &cb, &cc] {
        cl.close().await;
    }
    server.stop().await;
}

async fn conflict_under(
    strategy: Strategy,
) -> std::collections::BTreeMap<(String, String), serde_json::Value> {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = ConflictPolicy::new(strategy);
    let server = start(config(sqlite(&dir.path().join("s.db")).await).policy(policy)).await;
    let url = server.url();
    let mut clients = Vec::new();
    for (i, user) in ["alice", "bob", "carol"].iter().enumerate() {
        let db = memory_db().await;
        let (s, c) = client(&db, client_config(&url, "r", user, &format!("r{i}"))).await;
        wait_connected(&c).await;
        clients.push((s, c));
    }
    clients[0]
        .0
        .dynamic("todo")
        .put("t1", json!({"title": "start", "done": false, "tag": "x"}))
        .expect("put");
    guard(clients[0].0.durable(Durability::Server))
        .await
        .expect("durable");
    let refs: Vec<_> = clients.iter().map(|(s, c)| (s, c)).collect();
    converge(&refs).await;
    // Both go offline and edit the same entity: different fields, and one shared field.
    clients[0].1.disconnect().await;
    clients[1].1.disconnect().await;
    clients[0]
        .0
        .dynamic("todo")
        .put("t1", json!({"title": "alice", "done": false, "tag": "a"}))
        .expect("put");
    clients[1]
        .0
        .dynamic("todo")
        .put("t1", json!({"title": "start", "done": true, "tag": "b"}))
        .expect("put");
    let events = futures_util::stream::select(clients[0].1.events(), clients[1].1.events());
    clients[0].1.connect();
    clients[1].1.connect();
    guard(clients[0].0.durable(Durability::Server))
        .await
        .expect("durable");
    guard(clients[1].0.durable(Durability::Server))
        .await
        .expect("durable");
    let state = converge(&refs).await;
    // Whichever edit the room took second was concurrent: its author gets a notice.
    let mut events = events;
    guard(async {
        while let Some(e) = events.next().await {
            if matches!(e, kalphite_client::SyncEvent::Conflict(_)) {
                break;
            }
        }
    })
    .await;
    for (_, c) in &clients {
        c.close().await;
    }
    server.stop().await;
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_edits_converge_under_every_strategy() {
    let key = ("todo".to_owned(), "t1".to_owned());
    let lww = conflict_under(Strategy::LastWriteWins).await;
    let t1 = &lww[&key];
    assert!(
        t1 == &json!({"title": "alice", "done": false, "tag": "a"})
            || t1 == &json!({"title": "start", "done": true, "tag": "b"}),
        "last-write-wins keeps one whole version: {t1}"
    );
    let merged = conflict_under(Strategy::FieldMerge).await;
    let t1 = &merged[&key];
    assert_eq!(t1["title"], "alice", "alice's field survives: {t1}");
    assert_eq!(t1["done"], true, "bob's field survives: {t1}");
    assert!(t1["tag"] == "a" || t1["tag"] == "b");
    let manual = conflict_under(Strategy::Manual).await;
    assert!(manual.contains_key(&key));
    let custom = conflict_under(Strategy::custom(|case| {
        let mut e = case.incoming.state.clone()?;
        e.data = json!({"title": "resolved", "done": true, "tag": "custom"});
        Some(e)
    }))
    .await;
    assert_eq!(
        custom[&key],
        json!({"title": "resolved", "done": true, "tag": "custom"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_delivery_is_idempotent() {
    let server = start(config(memory_db().await)).await;
    let mut writer = Raw::connect(&server.url()).await;
    writer.join("r", "w").await;
    let mut reader = Raw::connect(&server.url()).await;
    reader.join("r", "reader").await;
    let frame = change_frame("w-1", "w", "t1", json!({"title": "once"}), 1);
    let mut versions = Vec::new();
    for _ in 0..3 {
        writer.send_json(frame.clone()).await;
        versions.push(
            writer
                .recv_until(|m| match m {
                    ServerMessage::Ack(a) => Some(a.payload.version),
                    _ => None,
                })
                .await,
        );
    }
    assert_eq!(versions, [1, 1, 1]);
    // The reader got exactly one change; a newcomer's catch-up holds one entity at v1.
    let first = reader
        .recv_until(|m| match m {
            ServerMessage::Change(c) => Some(c.payload.room_version),
            _ => None,
        })
        .await;
    assert_eq!(first, Some(1));
    writer
        .send_json(change_frame("w-2", "w", "t2", json!({}), 1))
        .await;
    let next = reader
        .recv_until(|m| match m {
            ServerMessage::Change(c) => Some(c.payload.room_version),
            _ => None,
        })
        .await;
    assert_eq!(next, Some(2), "no duplicate broadcast in between");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_are_isolated() {
    let server = start(config(memory_db().await)).await;
    let url = server.url();
    let (a1, c1) = client(
        &memory_db().await,
        client_config(&url, "room-a", "u1", "x1"),
    )
    .await;
    let (a2, c2) = client(
        &memory_db().await,
        client_config(&url, "room-a", "u2", "x2"),
    )
    .await;
    let (b1, d1) = client(
        &memory_db().await,
        client_config(&url, "room-b", "u3", "x3"),
    )
    .await;
    for c in [&c1, &c2, &d1] {
        wait_connected(c).await;
    }
    for i in 0..10 {
        a1.dynamic("todo")
            .put(format!("a{i}"), json!({"i": i}))
            .expect("put");
    }
    b1.dynamic("todo").put("b", json!({})).expect("put");
    guard(a1.durable(Durability::Server))
        .await
        .expect("durable");
    guard(b1.durable(Durability::Server))
        .await
        .expect("durable");
    let room_a = converge(&[(&a1, &c1), (&a2, &c2)]).await;
    assert_eq!(room_a.len(), 10);
    assert!(!room_a.contains_key(&("todo".to_owned(), "b".to_owned())));
    assert_eq!(snapshot(&b1).len(), 1);
    assert_eq!(d1.room_version(), 1);
    for c in [&c1, &c2, &d1] {
        c.close().await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_metrics_answer() {
    let server = start(config(memory_db().await)).await;
    let (status, body) = http_get(server.addr, "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let mut raw = Raw::connect(&server.url()).await;
    raw.join("r", "u").await;
    raw.send_json(change_frame("u-1", "u", "t1", json!({}), 1))
        .await;
    raw.recv_until(|m| matches!(m, ServerMessage::Ack(_)).then_some(()))
        .await;
    let (status, body) = http_get(server.addr, "/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        "kalphite_sync_connections 1",
        "kalphite_sync_rooms 1",
        "kalphite_sync_changes_persisted_total 1",
        "kalphite_sync_messages_in_total",
        "kalphite_sync_messages_out_total",
        "kalphite_sync_conflicts_total 0",
        "kalphite_sync_errors_total 0",
    ] {
        assert!(body.contains(needle), "missing {needle} in:\n{body}");
    }
    server.stop().await;
}

/// A change whose write fails is never acknowledged nor broadcast: the room resets, its
/// members are disconnected, and a newcomer does not see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_is_never_acknowledged() {
    let db = kalphite_db::Database::open(
        kalphite_db::DatabaseConfig::new("sqlite::memory:").max_storage_mb(1),
    )
    .await
    .expect("db");
    let server = start(config(db).max_frame_bytes(4 << 20)).await;
    let mut writer = Raw::connect(&server.url()).await;
    writer.join("r", "w").await;
    let mut reader = Raw::connect(&server.url()).await;
    reader.join("r", "reader").await;
    writer
        .send_json(change_frame("w-1", "w", "small", json!({"n": 1}), 1))
        .await;
    writer
        .recv_until(|m| matches!(m, ServerMessage::Ack(_)).then_some(()))
        .await;
    let big = "x".repeat(2 << 20);
    writer
        .send_json(change_frame("w-2", "w", "big", json!({"blob": big}), 1))
        .await;
    // Both connections are closed without an ack for w-2 nor a broadcast of it.
    while let Some(m) = writer.recv().await {
        assert!(!matches!(m, ServerMessage::Ack(ref a) if a.payload.ack_of == "w-2"));
    }
    while let Some(m) = reader.recv().await {
        assert!(
            !matches!(m, ServerMessage::Change(ref c) if c.payload.entity_id.as_str() == "big")
        );
    }
    let mut late = Raw::connect(&server.url()).await;
    late.hello("r", "late", Some(&token("late", &["r"]))).await;
    let ids = late
        .recv_until(|m| match m {
            ServerMessage::CatchUp(c) if c.payload.complete => Some(
                c.payload
                    .changes
                    .iter()
                    .map(|c| c.entity_id.to_string())
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .await;
    assert_eq!(ids, ["small"]);
    let (_, metrics) = http_get(server.addr, "/metrics").await;
    assert!(
        metrics.contains("kalphite_sync_storage_errors_total 1"),
        "{metrics}"
    );
    server.stop().await;
}
