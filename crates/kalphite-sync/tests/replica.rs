//! The client state machine on its own: the offline queue (coalesced per entity, bounded,
//! serializable, resent until acknowledged), remote changes marked remote and never
//! echoed, remote states held back while a local change is unacknowledged, and errors.

use std::sync::Arc;

use kalphite::{AnyEntity, Change, Entity, Op, Origin};
use kalphite_sync::{
    AckPayload, CatchUpPayload, ChangePayload, ClientMessage, ConflictPolicy, Envelope, ErrorCode,
    ErrorPayload, LinkState, Outbound, Recipient, Replica, ReplicaConfig, ReplicaError,
    ReplicaEvent, ReplicaState, Room, RoomLimits, RoomMeta, SERVER_USER_ID, ServerMessage, Step,
    Strategy, VectorClock, WelcomePayload,
};
use serde_json::{Value, json};

fn config() -> ReplicaConfig {
    let mut c = ReplicaConfig::new("r", "alice", "ra");
    c.resend_after = 100;
    c.heartbeat_interval = 1_000;
    c.outbox_limit = 2;
    c
}

fn local_upsert(id: &str, data: Value, at: u64) -> Change {
    Change::upsert(
        AnyEntity::new(Arc::new(Entity::new(id, "todo", data).at(at))),
        at,
        Origin::Local,
    )
}

fn welcome(room_version: u64, catch_up_from: u64) -> ServerMessage {
    ServerMessage::Welcome(Envelope::new(
        "w",
        SERVER_USER_ID,
        1,
        WelcomePayload {
            protocol_version: 1,
            room_id: "r".into(),
            room_version,
            catch_up_from,
            epoch: None,
            snapshot: false,
            collected_through: 0,
            replica_counter: 0,
        },
    ))
}

fn state(id: &str, data: Option<Value>, version: u64, vector: VectorClock) -> ChangePayload {
    ChangePayload {
        operation: if data.is_some() {
            Op::Upsert
        } else {
            Op::Delete
        },
        entity_type: "todo".into(),
        entity_id: id.into(),
        entity: data.map(|d| Entity::new(id, "todo", d).at(version)),
        vector,
        base_version: None,
        room_version: Some(version),
    }
}

fn ack(of: &str, version: u64, result: ChangePayload) -> ServerMessage {
    ServerMessage::Ack(Envelope::new(
        "a",
        SERVER_USER_ID,
        1,
        AckPayload {
            ack_of: of.into(),
            version,
            result,
        },
    ))
}

fn broadcast(payload: ChangePayload) -> ServerMessage {
    ServerMessage::Change(Envelope::new("b", "bob", 1, payload))
}

fn change_of(msg: &ClientMessage) -> &Envelope<ChangePayload> {
    match msg {
        ClientMessage::Change(c) => c,
        other => panic!("expected a change, got {other:?}"),
    }
}

fn connected() -> Replica {
    let mut r = Replica::new(config());
    let hello = r.connect(0);
    assert!(
        matches!(hello, ClientMessage::Hello(ref h) if h.payload.last_version == 0 && h.payload.replica_id == "ra")
    );
    assert_eq!(r.link(), LinkState::Connecting);
    r.handle(welcome(0, 0), 0);
    assert_eq!(r.link(), LinkState::Connected);
    r
}

#[test]
fn offline_changes_are_coalesced_per_entity_and_sent_on_welcome() {
    let mut r = Replica::new(config());
    assert!(
        r.local_change(&local_upsert("a", json!({"n": 1}), 1), 1)
            .unwrap()
            .is_empty()
    );
    assert!(
        r.local_change(&local_upsert("a", json!({"n": 2}), 2), 2)
            .unwrap()
            .is_empty()
    );
    assert!(
        r.local_change(
            &Change::delete("todo".into(), "b".into(), 3, Origin::Local),
            3
        )
        .unwrap()
        .is_empty()
    );
    assert_eq!(r.outbox_len(), 2, "two entities, one entry each");
    // Full: a third entity is refused, loudly; a queued one can still be edited.
    let err = r
        .local_change(&local_upsert("c", json!({}), 4), 4)
        .unwrap_err();
    assert!(matches!(err, ReplicaError::OutboxFull { limit: 2 }));
    r.local_change(&local_upsert("b", json!({"n": 3}), 5), 5)
        .unwrap();

    r.connect(10);
    let out = r.handle(welcome(0, 0), 10);
    assert_eq!(out.send.len(), 2);
    let a = change_of(&out.send[0]);
    assert_eq!(
        a.payload.entity.as_ref().unwrap().data,
        json!({"n": 2}),
        "latest content"
    );
    assert_eq!(
        a.payload.vector,
        VectorClock::from([("ra", 2)]),
        "one tick per local edit"
    );
    assert_eq!(a.payload.base_version, Some(0));
    let b = change_of(&out.send[1]);
    assert_eq!(
        b.payload.operation,
        Op::Upsert,
        "the later upsert replaced the delete"
    );
    assert!(matches!(
        out.events[0],
        ReplicaEvent::Connected { room_version: 0 }
    ));
}

