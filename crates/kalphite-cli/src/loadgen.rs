//! The workload-S load generator (`BENCH-WORKLOADS.md`): S1 latency, S2 fan-out, S3 many
//! rooms, S4 idle connections, against any running sync server. Clients speak the wire
//! protocol directly; observers read each frame's type and entity id (borrowed, the rest
//! skipped) and keep the frame in a map, their "store", so thousands of clients and
//! hundreds of thousands of frames per second fit in one generator core. Given several
//! servers (the nodes of a cluster), clients are spread over them round-robin. Run by
//! `kalphite bench sync`.

// Rates, averages and sizes in the report are f64: exact for any count below 2^52.
#![allow(clippy::cast_precision_loss)]

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use kalphite::{Entity, Op, now_millis};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use kalphite_sync::{
    ChangePayload, ClientMessage, Envelope, HelloPayload, PROTOCOL_VERSION, ServerMessage,
    VectorClock, decode_server, encode,
};

/// One of workload S's scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scenario {
    /// Latency: A writes, B observes, one change at a time.
    S1,
    /// Fan-out: one writer, R readers.
    S2,
    /// Many rooms: 200 rooms × 2 clients ping-ponging 100 changes.
    S3,
    /// Idle connections: server RSS per idle connection.
    S4,
    /// Long uptime: rounds of rooms opened and left, and of entities written then deleted;
    /// server memory after each round (flat when rooms are unloaded and tombstones
    /// collected).
    Soak,
    /// Steady load: many connections over many rooms writing at a fixed total rate for a
    /// while; ack latency and server memory sampled over time.
    Load,
}

impl std::str::FromStr for Scenario {
    type Err = BenchError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "s1" => Ok(Self::S1),
            "s2" => Ok(Self::S2),
            "s3" => Ok(Self::S3),
            "s4" => Ok(Self::S4),
            "soak" => Ok(Self::Soak),
            "load" => Ok(Self::Load),
            other => Err(BenchError::Config(format!(
                "unknown scenario '{other}' (expected s1, s2, s3, s4, soak or load)"
            ))),
        }
    }
}

/// Load-generator options; the defaults are workload S's sizes.
#[derive(Clone, Debug)]
pub(crate) struct BenchOptions {
    /// `ws://host:port/sync`, one or more (never empty): the nth client of a scenario
    /// connects to `urls[n % len]`, and the server metrics are summed over all of them.
    pub urls: Vec<String>,
    /// Token secret, to mint room tokens; `None` for a server in open mode.
    pub token_secret: Option<Vec<u8>>,
    /// S1: measured changes (2000) and warm-up changes (200).
    pub s1_changes: u64,
    /// S1 warm-up changes.
    pub s1_warmup: u64,
    /// S2: reader counts to run (10 and 100).
    pub s2_readers: Vec<usize>,
    /// S2: changes written (5000).
    pub s2_changes: u64,
    /// S3: rooms (200) and changes per room (100).
    pub s3_rooms: usize,
    /// S3 changes per room.
    pub s3_changes: u64,
    /// S4: clients (1000), rooms (100), idle time (20 s).
    pub s4_clients: usize,
    /// S4 rooms.
    pub s4_rooms: usize,
    /// S4 idle time.
    pub s4_idle: Duration,
    /// Hang guard for every wait.
    pub timeout: Duration,
    /// S1 with full clients: two [`SyncClient`](kalphite_client::SyncClient)s over kalphite
    /// Stores (in-memory SQLite), latency from `put` on A to B's store notifying it.
    pub s1_full_clients: bool,
    /// Soak: rounds (5), rooms opened and left per round (2000), entities written then
    /// deleted per round (20 000), and how long to wait after each round for the server
    /// to unload rooms (70 s: its default unload time is 60 s).
    pub soak_rounds: usize,
    /// Soak rooms per round.
    pub soak_rooms: usize,
    /// Soak deletes per round.
    pub soak_deletes: u64,
    /// Soak settle time after each round.
    pub soak_settle: Duration,
    /// Load: connections (1000), rooms (100), total changes per second (1000), duration
    /// (300 s) and memory sample period (30 s).
    pub load_clients: usize,
    /// Load rooms.
    pub load_rooms: usize,
    /// Load total rate, changes per second.
    pub load_rate: u64,
    /// Load duration.
    pub load_duration: Duration,
    /// Load memory sample period.
    pub load_sample: Duration,
}

impl BenchOptions {
    /// Workload S's sizes against `urls` (the first alone when given none).
    pub(crate) fn new(urls: Vec<String>) -> Self {
        Self {
            urls,
            token_secret: None,
            s1_changes: 2000,
            s1_warmup: 200,
            s2_readers: vec![10, 100],
            s2_changes: 5000,
            s3_rooms: 200,
            s3_changes: 100,
            s4_clients: 1000,
            s4_rooms: 100,
            s4_idle: Duration::from_secs(20),
            timeout: Duration::from_mins(2),
            s1_full_clients: false,
            soak_rounds: 5,
            soak_rooms: 2_000,
            soak_deletes: 20_000,
            soak_settle: Duration::from_secs(70),
            load_clients: 1_000,
            load_rooms: 100,
            load_rate: 1_000,
            load_duration: Duration::from_mins(5),
            load_sample: Duration::from_secs(30),
        }
    }

