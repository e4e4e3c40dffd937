//! A hostile member of a room against the other members' data. Each test pins a bug:
//! message ids deduplicated room-wide let a member pre-empt another replica's ids and have
//! that replica's real edits acknowledged and dropped; a replica id could be used by any
//! user; and a vector clock could claim edits the room never had, so that the victim's
//! later honest edits were judged "already incorporated" and swallowed. Every refusal is
//! a typed error with `refersTo`, and nothing of the other members is touched.

use kalphite::{Entity, Op};
use kalphite_sync::{
    ChangePayload, ClientMessage, ConflictPolicy, EntityKey, Envelope, ErrorCode, HelloPayload,
    Outbound, PROTOCOL_VERSION, Room, RoomError, ServerMessage, Step, StoredChange, VectorClock,
};
use serde_json::{Value, json};

fn hello(replica: &str) -> Envelope<HelloPayload> {
    Envelope::new(
        format!("{replica}-hello"),
        "claimed-by-client",
        1,
        HelloPayload {
            protocol_version: PROTOCOL_VERSION,
            room_id: "r".into(),
            replica_id: replica.into(),
            last_version: 0,
            token: None,
            epoch: None,
        },
    )
}

fn upsert(id: &str, data: Value, vector: VectorClock) -> ChangePayload {
    ChangePayload {
        operation: Op::Upsert,
        entity_type: "todo".into(),
        entity_id: id.into(),
        entity: Some(Entity::new(id, "todo", data).at(5)),
        vector,
        base_version: Some(0),
        room_version: None,
    }
}

fn change(message_id: &str, payload: ChangePayload) -> ClientMessage {
    ClientMessage::Change(Envelope::new(message_id, "claimed-by-client", 5, payload))
}

/// Handles a message, persisting (into `log`) and committing at once when asked.
fn send(room: &mut Room, log: &mut Vec<StoredChange>, conn: u64, msg: ClientMessage) -> Reply {
    let out = match room.handle(conn, msg, 10) {
        Step::Reply(out) => out,
        Step::Persist(pending) => {
            log.push(pending.record().clone());
            room.commit(pending).expect("own pending")
        }
    };
    Reply(out)
}

struct Reply(Vec<Outbound>);

impl Reply {
    fn acked(&self) -> bool {
        self.0
            .iter()
            .any(|o| matches!(o.message, ServerMessage::Ack(_)))
    }

    /// The error's code and `refersTo`, if the reply is an error.
    fn error(&self) -> Option<(ErrorCode, Option<String>)> {
        self.0.iter().find_map(|o| match &o.message {
            ServerMessage::Error(e) => Some((e.payload.code, e.payload.refers_to.clone())),
            _ => None,
        })
    }
}

fn data(room: &Room, id: &str) -> Option<Value> {
    room.get(&EntityKey::new("todo", id))
        .and_then(|r| r.state.as_ref().map(|e| e.data.clone()))
}

fn clock<const N: usize>(entries: [(&str, u64); N]) -> VectorClock {
    VectorClock::from(entries)
}

#[test]
fn another_members_message_ids_do_not_swallow_the_victims_edits() {
    // Bug: the room deduplicated by messageId across the whole room, so mallory sending
    // `phone-1` … `phone-5` first made alice's five real edits (replica `phone`) come back
    // acknowledged with mallory's entity, and stored nowhere.
    let mut room = Room::new("r", ConflictPolicy::default());
    let mut log = Vec::new();
    room.join(1, "mallory", &hello("mallory-laptop"), 1)
        .unwrap();
    room.join(2, "alice", &hello("phone"), 1).unwrap();
    for n in 1..=5u64 {
        let bait = upsert("junk", json!({"n": n}), clock([("mallory-laptop", n)]));
        let reply = send(&mut room, &mut log, 1, change(&format!("phone-{n}"), bait));
        assert!(reply.acked(), "mallory's own change {n} is accepted");
    }
    let before = room.version();
    for n in 1..=5u64 {
        let id = format!("t{n}");
        let edit = upsert(&id, json!({"title": n}), clock([("phone", n)]));
        let reply = send(&mut room, &mut log, 2, change(&format!("phone-{n}"), edit));
        assert!(reply.acked(), "alice's edit {n} is acknowledged");
        assert_eq!(data(&room, &id), Some(json!({"title": n})), "and stored");
    }
    assert_eq!(room.version(), before + 5, "five new versions");
    let record = room.get(&EntityKey::new("todo", "t1")).unwrap();
    assert_eq!(
        (record.replica_id.as_str(), record.author.as_str()),
        ("phone", "alice"),
        "the record names its author"
    );
}

