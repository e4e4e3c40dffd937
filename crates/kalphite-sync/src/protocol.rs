//! The wire protocol: JSON text frames, one message per frame, shaped like the spec's
//! `SyncMessage` (`{type, messageId, userId, timestamp, payload}`). Wire types only — the
//! room and the replica convert to and from their own state; `docs/protocol.md` is the
//! reference for writing a client in another language.

use kalphite::{Entity, EntityId, Kind, Millis, Op};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::clock::VectorClock;

/// Kinds starting with this are kalphite's own bookkeeping: never data, refused on the
/// wire and in stores.
pub const RESERVED_KIND_PREFIX: &str = "_kalphite_";

/// The protocol version this crate speaks. A peer with another version is refused with
/// [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u32 = 1;

/// The `userId` the server puts on the messages it originates (welcome, ack, catch-up,
/// conflict, error, heartbeat). Broadcast changes carry their author's user id instead.
pub const SERVER_USER_ID: &str = "@server";

/// Default limit on one frame, in bytes (1 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1 << 20;

/// The largest frame a server sends, and so the largest a client must accept (64 MiB).
/// Server frames may be larger than client frames: an ack, a broadcast or a catch-up page
/// carries a whole entity (a merge may make it larger than any one client frame), and a
/// conflict notice carries three states. A server never writes a larger frame: it closes
/// the connection with 1011 instead.
pub const MAX_SERVER_FRAME_BYTES: usize = 64 << 20;

/// The fields of an `entity` object on the wire; a client's change with any other field
/// in its entity is refused ([`ProtocolError::InvalidEntity`]).
pub const ENTITY_FIELDS: &[&str] = &["id", "type", "data", "updatedAt"];

/// The fields every message carries; `payload` depends on the message type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope<P> {
    /// Unique per sender. For a change it is also the deduplication key, together with
    /// the replica id of the sender's hello: a change resent with the same id is
    /// acknowledged again, never applied twice. Clients build it as
    /// `<replicaId>-<incarnation>-<counter>`; the server does not parse it.
    pub message_id: String,
    /// Who sent it (for server-originated messages, [`SERVER_USER_ID`]).
    pub user_id: String,
    /// Sender's clock, ms since the epoch. For a change: when the edit was made.
    pub timestamp: Millis,
    /// The message body.
    pub payload: P,
}

impl<P> Envelope<P> {
    /// Wraps a payload.
    pub fn new(
        message_id: impl Into<String>,
        user_id: impl Into<String>,
        timestamp: Millis,
        payload: P,
    ) -> Self {
        Self {
            message_id: message_id.into(),
            user_id: user_id.into(),
            timestamp,
            payload,
        }
    }
}

/// Opens a session: sent once, first, by the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HelloPayload {
    /// The client's [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The room to join.
    pub room_id: String,
    /// This client installation's id; names the client's slot in vector clocks.
    pub replica_id: String,
    /// The highest room version up to which the client has everything (0: nothing yet).
    /// The server answers with every entity changed after it.
    #[serde(default)]
    pub last_version: u64,
    /// Auth token (HS256 JWT), unless the server runs in open mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The room's epoch as the client last saw it in a welcome (absent: none seen yet, or a
    /// client that predates epochs). When it is not the room's, `lastVersion` counts
    /// versions of another history: the server answers with a full catch-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

