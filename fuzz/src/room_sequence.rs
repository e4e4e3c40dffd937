//! Drives one [`Room`] through a sequence of operations read from the fuzzer's bytes —
//! joins, changes (structured, or raw frames through the decoder), heartbeats, commits,
//! aborts, leaves — from a few users and replicas over a few entities, and checks after
//! every step what the room promises (with or without a schema that normalizes data, an
//! identity, tombstone collection):
//!
//! - committed versions are gapless and increasing, and a pending write moves nothing;
//! - every ack answers a change that its connection sent, with the version that change got;
//! - replies go to the sender only, and nothing is addressed to a connection that is not a
//!   member (except `not_joined` to the stranger that spoke, and the ack or `storage_failed`
//!   of a change whose author left while it was being written);
//! - every refusal is a typed error with `refersTo`;
//! - every stored entity respects the room's limits (ids, kinds, clock size, nesting, NUL);
//! - everything the room sends encodes, and decodes to itself as a client would read it;
//! - catch-up pages chain and cover the room; a room restored from the committed records
//!   equals the live one;
//! - a streamed catch-up (`Room::join_streamed`, every other connection), drained one page
//!   per later step while the room goes on changing, chains and holds exactly the room's
//!   state as of the join, with message ids no other message of the room uses.
//!
//! Shared by the `room_sequence` fuzz target and the replay test.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;

use kalphite::{Entity, Op};
use kalphite_sync::{
    CatchUpPayload, CatchUpStream, ChangePayload, ClientMessage, ConflictPolicy, ConnId,
    DEFAULT_MAX_FRAME_BYTES, EntityKey, Envelope, ErrorCode, HelloPayload, MAX_CLOCK_ENTRIES,
    MAX_DATA_DEPTH, MAX_ID_BYTES, Outbound, PROTOCOL_VERSION, Pending, RESERVED_KIND_PREFIX,
    Recipient, Room, RoomLimits, RoomMeta, ServerMessage, Step, StoredChange, Strategy,
    VectorClock, decode_client, decode_server, encode,
};
use serde_json::Value;

use super::bytes::Bytes;

const ROOM: &str = "room";
const USERS: [&str; 4] = ["alice", "bob", "mallory", "nul\0user"];
const REPLICAS: [&str; 4] = ["r1", "r2", "phone", "laptop"];
const KINDS: [&str; 5] = ["todo", "note", "todo", "_kalphite_meta", ""];
const IDS: [&str; 4] = ["a", "b", "c", ""];
/// Connection slots: a slot holds at most one joined connection at a time.
const SLOTS: usize = 4;
/// Operations per run, so that a long input cannot make one run slow.
const MAX_OPS: usize = 200;

/// Runs the operations `data` describes against one room.
///
/// # Panics
/// When the room panics or breaks one of the promises listed in the module doc.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let mut h = Harness::new(&mut b);
    for _ in 0..MAX_OPS {
        if b.is_empty() {
            break;
        }
        h.step(&mut b);
    }
    while !h.streams.is_empty() {
        h.drain_one_page();
    }
    h.check_restore();
}

/// The room and what the harness knows it was told.
struct Harness {
    room: Room,
    policy: u8,
    limits: RoomLimits,
    /// The room log as the server keeps it: the latest record of each entity, minus the
    /// tombstones the room collected.
    log: BTreeMap<EntityKey, StoredChange>,
    /// How many changes were committed.
    committed: u64,
    /// The accepted change waiting to be committed, with its message id.
    pending: Option<Pending>,
    /// The connection in each slot, when joined.
    slots: [Option<ConnId>; SLOTS],
    /// Joined connections: user and replica.
    members: BTreeMap<ConnId, (String, String)>,
    /// Connections that joined and then left.
    gone: BTreeSet<ConnId>,
    /// (connection, message id) of every change a connection sent.
    sent: HashSet<(ConnId, String)>,
    /// Streamed catch-ups not drained yet, by connection.
    streams: BTreeMap<ConnId, Streamed>,
    /// Every message id the room sent (they must never repeat).
    message_ids: std::cell::RefCell<HashSet<String>>,
    next_conn: ConnId,
    now: u64,
}

