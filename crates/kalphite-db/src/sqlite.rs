//! The SQLite backend: one connection owned by a dedicated thread (rusqlite is blocking, so
//! it never runs on the async executor); callers send it closures and await the answer.
//! WAL mode, `synchronous = NORMAL` (a committed transaction survives a process crash) or,
//! with `fsync`, `FULL` (it survives an OS crash or power loss too).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use kalphite::{EntityId, Kind, now_millis};
use parking_lot::Mutex;
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params, params_from_iter};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::backend::{Backend, StoredEntity, Write, parse_row};
use crate::backup::Record;
use crate::error::{Error, Result};
use crate::migration::{AppliedMigration, Dialect, Step};
use crate::query::{Cmp, Condition, Direction, Field, Query};
use crate::quota::{Quota, StoredKey, net_growth, stored_keys};
use crate::sync_state::{KnownRow, OutboxRow, SyncTables, SyncWrite};

const CREATE_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS kalphite_migrations (
    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)";
const LIST_MIGRATIONS: &str =
    "SELECT version, name, applied_at FROM kalphite_migrations ORDER BY version";
const UPSERT: &str = "INSERT INTO kalphite_entities (type, id, data, updated_at) \
    VALUES (?1, ?2, ?3, ?4) ON CONFLICT (type, id) DO UPDATE SET \
    data = excluded.data, updated_at = excluded.updated_at, version = version + 1";
const INSERT_WITH_VERSION: &str = "INSERT INTO kalphite_entities \
    (type, id, data, updated_at, version) VALUES (?1, ?2, ?3, ?4, ?5)";
const DELETE: &str = "DELETE FROM kalphite_entities WHERE type = ?1 AND id = ?2";
const GET: &str = "SELECT type, id, data, updated_at, version FROM kalphite_entities \
    WHERE type = ?1 AND id = ?2";
const DUMP: &str = "SELECT type, id, data, updated_at, version FROM kalphite_entities ORDER BY seq";
const KINDS: &str = "SELECT type, COUNT(*) FROM kalphite_entities GROUP BY type";
/// What a restore empties: the entities and, since they no longer describe what is on
/// disk, the sync bookkeeping (the client then starts over as a new replica).
const REPLACE_ALL_CLEAR: &str = "DELETE FROM kalphite_entities; DELETE FROM kalphite_sync_state; \
    DELETE FROM kalphite_sync_outbox; DELETE FROM kalphite_sync_known;";
const SYNC_STATE_PUT: &str = "INSERT INTO kalphite_sync_state (key, value) VALUES (?1, ?2) \
    ON CONFLICT (key) DO UPDATE SET value = excluded.value";
const SYNC_OUTBOX_PUT: &str = "INSERT INTO kalphite_sync_outbox (type, id, position, entry) \
    VALUES (?1, ?2, ?3, ?4) ON CONFLICT (type, id) DO UPDATE SET \
    position = excluded.position, entry = excluded.entry";
const SYNC_OUTBOX_DELETE: &str = "DELETE FROM kalphite_sync_outbox WHERE type = ?1 AND id = ?2";
const SYNC_KNOWN_PUT: &str = "INSERT INTO kalphite_sync_known (type, id, version, entry) \
    VALUES (?1, ?2, ?3, ?4) ON CONFLICT (type, id) DO UPDATE SET \
    version = excluded.version, entry = excluded.entry";
const SYNC_KNOWN_CLEAR: &str = "DELETE FROM kalphite_sync_known";
const SYNC_KNOWN_DELETE: &str = "DELETE FROM kalphite_sync_known WHERE type = ?1 AND id = ?2";
const SYNC_READ_STATE: &str = "SELECT key, value FROM kalphite_sync_state ORDER BY key";
const SYNC_READ_OUTBOX: &str =
    "SELECT type, id, position, entry FROM kalphite_sync_outbox ORDER BY position, type, id";
