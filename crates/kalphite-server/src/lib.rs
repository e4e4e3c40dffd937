//! The WebSocket sync server: an axum adapter around the sans-IO [`Room`]. One task per
//! connection; one [`Room`] per room id behind an async mutex (a room handles one message
//! at a time, rooms are independent); every accepted change is written to the durable room
//! log ([`kalphite_db::Database`]) before it is acknowledged or broadcast.
//!
//! Routes: `/sync` (WebSocket), `/healthz`, `/metrics` (Prometheus text).
//!
//! Every connection is bounded: a socket must finish its HTTP request within the header
//! timeout, the server holds at most [`ServerConfig::max_connections`] sync connections
//! (and [`ServerConfig::max_connections_per_user`] per user), a client that stops reading
//! is disconnected when its queue goes over [`ServerConfig::outbound_queue_bytes`] or a
//! write stalls for [`ServerConfig::write_timeout`], and shutdown takes at most
//! [`ServerConfig::shutdown_grace`] whatever clients do.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use kalphite_db::{Database, DatabaseConfig};
//! use kalphite_server::{run, ServerConfig};
//! let db = Database::open(DatabaseConfig::new("sqlite:./rooms.db")).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8787").await?;
//! // At least 32 bytes (`MIN_SECRET_BYTES`); `run` refuses a shorter secret.
//! let config = ServerConfig::new(db).token_secret(std::fs::read("kalphite.secret")?);
//! run(listener, config, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

// Library code does not unwrap (tests may); the other lints are in the workspace Cargo.toml.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod auth;
mod cluster;
mod conn;
mod forward;
mod limits;
mod listener;
mod log;
mod metrics;
mod outbox;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Utf8Bytes, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kalphite::SharedSchema;
use kalphite_db::Database;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use kalphite_sync::{CatchUpStream, ConflictPolicy, ConnId, Recipient, Room, RoomLimits};

pub use auth::{
    AuthError, Claims, MIN_SECRET_BYTES, WeakSecret, check_secret, encode_claims, issue_token,
    verify_token,
};
pub use cluster::{ClusterConfig, DEFAULT_LEASE_TTL};
pub use log::{LogError, ROOM_KIND_PREFIX, ROOM_META_KIND, renew_room_epochs_in};
pub use metrics::{ClusterMetrics, Metrics, resident_bytes};

use cluster::Cluster;
use limits::{Budgets, ConnectionPermit};
use listener::{BoundedListener, Peer, SocketLimits};
use log::RoomLog;
use outbox::{Outbox, Pushed};

/// Frames queued for a connection are buffered up to this size, then written together.
const WRITE_BUFFER_BYTES: usize = 16 * 1024;

/// Default of [`ServerConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Default of [`ServerConfig::max_connections_per_user`].
pub const DEFAULT_MAX_CONNECTIONS_PER_USER: usize = 64;

/// Sockets the server accepts beyond [`ServerConfig::max_connections`], so `/healthz` and
/// `/metrics` still answer when every WebSocket slot is taken (they are never upgraded).
/// Sockets that send nothing can hold them too, until the header timeout closes them.
pub const RESERVED_HTTP_SOCKETS: usize = 16;

/// Per-connection message rate limit: a token bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained messages per second.
    pub per_second: u32,
    /// Messages allowed in a burst above the sustained rate.
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            per_second: 1_000,
            burst: 2_000,
        }
    }
}

