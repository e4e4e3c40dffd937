//! [`Database`]: the one async API over both backends. It validates and normalizes data
//! against the schema, stamps `updatedAt`, enforces the quota, runs migrations, and turns
//! entities and changes into rows; the backends only run SQL.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kalphite::{Change, Entity, EntityId, Kind, Op, SharedSchema, now_millis};
use serde_json::Value;

use crate::backend::{Backend, Row, StoredEntity, Write};
use crate::backup;
use crate::config::{DatabaseConfig, Target, parse_url, redact};
use crate::error::{Error, Result};
use crate::migration::{self, AppliedMigration, Dialect, Migration};
use crate::postgres::Postgres;
use crate::query::Query;
use crate::quota::Quota;
use crate::sqlite::Sqlite;
use crate::storable::check_storable;
use crate::sync_state::{SyncTables, SyncWrite};
use crate::writer_lock::{LockTarget, WriterLock};

/// An open database: SQLite or PostgreSQL behind one API. A cheap `Clone` handle.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use kalphite::Entity;
/// use kalphite_db::{Database, DatabaseConfig};
/// let db = Database::open(DatabaseConfig::new("sqlite::memory:")).await?;
/// db.upsert(Entity::new("c1", "comment", serde_json::json!({"message": "hi"}))).await?;
/// let back = db.get_by_id("comment", "c1").await?.expect("stored");
/// assert_eq!(back.data["message"], "hi");
/// db.close().await?;
/// # Ok::<(), kalphite_db::Error>(()) }).unwrap();
/// ```
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Box<dyn Backend>,
    schema: Option<SharedSchema>,
    quota: Option<Quota>,
    /// Built-in migrations followed by the application's, checked and sorted.
    migrations: Vec<Migration>,
    /// What was opened, for messages (passwords redacted).
    label: String,
    /// The writer lock, once taken (see [`DatabaseConfig::writer_lock`]). An async mutex:
    /// taking the lock waits, and a second taker must wait for the first, not fail.
    writer: tokio::sync::Mutex<Option<WriterLock>>,
    /// Whether `writer` holds the lock, readable without waiting.
    holds_writer: AtomicBool,
    /// Set when the held lock went away by itself (its PostgreSQL connection ended): the
    /// next write takes it again first, or is refused.
    writer_lost: Arc<AtomicBool>,
    /// Set by `close`: a lock released then is not taken again.
    closed: AtomicBool,
    /// What the writer lock is taken on.
    lock_target: LockTarget,
    writer_lock_wait: Duration,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("backend", &self.inner.backend.name())
            .field("target", &self.inner.label)
            .finish_non_exhaustive()
    }
}

