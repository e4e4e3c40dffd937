//! The server side of sync as a sans-IO state machine: a [`Room`] takes decoded client
//! messages (with the current time as an argument) and returns the messages to send.
//! Accepted changes come back as a [`Pending`] that the caller persists before the ack
//! and the broadcast are released. A member speaks only for its own replica (see
//! `replicas`): message ids are deduplicated per replica, a replica id belongs to the
//! user who first used it, and a clock may not count edits of another replica that the
//! room never stored.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use kalphite::{Entity, Millis, Op, SharedSchema};
use serde_json::Value;

use crate::EntityKey;
use crate::clock::{Causality, VectorClock};
use crate::conflict::{ConflictCase, ConflictPolicy, Stamp, Version, content_hash};
use crate::protocol::{
    AckPayload, CatchUpPayload, ChangePayload, ClientMessage, ConflictPayload, Envelope, ErrorCode,
    ErrorPayload, HeartbeatPayload, HelloPayload, PROTOCOL_VERSION, SERVER_USER_ID, ServerMessage,
    WelcomePayload,
};

mod catch_up;
mod error;
mod output;
mod record;
mod replicas;

pub use catch_up::{CatchUpStream, Joined};
pub use error::RoomError;
pub use output::{ConnId, Outbound, Pending, Recipient, Step};
pub use record::{RoomMeta, StoredChange};

use replicas::{Replicas, truncate};

/// The longest replica id (in a hello) and change message id a room accepts, in bytes.
/// The room remembers both (bindings, the deduplication window), so their size bounds
/// its memory; honest ids (`<replicaId>-<incarnation>-<counter>`) are far shorter.
pub const MAX_ID_BYTES: usize = 512;

/// The deepest nesting of arrays and objects a room accepts in an entity's data. Acks and
/// catch-up pages wrap the entity in four more levels, and serde's default limit (which
/// kalphite's own client decodes with) is 128: data nested deeper than this could be
/// stored and then never delivered to anyone.
pub const MAX_DATA_DEPTH: usize = 64;

/// The most replicas one vector clock may name. A clock is merged into its entity's for
/// good, so an unbounded one would make every later edit of the entity too large.
pub const MAX_CLOCK_ENTRIES: usize = 256;

/// Tuning for a room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoomLimits {
    /// Entities per catch-up page.
    pub catch_up_page: usize,
    /// Most bytes of changes per catch-up page (a page holds at least one entity), so
    /// that pages stay under the client's frame limit even with large entities.
    pub catch_up_page_bytes: usize,
    /// Superseded entity states kept per room (the most recent ones) to serve as
    /// three-way merge bases; a change whose base is older merges by last-write-wins.
    pub merge_bases: usize,
    /// Most bytes (encoded JSON) of those states kept per room; the oldest go first. Bounds
    /// a room of large entities (1,024 states of 200 KB were 194 MB).
    pub merge_base_bytes: usize,
    /// (replica id, change message id) pairs remembered for deduplication (the most
    /// recent ones). A resend older than that is still not applied twice — its clock is
    /// dominated by the entity's — but is acknowledged with the entity's current version
    /// instead of its own.
    pub dedup_window: usize,
    /// How far past the server's receive time an incoming `updatedAt` (or a delete's
    /// `timestamp`) may be, in ms; a later one is clamped to receive time + this before the
    /// change is stored, so a client with a skewed (or lying) clock cannot win every
    /// last-write-wins conflict to come (default 60 s).
    pub max_clock_skew: Millis,
    /// Tombstones are collected ([`Room::collect_tombstones`]) once at least this many
    /// versions were accepted after them **and** they are at least
    /// [`RoomLimits::tombstone_age`] old. A client that has everything only up to a version
    /// older than a collected tombstone gets a snapshot instead of an incremental catch-up.
    pub tombstone_versions: u64,
    /// The age (ms, by the delete's timestamp) a tombstone must reach before it may be
    /// collected; see [`RoomLimits::tombstone_versions`].
    pub tombstone_age: Millis,
}

impl Default for RoomLimits {
    fn default() -> Self {
        Self {
            catch_up_page: 256,
            catch_up_page_bytes: 256 * 1024,
            merge_bases: 1_024,
            merge_base_bytes: 16 << 20,
            dedup_window: 4_096,
            max_clock_skew: 60_000,
            tombstone_versions: 10_000,
            tombstone_age: 7 * 24 * 60 * 60 * 1_000,
        }
    }
}

/// A joined connection.
#[derive(Clone, Debug)]
struct Member {
    user_id: Arc<str>,
    /// The hello's replica id: the connection's slot in vector clocks and the namespace of
    /// its message ids.
    replica_id: Arc<str>,
}

