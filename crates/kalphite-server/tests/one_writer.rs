//! Regression (issue 10, item 5): two servers on one database corrupted it. Both started
//! on the same SQLite file (or PostgreSQL schema), both acknowledged version 1 of the same
//! room, and after a restart the room could not be loaded. A server's room log is opened
//! with the database's writer lock (`DatabaseConfig::writer_lock`, as `kalphite serve`
//! does): the second server is refused at start with a message naming the holder, and the
//! first keeps working.
//!
//! The PostgreSQL half runs when `KALPHITE_PG_URL` is set (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`); otherwise it says loudly that it was skipped.

mod common;

use std::io::Write as _;
use std::time::Duration;

use common::*;
use kalphite_db::{Database, DatabaseConfig, Error};
use kalphite_sync::ServerMessage;
use serde_json::json;

/// One server's change to room "r", acknowledged: its room version.
async fn acked_version(url: &str, user: &str, id: &str) -> u64 {
    let mut raw = Raw::connect(url).await;
    raw.join("r", user).await;
    raw.send_json(change_frame(
        &format!("raw-{user}-1-1"),
        user,
        id,
        json!({"by": user}),
        1,
    ))
    .await;
    raw.recv_until(|m| match m {
        ServerMessage::Ack(a) => Some(a.payload.version),
        _ => None,
    })
    .await
}

async fn second_server_is_refused(config: impl Fn() -> DatabaseConfig) {
    let locked = || {
        config()
            .writer_lock(true)
            .writer_lock_wait(Duration::from_millis(300))
    };
    let first = start(common::config(
        Database::open(locked()).await.expect("first server's log"),
    ))
    .await;
    let url = first.url();
    assert_eq!(acked_version(&url, "alice", "a").await, 1);

    let err = Database::open(locked())
        .await
        .expect_err("a second server on the same database is refused");
    assert!(matches!(err, Error::Busy { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("already being written"), "{message}");
    assert!(
        message.contains(&std::process::id().to_string()),
        "names the holder: {message}"
    );

    // The first keeps working, and its log loads after a restart.
    assert_eq!(acked_version(&url, "bob", "b").await, 2);
    let addr = first.addr;
    first.stop().await;
    let again = start_at(
        addr,
        common::config(Database::open(locked()).await.expect("reopen")),
    )
    .await;
    assert_eq!(acked_version(&url, "carol", "c").await, 3);
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_sqlite_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite:{}", dir.path().join("rooms.db").display());
    second_server_is_refused(|| DatabaseConfig::new(&url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_postgres_schema() {
    let Ok(url) = std::env::var("KALPHITE_PG_URL") else {
        // Straight to stderr: the test harness captures `eprintln!`, hiding the skip.
        let _ = writeln!(
            std::io::stderr(),
            "*** SKIPPED two_servers_on_one_postgres_schema: set KALPHITE_PG_URL \
             (e.g. postgres://postgres@127.0.0.1:5432/test) to run it ***"
        );
        return;
    };
    let schema = format!("one_writer_{:08x}", rand::random::<u32>());
    second_server_is_refused(|| DatabaseConfig::new(&url).postgres_schema(&schema)).await;
}
