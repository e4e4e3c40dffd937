//! The client side of sync as a sans-IO state machine: a [`Replica`] turns local changes
//! into outgoing messages (vector clock, outbox, resend until acknowledged) and server
//! messages into changes to apply to the local store, marked remote.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use indexmap::IndexMap;
use kalphite::{AnyEntity, Change, Entity, Millis, Op, Origin};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::EntityKey;
use crate::clock::VectorClock;
use crate::conflict::content_hash;
use crate::protocol::{
    ChangePayload, ClientMessage, ConflictPayload, Envelope, ErrorCode, HeartbeatPayload,
    HelloPayload, PROTOCOL_VERSION, RESERVED_KIND_PREFIX, ServerMessage,
};

/// Who this replica is and how it behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// The room to sync with.
    pub room_id: String,
    /// The user, as authenticated by the token.
    pub user_id: String,
    /// This installation's id: its slot in vector clocks and the prefix of its message ids.
    /// Must be unique per room and stable across restarts.
    pub replica_id: String,
    /// Distinguishes this run of the replica from every earlier one (a random number per
    /// process start, chosen by the adapter): it is part of every message id, so ids never
    /// repeat even when the persisted state was rolled back (a crash, a restored backup, a
    /// copied database) and the message counter with it.
    pub incarnation: u64,
    /// Sent in the hello.
    pub auth_token: Option<String>,
    /// How long to wait for an ack before resending a change.
    pub resend_after: Millis,
    /// Send a heartbeat after this long without sending anything.
    pub heartbeat_interval: Millis,
    /// Most entities with unacknowledged changes; past it, new local changes are refused
    /// (never dropped silently).
    pub outbox_limit: usize,
}

impl ReplicaConfig {
    /// A config with the default timings (resend 5 s, heartbeat 30 s, outbox 1000).
    pub fn new(
        room_id: impl Into<String>,
        user_id: impl Into<String>,
        replica_id: impl Into<String>,
    ) -> Self {
        Self {
            room_id: room_id.into(),
            user_id: user_id.into(),
            replica_id: replica_id.into(),
            incarnation: 0,
            auth_token: None,
            resend_after: 5_000,
            heartbeat_interval: 30_000,
            outbox_limit: 1_000,
        }
    }
}

/// A replica's refusal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// The outbox holds `limit` entities with unacknowledged changes.
    #[error(
        "the offline queue is full ({limit} entities waiting for the server); reconnect to drain it"
    )]
    OutboxFull {
        /// The configured limit.
        limit: usize,
    },
    /// An upsert change without its entity.
    #[error("upsert of {kind}/{id} carries no entity")]
    MissingEntity {
        /// The kind.
        kind: String,
        /// The id.
        id: String,
    },
    /// The entity's data could not be turned into JSON.
    #[error("entity data is not serializable to JSON: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// What the server last said about an entity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Known {
    /// The room version of that state.
    pub version: u64,
    /// Its vector clock.
    pub vector: VectorClock,
    /// [`content_hash`] of that state.
    pub hash: u64,
}

/// A server state held back because a local change to the entity is unacknowledged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Held {
    /// Its room version.
    pub version: u64,
    /// The entity, or `None` when deleted.
    pub state: Option<Entity<Value>>,
}

/// The latest unacknowledged change of one entity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxEntry {
    /// The message, resent as is until acknowledged.
    pub message: Envelope<ChangePayload>,
    /// [`content_hash`] of the local state it carries.
    pub hash: u64,
    /// The newest server state that arrived meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<Held>,
    /// The sequence number of the oldest local change folded into this entry: every
    /// change from it on waits for this entry's ack.
    pub first_seq: u64,
}

/// Everything a replica must persist to resume after a restart (serde).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaState {
    /// Sequence number of the next message id.
    pub next_seq: u64,
    /// Every room version up to this one has been received (the catch-up point).
    pub watermark: u64,
    /// Versions received above the watermark.
    pub received_above: BTreeSet<u64>,
    /// Per entity, what the server last said.
    #[serde(with = "entries")]
    pub known: HashMap<EntityKey, Known>,
    /// The offline queue: at most one entry per entity, oldest first.
    #[serde(with = "entries")]
    pub outbox: IndexMap<EntityKey, Arc<OutboxEntry>>,
    /// The room's epoch the watermark and the known versions belong to (set when a
    /// catch-up completes; `None` before the first, or from a server without epochs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// A resync began (a welcome called for one) and its catch-up has not completed: the
    /// watermark and the known versions are its partial progress, which does not say
    /// what the room lacks. The next hello asks from version 0, so an interrupted resync
    /// is started again and finished (see `docs/sync.md`, "Room identity and resync").
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resyncing: bool,
}

/// The scalar part of [`ReplicaState`]: where the replica stands in the room.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// [`ReplicaState::next_seq`].
    pub next_seq: u64,
    /// [`ReplicaState::watermark`].
    pub watermark: u64,
    /// [`ReplicaState::received_above`].
    pub received_above: BTreeSet<u64>,
    /// [`ReplicaState::epoch`]. Written with the watermark, so the two always agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// [`ReplicaState::resyncing`]. Written with the watermark it qualifies.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resyncing: bool,
}