#[test]
fn a_message_id_reused_for_another_entity_is_refused_not_acknowledged() {
    // Bug: a change whose messageId had been seen was acknowledged with the entity of the
    // earlier change, whatever entity it named: the edit was dropped silently.
    let mut room = Room::new("r", ConflictPolicy::default());
    let mut log = Vec::new();
    room.join(1, "alice", &hello("phone"), 1).unwrap();
    let first = upsert("a", json!({"n": 1}), clock([("phone", 1)]));
    assert!(send(&mut room, &mut log, 1, change("phone-1", first.clone())).acked());
    // The same change again (a resend) is acknowledged.
    assert!(send(&mut room, &mut log, 1, change("phone-1", first)).acked());
    // The same id naming another entity is refused.
    let other = upsert("b", json!({"n": 2}), clock([("phone", 2)]));
    let reply = send(&mut room, &mut log, 1, change("phone-1", other));
    assert!(!reply.acked(), "not acknowledged");
    assert_eq!(
        reply.error(),
        Some((ErrorCode::MessageIdReused, Some("phone-1".into())))
    );
    assert!(!ErrorCode::MessageIdReused.is_retryable());
    assert_eq!(data(&room, "b"), None);
    assert_eq!(room.version(), 1);
}

#[test]
fn a_replica_id_belongs_to_the_user_who_first_used_it() {
    // Bug: any user could join with another user's replica id (visible in every broadcast
    // clock) and write under it.
    let mut room = Room::new("r", ConflictPolicy::default());
    let mut log = Vec::new();
    room.join(1, "alice", &hello("phone"), 1).unwrap();
    let err = room.join(2, "mallory", &hello("phone"), 1).unwrap_err();
    assert_eq!(
        err,
        RoomError::ReplicaTaken {
            replica_id: "phone".into()
        }
    );
    assert_eq!(err.code(), ErrorCode::ReplicaTaken);
    assert!(!room.is_member(2));
    // The same user may use it on a second connection (a second tab).
    room.join(3, "alice", &hello("phone"), 1).unwrap();
    let edit = upsert("a", json!({}), clock([("phone", 1)]));
    assert!(send(&mut room, &mut log, 1, change("phone-1", edit)).acked());
    // Still bound after every connection left, since the room holds its edits.
    room.leave(1);
    room.leave(3);
    assert!(matches!(
        room.join(4, "mallory", &hello("phone"), 1),
        Err(RoomError::ReplicaTaken { .. })
    ));
}

#[test]
fn a_replica_id_only_joined_is_released_when_its_connections_leave() {
    // A hello that never wrote anything does not hold its replica id forever (otherwise a
    // member could grow the room's memory with one binding per hello).
    let mut room = Room::new("r", ConflictPolicy::default());
    room.join(1, "alice", &hello("tablet"), 1).unwrap();
    room.join(2, "alice", &hello("tablet"), 1).unwrap();
    room.leave(1);
    assert!(
        room.join(3, "bob", &hello("tablet"), 1).is_err(),
        "still joined"
    );
    room.leave(2);
    room.join(3, "bob", &hello("tablet"), 1).unwrap();
}

#[test]
fn the_replica_binding_and_deduplication_survive_a_restart() {
    // Bug: a restarted room (rebuilt from its log with Room::restore) forgot who owns a
    // replica id and deduplicated by bare messageId again.
    let mut room = Room::new("r", ConflictPolicy::default());
    let mut log = Vec::new();
    room.join(1, "alice", &hello("phone"), 1).unwrap();
    room.join(2, "bob", &hello("laptop"), 1).unwrap();
    let edit = upsert("a", json!({"by": "alice"}), clock([("phone", 1)]));
    assert!(send(&mut room, &mut log, 1, change("m-1", edit.clone())).acked());
    let json = serde_json::to_string(&log).unwrap();
    let log: Vec<StoredChange> = serde_json::from_str(&json).unwrap();

    let mut restored = Room::new("r", ConflictPolicy::default())
        .restore(log)
        .unwrap();
    assert!(matches!(
        restored.join(1, "mallory", &hello("phone"), 1),
        Err(RoomError::ReplicaTaken { .. })
    ));
    restored.join(1, "alice", &hello("phone"), 1).unwrap();
    restored.join(2, "bob", &hello("laptop"), 1).unwrap();
    let mut log = Vec::new();
    // Alice's resend is recognised as hers...
    let reply = send(&mut restored, &mut log, 1, change("m-1", edit));
    assert!(reply.acked());
    assert_eq!(restored.version(), 1, "not applied twice");
    // ...and bob's change with the same message id is his own, new edit.
    let bobs = upsert("b", json!({"by": "bob"}), clock([("laptop", 1)]));
    assert!(send(&mut restored, &mut log, 2, change("m-1", bobs)).acked());
    assert_eq!(data(&restored, "b"), Some(json!({"by": "bob"})));
}