#[test]
fn remote_and_storage_changes_are_not_echoed() {
    let mut r = connected();
    let mut c = local_upsert("a", json!({}), 1);
    c.origin = Origin::Remote;
    assert!(r.local_change(&c, 1).unwrap().is_empty());
    c.origin = Origin::Storage;
    assert!(r.local_change(&c, 1).unwrap().is_empty());
    assert_eq!(r.outbox_len(), 0);
}

#[test]
fn changes_are_resent_until_acknowledged() {
    let mut r = connected();
    let sent = r
        .local_change(&local_upsert("a", json!({"n": 1}), 1), 1)
        .unwrap();
    let id = change_of(&sent[0]).message_id.clone();
    assert!(r.tick(50).is_empty(), "not yet due");
    let again = r.tick(101);
    assert_eq!(
        change_of(&again[0]).message_id,
        id,
        "same message id: the server dedups"
    );
    let out = r.handle(
        ack(
            &id,
            1,
            state(
                "a",
                Some(json!({"n": 1})),
                1,
                VectorClock::from([("ra", 1)]),
            ),
        ),
        102,
    );
    assert!(
        out.apply.is_empty(),
        "the store already holds what was acknowledged"
    );
    assert!(matches!(
        &out.events[0],
        ReplicaEvent::Acked { version: 1, .. }
    ));
    assert_eq!(r.outbox_len(), 0);
    assert_eq!(r.watermark(), 1);
    // Idle: a heartbeat, nothing else.
    let beat = r.tick(5_000);
    assert!(matches!(beat.as_slice(), [ClientMessage::Heartbeat(_)]));
    // The next edit builds on the acknowledged clock and version.
    let sent = r
        .local_change(&local_upsert("a", json!({"n": 2}), 6_000), 6_000)
        .unwrap();
    let next = change_of(&sent[0]);
    assert_eq!(next.payload.vector, VectorClock::from([("ra", 2)]));
    assert_eq!(next.payload.base_version, Some(1));
}

#[test]
fn a_disconnect_keeps_the_queue_and_reconnect_resends_it() {
    let mut r = connected();
    r.local_change(&local_upsert("a", json!({}), 1), 1).unwrap();
    r.disconnected();
    assert_eq!(r.link(), LinkState::Disconnected);
    assert!(
        r.tick(10_000).is_empty(),
        "nothing is sent while disconnected"
    );
    let hello = r.connect(10_000);
    assert!(matches!(hello, ClientMessage::Hello(_)));
    let out = r.handle(welcome(0, 0), 10_001);
    assert_eq!(out.send.len(), 1);
}

#[test]
fn remote_changes_are_applied_marked_remote() {
    let mut r = connected();
    let out = r.handle(
        broadcast(state(
            "a",
            Some(json!({"t": 1})),
            1,
            VectorClock::from([("rb", 1)]),
        )),
        5,
    );
    assert_eq!(out.apply.len(), 1);
    assert_eq!(out.apply[0].origin, Origin::Remote);
    assert_eq!(
        out.apply[0]
            .entity
            .as_ref()
            .unwrap()
            .to_json()
            .unwrap()
            .data,
        json!({"t": 1})
    );
    // A duplicate or an older state is ignored.
    let out = r.handle(
        broadcast(state(
            "a",
            Some(json!({"t": 1})),
            1,
            VectorClock::from([("rb", 1)]),
        )),
        6,
    );
    assert!(out.apply.is_empty());
    let out = r.handle(
        broadcast(state("a", None, 2, VectorClock::from([("rb", 2)]))),
        7,
    );
    assert_eq!(out.apply[0].op, Op::Delete);
    // The next local edit is based on what was received.
    let sent = r
        .local_change(&local_upsert("a", json!({"t": 3}), 8), 8)
        .unwrap();
    let msg = change_of(&sent[0]);
    assert_eq!(
        msg.payload.vector,
        VectorClock::from([("rb", 2), ("ra", 1)])
    );
    assert_eq!(msg.payload.base_version, Some(2));
}

