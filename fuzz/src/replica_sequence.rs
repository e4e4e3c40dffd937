//! Drives one client [`Replica`] through a sequence read from the fuzzer's bytes — local
//! edits, connects and disconnects, timer ticks, restarts from the persisted state, and
//! server messages (structured, about the ids the replica really sent, or raw frames
//! through the decoder) — and checks that it never panics, that the state rebuilt from
//! its deltas always equals its state (what the adapter persists), that a restart from
//! that state loses nothing, and that its acknowledged watermark never passes its last
//! change.
//!
//! Shared by the `replica_sequence` fuzz target and the replay test.

use std::sync::Arc;

use kalphite::{AnyEntity, Change, Entity, Op, Origin};
use kalphite_sync::{
    AckPayload, CatchUpPayload, ChangePayload, ClientMessage, ConflictPayload,
    DEFAULT_MAX_FRAME_BYTES, Envelope, ErrorCode, ErrorPayload, HeartbeatPayload, PROTOCOL_VERSION,
    Replica, ReplicaConfig, ReplicaState, SERVER_USER_ID, ServerMessage, StrategyName, VectorClock,
    decode_server,
};

use super::bytes::Bytes;

const ROOM: &str = "room";
const ME: &str = "phone";
const REPLICAS: [&str; 3] = [ME, "laptop", "tablet"];
/// Kinds of server states; a reserved one must be ignored.
const KINDS: [&str; 3] = ["todo", "note", "_kalphite_meta"];
/// Kinds of local edits: the store refuses reserved kinds, so none reaches the replica.
const LOCAL_KINDS: [&str; 2] = ["todo", "note"];
const IDS: [&str; 3] = ["a", "b", "c"];
const CODES: [ErrorCode; 8] = [
    ErrorCode::InvalidEntity,
    ErrorCode::StorageFailed,
    ErrorCode::RateLimited,
    ErrorCode::MessageIdReused,
    ErrorCode::InvalidClock,
    ErrorCode::ReplicaTaken,
    ErrorCode::Internal,
    ErrorCode::Unknown,
];
const MAX_OPS: usize = 200;

/// Runs the operations `data` describes against one replica.
///
/// # Panics
/// When the replica panics or breaks one of the promises listed in the module doc.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let mut config = ReplicaConfig::new(ROOM, "alice", ME);
    config.outbox_limit = 1 + b.below(3);
    config.resend_after = 100;
    config.heartbeat_interval = 1_000;
    let mut h = Harness {
        replica: Replica::new(config.clone()),
        config,
        persisted: ReplicaState::default(),
        sent: Vec::new(),
        now: 1,
    };
    for _ in 0..MAX_OPS {
        if b.is_empty() {
            break;
        }
        h.step(&mut b);
        h.check();
    }
}

struct Harness {
    replica: Replica,
    config: kalphite_sync::ReplicaConfig,
    /// The state as the adapter persists it: every delta applied in order.
    persisted: ReplicaState,
    /// The change messages the replica sent, newest last.
    sent: Vec<Envelope<ChangePayload>>,
    now: u64,
}

impl Harness {
    fn step(&mut self, b: &mut Bytes<'_>) {
        self.now += u64::from(b.byte()) * 10;
        match b.below(12) {
            0 => {
                let hello = self.replica.connect(self.now);
                assert!(matches!(hello, ClientMessage::Hello(_)));
            }
            1 => self.replica.disconnected(),
            2 | 3 => {
                let change = local_change(b, self.now);
                if let Ok(out) = self.replica.local_change(&change, self.now) {
                    self.record_sent(out);
                }
            }
            4 => {
                let out = self.replica.tick(self.now);
                self.record_sent(out);
            }
            5 => {
                // A restart from the persisted state.
                self.persisted.apply_delta(self.replica.take_delta());
                self.replica = Replica::restore(self.config.clone(), self.persisted.clone());
            }
            6 => {
                let text = b.text(255);
                if let Ok(message) = decode_server(&text, DEFAULT_MAX_FRAME_BYTES) {
                    self.deliver(message);
                }
            }
            _ => {
                let message = self.server_message(b);
                self.deliver(message);
            }
        }
    }

    fn deliver(&mut self, message: ServerMessage) {
        let out = self.replica.handle(message, self.now);
        assert!(
            out.apply.iter().all(|c| c.origin == Origin::Remote),
            "applied changes are remote"
        );
        self.record_sent(out.send);
    }

    fn record_sent(&mut self, out: Vec<ClientMessage>) {
        for message in out {
            if let ClientMessage::Change(change) = message {
                assert!(
                    !change
                        .payload
                        .entity_type
                        .starts_with(kalphite_sync::RESERVED_KIND_PREFIX),
                    "a reserved kind was sent"
                );
                self.sent.push(change);
            }
        }
    }

