//! kalphite — a memory-first, local-first entity store.
//!
//! App code reads and writes entities synchronously in memory; every accepted write
//! becomes a [`Change`] that subscribers, the background flush engine, the database and
//! the sync client consume.
//!
//! # Layout
//! - [`entity`]: the `{id, type, data, updatedAt}` record, ids and kind names.
//! - [`change`]: the change record every layer consumes.
//! - [`schema`]: validation of entity data (JSON Schema, serde types, closures).
//! - [`store`]: Layer 1, the in-memory store, collections, queries, subscriptions.
//! - [`error`]: why a write was refused.
//! - [`flush`]: Layer 2, the flush engine and its targets.

pub mod change;
pub mod entity;
pub mod error;
pub mod flush;
pub mod schema;
pub mod store;

pub use change::{Change, FlushChange, Op, Origin};
pub use entity::{AnyEntity, Entity, EntityData, EntityId, EntityKind, Kind, Millis, now_millis};
pub use error::{Error, Result};
pub use flush::{Durability, FlushConfig, FlushEngine, FlushError, FlushTarget};
pub use schema::{FnSchema, Issue, JsonSchema, Schema, SchemaError, SharedSchema, TypedSchema};
pub use store::query_json_cmp as json_cmp;
pub use store::{
    ChangeSink, ChangeStream, Collection, DynCollection, Listener, Notification, Query, RecvError,
    Store, StoreBuilder, Subscription, Tx, View,
};
