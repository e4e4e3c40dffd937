//! The durable room log: every accepted change is written through kalphite-db (SQLite or
//! PostgreSQL) before it is acknowledged. One writer task group-commits the pending
//! records of all rooms (each room has at most one write in flight) in one transaction.
//!
//! Layout in the database: one entity per (room, entity), kind `_kalphite_room:<room>`, id
//! the JSON pair `[kind, id]`, data the [`StoredChange`]; the room is rebuilt from them
//! (in version order) the first time it is opened after a start.

use kalphite::{Entity, now_millis};
use kalphite_db::Database;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use crate::room::StoredChange;

/// The kind prefix of room-log entities.
pub const ROOM_KIND_PREFIX: &str = "_kalphite_room:";

/// Most records in one group commit.
const MAX_GROUP: usize = 1024;

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

struct WriteReq {
    entity: Entity,
    done: oneshot::Sender<Result<(), LogError>>,
}

/// Handle to the room log.
#[derive(Clone)]
pub(crate) struct RoomLog {
    db: Database,
    tx: mpsc::UnboundedSender<WriteReq>,
}

impl RoomLog {
    /// Starts the writer task (tracked, so shutdown waits for the last commit).
    pub(crate) fn spawn(db: Database, tracker: &TaskTracker) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<WriteReq>();
        let writer_db = db.clone();
        tracker.spawn(async move {
            let mut batch: Vec<WriteReq> = Vec::new();
            while let Some(first) = rx.recv().await {
                batch.push(first);
                while batch.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(req) => batch.push(req),
                        Err(_) => break,
                    }
                }
                let entities = batch.iter().map(|r| r.entity.clone()).collect();
                let result = writer_db
                    .upsert_batch(entities)
                    .await
                    .map(drop)
                    .map_err(|e| LogError::Write(e.to_string()));
                for req in batch.drain(..) {
                    let _ = req.done.send(result.clone());
                }
            }
        });
        Self { db, tx }
    }

    /// Writes one record durably.
    pub(crate) async fn append(&self, room: &str, record: &StoredChange) -> Result<(), LogError> {
        let data = serde_json::to_value(record).map_err(|e| LogError::Write(e.to_string()))?;
        let id = serde_json::to_string(&(record.kind.as_ref(), record.id.as_ref()))
            .map_err(|e| LogError::Write(e.to_string()))?;
        let entity = Entity::new(id, format!("{ROOM_KIND_PREFIX}{room}"), data).at(now_millis());
        let (done, rx) = oneshot::channel();
        self.tx
            .send(WriteReq { entity, done })
            .map_err(|_| LogError::Closed)?;
        rx.await.unwrap_or(Err(LogError::Closed))
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
