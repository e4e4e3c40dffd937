//! End-to-end scenarios through real replicas and a room over an in-order network: two
//! users edit the same entity while offline, reconnect, and both end with the outcome the
//! strategy promises (not only the same outcome).

use std::collections::BTreeMap;
use std::sync::Arc;

use kalphite::{AnyEntity, Change, Entity, Origin};
use kalphite_sync::{
    ClientMessage, ConflictPayload, ConflictPolicy, EntityKey, Recipient, Replica, ReplicaConfig,
    ReplicaEvent, Room, ServerMessage, Step, Strategy, StrategyName,
};
use serde_json::{Value, json};

struct Client {
    replica: Replica,
    store: BTreeMap<EntityKey, Entity<Value>>,
    conflicts: Vec<ConflictPayload>,
}

/// A room and clients 1.. over a reliable, in-order network; connection id = index + 1.
struct World {
    room: Room,
    db_len: usize,
    clients: Vec<Client>,
    now: u64,
}

impl World {
    fn new(policy: ConflictPolicy, users: &[&str]) -> Self {
        let clients = users
            .iter()
            .map(|u| Client {
                replica: Replica::new(ReplicaConfig::new("r", *u, format!("{u}-device"))),
                store: BTreeMap::new(),
                conflicts: Vec::new(),
            })
            .collect();
        Self {
            room: Room::new("r", policy),
            db_len: 0,
            clients,
            now: 1_000,
        }
    }

    fn connect(&mut self, i: usize) {
        self.now += 1;
        let hello = self.clients[i].replica.connect(self.now);
        self.send(i, vec![hello]);
    }

    fn disconnect(&mut self, i: usize) {
        self.room.leave(i as u64 + 1);
        self.clients[i].replica.disconnected();
    }

    fn write(&mut self, i: usize, id: &str, data: Option<Value>) {
        self.now += 1;
        let key = EntityKey::new("todo", id);
        let c = &mut self.clients[i];
        let change = match data {
            Some(d) => {
                let e = Entity::new(id, "todo", d).at(self.now);
                c.store.insert(key, e.clone());
                Change::upsert(AnyEntity::new(Arc::new(e)), self.now, Origin::Local)
            }
            None => {
                c.store.remove(&key);
                Change::delete("todo".into(), id.into(), self.now, Origin::Local)
            }
        };
        let out = c.replica.local_change(&change, self.now).unwrap();
        self.send(i, out);
    }

    /// Delivers client messages to the room and everything that follows, in order.
    fn send(&mut self, from: usize, msgs: Vec<ClientMessage>) {
        let mut queue: Vec<(usize, ClientMessage)> = msgs.into_iter().map(|m| (from, m)).collect();
        while !queue.is_empty() {
            let (i, msg) = queue.remove(0);
            let conn = i as u64 + 1;
            let outs = match msg {
                ClientMessage::Hello(h) => {
                    let user = self.clients[i].replica.config().user_id.clone();
                    self.room.join(conn, &user, &h, self.now).unwrap()
                }
                other => match self.room.handle(conn, other, self.now) {
                    Step::Reply(outs) => outs,
                    Step::Persist(p) => {
                        self.db_len += 1;
                        self.room.commit(p).unwrap()
                    }
                },
            };
            for out in outs {
                let targets: Vec<u64> = match out.to {
                    Recipient::One(c) => vec![c],
                    Recipient::AllExcept(c) => self.room.members().filter(|m| *m != c).collect(),
                };
                for t in targets {
                    let j = usize::try_from(t - 1).unwrap();
                    for reply in self.receive(j, out.message.clone()) {
                        queue.push((j, reply));
                    }
                }
            }
        }
    }

    fn receive(&mut self, i: usize, msg: ServerMessage) -> Vec<ClientMessage> {
        let c = &mut self.clients[i];
        let out = c.replica.handle(msg, self.now);
        for change in out.apply {
            let key = EntityKey::new(change.kind.clone(), change.id.clone());
            match change.entity {
                Some(e) => c.store.insert(key, e.to_json().unwrap()),
                None => c.store.remove(&key),
            };
        }
        for e in out.events {
            if let ReplicaEvent::Conflict(p) = e {
                c.conflicts.push(*p);
            }
        }
        out.send
    }

    fn data(&self, i: usize, id: &str) -> Option<Value> {
        self.clients[i]
            .store
            .get(&EntityKey::new("todo", id))
            .map(|e| e.data.clone())
    }

