//! One writer per database: the lock a process holds for as long as it writes a database
//! that others must not write at the same time (the sync server's room log). SQLite: an
//! exclusive lock on `<file>.lock` beside the database, holding the owner's pid (the file
//! the kalphite client locks too). PostgreSQL: `pg_try_advisory_lock` on a key derived
//! from the schema, held by a dedicated connection; if that connection ends, the lock is
//! gone, and the database takes it again before its next write (or refuses the write).

use std::fmt::Write as _;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_postgres::NoTls;

use crate::error::{Error, Result};

/// How often a held lock is tried again while waiting for it.
const RETRY: Duration = Duration::from_millis(50);

/// The key of a schema's lock: `$1` is the schema, or `NULL` for the connection's own.
const KEY: &str = "hashtextextended('kalphite_writer:' || COALESCE($1, current_schema(), ''), 0)";

/// What a database's writer lock is taken on.
pub(crate) enum LockTarget {
    /// A private in-memory database.
    Private,
    /// A SQLite file.
    File(PathBuf),
    /// A PostgreSQL schema (`None`: the connections' current schema), reached with the
    /// pool's connection settings.
    Postgres {
        config: Box<tokio_postgres::Config>,
        schema: Option<String>,
    },
}

impl LockTarget {
    /// Takes the lock, trying for `wait`; `label` names the database in messages. `lost`
    /// is set if the lock goes away by itself (its PostgreSQL connection ended).
    pub(crate) async fn acquire(
        &self,
        label: &str,
        wait: Duration,
        lost: &Arc<AtomicBool>,
    ) -> Result<WriterLock> {
        match self {
            Self::Private => Ok(WriterLock::Private),
            Self::File(path) => WriterLock::sqlite(path, wait).await,
            Self::Postgres { config, schema } => {
                WriterLock::postgres(config, schema.as_deref(), label, wait, Arc::clone(lost)).await
            }
        }
    }
}

/// A held writer lock; dropping it releases it.
pub(crate) enum WriterLock {
    /// A private in-memory database: nobody else can reach it.
    Private,
    /// The locked `<file>.lock` (closing it releases the lock).
    File(#[allow(dead_code, reason = "held for its lock, never read")] File),
    /// The connection holding the advisory lock (ending it releases the lock), and the key.
    Postgres(tokio_postgres::Client, i64),
}

impl WriterLock {
    /// Locks `<db>.lock` beside the SQLite file `db`, trying for `wait`.
    pub(crate) async fn sqlite(db: &Path, wait: Duration) -> Result<Self> {
        let mut name = db.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(RETRY).await;
                }
                Err(TryLockError::WouldBlock) => {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    let pid = text.trim().parse::<u32>().ok();
                    return Err(Error::Busy {
                        target: db.display().to_string(),
                        holder: pid.map(|pid| format!("pid {pid}, per {}", path.display())),
                        pid,
                    });
                }
                Err(TryLockError::Error(e)) => return Err(io(e)),
            }
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(Self::File(file))
    }

    /// Takes the advisory lock of `schema` (`None`: the connection's current schema) on a
    /// connection of its own, trying for `wait`. `label` names the database in messages;
    /// `lost` is set when that connection ends (and with it the lock).
    pub(crate) async fn postgres(
        config: &tokio_postgres::Config,
        schema: Option<&str>,
        label: &str,
        wait: Duration,
        lost: Arc<AtomicBool>,
    ) -> Result<Self> {
        let mut config = config.clone();
        // What a refused second writer reads in pg_stat_activity.
        config.application_name(format!("kalphite writer (pid {})", std::process::id()));
        let (client, connection) = config.connect(NoTls).await.map_err(|e| Error::Connect {
            target: label.to_owned(),
            message: format!("opening the writer-lock connection: {e}"),
        })?;
        // Only a connection that got the lock loses it when it ends.
        let held = Arc::new(AtomicBool::new(false));
        let holding = Arc::clone(&held);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "the connection of the writer lock failed");
            }
            if holding.load(Ordering::Acquire) {
                lost.store(true, Ordering::Release);
            }
        });
        let ctx = "taking the writer lock";
        let key: i64 = client
            .query_one(&format!("SELECT {KEY}"), &[&schema])
            .await
            .map_err(Error::postgres(ctx))?
            .get(0);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let locked: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                .await
                .map_err(Error::postgres(ctx))?
                .get(0);
            if locked {
                held.store(true, Ordering::Release);
                return Ok(Self::Postgres(client, key));
            }
            if tokio::time::Instant::now() >= deadline {
                let holder = holder(&client, key).await;
                return Err(Error::Busy {
                    target: match schema {
                        Some(schema) => format!("{label} (schema {schema})"),
                        None => label.to_owned(),
                    },
                    holder,
                    pid: None,
                });
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Releases the lock now (dropping it does too, PostgreSQL's a moment later).
    pub(crate) async fn release(self) {
        if let Self::Postgres(client, key) = self {
            let _ = client
                .execute("SELECT pg_advisory_unlock($1)", &[&key])
                .await;
        }
    }
}

/// Who holds the advisory lock `key`, as PostgreSQL sees it.
async fn holder(client: &tokio_postgres::Client, key: i64) -> Option<String> {
    let row = client
        .query_opt(
            "SELECT a.pid, a.application_name, host(a.client_addr) \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND l.classid = (($1::int8 >> 32) & 4294967295)::oid \
             AND l.objid = ($1::int8 & 4294967295)::oid",
            &[&key],
        )
        .await
        .ok()??;
    let pid: i32 = row.try_get(0).ok()?;
    let app: Option<String> = row.try_get(1).ok()?;
    let host: Option<String> = row.try_get(2).ok()?;
    let mut who = format!("PostgreSQL backend pid {pid}");
    if let Some(app) = app.filter(|a| !a.is_empty()) {
        let _ = write!(who, ", application '{app}'");
    }
    if let Some(host) = host {
        let _ = write!(who, ", from {host}");
    }
    Some(who)
}
