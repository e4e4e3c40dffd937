//! The client killed with SIGKILL at a bad moment loses nothing. A child process runs a
//! sync client over a real SQLite file against a real server on loopback (the parent's)
//! and is killed; the parent then reopens the file in a new client, syncs, and checks:
//! every change `durable(Local)` confirmed reaches the server, every remote change is
//! present, and both replicas converge. `random_kills_lose_nothing` also reads the server's
//! room log: every change the server acknowledged before the kill is stored, and no
//! (replica, message id) names two stored changes, across all the runs. (The id rule
//! itself is pinned by kalphite-sync's
//! `a_client_whose_state_rolled_back_reuses_no_message_id`.)
//!
//! Regressions pinned here (the sync state was a pseudo-entity written by a second writer
//! every 100 ms, apart from the entity rows):
//! - `remote_changes_survive_a_crash_before_the_flush`: a peer sent 10 changes 50 ms
//!   apart, the client was killed half a second later; the watermark on disk already said
//!   10 while no entity row was flushed, so after restart the client held 0 of 10, for good.
//! - `a_locally_durable_change_is_sent_after_a_crash`: the entity was in the database but
//!   the persisted outbox did not have it yet: it was never sent.
//! - `an_edit_after_a_crash_that_lost_sent_edits_is_not_swallowed`: edits the server had
//!   acknowledged were lost with the crash; the next edit of that entity reused their
//!   clock counters and the room took it for one it had.
//! - `random_kills_lose_nothing`: both, and message-id reuse, under a mixed workload
//!   killed at a random moment, for 40 seeds (`KALPHITE_CRASH_SEEDS=N` sweeps more).
//!   A reused id made the room acknowledge an edit without storing it (the duplicate of an
//!   earlier message), so an acknowledged change could be missing from the log.

#[path = "../../kalphite-server/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use futures_util::StreamExt as _;
use kalphite::{Durability, FlushConfig, Store};
use kalphite_client::{SyncEvent, connect_store};
use kalphite_db::Database;
use kalphite_server::ROOM_KIND_PREFIX;
use kalphite_sync::StoredChange;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const ROOM: &str = "crash";
const ENV_DB: &str = "KALPHITE_CRASH_DB";
const ENV_URL: &str = "KALPHITE_CRASH_URL";
const ENV_MODE: &str = "KALPHITE_CRASH_MODE";
const ENV_SEED: &str = "KALPHITE_CRASH_SEED";

/// Runs of `random_kills_lose_nothing` by default: about 14 s on a 2-core machine (a run
/// lasts 0.1-0.7 s; the remote writes and the kill delay are random per seed).
const SEEDS: u64 = 40;

/// The child: opens the client over the file and runs the workload named by the mode,
/// printing `ready`, `accepted K N`, `durable K N` and `acked N` (every change accepted
/// before N was acknowledged by the server) as it goes, until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper: run as a child process by the tests of this file"]
async fn crash_child() -> anyhow::Result<()> {
    let path = std::env::var(ENV_DB)?;
    let url = std::env::var(ENV_URL)?;
    let mode = std::env::var(ENV_MODE)?;
    let seed: u64 = std::env::var(ENV_SEED)?.parse()?;
    let db = sqlite(std::path::Path::new(&path)).await;
    // The library's default flush timing: a steady stream of remote changes keeps the
    // local flush waiting for `max_wait` (1 s).
    let mut config =
        client_config(&url, ROOM, "child", "child-device").connect_on_start(mode != "local");
    config.local_flush = FlushConfig::default();
    if mode == "sent" {
        // The disk lags: nothing is flushed but what the child flushes itself.
        config.local_flush = FlushConfig::default()
            .debounce(Duration::from_mins(10))
            .max_wait(Duration::from_mins(10));
    }
    let (store, client) = connect_store(Store::builder(), &db, config).await?;
    if mode != "local" {
        wait_connected(&client).await;
    }
    let mut acks = client.events();
    println!("ready");
    let items = store.dynamic("item");
    let mut rng = StdRng::seed_from_u64(seed);
    for n in 1u64.. {
        match mode.as_str() {
            "remote" => {}
            "sent" => {
                // x=1 on disk and on the server; x=2 and x=3 only on the server (their
                // acks are seen as events: a durable(Server) would wait for the flush);
                // then a crash before the disk has them.
                items.put("x", json!({"n": n}))?;
                loop {
                    match acks.next().await {
                        Some(SyncEvent::Ack { .. }) => break,
                        Some(_) => {}
                        None => anyhow::bail!("the client's events ended"),
                    }
                }
                println!("acked {n}");
                if n == 1 {
                    store
                        .flush_now()
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    store
                        .durable(Durability::Local)
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    println!("durable x {n}");
                }
                if n == 3 {
                    let pid = std::process::id().to_string();
                    Command::new("kill").args(["-KILL", &pid]).status()?;
                }
            }
            "local" => {
                let key = format!("l{n}");
                items.put(&key, json!({"n": n}))?;
                println!("accepted {key} {n}");
                store
                    .durable(Durability::Local)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                println!("durable {key} {n}");
                if n == 5 {
                    // SIGKILL right away, from inside: no timer of the client gets to run
                    // between the confirmation and the crash.
                    let pid = std::process::id().to_string();
                    Command::new("kill").args(["-KILL", &pid]).status()?;
                }
            }
            _ => {
                // Values grow across the runs of one test (each run is a new seed), so an
                // older run's value of a key never passes for this run's.
                let n = seed * 1_000_000 + n;
                let key = format!("l{}", rng.random_range(0..8));
                items.put(&key, json!({"n": n}))?;
                println!("accepted {key} {n}");
                if rng.random_bool(0.3) {
                    store
                        .durable(Durability::Local)
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    println!("durable {key} {n}");
                }
                if rng.random_bool(0.1) {
                    store
                        .durable(Durability::Server)
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    println!("acked {n}");
                }
            }
        }
        if mode != "local" {
            tokio::time::sleep(Duration::from_millis(rng.random_range(1..20))).await;
        }
    }
    Ok(())
}

