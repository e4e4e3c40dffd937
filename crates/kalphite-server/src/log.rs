//! The durable room log: every accepted change is written through kalphite-db (SQLite or
//! PostgreSQL) before it is acknowledged. Rooms commit changes in memory and queue them
//! here with the frames they produce; one writer task group-commits everything queued (all
//! rooms, several changes per room) in one transaction, then delivers the frames in order.
//! A refused group commit is split: each room's records are written on their own (and a
//! room that still fails, one record at a time), so a record the database refuses resets
//! only its own room. A reset room is reloaded from the log and its members reconnect, so
//! nothing that is not durable is ever acknowledged or kept.
//!
//! Layout in the database: one entity per (room, entity), kind `_kalphite_room:<room>`, id
//! the JSON pair `[kind, id]`, data the [`StoredChange`]; the room is rebuilt from them
//! (in version order) the first time it is opened after a start. Beside them, one entity
//! per room of kind [`ROOM_META_KIND`], id the room, data the room's [`RoomMeta`] (its
//! epoch and tombstone collection horizon). A room with changes but no meta lost its
//! history, or was restored by an older version: it gets a new epoch when it is loaded.

use std::collections::HashMap;
use std::sync::Arc;

use kalphite::{AnyEntity, Change, Entity, Origin, now_millis};
use kalphite_db::{Database, Fence, check_storable};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use super::metrics::Metrics;
use super::{Frame, RoomHandle, RoomLease};
use kalphite_sync::{Room, RoomMeta, StoredChange};

/// The kind prefix of room-log entities.
pub const ROOM_KIND_PREFIX: &str = "_kalphite_room:";

/// The kind of the rooms' identity records (id = the room): see [`RoomMeta`].
pub const ROOM_META_KIND: &str = "_kalphite_room_meta";

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
    /// The record holds something no database backend can store (a NUL character).
    #[error("room log record refused: {0}")]
    Unstorable(String),
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
    /// The room version the record commits (0 without one): a cluster node's commit
    /// fences the room's lease row from the version before its first record to its last.
    pub(crate) version: u64,
    pub(crate) frames: Vec<Frame>,
}

/// What the writer does, in submission order.
enum Work {
    /// Records to write and frames to deliver (grouped with the jobs around it).
    Job(Job),
    /// Tombstones a room let go of: its identity record (with the moved horizon) and the
    /// deletes of their records, in one transaction, after every job submitted before
    /// (so never after a later record of the same entity, which would share its row).
    Collect {
        room: Arc<RoomHandle>,
        changes: Vec<Change>,
    },
}

/// Handle to the room log.
#[derive(Clone)]
pub(crate) struct RoomLog {
    db: Database,
    tx: mpsc::Sender<Work>,
}

/// The database entity for one record of `room`. A record no backend can store (a NUL
/// character anywhere in it) is refused here, before it reaches a group commit.
pub(crate) fn record_entity(room: &str, record: &StoredChange) -> Result<Entity, LogError> {
    let data = serde_json::to_value(record).map_err(|e| LogError::Write(e.to_string()))?;
    let id = serde_json::to_string(&(record.kind.as_str(), record.id.as_str()))
        .map_err(|e| LogError::Write(e.to_string()))?;
    let kind = format!("{ROOM_KIND_PREFIX}{room}");
    check_storable(&kind, &id, &data).map_err(|e| LogError::Unstorable(e.to_string()))?;
    Ok(Entity::new(id, kind, data).at(now_millis()))
}

