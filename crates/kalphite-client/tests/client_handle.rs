//! The one owned [`Client`]: opened by one builder, shut by one `close`, safe to drop, one
//! process per database file, the database bound to its room, durability that names what
//! the server will never get, and local entities refused when they could never be sent.

#[path = "../../kalphite-server/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use kalphite::{Durability, EntityKind, Error as StoreError};
use kalphite_client::{Client, ClientError, ConnectionStatus, DurableError, SyncConfig, SyncError};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Todo {
    title: String,
}
impl EntityKind for Todo {
    const KIND: &'static str = "todo";
}

fn sync(url: &str, room: &str, user: &str) -> SyncConfig {
    client_config(url, room, user, &format!("{user}-device"))
}

fn offline(room: &str) -> SyncConfig {
    SyncConfig::new("ws://127.0.0.1:9", room)
        .user("me")
        .connect_on_start(false)
        .flush_debounce(Duration::from_millis(5))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_only_client_is_a_persisted_store() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite:{}", dir.path().join("a.db").display());
    let client = Client::builder(&url)
        .kind::<Todo>()
        .open()
        .await
        .expect("open");
    assert_eq!(client.status(), ConnectionStatus::LocalOnly);
    let todos = client.store().collection::<Todo>().expect("todos");
    todos
        .put(
            "t1",
            Todo {
                title: "milk".into(),
            },
        )
        .expect("put");
    guard(client.durable(Durability::Local))
        .await
        .expect("local");
    assert!(matches!(
        client.durable(Durability::Server).await,
        Err(DurableError::LocalOnly)
    ));
    let report = client.close().await.expect("close");
    assert_eq!(report.unsynced, 0);

    let again = Client::builder(&url)
        .kind::<Todo>()
        .open()
        .await
        .expect("reopen");
    let todos = again.store().collection::<Todo>().expect("todos");
    assert_eq!(
        todos.find_by_id("t1").map(|t| t.data.title.clone()),
        Some("milk".into())
    );
    again.close().await.expect("close");
}

/// Regression: shutting down was a trap — `client.close()`, then `store.close()` (which
/// failed while offline, its changes being safely queued), then `db.close()`, in that
/// order. One `close` now writes everything and reports what is still unsynced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_offline_is_not_an_error_and_keeps_the_queue() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite:{}", dir.path().join("a.db").display());
    let client = Client::builder(&url)
        .sync(offline("r1"))
        .open()
        .await
        .expect("open");
    client
        .store()
        .dynamic("todo")
        .put("t1", json!({"title": "a"}))
        .expect("put");
    client
        .store()
        .dynamic("todo")
        .put("t2", json!({"title": "b"}))
        .expect("put");
    let report = client.close().await.expect("close offline");
    assert_eq!(report.unsynced, 2);

    // The next session sends them.
    let server = start(config(memory_db().await)).await;
    let client = Client::builder(&url)
        .sync(sync(&server.url(), "r1", "me").replica_id("me-device"))
        .open()
        .await
        .expect("reopen");
    assert_eq!(client.unsynced(), 2);
    guard(client.durable(Durability::Server))
        .await
        .expect("pushed");
    assert_eq!(client.close().await.expect("close").unsynced, 0);
    server.stop().await;
}

