//! The PostgreSQL backend: a deadpool connection pool over tokio-postgres, entities as
//! JSONB. Batches are pipelined inside one transaction; queries compare strings with
//! `COLLATE "C"` so that results and order match the SQLite backend byte for byte.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::future::try_join_all;
use kalphite::{EntityId, Kind, now_millis};
use serde_json::Value;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use crate::backend::{Backend, ROW_OVERHEAD, StoredEntity, Write};
use crate::backup::Record;
use crate::cluster::Fence;
use crate::config::redact;
use crate::error::{Error, Result};
use crate::migration::{AppliedMigration, Dialect, Step};
use crate::query::{Condition, Query};
use crate::quota::{Quota, StoredKey, net_growth, stored_keys};
use crate::sync_state::{KnownRow, OutboxRow, SyncTables, SyncWrite};

const CREATE_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS kalphite_migrations (
    version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)";
const LOCK_MIGRATIONS: &str =
    "SELECT pg_advisory_xact_lock(hashtext('kalphite_migrations:' || current_schema()))";
const LIST_MIGRATIONS: &str =
    "SELECT version, name, applied_at FROM kalphite_migrations ORDER BY version";
const UPSERT: &str = "INSERT INTO kalphite_entities (type, id, data, updated_at) \
    VALUES ($1, $2, $3::text::jsonb, $4) ON CONFLICT (type, id) DO UPDATE SET \
    data = EXCLUDED.data, updated_at = EXCLUDED.updated_at, \
    version = kalphite_entities.version + 1";
const INSERT_WITH_VERSION: &str = "INSERT INTO kalphite_entities \
    (type, id, data, updated_at, version) VALUES ($1, $2, $3::text::jsonb, $4, $5)";
const UPSERT_MANY: &str = "INSERT INTO kalphite_entities (type, id, data, updated_at) \
    SELECT k, i, d::jsonb, u \
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[]) WITH ORDINALITY AS r(k, i, d, u, n) \
    ORDER BY n \
    ON CONFLICT (type, id) DO UPDATE SET \
    data = EXCLUDED.data, updated_at = EXCLUDED.updated_at, \
    version = kalphite_entities.version + 1";
const DELETE_MANY: &str = "DELETE FROM kalphite_entities e \
    USING UNNEST($1::text[], $2::text[]) AS r(k, i) WHERE e.type = r.k AND e.id = r.i \
    RETURNING e.type, e.id";
const DELETE: &str = "DELETE FROM kalphite_entities WHERE type = $1 AND id = $2";
const GET: &str = "SELECT type, id, data, updated_at, version FROM kalphite_entities \
    WHERE type = $1 AND id = $2";
/// The cluster (its system identifier, new for every `initdb`), the database (its oid,
/// new for a restored or copied database) and the schema kalphite's tables are in.
const IDENTITY: &str = "SELECT s.system_identifier::text || ':' || d.oid::text || ':' \
    || current_schema() FROM pg_control_system() s, pg_database d \
    WHERE d.datname = current_database()";
const DUMP: &str = "SELECT type, id, data, updated_at, version FROM kalphite_entities ORDER BY seq";
const KINDS: &str = "SELECT type, COUNT(*) FROM kalphite_entities GROUP BY type";
/// What a restore empties: the entities and, since they no longer describe what is on
/// disk, the sync bookkeeping (the client then starts over as a new replica).
const REPLACE_ALL_CLEAR: &str = "DELETE FROM kalphite_entities; DELETE FROM kalphite_sync_state; \
    DELETE FROM kalphite_sync_outbox; DELETE FROM kalphite_sync_known;";
const SYNC_STATE_PUT: &str = "INSERT INTO kalphite_sync_state (key, value) VALUES ($1, $2) \
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value";
const SYNC_OUTBOX_PUT: &str = "INSERT INTO kalphite_sync_outbox (type, id, position, entry) \
    VALUES ($1, $2, $3, $4) ON CONFLICT (type, id) DO UPDATE SET \
    position = EXCLUDED.position, entry = EXCLUDED.entry";