/// The writer task: group commits, and what a failed one does.
struct Writer {
    db: Database,
    metrics: Arc<Metrics>,
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Work>) {
        let mut batch: Vec<Job> = Vec::new();
        let mut next: Option<Work> = None;
        loop {
            let first = match next.take() {
                Some(work) => work,
                None => match rx.recv().await {
                    Some(work) => work,
                    None => break,
                },
            };
            match first {
                Work::Job(job) => batch.push(job),
                Work::Collect { room, changes } => {
                    self.collect(&room, &changes).await;
                    continue;
                }
            }
            while batch.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(Work::Job(job)) => batch.push(job),
                    // Ends the group: it runs after the jobs before it.
                    Ok(collect) => {
                        next = Some(collect);
                        break;
                    }
                    Err(_) => break,
                }
            }
            // Jobs of a room reset by an earlier failure were built on lost state.
            batch.retain(|job| !job.room.is_poisoned());
            self.commit(&mut batch).await;
        }
    }

    /// Deletes collected tombstones with the room's new horizon. A failure leaves both as
    /// they were (the tombstones and the old horizon agree); the room collects them again
    /// when it is next loaded. On a cluster node the deletes are fenced like a commit: a
    /// node that lost the room never deletes what the new owner wrote.
    async fn collect(&self, room: &RoomHandle, changes: &[Change]) {
        if room.is_poisoned() {
            return;
        }
        let result = match room.lease() {
            Some(lease) => {
                // The row's version stays: collecting commits no version.
                let fence = Fence {
                    room: room.id.clone(),
                    term: lease.term,
                    from_version: lease.row_version,
                    to_version: lease.row_version.unwrap_or(0),
                };
                self.db.apply_changes_fenced(changes, &[fence]).await
            }
            None => self.db.apply_changes(changes).await,
        };
        if let Err(e) = result {
            if e.is_fenced() {
                Metrics::inc(&self.metrics.cluster.fencing_rejections);
                room.moved();
                return;
            }
            Metrics::inc(&self.metrics.storage_errors);
            tracing::warn!(room = %room.id, error = %e,
                "collected tombstones could not be deleted from the room log; they will be \
                 collected again when the room is next loaded");
        }
    }

    /// Writes the records of `jobs` in one transaction (borrowed: they stay in the jobs
    /// for a retry). On a cluster node the transaction also moves each room's lease row
    /// from the version this node last wrote to the last of its records here, at the
    /// lease's term: if another node took a room since, nothing is written
    /// ([`kalphite_db::Error::Fenced`]).
    async fn write(&self, jobs: &[Job]) -> Result<(), kalphite_db::Error> {
        let records: Vec<&Entity> = jobs.iter().filter_map(|job| job.record.as_ref()).collect();
        let leased = fences(jobs);
        if records.is_empty() && leased.is_empty() {
            return Ok(());
        }
        let n = records.len() as u64;
        let written = if leased.is_empty() {
            self.db.upsert_batch_borrowed(records).await
        } else {
            let fences: Vec<Fence> = leased.iter().map(|(_, fence)| fence.clone()).collect();
            self.db.upsert_batch_fenced(records, &fences).await
        };
        match written {
            Ok(()) => {
                for (room, fence) in leased {
                    room.set_lease(Some(RoomLease {
                        term: fence.term,
                        row_version: Some(fence.to_version),
                    }));
                }
                Metrics::add(&self.metrics.changes_persisted, n);
                Ok(())
            }
            Err(e) => {
                if e.is_fenced() {
                    Metrics::inc(&self.metrics.cluster.fencing_rejections);
                } else {
                    Metrics::inc(&self.metrics.storage_errors);
                }
                Err(e)
            }
        }
    }

    /// The rooms of `batch` that lost their lease to another node ([`kalphite_db::Error::Fenced`]
    /// names one at a time): each is closed for good here (its clients reconnect to the new
    /// owner; nothing of it is acknowledged), and the rest of the batch is committed again.
    async fn commit_fenced(&self, batch: &mut Vec<Job>, mut error: kalphite_db::Error) {
        loop {
            let room = match &error {
                kalphite_db::Error::Fenced { room } => room.clone(),
                _ => String::new(),
            };
            tracing::warn!(room = %room,
                "a commit was fenced out: another node owns the room now; closing it here");
            let mut found = false;
            for job in batch.iter() {
                if job.room.id == room {
                    job.room.moved();
                    found = true;
                }
            }
            if !found {
                // Not one of ours by name: every leased room of the batch is suspect.
                for job in batch.iter() {
                    if job.room.lease().is_some() {
                        job.room.moved();
                    }
                }
            }
            batch.retain(|job| !job.room.is_poisoned());
            match self.write(batch).await {
                Ok(()) => {
                    for job in batch.drain(..) {
                        job.room.deliver(job.frames, &self.metrics);
                    }
                    return;
                }
                Err(e) if e.is_fenced() => error = e,
                Err(e) => {
                    // Not a fence: the usual failed-write path for what is left.
                    Box::pin(self.commit_failed(batch, e)).await;
                    return;
                }
            }
        }
    }

    /// Group-commits `batch` and delivers its frames. When the group fails for a reason
    /// about its data (a record the database refuses), each room's records are written on
    /// their own, and in a room that still fails one by one: only the room holding the
    /// record that cannot be written is reset; the others are acknowledged. When the
    /// database is unavailable, every room with a record in the batch is reset.
    async fn commit(&self, batch: &mut Vec<Job>) {
        let Err(e) = self.write(batch).await else {
            for job in batch.drain(..) {
                job.room.deliver(job.frames, &self.metrics);
            }
            return;
        };
        if e.is_fenced() {
            self.commit_fenced(batch, e).await;
            return;
        }
        self.commit_failed(batch, e).await;
    }

    /// [`Writer::commit`] after the group's write failed for a reason other than a fence.
    async fn commit_failed(&self, batch: &mut Vec<Job>, e: kalphite_db::Error) {
        if e.is_unavailable() {
            tracing::error!(error = %e, "room log write failed; resetting the rooms involved");
            reset_all(batch.drain(..), &self.metrics);
            return;
        }
        let rooms = by_room(batch.drain(..));
        let with_records = rooms
            .iter()
            .filter(|jobs| jobs.iter().any(|job| job.record.is_some()))
            .count();
        tracing::warn!(error = %e, rooms = with_records,
            "a group commit of the room log was refused; writing each room on its own");
        let mut rooms = rooms.into_iter();
        while let Some(jobs) = rooms.next() {
            // With one room of records, the group's failure is that room's.
            let known = (with_records == 1).then(|| e.to_string());
            if let Err(e) = self.commit_room(jobs, known).await {
                tracing::error!(error = %e, "room log write failed; resetting the rooms involved");
                reset_all(rooms.flatten(), &self.metrics);
                return;
            }
        }
    }

    /// Writes one room's jobs together, then, if refused, one record at a time up to the
    /// one that fails; that one resets the room (its in-memory state is ahead of the log)
    /// and the room's later jobs are dropped. `known` is the room's write failure when the
    /// group's already was. Returns the error when the database became unavailable.
    async fn commit_room(
        &self,
        jobs: Vec<Job>,
        known: Option<String>,
    ) -> Result<(), kalphite_db::Error> {
        let records = jobs.iter().filter(|job| job.record.is_some()).count();
        // (A leased room's jobs are written even without records: their fence is checked.)
        if records == 0 && jobs.iter().all(|job| job.room.lease().is_none()) {
            for job in jobs {
                job.room.deliver(job.frames, &self.metrics);
            }
            return Ok(());
        }
        let refused = match known {
            Some(reason) => reason,
            None => match self.write(&jobs).await {
                Ok(()) => {
                    for job in jobs {
                        job.room.deliver(job.frames, &self.metrics);
                    }
                    return Ok(());
                }
                Err(e) if e.is_unavailable() => {
                    reset_all(jobs.into_iter(), &self.metrics);
                    return Err(e);
                }
                Err(e) if e.is_fenced() => {
                    for job in &jobs {
                        job.room.moved();
                    }
                    return Ok(());
                }
                Err(e) => e.to_string(),
            },
        };
        if records == 1 {
            reset_room(jobs, &refused, &self.metrics);
            return Ok(());
        }
        let mut jobs = jobs.into_iter();
        while let Some(job) = jobs.next() {
            match self.write(std::slice::from_ref(&job)).await {
                Ok(()) => job.room.deliver(job.frames, &self.metrics),
                Err(e) if e.is_fenced() => {
                    job.room.moved();
                    return Ok(());
                }
                Err(e) => {
                    let unavailable = e.is_unavailable();
                    reset_room(
                        std::iter::once(job).chain(jobs),
                        &e.to_string(),
                        &self.metrics,
                    );
                    return if unavailable { Err(e) } else { Ok(()) };
                }
            }
        }
        Ok(())
    }
}

