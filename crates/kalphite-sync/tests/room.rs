//! The server state machine on its own: handshake errors, versions, deduplication,
//! stale and concurrent changes, catch-up paging with tombstones, and the rule that
//! nothing is acknowledged or broadcast before the caller has persisted the change.

use std::sync::Arc;

use kalphite::{Entity, FnSchema, Issue, Op};
use kalphite_sync::{
    ChangePayload, ClientMessage, ConflictPolicy, EntityKey, Envelope, ErrorCode, HeartbeatPayload,
    HelloPayload, Outbound, PROTOCOL_VERSION, Recipient, Room, RoomError, RoomLimits,
    ServerMessage, Step, Strategy, StrategyName, VectorClock,
};
use serde_json::{Value, json};

fn hello(replica: &str, last_version: u64) -> Envelope<HelloPayload> {
    Envelope::new(
        format!("{replica}-hello"),
        replica,
        1,
        HelloPayload {
            protocol_version: PROTOCOL_VERSION,
            room_id: "r".into(),
            replica_id: replica.into(),
            last_version,
            token: None,
            epoch: None,
        },
    )
}

fn upsert(id: &str, data: Value, at: u64, vector: VectorClock, base: u64) -> ChangePayload {
    ChangePayload {
        operation: Op::Upsert,
        entity_type: "todo".into(),
        entity_id: id.into(),
        entity: Some(Entity::new(id, "todo", data).at(at)),
        vector,
        base_version: Some(base),
        room_version: None,
    }
}

fn delete(id: &str, vector: VectorClock, base: u64) -> ChangePayload {
    ChangePayload {
        operation: Op::Delete,
        entity_type: "todo".into(),
        entity_id: id.into(),
        entity: None,
        vector,
        base_version: Some(base),
        room_version: None,
    }
}

fn change(message_id: &str, user: &str, at: u64, payload: ChangePayload) -> ClientMessage {
    ClientMessage::Change(Envelope::new(message_id, user, at, payload))
}

/// A room with two joined connections: 1 (alice) and 2 (bob).
fn room(policy: ConflictPolicy) -> Room {
    let mut room = Room::new("r", policy);
    room.join(1, "alice", &hello("ra", 0), 1).unwrap();
    room.join(2, "bob", &hello("rb", 0), 1).unwrap();
    room
}

/// Handles a message, persisting and committing at once when asked.
fn send(room: &mut Room, conn: u64, msg: ClientMessage) -> Vec<Outbound> {
    match room.handle(conn, msg, 10) {
        Step::Reply(out) => out,
        Step::Persist(pending) => room.commit(pending).unwrap(),
    }
}

fn ack_of(out: &[Outbound]) -> (&str, u64, &ChangePayload) {
    out.iter()
        .find_map(|o| match &o.message {
            ServerMessage::Ack(a) => Some((
                a.payload.ack_of.as_str(),
                a.payload.version,
                &a.payload.result,
            )),
            _ => None,
        })
        .expect("an ack")
}

fn error_code(out: &[Outbound]) -> ErrorCode {
    out.iter()
        .find_map(|o| match &o.message {
            ServerMessage::Error(e) => Some(e.payload.code),
            _ => None,
        })
        .expect("an error")
}

fn data(room: &Room, id: &str) -> Option<Value> {
    room.get(&EntityKey::new("todo", id))
        .and_then(|r| r.state.as_ref().map(|e| e.data.clone()))
}