/// The server's answer to a valid hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WelcomePayload {
    /// The server's [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The room joined.
    pub room_id: String,
    /// The room's current version (the version of its latest accepted change).
    pub room_version: u64,
    /// The version catch-up starts after: the hello's `lastVersion`, or 0 when that was
    /// ahead of the room, named another epoch, or is older than the room's tombstone
    /// collection horizon (the client must then resync: see `docs/sync.md`).
    pub catch_up_from: u64,
    /// The room's identity: random, new whenever the room's history was lost or restored.
    /// Absent from servers that predate epochs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// True when the catch-up is a snapshot the client must take as the whole truth: after
    /// it, the client drops every entity the room did not send (except its own unsent
    /// edits). Sent to a client older than the room's tombstone collection horizon, and to
    /// a client of another epoch when the operator restored the room on purpose
    /// (`kalphite restore --rollback`). Otherwise a resyncing client sends back what the
    /// room lacks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub snapshot: bool,
    /// The room's collection horizon: the highest version of a tombstone it no longer
    /// keeps (0 or absent: none). Once caught up, a client may forget the deletions it
    /// knows of up to this version, as the room did.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub collected_through: u64,
    /// The highest counter of the joining replica in any clock the room holds (0 or
    /// absent: none). A replica that restarted from a state older than what it had sent
    /// (it crashed before its disk held edits the room already stored, or its database was
    /// restored) would reuse those counters, and the room would take its new edits for
    /// ones it already has: its edits from this incarnation count from above this.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub replica_counter: u64,
}

// serde's skip_serializing_if takes a reference.
#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One change of one entity. Sent by a client (with `baseVersion`) and by the server
/// (with `roomVersion`, the version the room assigned).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangePayload {
    /// `upsert` or `delete`.
    pub operation: Op,
    /// The entity's kind.
    pub entity_type: Kind,
    /// The entity's id.
    pub entity_id: EntityId,
    /// The whole entity, for upserts; absent for deletes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<Entity<Value>>,
    /// The entity's vector clock after this change.
    #[serde(default)]
    pub vector: VectorClock,
    /// Client → server: the room version of the entity state this edit was based on
    /// (0 when the client had never seen the entity). Used as the base of three-way merges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<u64>,
    /// Server → client: the room version of this state of the entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_version: Option<u64>,
}

/// One page of catch-up: the current state of every entity (tombstones included) whose
/// latest version is in `(fromVersion, toVersion]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CatchUpPayload {
    /// Exclusive lower bound.
    pub from_version: u64,
    /// Inclusive upper bound.
    pub to_version: u64,
    /// The entities, in version order.
    pub changes: Vec<ChangePayload>,
    /// True on the last page: the client is caught up to `toVersion`.
    pub complete: bool,
}

/// Acknowledges one change: it is durable and has a room version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AckPayload {
    /// The `messageId` of the change acknowledged.
    pub ack_of: String,
    /// The room version assigned to that change (or, when the change was already
    /// incorporated, the entity's current version).
    pub version: u64,
    /// The entity's state as the room holds it now, with its `roomVersion`: after a
    /// conflict, the resolution; the client adopts it.
    pub result: ChangePayload,
}

/// Which conflict strategy resolved a conflict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum StrategyName {
    /// Whole-entity last-write-wins.
    LastWriteWins,
    /// Field-level three-way merge.
    FieldMerge,
    /// Manual: the room kept the last-write-wins result for now; the app decides.
    Manual,
    /// An application resolver.
    Custom,
}

/// Tells the author of a change that it was concurrent with the room's state, and how
/// the room resolved it. Under the manual strategy the app should pick a version and
/// write it as a new change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConflictPayload {
    /// The `messageId` of the conflicting change.
    pub refers_to: String,
    /// The strategy that produced `resolved`.
    pub strategy: StrategyName,
    /// The change as the client sent it.
    pub yours: ChangePayload,
    /// The room's state it conflicted with.
    pub theirs: ChangePayload,
    /// The room's state after resolution (with `roomVersion`).
    pub resolved: ChangePayload,
}

/// Liveness probe; either side may send it, the server answers each with its own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatPayload {}