/// How the server runs.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Where the room log lives (SQLite by default, PostgreSQL for shared deployments).
    /// One server per database: [`run`] takes the database's writer lock before serving
    /// and refuses to start ([`ServerError::DatabaseBusy`]) while another process holds
    /// it. Opening it with `DatabaseConfig::writer_lock(true)` (as `kalphite serve` does)
    /// refuses a second server earlier, before it migrates anything.
    pub database: Database,
    /// The HS256 secret that room tokens are signed with: at least [`MIN_SECRET_BYTES`]
    /// bytes, or [`run`] refuses to start.
    pub token_secret: Option<Vec<u8>>,
    /// Explicit open mode: hellos without a token may join any room as the user they
    /// claim. Off by default.
    pub open: bool,
    /// How concurrent edits are resolved (per room, the same for all rooms).
    pub policy: ConflictPolicy,
    /// Validates incoming entities (optional).
    pub schema: Option<SharedSchema>,
    /// Largest frame answered normally; a larger one gets an `oversized` error.
    pub max_frame_bytes: usize,
    /// Frames above this are not read at all: the connection is closed (code 1009).
    pub hard_frame_bytes: usize,
    /// Largest frame the server sends (default [`kalphite_sync::MAX_SERVER_FRAME_BYTES`],
    /// what clients must accept); a larger one is not sent: its recipient gets an
    /// `internal` error and close 1011.
    pub max_server_frame_bytes: usize,
    /// Per-connection message rate.
    pub rate_limit: RateLimit,
    /// A connection silent this long is closed (clients send heartbeats).
    pub idle_timeout: Duration,
    /// Most frames queued for one connection (acks, broadcasts, replies; not the catch-up
    /// sent after its hello); a client that falls further behind is disconnected (close
    /// 1008; it catches up when it reconnects).
    pub outbound_queue: usize,
    /// Most bytes of those frames queued for one connection (default 8 MiB). Past it the
    /// client is disconnected (close 1008) and its queue freed at once; a broadcast never
    /// waits for a slow member. One frame is always accepted into an empty queue.
    pub outbound_queue_bytes: usize,
    /// A write to a connection that makes no progress for this long (the client stopped
    /// reading) ends it (default 10 s); its queue is freed.
    pub write_timeout: Duration,
    /// A socket must send a complete HTTP request within this after it connects (and the
    /// next one within this after a response), and a WebSocket its hello within this
    /// after the upgrade; otherwise it is closed (default 10 s).
    pub handshake_timeout: Duration,
    /// Most WebSocket connections at once (default [`DEFAULT_MAX_CONNECTIONS`]); beyond it
    /// an upgrade is answered `503`. The server holds at most this many sockets plus
    /// [`RESERVED_HTTP_SOCKETS`] and closes any other at once; at start the limit is
    /// lowered (with a warning) to fit the process's open-file limit.
    pub max_connections: usize,
    /// Most connections one user (the token's subject) may hold at once (default
    /// [`DEFAULT_MAX_CONNECTIONS_PER_USER`]); a hello beyond it is refused with
    /// `too_many_connections` and close 1008.
    pub max_connections_per_user: usize,
    /// How long shutdown waits for connections to close (default 5 s); any still open
    /// then are dropped. In-flight room-log writes always finish.
    pub shutdown_grace: Duration,
    /// WebSocket read buffer per connection (bytes); small keeps idle connections cheap.
    pub read_buffer_bytes: usize,
    /// Catch-up page size and per-entity history kept for merges.
    pub room_limits: RoomLimits,
    /// A room with no connection and no write in flight for this long is unloaded from
    /// memory (default 60 s); the next hello restores it from the log. Bounds the memory of
    /// a long-running server by its active rooms, not by every room it ever served.
    pub room_unload_after: Duration,
    /// Cluster mode (PostgreSQL only): this server is one node of several on one database;
    /// each room is served by the node holding its lease, the others forward its
    /// connections there. `None` (the default): the only server of its database.
    pub cluster: Option<ClusterConfig>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("database", &self.database)
            .field(
                "token_secret",
                &self.token_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("open", &self.open)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("rate_limit", &self.rate_limit)
            .field("idle_timeout", &self.idle_timeout)
            .field("outbound_queue_bytes", &self.outbound_queue_bytes)
            .field("write_timeout", &self.write_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_user", &self.max_connections_per_user)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl ServerConfig {
    /// Defaults: no token secret (so nobody can join until one is set or open mode is
    /// on), last-write-wins, 1 MiB frames, 1000 msg/s per connection (burst 2000), 120 s
    /// idle timeout, 8 MiB outbound queue per connection, 10 s write and header timeouts,
    /// 10 000 connections (64 per user), 5 s shutdown grace.
    #[must_use]
    pub fn new(database: Database) -> Self {
        Self {
            database,
            token_secret: None,
            open: false,
            policy: ConflictPolicy::default(),
            schema: None,
            max_frame_bytes: kalphite_sync::DEFAULT_MAX_FRAME_BYTES,
            hard_frame_bytes: 4 * kalphite_sync::DEFAULT_MAX_FRAME_BYTES,
            max_server_frame_bytes: kalphite_sync::MAX_SERVER_FRAME_BYTES,
            rate_limit: RateLimit::default(),
            idle_timeout: Duration::from_mins(2),
            outbound_queue: 16_384,
            outbound_queue_bytes: 8 << 20,
            write_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_user: DEFAULT_MAX_CONNECTIONS_PER_USER,
            shutdown_grace: Duration::from_secs(5),
            read_buffer_bytes: 1_024,
            room_limits: RoomLimits::default(),
            room_unload_after: Duration::from_mins(1),
            cluster: None,
        }
    }

    /// Runs the server as a node of a cluster (see [`ClusterConfig`]).
    #[must_use]
    pub fn cluster(mut self, cluster: ClusterConfig) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Sets the token secret (at least [`MIN_SECRET_BYTES`] bytes; checked by
    /// [`ServerConfig::validate`]).
    #[must_use]
    pub fn token_secret(mut self, secret: impl Into<Vec<u8>>) -> Self {
        self.token_secret = Some(secret.into());
        self
    }

    /// Turns explicit open mode on or off.
    #[must_use]
    pub fn open(mut self, on: bool) -> Self {
        self.open = on;
        self
    }

    /// Sets the conflict policy.
    #[must_use]
    pub fn policy(mut self, policy: ConflictPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the schema incoming entities are validated against.
    #[must_use]
    pub fn schema(mut self, schema: SharedSchema) -> Self {
        self.schema = Some(schema);
        self
    }

    /// Sets the frame limit (the hard limit becomes 4× it, at least 64 KiB).
    #[must_use]
    pub fn max_frame_bytes(mut self, bytes: usize) -> Self {
        self.max_frame_bytes = bytes;
        self.hard_frame_bytes = bytes.saturating_mul(4).max(64 * 1024);
        self
    }

    /// Sets the largest frame the server sends (what its clients accept).
    #[must_use]
    pub fn max_server_frame_bytes(mut self, bytes: usize) -> Self {
        self.max_server_frame_bytes = bytes;
        self
    }

    /// Sets the per-connection rate limit.
    #[must_use]
    pub fn rate_limit(mut self, per_second: u32, burst: u32) -> Self {
        self.rate_limit = RateLimit { per_second, burst };
        self
    }

    /// Sets the idle timeout.
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets the byte bound of each connection's outbound queue.
    #[must_use]
    pub fn outbound_queue_bytes(mut self, bytes: usize) -> Self {
        self.outbound_queue_bytes = bytes;
        self
    }

    /// Sets the write timeout.
    #[must_use]
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// Sets the header (and hello) timeout.
    #[must_use]
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets the most WebSocket connections at once.
    #[must_use]
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// Sets the most connections one user may hold.
    #[must_use]
    pub fn max_connections_per_user(mut self, n: usize) -> Self {
        self.max_connections_per_user = n;
        self
    }

    /// Sets how long an unused room stays in memory.
    #[must_use]
    pub fn room_unload_after(mut self, after: Duration) -> Self {
        self.room_unload_after = after;
        self
    }

    /// Sets how long shutdown waits for connections before dropping them.
    #[must_use]
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Checks that the configuration can work; [`run`] does this before serving.
    ///
    /// # Errors
    /// [`ServerError::WeakSecret`] for a token secret shorter than [`MIN_SECRET_BYTES`],
    /// [`ServerError::Config`] for unusable limits.
    pub fn validate(&self) -> Result<(), ServerError> {
        if let Some(secret) = &self.token_secret {
            check_secret(secret)?;
        }
        if self.max_frame_bytes == 0 || self.hard_frame_bytes < self.max_frame_bytes {
            return Err(ServerError::Config(
                "max_frame_bytes must be positive and at most hard_frame_bytes".into(),
            ));
        }
        if self.outbound_queue == 0
            || self.outbound_queue_bytes == 0
            || self.rate_limit.per_second == 0
        {
            return Err(ServerError::Config(
                "outbound_queue, outbound_queue_bytes and rate_limit.per_second must be positive"
                    .into(),
            ));
        }
        if self.max_connections == 0 || self.max_connections_per_user == 0 {
            return Err(ServerError::Config(
                "max_connections and max_connections_per_user must be at least 1".into(),
            ));
        }
        if self.write_timeout.is_zero()
            || self.handshake_timeout.is_zero()
            || self.room_unload_after.is_zero()
        {
            return Err(ServerError::Config(
                "write_timeout, handshake_timeout and room_unload_after must be positive".into(),
            ));
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        Ok(())
    }
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Accepting or serving failed.
    #[error("server I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The configuration cannot work.
    #[error("invalid server configuration: {0}")]
    Config(String),
    /// The token secret is too short: tokens signed with it could be forged.
    #[error(transparent)]
    WeakSecret(#[from] WeakSecret),
    /// Another process holds the database's writer lock (another server on the same
    /// SQLite file or PostgreSQL schema): two servers on one room log would corrupt it.
    /// The message names the holder when it is known.
    #[error("{0}")]
    DatabaseBusy(#[source] kalphite_db::Error),
    /// The database's writer lock could not be taken at all (the lock file or the
    /// PostgreSQL connection failed).
    #[error("cannot take the database's writer lock: {0}")]
    WriterLock(#[source] kalphite_db::Error),
    /// Cluster mode could not start: the database is not PostgreSQL, another live node
    /// has this node's id, or the cluster tables could not be reached.
    #[error("cannot join the cluster: {0}")]
    Cluster(#[source] kalphite_db::Error),
}

/// What the room sends: an encoded frame and who gets it, or a joiner's catch-up.
pub(crate) enum Frame {
    /// An encoded message.
    Text {
        to: Recipient,
        text: Utf8Bytes,
        /// False for the welcome, which does not count against the recipient's queue
        /// bounds (catch-up is the room's size, sent once).
        live: bool,
    },
    /// The catch-up of a join, for its connection (right behind its welcome): a snapshot
    /// whose pages that connection encodes one at a time as its socket takes them.
    CatchUp(Box<CatchUpStream>),
}

/// One room: the state machine (behind an async mutex: one message at a time), the
/// outbound queues of its members (a short sync lock, also taken by the log writer when
/// it delivers), and whether a failed write reset it.
pub(crate) struct RoomHandle {
    pub(crate) id: String,
    /// `None` until the first hello restores the room from the log.
    pub(crate) state: tokio::sync::Mutex<Option<Room>>,
    /// Connections that receive the room's frames.
    pub(crate) members: parking_lot::Mutex<HashMap<ConnId, Arc<Outbox>>>,
    /// Connections whose welcome is queued in the log behind earlier frames of the room:
    /// each becomes a member when its welcome is delivered, so it never receives a change
    /// committed before it joined (its catch-up holds that) ahead of its welcome.
    pub(crate) joining: parking_lot::Mutex<HashMap<ConnId, Arc<Outbox>>>,
    poisoned: AtomicBool,
    /// Since when nothing but the room map has held this handle, as seen by the unload
    /// sweeps (see [`Shared::unload_idle`]).
    unused_since: parking_lot::Mutex<Option<tokio::time::Instant>>,
    /// Cluster mode: the lease this node serves the room under (`None` on a single server).
    lease: parking_lot::Mutex<Option<RoomLease>>,
}

/// The lease a cluster node holds a room under, and what its commits are fenced with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RoomLease {
    pub(crate) term: i64,
    /// The room's version in the lease row, as of this node's last commit (the next
    /// commit's fence expects it).
    pub(crate) row_version: Option<i64>,
}

impl RoomHandle {
    fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            state: tokio::sync::Mutex::new(None),
            members: parking_lot::Mutex::new(HashMap::new()),
            joining: parking_lot::Mutex::new(HashMap::new()),
            poisoned: AtomicBool::new(false),
            unused_since: parking_lot::Mutex::new(None),
            lease: parking_lot::Mutex::new(None),
        }
    }

    /// The term of the lease this node serves the room under (cluster mode).
    pub(crate) fn term(&self) -> Option<i64> {
        self.lease.lock().map(|l| l.term)
    }

    pub(crate) fn lease(&self) -> Option<RoomLease> {
        *self.lease.lock()
    }

    pub(crate) fn set_lease(&self, lease: Option<RoomLease>) {
        *self.lease.lock() = lease;
    }

    /// This node lost the room's lease: every member is closed with 1001 after what is
    /// queued for it (all of it committed under the lease), and the handle is retired like
    /// a reset one (its unwritten jobs are dropped; the next hello acquires anew).
    pub(crate) fn moved(&self) {
        if !self.poisoned.swap(true, Ordering::AcqRel) {
            tracing::warn!(room = %self.id, "room lease lost: closing its connections");
            for (_, outbox) in self.members.lock().drain() {
                outbox.close_for(outbox::Closed::Moved);
            }
            for (_, outbox) in self.joining.lock().drain() {
                outbox.close_for(outbox::Closed::Moved);
            }
        }
    }

    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// A write of this room failed: its in-memory state is ahead of the log. Drops every
    /// member (their connections close; clients reconnect and catch up from the log).
    pub(crate) fn poison(&self) {
        if !self.poisoned.swap(true, Ordering::AcqRel) {
            tracing::warn!(room = %self.id, "room reset after a failed write");
            for (_, outbox) in self.members.lock().drain() {
                outbox.close();
            }
            for (_, outbox) in self.joining.lock().drain() {
                outbox.close();
            }
        }
    }

    /// Queues each frame for its recipients; never waits. A member whose queue goes over
    /// its bound is dropped, its queue freed (its connection closes; it catches up when it
    /// reconnects); a member whose queue was closed is removed.
    pub(crate) fn deliver(&self, frames: Vec<Frame>, metrics: &Metrics) {
        let mut members = self.members.lock();
        let mut gone = Vec::new();
        for frame in frames {
            let (conn, pushed) = match frame {
                Frame::Text {
                    to: Recipient::AllExcept(except),
                    text,
                    live,
                } => {
                    for (conn, outbox) in members.iter() {
                        if *conn != except {
                            let pushed = outbox.push_frame(text.clone(), live);
                            if pushed != Pushed::Queued {
                                gone.push((*conn, pushed));
                            }
                        }
                    }
                    continue;
                }
                Frame::Text {
                    to: Recipient::One(conn),
                    text,
                    live,
                } => {
                    let Some(outbox) = self.member(&mut members, conn) else {
                        continue;
                    };
                    (conn, outbox.push_frame(text, live))
                }
                Frame::CatchUp(pages) => {
                    let conn = pages.conn();
                    let Some(outbox) = self.member(&mut members, conn) else {
                        continue;
                    };
                    (conn, outbox.push_catch_up(pages))
                }
            };
            if pushed != Pushed::Queued {
                gone.push((conn, pushed));
            }
        }
        for (conn, pushed) in gone {
            if members.remove(&conn).is_some() && pushed == Pushed::Overflow {
                Metrics::inc(&metrics.slow_consumers);
                tracing::warn!(room = %self.id, conn, "dropping a connection that fell behind");
            }
        }
    }

    /// The queue of member `conn`. A joining connection becomes a member here, at its
    /// first frame (its welcome): from then on it receives the room's frames.
    fn member<'m>(
        &self,
        members: &'m mut HashMap<ConnId, Arc<Outbox>>,
        conn: ConnId,
    ) -> Option<&'m Arc<Outbox>> {
        if !members.contains_key(&conn)
            && let Some(outbox) = self.joining.lock().remove(&conn)
        {
            members.insert(conn, outbox);
        }
        members.get(&conn)
    }
}

/// What every connection task shares.
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) log: RoomLog,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) rooms: parking_lot::Mutex<HashMap<String, Arc<RoomHandle>>>,
    pub(crate) next_conn: AtomicU64,
    /// WebSocket and per-user connection slots.
    pub(crate) budgets: Arc<Budgets>,
    /// Shutdown has begun: stop accepting, close every connection.
    pub(crate) cancel: CancellationToken,
    /// Shutdown's grace period is over: drop what is left.
    pub(crate) stop: CancellationToken,
    /// The connection tasks (the room-log writer is tracked apart: it always finishes).
    pub(crate) conn_tasks: TaskTracker,
    /// Cluster mode: this node's leases.
    pub(crate) cluster: Option<Arc<Cluster>>,
}