/// One sync room: the authoritative, versioned state of a set of entities.
pub struct Room {
    id: String,
    version: u64,
    policy: ConflictPolicy,
    schema: Option<SharedSchema>,
    limits: RoomLimits,
    /// Every entity's current state (tombstones included). Shared and never changed in
    /// place (a change installs a new record): a join's [`CatchUpStream`] holds the
    /// records of its snapshot, so taking it is a pointer copy per entity.
    entities: HashMap<EntityKey, Arc<StoredChange>>,
    /// Superseded states by the version that produced them: merge bases.
    bases: BTreeMap<u64, Base>,
    /// Encoded bytes of every state in `bases`.
    bases_bytes: usize,
    /// Current version → entity, for catch-up in version order.
    by_version: BTreeMap<u64, EntityKey>,
    /// The versions of the current tombstones, so collecting them looks at them alone.
    tombstones: BTreeSet<u64>,
    /// Per replica: its owner, its highest stored counter, its recent message ids.
    replicas: Replicas,
    /// Ordered so that broadcasts go out in a deterministic order.
    members: BTreeMap<ConnId, Member>,
    /// The version reserved by the uncommitted [`Pending`], if any.
    pending: Option<u64>,
    next_message: u64,
    /// The room's identity (epoch) and collection horizon; `None` for a room without one
    /// (its welcomes carry no epoch, and clients resync only when they are ahead of it).
    meta: Option<RoomMeta>,
    /// The version from which [`Room::collect_due`] looks for tombstones again.
    next_collect: u64,
}

impl std::fmt::Debug for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Room")
            .field("id", &self.id)
            .field("version", &self.version)
            .field("entities", &self.entities.len())
            .field("members", &self.members.len())
            .finish_non_exhaustive()
    }
}

/// The state-changing part of a decision about an incoming change.
#[allow(clippy::large_enum_variant)] // short-lived, never stored
enum Decision {
    /// Already incorporated (its clock is dominated): ack with the current state.
    AlreadyKnown,
    /// Store this state with this clock; `conflict` when it was a resolved conflict.
    Store {
        version: Version,
        vector: VectorClock,
        conflict: Option<(Version, ChangePayload)>,
    },
}

impl Room {
    /// An empty room.
    #[must_use]
    pub fn new(id: impl Into<String>, policy: ConflictPolicy) -> Self {
        Self {
            id: id.into(),
            version: 0,
            policy,
            schema: None,
            limits: RoomLimits::default(),
            entities: HashMap::new(),
            bases: BTreeMap::new(),
            bases_bytes: 0,
            by_version: BTreeMap::new(),
            tombstones: BTreeSet::new(),
            replicas: Replicas::default(),
            members: BTreeMap::new(),
            pending: None,
            next_message: 0,
            meta: None,
            next_collect: 0,
        }
    }

    /// Gives the room its identity (epoch, collection horizon, what collected tombstones
    /// said about replicas). Call before [`Room::restore`].
    #[must_use]
    pub fn with_meta(mut self, meta: RoomMeta) -> Self {
        self.replicas.seed(&meta.high, &meta.owners);
        self.meta = Some(meta);
        self
    }

    /// The room's identity, if it has one.
    #[must_use]
    pub fn meta(&self) -> Option<&RoomMeta> {
        self.meta.as_ref()
    }

    /// Validates (and normalizes) every incoming entity's data with `schema`.
    #[must_use]
    pub fn with_schema(mut self, schema: SharedSchema) -> Self {
        self.schema = Some(schema);
        self
    }

