//! The sync client's bookkeeping tables (`kalphite_sync_state`, `kalphite_sync_outbox`,
//! `kalphite_sync_known`): what crosses the API. The client decides what the values mean
//! (they are its own serialized records); the database only stores them, in the same
//! transaction as the entity rows they describe ([`crate::Database::write_with_sync`]).

use kalphite::{EntityId, Kind};

/// One write to the sync bookkeeping tables.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncWrite {
    /// Sets one value of the replica state.
    State {
        /// The name of the value.
        key: String,
        /// Its serialized value.
        value: String,
    },
    /// Puts (or replaces) an entity's offline-queue entry.
    Outbox {
        /// The entity's kind.
        kind: Kind,
        /// The entity's id.
        id: EntityId,
        /// Its place in the queue (ascending = oldest first); kept when replaced.
        position: u64,
        /// The serialized entry.
        entry: String,
    },
    /// Removes an entity's offline-queue entry (acknowledged or refused).
    OutboxRemoved {
        /// The entity's kind.
        kind: Kind,
        /// The entity's id.
        id: EntityId,
    },
    /// Puts what the server last said about an entity.
    Known {
        /// The entity's kind.
        kind: Kind,
        /// The entity's id.
        id: EntityId,
        /// The room version of that state.
        version: u64,
        /// The serialized record.
        entry: String,
    },
    /// Forgets what the server said about every entity (the room was replaced).
    KnownCleared,
    /// Forgets what the server said about one entity (a deletion the room no longer
    /// keeps either: its tombstone was collected).
    KnownRemoved {
        /// The entity's kind.
        kind: Kind,
        /// The entity's id.
        id: EntityId,
    },
}

impl SyncWrite {
    /// Bytes the quota counts for this write.
    pub(crate) fn size(&self) -> u64 {
        let n = match self {
            Self::State { key, value } => key.len() + value.len(),
            Self::Outbox {
                kind, id, entry, ..
            }
            | Self::Known {
                kind, id, entry, ..
            } => kind.len() + id.len() + entry.len(),
            Self::OutboxRemoved { .. } | Self::KnownCleared | Self::KnownRemoved { .. } => 0,
        };
        n as u64
    }
}

/// An offline-queue row as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRow {
    /// The entity's kind.
    pub kind: Kind,
    /// The entity's id.
    pub id: EntityId,
    /// Its place in the queue.
    pub position: u64,
    /// The serialized entry.
    pub entry: String,
}

/// A known-state row as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownRow {
    /// The entity's kind.
    pub kind: Kind,
    /// The entity's id.
    pub id: EntityId,
    /// The room version.
    pub version: u64,
    /// The serialized record.
    pub entry: String,
}

/// Everything in the sync bookkeeping tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncTables {
    /// The replica state's values, by key.
    pub state: Vec<(String, String)>,
    /// The offline queue, oldest first.
    pub outbox: Vec<OutboxRow>,
    /// What the server last said, per entity.
    pub known: Vec<KnownRow>,
}

impl SyncTables {
    /// The value of one state key.
    #[must_use]
    pub fn state_value(&self, key: &str) -> Option<&str> {
        self.state
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// True when nothing is stored.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.state.is_empty() && self.outbox.is_empty() && self.known.is_empty()
    }

    /// The writes that put every row back (a restore).
    pub(crate) fn into_writes(self) -> Vec<SyncWrite> {
        let state = self
            .state
            .into_iter()
            .map(|(key, value)| SyncWrite::State { key, value });
        let outbox = self.outbox.into_iter().map(|r| SyncWrite::Outbox {
            kind: r.kind,
            id: r.id,
            position: r.position,
            entry: r.entry,
        });
        let known = self.known.into_iter().map(|r| SyncWrite::Known {
            kind: r.kind,
            id: r.id,
            version: r.version,
            entry: r.entry,
        });
        state.chain(outbox).chain(known).collect()
    }
}