impl Shared {
    /// The handle of `room`, created empty on first use (and again after a reset).
    pub(crate) fn room(&self, room: &str) -> Arc<RoomHandle> {
        let mut rooms = self.rooms.lock();
        if let Some(handle) = rooms.get(room)
            && !handle.is_poisoned()
        {
            return Arc::clone(handle);
        }
        let handle = Arc::new(RoomHandle::new(room));
        if rooms.insert(room.to_owned(), Arc::clone(&handle)).is_none() {
            Metrics::inc(&self.metrics.rooms);
        }
        handle
    }

    /// Unloads every room that nothing but the room map has held since `unused_before`
    /// (as observed by earlier sweeps); returns them. A handle is only handed out by
    /// [`Shared::room`], under the map's lock, and held by each of the room's connections
    /// and by each of its log jobs in flight, so a handle whose only holder is the map
    /// (checked under that lock) has no member, no joining connection and no unwritten
    /// change: dropping it loses nothing, and the next hello restores the room from the log.
    pub(crate) fn unload_idle(
        &self,
        now: tokio::time::Instant,
        unused_for: Duration,
    ) -> Vec<Arc<RoomHandle>> {
        let mut rooms = self.rooms.lock();
        let mut unloaded = Vec::new();
        rooms.retain(|_, handle| {
            let mut since = handle.unused_since.lock();
            if Arc::strong_count(handle) > 1 {
                *since = None;
                return true;
            }
            let first_seen = *since.get_or_insert(now);
            let keep = now.saturating_duration_since(first_seen) < unused_for;
            if !keep {
                unloaded.push(Arc::clone(handle));
            }
            keep
        });
        if !unloaded.is_empty() {
            if rooms.capacity() > 64 && rooms.len() < rooms.capacity() / 4 {
                rooms.shrink_to_fit();
            }
            self.metrics
                .rooms
                .fetch_sub(unloaded.len() as u64, Ordering::Relaxed);
            Metrics::add(&self.metrics.rooms_unloaded, unloaded.len() as u64);
        }
        unloaded
    }

