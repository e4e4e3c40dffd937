//! kalphite-client — a kalphite [`Store`] over a local database, kept in sync with a
//! kalphite server. Open one [`Client`] (database URL, kinds, optional [`SyncConfig`]);
//! read and write its store synchronously; [`Client::durable`] tells when a change is on
//! disk or on the server; [`Client::close`] writes everything and reports what is still
//! unsynced (safely queued in the file).
//!
//! Local changes enter the sans-IO [`Replica`]'s outbox as the store commits them (a store
//! sink). The outbox, the catch-up point and what the server said about each entity live
//! in the database's sync tables, written by the local flush engine **in the same
//! transaction** as the entity rows they describe, so after a crash the two always agree.
//! Remote changes are applied with [`Origin::Remote`] (validated by the store's schema,
//! never echoed back) and written the same way.
//!
//! # Layout
//! - [`Client`], [`ClientBuilder`]: the owned handle (`client` module).
//! - [`SyncClient`], [`connect_store`]: the connection and its controls, for callers that
//!   bring their own [`Store`] builder and [`Database`].
//! - `bookkeeping`: replica deltas as flush annotations; the local target; loading.
//! - `session`: the WebSocket loop (hello, frames, resends, heartbeats, backoff).
//! - `wiring`: the store sink that feeds the replica and the local engine; the
//!   server-durability target.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use kalphite::Durability;
//! use kalphite_client::{Client, SyncConfig};
//! let client = Client::builder("sqlite:./app.db")
//!     .sync(SyncConfig::new("ws://127.0.0.1:8787", "room-1").token("<kalphite token …>"))
//!     .open()
//!     .await?;
//! client.store().dynamic("todo").put("t1", serde_json::json!({"title": "milk"}))?;
//! client.durable(Durability::Server).await?; // the server has it
//! client.close().await?;
//! # Ok(()) }
//! ```

// Library code does not unwrap (tests may); the other lints are in the workspace Cargo.toml.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod bookkeeping;
mod client;
mod session;
mod wiring;

pub use client::{Client, ClientBuilder, ClientError, CloseReport, DurableError};
pub use kalphite_sync::Undelivered;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use kalphite::{
    Change, Durability, EntityId, FlushConfig, FlushEngine, FlushTarget, Kind, Origin, Store,
    StoreBuilder,
};
use kalphite_db::Database;
use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use kalphite_sync::{
    ClientMessage, ConflictPayload, ErrorCode, Replica, ReplicaConfig, ReplicaState,
};

pub use session::backoff;

/// Kinds starting with this are kalphite's own bookkeeping, never hydrated into a store.
pub use kalphite_sync::RESERVED_KIND_PREFIX as INTERNAL_KIND_PREFIX;

/// The kind of the marker that makes the server-durability engine wait for changes queued
/// by an earlier session (it never reaches a database).
const QUEUED_MARKER_KIND: &str = "_kalphite_queued";