    /// The server of a scenario's `n`th client: round-robin over the URLs.
    fn url(&self, n: usize) -> &str {
        &self.urls[n % self.urls.len().max(1)]
    }
}

/// A load-generator failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum BenchError {
    /// Bad options.
    #[error("invalid options: {0}")]
    Config(String),
    /// A socket failed.
    #[error("connection failed: {0}")]
    Connect(String),
    /// The server refused or answered unexpectedly.
    #[error("unexpected server answer: {0}")]
    Protocol(String),
    /// A wait exceeded the hang guard.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

/// One scenario's results, as `(name, value)` rows.
#[derive(Clone, Debug, Default)]
pub(crate) struct Report {
    /// Rows in order.
    pub rows: Vec<(String, String)>,
}

impl Report {
    fn row(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.rows.push((name.into(), value.into()));
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in &self.rows {
            writeln!(f, "{k:<28} {v}")?;
        }
        Ok(())
    }
}

type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;
type Source = SplitStream<WebSocketStream<MaybeTlsStream<TcpStream>>>;

/// The sending half of a joined protocol client.
struct Client {
    user: String,
    replica: String,
    sink: Sink,
    next: u64,
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

async fn guarded<T>(
    opts: &BenchOptions,
    what: &str,
    f: impl Future<Output = T>,
) -> Result<T, BenchError> {
    tokio::time::timeout(opts.timeout, f)
        .await
        .map_err(|_| BenchError::Timeout(opts.timeout, what.to_owned()))
}

impl Client {
    /// Connects to the scenario's `n`th server (round-robin), says hello and waits for the
    /// complete catch-up; returns the sending half and the receiving half.
    async fn join(
        opts: &BenchOptions,
        n: usize,
        room: &str,
        user: &str,
    ) -> Result<(Self, Source), BenchError> {
        let (ws, _) = guarded(
            opts,
            "connect",
            tokio_tungstenite::connect_async_with_config(opts.url(n), Some(ws_config()), true),
        )
        .await?
        .map_err(|e| BenchError::Connect(e.to_string()))?;
        let (mut sink, mut source) = ws.split();
        let token = match &opts.token_secret {
            Some(secret) => Some(
                kalphite_server::issue_token(secret, user, &[room], Duration::from_hours(1))
                    .map_err(|e| BenchError::Config(e.to_string()))?,
            ),
            None => None,
        };
        let replica = format!("{user}-r");
        let hello = ClientMessage::Hello(Envelope::new(
            format!("{replica}-0"),
            user,
            now_millis(),
            HelloPayload {
                protocol_version: PROTOCOL_VERSION,
                room_id: room.to_owned(),
                replica_id: replica.clone(),
                last_version: 0,
                token,
                epoch: None,
            },
        ));
        send(&mut sink, &hello).await?;
        loop {
            let msg = guarded(opts, "welcome", next_message(&mut source)).await??;
            match msg {
                ServerMessage::CatchUp(c) if c.payload.complete => break,
                ServerMessage::Error(e) => {
                    return Err(BenchError::Protocol(format!(
                        "hello refused: {:?} {}",
                        e.payload.code, e.payload.message
                    )));
                }
                _ => {}
            }
        }
        Ok((
            Self {
                user: user.to_owned(),
                replica,
                sink,
                next: 0,
            },
            source,
        ))
    }

    /// Sends change k.
    async fn write(&mut self, k: u64) -> Result<(), BenchError> {
        let msg = self.change(k);
        send(&mut self.sink, &msg).await
    }

    /// Change k of the workload: a new entity `c{k}`.
    fn change(&mut self, k: u64) -> ClientMessage {
        self.next += 1;
        let now = now_millis();
        let id = format!("c{k}");
        let data = json!({"message": format!("Message {k}"), "lineNumber": k, "updatedAt": now});
        ClientMessage::Change(Envelope::new(
            format!("{}-{}", self.replica, self.next),
            self.user.clone(),
            now,
            ChangePayload {
                operation: Op::Upsert,
                entity_type: "comment".into(),
                entity_id: id.clone().into(),
                entity: Some(Entity::new(id, "comment", data).at(now)),
                vector: VectorClock::from([(self.replica.as_str(), 1)]),
                base_version: Some(0),
                room_version: None,
            },
        ))
    }
}

impl Client {
    /// An upsert (`delete: false`) or delete of entity `e{id}`, the `n`th change of it by
    /// this client (its clock counter).
    fn edit(&mut self, id: u64, n: u64, delete: bool) -> ClientMessage {
        self.next += 1;
        let now = now_millis();
        let entity_id = format!("e{id}");
        let (operation, entity) = if delete {
            (Op::Delete, None)
        } else {
            let data = json!({"message": format!("Message {id}/{n}"), "n": n});
            (
                Op::Upsert,
                Some(Entity::new(entity_id.clone(), "comment", data).at(now)),
            )
        };
        ClientMessage::Change(Envelope::new(
            format!("{}-{}", self.replica, self.next),
            self.user.clone(),
            now,
            ChangePayload {
                operation,
                entity_type: "comment".into(),
                entity_id: entity_id.into(),
                entity,
                vector: VectorClock::from([(self.replica.as_str(), n)]),
                base_version: None,
                room_version: None,
            },
        ))
    }