    /// A fresh room restored from the log.
    ///
    /// The room's identity comes with it. A room without one gets a new epoch, written
    /// before this returns (so before any welcome carries it): a new room, or one whose
    /// history was lost (its clients resync and send back what they hold). Tombstones past
    /// the horizon are collected here, and leave the log in the same transaction that
    /// moves the room's horizon.
    ///
    /// On a cluster node, `lease` is the lease just acquired: a lease row without a version
    /// (a new room, or one written before cluster mode) gets the log's, and the writes made
    /// here are fenced by the lease. Returns the lease as it stands after them.
    pub(crate) async fn load_room(
        &self,
        id: &str,
        lease: Option<RoomLease>,
    ) -> Result<(Room, Option<RoomLease>), String> {
        let records = self.log.load(id).await.map_err(|e| e.to_string())?;
        let stored_meta = self.log.load_meta(id).await.map_err(|e| e.to_string())?;
        let fresh = stored_meta.is_none();
        let meta = stored_meta.unwrap_or_else(|| kalphite_sync::RoomMeta::new(log::new_epoch()));
        if fresh && !records.is_empty() {
            tracing::warn!(
                room = id,
                records = records.len(),
                epoch = %meta.epoch,
                "room log without an identity (written by an older version, or restored \
                 without one): new epoch; clients of another epoch resync"
            );
        }
        let mut room = Room::new(id, self.config.policy.clone())
            .with_limits(self.config.room_limits)
            .with_meta(meta);
        if let Some(schema) = &self.config.schema {
            room = room.with_schema(Arc::clone(schema));
        }
        let n = records.len();
        let mut room = room.restore(records).map_err(|e| e.to_string())?;
        let lease = match lease {
            Some(lease) => Some(self.fence_start(id, lease, room.version()).await?),
            None => None,
        };
        let collected = room.collect_tombstones(kalphite::now_millis());
        if (fresh || !collected.is_empty())
            && let Some(meta) = room.meta()
        {
            self.log
                .save_meta(id, meta, &collected, lease)
                .await
                .map_err(|e| e.to_string())?;
        }
        tracing::debug!(
            room = id,
            records = n,
            collected = collected.len(),
            version = room.version(),
            "room restored"
        );
        Ok((room, lease))
    }