const SYNC_OUTBOX_DELETE: &str = "DELETE FROM kalphite_sync_outbox WHERE type = $1 AND id = $2";
const SYNC_KNOWN_PUT: &str = "INSERT INTO kalphite_sync_known (type, id, version, entry) \
    VALUES ($1, $2, $3, $4) ON CONFLICT (type, id) DO UPDATE SET \
    version = EXCLUDED.version, entry = EXCLUDED.entry";
const SYNC_KNOWN_CLEAR: &str = "DELETE FROM kalphite_sync_known";
const SYNC_KNOWN_DELETE: &str = "DELETE FROM kalphite_sync_known WHERE type = $1 AND id = $2";
const SYNC_READ_STATE: &str = "SELECT key, value FROM kalphite_sync_state ORDER BY key";
const SYNC_READ_OUTBOX: &str = "SELECT type, id, position, entry FROM kalphite_sync_outbox \
    ORDER BY position, type COLLATE \"C\", id COLLATE \"C\"";
const SYNC_READ_KNOWN: &str = "SELECT type, id, version, entry FROM kalphite_sync_known";
// The byte length of stored rows' data (entries, values), for the quota. JSONB has no text
// of its own: `data::text` is its canonical rendering, with a space after each `:` and `,`,
// a little longer than the compact JSON a write sends.
const STORED_ENTITY_SIZES: &str = "SELECT e.type, e.id, octet_length(e.data::text)::int8 \
    FROM kalphite_entities e JOIN UNNEST($1::text[], $2::text[]) AS r(k, i) \
    ON e.type = r.k AND e.id = r.i";
const STORED_OUTBOX_SIZES: &str = "SELECT e.type, e.id, octet_length(e.entry)::int8 \
    FROM kalphite_sync_outbox e JOIN UNNEST($1::text[], $2::text[]) AS r(k, i) \
    ON e.type = r.k AND e.id = r.i";
const STORED_KNOWN_SIZES: &str = "SELECT e.type, e.id, octet_length(e.entry)::int8 \
    FROM kalphite_sync_known e JOIN UNNEST($1::text[], $2::text[]) AS r(k, i) \
    ON e.type = r.k AND e.id = r.i";
const STORED_STATE_SIZES: &str = "SELECT key, octet_length(value)::int8 \
    FROM kalphite_sync_state WHERE key = ANY($1::text[])";
const SIZE: &str = "SELECT COALESCE(pg_total_relation_size(to_regclass('kalphite_entities')), 0)";

/// How often a deadlocked write batch is retried.
const DEADLOCK_RETRIES: u32 = 8;

/// How many pipelined statements a restore keeps in flight.
const PIPELINE_CHUNK: usize = 512;

mod cluster;
mod render;

use render::render;

/// A boxed query parameter.
pub(crate) type Param = Box<dyn ToSql + Sync + Send>;