struct Running {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for Running {
    /// A failing test never leaves its child running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_child(path: &std::path::Path, url: &str, mode: &str, seed: u64) -> Running {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--ignored",
            "--exact",
            "crash_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV_DB, path)
        .env(ENV_URL, url)
        .env(ENV_MODE, mode)
        .env(ENV_SEED, seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest prints the test's name on the same line as its first output.
            let line = line.trim_start_matches("test crash_child ... ").to_owned();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Running { child, lines }
}

impl Running {
    /// Waits for a line starting with `prefix` (hang guard: 30 s).
    fn wait_line(&self, prefix: &str, seen: &mut Vec<String>) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(GUARD)
                .unwrap_or_else(|_| panic!("the child never printed '{prefix}'"));
            seen.push(line.clone());
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    /// Waits for the child to end (it kills itself); returns every line it printed. A
    /// child that hangs fails the test with what it printed, instead of stalling the run.
    fn wait_exit(mut self, mut seen: Vec<String>) -> Vec<String> {
        let deadline = std::time::Instant::now() + GUARD;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            seen.extend(self.lines.try_iter());
            if std::time::Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                seen.extend(self.lines.try_iter());
                panic!("the child did not end within {GUARD:?}; it printed {seen:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            !status.success(),
            "the child was to be killed, it ended: {status}"
        );
        seen.extend(self.lines.try_iter());
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(1)) {
            seen.push(line);
        }
        seen
    }