/// Client configuration: the spec's fields plus the replica id and timings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SyncConfig {
    /// `ws://host:port/sync`; or several, separated by commas (the nodes of a cluster,
    /// `docs/cluster.md`): the client connects to the first, and after a lost or failed
    /// connection tries the next, in turn.
    pub ws_url: String,
    /// The room to join.
    pub room_id: String,
    /// The user (the server takes the token's user when it checks tokens).
    pub user_id: String,
    /// The room token (HS256 JWT), unless the server is in open mode.
    pub auth_token: Option<String>,
    /// Reconnect attempts after a connection is lost or fails; 0 = forever.
    pub reconnect_attempts: u32,
    /// Send a heartbeat after this long without sending; a server silent for twice this
    /// long is considered dead and the connection is replaced.
    pub heartbeat_interval: Duration,
    /// This installation's id (its slot in vector clocks). `None`: the one persisted with
    /// the local state, or a new random one.
    pub replica_id: Option<String>,
    /// Resend an unacknowledged change after this long.
    pub resend_after: Duration,
    /// First reconnect delay (doubled per attempt, with jitter).
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Most entities with unacknowledged changes.
    pub outbox_limit: usize,
    /// The server's limit on a client frame (its `--max-frame-bytes`; default the
    /// protocol's 1 MiB): a [`Client`] refuses local entities that could never fit.
    pub max_frame_bytes: usize,
    /// Flush config of the local database engine.
    pub local_flush: FlushConfig,
    /// Flush config of the server-durability engine.
    pub server_flush: FlushConfig,
    /// Whether [`connect_store`] starts connecting at once (default `true`). With
    /// `false` the store still records every local change in the persisted offline
    /// queue, to be sent on a later [`SyncClient::connect`] (an app that works offline
    /// by choice).
    pub connect_on_start: bool,
    /// The room to use when [`Self::room_id`] is empty and the database is bound to none
    /// yet (an app's default room; an empty `room_id` otherwise means "the room this
    /// database syncs with").
    pub default_room: Option<String>,
}

impl SyncConfig {
    /// A config for the server at `url` (`ws://host:port`; the `/sync` path is added when
    /// the URL has none) and `room`, with defaults: user `anonymous` (a server that checks
    /// tokens takes the token's user), reconnect forever, 30 s heartbeat, 5 s resend,
    /// backoff 100 ms to 10 s.
    pub fn new(url: impl Into<String>, room: impl Into<String>) -> Self {
        Self {
            ws_url: url.into(),
            room_id: room.into(),
            user_id: "anonymous".into(),
            auth_token: None,
            reconnect_attempts: 0,
            heartbeat_interval: Duration::from_secs(30),
            replica_id: None,
            resend_after: Duration::from_secs(5),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            outbox_limit: 10_000,
            max_frame_bytes: kalphite_sync::DEFAULT_MAX_FRAME_BYTES,
            local_flush: FlushConfig::default(),
            server_flush: FlushConfig::default().durability(Durability::Server),
            connect_on_start: true,
            default_room: None,
        }
    }

    /// Sets the room token (`kalphite token …`).
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.auth_token = Some(token.into());
        self
    }

    /// Sets the room token (the seed's name for [`Self::token`]).
    #[must_use]
    pub fn auth_token(self, token: impl Into<String>) -> Self {
        self.token(token)
    }

    /// Sets the user (its name prefixes new replica ids; the server takes the token's).
    #[must_use]
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user_id = user.into();
        self
    }

    /// Sets the replica id.
    #[must_use]
    pub fn replica_id(mut self, id: impl Into<String>) -> Self {
        self.replica_id = Some(id.into());
        self
    }

    /// Sets the reconnect attempts (0 = forever).
    #[must_use]
    pub fn reconnect_attempts(mut self, n: u32) -> Self {
        self.reconnect_attempts = n;
        self
    }

    /// Sets the heartbeat interval.
    #[must_use]
    pub fn heartbeat_interval(mut self, d: Duration) -> Self {
        self.heartbeat_interval = d;
        self
    }

    /// Sets the resend delay.
    #[must_use]
    pub fn resend_after(mut self, d: Duration) -> Self {
        self.resend_after = d;
        self
    }

    /// Sets the reconnect backoff range.
    #[must_use]
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max;
        self
    }

    /// Sets the debounce of both flush engines (tests use a short one).
    #[must_use]
    pub fn flush_debounce(mut self, d: Duration) -> Self {
        let local_wait = d.max(self.local_flush.max_wait);
        let server_wait = d.max(self.server_flush.max_wait);
        self.local_flush = self.local_flush.debounce(d).max_wait(local_wait);
        self.server_flush = self.server_flush.debounce(d).max_wait(server_wait);
        self
    }

    /// Sets the room used when none is named and the database is bound to none yet (see
    /// [`SyncConfig::default_room`]).
    #[must_use]
    pub fn default_room(mut self, room: impl Into<String>) -> Self {
        self.default_room = Some(room.into());
        self
    }

    /// Whether [`connect_store`] connects at once (see [`SyncConfig::connect_on_start`]).
    #[must_use]
    pub fn connect_on_start(mut self, on: bool) -> Self {
        self.connect_on_start = on;
        self
    }
}