/// Regression: dropping the handles without closing leaked a client that kept
/// reconnecting (a store → sink → client → store cycle). Dropped, the client lets go of
/// its connection, and what it accepted reaches the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_disconnects_and_writes_what_it_accepted() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite:{}", dir.path().join("a.db").display());
    let server = start(config(memory_db().await)).await;
    let client = Client::builder(&url)
        .sync(sync(&server.url(), "r1", "me"))
        .open()
        .await
        .expect("open");
    wait_connected(client.sync().expect("sync")).await;
    client
        .store()
        .dynamic("todo")
        .put("t1", json!({"title": "a"}))
        .expect("put");
    drop(client);

    let connections = || async {
        let (_, metrics) = http_get(server.addr, "/metrics").await;
        metrics
            .lines()
            .find(|l| l.starts_with("kalphite_sync_connections "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
    };
    let deadline = tokio::time::Instant::now() + GUARD;
    while connections().await != Some(0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dropped client stayed connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It does not come back (no leaked reconnect loop).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(connections().await, Some(0));

    // The drain holds the file until it is done; then everything is there.
    let again = guard(
        Client::builder(&url)
            .sync(sync(&server.url(), "r1", "me"))
            .lock_timeout(GUARD)
            .open(),
    )
    .await
    .expect("reopen");
    assert!(again.store().get("todo", "t1").is_some());
    again.close().await.expect("close");
    server.stop().await;
}

/// Regression: two processes on one client database (two `kalphite todo` runs at once):
/// the sync state was one record and the last writer won, so changes fell out of the
/// offline queue and message ids collided, while every command exited 0. A second opener
/// now waits briefly, then is refused with the holder's pid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_opener_waits_then_is_refused_with_the_holder() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("a.db");
    let url = format!("sqlite:{}", path.display());
    let first = Client::builder(&url)
        .sync(offline("r1"))
        .open()
        .await
        .expect("open");
    let started = tokio::time::Instant::now();
    let err = Client::builder(&url)
        .sync(offline("r1"))
        .lock_timeout(Duration::from_millis(300))
        .open()
        .await
        .expect_err("the file is in use");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "it waited first"
    );
    match &err {
        ClientError::Busy { path: p, pid } => {
            assert_eq!(p, &path);
            assert_eq!(*pid, Some(std::process::id()));
        }
        other => panic!("expected Busy, got {other}"),
    }
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );

    // Released on close: the next opener gets it, even one that was already waiting.
    let waiting = tokio::spawn(
        Client::builder(&url)
            .sync(offline("r1"))
            .lock_timeout(GUARD)
            .open(),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    first.close().await.expect("close");
    let second = guard(waiting)
        .await
        .expect("join")
        .expect("opened after release");
    second.close().await.expect("close");
}

/// Regression: offline work was stranded silently when the room differed — changes queued
/// for room `todo` were never sent by a later sync with room `r1`, which said "pushed 0".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_is_bound_to_its_room() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite:{}", dir.path().join("a.db").display());
    let client = Client::builder(&url)
        .sync(offline("todo"))
        .open()
        .await
        .expect("open");
    client
        .store()
        .dynamic("todo")
        .put("t1", json!({"title": "x"}))
        .expect("put");
    client.close().await.expect("close");

    let err = Client::builder(&url)
        .sync(offline("r1"))
        .open()
        .await
        .expect_err("another room");
    match &err {
        ClientError::Sync(SyncError::RoomMismatch {
            bound,
            requested,
            pending,
        }) => {
            assert_eq!(
                (bound.as_str(), requested.as_str(), *pending),
                ("todo", "r1", 1)
            );
        }
        other => panic!("expected RoomMismatch, got {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("'todo'") && message.contains("'r1'"),
        "{message}"
    );
    // The bound room still opens, with its queue.
    let client = Client::builder(&url)
        .sync(offline("todo"))
        .open()
        .await
        .expect("open");
    assert_eq!(client.unsynced(), 1);
    client.close().await.expect("close");
}

/// Regression: `durable(Server)` said yes for changes the server never got — refused
/// because the offline queue was full, or rejected by the server for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_server_names_the_changes_the_server_will_not_get() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite:{}", dir.path().join("a.db").display());
    let server = start(config(memory_db().await)).await;
    let mut config = sync(&server.url(), "r1", "me").connect_on_start(false);
    config.outbox_limit = 1;
    let client = Client::builder(&url)
        .sync(config)
        .open()
        .await
        .expect("open");
    let todos = client.store().dynamic("todo");
    todos.put("a", json!({"title": "queued"})).expect("put");
    todos
        .put("b", json!({"title": "refused: the queue is full"}))
        .expect("put");
    client.sync().expect("sync").connect();
    let err = guard(client.durable(Durability::Server))
        .await
        .expect_err("b never reaches the server");
    match &err {
        DurableError::Undelivered(list) => {
            let ids: Vec<_> = list.iter().map(|u| u.key.id.to_string()).collect();
            assert_eq!(ids, ["b"]);
        }
        other => panic!("expected Undelivered, got {other}"),
    }
    assert!(err.to_string().contains("todo/b"), "{err}");
    // Writing b again, now that the queue has room, delivers it.
    todos.put("b", json!({"title": "again"})).expect("put");
    guard(client.durable(Durability::Server))
        .await
        .expect("delivered");
    client.close().await.expect("close");
    server.stop().await;
}

