//! Errors of the database layer: one [`Error`] enum whose variants carry typed fields and
//! whose messages say what was refused, why, and what to do about it.

use kalphite::Issue;

use crate::writer_lock::WriterKind;

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the database layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database URL is not one of the supported forms.
    #[error(
        "invalid database URL '{url}': {reason} (expected 'sqlite:PATH', 'sqlite::memory:' or \
         'postgres://user@host:port/dbname')"
    )]
    InvalidUrl {
        /// The URL as given (passwords redacted).
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The configuration is inconsistent.
    #[error("invalid database configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },

    /// The database could not be opened or reached.
    #[error("could not open database {target}: {message}")]
    Connect {
        /// What was tried: a file path or a redacted PostgreSQL URL.
        target: String,
        /// Why it failed.
        message: String,
    },

    /// SQLite reported an error.
    #[error("SQLite error while {context}: {source}")]
    Sqlite {
        /// The operation that failed.
        context: String,
        /// The driver's error.
        #[source]
        source: rusqlite::Error,
    },

    /// PostgreSQL reported an error.
    #[error("PostgreSQL error while {context}: {source}")]
    Postgres {
        /// The operation that failed.
        context: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// No PostgreSQL connection could be taken from the pool.
    #[error("PostgreSQL connection pool error while {context}: {message}")]
    Pool {
        /// The operation that needed a connection.
        context: String,
        /// The pool's explanation.
        message: String,
    },

    /// An entity's data was rejected by the schema; nothing was written.
    #[error("entity {kind}/{id} was refused by the schema: {}", join(.issues))]
    Validation {
        /// The entity's kind.
        kind: String,
        /// The entity's id.
        id: String,
        /// Every problem found.
        issues: Vec<Issue>,
    },

    /// An entity holds a string PostgreSQL cannot store: a NUL character (U+0000) in its
    /// kind, its id, or a string or key of its data. Refused before anything is written (on
    /// PostgreSQL; by [`crate::check_storable`] on any backend).
    #[error(
        "entity {kind:?}/{id:?} cannot be stored: {field} contains a NUL character (U+0000), \
         which PostgreSQL cannot hold; nothing was written, remove the character"
    )]
    Unstorable {
        /// The entity's kind.
        kind: String,
        /// The entity's id.
        id: String,
        /// Where the character is: `the kind`, `the id`, `data.a[2].b` or `a key of data.a`.
        field: String,
    },

    /// An entity's data could not be turned into JSON.
    #[error("entity {kind}/{id} could not be serialized to JSON: {source}")]
    Serialize {
        /// The entity's kind.
        kind: String,
        /// The entity's id.
        id: String,
        /// serde's explanation.
        #[source]
        source: serde_json::Error,
    },

    /// A change record is malformed (for example an upsert without its entity).
    #[error("malformed change for {kind}/{id}: {reason}")]
    InvalidChange {
        /// The entity's kind.
        kind: String,
        /// The entity's id.
        id: String,
        /// What is missing or wrong.
        reason: String,
    },

    /// Writing would take the database past its storage quota; nothing was written.
    #[error(
        "storage quota exceeded: the database uses {used_bytes} bytes of its {limit_mb} MB limit \
         and this write needs {needed_bytes} more bytes; nothing was written (delete data or \
         raise max_storage_mb)"
    )]
    QuotaExceeded {
        /// The configured limit, in MiB.
        limit_mb: u64,
        /// Bytes in use before the write.
        used_bytes: u64,
        /// Bytes the refused write would add: its net growth (what it adds less what it
        /// frees).
        needed_bytes: u64,
    },

    /// A migration failed; the database is as it was before that migration.
    #[error("migration {version} '{name}' failed while {direction}: {message}")]
    MigrationFailed {
        /// The migration's version.
        version: i64,
        /// The migration's name.
        name: String,
        /// "applying" or "rolling back".
        direction: &'static str,
        /// The database's explanation.
        message: String,
    },

    /// The list of migrations is unusable (duplicate versions, reserved versions, missing SQL).
    #[error("invalid migration list: {reason}")]
    InvalidMigration {
        /// What is wrong.
        reason: String,
    },

    /// The database has a migration applied that this program does not know, so it was
    /// written by a newer program; refusing to touch it.
    #[error(
        "the database has migration {version} applied, which this program does not know \
         (it was migrated by a newer version); upgrade the program"
    )]
    UnknownMigration {
        /// The unknown version.
        version: i64,
    },

    /// Migrations are turned off and the database is not at the latest version.
    #[error(
        "the database is not migrated (pending: {pending:?}); open it with migrations enabled \
         or run them first"
    )]
    NotMigrated {
        /// Versions that still need to be applied.
        pending: Vec<i64>,
    },

    /// A query built with [`crate::Query`] cannot be run.
    #[error("invalid query: {reason}")]
    InvalidQuery {
        /// What is wrong with it.
        reason: String,
    },

    /// A backup could not be read; nothing was restored and the old contents are kept.
    #[error("backup refused at line {line}: {reason}; the database was not changed")]
    InvalidBackup {
        /// 1-based line of the backup where the problem was found (0: the whole file).
        line: usize,
        /// What is wrong.
        reason: String,
    },

    /// A file could not be read or written.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The in-memory store refused something while being opened over the database.
    #[error("the store refused it while {context}: {source}")]
    Store {
        /// What was being done.
        context: &'static str,
        /// The store's error.
        #[source]
        source: kalphite::Error,
    },

    /// Another process holds the database's writer lock (see
    /// [`crate::DatabaseConfig::writer_lock`]): one process writes it at a time, or any
    /// number of cluster nodes (see [`crate::DatabaseConfig::cluster_writer`]) but then no
    /// single-node writer.
    #[error(
        "{target} is already being written by {by}{}; {}",
        holder.as_ref().map_or_else(String::new, |h| format!(" ({h})")),
        busy_advice(*by, *cluster)
    )]
    Busy {
        /// The database: the SQLite file, or the PostgreSQL URL (redacted) and schema.
        target: String,
        /// Who holds the lock, when known: a pid, or PostgreSQL's view of the connection(s).
        holder: Option<String>,
        /// The holding process's id, when it is known (SQLite: written in the lock file).
        pid: Option<u32>,
        /// What kind of writer holds it.
        by: WriterKind,
        /// Whether the refused opener wanted to write as a cluster node (the shared lock).
        cluster: bool,
    },

    /// A cluster call on a database that is not PostgreSQL: cluster mode (several server
    /// nodes on one database, see [`crate::Database::join_cluster`]) needs PostgreSQL.
    #[error(
        "cluster mode needs PostgreSQL: {target} is a SQLite database, which one server \
         writes at a time (use a postgres:// URL, or run a single node)"
    )]
    ClusterNeedsPostgres {
        /// The database that was opened (the SQLite path).
        target: String,
    },

    /// Another live process holds this cluster node id's liveness lock (see
    /// [`crate::Database::join_cluster`]).
    #[error(
        "cluster node id '{node}' is already in use by a live process{}; give this node \
         another id, or stop that one",
        holder.as_ref().map_or_else(String::new, |h| format!(" ({h})"))
    )]
    NodeTaken {
        /// The node id.
        node: String,
        /// PostgreSQL's view of the connection holding it, when known.
        holder: Option<String>,
    },

    /// A fenced write or version update was refused because this node no longer holds the
    /// room at that term (another node took it, the lease was released, or the room's
    /// version is not the one expected): nothing was written.
    #[error(
        "room '{room}' was not written: this node no longer owns it at that term (another \
         node took it over, or its version moved); nothing was written, reload the room"
    )]
    Fenced {
        /// The room whose fence failed (the first one found).
        room: String,
    },

    /// [`crate::Database::init_room_version`] found the room's version already set, at the
    /// same term, to another value.
    #[error(
        "room '{room}' already has version {stored} at this term, not {given}; its log and \
         its cluster row disagree"
    )]
    VersionAlreadySet {
        /// The room.
        room: String,
        /// The version in the room's row.
        stored: i64,
        /// The version that was to be set.
        given: i64,
    },

    /// The fences of a fenced write do not make sense together (see
    /// [`crate::Database::upsert_batch_fenced`]).
    #[error("invalid fences: {reason}")]
    InvalidFences {
        /// What is wrong.
        reason: String,
    },

    /// The database was closed.
    #[error("the database is closed")]
    Closed,
}