const SYNC_READ_KNOWN: &str = "SELECT type, id, version, entry FROM kalphite_sync_known";
// The byte length of a stored row's data (entry, value), for the quota: `length` of TEXT
// counts characters, of a BLOB bytes.
const STORED_ENTITY_SIZE: &str =
    "SELECT length(CAST(data AS BLOB)) FROM kalphite_entities WHERE type = ?1 AND id = ?2";
const STORED_OUTBOX_SIZE: &str =
    "SELECT length(CAST(entry AS BLOB)) FROM kalphite_sync_outbox WHERE type = ?1 AND id = ?2";
const STORED_KNOWN_SIZE: &str =
    "SELECT length(CAST(entry AS BLOB)) FROM kalphite_sync_known WHERE type = ?1 AND id = ?2";
const STORED_STATE_SIZE: &str =
    "SELECT length(CAST(value AS BLOB)) FROM kalphite_sync_state WHERE key = ?1";

/// Connection settings after `journal_mode = WAL` (and `synchronous`, see
/// [`synchronous`]); the WAL file is truncated back to 64 MiB at most after a checkpoint.
pub(crate) const PRAGMAS: &str = "PRAGMA foreign_keys = ON; PRAGMA journal_size_limit = 67108864;";

/// The `synchronous` setting. In WAL mode, `NORMAL` (the default) syncs the WAL only at
/// checkpoints: a committed transaction survives a crash of the process, but not an OS
/// crash or power loss. `FULL` (`fsync`) syncs the WAL at every commit: it survives those
/// too, on a disk that honours the sync.
pub(crate) fn synchronous(fsync: bool) -> &'static str {
    if fsync {
        "PRAGMA synchronous = FULL"
    } else {
        "PRAGMA synchronous = NORMAL"
    }
}

/// WAL size (pages) past which the checkpointer thread is asked to checkpoint; SQLite's own
/// auto-checkpoint threshold.
const CHECKPOINT_PAGES: i32 = 1000;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A SQLite database served by its own thread.
pub(crate) struct Sqlite {
    /// `None` once closed. A `Mutex` only to take it out on close; sends clone nothing.
    sender: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Sqlite {
    /// Opens (creating if missing) the file at `path`, or a private in-memory database.
    pub(crate) async fn open(path: Option<&Path>, fsync: bool) -> Result<Self> {
        let label = path.map_or_else(|| "sqlite::memory:".to_owned(), |p| p.display().to_string());
        let path = path.map(Path::to_path_buf);
        let (sender, receiver) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<()>>();
        let thread = std::thread::Builder::new()
            .name("kalphite-sqlite".into())
            .spawn(move || {
                let mut conn = match connect(path.as_deref(), &label, fsync) {
                    Ok(conn) => {
                        let _ = ready_tx.send(Ok(()));
                        conn
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let checkpointer = path
                    .as_deref()
                    .and_then(|p| start_checkpointer(&mut conn, p));
                while let Ok(job) = receiver.recv() {
                    // A panicking job (a bug) fails only its own call (its answer channel is
                    // dropped: `Error::Closed`); an open transaction rolls back as it unwinds.
                    if catch_unwind(AssertUnwindSafe(|| job(&mut conn))).is_err() {
                        tracing::error!("a SQLite job panicked; the connection stays open");
                    }
                }
                if let Err((_, e)) = conn.close() {
                    tracing::warn!(error = %e, "closing the SQLite connection failed");
                }
                // Closing the connection dropped the WAL hook and with it the checkpointer's
                // channel: it checkpoints one last time and closes.
                if let Some(t) = checkpointer {
                    let _ = t.join();
                }
            })
            .map_err(|e| Error::Connect {
                target: "sqlite".into(),
                message: format!("could not start the database thread: {e}"),
            })?;
        ready_rx.await.map_err(|_| Error::Closed)??;
        Ok(Self {
            sender: Mutex::new(Some(sender)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Runs `f` on the database thread.
    async fn call<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = tx.send(f(conn));
        });
        {
            let sender = self.sender.lock();
            sender
                .as_ref()
                .ok_or(Error::Closed)?
                .send(job)
                .map_err(|_| Error::Closed)?;
        }
        rx.await.map_err(|_| Error::Closed)?
    }
}

fn connect(path: Option<&Path>, label: &str, fsync: bool) -> Result<Connection> {
    let fail = |e: rusqlite::Error| Error::Connect {
        target: label.to_owned(),
        message: e.to_string(),
    };
    let conn = match path {
        Some(p) => Connection::open(p).map_err(fail)?,
        None => Connection::open_in_memory().map_err(fail)?,
    };
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(fail)?;
    // Reading the journal mode also proves the file is a SQLite database.
    let _mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(fail)?;
    conn.execute_batch(synchronous(fsync)).map_err(fail)?;
    conn.execute_batch(PRAGMAS).map_err(fail)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Moves WAL checkpoints (which fsync) off the write path: the writer's WAL hook (which
/// replaces SQLite's auto-checkpoint) nudges a thread with its own connection that runs
/// `PRAGMA wal_checkpoint(PASSIVE)`, so commits never wait for one. Returns `None` (and
/// SQLite's auto-checkpoint stays on) if the thread cannot be set up.
fn start_checkpointer(conn: &mut Connection, path: &Path) -> Option<JoinHandle<()>> {
    let checkpoint_conn = Connection::open(path).ok()?;
    let (nudge, nudged) = mpsc::sync_channel::<()>(1);
    let thread = std::thread::Builder::new()
        .name("kalphite-sqlite-checkpoint".into())
        .spawn(move || {
            while nudged.recv().is_ok() {
                if let Err(e) = checkpoint_conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)") {
                    tracing::warn!(error = %e, "WAL checkpoint failed; the next one retries");
                }
            }
            drop(checkpoint_conn);
        })
        .ok()?;
    let hooked = conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: i32| {
        if pages >= CHECKPOINT_PAGES {
            // Full means a checkpoint is already requested.
            let _ = nudge.try_send(());
        }
        Ok(())
    }));
    if hooked.is_err() {
        // The hook (and the sender) were not installed: the thread ends at once.
        let _ = conn.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_PAGES);
    }
    Some(thread)
}

