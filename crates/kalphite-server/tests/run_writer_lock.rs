//! Issue 10, item 5, for library users: a server started through `kalphite_server::run`
//! on a database opened *without* `DatabaseConfig::writer_lock` was not protected — only
//! `kalphite serve` asked for the lock, so two embedding programs on one SQLite file both
//! served and both acknowledged the same room versions. `run` now takes the lock itself:
//! a second server is refused at start with `ServerError::DatabaseBusy` (naming the
//! holder), and the first keeps serving.

mod common;

use std::time::Duration;

use common::*;
use kalphite_db::{Database, DatabaseConfig};
use kalphite_server::{ServerError, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_a_second_server_on_one_unlocked_database() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite:{}", dir.path().join("rooms.db").display());
    // No writer_lock(true): what a library user writes.
    let unlocked = || DatabaseConfig::new(&url).writer_lock_wait(Duration::from_millis(300));
    let first_db = Database::open(unlocked()).await.expect("first database");
    let first = start(config(first_db.clone())).await;
    wait_for("the first server takes the writer lock", || {
        first_db.holds_writer_lock()
    })
    .await;

    let second_db = Database::open(unlocked()).await.expect("second database");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let err = guard(run(listener, config(second_db), async {}))
        .await
        .expect_err("a second server on the same database is refused");
    assert!(matches!(err, ServerError::DatabaseBusy(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("already being written"), "{message}");
    assert!(
        message.contains(&std::process::id().to_string()),
        "names the holder: {message}"
    );

    // The first keeps serving.
    let (status, body) = http_get(first.addr, "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    first.stop().await;
}