/// A PostgreSQL database behind a connection pool.
pub(crate) struct Postgres {
    pool: Pool,
    label: String,
    /// The pool's connection settings, for a connection of another role (the writer lock).
    config: tokio_postgres::Config,
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

impl Postgres {
    /// Connects to `url`, optionally keeping kalphite's tables in `schema`. Every pooled
    /// connection sets `synchronous_commit`: `on` with `fsync` (a commit also waits for
    /// synchronous standbys, if any are configured), otherwise `local` (it waits for the
    /// local WAL flush only), whatever the server's default; and, when given,
    /// `idle_in_transaction_session_timeout` (see
    /// [`crate::DatabaseConfig::idle_transaction_timeout`]).
    pub(crate) async fn open(
        url: &str,
        schema: Option<&str>,
        pool_size: usize,
        fsync: bool,
        idle_transaction_timeout: Option<Duration>,
    ) -> Result<Self> {
        let label = redact(url);
        let mut config: tokio_postgres::Config =
            url.parse()
                .map_err(|e: tokio_postgres::Error| Error::InvalidUrl {
                    url: label.clone(),
                    reason: e.to_string(),
                })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        let sync = if fsync { "on" } else { "local" };
        let options = config.get_options().map(str::to_owned).unwrap_or_default();
        config.options(
            format!("{options} -c synchronous_commit={sync}")
                .trim_start()
                .to_owned(),
        );
        if let Some(timeout) = idle_transaction_timeout {
            let ms = timeout.as_millis().max(1);
            let options = config.get_options().map(str::to_owned).unwrap_or_default();
            config.options(format!(
                "{options} -c idle_in_transaction_session_timeout={ms}"
            ));
        }
        if let Some(schema) = schema {
            if !is_identifier(schema) {
                return Err(Error::InvalidConfig {
                    reason: format!(
                        "postgres_schema '{schema}' must be lowercase letters, digits and '_' \
                         (at most 63, not starting with a digit)"
                    ),
                });
            }
            let options = config.get_options().map(str::to_owned).unwrap_or_default();
            config.options(
                format!("{options} -c search_path={schema}")
                    .trim_start()
                    .to_owned(),
            );
        }
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .build()
            .map_err(|e| Error::Connect {
                target: label.clone(),
                message: e.to_string(),
            })?;
        let db = Self {
            pool,
            label,
            config,
        };
        let client = db.pool.get().await.map_err(|e| Error::Connect {
            target: db.label.clone(),
            message: e.to_string(),
        })?;
        if let Some(schema) = schema {
            let create = format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"");
            if let Err(e) = client.batch_execute(&create).await {
                // Two openers racing on the same new schema: the loser sees a unique violation.
                let exists: bool = client
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                        &[&schema],
                    )
                    .await
                    .map_err(Error::postgres("checking the schema"))?
                    .get(0);
                if !exists {
                    return Err(Error::Postgres {
                        context: format!("creating schema {schema}"),
                        source: e,
                    });
                }
            }
        }
        drop(client);
        Ok(db)
    }

    /// The pool's connection settings (with the schema as `search_path`).
    pub(crate) fn connect_config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// Writes a batch and the rooms' fences in one transaction (see
    /// [`crate::Database::upsert_batch_fenced`]): nothing is written if a fence fails.
    pub(crate) async fn write_fenced(
        &self,
        writes: Vec<Write>,
        fences: &[Fence],
        quota: Option<Quota>,
    ) -> Result<Vec<bool>> {
        if writes.is_empty() && fences.is_empty() {
            return Ok(Vec::new());
        }
        // Two writers locking the same rows in different orders deadlock; PostgreSQL then
        // aborts one transaction, which is retried here (all of it, from the start).
        let mut attempt = 0;
        loop {
            match self.write_once(&writes, fences, quota).await {
                Err(Error::Postgres { source, .. })
                    if attempt < DEADLOCK_RETRIES
                        && source.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) =>
                {
                    attempt += 1;
                    tracing::debug!(attempt, "write batch deadlocked; retrying");
                }
                other => return other,
            }
        }
    }

    async fn write_once(
        &self,
        writes: &[Write],
        fences: &[Fence],
        quota: Option<Quota>,
    ) -> Result<Vec<bool>> {
        let ctx = "writing a batch";
        let mut client = self.client(ctx).await?;
        let tx = client.transaction().await.map_err(Error::postgres(ctx))?;
        // A fenced batch without a quota check: the fence and the entity writes are sent
        // together (pipelined on the connection; PostgreSQL still runs them in order), one
        // round trip instead of two. A failed fence rolls everything back when `tx` drops.
        if quota.is_none()
            && !fences.is_empty()
            && !writes.iter().any(|w| matches!(w, Write::Sync(_)))
        {
            let entities = async {
                if has_distinct_keys(writes) {
                    write_distinct(&tx, writes).await
                } else {
                    write_in_order(&tx, writes).await
                }
            };
            let (checked, written) = tokio::join!(cluster::fence(&tx, fences), entities);
            checked?;
            let affected = written?;
            tx.commit().await.map_err(Error::postgres(ctx))?;
            return Ok(affected);
        }
        // First, so a fenced-out batch writes nothing (dropping `tx` rolls back).
        cluster::fence(&tx, fences).await?;
        if let Some(quota) = quota {
            let used: i64 = tx
                .query_one(SIZE, &[])
                .await
                .map_err(Error::postgres(ctx))?
                .get(0);
            let stored = stored_sizes(&tx, writes).await?;
            quota.check(u64::try_from(used).unwrap_or(0), net_growth(writes, stored))?;
        }
        // Entity writes come first in a batch, bookkeeping rows after them.
        let split = writes
            .iter()
            .position(|w| matches!(w, Write::Sync(_)))
            .unwrap_or(writes.len());
        let (entities, sync) = writes.split_at(split);
        let mut affected = if has_distinct_keys(entities) {
            write_distinct(&tx, entities).await?
        } else {
            write_in_order(&tx, entities).await?
        };
        for w in sync {
            if let Write::Sync(w) = w {
                write_sync(&tx, w).await?;
            }
            affected.push(true);
        }
        tx.commit().await.map_err(Error::postgres(ctx))?;
        Ok(affected)
    }

    async fn client(&self, context: &str) -> Result<deadpool_postgres::Object> {
        if self.pool.is_closed() {
            return Err(Error::Closed);
        }
        self.pool.get().await.map_err(|e| Error::Pool {
            context: format!("{context} on {}", self.label),
            message: e.to_string(),
        })
    }
}

