//! What the server persists for each accepted change, and its wire form. Replaying the
//! records in version order rebuilds a room.

use kalphite::{Entity, EntityId, Kind, Op};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::EntityKey;
use crate::clock::VectorClock;
use crate::conflict::{Stamp, Version};
use crate::protocol::ChangePayload;

/// One accepted change as the server persists it: the entity's state after the change,
/// with the room version, clock and stamp. Replaying these in version order through
/// [`Room::restore`](super::Room::restore) rebuilds the room.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredChange {
    /// The room version assigned.
    pub version: u64,
    /// The entity's kind.
    pub kind: Kind,
    /// The entity's id.
    pub id: EntityId,
    /// The entity after the change; `None` is a tombstone.
    pub state: Option<Entity<Value>>,
    /// The entity's vector clock after the change.
    pub vector: VectorClock,
    /// The last-write-wins stamp of the state.
    pub stamp: Stamp,
    /// The client message that produced it (with `replica_id`, the deduplication key).
    pub message_id: String,
    /// The replica id of the connection that sent the change (its hello's `replicaId`).
    /// Empty in logs written before it was recorded.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub replica_id: String,
    /// The user id of the connection that sent the change. Not always the stamp's user:
    /// after a conflict the stamp is the last-write-wins winner's. Empty in older logs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub author: String,
}

impl StoredChange {
    /// The entity's key.
    #[must_use]
    pub fn key(&self) -> EntityKey {
        EntityKey::new(self.kind.clone(), self.id.clone())
    }

    /// The wire form, with `roomVersion`.
    #[must_use]
    pub fn to_payload(&self) -> ChangePayload {
        ChangePayload {
            operation: if self.state.is_some() {
                Op::Upsert
            } else {
                Op::Delete
            },
            entity_type: self.kind.clone(),
            entity_id: self.id.clone(),
            entity: self.state.clone(),
            vector: self.vector.clone(),
            base_version: None,
            room_version: Some(self.version),
        }
    }

    pub(super) fn version_of(&self) -> Version {
        Version::new(self.state.clone(), self.stamp.clone())
    }
}