impl Database {
    /// Opens the database at `config.url`, then (unless turned off) migrates it to the
    /// latest version, writing a backup first when `backup_before_migrate` is on.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`], [`Error::Connect`] (naming what was tried), migration errors,
    /// [`Error::NotMigrated`] when migrations are off and some are pending, and
    /// [`Error::Busy`] when [`DatabaseConfig::writer_lock`] is on and another process
    /// holds the lock.
    pub async fn open(config: DatabaseConfig) -> Result<Self> {
        let target = parse_url(&config.url)?;
        let wait = config.writer_lock_wait;
        if config.cluster_writer {
            match &target {
                Target::SqliteMemory => {
                    return Err(Error::ClusterNeedsPostgres {
                        target: "sqlite::memory:".into(),
                    });
                }
                Target::SqliteFile(path) => {
                    return Err(Error::ClusterNeedsPostgres {
                        target: path.display().to_string(),
                    });
                }
                Target::Postgres(_) => {}
            }
        }
        // A SQLite file is locked before it is opened; PostgreSQL once connected. Either
        // way before any migration runs.
        let mut writer = None;
        let (backend, label, default_backup_dir, lock_target): (
            Box<dyn Backend>,
            String,
            Option<PathBuf>,
            LockTarget,
        ) = match &target {
            Target::SqliteMemory => (
                Box::new(Sqlite::open(None, config.fsync).await?),
                "sqlite::memory:".into(),
                None,
                LockTarget::Private,
            ),
            Target::SqliteFile(path) => {
                if config.writer_lock {
                    writer = Some(WriterLock::sqlite(path, wait).await?);
                }
                let dir = path.parent().map(|p| {
                    if p.as_os_str().is_empty() {
                        PathBuf::from(".")
                    } else {
                        p.to_path_buf()
                    }
                });
                (
                    Box::new(Sqlite::open(Some(path), config.fsync).await?),
                    path.display().to_string(),
                    dir,
                    LockTarget::File(path.clone()),
                )
            }
            Target::Postgres(url) => {
                let pg = Postgres::open(
                    url,
                    config.postgres_schema.as_deref(),
                    config.pool_size,
                    config.fsync,
                    config.idle_transaction_timeout,
                )
                .await?;
                let lock_target = LockTarget::Postgres {
                    config: Box::new(pg.connect_config().clone()),
                    schema: config.postgres_schema.clone(),
                    shared: config.cluster_writer,
                };
                (Box::new(pg), redact(url), None, lock_target)
            }
        };
        let writer_lost = Arc::new(AtomicBool::new(false));
        if (config.writer_lock || config.cluster_writer) && writer.is_none() {
            writer = Some(lock_target.acquire(&label, wait, &writer_lost).await?);
        }
        let migrations = migration::all_migrations(&config.app_migrations, backend.dialect())?;
        let backup_dir = config.backup_dir.clone().or(default_backup_dir);
        if config.backup_before_migrate && backup_dir.is_none() {
            return Err(Error::InvalidConfig {
                reason: format!("backup_before_migrate needs a backup_dir for {label}"),
            });
        }
        let db = Self {
            inner: Arc::new(Inner {
                backend,
                schema: config.schema.clone(),
                quota: config.max_storage_mb.map(|limit_mb| Quota { limit_mb }),
                migrations,
                label,
                holds_writer: AtomicBool::new(writer.is_some()),
                writer_lost,
                closed: AtomicBool::new(false),
                writer: tokio::sync::Mutex::new(writer),
                lock_target,
                writer_lock_wait: wait,
            }),
        };
        let applied: Vec<i64> = db
            .applied_migrations()
            .await?
            .into_iter()
            .map(|m| m.version)
            .collect();
        let steps = migration::plan(
            &db.inner.migrations,
            &applied,
            None,
            db.inner.backend.dialect(),
        )?;
        if !steps.is_empty() {
            if !config.migrations {
                return Err(Error::NotMigrated {
                    pending: steps.iter().map(|s| s.version).collect(),
                });
            }
            if config.backup_before_migrate
                && applied.contains(&1)
                && let Some(dir) = backup_dir
            {
                let from = applied.iter().max().copied().unwrap_or(0);
                let path = dir.join(format!(
                    "kalphite-pre-migrate-v{from}-{}.jsonl",
                    now_millis()
                ));
                db.backup_to_file(&path).await?;
                tracing::info!(path = %path.display(), "wrote a backup before migrating");
            }
            db.migrate_to(None).await?;
        }
        Ok(db)
    }

