//! [`DatabaseConfig`]: which database to open (a URL), the schema entities are validated
//! against, migrations, and the storage quota; and the parsing of database URLs.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use kalphite::SharedSchema;

use crate::error::{Error, Result};
use crate::migration::Migration;

/// How to open a [`crate::Database`].
///
/// ```
/// use kalphite_db::DatabaseConfig;
/// let config = DatabaseConfig::new("sqlite::memory:").max_storage_mb(64);
/// assert_eq!(config.url, "sqlite::memory:");
/// ```
#[derive(Clone)]
#[non_exhaustive]
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent switches, each set by a builder method of its own"
)]
pub struct DatabaseConfig {
    /// `sqlite:PATH` (a file, created if missing), `sqlite::memory:` (private, in memory)
    /// or `postgres://user[:password]@host[:port]/dbname`.
    pub url: String,
    /// Entities are validated (and normalized) against it on every write and restore.
    pub schema: Option<SharedSchema>,
    /// Run pending migrations when opening (default on). When off, opening a database that
    /// is not at the latest version fails with [`Error::NotMigrated`].
    pub migrations: bool,
    /// Application migrations, applied after the built-in ones (versions ≥ 1000).
    pub app_migrations: Vec<Migration>,
    /// Before applying migrations to a database that already has some, write a backup
    /// (see `docs/database.md`) into [`DatabaseConfig::backup_dir`] (default off).
    pub backup_before_migrate: bool,
    /// Where pre-migration backups go. Defaults to the SQLite file's directory; required
    /// for PostgreSQL and in-memory databases when `backup_before_migrate` is on.
    pub backup_dir: Option<PathBuf>,
    /// Refuse writes that would take the database past this many MiB (default: no limit).
    pub max_storage_mb: Option<u64>,
    /// PostgreSQL only: the schema (namespace) to keep kalphite's tables in; created if
    /// missing and set as the `search_path` of every pooled connection.
    pub postgres_schema: Option<String>,
    /// PostgreSQL only: the connection pool size (default 8).
    pub pool_size: usize,
    /// What a commit waits for (default off). Off: SQLite `synchronous = NORMAL` (WAL),
    /// so a committed write survives a crash of the process but not an OS crash or power
    /// loss; PostgreSQL `synchronous_commit = local`, so it waits for the local WAL flush
    /// (it survives both, on a disk that honours flushes) but not for synchronous standbys.
    /// On: SQLite `synchronous = FULL`, the WAL is synced at every commit (it survives an
    /// OS crash or power loss); PostgreSQL `synchronous_commit = on`, a commit also waits
    /// for the synchronous standbys named in `synchronous_standby_names`, if any.
    pub fsync: bool,
    /// Take the database's writer lock when opening it (default off): one process writes
    /// the database at a time; another opener with this on waits up to
    /// [`DatabaseConfig::writer_lock_wait`], then is refused with [`Error::Busy`]. SQLite:
    /// an exclusive lock on `<file>.lock` beside it, holding the pid; PostgreSQL: an
    /// advisory lock on a key derived from the schema, held by a connection of its own
    /// until the database is closed or dropped. (Readers never need it.)
    pub writer_lock: bool,
    /// Take the writer lock as a cluster node (default off; implies
    /// [`DatabaseConfig::writer_lock`]): PostgreSQL's writer lock in shared mode, so any
    /// number of cluster nodes write the database together while a single-node writer (the
    /// exclusive lock) is refused, and refuses them ([`Error::Busy`] says which kind holds
    /// it). Needs PostgreSQL: on SQLite, opening fails with [`Error::ClusterNeedsPostgres`].
    pub cluster_writer: bool,
    /// How long opening waits for a writer lock held by another process (default 3 s:
    /// enough for one that is shutting down to let go).
    pub writer_lock_wait: Duration,
    /// PostgreSQL: every pooled connection sets `idle_in_transaction_session_timeout` to
    /// this (default none). A transaction left open by a client that stopped answering
    /// mid-way (a cluster node cut off from the database by a silent partition) is then
    /// ended by the server, releasing its row locks: without it, the rooms that node was
    /// committing stay locked, for every node, until the server notices the dead
    /// connection. Cluster nodes set it to their lease TTL.
    pub idle_transaction_timeout: Option<Duration>,
}