#[test]
fn handshake_errors_are_typed() {
    let mut room = Room::new("r", ConflictPolicy::default());
    let mut old = hello("x", 0);
    old.payload.protocol_version = 99;
    assert!(matches!(
        room.join(1, "u", &old, 1),
        Err(RoomError::UnsupportedVersion { got: 99, .. })
    ));
    let mut other = hello("x", 0);
    other.payload.room_id = "elsewhere".into();
    let err = room.join(1, "u", &other, 1).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Forbidden);
    room.join(1, "u", &hello("x", 0), 1).unwrap();
    assert_eq!(
        room.join(1, "u", &hello("x", 0), 1),
        Err(RoomError::AlreadyJoined)
    );
    let heartbeat = ClientMessage::Heartbeat(Envelope::new("h", "u", 1, HeartbeatPayload {}));
    let out = send(&mut room, 5, heartbeat.clone());
    assert_eq!(error_code(&out), ErrorCode::NotJoined);
    let out = send(&mut room, 1, heartbeat);
    assert!(matches!(out[0].message, ServerMessage::Heartbeat(_)));
    let out = send(&mut room, 1, ClientMessage::Hello(hello("x", 0)));
    assert_eq!(error_code(&out), ErrorCode::AlreadyJoined);
}

#[test]
fn welcome_then_catch_up_pages_with_tombstones() {
    let mut room = room(ConflictPolicy::default()).with_limits(RoomLimits {
        catch_up_page: 2,
        ..RoomLimits::default()
    });
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        let v = VectorClock::from([("ra", 1)]);
        send(
            &mut room,
            1,
            change(
                &format!("m{i}"),
                "alice",
                5,
                upsert(id, json!({"n": i}), 5, v, 0),
            ),
        );
    }
    send(
        &mut room,
        1,
        change(
            "m3",
            "alice",
            6,
            delete("b", VectorClock::from([("ra", 2)]), 2),
        ),
    );
    assert_eq!(room.version(), 4);

    let out = room.join(3, "carol", &hello("rc", 0), 20).unwrap();
    let ServerMessage::Welcome(w) = &out[0].message else {
        panic!("welcome first")
    };
    assert_eq!((w.payload.room_version, w.payload.catch_up_from), (4, 0));
    let pages: Vec<_> = out[1..]
        .iter()
        .map(|o| match &o.message {
            ServerMessage::CatchUp(p) => p.payload.clone(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    // Current versions: a=1, c=3, b=4 (tombstone); version 2 was superseded.
    assert_eq!(pages.len(), 2);
    assert_eq!(
        (
            pages[0].from_version,
            pages[0].to_version,
            pages[0].complete
        ),
        (0, 3, false)
    );
    assert_eq!(
        (
            pages[1].from_version,
            pages[1].to_version,
            pages[1].complete
        ),
        (3, 4, true)
    );
    let ids: Vec<_> = pages
        .iter()
        .flat_map(|p| &p.changes)
        .map(|c| (c.entity_id.to_string(), c.operation))
        .collect();
    assert_eq!(
        ids,
        vec![
            ("a".into(), Op::Upsert),
            ("c".into(), Op::Upsert),
            ("b".into(), Op::Delete)
        ]
    );

    // A client that has everything up to 3 only gets the deletion.
    let pages = room.catch_up(3);
    assert_eq!(pages.len(), 1);
    assert_eq!(pages[0].changes.len(), 1);
    assert_eq!(pages[0].changes[0].room_version, Some(4));
    // A client ahead of the room (the room was reset) starts over from 0.
    let out = room.join(4, "dave", &hello("rd", 99), 20).unwrap();
    let ServerMessage::Welcome(w) = &out[0].message else {
        panic!("welcome first")
    };
    assert_eq!(w.payload.catch_up_from, 0);
}

#[test]
fn nothing_is_sent_before_the_change_is_committed() {
    let mut room = room(ConflictPolicy::default());
    let msg = change(
        "m1",
        "alice",
        5,
        upsert("a", json!({}), 5, VectorClock::from([("ra", 1)]), 0),
    );
    let Step::Persist(pending) = room.handle(1, msg.clone(), 10) else {
        panic!("must persist")
    };
    assert_eq!(pending.record().version, 1);
    assert_eq!(pending.record().message_id, "m1");
    assert_eq!(room.version(), 0, "the room does not move before commit");
    assert!(data(&room, "a").is_none());
    // Another change while the first is being written is refused (retryable).
    let other = change(
        "m2",
        "bob",
        5,
        upsert("b", json!({}), 5, VectorClock::from([("rb", 1)]), 0),
    );
    let Step::Reply(out) = room.handle(2, other, 10) else {
        panic!("no second pending")
    };
    assert!(error_code(&out).is_retryable());

    // The write failed: the sender is told to resend, no version is consumed.
    let out = room.abort(pending, "disk full", 11).unwrap();
    assert_eq!(out.to, Recipient::One(1));
    assert!(matches!(&out.message, ServerMessage::Error(e)
        if e.payload.code == ErrorCode::StorageFailed && e.payload.refers_to.as_deref() == Some("m1")));
    assert_eq!(room.version(), 0);

    let Step::Persist(pending) = room.handle(1, msg, 12) else {
        panic!("must persist")
    };
    assert_eq!(pending.record().version, 1);
    let out = room.commit(pending).unwrap();
    assert_eq!(room.version(), 1);
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].to, Recipient::One(1));
    assert_eq!(ack_of(&out).0, "m1");
    assert_eq!(out[1].to, Recipient::AllExcept(1));
    assert!(matches!(&out[1].message, ServerMessage::Change(c)
        if c.user_id == "alice" && c.payload.room_version == Some(1)));
}

