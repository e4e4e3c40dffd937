//! Regression (found by the cluster simulation, `cluster_simulation.rs` seed 1008): a
//! change whose ack was lost, resent after its entity's tombstone was collected, was
//! answered `internal: acknowledged entity not found` for ever. The room still had its
//! message id in the deduplication window (a room rebuilt from its log remembers the
//! message id of every current record, however old), so it tried to re-ack it with the
//! entity's current state, which was gone. The replica kept the change queued and resent
//! it on every timeout and reconnect; it never drained. A collected entity's message ids
//! now leave the window with it: the resend is an ordinary change of an entity the room
//! does not know (docs/sync.md §6), and is acknowledged.

use std::sync::Arc;

use kalphite::{AnyEntity, Change, Entity, Origin};
use kalphite_sync::{
    ClientMessage, ConflictPolicy, Recipient, Replica, ReplicaConfig, Room, RoomLimits, RoomMeta,
    ServerMessage, Step,
};
use serde_json::json;

const NOW: u64 = 1_000_000;

fn room() -> Room {
    Room::new("r", ConflictPolicy::default())
        .with_limits(RoomLimits {
            tombstone_versions: 2,
            tombstone_age: 0,
            ..RoomLimits::default()
        })
        .with_meta(RoomMeta::new("e1"))
}

/// Hands `msg` from connection `conn` to the room (persisting at once) and returns what
/// the room sends to `conn`.
fn send(room: &mut Room, conn: u64, user: &str, msg: ClientMessage) -> Vec<ServerMessage> {
    let outs = match msg {
        ClientMessage::Hello(hello) => room.join(conn, user, &hello, NOW).expect("joins"),
        other => match room.handle(conn, other, NOW) {
            Step::Reply(outs) => outs,
            Step::Persist(pending) => room.commit(pending).expect("own pending"),
        },
    };
    outs.into_iter()
        .filter(|o| o.to == Recipient::One(conn))
        .map(|o| o.message)
        .collect()
}

/// Runs `msgs` of `replica` (on `conn`) through the room until nothing moves.
fn exchange(room: &mut Room, replica: &mut Replica, conn: u64, msgs: Vec<ClientMessage>) {
    let user = replica.config().user_id.clone();
    let mut queue = msgs;
    let mut handled = 0;
    while let Some(msg) = queue.pop() {
        // Without the fix the replica resends at once on each `internal` error: bounded.
        handled += 1;
        assert!(handled < 100, "the exchange does not end: {msg:?}");
        for reply in send(room, conn, &user, msg) {
            queue.extend(replica.handle(reply, NOW).send);
        }
    }
}

fn upsert(replica: &mut Replica, id: &str, title: &str) -> Vec<ClientMessage> {
    let entity = Entity::new(id, "todo", json!({ "title": title })).at(NOW);
    let change = Change::upsert(AnyEntity::new(Arc::new(entity)), NOW, Origin::Local);
    replica.local_change(&change, NOW).expect("queued")
}

fn acked_resend_after_collection(restart: bool) {
    let mut room = room();
    let mut alice = Replica::new(ReplicaConfig::new("r", "alice", "alice-replica"));
    let mut bob = Replica::new(ReplicaConfig::new("r", "bob", "bob-replica"));
    let hello = alice.connect(NOW);
    exchange(&mut room, &mut alice, 1, vec![hello]);
    let hello = bob.connect(NOW);
    exchange(&mut room, &mut bob, 2, vec![hello]);
    let sent = upsert(&mut alice, "x", "milk");
    exchange(&mut room, &mut alice, 1, sent);
    // Alice deletes x; the room stores the tombstone, but the ack is lost with her
    // connection.
    let change = Change::delete("todo".into(), "x".into(), NOW, Origin::Local);
    let sent = alice.local_change(&change, NOW).expect("queued");
    for msg in sent {
        let _lost = send(&mut room, 1, "alice", msg);
    }
    room.leave(1);
    alice.disconnected();
    assert_eq!(alice.outbox_len(), 1);
    // Bob writes on; the tombstone falls behind the horizon and is collected (after a
    // restart from the log, too: the rebuilt window holds the tombstone's message id).
    for i in 0..3 {
        let sent = upsert(&mut bob, "y", &format!("bread {i}"));
        exchange(&mut room, &mut bob, 2, sent);
    }
    if restart {
        let mut records: Vec<_> = ["x", "y"]
            .iter()
            .filter_map(|id| {
                room.get(&kalphite_sync::EntityKey::new("todo", *id))
                    .cloned()
            })
            .collect();
        records.sort_by_key(|r| r.version);
        let meta = room.meta().expect("meta").clone();
        room = self::room()
            .with_meta(meta)
            .restore(records)
            .expect("restores");
    }
    let collected = room.collect_tombstones(NOW);
    assert_eq!(collected.len(), 1, "x's tombstone is collected");
    // Alice comes back and resends her delete: it is acknowledged, and her outbox drains.
    let hello = alice.connect(NOW);
    exchange(&mut room, &mut alice, 3, vec![hello]);
    assert_eq!(alice.outbox_len(), 0, "the resent delete is acknowledged");
    assert_eq!(alice.watermark(), room.version());
    assert!(room.entities().all(|e| e.id.as_str() != "x"));
}

#[test]
fn a_resend_after_its_tombstone_was_collected_is_acknowledged() {
    acked_resend_after_collection(false);
}

#[test]
fn a_resend_after_a_restart_and_collection_is_acknowledged() {
    acked_resend_after_collection(true);
}