    /// SIGKILL; returns every line the child printed.
    fn kill(mut self, mut seen: Vec<String>) -> Vec<String> {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
        seen.extend(self.lines.try_iter());
        seen
    }
}

/// The last value per key that the child saw as durable locally.
fn durable_values(lines: &[String]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in lines {
        if let Some(rest) = line.strip_prefix("durable ") {
            let (key, n) = rest.split_once(' ').expect("durable K N");
            out.insert(key.to_owned(), n.parse().expect("N"));
        }
    }
    out
}

/// The last value per key the child accepted before its last `acked` line: what the
/// server acknowledged.
fn acked_values(lines: &[String]) -> BTreeMap<String, u64> {
    let Some(last) = lines.iter().rposition(|l| l.starts_with("acked ")) else {
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for line in &lines[..last] {
        if let Some(rest) = line.strip_prefix("accepted ") {
            let (key, n) = rest.split_once(' ').expect("accepted K N");
            out.insert(key.to_owned(), n.parse().expect("N"));
        }
    }
    out
}

/// The server's room log of [`ROOM`], read from its database: one record per entity (its
/// latest change).
async fn room_log(log: &Database) -> Vec<StoredChange> {
    log.get_by_type(&format!("{ROOM_KIND_PREFIX}{ROOM}"))
        .await
        .expect("read the room log")
        .into_iter()
        .map(|e| serde_json::from_value(e.data).expect("a stored change"))
        .collect()
}

/// The `n` of each `item` the room log holds.
fn logged_values(records: &[StoredChange]) -> BTreeMap<String, u64> {
    records
        .iter()
        .filter(|r| r.kind == "item")
        .filter_map(|r| {
            let n = r.state.as_ref()?.data["n"].as_u64()?;
            Some((r.id.to_string(), n))
        })
        .collect()
}

/// Checks that no (replica, message id) names two stored changes: within the log, and
/// against every one `seen` in earlier reads (a message produces one change, at one
/// version, of one entity).
fn assert_message_ids_unique(
    records: &[StoredChange],
    seen: &mut BTreeMap<(String, String), (String, u64)>,
) {
    let mut now = BTreeMap::new();
    for r in records {
        let id = (r.replica_id.clone(), r.message_id.clone());
        let change = (r.id.to_string(), r.version);
        if let Some(other) = now.insert(id.clone(), change.clone()) {
            panic!("message id {id:?} names two stored changes: {other:?} and {change:?}");
        }
        if let Some(before) = seen.insert(id.clone(), change.clone()) {
            assert_eq!(
                before, change,
                "message id {id:?} was reused: it named {before:?} before, now {change:?}"
            );
        }
    }
}

/// Reopens the child's file in a new client, syncs it with `peer`, and checks the
/// guarantees. Returns what both hold.
async fn restart_and_check(
    path: &std::path::Path,
    url: &str,
    peer: (&Store, &kalphite_client::SyncClient),
    lines: &[String],
    remote: &BTreeMap<String, u64>,
) -> BTreeMap<(String, String), Value> {
    let db = sqlite(path).await;
    let (store, client) = connect_store(
        Store::builder(),
        &db,
        client_config(url, ROOM, "child", "child-device"),
    )
    .await
    .expect("the crashed client's database opens");
    wait_connected(&client).await;
    guard(store.durable(Durability::Server))
        .await
        .expect("queued changes reach the server");
    let state = converge(&[(&store, &client), peer]).await;
    let value = |key: &str| {
        state
            .get(&("item".to_owned(), key.to_owned()))
            .and_then(|v| v["n"].as_u64())
    };
    for (key, n) in durable_values(lines) {
        let got = value(&key);
        assert!(
            got.is_some_and(|v| v >= n),
            "{key}={n} was durable locally before the crash; the room has {got:?}"
        );
    }
    for (key, n) in remote {
        assert_eq!(value(key), Some(*n), "remote change {key}={n} missing");
    }
    client.close().await;
    store.close().await.expect("close");
    db.close().await.expect("close db");
    state
}

/// The peer: another client of the room, over its own file.
async fn peer(url: &str, dir: &std::path::Path) -> (Store, kalphite_client::SyncClient) {
    let db = sqlite(&dir.join("peer.db")).await;
    let (store, client) = connect_store(
        Store::builder(),
        &db,
        client_config(url, ROOM, "peer", "peer-device"),
    )
    .await
    .expect("peer");
    wait_connected(&client).await;
    (store, client)
}

async fn remote_writes(
    store: &Store,
    from: u64,
    count: u64,
    every: Duration,
) -> BTreeMap<String, u64> {
    let items = store.dynamic("item");
    let mut out = BTreeMap::new();
    for n in from..from + count {
        let key = format!("r{n}");
        items.put(&key, json!({"n": n})).expect("peer write");
        out.insert(key, n);
        tokio::time::sleep(every).await;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_changes_survive_a_crash_before_the_flush() {
    let dir = tempfile::tempdir().expect("dir");
    let server = start(config(memory_db().await)).await;
    let (peer_store, peer_client) = peer(&server.url(), dir.path()).await;
    let path = dir.path().join("child.db");
    let child = spawn_child(&path, &server.url(), "remote", 0);
    let mut seen = Vec::new();
    child.wait_line("ready", &mut seen);
    let remote = remote_writes(&peer_store, 1, 10, Duration::from_millis(50)).await;
    guard(peer_store.durable(Durability::Server))
        .await
        .expect("peer synced");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let lines = child.kill(seen);
    let state = restart_and_check(
        &path,
        &server.url(),
        (&peer_store, &peer_client),
        &lines,
        &remote,
    )
    .await;
    assert_eq!(state.len(), 10);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locally_durable_change_is_sent_after_a_crash() {
    let dir = tempfile::tempdir().expect("dir");
    let server = start(config(memory_db().await)).await;
    let (peer_store, peer_client) = peer(&server.url(), dir.path()).await;
    let path = dir.path().join("child.db");
    let child = spawn_child(&path, &server.url(), "local", 0);
    // The child writes five entities, each confirmed by `durable(Local)`, then SIGKILLs
    // itself.
    let lines = child.wait_exit(Vec::new());
    let durable = durable_values(&lines);
    assert_eq!(durable.len(), 5, "{lines:?}");
    let state = restart_and_check(
        &path,
        &server.url(),
        (&peer_store, &peer_client),
        &lines,
        &BTreeMap::new(),
    )
    .await;
    assert!(state.len() >= durable.len());
    server.stop().await;
}

/// Regression: a change reaches the server before the flush that holds it commits. The
/// child's edits x=2 and x=3 were acknowledged by the server, then it was killed before its
/// disk held them; restarted from x=1, it edited x offline (x=4) before any catch-up. That
/// edit's clock reused the counters of x=2 and x=3, so the room took it for one it had:
/// acknowledged, never applied, and the client put x=3 back over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_after_a_crash_that_lost_sent_edits_is_not_swallowed() {
    let dir = tempfile::tempdir().expect("dir");
    let server = start(config(memory_db().await)).await;
    let (peer_store, peer_client) = peer(&server.url(), dir.path()).await;
    let path = dir.path().join("child.db");
    let lines = spawn_child(&path, &server.url(), "sent", 0).wait_exit(Vec::new());
    assert!(lines.iter().any(|l| l == "acked 3"), "{lines:?}");

    let db = sqlite(&path).await;
    let (store, client) = connect_store(
        Store::builder(),
        &db,
        client_config(&server.url(), ROOM, "child", "child-device").connect_on_start(false),
    )
    .await
    .expect("the crashed client's database opens");
    let items = store.dynamic("item");
    assert_eq!(
        items.find_by_id("x").map(|e| e.data.clone()),
        Some(json!({"n": 1})),
        "the disk held x=1 only"
    );
    items.put("x", json!({"n": 4})).expect("put");
    client.connect();
    wait_connected(&client).await;
    guard(store.durable(Durability::Server))
        .await
        .expect("the offline edit reaches the server");
    let state = converge(&[(&store, &client), (&peer_store, &peer_client)]).await;
    assert_eq!(
        state.get(&("item".to_owned(), "x".to_owned())),
        Some(&json!({"n": 4})),
        "the edit made after the restart is the one that stays"
    );
    client.close().await;
    store.close().await.expect("close");
    db.close().await.expect("close db");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_lose_nothing() {
    let seeds: u64 = std::env::var("KALPHITE_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEEDS);
    let dir = tempfile::tempdir().expect("dir");
    // The room log in a SQLite file, read between the runs through the server's handle.
    let log = sqlite(&dir.path().join("server.db")).await;
    let server = start(config(log.clone())).await;
    let (peer_store, peer_client) = peer(&server.url(), dir.path()).await;
    let path = dir.path().join("child.db");
    let mut remote = BTreeMap::new();
    let mut next_remote = 1;
    let mut message_ids = BTreeMap::new();
    for seed in 0..seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let child = spawn_child(&path, &server.url(), "mixed", seed);
        let mut seen = Vec::new();
        child.wait_line("ready", &mut seen);
        let count = rng.random_range(1..8);
        remote.extend(
            remote_writes(
                &peer_store,
                next_remote,
                count,
                Duration::from_millis(rng.random_range(5..60)),
            )
            .await,
        );
        next_remote += count;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        let lines = child.kill(seen);
        let acked = acked_values(&lines);
        eprintln!(
            "seed {seed}: killed after {} lines, {} durable keys, {} acknowledged",
            lines.len(),
            durable_values(&lines).len(),
            acked.len()
        );
        // Before the restart, whose resends could fill a gap: what the server acknowledged
        // is in its log already.
        let records = room_log(&log).await;
        assert_message_ids_unique(&records, &mut message_ids);
        let logged = logged_values(&records);
        for (key, n) in &acked {
            let got = logged.get(key);
            assert!(
                got.is_some_and(|v| v >= n),
                "seed {seed}: the server acknowledged {key}={n}; its log has {got:?}"
            );
        }
        restart_and_check(
            &path,
            &server.url(),
            (&peer_store, &peer_client),
            &lines,
            &remote,
        )
        .await;
        assert_message_ids_unique(&room_log(&log).await, &mut message_ids);
    }
    server.stop().await;
}

/// The invariant behind `a_locally_durable_change_is_sent_after_a_crash`, checked at the
/// moment it must hold: once `durable(Local)` resolved, the database holds the entity row
/// and its outbox entry (they are written in one transaction), whatever timers do next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_local_means_the_outbox_entry_is_on_disk_too() {
    let dir = tempfile::tempdir().expect("dir");
    let db = sqlite(&dir.path().join("c.db")).await;
    let config =
        client_config("ws://127.0.0.1:9", ROOM, "child", "child-device").connect_on_start(false);
    let (store, client) = connect_store(Store::builder(), &db, config)
        .await
        .expect("open");
    store
        .dynamic("item")
        .put("l1", json!({"n": 1}))
        .expect("put");
    guard(store.durable(Durability::Local))
        .await
        .expect("durable");
    let tables = db.read_sync().await.expect("read");
    let queued: Vec<_> = tables.outbox.iter().map(|r| r.id.to_string()).collect();
    assert_eq!(queued, ["l1"]);
    assert!(db.get_by_id("item", "l1").await.expect("read").is_some());
    client.close().await;
}