fn used_bytes(conn: &Connection) -> Result<u64> {
    let q = |sql: &str| -> Result<i64> {
        conn.query_row(sql, [], |r| r.get(0))
            .map_err(Error::sqlite("measuring the database size"))
    };
    let pages = q("PRAGMA page_count")? - q("PRAGMA freelist_count")?;
    Ok(u64::try_from(pages * q("PRAGMA page_size")?).unwrap_or(0))
}

/// The sizes of the stored rows that `writes` replace or remove (see [`net_growth`]).
fn stored_sizes(conn: &Connection, writes: &[Write]) -> rusqlite::Result<HashMap<StoredKey, u64>> {
    let mut sizes = HashMap::new();
    for key in stored_keys(writes) {
        let (sql, args) = match &key {
            StoredKey::Entity(kind, id) => (STORED_ENTITY_SIZE, vec![kind.as_str(), id.as_str()]),
            StoredKey::Outbox(kind, id) => (STORED_OUTBOX_SIZE, vec![kind.as_str(), id.as_str()]),
            StoredKey::Known(kind, id) => (STORED_KNOWN_SIZE, vec![kind.as_str(), id.as_str()]),
            StoredKey::State(k) => (STORED_STATE_SIZE, vec![k.as_str()]),
        };
        let len: Option<i64> = conn
            .prepare_cached(sql)?
            .query_row(params_from_iter(args), |r| r.get(0))
            .optional()?;
        if let Some(len) = len {
            let size = key.size(u64::try_from(len).unwrap_or(0));
            sizes.insert(key, size);
        }
    }
    Ok(sizes)
}

fn read_stored(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, String, i64, i64)> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    ))
}

fn ensure_migrations_table(conn: &Connection) -> Result<()> {
    conn.execute_batch(CREATE_MIGRATIONS)
        .map_err(Error::sqlite("creating kalphite_migrations"))
}