/// A streamed catch-up being drained, and what it must hold: the room as of the join.
struct Streamed {
    stream: CatchUpStream,
    from: u64,
    /// The room's version at the join.
    version: u64,
    /// The state at the join of every entity changed since `from`.
    expected: BTreeMap<EntityKey, ChangePayload>,
    pages: Vec<CatchUpPayload>,
}

/// A typed kind for the room's schema (when it has one): it keeps `title` and drops every
/// other field, so what the room stores differs from what was sent.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Note {
    #[serde(default)]
    title: Value,
}

impl kalphite::EntityKind for Note {
    const KIND: &'static str = "note";
}

/// A new room with the policy and schema `choice` names.
fn new_room(choice: u8, limits: RoomLimits) -> Room {
    let room = Room::new(ROOM, policy(choice)).with_limits(limits);
    if (choice / 4).is_multiple_of(3) {
        room.with_schema(std::sync::Arc::new(
            kalphite::TypedSchema::new().kind::<Note>(),
        ))
    } else {
        room
    }
}

fn policy(choice: u8) -> ConflictPolicy {
    match choice % 4 {
        0 => ConflictPolicy::default(),
        1 => ConflictPolicy::new(Strategy::FieldMerge),
        2 => ConflictPolicy::new(Strategy::Manual),
        _ => ConflictPolicy::new(Strategy::LastWriteWins).with_kind("todo", Strategy::FieldMerge),
    }
}

/// Checks that catch-up `pages` chain from `from`, only the last complete, their changes in
/// version order and range, each entity once; returns the version they reach and each
/// entity's state as sent.
fn chained(from: u64, pages: &[CatchUpPayload]) -> (u64, BTreeMap<EntityKey, ChangePayload>) {
    assert!(!pages.is_empty(), "at least one page");
    let mut at = from;
    let mut seen = BTreeMap::new();
    for (i, page) in pages.iter().enumerate() {
        assert_eq!(page.from_version, at, "pages chain");
        assert!(page.to_version >= page.from_version);
        assert_eq!(
            page.complete,
            i + 1 == pages.len(),
            "only the last is complete"
        );
        let mut last = page.from_version;
        for change in &page.changes {
            let v = change.room_version.expect("catch-up carries room versions");
            assert!(v > last && v <= page.to_version, "in order and in range");
            last = v;
            let key = EntityKey::new(change.entity_type.clone(), change.entity_id.clone());
            assert!(
                seen.insert(key, change.clone()).is_none(),
                "each entity once"
            );
        }
        at = page.to_version;
    }
    (at, seen)
}

impl Harness {
    fn new(b: &mut Bytes<'_>) -> Self {
        let policy_choice = b.byte();
        let with_meta = b.flag();
        let limits = RoomLimits {
            catch_up_page: b.below(4),
            catch_up_page_bytes: *b.pick(&[0, 120, 1_000, 256 * 1024]),
            merge_bases: b.below(4),
            // Fixed (no input byte, so the corpus keeps its meaning): small enough that a
            // few states push older bases out.
            merge_base_bytes: 400,
            dedup_window: b.below(6),
            max_clock_skew: *b.pick(&[0, 1_000, 60_000]),
            tombstone_versions: u64::from(b.byte() % 4),
            tombstone_age: *b.pick(&[0, 1_000, u64::MAX]),
        };
        let mut room = new_room(policy_choice, limits);
        if with_meta {
            room = room.with_meta(RoomMeta::new("e1"));
        }
        Self {
            room,
            policy: policy_choice,
            limits,
            log: BTreeMap::new(),
            committed: 0,
            pending: None,
            slots: [None; SLOTS],
            members: BTreeMap::new(),
            gone: BTreeSet::new(),
            sent: HashSet::new(),
            streams: BTreeMap::new(),
            message_ids: std::cell::RefCell::new(HashSet::new()),
            next_conn: 1,
            now: 1,
        }
    }