    /// The lease a freshly loaded room is served under: its row's version set to the log's
    /// `version` if the row has none yet (fenced by the term: an error if the lease is
    /// already lost).
    async fn fence_start(
        &self,
        id: &str,
        lease: RoomLease,
        version: u64,
    ) -> Result<RoomLease, String> {
        let version = i64::try_from(version).map_err(|e| e.to_string())?;
        match lease.row_version {
            Some(row) => {
                if row != version {
                    tracing::warn!(
                        room = id,
                        lease_row = row,
                        log = version,
                        "the room's lease row and its log disagree on its version (the log was \
                         written outside cluster mode?): serving the log's"
                    );
                }
                Ok(lease)
            }
            None => {
                self.config
                    .database
                    .init_room_version(id, lease.term, version)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(RoomLease {
                    term: lease.term,
                    row_version: Some(version),
                })
            }
        }
    }
}

/// Runs the sync server on `listener` until `shutdown` resolves, then stops accepting,
/// closes every socket (in-flight room-log writes finish first) and returns.
///
/// # Errors
/// [`ServerError::WeakSecret`] or [`ServerError::Config`] for an unusable configuration
/// (see [`ServerConfig::validate`]), [`ServerError::DatabaseBusy`] when another process
/// writes the database (see [`run_with_metrics`]), [`ServerError::Io`] when serving fails.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_with_metrics(listener, config, Arc::new(Metrics::default()), shutdown).await
}

