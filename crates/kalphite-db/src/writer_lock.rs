//! One writer per database: the lock a process holds for as long as it writes a database
//! that others must not write at the same time (the sync server's room log). SQLite: an
//! exclusive lock on `<file>.lock` beside the database, holding the owner's pid (the file
//! the kalphite client locks too). PostgreSQL: `pg_try_advisory_lock` on a key derived
//! from the schema, held by a dedicated connection; if that connection ends, the lock is
//! gone, and the database takes it again before its next write (or refuses the write).
//! Cluster nodes take the same PostgreSQL lock in shared mode: they coexist with each other
//! and exclude a single-node writer, which excludes them.

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

/// Who holds a writer lock that was refused (see [`Error::Busy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriterKind {
    /// Another process: a SQLite lock file's owner, or a holder PostgreSQL no longer shows.
    Process,
    /// A single-node writer (`kalphite serve` without `--cluster`): PostgreSQL's exclusive
    /// writer lock.
    SingleNode,
    /// Cluster nodes: PostgreSQL's writer lock in shared mode.
    Cluster,
}

impl std::fmt::Display for WriterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Process => "another process",
            Self::SingleNode => "a single-node server",
            Self::Cluster => "cluster nodes",
        })
    }
}

/// What a database's writer lock is taken on.
pub(crate) enum LockTarget {
    /// A private in-memory database.
    Private,
    /// A SQLite file.
    File(PathBuf),
    /// A PostgreSQL schema (`None`: the connections' current schema), reached with the
    /// pool's connection settings; `shared` for a cluster node.
    Postgres {
        config: Box<tokio_postgres::Config>,
        schema: Option<String>,
        shared: bool,
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
            Self::Postgres {
                config,
                schema,
                shared,
            } => {
                let schema = schema.as_deref();
                let lost = Arc::clone(lost);
                WriterLock::postgres(config, schema, *shared, label, wait, lost).await
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
    /// The connection holding the advisory lock (ending it releases the lock), the key,
    /// and whether it is held in shared mode (a cluster node).
    Postgres(tokio_postgres::Client, i64, bool),
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
                        by: WriterKind::Process,
                        cluster: false,
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
    /// connection of its own, trying for `wait`; in shared mode with `shared` (a cluster
    /// node). `label` names the database in messages; `lost` is set when that connection
    /// ends (and with it the lock).
    pub(crate) async fn postgres(
        config: &tokio_postgres::Config,
        schema: Option<&str>,
        shared: bool,
        label: &str,
        wait: Duration,
        lost: Arc<AtomicBool>,
    ) -> Result<Self> {
        let mut config = config.clone();
        // What a refused second writer reads in pg_stat_activity.
        let role = if shared {
            "kalphite cluster node"
        } else {
            "kalphite writer"
        };
        config.application_name(format!("{role} (pid {})", std::process::id()));
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
        let try_lock = if shared {
            "SELECT pg_try_advisory_lock_shared($1)"
        } else {
            "SELECT pg_try_advisory_lock($1)"
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let locked: bool = client
                .query_one(try_lock, &[&key])
                .await
                .map_err(Error::postgres(ctx))?
                .get(0);
            if locked {
                held.store(true, Ordering::Release);
                return Ok(Self::Postgres(client, key, shared));
            }
            if tokio::time::Instant::now() >= deadline {
                let holders = lock_holders(&client, key).await;
                return Err(Error::Busy {
                    target: match schema {
                        Some(schema) => format!("{label} (schema {schema})"),
                        None => label.to_owned(),
                    },
                    holder: describe(&holders),
                    pid: None,
                    by: writer_kind(&holders),
                    cluster: shared,
                });
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Releases the lock now (dropping it does too, PostgreSQL's a moment later).
    pub(crate) async fn release(self) {
        if let Self::Postgres(client, key, shared) = self {
            let unlock = if shared {
                "SELECT pg_advisory_unlock_shared($1)"
            } else {
                "SELECT pg_advisory_unlock($1)"
            };
            let _ = client.execute(unlock, &[&key]).await;
        }
    }
}

/// One session holding an advisory lock, as PostgreSQL sees it.
pub(crate) struct LockHolder {
    /// Whether it holds the lock in shared mode.
    pub shared: bool,
    /// What to call it in a message: backend pid, application name, client address.
    pub who: String,
}

/// The sessions holding the advisory lock `key` in this database (empty if none, or if
/// PostgreSQL could not say).
pub(crate) async fn lock_holders(client: &tokio_postgres::Client, key: i64) -> Vec<LockHolder> {
    let Ok(rows) = client
        .query(
            "SELECT l.mode = 'ShareLock', a.pid, a.application_name, host(a.client_addr) \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND l.classid = (($1::int8 >> 32) & 4294967295)::oid \
             AND l.objid = ($1::int8 & 4294967295)::oid \
             ORDER BY a.pid",
            &[&key],
        )
        .await
    else {
        return Vec::new();
    };
    rows.iter()
        .filter_map(|row| {
            let shared: bool = row.try_get(0).ok()?;
            let pid: i32 = row.try_get(1).ok()?;
            let app: Option<String> = row.try_get(2).ok()?;
            let host: Option<String> = row.try_get(3).ok()?;
            let mut who = format!("PostgreSQL backend pid {pid}");
            if let Some(app) = app.filter(|a| !a.is_empty()) {
                let _ = write!(who, ", application '{app}'");
            }
            if let Some(host) = host {
                let _ = write!(who, ", from {host}");
            }
            Some(LockHolder { shared, who })
        })
        .collect()
}

/// The holders of a writer lock in one line: the first three, and how many more.
pub(crate) fn describe(holders: &[LockHolder]) -> Option<String> {
    const SHOWN: usize = 3;
    let mut text = holders
        .iter()
        .take(SHOWN)
        .map(|h| h.who.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    if holders.len() > SHOWN {
        let _ = write!(text, "; and {} more", holders.len() - SHOWN);
    }
    (!text.is_empty()).then_some(text)
}

/// What kind of writer the holders of a writer lock are.
fn writer_kind(holders: &[LockHolder]) -> WriterKind {
    if holders.iter().any(|h| !h.shared) {
        WriterKind::SingleNode
    } else if holders.is_empty() {
        WriterKind::Process
    } else {
        WriterKind::Cluster
    }
}