    fn step(&mut self, b: &mut Bytes<'_>) {
        // Streamed catch-ups advance one page per step, between the room's other work
        // (no input byte: the corpus keeps its meaning).
        self.drain_one_page();
        self.now += u64::from(b.byte());
        let slot = b.below(SLOTS);
        match b.below(16) {
            0 | 1 => {
                let hello = self.hello(b);
                self.join(slot, &hello);
            }
            2..=7 => {
                let message = self.change(b, slot);
                self.handle(slot, message);
            }
            8 => {
                let beat = ClientMessage::Heartbeat(Envelope::new(
                    format!("hb{}", b.byte()),
                    "u",
                    self.now,
                    kalphite_sync::HeartbeatPayload {},
                ));
                self.handle(slot, beat);
            }
            9 => {
                // A hello through `handle`: a second hello, or one from a stranger.
                let hello = self.hello(b);
                self.handle(slot, ClientMessage::Hello(hello));
            }
            10 => {
                // A raw frame through the decoder, as the adapter does.
                let text = b.text(255);
                if let Ok(message) = decode_client(&text, DEFAULT_MAX_FRAME_BYTES) {
                    match message {
                        ClientMessage::Hello(hello) => self.join(slot, &hello),
                        other => self.handle(slot, other),
                    }
                }
            }
            11 | 12 => self.commit(),
            13 => self.abort(),
            14 => self.leave(slot),
            _ if b.flag() => self.collect(),
            _ => self.check_restore(),
        }
    }

    /// The connection in `slot`, or a fresh one that never joined.
    fn conn(&mut self, slot: usize) -> ConnId {
        self.slots[slot].unwrap_or_else(|| {
            self.next_conn += 1;
            self.next_conn - 1
        })
    }

    fn hello(&self, b: &mut Bytes<'_>) -> Envelope<HelloPayload> {
        let replica_id = match b.below(12) {
            0 => "x".repeat(MAX_ID_BYTES + 1),
            1 => "r\0".to_owned(),
            2 => b.text(8),
            _ => (*b.pick(&REPLICAS)).to_owned(),
        };
        let last_version = match b.below(4) {
            0 => b.u64(),
            _ => (b.byte() % 4).into(),
        };
        let protocol_version = if b.below(16) == 0 {
            PROTOCOL_VERSION + 1
        } else {
            PROTOCOL_VERSION
        };
        let room_id = if b.below(16) == 0 { "other" } else { ROOM };
        // Built from JSON, as a client in another language would: fields added to the
        // hello later (optional ones) need no change here.
        let mut payload = serde_json::json!({
            "protocolVersion": protocol_version,
            "roomId": room_id,
            "replicaId": replica_id,
            "lastVersion": last_version,
        });
        if let Some(epoch) = b.pick(&[None, Some("e1"), Some("e0")]) {
            payload["epoch"] = Value::from(*epoch);
        }
        let payload = serde_json::from_value(payload).expect("a hello payload");
        Envelope::new(
            format!("hello{}", b.byte()),
            *b.pick(&USERS),
            self.now,
            payload,
        )
    }

    /// A change message: mostly well-formed and honest (built from the room's state), with
    /// every field sometimes wrong.
    fn change(&self, b: &mut Bytes<'_>, slot: usize) -> ClientMessage {
        let kind = *b.pick(&KINDS);
        let id = *b.pick(&IDS);
        let key = EntityKey::new(kind, id);
        let current = self.room.get(&key);
        let own = self.slots[slot]
            .and_then(|c| self.members.get(&c))
            .map_or("r1", |(_, replica)| replica.as_str());
        let vector = match b.below(6) {
            // Honest: the room's clock of the entity, one more edit of our own.
            0..=2 => current
                .map_or_else(VectorClock::new, |c| c.vector.clone())
                .incremented(own),
            3 => VectorClock::from([(*b.pick(&REPLICAS), u64::from(b.byte() % 4))]),
            4 => VectorClock::from([(own, b.u64()), (*b.pick(&REPLICAS), u64::from(b.byte()))]),
            _ => {
                let n = *b.pick(&[0usize, 3, MAX_CLOCK_ENTRIES, MAX_CLOCK_ENTRIES + 1]);
                (0..n)
                    .map(|i| (format!("v{i}"), 1))
                    .collect::<BTreeMap<_, _>>()
                    .into()
            }
        };
        let base_version = match b.below(4) {
            0 => None,
            1 => Some(u64::from(b.byte() % 8)),
            _ => Some(current.map_or(0, |c| c.version)),
        };
        let operation = if b.below(4) == 0 {
            Op::Delete
        } else {
            Op::Upsert
        };
        let entity = match b.below(8) {
            0 => None,
            1 => Some(Entity::new("other", kind, Value::Null)),
            n => {
                let data = if n < 6 {
                    let mut map = serde_json::Map::new();
                    for field in ["title", "done", "n"] {
                        if b.flag() {
                            map.insert(field.to_owned(), b.json(1));
                        }
                    }
                    Value::Object(map)
                } else {
                    b.json(0)
                };
                let updated_at = match b.below(4) {
                    0 => 0,
                    1 => b.u64(),
                    _ => self.now + u64::from(b.byte()),
                };
                Some(Entity::new(id, kind, data).at(updated_at))
            }
        };
        let message_id = match b.below(10) {
            0 => b.text(8),
            1 => "m".repeat(MAX_ID_BYTES + 1),
            2 => "m\0".to_owned(),
            _ => format!("m{}", b.byte() % 8),
        };
        ClientMessage::Change(Envelope::new(
            message_id,
            "claimed",
            self.now,
            ChangePayload {
                operation,
                entity_type: kind.into(),
                entity_id: id.into(),
                entity,
                vector,
                base_version,
                room_version: if b.below(8) == 0 { Some(b.u64()) } else { None },
            },
        ))
    }