/// The fence of each leased room among `jobs` (cluster mode): from the version its lease
/// row had after this node's last commit to its last record here (or to the same version,
/// a term check, when it has no record here).
fn fences(jobs: &[Job]) -> Vec<(&RoomHandle, Fence)> {
    let mut fences: Vec<(&RoomHandle, Fence)> = Vec::new();
    for job in jobs {
        let Some(lease) = job.room.lease() else {
            continue;
        };
        // A job without a record (a welcome and its catch-up, a duplicate ack, a reply)
        // commits no version but shows the room's state: it is delivered only if the node
        // still holds the room, checked by a fence that moves nothing.
        let to = if job.record.is_some() {
            i64::try_from(job.version).unwrap_or(i64::MAX)
        } else {
            lease.row_version.unwrap_or(0)
        };
        match fences
            .iter_mut()
            .find(|(room, _)| std::ptr::eq(*room, Arc::as_ptr(&job.room)))
        {
            Some((_, fence)) => fence.to_version = fence.to_version.max(to),
            None => fences.push((
                &job.room,
                Fence {
                    room: job.room.id.clone(),
                    term: lease.term,
                    from_version: lease.row_version,
                    to_version: to,
                },
            )),
        }
    }
    fences
}

/// Splits `jobs` by room, keeping each room's jobs in order.
fn by_room(jobs: impl Iterator<Item = Job>) -> Vec<Vec<Job>> {
    let mut index: HashMap<*const RoomHandle, usize> = HashMap::new();
    let mut rooms: Vec<Vec<Job>> = Vec::new();
    for job in jobs {
        let i = *index.entry(Arc::as_ptr(&job.room)).or_insert_with(|| {
            rooms.push(Vec::new());
            rooms.len() - 1
        });
        rooms[i].push(job);
    }
    rooms
}