#[test]
fn a_log_written_before_authors_were_recorded_still_loads() {
    let old = json!([{
        "version": 1, "kind": "todo", "id": "a",
        "state": {"id": "a", "type": "todo", "data": {"n": 1}, "updatedAt": 5},
        "vector": {"phone": 3}, "stamp": {"at": 5, "userId": "alice"}, "messageId": "phone-3"
    }]);
    let log: Vec<StoredChange> = serde_json::from_value(old).unwrap();
    assert_eq!(
        (log[0].replica_id.as_str(), log[0].author.as_str()),
        ("", "")
    );
    let mut room = Room::new("r", ConflictPolicy::default())
        .restore(log)
        .unwrap();
    assert_eq!(data(&room, "a"), Some(json!({"n": 1})));
    // The clock high-water mark comes from the stored clocks, so it is known for old logs.
    room.join(1, "bob", &hello("laptop"), 1).unwrap();
    let mut log = Vec::new();
    let honest = upsert("a", json!({"n": 2}), clock([("phone", 3), ("laptop", 1)]));
    assert!(send(&mut room, &mut log, 1, change("laptop-1", honest)).acked());
    assert_eq!(data(&room, "a"), Some(json!({"n": 2})));
}

#[test]
fn a_clock_claiming_edits_the_room_never_had_is_refused() {
    // Bug: mallory sent a change with clock {"phone": 1000000}; alice's later honest edit
    // ({"phone": 2}) was judged "before" it, acknowledged and swallowed.
    let mut room = Room::new("r", ConflictPolicy::default());
    let mut log = Vec::new();
    room.join(1, "alice", &hello("phone"), 1).unwrap();
    room.join(2, "mallory", &hello("evil"), 1).unwrap();
    let first = upsert("t", json!({"title": "milk"}), clock([("phone", 1)]));
    assert!(send(&mut room, &mut log, 1, change("phone-1", first)).acked());

    let forged = upsert(
        "t",
        json!({"title": "pwned"}),
        clock([("phone", 1_000_000), ("evil", 1)]),
    );
    let reply = send(&mut room, &mut log, 2, change("evil-1", forged));
    assert!(!reply.acked());
    assert_eq!(
        reply.error(),
        Some((ErrorCode::InvalidClock, Some("evil-1".into())))
    );
    assert!(!ErrorCode::InvalidClock.is_retryable());
    // A forged entry on an entity the room does not have is refused too.
    let fresh = upsert("new", json!({}), clock([("phone", 2)]));
    let reply = send(&mut room, &mut log, 2, change("evil-2", fresh));
    assert_eq!(reply.error().map(|e| e.0), Some(ErrorCode::InvalidClock));
    assert_eq!(room.version(), 1);

    let honest = upsert("t", json!({"title": "oat milk"}), clock([("phone", 2)]));
    assert!(send(&mut room, &mut log, 1, change("phone-2", honest)).acked());
    assert_eq!(data(&room, "t"), Some(json!({"title": "oat milk"})));
}

#[test]
fn the_authors_own_counter_may_advance_and_others_up_to_what_the_room_has() {
    let mut room = Room::new("r", ConflictPolicy::default());
    let mut log = Vec::new();
    room.join(1, "alice", &hello("phone"), 1).unwrap();
    room.join(2, "bob", &hello("laptop"), 1).unwrap();
    let jump = upsert("t", json!({"n": 1}), clock([("phone", 40)]));
    assert!(send(&mut room, &mut log, 1, change("phone-40", jump)).acked());
    // Bob may name any counter of phone up to 40 (he saw it in the room), on any entity.
    let on_top = upsert("t", json!({"n": 2}), clock([("phone", 40), ("laptop", 1)]));
    assert!(send(&mut room, &mut log, 2, change("laptop-1", on_top)).acked());
    let elsewhere = upsert("u", json!({}), clock([("phone", 7), ("laptop", 2)]));
    assert!(send(&mut room, &mut log, 2, change("laptop-2", elsewhere)).acked());
    assert_eq!(room.version(), 3);
}