#[test]
fn a_remote_state_waits_while_a_local_change_is_unacknowledged() {
    let mut r = connected();
    let sent = r
        .local_change(&local_upsert("a", json!({"mine": 1}), 1), 1)
        .unwrap();
    let id = change_of(&sent[0]).message_id.clone();
    // Bob's concurrent edit lands first: the local store keeps the user's edit for now.
    let out = r.handle(
        broadcast(state(
            "a",
            Some(json!({"bob": 1})),
            1,
            VectorClock::from([("rb", 1)]),
        )),
        2,
    );
    assert!(out.apply.is_empty());
    // The ack brings the room's resolution, which replaces the local edit.
    let merged = state(
        "a",
        Some(json!({"bob": 1, "mine": 1})),
        2,
        VectorClock::from([("ra", 1), ("rb", 1)]),
    );
    let out = r.handle(ack(&id, 2, merged), 3);
    assert_eq!(out.apply.len(), 1);
    assert_eq!(
        out.apply[0]
            .entity
            .as_ref()
            .unwrap()
            .to_json()
            .unwrap()
            .data,
        json!({"bob": 1, "mine": 1})
    );
    assert_eq!(r.watermark(), 2);
}

#[test]
fn catch_up_moves_the_watermark_and_reports_the_end() {
    let mut r = connected();
    let page = |from, to, changes, complete| {
        ServerMessage::CatchUp(Envelope::new(
            "c",
            SERVER_USER_ID,
            1,
            CatchUpPayload {
                from_version: from,
                to_version: to,
                changes,
                complete,
            },
        ))
    };
    // A later page arriving first cannot move the watermark...
    let later = page(3, 5, vec![state("b", None, 5, VectorClock::new())], true);
    let out = r.handle(later.clone(), 1);
    assert_eq!(r.watermark(), 0);
    assert!(
        out.apply.is_empty(),
        "deleting what the store never had changes nothing"
    );
    // ...the first page does, and then the later page applies again.
    r.handle(
        page(
            0,
            3,
            vec![state("a", Some(json!({})), 3, VectorClock::new())],
            false,
        ),
        2,
    );
    assert_eq!(r.watermark(), 3);
    let out = r.handle(later, 3);
    assert_eq!(r.watermark(), 5);
    assert!(
        out.events
            .iter()
            .any(|e| matches!(e, ReplicaEvent::CaughtUp { version: 5 }))
    );
    // The next hello asks for what comes after.
    r.disconnected();
    assert!(matches!(r.connect(4), ClientMessage::Hello(h) if h.payload.last_version == 5));
    // The room was reset behind our back: forget our versions, take its states.
    let out = r.handle(welcome(1, 0), 5);
    assert!(
        out.events
            .iter()
            .any(|e| matches!(e, ReplicaEvent::Connected { room_version: 1 }))
    );
    assert_eq!(r.watermark(), 0);
    let out = r.handle(
        broadcast(state(
            "a",
            Some(json!({"fresh": true})),
            1,
            VectorClock::new(),
        )),
        6,
    );
    assert_eq!(out.apply.len(), 1);
}

#[test]
fn refused_changes_leave_the_queue_and_retryable_ones_stay() {
    let mut r = connected();
    let sent = r.local_change(&local_upsert("a", json!({}), 1), 1).unwrap();
    let id = change_of(&sent[0]).message_id.clone();
    let error = |code| {
        ServerMessage::Error(Envelope::new(
            "e",
            SERVER_USER_ID,
            1,
            ErrorPayload {
                code,
                message: "m".into(),
                refers_to: Some(id.clone()),
            },
        ))
    };
    let out = r.handle(error(ErrorCode::StorageFailed), 2);
    assert_eq!(r.outbox_len(), 1);
    assert!(matches!(
        out.events[0],
        ReplicaEvent::ServerError {
            code: ErrorCode::StorageFailed,
            ..
        }
    ));
    let out = r.handle(error(ErrorCode::InvalidEntity), 3);
    assert_eq!(r.outbox_len(), 0);
    assert!(
        matches!(&out.events[0], ReplicaEvent::Rejected { code: ErrorCode::InvalidEntity, change, .. }
        if change.message_id == id)
    );
}

