//! A protocol client for the end-to-end tests: raw frames over a WebSocket, reconnect with
//! backoff over a list of servers, resend of unacknowledged changes (same message id), and
//! a [`ClientLog`] of everything it received, for the history checker.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use kalphite::{Entity, Op, now_millis};
use kalphite_sync::{
    ChangePayload, ClientMessage, Envelope, HeartbeatPayload, HelloPayload, PROTOCOL_VERSION,
    ServerMessage, VectorClock, decode_server, encode,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::history::{ClientLog, Event, FinalLog, Key, State};

/// The kind every test entity has.
pub(crate) const KIND: &str = "item";

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How a client behaves.
#[derive(Clone, Debug)]
pub(crate) struct ClientConfig {
    /// Its replica id and user.
    pub(crate) name: String,
    /// The room.
    pub(crate) room: String,
    /// The servers, `ws://HOST:PORT/sync`; it starts with `urls[home]` and moves to the
    /// next one when a connection cannot be made or goes silent.
    pub(crate) urls: Vec<String>,
    /// Where it starts.
    pub(crate) home: usize,
    /// Entities `e0 … e{pool-1}` are written (shared by every client of the room, so
    /// concurrent edits meet).
    pub(crate) pool: u32,
    /// A write every this long while writing is on.
    pub(crate) write_every: Duration,
    /// The random writes' seed.
    pub(crate) seed: u64,
    /// An unacknowledged change is resent after this long.
    pub(crate) resend_after: Duration,
    /// No frame from the server for this long (heartbeats are answered): the connection is
    /// taken as dead.
    pub(crate) silence: Duration,
    /// A change unacknowledged this long on one connection: the connection is taken as
    /// stuck (counted in [`Shared::stalls`]) and the client moves to the next server.
    pub(crate) stall: Duration,
}

impl ClientConfig {
    /// A client of `room` starting at `urls[home]`.
    pub(crate) fn new(
        name: impl Into<String>,
        room: impl Into<String>,
        urls: &[String],
        home: usize,
    ) -> Self {
        Self {
            name: name.into(),
            room: room.into(),
            urls: urls.to_vec(),
            home: home % urls.len().max(1),
            pool: 16,
            write_every: Duration::from_millis(50),
            seed: 0,
            resend_after: Duration::from_secs(2),
            silence: Duration::from_secs(3),
            stall: Duration::from_secs(8),
        }
    }
}

/// What the client shares with the test while it runs.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Everything it received.
    pub(crate) log: ClientLog,
    /// Its watermark (§6).
    pub(crate) watermark: u64,
    /// Changes waiting for their ack.
    pub(crate) outbox: usize,
    /// Changes made.
    pub(crate) made: u64,
    /// Changes acknowledged (first ack of each).
    pub(crate) acked: u64,
    /// The index of the server it is connected to (welcomed), if any.
    pub(crate) connected: Option<usize>,
    /// Welcomes so far.
    pub(crate) connections: u32,
    /// Per ack: when the change was last sent, and when the ack came.
    pub(crate) ack_times: Vec<(Instant, Instant)>,
    /// Per acknowledged change: from its making to its ack.
    pub(crate) waits: Vec<Duration>,
    /// Error frames received, by code.
    pub(crate) errors: BTreeMap<String, u32>,
    /// Connections closed by the server, by close code and reason.
    pub(crate) closes: BTreeMap<String, u32>,
    /// When the last welcome came.
    pub(crate) welcomed_at: Option<Instant>,
    /// Connections left because a change went unacknowledged for [`ClientConfig::stall`].
    pub(crate) stalls: u32,
    /// Close frames and errors, as text (for a failing test's printout).
    pub(crate) notes: Vec<String>,
}

