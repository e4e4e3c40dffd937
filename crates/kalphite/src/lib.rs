//! kalphite — a memory-first, local-first entity store.
//!
//! App code reads and writes entities synchronously in memory; every accepted write
//! becomes a [`Change`] that subscribers, the background flush engine, the database and
//! the sync client consume.
//!
//! # Layout
//! - `entity`: the `{id, type, data, updatedAt}` record, ids and kind names.
//! - `change`: the change record every layer consumes.
//! - `schema`: validation of entity data (JSON Schema, serde types, closures).
//! - `measure`: a record's size as JSON and where it holds a NUL character (the store's
//!   write-time checks for what could never be stored or synced).
//! - `store`: Layer 1, the in-memory store, collections, queries, subscriptions.
//! - `error`: why a write was refused.
//! - `flush`: Layer 2, the flush engine and its targets.
//!
//! # Features
//! - `runtime` (default): the flush engine, the store's durability waits and its async
//!   change stream, on tokio. Without it (`default-features = false`) the crate is the
//!   synchronous store and the entity types, with no async runtime: what the sans-IO sync
//!   core, `kalphite-sync`, builds on.
//!
//! The modules are private; every public item is re-exported at the crate root.
//!
//! The database (Layer 3) is the `kalphite-db` crate, sync (Layer 4) `kalphite-sync`.
//!
//! # Example
//! ```
//! use std::sync::{Arc, atomic::{AtomicUsize, Ordering}};
//! use kalphite::{EntityKind, Store};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Clone, Debug, Serialize, Deserialize)]
//! struct Comment { message: String, line: u32 }
//! impl EntityKind for Comment { const KIND: &'static str = "comment"; }
//!
//! let store = Store::new();
//! let comments = store.collection::<Comment>()?;
//! let seen = Arc::new(AtomicUsize::new(0));
//! let counter = Arc::clone(&seen);
//! let _sub = store.subscribe(move |n| {
//!     counter.fetch_add(n.changes.len(), Ordering::SeqCst);
//! });
//!
//! comments.put("c1", Comment { message: "TODO: tests".into(), line: 10 })?;
//! store.transaction(|tx| {
//!     tx.put("c2", Comment { message: "looks good".into(), line: 3 })?;
//!     tx.put("c3", Comment { message: "TODO: docs".into(), line: 7 })?;
//!     Ok::<_, kalphite::Error>(())
//! })?;
//!
//! let todos = comments
//!     .query()
//!     .filter(|c| c.data.message.starts_with("TODO"))
//!     .order_by(|c| c.data.line)
//!     .collect();
//! assert_eq!(todos.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["c3", "c1"]);
//! assert_eq!(seen.load(Ordering::SeqCst), 3); // two notifications, three changes
//! # Ok::<(), kalphite::Error>(())
//! ```

// Library code does not unwrap (tests may); the other lints are in the workspace Cargo.toml.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod change;
mod entity;
mod error;
#[cfg(feature = "runtime")]
mod flush;
mod measure;
mod schema;
mod store;

pub use change::{Change, FlushChange, Op, Origin};
pub use entity::{
    AnyEntity, Entity, EntityData, EntityId, EntityKind, Kind, Millis, RESERVED_KIND_PREFIX,
    is_reserved_kind, now_millis,
};
pub use error::{Error, Result};
#[cfg(feature = "runtime")]
pub use flush::{
    Annotation, Batch, Durability, FanOut, FlushConfig, FlushEngine, FlushError, FlushEvent,
    FlushStats, FlushTarget, FnTarget, ShutdownError, TargetError,
};
pub use measure::nul_field;
pub use schema::{FnSchema, Issue, JsonSchema, Schema, SchemaError, SharedSchema, TypedSchema};
pub use store::{
    ChangeSink, Collection, DynCollection, Listener, Notification, Query, Store, StoreBuilder,
    Subscription, Tx, View, json_cmp,
};
#[cfg(feature = "runtime")]
pub use store::{ChangeStream, RecvError};