    /// A server message, often about a change the replica really sent.
    fn server_message(&self, b: &mut Bytes<'_>) -> ServerMessage {
        let id = format!("s{}", b.byte());
        let at = self.now;
        let sent = if self.sent.is_empty() || b.below(4) == 0 {
            None
        } else {
            let back = b.below(self.sent.len().min(8));
            self.sent.get(self.sent.len() - 1 - back)
        };
        let version = u64::from(b.byte() % 16);
        let envelope = |payload: serde_json::Value| {
            let message = serde_json::json!({
                "type": payload["type"], "messageId": id, "userId": SERVER_USER_ID,
                "timestamp": at, "payload": payload["payload"],
            });
            serde_json::from_value::<ServerMessage>(message).expect("a server message")
        };
        match b.below(7) {
            // Built from JSON: fields added to the welcome later need no change here.
            0 => envelope(serde_json::json!({"type": "welcome", "payload": {
                "protocolVersion": PROTOCOL_VERSION,
                "roomId": ROOM,
                "roomVersion": version,
                "catchUpFrom": u64::from(b.byte() % 8),
            }})),
            1 => {
                let changes = (0..b.below(4)).map(|_| server_change(b, None)).collect();
                ServerMessage::CatchUp(typed(
                    &id,
                    at,
                    CatchUpPayload {
                        from_version: u64::from(b.byte() % 8),
                        to_version: version,
                        changes,
                        complete: b.flag(),
                    },
                ))
            }
            2 => ServerMessage::Change(Envelope::new(
                id.clone(),
                "bob",
                at,
                server_change(b, sent.map(|s| &s.payload)),
            )),
            3 => ServerMessage::Ack(typed(
                &id,
                at,
                AckPayload {
                    ack_of: sent.map_or_else(|| b.text(8), |s| s.message_id.clone()),
                    version,
                    result: server_change(b, sent.map(|s| &s.payload)),
                },
            )),
            4 => ServerMessage::Error(typed(
                &id,
                at,
                ErrorPayload {
                    code: *b.pick(&CODES),
                    message: "fuzz".into(),
                    refers_to: sent.map(|s| s.message_id.clone()),
                },
            )),
            5 => {
                let yours = server_change(b, sent.map(|s| &s.payload));
                ServerMessage::Conflict(typed(
                    &id,
                    at,
                    ConflictPayload {
                        refers_to: sent.map_or_else(String::new, |s| s.message_id.clone()),
                        strategy: StrategyName::Manual,
                        theirs: yours.clone(),
                        resolved: yours.clone(),
                        yours,
                    },
                ))
            }
            _ => ServerMessage::Heartbeat(typed(&id, at, HeartbeatPayload {})),
        }
    }

    fn check(&mut self) {
        assert!(self.replica.acked_through() <= self.replica.last_seq());
        self.persisted.apply_delta(self.replica.take_delta());
        let state = self.replica.state();
        assert_eq!(&self.persisted, state, "the deltas rebuild the state");
        assert!(
            self.persisted.outbox.keys().eq(state.outbox.keys()),
            "the deltas keep the outbox order"
        );
        let seqs: Vec<u64> = state.outbox.values().map(|e| e.first_seq).collect();
        assert!(seqs.is_sorted(), "the outbox is in queue order: {seqs:?}");
        assert!(
            state.outbox.len() <= self.config.outbox_limit,
            "the outbox is bounded"
        );
    }
}

/// A server-originated envelope.
fn typed<P>(id: &str, at: u64, payload: P) -> Envelope<P> {
    Envelope::new(id, SERVER_USER_ID, at, payload)
}

/// A local edit of a small entity.
fn local_change(b: &mut Bytes<'_>, now: u64) -> Change {
    let kind = *b.pick(&LOCAL_KINDS);
    let id = *b.pick(&IDS);
    if b.below(4) == 0 {
        Change::delete(kind.into(), id.into(), now, Origin::Local)
    } else {
        let entity = Entity::new(id, kind, b.json(0)).at(now);
        Change::upsert(AnyEntity::new(Arc::new(entity)), now, Origin::Local)
    }
}

/// A server state of an entity: of the one `about` names (with its clock, sometimes
/// advanced by another replica), or of any.
fn server_change(b: &mut Bytes<'_>, about: Option<&ChangePayload>) -> ChangePayload {
    let (kind, id, mut vector) = match about {
        Some(p) if b.below(4) != 0 => {
            (p.entity_type.clone(), p.entity_id.clone(), p.vector.clone())
        }
        _ => (
            (*b.pick(&KINDS)).into(),
            (*b.pick(&IDS)).into(),
            VectorClock::new(),
        ),
    };
    for _ in 0..b.below(3) {
        let replica = *b.pick(&REPLICAS);
        vector.increment(replica);
    }
    let operation = if b.below(4) == 0 {
        Op::Delete
    } else {
        Op::Upsert
    };
    let entity = (operation == Op::Upsert)
        .then(|| Entity::new(id.clone(), kind.clone(), b.json(0)).at(u64::from(b.byte())));
    ChangePayload {
        operation,
        entity_type: kind,
        entity_id: id,
        entity,
        vector,
        base_version: None,
        room_version: Some(u64::from(b.byte() % 16)),
    }
}