#[test]
fn the_clock_high_water_marks_survive_a_restart() {
    // Bug (with the clock rule): a restarted room must rebuild what it has accepted from
    // each replica, or it would refuse honest clocks (or accept forged ones).
    let mut room = Room::new("r", ConflictPolicy::default());
    let mut log = Vec::new();
    room.join(1, "alice", &hello("phone"), 1).unwrap();
    for n in 1..=3u64 {
        let edit = upsert("t", json!({"n": n}), clock([("phone", n)]));
        assert!(send(&mut room, &mut log, 1, change(&format!("phone-{n}"), edit)).acked());
    }
    let mut restored = Room::new("r", ConflictPolicy::default())
        .restore(log)
        .unwrap();
    restored.join(2, "mallory", &hello("evil"), 1).unwrap();
    let mut log = Vec::new();
    let forged = upsert("x", json!({}), clock([("phone", 4), ("evil", 1)]));
    let reply = send(&mut restored, &mut log, 2, change("evil-1", forged));
    assert_eq!(reply.error().map(|e| e.0), Some(ErrorCode::InvalidClock));
    let honest = upsert("x", json!({}), clock([("phone", 3), ("evil", 1)]));
    assert!(send(&mut restored, &mut log, 2, change("evil-2", honest)).acked());
}

#[test]
fn a_replica_id_released_while_its_change_was_being_written_goes_to_that_changes_author() {
    // Bug: a replica id released when its last connection left, then taken by another
    // user's hello before the first user's pending change was committed, stayed with the
    // newcomer, who could then write under the id that the stored change belongs to.
    let mut room = Room::new("r", ConflictPolicy::default());
    room.join(1, "alice", &hello("tablet"), 1).unwrap();
    let edit = upsert("a", json!({}), clock([("tablet", 1)]));
    let Step::Persist(pending) = room.handle(1, change("tablet-1", edit), 10) else {
        panic!("must persist")
    };
    room.leave(1);
    room.join(2, "mallory", &hello("tablet"), 1).unwrap();
    room.commit(pending).unwrap();
    let mut log = Vec::new();
    let hers = upsert("b", json!({}), clock([("tablet", 2)]));
    let reply = send(&mut room, &mut log, 2, change("tablet-2", hers));
    assert_eq!(
        reply.error(),
        Some((ErrorCode::ReplicaTaken, Some("tablet-2".into())))
    );
    assert_eq!(data(&room, "b"), None);
    room.leave(2);
    assert!(room.join(3, "mallory", &hello("tablet"), 1).is_err());
    room.join(3, "alice", &hello("tablet"), 1).unwrap();
}

#[test]
fn oversized_ids_are_refused_so_the_rooms_memory_stays_bounded() {
    // Bug: the room keeps the last 4096 message ids, and the replica ids of its members,
    // whatever their length: a member sending ids of nearly a frame each (1 MiB) could
    // make one room hold gigabytes.
    let too_long = "x".repeat(kalphite_sync::MAX_ID_BYTES + 1);
    let mut room = Room::new("r", ConflictPolicy::default());
    let err = room.join(1, "mallory", &hello(&too_long), 1).unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidMessage);
    assert!(!room.is_member(1));
    room.join(1, "mallory", &hello("laptop"), 1).unwrap();
    let mut log = Vec::new();
    let edit = upsert("a", json!({}), clock([("laptop", 1)]));
    let reply = send(&mut room, &mut log, 1, change(&too_long, edit.clone()));
    assert_eq!(
        reply.error(),
        Some((ErrorCode::InvalidMessage, Some(too_long)))
    );
    assert_eq!(room.version(), 0);
    let fits = "y".repeat(kalphite_sync::MAX_ID_BYTES);
    assert!(send(&mut room, &mut log, 1, change(&fits, edit)).acked());
}

#[test]
fn a_reserved_kind_is_refused_by_the_room() {
    // Bug (issue 9, item 4): any member could send an upsert of kind
    // `_kalphite_sync_replica` with id = the room id; the room stored and broadcast it, and
    // the victim's flush wrote it over its own sync state. The room refuses reserved kinds.
    let mut room = Room::new("r", ConflictPolicy::default());
    let mut log = Vec::new();
    room.join(1, "mallory", &hello("mallory-laptop"), 1)
        .unwrap();
    let mut forged = upsert(
        "r",
        json!({"replicaId": "x"}),
        clock([("mallory-laptop", 1)]),
    );
    forged.entity_type = "_kalphite_sync_replica".into();
    if let Some(e) = forged.entity.as_mut() {
        e.kind = "_kalphite_sync_replica".into();
    }
    let reply = send(&mut room, &mut log, 1, change("m-1", forged));
    assert_eq!(
        reply.error(),
        Some((ErrorCode::InvalidEntity, Some("m-1".to_owned())))
    );
    assert_eq!(room.version(), 0, "nothing stored");
    assert!(log.is_empty());
}

