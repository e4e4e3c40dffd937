//! The server's room log on PostgreSQL: acknowledged changes survive a server restart.
//! Runs when `KALPHITE_PG_URL` is set (e.g. `postgres://postgres@127.0.0.1:5432/test`);
//! otherwise it says loudly that it was skipped.

mod common;

use common::*;
use kalphite::Durability;
use kalphite_db::{Database, DatabaseConfig};
use serde_json::json;

async fn pg(url: &str, schema: &str) -> Database {
    Database::open(DatabaseConfig::new(url).postgres_schema(schema))
        .await
        .expect("open postgres")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_backed_server_keeps_acknowledged_changes() {
    let Ok(url) = std::env::var("KALPHITE_PG_URL") else {
        eprintln!(
            "SKIPPED postgres_backed_server_keeps_acknowledged_changes: KALPHITE_PG_URL is not set"
        );
        return;
    };
    let schema = format!("sync_test_{:08x}", rand::random::<u32>());
    let server = start(config(pg(&url, &schema).await)).await;
    let addr = server.addr;
    let ws = server.url();
    let (a, ca) = client(&memory_db().await, client_config(&ws, "r", "alice", "a")).await;
    wait_connected(&ca).await;
    for i in 0..10 {
        a.dynamic("todo")
            .put(format!("t{i}"), json!({"i": i}))
            .expect("put");
    }
    a.dynamic("todo").delete("t3");
    guard(a.durable(Durability::Server)).await.expect("durable");
    ca.close().await;
    server.stop().await;

    let server = start_at(addr, config(pg(&url, &schema).await)).await;
    let (b, cb) = client(&memory_db().await, client_config(&ws, "r", "bob", "b")).await;
    wait_connected(&cb).await;
    wait_for("catch-up from postgres", || snapshot(&b).len() == 9).await;
    assert!(b.get("todo", "t3").is_none());
    cb.close().await;
    server.stop().await;
}