#[async_trait]
impl Backend for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    async fn applied_migrations(&self) -> Result<Vec<AppliedMigration>> {
        self.call(|conn| {
            ensure_migrations_table(conn)?;
            let ctx = "listing applied migrations";
            let mut stmt = conn.prepare(LIST_MIGRATIONS).map_err(Error::sqlite(ctx))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(AppliedMigration {
                        version: r.get(0)?,
                        name: r.get(1)?,
                        applied_at: r.get(2)?,
                    })
                })
                .map_err(Error::sqlite(ctx))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(Error::sqlite(ctx))
        })
        .await
    }

    async fn run_step(&self, step: Step) -> Result<()> {
        self.call(move |conn| {
            let failed = |e: rusqlite::Error| Error::MigrationFailed {
                version: step.version,
                name: step.name.clone(),
                direction: step.direction(),
                message: e.to_string(),
            };
            ensure_migrations_table(conn)?;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(failed)?;
            let applied: bool = tx
                .query_row(
                    "SELECT COUNT(*) > 0 FROM kalphite_migrations WHERE version = ?1",
                    [step.version],
                    |r| r.get(0),
                )
                .map_err(failed)?;
            if applied == step.up {
                return Ok(()); // someone else already did it
            }
            tx.execute_batch(&step.sql).map_err(failed)?;
            if step.up {
                tx.execute(
                    "INSERT INTO kalphite_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
                    params![step.version, step.name, i64::try_from(now_millis()).unwrap_or(0)],
                )
                .map_err(failed)?;
            } else {
                tx.execute("DELETE FROM kalphite_migrations WHERE version = ?1", [step.version])
                    .map_err(failed)?;
            }
            tx.commit().map_err(failed)
        })
        .await
    }

    async fn write(&self, writes: Vec<Write>, quota: Option<Quota>) -> Result<Vec<bool>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        self.call(move |conn| {
            let ctx = "writing a batch";
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(Error::sqlite(ctx))?;
            if let Some(quota) = quota {
                let stored = stored_sizes(&tx, &writes)
                    .map_err(Error::sqlite("measuring the rows a batch replaces"))?;
                quota.check(used_bytes(&tx)?, net_growth(&writes, stored))?;
            }
            let mut affected = Vec::with_capacity(writes.len());
            {
                let mut upsert = tx.prepare_cached(UPSERT).map_err(Error::sqlite(ctx))?;
                let mut delete = tx.prepare_cached(DELETE).map_err(Error::sqlite(ctx))?;
                for w in &writes {
                    let n = match w {
                        Write::Upsert(r) => upsert.execute(params![
                            r.kind.as_str(),
                            r.id.as_str(),
                            r.data,
                            r.updated_at
                        ]),
                        Write::Delete { kind, id } => delete.execute([kind.as_str(), id.as_str()]),
                        Write::Sync(w) => write_sync(&tx, w),
                    }
                    .map_err(Error::sqlite(ctx))?;
                    affected.push(n > 0);
                }
            }
            tx.commit().map_err(Error::sqlite(ctx))?;
            Ok(affected)
        })
        .await
    }

    async fn get(&self, kind: Kind, id: EntityId) -> Result<Option<StoredEntity>> {
        self.call(move |conn| {
            let ctx = "reading an entity";
            let mut stmt = conn.prepare_cached(GET).map_err(Error::sqlite(ctx))?;
            let row = stmt
                .query_row([kind.as_str(), id.as_str()], read_stored)
                .optional()
                .map_err(Error::sqlite(ctx))?;
            Ok(row.and_then(|(k, i, d, u, v)| parse_row(k, i, &d, u, v)))
        })
        .await
    }

    async fn find(&self, query: Query) -> Result<Vec<StoredEntity>> {
        let (sql, params) = render(&query);
        self.call(move |conn| {
            let ctx = "running a query";
            let mut stmt = conn.prepare_cached(&sql).map_err(Error::sqlite(ctx))?;
            let rows = stmt
                .query_map(params_from_iter(params), read_stored)
                .map_err(Error::sqlite(ctx))?;
            let mut out = Vec::new();
            for row in rows {
                let (kind, id, data, updated_at, version) = row.map_err(Error::sqlite(ctx))?;
                out.extend(parse_row(kind, id, &data, updated_at, version));
            }
            Ok(out)
        })
        .await
    }

    async fn dump(&self) -> Result<Vec<Record>> {
        self.call(|conn| dump_rows(conn)).await
    }

    async fn dump_with_sync(&self) -> Result<(Vec<Record>, SyncTables)> {
        // One connection serves every call in turn, so no write lands between the reads.
        self.call(|conn| {
            let records = dump_rows(conn)?;
            let sync =
                read_sync_tables(conn).map_err(Error::sqlite("reading the sync bookkeeping"))?;
            Ok((records, sync))
        })
        .await
    }

    async fn replace_all(
        &self,
        records: Vec<Record>,
        sync: Vec<SyncWrite>,
        quota: Option<Quota>,
    ) -> Result<()> {
        self.call(move |conn| {
            let ctx = "restoring a backup";
            let mut rows = Vec::with_capacity(records.len());
            let mut needed: u64 = sync.iter().map(SyncWrite::size).sum();
            for r in records {
                let data = serde_json::to_string(&r.data).map_err(|e| Error::Serialize {
                    kind: r.kind.to_string(),
                    id: r.id.to_string(),
                    source: e,
                })?;
                needed +=
                    (r.kind.len() + r.id.len() + data.len() + crate::backend::ROW_OVERHEAD) as u64;
                rows.push((r, data));
            }
            if let Some(quota) = quota {
                quota.check(0, i64::try_from(needed).unwrap_or(i64::MAX))?;
            }
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(Error::sqlite(ctx))?;
            tx.execute_batch(REPLACE_ALL_CLEAR)
                .map_err(Error::sqlite(ctx))?;
            {
                let mut insert = tx
                    .prepare_cached(INSERT_WITH_VERSION)
                    .map_err(Error::sqlite(ctx))?;
                for (r, data) in &rows {
                    insert
                        .execute(params![
                            r.kind.as_str(),
                            r.id.as_str(),
                            data,
                            i64::try_from(r.updated_at).unwrap_or(i64::MAX),
                            r.version
                        ])
                        .map_err(Error::sqlite(ctx))?;
                }
            }
            for w in &sync {
                write_sync(&tx, w).map_err(Error::sqlite(ctx))?;
            }
            tx.commit().map_err(Error::sqlite(ctx))
        })
        .await
    }

    async fn read_sync(&self) -> Result<SyncTables> {
        self.call(|conn| {
            read_sync_tables(conn).map_err(Error::sqlite("reading the sync bookkeeping"))
        })
        .await
    }

    async fn kinds(&self) -> Result<Vec<(Kind, u64)>> {
        self.call(|conn| {
            let ctx = "listing kinds";
            let mut stmt = conn.prepare(KINDS).map_err(Error::sqlite(ctx))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(Error::sqlite(ctx))?;
            let mut out = Vec::new();
            for row in rows {
                let (k, n) = row.map_err(Error::sqlite(ctx))?;
                out.push((Kind::from(k), u64::try_from(n).unwrap_or(0)));
            }
            Ok(out)
        })
        .await
    }

    async fn storage_bytes(&self) -> Result<u64> {
        self.call(|conn| used_bytes(conn)).await
    }

    async fn commit_sync(&self) -> Result<String> {
        self.call(|conn| {
            let level: i64 = conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .map_err(Error::sqlite("reading the synchronous setting"))?;
            let name = match level {
                0 => "OFF",
                1 => "NORMAL",
                2 => "FULL",
                3 => "EXTRA",
                _ => "unknown",
            };
            Ok(format!("synchronous = {name}"))
        })
        .await
    }

    async fn close(&self) -> Result<()> {
        let sender = self.sender.lock().take();
        drop(sender);
        let thread = self.thread.lock().take();
        if let Some(thread) = thread {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .map_err(|_| Error::Closed)?
                .map_err(|_| Error::Closed)?;
        }
        Ok(())
    }
}