#[test]
fn the_state_survives_a_restart_through_json() {
    let mut r = connected();
    r.handle(
        broadcast(state(
            "x",
            Some(json!({})),
            1,
            VectorClock::from([("rb", 1)]),
        )),
        1,
    );
    r.local_change(&local_upsert("a", json!({"n": 1}), 2), 2)
        .unwrap();
    let saved = serde_json::to_string(r.state()).unwrap();
    let restored = Replica::restore(config(), serde_json::from_str(&saved).unwrap());
    assert_eq!(restored.state(), r.state());
    assert_eq!(restored.outbox_len(), 1);
    assert_eq!(restored.watermark(), 1);
    let mut restored = restored;
    restored.connect(3);
    let out = restored.handle(welcome(1, 1), 4);
    assert_eq!(out.send.len(), 1, "the queued change goes out again");
}

#[test]
fn acked_through_waits_for_every_earlier_change() {
    let mut r = connected();
    let base = r.acked_through();
    assert_eq!(
        base,
        r.last_seq(),
        "nothing pending: everything built so far is durable"
    );
    let a1 = r
        .local_change(&local_upsert("a", json!({"n": 1}), 1), 1)
        .unwrap();
    let seq_a1 = r.last_seq();
    let b = r.local_change(&local_upsert("b", json!({}), 2), 2).unwrap();
    let seq_b = r.last_seq();
    let waiting = r
        .local_change(&local_upsert("a", json!({"n": 2}), 3), 3)
        .unwrap();
    assert!(
        waiting.is_empty(),
        "one change per entity in flight: a2 waits for a1's ack"
    );
    let seq_a2 = r.last_seq();
    assert!(r.acked_through() < seq_a1);
    // b is acknowledged, but a1 (folded into a2) is not: nothing new is durable yet.
    let b_id = change_of(&b[0]).message_id.clone();
    r.handle(
        ack(
            &b_id,
            1,
            state("b", Some(json!({})), 1, VectorClock::from([("ra", 1)])),
        ),
        4,
    );
    assert!(r.acked_through() < seq_a1);
    // The ack of the superseded a1 does not settle the entry either.
    let a1_id = change_of(&a1[0]).message_id.clone();
    let out = r.handle(
        ack(
            &a1_id,
            2,
            state(
                "a",
                Some(json!({"n": 1})),
                2,
                VectorClock::from([("ra", 1)]),
            ),
        ),
        5,
    );
    assert!(r.acked_through() < seq_a1);
    assert_eq!(r.outbox_len(), 1);
    assert_eq!(out.send.len(), 1, "a1's ack releases a2");
    let a2_id = change_of(&out.send[0]).message_id.clone();
    r.handle(
        ack(
            &a2_id,
            3,
            state(
                "a",
                Some(json!({"n": 2})),
                3,
                VectorClock::from([("ra", 2)]),
            ),
        ),
        6,
    );
    assert!(r.acked_through() >= seq_a2 && seq_a2 > seq_b);
}

#[test]
fn a_hostile_catch_up_page_cannot_overflow_the_watermark() {
    let mut r = connected();
    let page = ServerMessage::CatchUp(Envelope::new(
        "c",
        SERVER_USER_ID,
        1,
        CatchUpPayload {
            from_version: 0,
            to_version: u64::MAX,
            changes: vec![state("a", None, u64::MAX, VectorClock::new())],
            complete: true,
        },
    ));
    r.handle(page, 1);
    assert_eq!(r.watermark(), u64::MAX);
}

#[test]
fn after_a_refusal_the_next_server_state_replaces_the_refused_content() {
    let mut r = connected();
    r.handle(
        broadcast(state(
            "a",
            Some(json!({"n": 1})),
            1,
            VectorClock::from([("rb", 1)]),
        )),
        1,
    );
    let sent = r
        .local_change(&local_upsert("a", json!({"n": -5}), 2), 2)
        .unwrap();
    let id = change_of(&sent[0]).message_id.clone();
    let refusal = ServerMessage::Error(Envelope::new(
        "e",
        SERVER_USER_ID,
        3,
        ErrorPayload {
            code: ErrorCode::InvalidEntity,
            message: "n < 0".into(),
            refers_to: Some(id),
        },
    ));
    let out = r.handle(refusal, 3);
    assert!(
        out.apply.is_empty(),
        "no newer server state yet: the app decides"
    );
    // The room re-states the entity with the same content as before the refused edit: the
    // store (which still shows the refused content) must take it.
    let mut same = state(
        "a",
        Some(json!({"n": 1})),
        2,
        VectorClock::from([("rb", 2)]),
    );
    same.entity.as_mut().unwrap().updated_at = 1;
    let out = r.handle(broadcast(same), 4);
    assert_eq!(out.apply.len(), 1);
}