    /// Sends `messages` keeping at most `window` unacknowledged, and waits for every ack.
    async fn pipeline(
        &mut self,
        source: &mut Source,
        opts: &BenchOptions,
        messages: impl IntoIterator<Item = ClientMessage>,
        window: usize,
    ) -> Result<(), BenchError> {
        let mut in_flight = 0usize;
        for msg in messages {
            while in_flight >= window {
                in_flight -= next_acks(source, opts).await?;
            }
            send(&mut self.sink, &msg).await?;
            in_flight += 1;
        }
        while in_flight > 0 {
            in_flight = in_flight.saturating_sub(next_acks(source, opts).await?);
        }
        Ok(())
    }
}

/// Reads the next frame: 1 for an ack, 0 for anything else; a refusal is an error.
async fn next_acks(source: &mut Source, opts: &BenchOptions) -> Result<usize, BenchError> {
    match guarded(opts, "an ack", next_message(source)).await?? {
        ServerMessage::Ack(_) => Ok(1),
        ServerMessage::Error(e) => Err(BenchError::Protocol(format!(
            "change refused: {:?} {}",
            e.payload.code, e.payload.message
        ))),
        _ => Ok(0),
    }
}

async fn send(sink: &mut Sink, msg: &ClientMessage) -> Result<(), BenchError> {
    let text = encode(msg).map_err(|e| BenchError::Protocol(e.to_string()))?;
    sink.send(Message::Text(text.into()))
        .await
        .map_err(|e| BenchError::Connect(e.to_string()))
}

async fn next_message(source: &mut Source) -> Result<ServerMessage, BenchError> {
    loop {
        match source.next().await {
            Some(Ok(Message::Text(t))) => {
                return decode_server(t.as_str(), 64 << 20)
                    .map_err(|e| BenchError::Protocol(e.to_string()));
            }
            Some(Ok(Message::Close(_))) | None => {
                return Err(BenchError::Connect("connection closed".into()));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(BenchError::Connect(e.to_string())),
        }
    }
}

/// The part of a server frame an observer reads: the type and the entity id. Parsing
/// borrows from the frame and skips the rest, so one generator core can keep up with
/// hundreds of thousands of frames per second.
#[derive(serde::Deserialize)]
struct LeanFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(borrow)]
    payload: LeanPayload<'a>,
}

#[derive(serde::Deserialize)]
struct LeanPayload<'a> {
    #[serde(rename = "entityId", borrow, default)]
    entity_id: Option<&'a str>,
}

/// A client's "store": keeps the latest frame of every entity it is told about and
/// reports the workload index k of each change `c{k}`.
fn spawn_observer(mut source: Source, tx: mpsc::UnboundedSender<(u64, Instant)>) {
    tokio::spawn(async move {
        let mut store: HashMap<String, tokio_tungstenite::tungstenite::Utf8Bytes> = HashMap::new();
        while let Some(Ok(frame)) = source.next().await {
            let Message::Text(text) = frame else {
                if matches!(frame, Message::Close(_)) {
                    break;
                }
                continue;
            };
            let Ok(lean) = serde_json::from_str::<LeanFrame<'_>>(text.as_str()) else {
                continue;
            };
            if lean.kind != "change" {
                continue;
            }
            let Some(id) = lean.payload.entity_id else {
                continue;
            };
            let k = id.strip_prefix('c').and_then(|k| k.parse::<u64>().ok());
            let id = id.to_owned();
            store.insert(id, text);
            if let Some(k) = k
                && tx.send((k, Instant::now())).is_err()
            {
                break;
            }
        }
    });
}

/// Drains (and discards) a writer's acks.
fn spawn_drain(mut source: Source) {
    tokio::spawn(async move { while next_message(&mut source).await.is_ok() {} });
}

fn run_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // `as` saturates (a negative or NaN rank is 0), and the rank is capped below.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// Runs one scenario.
///
/// # Errors
/// Connection failures, refusals, or a wait past the hang guard.
pub(crate) async fn run(scenario: Scenario, opts: &BenchOptions) -> Result<Report, BenchError> {
    if opts.urls.is_empty() {
        return Err(BenchError::Config("no server given".into()));
    }
    let mut report = match scenario {
        Scenario::S1 => s1(opts).await,
        Scenario::S2 => s2(opts).await,
        Scenario::S3 => s3(opts).await,
        Scenario::S4 => s4(opts).await,
        Scenario::Soak => soak(opts).await,
        Scenario::Load => load(opts).await,
    }?;
    if opts.urls.len() > 1 {
        let at = report
            .rows
            .iter()
            .position(|(k, _)| k == "scenario")
            .map_or(0, |i| i + 1);
        report.rows.insert(
            at,
            (
                "servers".to_owned(),
                format!(
                    "{} (clients round-robin; RSS and room counts summed): {}",
                    opts.urls.len(),
                    opts.urls.join(", ")
                ),
            ),
        );
    }
    Ok(report)
}

