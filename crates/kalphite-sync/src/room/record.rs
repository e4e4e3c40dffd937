//! What the server persists for each accepted change, and its wire form. Replaying the
//! records in version order rebuilds a room.

use std::collections::BTreeMap;

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

/// A room's identity and what it has forgotten, persisted beside its changes (the server
/// keeps it as one record per room). Rebuilding a room needs it as well as the changes:
/// the epoch tells clients whether their versions mean anything here, and
/// `collected_through` which of them can no longer be caught up change by change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomMeta {
    /// Random, chosen when the room's history starts: when the room is created, when its
    /// history was lost (a room log with changes but no identity), and when it was
    /// restored from a backup. Clients holding another epoch resync fully.
    pub epoch: String,
    /// The current epoch comes from a restore that rolled the room back on purpose: a
    /// client of another epoch drops what the room lacks instead of sending it back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rolled_back: bool,
    /// The highest version of a tombstone collected so far (0: none). A client that has
    /// everything only up to an older version may have missed a delete that is no longer
    /// stored, so it gets a snapshot instead of an incremental catch-up.
    #[serde(default)]
    pub collected_through: u64,
    /// Per replica, the highest counter named only by collected tombstones: the clock
    /// rule (a clock may not claim edits the room never stored) must still count them
    /// after the room is rebuilt without those records.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub high: BTreeMap<String, u64>,
    /// Replica id → user, for the authors of collected tombstones: a replica id stays
    /// bound to its user after the records that bound it are gone.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub owners: BTreeMap<String, String>,
}

impl RoomMeta {
    /// A fresh identity with `epoch` (the caller draws it at random: the room is sans-IO).
    #[must_use]
    pub fn new(epoch: impl Into<String>) -> Self {
        Self {
            epoch: epoch.into(),
            rolled_back: false,
            collected_through: 0,
            high: BTreeMap::new(),
            owners: BTreeMap::new(),
        }
    }
}
