//! End-to-end over loopback: a real server, real clients with SQLite files, real sockets.
//! Convergence on seeded random interleavings, durability across a server restart,
//! conflicts under every strategy, duplicate delivery, room isolation, health and metrics.

mod common;

use std::time::Duration;

use common::*;
use kalphite::Durability;
use kalphite_sync::protocol::ServerMessage;
use kalphite_sync::{ConflictPolicy, Strategy};
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
        let (store, client) =
            client(&db, client_config(&server.url(), "r", &user, &format!("rep{i}"))).await;
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
                .put(&id, json!({"title": format!("s{step}"), "n": rng.random_range(0..100)}))
                .expect("put");
        }
        if rng.random_bool(0.3) {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..4))).await;
        }
    }
    for (store, _, _) in &clients {
        guard(store.durable(Durability::Server)).await.expect("durable");
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
