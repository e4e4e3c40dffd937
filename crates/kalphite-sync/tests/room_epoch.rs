//! Room identity (issue 10, item 4) and tombstone collection (item 8), sans-IO: a room and
//! real replicas over a lossless in-memory network, each replica with a map standing for
//! its local store.
//!
//! Bugs pinned: a room whose history was lost (the server database deleted) came back at
//! version 0 and its clients never re-uploaded what they held — once the new room passed
//! a client's old watermark, that client skipped those versions for good; a room restored
//! from an older backup reused version numbers clients already held, and the entities it
//! no longer had stayed on the clients forever. And: tombstones were never collected; once
//! they are, a client older than the collection horizon must not miss the deletes.

use std::collections::BTreeMap;
use std::sync::Arc;

use kalphite::{AnyEntity, Change, Entity, Op, Origin};
use kalphite_sync::{
    ClientMessage, ConflictPolicy, EntityKey, Envelope, ErrorCode, HelloPayload, Outbound,
    PROTOCOL_VERSION, Recipient, Replica, ReplicaConfig, ReplicaEvent, Room, RoomLimits, RoomMeta,
    ServerMessage, Step, StoredChange,
};
use serde_json::{Value, json};

const ROOM: &str = "r";
/// The room's clock: far enough from 0 that tombstone ages and clamped times are real.
const NOW: u64 = 1_000_000;

/// One client: its replica, its connection id, its local store.
struct Client {
    conn: u64,
    replica: Replica,
    store: BTreeMap<EntityKey, Entity<Value>>,
}

impl Client {
    fn new(name: &str, conn: u64) -> Self {
        let config = ReplicaConfig::new(ROOM, name, format!("{name}-replica"));
        Self {
            conn,
            replica: Replica::new(config),
            store: BTreeMap::new(),
        }
    }

    /// A local edit: into the store, then into the replica (while offline it queues).
    fn put(&mut self, id: &str, title: &str, at: u64) -> Vec<ClientMessage> {
        let entity = Entity::new(id, "todo", json!({ "title": title })).at(at);
        self.store.insert(key(id), entity.clone());
        let change = Change::upsert(AnyEntity::new(Arc::new(entity)), at, Origin::Local);
        self.replica.local_change(&change, at).expect("queued")
    }

    fn delete(&mut self, id: &str, at: u64) -> Vec<ClientMessage> {
        self.store.remove(&key(id));
        let change = Change::delete("todo".into(), id.into(), at, Origin::Local);
        self.replica.local_change(&change, at).expect("queued")
    }