/// Machine-readable error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame is not JSON.
    MalformedJson,
    /// The frame is JSON but not a message (not an object, no `type`).
    InvalidMessage,
    /// A required field is missing.
    MissingField,
    /// The `type` is not one this side knows.
    UnknownType,
    /// The frame is larger than the limit.
    Oversized,
    /// The hello's protocol version is not supported.
    UnsupportedVersion,
    /// No token, or an invalid one.
    Unauthorized,
    /// The token has expired.
    TokenExpired,
    /// The token does not allow this room.
    Forbidden,
    /// A message other than hello before the hello was accepted.
    NotJoined,
    /// A second hello on the same connection.
    AlreadyJoined,
    /// The change's entity is invalid (schema, kind/id mismatch, upsert without entity).
    InvalidEntity,
    /// Too many messages per second on this connection.
    RateLimited,
    /// The change could not be written durably; resend it.
    StorageFailed,
    /// A bug on the server.
    Internal,
    /// The hello's `replicaId` is already bound to another user in this room (a replica id
    /// belongs to the user who first used it there). Pick another replica id.
    ReplicaTaken,
    /// A change reuses the `messageId` of an earlier change of the same replica that named
    /// another entity; message ids must be unique per replica.
    MessageIdReused,
    /// A change's vector clock claims more edits by another replica than the room has
    /// ever accepted from it.
    InvalidClock,
    /// The hello's user already holds the most connections one user may; the connection
    /// is closed. Retry later, with backoff.
    TooManyConnections,
    /// A code this version does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// True when resending the same message later may succeed.
    #[must_use]
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::RateLimited
                | Self::StorageFailed
                | Self::Internal
                | Self::TooManyConnections
                | Self::Unknown
        )
    }
}

/// Something went wrong with a message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorPayload {
    /// What kind of error.
    pub code: ErrorCode,
    /// For a person.
    pub message: String,
    /// The `messageId` of the message the error is about, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refers_to: Option<String>,
}

/// Every message a client sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
#[non_exhaustive]
pub enum ClientMessage {
    /// Opens the session.
    Hello(Envelope<HelloPayload>),
    /// A local change.
    Change(Envelope<ChangePayload>),
    /// Liveness probe.
    Heartbeat(Envelope<HeartbeatPayload>),
}

/// Every message a server sends.
// Messages are built, encoded and dropped; boxing the large payloads would only add
// allocations.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
#[non_exhaustive]
pub enum ServerMessage {
    /// The hello was accepted.
    Welcome(Envelope<WelcomePayload>),
    /// Another client's change, as the room resolved it (with `roomVersion`).
    Change(Envelope<ChangePayload>),
    /// A page of catch-up.
    CatchUp(Envelope<CatchUpPayload>),
    /// Your change is durable.
    Ack(Envelope<AckPayload>),
    /// Your change conflicted.
    Conflict(Envelope<ConflictPayload>),
    /// Liveness probe / answer.
    Heartbeat(Envelope<HeartbeatPayload>),
    /// Something went wrong.
    Error(Envelope<ErrorPayload>),
}

impl ClientMessage {
    /// The message's id.
    #[must_use]
    pub fn message_id(&self) -> &str {
        match self {
            Self::Hello(e) => &e.message_id,
            Self::Change(e) => &e.message_id,
            Self::Heartbeat(e) => &e.message_id,
        }
    }
}

impl ServerMessage {
    /// The message's id.
    #[must_use]
    pub fn message_id(&self) -> &str {
        match self {
            Self::Welcome(e) => &e.message_id,
            Self::Change(e) => &e.message_id,
            Self::CatchUp(e) => &e.message_id,
            Self::Ack(e) => &e.message_id,
            Self::Conflict(e) => &e.message_id,
            Self::Heartbeat(e) => &e.message_id,
            Self::Error(e) => &e.message_id,
        }
    }
}