/// Regression: a local entity larger than the server's frame limit was queued and resent
/// forever (and, above the hard limit, cut the connection on each resend, so everything
/// queued behind it never left). The client now refuses it at write time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entity_too_large_to_ever_sync_is_refused_at_write_time() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite:{}", dir.path().join("a.db").display());
    let mut config = offline("r1");
    config.max_frame_bytes = 64 * 1024;
    let client = Client::builder(&url)
        .sync(config)
        .open()
        .await
        .expect("open");
    let todos = client.store().dynamic("todo");
    let err = todos
        .put("big", json!({"title": "x".repeat(64 * 1024)}))
        .expect_err("too large");
    assert!(matches!(err, StoreError::EntityTooLarge { .. }), "{err}");
    todos.put("small", json!({"title": "fits"})).expect("fits");
    assert_eq!(
        client.unsynced(),
        1,
        "the refused entity never entered the queue"
    );
    client.close().await.expect("close");
}

/// Regression: a copied client database made two installations speak as one replica —
/// the same replica id, the same clock counters — so the room took the second one's edit
/// of an entity for one it already had and swallowed it. A copy now gets a replica id of
/// its own (the database's identity is part of the sync state) and its queued changes are
/// restamped; both copies sync and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_database_syncs_as_its_own_replica() {
    let dir = tempfile::tempdir().expect("dir");
    let a_path = dir.path().join("a.db");
    let b_path = dir.path().join("b.db");
    let copy = {
        let (a, b) = (a_path.clone(), b_path.clone());
        move || {
            std::fs::copy(&a, &b).expect("copy");
        }
    };
    let sqlite = |path: &std::path::Path| (format!("sqlite:{}", path.display()), None);
    copies_sync_as_two_replicas(sqlite(&a_path), sqlite(&b_path), copy).await;
}

/// The same with a client database on PostgreSQL, copied with `pg_dump` into another
/// database: its identity (cluster, database, schema) is another, so it is a replica of its
/// own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_postgresql_database_syncs_as_its_own_replica() {
    const SCHEMA: &str = "kcl_copy_original";
    const COPY_DB: &str = "kcl_copied_client";
    let Ok(pg) = std::env::var("KALPHITE_PG_URL") else {
        // Straight to stderr: the test harness captures `eprintln!`, hiding the skip.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"*** SKIPPED PostgreSQL test 'a_copied_postgresql_database_syncs_as_its_own_replica': \
              set KALPHITE_PG_URL (e.g. postgres://postgres@127.0.0.1:5432/test) to run it ***\n",
        );
        return;
    };
    let (server_part, _) = pg.rsplit_once('/').expect("a database in KALPHITE_PG_URL");
    let copy_url = format!("{server_part}/{COPY_DB}");
    let psql = |url: &str, sql: &str| {
        let out = std::process::Command::new("psql")
            .args(["-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    psql(&pg, &format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"));
    psql(&pg, &format!("DROP DATABASE IF EXISTS {COPY_DB}"));
    psql(&pg, &format!("CREATE DATABASE {COPY_DB}"));
    let copy = {
        let (pg, copy_url) = (pg.clone(), copy_url.clone());
        move || {
            let dump = std::process::Command::new("pg_dump")
                .args(["--no-owner", "-n", SCHEMA, "-d", &pg])
                .output()
                .expect("pg_dump");
            assert!(
                dump.status.success(),
                "{}",
                String::from_utf8_lossy(&dump.stderr)
            );
            let mut load = std::process::Command::new("psql")
                .args(["-q", "-v", "ON_ERROR_STOP=1", "-d", &copy_url])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("psql");
            std::io::Write::write_all(load.stdin.as_mut().expect("stdin"), &dump.stdout)
                .expect("load the copy");
            drop(load.stdin.take());
            assert!(load.wait().expect("psql").success(), "loading the copy");
        }
    };
    copies_sync_as_two_replicas((pg.clone(), Some(SCHEMA)), (copy_url, Some(SCHEMA)), copy).await;
    psql(
        &pg,
        &format!("DROP DATABASE IF EXISTS {COPY_DB} WITH (FORCE)"),
    );
}