/// Resets the room of `jobs` (all of one room) after `reason`: jobs before its first
/// record are still delivered (they depend on nothing unwritten).
fn reset_room(jobs: impl IntoIterator<Item = Job>, reason: &str, metrics: &Metrics) {
    for job in jobs {
        if job.record.is_some() {
            if !job.room.is_poisoned() {
                tracing::error!(room = %job.room.id, error = reason,
                    "a room log record could not be written; resetting its room");
            }
            job.room.poison();
        } else if !job.room.is_poisoned() {
            job.room.deliver(job.frames, metrics);
        }
    }
}

/// Resets every room with a record among `jobs`; jobs without one, of rooms not reset
/// (yet), are delivered in order.
fn reset_all(jobs: impl Iterator<Item = Job>, metrics: &Metrics) {
    for job in jobs {
        if job.record.is_some() {
            job.room.poison();
        } else if !job.room.is_poisoned() {
            job.room.deliver(job.frames, metrics);
        }
    }
}

impl RoomLog {
    /// Starts the writer task (tracked, so shutdown waits for the last commit).
    pub(crate) fn spawn(db: Database, tracker: &TaskTracker, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel::<Work>(QUEUE);
        let writer = Writer {
            db: db.clone(),
            metrics,
        };
        tracker.spawn(writer.run(rx));
        Self { db, tx }
    }

    /// Queues a job behind every earlier one (waits when the queue is full).
    pub(crate) async fn submit(&self, job: Job) -> Result<(), LogError> {
        self.tx
            .send(Work::Job(job))
            .await
            .map_err(|_| LogError::Closed)
    }