#[test]
fn a_queued_edit_goes_out_when_the_change_ahead_of_it_fails_or_times_out() {
    let mut r = connected();
    let first = r
        .local_change(&local_upsert("a", json!({"n": 1}), 1), 1)
        .unwrap();
    let first_id = change_of(&first[0]).message_id.clone();
    assert!(
        r.local_change(&local_upsert("a", json!({"n": 2}), 2), 2)
            .unwrap()
            .is_empty()
    );
    // The first write failed on the server: the queued edit (latest content) goes at once.
    let failed = ServerMessage::Error(Envelope::new(
        "e",
        SERVER_USER_ID,
        3,
        ErrorPayload {
            code: ErrorCode::StorageFailed,
            message: "m".into(),
            refers_to: Some(first_id),
        },
    ));
    let out = r.handle(failed, 3);
    assert_eq!(out.send.len(), 1);
    let second = change_of(&out.send[0]);
    assert_eq!(
        second.payload.entity.as_ref().unwrap().data,
        json!({"n": 2})
    );
    // Another edit queues behind it; a silent server makes the resend timer send it.
    assert!(
        r.local_change(&local_upsert("a", json!({"n": 3}), 4), 4)
            .unwrap()
            .is_empty()
    );
    assert!(r.tick(50).is_empty());
    let resent = r.tick(200);
    assert_eq!(resent.len(), 1);
    assert_eq!(
        change_of(&resent[0]).payload.entity.as_ref().unwrap().data,
        json!({"n": 3})
    );
}

/// Regression: any room member could send an upsert of kind `_kalphite_sync_replica` with
/// id = the room id; it was broadcast and the victim's flush wrote it over its own sync
/// state. Reserved kinds are never applied (the version still counts as received).
#[test]
fn a_remote_change_of_a_reserved_kind_is_never_applied() {
    let mut r = connected();
    let mut forged = state(
        "r",
        Some(json!({"replicaId": "x", "state": {}})),
        1,
        VectorClock::new(),
    );
    forged.entity_type = "_kalphite_sync_replica".into();
    if let Some(e) = forged.entity.as_mut() {
        e.kind = "_kalphite_sync_replica".into();
    }
    let out = r.handle(broadcast(forged), 1);
    assert!(out.apply.is_empty(), "{:?}", out.apply);
    assert_eq!(r.watermark(), 1, "the version is still received");
    assert!(r.state().known.is_empty(), "nothing is remembered about it");
}

/// What changed since the last `take_delta` is exactly what is reported: local edits put
/// outbox entries, acks remove them and record what the server said, and the counters
/// move; a second call reports nothing new.
#[test]
fn deltas_report_each_change_of_the_persistent_state_once() {
    let mut r = connected();
    let _ = r.take_delta();
    let sent = r
        .local_change(&local_upsert("a", json!({"n": 1}), 1), 1)
        .unwrap();
    let id = change_of(&sent[0]).message_id.clone();
    let delta = r.take_delta();
    assert_eq!(delta.outbox.len(), 1);
    assert!(delta.outbox[0].1.is_some(), "queued");
    assert!(delta.progress.is_some());
    assert!(r.take_delta().is_empty(), "nothing new");

    r.handle(
        ack(
            &id,
            1,
            state(
                "a",
                Some(json!({"n": 1})),
                1,
                VectorClock::from([("ra", 1)]),
            ),
        ),
        2,
    );
    let delta = r.take_delta();
    assert_eq!(delta.outbox.len(), 1);
    assert!(delta.outbox[0].1.is_none(), "acknowledged: removed");
    assert_eq!(delta.known.len(), 1);
    assert_eq!(delta.known[0].1.version, 1);
    assert_eq!(delta.progress.as_ref().map(|p| p.watermark), Some(1));

    // The deltas of a whole history rebuild the state.
    let mut disk = kalphite_sync::ReplicaState::default();
    let mut replay = Replica::new(config());
    replay.connect(0);
    replay.handle(welcome(0, 0), 0);
    replay
        .local_change(&local_upsert("b", json!({"n": 2}), 3), 3)
        .unwrap();
    disk.apply_delta(replay.take_delta());
    assert_eq!(&disk, replay.state());
}