/// Where the connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionStatus {
    /// Welcomed by the server.
    Connected,
    /// Opening a socket or waiting for the welcome.
    Connecting,
    /// No connection (offline, backing off, refused or stopped).
    Disconnected,
    /// The client was opened without a sync server.
    LocalOnly,
}

/// What the client reports, as an async stream ([`SyncClient::events`]).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum SyncEvent {
    /// The server welcomed the client.
    Connected {
        /// The room's version then.
        room_version: u64,
    },
    /// Catch-up finished.
    CaughtUp {
        /// The room version the client has everything up to.
        version: u64,
    },
    /// The connection ended.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// A remote change was applied to the store.
    RemoteChange(Box<Change>),
    /// The server acknowledged a local change: it is durable there.
    Ack {
        /// The change's message id.
        message_id: String,
        /// Its room version.
        version: u64,
    },
    /// A local change was concurrent with another; the store now holds the resolution.
    /// Under the manual strategy, write the version you want as a new change.
    Conflict(Box<ConflictPayload>),
    /// The server refused a local change for good (it stays in the local store).
    Rejected {
        /// The change's message id.
        message_id: String,
        /// Why.
        code: ErrorCode,
        /// Why, for a person.
        message: String,
    },
    /// Any other error (server error replies, refused tokens, storage errors).
    Error {
        /// The wire code, when the server sent one.
        code: Option<ErrorCode>,
        /// For a person.
        message: String,
    },
    /// The room's history is not the one this database last synced with (its server
    /// database was lost or restored, or the client was away longer than the room keeps
    /// deletes): the client took the room's full state. See `docs/sync.md`, "Room
    /// identity and resync".
    Resynced {
        /// The room's state was a snapshot: local entities it lacks were dropped.
        snapshot: bool,
        /// Local entities sent back to the room (it lacked them, or held other content).
        sent_back: usize,
        /// Local entities dropped (after a snapshot).
        dropped: usize,
    },
    /// The event stream fell behind and missed this many events.
    Lagged {
        /// Missed events.
        missed: u64,
    },
}

/// What moved since a client started ([`SyncClient::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyncStats {
    /// Remote changes applied to the local store.
    pub pulled: u64,
    /// Entities whose local changes the server acknowledged.
    pub pushed: u64,
}

/// Why the client could not start or a write could not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The local database failed.
    #[error("local database: {0}")]
    Database(#[from] kalphite_db::Error),
    /// The store refused something (flush config, hydration).
    #[error("store: {0}")]
    Store(#[from] kalphite::Error),
    /// The persisted replica state could not be read.
    #[error("the persisted sync state of room '{room}' is corrupt: {reason}")]
    CorruptState {
        /// The room.
        room: String,
        /// Why.
        reason: String,
    },
    /// The client was closed before the server acknowledged the changes (they stay in
    /// the persisted offline queue and are sent by the next session).
    #[error("the sync client is closed; the changes stay queued for the next session")]
    Closed,
    /// The configuration cannot work.
    #[error("invalid sync configuration: {0}")]
    Config(String),
    /// The local database holds the sync state of another room.
    #[error(
        "this database syncs with room '{bound}' ({pending} changes waiting to be sent there), \
         not '{requested}': sync it with room '{bound}', or use another database for '{requested}'"
    )]
    RoomMismatch {
        /// The room the database is bound to.
        bound: String,
        /// The room that was asked for.
        requested: String,
        /// Local changes queued for the bound room.
        pending: usize,
    },
}