    fn join(&mut self, slot: usize, hello: &Envelope<HelloPayload>) {
        let already = self.slots[slot];
        let conn = self.conn(slot);
        let user = hello.user_id.clone();
        let version = self.room.version();
        // Every other connection joins the way the server does, with a streamed catch-up.
        if conn.is_multiple_of(2) {
            self.join_streamed(slot, conn, already, hello);
            return;
        }
        match self.room.join(conn, &user, hello, self.now) {
            Ok(out) => {
                assert!(already.is_none(), "a second hello on {conn} was accepted");
                self.slots[slot] = Some(conn);
                self.members
                    .insert(conn, (user, hello.payload.replica_id.clone()));
                assert!(self.room.is_member(conn));
                self.check_join(conn, version, hello.payload.last_version, &out);
                self.check_outputs(&out, None);
            }
            Err(_) => {
                assert_eq!(
                    self.room.is_member(conn),
                    already.is_some(),
                    "a refused hello"
                );
            }
        }
        self.check_members();
    }

    /// [`Harness::join`] with [`Room::join_streamed`]: the welcome now, the pages later.
    fn join_streamed(
        &mut self,
        slot: usize,
        conn: ConnId,
        already: Option<ConnId>,
        hello: &Envelope<HelloPayload>,
    ) {
        let user = hello.user_id.clone();
        let version = self.room.version();
        match self.room.join_streamed(conn, &user, hello, self.now) {
            Ok(joined) => {
                assert!(already.is_none(), "a second hello on {conn} was accepted");
                self.slots[slot] = Some(conn);
                self.members
                    .insert(conn, (user, hello.payload.replica_id.clone()));
                assert_eq!(joined.catch_up.conn(), conn);
                let out = [joined.welcome];
                let Some(ServerMessage::Welcome(welcome)) = out.first().map(|o| &o.message) else {
                    panic!("a streamed join starts with a welcome");
                };
                let from = welcome.payload.catch_up_from;
                assert_eq!(welcome.payload.room_version, version);
                assert!(from == hello.payload.last_version || from == 0);
                assert!(from <= version, "catch-up from a version the room has");
                let expected = self
                    .log
                    .values()
                    .filter(|r| r.version > from)
                    .map(|r| {
                        let key = r.key();
                        let current = self.room.get(&key).expect("a logged entity exists");
                        (key, current.to_payload())
                    })
                    .collect();
                self.check_outputs(&out, None);
                self.streams.insert(
                    conn,
                    Streamed {
                        stream: joined.catch_up,
                        from,
                        version,
                        expected,
                        pages: Vec::new(),
                    },
                );
            }
            Err(_) => {
                assert_eq!(
                    self.room.is_member(conn),
                    already.is_some(),
                    "a refused hello"
                );
            }
        }
        self.check_members();
    }