/// A frame that could not be turned into a message (or a message into a frame).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The frame is over the size limit; it was not parsed.
    #[error(
        "frame of {size} bytes is over the {limit}-byte limit; split the data or raise the limit"
    )]
    Oversized {
        /// The frame's size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The frame is not JSON.
    #[error("frame is not valid JSON (line {line}, column {column}): {reason}")]
    MalformedJson {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The parser's explanation.
        reason: String,
    },
    /// The frame is JSON but not an object with a string `type`.
    #[error("frame is not a message: expected a JSON object with a string \"type\"")]
    NotAMessage,
    /// The `type` is not known here.
    #[error("unknown message type '{found}' (expected one of: {expected})")]
    UnknownType {
        /// The type received.
        found: String,
        /// The types this side accepts, comma-separated.
        expected: String,
        /// The frame's `messageId`, when it had one.
        message_id: Option<String>,
    },
    /// A required field is missing.
    #[error("'{message_type}' message is missing the required field '{field}'")]
    MissingField {
        /// The message type.
        message_type: String,
        /// The missing field.
        field: String,
        /// The frame's `messageId`, when it had one.
        message_id: Option<String>,
    },
    /// A field has the wrong shape.
    #[error("invalid '{message_type}' message: {reason}")]
    Invalid {
        /// The message type.
        message_type: String,
        /// What is wrong.
        reason: String,
        /// The frame's `messageId`, when it had one.
        message_id: Option<String>,
    },
    /// A change's `entity` is not an entity: not an object, a field other than
    /// [`ENTITY_FIELDS`], or `data` that is not a JSON object.
    #[error("invalid entity: {reason}")]
    InvalidEntity {
        /// What is wrong.
        reason: String,
        /// The frame's `messageId`, when it had one.
        message_id: Option<String>,
    },
    /// A message could not be serialized (a bug, or data that is not JSON-representable).
    #[error("could not encode message: {reason}")]
    Encode {
        /// The serializer's explanation.
        reason: String,
    },
}

impl ProtocolError {
    /// The wire error code to answer with.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Oversized { .. } => ErrorCode::Oversized,
            Self::MalformedJson { .. } => ErrorCode::MalformedJson,
            Self::NotAMessage | Self::Invalid { .. } => ErrorCode::InvalidMessage,
            Self::UnknownType { .. } => ErrorCode::UnknownType,
            Self::MissingField { .. } => ErrorCode::MissingField,
            Self::InvalidEntity { .. } => ErrorCode::InvalidEntity,
            Self::Encode { .. } => ErrorCode::Internal,
        }
    }

    /// The `messageId` of the offending frame, when it could be read.
    #[must_use]
    pub fn refers_to(&self) -> Option<&str> {
        match self {
            Self::UnknownType { message_id, .. }
            | Self::MissingField { message_id, .. }
            | Self::Invalid { message_id, .. }
            | Self::InvalidEntity { message_id, .. } => message_id.as_deref(),
            _ => None,
        }
    }

    /// The error as a wire payload, ready to send back.
    #[must_use]
    pub fn to_payload(&self) -> ErrorPayload {
        ErrorPayload {
            code: self.code(),
            message: self.to_string(),
            refers_to: self.refers_to().map(str::to_owned),
        }
    }
}

/// The message types a side accepts; drives [`decode`].
pub trait WireMessage: DeserializeOwned + Serialize {
    /// Every `type` value, as on the wire.
    const TYPES: &'static [&'static str];
    /// Types whose `payload` may be omitted (it then reads as `{}`).
    const PAYLOAD_OPTIONAL: &'static [&'static str] = &["heartbeat"];

    /// Checks a message object of type `message_type` beyond its serde shape, before it
    /// is deserialized (serde drops unknown fields). `Err` is why its entity is refused.
    ///
    /// # Errors
    /// A reason, reported as [`ProtocolError::InvalidEntity`].
    fn check_entity(
        message_type: &str,
        message: &serde_json::Map<String, Value>,
    ) -> Result<(), String> {
        let _ = (message_type, message);
        Ok(())
    }
}