/// State shared by the handle, the connection task, the sink and the flush target.
pub(crate) struct Inner {
    pub(crate) config: SyncConfig,
    pub(crate) replica: Mutex<Replica>,
    /// The store; taken out when the client closes or its owner is dropped, so the
    /// store → feeder → client → store cycle does not outlive them.
    pub(crate) store: Mutex<Option<Store>>,
    pub(crate) status: watch::Sender<ConnectionStatus>,
    /// Bumped whenever acknowledgements may have advanced (wakes durability waiters).
    pub(crate) acked: watch::Sender<u64>,
    pub(crate) events: broadcast::Sender<SyncEvent>,
    /// The current session's outgoing queue (None while disconnected).
    pub(crate) outgoing: Mutex<Option<mpsc::UnboundedSender<ClientMessage>>>,
    /// The local flush engine: entity rows and the replica's bookkeeping, one transaction
    /// per batch.
    pub(crate) local: FlushEngine,
    /// True from the end of a catch-up until the connection ends.
    pub(crate) caught_up: watch::Sender<bool>,
    /// Remote changes applied to the store.
    pub(crate) pulled: std::sync::atomic::AtomicU64,
    /// Local changes (per entity) the server acknowledged.
    pub(crate) pushed: std::sync::atomic::AtomicU64,
    pub(crate) closed: AtomicBool,
    pub(crate) last_error: Mutex<Option<String>>,
    pub(crate) last_disconnect: Mutex<Option<String>>,
    /// Set when local entities predate the sync state: the first complete catch-up sends
    /// those the room lacks.
    pub(crate) adopt_local: AtomicBool,
    pub(crate) close_token: CancellationToken,
}

impl Inner {
    pub(crate) fn emit(&self, event: SyncEvent) {
        match &event {
            SyncEvent::Error { message, .. } => *self.last_error.lock() = Some(message.clone()),
            SyncEvent::Disconnected { reason } => {
                *self.last_disconnect.lock() = Some(reason.clone());
            }
            _ => {}
        }
        let _ = self.events.send(event);
    }

    pub(crate) fn set_status(&self, status: ConnectionStatus) {
        self.status.send_if_modified(|s| {
            let changed = *s != status;
            *s = status;
            changed
        });
    }

    pub(crate) fn wake_waiters(&self) {
        self.acked.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Schedules what changed in the replica state outside a store transaction (acks,
    /// counters) on the local engine. Under the replica lock, so deltas keep their order.
    pub(crate) fn persist_bookkeeping(&self) {
        let mut replica = self.replica.lock();
        self.schedule_with_delta(&mut replica, &[]);
    }

    /// Schedules `changes` (one store transaction; may be none) on the local engine with
    /// what changed in the replica state up to now. The caller holds the replica lock, so
    /// deltas are scheduled in the order the replica changed.
    pub(crate) fn schedule_with_delta(&self, replica: &mut Replica, changes: &[Change]) {
        let delta = replica.take_delta();
        if changes.is_empty() && delta.is_empty() {
            return;
        }
        self.local
            .schedule_annotated(changes, bookkeeping::annotations(delta));
    }

    /// Sends on the current session, if any (a message lost with a dying session stays in
    /// the outbox and is resent by the next).
    pub(crate) fn send(&self, messages: Vec<ClientMessage>) {
        if messages.is_empty() {
            return;
        }
        if let Some(tx) = self.outgoing.lock().as_ref() {
            for m in messages {
                let _ = tx.send(m);
            }
        }
    }
}

/// A running sync client (cheap to clone).
#[derive(Clone)]
pub struct SyncClient {
    inner: Arc<Inner>,
    tasks: Arc<Mutex<Tasks>>,
}

#[derive(Default)]
struct Tasks {
    session: Option<(CancellationToken, JoinHandle<()>)>,
}

impl std::fmt::Debug for SyncClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncClient")
            .field("room", &self.inner.config.room_id)
            .field("status", &self.connection_status())
            .field("offline_queue", &self.offline_queue_size())
            .finish_non_exhaustive()
    }
}