/// [`run`] with a caller-held [`Metrics`] (read it while the server runs).
///
/// Before serving it takes the database's writer lock ([`Database::lock_writer`]; nothing
/// to do when the database was opened with `DatabaseConfig::writer_lock(true)`), so a
/// second server on the same room log is refused whether or not its caller asked for the
/// lock: two servers writing one log acknowledge the same room versions.
///
/// # Errors
/// As [`run`]; [`ServerError::WriterLock`] when the lock cannot be taken at all.
pub async fn run_with_metrics(
    listener: TcpListener,
    mut config: ServerConfig,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    config.validate()?;
    // A cluster node shares the database with the other nodes (each room is fenced by its
    // lease); a single server takes it for itself.
    let cluster = match config.cluster.clone() {
        Some(cluster) => {
            let joined = Cluster::join(config.database.clone(), cluster, Arc::clone(&metrics));
            Some(Arc::new(joined.await?))
        }
        None => {
            config.database.lock_writer().await.map_err(|e| match e {
                kalphite_db::Error::Busy { .. } => ServerError::DatabaseBusy(e),
                other => ServerError::WriterLock(other),
            })?;
            None
        }
    };
    if !config.open && config.token_secret.is_none() {
        tracing::warn!("no token secret and not in open mode: every hello will be refused");
    }
    if let Some(files) = listener::open_file_limit()
        && let Some(fit) =
            listener::fit_to_files(config.max_connections, RESERVED_HTTP_SOCKETS, files)
    {
        tracing::warn!(
            max_connections = config.max_connections,
            open_file_limit = files,
            "the connection limit does not fit the open-file limit: serving at most {fit} \
             connections (raise `ulimit -n`, or set a lower limit)"
        );
        config.max_connections = fit;
    }
    let cancel = CancellationToken::new();
    let stop = CancellationToken::new();
    let conn_tasks = TaskTracker::new();
    let writer = TaskTracker::new();
    let log = RoomLog::spawn(config.database.clone(), &writer, Arc::clone(&metrics));
    let limits = SocketLimits {
        max_sockets: config.max_connections.saturating_add(RESERVED_HTTP_SOCKETS),
        handshake_timeout: config.handshake_timeout,
        write_timeout: config.write_timeout,
    };
    let grace = config.shutdown_grace;
    let shared = Arc::new(Shared {
        budgets: Budgets::new(config.max_connections, config.max_connections_per_user),
        config,
        log,
        metrics: Arc::clone(&metrics),
        rooms: parking_lot::Mutex::new(HashMap::new()),
        next_conn: AtomicU64::new(1),
        cancel: cancel.clone(),
        stop: stop.clone(),
        conn_tasks: conn_tasks.clone(),
        cluster: cluster.clone(),
    });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "kalphite sync server listening");
    }
    let app = Router::new()
        .route("/sync", get(ws_handler))
        .route("/", get(web_app))
        .route("/sw.js", get(web_app_worker))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_handler))
        .layer(axum::middleware::from_fn(handshake_deadline))
        .with_state(Arc::clone(&shared));
    let sweeper = tokio::spawn(unload_idle_rooms(Arc::downgrade(&shared), cancel.clone()));
    let renewer = tokio::spawn(cluster::renew_leases(
        Arc::downgrade(&shared),
        cancel.clone(),
    ));
    drop(shared);
    let signal = {
        let cancel = cancel.clone();
        async move {
            tokio::select! {
                () = shutdown => {}
                () = cancel.cancelled() => {}
            }
            cancel.cancel();
        }
    };
    // Shutdown is bounded whatever clients do: `grace` after it begins, every connection
    // still open is dropped (its task ends, a socket not yet upgraded fails its I/O).
    let deadline = tokio::spawn({
        let cancel = cancel.clone();
        let stop = stop.clone();
        async move {
            cancel.cancelled().await;
            tokio::time::sleep(grace).await;
            stop.cancel();
        }
    });
    let listener = BoundedListener::new(listener, limits, metrics, stop.clone());
    let served = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(signal)
        .await;
    cancel.cancel();
    conn_tasks.close();
    conn_tasks.wait().await;
    // The last room-log commit always finishes (nothing acknowledged is lost).
    writer.close();
    writer.wait().await;
    deadline.abort();
    sweeper.abort();
    renewer.abort();
    // Cluster mode: the rooms are handed over at once (their clients, closed with 1001,
    // reconnect to a node that takes them), not after the lease runs out.
    if let Some(cluster) = &cluster {
        cluster.release_all().await;
    }
    tracing::info!("kalphite sync server stopped");
    served.map_err(ServerError::Io)
}