/// A writes c1..cn one at a time, each after B observed the previous; returns each
/// write → observe latency.
async fn ping_pong_latencies(
    opts: &BenchOptions,
    room: &str,
    n: u64,
) -> Result<Vec<Duration>, BenchError> {
    let (mut writer, a_source) = Client::join(opts, 0, room, &format!("{room}-a")).await?;
    let (_b, b_source) = Client::join(opts, 1, room, &format!("{room}-b")).await?;
    spawn_drain(a_source);
    let (tx, mut rx) = mpsc::unbounded_channel();
    spawn_observer(b_source, tx);
    let mut latencies = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for k in 1..=n {
        let start = Instant::now();
        writer.write(k).await?;
        loop {
            let (seen, at) = guarded(opts, "B to observe", rx.recv())
                .await?
                .ok_or_else(|| BenchError::Connect("observer ended".into()))?;
            if seen == k {
                latencies.push(at.saturating_duration_since(start));
                break;
            }
        }
    }
    Ok(latencies)
}

/// S1 through the product's client: A's `put` → sink → socket → server (durable) → B's
/// session → B's Store transaction → B's subscriber.
async fn full_client_latencies(
    opts: &BenchOptions,
    room: &str,
    n: u64,
) -> Result<Vec<Duration>, BenchError> {
    use kalphite::Store;
    use kalphite_client::{ConnectionStatus, SyncConfig, connect_store};
    use kalphite_db::{Database, DatabaseConfig};

    let mut clients = Vec::new();
    for (n, user) in ["a", "b"].into_iter().enumerate() {
        let db = Database::open(DatabaseConfig::new("sqlite::memory:"))
            .await
            .map_err(|e| BenchError::Config(e.to_string()))?;
        let user = format!("{room}-{user}");
        let mut config = SyncConfig::new(opts.url(n), room)
            .user(user.clone())
            .replica_id(&user);
        if let Some(secret) = &opts.token_secret {
            let token =
                kalphite_server::issue_token(secret, &user, &[room], Duration::from_hours(1))
                    .map_err(|e| BenchError::Config(e.to_string()))?;
            config = config.auth_token(token);
        }
        let (store, client) = connect_store(Store::builder(), &db, config)
            .await
            .map_err(|e| BenchError::Connect(e.to_string()))?;
        let mut status = client.status_watch();
        guarded(
            opts,
            "the client to connect",
            status.wait_for(|s| *s == ConnectionStatus::Connected),
        )
        .await?
        .map_err(|e| BenchError::Connect(e.to_string()))?;
        clients.push((store, client, db));
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _subscription = clients[1].0.subscribe(move |note| {
        for change in note.changes.iter() {
            if let Some(k) = change
                .id
                .strip_prefix('c')
                .and_then(|k| k.parse::<u64>().ok())
            {
                let _ = tx.send((k, Instant::now()));
            }
        }
    });
    let comments = clients[0].0.dynamic("comment");
    let mut latencies = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for k in 1..=n {
        let start = Instant::now();
        let data =
            json!({"message": format!("Message {k}"), "lineNumber": k, "updatedAt": now_millis()});
        comments
            .put(format!("c{k}"), data)
            .map_err(|e| BenchError::Protocol(e.to_string()))?;
        loop {
            let (seen, at) = guarded(opts, "B's store to see the change", rx.recv())
                .await?
                .ok_or_else(|| BenchError::Connect("subscription ended".into()))?;
            if seen == k {
                latencies.push(at.saturating_duration_since(start));
                break;
            }
        }
    }
    for (store, client, _) in &clients {
        client.close().await;
        let _ = store.close().await;
    }
    Ok(latencies)
}

fn latency_rows(report: &mut Report, prefix: &str, mut lat: Vec<Duration>) {
    lat.sort_unstable();
    for (name, p) in [("p50", 50.0), ("p90", 90.0), ("p99", 99.0)] {
        report.row(format!("{prefix}{name}"), ms(percentile(&lat, p)));
    }
    report.row(
        format!("{prefix}max"),
        ms(lat.last().copied().unwrap_or_default()),
    );
}

async fn s1(opts: &BenchOptions) -> Result<Report, BenchError> {
    let run = run_id();
    ping_pong_latencies(opts, &format!("s1-warm-{run}"), opts.s1_warmup).await?;
    let lat = if opts.s1_full_clients {
        full_client_latencies(opts, &format!("s1-{run}"), opts.s1_changes).await?
    } else {
        ping_pong_latencies(opts, &format!("s1-{run}"), opts.s1_changes).await?
    };
    let mut report = Report::default();
    report.row(
        "scenario",
        if opts.s1_full_clients {
            "S1 latency, full clients (store put -> other store notified)"
        } else {
            "S1 latency (write -> other client applied)"
        },
    );
    report.row("changes", opts.s1_changes.to_string());
    latency_rows(&mut report, "", lat);
    Ok(report)
}

async fn s2(opts: &BenchOptions) -> Result<Report, BenchError> {
    let mut report = Report::default();
    report.row("scenario", "S2 fan-out (1 writer, R readers)");
    report.row("changes", opts.s2_changes.to_string());
    let n = opts.s2_changes;
    let count = usize::try_from(n).map_err(|e| BenchError::Config(e.to_string()))?;
    for &readers in &opts.s2_readers {
        let room = format!("s2-{readers}-{}", run_id());
        let mut observers = Vec::new();
        for r in 0..readers {
            let (_client, source) = Client::join(opts, r, &room, &format!("reader{r}")).await?;
            let (tx, rx) = mpsc::unbounded_channel();
            spawn_observer(source, tx);
            observers.push(rx);
        }
        let (mut writer, source) = Client::join(opts, readers, &room, "writer").await?;
        spawn_drain(source);
        let mut waits = Vec::new();
        for mut rx in observers {
            waits.push(tokio::spawn(async move {
                let mut seen = vec![None; count + 1];
                let mut got = 0;
                while got < count {
                    let Some((k, at)) = rx.recv().await else {
                        break;
                    };
                    if let Some(slot) = usize::try_from(k).ok().and_then(|k| seen.get_mut(k))
                        && slot.is_none()
                    {
                        *slot = Some(at);
                        got += 1;
                    }
                }
                seen
            }));
        }
        let start = Instant::now();
        let mut sent = Vec::with_capacity(count + 1);
        sent.push(start);
        for k in 1..=n {
            sent.push(Instant::now());
            writer.write(k).await?;
        }
        let mut last_seen: Vec<Option<Instant>> = vec![None; count + 1];
        for w in waits {
            let seen = guarded(opts, "readers to receive everything", w)
                .await?
                .map_err(|e| BenchError::Protocol(e.to_string()))?;
            for (slot, at) in last_seen.iter_mut().zip(seen) {
                *slot = match (*slot, at) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        let end = last_seen.iter().flatten().max().copied().unwrap_or(start);
        let total = end.saturating_duration_since(start);
        let delivered = (n as f64) * (readers as f64);
        let lat: Vec<Duration> = last_seen
            .iter()
            .zip(&sent)
            .skip(1)
            .filter_map(|(seen, sent)| seen.map(|s| s.saturating_duration_since(*sent)))
            .collect();
        report.row(format!("R={readers} total"), ms(total));
        report.row(
            format!("R={readers} delivered"),
            format!("{:.0} msgs/s", delivered / total.as_secs_f64().max(1e-9)),
        );
        latency_rows(&mut report, &format!("R={readers} last-reader "), lat);
    }
    Ok(report)
}

async fn s3(opts: &BenchOptions) -> Result<Report, BenchError> {
    let run = run_id();
    let rss_before = server_rss(opts).await;
    let n = opts.s3_changes;
    let mut pairs = Vec::new();
    for r in 0..opts.s3_rooms {
        let room = format!("s3-{run}-{r}");
        let a = Client::join(opts, 2 * r, &room, &format!("{room}-a")).await?;
        let b = Client::join(opts, 2 * r + 1, &room, &format!("{room}-b")).await?;
        pairs.push((a, b));
    }
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    let mut firsts = Vec::new();
    let start = Instant::now();
    for ((a, a_src), (b, b_src)) in pairs {
        // A writes odd k, B even k, each after seeing the other's previous change.
        for (mut me, source, odd) in [(a, a_src, true), (b, b_src, false)] {
            let done = done_tx.clone();
            let (tx, mut rx) = mpsc::unbounded_channel();
            spawn_observer(source, tx);
            if odd {
                firsts.push(me.write(1).await);
            }
            tokio::spawn(async move {
                while let Some((k, _)) = rx.recv().await {
                    if k >= n {
                        let _ = done.send(());
                        break;
                    }
                    let next = k + 1;
                    if (next % 2 == 1) == odd && me.write(next).await.is_err() {
                        break;
                    }
                }
            });
        }
    }
    drop(done_tx);
    for f in firsts {
        f?;
    }
    for _ in 0..opts.s3_rooms {
        guarded(opts, "every room to finish", done_rx.recv())
            .await?
            .ok_or_else(|| BenchError::Connect("a room stopped early".into()))?;
    }
    let total = start.elapsed();
    let rss_after = server_rss(opts).await;
    let mut report = Report::default();
    report.row("scenario", "S3 many rooms (ping-pong per room)");
    report.row("rooms x changes", format!("{} x {n}", opts.s3_rooms));
    report.row("total", ms(total));
    report.row(
        "changes/s",
        format!(
            "{:.0}",
            (opts.s3_rooms as f64 * n as f64) / total.as_secs_f64().max(1e-9)
        ),
    );
    report.row("server RSS before", mib(rss_before));
    report.row("server RSS after", mib(rss_after));
    Ok(report)
}

/// Connections S4 opens and closes before its baseline.
const S4_WARM_UP: usize = 20;

async fn s4(opts: &BenchOptions) -> Result<Report, BenchError> {
    let run = run_id();
    // A warm-up first: a server that never served a connection has not touched the code
    // of its connection path, nor grown its allocator's arenas, and the first connections
    // would carry both. Measured from after it, the figure is what each connection costs.
    let mut warm = Vec::with_capacity(S4_WARM_UP);
    for i in 0..S4_WARM_UP {
        let room = format!("s4-{run}-warm-{}", i % 2);
        warm.push(Client::join(opts, i, &room, &format!("warm{i}")).await?);
    }
    drop(warm);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = server_rss(opts).await;
    let mut clients = Vec::with_capacity(opts.s4_clients);
    for i in 0..opts.s4_clients {
        let room = format!("s4-{run}-{}", i % opts.s4_rooms.max(1));
        clients.push(Client::join(opts, i, &room, &format!("idle{i}")).await?);
    }
    let connected = server_rss(opts).await;
    tokio::time::sleep(opts.s4_idle).await;
    let after = server_rss(opts).await;
    let mut report = Report::default();
    report.row("scenario", "S4 idle connections");
    report.row(
        "baseline",
        format!("after {S4_WARM_UP} connections opened and closed"),
    );
    report.row(
        "clients / rooms / idle",
        format!(
            "{} / {} / {:?}",
            opts.s4_clients, opts.s4_rooms, opts.s4_idle
        ),
    );
    report.row("server RSS before", mib(before));
    report.row("server RSS connected", mib(connected));
    report.row("server RSS after idle", mib(after));
    if let (Some(b), Some(a)) = (before, after) {
        let per = (a.saturating_sub(b) as f64) / (opts.s4_clients.max(1) as f64) / 1024.0;
        report.row("RSS per idle connection", format!("{per:.2} KiB"));
    }
    drop(clients);
    Ok(report)
}

/// A gauge or counter from the servers' `/metrics`, summed over the servers that export
/// it (`None` when none does).
async fn server_metric(opts: &BenchOptions, name: &str) -> Option<u64> {
    let mut sum = None;
    for url in &opts.urls {
        let Some(body) = scrape(url).await else {
            continue;
        };
        if let Some(v) = body.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<u64>()
                .ok()
        }) {
            sum = Some(sum.unwrap_or(0) + v);
        }
    }
    sum
}

async fn soak(opts: &BenchOptions) -> Result<Report, BenchError> {
    let run = run_id();
    let mut report = Report::default();
    report.row("scenario", "soak (rooms opened and left, entities deleted)");
    report.row(
        "rounds x rooms / deletes",
        format!(
            "{} x {} / {}",
            opts.soak_rounds, opts.soak_rooms, opts.soak_deletes
        ),
    );
    report.row("server RSS at start", mib(server_rss(opts).await));
    let count = |n: Option<u64>| n.map_or_else(|| "n/a".to_owned(), |r| r.to_string());
    report.row(
        "rooms loaded at start",
        count(server_metric(opts, "kalphite_sync_rooms").await),
    );
    let start = Instant::now();
    for round in 0..opts.soak_rounds {
        // Rooms opened and left, 64 at a time.
        let mut next = 0usize;
        while next < opts.soak_rooms {
            let batch = (next..opts.soak_rooms.min(next + 64)).map(|i| {
                let room = format!("soak-{run}-{round}-{i}");
                async move {
                    let (mut c, mut source) = Client::join(opts, i, &room, "soak").await?;
                    let msg = c.edit(0, 1, false);
                    c.pipeline(&mut source, opts, [msg], 1).await
                }
            });
            for result in futures_util::future::join_all(batch).await {
                result?;
            }
            next += 64;
        }
        // Entities written, then deleted, in one room.
        let room = format!("soak-{run}-{round}-deletes");
        let (mut c, mut source) = Client::join(opts, round, &room, "soak-deleter").await?;
        let n = opts.soak_deletes;
        let upserts: Vec<_> = (0..n).map(|i| c.edit(i, 1, false)).collect();
        c.pipeline(&mut source, opts, upserts, 256).await?;
        let deletes: Vec<_> = (0..n).map(|i| c.edit(i, 2, true)).collect();
        c.pipeline(&mut source, opts, deletes, 256).await?;
        drop((c, source));
        tokio::time::sleep(opts.soak_settle).await;
        let rooms = server_metric(opts, "kalphite_sync_rooms").await;
        report.row(
            format!("after round {}", round + 1),
            format!(
                "RSS {}, rooms loaded {}, {:.0} s",
                mib(server_rss(opts).await),
                count(rooms),
                start.elapsed().as_secs_f64()
            ),
        );
    }
    Ok(report)
}

async fn load(opts: &BenchOptions) -> Result<Report, BenchError> {
    let run = run_id();
    let clients = opts.load_clients.max(1);
    let mut report = Report::default();
    report.row("scenario", "load (steady writes over many connections)");
    report.row(
        "clients / rooms / rate / time",
        format!(
            "{clients} / {} / {} changes/s / {:?}",
            opts.load_rooms, opts.load_rate, opts.load_duration
        ),
    );
    report.row("server RSS at start", mib(server_rss(opts).await));
    // Each client writes every `period`, cycling over 10 entities of its own.
    let period = Duration::from_secs_f64(clients as f64 / opts.load_rate.max(1) as f64);
    let (lat_tx, mut lat_rx) = mpsc::unbounded_channel::<Duration>();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let room = format!("load-{run}-{}", i % opts.load_rooms.max(1));
        let (mut c, mut source) = Client::join(opts, i, &room, &format!("load{i}")).await?;
        let lat = lat_tx.clone();
        let mut stopped = stopped.clone();
        let offset = period.mul_f64(i as f64 / clients as f64);
        tasks.push(tokio::spawn(async move {
            let sent: std::sync::Arc<std::sync::Mutex<HashMap<String, Instant>>> =
                std::sync::Arc::default();
            let reader = {
                let sent = std::sync::Arc::clone(&sent);
                tokio::spawn(async move {
                    while let Ok(msg) = next_message(&mut source).await {
                        if let ServerMessage::Ack(a) = msg
                            && let Some(at) = sent
                                .lock()
                                .ok()
                                .and_then(|mut s| s.remove(&a.payload.ack_of))
                        {
                            let _ = lat.send(at.elapsed());
                        }
                    }
                })
            };
            tokio::time::sleep(offset).await;
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut counts = [0u64; 10];
            let mut k = 0usize;
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tick.tick() => {}
                }
                let slot = k % counts.len();
                k += 1;
                counts[slot] += 1;
                let msg = c.edit(slot as u64, counts[slot], false);
                let ClientMessage::Change(env) = &msg else {
                    continue;
                };
                if let Ok(mut s) = sent.lock() {
                    s.insert(env.message_id.clone(), Instant::now());
                }
                if send(&mut c.sink, &msg).await.is_err() {
                    break;
                }
            }
            // Acks still in flight arrive within a moment.
            tokio::time::sleep(Duration::from_millis(500)).await;
            reader.abort();
        }));
    }
    drop(lat_tx);
    report.row("server RSS connected", mib(server_rss(opts).await));
    let start = Instant::now();
    let mut latencies = Vec::new();
    let mut sample = tokio::time::interval(opts.load_sample);
    sample.tick().await;
    while start.elapsed() < opts.load_duration {
        tokio::select! {
            _ = sample.tick() => {
                report.row(
                    format!("RSS at {:.0} s", start.elapsed().as_secs_f64()),
                    format!("{} ({} acks so far)", mib(server_rss(opts).await), latencies.len()),
                );
            }
            Some(l) = lat_rx.recv() => latencies.push(l),
        }
    }
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
    while let Ok(l) = lat_rx.try_recv() {
        latencies.push(l);
    }
    let acks = latencies.len();
    report.row("acks", acks.to_string());
    report.row(
        "acks/s",
        format!(
            "{:.0}",
            acks as f64 / start.elapsed().as_secs_f64().max(1e-9)
        ),
    );
    latency_rows(&mut report, "ack latency", latencies);
    report.row("server RSS at end", mib(server_rss(opts).await));
    Ok(report)
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(
        || "n/a (server exports no kalphite_sync_process_resident_bytes)".to_owned(),
        |b| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)),
    )
}