/// Builds the store described by `builder` over the local database `db` (hydrated from
/// it, flushing into it), wires it to a sync client for `config.room_id`, and starts
/// connecting. Must be called inside a tokio runtime.
///
/// The database remembers the room it syncs with: opening it for another room is refused
/// while it holds anything of the first ([`SyncError::RoomMismatch`]).
///
/// Shut down with [`SyncClient::close`] first, then [`Store::close`] (which writes the
/// last entity rows and bookkeeping).
///
/// # Errors
/// Database errors, an unreadable persisted sync state, another room's database, an
/// invalid flush config or stored entities the store's schema refuses.
pub async fn connect_store(
    builder: StoreBuilder,
    db: &Database,
    config: SyncConfig,
) -> Result<(Store, SyncClient), SyncError> {
    let mut config = config;
    if !config.ws_url.is_empty() {
        config.ws_url = sync_url(&config.ws_url)?;
    } else if config.connect_on_start {
        return Err(SyncError::Config(
            "no server address: set one, or use connect_on_start(false) to queue changes offline"
                .into(),
        ));
    }
    let mut tables = db.read_sync().await?;
    let legacy_room = if config.room_id.is_empty() {
        config.default_room.clone()
    } else {
        Some(config.room_id.clone())
    };
    if tables.is_empty()
        && let Some(room) = &legacy_room
        && bookkeeping::import_legacy(db, room).await?
    {
        tables = db.read_sync().await?;
    }
    let loaded = bookkeeping::load(&tables).map_err(|e| SyncError::CorruptState {
        room: config.room_id.clone(),
        reason: e.to_string(),
    })?;
    if config.room_id.is_empty() {
        config.room_id = loaded
            .room
            .clone()
            .or_else(|| config.default_room.clone())
            .ok_or_else(|| {
                SyncError::Config("name a room: this database syncs with none yet".into())
            })?;
    }
    let room = config.room_id.clone();
    let mut first_writes = Vec::new();
    let mut state = loaded.state;
    match &loaded.room {
        Some(bound) if *bound != room => {
            if !state.outbox.is_empty() || !state.known.is_empty() {
                return Err(SyncError::RoomMismatch {
                    bound: bound.clone(),
                    requested: room,
                    pending: state.outbox.len(),
                });
            }
            // Nothing of the other room is here: the database moves to this one.
            state = ReplicaState::default();
            first_writes.push(bookkeeping::state_annotation(
                bookkeeping::KEY_ROOM,
                room.clone(),
            ));
        }
        Some(_) => {}
        None => first_writes.push(bookkeeping::state_annotation(
            bookkeeping::KEY_ROOM,
            room.clone(),
        )),
    }
    // A copy of another installation's file (or one restored from elsewhere) must not
    // speak as that installation: it gets a replica id of its own, and its queued
    // changes are restamped as this replica's edits (`Replica::restore`).
    let actual_file = bookkeeping::file_id(db).await;
    let copied = matches!((&loaded.file_id, &actual_file), (Some(was), Some(is)) if was != is);
    if let Some(file) = &actual_file
        && loaded.file_id.as_ref() != Some(file)
    {
        first_writes.push(bookkeeping::state_annotation(
            bookkeeping::KEY_FILE_ID,
            file.clone(),
        ));
    }
    let stored_id = if copied {
        tracing::info!(
            file = db.target(),
            "this database was copied from another installation: it gets its own replica id"
        );
        None
    } else {
        loaded.replica_id
    };
    let replica_id = match (&config.replica_id, stored_id) {
        (Some(id), stored) => {
            if stored.as_ref() != Some(id) {
                first_writes.push(bookkeeping::state_annotation(
                    bookkeeping::KEY_REPLICA_ID,
                    id.clone(),
                ));
            }
            id.clone()
        }
        (None, Some(stored)) => stored,
        (None, None) => {
            let id = format!("{}-{:016x}", config.user_id, rand::random::<u64>());
            first_writes.push(bookkeeping::state_annotation(
                bookkeeping::KEY_REPLICA_ID,
                id.clone(),
            ));
            id
        }
    };
    let mut rc = ReplicaConfig::new(&config.room_id, &config.user_id, replica_id);
    rc.incarnation = rand::random::<u64>();
    rc.auth_token.clone_from(&config.auth_token);
    rc.resend_after = millis(config.resend_after);
    rc.heartbeat_interval = millis(config.heartbeat_interval);
    rc.outbox_limit = config.outbox_limit;
    // A sync state that knows nothing (a database used locally so far, or restored from a
    // backup) over entities that exist: after the first complete catch-up, the entities
    // the room does not have are sent to it, so nothing stays stranded on this client.
    let fresh = state.watermark == 0 && state.outbox.is_empty() && state.known.is_empty();
    let replica = Replica::restore(rc, state);

    let local_target: Arc<dyn FlushTarget> = Arc::new(bookkeeping::LocalTarget(db.clone()));
    let local = FlushEngine::spawn(local_target, config.local_flush.clone())?;
    if !first_writes.is_empty() {
        local.schedule_annotated(&[], first_writes);
    }
    let inner = Arc::new(Inner {
        replica: Mutex::new(replica),
        store: Mutex::new(None),
        status: watch::Sender::new(ConnectionStatus::Disconnected),
        acked: watch::Sender::new(0),
        events: broadcast::channel(1024).0,
        outgoing: Mutex::new(None),
        local: local.clone(),
        caught_up: watch::Sender::new(false),
        pulled: std::sync::atomic::AtomicU64::new(0),
        pushed: std::sync::atomic::AtomicU64::new(0),
        closed: AtomicBool::new(false),
        last_error: Mutex::new(None),
        last_disconnect: Mutex::new(None),
        adopt_local: AtomicBool::new(false),
        close_token: CancellationToken::new(),
        config,
    });
    let server_target: Arc<dyn FlushTarget> = Arc::new(wiring::ServerTarget(Arc::clone(&inner)));
    let server = FlushEngine::spawn(
        server_target,
        inner
            .config
            .server_flush
            .clone()
            .durability(Durability::Server),
    )?;
    if inner.replica.lock().outbox_len() > 0 {
        // Changes from an earlier session wait in the restored offline queue. The server
        // engine never saw them, so give it a marker: its batch completes only once the
        // server acknowledged everything queued so far, and `durable(Server)` waits for it.
        server.schedule(queued_marker(&inner.config.room_id));
    }
    // The server refuses a NUL character anywhere in an entity: accepted here, such a
    // change would sit in the outbox forever. Refused at write time instead.
    let store = builder
        .refuse_nul(true)
        .flush_engine_via(local, Arc::new(wiring::Feeder(Arc::clone(&inner))))
        .flush_engine(server)
        .build();
    let entities = db
        .get_all()
        .await?
        .into_iter()
        .filter(|e| !e.kind.starts_with(INTERNAL_KIND_PREFIX));
    let hydrated = store.hydrate(entities)?;
    inner
        .adopt_local
        .store(fresh && hydrated > 0, Ordering::Release);
    *inner.store.lock() = Some(store.clone());

    let client = SyncClient {
        inner,
        tasks: Arc::new(Mutex::new(Tasks { session: None })),
    };
    if client.inner.config.connect_on_start {
        client.connect();
    }
    Ok((store, client))
}