    /// [`RoomLog::submit`], then, now and then ([`Room::collect_due`]), the collection of
    /// `room`'s tombstones past its horizon, queued right behind the job. Call it under
    /// the room's lock (as every submit of a room), so nothing of the room comes between.
    pub(crate) async fn submit_then_collect(
        &self,
        job: Job,
        room: &mut Room,
        now: kalphite::Millis,
    ) -> Result<(), LogError> {
        let handle = Arc::clone(&job.room);
        self.submit(job).await?;
        let collected = room.collect_due(now);
        let Some(meta) = room.meta().filter(|_| !collected.is_empty()) else {
            return Ok(());
        };
        match collect_changes(&handle.id, meta, &collected) {
            Ok(changes) => self
                .tx
                .send(Work::Collect {
                    room: handle,
                    changes,
                })
                .await
                .map_err(|_| LogError::Closed),
            Err(e) => {
                // The records stay in the log (with the old horizon, which agrees).
                tracing::warn!(room = %handle.id, error = %e, "tombstones not collected in the log");
                Ok(())
            }
        }
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

/// The database entity holding `room`'s identity.
pub(crate) fn meta_entity(room: &str, meta: &RoomMeta) -> Result<Entity, LogError> {
    let data = serde_json::to_value(meta).map_err(|e| LogError::Write(e.to_string()))?;
    check_storable(ROOM_META_KIND, room, &data).map_err(|e| LogError::Unstorable(e.to_string()))?;
    Ok(Entity::new(room, ROOM_META_KIND, data).at(now_millis()))
}

/// The writes that store `room`'s identity and delete the records of `collected`.
fn collect_changes(
    room: &str,
    meta: &RoomMeta,
    collected: &[StoredChange],
) -> Result<Vec<Change>, LogError> {
    let entity = meta_entity(room, meta)?;
    let now = now_millis();
    let kind = format!("{ROOM_KIND_PREFIX}{room}");
    let mut changes = Vec::with_capacity(collected.len() + 1);
    changes.push(Change::upsert(
        AnyEntity::new(Arc::new(entity)),
        now,
        Origin::Local,
    ));
    for record in collected {
        let id = serde_json::to_string(&(record.kind.as_str(), record.id.as_str()))
            .map_err(|e| LogError::Write(e.to_string()))?;
        changes.push(Change::delete(
            kind.as_str().into(),
            id.into(),
            now,
            Origin::Local,
        ));
    }
    Ok(changes)
}

/// A fresh random epoch: 128 bits, hex. Drawn from the standard library's randomly keyed
/// hasher (keys from the OS per process, stepped per use) over the time, the process and a
/// counter: epochs need to be unique, not secret.
pub(crate) fn new_epoch() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut halves = [0u64; 2];
    for (i, half) in halves.iter_mut().enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(nanos);
        h.write_u64(count);
        h.write_u32(std::process::id());
        h.write_usize(i);
        *half = h.finish();
    }
    format!("{:016x}{:016x}", halves[0], halves[1])
}

/// Gives every room in a server database's backup records a new epoch (`kalphite restore`
/// runs it through `Database::restore_adjusted`): its clients no longer take the restored
/// room for the history they synced with, and resync. With `rolled_back`, the rooms are
/// marked as rolled back on purpose: clients drop what a room lacks instead of sending it
/// back. Each room keeps its collection horizon. The restore and the new identities are
/// one transaction, so an interrupted restore never leaves the backup's epochs in place.
/// Returns how many rooms there are.
///
/// # Errors
/// [`LogError::Corrupt`] for an unreadable identity record, [`LogError::Write`] or
/// [`LogError::Unstorable`] when a new identity record cannot be made.
pub fn renew_room_epochs_in(
    records: &mut Vec<kalphite_db::backup::Record>,
    rolled_back: bool,
) -> Result<usize, LogError> {
    let mut metas: std::collections::BTreeMap<String, RoomMeta> = std::collections::BTreeMap::new();
    let mut rooms = std::collections::BTreeSet::new();
    let mut kept = Vec::with_capacity(records.len());
    for record in records.drain(..) {
        if record.kind.as_str() == ROOM_META_KIND {
            let meta: RoomMeta =
                serde_json::from_value(record.data).map_err(|e| LogError::Corrupt {
                    room: record.id.to_string(),
                    id: format!("{ROOM_META_KIND}/{}", record.id),
                    reason: e.to_string(),
                })?;
            metas.insert(record.id.to_string(), meta);
            continue;
        }
        if let Some(room) = record.kind.as_str().strip_prefix(ROOM_KIND_PREFIX) {
            rooms.insert(room.to_owned());
        }
        kept.push(record);
    }
    for room in rooms {
        metas
            .entry(room)
            .or_insert_with(|| RoomMeta::new(String::new()));
    }
    let n = metas.len();
    for (room, mut meta) in metas {
        meta.epoch = new_epoch();
        meta.rolled_back = rolled_back;
        let entity = meta_entity(&room, &meta)?;
        kept.push(kalphite_db::backup::Record {
            kind: entity.kind,
            id: entity.id,
            data: entity.data,
            updated_at: entity.updated_at,
            version: 1,
        });
    }
    *records = kept;
    Ok(n)
}

