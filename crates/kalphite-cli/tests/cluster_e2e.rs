//! `kalphite serve --cluster` end to end (issue 12): three nodes on one PostgreSQL, clients
//! spread over them in one room writing at random, and the failures a cluster must survive
//! — the owner killed, paused past its lease, cut off PostgreSQL, every node restarted in
//! turn — each checked by the history checker (`common/history.rs`): one content per
//! version, gapless and monotonic per connection, nothing acknowledged lost, convergence.
//! Times are printed, never asserted. The cluster tests need `KALPHITE_PG_URL` (skipped
//! loudly without it); one single-node test (SQLite, `kill -9` and restart) always runs.
//! The scenarios run one at a time, so their nodes do not compete for the CPU.

mod common;

use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use common::client::{Client, ClientConfig, probe_welcome, read_final, wait_until};
use common::history::{ClientLog, FinalLog, Violation, assert_history, check};
use common::nodes::{Node, free_port, http_get, metric};
use common::pg;
use common::proxy::Proxy;

/// The lease the cluster tests run with.
const LEASE_TTL: &str = "2s";
/// The room every scenario writes.
const ROOM: &str = "e2e";
/// Clients per scenario.
const CLIENTS: usize = 6;
/// How long a wait may take before the test fails (a hang guard, not a measurement).
const PATIENCE: Duration = Duration::from_mins(1);
/// How long a probe waits for a welcome.
const PROBE: Duration = Duration::from_secs(15);

/// Runs one scenario at a time, each on a runtime of its own.
fn scenario(f: impl Future<Output = ()>) {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f);
}

