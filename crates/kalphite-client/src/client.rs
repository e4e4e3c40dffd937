//! [`Client`]: one owned handle over the store, its local database, the local flush engine
//! and, when configured, the sync connection — opened by one builder, shut by one
//! [`Client::close`], and safe to drop. One process owns a client database at a time.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use kalphite::{
    Change, Durability, EntityKind, FlushConfig, FlushEngine, FlushError, SharedSchema,
    ShutdownError, Store, StoreBuilder,
};
use kalphite_db::{Database, DatabaseConfig, open_store};
use kalphite_sync::Undelivered;

use crate::{ConnectionStatus, SyncClient, SyncConfig, SyncError, SyncEvent, connect_store};

/// The change frame around an entity: envelope, clock, ids. What the server's frame limit
/// leaves for the entity itself is the limit minus this.
const FRAME_OVERHEAD: usize = 16 * 1024;

/// Why a client could not open or close.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The local database failed.
    #[error("local database: {0}")]
    Database(#[from] kalphite_db::Error),
    /// The store refused something (a stored entity its schema rejects, a bad config).
    #[error("store: {0}")]
    Store(#[from] kalphite::Error),
    /// The sync side could not start.
    #[error(transparent)]
    Sync(#[from] SyncError),
    /// Another process has the database open.
    #[error(
        "{path} is in use by another process{}; close it (or wait for it to finish) and try again",
        pid.map_or_else(String::new, |p| format!(" (pid {p})"))
    )]
    Busy {
        /// The database file.
        path: PathBuf,
        /// The process holding it, when it said.
        pid: Option<u32>,
    },
    /// Closing left changes that are not on disk.
    #[error("{} changes could not be written to the local database: {cause}", unwritten.len())]
    Unwritten {
        /// The changes, oldest first.
        unwritten: Vec<Change>,
        /// The last error.
        cause: String,
    },
}

/// Why [`Client::durable`] could not confirm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DurableError {
    /// The flush did not complete (the changes stay queued and are retried).
    #[error(transparent)]
    Flush(#[from] FlushError),
    /// Some changes will never reach the server (each named, with why).
    #[error("{} changes will not reach the server: {}", .0.len(), describe(.0))]
    Undelivered(Vec<Undelivered>),
    /// The client has no sync server, so nothing is ever durable there.
    #[error("this client was opened without a sync server")]
    LocalOnly,
}