/// Every entity, in first-insert order; corrupt rows are skipped (and logged).
fn dump_rows(conn: &Connection) -> Result<Vec<Record>> {
    let ctx = "reading every entity";
    let mut stmt = conn.prepare(DUMP).map_err(Error::sqlite(ctx))?;
    let rows = stmt
        .query_map([], read_stored)
        .map_err(Error::sqlite(ctx))?;
    let mut out = Vec::new();
    for row in rows {
        let (kind, id, data, updated_at, version) = row.map_err(Error::sqlite(ctx))?;
        out.extend(parse_row(kind, id, &data, updated_at, version).map(Record::from));
    }
    Ok(out)
}

/// Writes one row of the sync bookkeeping tables.
fn write_sync(tx: &rusqlite::Transaction<'_>, w: &SyncWrite) -> rusqlite::Result<usize> {
    let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    match w {
        SyncWrite::State { key, value } => tx
            .prepare_cached(SYNC_STATE_PUT)?
            .execute(params![key, value]),
        SyncWrite::Outbox {
            kind,
            id,
            position,
            entry,
        } => tx.prepare_cached(SYNC_OUTBOX_PUT)?.execute(params![
            kind.as_str(),
            id.as_str(),
            int(*position),
            entry
        ]),
        SyncWrite::OutboxRemoved { kind, id } => tx
            .prepare_cached(SYNC_OUTBOX_DELETE)?
            .execute([kind.as_str(), id.as_str()]),
        SyncWrite::Known {
            kind,
            id,
            version,
            entry,
        } => tx.prepare_cached(SYNC_KNOWN_PUT)?.execute(params![
            kind.as_str(),
            id.as_str(),
            int(*version),
            entry
        ]),
        SyncWrite::KnownCleared => tx.execute(SYNC_KNOWN_CLEAR, []),
        SyncWrite::KnownRemoved { kind, id } => tx
            .prepare_cached(SYNC_KNOWN_DELETE)?
            .execute([kind.as_str(), id.as_str()]),
    }
}