/// Nodes of one test, on one schema, each optionally behind its own proxy to PostgreSQL.
struct Cluster {
    pg: String,
    schema: String,
    proxies: Vec<Proxy>,
    nodes: Vec<Node>,
    // Dropped last: the nodes' logs live there.
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// `n` cluster nodes `n1 … nN`, `--open`, on a fresh schema.
    async fn start(pg: &str, test: &str, n: usize, via_proxy: bool) -> Self {
        let schema = pg::fresh_schema(pg, &format!("e2e_{test}")).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut proxies = Vec::new();
        let mut nodes = Vec::new();
        for i in 1..=n {
            let db = if via_proxy {
                let proxy = Proxy::start(pg::server_addr(pg)).await;
                let url = pg::schema_url(&pg::via(pg, proxy.addr), &schema);
                proxies.push(proxy);
                url
            } else {
                pg::schema_url(pg, &schema)
            };
            let port = free_port();
            let name = format!("n{i}");
            let args: Vec<String> = [
                "--cluster",
                "--node-id",
                &name,
                "--advertise",
                &format!("127.0.0.1:{port}"),
                "--lease-ttl",
                LEASE_TTL,
                "--db",
                &db,
                "--open",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            // Start them concurrently would race their migrations; one after the other.
            nodes.push(Node::start(&name, dir.path(), port, &args));
        }
        eprintln!("{test}: {n} nodes on schema {schema}");
        Self {
            pg: pg.to_owned(),
            schema,
            proxies,
            nodes,
            _dir: dir,
        }
    }

    fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// The node that holds `room`'s live lease, by `kalphite_rooms`.
    async fn owner(&self, room: &str) -> Option<usize> {
        let row = pg::room_row(&self.pg, &self.schema, room).await?;
        if !row.live {
            return None;
        }
        let owner = row.owner?;
        self.nodes.iter().position(|n| n.name == owner)
    }

    /// Waits for a live owner of `room` other than `not`.
    async fn wait_owner(&self, room: &str, not: Option<usize>, deadline: Duration) -> usize {
        let until = Instant::now() + deadline;
        loop {
            if let Some(i) = self.owner(room).await
                && Some(i) != not
            {
                return i;
            }
            assert!(
                Instant::now() < until,
                "no owner of {room} (other than {not:?}) after {deadline:?}: {:?}",
                pg::room_row(&self.pg, &self.schema, room).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Each node's cluster metrics, one line per node.
    async fn print_metrics(&self, test: &str) {
        for node in &self.nodes {
            let mut line = format!("{test}: {}", node.name);
            for name in [
                "kalphite_cluster_rooms_owned",
                "kalphite_cluster_lease_renew_failures_total",
                "kalphite_cluster_fencing_rejections_total",
                "kalphite_cluster_forwarded_connections_total",
            ] {
                let value = metric(&node.address(), name).await;
                let short = name.trim_start_matches("kalphite_cluster_");
                let _ = write!(
                    line,
                    " {short}={}",
                    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
                );
            }
            eprintln!("{line}");
        }
    }

    /// Drops the schema (a failing test leaves it, and the nodes' logs are printed).
    async fn finish(self) {
        let (pg, schema) = (self.pg.clone(), self.schema.clone());
        drop(self);
        pg::drop_schema(&pg, &schema).await;
    }
}

/// Clients of one room, spread round-robin over the servers.
struct Load {
    clients: Vec<Client>,
    urls: Vec<String>,
}

impl Load {
    /// `n` clients; waits until each is connected and caught up.
    async fn start(test: &str, urls: &[String], n: usize) -> Self {
        let seed: u64 = rand::random();
        eprintln!("{test}: {n} clients, seed {seed}");
        let clients: Vec<Client> = (0..n)
            .map(|i| {
                let mut config = ClientConfig::new(format!("{test}-c{i}"), ROOM, urls, i);
                config.seed = seed.wrapping_add(i as u64);
                config.write_every = Duration::from_millis(100);
                Client::start(config)
            })
            .collect();
        let load = Self {
            clients,
            urls: urls.to_vec(),
        };
        assert!(
            wait_until(Duration::from_secs(30), || load
                .clients
                .iter()
                .all(|c| c.shared().connections > 0))
            .await,
            "{test}: the clients did not connect: {}",
            load.notes()
        );
        load
    }

    fn set_writing(&self, on: bool) {
        for c in &self.clients {
            c.set_writing(on);
        }
    }

    /// The highest version any client has received.
    fn max_version(&self) -> u64 {
        self.clients
            .iter()
            .map(|c| c.shared().watermark)
            .max()
            .unwrap_or(0)
    }

    fn acked(&self) -> u64 {
        self.clients.iter().map(|c| c.shared().acked).sum()
    }

    /// Waits until `more` changes more than now are acknowledged.
    async fn wait_acks(&self, test: &str, more: u64, deadline: Duration) {
        let target = self.acked() + more;
        assert!(
            wait_until(deadline, || self.acked() >= target).await,
            "{test}: fewer than {more} acks in {deadline:?}: {}",
            self.notes()
        );
    }

    /// The first ack, of a change (re)sent at or after `t`, any client.
    fn first_ack_after(&self, t: Instant) -> Option<Instant> {
        self.clients
            .iter()
            .filter_map(|c| {
                c.shared()
                    .ack_times
                    .iter()
                    .filter(|(sent, _)| *sent >= t)
                    .map(|(_, got)| *got)
                    .min()
            })
            .min()
    }

    /// The time by which every client had an ack of a change (re)sent at or after `t`.
    fn all_acked_after(&self, t: Instant) -> Option<Instant> {
        let mut last = t;
        for c in &self.clients {
            let first = c
                .shared()
                .ack_times
                .iter()
                .filter(|(sent, _)| *sent >= t)
                .map(|(_, got)| *got)
                .min()?;
            last = last.max(first);
        }
        Some(last)
    }

    fn notes(&self) -> String {
        let mut text = String::new();
        for c in &self.clients {
            let s = c.shared();
            let notes = &s.notes[s.notes.len().saturating_sub(8)..];
            let _ = write!(
                text,
                "\n  {}: made {} acked {} outbox {} connections {} stalls {} at {:?}: {notes:?}",
                c.name, s.made, s.acked, s.outbox, s.connections, s.stalls, s.connected
            );
        }
        text
    }

    /// Stops the writes, waits until every change is acknowledged (or refused) and every
    /// client has caught up with the room, reads the room as a fresh client, and checks the
    /// history; then that no change was refused.
    async fn settle_and_check(self, test: &str) {
        let settled = self.settle(test).await;
        let summary = assert_history(&settled.logs, &settled.last);
        eprintln!("{test}: {summary}");
        assert_eq!(
            settled.made, settled.acked,
            "{test}: every change acknowledged"
        );
    }

    /// Stops the writes, waits until every change is acknowledged (or refused) and every
    /// client has caught up with the room; the logs and the room as a fresh client reads
    /// it.
    async fn settle(self, test: &str) -> Settled {
        self.set_writing(false);
        assert!(
            wait_until(PATIENCE, || self
                .clients
                .iter()
                .all(|c| c.shared().outbox == 0))
            .await,
            "{test}: changes still unacknowledged 60 s after the writes stopped: {}",
            self.notes()
        );
        let last = read_final(&self.urls, ROOM, Duration::from_secs(30)).await;
        assert!(
            wait_until(Duration::from_secs(30), || self
                .clients
                .iter()
                .all(|c| c.shared().watermark >= last.room_version))
            .await,
            "{test}: clients not caught up with version {}: {}",
            last.room_version,
            self.notes()
        );
        let (made, acked): (u64, u64) = self.clients.iter().fold((0, 0), |(m, a), c| {
            let s = c.shared();
            (m + s.made, a + s.acked)
        });
        let mut stalls = 0;
        let mut waits = Vec::new();
        let mut errors = std::collections::BTreeMap::<String, u32>::new();
        let mut closes = std::collections::BTreeMap::<String, u32>::new();
        for c in &self.clients {
            let s = c.shared();
            stalls += s.stalls;
            waits.extend_from_slice(&s.waits);
            for (k, n) in &s.errors {
                *errors.entry(k.clone()).or_default() += n;
            }
            for (k, n) in &s.closes {
                *closes.entry(k.clone()).or_default() += n;
            }
        }
        waits.sort_unstable();
        let at = |p: usize| waits.get(waits.len().saturating_sub(1) * p / 100).copied();
        eprintln!(
            "{test}: {made} changes made, {acked} acknowledged; made -> ack p50 {}, p99 {}, \
             max {}; {stalls} stalled connections; errors {errors:?}; closes {closes:?}",
            at(50).map_or_else(String::new, ms),
            at(99).map_or_else(String::new, ms),
            at(100).map_or_else(String::new, ms),
        );
        let mut logs = Vec::new();
        for c in self.clients {
            logs.push(c.finish().await);
        }
        Settled {
            logs,
            last,
            made,
            acked,
        }
    }
}

/// A load that stopped and drained.
struct Settled {
    logs: Vec<ClientLog>,
    last: FinalLog,
    made: u64,
    acked: u64,
}

/// Polls an async condition every 100 ms until it holds; false when `deadline` passed.
async fn wait_until_async<F: Future<Output = bool>>(
    deadline: Duration,
    mut ready: impl FnMut() -> F,
) -> bool {
    let until = Instant::now() + deadline;
    loop {
        if ready().await {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// (a) Three nodes, clients spread over them in one room, random writes: every change is
/// acknowledged, everyone converges, the history holds. Each node's `/healthz` names it.
#[test]
fn three_nodes_one_room_converge() {
    const TEST: &str = "three_nodes_one_room_converge";
    let Some(pg) = pg::pg_url_or_skip(TEST) else {
        return;
    };
    scenario(async {
        let cluster = Cluster::start(&pg, "converge", 3, false).await;
        for node in &cluster.nodes {
            let (status, body) = http_get(&node.address(), "/healthz")
                .await
                .expect("/healthz answers");
            assert_eq!(status, 200, "{body}");
            assert!(
                body.starts_with("ok") && body.contains(&node.name),
                "{}: {body}",
                node.name
            );
        }
        let load = Load::start("converge", &cluster.urls(), CLIENTS).await;
        load.set_writing(true);
        load.wait_acks(TEST, 150, PATIENCE).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let owner = cluster.owner(ROOM).await;
        eprintln!("{TEST}: owner {owner:?}");
        load.settle_and_check(TEST).await;
        cluster.print_metrics(TEST).await;
        // kalphite bench sync over the three nodes: S1's writer and reader on two nodes (one
        // of them relays), S3's pairs spread over all three.
        let servers = cluster.urls().join(",");
        for scenario in ["s1", "s3"] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_kalphite"))
                .args([
                    "bench",
                    "sync",
                    "--server",
                    &servers,
                    "--scenario",
                    scenario,
                ])
                .args(["--scale", "0.05"])
                .env("RUST_LOG", "off")
                .env_remove("KALPHITE_AUTH_SECRET")
                .output()
                .expect("run kalphite bench sync");
            let report = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "bench {scenario}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                report.contains("servers                      3 "),
                "{report}"
            );
            eprintln!("{TEST}: kalphite bench sync --scenario {scenario} over 3 nodes:\n{report}");
        }
        cluster.finish().await;
    });
}

/// (b) `kill -9` of the room's owner under load: another node takes the room, the clients
/// come back, nothing acknowledged is lost. Prints the time from the kill to the first
/// ack after it and to every client's.
#[test]
fn owner_killed_under_load_loses_nothing() {
    const TEST: &str = "owner_killed_under_load_loses_nothing";
    let Some(pg) = pg::pg_url_or_skip(TEST) else {
        return;
    };
    scenario(async {
        let mut cluster = Cluster::start(&pg, "kill", 3, false).await;
        let load = Load::start("kill", &cluster.urls(), CLIENTS).await;
        load.set_writing(true);
        load.wait_acks(TEST, 100, PATIENCE).await;
        let owner = cluster
            .wait_owner(ROOM, None, Duration::from_secs(30))
            .await;
        cluster.nodes[owner].kill9();
        let killed = Instant::now();
        eprintln!("{TEST}: killed the owner {}", cluster.nodes[owner].name);
        load.wait_acks(TEST, 50, PATIENCE).await;
        let first = load.first_ack_after(killed).expect("an ack after the kill");
        let new_owner = cluster
            .wait_owner(ROOM, Some(owner), Duration::from_secs(30))
            .await;
        assert!(
            wait_until(PATIENCE, || load.all_acked_after(killed).is_some()).await,
            "{TEST}: not every client wrote again: {}",
            load.notes()
        );
        let all = load.all_acked_after(killed).expect("checked");
        eprintln!(
            "{TEST}: lease {LEASE_TTL}; kill -> first ack {}; kill -> every client acked {}; \
             new owner {}",
            ms(first - killed),
            ms(all - killed),
            cluster.nodes[new_owner].name
        );
        load.settle_and_check(TEST).await;
        cluster.print_metrics(TEST).await;
        cluster.finish().await;
    });
}

/// (c) `SIGSTOP` of the owner past its lease: the writes go on through the other nodes;
/// after `SIGCONT` the old owner acknowledges nothing more (any ack of its stale state
/// would give a version two contents, or be missing from the final log), and its clients
/// have moved.
#[test]
fn owner_paused_past_its_lease_acknowledges_nothing_more() {
    const TEST: &str = "owner_paused_past_its_lease_acknowledges_nothing_more";
    let Some(pg) = pg::pg_url_or_skip(TEST) else {
        return;
    };
    scenario(async {
        let mut cluster = Cluster::start(&pg, "pause", 3, false).await;
        let load = Load::start("pause", &cluster.urls(), CLIENTS).await;
        load.set_writing(true);
        load.wait_acks(TEST, 100, PATIENCE).await;
        let owner = cluster
            .wait_owner(ROOM, None, Duration::from_secs(30))
            .await;
        let homed: Vec<usize> = (0..CLIENTS)
            .filter(|i| i % cluster.nodes.len() == owner)
            .collect();
        cluster.nodes[owner].pause();
        let paused = Instant::now();
        eprintln!("{TEST}: paused the owner {}", cluster.nodes[owner].name);
        load.wait_acks(TEST, 50, PATIENCE).await;
        let first = load
            .first_ack_after(paused)
            .expect("an ack after the pause");
        let new_owner = cluster
            .wait_owner(ROOM, Some(owner), Duration::from_secs(30))
            .await;
        eprintln!(
            "{TEST}: lease {LEASE_TTL}; pause -> first ack {}; new owner {}",
            ms(first - paused),
            cluster.nodes[new_owner].name
        );
        // Past the lease for sure, with writes going on.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = load.max_version();
        let old = cluster.nodes[owner].url();
        // Fresh clients knock on the old owner the moment it wakes up: its welcome must not
        // take the room back to the version it had when it was paused.
        let probes: Vec<_> = (0..4)
            .map(|_| {
                let old = old.clone();
                tokio::spawn(async move {
                    let welcomed = probe_welcome(&old, ROOM, PROBE).await;
                    (welcomed, Instant::now())
                })
            })
            .collect();
        cluster.nodes[owner].resume();
        let resumed = Instant::now();
        eprintln!("{TEST}: resumed {}", cluster.nodes[owner].name);
        let mut slow = false;
        for probe in probes {
            let (welcomed, at) = probe.await.expect("probe");
            slow |= welcomed
                .as_ref()
                .is_err_and(|e| e.starts_with("nothing within"));
            eprintln!(
                "{TEST}: a fresh client's hello to the resumed node: {welcomed:?} after {} \
                 (the clients had seen version {before})",
                ms(at - resumed)
            );
            assert!(
                welcomed.as_ref().map_or(true, |v| *v >= before),
                "{TEST}: the resumed old owner welcomed a client at version {welcomed:?}, \
                 behind the {before} the room had already acknowledged"
            );
        }
        // A hello that gets neither a welcome nor a close is not a lost write, but a client
        // left hanging until its heartbeat gives up (it happened: a hello that joined a room
        // as it was dropped was never answered).
        assert!(
            !slow,
            "{TEST}: a hello to the resumed node got no welcome nor close in {PROBE:?}; \
             {}'s log around the resume:\n{}",
            cluster.nodes[owner].name,
            cluster.nodes[owner].log_tail(15)
        );
        load.wait_acks(TEST, 50, PATIENCE).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The clients that started on the paused node are connected again (elsewhere or
        // back to it, which now forwards).
        for &i in &homed {
            let s = load.clients[i].shared();
            assert!(
                s.connections > 1 && s.connected.is_some(),
                "{TEST}: client {i} did not move: {}",
                load.notes()
            );
        }
        let all = load.all_acked_after(resumed);
        eprintln!(
            "{TEST}: resume -> every client acked {}",
            all.map_or_else(|| "not yet".to_owned(), |t| ms(t - resumed))
        );
        load.settle_and_check(TEST).await;
        cluster.print_metrics(TEST).await;
        cluster.finish().await;
    });
}

/// (d) The owner's PostgreSQL connections cut (a proxy in between refuses everything): it
/// stops acknowledging, another node takes the room, nothing acknowledged is lost. The
/// link then comes back and the node serves again.
#[test]
fn owner_cut_off_postgres_stops_acknowledging() {
    const TEST: &str = "owner_cut_off_postgres_stops_acknowledging";
    let Some(pg) = pg::pg_url_or_skip(TEST) else {
        return;
    };
    scenario(async {
        let cluster = Cluster::start(&pg, "cut", 3, true).await;
        let load = Load::start("cut", &cluster.urls(), CLIENTS).await;
        load.set_writing(true);
        load.wait_acks(TEST, 100, PATIENCE).await;
        let owner = cluster
            .wait_owner(ROOM, None, Duration::from_secs(30))
            .await;
        cluster.proxies[owner].cut();
        let cut = Instant::now();
        eprintln!("{TEST}: cut {} off PostgreSQL", cluster.nodes[owner].name);
        load.wait_acks(TEST, 50, PATIENCE).await;
        let first = load.first_ack_after(cut).expect("an ack after the cut");
        let new_owner = cluster
            .wait_owner(ROOM, Some(owner), Duration::from_secs(30))
            .await;
        eprintln!(
            "{TEST}: lease {LEASE_TTL}; cut -> first ack {}; new owner {}",
            ms(first - cut),
            cluster.nodes[new_owner].name
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.proxies[owner].restore();
        eprintln!("{TEST}: link restored");
        load.wait_acks(TEST, 50, PATIENCE).await;
        load.settle_and_check(TEST).await;
        cluster.print_metrics(TEST).await;
        cluster.finish().await;
    });
}

/// (e) A rolling restart of all three nodes under load (`SIGTERM`, wait for the exit,
/// start again, one by one): zero failed commands — every change acknowledged, none
/// refused — and the history holds.
#[test]
fn rolling_restart_fails_no_command() {
    const TEST: &str = "rolling_restart_fails_no_command";
    let Some(pg) = pg::pg_url_or_skip(TEST) else {
        return;
    };
    scenario(async {
        let mut cluster = Cluster::start(&pg, "rolling", 3, false).await;
        let load = Load::start("rolling", &cluster.urls(), CLIENTS).await;
        load.set_writing(true);
        load.wait_acks(TEST, 100, PATIENCE).await;
        for i in 0..cluster.nodes.len() {
            let owner = cluster.owner(ROOM).await;
            let started = Instant::now();
            let status = cluster.nodes[i].terminate(Duration::from_secs(20));
            let stopped = started.elapsed();
            assert!(
                status.is_some_and(|s| s.success()),
                "{TEST}: {} did not exit cleanly on SIGTERM: {status:?}",
                cluster.nodes[i].name
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
            cluster.nodes[i].restart();
            let back = started.elapsed();
            load.wait_acks(TEST, 50, PATIENCE).await;
            eprintln!(
                "{TEST}: {} (owner: {}) stopped in {}, serving again after {}",
                cluster.nodes[i].name,
                owner == Some(i),
                ms(stopped),
                ms(back)
            );
        }
        load.settle_and_check(TEST).await;
        cluster.print_metrics(TEST).await;
        cluster.finish().await;
    });
}

/// The harness on one plain node (SQLite, no cluster): `kill -9` under load, restart on
/// the same port, and the history checker passes — clients reconnect, resend, catch up,
/// and nothing acknowledged is lost.
#[test]
fn single_node_killed_and_restarted_loses_nothing() {
    const TEST: &str = "single_node_killed_and_restarted_loses_nothing";
    scenario(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let args: Vec<String> = ["--db", "rooms.db", "--open"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let mut node = Node::start("single", dir.path(), free_port(), &args);
        let load = Load::start("single", &[node.url()], 4).await;
        load.set_writing(true);
        load.wait_acks(TEST, 100, PATIENCE).await;
        node.kill9();
        let killed = Instant::now();
        tokio::time::sleep(Duration::from_millis(500)).await;
        node.restart();
        load.wait_acks(TEST, 50, PATIENCE).await;
        let first = load
            .first_ack_after(killed)
            .expect("an ack after the restart");
        eprintln!(
            "{TEST}: kill -> restart 500 ms -> first ack {}",
            ms(first - killed)
        );
        load.settle_and_check(TEST).await;
        drop(node);
    });
}

/// The harness catches a lost write end to end: the node's database is put back, behind
/// the clients' backs, to a copy taken at an earlier kill (same room identity, older
/// versions), so the room hands out versions it had already acknowledged with other
/// contents. The history checker must say so.
#[test]
fn the_checker_catches_a_room_rolled_back_under_its_clients() {
    const TEST: &str = "the_checker_catches_a_room_rolled_back_under_its_clients";
    scenario(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let args: Vec<String> = ["--db", "rooms.db", "--open"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let mut node = Node::start("rolled-back", d, free_port(), &args);
        let load = Load::start("rollback", &[node.url()], 3).await;
        load.set_writing(true);
        load.wait_acks(TEST, 60, PATIENCE).await;
        node.kill9();
        let copy = |from: &str, to: &str| {
            let _ = std::fs::remove_file(d.join(format!("{to}-wal")));
            std::fs::copy(d.join(from), d.join(to)).expect("copy the database");
            let _ = std::fs::copy(d.join(format!("{from}-wal")), d.join(format!("{to}-wal")));
        };
        copy("rooms.db", "old.db");
        node.restart();
        load.wait_acks(TEST, 60, PATIENCE).await;
        node.kill9();
        copy("old.db", "rooms.db");
        node.restart();
        load.wait_acks(TEST, 30, PATIENCE).await;
        let settled = load.settle(TEST).await;
        let violations = check(&settled.logs, &settled.last).expect_err("a rolled-back room");
        eprintln!(
            "{TEST}: {} violations, e.g. {}",
            violations.len(),
            violations[0]
        );
        assert!(
            violations
                .iter()
                .any(|v| matches!(v, Violation::WelcomeBehind { .. })),
            "{violations:?}"
        );
        assert!(
            violations
                .iter()
                .any(|v| matches!(v, Violation::TwoContents { .. })),
            "{violations:?}"
        );
    });
}

/// (d, silent) The owner's PostgreSQL link goes silent (the proxy holds every byte, closes
/// nothing): its session and liveness lock stay alive in PostgreSQL, so its room moves only
/// when its lease runs out; its commits hang meanwhile and, when the link carries bytes
/// again, land on a fence. Nothing acknowledged is lost, every change is acknowledged.
#[test]
fn owner_partitioned_from_postgres_loses_the_room_after_its_lease() {
    const TEST: &str = "owner_partitioned_from_postgres_loses_the_room_after_its_lease";
    let Some(pg) = pg::pg_url_or_skip(TEST) else {
        return;
    };
    scenario(async {
        let cluster = Cluster::start(&pg, "silent", 3, true).await;
        let load = Load::start("silent", &cluster.urls(), CLIENTS).await;
        load.set_writing(true);
        load.wait_acks(TEST, 100, PATIENCE).await;
        let owner = cluster
            .wait_owner(ROOM, None, Duration::from_secs(30))
            .await;
        cluster.proxies[owner].freeze();
        let frozen = Instant::now();
        eprintln!(
            "{TEST}: {}'s PostgreSQL link silent",
            cluster.nodes[owner].name
        );
        load.wait_acks(TEST, 50, PATIENCE).await;
        let first = load
            .first_ack_after(frozen)
            .expect("an ack after the freeze");
        let new_owner = cluster
            .wait_owner(ROOM, Some(owner), Duration::from_secs(30))
            .await;
        eprintln!(
            "{TEST}: lease {LEASE_TTL}; silent link -> first ack {}; new owner {}",
            ms(first - frozen),
            cluster.nodes[new_owner].name
        );
        // Still partitioned: does the old owner let go of the room (it cannot renew)?
        let old = cluster.nodes[owner].address();
        let let_go = wait_until_async(Duration::from_secs(6), || async {
            metric(&old, "kalphite_cluster_rooms_owned").await == Some(0.0)
        })
        .await;
        eprintln!(
            "{TEST}: {} {} while partitioned ({} after the link went silent); a fresh client \
             there: {:?}",
            cluster.nodes[owner].name,
            if let_go {
                "dropped the room"
            } else {
                "still holds the room"
            },
            ms(frozen.elapsed()),
            probe_welcome(&cluster.nodes[owner].url(), ROOM, PROBE).await
        );
        // Its renewals time out: after a TTL without one it drops every room (it hung on
        // the silent link before, holding the room and its clients for as long as it lasted).
        assert!(
            let_go,
            "{TEST}: the partitioned old owner still holds the room"
        );
        cluster.proxies[owner].restore();
        eprintln!("{TEST}: link carries bytes again");
        load.wait_acks(TEST, 50, PATIENCE).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        load.settle_and_check(TEST).await;
        cluster.print_metrics(TEST).await;
        cluster.finish().await;
    });
}

/// PostgreSQL out of reach of every node for a while (all their links cut, as a database
/// restart looks to them), then back: writes wait, nothing acknowledged is lost, and every
/// change made meanwhile is acknowledged once the database is back.
#[test]
fn postgres_unreachable_for_every_node_then_back() {
    const TEST: &str = "postgres_unreachable_for_every_node_then_back";
    let Some(pg) = pg::pg_url_or_skip(TEST) else {
        return;
    };
    scenario(async {
        let cluster = Cluster::start(&pg, "dbdown", 3, true).await;
        let load = Load::start("dbdown", &cluster.urls(), CLIENTS).await;
        load.set_writing(true);
        load.wait_acks(TEST, 100, PATIENCE).await;
        for proxy in &cluster.proxies {
            proxy.cut();
        }
        let down = Instant::now();
        eprintln!("{TEST}: PostgreSQL out of reach of every node");
        tokio::time::sleep(Duration::from_secs(3)).await;
        for proxy in &cluster.proxies {
            proxy.restore();
        }
        let up = Instant::now();
        eprintln!("{TEST}: PostgreSQL back");
        load.wait_acks(TEST, 50, PATIENCE).await;
        let first = load
            .first_ack_after(up)
            .expect("an ack after the database came back");
        let all = load.all_acked_after(up);
        eprintln!(
            "{TEST}: down {}; back -> first ack {}; back -> every client acked {}",
            ms(up - down),
            ms(first - up),
            all.map_or_else(|| "not yet".to_owned(), |t| ms(t - up))
        );
        load.settle_and_check(TEST).await;
        cluster.print_metrics(TEST).await;
        cluster.finish().await;
    });
}

/// PostgreSQL itself restarted under load (`pg_ctlcluster … restart`: every session ends,
/// the liveness locks and leases' holders with them): the nodes rejoin, take the rooms
/// again, and every change is acknowledged; nothing acknowledged is lost. Skipped loudly
/// where the test cannot restart the server (no `pg_ctlcluster`, or not allowed to).
#[test]
fn postgres_restarted_under_load_loses_nothing() {
    const TEST: &str = "postgres_restarted_under_load_loses_nothing";
    let Some(pg) = pg::pg_url_or_skip(TEST) else {
        return;
    };
    let Some(version) = std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
    else {
        eprintln!("*** SKIPPED {TEST}: no /etc/postgresql cluster to restart ***");
        return;
    };
    scenario(async {
        let cluster = Cluster::start(&pg, "pgrestart", 3, false).await;
        let load = Load::start("pgrestart", &cluster.urls(), CLIENTS).await;
        load.set_writing(true);
        load.wait_acks(TEST, 100, PATIENCE).await;
        let down = Instant::now();
        let restarted = tokio::task::spawn_blocking(move || {
            std::process::Command::new("pg_ctlcluster")
                .args(["--skip-systemctl-redirect", &version, "main", "restart"])
                .output()
        })
        .await
        .expect("join");
        let restarted = match restarted {
            Ok(out) if out.status.success() => true,
            Ok(out) => {
                eprintln!(
                    "*** SKIPPED the restart in {TEST}: pg_ctlcluster failed: {} ***",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                false
            }
            Err(e) => {
                eprintln!("*** SKIPPED the restart in {TEST}: pg_ctlcluster: {e} ***");
                false
            }
        };
        let up = Instant::now();
        if restarted {
            eprintln!("{TEST}: PostgreSQL restarted in {}", ms(up - down));
        }
        load.wait_acks(TEST, 50, PATIENCE).await;
        let first = load.first_ack_after(up).expect("an ack after the restart");
        let all = load.all_acked_after(up);
        eprintln!(
            "{TEST}: restart -> first ack {}; every client acked {}",
            ms(first - up),
            all.map_or_else(|| "not yet".to_owned(), |t| ms(t - up))
        );
        load.settle_and_check(TEST).await;
        cluster.print_metrics(TEST).await;
        cluster.finish().await;
    });
}