/// Scrapes the servers' resident memory from `/metrics` (same host and port as each URL),
/// summed.
pub(crate) async fn server_rss(opts: &BenchOptions) -> Option<u64> {
    server_metric(opts, "kalphite_sync_process_resident_bytes").await
}

/// A server's `/metrics` text (same host and port as its URL).
async fn scrape(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("http://"))?;
    let host = rest.split('/').next()?;
    let mut stream = TcpStream::connect(host).await.ok()?;
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    Some(body)
}

#[cfg(test)]
mod tests {
    //! Every scenario runs end to end (tiny sizes) against a real server with tokens, so
    //! `kalphite bench sync` keeps working.

    use std::time::Duration;

    use kalphite_db::{Database, DatabaseConfig};
    use kalphite_server::{ServerConfig, run as serve};

    use super::{BenchOptions, Scenario, run};

    const SECRET: &[u8] = b"loadgen-test-secret-of-32-bytes!";
    const GUARD: Duration = Duration::from_mins(1);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_scenario_runs_at_small_scale() {
        let db = Database::open(DatabaseConfig::new("sqlite::memory:"))
            .await
            .expect("open");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = ServerConfig::new(db)
            .token_secret(SECRET.to_vec())
            .room_unload_after(Duration::from_millis(50));
        let server = tokio::spawn(serve(listener, config, async move {
            let _ = stopped.await;
        }));

        let mut opts = BenchOptions::new(vec![format!("ws://{addr}/sync")]);
        opts.token_secret = Some(SECRET.to_vec());
        opts.s1_changes = 20;
        opts.s1_warmup = 5;
        opts.s2_readers = vec![3];
        opts.s2_changes = 50;
        opts.s3_rooms = 5;
        opts.s3_changes = 10;
        opts.s4_clients = 20;
        opts.s4_rooms = 4;
        opts.s4_idle = Duration::ZERO;
        opts.timeout = GUARD;
        for scenario in [Scenario::S1, Scenario::S2, Scenario::S3, Scenario::S4] {
            let report = tokio::time::timeout(GUARD, run(scenario, &opts))
                .await
                .expect("hang guard")
                .expect("scenario");
            assert!(report.rows.len() >= 3, "{scenario:?}: {report}");
        }
        let report = run(Scenario::S2, &opts).await.expect("s2");
        assert!(report.to_string().contains("R=3 delivered"));
        opts.s1_full_clients = true;
        let report = tokio::time::timeout(GUARD, run(Scenario::S1, &opts))
            .await
            .expect("hang guard")
            .expect("s1 full clients");
        assert!(report.to_string().contains("full clients"), "{report}");

        opts.soak_rounds = 2;
        opts.soak_rooms = 30;
        opts.soak_deletes = 40;
        opts.soak_settle = Duration::from_millis(400);
        let report = tokio::time::timeout(GUARD, run(Scenario::Soak, &opts))
            .await
            .expect("hang guard")
            .expect("soak");
        // Every room of the round was left, so none of them is still loaded after the
        // settle time: no more rooms are loaded than before (the other scenarios' clients
        // are still connected to theirs).
        let text = report.to_string();
        let loaded = |row: &str| -> u64 {
            let (_, v) = report.rows.iter().find(|(k, _)| k == row).expect("row");
            let v = v.split("rooms loaded ").last().expect("count");
            v.split(',')
                .next()
                .and_then(|n| n.trim().parse().ok())
                .expect("number")
        };
        let at_start = loaded("rooms loaded at start");
        for round in ["after round 1", "after round 2"] {
            assert!(loaded(round) <= at_start, "{text}");
        }

        opts.load_clients = 10;
        opts.load_rooms = 3;
        opts.load_rate = 200;
        opts.load_duration = Duration::from_millis(600);
        opts.load_sample = Duration::from_millis(200);
        let report = tokio::time::timeout(GUARD, run(Scenario::Load, &opts))
            .await
            .expect("hang guard")
            .expect("load");
        let acks: usize = report
            .rows
            .iter()
            .find(|(k, _)| k == "acks")
            .and_then(|(_, v)| v.parse().ok())
            .expect("acks row");
        assert!(acks >= 50, "{report}");
        let _ = stop.send(());
        server.await.expect("join").expect("server");
    }

