//! [`Change`]: the one record of an accepted mutation that travels every layer —
//! to subscribers, into the flush engine's batches, into the database, and over the wire.

use serde::{Deserialize, Serialize};

use crate::entity::{AnyEntity, EntityId, Kind, Millis};

/// What a change did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// The entity was inserted or replaced.
    Upsert,
    /// The entity was removed.
    Delete,
}

/// Where a change came from, so that each layer can tell which changes it must forward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Made by this process's application code: goes to storage and to the server.
    #[default]
    Local,
    /// Received from a sync server: goes to storage, never echoed back to the server.
    Remote,
    /// Loaded from local storage at start-up (hydration): goes nowhere.
    Storage,
}

/// One accepted mutation of one entity.
///
/// This is also the flush engine's unit of work (`FlushChange` in the original spec); its
/// JSON form uses the spec's field names (`operation`, `entityId`, `entityType`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Change {
    /// Upsert or delete.
    #[serde(rename = "operation")]
    pub op: Op,
    /// The entity's kind.
    #[serde(rename = "entityType")]
    pub kind: Kind,
    /// The entity's id.
    #[serde(rename = "entityId")]
    pub id: EntityId,
    /// The entity as stored, for upserts; `None` for deletes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entity: Option<AnyEntity>,
    /// When the change was accepted, in ms since the epoch.
    pub timestamp: Millis,
    /// Who made it.
    pub origin: Origin,
}

/// The spec's name for a change as the flush engine sees it.
pub type FlushChange = Change;

impl Change {
    /// An upsert of `entity`.
    #[must_use]
    pub fn upsert(entity: AnyEntity, timestamp: Millis, origin: Origin) -> Self {
        Self {
            op: Op::Upsert,
            kind: entity.kind().clone(),
            id: entity.id().clone(),
            entity: Some(entity),
            timestamp,
            origin,
        }
    }

    /// A deletion of `(kind, id)`.
    #[must_use]
    pub fn delete(kind: Kind, id: EntityId, timestamp: Millis, origin: Origin) -> Self {
        Self {
            op: Op::Delete,
            kind,
            id,
            entity: None,
            timestamp,
            origin,
        }
    }
}