/// Sweeps the room map for unused rooms ([`Shared::unload_idle`]) a few times per
/// [`ServerConfig::room_unload_after`], until shutdown.
async fn unload_idle_rooms(shared: std::sync::Weak<Shared>, cancel: CancellationToken) {
    let Some(after) = shared.upgrade().map(|s| s.config.room_unload_after) else {
        return;
    };
    let period = (after / 4).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let unloaded = shared.unload_idle(tokio::time::Instant::now(), after);
        if !unloaded.is_empty() {
            tracing::debug!(rooms = unloaded.len(), "unloaded unused rooms");
        }
        // Cluster mode: an unloaded room's lease is given up, so any node can take it.
        if let Some(cluster) = &shared.cluster {
            let leases: Vec<(String, i64)> = unloaded
                .iter()
                .filter_map(|h| Some((h.id.clone(), h.term()?)))
                .collect();
            if !leases.is_empty() {
                cluster.release(leases).await;
            }
        }
    }
}

/// Keeps a socket's header deadline off while one of its requests is handled, and starts
/// it again for the next request once the response is ready (not after an upgrade).
async fn handshake_deadline(
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    peer.request_started();
    let response = next.run(request).await;
    peer.request_done();
    response
}

async fn ws_handler(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let forwarded = headers.contains_key(forward::FORWARDED_BY);
    if shared.cancel.is_cancelled() {
        return unavailable("shutting down\n");
    }
    let Some(permit) = shared.budgets.connection() else {
        Metrics::inc(&shared.metrics.connections_refused);
        tracing::debug!("connection limit reached: upgrade refused");
        return unavailable("too many connections: the server is at its connection limit\n");
    };
    let hard = shared.config.hard_frame_bytes;
    let ws = ws
        .read_buffer_size(shared.config.read_buffer_bytes)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_message_size(hard)
        .max_frame_size(hard);
    peer.upgrade();
    let tasks = shared.conn_tasks.clone();
    ws.on_upgrade(move |socket| {
        tasks.track_future(connection(socket, shared, peer, permit, forwarded))
    })
}