fn nested(levels: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..levels {
        v = json!([v]);
    }
    v
}

#[test]
fn data_nested_too_deep_for_any_client_is_refused() {
    // Bug (issue 10, item 7): the room accepted entities nested 127 deep, then emitted
    // acks and catch-up pages nested 128–129 deep, which its own client refuses (serde's
    // limit): one such entity stopped every client's catch-up of the room.
    let mut room = Room::new("r", ConflictPolicy::default());
    let mut log = Vec::new();
    room.join(1, "alice", &hello("phone"), 1).unwrap();
    let deep = upsert(
        "t1",
        json!({"x": nested(kalphite_sync::MAX_DATA_DEPTH)}),
        clock([("phone", 1)]),
    );
    let reply = send(&mut room, &mut log, 1, change("phone-1", deep));
    assert_eq!(reply.error().map(|e| e.0), Some(ErrorCode::InvalidEntity));
    assert_eq!(room.version(), 0);
    let fits = upsert(
        "t1",
        json!({"x": nested(kalphite_sync::MAX_DATA_DEPTH - 1)}),
        clock([("phone", 1)]),
    );
    assert!(send(&mut room, &mut log, 1, change("phone-2", fits)).acked());
}

#[test]
fn an_oversized_clock_or_id_is_refused() {
    // Bug (issue 10, item 7): a ~1 MiB vector clock was accepted and merged into the
    // entity for good, so every later honest edit of it was `oversized`; kinds and entity
    // ids had no length limit either.
    let mut room = Room::new("r", ConflictPolicy::default());
    let mut log = Vec::new();
    room.join(1, "alice", &hello("phone"), 1).unwrap();
    let mut big = VectorClock::new();
    for i in 0..=kalphite_sync::MAX_CLOCK_ENTRIES {
        big.increment(&format!("r{i}"));
    }
    big.increment("phone");
    let reply = send(
        &mut room,
        &mut log,
        1,
        change("phone-1", upsert("t1", json!({}), big)),
    );
    assert_eq!(
        reply.error(),
        Some((ErrorCode::InvalidEntity, Some("phone-1".to_owned())))
    );
    let long_id = "x".repeat(kalphite_sync::MAX_ID_BYTES + 1);
    let reply = send(
        &mut room,
        &mut log,
        1,
        change(
            "phone-2",
            upsert(&long_id, json!({}), clock([("phone", 1)])),
        ),
    );
    assert_eq!(reply.error().map(|e| e.0), Some(ErrorCode::InvalidEntity));
    assert_eq!(room.version(), 0, "nothing stored");
}

/// Handles `msg` from `conn` received at `now` (ms), committing at once when asked.
fn send_at(room: &mut Room, conn: u64, msg: ClientMessage, now: u64) -> Reply {
    Reply(match room.handle(conn, msg, now) {
        Step::Reply(out) => out,
        Step::Persist(pending) => room.commit(pending).expect("own pending"),
    })
}