impl WireMessage for ClientMessage {
    const TYPES: &'static [&'static str] = &["hello", "change", "heartbeat"];

    /// A change's entity is closed: only [`ENTITY_FIELDS`], and `data` a JSON object. An
    /// unknown field there is application data at the wrong level, which serde would drop
    /// silently (the envelope and payloads stay open to new optional fields).
    fn check_entity(
        message_type: &str,
        message: &serde_json::Map<String, Value>,
    ) -> Result<(), String> {
        if message_type != "change" {
            return Ok(());
        }
        let Some(entity) = message.get("payload").and_then(|p| p.get("entity")) else {
            return Ok(());
        };
        let entity = match entity {
            Value::Null => return Ok(()),
            Value::Object(entity) => entity,
            other => return Err(format!("the entity is {}, not an object", json_kind(other))),
        };
        if let Some(field) = entity.keys().find(|k| !ENTITY_FIELDS.contains(&k.as_str())) {
            return Err(format!(
                "unknown field '{}' in the entity (an entity has only id, type, data and \
                 updatedAt; application fields go inside data)",
                truncate(field, 64)
            ));
        }
        match entity.get("data") {
            None | Some(Value::Object(_)) => Ok(()),
            Some(other) => Err(format!(
                "its data must be a JSON object, not {}",
                json_kind(other)
            )),
        }
    }
}

impl WireMessage for ServerMessage {
    const TYPES: &'static [&'static str] = &[
        "welcome",
        "change",
        "catchUp",
        "ack",
        "conflict",
        "heartbeat",
        "error",
    ];
}

/// Decodes a frame received by the server. Never panics, whatever the input.
///
/// # Errors
/// A [`ProtocolError`] saying why the frame is not a client message.
pub fn decode_client(text: &str, max_bytes: usize) -> Result<ClientMessage, ProtocolError> {
    decode(text, max_bytes)
}

/// Decodes a frame received by a client. Never panics, whatever the input.
///
/// # Errors
/// A [`ProtocolError`] saying why the frame is not a server message.
pub fn decode_server(text: &str, max_bytes: usize) -> Result<ServerMessage, ProtocolError> {
    decode(text, max_bytes)
}

/// Decodes one frame into `M`, checking in order: size, JSON syntax, the `type`, the
/// envelope fields, then the payload.
///
/// # Errors
/// A [`ProtocolError`] for the first check that fails.
pub fn decode<M: WireMessage>(text: &str, max_bytes: usize) -> Result<M, ProtocolError> {
    if text.len() > max_bytes {
        return Err(ProtocolError::Oversized {
            size: text.len(),
            limit: max_bytes,
        });
    }
    let mut value: Value =
        serde_json::from_str(text).map_err(|e| ProtocolError::MalformedJson {
            line: e.line(),
            column: e.column(),
            reason: e.to_string(),
        })?;
    let Some(object) = value.as_object_mut() else {
        return Err(ProtocolError::NotAMessage);
    };
    let Some(message_type) = object
        .get("type")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return Err(ProtocolError::NotAMessage);
    };
    let message_id = object
        .get("messageId")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if !M::TYPES.contains(&message_type.as_str()) {
        return Err(ProtocolError::UnknownType {
            found: truncate(&message_type, 64),
            expected: M::TYPES.join(", "),
            message_id,
        });
    }
    if M::PAYLOAD_OPTIONAL.contains(&message_type.as_str()) && !object.contains_key("payload") {
        object.insert("payload".to_owned(), Value::Object(serde_json::Map::new()));
    }
    for field in ["messageId", "userId", "timestamp", "payload"] {
        if !object.contains_key(field) {
            return Err(ProtocolError::MissingField {
                message_type,
                field: field.to_owned(),
                message_id,
            });
        }
    }
    if let Err(reason) = M::check_entity(&message_type, object) {
        return Err(ProtocolError::InvalidEntity { reason, message_id });
    }
    serde_json::from_value(value).map_err(|e| {
        let reason = e.to_string();
        match missing_field_name(&reason) {
            Some(field) => ProtocolError::MissingField {
                message_type,
                field,
                message_id,
            },
            None => ProtocolError::Invalid {
                message_type,
                reason,
                message_id,
            },
        }
    })
}