/// What a refused writer can do, by who holds the lock and what it wanted.
fn busy_advice(by: WriterKind, cluster: bool) -> &'static str {
    match (by, cluster) {
        (WriterKind::Cluster, false) => {
            "a single-node server cannot share it with cluster nodes: stop them, run this one \
             as a cluster node, or use another database"
        }
        (WriterKind::SingleNode, true) => {
            "cluster nodes cannot share it with a single-node server: stop that one, or use \
             another database"
        }
        _ => "only one process may write it at a time: stop that one, or use another database",
    }
}

fn join(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    /// True for [`Error::Fenced`]: this node lost the room (its lease or term), so the write
    /// was refused and nothing of it was written. Never [`Error::is_unavailable`].
    #[must_use]
    pub fn is_fenced(&self) -> bool {
        matches!(self, Self::Fenced { .. })
    }

    /// True when the database could do no write just now: it could not be reached, is
    /// closed, busy (or its writer lock is held elsewhere), or out of disk or memory. Such a failure says nothing about what was
    /// being written (retrying part of the batch would fail the same way); other errors
    /// are about the data (validation, a NUL character, the quota, a value refused).
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        use rusqlite::ErrorCode as Sq;
        match self {
            Self::Connect { .. }
            | Self::Pool { .. }
            | Self::Io { .. }
            | Self::Busy { .. }
            | Self::Closed => true,
            Self::Sqlite { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(
                    Sq::DatabaseBusy
                        | Sq::DatabaseLocked
                        | Sq::SystemIoFailure
                        | Sq::DiskFull
                        | Sq::CannotOpen
                        | Sq::ReadOnly
                        | Sq::OutOfMemory
                        | Sq::PermissionDenied
                        | Sq::FileLockingProtocolFailed
                )
            ),
            // No SQLSTATE: the connection broke. Classes 08 (connection), 53 (resources),
            // 57 (operator intervention, shutdown), 58 (system error).
            Self::Postgres { source, .. } => source
                .code()
                .is_none_or(|code| matches!(code.code().get(..2), Some("08" | "53" | "57" | "58"))),
            _ => false,
        }
    }

    pub(crate) fn sqlite(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> Self {
        let context = context.into();
        move |source| Self::Sqlite { context, source }
    }

    pub(crate) fn postgres(
        context: impl Into<String>,
    ) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let context = context.into();
        move |source| Self::Postgres { context, source }
    }
}