/// A `503` that closes its socket.
fn unavailable(body: &'static str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CONNECTION, "close"), (header::RETRY_AFTER, "5")],
        body,
    )
        .into_response()
}

/// One connection task: serves the WebSocket until it ends, or until shutdown's grace
/// period is over (then it is dropped where it stands). The permit holds its slot.
// Not an `async fn`, so the socket moves straight into the connection's future instead of
// being kept a second time as this function's argument (see `conn::serve`).
fn connection(
    socket: axum::extract::ws::WebSocket,
    shared: Arc<Shared>,
    peer: Peer,
    permit: ConnectionPermit,
    forwarded: bool,
) -> impl Future<Output = ()> + Send {
    let stop = shared.stop.clone();
    // Boxed: `select!` moves its futures into a tuple of its own, which would keep the
    // whole connection future twice in the task.
    let serve = Box::pin(conn::serve(socket, shared, peer, forwarded));
    async move {
        tokio::select! {
            () = serve => {}
            () = stop.cancelled() => {}
        }
        drop(permit);
    }
}

/// The web todo app (`clients/js/app`, built into one page with `npm run app`): it syncs
/// with this server over `/sync`, from the same origin.
async fn web_app() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("../../../clients/js/app/todo.html"),
    )
        .into_response()
}

/// The web app's service worker (`clients/js/app/sw.js`): it keeps a copy of the page so
/// that the app opens while this server is unreachable. Browsers register a worker only
/// from a script served with a JavaScript type.
async fn web_app_worker() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../../../clients/js/app/sw.js"),
    )
        .into_response()
}

/// `ok`, and on a cluster node its role: its id, address and the rooms it owns.
async fn healthz(State(shared): State<Arc<Shared>>) -> String {
    match &shared.cluster {
        None => "ok\n".to_owned(),
        Some(cluster) => format!(
            "ok: cluster node {} at {}, owns {} rooms\n",
            cluster.config.node_id,
            cluster.config.advertise,
            cluster.rooms_owned()
        ),
    }
}

async fn metrics_handler(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.metrics.render(),
    )
}
