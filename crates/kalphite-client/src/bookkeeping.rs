//! The client's sync bookkeeping on disk: the replica's state deltas travel through the
//! local flush engine as annotations of the store transactions they belong to, and the
//! local target writes them to the database's sync tables in the same transaction as the
//! entity rows. Also reads them back at start-up (importing the old single-record format).

use std::sync::Arc;

use async_trait::async_trait;
use indexmap::IndexMap;
use kalphite::{Annotation, Batch, Change, FlushTarget, Origin, TargetError};
use kalphite_db::{Database, SyncTables, SyncWrite};
use kalphite_sync::{EntityKey, Known, OutboxEntry, Progress, ReplicaState, StateDelta};
use serde::{Deserialize, Serialize};

/// The kind under which older versions kept the whole replica state as one entity.
pub(crate) const LEGACY_REPLICA_KIND: &str = "_kalphite_sync_replica";

/// State keys.
pub(crate) const KEY_PROGRESS: &str = "progress";
pub(crate) const KEY_REPLICA_ID: &str = "replicaId";
pub(crate) const KEY_ROOM: &str = "room";
pub(crate) const KEY_FILE_ID: &str = "fileId";

/// One piece of bookkeeping, as an annotation of a flush transaction.
#[derive(Debug)]
enum Record {
    Outbox(EntityKey, Option<Arc<OutboxEntry>>),
    Known(EntityKey, Known),
    /// A known-state row forgotten (same row key as `Known`: the newest wins).
    KnownRemoved(EntityKey),
    Progress(Progress),
    State(&'static str, String),
}

/// The annotations that carry `delta` (keyed so that the newest per row wins).
pub(crate) fn annotations(delta: StateDelta) -> Vec<(Arc<str>, Annotation)> {
    let mut out: Vec<(Arc<str>, Annotation)> =
        Vec::with_capacity(delta.outbox.len() + delta.known.len() + 1);
    for (key, entry) in delta.outbox {
        out.push((row_key('o', &key), Arc::new(Record::Outbox(key, entry))));
    }
    for key in delta.forgotten {
        out.push((row_key('k', &key), Arc::new(Record::KnownRemoved(key))));
    }
    for (key, known) in delta.known {
        out.push((row_key('k', &key), Arc::new(Record::Known(key, known))));
    }
    if let Some(progress) = delta.progress {
        out.push((Arc::from("p"), Arc::new(Record::Progress(progress))));
    }
    out
}

/// An annotation that sets one replica-state value.
pub(crate) fn state_annotation(key: &'static str, value: String) -> (Arc<str>, Annotation) {
    (
        Arc::from(format!("s{key}")),
        Arc::new(Record::State(key, value)),
    )
}

/// A unique annotation key per bookkeeping row (length-prefixed: kinds and ids may hold
/// any character).
fn row_key(table: char, key: &EntityKey) -> Arc<str> {
    Arc::from(format!("{table}{}:{}{}", key.kind.len(), key.kind, key.id))
}

/// The local database as the client's flush target: entity rows and bookkeeping rows of
/// a batch in one transaction. Remote changes are stored too (the store has them).
pub(crate) struct LocalTarget(pub(crate) Database);

#[async_trait]
impl FlushTarget for LocalTarget {
    async fn write(&self, batch: &[Change]) -> Result<(), TargetError> {
        self.0
            .apply_changes(batch)
            .await
            .map_err(|e| -> TargetError { Box::new(e) })
    }

    async fn write_batch(&self, batch: &Batch<'_>) -> Result<(), TargetError> {
        let mut sync = Vec::with_capacity(batch.annotations.len());
        for (_, annotation) in batch.annotations {
            if let Some(record) = annotation.downcast_ref::<Record>() {
                sync.push(to_write(record)?);
            }
        }
        self.0
            .write_with_sync(batch.changes, sync)
            .await
            .map_err(|e| -> TargetError { Box::new(e) })
    }

    fn name(&self) -> &str {
        self.0.backend_name()
    }
}

fn to_write(record: &Record) -> Result<SyncWrite, serde_json::Error> {
    Ok(match record {
        Record::Outbox(key, Some(entry)) => SyncWrite::Outbox {
            kind: key.kind.clone(),
            id: key.id.clone(),
            position: entry.first_seq,
            entry: serde_json::to_string(entry)?,
        },
        Record::Outbox(key, None) => SyncWrite::OutboxRemoved {
            kind: key.kind.clone(),
            id: key.id.clone(),
        },
        Record::Known(key, known) => SyncWrite::Known {
            kind: key.kind.clone(),
            id: key.id.clone(),
            version: known.version,
            entry: serde_json::to_string(known)?,
        },
        Record::KnownRemoved(key) => SyncWrite::KnownRemoved {
            kind: key.kind.clone(),
            id: key.id.clone(),
        },
        Record::Progress(progress) => SyncWrite::State {
            key: KEY_PROGRESS.to_owned(),
            value: serde_json::to_string(progress)?,
        },
        Record::State(key, value) => SyncWrite::State {
            key: (*key).to_owned(),
            value: value.clone(),
        },
    })
}

/// What the sync tables say: the replica's state and identity, and the room they are for.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub(crate) state: ReplicaState,
    pub(crate) replica_id: Option<String>,
    pub(crate) room: Option<String>,
    /// The identity of the file the state was written in (see [`file_id`]).
    pub(crate) file_id: Option<String>,
}