#[test]
fn a_resent_change_is_acknowledged_again_not_applied_twice() {
    let mut room = room(ConflictPolicy::default());
    let msg = change(
        "m1",
        "alice",
        5,
        upsert("a", json!({"n": 1}), 5, VectorClock::from([("ra", 1)]), 0),
    );
    send(&mut room, 1, msg.clone());
    let later = upsert(
        "a",
        json!({"n": 2}),
        6,
        VectorClock::from([("ra", 1), ("rb", 1)]),
        1,
    );
    send(&mut room, 2, change("m2", "bob", 6, later));
    assert_eq!(room.version(), 2);
    let out = send(&mut room, 1, msg);
    assert_eq!(room.version(), 2, "no new version");
    assert_eq!(out.len(), 1, "an ack only, no broadcast");
    let (of, version, result) = ack_of(&out);
    assert_eq!((of, version), ("m1", 1));
    assert_eq!(result.room_version, Some(2), "with the current state");
    assert_eq!(data(&room, "a"), Some(json!({"n": 2})));
}

#[test]
fn a_stale_change_is_acknowledged_but_does_not_regress_the_entity() {
    let mut room = room(ConflictPolicy::default());
    let second = upsert("a", json!({"n": 2}), 6, VectorClock::from([("ra", 2)]), 0);
    send(&mut room, 1, change("m2", "alice", 6, second));
    // The older edit of the same replica arrives late (reordered).
    let first = upsert("a", json!({"n": 1}), 5, VectorClock::from([("ra", 1)]), 0);
    let out = send(&mut room, 1, change("m1", "alice", 5, first));
    assert_eq!(room.version(), 1);
    let (_, version, result) = ack_of(&out);
    assert_eq!(version, 1);
    assert_eq!(result.entity.as_ref().unwrap().data, json!({"n": 2}));
}

#[test]
fn sequential_edits_by_different_users_are_not_conflicts() {
    let mut room = room(ConflictPolicy::new(Strategy::Manual));
    send(
        &mut room,
        1,
        change(
            "m1",
            "alice",
            5,
            upsert("a", json!({"n": 1}), 5, VectorClock::from([("ra", 1)]), 0),
        ),
    );
    // Bob saw version 1 and edits on top of it, with an *earlier* wall clock.
    let bob = upsert(
        "a",
        json!({"n": 2}),
        1,
        VectorClock::from([("ra", 1), ("rb", 1)]),
        1,
    );
    let out = send(&mut room, 2, change("m2", "bob", 1, bob));
    assert!(
        out.iter()
            .all(|o| !matches!(o.message, ServerMessage::Conflict(_)))
    );
    assert_eq!(
        data(&room, "a"),
        Some(json!({"n": 2})),
        "the later edit wins even with an older clock"
    );
}