    fn assert_converged(&self) {
        let room: BTreeMap<EntityKey, Entity<Value>> = self
            .room
            .entities()
            .map(|e| (EntityKey::new(e.kind.clone(), e.id.clone()), e.clone()))
            .collect();
        for (i, c) in self.clients.iter().enumerate() {
            assert_eq!(c.store, room, "client {i}");
            assert_eq!(c.replica.outbox_len(), 0, "client {i}");
        }
    }
}

/// Alice and Bob share `t1 = {title, done}`, go offline, edit it, and come back.
fn offline_edits(policy: ConflictPolicy, alice: Value, bob: Option<Value>) -> World {
    let mut w = World::new(policy, &["alice", "bob"]);
    w.connect(0);
    w.connect(1);
    w.write(0, "t1", Some(json!({"title": "milk", "done": false})));
    assert_eq!(
        w.data(1, "t1"),
        Some(json!({"title": "milk", "done": false}))
    );
    w.disconnect(0);
    w.disconnect(1);
    w.write(0, "t1", Some(alice));
    w.write(1, "t1", bob);
    w.connect(0);
    w.connect(1);
    w.assert_converged();
    w
}

#[test]
fn field_merge_keeps_both_users_edits() {
    let w = offline_edits(
        ConflictPolicy::new(Strategy::FieldMerge),
        json!({"title": "oat milk", "done": false}),
        Some(json!({"title": "milk", "done": true})),
    );
    assert_eq!(
        w.data(0, "t1"),
        Some(json!({"title": "oat milk", "done": true}))
    );
    assert_eq!(
        w.clients[1].conflicts.len(),
        1,
        "bob's change was the concurrent one"
    );
    assert_eq!(w.clients[1].conflicts[0].strategy, StrategyName::FieldMerge);
    assert!(w.clients[0].conflicts.is_empty());
}

#[test]
fn last_write_wins_keeps_the_later_edit_whole() {
    let w = offline_edits(
        ConflictPolicy::new(Strategy::LastWriteWins),
        json!({"title": "oat milk", "done": false}),
        Some(json!({"title": "milk", "done": true})),
    );
    assert_eq!(
        w.data(0, "t1"),
        Some(json!({"title": "milk", "done": true})),
        "bob wrote last"
    );
}

#[test]
fn a_later_delete_wins_over_an_offline_edit() {
    let w = offline_edits(
        ConflictPolicy::new(Strategy::FieldMerge),
        json!({"title": "oat milk", "done": false}),
        None,
    );
    assert_eq!(w.data(0, "t1"), None);
    assert_eq!(w.data(1, "t1"), None);
}

#[test]
fn manual_lets_the_app_pick_and_the_pick_is_synced() {
    let mut w = offline_edits(
        ConflictPolicy::new(Strategy::Manual),
        json!({"title": "oat milk", "done": false}),
        Some(json!({"title": "milk", "done": true})),
    );
    let conflict = w.clients[1].conflicts.pop().expect("bob is asked");
    assert_eq!(conflict.strategy, StrategyName::Manual);
    let theirs = conflict.theirs.entity.expect("alice's version").data;
    assert_eq!(theirs, json!({"title": "oat milk", "done": false}));
    // Bob's app shows both and Bob keeps Alice's title with his "done".
    w.write(1, "t1", Some(json!({"title": "oat milk", "done": true})));
    w.assert_converged();
    assert_eq!(
        w.data(0, "t1"),
        Some(json!({"title": "oat milk", "done": true}))
    );
    assert!(
        w.clients.iter().all(|c| c.conflicts.is_empty()),
        "the pick is not a new conflict"
    );
}

#[test]
fn sequential_edits_across_users_never_conflict() {
    let mut w = World::new(
        ConflictPolicy::new(Strategy::Manual),
        &["alice", "bob", "carol"],
    );
    for i in 0..3 {
        w.connect(i);
    }
    for round in 0..5 {
        let who = round % 3;
        w.write(who, "t1", Some(json!({"n": round})));
    }
    w.assert_converged();
    assert_eq!(w.data(2, "t1"), Some(json!({"n": 4})));
    assert!(w.clients.iter().all(|c| c.conflicts.is_empty()));
    assert_eq!(w.db_len, 5);
}

