//! The storage trait both backends implement, and the row types that cross it. The
//! [`crate::Database`] front end validates, stamps and serializes; a backend only runs SQL.

use async_trait::async_trait;
use kalphite::{Entity, EntityId, Kind};

use crate::backup::Record;
use crate::error::Result;
use crate::migration::{AppliedMigration, Dialect, Step};
use crate::query::Query;
use crate::quota::Quota;
use crate::sync_state::{SyncTables, SyncWrite};

/// One entity ready to be written: data already validated and serialized.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub kind: Kind,
    pub id: EntityId,
    /// The data as JSON text.
    pub data: String,
    pub updated_at: i64,
}

impl Row {
    /// Bytes this row needs, for the quota: its text plus a fixed per-row overhead.
    pub(crate) fn size(&self) -> u64 {
        (self.kind.len() + self.id.len() + self.data.len() + ROW_OVERHEAD) as u64
    }
}

/// Per-row bookkeeping bytes counted by the quota (keys, integers, page headers).
pub(crate) const ROW_OVERHEAD: usize = 32;

/// One write of a batch.
#[derive(Clone, Debug)]
pub(crate) enum Write {
    Upsert(Row),
    Delete {
        kind: Kind,
        id: EntityId,
    },
    /// A row of the sync client's bookkeeping tables.
    Sync(SyncWrite),
}

/// An entity as stored, with its version.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEntity {
    /// The entity.
    pub entity: Entity,
    /// How many times it has been written (1 after the first insert).
    pub version: i64,
}

/// A storage backend. Every method is one transaction (or one read).
#[async_trait]
pub(crate) trait Backend: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn name(&self) -> &'static str;
    fn dialect(&self) -> Dialect;
    /// Creates `kalphite_migrations` if needed and lists it.
    async fn applied_migrations(&self) -> Result<Vec<AppliedMigration>>;
    /// Runs one migration step in its own transaction and records it.
    async fn run_step(&self, step: Step) -> Result<()>;
    /// Writes a batch in one transaction; for each write, whether a row was affected. With
    /// a quota, the batch's net growth ([`crate::quota::net_growth`]) is checked first.
    async fn write(&self, writes: Vec<Write>, quota: Option<Quota>) -> Result<Vec<bool>>;
    async fn get(&self, kind: Kind, id: EntityId) -> Result<Option<StoredEntity>>;
    async fn find(&self, query: Query) -> Result<Vec<StoredEntity>>;
    /// Every entity, in first-insert order.
    async fn dump(&self) -> Result<Vec<Record>>;
    /// Every entity and the sync bookkeeping, as of one moment (a backup).
    async fn dump_with_sync(&self) -> Result<(Vec<Record>, SyncTables)>;
    /// Replaces every entity with `records` and the sync bookkeeping with `sync`, in one
    /// transaction.
    async fn replace_all(
        &self,
        records: Vec<Record>,
        sync: Vec<SyncWrite>,
        quota: Option<Quota>,
    ) -> Result<()>;
    /// Everything in the sync bookkeeping tables.
    async fn read_sync(&self) -> Result<SyncTables>;
    /// Each kind with its entity count.
    async fn kinds(&self) -> Result<Vec<(Kind, u64)>>;
    /// Bytes the quota counts as used.
    async fn storage_bytes(&self) -> Result<u64>;
    /// Where the rows live, for a server database (see
    /// [`crate::Database::storage_identity`]); `None` when the backend has no such notion.
    async fn server_identity(&self) -> Result<Option<String>> {
        Ok(None)
    }
    /// What a commit waits for, as the database reports it (see
    /// [`crate::Database::commit_sync`]).
    async fn commit_sync(&self) -> Result<String>;
    async fn close(&self) -> Result<()>;
    /// The PostgreSQL backend, which alone runs cluster mode (see [`crate::cluster`]).
    fn postgres(&self) -> Option<&crate::postgres::Postgres> {
        None
    }
}

/// Parses a stored row's JSON text; a corrupt row is logged and skipped.
pub(crate) fn parse_row(
    kind: String,
    id: String,
    data: &str,
    updated_at: i64,
    version: i64,
) -> Option<StoredEntity> {
    match serde_json::from_str(data) {
        Ok(data) => Some(StoredEntity {
            entity: Entity {
                id: id.into(),
                kind: kind.into(),
                data,
                updated_at: u64::try_from(updated_at).unwrap_or(0),
            },
            version,
        }),
        Err(e) => {
            tracing::warn!(kind, id, error = %e, "skipping a stored entity whose data is not valid JSON");
            None
        }
    }
}