    /// Takes the next page of the oldest streamed catch-up; checks the whole catch-up once
    /// its last page is out.
    fn drain_one_page(&mut self) {
        let Some(mut entry) = self.streams.first_entry() else {
            return;
        };
        let conn = *entry.key();
        let streamed = entry.get_mut();
        let Some(out) = streamed.stream.next_message() else {
            let done = entry.remove();
            Self::check_streamed(conn, &done);
            return;
        };
        assert_eq!(out.to, Recipient::One(conn), "a page for its joiner only");
        let ServerMessage::CatchUp(page) = &out.message else {
            panic!("a catch-up stream makes only pages: {:?}", out.message);
        };
        streamed.pages.push(page.payload.clone());
        let finished = streamed.stream.is_finished();
        if finished {
            let done = entry.remove();
            Self::check_streamed(conn, &done);
        }
        self.check_outputs(std::slice::from_ref(&out), None);
    }

    /// A drained streamed catch-up: pages chain from where the hello stood to the room's
    /// version at the join, and hold each entity changed since once, as it was then.
    fn check_streamed(conn: ConnId, done: &Streamed) {
        let (at, seen) = chained(done.from, &done.pages);
        assert_eq!(
            at,
            done.version.max(done.from),
            "up to the version at the join"
        );
        if seen != done.expected {
            let mut diff = String::new();
            for (key, payload) in &seen {
                if done.expected.get(key) != Some(payload) {
                    let _ = write!(diff, "{key:?} ");
                }
            }
            panic!("the streamed catch-up of {conn} is not the room as of its join: {diff}");
        }
    }

    /// The welcome, then the catch-up from where the hello stood (0 after a reset).
    fn check_join(&self, conn: ConnId, version: u64, last: u64, out: &[Outbound]) {
        assert!(
            out.iter().all(|o| o.to == Recipient::One(conn)),
            "join output to another"
        );
        let Some(ServerMessage::Welcome(welcome)) = out.first().map(|o| &o.message) else {
            panic!("a join starts with a welcome: {out:?}");
        };
        let from = welcome.payload.catch_up_from;
        assert_eq!(welcome.payload.room_version, version);
        assert!(
            from == last || from == 0,
            "catch-up from the hello's version, or from 0"
        );
        assert!(from <= version, "catch-up from a version the room has");
        let pages: Vec<CatchUpPayload> = out[1..]
            .iter()
            .map(|o| match &o.message {
                ServerMessage::CatchUp(page) => page.payload.clone(),
                other => panic!("a join sends only a welcome and catch-up pages: {other:?}"),
            })
            .collect();
        self.check_catch_up(from, &pages);
    }

    /// Pages chain from `from` to the room's version, in version order, and hold every
    /// entity changed since (its current state), each once.
    fn check_catch_up(&self, from: u64, pages: &[CatchUpPayload]) {
        let (at, seen) = chained(from, pages);
        for (key, change) in &seen {
            let current = self.room.get(key).expect("a sent entity exists");
            assert_eq!(*change, current.to_payload(), "its current state");
        }
        assert_eq!(
            at,
            self.room.version().max(from),
            "up to the room's version"
        );
        let expected = self
            .log
            .values()
            .filter(|r| r.version > from)
            .map(StoredChange::key)
            .collect::<BTreeSet<_>>();
        assert!(
            seen.keys().eq(expected.iter()),
            "every entity changed since"
        );
    }