/// Why the stored bookkeeping could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub(crate) struct CorruptRow {
    what: String,
    source: serde_json::Error,
}

/// Rebuilds the replica state from the sync tables.
pub(crate) fn load(tables: &SyncTables) -> Result<Loaded, CorruptRow> {
    let corrupt = |what: String| move |source| CorruptRow { what, source };
    let mut state = ReplicaState::default();
    if let Some(p) = tables.state_value(KEY_PROGRESS) {
        let p: Progress =
            serde_json::from_str(p).map_err(corrupt("the replica's progress".into()))?;
        state.next_seq = p.next_seq;
        state.watermark = p.watermark;
        state.received_above = p.received_above;
        // The room's epoch travels in the same record as the watermark it qualifies.
        state.epoch = p.epoch;
        // So does the mark of a resync not finished, which the next hello starts again.
        state.resyncing = p.resyncing;
    }
    let mut outbox = IndexMap::with_capacity(tables.outbox.len());
    for row in &tables.outbox {
        let entry: OutboxEntry = serde_json::from_str(&row.entry).map_err(corrupt(format!(
            "the queued change of {}/{}",
            row.kind, row.id
        )))?;
        outbox.insert(
            EntityKey::new(row.kind.clone(), row.id.clone()),
            Arc::new(entry),
        );
    }
    state.outbox = outbox;
    for row in &tables.known {
        let known: Known = serde_json::from_str(&row.entry).map_err(corrupt(format!(
            "the known state of {}/{}",
            row.kind, row.id
        )))?;
        state
            .known
            .insert(EntityKey::new(row.kind.clone(), row.id.clone()), known);
    }
    Ok(Loaded {
        state,
        replica_id: tables.state_value(KEY_REPLICA_ID).map(str::to_owned),
        room: tables.state_value(KEY_ROOM).map(str::to_owned),
        file_id: tables.state_value(KEY_FILE_ID).map(str::to_owned),
    })
}

/// Where the database's rows live ([`Database::storage_identity`]): a copied database, or
/// one restored from elsewhere, has another, so two installations never share a replica id.
/// `None` when it cannot be told, or read (a copy then goes unnoticed, as before).
pub(crate) async fn file_id(db: &Database) -> Option<String> {
    match db.storage_identity().await {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the database's identity");
            None
        }
    }
}

/// The single-record format of older versions: `{"replicaId": …, "state": ReplicaState}`
/// stored as an entity of kind [`LEGACY_REPLICA_KIND`] with id = the room.
#[derive(Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct Legacy {
    replica_id: Option<String>,
    #[serde(default)]
    state: ReplicaState,
}

/// Moves an older version's replica record of `room` into the sync tables, in one
/// transaction that also deletes the old record. Returns `false` when there is none.
///
/// # Errors
/// Database errors; a record that cannot be read is reported, not dropped.
pub(crate) async fn import_legacy(db: &Database, room: &str) -> Result<bool, crate::SyncError> {
    let Some(record) = db.get_by_id(LEGACY_REPLICA_KIND, room).await? else {
        return Ok(false);
    };
    let legacy: Legacy =
        serde_json::from_value(record.data).map_err(|e| crate::SyncError::CorruptState {
            room: room.to_owned(),
            reason: format!("the replica record of an older version: {e}"),
        })?;
    let mut records = Vec::new();
    for (key, entry) in legacy.state.outbox {
        records.push(Record::Outbox(key, Some(entry)));
    }
    for (key, known) in legacy.state.known {
        records.push(Record::Known(key, known));
    }
    records.push(Record::Progress(Progress {
        next_seq: legacy.state.next_seq,
        watermark: legacy.state.watermark,
        received_above: legacy.state.received_above,
        epoch: legacy.state.epoch,
        resyncing: legacy.state.resyncing,
    }));
    if let Some(id) = legacy.replica_id {
        records.push(Record::State(KEY_REPLICA_ID, id));
    }
    records.push(Record::State(KEY_ROOM, room.to_owned()));
    let writes = records
        .iter()
        .map(to_write)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| crate::SyncError::CorruptState {
            room: room.to_owned(),
            reason: format!("the replica record of an older version: {e}"),
        })?;
    let delete = Change::delete(
        LEGACY_REPLICA_KIND.into(),
        room.into(),
        kalphite::now_millis(),
        Origin::Local,
    );
    db.write_with_sync(&[delete], writes).await?;
    tracing::info!(
        room,
        "moved an older version's sync state into the sync tables"
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resync cut short must be started again after a restart (`docs/sync.md` §6): the
    /// mark travels in the progress row with the watermark it qualifies.
    #[test]
    fn the_progress_row_keeps_a_resync_under_way() {
        for resyncing in [true, false] {
            let progress = Progress {
                next_seq: 7,
                watermark: 165,
                epoch: Some("e1".into()),
                resyncing,
                ..Progress::default()
            };
            let SyncWrite::State { key, value } =
                to_write(&Record::Progress(progress)).expect("serializes")
            else {
                panic!("the progress is a state row");
            };
            let tables = SyncTables {
                state: vec![(key, value)],
                ..SyncTables::default()
            };
            let state = load(&tables).expect("loads").state;
            assert_eq!(
                (state.watermark, state.epoch.as_deref(), state.resyncing),
                (165, Some("e1"), resyncing)
            );
        }
    }
}
