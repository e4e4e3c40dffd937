//! The fuzz targets' checks under plain `cargo test` (docs/fuzzing.md). Each seed corpus
//! committed under `fuzz/corpus/<target>/` is replayed through the same code the fuzz
//! target runs (`fuzz/src/`, compiled in here), so CI exercises the frame decoders, the
//! room and the replica on every input that reached new code in the fuzzing runs; and
//! every crasher a run found is a named test below, with the bug it pins.

use std::path::{Path, PathBuf};

#[allow(dead_code, unreachable_pub)]
#[path = "../../../fuzz/src/bytes.rs"]
mod bytes;
#[allow(dead_code, unreachable_pub)]
#[path = "../../../fuzz/src/frames.rs"]
mod frames;
#[allow(dead_code, unreachable_pub)]
#[path = "../../../fuzz/src/replica_sequence.rs"]
mod replica_sequence;
#[allow(dead_code, unreachable_pub)]
#[path = "../../../fuzz/src/room_sequence.rs"]
mod room_sequence;

/// The files of `fuzz/corpus/<target>/`, sorted by name.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let data = std::fs::read(&path).unwrap();
            (path, data)
        })
        .collect()
}

/// Replays `target`'s corpus through `check`, naming the file that fails.
fn replay(target: &str, min_files: usize, check: impl Fn(&[u8])) {
    let files = corpus(target);
    assert!(
        files.len() >= min_files,
        "fuzz/corpus/{target} holds {} files, expected at least {min_files}",
        files.len()
    );
    for (path, data) in &files {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(data)));
        assert!(result.is_ok(), "{} fails its checks", path.display());
    }
}

#[test]
fn the_decode_client_corpus_passes() {
    replay("decode_client", 20, |data| {
        frames::check_client(&String::from_utf8_lossy(data));
    });
}

#[test]
fn the_decode_server_corpus_passes() {
    replay("decode_server", 20, |data| {
        frames::check_server(&String::from_utf8_lossy(data));
    });
}

#[test]
fn the_room_sequence_corpus_passes() {
    replay("room_sequence", 20, room_sequence::run);
}

#[test]
fn the_replica_sequence_corpus_passes() {
    replay("replica_sequence", 20, replica_sequence::run);
}

mod crashers {
    //! Crashers found by the fuzz targets, each written out by hand so that it does not
    //! depend on how the harness reads its bytes.

    use kalphite::{Entity, Op};
    use kalphite_sync::{
        ChangePayload, ClientMessage, ConflictPolicy, Envelope, HelloPayload, PROTOCOL_VERSION,
        Room, RoomLimits, RoomMeta, ServerMessage, Step, VectorClock, decode_server, encode,
    };
    use serde_json::{Value, json};
    use std::sync::Arc;

    fn hello(replica: &str) -> Envelope<HelloPayload> {
        let payload = serde_json::from_value(json!({
            "protocolVersion": PROTOCOL_VERSION, "roomId": "r", "replicaId": replica,
        }))
        .unwrap();
        Envelope::new(format!("{replica}-hello"), "u", 1, payload)
    }

    fn change(
        message_id: &str,
        operation: Op,
        entity: Option<Entity<Value>>,
        vector: VectorClock,
    ) -> ClientMessage {
        ClientMessage::Change(Envelope::new(
            message_id,
            "u",
            5,
            ChangePayload {
                operation,
                entity_type: "todo".into(),
                entity_id: "c".into(),
                entity,
                vector,
                base_version: Some(0),
                room_version: None,
            },
        ))
    }

    /// Handles `message` and commits what it makes; returns everything sent.
    fn send(room: &mut Room, conn: u64, message: ClientMessage) -> Vec<ServerMessage> {
        let out = match room.handle(conn, message, 10) {
            Step::Reply(out) => out,
            Step::Persist(pending) => room.commit(pending).unwrap(),
        };
        out.into_iter().map(|o| o.message).collect()
    }

    fn nested(levels: usize) -> Value {
        (0..levels).fold(json!(1), |inner, _| json!({ "n": [inner] }))
    }

    #[test]
    fn a_conflicting_delete_does_not_echo_its_unchecked_entity() {
        // Found by room_sequence: a delete may carry an entity, which the room ignores and
        // so never checks; but the conflict notice echoed the change as sent (`yours`),
        // entity included. Nested 130 deep, that notice was a frame no client can decode
        // (serde stops at 128 levels), so its author could never read it.
        let mut room = Room::new("r", ConflictPolicy::default());
        room.join(1, "u", &hello("p1"), 1).unwrap();
        room.join(2, "u", &hello("p2"), 1).unwrap();
        let todo = Entity::new("c", "todo", json!({"title": "milk"})).at(5);
        let first = send(
            &mut room,
            1,
            change("p1-1", Op::Upsert, Some(todo), [("p1", 1)].into()),
        );
        assert!(matches!(first[0], ServerMessage::Ack(_)));
        // A concurrent delete (it has not seen p1's edit) with a deep entity attached.
        let deep = Entity::new("c", "todo", nested(65)).at(6);
        let out = send(
            &mut room,
            2,
            change("p2-1", Op::Delete, Some(deep), [("p2", 1)].into()),
        );
        assert!(
            out.iter().any(|m| matches!(m, ServerMessage::Conflict(_))),
            "the delete conflicted: {out:?}"
        );
        for message in out {
            let frame = encode(&message).unwrap();
            let decoded = decode_server(&frame, usize::MAX);
            assert!(
                decoded.is_ok(),
                "a client cannot decode {:?}",
                decoded.err()
            );
            if let ServerMessage::Conflict(c) = message {
                assert_eq!(c.payload.yours.entity, None, "a delete carries no entity");
            }
        }
    }