/// A running client (stopped when dropped).
pub(crate) struct Client {
    /// Its name.
    pub(crate) name: String,
    shared: Arc<Mutex<Shared>>,
    writing: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Client {
    /// Starts a client; it connects, catches up, and writes once [`Client::set_writing`]
    /// says so.
    pub(crate) fn start(config: ClientConfig) -> Self {
        let shared = Arc::new(Mutex::new(Shared {
            log: ClientLog {
                client: config.name.clone(),
                events: Vec::new(),
            },
            ..Shared::default()
        }));
        let (writing, writing_rx) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let name = config.name.clone();
        let task = tokio::spawn(run(config, Arc::clone(&shared), writing_rx, stop_rx));
        Self {
            name,
            shared,
            writing,
            stop,
            task: Some(task),
        }
    }

    /// Starts or stops the random writes.
    pub(crate) fn set_writing(&self, on: bool) {
        let _ = self.writing.send(on);
    }

    /// A look at its state.
    pub(crate) fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops it and returns its log.
    pub(crate) async fn finish(mut self) -> ClientLog {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        self.shared().log.clone()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The canonical content of a server state: operation, data (keys sorted), `updatedAt`
/// and clock.
pub(crate) fn content(p: &ChangePayload) -> String {
    let clock = serde_json::to_string(&p.vector.clone().normalized()).unwrap_or_default();
    match (&p.operation, &p.entity) {
        (Op::Delete, _) => format!("delete {clock}"),
        (Op::Upsert, Some(e)) => format!("upsert {} @{} {clock}", canonical(&e.data), e.updated_at),
        (Op::Upsert, None) => format!("upsert (no entity) {clock}"),
    }
}

/// JSON with every object's keys sorted.
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, String> =
                map.iter().map(|(k, v)| (k, canonical(v))).collect();
            let fields: Vec<String> = sorted
                .iter()
                .map(|(k, v)| format!("{}:{v}", Value::String((*k).clone())))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(canonical).collect();
            format!("[{}]", items.join(","))
        }
        other => other.to_string(),
    }
}

fn key_of(p: &ChangePayload) -> Key {
    format!("{}/{}", p.entity_type, p.entity_id)
}

/// What the server last said about an entity.
#[derive(Clone, Debug, Default)]
struct Known {
    version: u64,
    vector: VectorClock,
    deleted: bool,
}

/// A change waiting for its ack.
struct Pending {
    message_id: String,
    text: String,
    /// The last send.
    sent_at: Option<Instant>,
    /// The first send on the current connection.
    since: Option<Instant>,
    /// When the change was made.
    made: Instant,
}

/// The client's bookkeeping, kept across connections.
struct Book {
    config: ClientConfig,
    incarnation: u32,
    seq: u64,
    watermark: u64,
    above: BTreeSet<u64>,
    epoch: Option<String>,
    known: HashMap<Key, Known>,
    /// Oldest first.
    outbox: BTreeMap<u64, (Key, Pending)>,
    /// This client's own counter per entity.
    mine: HashMap<Key, u64>,
    rng: StdRng,
    shared: Arc<Mutex<Shared>>,
}

impl Book {
    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn log(&self, event: Event) {
        self.shared().log.events.push(event);
    }

    fn publish(&self) {
        let (watermark, outbox) = (self.watermark, self.outbox.len());
        let mut s = self.shared();
        s.watermark = watermark;
        s.outbox = outbox;
    }

    fn mark_received(&mut self, v: u64) {
        if v > self.watermark {
            self.above.insert(v);
        }
        self.absorb();
    }

    fn absorb(&mut self) {
        while self.above.remove(&(self.watermark + 1)) {
            self.watermark += 1;
        }
        self.above.retain(|&v| v > self.watermark);
    }

    fn take_state(&mut self, p: &ChangePayload) {
        let version = p.room_version.unwrap_or(0);
        let known = self.known.entry(key_of(p)).or_default();
        if version > known.version {
            *known = Known {
                version,
                vector: p.vector.clone(),
                deleted: p.operation == Op::Delete,
            };
        }
    }