impl DatabaseConfig {
    /// A configuration for `url` with the defaults: no schema, migrations on, no
    /// pre-migration backup, no quota.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: None,
            migrations: true,
            app_migrations: Vec::new(),
            backup_before_migrate: false,
            backup_dir: None,
            max_storage_mb: None,
            postgres_schema: None,
            pool_size: 8,
            fsync: false,
            writer_lock: false,
            cluster_writer: false,
            writer_lock_wait: Duration::from_secs(3),
            idle_transaction_timeout: None,
        }
    }

    /// Validates entities against `schema`.
    #[must_use]
    pub fn schema(mut self, schema: SharedSchema) -> Self {
        self.schema = Some(schema);
        self
    }

    /// Turns migrate-on-open on or off.
    #[must_use]
    pub fn migrations(mut self, on: bool) -> Self {
        self.migrations = on;
        self
    }

    /// Adds an application migration.
    #[must_use]
    pub fn migration(mut self, migration: Migration) -> Self {
        self.app_migrations.push(migration);
        self
    }

    /// Turns the pre-migration backup on or off.
    #[must_use]
    pub fn backup_before_migrate(mut self, on: bool) -> Self {
        self.backup_before_migrate = on;
        self
    }

    /// Sets the directory for pre-migration backups.
    #[must_use]
    pub fn backup_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.backup_dir = Some(dir.into());
        self
    }

    /// Sets the storage quota in MiB.
    #[must_use]
    pub fn max_storage_mb(mut self, mb: u64) -> Self {
        self.max_storage_mb = Some(mb);
        self
    }

    /// Keeps kalphite's PostgreSQL tables in `schema`.
    #[must_use]
    pub fn postgres_schema(mut self, schema: impl Into<String>) -> Self {
        self.postgres_schema = Some(schema.into());
        self
    }

    /// Makes every commit wait for the disk (see [`DatabaseConfig::fsync`]).
    #[must_use]
    pub fn fsync(mut self, on: bool) -> Self {
        self.fsync = on;
        self
    }

    /// Takes the writer lock when opening (see [`DatabaseConfig::writer_lock`]).
    #[must_use]
    pub fn writer_lock(mut self, on: bool) -> Self {
        self.writer_lock = on;
        self
    }

    /// Sets [`DatabaseConfig::idle_transaction_timeout`].
    #[must_use]
    pub fn idle_transaction_timeout(mut self, timeout: Duration) -> Self {
        self.idle_transaction_timeout = Some(timeout);
        self
    }

    /// Takes the writer lock as a cluster node, in shared mode (see
    /// [`DatabaseConfig::cluster_writer`]).
    #[must_use]
    pub fn cluster_writer(mut self, on: bool) -> Self {
        self.cluster_writer = on;
        self
    }

    /// Sets how long opening waits for a writer lock held by another process (and
    /// [`crate::Database::join_cluster`] for a node id held by another process).
    #[must_use]
    pub fn writer_lock_wait(mut self, wait: Duration) -> Self {
        self.writer_lock_wait = wait;
        self
    }

    /// Sets the PostgreSQL pool size.
    #[must_use]
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact(&self.url))
            .field("schema", &self.schema.as_ref().map(|_| "<schema>"))
            .field("migrations", &self.migrations)
            .field("app_migrations", &self.app_migrations.len())
            .field("backup_before_migrate", &self.backup_before_migrate)
            .field("backup_dir", &self.backup_dir)
            .field("max_storage_mb", &self.max_storage_mb)
            .field("postgres_schema", &self.postgres_schema)
            .field("pool_size", &self.pool_size)
            .field("fsync", &self.fsync)
            .field("writer_lock", &self.writer_lock)
            .field("cluster_writer", &self.cluster_writer)
            .field("writer_lock_wait", &self.writer_lock_wait)
            .field("idle_transaction_timeout", &self.idle_transaction_timeout)
            .finish()
    }
}

/// Where a URL points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// A SQLite file.
    SqliteFile(PathBuf),
    /// A private in-memory SQLite database.
    SqliteMemory,
    /// A PostgreSQL server (the URL as given).
    Postgres(String),
}

/// Parses a database URL.
pub(crate) fn parse_url(url: &str) -> Result<Target> {
    let invalid = |reason: &str| Error::InvalidUrl {
        url: redact(url),
        reason: reason.into(),
    };
    if let Some(rest) = url.strip_prefix("sqlite:") {
        if rest == ":memory:" || rest == "//:memory:" {
            return Ok(Target::SqliteMemory);
        }
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if path.is_empty() {
            return Err(invalid("the SQLite path is empty"));
        }
        return Ok(Target::SqliteFile(PathBuf::from(path)));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Target::Postgres(url.to_owned()));
    }
    if url.is_empty() {
        return Err(invalid("the URL is empty"));
    }
    if !url.contains("://") {
        // A bare path names a SQLite file, as sqlite3 takes one.
        return Ok(Target::SqliteFile(PathBuf::from(url)));
    }
    Err(invalid(
        "unknown scheme: use sqlite:PATH, a file path, or postgres://…",
    ))
}

/// The URL with any password replaced by `***`, for messages and logs.
#[must_use]
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let after = &url[scheme_end + 3..];
    let authority_end = after.find('/').unwrap_or(after.len());
    let authority = &after[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &authority[..colon],
            &url[scheme_end + 3 + at..]
        ),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_path_is_a_sqlite_file() {
        assert_eq!(
            parse_url("todo.db").unwrap(),
            Target::SqliteFile(PathBuf::from("todo.db"))
        );
        assert!(parse_url("mysql://x").is_err());
    }

    #[test]
    fn sqlite_urls_parse() {
        assert_eq!(parse_url("sqlite::memory:").unwrap(), Target::SqliteMemory);
        assert_eq!(
            parse_url("sqlite:a/b.db").unwrap(),
            Target::SqliteFile("a/b.db".into())
        );
        assert_eq!(
            parse_url("sqlite:///tmp/x.db").unwrap(),
            Target::SqliteFile("/tmp/x.db".into())
        );
        assert!(matches!(
            parse_url("sqlite:"),
            Err(Error::InvalidUrl { .. })
        ));
    }

    #[test]
    fn unknown_schemes_are_refused_with_the_url() {
        let err = parse_url("mysql://localhost/db").unwrap_err();
        assert!(err.to_string().contains("mysql://localhost/db"), "{err}");
        assert!(matches!(parse_url(""), Err(Error::InvalidUrl { .. })));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        let err = parse_url("pg://u:secret@h/db").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