    fn handle(&mut self, slot: usize, message: ClientMessage) {
        let conn = self.conn(slot);
        let message_id = message.message_id().to_owned();
        let is_change = matches!(message, ClientMessage::Change(_));
        if is_change {
            self.sent.insert((conn, message_id.clone()));
        }
        let member = self.members.get(&conn).cloned();
        let version = self.room.version();
        match self.room.handle(conn, message.clone(), self.now) {
            Step::Reply(out) => {
                assert!(
                    out.iter().all(|o| o.to == Recipient::One(conn)),
                    "replies go to the sender"
                );
                if member.is_none() {
                    assert!(
                        matches!(&out[..], [Outbound { message: ServerMessage::Error(e), .. }]
                            if e.payload.code == ErrorCode::NotJoined),
                        "a stranger gets not_joined: {out:?}"
                    );
                }
                for o in &out {
                    if let ServerMessage::Error(e) = &o.message {
                        assert_eq!(e.payload.refers_to.as_deref(), Some(message_id.as_str()));
                    }
                }
                self.check_outputs(&out, Some(conn));
            }
            Step::Persist(pending) => {
                let Some((user, replica)) = member else {
                    panic!("a stranger's message was accepted");
                };
                let ClientMessage::Change(change) = message else {
                    panic!("only changes are persisted");
                };
                assert!(
                    self.pending.is_none(),
                    "a second write while one is pending"
                );
                let record = pending.record();
                assert_eq!(record.version, version + 1, "the next version is reserved");
                assert_eq!(
                    self.room.version(),
                    version,
                    "nothing moves before the commit"
                );
                assert_eq!(record.message_id, message_id);
                assert_eq!((&record.author, &record.replica_id), (&user, &replica));
                assert_eq!(
                    (&record.kind, &record.id),
                    (&change.payload.entity_type, &change.payload.entity_id)
                );
                check_stored(record);
                self.pending = Some(pending);
            }
        }
    }

