//! Seeded traces of one replica's inputs, outputs and state, for the TypeScript replica
//! (`clients/js/src/replica.ts`) to replay and match. A real room and a second replica
//! drive it: local edits (some refused by the room, some past the outbox limit), server
//! messages delivered late, twice or never, ticks, disconnects and reconnects, restarts
//! from the persisted state (every `take_delta` applied in order), and the room lost (a
//! new epoch, so a resync). A scripted run interrupts a snapshot resync (a replica older
//! than the room's collection horizon) by a disconnect and then by a restart.
//!
//! The traces are committed in `clients/js/tests/traces/replica.json`; this test fails
//! when the replica's behaviour no longer matches them. After a deliberate change of the
//! replica (or the room), regenerate them with
//! `KALPHITE_WRITE_TRACES=1 cargo test -p kalphite-sync --test replica_traces` and run
//! `npm test` in `clients/js`, which replays them against the TypeScript replica.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use kalphite::{AnyEntity, Change, Entity, Op, Origin};
use kalphite_sync::{
    ClientMessage, ConflictPolicy, ConnId, EntityKey, Recipient, Replica, ReplicaConfig,
    ReplicaEvent, ReplicaState, Room, RoomLimits, RoomMeta, ServerMessage, Step, Strategy,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const ROOM: &str = "trace";
const IDS: [&str; 4] = ["a", "b", "c", "d"];
const SEEDS: u64 = 12;
const STEPS: usize = 120;

fn config(replica: &str, user: &str) -> ReplicaConfig {
    let mut c = ReplicaConfig::new(ROOM, user, replica);
    c.incarnation = 0xabc;
    c.resend_after = 100;
    c.heartbeat_interval = 1_000;
    c.outbox_limit = 3;
    c
}

fn new_room(epoch: &str) -> Room {
    Room::new(ROOM, ConflictPolicy::new(Strategy::FieldMerge))
        .with_meta(RoomMeta::new(epoch))
        .with_limits(RoomLimits {
            catch_up_page: 2,
            tombstone_versions: 6,
            tombstone_age: 0,
            ..RoomLimits::default()
        })
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("wire types serialize")
}

fn change_json(c: &Change) -> Value {
    json!({
        "operation": if c.op == Op::Upsert { "upsert" } else { "delete" },
        "entityType": c.kind.to_string(),
        "entityId": c.id.to_string(),
        "entity": c.entity.as_ref().map(|e| to_value(&e.to_json().expect("json"))),
        "timestamp": c.timestamp,
    })
}

fn keys_json(keys: &[EntityKey]) -> Value {
    keys.iter()
        .map(|k| json!({"kind": k.kind.to_string(), "id": k.id.to_string()}))
        .collect()
}

fn event_json(e: &ReplicaEvent) -> Value {
    match e {
        ReplicaEvent::Connected { room_version } => {
            json!({"type": "connected", "roomVersion": room_version})
        }
        ReplicaEvent::CaughtUp { version } => json!({"type": "caughtUp", "version": version}),
        ReplicaEvent::Acked {
            message_id,
            version,
        } => json!({"type": "acked", "messageId": message_id, "version": version}),
        ReplicaEvent::Conflict(c) => json!({"type": "conflict", "refersTo": c.refers_to}),
        ReplicaEvent::Rejected { change, code, .. } => {
            json!({"type": "rejected", "messageId": change.message_id, "code": code})
        }
        ReplicaEvent::Resynced {
            snapshot,
            resend,
            dropped,
        } => json!({"type": "resynced", "snapshot": snapshot, "resend": keys_json(resend),
                     "dropped": keys_json(dropped)}),
        ReplicaEvent::ServerError {
            code, refers_to, ..
        } => json!({"type": "serverError", "code": code, "refersTo": refers_to}),
        other => json!({"type": format!("{other:?}")}),
    }
}

/// The replica's persistent state, hashes aside (each side hashes its own way).
fn state_json(r: &Replica) -> Value {
    let s = r.state();
    let mut known: Vec<(String, String, Value)> = s
        .known
        .iter()
        .map(|(k, v)| {
            (
                k.kind.to_string(),
                k.id.to_string(),
                json!({"version": v.version, "vector": v.vector}),
            )
        })
        .collect();
    known.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let outbox: Vec<Value> = s
        .outbox
        .iter()
        .map(|(k, e)| {
            json!([k.kind.to_string(), k.id.to_string(), {
                "message": to_value(&e.message),
                "firstSeq": e.first_seq,
                "held": e.held.as_ref().map(|h| json!({"version": h.version, "state": h.state})),
            }])
        })
        .collect();
    json!({
        "nextSeq": s.next_seq,
        "watermark": s.watermark,
        "receivedAbove": s.received_above,
        "epoch": s.epoch,
        "resyncing": s.resyncing,
        "known": known.into_iter().map(|(kind, id, v)| json!([kind, id, v])).collect::<Vec<_>>(),
        "outbox": outbox,
        "link": format!("{:?}", r.link()).to_lowercase(),
        "ackedThrough": r.acked_through(),
    })
}

/// One run: replica A (traced) and B (a helper) against a room over a lossy link to A.
/// A's local store, by (kind, id).
type Store = BTreeMap<(String, String), Entity<Value>>;

struct Run {
    rng: StdRng,
    room: Room,
    epochs: u32,
    now: u64,
    a: Replica,
    /// A's persisted state: every `take_delta` applied in order (what a restart reads).
    a_disk: ReplicaState,
    /// A's persisted state and store after each step: a crash can lose the last flushes,
    /// so a restart may read one of these instead of the latest.
    a_disks: Vec<(ReplicaState, Store)>,
    /// A's process starts so far (each run has an incarnation of its own).
    a_starts: u64,
    a_conn: Option<ConnId>,
    a_inbox: VecDeque<ServerMessage>,
    a_store: Store,
    b: Replica,
    b_conn: Option<ConnId>,
    next_conn: ConnId,
    trace: Vec<Value>,
}

impl Run {
    fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            room: new_room("e0"),
            epochs: 0,
            now: 1_000,
            a: Replica::new(config("ra", "alice")),
            a_disk: ReplicaState::default(),
            a_disks: Vec::new(),
            a_starts: 0,
            a_conn: None,
            a_inbox: VecDeque::new(),
            a_store: BTreeMap::new(),
            b: Replica::new(config("rb", "bob")),
            b_conn: None,
            next_conn: 1,
            trace: Vec::new(),
        }
    }

    fn record(&mut self, input: Value, output: Value) {
        self.a_disk.apply_delta(self.a.take_delta());
        let mut step = serde_json::Map::new();
        step.insert("input".into(), input);
        step.insert("output".into(), output);
        step.insert("state".into(), state_json(&self.a));
        self.trace.push(Value::Object(step));
        self.a_disks
            .push((self.a_disk.clone(), self.a_store.clone()));
    }

    /// A client message reaches the room; what the room answers is routed.
    fn deliver(&mut self, conn: ConnId, message: ClientMessage) {
        let outs = match message {
            ClientMessage::Hello(hello) => {
                let user = if Some(conn) == self.a_conn {
                    "alice"
                } else {
                    "bob"
                };
                self.room
                    .join(conn, user, &hello, self.now)
                    .unwrap_or_default()
            }
            other => match self.room.handle(conn, other, self.now) {
                Step::Reply(outs) => outs,
                Step::Persist(pending) => {
                    let outs = self.room.commit(pending).expect("own pending");
                    let _ = self.room.collect_due(self.now);
                    outs
                }
            },
        };
        for out in outs {
            let to: Vec<ConnId> = match out.to {
                Recipient::One(c) => vec![c],
                Recipient::AllExcept(c) => [self.a_conn, self.b_conn]
                    .into_iter()
                    .flatten()
                    .filter(|m| *m != c)
                    .collect(),
            };
            for c in to {
                if Some(c) == self.a_conn {
                    self.a_inbox.push_back(out.message.clone());
                } else if Some(c) == self.b_conn {
                    let handled = self.b.handle(out.message.clone(), self.now);
                    for m in handled.send {
                        self.deliver(c, m);
                    }
                }
            }
        }
    }

    fn a_sends(&mut self, messages: Vec<ClientMessage>) -> Value {
        let json: Vec<Value> = messages.iter().map(to_value).collect();
        if let Some(conn) = self.a_conn {
            for m in messages {
                // The link loses one message in ten.
                if self.rng.random_range(0..10) > 0 {
                    self.deliver(conn, m);
                }
            }
        }
        Value::Array(json)
    }

    fn a_local(&mut self, change: &Change) {
        let input = json!({"op": "local", "change": change_json(change), "now": self.now});
        let result = self.a.local_change(change, self.now);
        let key = (change.kind.to_string(), change.id.to_string());
        match &change.entity {
            Some(e) => {
                self.a_store.insert(key, e.to_json().expect("json"));
            }
            None => {
                self.a_store.remove(&key);
            }
        }
        let output = match result {
            Ok(send) => json!({"send": self.a_sends(send)}),
            Err(e) => json!({"error": e.to_string()}),
        };
        self.record(input, output);
    }

    fn a_handle(&mut self, message: ServerMessage) {
        let input = json!({"op": "handle", "message": to_value(&message), "now": self.now});
        let out = self.a.handle(message, self.now);
        for c in &out.apply {
            let key = (c.kind.to_string(), c.id.to_string());
            match &c.entity {
                Some(e) => {
                    self.a_store.insert(key, e.to_json().expect("json"));
                }
                None => {
                    self.a_store.remove(&key);
                }
            }
        }
        let output = json!({
            "send": self.a_sends(out.send),
            "apply": out.apply.iter().map(change_json).collect::<Vec<_>>(),
            "events": out.events.iter().map(event_json).collect::<Vec<_>>(),
        });
        let resend: Vec<EntityKey> = out
            .events
            .iter()
            .filter_map(|e| match e {
                ReplicaEvent::Resynced { resend, .. } => Some(resend.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        self.record(input, output);
        for key in resend {
            let Some(entity) = self
                .a_store
                .get(&(key.kind.to_string(), key.id.to_string()))
                .cloned()
            else {
                continue;
            };
            let input = json!({"op": "resend", "entity": entity, "now": self.now});
            let send = self.a.resend(entity, self.now).expect("resend");
            let output = json!({"send": self.a_sends(send)});
            self.record(input, output);
        }
    }

    fn a_disconnects(&mut self) {
        if let Some(conn) = self.a_conn.take() {
            self.room.leave(conn);
            self.a_inbox.clear();
            self.a.disconnected();
            self.record(json!({"op": "disconnected"}), json!({}));
        }
    }

    /// A's process stops (its connection with it) and starts again, as a new incarnation,
    /// from what it persisted; half the time a crash lost its last few flushes, so it
    /// starts from the state of a few steps back (what it had sent since, the room keeps).
    fn a_restarts(&mut self) {
        if let Some(conn) = self.a_conn.take() {
            self.room.leave(conn);
            self.a_inbox.clear();
        }
        let latest = self.a_disks.len().checked_sub(1);
        let from = latest.map(|last| {
            if self.rng.random_bool(0.5) {
                last.saturating_sub(self.rng.random_range(1..8))
            } else {
                last
            }
        });
        if let Some(from) = from {
            let (disk, store) = self.a_disks[from].clone();
            self.a_disk = disk;
            self.a_store = store;
        }
        self.a_starts += 1;
        let mut config = config("ra", "alice");
        config.incarnation += self.a_starts;
        self.a = Replica::restore(config.clone(), self.a_disk.clone());
        self.record(
            json!({"op": "restart", "incarnation": config.incarnation, "from": from}),
            json!({}),
        );
    }

    /// Whoever is offline connects.
    fn connect(&mut self) {
        self.a_connects();
        self.b_connects();
    }

    fn a_connects(&mut self) {
        if self.a_conn.is_none() {
            let conn = self.next_conn;
            self.next_conn += 1;
            self.a_conn = Some(conn);
            let hello = self.a.connect(self.now);
            let send = vec![hello];
            self.record(
                json!({"op": "connect", "now": self.now}),
                json!({"send": send.iter().map(to_value).collect::<Vec<_>>()}),
            );
            for m in send {
                self.deliver(conn, m);
            }
        }
    }

    fn b_connects(&mut self) {
        if self.b_conn.is_none() {
            let conn = self.next_conn;
            self.next_conn += 1;
            self.b_conn = Some(conn);
            let hello = self.b.connect(self.now);
            self.deliver(conn, hello);
        }
    }

    fn b_writes(&mut self, change: &Change) {
        if let Ok(send) = self.b.local_change(change, self.now)
            && let Some(conn) = self.b_conn
        {
            for m in send {
                self.deliver(conn, m);
            }
        }
    }

    /// A takes in up to `n` of the messages waiting for it, in order.
    fn a_receives(&mut self, n: usize) {
        for _ in 0..n {
            let Some(message) = self.a_inbox.pop_front() else {
                return;
            };
            self.a_handle(message);
        }
    }

    fn entity(&mut self, kind: &str) -> Change {
        let id = IDS[self.rng.random_range(0..IDS.len())];
        let mut data = serde_json::Map::new();
        for field in ["x", "y"] {
            if self.rng.random_bool(0.6) {
                data.insert(field.into(), json!(self.rng.random_range(0..4)));
            }
        }
        let at = self.now;
        Change::upsert(
            AnyEntity::new(Arc::new(Entity::new(id, kind, Value::Object(data)).at(at))),
            at,
            Origin::Local,
        )
    }

    fn step(&mut self) {
        self.now += self.rng.random_range(1..60);
        match self.rng.random_range(0..100) {
            0..20 => {
                // Now and then a kind the room refuses for good.
                let kind = if self.rng.random_range(0..12) == 0 {
                    "_kalphite_x"
                } else {
                    "todo"
                };
                let change = self.entity(kind);
                self.a_local(&change);
            }
            20..25 => {
                let id = IDS[self.rng.random_range(0..IDS.len())];
                let change = Change::delete("todo".into(), id.into(), self.now, Origin::Local);
                self.a_local(&change);
            }
            25..37 => {
                let change = self.entity("todo");
                self.b_writes(&change);
            }
            37..75 => {
                if let Some(message) = self.a_inbox.pop_front() {
                    match self.rng.random_range(0..20) {
                        0 => {} // lost
                        1 => {
                            // Delivered twice.
                            self.a_handle(message.clone());
                            self.a_handle(message);
                        }
                        2 if !self.a_inbox.is_empty() => {
                            // Overtaken by the next one.
                            let next = self.a_inbox.pop_front().expect("not empty");
                            self.a_handle(next);
                            self.a_handle(message);
                        }
                        _ => self.a_handle(message),
                    }
                }
            }
            75..85 => {
                let input = json!({"op": "tick", "now": self.now});
                let send = self.a.tick(self.now);
                let output = json!({"send": self.a_sends(send)});
                self.record(input, output);
                let send = self.b.tick(self.now);
                if let Some(conn) = self.b_conn {
                    for m in send {
                        self.deliver(conn, m);
                    }
                }
            }
            85..89 => self.a_disconnects(),
            89..91 => self.a_restarts(),
            91..98 => self.connect(),
            _ => self.room_lost(),
        }
    }

    /// The server's database is lost: an empty room with a new epoch.
    fn room_lost(&mut self) {
        self.epochs += 1;
        self.room = new_room(&format!("e{}", self.epochs));
        if self.a_conn.take().is_some() {
            self.a_inbox.clear();
            self.a.disconnected();
            self.record(json!({"op": "disconnected"}), json!({}));
        }
        if self.b_conn.take().is_some() {
            self.b.disconnected();
        }
    }

    /// B writes `a`, deletes it, and writes `b`, `c`, `d` three times over, so that `a`'s
    /// tombstone is collected and a catch-up from 0 is a snapshot of pages of 2.
    fn b_writes_past_a_collected_delete(&mut self, a_seen: impl FnOnce(&mut Self)) {
        let a = Entity::new("a", "todo", json!({"x": 1})).at(self.now);
        self.b_writes(&Change::upsert(
            AnyEntity::new(Arc::new(a)),
            self.now,
            Origin::Local,
        ));
        a_seen(self);
        self.now += 10;
        self.b_writes(&Change::delete(
            "todo".into(),
            "a".into(),
            self.now,
            Origin::Local,
        ));
        for n in 0..3 {
            for id in ["b", "c", "d"] {
                self.now += 10;
                let e = Entity::new(id, "todo", json!({"x": n})).at(self.now);
                self.b_writes(&Change::upsert(
                    AnyEntity::new(Arc::new(e)),
                    self.now,
                    Origin::Local,
                ));
            }
        }
        let horizon = self.room.meta().map_or(0, |m| m.collected_through);
        assert!(horizon >= 2, "a's tombstone is collected: {horizon}");
    }
}

/// A is away while `a` is deleted and its tombstone collected, so it gets a snapshot
/// (catch-up pages of 2 entities); the first is cut after its first page by a disconnect,
/// the second by a restart; the third ends and drops `a`. (The cluster simulation found a
/// replica that then caught up incrementally from past the horizon and kept `a` for good.)
fn interrupted_snapshot() -> Value {
    let mut run = Run::new(0);
    run.connect();
    run.b_writes_past_a_collected_delete(|run| {
        run.a_receives(usize::MAX);
        run.a_disconnects();
    });
    let horizon = run.room.meta().map_or(0, |m| m.collected_through);
    // The welcome and the first of two pages, then the link drops.
    run.connect();
    run.a_receives(2);
    assert!(run.a.watermark() > horizon && run.a.state().resyncing);
    run.a_disconnects();
    run.now += 10;
    // Again, then the process stops.
    run.connect();
    run.a_receives(2);
    run.a_restarts();
    run.now += 10;
    run.connect();
    run.a_receives(usize::MAX);
    assert!(!run.a.state().resyncing);
    assert_eq!(run.a.watermark(), run.room.version());
    assert!(
        !run.a_store
            .contains_key(&("todo".to_owned(), "a".to_owned()))
    );
    json!({"seed": "interrupted snapshot", "steps": run.trace})
}

/// A replica that never stored an epoch joins a room that has collected (a snapshot), is
/// cut off after the first page, and the room is then lost: the empty epoch it stored
/// while resyncing matches no room, so it resyncs with the new one (from 0, clocks
/// reduced to its own counters) instead of taking the lost room's versions for the new's.
fn interrupted_first_snapshot_then_room_lost() -> Value {
    let mut run = Run::new(1);
    run.b_connects();
    run.b_writes_past_a_collected_delete(|_| {});
    let change = run.entity("todo");
    run.a_local(&change);
    run.a_connects();
    run.a_receives(2);
    assert_eq!(run.a.state().epoch.as_deref(), Some(""));
    run.room_lost();
    run.now += 10;
    run.connect();
    run.a_receives(usize::MAX);
    assert!(!run.a.state().resyncing);
    assert_eq!(run.a.state().epoch.as_deref(), Some("e1"));
    json!({"seed": "first snapshot interrupted, room lost", "steps": run.trace})
}

fn traces() -> Value {
    let mut runs: Vec<Value> = (0..SEEDS)
        .map(|seed| {
            let mut run = Run::new(seed);
            for _ in 0..STEPS {
                run.step();
            }
            json!({"seed": seed, "steps": run.trace})
        })
        .collect();
    runs.push(interrupted_snapshot());
    runs.push(interrupted_first_snapshot_then_room_lost());
    let c = config("ra", "alice");
    json!({
        "about": "Generated by crates/kalphite-sync/tests/replica_traces.rs; replayed by clients/js/tests/traces.test.mjs",
        "config": {"roomId": c.room_id, "userId": c.user_id, "replicaId": c.replica_id,
                   "incarnation": c.incarnation, "resendAfter": c.resend_after,
                   "heartbeatInterval": c.heartbeat_interval, "outboxLimit": c.outbox_limit},
        "runs": runs,
    })
}

#[test]
fn replica_traces_match_the_committed_ones() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../clients/js/tests/traces/replica.json");
    let fresh = traces();
    let text = format!("{}\n", serde_json::to_string(&fresh).expect("json"));
    if std::env::var_os("KALPHITE_WRITE_TRACES").is_some() {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("traces dir");
        std::fs::write(&path, text).expect("write traces");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let committed: Value = serde_json::from_str(&committed).unwrap_or(Value::Null);
    assert!(
        committed == fresh,
        "the replica's traces differ from {}: after a deliberate change of the replica or the \
         room, regenerate them (KALPHITE_WRITE_TRACES=1 cargo test -p kalphite-sync --test \
         replica_traces) and check the TypeScript replica against them (npm test in clients/js)",
        path.display()
    );
}
