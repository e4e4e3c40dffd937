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
//! - [`flush`]: flush targets (and the flush engine).

pub mod change;
pub mod entity;
pub mod flush;
pub mod schema;

pub use change::{Change, FlushChange, Op, Origin};
pub use entity::{AnyEntity, Entity, EntityData, EntityId, EntityKind, Kind, Millis, now_millis};
pub use schema::{FnSchema, Issue, JsonSchema, Schema, SchemaError, SharedSchema, TypedSchema};