    fn commit(&mut self) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let record = pending.record().clone();
        let out = self
            .room
            .commit(pending)
            .expect("the room's own pending commits");
        assert_eq!(record.version, self.room.version(), "the committed version");
        self.committed += 1;
        assert_eq!(record.version, self.committed, "versions are gapless");
        self.log.insert(record.key(), record.clone());
        assert_eq!(self.room.get(&record.key()), Some(&record), "installed");
        let author = out.first().map(|o| o.to);
        let Some(Recipient::One(conn)) = author else {
            panic!("a commit starts with the ack to the author: {out:?}");
        };
        let payload = record.to_payload();
        for o in &out {
            match &o.message {
                ServerMessage::Ack(ack) => {
                    assert_eq!(o.to, Recipient::One(conn));
                    assert_eq!(ack.payload.ack_of, record.message_id);
                    assert_eq!(ack.payload.version, record.version);
                    assert_eq!(ack.payload.result, payload);
                }
                ServerMessage::Conflict(c) => {
                    assert_eq!(o.to, Recipient::One(conn));
                    assert_eq!(c.payload.refers_to, record.message_id);
                    assert_eq!(c.payload.resolved, payload);
                }
                ServerMessage::Change(change) => {
                    assert_eq!(o.to, Recipient::AllExcept(conn), "broadcast to the others");
                    assert_eq!(change.payload, payload);
                }
                other => panic!("a commit sends acks, conflicts and changes: {other:?}"),
            }
        }
        self.check_outputs(&out, Some(conn));
        self.check_members();
    }

    fn abort(&mut self) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let record = pending.record().clone();
        let version = self.room.version();
        let out = self
            .room
            .abort(pending, "fuzz", self.now)
            .expect("the room's own pending aborts");
        assert_eq!(self.room.version(), version, "an abort stores nothing");
        let ServerMessage::Error(e) = &out.message else {
            panic!("an abort answers with an error: {out:?}");
        };
        assert_eq!(e.payload.code, ErrorCode::StorageFailed);
        assert_eq!(
            e.payload.refers_to.as_deref(),
            Some(record.message_id.as_str())
        );
        let Recipient::One(conn) = out.to else {
            panic!("storage_failed goes to the author");
        };
        self.check_outputs(&[out], Some(conn));
    }

    fn leave(&mut self, slot: usize) {
        let conn = self.conn(slot);
        // The server drops a leaving connection's queue, catch-up included.
        self.streams.remove(&conn);
        self.room.leave(conn);
        assert!(!self.room.is_member(conn));
        if self.members.remove(&conn).is_some() {
            self.gone.insert(conn);
        }
        self.slots[slot] = None;
        self.check_members();
    }

    fn check_members(&self) {
        let members: Vec<ConnId> = self.room.members().collect();
        let expected: Vec<ConnId> = self.members.keys().copied().collect();
        assert_eq!(members, expected, "the room's members");
    }

    /// Every outbound message: addressed to a member (or to `author`, the connection the
    /// step was about, when it has left or never joined), acks only of changes that
    /// connection sent, and each one encodes and decodes to itself.
    fn check_outputs(&self, out: &[Outbound], author: Option<ConnId>) {
        for o in out {
            if let Recipient::One(conn) = o.to {
                let known = self.members.contains_key(&conn)
                    || (Some(conn) == author
                        && (self.gone.contains(&conn)
                            || matches!(&o.message, ServerMessage::Error(_))));
                assert!(known, "{:?} addressed to {conn}, not a member", o.message);
                if let ServerMessage::Ack(ack) = &o.message {
                    assert!(
                        self.sent.contains(&(conn, ack.payload.ack_of.clone())),
                        "ack of {:?}, which {conn} never sent",
                        ack.payload.ack_of
                    );
                    assert!(ack.payload.version <= self.room.version().max(ack.payload.version));
                }
            }
            let id = o.message.message_id().to_owned();
            assert!(
                self.message_ids.borrow_mut().insert(id.clone()),
                "the room sent message id {id} twice"
            );
            let frame = encode(&o.message).expect("what the room sends encodes");
            let back = decode_server(&frame, usize::MAX)
                .unwrap_or_else(|e| panic!("a client cannot decode what the room sent: {e}"));
            assert_eq!(back, o.message, "the frame decodes to what was sent");
        }
    }

    /// Collects tombstones, and deletes them from the log as the server does.
    fn collect(&mut self) {
        let version = self.room.version();
        let collected = self.room.collect_tombstones(self.now);
        assert_eq!(self.room.version(), version, "collecting moves no version");
        if self.room.meta().is_none() || self.pending.is_some() {
            assert!(
                collected.is_empty(),
                "collected without meta or while a write is pending"
            );
        }
        for record in collected {
            let key = record.key();
            assert!(record.state.is_none(), "only tombstones are collected");
            assert!(
                record.version + self.limits.tombstone_versions <= version,
                "too recent"
            );
            assert_eq!(
                self.log.get(&key),
                Some(&record),
                "the entity's latest record"
            );
            assert_eq!(self.room.get(&key), None, "gone from the room");
            let horizon = self.room.meta().map_or(0, |m| m.collected_through);
            assert!(horizon >= record.version, "the horizon moved past it");
            self.log.remove(&key);
        }
    }

    /// A room rebuilt from the log (and its meta) equals the live one.
    fn check_restore(&self) {
        let mut records: Vec<StoredChange> = self.log.values().cloned().collect();
        records.sort_by_key(|r| r.version);
        let mut rebuilt = new_room(self.policy, self.limits);
        if let Some(meta) = self.room.meta() {
            rebuilt = rebuilt.with_meta(meta.clone());
        }
        let restored = rebuilt.restore(records).expect("the log restores");
        assert_eq!(
            restored.version(),
            self.room.version(),
            "the rebuilt room is at the same version"
        );
        for (key, record) in &self.log {
            assert_eq!(
                restored.get(key),
                self.room.get(key),
                "{key:?} after restore"
            );
            assert_eq!(
                self.room.get(key),
                Some(record),
                "the log holds the current state"
            );
            check_stored(record);
        }
        for after in [0, self.room.version() / 2, self.room.version()] {
            let pages = self.room.catch_up(after);
            assert_eq!(pages, restored.catch_up(after), "catch-up after restore");
            self.check_catch_up(after, &pages);
        }
    }
}

/// What the room may store: the limits of `docs/protocol.md`.
fn check_stored(record: &StoredChange) {
    for (what, text) in [("kind", &*record.kind), ("id", &*record.id)] {
        assert!(
            !text.is_empty() && text.len() <= MAX_ID_BYTES,
            "{what} {text:?}"
        );
        assert!(!text.contains('\0'), "{what} holds NUL");
    }
    assert!(
        !record.kind.starts_with(RESERVED_KIND_PREFIX),
        "a reserved kind was stored"
    );
    assert!(record.message_id.len() <= MAX_ID_BYTES && !record.message_id.contains('\0'));
    assert!(
        record.vector.iter().count() <= MAX_CLOCK_ENTRIES,
        "clock too large"
    );
    if let Some(entity) = &record.state {
        assert_eq!((&entity.kind, &entity.id), (&record.kind, &record.id));
        assert!(
            depth(&entity.data) <= MAX_DATA_DEPTH,
            "data nested too deep"
        );
        assert!(!holds_nul(&entity.data), "data holds NUL");
    }
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}
