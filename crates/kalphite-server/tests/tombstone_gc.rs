//! Tombstones are collected (issue 10, item 8), over real WebSocket connections and a
//! real SQLite room log. Bug pinned: deletes left tombstones in the room's memory, its log and every
//! catch-up forever. Now a room collects those past its horizon when it is loaded, deletes
//! them from the log with the horizon in one transaction, and a client that synced before
//! the horizon gets a snapshot and drops the deleted entities instead of keeping them.

mod common;

use common::{
    Raw, client, client_config, config, converge, guard, snapshot, sqlite, start, start_at, token,
    wait_connected,
};
use kalphite::{Durability, Op};
use kalphite_server::{ROOM_KIND_PREFIX, ROOM_META_KIND};
use kalphite_sync::{RoomLimits, RoomMeta, ServerMessage};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collected_tombstones_leave_the_room_and_older_clients_get_a_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server_db = sqlite(&dir.path().join("server.db")).await;
    let limits = RoomLimits {
        tombstone_versions: 5,
        tombstone_age: 0,
        ..RoomLimits::default()
    };
    // While it runs, the room's horizon is 25 versions: none of the tombstones below is
    // that old yet. The restart shortens it to 5.
    let mut cfg = config(server_db.clone());
    cfg.room_limits = RoomLimits {
        tombstone_versions: 25,
        ..limits
    };
    let server = start(cfg).await;
    let url = server.url();
    let db_a = sqlite(&dir.path().join("a.db")).await;
    let db_b = sqlite(&dir.path().join("b.db")).await;
    let (a, ca) = client(&db_a, client_config(&url, "r", "alice", "a")).await;
    let (b, cb) = client(&db_b, client_config(&url, "r", "bob", "b")).await;
    wait_connected(&ca).await;
    wait_connected(&cb).await;
    for i in 0..30 {
        a.dynamic("todo")
            .put(format!("t{i}"), json!({"n": i}))
            .expect("put");
    }
    guard(a.durable(Durability::Server)).await.expect("durable");
    converge(&[(&a, &ca), (&b, &cb)]).await;
    // Bob stops at version 30.
    cb.close().await;
    guard(b.close()).await.expect("close b");
    drop(b);
    db_b.close().await.expect("close b's database");
    for i in 0..20 {
        a.dynamic("todo").delete(&format!("t{i}"));
    }
    for i in 30..35 {
        a.dynamic("todo")
            .put(format!("t{i}"), json!({"n": i}))
            .expect("put");
    }
    guard(a.durable(Durability::Server)).await.expect("durable");
    assert_eq!(ca.room_version(), 55);
    let room_kind = format!("{ROOM_KIND_PREFIX}r");
    assert_eq!(
        server_db.count(&room_kind).await.expect("count"),
        35,
        "the log holds the 20 tombstones before the room is reloaded"
    );

    // A restart loads the room again: versions up to 55 - 5 = 50 are past the new horizon,
    // so all 20 tombstones (versions 31..=50) go.
    let addr = server.addr;
    server.stop().await;
    let mut cfg = config(server_db.clone());
    cfg.room_limits = limits;
    // Same port: alice's client reconnects by itself.
    let server = start_at(addr, cfg).await;
    let mut raw = Raw::connect(&url).await;
    raw.hello("r", "carol", Some(&token("carol", &["r"]))).await;
    let mut changes = Vec::new();
    raw.recv_until(|m| match m {
        ServerMessage::CatchUp(c) => {
            changes.extend(c.payload.changes.iter().cloned());
            c.payload.complete.then_some(())
        }
        _ => None,
    })
    .await;
    assert_eq!(
        changes.len(),
        15,
        "15 live entities, no tombstones: {changes:?}"
    );
    assert!(changes.iter().all(|c| c.operation == Op::Upsert));
    let records = server_db.get_by_type(&room_kind).await.expect("read log");
    assert_eq!(records.len(), 15, "the tombstones left the log");
    let meta = server_db
        .get_by_id(ROOM_META_KIND, "r")
        .await
        .expect("read meta")
        .expect("the room has an identity record");
    let meta: RoomMeta = serde_json::from_value(meta.data).expect("meta");
    assert_eq!(meta.collected_through, 50);

    // Bob comes back with everything up to 30: older than the horizon. He gets a snapshot
    // and drops t0..t19, which no catch-up could tell him about any more.
    let db_b = sqlite(&dir.path().join("b.db")).await;
    let (b, cb) = client(&db_b, client_config(&url, "r", "bob", "b")).await;
    guard(cb.caught_up()).await;
    let after = converge(&[(&a, &ca), (&b, &cb)]).await;
    assert_eq!(after.len(), 15);
    assert_eq!(snapshot(&b), after);
    assert!(
        !after.keys().any(|(_, id)| id == "t0"),
        "the deleted entities are gone from bob's store too"
    );
    ca.close().await;
    cb.close().await;
    server.stop().await;
}