fn describe(list: &[Undelivered]) -> String {
    list.iter()
        .map(|u| format!("{}/{} ({})", u.key.kind, u.key.id, u.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What [`Client::close`] left behind — safely.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CloseReport {
    /// Entities with local changes the server has not acknowledged yet: they are in the
    /// database's offline queue and go out with the next sync.
    pub unsynced: usize,
    /// Local changes of this session the server will never get (refused or rejected).
    pub undelivered: Vec<Undelivered>,
}

/// Configures and opens a [`Client`].
#[must_use]
pub struct ClientBuilder {
    db: DatabaseConfig,
    store: StoreBuilder,
    schema: Option<SharedSchema>,
    sync: Option<SyncConfig>,
    flush: Option<FlushConfig>,
    max_entity_bytes: Option<usize>,
    lock_timeout: Duration,
}

impl ClientBuilder {
    /// Registers `T` as the data type of its kind (see [`StoreBuilder::register`]).
    pub fn kind<T: EntityKind>(mut self) -> Self {
        self.store = self.store.register::<T>();
        self
    }

    /// Validates every entity with `schema`, in the store (at write time) and in the
    /// database alike: one schema, so a change the store accepted is never refused by the
    /// database later.
    pub fn schema(mut self, schema: SharedSchema) -> Self {
        self.schema = Some(schema);
        self
    }

    /// Syncs with a server (without this, the client is a local-only store).
    pub fn sync(mut self, config: SyncConfig) -> Self {
        self.sync = Some(config);
        self
    }

    /// The local flush engine's timing (default: [`FlushConfig::default`]).
    pub fn flush(mut self, config: FlushConfig) -> Self {
        self.flush = Some(config);
        self
    }

    /// Refuses local entities larger than this (as JSON) at write time. With sync, the
    /// default is what the server's frame limit leaves for an entity.
    ///
    /// Entities holding a NUL character (U+0000) anywhere are refused at write time too,
    /// with [`kalphite::Error::Unstorable`], when the database is PostgreSQL or with sync
    /// (see [`Store::set_refuse_nul`]).
    pub fn max_entity_bytes(mut self, bytes: usize) -> Self {
        self.max_entity_bytes = Some(bytes);
        self
    }

    /// How long to wait for another process to release the database (default 2 s).
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// Changes the database config (quota, PostgreSQL schema, migrations…).
    pub fn database(mut self, f: impl FnOnce(DatabaseConfig) -> DatabaseConfig) -> Self {
        self.db = f(self.db);
        self
    }

    /// Opens the database (migrating it), hydrates the store and, with sync, starts
    /// connecting. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`ClientError::Busy`] when another process has the database open, database and
    /// store errors, and the sync errors of [`connect_store`] (another room's database,
    /// an unreadable sync state, a bad server address).
    pub async fn open(self) -> Result<Client, ClientError> {
        // One process per database: kalphite-db's writer lock (a lock file beside a SQLite
        // database, an advisory lock in PostgreSQL), held until the database is closed.
        let mut db_config = self
            .db
            .writer_lock(true)
            .writer_lock_wait(self.lock_timeout);
        let mut store = self.store;
        if let Some(schema) = self.schema {
            db_config = db_config.schema(schema.clone());
            store = store.schema(schema);
        }
        let db = Database::open(db_config).await.map_err(|e| match e {
            kalphite_db::Error::Busy { target, pid, .. } => ClientError::Busy {
                path: PathBuf::from(target),
                pid,
            },
            other => ClientError::Database(other),
        })?;
        // PostgreSQL cannot store a NUL character: an entity holding one, once accepted,
        // would be retried by the flush forever with every change behind it waiting. The
        // store refuses it at write time instead (with sync, `connect_store` does, as the
        // server refuses one too). A local-only SQLite client stores it.
        if db.backend_name() == "postgres" {
            store = store.refuse_nul(true);
        }
        let (store, sync) = match self.sync {
            Some(mut config) => {
                if let Some(flush) = self.flush {
                    config.local_flush = flush;
                }
                let limit = self.max_entity_bytes.unwrap_or_else(|| {
                    config.max_frame_bytes.saturating_sub(FRAME_OVERHEAD).max(1)
                });
                match connect_store(store, &db, config).await {
                    Ok((store, sync)) => {
                        store.set_max_entity_bytes(Some(limit));
                        (store, Some(sync))
                    }
                    Err(e) => {
                        let _ = db.close().await;
                        return Err(e.into());
                    }
                }
            }
            None => {
                let store = open_store(&db, store, self.flush.unwrap_or_default()).await?;
                if self.max_entity_bytes.is_some() {
                    store.set_max_entity_bytes(self.max_entity_bytes);
                }
                (store, None)
            }
        };
        Ok(Client {
            store,
            db,
            sync,
            open: true,
        })
    }
}

/// A kalphite client: the store (read and write it synchronously), persisted to a local
/// database and, when configured, synced with a server.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use kalphite::{Durability, EntityKind};
/// use kalphite_client::{Client, SyncConfig};
///
/// #[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
/// struct Todo { title: String, done: bool }
/// impl EntityKind for Todo { const KIND: &'static str = "todo"; }
///
/// let client = Client::builder("sqlite:app.db")
///     .kind::<Todo>()
///     .sync(SyncConfig::new("ws://127.0.0.1:8787", "room-1").token("<kalphite token …>"))
///     .open()
///     .await?;
/// client.store().collection::<Todo>()?.put("t1", Todo { title: "milk".into(), done: false })?;
/// client.durable(Durability::Local).await?; // on disk, with its place in the offline queue
/// let report = client.close().await?;      // unsynced changes wait safely in the file
/// println!("{} changes not yet on the server", report.unsynced);
/// # Ok(()) }
/// ```
pub struct Client {
    store: Store,
    db: Database,
    sync: Option<SyncClient>,
    open: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("db", &self.db)
            .field("sync", &self.sync)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A builder for a client over the database at `db_url` (`sqlite:PATH`, a bare file
    /// path, `sqlite::memory:` or `postgres://…`).
    pub fn builder(db_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            db: DatabaseConfig::new(db_url),
            store: Store::builder(),
            schema: None,
            sync: None,
            flush: None,
            max_entity_bytes: None,
            lock_timeout: Duration::from_secs(2),
        }
    }

    /// The store: synchronous reads and writes, in memory.
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The local database.
    #[must_use]
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// The sync connection's controls (connect, disconnect, room version…), if any.
    #[must_use]
    pub fn sync(&self) -> Option<&SyncClient> {
        self.sync.as_ref()
    }

    /// Where the connection stands ([`ConnectionStatus::LocalOnly`] without sync).
    #[must_use]
    pub fn status(&self) -> ConnectionStatus {
        self.sync
            .as_ref()
            .map_or(ConnectionStatus::LocalOnly, SyncClient::connection_status)
    }

    /// Entities with local changes the server has not acknowledged yet.
    #[must_use]
    pub fn unsynced(&self) -> usize {
        self.sync.as_ref().map_or(0, SyncClient::offline_queue_size)
    }

    /// Sync events from now on (an empty stream without sync).
    #[must_use]
    pub fn events(&self) -> BoxStream<'static, SyncEvent> {
        match &self.sync {
            Some(sync) => sync.events(),
            None => futures_util::stream::empty().boxed(),
        }
    }

    /// Resolves once every change accepted before this call is durable at `level`:
    /// [`Durability::Local`] when the flush that holds it (with its place in the offline
    /// queue) committed; [`Durability::Server`] when the server acknowledged it — or fails
    /// naming each change the server will never get.
    ///
    /// # Errors
    /// [`DurableError::Flush`] when a flush failed (it is retried),
    /// [`DurableError::Undelivered`] for refused or rejected changes,
    /// [`DurableError::LocalOnly`] for `Server` without sync.
    pub async fn durable(&self, level: Durability) -> Result<(), DurableError> {
        if level != Durability::Server {
            return Ok(self.store.durable(level).await?);
        }
        let Some(sync) = &self.sync else {
            return Err(DurableError::LocalOnly);
        };
        let upto = sync.last_seq();
        self.store.durable(Durability::Server).await?;
        let undelivered = sync.undelivered_through(upto);
        if undelivered.is_empty() {
            Ok(())
        } else {
            Err(DurableError::Undelivered(undelivered))
        }
    }

    /// Closes the connection, writes every accepted change (and the offline queue) to the
    /// database and closes it. Changes not yet on the server are not an error: they wait
    /// in the database for the next sync ([`CloseReport::unsynced`]).
    ///
    /// # Errors
    /// [`ClientError::Unwritten`] with the changes that could not be written to disk;
    /// database errors from closing it.
    pub async fn close(mut self) -> Result<CloseReport, ClientError> {
        self.open = false;
        let mut report = CloseReport::default();
        stop_server_engines(self.store.flush_engines());
        if let Some(sync) = &self.sync {
            sync.close().await;
            report.unsynced = sync.offline_queue_size();
            report.undelivered = sync.undelivered_through(u64::MAX);
        }
        if let Err(e) = drain_local_engines(self.store.flush_engines()).await {
            return Err(ClientError::Unwritten {
                unwritten: e.unwritten,
                cause: e.cause,
            });
        }
        // Closing the database also releases its writer lock.
        self.db.close().await?;
        Ok(report)
    }
}

impl Drop for Client {
    /// Dropped without [`Client::close`]: the connection stops, and the local engine
    /// drains what is queued in the background; the database stays locked until it has.
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let engines = self.store.flush_engines().to_vec();
        stop_server_engines(&engines);
        if let Some(sync) = &self.sync {
            sync.shut_down_now();
        }
        let db = self.db.clone();
        let drain = async move {
            if let Err(e) = drain_local_engines(&engines).await {
                tracing::error!(error = %e, "a dropped client could not write everything");
            }
            // The writer lock goes with the database, after the drain.
            let _ = db.close().await;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(drain);
            }
            // No runtime left: the engines' tasks are gone with it.
            Err(_) => drop(drain),
        }
    }
}

/// Stops the server-durability engines: their queue only waits for acks (the changes are
/// in the persisted offline queue), so stopping them first keeps closing the connection
/// from making them retry and warn.
fn stop_server_engines(engines: &[FlushEngine]) {
    for engine in engines {
        if engine.config().durability == Durability::Server {
            engine.stop();
        }
    }
}

/// Drains every other engine (the local database); what could not be written, if any.
async fn drain_local_engines(engines: &[FlushEngine]) -> Result<(), ShutdownError> {
    let mut failed: Option<ShutdownError> = None;
    for engine in engines {
        if engine.config().durability != Durability::Server
            && let Err(e) = engine.shutdown().await
        {
            match &mut failed {
                Some(all) => {
                    all.unwritten.extend(e.unwritten);
                    all.cause = e.cause;
                }
                None => failed = Some(e),
            }
        }
    }
    failed.map_or(Ok(()), Err)
}