impl RoomLog {
    /// The identity of `room`, if it has one.
    pub(crate) async fn load_meta(&self, room: &str) -> Result<Option<RoomMeta>, LogError> {
        let Some(entity) = self
            .db
            .get_by_id(ROOM_META_KIND, room)
            .await
            .map_err(|e| LogError::Read(e.to_string()))?
        else {
            return Ok(None);
        };
        serde_json::from_value(entity.data)
            .map(Some)
            .map_err(|e| LogError::Corrupt {
                room: room.to_owned(),
                id: format!("{ROOM_META_KIND}/{room}"),
                reason: e.to_string(),
            })
    }

    /// Writes `room`'s identity and deletes the records of `collected` (tombstones the
    /// room let go of), in one transaction: the horizon in the meta never lags the
    /// deletes, so no client is ever caught up incrementally past a delete that is gone.
    /// Called while the room is being loaded, before anything of it is queued for the
    /// writer, so nothing of the room is written in between.
    pub(crate) async fn save_meta(
        &self,
        room: &str,
        meta: &RoomMeta,
        collected: &[StoredChange],
        lease: Option<RoomLease>,
    ) -> Result<(), LogError> {
        let changes = collect_changes(room, meta, collected)?;
        let saved = match lease.and_then(|l| Some((l.term, l.row_version?))) {
            Some((term, version)) => {
                let fence = Fence {
                    room: room.to_owned(),
                    term,
                    from_version: Some(version),
                    to_version: version,
                };
                self.db.apply_changes_fenced(&changes, &[fence]).await
            }
            None => self.db.apply_changes(&changes).await,
        };
        saved.map_err(|e| LogError::Write(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    //! Regression (issue 10, item 3): the writer wrote every queued room's records in one
    //! transaction and reset every room in a failed batch, so one record the database
    //! refused (a NUL character on PostgreSQL) cut the members of other rooms off. Here the
    //! database refuses a record too large for its quota.

    use kalphite_db::DatabaseConfig;
    use serde_json::json;

    use super::*;

    fn job(room: &Arc<RoomHandle>, id: &str, data: serde_json::Value) -> Job {
        Job {
            room: Arc::clone(room),
            record: Some(Entity::new(id, format!("{ROOM_KIND_PREFIX}{}", room.id), data).at(1)),
            version: 0,
            frames: Vec::new(),
        }
    }

    /// Runs `jobs` through the writer as one group commit; returns the database.
    async fn group_commit(jobs: Vec<Job>) -> Database {
        let db = Database::open(DatabaseConfig::new("sqlite::memory:").max_storage_mb(1))
            .await
            .expect("open");
        let tracker = TaskTracker::new();
        let log = RoomLog::spawn(db.clone(), &tracker, Arc::new(Metrics::default()));
        // The writer task has not run yet (current-thread runtime, no await point that
        // yields): it finds every job queued and takes them as one group.
        for job in jobs {
            log.tx
                .try_send(Work::Job(job))
                .map_err(drop)
                .expect("queue");
        }
        drop(log);
        tracker.close();
        tracker.wait().await;
        db
    }

    /// A record the 1 MiB quota refuses.
    fn too_large() -> serde_json::Value {
        json!({"blob": "x".repeat(2 << 20)})
    }

    async fn stored(db: &Database, room: &str) -> Vec<String> {
        let mut ids: Vec<String> = db
            .get_by_type(&format!("{ROOM_KIND_PREFIX}{room}"))
            .await
            .expect("read")
            .into_iter()
            .map(|e| e.id.to_string())
            .collect();
        ids.sort();
        ids
    }

    #[tokio::test]
    async fn a_refused_record_resets_only_its_own_room() {
        let a = Arc::new(RoomHandle::new("a"));
        let b = Arc::new(RoomHandle::new("b"));
        let c = Arc::new(RoomHandle::new("c"));
        let db = group_commit(vec![
            job(&b, "b1", json!({"n": 1})),
            job(&a, "a1", json!({"n": 1})),
            job(&c, "c1", json!({"n": 1})),
            job(&a, "a2", too_large()),
            job(&b, "b2", json!({"n": 2})),
            job(&a, "a3", json!({"n": 3})),
        ])
        .await;
        assert!(
            a.is_poisoned(),
            "the room holding the refused record is reset"
        );
        assert!(!b.is_poisoned(), "other rooms are not");
        assert!(!c.is_poisoned(), "other rooms are not");
        assert_eq!(stored(&db, "b").await, ["b1", "b2"]);
        assert_eq!(stored(&db, "c").await, ["c1"]);
        // Room a: what came before the refused record is written, nothing after it.
        assert_eq!(stored(&db, "a").await, ["a1"]);
    }

    #[tokio::test]
    async fn a_lone_refused_record_resets_its_room_and_nothing_else() {
        let a = Arc::new(RoomHandle::new("a"));
        let b = Arc::new(RoomHandle::new("b"));
        let idle = Job {
            room: Arc::clone(&b),
            record: None,
            version: 0,
            frames: Vec::new(),
        };
        let db = group_commit(vec![idle, job(&a, "a1", too_large())]).await;
        assert!(a.is_poisoned());
        assert!(!b.is_poisoned());
        assert!(stored(&db, "a").await.is_empty());
    }

    fn record(kind: &str, id: &str, data: serde_json::Value) -> kalphite_db::backup::Record {
        kalphite_db::backup::Record {
            kind: kind.into(),
            id: id.into(),
            data,
            updated_at: 1,
            version: 1,
        }
    }

    #[test]
    fn a_restore_gives_every_room_of_the_backup_a_new_identity() {
        let mut meta = RoomMeta::new("old-epoch".to_owned());
        meta.collected_through = 7;
        let mut records = vec![
            record(
                &format!("{ROOM_KIND_PREFIX}a"),
                "[\"todo\",\"1\"]",
                json!({}),
            ),
            record(ROOM_META_KIND, "a", serde_json::to_value(&meta).unwrap()),
            // A room whose identity record is missing from the backup gets one too.
            record(
                &format!("{ROOM_KIND_PREFIX}b"),
                "[\"todo\",\"2\"]",
                json!({}),
            ),
            record("todo", "not-a-room", json!({"title": "x"})),
        ];
        assert_eq!(renew_room_epochs_in(&mut records, true).unwrap(), 2);
        assert_eq!(
            records.len(),
            5,
            "the room records stay, one identity per room"
        );
        let metas: std::collections::BTreeMap<String, RoomMeta> = records
            .iter()
            .filter(|r| r.kind.as_str() == ROOM_META_KIND)
            .map(|r| {
                (
                    r.id.to_string(),
                    serde_json::from_value(r.data.clone()).unwrap(),
                )
            })
            .collect();
        assert_eq!(metas.len(), 2);
        for meta in metas.values() {
            assert!(meta.rolled_back);
            assert_eq!(meta.epoch.len(), 32);
            assert_ne!(meta.epoch, "old-epoch");
        }
        assert_ne!(metas["a"].epoch, metas["b"].epoch);
        assert_eq!(metas["a"].collected_through, 7, "the horizon is kept");

        let mut corrupt = vec![record(ROOM_META_KIND, "a", json!("not a meta"))];
        assert!(matches!(
            renew_room_epochs_in(&mut corrupt, false),
            Err(LogError::Corrupt { .. })
        ));
    }
}