fn read_sync_tables(conn: &Connection) -> rusqlite::Result<SyncTables> {
    let uint = |n: i64| u64::try_from(n).unwrap_or(0);
    let mut tables = SyncTables::default();
    let mut stmt = conn.prepare(SYNC_READ_STATE)?;
    for row in stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))? {
        tables.state.push(row?);
    }
    let mut stmt = conn.prepare(SYNC_READ_OUTBOX)?;
    let rows = stmt.query_map([], |r| {
        Ok(OutboxRow {
            kind: Kind::from(r.get::<_, String>(0)?),
            id: EntityId::from(r.get::<_, String>(1)?),
            position: uint(r.get(2)?),
            entry: r.get(3)?,
        })
    })?;
    for row in rows {
        tables.outbox.push(row?);
    }
    let mut stmt = conn.prepare(SYNC_READ_KNOWN)?;
    let rows = stmt.query_map([], |r| {
        Ok(KnownRow {
            kind: Kind::from(r.get::<_, String>(0)?),
            id: EntityId::from(r.get::<_, String>(1)?),
            version: uint(r.get(2)?),
            entry: r.get(3)?,
        })
    })?;
    for row in rows {
        tables.known.push(row?);
    }
    Ok(tables)
}

/// The SQLite JSON path of a data field: `$."a"."b"`.
fn json_path(path: &[String]) -> String {
    let mut out = String::from("$");
    for key in path {
        let _ = write!(out, ".\"{key}\"");
    }
    out
}

fn number_param(n: &serde_json::Number) -> SqlValue {
    match n.as_i64() {
        Some(i) => SqlValue::Integer(i),
        None => SqlValue::Real(n.as_f64().unwrap_or(f64::NAN)),
    }
}