fn to_stored(row: &tokio_postgres::Row) -> Result<StoredEntity> {
    let ctx = "reading an entity row";
    let kind: String = row.try_get(0).map_err(Error::postgres(ctx))?;
    let id: String = row.try_get(1).map_err(Error::postgres(ctx))?;
    let data: Value = row.try_get(2).map_err(Error::postgres(ctx))?;
    let updated_at: i64 = row.try_get(3).map_err(Error::postgres(ctx))?;
    let version: i64 = row.try_get(4).map_err(Error::postgres(ctx))?;
    Ok(StoredEntity {
        entity: kalphite::Entity {
            id: id.into(),
            kind: kind.into(),
            data,
            updated_at: u64::try_from(updated_at).unwrap_or(0),
        },
        version,
    })
}

/// The `(type, id)` keys of one table, as the two arrays its size query takes.
#[derive(Default)]
struct KeyArrays<'a> {
    kinds: Vec<&'a str>,
    ids: Vec<&'a str>,
}

impl<'a> KeyArrays<'a> {
    fn push(&mut self, kind: &'a Kind, id: &'a EntityId) {
        self.kinds.push(kind.as_str());
        self.ids.push(id.as_str());
    }
}

/// The sizes of the stored rows that `writes` replace or remove (see [`net_growth`]): one
/// query per table the batch touches.
async fn stored_sizes(
    tx: &deadpool_postgres::Transaction<'_>,
    writes: &[Write],
) -> Result<HashMap<StoredKey, u64>> {
    type MakeKey = fn(Kind, EntityId) -> StoredKey;
    let ctx = "measuring the rows a batch replaces";
    let keys = stored_keys(writes);
    let (mut entities, mut outbox, mut known) = (
        KeyArrays::default(),
        KeyArrays::default(),
        KeyArrays::default(),
    );
    let mut state = Vec::new();
    for key in &keys {
        match key {
            StoredKey::Entity(kind, id) => entities.push(kind, id),
            StoredKey::Outbox(kind, id) => outbox.push(kind, id),
            StoredKey::Known(kind, id) => known.push(kind, id),
            StoredKey::State(k) => state.push(k.as_str()),
        }
    }
    let keyed: [(&str, KeyArrays<'_>, MakeKey); 3] = [
        (STORED_ENTITY_SIZES, entities, StoredKey::Entity),
        (STORED_OUTBOX_SIZES, outbox, StoredKey::Outbox),
        (STORED_KNOWN_SIZES, known, StoredKey::Known),
    ];
    let mut sizes = HashMap::with_capacity(keys.len());
    let len = |r: &tokio_postgres::Row, i| -> Result<u64> {
        let n: i64 = r.try_get(i).map_err(Error::postgres(ctx))?;
        Ok(u64::try_from(n).unwrap_or(0))
    };
    for (sql, KeyArrays { kinds, ids }, make) in &keyed {
        if kinds.is_empty() {
            continue;
        }
        let stmt = tx.prepare_cached(sql).await.map_err(Error::postgres(ctx))?;
        for r in tx
            .query(&stmt, &[kinds, ids])
            .await
            .map_err(Error::postgres(ctx))?
        {
            let kind: String = r.try_get(0).map_err(Error::postgres(ctx))?;
            let id: String = r.try_get(1).map_err(Error::postgres(ctx))?;
            let key = make(kind.into(), id.into());
            let size = key.size(len(&r, 2)?);
            sizes.insert(key, size);
        }
    }
    if !state.is_empty() {
        let stmt = tx
            .prepare_cached(STORED_STATE_SIZES)
            .await
            .map_err(Error::postgres(ctx))?;
        for r in tx
            .query(&stmt, &[&state])
            .await
            .map_err(Error::postgres(ctx))?
        {
            let key = StoredKey::State(r.try_get(0).map_err(Error::postgres(ctx))?);
            let size = key.size(len(&r, 1)?);
            sizes.insert(key, size);
        }
    }
    Ok(sizes)
}

fn has_distinct_keys(writes: &[Write]) -> bool {
    let mut seen = HashSet::with_capacity(writes.len());
    writes.iter().all(|w| match w {
        Write::Upsert(r) => seen.insert((&r.kind, &r.id)),
        Write::Delete { kind, id } => seen.insert((kind, id)),
        Write::Sync(_) => true,
    })
}

/// A batch whose writes touch distinct entities: order between them does not matter, so
/// one `DELETE` and one multi-row `INSERT … ON CONFLICT` do it (two statements, not one
/// per entity).
async fn write_distinct(
    tx: &deadpool_postgres::Transaction<'_>,
    writes: &[Write],
) -> Result<Vec<bool>> {
    let ctx = "writing a batch";
    let (mut kinds, mut ids, mut data, mut stamps) = (vec![], vec![], vec![], vec![]);
    let (mut del_kinds, mut del_ids) = (vec![], vec![]);
    for w in writes {
        match w {
            Write::Upsert(r) => {
                kinds.push(r.kind.as_str());
                ids.push(r.id.as_str());
                data.push(r.data.as_str());
                stamps.push(r.updated_at);
            }
            Write::Delete { kind, id } => {
                del_kinds.push(kind.as_str());
                del_ids.push(id.as_str());
            }
            // Bookkeeping rows are written by `write_sync`.
            Write::Sync(_) => {}
        }
    }
    let mut deleted = HashSet::new();
    if !del_ids.is_empty() {
        let stmt = tx
            .prepare_cached(DELETE_MANY)
            .await
            .map_err(Error::postgres(ctx))?;
        for row in tx
            .query(&stmt, &[&del_kinds, &del_ids])
            .await
            .map_err(Error::postgres(ctx))?
        {
            let kind: String = row.try_get(0).map_err(Error::postgres(ctx))?;
            let id: String = row.try_get(1).map_err(Error::postgres(ctx))?;
            deleted.insert((kind, id));
        }
    }
    if !ids.is_empty() {
        let stmt = tx
            .prepare_cached(UPSERT_MANY)
            .await
            .map_err(Error::postgres(ctx))?;
        tx.execute(&stmt, &[&kinds, &ids, &data, &stamps])
            .await
            .map_err(Error::postgres(ctx))?;
    }
    Ok(writes
        .iter()
        .map(|w| match w {
            Write::Upsert(_) | Write::Sync(_) => true,
            Write::Delete { kind, id } => deleted.contains(&(kind.to_string(), id.to_string())),
        })
        .collect())
}

/// Every entity, in first-insert order.
async fn dump_rows(client: &impl deadpool_postgres::GenericClient) -> Result<Vec<Record>> {
    let ctx = "reading every entity";
    let rows = client
        .query(DUMP, &[])
        .await
        .map_err(Error::postgres(ctx))?;
    rows.iter()
        .map(|r| to_stored(r).map(Record::from))
        .collect()
}

/// Everything in the sync bookkeeping tables.
async fn read_sync_tables(client: &impl deadpool_postgres::GenericClient) -> Result<SyncTables> {
    let ctx = "reading the sync bookkeeping";
    let uint = |n: i64| u64::try_from(n).unwrap_or(0);
    let mut tables = SyncTables::default();
    for r in client
        .query(SYNC_READ_STATE, &[])
        .await
        .map_err(Error::postgres(ctx))?
    {
        tables.state.push((
            r.try_get(0).map_err(Error::postgres(ctx))?,
            r.try_get(1).map_err(Error::postgres(ctx))?,
        ));
    }
    for r in client
        .query(SYNC_READ_OUTBOX, &[])
        .await
        .map_err(Error::postgres(ctx))?
    {
        tables.outbox.push(OutboxRow {
            kind: Kind::from(r.try_get::<_, String>(0).map_err(Error::postgres(ctx))?),
            id: EntityId::from(r.try_get::<_, String>(1).map_err(Error::postgres(ctx))?),
            position: uint(r.try_get(2).map_err(Error::postgres(ctx))?),
            entry: r.try_get(3).map_err(Error::postgres(ctx))?,
        });
    }
    for r in client
        .query(SYNC_READ_KNOWN, &[])
        .await
        .map_err(Error::postgres(ctx))?
    {
        tables.known.push(KnownRow {
            kind: Kind::from(r.try_get::<_, String>(0).map_err(Error::postgres(ctx))?),
            id: EntityId::from(r.try_get::<_, String>(1).map_err(Error::postgres(ctx))?),
            version: uint(r.try_get(2).map_err(Error::postgres(ctx))?),
            entry: r.try_get(3).map_err(Error::postgres(ctx))?,
        });
    }
    Ok(tables)
}

/// A batch that writes some entity twice: one statement per write, in order, pipelined.
/// Writes one row of the sync bookkeeping tables.
async fn write_sync(tx: &deadpool_postgres::Transaction<'_>, w: &SyncWrite) -> Result<()> {
    let ctx = "writing the sync bookkeeping";
    let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    match w {
        SyncWrite::State { key, value } => tx.execute(SYNC_STATE_PUT, &[key, value]).await,
        SyncWrite::Outbox {
            kind,
            id,
            position,
            entry,
        } => {
            tx.execute(
                SYNC_OUTBOX_PUT,
                &[&kind.as_str(), &id.as_str(), &int(*position), entry],
            )
            .await
        }
        SyncWrite::OutboxRemoved { kind, id } => {
            tx.execute(SYNC_OUTBOX_DELETE, &[&kind.as_str(), &id.as_str()])
                .await
        }
        SyncWrite::Known {
            kind,
            id,
            version,
            entry,
        } => {
            tx.execute(
                SYNC_KNOWN_PUT,
                &[&kind.as_str(), &id.as_str(), &int(*version), entry],
            )
            .await
        }
        SyncWrite::KnownCleared => tx.execute(SYNC_KNOWN_CLEAR, &[]).await,
        SyncWrite::KnownRemoved { kind, id } => {
            tx.execute(SYNC_KNOWN_DELETE, &[&kind.as_str(), &id.as_str()])
                .await
        }
    }
    .map_err(Error::postgres(ctx))?;
    Ok(())
}

async fn write_in_order(
    tx: &deadpool_postgres::Transaction<'_>,
    writes: &[Write],
) -> Result<Vec<bool>> {
    let ctx = "writing a batch";
    let upsert = tx
        .prepare_cached(UPSERT)
        .await
        .map_err(Error::postgres(ctx))?;
    let delete = tx
        .prepare_cached(DELETE)
        .await
        .map_err(Error::postgres(ctx))?;
    let mut affected = Vec::with_capacity(writes.len());
    for chunk in writes.chunks(PIPELINE_CHUNK) {
        // Bookkeeping rows are written by `write_sync`: callers pass entity writes only.
        let pending = chunk.iter().filter_map(|w| {
            let (stmt, params): (_, Vec<Param>) = match w {
                Write::Upsert(r) => (
                    &upsert,
                    vec![
                        Box::new(r.kind.to_string()),
                        Box::new(r.id.to_string()),
                        Box::new(r.data.clone()),
                        Box::new(r.updated_at),
                    ],
                ),
                Write::Delete { kind, id } => (
                    &delete,
                    vec![Box::new(kind.to_string()), Box::new(id.to_string())],
                ),
                Write::Sync(_) => return None,
            };
            Some(tx.execute_raw(stmt, params))
        });
        let counts = try_join_all(pending).await.map_err(Error::postgres(ctx))?;
        affected.extend(counts.into_iter().map(|n| n > 0));
    }
    Ok(affected)
}

fn as_refs(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

#[async_trait]
impl Backend for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    async fn applied_migrations(&self) -> Result<Vec<AppliedMigration>> {
        let ctx = "listing applied migrations";
        let mut client = self.client(ctx).await?;
        let tx = client.transaction().await.map_err(Error::postgres(ctx))?;
        tx.batch_execute(LOCK_MIGRATIONS)
            .await
            .map_err(Error::postgres(ctx))?;
        tx.batch_execute(CREATE_MIGRATIONS)
            .await
            .map_err(Error::postgres(ctx))?;
        let rows = tx
            .query(LIST_MIGRATIONS, &[])
            .await
            .map_err(Error::postgres(ctx))?;
        tx.commit().await.map_err(Error::postgres(ctx))?;
        rows.iter()
            .map(|r| {
                Ok(AppliedMigration {
                    version: r.try_get(0).map_err(Error::postgres(ctx))?,
                    name: r.try_get(1).map_err(Error::postgres(ctx))?,
                    applied_at: r.try_get(2).map_err(Error::postgres(ctx))?,
                })
            })
            .collect()
    }

    async fn run_step(&self, step: Step) -> Result<()> {
        let failed = |e: tokio_postgres::Error| Error::MigrationFailed {
            version: step.version,
            name: step.name.clone(),
            direction: step.direction(),
            message: e
                .as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_owned()),
        };
        let mut client = self.client("running a migration").await?;
        let tx = client.transaction().await.map_err(failed)?;
        tx.batch_execute(LOCK_MIGRATIONS).await.map_err(failed)?;
        tx.batch_execute(CREATE_MIGRATIONS).await.map_err(failed)?;
        let applied: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM kalphite_migrations WHERE version = $1)",
                &[&step.version],
            )
            .await
            .map_err(failed)?
            .get(0);
        if applied == step.up {
            return Ok(()); // another process did it while we waited for the lock
        }
        tx.batch_execute(&step.sql).await.map_err(failed)?;
        if step.up {
            let now = i64::try_from(now_millis()).unwrap_or(0);
            tx.execute(
                "INSERT INTO kalphite_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                &[&step.version, &step.name, &now],
            )
            .await
            .map_err(failed)?;
        } else {
            tx.execute(
                "DELETE FROM kalphite_migrations WHERE version = $1",
                &[&step.version],
            )
            .await
            .map_err(failed)?;
        }
        tx.commit().await.map_err(failed)
    }

    async fn write(&self, writes: Vec<Write>, quota: Option<Quota>) -> Result<Vec<bool>> {
        self.write_fenced(writes, &[], quota).await
    }

    async fn get(&self, kind: Kind, id: EntityId) -> Result<Option<StoredEntity>> {
        let ctx = "reading an entity";
        let client = self.client(ctx).await?;
        let stmt = client
            .prepare_cached(GET)
            .await
            .map_err(Error::postgres(ctx))?;
        let row = client
            .query_opt(&stmt, &[&kind.as_str(), &id.as_str()])
            .await
            .map_err(Error::postgres(ctx))?;
        row.as_ref().map(to_stored).transpose()
    }

    async fn find(&self, query: Query) -> Result<Vec<StoredEntity>> {
        let ctx = "running a query";
        let (sql, params) = render(&query);
        let client = self.client(ctx).await?;
        // `in` lists make the SQL text vary with their length: those are not cached, so
        // the per-connection statement cache stays bounded.
        let varies = query
            .conditions
            .iter()
            .any(|c| matches!(c, Condition::In { .. }));
        let stmt = if varies {
            client.prepare(&sql).await
        } else {
            client.prepare_cached(&sql).await
        }
        .map_err(Error::postgres(ctx))?;
        let rows = client
            .query(&stmt, &as_refs(&params))
            .await
            .map_err(Error::postgres(ctx))?;
        rows.iter().map(to_stored).collect()
    }

    async fn dump(&self) -> Result<Vec<Record>> {
        let client = self.client("reading every entity").await?;
        dump_rows(&client).await
    }

    async fn dump_with_sync(&self) -> Result<(Vec<Record>, SyncTables)> {
        let ctx = "reading a backup";
        let mut client = self.client(ctx).await?;
        // One snapshot for both reads: a flush committing in between must not leave the
        // backup's queue or known versions out of step with its entities.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(Error::postgres(ctx))?;
        let records = dump_rows(&tx).await?;
        let sync = read_sync_tables(&tx).await?;
        tx.commit().await.map_err(Error::postgres(ctx))?;
        Ok((records, sync))
    }

    async fn replace_all(
        &self,
        records: Vec<Record>,
        sync: Vec<SyncWrite>,
        quota: Option<Quota>,
    ) -> Result<()> {
        let ctx = "restoring a backup";
        let mut rows = Vec::with_capacity(records.len());
        let mut needed: u64 = sync.iter().map(SyncWrite::size).sum();
        for r in records {
            let data = serde_json::to_string(&r.data).map_err(|e| Error::Serialize {
                kind: r.kind.to_string(),
                id: r.id.to_string(),
                source: e,
            })?;
            needed += (r.kind.len() + r.id.len() + data.len() + ROW_OVERHEAD) as u64;
            let updated_at = i64::try_from(r.updated_at).unwrap_or(i64::MAX);
            rows.push((r, data, updated_at));
        }
        if let Some(quota) = quota {
            quota.check(0, i64::try_from(needed).unwrap_or(i64::MAX))?;
        }
        let mut client = self.client(ctx).await?;
        let tx = client.transaction().await.map_err(Error::postgres(ctx))?;
        tx.batch_execute(REPLACE_ALL_CLEAR)
            .await
            .map_err(Error::postgres(ctx))?;
        tx.batch_execute(cluster::RESET_ROOMS)
            .await
            .map_err(Error::postgres(ctx))?;
        let insert = tx
            .prepare_cached(INSERT_WITH_VERSION)
            .await
            .map_err(Error::postgres(ctx))?;
        for chunk in rows.chunks(PIPELINE_CHUNK) {
            let pending = chunk.iter().map(|(r, data, updated_at)| {
                let params: [Param; 5] = [
                    Box::new(r.kind.to_string()),
                    Box::new(r.id.to_string()),
                    Box::new(data.clone()),
                    Box::new(*updated_at),
                    Box::new(r.version),
                ];
                tx.execute_raw(&insert, params)
            });
            try_join_all(pending).await.map_err(Error::postgres(ctx))?;
        }
        for w in &sync {
            write_sync(&tx, w).await?;
        }
        tx.commit().await.map_err(Error::postgres(ctx))
    }

    async fn read_sync(&self) -> Result<SyncTables> {
        let client = self.client("reading the sync bookkeeping").await?;
        read_sync_tables(&client).await
    }

    async fn kinds(&self) -> Result<Vec<(Kind, u64)>> {
        let ctx = "listing kinds";
        let client = self.client(ctx).await?;
        let rows = client
            .query(KINDS, &[])
            .await
            .map_err(Error::postgres(ctx))?;
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get(0).map_err(Error::postgres(ctx))?;
                let n: i64 = r.try_get(1).map_err(Error::postgres(ctx))?;
                Ok((Kind::from(kind), u64::try_from(n).unwrap_or(0)))
            })
            .collect()
    }

    async fn server_identity(&self) -> Result<Option<String>> {
        let ctx = "reading the database's identity";
        let client = self.client(ctx).await?;
        let row = client
            .query_one(IDENTITY, &[])
            .await
            .map_err(Error::postgres(ctx))?;
        Ok(Some(row.try_get(0).map_err(Error::postgres(ctx))?))
    }

    async fn storage_bytes(&self) -> Result<u64> {
        let ctx = "measuring the database size";
        let client = self.client(ctx).await?;
        let used: i64 = client
            .query_one(SIZE, &[])
            .await
            .map_err(Error::postgres(ctx))?
            .get(0);
        Ok(u64::try_from(used).unwrap_or(0))
    }

    async fn commit_sync(&self) -> Result<String> {
        let ctx = "reading synchronous_commit";
        let client = self.client(ctx).await?;
        let value: String = client
            .query_one("SHOW synchronous_commit", &[])
            .await
            .map_err(Error::postgres(ctx))?
            .get(0);
        Ok(format!("synchronous_commit = {value}"))
    }

    async fn close(&self) -> Result<()> {
        self.pool.close();
        Ok(())
    }

    fn postgres(&self) -> Option<&Postgres> {
        Some(self)
    }
}