    /// A new random edit of an entity with nothing queued, queued; its text.
    fn edit(&mut self) -> Option<String> {
        let busy: BTreeSet<&Key> = self.outbox.values().map(|(k, _)| k).collect();
        let free: Vec<u32> = (0..self.config.pool)
            .filter(|i| !busy.contains(&format!("{KIND}/e{i}")))
            .collect();
        if free.is_empty() {
            return None;
        }
        let i = free[self.rng.random_range(0..free.len())];
        let id = format!("e{i}");
        let key = format!("{KIND}/{id}");
        let known = self.known.get(&key).cloned().unwrap_or_default();
        let me = self.config.name.clone();
        let counter = self
            .mine
            .get(&key)
            .copied()
            .unwrap_or(0)
            .max(known.vector.get(&me))
            + 1;
        self.mine.insert(key.clone(), counter);
        let mut clock: BTreeMap<String, u64> = known
            .vector
            .iter()
            .map(|(r, c)| (r.to_owned(), c))
            .collect();
        clock.insert(me.clone(), counter);
        self.seq += 1;
        let now = now_millis();
        let delete = known.version > 0 && !known.deleted && self.rng.random_range(0..10) == 0;
        let message_id = format!("{me}-{:08x}-{}", self.incarnation, self.seq);
        let entity = (!delete).then(|| {
            Entity::new(
                id.clone(),
                KIND,
                json!({"by": me, "seq": self.seq, "r": self.rng.random::<u32>()}),
            )
            .at(now)
        });
        let msg = ClientMessage::Change(Envelope::new(
            message_id.clone(),
            me,
            now,
            ChangePayload {
                operation: if delete { Op::Delete } else { Op::Upsert },
                entity_type: KIND.into(),
                entity_id: id.into(),
                entity,
                vector: VectorClock::from(clock),
                base_version: Some(known.version),
                room_version: None,
            },
        ));
        let text = encode(&msg).ok()?;
        self.outbox.insert(
            self.seq,
            (
                key,
                Pending {
                    message_id,
                    text: text.clone(),
                    sent_at: None,
                    since: None,
                    made: Instant::now(),
                },
            ),
        );
        self.shared().made += 1;
        self.publish();
        Some(text)
    }

    fn pending_by_id(&self, message_id: &str) -> Option<u64> {
        self.outbox
            .iter()
            .find(|(_, (_, p))| p.message_id == message_id)
            .map(|(seq, _)| *seq)
    }
}

/// How a session ended.
enum Ended {
    /// It was welcomed, then the connection closed: try the same server again.
    Dropped,
    /// It could not connect or be welcomed, or went silent: try the next server.
    Failed,
    /// The test stopped the client.
    Stopped,
}