/// A busy room collects too, without being reloaded: the log writer deletes the collected
/// tombstones right behind the change after which they were collected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_room_collects_while_it_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server_db = sqlite(&dir.path().join("server.db")).await;
    let mut cfg = config(server_db.clone());
    cfg.room_limits = RoomLimits {
        tombstone_versions: 5,
        tombstone_age: 0,
        ..RoomLimits::default()
    };
    let server = start(cfg).await;
    let url = server.url();
    let db_a = sqlite(&dir.path().join("a.db")).await;
    let db_b = sqlite(&dir.path().join("b.db")).await;
    let (a, ca) = client(&db_a, client_config(&url, "r", "alice", "a")).await;
    let (b, cb) = client(&db_b, client_config(&url, "r", "bob", "b")).await;
    wait_connected(&ca).await;
    wait_connected(&cb).await;
    for i in 0..30 {
        a.dynamic("todo")
            .put(format!("t{i}"), json!({"n": i}))
            .expect("put");
    }
    guard(a.durable(Durability::Server)).await.expect("durable");
    converge(&[(&a, &ca), (&b, &cb)]).await;
    cb.close().await;
    guard(b.close()).await.expect("close b");
    drop(b);
    db_b.close().await.expect("close b's database");
    for i in 0..20 {
        a.dynamic("todo").delete(&format!("t{i}"));
        guard(a.durable(Durability::Server)).await.expect("durable");
    }
    for i in 30..40 {
        a.dynamic("todo")
            .put(format!("t{i}"), json!({"n": i}))
            .expect("put");
        guard(a.durable(Durability::Server)).await.expect("durable");
    }
    assert_eq!(ca.room_version(), 60);
    // Every tombstone is at least 10 versions old: all collected, in the log too.
    let room_kind = format!("{ROOM_KIND_PREFIX}r");
    common::wait_for("the log loses the tombstones", || {
        futures_executor_count(&server_db, &room_kind) == 20
    })
    .await;
    let meta = server_db
        .get_by_id(ROOM_META_KIND, "r")
        .await
        .expect("read meta")
        .expect("identity record");
    let meta: RoomMeta = serde_json::from_value(meta.data).expect("meta");
    assert!(meta.collected_through >= 50, "{meta:?}");

    let db_b = sqlite(&dir.path().join("b.db")).await;
    let (b, cb) = client(&db_b, client_config(&url, "r", "bob", "b")).await;
    guard(cb.caught_up()).await;
    let after = converge(&[(&a, &ca), (&b, &cb)]).await;
    assert_eq!(after.len(), 20);
    assert_eq!(snapshot(&b), after);
    // Bob's bookkeeping forgot the deletions the room forgot: one known row per entity he
    // holds, none for t0..t19.
    cb.close().await;
    guard(b.close()).await.expect("close b");
    let known = db_b
        .read_sync()
        .await
        .expect("read bob's sync tables")
        .known;
    assert!(
        known.iter().all(|k| !matches!(k.id.as_str().strip_prefix('t').and_then(|n| n.parse::<u32>().ok()), Some(n) if n < 20)),
        "{known:?}"
    );
    assert_eq!(known.len(), 20);
    ca.close().await;
    server.stop().await;
}

/// Records of `kind` in the log, read on a helper thread (the wait loop is synchronous).
fn futures_executor_count(db: &kalphite_db::Database, kind: &str) -> u64 {
    let db = db.clone();
    let kind = kind.to_owned();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(db.count(&kind))
            .expect("count")
    })
    .join()
    .expect("count thread")
}