#[test]
fn concurrent_edits_are_merged_field_by_field_and_reported() {
    let mut room = room(ConflictPolicy::new(Strategy::FieldMerge));
    let base = json!({"title": "t", "done": false});
    send(
        &mut room,
        1,
        change(
            "m1",
            "alice",
            5,
            upsert("a", base, 5, VectorClock::from([("ra", 1)]), 0),
        ),
    );
    let alice = upsert(
        "a",
        json!({"title": "T", "done": false}),
        7,
        VectorClock::from([("ra", 2)]),
        1,
    );
    send(&mut room, 1, change("m2", "alice", 7, alice));
    let bob = upsert(
        "a",
        json!({"title": "t", "done": true}),
        8,
        VectorClock::from([("ra", 1), ("rb", 1)]),
        1,
    );
    let out = send(&mut room, 2, change("m3", "bob", 8, bob));
    assert_eq!(data(&room, "a"), Some(json!({"title": "T", "done": true})));
    let record = room.get(&EntityKey::new("todo", "a")).unwrap();
    assert_eq!(
        record.vector,
        VectorClock::from([("ra", 2), ("rb", 1)]),
        "the merged clock dominates both"
    );
    let conflict = out
        .iter()
        .find_map(|o| match &o.message {
            ServerMessage::Conflict(c) => Some((o.to, c.payload.clone())),
            _ => None,
        })
        .expect("the author is told");
    assert_eq!(conflict.0, Recipient::One(2));
    assert_eq!(conflict.1.strategy, StrategyName::FieldMerge);
    assert_eq!(conflict.1.refers_to, "m3");
    assert_eq!(
        conflict.1.theirs.entity.unwrap().data,
        json!({"title": "T", "done": false})
    );
    assert_eq!(conflict.1.resolved.room_version, Some(3));
    // Alice gets the merged state as a broadcast.
    assert!(out.iter().any(|o| o.to == Recipient::AllExcept(2)
        && matches!(&o.message, ServerMessage::Change(c)
            if c.payload.entity.as_ref().unwrap().data == json!({"title": "T", "done": true}))));
}

#[test]
fn delete_beats_a_concurrent_upsert_with_the_same_timestamp() {
    let mut room = room(ConflictPolicy::new(Strategy::LastWriteWins));
    send(
        &mut room,
        1,
        change(
            "m1",
            "alice",
            5,
            upsert("a", json!({}), 5, VectorClock::from([("ra", 1)]), 0),
        ),
    );
    let up = upsert(
        "a",
        json!({"n": 1}),
        9,
        VectorClock::from([("ra", 1), ("rb", 1)]),
        1,
    );
    send(&mut room, 2, change("m2", "bob", 9, up));
    send(
        &mut room,
        1,
        change(
            "m3",
            "alice",
            9,
            delete("a", VectorClock::from([("ra", 2)]), 1),
        ),
    );
    assert!(
        room.get(&EntityKey::new("todo", "a"))
            .unwrap()
            .state
            .is_none()
    );
}

