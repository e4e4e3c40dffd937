//! The WebSocket sync server: an axum adapter around the sans-IO [`Room`]. One task per
//! connection; one [`Room`] per room id behind an async mutex (a room handles one message
//! at a time, rooms are independent); every accepted change is written to the durable room
//! log ([`kalphite_db::Database`]) before it is acknowledged or broadcast.
//!
//! Routes: `/sync` (WebSocket), `/healthz`, `/metrics` (Prometheus text).
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

mod auth;
mod conn;
mod log;
mod metrics;
mod outbox;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Utf8Bytes, WebSocketUpgrade};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use kalphite::SharedSchema;
use kalphite_db::Database;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use kalphite_sync::{ConflictPolicy, ConnId, Recipient, Room, RoomLimits};

pub use auth::{
    AuthError, Claims, MIN_SECRET_BYTES, WeakSecret, check_secret, encode_claims, issue_token,
    verify_token,
};
pub use log::{LogError, ROOM_KIND_PREFIX};
pub use metrics::{Metrics, resident_bytes};

use log::RoomLog;
use outbox::Outbox;

/// Frames queued for a connection are buffered up to this size, then written together.
const WRITE_BUFFER_BYTES: usize = 16 * 1024;

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
    /// Per-connection message rate.
    pub rate_limit: RateLimit,
    /// A connection silent this long is closed (clients send heartbeats).
    pub idle_timeout: Duration,
    /// Most messages queued for one connection; a client that falls further behind is
    /// disconnected (it catches up when it reconnects).
    pub outbound_queue: usize,
    /// WebSocket read buffer per connection (bytes); small keeps idle connections cheap.
    pub read_buffer_bytes: usize,
    /// Catch-up page size and per-entity history kept for merges.
    pub room_limits: RoomLimits,
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
            .finish_non_exhaustive()
    }
}

impl ServerConfig {
    /// Defaults: no token secret (so nobody can join until one is set or open mode is
    /// on), last-write-wins, 1 MiB frames, 1000 msg/s per connection (burst 2000), 120 s
    /// idle timeout.
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
            rate_limit: RateLimit::default(),
            idle_timeout: Duration::from_secs(120),
            outbound_queue: 16_384,
            read_buffer_bytes: 1_024,
            room_limits: RoomLimits::default(),
        }
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
        if self.outbound_queue == 0 || self.rate_limit.per_second == 0 {
            return Err(ServerError::Config(
                "outbound_queue and rate_limit.per_second must be positive".into(),
            ));
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
}

/// An encoded frame and who gets it.
pub(crate) struct Frame {
    pub(crate) to: Recipient,
    pub(crate) text: Utf8Bytes,
}

/// One room: the state machine (behind an async mutex: one message at a time), the
/// outbound queues of its members (a short sync lock, also taken by the log writer when
/// it delivers), and whether a failed write reset it.
pub(crate) struct RoomHandle {
    pub(crate) id: String,
    /// `None` until the first hello restores the room from the log.
    pub(crate) state: tokio::sync::Mutex<Option<Room>>,
    pub(crate) members: parking_lot::Mutex<HashMap<ConnId, Arc<Outbox>>>,
    poisoned: AtomicBool,
}

impl RoomHandle {
    fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            state: tokio::sync::Mutex::new(None),
            members: parking_lot::Mutex::new(HashMap::new()),
            poisoned: AtomicBool::new(false),
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
        }
    }

    /// Queues each frame for its recipients. A member whose queue is full is dropped
    /// (its connection closes; it catches up when it reconnects).
    pub(crate) fn deliver(&self, frames: Vec<Frame>, metrics: &Metrics) {
        let mut members = self.members.lock();
        let mut slow = Vec::new();
        for frame in frames {
            match frame.to {
                Recipient::One(conn) => {
                    if let Some(outbox) = members.get(&conn)
                        && !outbox.push(frame.text)
                    {
                        slow.push(conn);
                    }
                }
                Recipient::AllExcept(except) => {
                    for (conn, outbox) in members.iter() {
                        if *conn != except && !outbox.push(frame.text.clone()) {
                            slow.push(*conn);
                        }
                    }
                }
            }
        }
        for conn in slow {
            if let Some(outbox) = members.remove(&conn) {
                outbox.close();
                Metrics::inc(&metrics.slow_consumers);
                tracing::warn!(room = %self.id, conn, "dropping a connection that fell behind");
            }
        }
    }
}

/// What every connection task shares.
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) log: RoomLog,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) rooms: parking_lot::Mutex<HashMap<String, Arc<RoomHandle>>>,
    pub(crate) next_conn: AtomicU64,
    pub(crate) cancel: CancellationToken,
    pub(crate) tracker: TaskTracker,
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

    /// A fresh room restored from the log.
    pub(crate) async fn load_room(&self, id: &str) -> Result<Room, String> {
        let records = self.log.load(id).await.map_err(|e| e.to_string())?;
        let mut room =
            Room::new(id, self.config.policy.clone()).with_limits(self.config.room_limits);
        if let Some(schema) = &self.config.schema {
            room = room.with_schema(Arc::clone(schema));
        }
        let n = records.len();
        let room = room.restore(records).map_err(|e| e.to_string())?;
        tracing::debug!(
            room = id,
            records = n,
            version = room.version(),
            "room restored"
        );
        Ok(room)
    }
}

/// Runs the sync server on `listener` until `shutdown` resolves, then stops accepting,
/// closes every socket (in-flight room-log writes finish first) and returns.
///
/// # Errors
/// [`ServerError::WeakSecret`] or [`ServerError::Config`] for an unusable configuration
/// (see [`ServerConfig::validate`]), [`ServerError::Io`] when serving fails.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_with_metrics(listener, config, Arc::new(Metrics::default()), shutdown).await
}

/// [`run`] with a caller-held [`Metrics`] (read it while the server runs).
///
/// # Errors
/// As [`run`].
pub async fn run_with_metrics(
    listener: TcpListener,
    config: ServerConfig,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    config.validate()?;
    if !config.open && config.token_secret.is_none() {
        tracing::warn!("no token secret and not in open mode: every hello will be refused");
    }
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let log = RoomLog::spawn(config.database.clone(), &tracker, Arc::clone(&metrics));
    let shared = Arc::new(Shared {
        config,
        log,
        metrics,
        rooms: parking_lot::Mutex::new(HashMap::new()),
        next_conn: AtomicU64::new(1),
        cancel: cancel.clone(),
        tracker: tracker.clone(),
    });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "kalphite sync server listening");
    }
    let app = Router::new()
        .route("/sync", get(ws_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_handler))
        .with_state(Arc::clone(&shared));
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
    // Small frames (acks, broadcasts) must not wait for Nagle's algorithm.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    tracing::info!("kalphite sync server stopped");
    served.map_err(ServerError::Io)
}

async fn ws_handler(State(shared): State<Arc<Shared>>, ws: WebSocketUpgrade) -> Response {
    if shared.cancel.is_cancelled() {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n",
        )
            .into_response();
    }
    let hard = shared.config.hard_frame_bytes;
    let ws = ws
        .read_buffer_size(shared.config.read_buffer_bytes)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_message_size(hard)
        .max_frame_size(hard);
    let tracker = shared.tracker.clone();
    ws.on_upgrade(move |socket| tracker.track_future(conn::serve(socket, shared)))
}

async fn metrics_handler(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.metrics.render(),
    )
}
