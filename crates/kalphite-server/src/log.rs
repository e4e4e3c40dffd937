//! The durable room log: every accepted change is written through kalphite-db (SQLite or
//! PostgreSQL) before it is acknowledged. Rooms commit changes in memory and queue them
//! here with the frames they produce; one writer task group-commits everything queued (all
//! rooms, several changes per room) in one transaction, then delivers the frames in order.
//! A failed write resets the rooms involved: they are reloaded from the log and their
//! members reconnect, so nothing that is not durable is ever acknowledged or kept.
//!
//! Layout in the database: one entity per (room, entity), kind `_kalphite_room:<room>`, id
//! the JSON pair `[kind, id]`, data the [`StoredChange`]; the room is rebuilt from them
//! (in version order) the first time it is opened after a start.

use std::sync::Arc;

use kalphite::{Entity, now_millis};
use kalphite_db::Database;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use super::metrics::Metrics;
use super::{Frame, RoomHandle};
use kalphite_sync::StoredChange;

/// The kind prefix of room-log entities.
pub const ROOM_KIND_PREFIX: &str = "_kalphite_room:";

/// Most jobs in one group commit.
const MAX_GROUP: usize = 1024;

/// Most jobs waiting for the writer; submitters wait beyond it (backpressure).
const QUEUE: usize = 8192;

/// A room-log read or write failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The database refused or failed the write.
    #[error("room log write failed: {0}")]
    Write(String),
    /// The database could not be read.
    #[error("room log read failed: {0}")]
    Read(String),
    /// A stored record is not a change record.
    #[error("room log record {id} of room '{room}' is corrupt: {reason}")]
    Corrupt {
        /// The room.
        room: String,
        /// The entity id of the record.
        id: String,
        /// Why.
        reason: String,
    },
    /// The writer has stopped (the server is shutting down).
    #[error("the room log is closed")]
    Closed,
}

/// Work for the writer: an optional record to make durable, then frames to deliver.
/// Jobs run in submission order, so a room's frames (acks, broadcasts, catch-ups,
/// duplicate acks) never overtake a write they depend on.
pub(crate) struct Job {
    pub(crate) room: Arc<RoomHandle>,
    pub(crate) record: Option<Entity>,
    pub(crate) frames: Vec<Frame>,
}

/// Handle to the room log.
#[derive(Clone)]
pub(crate) struct RoomLog {
    db: Database,
    tx: mpsc::Sender<Job>,
}

/// The database entity for one record of `room`.
pub(crate) fn record_entity(room: &str, record: &StoredChange) -> Result<Entity, LogError> {
    let data = serde_json::to_value(record).map_err(|e| LogError::Write(e.to_string()))?;
    let id = serde_json::to_string(&(record.kind.as_str(), record.id.as_str()))
        .map_err(|e| LogError::Write(e.to_string()))?;
    Ok(Entity::new(id, format!("{ROOM_KIND_PREFIX}{room}"), data).at(now_millis()))
}

impl RoomLog {
    /// Starts the writer task (tracked, so shutdown waits for the last commit).
    pub(crate) fn spawn(db: Database, tracker: &TaskTracker, metrics: Arc<Metrics>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        let writer_db = db.clone();
        tracker.spawn(async move {
            let mut batch: Vec<Job> = Vec::new();
            while let Some(first) = rx.recv().await {
                batch.push(first);
                while batch.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                // Jobs of a room reset by an earlier failure were built on lost state.
                batch.retain(|job| !job.room.is_poisoned());
                // Take the records out (no deep copy); `had_record` remembers whose they were.
                let had_record: Vec<bool> = batch.iter().map(|job| job.record.is_some()).collect();
                let entities: Vec<Entity> =
                    batch.iter_mut().filter_map(|job| job.record.take()).collect();
                let written = entities.len() as u64;
                let result = if entities.is_empty() {
                    Ok(())
                } else {
                    writer_db.upsert_batch(entities).await.map(drop)
                };
                match result {
                    Ok(()) => {
                        Metrics::add(&metrics.changes_persisted, written);
                        for job in batch.drain(..) {
                            job.room.deliver(job.frames, &metrics);
                        }
                    }
                    Err(e) => {
                        Metrics::inc(&metrics.storage_errors);
                        tracing::error!(error = %e, "room log write failed; resetting the rooms involved");
                        for (job, had_record) in batch.drain(..).zip(had_record) {
                            if had_record {
                                job.room.poison();
                            } else if !job.room.is_poisoned() {
                                job.room.deliver(job.frames, &metrics);
                            }
                        }
                    }
                }
            }
        });
        Self { db, tx }
    }

    /// Queues a job behind every earlier one (waits when the queue is full).
    pub(crate) async fn submit(&self, job: Job) -> Result<(), LogError> {
        self.tx.send(job).await.map_err(|_| LogError::Closed)
    }

    /// Every record of `room`, in version order.
    pub(crate) async fn load(&self, room: &str) -> Result<Vec<StoredChange>, LogError> {
        let rows = self
            .db
            .get_by_type(&format!("{ROOM_KIND_PREFIX}{room}"))
            .await
            .map_err(|e| LogError::Read(e.to_string()))?;
        let mut records = rows
            .into_iter()
            .map(|e| {
                serde_json::from_value::<StoredChange>(e.data).map_err(|err| LogError::Corrupt {
                    room: room.to_owned(),
                    id: e.id.to_string(),
                    reason: err.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        records.sort_by_key(|r| r.version);
        Ok(records)
    }
}