#[test]
fn a_skewed_clock_does_not_win_every_last_write_wins_conflict() {
    // Bug (issue 10, item 9): last-write-wins trusted the client's `updatedAt`, so one
    // client whose clock ran a year ahead won every later conflict on the entity, even
    // against edits made long after its own. The room now clamps an incoming time to its
    // receive time plus `max_clock_skew` (60 s by default).
    const T0: u64 = 1_700_000_000_000;
    const YEAR: u64 = 365 * 24 * 3600 * 1000;
    let mut room = Room::new("r", ConflictPolicy::default());
    room.join(1, "skewed", &hello("fast"), T0).unwrap();
    room.join(2, "honest", &hello("slow"), T0).unwrap();
    let mut ahead = upsert("t", json!({"by": "skewed"}), clock([("fast", 1)]));
    ahead.entity = ahead.entity.map(|e| e.at(T0 + YEAR));
    assert!(send_at(&mut room, 1, change("fast-1", ahead), T0).acked());
    let stored = room.get(&EntityKey::new("todo", "t")).unwrap();
    assert_eq!(
        stored.state.as_ref().unwrap().updated_at,
        T0 + 60_000,
        "clamped to receive time + 60 s"
    );
    assert_eq!(stored.stamp.at, T0 + 60_000);

    // Two minutes later, a concurrent edit made at its author's (correct) time wins.
    let later = T0 + 120_000;
    let mut honest = upsert("t", json!({"by": "honest"}), clock([("slow", 1)]));
    honest.entity = honest.entity.map(|e| e.at(later));
    assert!(send_at(&mut room, 2, change("slow-1", honest), later).acked());
    assert_eq!(data(&room, "t"), Some(json!({"by": "honest"})));

    // A delete's time (its envelope timestamp) is bounded the same way.
    let delete = ClientMessage::Change(Envelope::new(
        "fast-2",
        "skewed",
        later + YEAR,
        ChangePayload {
            operation: Op::Delete,
            entity_type: "todo".into(),
            entity_id: "gone".into(),
            entity: None,
            vector: clock([("fast", 2)]),
            base_version: Some(0),
            room_version: None,
        },
    ));
    assert!(send_at(&mut room, 1, delete, later).acked());
    let tombstone = room.get(&EntityKey::new("todo", "gone")).unwrap();
    assert_eq!(tombstone.stamp.at, later + 60_000);

    // A time within the tolerance is kept as sent.
    let mut near = upsert("n", json!({}), clock([("slow", 2)]));
    near.entity = near.entity.map(|e| e.at(later + 30_000));
    assert!(send_at(&mut room, 2, change("slow-2", near), later).acked());
    let kept = room.get(&EntityKey::new("todo", "n")).unwrap();
    assert_eq!(kept.state.as_ref().unwrap().updated_at, later + 30_000);
}

#[test]
fn entity_data_that_is_not_an_object_is_refused_by_the_room_itself() {
    // Issue 10, item 10: the decoder refuses it, but a room handed a message built another
    // way (an adapter, a fuzzer) stored any JSON value as an entity's data.
    let mut room = Room::new("r", ConflictPolicy::default());
    let mut log = Vec::new();
    room.join(1, "mallory", &hello("laptop"), 1).unwrap();
    for (n, data) in [json!([1, 2]), json!("text"), json!(3), json!(null)]
        .into_iter()
        .enumerate()
    {
        let id = format!("m{n}");
        let reply = send(
            &mut room,
            &mut log,
            1,
            change(&id, upsert("a", data, clock([("laptop", 1)]))),
        );
        assert_eq!(reply.error(), Some((ErrorCode::InvalidEntity, Some(id))));
    }
    assert_eq!(room.version(), 0);
    assert!(log.is_empty());
    let reply = send(
        &mut room,
        &mut log,
        1,
        change("ok", upsert("a", json!({"t": 1}), clock([("laptop", 1)]))),
    );
    assert!(reply.acked());
}

#[test]
fn an_entity_stays_editable_after_more_replicas_than_a_clock_may_name() {
    // Issue 10 (found while fuzzing, from item 7's bound): a clock may name at most 256
    // replicas and an entity's stored clock merges every editor's, so once 256 replicas
    // had edited an entity, the next new replica's honest edit (the stored clock plus its
    // own entry: 257) was refused as invalid_entity, for good. The room now stores at
    // most 255 entries, dropping the smallest counters.
    let mut room = Room::new("r", ConflictPolicy::default());
    let mut log = Vec::new();
    let key = EntityKey::new("todo", "shared");
    for n in 0..300u64 {
        let replica = format!("device-{n:03}");
        room.join(n + 1, &format!("user-{n}"), &hello(&replica), 1)
            .unwrap();
        let mut vector = room
            .get(&key)
            .map(|stored| stored.vector.clone())
            .unwrap_or_default();
        vector.increment(&replica);
        let edit = upsert("shared", json!({"editor": n}), vector);
        let reply = send(
            &mut room,
            &mut log,
            n + 1,
            change(&format!("{replica}-1"), edit),
        );
        assert!(reply.acked(), "edit {n}: {:?}", reply.error());
        let stored = room.get(&key).expect("stored");
        assert!(stored.vector.iter().count() < kalphite_sync::MAX_CLOCK_ENTRIES);
        assert_eq!(stored.vector.get(&replica), 1, "the author's entry is kept");
    }
    assert_eq!(data(&room, "shared"), Some(json!({"editor": 299})));
    assert_eq!(room.version(), 300);
}
