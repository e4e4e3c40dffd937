//! Issue 10, item 8: "a join builds the whole catch-up in memory under the room lock".
//! A join now takes a snapshot of the records to send (shared pointers, nothing encoded)
//! and a [`CatchUpStream`] makes its pages one at a time. These tests pin that the stream
//! makes exactly the pages the all-at-once catch-up made (checked against a shadow model
//! of the old algorithm, over seeded random rooms and page limits), with the same message
//! ids as [`Room::join`], and that nothing the room does after the join (edits, deletes,
//! new entities, collected tombstones) alters the pages still to come.

use std::collections::{BTreeMap, HashSet};

use kalphite::{Entity, Op};
use kalphite_sync::{
    CatchUpPayload, CatchUpStream, ChangePayload, ClientMessage, ConflictPolicy, EntityKey,
    Envelope, HeartbeatPayload, HelloPayload, Outbound, PROTOCOL_VERSION, Room, RoomLimits,
    RoomMeta, ServerMessage, Stamp, Step, StoredChange, VectorClock,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

const SEEDS: u64 = 300;

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

/// A random room history: versions 1..=n over a few entities (so most are superseded),
/// states of random sizes, about one in five a tombstone.
fn history(rng: &mut StdRng) -> Vec<StoredChange> {
    let n = rng.random_range(0..60u64);
    let entities = rng.random_range(1..20u32);
    (1..=n)
        .map(|v| {
            let id = format!("e{}", rng.random_range(0..entities));
            let state = (!rng.random_bool(0.2)).then(|| {
                let len = rng.random_range(0..3_000);
                Entity::new(
                    id.as_str(),
                    "todo",
                    json!({"v": v, "blob": "x".repeat(len)}),
                )
                .at(v)
            });
            StoredChange {
                version: v,
                kind: "todo".into(),
                id: id.as_str().into(),
                state,
                vector: VectorClock::from([("r", v)]),
                stamp: Stamp {
                    at: v,
                    user_id: "u".into(),
                },
                message_id: format!("m{v}"),
                replica_id: "r".into(),
                author: "u".into(),
            }
        })
        .collect()
}

fn limits(rng: &mut StdRng) -> RoomLimits {
    RoomLimits {
        catch_up_page: rng.random_range(1..12),
        catch_up_page_bytes: rng.random_range(50..8_000),
        ..RoomLimits::default()
    }
}

/// The old all-at-once catch-up, on a plain map of the records: each entity's latest
/// record newer than `after`, in version order, cut before a page would pass either limit.
fn shadow_pages(records: &[StoredChange], limits: RoomLimits, after: u64) -> Vec<CatchUpPayload> {
    let mut latest: BTreeMap<EntityKey, &StoredChange> = BTreeMap::new();
    for r in records {
        latest.insert(r.key(), r);
    }
    let mut current: Vec<&StoredChange> =
        latest.into_values().filter(|r| r.version > after).collect();
    current.sort_by_key(|r| r.version);
    let room_version = records.last().map_or(0, |r| r.version);
    let max_count = limits.catch_up_page.max(1);
    let (mut pages, mut changes, mut bytes) = (Vec::new(), Vec::new(), 0usize);
    let (mut from, mut last) = (after, after);
    for r in current {
        let payload = r.to_payload();
        let size = serde_json::to_vec(&payload).expect("encode").len();
        if !changes.is_empty()
            && (changes.len() == max_count || bytes + size > limits.catch_up_page_bytes)
        {
            pages.push(CatchUpPayload {
                from_version: from,
                to_version: last,
                changes: std::mem::take(&mut changes),
                complete: false,
            });
            from = last;
            bytes = 0;
        }
        changes.push(payload);
        bytes += size;
        last = r.version;
    }
    pages.push(CatchUpPayload {
        from_version: from,
        to_version: room_version.max(from),
        changes,
        complete: true,
    });
    pages
}

fn restored(records: &[StoredChange], limits: RoomLimits) -> Room {
    Room::new("r", ConflictPolicy::default())
        .with_limits(limits)
        .restore(records.iter().cloned())
        .expect("restore")
}

fn drain(stream: &mut CatchUpStream) -> Vec<CatchUpPayload> {
    std::iter::from_fn(|| stream.next_page()).collect()
}

fn page_of(out: &Outbound) -> CatchUpPayload {
    match &out.message {
        ServerMessage::CatchUp(page) => page.payload.clone(),
        other => panic!("not a page: {other:?}"),
    }
}

#[test]
fn the_stream_makes_the_pages_of_the_old_catch_up_for_random_rooms() {
    for seed in 0..SEEDS {
        let mut rng = StdRng::seed_from_u64(seed);
        let records = history(&mut rng);
        let limits = limits(&mut rng);
        let room = restored(&records, limits);
        let version = room.version();
        for after in [
            0,
            version / 2,
            version.saturating_sub(1),
            version,
            version + 3,
        ] {
            let expected = shadow_pages(&records, limits, after);
            assert_eq!(room.catch_up(after), expected, "seed {seed}, after {after}");
            let mut stream = room.catch_up_stream(after);
            assert_eq!(drain(&mut stream), expected, "seed {seed}, after {after}");
            assert!(stream.is_finished() && stream.next_page().is_none());
        }
    }
}

#[test]
fn a_streamed_join_sends_what_an_all_at_once_join_sends_with_unique_ids() {
    for seed in 0..SEEDS {
        let mut rng = StdRng::seed_from_u64(seed);
        let records = history(&mut rng);
        let limits = limits(&mut rng);
        let version = records.last().map_or(0, |r| r.version);
        let last = rng.random_range(0..=version + 2);

        let mut at_once = restored(&records, limits);
        let all = at_once
            .join(7, "alice", &hello("ra", last), 5)
            .expect("join");

        let mut room = restored(&records, limits);
        let joined = room
            .join_streamed(7, "alice", &hello("ra", last), 5)
            .expect("join");
        assert_eq!(joined.catch_up.conn(), 7);
        let mut streamed = vec![joined.welcome];
        streamed.extend(joined.catch_up);
        assert_eq!(streamed, all, "seed {seed}: same frames, ids included");

        let from = if last > version { 0 } else { last };
        let pages: Vec<_> = streamed[1..].iter().map(page_of).collect();
        assert_eq!(pages, shadow_pages(&records, limits, from), "seed {seed}");

        // The room's later messages to the joiner take ids the pages do not use.
        let beat = ClientMessage::Heartbeat(Envelope::new("hb", "alice", 6, HeartbeatPayload {}));
        let Step::Reply(reply) = room.handle(7, beat, 6) else {
            panic!("a heartbeat is answered")
        };
        let mut ids = HashSet::new();
        for out in streamed.iter().chain(&reply) {
            assert!(
                ids.insert(out.message.message_id().to_owned()),
                "seed {seed}: message id {} used twice",
                out.message.message_id()
            );
        }
    }
}

/// A change of `id` from connection 1 (replica "rw"), committed at once.
fn write(room: &mut Room, n: u64, id: &str, delete: bool) {
    let key = EntityKey::new("todo", id);
    let current = room.get(&key).map(|c| (c.version, c.vector.clone()));
    let vector = current
        .as_ref()
        .map_or_else(VectorClock::new, |(_, v)| v.clone())
        .incremented("rw");
    let payload = ChangePayload {
        operation: if delete { Op::Delete } else { Op::Upsert },
        entity_type: "todo".into(),
        entity_id: id.into(),
        entity: (!delete).then(|| Entity::new(id, "todo", json!({"late": n})).at(1_000 + n)),
        vector,
        base_version: Some(current.map_or(0, |(v, _)| v)),
        room_version: None,
    };
    let message =
        ClientMessage::Change(Envelope::new(format!("w{n}"), "writer", 1_000 + n, payload));
    let Step::Persist(pending) = room.handle(1, message, 1_000 + n) else {
        panic!("change {n} of {id} not accepted")
    };
    room.commit(pending).expect("commit");
}

#[test]
fn changes_committed_after_the_join_do_not_alter_its_pages() {
    for seed in 0..SEEDS / 3 {
        let mut rng = StdRng::seed_from_u64(seed);
        let records = history(&mut rng);
        if records.is_empty() {
            continue;
        }
        let limits = RoomLimits {
            tombstone_versions: 1,
            tombstone_age: 0,
            ..limits(&mut rng)
        };
        let mut room = Room::new("r", ConflictPolicy::default())
            .with_meta(RoomMeta::new("epoch"))
            .with_limits(limits)
            .restore(records.iter().cloned())
            .expect("restore");
        room.join(1, "writer", &hello("rw", room.version()), 1)
            .expect("writer joins");
        let expected = room.catch_up(0);
        let joined = room
            .join_streamed(2, "reader", &hello("rr", 0), 1)
            .expect("reader joins");
        let mut stream = joined.catch_up;
        let mut pages = Vec::new();
        pages.extend(stream.next_page());
        // Edit, delete and create entities, then collect the tombstones: the records
        // the stream holds are replaced or dropped by the room.
        let ids: Vec<String> = records.iter().map(|r| r.id.to_string()).collect();
        for n in 0..rng.random_range(1..40u64) {
            let id = if rng.random_bool(0.7) {
                ids[rng.random_range(0..ids.len())].clone()
            } else {
                format!("new{n}")
            };
            write(&mut room, n, &id, rng.random_bool(0.3));
        }
        let collected = room.collect_tombstones(u64::MAX);
        assert!(room.version() > expected.last().expect("a page").to_version);
        pages.extend(drain(&mut stream));
        assert_eq!(
            pages,
            expected,
            "seed {seed}: pages changed after the join ({} tombstones collected)",
            collected.len()
        );
    }
}