/// A client database at `a` syncs, goes offline with a change queued, and is closed and
/// copied to `b` by `copy`; then both are used at once: the copy has another replica id,
/// both sync, and no edit is lost. Each database is a URL and, for PostgreSQL, a schema.
async fn copies_sync_as_two_replicas(
    a: (String, Option<&'static str>),
    b: (String, Option<&'static str>),
    copy: impl FnOnce(),
) {
    let server = start(config(memory_db().await)).await;
    let open = |(url, schema): (String, Option<&'static str>), online: bool| {
        let server_url = server.url();
        async move {
            let config = client_config(&server_url, "r1", "me", "unused").connect_on_start(online);
            let mut config = config;
            config.replica_id = None;
            let mut builder = Client::builder(url).sync(config);
            if let Some(schema) = schema {
                builder = builder.database(|c| c.postgres_schema(schema));
            }
            builder.open().await.expect("open")
        }
    };
    let a0 = open(a.clone(), true).await;
    let todos = a0.store().dynamic("todo");
    todos.put("z", json!({"v": "original"})).expect("put");
    guard(a0.durable(Durability::Server)).await.expect("synced");
    // Offline, then copied with a change still queued.
    a0.sync().expect("sync").disconnect().await;
    todos
        .put("x", json!({"v": "queued before the copy"}))
        .expect("put");
    let a_id = a0.sync().expect("sync").replica_id();
    a0.close().await.expect("close");
    copy();

    let a = open(a, true).await;
    let b = open(b, true).await;
    assert_eq!(a.sync().expect("sync").replica_id(), a_id);
    assert_ne!(
        b.sync().expect("sync").replica_id(),
        a_id,
        "the copy is another replica"
    );
    // Both edit the same entity, b later.
    a.store()
        .dynamic("todo")
        .put("z", json!({"v": "from a"}))
        .expect("put");
    guard(a.durable(Durability::Server))
        .await
        .expect("a synced");
    tokio::time::sleep(Duration::from_millis(5)).await;
    b.store()
        .dynamic("todo")
        .put("z", json!({"v": "from b"}))
        .expect("put");
    guard(b.durable(Durability::Server))
        .await
        .expect("b synced");

    let peer_db = memory_db().await;
    let (peer, peer_client) = client(
        &peer_db,
        client_config(&server.url(), "r1", "peer", "peer-1"),
    )
    .await;
    wait_connected(&peer_client).await;
    let a_sync = a.sync().expect("sync");
    let b_sync = b.sync().expect("sync");
    let state = converge(&[
        (a.store(), a_sync),
        (b.store(), b_sync),
        (&peer, &peer_client),
    ])
    .await;
    let v = |id: &str| {
        state
            .get(&("todo".to_owned(), id.to_owned()))
            .map(|d| d["v"].clone())
    };
    assert_eq!(v("x"), Some(json!("queued before the copy")));
    assert_eq!(
        v("z"),
        Some(json!("from b")),
        "the later edit wins; none is swallowed"
    );
    a.close().await.expect("close");
    b.close().await.expect("close");
    server.stop().await;
}

/// A client database restored from a backup (`kalphite restore`) starts over as a new
/// replica — its message ids can never repeat the old ones' — catches up in full, and
/// sends the room what the backup holds that the room never had: a change that was only
/// queued when the backup was made is not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_client_backup_keeps_syncing_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let server = start(config(memory_db().await)).await;
    let a_url = format!("sqlite:{}", dir.path().join("a.db").display());
    let config = || {
        let mut c = client_config(&server.url(), "r1", "me", "unused");
        c.replica_id = None;
        c
    };
    let a = Client::builder(&a_url)
        .sync(config())
        .open()
        .await
        .expect("open");
    let todos = a.store().dynamic("todo");
    todos.put("t1", json!({"v": 1})).expect("put");
    todos.put("t4", json!({"v": 4})).expect("put");
    guard(a.durable(Durability::Server)).await.expect("synced");
    a.sync().expect("sync").disconnect().await;
    // Queued, never sent: a new entity, an edit and a delete of entities the room has.
    // Without the queue in the backup the first catch-up put the room's t1 and t4 back.
    todos.put("t2", json!({"v": "only queued"})).expect("put");
    todos
        .put("t1", json!({"v": "edited offline"}))
        .expect("put");
    assert!(todos.delete("t4"));
    let old_id = a.sync().expect("sync").replica_id();
    a.close().await.expect("close");

    let backup = {
        let db = sqlite(&dir.path().join("a.db")).await;
        let bytes = db.backup().await.expect("backup");
        db.close().await.expect("close");
        bytes
    };
    let c_path = dir.path().join("c.db");
    {
        let db = sqlite(&c_path).await;
        assert_eq!(db.restore(&backup).await.expect("restore"), 2);
        db.close().await.expect("close");
    }
    let c = Client::builder(format!("sqlite:{}", c_path.display()))
        .sync(config())
        .open()
        .await
        .expect("open the restored database");
    assert_ne!(c.sync().expect("sync").replica_id(), old_id);
    guard(c.sync().expect("sync").caught_up()).await;
    c.store()
        .dynamic("todo")
        .put("t3", json!({"v": "after the restore"}))
        .expect("put");
    guard(c.durable(Durability::Server)).await.expect("synced");

    let peer_db = memory_db().await;
    let (peer, peer_client) = client(
        &peer_db,
        client_config(&server.url(), "r1", "peer", "peer-1"),
    )
    .await;
    wait_connected(&peer_client).await;
    let state = converge(&[(c.store(), c.sync().expect("sync")), (&peer, &peer_client)]).await;
    let v = |id: &str| {
        state
            .get(&("todo".to_owned(), id.to_owned()))
            .map(|d| d["v"].clone())
    };
    assert_eq!(
        v("t1"),
        Some(json!("edited offline")),
        "the queued edit is not lost"
    );
    assert_eq!(
        v("t2"),
        Some(json!("only queued")),
        "the queued change is not lost"
    );
    assert_eq!(v("t4"), None, "the queued delete is not lost");
    assert_eq!(v("t3"), Some(json!("after the restore")));
    c.close().await.expect("close");
    server.stop().await;
}

/// Regression: one unwritable change blocked all later persistence — the database had a
/// schema stricter than the store's, so the flush engine retried a batch it could never
/// write, and every later change waited behind it. A client has one schema, checked by
/// the store at write time: the bad write is refused there, and the rest is persisted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_schema_refuses_at_write_time_and_never_wedges_the_flush() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite:{}", dir.path().join("a.db").display());
    let schema: kalphite::SharedSchema =
        std::sync::Arc::new(kalphite::TypedSchema::new().kind::<Todo>());
    let client = Client::builder(&url)
        .schema(schema.clone())
        .sync(offline("r1"))
        .open()
        .await
        .expect("open");
    let todos = client.store().dynamic("todo");
    let err = todos
        .put("bad", json!({"title": 42}))
        .expect_err("not a Todo");
    assert!(matches!(err, StoreError::Validation { .. }), "{err}");
    todos.put("good", json!({"title": "fine"})).expect("valid");
    guard(client.durable(Durability::Local))
        .await
        .expect("persisted, not wedged");
    assert_eq!(client.unsynced(), 1);
    client.close().await.expect("close");
    let db = sqlite(&dir.path().join("a.db")).await;
    assert!(db.get_by_id("todo", "good").await.expect("read").is_some());
    assert!(db.get_by_id("todo", "bad").await.expect("read").is_none());
}

/// Regression: about 1 in 100 online CLI commands on a busy server took 5 s. The command
/// waited for the client's "caught up" event, which could come before it started waiting:
/// it then waited for one that never came, until its timeout. `caught_up()` reads the
/// connection's state, so asking after the catch-up ended resolves at once, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caught_up_asked_after_the_catch_up_resolves_at_once() {
    let server = start(config(memory_db().await)).await;
    let db = memory_db().await;
    let (store, sync) = client(&db, client_config(&server.url(), "r1", "me", "me-1")).await;
    wait_connected(&sync).await;
    guard(sync.caught_up()).await;
    assert!(sync.is_caught_up());
    // Nothing is on its way any more: the catch-up's event went by before these calls. A
    // wait for the next event would never end (the guard would fail the test).
    for _ in 0..3 {
        guard(sync.caught_up()).await;
    }
    sync.close().await;
    store.close().await.expect("close");
    server.stop().await;
}