    fn titles(&self) -> BTreeMap<String, String> {
        self.store
            .iter()
            .map(|(k, e)| {
                (
                    k.id.to_string(),
                    e.data["title"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    /// Takes in one server message the way the client adapter does: the remote changes
    /// go into the store; after a resync, what the room lacks is sent back from the store.
    fn receive(
        &mut self,
        message: ServerMessage,
        events: &mut Vec<ReplicaEvent>,
    ) -> Vec<ClientMessage> {
        let out = self.replica.handle(message, NOW);
        for change in out.apply {
            assert_eq!(change.origin, Origin::Remote);
            let k = EntityKey::new(change.kind.clone(), change.id.clone());
            match (change.op, change.entity) {
                (Op::Upsert, Some(e)) => {
                    self.store.insert(k, e.to_json().expect("json"));
                }
                _ => {
                    self.store.remove(&k);
                }
            }
        }
        let mut send = out.send;
        for event in &out.events {
            if let ReplicaEvent::Resynced { resend, .. } = event {
                for k in resend {
                    if let Some(entity) = self.store.get(k).cloned() {
                        send.extend(self.replica.resend(entity, NOW).expect("resent"));
                    }
                }
            }
        }
        events.extend(out.events);
        send
    }
}

fn key(id: &str) -> EntityKey {
    EntityKey::new("todo", id)
}

/// The room and its clients, with every message delivered at once, in order.
struct Net {
    room: Room,
    /// Every record the room committed, by entity (what the server's log holds).
    log: BTreeMap<EntityKey, StoredChange>,
    clients: Vec<Client>,
    events: Vec<Vec<ReplicaEvent>>,
    errors: Vec<ErrorCode>,
}

impl Net {
    fn new(room: Room, names: &[&str]) -> Self {
        let clients: Vec<Client> = names
            .iter()
            .enumerate()
            .map(|(i, n)| Client::new(n, i as u64 + 1))
            .collect();
        let events = clients.iter().map(|_| Vec::new()).collect();
        Self {
            room,
            log: BTreeMap::new(),
            clients,
            events,
            errors: Vec::new(),
        }
    }

    /// Connects client `i` and runs until nothing is left to deliver.
    fn connect(&mut self, i: usize) {
        let c = &mut self.clients[i];
        let ClientMessage::Hello(hello) = c.replica.connect(NOW) else {
            panic!("hello first")
        };
        let hello: Envelope<HelloPayload> = hello;
        let out = self
            .room
            .join(c.conn, &hello.user_id, &hello, NOW)
            .expect("joined");
        self.deliver(out);
    }

    fn disconnect(&mut self, i: usize) {
        let c = &mut self.clients[i];
        c.replica.disconnected();
        self.room.leave(c.conn);
    }

    /// Sends client `i`'s messages to the room, and everything that follows.
    fn send(&mut self, i: usize, messages: Vec<ClientMessage>) {
        let conn = self.clients[i].conn;
        let mut queue: Vec<(u64, ClientMessage)> =
            messages.into_iter().map(|m| (conn, m)).collect();
        while !queue.is_empty() {
            let mut next = Vec::new();
            for (conn, message) in queue {
                if !self.room.is_member(conn) {
                    continue;
                }
                let outs = match self.room.handle(conn, message, NOW) {
                    Step::Reply(outs) => outs,
                    Step::Persist(pending) => {
                        let record = pending.record().clone();
                        let outs = self.room.commit(pending).expect("commit");
                        self.log.insert(record.key(), record);
                        outs
                    }
                };
                next.extend(self.route(outs));
            }
            queue = next;
        }
    }

    fn deliver(&mut self, outs: Vec<Outbound>) {
        let replies = self.route(outs);
        let mut by_client: Vec<(usize, Vec<ClientMessage>)> = Vec::new();
        for (conn, m) in replies {
            let i = self.index(conn);
            by_client.push((i, vec![m]));
        }
        for (i, ms) in by_client {
            self.send(i, ms);
        }
    }

    fn index(&self, conn: u64) -> usize {
        self.clients
            .iter()
            .position(|c| c.conn == conn)
            .expect("client")
    }

    /// Hands each outbound message to its recipients; returns what they answer.
    fn route(&mut self, outs: Vec<Outbound>) -> Vec<(u64, ClientMessage)> {
        let mut replies = Vec::new();
        for out in outs {
            if let ServerMessage::Error(e) = &out.message {
                self.errors.push(e.payload.code);
            }
            let targets: Vec<usize> = match out.to {
                Recipient::One(conn) => vec![self.index(conn)],
                Recipient::AllExcept(conn) => (0..self.clients.len())
                    .filter(|&i| {
                        self.clients[i].conn != conn && self.room.is_member(self.clients[i].conn)
                    })
                    .collect(),
            };
            for i in targets {
                let conn = self.clients[i].conn;
                let sent = self.clients[i].receive(out.message.clone(), &mut self.events[i]);
                replies.extend(sent.into_iter().map(|m| (conn, m)));
            }
        }
        replies
    }

    /// Local edit by client `i`, sent if connected.
    fn put(&mut self, i: usize, id: &str, title: &str, at: u64) {
        let out = self.clients[i].put(id, title, at);
        self.send(i, out);
    }

    fn delete(&mut self, i: usize, id: &str, at: u64) {
        let out = self.clients[i].delete(id, at);
        self.send(i, out);
    }

    fn room_titles(&self) -> BTreeMap<String, String> {
        self.room
            .entities()
            .map(|e| {
                (
                    e.id.to_string(),
                    e.data["title"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    /// The room's records in version order (what a server restart or restore reads).
    fn records(&self) -> Vec<StoredChange> {
        let mut records: Vec<StoredChange> = self.log.values().cloned().collect();
        records.sort_by_key(|r| r.version);
        records
    }

    /// Replaces the room (a server restart on a lost, restored or kept database); every
    /// client is disconnected.
    fn replace_room(&mut self, room: Room) {
        for i in 0..self.clients.len() {
            self.clients[i].replica.disconnected();
        }
        self.room = room;
        self.log = self.room_records_from_scratch();
    }

    fn room_records_from_scratch(&self) -> BTreeMap<EntityKey, StoredChange> {
        // A replaced room's log is whatever it was restored from; rebuild it from its
        // catch-up (every current state, tombstones included).
        let mut log = BTreeMap::new();
        for page in self.room.catch_up(0) {
            for c in page.changes {
                let k = EntityKey::new(c.entity_type.clone(), c.entity_id.clone());
                if let Some(r) = self.room.get(&k) {
                    log.insert(k, r.clone());
                }
            }
        }
        log
    }

    fn resynced(&self, i: usize) -> Vec<&ReplicaEvent> {
        self.events[i]
            .iter()
            .filter(|e| matches!(e, ReplicaEvent::Resynced { .. }))
            .collect()
    }
}

fn room_with(epoch: &str) -> Room {
    Room::new(ROOM, ConflictPolicy::default()).with_meta(RoomMeta::new(epoch))
}

fn titles(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

#[test]
fn the_welcome_carries_the_epoch_and_another_epoch_catches_up_from_zero() {
    let mut net = Net::new(room_with("e1"), &["alice"]);
    net.connect(0);
    net.put(0, "a", "milk", NOW - 10);
    net.put(0, "b", "eggs", NOW - 9);
    let hello = |epoch: Option<&str>, last_version| {
        Envelope::new(
            "h",
            "bob",
            NOW,
            HelloPayload {
                protocol_version: PROTOCOL_VERSION,
                room_id: ROOM.into(),
                replica_id: "bob-replica".into(),
                last_version,
                token: None,
                epoch: epoch.map(str::to_owned),
            },
        )
    };
    let welcome = |out: &[Outbound]| match &out[0].message {
        ServerMessage::Welcome(w) => w.payload.clone(),
        other => panic!("welcome first, got {other:?}"),
    };
    // Same epoch: incremental.
    let w = welcome(
        &net.room
            .join(10, "bob", &hello(Some("e1"), 1), NOW)
            .unwrap(),
    );
    assert_eq!(
        (w.epoch.as_deref(), w.catch_up_from, w.snapshot),
        (Some("e1"), 1, false)
    );
    net.room.leave(10);
    // No epoch (a first sync, or a client from before epochs): as before.
    let w = welcome(&net.room.join(10, "bob", &hello(None, 1), NOW).unwrap());
    assert_eq!((w.catch_up_from, w.snapshot), (1, false));
    net.room.leave(10);
    // Another epoch: its lastVersion means nothing here, even though it is not ahead.
    let w = welcome(
        &net.room
            .join(10, "bob", &hello(Some("e0"), 1), NOW)
            .unwrap(),
    );
    assert_eq!(
        (w.epoch.as_deref(), w.catch_up_from, w.snapshot),
        (Some("e1"), 0, false)
    );
    net.room.leave(10);
    // A room rolled back on purpose tells clients of another epoch to take a snapshot.
    let mut meta = RoomMeta::new("e2");
    meta.rolled_back = true;
    let mut rolled = Room::new(ROOM, ConflictPolicy::default())
        .with_meta(meta)
        .restore(net.records())
        .unwrap();
    let w = welcome(&rolled.join(10, "bob", &hello(Some("e1"), 2), NOW).unwrap());
    assert_eq!(
        (w.epoch.as_deref(), w.catch_up_from, w.snapshot),
        (Some("e2"), 0, true)
    );
    rolled.leave(10);
    // ... but not clients already of its epoch.
    let w = welcome(&rolled.join(10, "bob", &hello(Some("e2"), 2), NOW).unwrap());
    assert_eq!((w.catch_up_from, w.snapshot), (2, false));
    // The replica remembers the epoch once its catch-up is complete, and says it.
    assert_eq!(net.clients[0].replica.state().epoch.as_deref(), Some("e1"));
    net.disconnect(0);
    let ClientMessage::Hello(h) = net.clients[0].replica.connect(NOW) else {
        panic!()
    };
    assert_eq!(h.payload.epoch.as_deref(), Some("e1"));
}

#[test]
fn a_lost_room_is_rebuilt_from_its_clients() {
    let mut net = Net::new(room_with("e1"), &["alice", "bob"]);
    net.connect(0);
    net.connect(1);
    net.put(0, "a", "milk", NOW - 100);
    net.put(1, "b", "eggs", NOW - 99);
    net.put(0, "c", "bread", NOW - 98);
    net.delete(1, "c", NOW - 97);
    // Bob goes offline; alice edits "a" again, so bob holds an older "a".
    net.disconnect(1);
    net.put(0, "a", "oat milk", NOW - 50);
    // Bob edits offline: a pending change.
    net.clients[1].put("d", "jam", NOW - 40);
    assert_eq!(net.room.version(), 5);
    let before_alice = net.clients[0].titles();
    assert_eq!(before_alice, titles(&[("a", "oat milk"), ("b", "eggs")]));

    // The server database is deleted: a new, empty room with a new epoch.
    net.replace_room(room_with("e2"));
    // The client holding the older "a" reconnects first and sends it back...
    net.connect(1);
    assert_eq!(net.resynced(1).len(), 1);
    assert_eq!(
        net.room_titles(),
        titles(&[("a", "milk"), ("b", "eggs"), ("d", "jam")])
    );
    // ...then the one holding the newer "a": that state is not lost, whatever order the
    // clients came back in (it is sent back as a concurrent edit; the later one wins).
    net.connect(0);
    let expected = titles(&[("a", "oat milk"), ("b", "eggs"), ("d", "jam")]);
    assert_eq!(net.room_titles(), expected);
    for c in &net.clients {
        assert_eq!(
            c.titles(),
            expected,
            "every client holds the room's entities"
        );
        assert_eq!(c.replica.outbox_len(), 0);
        assert_eq!(c.replica.watermark(), net.room.version());
        assert_eq!(c.replica.state().epoch.as_deref(), Some("e2"));
    }
    assert!(net.errors.is_empty(), "no refusals: {:?}", net.errors);
    // Once resynced, a reconnect is incremental again.
    net.disconnect(1);
    net.connect(1);
    assert_eq!(net.resynced(1).len(), 1, "no second resync");
}

/// A room restored from an older backup. Without the rollback mark, clients send back
/// what they hold that the backup lacks; with it, they drop it — except edits they made
/// offline after their last sync, which are new work.
fn restore_from_backup(rollback: bool) -> Net {
    let mut net = Net::new(room_with("e1"), &["alice", "bob"]);
    net.connect(0);
    net.connect(1);
    net.put(0, "a", "milk", NOW - 100);
    net.put(1, "b", "eggs", NOW - 99);
    let backup = net.records();
    net.put(0, "c", "after the backup", NOW - 90);
    net.put(1, "a", "edited after the backup", NOW - 89);
    net.disconnect(1);
    net.clients[1].put("d", "offline edit", NOW - 80);
    let mut meta = RoomMeta::new("e2");
    meta.rolled_back = rollback;
    let restored = Room::new(ROOM, ConflictPolicy::default())
        .with_meta(meta)
        .restore(backup)
        .unwrap();
    net.replace_room(restored);
    net.connect(0);
    net.connect(1);
    net
}

#[test]
fn a_restored_room_gets_back_what_clients_hold() {
    let net = restore_from_backup(false);
    let expected = titles(&[
        ("a", "edited after the backup"),
        ("b", "eggs"),
        ("c", "after the backup"),
        ("d", "offline edit"),
    ]);
    assert_eq!(net.room_titles(), expected);
    for c in &net.clients {
        assert_eq!(c.titles(), expected);
    }
    assert!(net.errors.is_empty(), "{:?}", net.errors);
}

#[test]
fn a_rolled_back_room_makes_clients_drop_what_it_lacks() {
    let net = restore_from_backup(true);
    // The backup's states win; "c" (written after the backup) is dropped everywhere; the
    // offline edit made after bob's last sync is new work and still arrives.
    let expected = titles(&[("a", "milk"), ("b", "eggs"), ("d", "offline edit")]);
    assert_eq!(net.room_titles(), expected);
    for (i, c) in net.clients.iter().enumerate() {
        assert_eq!(c.titles(), expected, "client {i}");
        assert_eq!(c.replica.outbox_len(), 0);
    }
    let ReplicaEvent::Resynced {
        snapshot, dropped, ..
    } = net.resynced(0)[0]
    else {
        unreachable!()
    };
    assert!(*snapshot);
    assert_eq!(dropped, &vec![key("c")]);
}

#[test]
fn tombstones_past_the_horizon_are_collected_and_older_clients_get_a_snapshot() {
    let limits = RoomLimits {
        tombstone_versions: 3,
        tombstone_age: 1_000,
        ..RoomLimits::default()
    };
    let mut net = Net::new(
        room_with("e1").with_limits(limits),
        &["alice", "bob", "carol"],
    );
    for i in 0..3 {
        net.connect(i);
    }
    for n in 0..6 {
        net.put(0, &format!("t{n}"), "x", NOW - 10_000 + n);
    }
    // Bob stops here (version 6); carol stays.
    net.disconnect(1);
    for n in 0..4 {
        net.delete(0, &format!("t{n}"), NOW - 5_000 + n);
    }
    net.put(0, "fresh", "y", NOW - 4_000);
    // Too recent to collect: the newest tombstones are fewer than 3 versions old, and
    // none at all before they are old enough.
    assert!(
        net.room.collect_tombstones(NOW - 4_500).is_empty(),
        "too young"
    );
    let collected = net.room.collect_tombstones(NOW);
    let ids: Vec<String> = collected.iter().map(|r| r.id.to_string()).collect();
    // Versions 7..=10 are the deletes, 11 is "fresh": 7 and 8 are 3 or more behind.
    assert_eq!(ids, ["t0", "t1"]);
    assert!(net.room.get(&key("t0")).is_none(), "gone from memory");
    assert!(
        net.room.get(&key("t2")).is_some(),
        "inside the horizon: kept"
    );
    assert_eq!(net.room.meta().unwrap().collected_through, 8);
    assert!(
        net.room
            .catch_up(0)
            .iter()
            .all(|p| p.changes.iter().all(|c| c.entity_id.as_str() != "t0"))
    );

    // Bob (up to version 6, older than the horizon) gets a snapshot and drops what the
    // room no longer has, including the entities whose tombstones were collected.
    net.connect(1);
    let expected = titles(&[("fresh", "y"), ("t4", "x"), ("t5", "x")]);
    assert_eq!(net.room_titles(), expected);
    assert_eq!(net.clients[1].titles(), expected);
    let ReplicaEvent::Resynced {
        snapshot, dropped, ..
    } = net.resynced(1)[0]
    else {
        unreachable!()
    };
    assert!(*snapshot);
    assert_eq!(dropped, &vec![key("t0"), key("t1")]);
    // A client at 0 may hold states from acks received before any catch-up completed:
    // its full catch-up is a snapshot too.
    let ClientMessage::Hello(fresh) =
        Replica::new(ReplicaConfig::new(ROOM, "dave", "dave-r")).connect(NOW)
    else {
        panic!()
    };
    let out = net.room.join(99, "dave", &fresh, NOW).unwrap();
    let ServerMessage::Welcome(w) = &out[0].message else {
        panic!("welcome first")
    };
    assert_eq!((w.payload.catch_up_from, w.payload.snapshot), (0, true));
    net.room.leave(99);
    // Carol, at the room's version, catches up incrementally as before.
    let _ = net.clients[2].replica.take_delta();
    net.disconnect(2);
    net.connect(2);
    assert!(net.resynced(2).is_empty());
    assert_eq!(net.clients[2].titles(), expected);
    // Both forget the deletions the room forgot (up to its horizon), and keep the others.
    for i in [1, 2] {
        let known = &net.clients[i].replica.state().known;
        assert!(!known.contains_key(&key("t0")) && !known.contains_key(&key("t1")));
        assert!(known.contains_key(&key("t2")) && known.contains_key(&key("t3")));
    }
    let mut forgotten = net.clients[2].replica.take_delta().forgotten;
    forgotten.sort();
    assert_eq!(forgotten, [key("t0"), key("t1")], "persisted as removals");
    // Bob's clocks still count the same edits: editing a survivor is no conflict.
    net.put(1, "t4", "edited", NOW);
    assert_eq!(net.room.get(&key("t4")).unwrap().vector.iter().count(), 2);
    assert!(net.errors.is_empty(), "{:?}", net.errors);
}

#[test]
fn collection_runs_once_per_quarter_horizon() {
    let limits = RoomLimits {
        tombstone_versions: 8,
        tombstone_age: 0,
        ..RoomLimits::default()
    };
    let mut net = Net::new(room_with("e1").with_limits(limits), &["alice"]);
    net.connect(0);
    for n in 0..4 {
        net.put(0, &format!("t{n}"), "x", NOW - 100);
    }
    for n in 0..4 {
        net.delete(0, &format!("t{n}"), NOW - 90);
    }
    // Version 8: nothing is 8 versions old yet; the next look is 2 versions later.
    assert!(net.room.collect_due(NOW).is_empty());
    net.put(0, "u", "y", NOW - 80);
    assert!(net.room.collect_due(NOW).is_empty(), "not due at version 9");
    net.put(0, "v", "y", NOW - 79);
    // Version 10: due, but the tombstones (versions 5..=8) are not yet 8 versions old.
    assert!(net.room.collect_due(NOW).is_empty());
    for n in 0..4 {
        net.put(0, &format!("w{n}"), "z", NOW - 70);
    }
    // Version 14: due again; tombstones at 5 and 6 are 8 versions old.
    let ids: Vec<String> = net
        .room
        .collect_due(NOW)
        .iter()
        .map(|r| r.id.to_string())
        .collect();
    assert_eq!(ids, ["t0", "t1"]);
}

#[test]
fn a_room_rebuilt_after_collecting_keeps_what_the_tombstones_said_about_replicas() {
    let limits = RoomLimits {
        tombstone_versions: 1,
        tombstone_age: 0,
        ..RoomLimits::default()
    };
    let mut net = Net::new(room_with("e1").with_limits(limits), &["alice", "bob"]);
    net.connect(0);
    net.connect(1);
    net.put(1, "a", "x", NOW - 10);
    net.put(1, "a", "y", NOW - 9);
    net.delete(1, "a", NOW - 8);
    net.put(0, "b", "z", NOW - 7);
    let collected = net.room.collect_tombstones(NOW);
    assert_eq!(collected.len(), 1);
    for r in &collected {
        net.log.remove(&r.key());
    }
    let meta = net.room.meta().unwrap().clone();
    // Rebuilt from what is left of the log and the meta: bob-replica's counter (3) is
    // named only by the collected tombstone.
    let rebuilt = Room::new(ROOM, ConflictPolicy::default())
        .with_meta(meta)
        .restore(net.records())
        .unwrap();
    net.replace_room(rebuilt);
    net.connect(0);
    // Alice re-creates "a" on top of the tombstone she saw: her clock names bob's third
    // edit, which is honest, so it is not refused.
    net.put(0, "a", "again", NOW);
    assert!(net.errors.is_empty(), "{:?}", net.errors);
    assert_eq!(net.room_titles(), titles(&[("a", "again"), ("b", "z")]));
    // And bob-replica still belongs to bob.
    let mut config = ReplicaConfig::new(ROOM, "mallory", "bob-replica");
    config.incarnation = 1;
    let ClientMessage::Hello(h) = Replica::new(config).connect(NOW) else {
        panic!()
    };
    assert!(
        net.room.join(9, "mallory", &h, NOW).is_err(),
        "the replica id stays bound to bob"
    );
}
