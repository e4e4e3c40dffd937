//! kalphite-sync — the wire protocol and the sans-IO sync core of kalphite.
//!
//! A sync server holds one [`Room`] per room id; each client holds a [`Replica`]. Both
//! are state machines: decoded messages and the current time go in, messages to send
//! (and, on the client, changes to apply to the local store) come out. No sockets, no
//! timers, no clock reads — the WebSocket server and client are thin adapters around
//! them, and tests drive many replicas deterministically from a seed.
//!
//! # Layout
//! - `protocol`: wire types, [`decode_client`] / [`encode`], error codes (reference:
//!   `docs/protocol.md`).
//! - `clock`: vector clocks.
//! - `conflict`: conflict strategies (last-write-wins, field merge, manual, custom).
//! - `room`: the server state machine (versions, dedup, catch-up, durability hook).
//! - `replica`: the client state machine (outbox, resend, acks, remote changes).
//!
//! The modules are private; every public item is re-exported at the crate root.
//!
//! The adapters live in their own crates, by dependency weight: `kalphite-client` (the
//! tokio-tungstenite client around [`Replica`], wired to a Store and a local database) and
//! `kalphite-server` (the axum WebSocket server around [`Room`]: auth, limits, room log).
//!
//! The conflict rules and why every replica converges are in `docs/sync.md`.
//!
//! # Writing the adapters
//! - **Server**, per room, one message at a time: decode each frame with
//!   [`decode_client`] (on error, send [`ProtocolError::to_payload`] back); verify the
//!   hello's token, then [`Room::join`] with the token's user; [`Room::handle`] the rest.
//!   ([`Room::join_streamed`] returns the catch-up as a [`CatchUpStream`] instead: send
//!   its pages one at a time, as the socket takes them, before anything else of the room.)
//!   [`Step::Persist`] means: write [`Pending::record`] to the database, then
//!   [`Room::commit`] (or [`Room::abort`] if the write failed) and send what it returns.
//!   [`Recipient::AllExcept`] is every joined connection of the room but one.
//!   [`Room::restore`] rebuilds a room from its records at start-up. Frame-size and rate
//!   limits, tokens and timeouts live in the adapter.
//! - **Client**: [`Replica::connect`] on open (send the hello), [`Replica::disconnected`]
//!   on close, [`Replica::local_change`] for each local change of the flush batch,
//!   [`Replica::handle`] for each frame (apply `Output::apply` to the store, send
//!   `Output::send`), [`Replica::tick`] on a timer. Persist [`Replica::state`] with the
//!   local data. [`Replica::acked_through`] ≥ the [`Replica::last_seq`] read after a
//!   change means the server has that change and everything before it.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use kalphite::{AnyEntity, Change, Entity, Origin};
//! use kalphite_sync::{ClientMessage, ConflictPolicy, Replica, ReplicaConfig, Room, Step};
//!
//! let mut room = Room::new("room-1", ConflictPolicy::default());
//! let mut alice = Replica::new(ReplicaConfig::new("room-1", "alice", "alice-laptop"));
//!
//! // Connect: the hello goes to the room, its answer back to the replica.
//! let ClientMessage::Hello(hello) = alice.connect(1) else { unreachable!() };
//! for out in room.join(7, "alice", &hello, 1).unwrap() {
//!     alice.handle(out.message, 1);
//! }
//!
//! // A local write becomes a change message...
//! let todo = Entity::new("t1", "todo", serde_json::json!({"title": "milk"})).at(2);
//! let local = Change::upsert(AnyEntity::new(Arc::new(todo)), 2, Origin::Local);
//! let sent = alice.local_change(&local, 2).unwrap();
//!
//! // ...that the room accepts, the caller persists, then commits to release the ack.
//! let Step::Persist(pending) = room.handle(7, sent[0].clone(), 3) else { unreachable!() };
//! assert_eq!(pending.record().version, 1); // write pending.record() to the database here
//! for out in room.commit(pending).unwrap() {
//!     alice.handle(out.message, 3);
//! }
//! assert_eq!(alice.outbox_len(), 0);
//! assert_eq!(room.version(), 1);
//! ```

// Library code does not unwrap (tests may); the other lints are in the workspace Cargo.toml.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

use kalphite::{EntityId, Kind};
use serde::{Deserialize, Serialize};

mod clock;
mod conflict;
mod protocol;
mod replica;
mod room;

pub use clock::{Causality, VectorClock};
pub use conflict::{
    ConflictCase, ConflictPolicy, Resolver, Stamp, Strategy, Version, content_hash,
};
pub use protocol::{
    AckPayload, CatchUpPayload, ChangePayload, ClientMessage, ConflictPayload,
    DEFAULT_MAX_FRAME_BYTES, ENTITY_FIELDS, Envelope, ErrorCode, ErrorPayload, HeartbeatPayload,
    HelloPayload, MAX_SERVER_FRAME_BYTES, PEEK_BYTES, PROTOCOL_VERSION, ProtocolError,
    RESERVED_KIND_PREFIX, SERVER_USER_ID, ServerMessage, StrategyName, WelcomePayload, WireMessage,
    decode, decode_client, decode_server, encode, peek_message_id,
};
pub use replica::{
    Held, Known, LinkState, OutboxEntry, Output, Progress, Replica, ReplicaConfig, ReplicaError,
    ReplicaEvent, ReplicaState, StateDelta, Undelivered,
};
pub use room::{
    CatchUpStream, ConnId, Joined, MAX_CLOCK_ENTRIES, MAX_DATA_DEPTH, MAX_ID_BYTES, Outbound,
    Pending, Recipient, Room, RoomError, RoomLimits, RoomMeta, Step, StoredChange,
};

/// One entity's address: its kind and id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntityKey {
    /// The kind.
    pub kind: Kind,
    /// The id.
    pub id: EntityId,
}

impl EntityKey {
    /// A key.
    pub fn new(kind: impl Into<Kind>, id: impl Into<EntityId>) -> Self {
        Self {
            kind: kind.into(),
            id: id.into(),
        }
    }
}