async fn run(
    config: ClientConfig,
    shared: Arc<Mutex<Shared>>,
    writing: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut book = Book {
        rng: StdRng::seed_from_u64(config.seed),
        incarnation: rand::random(),
        config,
        seq: 0,
        watermark: 0,
        above: BTreeSet::new(),
        epoch: None,
        known: HashMap::new(),
        outbox: BTreeMap::new(),
        mine: HashMap::new(),
        shared,
    };
    let mut server = book.config.home;
    let mut conn = 0u32;
    let mut backoff = Duration::from_millis(50);
    loop {
        if *stop.borrow() {
            return;
        }
        conn += 1;
        let started = Instant::now();
        let ended = session(&mut book, server, conn, writing.clone(), stop.clone()).await;
        book.shared().connected = None;
        match ended {
            Ended::Stopped => return,
            // A connection that lasted: reconnect to the same server at once (it may
            // forward to the room's new owner); one dropped right away backs off.
            Ended::Dropped if started.elapsed() > Duration::from_secs(2) => {
                backoff = Duration::from_millis(50);
            }
            Ended::Dropped => {}
            Ended::Failed => server = (server + 1) % book.config.urls.len(),
        }
        let jitter = Duration::from_millis(book.rng.random_range(0..50));
        tokio::select! {
            () = tokio::time::sleep(backoff + jitter) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

async fn send_text(ws: &mut Ws, text: &str) -> bool {
    ws.send(Message::Text(text.to_owned().into())).await.is_ok()
}

/// One connection: hello, welcome, catch-up, then changes both ways until it ends.
async fn session(
    book: &mut Book,
    server: usize,
    conn: u32,
    mut writing: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) -> Ended {
    let url = book.config.urls[server].clone();
    let connect = tokio_tungstenite::connect_async(url.as_str());
    let Ok(Ok((mut ws, _))) = tokio::time::timeout(Duration::from_secs(2), connect).await else {
        return Ended::Failed;
    };
    let me = book.config.name.clone();
    let hello = ClientMessage::Hello(Envelope::new(
        format!("{me}-{:08x}-hello{conn}", book.incarnation),
        me.clone(),
        now_millis(),
        HelloPayload {
            protocol_version: PROTOCOL_VERSION,
            room_id: book.config.room.clone(),
            replica_id: me.clone(),
            last_version: book.watermark,
            token: None,
            epoch: book.epoch.clone(),
        },
    ));
    let Ok(text) = encode(&hello) else {
        return Ended::Failed;
    };
    if !send_text(&mut ws, &text).await {
        return Ended::Failed;
    }
    let hello_logged = book.watermark;
    // The welcome.
    let welcome = loop {
        let frame = tokio::time::timeout(book.config.silence, ws.next()).await;
        let Ok(Some(Ok(frame))) = frame else {
            return Ended::Failed;
        };
        match frame {
            Message::Text(t) => match decode_server(t.as_str(), 64 << 20) {
                Ok(ServerMessage::Welcome(w)) => break w.payload,
                Ok(ServerMessage::Error(e)) => {
                    book.shared().notes.push(format!(
                        "conn {conn} to {url}: hello refused: {:?} {}",
                        e.payload.code, e.payload.message
                    ));
                    return Ended::Failed;
                }
                _ => {}
            },
            Message::Close(c) => {
                book.shared().notes.push(format!(
                    "conn {conn} to {url}: closed before welcome: {c:?}"
                ));
                return Ended::Failed;
            }
            _ => {}
        }
    };
    book.log(Event::Hello {
        conn,
        last_version: hello_logged,
    });
    book.log(Event::Welcome {
        conn,
        room_version: welcome.room_version,
        catch_up_from: welcome.catch_up_from,
        epoch: welcome.epoch.clone(),
    });
    if welcome.catch_up_from < book.watermark {
        book.watermark = welcome.catch_up_from;
        book.above.clear();
        for k in book.known.values_mut() {
            k.version = 0;
        }
    }
    {
        let mut s = book.shared();
        s.connected = Some(server);
        s.connections += 1;
        s.welcomed_at = Some(Instant::now());
    }
    let mut caught_up = false;
    // The outbox, oldest first.
    let now = Instant::now();
    let texts: Vec<String> = book
        .outbox
        .values_mut()
        .map(|(_, p)| {
            p.sent_at = Some(now);
            p.since = Some(now);
            p.text.clone()
        })
        .collect();
    for text in texts {
        if !send_text(&mut ws, &text).await {
            return Ended::Dropped;
        }
    }
    let mut heartbeat = tokio::time::interval(Duration::from_millis(500));
    let mut write_tick = tokio::time::interval(book.config.write_every);
    let mut resend_tick = tokio::time::interval(Duration::from_millis(250));
    let mut heard = Instant::now();
    loop {
        tokio::select! {
            frame = ws.next() => {
                heard = Instant::now();
                let text = match frame {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(c))) => {
                        let mut s = book.shared();
                        let why = c.as_ref().map_or_else(
                            || "no close frame".to_owned(),
                            |c| format!("{} {}", u16::from(c.code), c.reason),
                        );
                        *s.closes.entry(why).or_default() += 1;
                        s.notes.push(format!("conn {conn} to {url}: closed {c:?}"));
                        return Ended::Dropped;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        book.shared().notes.push(format!("conn {conn} to {url}: {e}"));
                        return Ended::Dropped;
                    }
                    None => return Ended::Dropped,
                };
                let Ok(msg) = decode_server(text.as_str(), 64 << 20) else {
                    book.shared().notes.push(format!("conn {conn}: undecodable frame {text}"));
                    continue;
                };
                on_message(book, conn, msg, &mut caught_up, welcome.epoch.as_ref());
            }
            _ = heartbeat.tick() => {
                if heard.elapsed() > book.config.silence {
                    book.shared().notes.push(format!("conn {conn} to {url}: silent, leaving"));
                    return Ended::Failed;
                }
                let beat = ClientMessage::Heartbeat(Envelope::new(
                    format!("{me}-{:08x}-beat", book.incarnation),
                    me.clone(),
                    now_millis(),
                    HeartbeatPayload {},
                ));
                if let Ok(text) = encode(&beat) && !send_text(&mut ws, &text).await {
                    return Ended::Dropped;
                }
            }
            _ = write_tick.tick(), if *writing.borrow() => {
                if let Some(text) = book.edit() {
                    let seq = book.seq;
                    if let Some((_, p)) = book.outbox.get_mut(&seq) {
                        p.sent_at = Some(Instant::now());
                        p.since = p.sent_at;
                    }
                    if !send_text(&mut ws, &text).await {
                        return Ended::Dropped;
                    }
                }
            }
            _ = resend_tick.tick() => {
                let after = book.config.resend_after;
                let now = Instant::now();
                let stuck = book.outbox.values().find_map(|(_, p)| {
                    p.since
                        .filter(|at| now.duration_since(*at) > book.config.stall)
                        .map(|_| p.message_id.clone())
                });
                if let Some(id) = stuck {
                    let mut s = book.shared();
                    s.stalls += 1;
                    s.notes.push(format!(
                        "conn {conn} to {url}: {id} unacknowledged for {:?}, leaving",
                        book.config.stall
                    ));
                    return Ended::Failed;
                }
                let due: Vec<String> = book
                    .outbox
                    .values_mut()
                    .filter(|(_, p)| p.sent_at.is_none_or(|at| now.duration_since(at) > after))
                    .map(|(_, p)| {
                        p.sent_at = Some(now);
                        p.since.get_or_insert(now);
                        p.text.clone()
                    })
                    .collect();
                for text in due {
                    if !send_text(&mut ws, &text).await {
                        return Ended::Dropped;
                    }
                }
            }
            _ = writing.changed() => {}
            _ = stop.changed() => {
                let _ = ws.close(None).await;
                return Ended::Stopped;
            }
        }
    }
}

fn on_message(
    book: &mut Book,
    conn: u32,
    msg: ServerMessage,
    caught_up: &mut bool,
    epoch: Option<&String>,
) {
    match msg {
        ServerMessage::CatchUp(page) => {
            let page = page.payload;
            for p in &page.changes {
                let version = p.room_version.unwrap_or(0);
                book.log(Event::CatchUp {
                    conn,
                    key: key_of(p),
                    version,
                    content: content(p),
                });
                book.take_state(p);
                book.mark_received(version);
            }
            if page.from_version <= book.watermark {
                book.watermark = book.watermark.max(page.to_version);
                book.absorb();
            }
            if page.complete {
                *caught_up = true;
                book.epoch = epoch.cloned();
            }
            book.publish();
        }
        ServerMessage::Change(c) => {
            let p = c.payload;
            let version = p.room_version.unwrap_or(0);
            book.log(Event::Broadcast {
                conn,
                key: key_of(&p),
                version,
                content: content(&p),
            });
            book.take_state(&p);
            book.mark_received(version);
            book.publish();
        }
        ServerMessage::Ack(a) => {
            let a = a.payload;
            let received = Instant::now();
            book.log(Event::Ack {
                conn,
                message_id: a.ack_of.clone(),
                key: key_of(&a.result),
                version: a.version,
                result_version: a.result.room_version.unwrap_or(0),
                content: content(&a.result),
            });
            book.mark_received(a.version);
            book.take_state(&a.result);
            if let Some(seq) = book.pending_by_id(&a.ack_of)
                && let Some((_, p)) = book.outbox.remove(&seq)
            {
                let mut s = book.shared();
                s.acked += 1;
                s.ack_times.push((p.sent_at.unwrap_or(received), received));
                s.waits.push(received.duration_since(p.made));
            }
            book.publish();
        }
        ServerMessage::Error(e) => {
            let e = e.payload;
            {
                let mut s = book.shared();
                s.notes.push(format!(
                    "conn {conn}: error {:?} {} (refers to {:?})",
                    e.code, e.message, e.refers_to
                ));
                *s.errors.entry(format!("{:?}", e.code)).or_default() += 1;
            }
            if let Some(id) = &e.refers_to
                && !e.code.is_retryable()
                && let Some(seq) = book.pending_by_id(id)
            {
                book.outbox.remove(&seq);
                book.log(Event::Refused {
                    message_id: id.clone(),
                    code: format!("{:?}", e.code),
                });
                book.publish();
            }
        }
        _ => {}
    }
}

/// Reads the room as a fresh client: a full catch-up from the first server of `urls` that
/// welcomes it (each tried for up to `deadline` in all).
///
/// # Panics
/// When no server welcomes it and completes the catch-up before the deadline.
pub(crate) async fn read_final(urls: &[String], room: &str, deadline: Duration) -> FinalLog {
    let until = Instant::now() + deadline;
    let mut attempt = 0usize;
    loop {
        let url = &urls[attempt % urls.len()];
        attempt += 1;
        let result = tokio::time::timeout(Duration::from_secs(10), read_once(url, room))
            .await
            .unwrap_or_else(|_| Err("timed out".to_owned()));
        match result {
            Ok(log) => return log,
            Err(e) if Instant::now() > until => panic!("reading the final log: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn read_once(url: &str, room: &str) -> Result<FinalLog, String> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| e.to_string())?;
    let reader = format!("final-reader-{:08x}", rand::random::<u32>());
    let hello = ClientMessage::Hello(Envelope::new(
        format!("{reader}-0"),
        reader.clone(),
        now_millis(),
        HelloPayload {
            protocol_version: PROTOCOL_VERSION,
            room_id: room.to_owned(),
            replica_id: reader,
            last_version: 0,
            token: None,
            epoch: None,
        },
    ));
    let text = encode(&hello).map_err(|e| e.to_string())?;
    ws.send(Message::Text(text.into()))
        .await
        .map_err(|e| e.to_string())?;
    let mut last = FinalLog::default();
    loop {
        let frame = ws
            .next()
            .await
            .ok_or("closed")?
            .map_err(|e| e.to_string())?;
        let Message::Text(t) = frame else {
            if let Message::Close(c) = frame {
                return Err(format!("closed: {c:?}"));
            }
            continue;
        };
        match decode_server(t.as_str(), 64 << 20).map_err(|e| e.to_string())? {
            ServerMessage::Welcome(w) => {
                last.room_version = w.payload.room_version;
                last.epoch = w.payload.epoch;
            }
            ServerMessage::CatchUp(page) => {
                for p in &page.payload.changes {
                    last.states.insert(
                        key_of(p),
                        State {
                            version: p.room_version.unwrap_or(0),
                            content: content(p),
                        },
                    );
                }
                if page.payload.complete {
                    let _ = ws.close(None).await;
                    return Ok(last);
                }
            }
            ServerMessage::Error(e) => {
                return Err(format!("{:?} {}", e.payload.code, e.payload.message));
            }
            _ => {}
        }
    }
}

/// Polls `ready` every 50 ms until it holds; false when `deadline` passed first.
pub(crate) async fn wait_until(deadline: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + deadline;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fresh client's hello to one server: the welcome's room version, or what happened
/// instead (refused, closed, nothing within `patience`).
///
/// # Errors
/// What came instead of a welcome.
pub(crate) async fn probe_welcome(
    url: &str,
    room: &str,
    patience: Duration,
) -> Result<u64, String> {
    let probe = async {
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let me = format!("probe-{:08x}", rand::random::<u32>());
        let hello = ClientMessage::Hello(Envelope::new(
            format!("{me}-0"),
            me.clone(),
            now_millis(),
            HelloPayload {
                protocol_version: PROTOCOL_VERSION,
                room_id: room.to_owned(),
                replica_id: me,
                last_version: 0,
                token: None,
                epoch: None,
            },
        ));
        let text = encode(&hello).map_err(|e| e.to_string())?;
        ws.send(Message::Text(text.into()))
            .await
            .map_err(|e| format!("send: {e}"))?;
        while let Some(frame) = ws.next().await {
            match frame.map_err(|e| format!("read: {e}"))? {
                Message::Text(t) => match decode_server(t.as_str(), 64 << 20) {
                    Ok(ServerMessage::Welcome(w)) => {
                        let _ = ws.close(None).await;
                        return Ok(w.payload.room_version);
                    }
                    Ok(ServerMessage::Error(e)) => {
                        return Err(format!("error {:?} {}", e.payload.code, e.payload.message));
                    }
                    _ => {}
                },
                Message::Close(c) => return Err(format!("closed {c:?}")),
                _ => {}
            }
        }
        Err("closed without a close frame".to_owned())
    };
    tokio::time::timeout(patience, probe)
        .await
        .unwrap_or_else(|_| Err(format!("nothing within {patience:?}")))
}