/// Encodes a message as one text frame.
///
/// # Errors
/// [`ProtocolError::Encode`] when the message holds data JSON cannot represent.
pub fn encode<M: Serialize>(message: &M) -> Result<String, ProtocolError> {
    serde_json::to_string(message).map_err(|e| ProtocolError::Encode {
        reason: e.to_string(),
    })
}

/// How far into a frame [`peek_message_id`] looks, in bytes.
pub const PEEK_BYTES: usize = 4096;

/// The top-level `messageId` of a frame that will not be parsed (over the size limit), so
/// that the error about it can name it in `refersTo`. A bounded scan of the first
/// [`PEEK_BYTES`] bytes that tracks strings and nesting (a `messageId` inside the payload
/// is not taken), with no full parse; `None` when the id is not there. Never panics.
#[must_use]
pub fn peek_message_id(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let end = bytes.len().min(PEEK_BYTES);
    let mut depth = 0usize;
    let mut i = 0;
    while i < end {
        match bytes[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => {
                let close = string_end(bytes, i, end)?;
                let is_key = depth == 1 && &text[i..=close] == "\"messageId\"";
                i = close;
                if is_key {
                    let colon = skip_whitespace(bytes, close + 1, end);
                    if bytes.get(colon) == Some(&b':') {
                        let open = skip_whitespace(bytes, colon + 1, end);
                        if open >= end || bytes[open] != b'"' {
                            return None;
                        }
                        let close = string_end(bytes, open, end)?;
                        return serde_json::from_str(&text[open..=close]).ok();
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The index of the quote closing the JSON string that opens at `open`, before `end`.
fn string_end(bytes: &[u8], open: usize, end: usize) -> Option<usize> {
    let mut i = open + 1;
    while i < end {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// The first index at or after `from` that is not JSON whitespace (or `end`).
fn skip_whitespace(bytes: &[u8], from: usize, end: usize) -> usize {
    let mut i = from;
    while i < end && matches!(bytes[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// Reads the field name out of serde's "missing field `x`" message.
fn missing_field_name(reason: &str) -> Option<String> {
    let rest = reason.strip_prefix("missing field `")?;
    let end = rest.find('`')?;
    Some(rest[..end].to_owned())
}

/// What kind of JSON value `v` is, for error messages.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// At most `max` characters of `s` (for echoing untrusted strings in errors).
fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMIT: usize = DEFAULT_MAX_FRAME_BYTES;

    #[test]
    fn change_round_trips_with_spec_field_names() {
        let msg = ClientMessage::Change(Envelope::new(
            "r1-1",
            "alice",
            1_700_000_000_000,
            ChangePayload {
                operation: Op::Upsert,
                entity_type: "todo".into(),
                entity_id: "t1".into(),
                entity: Some(Entity::new("t1", "todo", json!({"title": "x"})).at(5)),
                vector: VectorClock::from([("r1", 1)]),
                base_version: Some(0),
                room_version: None,
            },
        ));
        let text = encode(&msg).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v,
            json!({"type": "change", "messageId": "r1-1", "userId": "alice",
                   "timestamp": 1_700_000_000_000u64,
                   "payload": {"operation": "upsert", "entityType": "todo", "entityId": "t1",
                               "entity": {"id": "t1", "type": "todo", "data": {"title": "x"},
                                          "updatedAt": 5},
                               "vector": {"r1": 1}, "baseVersion": 0}})
        );
        assert_eq!(decode_client(&text, LIMIT).unwrap(), msg);
    }

    #[test]
    fn server_messages_round_trip() {
        let msgs = vec![
            ServerMessage::Welcome(Envelope::new(
                "s-1",
                SERVER_USER_ID,
                1,
                WelcomePayload {
                    protocol_version: PROTOCOL_VERSION,
                    room_id: "r".into(),
                    room_version: 3,
                    catch_up_from: 0,
                    epoch: Some("e1".into()),
                    snapshot: true,
                    collected_through: 7,
                    replica_counter: 12,
                },
            )),
            ServerMessage::Error(Envelope::new(
                "s-2",
                SERVER_USER_ID,
                1,
                ErrorPayload {
                    code: ErrorCode::RateLimited,
                    message: "slow down".into(),
                    refers_to: Some("c-9".into()),
                },
            )),
            ServerMessage::CatchUp(Envelope::new(
                "s-3",
                SERVER_USER_ID,
                1,
                CatchUpPayload {
                    from_version: 0,
                    to_version: 0,
                    changes: vec![],
                    complete: true,
                },
            )),
        ];
        for msg in msgs {
            let text = encode(&msg).unwrap();
            assert_eq!(decode_server(&text, LIMIT).unwrap(), msg, "{text}");
        }
        let text = encode(&ServerMessage::Welcome(Envelope::new(
            "s",
            "u",
            0,
            WelcomePayload {
                protocol_version: 1,
                room_id: "r".into(),
                room_version: 0,
                catch_up_from: 0,
                epoch: None,
                snapshot: false,
                collected_through: 0,
                replica_counter: 0,
            },
        )))
        .unwrap();
        assert!(text.contains(r#""type":"welcome""#) && text.contains("catchUpFrom"));
    }

    #[test]
    fn errors_are_typed() {
        assert!(matches!(
            decode_client("{not json", LIMIT),
            Err(ProtocolError::MalformedJson { line: 1, .. })
        ));
        assert_eq!(
            decode_client("[1,2]", LIMIT),
            Err(ProtocolError::NotAMessage)
        );
        assert_eq!(
            decode_client(r#"{"type": 3}"#, LIMIT),
            Err(ProtocolError::NotAMessage)
        );
        let err = decode_client(r#"{"type":"presence","messageId":"m7"}"#, LIMIT).unwrap_err();
        assert!(matches!(&err, ProtocolError::UnknownType { found, .. } if found == "presence"));
        assert_eq!(err.refers_to(), Some("m7"));
        assert_eq!(err.code(), ErrorCode::UnknownType);
        let err = decode_client(
            r#"{"type":"change","messageId":"m","userId":"u","timestamp":1}"#,
            LIMIT,
        )
        .unwrap_err();
        assert!(matches!(&err, ProtocolError::MissingField { field, .. } if field == "payload"));
        let err = decode_client(
            r#"{"type":"change","messageId":"m","userId":"u","timestamp":1,"payload":{"operation":"upsert","entityType":"t"}}"#,
            LIMIT,
        )
        .unwrap_err();
        assert!(
            matches!(&err, ProtocolError::MissingField { field, .. } if field == "entityId"),
            "{err}"
        );
        let err = decode_client(
            r#"{"type":"change","messageId":"m","userId":"u","timestamp":-1,"payload":{"operation":"delete","entityType":"t","entityId":"i"}}"#,
            LIMIT,
        )
        .unwrap_err();
        assert!(matches!(err, ProtocolError::Invalid { .. }), "{err}");
        let big = format!(r#"{{"type":"heartbeat","pad":"{}"}}"#, "x".repeat(100));
        assert_eq!(
            decode_client(&big, 50),
            Err(ProtocolError::Oversized {
                size: big.len(),
                limit: 50
            })
        );
    }

    #[test]
    fn the_message_id_of_an_unparsed_frame_can_be_peeked() {
        let frame = encode(&ClientMessage::Heartbeat(Envelope::new(
            "r1-7-42",
            "u",
            1,
            HeartbeatPayload {},
        )))
        .unwrap();
        assert_eq!(peek_message_id(&frame).as_deref(), Some("r1-7-42"));
        // Spacing, escapes, and a messageId inside the payload that is not the envelope's.
        let spaced = r#"{ "payload" : {"messageId": "inner", "x": ["messageId"]},
            "messageId" :	"a\"b\u0041" , "type": "change"}"#;
        assert_eq!(peek_message_id(spaced).as_deref(), Some("a\"bA"));
        for (text, why) in [
            (r#"{"payload": {"messageId": "inner"}}"#, "only nested"),
            (r#"{"type": "messageId", "x": 1}"#, "a value, not a key"),
            (r#"{"messageId": 7}"#, "not a string"),
            (r#"{"messageId": "unterminated"#, "cut off"),
            ("", "empty"),
            ("\"", "a lone quote"),
            (r#"{"messageId""#, "no value"),
            ("}}]]{\"messageId\":\"x\"}", "unbalanced before"),
        ] {
            assert!(
                matches!(peek_message_id(text).as_deref(), None | Some("x")),
                "{why}: {text}"
            );
        }
        assert_eq!(
            peek_message_id(r#"{"payload": {"messageId": "inner"}}"#),
            None
        );
        let late = format!(r#"{{"pad":"{}","messageId":"m"}}"#, "x".repeat(PEEK_BYTES));
        assert_eq!(peek_message_id(&late), None, "the scan is bounded");
    }

    proptest::proptest! {
        #[test]
        fn peeking_never_panics_and_finds_the_envelope_id(
            junk in ".{0,300}",
            id in "[a-z0-9\\-\"\\\\é]{0,40}",
        ) {
            let _ = peek_message_id(&junk);
            let frame = encode(&ClientMessage::Heartbeat(Envelope::new(
                id.clone(), "u", 1, HeartbeatPayload {},
            ))).unwrap();
            proptest::prop_assert_eq!(peek_message_id(&frame), Some(id));
        }
    }

    #[test]
    fn every_error_code_is_documented_and_every_documented_code_is_known() {
        const DOC: &str = include_str!("../../../docs/protocol.md");
        let section = DOC
            .split("## 8.")
            .nth(1)
            .and_then(|s| s.split("## 9.").next())
            .expect("docs/protocol.md has a section 8");
        let documented: Vec<&str> = section
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
            .collect();
        for code in &documented {
            let parsed: ErrorCode = serde_json::from_value(json!(code)).unwrap();
            assert_ne!(
                parsed,
                ErrorCode::Unknown,
                "documented code {code} is not known"
            );
        }
        for code in [
            ErrorCode::MalformedJson,
            ErrorCode::InvalidMessage,
            ErrorCode::MissingField,
            ErrorCode::UnknownType,
            ErrorCode::Oversized,
            ErrorCode::UnsupportedVersion,
            ErrorCode::Unauthorized,
            ErrorCode::TokenExpired,
            ErrorCode::Forbidden,
            ErrorCode::NotJoined,
            ErrorCode::AlreadyJoined,
            ErrorCode::InvalidEntity,
            ErrorCode::RateLimited,
            ErrorCode::StorageFailed,
            ErrorCode::Internal,
            ErrorCode::ReplicaTaken,
            ErrorCode::MessageIdReused,
            ErrorCode::InvalidClock,
            ErrorCode::TooManyConnections,
        ] {
            let wire = serde_json::to_value(code).unwrap();
            let wire = wire.as_str().unwrap();
            assert!(
                documented.contains(&wire),
                "{wire} is not in docs/protocol.md §8"
            );
        }
    }

    #[test]
    fn heartbeat_payload_may_be_omitted() {
        let msg = decode_client(
            r#"{"type":"heartbeat","messageId":"h","userId":"u","timestamp":2}"#,
            LIMIT,
        )
        .unwrap();
        assert!(matches!(msg, ClientMessage::Heartbeat(e) if e.timestamp == 2));
    }

    #[test]
    fn unknown_error_codes_from_newer_peers_still_decode() {
        let msg = decode_server(
            r#"{"type":"error","messageId":"e","userId":"@server","timestamp":0,"payload":{"code":"quota_exceeded","message":"m"}}"#,
            LIMIT,
        )
        .unwrap();
        assert!(matches!(msg, ServerMessage::Error(e) if e.payload.code == ErrorCode::Unknown));
    }
}