#[test]
fn invalid_entities_are_refused_with_a_reason() {
    let schema = FnSchema(|_kind: &kalphite::Kind, data: &Value| {
        if data.get("title").is_some_and(Value::is_string) {
            Ok(())
        } else {
            Err(vec![Issue::new("/title", "required")])
        }
    });
    let mut room = room(ConflictPolicy::default()).with_schema(Arc::new(schema));
    let v = VectorClock::from([("ra", 1)]);
    let out = send(
        &mut room,
        1,
        change("m1", "alice", 5, upsert("a", json!({}), 5, v.clone(), 0)),
    );
    assert_eq!(error_code(&out), ErrorCode::InvalidEntity);
    let mut wrong_id = upsert("a", json!({"title": "x"}), 5, v.clone(), 0);
    wrong_id.entity_id = "b".into();
    let out = send(&mut room, 1, change("m2", "alice", 5, wrong_id));
    assert_eq!(error_code(&out), ErrorCode::InvalidEntity);
    let mut no_entity = upsert("a", json!({}), 5, v.clone(), 0);
    no_entity.entity = None;
    let out = send(&mut room, 1, change("m3", "alice", 5, no_entity));
    assert_eq!(error_code(&out), ErrorCode::InvalidEntity);
    assert_eq!(room.version(), 0);
    let ok = send(
        &mut room,
        1,
        change(
            "m4",
            "alice",
            5,
            upsert("a", json!({"title": "x"}), 0, v, 0),
        ),
    );
    let (_, _, result) = ack_of(&ok);
    assert_eq!(
        result.entity.as_ref().unwrap().updated_at,
        5,
        "an unset updatedAt gets the change's time"
    );
}

#[test]
fn a_restored_room_keeps_versions_dedup_and_state() {
    let mut room = room(ConflictPolicy::default());
    let mut log = Vec::new();
    for i in 1..=3u64 {
        let msg = change(
            &format!("m{i}"),
            "alice",
            i,
            upsert("a", json!({"n": i}), i, VectorClock::from([("ra", i)]), 0),
        );
        let Step::Persist(p) = room.handle(1, msg, 10) else {
            panic!("persist")
        };
        log.push(p.record().clone());
        room.commit(p).unwrap();
    }
    let json = serde_json::to_string(&log).unwrap();
    let log: Vec<kalphite_sync::StoredChange> = serde_json::from_str(&json).unwrap();
    let mut restored = Room::new("r", ConflictPolicy::default())
        .restore(log.clone())
        .unwrap();
    assert_eq!(restored.version(), 3);
    assert_eq!(data(&restored, "a"), Some(json!({"n": 3})));
    restored.join(1, "alice", &hello("ra", 3), 20).unwrap();
    let resent = change(
        "m2",
        "alice",
        2,
        upsert("a", json!({"n": 2}), 2, VectorClock::from([("ra", 2)]), 0),
    );
    let out = send(&mut restored, 1, resent);
    assert_eq!(ack_of(&out).1, 2, "acked with its original version");
    assert_eq!(restored.version(), 3);
    let mut backwards = log;
    backwards.swap(0, 1);
    assert!(matches!(
        Room::new("r", ConflictPolicy::default()).restore(backwards),
        Err(RoomError::OutOfOrder { .. })
    ));
}

#[test]
fn manual_keeps_lww_for_now_and_custom_runs_per_kind() {
    let sum = Strategy::custom(|case| {
        let n = |v: &kalphite_sync::Version| {
            v.state
                .as_ref()
                .and_then(|e| e.data["n"].as_i64())
                .unwrap_or(0)
        };
        let mut e = case
            .current
            .state
            .clone()
            .or_else(|| case.incoming.state.clone())?;
        e.data = json!({"n": n(&case.current) + n(&case.incoming)});
        Some(e)
    });
    let policy = ConflictPolicy::new(Strategy::Manual).with_kind("counter", sum);
    let mut room = room(policy);
    for (kind, id) in [("todo", "m1"), ("counter", "c1")] {
        let mut first = upsert(id, json!({"n": 1}), 5, VectorClock::from([("ra", 1)]), 0);
        first.entity_type = kind.into();
        first.entity.as_mut().unwrap().kind = kind.into();
        send(&mut room, 1, change(&format!("{id}-a"), "alice", 5, first));
        let mut second = upsert(id, json!({"n": 2}), 4, VectorClock::from([("rb", 1)]), 0);
        second.entity_type = kind.into();
        second.entity.as_mut().unwrap().kind = kind.into();
        let out = send(&mut room, 2, change(&format!("{id}-b"), "bob", 4, second));
        let (strategy, resolved) = out
            .iter()
            .find_map(|o| match &o.message {
                ServerMessage::Conflict(c) => {
                    Some((c.payload.strategy, c.payload.resolved.clone()))
                }
                _ => None,
            })
            .expect("a conflict notice");
        let data = resolved.entity.unwrap().data;
        match kind {
            "todo" => {
                assert_eq!(strategy, StrategyName::Manual);
                assert_eq!(
                    data,
                    json!({"n": 1}),
                    "the later write stays until the app decides"
                );
            }
            _ => {
                assert_eq!(strategy, StrategyName::Custom);
                assert_eq!(data, json!({"n": 3}));
            }
        }
    }
}