/// Regression: message ids repeated after any rollback of a client's persisted state (a
/// crash before the state was saved, a restored backup, a copied database). Ids were
/// `<replica>-<counter>`; the counter went back with the state, and the room, which
/// deduplicates on the id, acknowledged the client's next edit as a duplicate of an old
/// one without storing it. Every process start now has its own incarnation in the ids.
#[test]
fn a_client_whose_state_rolled_back_reuses_no_message_id() {
    let mut w = World::new(ConflictPolicy::default(), &["alice", "bob"]);
    let before = w.clients[0].replica.state().clone();
    w.connect(0);
    w.connect(1);
    w.write(0, "t1", Some(json!({"n": 1})));
    assert_eq!(w.db_len, 1);

    // Alice's process dies; what was persisted is the state from before her edit.
    w.disconnect(0);
    let mut config = w.clients[0].replica.config().clone();
    config.incarnation = 0x5eed;
    w.clients[0].replica = Replica::restore(config, before);
    w.connect(0);
    w.write(0, "t2", Some(json!({"n": 2})));

    assert_eq!(
        w.db_len, 2,
        "the new edit was stored, not taken for a duplicate"
    );
    assert_eq!(w.clients[0].replica.outbox_len(), 0);
    assert_eq!(w.data(1, "t2"), Some(json!({"n": 2})));
    w.assert_converged();
}

/// Alice's replica sends two edits of `t1` that the room stores, then her process dies
/// before her disk holds them: she restarts from the state before them and, offline,
/// edits `t1` again. Returns the world with Alice still offline.
fn alice_lost_two_sent_edits(policy: ConflictPolicy, users: &[&str]) -> World {
    let mut w = World::new(policy, users);
    for i in 0..users.len() {
        w.connect(i);
    }
    w.write(0, "t1", Some(json!({"title": "a", "n": 1})));
    let on_disk = w.clients[0].replica.state().clone();
    let store_on_disk = w.clients[0].store.clone();
    w.write(0, "t1", Some(json!({"title": "b", "n": 2})));
    w.write(0, "t1", Some(json!({"title": "c", "n": 3})));
    assert_eq!(w.db_len, 3);
    assert_eq!(w.data(1, "t1"), Some(json!({"title": "c", "n": 3})));

    w.disconnect(0);
    let mut config = w.clients[0].replica.config().clone();
    config.incarnation = 0x5eed;
    w.clients[0].replica = Replica::restore(config, on_disk);
    w.clients[0].store = store_on_disk;
    w.write(0, "t1", Some(json!({"title": "d", "n": 4})));
    w
}

#[test]
fn an_edit_built_on_a_crash_rolled_back_state_is_not_taken_for_known() {
    // Stamped from what her disk knew, the edit reused counters of the lost ones, so the
    // room took it for one it already had: it acknowledged it without applying it, and
    // Alice's replica put the lost state back over her edit. The welcome now names her
    // highest counter in the room, and her queued edit is restamped above it.
    for policy in [
        ConflictPolicy::new(Strategy::LastWriteWins),
        ConflictPolicy::new(Strategy::FieldMerge),
    ] {
        let mut w = alice_lost_two_sent_edits(policy, &["alice", "bob"]);
        w.connect(0);

        let latest = Some(json!({"title": "d", "n": 4}));
        assert_eq!(w.db_len, 4, "the new edit was stored");
        assert_eq!(w.data(0, "t1"), latest, "Alice keeps her latest edit");
        assert_eq!(w.data(1, "t1"), latest, "and Bob gets it");
        assert_eq!(w.clients[0].replica.outbox_len(), 0);
        w.assert_converged();
    }
}

#[test]
fn an_edit_of_the_state_a_rolled_back_edit_replaced_is_concurrent_with_it() {
    // Carol saw the state Alice lost ("c"), and changes only `n` while offline. Alice's
    // restamped edit is after the lost one and concurrent with Carol's, so the two merge
    // field by field: neither replaces the other's whole state.
    let mut w = alice_lost_two_sent_edits(
        ConflictPolicy::new(Strategy::FieldMerge),
        &["alice", "bob", "carol"],
    );
    w.disconnect(2);
    w.write(2, "t1", Some(json!({"title": "c", "n": 5})));
    w.connect(0);
    assert_eq!(w.data(1, "t1"), Some(json!({"title": "d", "n": 4})));
    w.connect(2);

    let merged = Some(json!({"title": "d", "n": 5}));
    assert_eq!(
        w.data(2, "t1"),
        merged,
        "Alice's title survives Carol's edit"
    );
    assert_eq!(w.data(0, "t1"), merged);
    w.assert_converged();
}