/// Renders one `field <op> value` (validated: see [`Query::validate`]).
fn render_compare(
    field: &Field,
    op: Cmp,
    value: &Value,
    sql: &mut String,
    params: &mut Vec<SqlValue>,
) {
    let op_sql = op.sql();
    match field {
        Field::UpdatedAt => {
            let _ = write!(sql, "updated_at {op_sql} ?");
            params.push(SqlValue::Integer(value.as_i64().unwrap_or(0)));
        }
        Field::Id => {
            let _ = write!(sql, "id {op_sql} ?");
            params.push(SqlValue::Text(
                value.as_str().unwrap_or_default().to_owned(),
            ));
        }
        Field::Data(path) => {
            let p = json_path(path);
            match value {
                Value::Number(n) => {
                    let _ = write!(
                        sql,
                        "(json_type(data, ?) IN ('integer', 'real') AND json_extract(data, ?) {op_sql} ?)"
                    );
                    params.extend([
                        SqlValue::Text(p.clone()),
                        SqlValue::Text(p),
                        number_param(n),
                    ]);
                }
                Value::String(s) => {
                    let _ = write!(
                        sql,
                        "(json_type(data, ?) = 'text' AND json_extract(data, ?) {op_sql} ?)"
                    );
                    params.extend([
                        SqlValue::Text(p.clone()),
                        SqlValue::Text(p),
                        SqlValue::Text(s.clone()),
                    ]);
                }
                Value::Bool(b) => {
                    let _ = write!(sql, "json_type(data, ?) = '{b}'");
                    params.push(SqlValue::Text(p));
                }
                _ => {
                    sql.push_str("json_type(data, ?) = 'null'");
                    params.push(SqlValue::Text(p));
                }
            }
        }
    }
}

/// Renders a query as SQL with positional parameters.
pub(crate) fn render(q: &Query) -> (String, Vec<SqlValue>) {
    let mut sql = String::from(
        "SELECT type, id, data, updated_at, version FROM kalphite_entities WHERE type = ?",
    );
    let mut params = vec![SqlValue::Text(q.kind.clone())];
    let touches_data = q.conditions.iter().any(|c| match c {
        Condition::Compare { field, .. } | Condition::In { field, .. } => {
            matches!(field, Field::Data(_))
        }
    }) || q.order.iter().any(|(f, _)| matches!(f, Field::Data(_)));
    if touches_data {
        // Corrupt rows are skipped rather than failing the JSON functions.
        sql.push_str(" AND json_valid(data)");
    }
    for c in &q.conditions {
        sql.push_str(" AND ");
        match c {
            Condition::Compare { field, op, value } => {
                render_compare(field, *op, value, &mut sql, &mut params);
            }
            Condition::In { field, values } => {
                if values.is_empty() {
                    sql.push_str("0 = 1");
                } else {
                    sql.push('(');
                    for (i, v) in values.iter().enumerate() {
                        if i > 0 {
                            sql.push_str(" OR ");
                        }
                        render_compare(field, Cmp::Eq, v, &mut sql, &mut params);
                    }
                    sql.push(')');
                }
            }
        }
    }
    sql.push_str(" ORDER BY ");
    for (field, dir) in &q.order {
        let d = if *dir == Direction::Desc {
            "DESC"
        } else {
            "ASC"
        };
        match field {
            Field::UpdatedAt => {
                let _ = write!(sql, "updated_at {d}, ");
            }
            Field::Id => {
                let _ = write!(sql, "id {d}, ");
            }
            Field::Data(path) => {
                let p = json_path(path);
                let _ = write!(
                    sql,
                    "CASE json_type(data, ?) WHEN 'null' THEN 1 WHEN 'false' THEN 2 \
                     WHEN 'true' THEN 3 WHEN 'integer' THEN 4 WHEN 'real' THEN 4 \
                     WHEN 'text' THEN 5 WHEN 'array' THEN 6 WHEN 'object' THEN 7 ELSE 0 END {d}, \
                     CASE WHEN json_type(data, ?) IN ('integer', 'real') \
                     THEN json_extract(data, ?) END {d}, \
                     CASE WHEN json_type(data, ?) = 'text' THEN json_extract(data, ?) END {d}, "
                );
                params.extend(std::iter::repeat_n(SqlValue::Text(p), 5));
            }
        }
    }
    sql.push_str("seq");
    let limit = q.limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
    let offset = i64::try_from(q.offset).unwrap_or(i64::MAX);
    sql.push_str(" LIMIT ? OFFSET ?");
    params.extend([SqlValue::Integer(limit), SqlValue::Integer(offset)]);
    (sql, params)
}