#[test]
fn equal_clocks_with_different_content_are_a_conflict_not_a_duplicate() {
    let mut room = room(ConflictPolicy::new(Strategy::LastWriteWins));
    let v = VectorClock::from([("ra", 1)]);
    send(
        &mut room,
        1,
        change(
            "m1",
            "alice",
            5,
            upsert("a", json!({"n": 1}), 5, v.clone(), 0),
        ),
    );
    // Same clock, same content, new message id: already there.
    send(
        &mut room,
        1,
        change(
            "m2",
            "alice",
            5,
            upsert("a", json!({"n": 1}), 5, v.clone(), 0),
        ),
    );
    assert_eq!(room.version(), 1);
    // Same clock, other content (a replica that lost its state): resolved, not dropped.
    let out = send(
        &mut room,
        1,
        change("m3", "alice", 6, upsert("a", json!({"n": 9}), 6, v, 0)),
    );
    assert_eq!(room.version(), 2);
    assert!(
        out.iter()
            .any(|o| matches!(o.message, ServerMessage::Conflict(_)))
    );
    assert_eq!(data(&room, "a"), Some(json!({"n": 9})));
}

#[test]
fn a_resend_older_than_the_dedup_window_is_still_not_applied_twice() {
    let mut room = room(ConflictPolicy::default()).with_limits(RoomLimits {
        dedup_window: 1,
        ..RoomLimits::default()
    });
    let first = change(
        "m1",
        "alice",
        5,
        upsert("a", json!({"n": 1}), 5, VectorClock::from([("ra", 1)]), 0),
    );
    send(&mut room, 1, first.clone());
    let bob = upsert(
        "a",
        json!({"n": 2}),
        6,
        VectorClock::from([("ra", 1), ("rb", 1)]),
        1,
    );
    send(&mut room, 2, change("m2", "bob", 6, bob));
    let out = send(&mut room, 1, first);
    assert_eq!(
        room.version(),
        2,
        "m1 was forgotten but its clock is dominated"
    );
    assert_eq!(ack_of(&out).1, 2, "acknowledged with the current version");
    assert_eq!(data(&room, "a"), Some(json!({"n": 2})));
}

#[test]
fn catch_up_pages_stay_under_the_byte_budget() {
    let mut room = room(ConflictPolicy::default()).with_limits(RoomLimits {
        catch_up_page_bytes: 400,
        ..RoomLimits::default()
    });
    for i in 0..5u64 {
        let big = json!({"text": "x".repeat(150)});
        let v = VectorClock::from([("ra", 1)]);
        send(
            &mut room,
            1,
            change(
                &format!("m{i}"),
                "alice",
                5,
                upsert(&format!("e{i}"), big, 5, v, 0),
            ),
        );
    }
    let pages = room.catch_up(0);
    assert!(pages.len() >= 3, "{} pages", pages.len());
    let mut expected_from = 0;
    for page in &pages {
        assert_eq!(page.from_version, expected_from, "pages are contiguous");
        assert!(!page.changes.is_empty() || page.complete);
        assert!(
            serde_json::to_string(&page.changes).unwrap().len() <= 400 + 2
                || page.changes.len() == 1
        );
        expected_from = page.to_version;
    }
    assert_eq!(expected_from, 5);
    assert_eq!(pages.iter().map(|p| p.changes.len()).sum::<usize>(), 5);
    // One entity over the budget still gets its own page.
    let tiny = room.with_limits(RoomLimits {
        catch_up_page_bytes: 1,
        ..RoomLimits::default()
    });
    assert_eq!(tiny.catch_up(0).len(), 5);
}