/// Regression: "durable on the server" counted a change as done when the server never
/// got it — refused because the outbox was full, or rejected by the server for good. Such
/// changes are now reported until a newer change of the entity is acknowledged.
#[test]
fn changes_the_server_will_not_get_are_reported_until_superseded() {
    let mut r = connected();
    let a = r
        .local_change(&local_upsert("a", json!({"n": 1}), 1), 1)
        .unwrap();
    r.local_change(&local_upsert("b", json!({"n": 1}), 1), 1)
        .unwrap();
    // Outbox limit 2: a third entity is refused.
    r.local_change(&local_upsert("c", json!({"n": 1}), 2), 2)
        .unwrap_err();
    let upto = r.last_seq();
    let refused = r.undelivered_through(upto);
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].key.id.as_str(), "c");
    assert!(
        refused[0].reason.contains("offline queue is full"),
        "{}",
        refused[0].reason
    );
    assert!(r.acked_through() < upto, "a and b still wait");

    // The server rejects a for good.
    let a_id = change_of(&a[0]).message_id.clone();
    r.handle(
        ServerMessage::Error(Envelope::new(
            "e",
            SERVER_USER_ID,
            3,
            ErrorPayload {
                code: ErrorCode::InvalidEntity,
                message: "no".into(),
                refers_to: Some(a_id),
            },
        )),
        3,
    );
    let ids: Vec<_> = r
        .undelivered_through(r.last_seq())
        .iter()
        .map(|u| (u.key.id.to_string(), u.code))
        .collect();
    assert_eq!(
        ids,
        [
            ("a".to_owned(), Some(ErrorCode::InvalidEntity)),
            ("c".to_owned(), None)
        ]
    );

    // A newer edit of a, acknowledged, supersedes the rejected one.
    let again = r
        .local_change(&local_upsert("a", json!({"n": 2}), 4), 4)
        .unwrap();
    let id = change_of(&again[0]).message_id.clone();
    r.handle(
        ack(
            &id,
            1,
            state(
                "a",
                Some(json!({"n": 2})),
                1,
                VectorClock::from([("ra", 2)]),
            ),
        ),
        5,
    );
    let left: Vec<_> = r
        .undelivered_through(r.last_seq())
        .iter()
        .map(|u| u.key.id.to_string())
        .collect();
    assert_eq!(left, ["c"]);
}

/// Changes queued under another replica id (the configured id changed between runs) are
/// stamped anew as this replica's edits: sent with the old id's clock, the room would
/// refuse them (a clock may not claim edits the room never had from another replica).
#[test]
fn changes_queued_under_another_replica_id_are_restamped() {
    let mut old = Replica::new(config());
    old.local_change(&local_upsert("a", json!({"n": 1}), 1), 1)
        .unwrap();
    let state = old.state().clone();
    let mut c = config();
    c.replica_id = "rb".into();
    let mut r = Replica::restore(c, state);
    r.connect(2);
    let out = r.handle(welcome(0, 0), 2);
    let sent = change_of(&out.send[0]);
    assert!(sent.message_id.starts_with("rb-"), "{}", sent.message_id);
    assert_eq!(sent.payload.vector, VectorClock::from([("rb", 1)]));
    assert_eq!(sent.payload.entity.as_ref().unwrap().data, json!({"n": 1}));
    assert_eq!(r.take_delta().outbox.len(), 1, "the new stamp is persisted");
}

/// A room restored from an older backup (its welcome starts below our watermark) no
/// longer counts the other replicas' edits our clocks name; the room refuses a clock that
/// claims them (`invalid_clock`). Queued changes and later edits keep only our own count.
#[test]
fn after_a_room_reset_clocks_claim_only_our_own_edits() {
    let mut r = connected();
    // The room told us bob edited `a` twice; then we edited it offline.
    let c = state(
        "c",
        Some(json!({"n": 0})),
        1,
        VectorClock::from([("bob", 1)]),
    );
    r.handle(broadcast(c), 1);
    let a = state(
        "a",
        Some(json!({"n": 1})),
        2,
        VectorClock::from([("bob", 2)]),
    );
    r.handle(broadcast(a), 1);
    assert_eq!(r.watermark(), 2);
    r.disconnected();
    r.local_change(&local_upsert("a", json!({"n": 2}), 2), 2)
        .unwrap();
    r.local_change(&local_upsert("b", json!({"n": 1}), 2), 2)
        .unwrap();
    r.connect(3);
    let out = r.handle(welcome(0, 0), 3);
    for msg in &out.send {
        let change = change_of(msg);
        assert_eq!(
            change.payload.vector,
            VectorClock::from([("ra", 1)]),
            "{}: only our own edit",
            change.payload.entity_id
        );
    }
    assert_eq!(out.send.len(), 2);
    assert!(r.state().known.values().all(|k| k.vector.get("bob") == 0));
}

