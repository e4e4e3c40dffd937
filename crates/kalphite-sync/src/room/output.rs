//! What a room hands back to its caller: messages addressed to connections, and the
//! two-step [`Pending`] write that releases an ack only after the change is persisted.

use crate::protocol::ServerMessage;

use super::StoredChange;

/// The caller's name for one connection (socket) to the room.
pub type ConnId = u64;

/// Who an outgoing message is for. Exhaustive on purpose, like [`Step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recipient {
    /// One connection.
    One(ConnId),
    /// Every joined connection except this one (a broadcast to the others).
    AllExcept(ConnId),
}

/// A message to send.
#[derive(Clone, Debug, PartialEq)]
pub struct Outbound {
    /// To whom.
    pub to: Recipient,
    /// What.
    pub message: ServerMessage,
}

/// What to do after [`Room::handle`](super::Room::handle).
///
/// Deliberately exhaustive (unlike the error and message enums): a caller that matched a
/// new variant with `_` would silently drop messages.
// Returned and matched at once, never stored or held across an await: boxing the
// pending write would only add an allocation per accepted change.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
#[must_use]
pub enum Step {
    /// Send these (possibly none).
    Reply(Vec<Outbound>),
    /// A new change was accepted: persist [`Pending::record`], then call
    /// [`Room::commit`](super::Room::commit) (or [`Room::abort`](super::Room::abort) if the write failed).
    Persist(Pending),
}

/// An accepted change waiting to be persisted. Its ack and broadcast are released by
/// [`Room::commit`](super::Room::commit); nothing is sent and the room state does not move before that.
#[derive(Debug)]
#[must_use = "persist the record, then commit or abort"]
pub struct Pending {
    pub(super) conn: ConnId,
    pub(super) record: StoredChange,
    pub(super) outputs: Vec<Outbound>,
}

impl Pending {
    /// The record to write durably.
    #[must_use]
    pub fn record(&self) -> &StoredChange {
        &self.record
    }
}