/// What changed in the persistent state since the last [`Replica::take_delta`]: the
/// adapter writes it in the same database transaction as the store changes that go with
/// it, so what is on disk always describes the data on disk.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateDelta {
    /// Outbox entries put (`Some`) or removed (`None`), by entity.
    pub outbox: Vec<(EntityKey, Option<Arc<OutboxEntry>>)>,
    /// What the server last said, by entity.
    pub known: Vec<(EntityKey, Known)>,
    /// Entities forgotten: deletions the room no longer keeps either (their tombstones
    /// were collected), or that the room never had.
    pub forgotten: Vec<EntityKey>,
    /// The scalar part, when it changed.
    pub progress: Option<Progress>,
}

impl StateDelta {
    /// True when nothing changed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.outbox.is_empty()
            && self.known.is_empty()
            && self.forgotten.is_empty()
            && self.progress.is_none()
    }
}

impl ReplicaState {
    /// Applies a [`StateDelta`]: a state persisted as the deltas of a replica, applied in
    /// order, equals that replica's state. The outbox stays in queue order (by
    /// [`OutboxEntry::first_seq`], which a replaced entry keeps).
    pub fn apply_delta(&mut self, delta: StateDelta) {
        let mut put = false;
        for (key, entry) in delta.outbox {
            match entry {
                Some(entry) => {
                    put = true;
                    self.outbox.insert(key, entry);
                }
                None => {
                    self.outbox.shift_remove(&key);
                }
            }
        }
        if put {
            // An entry acknowledged and queued again since the last delta comes back with
            // a later `first_seq`: its place in the queue moves too.
            self.outbox
                .sort_by(|_, a, _, b| a.first_seq.cmp(&b.first_seq));
        }
        for key in delta.forgotten {
            self.known.remove(&key);
        }
        self.known.extend(delta.known);
        if let Some(p) = delta.progress {
            self.next_seq = p.next_seq;
            self.watermark = p.watermark;
            self.received_above = p.received_above;
            self.epoch = p.epoch;
            self.resyncing = p.resyncing;
        }
    }
}

/// A local change the server does not have and will not get: refused before it was queued
/// (see [`ReplicaError`]) or rejected by the server for good. It stays reported until a
/// newer change of the same entity is acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Undelivered {
    /// The entity.
    pub key: EntityKey,
    /// The sequence number it was given (compare with [`Replica::last_seq`]).
    pub seq: u64,
    /// The server's error code, when the server rejected it.
    pub code: Option<ErrorCode>,
    /// Why, for a person.
    pub reason: String,
}

/// Which parts of the state changed since the last [`Replica::take_delta`].
#[derive(Debug, Default)]
struct Dirty {
    outbox: HashSet<EntityKey>,
    known: HashSet<EntityKey>,
    forgotten: HashSet<EntityKey>,
    progress: bool,
}

/// Where the connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkState {
    /// No connection.
    Disconnected,
    /// Hello sent, no welcome yet.
    Connecting,
    /// Welcomed.
    Connected,
}

/// Something the app may want to know.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ReplicaEvent {
    /// The server accepted the hello.
    Connected {
        /// The room's version at that moment.
        room_version: u64,
    },
    /// Catch-up finished.
    CaughtUp {
        /// The version the replica is caught up to.
        version: u64,
    },
    /// A local change is durable on the server.
    Acked {
        /// Its message id.
        message_id: String,
        /// The room version it got.
        version: u64,
    },
    /// A local change was concurrent with another; the ack carries the resolution. Under
    /// the manual strategy, write the version you want as a new change.
    Conflict(Box<ConflictPayload>),
    /// The server refused a local change for good; it left the outbox. The local store
    /// still holds it: the app decides whether to fix and rewrite it or to revert.
    Rejected {
        /// The refused change.
        change: Box<Envelope<ChangePayload>>,
        /// Why.
        code: ErrorCode,
        /// Why, for a person.
        message: String,
    },
    /// A resync finished: the room's history is not the one this replica's versions came
    /// from (another epoch, a room behind the replica), or the catch-up was a snapshot
    /// (see `docs/sync.md`, "Room identity and resync"). The replica now holds the room's
    /// versions only.
    Resynced {
        /// True when the catch-up was a snapshot: entities the room lacks were dropped.
        snapshot: bool,
        /// Local entities the room lacks or holds in another state: pass each (as the
        /// local store holds it) to [`Replica::resend`], so the room gets them back.
        /// Empty after a snapshot.
        resend: Vec<EntityKey>,
        /// Entities the snapshot lacks, deleted locally (the deletes are in
        /// [`Output::apply`]). Empty unless `snapshot`.
        dropped: Vec<EntityKey>,
    },
    /// Any other error from the server.
    ServerError {
        /// The code.
        code: ErrorCode,
        /// For a person.
        message: String,
        /// The message it is about.
        refers_to: Option<String>,
    },
}

/// What handling a server message produced.
#[derive(Debug, Default)]
pub struct Output {
    /// Messages to send to the server.
    pub send: Vec<ClientMessage>,
    /// Changes to apply to the local store, all [`Origin::Remote`].
    pub apply: Vec<Change>,
    /// Events for the app.
    pub events: Vec<ReplicaEvent>,
}

/// A resync in progress on this connection (between a welcome that calls for one and the
/// end of its catch-up). Not persisted: [`ReplicaState::resyncing`] is, so a replica
/// stopped halfway starts the resync again on its next connection.
#[derive(Debug)]
struct Resync {
    /// Drop what the room lacks (a snapshot) instead of sending it back.
    snapshot: bool,
}

