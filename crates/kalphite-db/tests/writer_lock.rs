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
use kalphite_db::{Database, DatabaseConfig, Error};
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