    /// Several servers: clients go round-robin over them (here two addresses of one server:
    /// one by IP, one by name), the report names them, the metrics are summed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn several_servers_share_the_clients() {
        let db = Database::open(DatabaseConfig::new("sqlite::memory:"))
            .await
            .expect("open");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = ServerConfig::new(db).token_secret(SECRET.to_vec());
        let server = tokio::spawn(serve(listener, config, async move {
            let _ = stopped.await;
        }));
        let one = format!("ws://{addr}/sync");
        let mut opts = BenchOptions::new(vec![one.clone()]);
        opts.token_secret = Some(SECRET.to_vec());
        let alone = super::server_rss(&opts).await.expect("rss");
        opts.urls = vec![one, format!("ws://localhost:{}/sync", addr.port())];
        assert_eq!(opts.url(0), opts.urls[0]);
        assert_eq!(opts.url(3), opts.urls[1]);
        // Both addresses are scraped: the same process counted twice.
        let summed = super::server_rss(&opts).await.expect("rss");
        assert!(summed >= alone * 2 - alone / 2, "{alone} then {summed}");
        opts.s1_changes = 10;
        opts.s1_warmup = 2;
        opts.s3_rooms = 3;
        opts.s3_changes = 6;
        opts.s4_clients = 6;
        opts.s4_rooms = 2;
        opts.s4_idle = Duration::ZERO;
        opts.timeout = GUARD;
        for scenario in [Scenario::S1, Scenario::S3, Scenario::S4] {
            let report = tokio::time::timeout(GUARD, run(scenario, &opts))
                .await
                .expect("hang guard")
                .expect("scenario");
            assert_eq!(report.rows[0].0, "scenario", "{report}");
            assert_eq!(report.rows[1].0, "servers", "{report}");
            assert!(report.rows[1].1.starts_with("2 "), "{report}");
        }
        opts.urls.truncate(1);
        let report = run(Scenario::S1, &opts).await.expect("s1");
        assert!(report.rows.iter().all(|(k, _)| k != "servers"), "{report}");
        let _ = stop.send(());
        server.await.expect("join").expect("server");
    }
}