/// The client sync state machine for one room.
#[derive(Debug)]
pub struct Replica {
    config: ReplicaConfig,
    state: ReplicaState,
    /// Per entity, the change message last sent on the current connection and when. At
    /// most one change per entity is in flight: a newer edit waits for its ack (or for the
    /// resend timeout). Not persisted: after a restart or a reconnect everything is due.
    in_flight: HashMap<EntityKey, (String, Millis)>,
    link: LinkState,
    last_sent: Millis,
    last_heard: Millis,
    dirty: Dirty,
    /// The `lastVersion` of the current connection's hello: a welcome that starts below it
    /// means the room lost history we hold.
    hello_from: u64,
    /// Local changes the server will not get (not persisted: reported in this session).
    undelivered: HashMap<EntityKey, Undelivered>,
    /// The resync the current connection's welcome started, until its catch-up completes.
    resync: Option<Resync>,
    /// The epoch of the current connection's welcome, adopted when its catch-up completes.
    welcome_epoch: Option<String>,
    /// The lowest counter of this replica that an edit of this incarnation may carry:
    /// above every counter of ours the room has seen (a welcome's `replicaCounter`), so an
    /// edit is never taken for one the room already has, even when this replica restarted
    /// from a state older than what it had sent. Not persisted: each welcome says it again.
    counter_floor: u64,
    /// The room's collection horizon, from the current connection's welcome.
    horizon: u64,
}

impl Replica {
    /// A fresh replica.
    #[must_use]
    pub fn new(config: ReplicaConfig) -> Self {
        Self::restore(config, ReplicaState::default())
    }

    /// A replica resuming from a persisted state.
    #[must_use]
    pub fn restore(config: ReplicaConfig, mut state: ReplicaState) -> Self {
        // Sequence numbers only order this replica's own changes: they must stay above
        // every queued entry's, whatever the persisted counter says.
        let queued = state.outbox.values().map(|e| e.first_seq).max();
        state.next_seq = state.next_seq.max(queued.unwrap_or(0));
        let mut replica = Self {
            config,
            state,
            in_flight: HashMap::new(),
            link: LinkState::Disconnected,
            last_sent: 0,
            last_heard: 0,
            dirty: Dirty::default(),
            hello_from: 0,
            undelivered: HashMap::new(),
            resync: None,
            welcome_epoch: None,
            counter_floor: 0,
            horizon: 0,
        };
        replica.restamp_foreign_entries();
        replica
    }