/// Regression: a change that arrived before the welcome (a busy room) moved the
/// watermark past what the hello asked for, and the welcome then looked like a room
/// reset: the replica forgot every version and clock it knew, so its next edit of an
/// entity had no merge base and the room fell back to last-write-wins (a field-merge
/// edit lost in ~1 of 20 runs of `server_e2e`'s conflict test).
#[test]
fn a_change_before_the_welcome_is_not_a_room_reset() {
    let mut r = connected();
    r.handle(
        broadcast(state(
            "a",
            Some(json!({"n": 1})),
            1,
            VectorClock::from([("bob", 1)]),
        )),
        1,
    );
    r.disconnected();
    r.local_change(&local_upsert("a", json!({"n": 2}), 2), 2)
        .unwrap();
    assert!(matches!(r.connect(3), ClientMessage::Hello(h) if h.payload.last_version == 1));
    r.handle(
        broadcast(state(
            "b",
            Some(json!({"n": 1})),
            2,
            VectorClock::from([("bob", 2)]),
        )),
        3,
    );
    assert_eq!(r.watermark(), 2);
    let out = r.handle(welcome(2, 1), 3);
    let sent = change_of(&out.send[0]);
    assert_eq!(sent.payload.base_version, Some(1), "the merge base is kept");
    assert_eq!(
        sent.payload.vector,
        VectorClock::from([("bob", 1), ("ra", 1)])
    );
    assert_eq!(r.watermark(), 2);
}

/// A room that collects a tombstone 3 versions after it, with catch-up pages of 2, and a
/// replica `bob` (connection 2) writing to it.
struct CollectingRoom {
    room: Room,
    bob: Replica,
    alice_online: bool,
    /// What the room sent alice (connection 1), in order.
    to_alice: Vec<ServerMessage>,
}

const NOW: u64 = 1_000_000;

impl CollectingRoom {
    fn new() -> Self {
        let room = Room::new("r", ConflictPolicy::new(Strategy::LastWriteWins))
            .with_meta(RoomMeta::new("e1"))
            .with_limits(RoomLimits {
                catch_up_page: 2,
                tombstone_versions: 3,
                tombstone_age: 0,
                ..RoomLimits::default()
            });
        let mut this = Self {
            room,
            bob: Replica::new(ReplicaConfig::new("r", "bob", "rb")),
            alice_online: false,
            to_alice: Vec::new(),
        };
        let ClientMessage::Hello(hello) = this.bob.connect(NOW) else {
            panic!("a hello first");
        };
        let outs = this.room.join(2, "bob", &hello, NOW).expect("bob joins");
        this.route(outs);
        this
    }

    fn route(&mut self, outs: Vec<Outbound>) {
        for out in outs {
            let (alice, bob) = match out.to {
                Recipient::One(c) => (c == 1, c == 2),
                Recipient::AllExcept(c) => (c != 1 && self.alice_online, c != 2),
            };
            if alice {
                self.to_alice.push(out.message.clone());
            }
            if bob {
                let sent = self.bob.handle(out.message, NOW).send;
                for m in sent {
                    self.from(2, m);
                }
            }
        }
    }

    fn from(&mut self, conn: u64, message: ClientMessage) {
        let outs = match self.room.handle(conn, message, NOW) {
            Step::Reply(outs) => outs,
            Step::Persist(pending) => {
                let outs = self.room.commit(pending).expect("own pending");
                let _ = self.room.collect_due(NOW);
                outs
            }
        };
        self.route(outs);
    }

    fn bob_writes(&mut self, id: &str, data: Option<Value>) {
        let change = match data {
            Some(d) => local_upsert(id, d, NOW),
            None => Change::delete("todo".into(), id.into(), NOW, Origin::Local),
        };
        for m in self.bob.local_change(&change, NOW).expect("queued") {
            self.from(2, m);
        }
    }

    fn join_alice(&mut self, hello: ClientMessage) -> Vec<ServerMessage> {
        let ClientMessage::Hello(hello) = hello else {
            panic!("a hello first");
        };
        self.alice_online = true;
        let outs = self
            .room
            .join(1, "alice", &hello, NOW)
            .expect("alice joins");
        self.route(outs);
        std::mem::take(&mut self.to_alice)
    }

