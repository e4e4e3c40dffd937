//! The store's error type: every refused write says what was refused and why, and leaves
//! the store exactly as it was.

use crate::entity::{EntityId, Kind, RESERVED_KIND_PREFIX};
use crate::schema::{Issue, join_issues};

/// Why the store refused an operation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A record of one kind was written to another kind's collection.
    #[error("entity '{id}' has type '{actual}' but was written to the '{expected}' collection")]
    WrongKind {
        /// The collection's kind.
        expected: Kind,
        /// The record's own kind.
        actual: Kind,
        /// The record's id.
        id: EntityId,
    },
    /// The id was empty.
    #[error("refused a '{kind}' entity with an empty id: every entity needs a non-empty id")]
    EmptyId {
        /// The record's kind.
        kind: Kind,
    },
    /// The kind name was empty.
    #[error("refused entity '{id}' with an empty type: every entity needs a kind")]
    EmptyKind {
        /// The record's id.
        id: EntityId,
    },
    /// JSON data was not an object.
    #[error("refused {kind} '{id}': data must be a JSON object, got {found}")]
    NotAnObject {
        /// The record's kind.
        kind: Kind,
        /// The record's id.
        id: EntityId,
        /// What the data was instead (`"string"`, `"array"`, …).
        found: &'static str,
    },
    /// The schema rejected the data.
    #[error("Validation failed for {kind} '{id}': {}", join_issues(.issues))]
    Validation {
        /// The record's kind.
        kind: Kind,
        /// The record's id.
        id: EntityId,
        /// Every issue the schema found.
        issues: Vec<Issue>,
    },
    /// JSON data could not be converted into the Rust type registered for its kind.
    #[error("refused {kind} '{id}': its data does not fit {type_name}: {message}")]
    Conversion {
        /// The record's kind.
        kind: Kind,
        /// The record's id.
        id: EntityId,
        /// The registered Rust type.
        type_name: &'static str,
        /// The deserializer's explanation.
        message: String,
    },
    /// A typed entity could not be turned into JSON (to validate it, or to measure it
    /// against the size limit).
    #[error("could not serialize {kind} '{id}' as JSON: {message}")]
    Serialize {
        /// The record's kind.
        kind: Kind,
        /// The record's id.
        id: EntityId,
        /// The serializer's explanation.
        message: String,
    },
    /// A kind was opened as a Rust type other than the one it holds.
    #[error("kind '{kind}' holds {existing} data; it cannot be opened as {requested}")]
    KindTypeMismatch {
        /// The kind.
        kind: Kind,
        /// The data type the kind already holds.
        existing: &'static str,
        /// The data type that was asked for.
        requested: &'static str,
    },
    /// The kind starts with [`RESERVED_KIND_PREFIX`]: such kinds are kalphite's own
    /// bookkeeping and are never stored as entities (whoever sent it, local code or a
    /// room member).
    #[error(
        "refused kind '{kind}': kinds starting with '{RESERVED_KIND_PREFIX}' are reserved \
         for kalphite's own bookkeeping"
    )]
    ReservedKind {
        /// The refused kind.
        kind: Kind,
    },
    /// The store has an entity size limit ([`crate::Store::set_max_entity_bytes`]) and the
    /// entity's JSON record is larger.
    #[error(
        "refused {kind} '{id}': it is {bytes} bytes as JSON, over the store's limit of \
         {limit} bytes per entity (the sync server refuses larger entities, so it could \
         never be synced)"
    )]
    EntityTooLarge {
        /// The record's kind.
        kind: Kind,
        /// The record's id.
        id: EntityId,
        /// The size of the whole `{id, type, data, updatedAt}` record as JSON.
        bytes: usize,
        /// The store's limit.
        limit: usize,
    },
    /// The store refuses NUL characters ([`crate::Store::set_refuse_nul`]) and a string of
    /// the entity — its kind, its id, a key or a value at any depth — holds one.
    #[error(
        "refused {kind} '{id}': {field} holds a NUL character (U+0000), which PostgreSQL \
         cannot store and the sync server refuses, so it could never be persisted or synced"
    )]
    Unstorable {
        /// The record's kind.
        kind: Kind,
        /// The record's id.
        id: EntityId,
        /// Where the character is (see [`crate::nul_field`]): `the kind`, `the id`, or a
        /// path into the data such as `data.tags[1]`.
        field: String,
    },
    /// The flush engine's configuration is invalid.
    #[error("invalid flush configuration: {0}")]
    InvalidConfig(String),
}

/// `Result` with the store's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The JSON type name of a value, for error messages.
pub(crate) fn json_type_name(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