/// The change that stands, on the server-durability engine, for everything queued in the
/// replica so far (see [`QUEUED_MARKER_KIND`]).
fn queued_marker(room: &str) -> Change {
    Change::delete(
        Kind::from(QUEUED_MARKER_KIND),
        EntityId::from(room),
        kalphite::now_millis(),
        Origin::Local,
    )
}

/// Makes the store's server-durability engine wait for everything queued in the replica
/// so far (changes that did not come through the store: entities sent back after a
/// resync).
pub(crate) fn wait_for_queued(store: &Store, room: &str) {
    for engine in store.flush_engines() {
        if engine.config().durability == Durability::Server {
            engine.schedule(queued_marker(room));
        }
    }
}

/// `ws://host:port` → `ws://host:port/sync`; a URL with a path is kept; anything but
/// `ws://` or `wss://` is refused with a hint. Several addresses separated by commas (the
/// nodes of a cluster) are each normalized.
///
/// # Errors
/// [`SyncError::Config`] for an empty URL, `http(s)://` (with the `ws(s)://` form to use),
/// or another scheme.
pub fn sync_url(url: &str) -> Result<String, SyncError> {
    // Several servers (the nodes of a cluster), separated by commas: each normalized.
    if url.contains(',') {
        let urls = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(one_sync_url)
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(urls.join(","));
    }
    one_sync_url(url)
}