    /// Takes the database's writer lock, if this handle does not hold it yet (see
    /// [`DatabaseConfig::writer_lock`], which takes it when opening): after `Ok`, no other
    /// process holding the lock writes this database until this one is closed or dropped.
    ///
    /// # Errors
    /// [`Error::Busy`] when another process holds it past the configured wait (naming the
    /// holder when known), [`Error::Io`] or [`Error::Connect`] when the lock cannot be
    /// taken at all.
    pub async fn lock_writer(&self) -> Result<()> {
        let mut writer = self.inner.writer.lock().await;
        if writer.is_none() {
            let lock = self
                .inner
                .lock_target
                .acquire(
                    &self.inner.label,
                    self.inner.writer_lock_wait,
                    &self.inner.writer_lost,
                )
                .await?;
            *writer = Some(lock);
            self.inner.holds_writer.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Whether this handle holds the database's writer lock (false once it went away by
    /// itself, until the next write takes it again).
    #[must_use]
    pub fn holds_writer_lock(&self) -> bool {
        self.inner.holds_writer.load(Ordering::Acquire)
            && !self.inner.writer_lost.load(Ordering::Acquire)
    }

    /// Before a write: if the writer lock this handle held went away by itself (its
    /// PostgreSQL connection ended), takes it again, without waiting.
    ///
    /// # Errors
    /// [`Error::Busy`] when another process took it meanwhile (or PostgreSQL has not yet
    /// noticed that the old connection is gone): nothing is written until the lock is back.
    pub(crate) async fn writable(&self) -> Result<()> {
        let lost = &self.inner.writer_lost;
        if !lost.load(Ordering::Acquire) || self.inner.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut writer = self.inner.writer.lock().await;
        if !lost.load(Ordering::Acquire) {
            return Ok(()); // another write took it again
        }
        tracing::warn!(target = %self.inner.label,
            "the connection holding the writer lock ended; taking the lock again");
        writer.take();
        self.inner.holds_writer.store(false, Ordering::Release);
        // Cleared first: a new connection that ends at once sets it again.
        lost.store(false, Ordering::Release);
        let label = &self.inner.label;
        match self
            .inner
            .lock_target
            .acquire(label, Duration::ZERO, lost)
            .await
        {
            Ok(lock) => {
                *writer = Some(lock);
                self.inner.holds_writer.store(true, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                lost.store(true, Ordering::Release);
                tracing::error!(target = %label, error = %e, "the writer lock could not be taken again");
                Err(e)
            }
        }
    }

    /// What a commit waits for, as the database reports it: SQLite's `synchronous`
    /// (`synchronous = NORMAL`, or `FULL` with [`DatabaseConfig::fsync`]) or PostgreSQL's
    /// `synchronous_commit` (`local`, or `on` with `fsync`).
    ///
    /// # Errors
    /// Backend errors.
    pub async fn commit_sync(&self) -> Result<String> {
        self.inner.backend.commit_sync().await
    }

    /// `sqlite` or `postgres`.
    #[must_use]
    pub fn backend_name(&self) -> &'static str {
        self.inner.backend.name()
    }

    /// Where this database's rows live, as an opaque string that a copy of them does not
    /// share: the SQLite file's device and inode; for PostgreSQL the cluster's system
    /// identifier, the database's oid and the schema. A sync client stores it beside its
    /// replica id, so a copied or restored database is noticed and syncs as a replica of
    /// its own. `None` where it cannot be told (an in-memory database, SQLite off Unix).
    ///
    /// # Errors
    /// Backend errors (PostgreSQL).
    pub async fn storage_identity(&self) -> Result<Option<String>> {
        if self.backend_name() != "sqlite" {
            return self.inner.backend.server_identity().await;
        }
        let Ok(meta) = std::fs::metadata(self.target()) else {
            return Ok(None);
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            Ok(Some(format!("{}:{}", meta.dev(), meta.ino())))
        }
        #[cfg(not(unix))]
        {
            let _ = meta;
            Ok(None)
        }
    }

    /// What was opened: the SQLite path or the PostgreSQL URL with its password redacted.
    #[must_use]
    pub fn target(&self) -> &str {
        &self.inner.label
    }

    // ----- migrations -----

    /// The migrations recorded as applied, oldest first.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn applied_migrations(&self) -> Result<Vec<AppliedMigration>> {
        self.inner.backend.applied_migrations().await
    }

    /// Applies every pending migration up to `target` (`None`: the latest), each in its own
    /// transaction, or rolls back every applied one above `target`; returns the versions
    /// run. A failing migration leaves the database as it was before it.
    ///
    /// # Errors
    /// [`Error::MigrationFailed`] naming the migration, [`Error::UnknownMigration`].
    pub async fn migrate_to(&self, target: Option<i64>) -> Result<Vec<i64>> {
        let applied: Vec<i64> = self
            .applied_migrations()
            .await?
            .into_iter()
            .map(|m| m.version)
            .collect();
        let steps = migration::plan(
            &self.inner.migrations,
            &applied,
            target,
            self.inner.backend.dialect(),
        )?;
        let mut done = Vec::with_capacity(steps.len());
        for step in steps {
            tracing::info!(version = step.version, name = %step.name, up = step.up, "migration");
            let version = step.version;
            self.writable().await?;
            self.inner.backend.run_step(step).await?;
            done.push(version);
        }
        Ok(done)
    }

    /// Rolls back every applied migration above `version` (0 removes kalphite's tables).
    ///
    /// # Errors
    /// As [`Database::migrate_to`].
    pub async fn rollback_to(&self, version: i64) -> Result<Vec<i64>> {
        self.migrate_to(Some(version)).await
    }

    // ----- writes -----

    /// On PostgreSQL, refuses what it cannot store (a NUL character) before anything is
    /// sent, with a typed error instead of the server's. SQLite stores it; callers whose
    /// data must move between backends (the sync server's room log) call
    /// [`check_storable`] themselves.
    fn storable(&self, kind: &str, id: &str, data: &Value) -> Result<()> {
        if self.inner.backend.dialect() == Dialect::Postgres {
            check_storable(kind, id, data)?;
        }
        Ok(())
    }

    fn row(&self, mut entity: Entity) -> Result<(Row, Entity)> {
        if let Some(schema) = &self.inner.schema {
            entity.data = schema
                .normalize(&entity.kind, entity.data)
                .map_err(|issues| Error::Validation {
                    kind: entity.kind.to_string(),
                    id: entity.id.to_string(),
                    issues,
                })?;
        }
        self.storable(&entity.kind, &entity.id, &entity.data)?;
        if entity.updated_at == 0 {
            entity.updated_at = now_millis();
        }
        let data = serde_json::to_string(&entity.data).map_err(|e| Error::Serialize {
            kind: entity.kind.to_string(),
            id: entity.id.to_string(),
            source: e,
        })?;
        let row = Row {
            kind: entity.kind.clone(),
            id: entity.id.clone(),
            data,
            updated_at: i64::try_from(entity.updated_at).unwrap_or(i64::MAX),
        };
        Ok((row, entity))
    }

    /// Inserts or replaces one entity (validated and normalized by the schema first; an
    /// unset `updatedAt` is stamped now) and returns it as stored.
    ///
    /// # Errors
    /// [`Error::Validation`] and, on PostgreSQL, [`Error::Unstorable`] (a NUL character,
    /// see [`crate::check_storable`]): nothing written. [`Error::QuotaExceeded`], backend
    /// errors.
    pub async fn upsert(&self, entity: Entity) -> Result<Entity> {
        let (row, entity) = self.row(entity)?;
        self.writable().await?;
        self.inner
            .backend
            .write(vec![Write::Upsert(row)], self.inner.quota)
            .await?;
        Ok(entity)
    }

    /// Inserts or replaces several entities in one transaction: all or nothing.
    ///
    /// # Errors
    /// As [`Database::upsert`]; one invalid entity refuses the whole batch.
    pub async fn upsert_batch(&self, entities: Vec<Entity>) -> Result<Vec<Entity>> {
        let mut writes = Vec::with_capacity(entities.len());
        let mut stored = Vec::with_capacity(entities.len());
        for e in entities {
            let (row, e) = self.row(e)?;
            writes.push(Write::Upsert(row));
            stored.push(e);
        }
        self.writable().await?;
        self.inner.backend.write(writes, self.inner.quota).await?;
        Ok(stored)
    }

    /// As [`Database::upsert_batch`] (one transaction, all or nothing), borrowing the
    /// entities, so a caller that keeps them can write some of them again after a refused
    /// batch. Without a schema nothing is copied but the JSON text written.
    ///
    /// # Errors
    /// As [`Database::upsert_batch`].
    pub async fn upsert_batch_borrowed<'a, I>(&self, entities: I) -> Result<()>
    where
        I: IntoIterator<Item = &'a Entity> + Send,
    {
        let writes = self.borrowed_writes(entities)?;
        self.writable().await?;
        self.inner.backend.write(writes, self.inner.quota).await?;
        Ok(())
    }

    /// The writes of [`Database::upsert_batch_borrowed`]: each entity checked (and, with a
    /// schema, normalized), stamped when its `updatedAt` is unset, and serialized.
    pub(crate) fn borrowed_writes<'a, I>(&self, entities: I) -> Result<Vec<Write>>
    where
        I: IntoIterator<Item = &'a Entity>,
    {
        let mut writes = Vec::new();
        for e in entities {
            let row = if self.inner.schema.is_some() {
                self.row(e.clone())?.0
            } else {
                self.storable(&e.kind, &e.id, &e.data)?;
                let data = serde_json::to_string(&e.data).map_err(|source| Error::Serialize {
                    kind: e.kind.to_string(),
                    id: e.id.to_string(),
                    source,
                })?;
                let updated_at = if e.updated_at == 0 {
                    now_millis()
                } else {
                    e.updated_at
                };
                Row {
                    kind: e.kind.clone(),
                    id: e.id.clone(),
                    data,
                    updated_at: i64::try_from(updated_at).unwrap_or(i64::MAX),
                }
            };
            writes.push(Write::Upsert(row));
        }
        Ok(writes)
    }

    /// The PostgreSQL backend, for cluster calls; SQLite refuses them.
    pub(crate) fn cluster_backend(&self) -> Result<&Postgres> {
        self.inner
            .backend
            .postgres()
            .ok_or_else(|| Error::ClusterNeedsPostgres {
                target: self.inner.label.clone(),
            })
    }

    /// The storage quota, if any.
    pub(crate) fn quota(&self) -> Option<Quota> {
        self.inner.quota
    }

    /// How long waits for a lock held by another process last.
    pub(crate) fn lock_wait(&self) -> Duration {
        self.inner.writer_lock_wait
    }

    /// Deletes one entity; `true` if it existed. Deletes only that entity: no heuristic
    /// cascades.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn delete(&self, kind: &str, id: &str) -> Result<bool> {
        let w = Write::Delete {
            kind: kind.into(),
            id: id.into(),
        };
        self.writable().await?;
        Ok(self
            .inner
            .backend
            .write(vec![w], None)
            .await?
            .first()
            .copied()
            .unwrap_or(false))
    }