    #[test]
    fn a_room_rebuilt_after_collecting_its_latest_change_keeps_its_version() {
        // Found by room_sequence: with a horizon of 0 versions, the tombstone of the room's
        // latest change could be collected; the log then no longer held that version, and
        // the room rebuilt from the log and its meta came back at an older version, so its
        // next changes reused version numbers that clients already held.
        let limits = RoomLimits {
            tombstone_versions: 0,
            tombstone_age: 0,
            ..RoomLimits::default()
        };
        let new_room = || {
            Room::new("r", ConflictPolicy::default())
                .with_limits(limits)
                .with_meta(RoomMeta::new("e1"))
        };
        let mut room = new_room();
        room.join(1, "u", &hello("p1"), 1).unwrap();
        let todo = Entity::new("c", "todo", json!({"title": "milk"})).at(5);
        send(
            &mut room,
            1,
            change("p1-1", Op::Upsert, Some(todo), [("p1", 1)].into()),
        );
        send(
            &mut room,
            1,
            change("p1-2", Op::Delete, None, [("p1", 2)].into()),
        );
        assert_eq!(room.version(), 2);
        let collected = room.collect_tombstones(10);
        assert_eq!(collected.len(), 1, "the delete, the entity's latest record");
        // The log held one record per entity: nothing is left of it.
        let meta = room.meta().unwrap().clone();
        let mut rebuilt = new_room().with_meta(meta).restore(Vec::new()).unwrap();
        assert_eq!(
            rebuilt.version(),
            2,
            "the rebuilt room is where the room was"
        );
        rebuilt.join(1, "u", &hello("p1"), 20).unwrap();
        let todo = Entity::new("d", "todo", json!({"title": "eggs"})).at(21);
        let mut next = change("p1-3", Op::Upsert, Some(todo), [("p1", 3)].into());
        if let ClientMessage::Change(c) = &mut next {
            c.payload.entity_id = "d".into();
        }
        let Step::Persist(pending) = rebuilt.handle(1, next, 21) else {
            panic!("accepted");
        };
        assert_eq!(
            pending.record().version,
            3,
            "a new version, not one clients hold"
        );
    }

    /// A typed kind: its schema keeps `title` and drops every other field.
    #[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
    struct Note {
        #[serde(default)]
        title: Value,
    }

    impl kalphite::EntityKind for Note {
        const KIND: &'static str = "todo";
    }

    #[test]
    fn a_conflicting_upsert_is_checked_as_sent_not_only_as_normalized() {
        // The first bug again, through a schema that normalizes: the depth limit was
        // checked on the data as the schema returned it, which drops unknown fields, while
        // the conflict notice echoes the data as sent. A deep unknown field passed, and the
        // notice was a frame no client can decode.
        let schema = kalphite::TypedSchema::new().kind::<Note>();
        let mut room = Room::new("r", ConflictPolicy::default()).with_schema(Arc::new(schema));
        room.join(1, "u", &hello("p1"), 1).unwrap();
        room.join(2, "u", &hello("p2"), 1).unwrap();
        let todo = Entity::new("c", "todo", json!({"title": "milk"})).at(5);
        let first = send(
            &mut room,
            1,
            change("p1-1", Op::Upsert, Some(todo), [("p1", 1)].into()),
        );
        assert!(matches!(first[0], ServerMessage::Ack(_)));
        let deep = Entity::new("c", "todo", json!({"title": "eggs", "extra": nested(65)})).at(6);
        let out = send(
            &mut room,
            2,
            change("p2-1", Op::Upsert, Some(deep), [("p2", 1)].into()),
        );
        for message in out {
            let frame = encode(&message).unwrap();
            let decoded = decode_server(&frame, usize::MAX);
            assert!(
                decoded.is_ok(),
                "a client cannot decode {:?}",
                decoded.err()
            );
            if let ServerMessage::Error(e) = &message {
                assert_eq!(e.payload.code, kalphite_sync::ErrorCode::InvalidEntity);
                assert_eq!(e.payload.refers_to.as_deref(), Some("p2-1"));
            }
        }
    }
}