    fn alice_leaves(&mut self) {
        self.room.leave(1);
        self.alice_online = false;
        self.to_alice.clear();
    }
}

/// A replica and what its adapter persisted: every [`Replica::take_delta`] applied in order,
/// and its local store.
struct Alice {
    replica: Replica,
    disk: ReplicaState,
    store: std::collections::BTreeMap<String, Entity<Value>>,
    events: Vec<ReplicaEvent>,
}

impl Alice {
    fn handle(&mut self, message: ServerMessage) {
        let out = self.replica.handle(message, NOW);
        for c in out.apply {
            match c.entity {
                Some(e) => {
                    self.store
                        .insert(c.id.to_string(), e.to_json().expect("json"));
                }
                None => {
                    self.store.remove(&*c.id);
                }
            }
        }
        self.events.extend(out.events);
        self.disk.apply_delta(self.replica.take_delta());
    }
}

/// Regression (the cluster simulation, seed 1237): a replica older than the room's
/// collection horizon gets a snapshot of the room's own epoch; the connection drops after
/// its first page, which already moved the watermark past the horizon, and the stored
/// epoch is the room's. The next hello asked for an incremental catch-up from that
/// watermark, so the entity the snapshot would have dropped (deleted, and its tombstone
/// collected) stayed on the replica for good. Now the replica persists that a resync is
/// under way and asks from 0 until it is finished, after a reconnect or a restart alike.
#[test]
fn an_interrupted_snapshot_resync_is_started_again_and_finished() {
    for restart in [false, true] {
        let mut net = CollectingRoom::new();
        net.bob_writes("a", Some(json!({"n": 1})));
        let mut alice = Alice {
            replica: Replica::new(config()),
            disk: ReplicaState::default(),
            store: std::collections::BTreeMap::new(),
            events: Vec::new(),
        };
        for m in net.join_alice(alice.replica.connect(NOW)) {
            alice.handle(m);
        }
        assert_eq!(alice.replica.watermark(), 1);
        assert!(alice.store.contains_key("a"));
        net.alice_leaves();
        alice.replica.disconnected();

        // While alice is away, `a` is deleted (version 2) and its tombstone collected.
        net.bob_writes("a", None);
        for (i, id) in ["b", "c", "d", "e", "f", "g"].into_iter().enumerate() {
            net.bob_writes(id, Some(json!({ "n": i })));
        }
        let horizon = net.room.meta().expect("meta").collected_through;
        assert_eq!((horizon, net.room.version()), (2, 8));

        // Alice is older than the horizon: a snapshot, cut after its first page (b, c).
        let messages = net.join_alice(alice.replica.connect(NOW));
        assert!(
            matches!(&messages[0], ServerMessage::Welcome(w) if w.payload.snapshot),
            "{messages:?}"
        );
        assert!(messages.len() > 3, "several pages: {messages:?}");
        for m in messages.into_iter().take(2) {
            alice.handle(m);
        }
        assert!(alice.replica.watermark() > horizon, "the page moved it");
        assert!(alice.disk.resyncing);
        net.alice_leaves();
        alice.replica.disconnected();
        if restart {
            alice.replica = Replica::restore(config(), alice.disk.clone());
        }

        // The next connection asks for the whole snapshot again, and finishes it.
        let hello = alice.replica.connect(NOW);
        assert!(
            matches!(&hello, ClientMessage::Hello(h) if h.payload.last_version == 0
                && h.payload.epoch.as_deref() == Some("e1")),
            "restart {restart}: {hello:?}"
        );
        for m in net.join_alice(hello) {
            alice.handle(m);
        }
        let ids: Vec<&str> = alice.store.keys().map(String::as_str).collect();
        assert_eq!(ids, ["b", "c", "d", "e", "f", "g"], "restart {restart}");
        assert!(alice.events.iter().any(|e| matches!(e,
            ReplicaEvent::Resynced { snapshot: true, dropped, .. }
                if dropped.iter().map(|k| &*k.id).eq(["a"]))));
        assert_eq!(alice.replica.watermark(), net.room.version());
        assert!(!alice.replica.state().resyncing);
        assert_eq!(alice.replica.state().epoch.as_deref(), Some("e1"));
        assert_eq!(&alice.disk, alice.replica.state(), "restart {restart}");

        // And from there on, incremental again.
        net.alice_leaves();
        alice.replica.disconnected();
        let hello = alice.replica.connect(NOW);
        assert!(matches!(&hello, ClientMessage::Hello(h) if h.payload.last_version == 8));
    }
}