#[test]
fn an_evicted_merge_base_falls_back_to_last_write_wins() {
    let run = |merge_bases: usize| {
        let mut room = room(ConflictPolicy::new(Strategy::FieldMerge)).with_limits(RoomLimits {
            merge_bases,
            ..RoomLimits::default()
        });
        let a = |n: u64| VectorClock::from([("ra", n)]);
        let base = json!({"title": "t", "done": false});
        send(
            &mut room,
            1,
            change("m1", "alice", 5, upsert("a", base, 5, a(1), 0)),
        );
        let alice = upsert("a", json!({"title": "T", "done": false}), 6, a(2), 1);
        send(&mut room, 1, change("m2", "alice", 6, alice));
        // Traffic on another entity pushes version 1 out of a one-entry window.
        send(
            &mut room,
            1,
            change("m3", "alice", 7, upsert("b", json!({}), 7, a(1), 0)),
        );
        send(
            &mut room,
            1,
            change("m4", "alice", 8, upsert("b", json!({"x": 1}), 8, a(2), 3)),
        );
        let bob = upsert(
            "a",
            json!({"title": "t", "done": true}),
            9,
            VectorClock::from([("ra", 1), ("rb", 1)]),
            1,
        );
        send(&mut room, 2, change("m5", "bob", 9, bob));
        data(&room, "a")
    };
    assert_eq!(
        run(1024),
        Some(json!({"title": "T", "done": true})),
        "base known: merged"
    );
    assert_eq!(
        run(1),
        Some(json!({"title": "t", "done": true})),
        "base evicted: bob's whole"
    );
}

#[test]
fn merge_bases_are_bounded_in_bytes_too() {
    // Issue 10, item 8: 1,024 whole states per room were kept whatever their size (194 MB
    // for one room of 200 KB entities). A large superseded state now pushes older bases
    // out once the room's base bytes pass `merge_base_bytes`.
    let run = |merge_base_bytes: usize| {
        let mut room = room(ConflictPolicy::new(Strategy::FieldMerge)).with_limits(RoomLimits {
            merge_bases: 1_024,
            merge_base_bytes,
            ..RoomLimits::default()
        });
        let a = |n: u64| VectorClock::from([("ra", n)]);
        let base = json!({"title": "t", "done": false});
        send(
            &mut room,
            1,
            change("m1", "alice", 5, upsert("a", base, 5, a(1), 0)),
        );
        let alice = upsert("a", json!({"title": "T", "done": false}), 6, a(2), 1);
        send(&mut room, 1, change("m2", "alice", 6, alice));
        // A large entity, then superseded: its old state is a base of 10 KB.
        let big = json!({"blob": "x".repeat(10_000)});
        send(
            &mut room,
            1,
            change("m3", "alice", 7, upsert("b", big, 7, a(1), 0)),
        );
        send(
            &mut room,
            1,
            change("m4", "alice", 8, upsert("b", json!({"x": 1}), 8, a(2), 3)),
        );
        let bob = upsert(
            "a",
            json!({"title": "t", "done": true}),
            9,
            VectorClock::from([("ra", 1), ("rb", 1)]),
            1,
        );
        send(&mut room, 2, change("m5", "bob", 9, bob));
        data(&room, "a")
    };
    assert_eq!(
        run(1 << 20),
        Some(json!({"title": "T", "done": true})),
        "within the byte bound: merged"
    );
    assert_eq!(
        run(4_096),
        Some(json!({"title": "t", "done": true})),
        "the large base pushed the small one out: bob's whole"
    );
}
