//! kalphite-db — Layer 3 of kalphite: the local database. One async API, [`Database`],
//! over two real backends: SQLite (embedded default: bundled, WAL, on its own thread) and
//! PostgreSQL (tokio-postgres with a pool, JSONB), with the same behaviour on both.
//!
//! Entities live in one table keyed by `(type, id)` with their JSON data, `updatedAt` and a
//! version that counts writes. Versioned migrations (up and down, one transaction each),
//! queries pushed down into SQL, a portable backup format that restores into either
//! backend, a storage quota, and a [`kalphite::FlushTarget`] implementation so a
//! Store can flush into it.
//!
//! # Layout
//! - `config`: [`DatabaseConfig`] and database URLs.
//! - `database`: [`Database`], the API.
//! - `query`: the [`Query`] builder and its reference semantics.
//! - `migration`: [`Migration`]s and the built-in ones.
//! - [`backup`]: the backup format.
//! - `store`: [`open_store`], a kalphite Store hydrated from and flushing into a database.
//! - `sync_state`: the sync client's bookkeeping tables, written with the entity rows.
//! - `error`: the [`Error`] type.
//! - `backend`, `sqlite`, `postgres` (with `postgres::render`): the storage trait and its two
//!   implementations.
//! - `quota`: the storage quota and a batch's net growth.
//! - `storable`: [`check_storable`], what every backend can store (no NUL characters).
//! - `target`: `impl FlushTarget for Database`.
//! - `writer_lock`: one writer per database (a lock file beside SQLite, an advisory lock
//!   per PostgreSQL schema), or any number of cluster nodes; see
//!   [`DatabaseConfig::writer_lock`] and [`DatabaseConfig::cluster_writer`].
//! - `cluster`: cluster mode on PostgreSQL: node liveness locks, room leases with a fencing
//!   term, fenced commits ([`Database::join_cluster`], [`Database::acquire_room`],
//!   [`Database::upsert_batch_fenced`]).
//!
//! Only [`backup`] is a public module (its `Header` and `Record` name lines of a backup
//! file); every other public item is re-exported at the crate root.
//!
//! # Example
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use kalphite::Entity;
//! use kalphite_db::{Database, DatabaseConfig, Direction, Query};
//! use serde_json::json;
//!
//! // "postgres://user@host/db" works the same way.
//! let db = Database::open(DatabaseConfig::new("sqlite::memory:")).await?;
//! for (id, line) in [("c1", 10), ("c2", 3), ("c3", 7)] {
//!     db.upsert(Entity::new(id, "comment", json!({"lineNumber": line}))).await?;
//! }
//! let q = Query::new("comment").gte("lineNumber", 5).order_by("lineNumber", Direction::Asc);
//! let ids: Vec<_> = db.find(&q).await?.into_iter().map(|e| e.id.to_string()).collect();
//! assert_eq!(ids, ["c3", "c1"]);
//!
//! let backup = db.backup().await?;
//! let copy = Database::open(DatabaseConfig::new("sqlite::memory:")).await?;
//! assert_eq!(copy.restore(&backup).await?, 3);
//! # Ok::<(), kalphite_db::Error>(()) }).unwrap();
//! ```

// Library code does not unwrap (tests may); the other lints are in the workspace Cargo.toml.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod backend;
pub mod backup;
mod cluster;
mod config;
mod database;
mod error;
mod migration;
mod postgres;
mod query;
mod quota;
mod sqlite;
mod storable;
mod store;
mod sync_state;
mod target;
mod writer_lock;

pub use backend::StoredEntity;
pub use cluster::{Acquired, Fence, Lease, NodeGuard, NodeInfo, RoomOwner};
pub use config::DatabaseConfig;
pub use database::Database;
pub use error::{Error, Result};
pub use migration::{AppliedMigration, FIRST_APP_VERSION, Migration, MigrationSql};
pub use query::{Cmp, Condition, Direction, Field, Query};
pub use storable::check_storable;
pub use store::open_store;
pub use sync_state::{KnownRow, OutboxRow, SyncTables, SyncWrite};
pub use writer_lock::WriterKind;