    /// Sets the limits.
    #[must_use]
    pub fn with_limits(mut self, limits: RoomLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Rebuilds a room from its persisted changes, in increasing version order.
    ///
    /// # Errors
    /// [`RoomError::OutOfOrder`] when a version is not greater than the one before.
    pub fn restore(
        mut self,
        records: impl IntoIterator<Item = StoredChange>,
    ) -> Result<Self, RoomError> {
        for record in records {
            if record.version <= self.version {
                return Err(RoomError::OutOfOrder {
                    version: record.version,
                    previous: self.version,
                });
            }
            self.install(record);
        }
        // The latest change may be a tombstone since collected, its record gone from the
        // log: the room stays at its version (clients hold it), never below.
        if let Some(meta) = &self.meta {
            self.version = self.version.max(meta.collected_through);
        }
        Ok(self)
    }

    /// The room's id.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The version of the latest accepted change (0 when none).
    #[must_use]
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The joined connections.
    pub fn members(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.members.keys().copied()
    }

    /// True when `conn` has joined.
    #[must_use]
    pub fn is_member(&self, conn: ConnId) -> bool {
        self.members.contains_key(&conn)
    }

    /// The stored state of one entity (tombstones included).
    #[must_use]
    pub fn get(&self, key: &EntityKey) -> Option<&StoredChange> {
        self.entities.get(key).map(|c| &**c)
    }

    /// Every live (not deleted) entity, in no particular order.
    pub fn entities(&self) -> impl Iterator<Item = &Entity<Value>> {
        self.entities.values().filter_map(|c| c.state.as_ref())
    }

    /// Joins `conn` as `user_id` (already authenticated by the caller) and returns the
    /// welcome and every catch-up page for it, built at once. For tests, tools and small
    /// rooms; a server uses [`Room::join_streamed`], which builds no page under the call.
    ///
    /// # Errors
    /// A [`RoomError`] to send back (see [`Room::error_to`]) before closing the connection.
    pub fn join(
        &mut self,
        conn: ConnId,
        user_id: &str,
        hello: &Envelope<HelloPayload>,
        now: Millis,
    ) -> Result<Vec<Outbound>, RoomError> {
        let (welcome, mut pages) = self.admit(conn, user_id, hello)?;
        let mut out = vec![self.addressed(conn, now, |e| ServerMessage::Welcome(e(welcome)))];
        while let Some(page) = pages.next_page() {
            out.push(self.addressed(conn, now, |e| ServerMessage::CatchUp(e(page))));
        }
        Ok(out)
    }

    /// Joins `conn` as `user_id` (already authenticated by the caller) and returns the
    /// welcome and the catch-up as a [`CatchUpStream`]: a snapshot of the records to send
    /// (a pointer per entity changed since the client's version, nothing encoded), whose
    /// pages the caller makes one at a time as its connection takes them. Send the
    /// welcome, then every page, before any later message of the room to `conn`.
    ///
    /// # Errors
    /// A [`RoomError`] to send back (see [`Room::error_to`]) before closing the connection.
    pub fn join_streamed(
        &mut self,
        conn: ConnId,
        user_id: &str,
        hello: &Envelope<HelloPayload>,
        now: Millis,
    ) -> Result<Joined, RoomError> {
        let (welcome, mut catch_up) = self.admit(conn, user_id, hello)?;
        let welcome = self.addressed(conn, now, |e| ServerMessage::Welcome(e(welcome)));
        // One id per page the stream may make, reserved now: its pages are made later,
        // away from the room, and their ids must not collide with the room's next ones.
        let pages = CatchUpStream::max_pages(catch_up.records_left());
        catch_up.address(conn, self.id.clone(), self.next_message + 1, now);
        self.next_message += pages;
        Ok(Joined { welcome, catch_up })
    }

    /// Checks a hello and makes `conn` a member: the welcome and the catch-up (not yet
    /// addressed) to send it.
    fn admit(
        &mut self,
        conn: ConnId,
        user_id: &str,
        hello: &Envelope<HelloPayload>,
    ) -> Result<(WelcomePayload, CatchUpStream), RoomError> {
        let h = &hello.payload;
        if h.protocol_version != PROTOCOL_VERSION {
            return Err(RoomError::UnsupportedVersion {
                got: h.protocol_version,
                supported: PROTOCOL_VERSION,
            });
        }
        if h.room_id != self.id {
            return Err(RoomError::WrongRoom {
                expected: self.id.clone(),
                got: h.room_id.clone(),
            });
        }
        if self.members.contains_key(&conn) {
            return Err(RoomError::AlreadyJoined);
        }
        if h.replica_id.len() > MAX_ID_BYTES {
            return Err(RoomError::IdTooLong {
                field: "replicaId",
                len: h.replica_id.len(),
            });
        }
        // Both end up in every record this member writes.
        for (field, text) in [("replicaId", h.replica_id.as_str()), ("userId", user_id)] {
            if text.contains('\0') {
                return Err(RoomError::NulCharacter { field });
            }
        }
        let (replica_id, user_id) = self.replicas.bind(&h.replica_id, user_id)?;
        self.members.insert(
            conn,
            Member {
                user_id,
                replica_id,
            },
        );
        let (from, snapshot) = self.catch_up_start(h);
        let welcome = WelcomePayload {
            protocol_version: PROTOCOL_VERSION,
            room_id: self.id.clone(),
            room_version: self.version,
            catch_up_from: from,
            epoch: self.meta.as_ref().map(|m| m.epoch.clone()),
            snapshot,
            collected_through: self.meta.as_ref().map_or(0, |m| m.collected_through),
            replica_counter: self.replicas.high(&h.replica_id),
        };
        Ok((welcome, self.catch_up_stream(from)))
    }

    /// Where a joining client's catch-up starts, and whether it is a snapshot (see
    /// `docs/sync.md`, "Room identity and resync"). From 0 when the client's versions mean
    /// nothing here: it names another epoch, or it is ahead of the room (a room without
    /// an epoch that lost history, or a client that predates epochs). Also from 0, as a
    /// snapshot, when it is older than a collected tombstone: it would miss that delete.
    fn catch_up_start(&self, h: &HelloPayload) -> (u64, bool) {
        let meta = self.meta.as_ref();
        let other_epoch = matches!((&h.epoch, meta), (Some(theirs), Some(m)) if *theirs != m.epoch);
        if other_epoch {
            return (0, meta.is_some_and(|m| m.rolled_back));
        }
        if h.last_version > self.version {
            return (0, false);
        }
        // A client at 0 may still hold states (received before any catch-up completed):
        // once tombstones were collected, every full catch-up is a snapshot.
        let horizon = meta.map_or(0, |m| m.collected_through);
        if h.last_version < horizon {
            return (0, true);
        }
        (h.last_version, false)
    }

    /// Collects the tombstones past the horizon ([`RoomLimits::tombstone_versions`] versions
    /// behind the room and [`RoomLimits::tombstone_age`] old at `now`): they leave memory,
    /// the collection horizon moves up to the newest of them, and the room's meta records
    /// what they said about replicas. Returns them (the caller deletes them from the log,
    /// after it has persisted [`Room::meta`]), oldest first. Nothing for a room without
    /// meta (it could not tell clients about the horizon), or while a change is pending.
    pub fn collect_tombstones(&mut self, now: Millis) -> Vec<StoredChange> {
        if self.meta.is_none() || self.pending.is_some() {
            return Vec::new();
        }
        let Some(newest) = self.version.checked_sub(self.limits.tombstone_versions) else {
            return Vec::new();
        };
        let old_enough = now.saturating_sub(self.limits.tombstone_age);
        let keys: Vec<(u64, EntityKey)> = self
            .tombstones
            .range(..=newest)
            .filter_map(|v| Some((*v, self.by_version.get(v)?.clone())))
            .filter(|(_, key)| {
                self.entities
                    .get(key)
                    .is_some_and(|c| c.state.is_none() && c.stamp.at <= old_enough)
            })
            .collect();
        let mut collected = Vec::with_capacity(keys.len());
        for (version, key) in keys {
            self.by_version.remove(&version);
            self.tombstones.remove(&version);
            if let Some(record) = self.entities.remove(&key) {
                collected.push(Arc::unwrap_or_clone(record));
            }
        }
        if let (Some(meta), Some(last)) = (self.meta.as_mut(), collected.last()) {
            meta.collected_through = meta.collected_through.max(last.version);
            for record in &collected {
                for (replica, counter) in record.vector.iter() {
                    let high = meta.high.entry(replica.to_owned()).or_insert(0);
                    *high = (*high).max(counter);
                }
                if !record.replica_id.is_empty() && !record.author.is_empty() {
                    meta.owners
                        .insert(record.replica_id.clone(), record.author.clone());
                }
            }
        }
        // A collected entity's superseded states can no longer be a merge base: an edit
        // of it now starts a new entity. Nor can its changes be re-acknowledged (the ack
        // carries the entity's current state, which is gone): their message ids leave the
        // deduplication window, so a resend whose ack was lost is taken as a change of an
        // entity the room does not know, not refused for ever.
        if !collected.is_empty() {
            let gone: std::collections::HashSet<EntityKey> =
                collected.iter().map(StoredChange::key).collect();
            self.replicas.forget_entities(&gone);
            let mut freed = 0;
            self.bases.retain(|_, base| {
                let keep = !gone.contains(&base.key);
                if !keep {
                    freed += base.bytes;
                }
                keep
            });
            self.bases_bytes -= freed;
        }
        collected
    }

    /// [`Room::collect_tombstones`], but only once per quarter of
    /// [`RoomLimits::tombstone_versions`] accepted versions, so that a server can call it
    /// after every change of a busy room at little cost.
    pub fn collect_due(&mut self, now: Millis) -> Vec<StoredChange> {
        if self.version < self.next_collect || self.meta.is_none() {
            return Vec::new();
        }
        let every = (self.limits.tombstone_versions / 4).max(1);
        self.next_collect = self.version.saturating_add(every);
        self.collect_tombstones(now)
    }

    /// The catch-up pages for a client that has everything up to `after`: the current
    /// state of every entity changed since, in version order, cut into pages of at most
    /// [`RoomLimits::catch_up_page`] entities and about [`RoomLimits::catch_up_page_bytes`].
    /// All at once; [`Room::catch_up_stream`] makes them one at a time.
    #[must_use]
    pub fn catch_up(&self, after: u64) -> Vec<CatchUpPayload> {
        let mut stream = self.catch_up_stream(after);
        std::iter::from_fn(|| stream.next_page()).collect()
    }

    /// The catch-up for a client that has everything up to `after`, as a snapshot of the
    /// records to send whose pages [`CatchUpStream::next_page`] makes one at a time (the
    /// same pages as [`Room::catch_up`], whatever the room does meanwhile). It is addressed
    /// to no connection: take its payloads with [`CatchUpStream::next_page`] (as messages
    /// they would carry placeholder ids); [`Room::join_streamed`] makes an addressed one.
    #[must_use]
    pub fn catch_up_stream(&self, after: u64) -> CatchUpStream {
        let records: Vec<Arc<StoredChange>> = self
            .by_version
            .range(after.saturating_add(1)..)
            .filter_map(|(_, key)| self.entities.get(key).map(Arc::clone))
            .collect();
        CatchUpStream::new(
            records,
            after,
            self.version,
            self.limits.catch_up_page,
            self.limits.catch_up_page_bytes,
        )
    }

    /// Forgets a connection (closed, timed out).
    pub fn leave(&mut self, conn: ConnId) {
        let Some(member) = self.members.remove(&conn) else {
            return;
        };
        if !self
            .members
            .values()
            .any(|m| m.replica_id == member.replica_id)
        {
            self.replicas.release(&member.replica_id);
        }
    }

    /// An error message for `conn`.
    pub fn error_to(
        &mut self,
        conn: ConnId,
        code: ErrorCode,
        message: impl Into<String>,
        refers_to: Option<String>,
        now: Millis,
    ) -> Outbound {
        let payload = ErrorPayload {
            code,
            message: message.into(),
            refers_to,
        };
        self.addressed(conn, now, |e| ServerMessage::Error(e(payload)))
    }

    /// Handles one message from a joined connection (hellos go through [`Room::join`]).
    pub fn handle(&mut self, conn: ConnId, message: ClientMessage, now: Millis) -> Step {
        let refers_to = Some(message.message_id().to_owned());
        let result = match (self.members.get(&conn), message) {
            (None, _) => Err(RoomError::NotJoined),
            (Some(_), ClientMessage::Hello(_)) => Err(RoomError::AlreadyJoined),
            (Some(_), ClientMessage::Heartbeat(_)) => {
                let beat = self.addressed(conn, now, |e| {
                    ServerMessage::Heartbeat(e(HeartbeatPayload {}))
                });
                return Step::Reply(vec![beat]);
            }
            (Some(member), ClientMessage::Change(change)) => {
                let member = member.clone();
                self.accept(conn, &member, &change, now)
            }
        };
        match result {
            Ok(step) => step,
            Err(err) => Step::Reply(vec![self.error_to(
                conn,
                err.code(),
                err.to_string(),
                refers_to,
                now,
            )]),
        }
    }

    /// Decides what an incoming change does; reserves a version when it must be stored.
    fn accept(
        &mut self,
        conn: ConnId,
        member: &Member,
        change: &Envelope<ChangePayload>,
        now: Millis,
    ) -> Result<Step, RoomError> {
        let user_id = &*member.user_id;
        if change.message_id.len() > MAX_ID_BYTES {
            return Err(RoomError::IdTooLong {
                field: "messageId",
                len: change.message_id.len(),
            });
        }
        if change.message_id.contains('\0') {
            return Err(RoomError::NulCharacter { field: "messageId" });
        }
        self.replicas.check_owner(&member.replica_id, user_id)?;
        let key = EntityKey::new(
            change.payload.entity_type.clone(),
            change.payload.entity_id.clone(),
        );
        if let Some((seen_key, version)) =
            self.replicas.seen(&member.replica_id, &change.message_id)
        {
            if *seen_key != key {
                return Err(RoomError::MessageIdReused {
                    message_id: truncate(&change.message_id),
                    earlier: truncate(&format!("{}/{}", seen_key.kind, seen_key.id)),
                    kind: truncate(&key.kind),
                    id: truncate(&key.id),
                });
            }
            let version = *version;
            return Ok(Step::Reply(self.ack(
                conn,
                &change.message_id,
                version,
                &key,
                now,
            )));
        }
        if self.pending.is_some() {
            return Err(RoomError::CommitPending);
        }
        let incoming = self.incoming_version(change, user_id, now)?;
        let vector = change.payload.vector.clone().normalized();
        self.replicas.check_clock(&member.replica_id, &vector)?;
        let decision = match self.entities.get(&key) {
            None => Decision::Store {
                version: incoming,
                vector,
                conflict: None,
            },
            Some(current) => self.decide(current, change, incoming, vector),
        };
        let (version, vector, conflict) = match decision {
            Decision::AlreadyKnown => {
                let current = self.entities.get(&key).map_or(0, |c| c.version);
                self.replicas.remember(
                    &member.replica_id,
                    &change.message_id,
                    key.clone(),
                    current,
                    self.limits.dedup_window,
                );
                return Ok(Step::Reply(self.ack(
                    conn,
                    &change.message_id,
                    current,
                    &key,
                    now,
                )));
            }
            Decision::Store {
                version,
                vector,
                conflict,
            } => (version, stored_clock(vector, &member.replica_id), conflict),
        };
        let Some(room_version) = self.version.checked_add(1) else {
            return Err(RoomError::VersionsExhausted);
        };
        let record = StoredChange {
            version: room_version,
            kind: key.kind.clone(),
            id: key.id.clone(),
            state: version.state,
            vector,
            stamp: version.stamp,
            message_id: change.message_id.clone(),
            replica_id: member.replica_id.to_string(),
            author: user_id.to_owned(),
        };
        let payload = record.to_payload();
        let ack = AckPayload {
            ack_of: change.message_id.clone(),
            version: room_version,
            result: payload.clone(),
        };
        let mut outputs = vec![self.addressed(conn, now, |e| ServerMessage::Ack(e(ack)))];
        if let Some((_, theirs)) = conflict {
            let strategy = self.policy.strategy_for(&key.kind).name();
            let mut yours = change.payload.clone();
            if yours.operation == Op::Delete {
                // A delete's entity is ignored, so never checked against the limits: echoed
                // back, it could make a frame no client can decode (nested too deep).
                yours.entity = None;
            }
            let notice = ConflictPayload {
                refers_to: change.message_id.clone(),
                strategy,
                yours,
                theirs,
                resolved: payload.clone(),
            };
            outputs.push(self.addressed(conn, now, |e| ServerMessage::Conflict(e(notice))));
        }
        let id = self.next_id();
        outputs.push(Outbound {
            to: Recipient::AllExcept(conn),
            message: ServerMessage::Change(Envelope::new(id, user_id, change.timestamp, payload)),
        });
        self.pending = Some(room_version);
        Ok(Step::Persist(Pending {
            conn,
            record,
            outputs,
        }))
    }

    /// Compares an incoming change with the entity's current state.
    fn decide(
        &self,
        current: &StoredChange,
        change: &Envelope<ChangePayload>,
        incoming: Version,
        vector: VectorClock,
    ) -> Decision {
        let existing = current.version_of();
        let concurrent = match vector.compare(&current.vector) {
            Causality::After => false,
            Causality::Before => return Decision::AlreadyKnown,
            Causality::Equal
                if content_hash(incoming.state.as_ref())
                    == content_hash(existing.state.as_ref()) =>
            {
                return Decision::AlreadyKnown;
            }
            _ => true,
        };
        if !concurrent {
            return Decision::Store {
                version: incoming,
                vector,
                conflict: None,
            };
        }
        let merged_vector = vector.merged(&current.vector);
        if incoming.is_delete() && existing.is_delete() {
            let case = ConflictCase {
                kind: current.kind.clone(),
                base: None,
                current: existing,
                incoming,
            };
            return Decision::Store {
                version: case.lww_winner().clone(),
                vector: merged_vector,
                conflict: None,
            };
        }
        let base = match change.payload.base_version.unwrap_or(0) {
            0 => Some(None),
            v if v == current.version => Some(current.state.clone()),
            v => self
                .bases
                .get(&v)
                .filter(|base| base.key == current.key())
                .map(|base| base.state.clone()),
        };
        let case = ConflictCase {
            kind: current.kind.clone(),
            base,
            current: existing,
            incoming,
        };
        let resolved = self.policy.strategy_for(&current.kind).resolve(&case);
        let theirs = current.to_payload();
        Decision::Store {
            version: resolved,
            vector: merged_vector,
            conflict: Some((case.current, theirs)),
        }
    }

    /// Validates an incoming change and turns it into a stamped version; its time (the
    /// entity's `updatedAt`, a delete's `timestamp`) is at most `now` (receive time) plus
    /// [`RoomLimits::max_clock_skew`].
    fn incoming_version(
        &self,
        change: &Envelope<ChangePayload>,
        user_id: &str,
        now: Millis,
    ) -> Result<Version, RoomError> {
        let latest = now.saturating_add(self.limits.max_clock_skew);
        let p = &change.payload;
        let invalid = |reason: String| RoomError::InvalidEntity {
            kind: p.entity_type.to_string(),
            id: p.entity_id.to_string(),
            reason,
        };
        if p.entity_type.is_empty() || p.entity_id.is_empty() {
            return Err(invalid("entityType and entityId must not be empty".into()));
        }
        if p.entity_type.contains('\0') || p.entity_id.contains('\0') {
            return Err(invalid(nul_refused("entityType or entityId")));
        }
        if p.entity_type.len() > MAX_ID_BYTES || p.entity_id.len() > MAX_ID_BYTES {
            return Err(invalid(format!(
                "entityType and entityId may be at most {MAX_ID_BYTES} bytes each"
            )));
        }
        let entries = p.vector.iter().count();
        if entries > MAX_CLOCK_ENTRIES
            || p.vector
                .iter()
                .any(|(replica, _)| replica.len() > MAX_ID_BYTES)
        {
            return Err(invalid(format!(
                "the vector clock names {entries} replicas (at most {MAX_CLOCK_ENTRIES}, each \
                 id at most {MAX_ID_BYTES} bytes)"
            )));
        }
        if p.entity_type.starts_with(crate::RESERVED_KIND_PREFIX) {
            return Err(invalid(format!(
                "kinds starting with '{}' are reserved for kalphite's own bookkeeping",
                crate::RESERVED_KIND_PREFIX
            )));
        }
        let state = match p.operation {
            Op::Delete => None,
            Op::Upsert => {
                let Some(entity) = p.entity.clone() else {
                    return Err(invalid("an upsert must carry the entity".into()));
                };
                if entity.id != p.entity_id || entity.kind != p.entity_type {
                    return Err(invalid(format!(
                        "the entity is {}/{}, not the change's {}/{}",
                        entity.kind, entity.id, p.entity_type, p.entity_id
                    )));
                }
                // The decoder refuses this already; the room holds the rule itself, for
                // adapters that hand it messages built another way.
                if !entity.data.is_object() {
                    return Err(invalid("its data must be a JSON object".into()));
                }
                let mut entity = entity;
                if let Some(schema) = &self.schema {
                    entity.data = schema
                        .normalize(&entity.kind, entity.data)
                        .map_err(|issues| invalid(join(&issues)))?;
                }
                // As sent, too: a conflict notice echoes the change as sent, and a schema
                // may have dropped fields.
                let sent = match (&self.schema, &p.entity) {
                    (Some(_), Some(sent)) => depth(&sent.data),
                    _ => 0,
                };
                if depth(&entity.data).max(sent) > MAX_DATA_DEPTH {
                    return Err(invalid(format!(
                        "its data is nested deeper than {MAX_DATA_DEPTH} levels"
                    )));
                }
                if let Some(field) = kalphite::nul_field(&entity.kind, &entity.id, &entity.data) {
                    return Err(invalid(nul_refused(&field)));
                }
                if entity.updated_at == 0 {
                    entity.updated_at = change.timestamp;
                }
                entity.updated_at = entity.updated_at.min(latest);
                Some(entity)
            }
        };
        let at = state
            .as_ref()
            .map_or(change.timestamp.min(latest), |e| e.updated_at);
        Ok(Version::new(
            state,
            Stamp {
                at,
                user_id: user_id.to_owned(),
            },
        ))
    }

    /// Applies a persisted change and releases its ack and broadcast.
    ///
    /// # Errors
    /// [`RoomError::StalePending`] when `pending` is not the room's reserved write.
    pub fn commit(&mut self, pending: Pending) -> Result<Vec<Outbound>, RoomError> {
        if self.pending != Some(pending.record.version)
            || Some(pending.record.version) != self.version.checked_add(1)
        {
            return Err(RoomError::StalePending);
        }
        self.pending = None;
        self.install(pending.record);
        Ok(pending.outputs)
    }

    /// Drops a change whose write failed; the sender gets a retryable `storage_failed`.
    ///
    /// # Errors
    /// [`RoomError::StalePending`] when `pending` is not the room's reserved write.
    pub fn abort(
        &mut self,
        pending: Pending,
        reason: &str,
        now: Millis,
    ) -> Result<Outbound, RoomError> {
        if self.pending != Some(pending.record.version) {
            return Err(RoomError::StalePending);
        }
        self.pending = None;
        Ok(self.error_to(
            pending.conn,
            ErrorCode::StorageFailed,
            format!("the change could not be stored ({reason}); resend it"),
            Some(pending.record.message_id),
            now,
        ))
    }

    /// Makes `record` the entity's current state, and records what it says about its
    /// author (the replica binding) and about every replica's counter.
    fn install(&mut self, record: StoredChange) {
        let key = record.key();
        self.version = record.version;
        self.replicas.record(&record, self.limits.dedup_window);
        self.by_version.insert(record.version, key.clone());
        if record.state.is_none() {
            self.tombstones.insert(record.version);
        }
        if let Some(old) = self.entities.insert(key.clone(), Arc::new(record)) {
            // The state is cloned only when a catch-up in progress still holds the record.
            let (old_version, old_state) = match Arc::try_unwrap(old) {
                Ok(old) => (old.version, old.state),
                Err(shared) if self.limits.merge_bases > 0 => {
                    (shared.version, shared.state.clone())
                }
                Err(shared) => (shared.version, None),
            };
            self.by_version.remove(&old_version);
            self.tombstones.remove(&old_version);
            if self.limits.merge_bases > 0 {
                let bytes = old_state.as_ref().map_or(0, encoded_len);
                self.bases_bytes += bytes;
                let base = Base {
                    key,
                    state: old_state,
                    bytes,
                };
                if let Some(replaced) = self.bases.insert(old_version, base) {
                    self.bases_bytes -= replaced.bytes;
                }
                while self.bases.len() > self.limits.merge_bases
                    || self.bases_bytes > self.limits.merge_base_bytes
                {
                    let Some((_, oldest)) = self.bases.pop_first() else {
                        break;
                    };
                    self.bases_bytes -= oldest.bytes;
                }
            }
        }
    }

    /// An ack of `message_id` with the entity's current state.
    fn ack(
        &mut self,
        conn: ConnId,
        message_id: &str,
        version: u64,
        key: &EntityKey,
        now: Millis,
    ) -> Vec<Outbound> {
        let Some(result) = self.entities.get(key).map(|c| c.to_payload()) else {
            return vec![self.error_to(
                conn,
                ErrorCode::Internal,
                "acknowledged entity not found",
                Some(message_id.to_owned()),
                now,
            )];
        };
        let ack = AckPayload {
            ack_of: message_id.to_owned(),
            version,
            result,
        };
        vec![self.addressed(conn, now, |e| ServerMessage::Ack(e(ack)))]
    }

    fn next_id(&mut self) -> String {
        self.next_message += 1;
        format!("{}#{}", self.id, self.next_message)
    }

    /// A server-originated message to one connection; `make` gets the envelope builder.
    fn addressed<P>(
        &mut self,
        conn: ConnId,
        now: Millis,
        make: impl FnOnce(&dyn Fn(P) -> Envelope<P>) -> ServerMessage,
    ) -> Outbound {
        let id = self.next_id();
        let envelope = move |payload: P| Envelope::new(id.clone(), SERVER_USER_ID, now, payload);
        Outbound {
            to: Recipient::One(conn),
            message: make(&envelope),
        }
    }
}

/// The size of `value` as JSON, without building the string.
/// The clock stored with a change: at most [`MAX_CLOCK_ENTRIES`] − 1 replicas, so that the
/// next editor's clock (the stored one plus its own entry) is always accepted. Without the
/// bound, once 256 replicas had edited an entity (or two concurrent clocks merged past
/// it), no new replica could ever edit it again. Past the bound the smallest counters go
/// first (never the author's): a later change naming a dropped replica compares as
/// concurrent, not as already known, so it is resolved by the kind's strategy and nothing
/// is swallowed.
fn stored_clock(vector: VectorClock, author: &str) -> VectorClock {
    let keep = MAX_CLOCK_ENTRIES - 1;
    if vector.iter().count() <= keep {
        return vector;
    }
    let mut entries: Vec<(&str, u64)> = vector.iter().collect();
    // The author first, then by counter (largest first), then by replica id: the same
    // choice on every server.
    entries.sort_by(|a, b| {
        (b.0 == author)
            .cmp(&(a.0 == author))
            .then(b.1.cmp(&a.1))
            .then(a.0.cmp(b.0))
    });
    entries.truncate(keep);
    VectorClock::from(
        entries
            .into_iter()
            .map(|(replica, counter)| (replica.to_owned(), counter))
            .collect::<BTreeMap<String, u64>>(),
    )
}

/// A superseded state kept as a merge base, with its encoded size.
#[derive(Debug)]
struct Base {
    key: EntityKey,
    state: Option<Entity<Value>>,
    bytes: usize,
}

fn encoded_len(value: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Serializing JSON values cannot fail; an error would only under-count.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// Why an entity with a NUL character in `place` is refused.
fn nul_refused(place: &str) -> String {
    format!(
        "{place} contains a NUL character (U+0000), which the room log cannot store \
         (PostgreSQL refuses it, and the log must move between databases); remove it"
    )
}

/// How deeply arrays and objects nest in `value` (a scalar is 0). Iterative: hostile
/// input cannot overflow the stack here.
fn depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, d)) = stack.pop() {
        match v {
            Value::Array(items) => {
                deepest = deepest.max(d + 1);
                stack.extend(items.iter().map(|i| (i, d + 1)));
            }
            Value::Object(map) => {
                deepest = deepest.max(d + 1);
                stack.extend(map.values().map(|i| (i, d + 1)));
            }
            _ => {}
        }
    }
    deepest
}

fn join(issues: &[kalphite::Issue]) -> String {
    issues
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