/// [`sync_url`] of one address.
fn one_sync_url(url: &str) -> Result<String, SyncError> {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(SyncError::Config(format!(
            "'{url}' is not a server address: use ws://HOST:PORT"
        )));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "ws" | "wss" => {}
        "http" | "https" => {
            let ws = if scheme.eq_ignore_ascii_case("https") {
                "wss"
            } else {
                "ws"
            };
            return Err(SyncError::Config(format!(
                "'{url}' is an HTTP address; the sync server speaks WebSocket: use {ws}://{rest}"
            )));
        }
        other => {
            return Err(SyncError::Config(format!(
                "unsupported scheme '{other}' in '{url}': use ws://HOST:PORT or wss://HOST:PORT"
            )));
        }
    }
    if rest.is_empty() || rest.starts_with('/') {
        return Err(SyncError::Config(format!(
            "'{url}' names no host: use ws://HOST:PORT"
        )));
    }
    Ok(match rest.split_once('/') {
        Some((_, path)) if !path.is_empty() => url.to_owned(),
        _ => format!("{}/sync", url.trim_end_matches('/')),
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl SyncClient {
    /// Starts connecting (and reconnecting) if not already doing so.
    pub fn connect(&self) {
        if self.inner.closed.load(Ordering::Acquire) {
            return;
        }
        if self.inner.config.ws_url.is_empty() {
            self.inner.emit(SyncEvent::Error {
                code: None,
                message: "no server address to connect to".into(),
            });
            return;
        }
        let mut tasks = self.tasks.lock();
        if let Some((_, handle)) = &tasks.session
            && !handle.is_finished()
        {
            return;
        }
        self.inner.set_status(ConnectionStatus::Connecting);
        let token = self.inner.close_token.child_token();
        let handle = tokio::spawn(session::run(Arc::clone(&self.inner), token.clone()));
        tasks.session = Some((token, handle));
    }

    /// Closes the connection and stops reconnecting; local changes keep queueing (and
    /// persisting) until [`Self::connect`].
    pub async fn disconnect(&self) {
        let session = self.tasks.lock().session.take();
        if let Some((token, handle)) = session {
            token.cancel();
            let _ = handle.await;
        }
        self.inner.set_status(ConnectionStatus::Disconnected);
    }

    /// Disconnects and stops; what changed in the sync state is already queued on the
    /// local flush engine ([`Store::close`] writes it). Pending `durable(Server)` waits
    /// fail with [`SyncError::Closed`].
    pub async fn close(&self) {
        self.disconnect().await;
        self.inner.closed.store(true, Ordering::Release);
        self.inner.close_token.cancel();
        self.inner.persist_bookkeeping();
        self.inner.wake_waiters();
        self.inner.store.lock().take();
    }

    /// Where the connection stands.
    #[must_use]
    pub fn connection_status(&self) -> ConnectionStatus {
        *self.inner.status.borrow()
    }

    /// The message of the last error event (refused token, gave up reconnecting, …).
    #[must_use]
    pub fn last_error(&self) -> Option<String> {
        self.inner.last_error.lock().clone()
    }

    /// Why the last connection ended (or could not be made), if one did.
    #[must_use]
    pub fn last_disconnect(&self) -> Option<String> {
        self.inner.last_disconnect.lock().clone()
    }

    /// A receiver that sees every status change.
    #[must_use]
    pub fn status_watch(&self) -> watch::Receiver<ConnectionStatus> {
        self.inner.status.subscribe()
    }

    /// Entities with local changes the server has not acknowledged yet.
    #[must_use]
    pub fn offline_queue_size(&self) -> usize {
        self.inner.replica.lock().outbox_len()
    }

    /// This client's replica id.
    #[must_use]
    pub fn replica_id(&self) -> String {
        self.inner.replica.lock().config().replica_id.clone()
    }

    /// What moved since the client started.
    #[must_use]
    pub fn stats(&self) -> SyncStats {
        SyncStats {
            pulled: self.inner.pulled.load(Ordering::Relaxed),
            pushed: self.inner.pushed.load(Ordering::Relaxed),
        }
    }

    /// Resolves once the current connection has caught up with the room (at once if it
    /// has). Never resolves while offline: wrap it in a timeout.
    pub async fn caught_up(&self) {
        let mut rx = self.inner.caught_up.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Whether the current connection has caught up with the room.
    #[must_use]
    pub fn is_caught_up(&self) -> bool {
        *self.inner.caught_up.borrow()
    }

    /// The room this client syncs with.
    #[must_use]
    pub fn room(&self) -> &str {
        &self.inner.config.room_id
    }

    /// The room version up to which this client has everything.
    #[must_use]
    pub fn room_version(&self) -> u64 {
        self.inner.replica.lock().watermark()
    }

    /// The store this client syncs (`None` once closed).
    #[must_use]
    pub fn store(&self) -> Option<Store> {
        self.inner.store.lock().clone()
    }

    /// The sequence number of the latest local change (see
    /// [`Replica::last_seq`](kalphite_sync::Replica::last_seq)).
    #[must_use]
    pub fn last_seq(&self) -> u64 {
        self.inner.replica.lock().last_seq()
    }

    /// Local changes up to sequence number `upto` that the server will not get: refused
    /// before they were queued or rejected by the server for good (see
    /// [`Undelivered`]).
    #[must_use]
    pub fn undelivered_through(&self, upto: u64) -> Vec<kalphite_sync::Undelivered> {
        self.inner.replica.lock().undelivered_through(upto)
    }

    /// Stops at once, without waiting (for `Drop`): no more reconnects, what changed in the
    /// sync state is scheduled on the local engine, and the client lets go of the store.
    pub(crate) fn shut_down_now(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.close_token.cancel();
        self.inner.persist_bookkeeping();
        self.inner.wake_waiters();
        self.inner.store.lock().take();
    }

    /// Events from now on, as an async stream (connected, disconnected, remote change,
    /// ack, conflict, error).
    pub fn events(&self) -> BoxStream<'static, SyncEvent> {
        let rx = self.inner.events.subscribe();
        futures_util::stream::unfold(rx, |mut rx| async move {
            match rx.recv().await {
                Ok(event) => Some((event, rx)),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    Some((SyncEvent::Lagged { missed }, rx))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            }
        })
        .boxed()
    }
}

/// True for changes the client sends (local edits).
pub(crate) fn is_local(change: &Change) -> bool {
    change.origin == Origin::Local
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_servers_are_each_normalized_and_each_checked() {
        assert_eq!(
            sync_url("ws://a:1, ws://b:2/sync ,").expect("two servers"),
            "ws://a:1/sync,ws://b:2/sync"
        );
        assert_eq!(sync_url("ws://a:1").expect("one"), "ws://a:1/sync");
        let err = sync_url("ws://a:1,http://b:2").expect_err("an http address");
        assert!(err.to_string().contains("ws://b:2"), "{err}");
    }
}
