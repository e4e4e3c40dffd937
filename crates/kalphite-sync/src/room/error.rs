//! Why a room refuses a hello, a change or a write, and the wire code for each reason.

use crate::protocol::ErrorCode;

/// Why the room refused something.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RoomError {
    /// The hello's protocol version is not ours.
    #[error(
        "protocol version {got} is not supported (this server speaks {supported}); upgrade the client"
    )]
    UnsupportedVersion {
        /// The client's version.
        got: u32,
        /// Ours.
        supported: u32,
    },
    /// The hello names another room.
    #[error("this connection is for room '{expected}', not '{got}'")]
    WrongRoom {
        /// This room.
        expected: String,
        /// The hello's room.
        got: String,
    },
    /// A change or heartbeat before the hello.
    #[error("send a hello first")]
    NotJoined,
    /// A second hello.
    #[error("this connection has already joined the room")]
    AlreadyJoined,
    /// The change's entity is not acceptable.
    #[error("invalid entity {kind}/{id}: {reason}")]
    InvalidEntity {
        /// The kind.
        kind: String,
        /// The id.
        id: String,
        /// Why.
        reason: String,
    },
    /// The hello's replica id is bound to another user in this room.
    #[error(
        "replica id '{replica_id}' is already used by another user in this room; \
         use a replica id of your own (a new random one per installation)"
    )]
    ReplicaTaken {
        /// The replica id asked for.
        replica_id: String,
    },
    /// A change reuses the message id of an earlier change of the same replica that named
    /// another entity.
    #[error(
        "message id '{message_id}' was already used by this replica for {earlier}, not \
         {kind}/{id}; give every change a new message id"
    )]
    MessageIdReused {
        /// The reused message id.
        message_id: String,
        /// The entity the earlier change named, as `kind/id`.
        earlier: String,
        /// The kind this change names.
        kind: String,
        /// The id this change names.
        id: String,
    },
    /// A change's clock claims edits of another replica that the room never accepted.
    #[error(
        "the change's clock counts {claimed} edits by replica '{replica}', but the room has \
         accepted only {known}; build clocks from the states the room sent"
    )]
    InvalidClock {
        /// The replica whose counter is too high.
        replica: String,
        /// The counter the change claims.
        claimed: u64,
        /// The highest counter the room has accepted from that replica.
        known: u64,
    },
    /// A replica id or message id is longer than [`MAX_ID_BYTES`](super::MAX_ID_BYTES).
    #[error("{field} is {len} bytes long; at most {max} are accepted", max = super::MAX_ID_BYTES)]
    IdTooLong {
        /// Which field: `replicaId` or `messageId`.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// A replica id, user id or message id holds a NUL character (U+0000), which the room
    /// log cannot store. (In an entity it is an [`RoomError::InvalidEntity`].)
    #[error(
        "{field} contains a NUL character (U+0000), which the room log cannot store; remove it"
    )]
    NulCharacter {
        /// Which field: `replicaId`, `userId` or `messageId`.
        field: &'static str,
    },
    /// A change arrived while the previous accepted change was not yet committed.
    #[error("the previous change is still being written; resend later")]
    CommitPending,
    /// [`Room::commit`](super::Room::commit) or [`Room::abort`](super::Room::abort) got a pending change that is not the room's.
    #[error("this pending change does not belong to the room's current write")]
    StalePending,
    /// The room has used every version number (corrupt log).
    #[error("the room's version counter is exhausted")]
    VersionsExhausted,
    /// [`Room::restore`](super::Room::restore) got records out of order.
    #[error(
        "stored change {version} follows {previous}: records must be in increasing version order"
    )]
    OutOfOrder {
        /// The offending version.
        version: u64,
        /// The version before it.
        previous: u64,
    },
}

impl RoomError {
    /// The wire error code.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            Self::WrongRoom { .. } => ErrorCode::Forbidden,
            Self::NotJoined => ErrorCode::NotJoined,
            Self::AlreadyJoined => ErrorCode::AlreadyJoined,
            Self::InvalidEntity { .. } => ErrorCode::InvalidEntity,
            Self::ReplicaTaken { .. } => ErrorCode::ReplicaTaken,
            Self::MessageIdReused { .. } => ErrorCode::MessageIdReused,
            Self::InvalidClock { .. } => ErrorCode::InvalidClock,
            Self::IdTooLong { .. } | Self::NulCharacter { .. } => ErrorCode::InvalidMessage,
            Self::CommitPending
            | Self::StalePending
            | Self::OutOfOrder { .. }
            | Self::VersionsExhausted => ErrorCode::Internal,
        }
    }
}