    /// Deletes several entities in one transaction; returns how many existed.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn delete_batch<K, I>(&self, keys: impl IntoIterator<Item = (K, I)>) -> Result<usize>
    where
        K: Into<Kind>,
        I: Into<EntityId>,
    {
        let writes = keys
            .into_iter()
            .map(|(k, i)| Write::Delete {
                kind: k.into(),
                id: i.into(),
            })
            .collect();
        self.writable().await?;
        Ok(self
            .inner
            .backend
            .write(writes, None)
            .await?
            .into_iter()
            .filter(|d| *d)
            .count())
    }

    /// Applies a batch of changes (upserts and deletes, in order) in one transaction.
    /// Remote changes are stored like local ones.
    ///
    /// # Errors
    /// [`Error::InvalidChange`] for an upsert without its entity, [`Error::Validation`],
    /// [`Error::Unstorable`], [`Error::QuotaExceeded`], backend errors. Nothing is written on
    /// error.
    pub async fn apply_changes(&self, changes: &[Change]) -> Result<()> {
        self.write_with_sync(changes, Vec::new()).await
    }

    /// Applies a batch of changes and writes the sync client's bookkeeping rows that go
    /// with them, all in one transaction: after a crash the bookkeeping always describes
    /// the entity rows that are on disk.
    ///
    /// # Errors
    /// As [`Database::apply_changes`]. Nothing is written on error.
    pub async fn write_with_sync(&self, changes: &[Change], sync: Vec<SyncWrite>) -> Result<()> {
        let mut writes = self.change_writes(changes)?;
        writes.reserve(sync.len());
        // Entity writes first, bookkeeping after: the backends rely on this order.
        writes.extend(sync.into_iter().map(Write::Sync));
        self.writable().await?;
        self.inner.backend.write(writes, self.inner.quota).await?;
        Ok(())
    }

