//! Opening a kalphite [`Store`] over a [`Database`]: every stored entity is hydrated into
//! memory at start-up (without being written back), and a flush engine writes every later
//! change into the database, one transaction per batch.
//!
//! # Durability
//! After [`Store::close`] returns `Ok`, every accepted change is in the database. If the
//! process dies instead, the database holds a prefix of the accepted changes: everything
//! flushed before the crash, at most the changes of the last debounce window (bounded by
//! the flush engine's `max_wait`) are missing. `store.durable(Durability::Local)` waits
//! until everything accepted so far is on disk.

use std::sync::Arc;

use kalphite::{FlushConfig, FlushEngine, FlushTarget, Store, StoreBuilder};

use crate::database::Database;
use crate::error::{Error, Result};

/// Builds the store described by `builder`, flushing into `db` with `flush`, and hydrates
/// it with every entity in `db`. Must be called inside a tokio runtime.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use kalphite::{Entity, FlushConfig, Store};
/// use kalphite_db::{Database, DatabaseConfig, open_store};
/// let db = Database::open(DatabaseConfig::new("sqlite::memory:")).await?;
/// db.upsert(Entity::new("t1", "todo", serde_json::json!({"title": "from disk"}))).await?;
///
/// let store = open_store(&db, Store::builder(), FlushConfig::default()).await?;
/// assert_eq!(store.dynamic("todo").len(), 1);
/// store.dynamic("todo").put("t2", serde_json::json!({"title": "new"})).unwrap();
/// store.close().await.unwrap(); // drains the flush queue
/// assert_eq!(db.count("todo").await?, 2);
/// # Ok::<(), kalphite_db::Error>(()) }).unwrap();
/// ```
///
/// # Errors
/// [`Error::Store`] when the flush configuration is invalid or a stored entity is refused
/// by the store's schema (nothing is loaded then); database read errors.
pub async fn open_store(db: &Database, builder: StoreBuilder, flush: FlushConfig) -> Result<Store> {
    let entities = db.get_all().await?;
    let target: Arc<dyn FlushTarget> = Arc::new(db.clone());
    let engine = FlushEngine::spawn(target, flush).map_err(|source| Error::Store {
        context: "starting the flush engine",
        source,
    })?;
    let store = builder.flush_engine(engine).build();
    let n = store.hydrate(entities).map_err(|source| Error::Store {
        context: "hydrating from the database",
        source,
    })?;
    tracing::debug!(
        entities = n,
        target = db.target(),
        "hydrated a store from the database"
    );
    Ok(store)
}