    /// Queued changes stamped by another replica id (the id was changed, or the state
    /// comes from another installation) would be refused by the room, whose clocks never
    /// saw that replica's edits: each becomes an edit of this replica on top of what the
    /// room last said, with a new message id.
    fn restamp_foreign_entries(&mut self) {
        let prefix = format!("{}-", self.config.replica_id);
        let foreign: Vec<EntityKey> = self
            .state
            .outbox
            .iter()
            .filter(|(_, e)| !e.message.message_id.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for key in foreign {
            let id = self.next_message_id();
            let vector = self
                .state
                .known
                .get(&key)
                .map(|k| k.vector.clone())
                .unwrap_or_default()
                .incremented(&self.config.replica_id);
            if let Some(entry) = self.state.outbox.get_mut(&key) {
                let entry = Arc::make_mut(entry);
                entry.message.message_id = id;
                entry.message.user_id.clone_from(&self.config.user_id);
                entry.message.payload.vector = vector;
                self.dirty.outbox.insert(key);
            }
        }
    }

    /// The local changes up to sequence number `upto` that the server will not get (see
    /// [`Undelivered`]), oldest first.
    #[must_use]
    pub fn undelivered_through(&self, upto: u64) -> Vec<Undelivered> {
        let mut out: Vec<Undelivered> = self
            .undelivered
            .values()
            .filter(|u| u.seq <= upto)
            .cloned()
            .collect();
        out.sort_by_key(|u| u.seq);
        out
    }

    /// Takes what changed in the persistent state since the last call (see [`StateDelta`]).
    pub fn take_delta(&mut self) -> StateDelta {
        let dirty = std::mem::take(&mut self.dirty);
        let state = &self.state;
        StateDelta {
            outbox: dirty
                .outbox
                .into_iter()
                .map(|key| {
                    let entry = state.outbox.get(&key).cloned();
                    (key, entry)
                })
                .collect(),
            known: dirty
                .known
                .into_iter()
                .filter_map(|key| {
                    let known = state.known.get(&key).cloned()?;
                    Some((key, known))
                })
                .collect(),
            forgotten: dirty
                .forgotten
                .into_iter()
                .filter(|key| !state.known.contains_key(key))
                .collect(),
            progress: dirty.progress.then(|| Progress {
                next_seq: state.next_seq,
                watermark: state.watermark,
                received_above: state.received_above.clone(),
                epoch: state.epoch.clone(),
                resyncing: state.resyncing,
            }),
        }
    }

    /// The state to persist (outbox, clocks, catch-up point).
    #[must_use]
    pub fn state(&self) -> &ReplicaState {
        &self.state
    }

    /// The config.
    #[must_use]
    pub fn config(&self) -> &ReplicaConfig {
        &self.config
    }

    /// Where the connection stands.
    #[must_use]
    pub fn link(&self) -> LinkState {
        self.link
    }

    /// Entities with changes not yet acknowledged.
    #[must_use]
    pub fn outbox_len(&self) -> usize {
        self.state.outbox.len()
    }

    /// The sequence number of the latest message built (see [`Replica::acked_through`]).
    /// Read it right after [`Replica::local_change`] to name that change.
    #[must_use]
    pub fn last_seq(&self) -> u64 {
        self.state.next_seq
    }

    /// Every local change with a sequence number ≤ this is durable on the server
    /// (acknowledged, or replaced by a later edit of the same entity that was). This is
    /// what a "durable on the server" receipt waits for.
    #[must_use]
    pub fn acked_through(&self) -> u64 {
        self.state
            .outbox
            .values()
            .map(|e| e.first_seq)
            .min()
            .map_or(self.state.next_seq, |s| s.saturating_sub(1))
    }

    /// Every room version up to this one has been received.
    #[must_use]
    pub fn watermark(&self) -> u64 {
        self.state.watermark
    }

    /// ms since the server was last heard from (for a dead-connection check).
    #[must_use]
    pub fn silence(&self, now: Millis) -> Millis {
        now.saturating_sub(self.last_heard)
    }

    /// A connection was opened: the hello to send first.
    pub fn connect(&mut self, now: Millis) -> ClientMessage {
        self.link = LinkState::Connecting;
        self.last_heard = now;
        // A resync cut short (a disconnect, a restart) starts again from 0: its pages moved
        // the watermark, but what the catch-up lacks is only known at its end. (Same epoch
        // and older than a collected tombstone, a catch-up from the watermark would skip
        // that delete for good.)
        self.hello_from = if self.state.resyncing {
            0
        } else {
            self.state.watermark
        };
        let hello = HelloPayload {
            protocol_version: PROTOCOL_VERSION,
            room_id: self.config.room_id.clone(),
            replica_id: self.config.replica_id.clone(),
            last_version: self.hello_from,
            token: self.config.auth_token.clone(),
            epoch: self.state.epoch.clone(),
        };
        let id = self.next_message_id();
        self.sent(now);
        ClientMessage::Hello(Envelope::new(id, self.config.user_id.clone(), now, hello))
    }

    /// The connection is gone; every unacknowledged change will be resent on the next.
    pub fn disconnected(&mut self) {
        self.link = LinkState::Disconnected;
        self.in_flight.clear();
    }

    /// Records a change the local store accepted. Changes not of [`Origin::Local`] are
    /// ignored (remote changes are never echoed back). Returns what to send now (nothing
    /// while disconnected: the change waits in the outbox).
    ///
    /// # Errors
    /// [`ReplicaError::OutboxFull`] when the outbox is full and the entity is not in it;
    /// the change is then not queued. [`ReplicaError::MissingEntity`] or
    /// [`ReplicaError::Serialize`] for an unusable change. A refused change is reported by
    /// [`Replica::undelivered_through`] until a newer change of the entity is acknowledged.
    pub fn local_change(
        &mut self,
        change: &Change,
        now: Millis,
    ) -> Result<Vec<ClientMessage>, ReplicaError> {
        let result = self.queue_local(change, now);
        if let Err(e) = &result {
            self.state.next_seq = self.state.next_seq.saturating_add(1);
            self.dirty.progress = true;
            let key = EntityKey::new(change.kind.clone(), change.id.clone());
            self.undelivered.insert(
                key.clone(),
                Undelivered {
                    key,
                    seq: self.state.next_seq,
                    code: None,
                    reason: e.to_string(),
                },
            );
        }
        result
    }

    fn queue_local(
        &mut self,
        change: &Change,
        now: Millis,
    ) -> Result<Vec<ClientMessage>, ReplicaError> {
        if change.origin != Origin::Local {
            return Ok(Vec::new());
        }
        let entity = match (change.op, &change.entity) {
            (Op::Delete, _) => None,
            (Op::Upsert, Some(entity)) => Some(entity.to_json()?),
            (Op::Upsert, None) => {
                return Err(ReplicaError::MissingEntity {
                    kind: change.kind.to_string(),
                    id: change.id.to_string(),
                });
            }
        };
        let key = EntityKey::new(change.kind.clone(), change.id.clone());
        if !self.state.outbox.contains_key(&key)
            && self.state.outbox.len() >= self.config.outbox_limit
        {
            return Err(ReplicaError::OutboxFull {
                limit: self.config.outbox_limit,
            });
        }
        let me = self.config.replica_id.clone();
        let id = self.next_message_id();
        let seq = self.state.next_seq;
        let (vector, base_version, held, first_seq) = match self.state.outbox.get(&key) {
            // An edit on top of an unacknowledged one: same base, next clock tick.
            Some(entry) => (
                entry.message.payload.vector.incremented(&me),
                entry.message.payload.base_version,
                entry.held.clone(),
                entry.first_seq,
            ),
            None => {
                let known = self.state.known.get(&key);
                (
                    known
                        .map(|k| k.vector.clone())
                        .unwrap_or_default()
                        .incremented(&me),
                    Some(known.map_or(0, |k| k.version)),
                    None,
                    seq,
                )
            }
        };
        let vector = vector.with_at_least(&me, self.counter_floor);
        let hash = content_hash(entity.as_ref());
        let payload = ChangePayload {
            operation: change.op,
            entity_type: key.kind.clone(),
            entity_id: key.id.clone(),
            entity,
            vector,
            base_version,
            room_version: None,
        };
        let timestamp = if change.timestamp == 0 {
            now
        } else {
            change.timestamp
        };
        let message = Envelope::new(id, self.config.user_id.clone(), timestamp, payload);
        let entry = OutboxEntry {
            message,
            hash,
            held,
            first_seq,
        };
        // Re-inserting keeps an existing entry's queue position.
        self.state.outbox.insert(key.clone(), Arc::new(entry));
        self.dirty.outbox.insert(key.clone());
        self.dirty.progress = true;
        let mut out = Vec::new();
        if self.link == LinkState::Connected && !self.in_flight.contains_key(&key) {
            out.extend(self.send_entry(&key, now));
        }
        Ok(out)
    }

    /// Handles one message from the server.
    pub fn handle(&mut self, message: ServerMessage, now: Millis) -> Output {
        self.last_heard = now;
        let mut out = Output::default();
        match message {
            ServerMessage::Welcome(w) => {
                if self.link != LinkState::Connecting {
                    return out;
                }
                let w = w.payload;
                let other_epoch = matches!((&w.epoch, &self.state.epoch),
                    (Some(room), Some(ours)) if room != ours);
                // Compared with what the hello asked for, not with the watermark now: a
                // change that arrived before the welcome must not look like a reset.
                let behind = w.catch_up_from < self.hello_from;
                self.resync = None;
                self.horizon = w.collected_through;
                // A resync an earlier connection did not finish is done again, whatever
                // the welcome says (a hello from 0 to a room that has not collected
                // anything gets a plain full catch-up).
                if other_epoch || behind || w.snapshot || self.state.resyncing {
                    // A snapshot of our own epoch (we are older than its collected
                    // tombstones) keeps the clocks: they still count the same edits.
                    let forget_clocks = other_epoch || (behind && !w.snapshot);
                    self.begin_resync(w.catch_up_from, forget_clocks, w.snapshot);
                    // Stored when the catch-up completes: a replica stopped halfway must
                    // resync again.
                    self.welcome_epoch = w.epoch;
                } else {
                    // Our versions hold here: nothing to wait for.
                    if w.epoch.is_some() && w.epoch != self.state.epoch {
                        self.state.epoch = w.epoch;
                        self.dirty.progress = true;
                    }
                    self.welcome_epoch = None;
                }
                self.raise_counter_floor(w.replica_counter);
                self.link = LinkState::Connected;
                out.events.push(ReplicaEvent::Connected {
                    room_version: w.room_version,
                });
                let keys: Vec<EntityKey> = self.state.outbox.keys().cloned().collect();
                for key in keys {
                    out.send.extend(self.send_entry(&key, now));
                }
            }
            ServerMessage::CatchUp(page) => {
                let page = page.payload;
                for change in page.changes {
                    if let Some(version) = change.room_version
                        && self.keeps_local(&change)
                    {
                        // Sent back when the resync ends; the room's answer comes with
                        // the ack.
                        self.mark_received(version);
                        continue;
                    }
                    out.apply.extend(self.server_state(change, now));
                }
                if page.from_version <= self.state.watermark {
                    self.state.watermark = self.state.watermark.max(page.to_version);
                    self.absorb();
                    self.dirty.progress = true;
                }
                // A resync ends with its last page, once every page before it arrived too
                // (on one connection they come in order; if not, the next connection
                // resyncs again: the epoch is only stored here).
                if page.complete
                    && self.state.watermark >= page.to_version
                    && let Some(resync) = self.resync.take()
                {
                    self.finish_resync(&resync, now, &mut out);
                    self.state.resyncing = false;
                    self.dirty.progress = true;
                    if let Some(epoch) = self.welcome_epoch.take() {
                        self.state.epoch = Some(epoch);
                        self.dirty.progress = true;
                    }
                }
                if page.complete && self.state.watermark >= page.to_version {
                    self.forget_collected();
                }
                if page.complete {
                    out.events.push(ReplicaEvent::CaughtUp {
                        version: self.state.watermark,
                    });
                }
            }
            ServerMessage::Change(change) => {
                out.apply.extend(self.server_state(change.payload, now));
            }
            ServerMessage::Ack(ack) => self.on_ack(ack.payload, now, &mut out),
            ServerMessage::Conflict(c) => {
                out.events.push(ReplicaEvent::Conflict(Box::new(c.payload)));
            }
            ServerMessage::Heartbeat(_) => {}
            ServerMessage::Error(e) => self.on_error(e.payload, &mut out, now),
        }
        out
    }

    /// Starts a resync: the welcome's catch-up starts at `from` (0) and is the truth. Every
    /// version this replica holds is forgotten (so every state of the catch-up applies,
    /// and what it does not mention shows as version 0 at its end). With `forget_clocks`
    /// (another history) clocks keep only this replica's own counters: other replicas'
    /// edits the old room counted may be gone, and a clock claiming them would be refused.
    fn begin_resync(&mut self, from: u64, forget_clocks: bool, snapshot: bool) {
        self.state.watermark = from;
        self.state.received_above.clear();
        if self.state.epoch.is_none() {
            // The versions taken in from here on belong to the welcome's epoch, stored only
            // when the resync ends. Until then they must not pass for versions of whatever
            // room the next connection finds: an empty epoch matches none, so a connection
            // before this resync ends resyncs again (from 0) instead of catching up.
            self.state.epoch = Some(String::new());
        }
        let me = self.config.replica_id.clone();
        for known in self.state.known.values_mut() {
            known.version = 0;
            if forget_clocks {
                known.vector = known.vector.only(&me);
            }
        }
        for entry in self.state.outbox.values_mut() {
            let entry = Arc::make_mut(entry);
            // A state held back from the old history must not be shown after the ack.
            entry.held = None;
            if forget_clocks {
                entry.message.payload.vector = entry.message.payload.vector.only(&me);
                entry.message.payload.base_version = Some(0);
            }
        }
        self.dirty.known.extend(self.state.known.keys().cloned());
        self.dirty.outbox.extend(self.state.outbox.keys().cloned());
        self.state.resyncing = true;
        self.dirty.progress = true;
        self.resync = Some(Resync { snapshot });
    }

    /// Ends a resync when its catch-up is complete. Entities the replica held (not queued)
    /// that the catch-up did not give a version: after a snapshot they are deleted
    /// locally; otherwise they are reported for [`Replica::resend`], with those whose
    /// local content the catch-up left alone because it differed (see `server_state`).
    fn finish_resync(&mut self, resync: &Resync, now: Millis, out: &mut Output) {
        let absent = content_hash(None);
        let mut missing: Vec<EntityKey> = self
            .state
            .known
            .iter()
            .filter(|(key, known)| {
                known.version == 0 && known.hash != absent && !self.state.outbox.contains_key(*key)
            })
            .map(|(key, _)| key.clone())
            .collect();
        missing.sort();
        if resync.snapshot {
            for key in &missing {
                self.known_mut(key).hash = absent;
                out.apply.push(to_change(key, None, now));
            }
            out.events.push(ReplicaEvent::Resynced {
                snapshot: true,
                resend: Vec::new(),
                dropped: missing,
            });
        } else {
            out.events.push(ReplicaEvent::Resynced {
                snapshot: false,
                resend: missing,
                dropped: Vec::new(),
            });
        }
    }

    /// Once caught up: forgets the deletions the room no longer keeps either (tombstones
    /// up to its collection horizon, and those the room never gave a version), so that
    /// what a client keeps per entity does not grow with every deletion it ever saw.
    /// Queued entities keep theirs (their edit still needs the clock).
    fn forget_collected(&mut self) {
        let absent = content_hash(None);
        let horizon = self.horizon;
        let outbox = &self.state.outbox;
        let gone: Vec<EntityKey> = self
            .state
            .known
            .iter()
            .filter(|(key, k)| {
                k.hash == absent && k.version <= horizon && !outbox.contains_key(*key)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            self.state.known.remove(&key);
            self.dirty.known.remove(&key);
            self.dirty.forgotten.insert(key);
        }
    }

    /// Sends a local entity back to the room after a resync ([`ReplicaEvent::Resynced`]'s
    /// `resend`): queued like a local upsert of it, with its own `updatedAt` as the edit's
    /// time, a clock of this replica's own counter only and base version 0, so the room
    /// treats it as concurrent with whatever it holds and resolves it with the kind's
    /// strategy (under last-write-wins, the newer state wins). Not bounded by
    /// [`ReplicaConfig::outbox_limit`]: a lost room must get all of it back.
    ///
    /// # Errors
    /// [`ReplicaError::Serialize`] for an unusable entity.
    pub fn resend(
        &mut self,
        entity: Entity<Value>,
        now: Millis,
    ) -> Result<Vec<ClientMessage>, ReplicaError> {
        let at = if entity.updated_at == 0 {
            now
        } else {
            entity.updated_at
        };
        let change = Change::upsert(AnyEntity::new(Arc::new(entity)), at, Origin::Local);
        let limit = self.config.outbox_limit;
        self.config.outbox_limit = usize::MAX;
        let result = self.local_change(&change, now);
        self.config.outbox_limit = limit;
        result
    }

    /// Resends changes unacknowledged for [`ReplicaConfig::resend_after`], and a heartbeat
    /// when nothing was sent for [`ReplicaConfig::heartbeat_interval`].
    pub fn tick(&mut self, now: Millis) -> Vec<ClientMessage> {
        let mut out = Vec::new();
        if self.link != LinkState::Connected {
            return out;
        }
        let resend_after = self.config.resend_after;
        let due: Vec<EntityKey> = self
            .state
            .outbox
            .keys()
            .filter(|key| {
                self.in_flight
                    .get(*key)
                    .is_none_or(|(_, at)| now.saturating_sub(*at) >= resend_after)
            })
            .cloned()
            .collect();
        for key in due {
            out.extend(self.send_entry(&key, now));
        }
        if out.is_empty() && now.saturating_sub(self.last_sent) >= self.config.heartbeat_interval {
            let id = self.next_message_id();
            out.push(ClientMessage::Heartbeat(Envelope::new(
                id,
                self.config.user_id.clone(),
                now,
                HeartbeatPayload {},
            )));
        }
        if !out.is_empty() {
            self.sent(now);
        }
        out
    }

    fn on_ack(&mut self, ack: crate::protocol::AckPayload, now: Millis, out: &mut Output) {
        let key = EntityKey::new(ack.result.entity_type.clone(), ack.result.entity_id.clone());
        self.mark_received(ack.version);
        let result_version = ack.result.room_version.unwrap_or(0);
        let result_state = ack.result.entity.clone();
        out.apply.extend(self.server_state(ack.result, now));
        let mine = self
            .state
            .outbox
            .get(&key)
            .is_some_and(|e| e.message.message_id == ack.ack_of);
        if mine && let Some(entry) = self.state.outbox.shift_remove(&key) {
            let entry = Arc::unwrap_or_clone(entry);
            self.dirty.outbox.insert(key.clone());
            self.undelivered.remove(&key);
            out.apply
                .extend(self.settle(&key, entry, Some((result_version, result_state)), now));
        } else {
            // An older change of an entity with a newer edit queued: send that one now.
            out.send
                .extend(self.release_waiting(&key, &ack.ack_of, now));
        }
        out.events.push(ReplicaEvent::Acked {
            message_id: ack.ack_of,
            version: ack.version,
        });
    }

    fn on_error(&mut self, e: crate::protocol::ErrorPayload, out: &mut Output, now: Millis) {
        let refused = e.refers_to.as_deref().and_then(|id| {
            self.state
                .outbox
                .iter()
                .find(|(_, entry)| entry.message.message_id == id)
                .map(|(k, _)| k.clone())
        });
        match refused {
            Some(key) if !e.code.is_retryable() => {
                if let Some(entry) = self.state.outbox.shift_remove(&key) {
                    let entry = Arc::unwrap_or_clone(entry);
                    self.dirty.outbox.insert(key.clone());
                    self.undelivered.insert(
                        key.clone(),
                        Undelivered {
                            key: key.clone(),
                            seq: entry.first_seq,
                            code: Some(e.code),
                            reason: e.message.clone(),
                        },
                    );
                    let message = entry.message.clone();
                    out.apply.extend(self.settle(&key, entry, None, now));
                    out.events.push(ReplicaEvent::Rejected {
                        change: Box::new(message),
                        code: e.code,
                        message: e.message,
                    });
                }
            }
            _ => {
                // About an older in-flight change (superseded by a queued edit)? Then the
                // queued edit, which carries the latest content, goes now.
                let older = e.refers_to.as_deref().and_then(|id| {
                    self.in_flight
                        .iter()
                        .find(|(_, (sent, _))| sent == id)
                        .map(|(k, _)| k.clone())
                });
                if let (Some(key), Some(id)) = (older, e.refers_to.as_deref()) {
                    out.send.extend(self.release_waiting(&key, id, now));
                }
                out.events.push(ReplicaEvent::ServerError {
                    code: e.code,
                    message: e.message,
                    refers_to: e.refers_to,
                });
            }
        }
    }

    /// Sends the outbox entry of `key` and marks it in flight.
    fn send_entry(&mut self, key: &EntityKey, now: Millis) -> Option<ClientMessage> {
        let message = self.state.outbox.get(key)?.message.clone();
        self.in_flight
            .insert(key.clone(), (message.message_id.clone(), now));
        self.sent(now);
        Some(ClientMessage::Change(message))
    }

    /// The in-flight change `message_id` of `key` was answered: a newer edit of the entity
    /// waiting behind it is sent now.
    fn release_waiting(
        &mut self,
        key: &EntityKey,
        message_id: &str,
        now: Millis,
    ) -> Option<ClientMessage> {
        if self
            .in_flight
            .get(key)
            .is_none_or(|(sent, _)| sent != message_id)
        {
            return None;
        }
        self.in_flight.remove(key);
        if self.link != LinkState::Connected {
            return None;
        }
        self.send_entry(key, now)
    }

    /// Takes in a server state of an entity (counting its version as received); returns
    /// the change to apply locally, if any.
    fn server_state(&mut self, change: ChangePayload, now: Millis) -> Option<Change> {
        let version = change.room_version?;
        self.mark_received(version);
        if change.operation == Op::Upsert && change.entity.is_none() {
            return None;
        }
        if change.entity_type.starts_with(RESERVED_KIND_PREFIX) {
            // kalphite's own names are never data, whoever sent them.
            return None;
        }
        let key = EntityKey::new(change.entity_type, change.entity_id);
        let hash = content_hash(change.entity.as_ref());
        let known = self.known_mut(&key);
        if version <= known.version {
            return None;
        }
        let previous_hash = known.hash;
        *known = Known {
            version,
            vector: change.vector,
            hash,
        };
        if let Some(entry) = self.state.outbox.get_mut(&key) {
            Arc::make_mut(entry).held = Some(Held {
                version,
                state: change.entity,
            });
            self.dirty.outbox.insert(key);
            return None;
        }
        (previous_hash != hash).then(|| to_change(&key, change.entity, now))
    }

    /// During a resync that sends back what the room lacks: true when the local store
    /// holds the entity of a catch-up state (not queued) with other content. The
    /// catch-up then leaves the local content alone: it goes back to the room as a
    /// concurrent edit, and the kind's strategy decides (a client that kept a newer
    /// state than the one another client sent back first does not lose it).
    fn keeps_local(&self, change: &ChangePayload) -> bool {
        if self.resync.as_ref().is_none_or(|r| r.snapshot)
            || (change.operation == Op::Upsert && change.entity.is_none())
        {
            return false;
        }
        let key = EntityKey::new(change.entity_type.clone(), change.entity_id.clone());
        let hash = content_hash(change.entity.as_ref());
        !self.state.outbox.contains_key(&key)
            && self
                .state
                .known
                .get(&key)
                .is_some_and(|k| k.version == 0 && k.hash != content_hash(None) && k.hash != hash)
    }

    /// What the replica knows of `key` (a never-seen entity: version 0, absent).
    fn known_mut(&mut self, key: &EntityKey) -> &mut Known {
        if !self.dirty.known.contains(key) {
            self.dirty.known.insert(key.clone());
            self.dirty.forgotten.remove(key);
        }
        self.state
            .known
            .entry(key.clone())
            .or_insert_with(|| Known {
                version: 0,
                vector: VectorClock::new(),
                hash: content_hash(None),
            })
    }

    /// An outbox entry left (acknowledged, or refused for good): the local store follows
    /// the server again. Returns the change that makes it show the newest server state,
    /// if that differs from the entry's content. `fallback` is the ack's result.
    fn settle(
        &mut self,
        key: &EntityKey,
        entry: OutboxEntry,
        fallback: Option<(u64, Option<Entity<Value>>)>,
        now: Millis,
    ) -> Option<Change> {
        self.in_flight.remove(key);
        let known = self.known_mut(key);
        let newest = entry.held.map(|held| held.state).or_else(|| {
            fallback
                .filter(|(version, _)| *version >= known.version)
                .map(|(_, state)| state)
        });
        let Some(state) = newest else {
            // No server state to show: the store keeps the entry's content, and a later
            // server state is compared with that.
            known.hash = entry.hash;
            return None;
        };
        known.hash = content_hash(state.as_ref());
        (known.hash != entry.hash).then(|| to_change(key, state, now))
    }

    fn mark_received(&mut self, version: u64) {
        if version > self.state.watermark {
            self.state.received_above.insert(version);
            self.absorb();
            self.dirty.progress = true;
        }
    }

    /// Moves the watermark over contiguous received versions.
    fn absorb(&mut self) {
        let watermark = self.state.watermark;
        self.state.received_above.retain(|v| *v > watermark);
        while let Some(next) = self.state.watermark.checked_add(1)
            && self.state.received_above.remove(&next)
        {
            self.state.watermark = next;
        }
    }

    /// Takes in a welcome's `replicaCounter`. The queued edits of this incarnation were
    /// stamped from what the disk knew, which may be older than what an earlier run sent
    /// (a crash before its flush, a restored database): those at or below the room's
    /// counter are restamped above it, keeping their message ids (one the room already
    /// stored is still recognized by its id). Entries of earlier incarnations keep their
    /// clocks: if the room has a newer edit of theirs, that edit is the later one.
    fn raise_counter_floor(&mut self, room_counter: u64) {
        let floor = room_counter.saturating_add(1);
        if floor <= self.counter_floor {
            return;
        }
        self.counter_floor = floor;
        let me = self.config.replica_id.clone();
        let ours = format!("{me}-{:x}-", self.config.incarnation);
        let below: Vec<EntityKey> = self
            .state
            .outbox
            .iter()
            .filter(|(_, e)| {
                e.message.message_id.starts_with(&ours) && e.message.payload.vector.get(&me) < floor
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in below {
            if let Some(entry) = self.state.outbox.get_mut(&key) {
                let entry = Arc::make_mut(entry);
                let vector = std::mem::take(&mut entry.message.payload.vector);
                entry.message.payload.vector = vector.with_at_least(&me, floor);
                self.dirty.outbox.insert(key);
            }
        }
    }

    fn next_message_id(&mut self) -> String {
        self.state.next_seq = self.state.next_seq.saturating_add(1);
        self.dirty.progress = true;
        format!(
            "{}-{:x}-{}",
            self.config.replica_id, self.config.incarnation, self.state.next_seq
        )
    }

    fn sent(&mut self, now: Millis) {
        self.last_sent = now;
    }
}

/// A remote change for the local store.
fn to_change(key: &EntityKey, state: Option<Entity<Value>>, now: Millis) -> Change {
    match state {
        Some(entity) => {
            let ts = if entity.updated_at == 0 {
                now
            } else {
                entity.updated_at
            };
            Change::upsert(AnyEntity::new(Arc::new(entity)), ts, Origin::Remote)
        }
        None => Change::delete(key.kind.clone(), key.id.clone(), now, Origin::Remote),
    }
}

/// Serializes a map as a list of `[key, value]` pairs (JSON object keys must be strings).
mod entries {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<M, K, V, S>(map: &M, serializer: S) -> Result<S::Ok, S::Error>
    where
        for<'a> &'a M: IntoIterator<Item = (&'a K, &'a V)>,
        K: Serialize,
        V: Serialize,
        S: Serializer,
    {
        serializer.collect_seq(map)
    }

    pub(super) fn deserialize<'de, M, K, V, D>(deserializer: D) -> Result<M, D::Error>
    where
        M: FromIterator<(K, V)>,
        K: Deserialize<'de>,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(deserializer)?
            .into_iter()
            .collect())
    }
}