    /// Everything in the sync client's bookkeeping tables.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn read_sync(&self) -> Result<SyncTables> {
        self.inner.backend.read_sync().await
    }

    /// The writes of `changes`, in order.
    pub(crate) fn change_writes(&self, changes: &[Change]) -> Result<Vec<Write>> {
        let mut writes = Vec::with_capacity(changes.len());
        for c in changes {
            match c.op {
                Op::Delete => writes.push(Write::Delete {
                    kind: c.kind.clone(),
                    id: c.id.clone(),
                }),
                Op::Upsert => writes.push(Write::Upsert(self.change_row(c)?)),
            }
        }
        Ok(writes)
    }

    fn change_row(&self, c: &Change) -> Result<Row> {
        let invalid = |reason: String| Error::InvalidChange {
            kind: c.kind.to_string(),
            id: c.id.to_string(),
            reason,
        };
        let any = c
            .entity
            .as_ref()
            .ok_or_else(|| invalid("an upsert without its entity".into()))?;
        if any.kind() != &c.kind || any.id() != &c.id {
            return Err(invalid(format!(
                "carries entity {}/{}",
                any.kind(),
                any.id()
            )));
        }
        let updated_at = if any.updated_at() == 0 {
            c.timestamp
        } else {
            any.updated_at()
        };
        // Fast path: dynamic entities without a schema serialize straight from the store's
        // own value, with no intermediate copy.
        if self.inner.schema.is_none()
            && let Some(e) = any.downcast::<Value>()
        {
            self.storable(&c.kind, &c.id, &e.data)?;
            let data = serde_json::to_string(&e.data).map_err(|err| Error::Serialize {
                kind: c.kind.to_string(),
                id: c.id.to_string(),
                source: err,
            })?;
            return Ok(Row {
                kind: c.kind.clone(),
                id: c.id.clone(),
                data,
                updated_at: i64::try_from(updated_at).unwrap_or(i64::MAX),
            });
        }
        let entity = any.to_json().map_err(|e| Error::Serialize {
            kind: c.kind.to_string(),
            id: c.id.to_string(),
            source: e,
        })?;
        Ok(self.row(entity.at(updated_at))?.0)
    }

    /// Removes every entity (migrations and application tables are untouched).
    ///
    /// # Errors
    /// Backend errors.
    pub async fn clear(&self) -> Result<()> {
        self.writable().await?;
        self.inner
            .backend
            .replace_all(Vec::new(), Vec::new(), None)
            .await
    }

    // ----- reads -----

    /// The entity `kind`/`id`, or `None`. A corrupt row reads as `None` (and is logged).
    ///
    /// # Errors
    /// Backend errors.
    pub async fn get_by_id(&self, kind: &str, id: &str) -> Result<Option<Entity>> {
        Ok(self.get_stored(kind, id).await?.map(|s| s.entity))
    }

    /// The entity with its stored version.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn get_stored(&self, kind: &str, id: &str) -> Result<Option<StoredEntity>> {
        self.inner.backend.get(kind.into(), id.into()).await
    }

    /// Every entity of `kind`, in first-insert order; corrupt rows are skipped.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn get_by_type(&self, kind: &str) -> Result<Vec<Entity>> {
        self.find(&Query::new(kind)).await
    }

    /// Every entity of every kind, in first-insert order (what a Store hydrates from).
    ///
    /// # Errors
    /// Backend errors.
    pub async fn get_all(&self) -> Result<Vec<Entity>> {
        Ok(self
            .inner
            .backend
            .dump()
            .await?
            .into_iter()
            .map(|r| r.into_entity().0)
            .collect())
    }

    /// Runs a [`Query`] in SQL.
    ///
    /// # Errors
    /// [`Error::InvalidQuery`], backend errors.
    pub async fn find(&self, query: &Query) -> Result<Vec<Entity>> {
        query.validate()?;
        let rows = self.inner.backend.find(query.clone()).await?;
        Ok(rows.into_iter().map(|s| s.entity).collect())
    }

    /// The entities of `kind` for which `filter` holds, in first-insert order (the spec's
    /// closure query; the filter runs in memory).
    ///
    /// # Errors
    /// Backend errors.
    pub async fn query<F>(&self, kind: &str, filter: F) -> Result<Vec<Entity>>
    where
        F: Fn(&Entity) -> bool,
    {
        let mut all = self.get_by_type(kind).await?;
        all.retain(|e| filter(e));
        Ok(all)
    }

    /// As [`Database::query`], sorted by `order_by` (stable: ties keep insertion order).
    ///
    /// # Errors
    /// Backend errors.
    pub async fn query_sorted<F, O, K>(
        &self,
        kind: &str,
        filter: F,
        order_by: O,
    ) -> Result<Vec<Entity>>
    where
        F: Fn(&Entity) -> bool,
        O: Fn(&Entity) -> K,
        K: Ord,
    {
        let mut out = self.query(kind, filter).await?;
        out.sort_by_key(|e| order_by(e));
        Ok(out)
    }

    /// Each kind present with its entity count, sorted by kind.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn kinds(&self) -> Result<Vec<(Kind, u64)>> {
        let mut kinds = self.inner.backend.kinds().await?;
        kinds.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        Ok(kinds)
    }

    /// The number of entities of `kind`.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn count(&self, kind: &str) -> Result<u64> {
        Ok(self
            .kinds()
            .await?
            .into_iter()
            .find(|(k, _)| **k == *kind)
            .map_or(0, |(_, n)| n))
    }

    /// The bytes the quota counts as used: SQLite's used pages; PostgreSQL's
    /// `pg_total_relation_size` of the entities table.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn storage_bytes(&self) -> Result<u64> {
        self.inner.backend.storage_bytes().await
    }

    // ----- backup -----

    /// Writes every entity, and a sync client's bookkeeping (its offline queue, what the
    /// server last said, its replica state), in the portable backup format (see
    /// `docs/database.md`).
    ///
    /// # Errors
    /// Backend errors.
    pub async fn backup(&self) -> Result<Vec<u8>> {
        let (records, sync) = self.inner.backend.dump_with_sync().await?;
        backup::encode(self.backend_name(), now_millis(), &records, &sync)
    }

    /// Writes a backup to `path`, durably: the file is flushed to disk before it replaces
    /// `path`, and the directory after (a crash leaves the old file or the whole new one).
    ///
    /// # Errors
    /// As [`Database::backup`], and [`Error::Io`].
    pub async fn backup_to_file(&self, path: &Path) -> Result<()> {
        let bytes = self.backup().await?;
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        // Flushed before and after the rename (a crash leaves the old file or the new one).
        let target = path.to_path_buf();
        tokio::task::spawn_blocking(move || backup::write_durably(&target, &bytes))
            .await
            .map_err(|e| io(std::io::Error::other(e.to_string())))?
            .map_err(io)
    }

    /// Replaces every entity and the sync bookkeeping with the backup's, atomically. The
    /// whole backup is checked first (format, counts, checksum, schema); a bad one is
    /// refused and nothing changes. A sync client opening the restored database finds its
    /// offline queue as it was at the backup; if the file is not the one backed up, the
    /// client takes it for a copy and syncs under a replica id of its own.
    ///
    /// # Errors
    /// [`Error::InvalidBackup`], [`Error::Validation`], [`Error::Unstorable`],
    /// [`Error::QuotaExceeded`], backend errors.
    pub async fn restore(&self, bytes: &[u8]) -> Result<usize> {
        self.restore_adjusted(bytes, |_| Ok(())).await
    }

    /// [`Database::restore`], with `adjust` applied to the backup's records before anything
    /// is checked or written, so what it changes is part of the same replacement (one
    /// transaction): a sync server's restore gives its rooms new identities this way.
    ///
    /// # Errors
    /// As [`Database::restore`]; [`Error::InvalidBackup`] (line 0) with `adjust`'s reason
    /// when it refuses the records, and then nothing is written.
    pub async fn restore_adjusted(
        &self,
        bytes: &[u8],
        adjust: impl FnOnce(&mut Vec<backup::Record>) -> std::result::Result<(), String>,
    ) -> Result<usize> {
        let backup::Decoded { mut records, sync } = backup::decode(bytes)?;
        adjust(&mut records).map_err(|reason| Error::InvalidBackup { line: 0, reason })?;
        for r in &records {
            self.storable(&r.kind, &r.id, &r.data)?;
        }
        if let Some(schema) = &self.inner.schema {
            for r in &mut records {
                let data = std::mem::take(&mut r.data);
                r.data = schema
                    .normalize(&r.kind, data)
                    .map_err(|issues| Error::Validation {
                        kind: r.kind.to_string(),
                        id: r.id.to_string(),
                        issues,
                    })?;
            }
        }
        let n = records.len();
        self.writable().await?;
        self.inner
            .backend
            .replace_all(records, sync.into_writes(), self.inner.quota)
            .await?;
        Ok(n)
    }

    /// Restores from a backup file.
    ///
    /// # Errors
    /// As [`Database::restore`], and [`Error::Io`].
    pub async fn restore_from_file(&self, path: &Path) -> Result<usize> {
        let bytes = tokio::fs::read(path).await.map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        self.restore(&bytes).await
    }

    /// Closes the database: waits for the SQLite thread to finish, or closes the pool,
    /// then releases the writer lock if held. Later calls fail with [`Error::Closed`].
    ///
    /// # Errors
    /// Backend errors.
    pub async fn close(&self) -> Result<()> {
        let closed = self.inner.backend.close().await;
        self.inner.closed.store(true, Ordering::Release);
        if let Some(lock) = self.inner.writer.lock().await.take() {
            self.inner.holds_writer.store(false, Ordering::Release);
            lock.release().await;
        }
        closed
    }
}
