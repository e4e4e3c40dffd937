//! Regression (issue 10, item 5): two `kalphite serve` on one database both wrote it (both
//! acknowledged version 1 of the same room; after a restart the room could not be
//! loaded). `DatabaseConfig::writer_lock` makes one process the writer: a second opener
//! with it on is refused with `Error::Busy` naming the holder, on SQLite (a lock file
//! beside the database) and PostgreSQL (an advisory lock per schema); readers are not
//! affected, and the lock is free again once the holder closes or drops its handle.

mod common;

use std::time::Duration;

use common::{Backend, Fixture};
use kalphite::Entity;
use kalphite_db::{Database, DatabaseConfig, Error, WriterKind};
use serde_json::json;

both_backends!(a_second_writer_is_refused_until_the_first_lets_go);

fn writer(config: DatabaseConfig) -> DatabaseConfig {
    config
        .writer_lock(true)
        .writer_lock_wait(Duration::from_millis(300))
}

async fn a_second_writer_is_refused_until_the_first_lets_go(f: Fixture) -> anyhow::Result<()> {
    let first = Database::open(writer(f.config())).await?;
    assert!(first.holds_writer_lock());
    first.lock_writer().await?; // already held by this handle: nothing to do

    let err = Database::open(writer(f.config()))
        .await
        .expect_err("a second writer is refused");
    let Error::Busy { holder, .. } = &err else {
        panic!("expected Error::Busy, got {err:?}");
    };
    let holder = holder.clone().unwrap_or_default();
    let message = err.to_string();
    assert!(message.contains("already being written"), "{message}");
    assert_eq!(message.lines().count(), 1, "one line: {message}");
    let pid = std::process::id().to_string();
    assert!(holder.contains(&pid), "names the holder's pid: {holder}");

    // A handle opened without the lock reads, and cannot take the lock either.
    let reader = Database::open(f.config()).await?;
    assert!(!reader.holds_writer_lock());
    assert!(matches!(
        reader.lock_writer().await,
        Err(Error::Busy { .. })
    ));

    // The first writer keeps working.
    let e = Entity::new("t1", "todo", json!({"n": 1})).at(1);
    first.upsert(e.clone()).await?;
    assert_eq!(reader.get_by_id("todo", "t1").await?, Some(e));

    // Closed: the lock is free.
    first.close().await?;
    let second = Database::open(writer(f.config())).await?;
    assert!(second.holds_writer_lock());
    // Dropped without closing: free too (PostgreSQL notices a moment later; opening
    // waits for it).
    drop(second);
    reader.lock_writer().await?;
    assert!(reader.holds_writer_lock());
    reader.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_locks_are_per_schema() -> anyhow::Result<()> {
    let (Some(a), Some(b)) = (
        Fixture::postgres("writer_lock_schema_a").await,
        Fixture::postgres("writer_lock_schema_b").await,
    ) else {
        return Ok(());
    };
    assert_eq!(a.backend, Backend::Postgres);
    let first = Database::open(writer(a.config())).await?;
    let other = Database::open(writer(b.config())).await?;
    assert!(first.holds_writer_lock() && other.holds_writer_lock());
    first.close().await?;
    other.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_private_in_memory_database_is_always_its_own_writer() -> anyhow::Result<()> {
    let db = Database::open(writer(DatabaseConfig::new("sqlite::memory:"))).await?;
    assert!(db.holds_writer_lock());
    let other = Database::open(writer(DatabaseConfig::new("sqlite::memory:"))).await?;
    assert!(other.holds_writer_lock());
    Ok(())
}

/// Ends the PostgreSQL session holding `schema`'s writer lock, as a network failure or an
/// administrator would; returns once the lock is free.
async fn end_lock_session(url: &str, schema: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let ended: i64 = client
        .query_one(
            "WITH k AS (SELECT hashtextextended('kalphite_writer:' || $1, 0) AS key) \
             SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l, k \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
             AND l.classid = ((k.key >> 32) & 4294967295)::oid \
             AND l.objid = (k.key & 4294967295)::oid",
            &[&schema],
        )
        .await
        .expect("terminate")
        .get(0);
    assert_eq!(ended, 1, "one session held the lock");
}

/// Waits until `db` has noticed that its lock session ended (hang guard: 10 s).
async fn wait_until_lost(db: &Database) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while db.holds_writer_lock() {
        assert!(tokio::time::Instant::now() < deadline, "hang guard");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Writes with `db` until `done` says so (hang guard: 10 s).
async fn write_until(db: &Database, mut done: impl FnMut(&Result<Entity, Error>) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for i in 0u64.. {
        let result = db
            .upsert(Entity::new(format!("w{i}"), "todo", json!({})).at(1))
            .await;
        if done(&result) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "hang guard");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_lost_lock_is_taken_again_before_the_next_write_or_writes_stop() {
    // The lock lives on a connection of its own: if PostgreSQL ends that session, the
    // writer must not go on writing as if it still held the lock.
    let Some(f) = Fixture::postgres("writer_lock_lost").await else {
        return;
    };
    let url = std::env::var("KALPHITE_PG_URL").expect("set");
    let schema = "kdb_writer_lock_lost";
    let first = Database::open(writer(f.config())).await.expect("first");

    // Nobody else wants it: the next writes take it again and go on.
    end_lock_session(&url, schema).await;
    wait_until_lost(&first).await;
    write_until(&first, |r| {
        assert!(r.is_ok(), "{r:?}");
        first.holds_writer_lock()
    })
    .await;
    let other = Database::open(writer(f.config())).await;
    assert!(matches!(other, Err(Error::Busy { .. })), "held again");

    // Another writer took it meanwhile: this one's writes are refused until it is free.
    end_lock_session(&url, schema).await;
    let second = Database::open(writer(f.config())).await.expect("second");
    write_until(&first, |r| matches!(r, Err(Error::Busy { .. }))).await;
    assert!(!first.holds_writer_lock());
    assert!(matches!(
        first.upsert(Entity::new("x", "todo", json!({}))).await,
        Err(Error::Busy { .. })
    ));
    second
        .upsert(Entity::new("y", "todo", json!({})).at(1))
        .await
        .expect("the new writer writes");
    second.close().await.expect("close");
    write_until(&first, Result::is_ok).await;
    assert!(first.holds_writer_lock());
    first.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cluster_nodes_share_the_lock_and_exclude_a_single_node() {
    // Issue 12: `kalphite serve --cluster` nodes write one database together, but never
    // beside a single-node server, which would assign room versions on its own.
    let Some(f) = Fixture::postgres("writer_lock_cluster").await else {
        return;
    };
    let node = |f: &Fixture| writer(f.config()).writer_lock(false).cluster_writer(true);
    let n1 = Database::open(node(&f)).await.expect("a cluster node");
    let n2 = Database::open(node(&f))
        .await
        .expect("two cluster nodes coexist");
    assert!(n1.holds_writer_lock() && n2.holds_writer_lock());

    // A single-node writer is refused, told that cluster nodes hold it.
    let err = Database::open(writer(f.config()))
        .await
        .expect_err("a single node beside cluster nodes");
    let Error::Busy {
        by,
        cluster,
        holder,
        ..
    } = &err
    else {
        panic!("expected Error::Busy, got {err:?}");
    };
    assert_eq!((*by, *cluster), (WriterKind::Cluster, false));
    assert!(
        holder
            .as_deref()
            .is_some_and(|h| h.contains("kalphite cluster node")),
        "{holder:?}"
    );
    let message = err.to_string();
    assert!(message.contains("by cluster nodes"), "{message}");
    assert_eq!(message.lines().count(), 1, "one line: {message}");

    // Once they are gone, the single node writes, and a cluster node is refused.
    n1.close().await.expect("close");
    n2.close().await.expect("close");
    let single = Database::open(writer(f.config())).await.expect("single");
    let err = Database::open(node(&f))
        .await
        .expect_err("a cluster node beside a single node");
    let Error::Busy { by, cluster, .. } = &err else {
        panic!("expected Error::Busy, got {err:?}");
    };
    assert_eq!((*by, *cluster), (WriterKind::SingleNode, true));
    let message = err.to_string();
    assert!(message.contains("by a single-node server"), "{message}");
    assert_eq!(message.lines().count(), 1, "one line: {message}");
    single.close().await.expect("close");
    Database::open(node(&f))
        .await
        .expect("a cluster node once the single node is gone")
        .close()
        .await
        .expect("close");
}
