//! Kinds starting with [`kalphite::RESERVED_KIND_PREFIX`] are kalphite's own bookkeeping:
//! the store never holds one. Every write path refuses them with
//! [`Error::ReservedKind`] (leaving the store as it was), hydration skips them, and reads
//! find nothing.

mod common;

use std::sync::{Arc, Mutex};

use common::{Comment, comment, comment_json, counter, get};
use kalphite::{
    Change, ChangeSink, Entity, EntityKind, Error, Origin, RESERVED_KIND_PREFIX, Store,
    Subscription, is_reserved_kind,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const REPLICA: &str = "_kalphite_sync_replica";

/// The sync client's old bookkeeping record, as a typed kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Replica {
    outbox: Vec<String>,
}

impl EntityKind for Replica {
    const KIND: &'static str = REPLICA;
}

fn replica_json(id: &str) -> Entity<Value> {
    Entity::new(id, REPLICA, json!({"outbox": ["forged"]}))
}

fn reserved(kind: &str) -> Error {
    Error::ReservedKind { kind: kind.into() }
}

#[derive(Default)]
struct Sink(Mutex<Vec<Change>>);

impl ChangeSink for Sink {
    fn accept(&self, changes: &[Change]) {
        self.0.lock().unwrap().extend_from_slice(changes);
    }
}

/// A seeded store with a sink and a subscriber; `assert_unchanged` checks all three.
struct Fixture {
    store: Store,
    sink: Arc<Sink>,
    count: Arc<std::sync::atomic::AtomicUsize>,
    _sub: Subscription,
    before: Vec<Entity<Value>>,
}

impl Fixture {
    fn new() -> Self {
        Self::with(Store::builder())
    }

    fn with(builder: kalphite::StoreBuilder) -> Self {
        let sink = Arc::new(Sink::default());
        let store = builder.sink(sink.clone()).build();
        store
            .collection::<Comment>()
            .unwrap()
            .put("c0", comment("seed", 0))
            .unwrap();
        let before = snapshot(&store);
        sink.0.lock().unwrap().clear();
        let (count, sub) = counter(&store);
        Self {
            store,
            sink,
            count,
            _sub: sub,
            before,
        }
    }

    fn assert_unchanged(&self) {
        assert_eq!(snapshot(&self.store), self.before);
        assert_eq!(get(&self.count), 0, "no notification");
        assert!(
            self.sink.0.lock().unwrap().is_empty(),
            "no change reached the sink"
        );
        assert_no_reserved_kind(&self.store);
    }
}

fn snapshot(store: &Store) -> Vec<Entity<Value>> {
    store.all().iter().map(|e| e.to_json().unwrap()).collect()
}

/// Reads of a reserved kind find nothing, through every read path.
fn assert_no_reserved_kind(store: &Store) {
    assert!(store.get(REPLICA, "room").is_none());
    assert!(store.dynamic(REPLICA).find_by_id("room").is_none());
    assert!(store.dynamic(REPLICA).is_empty());
    assert!(store.read(|v| v.get::<Replica>("room").is_none() && v.len(REPLICA) == 0));
    assert!(store.read(|v| v.all::<Replica>().is_empty()));
    assert!(store.entity_types().iter().all(|k| !is_reserved_kind(k)));
    assert!(store.all().iter().all(|e| !is_reserved_kind(e.kind())));
}

#[test]
fn the_prefix_is_kalphites_bookkeeping_prefix() {
    assert_eq!(RESERVED_KIND_PREFIX, "_kalphite_");
    let message = reserved(REPLICA).to_string();
    assert!(message.contains(REPLICA), "{message}");
    assert!(message.contains("'_kalphite_'"), "{message}");
    assert!(
        message.contains("reserved for kalphite's own bookkeeping"),
        "{message}"
    );
}

// Bug: a room member could send an entity of kind `_kalphite_sync_replica`; other clients
// applied it through a Remote transaction and stored it (and old sync code read it back as
// its own sync state). A remote change of a reserved kind is refused like any invalid one.
#[test]
fn a_remote_upsert_of_a_reserved_kind_is_refused_and_rolls_back() {
    let f = Fixture::new();
    let err = f
        .store
        .transaction_from(Origin::Remote, |tx| {
            tx.upsert_json(comment_json(7))?;
            tx.upsert_json(replica_json("room"))
        })
        .unwrap_err();
    assert_eq!(err, reserved(REPLICA));
    f.assert_unchanged();
}

// Bug: the same forged entity arriving in the middle of a remote batch the sync client
// applies change by change (each refusal reported, the others kept).
#[test]
fn a_refused_reserved_change_inside_a_remote_batch_leaves_the_others() {
    let f = Fixture::new();
    let results = f
        .store
        .transaction_from(Origin::Remote, |tx| {
            Ok::<_, Error>(vec![
                tx.upsert_json(comment_json(1)).map(drop),
                tx.upsert_json(replica_json("room")).map(drop),
                tx.upsert_json(comment_json(2)).map(drop),
            ])
        })
        .unwrap();
    assert_eq!(results, [Ok(()), Err(reserved(REPLICA)), Ok(())]);
    let comments = f.store.collection::<Comment>().unwrap();
    assert_eq!(comments.ids(), ["c0", "c1", "c2"]);
    assert_no_reserved_kind(&f.store);
    let sent = f.sink.0.lock().unwrap();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|c| c.kind == "comment"));
}

// Bug: a dynamic collection stored a `_kalphite_*` entity like any other kind.
#[test]
fn dynamic_writes_of_a_reserved_kind_are_refused() {
    let f = Fixture::new();
    let replicas = f.store.dynamic(REPLICA);
    assert_eq!(
        replicas.put("room", json!({"outbox": []})).unwrap_err(),
        reserved(REPLICA)
    );
    assert_eq!(
        replicas.upsert(replica_json("room")).unwrap_err(),
        reserved(REPLICA)
    );
    assert_eq!(
        replicas
            .bulk_upsert([replica_json("a"), replica_json("b")])
            .unwrap_err(),
        reserved(REPLICA)
    );
    // Any kind with the prefix, not only the replica's.
    for kind in ["_kalphite_", "_kalphite_room:r1", "_kalphite_anything"] {
        let err = f.store.dynamic(kind).put("x", json!({})).unwrap_err();
        assert_eq!(err, reserved(kind));
    }
    f.assert_unchanged();
}

// Bug: an `EntityKind` whose KIND is reserved got a typed collection and stored entities.
#[test]
fn a_typed_kind_with_a_reserved_name_gets_no_collection() {
    let f = Fixture::new();
    assert_eq!(
        f.store.collection::<Replica>().unwrap_err(),
        reserved(REPLICA)
    );
    f.assert_unchanged();
}

// Bug: registering a reserved typed kind on the builder made its collection available.
#[test]
fn registering_a_reserved_typed_kind_registers_nothing() {
    let f = Fixture::with(Store::builder().register::<Replica>());
    assert_eq!(
        f.store.collection::<Replica>().unwrap_err(),
        reserved(REPLICA)
    );
    f.assert_unchanged();
}

// Bug: `Tx::upsert`/`Tx::put` and `Tx::upsert_json` stored reserved kinds in local
// transactions; the refusal rolls back the whole transaction like any other error.
#[test]
fn transaction_writes_of_a_reserved_kind_are_refused_and_roll_back() {
    let f = Fixture::new();
    let err = f
        .store
        .transaction(|tx| {
            tx.put("c1", comment("kept?", 1))?;
            tx.put(
                "room",
                Replica {
                    outbox: vec!["x".into()],
                },
            )
        })
        .unwrap_err();
    assert_eq!(err, reserved(REPLICA));
    let err = f
        .store
        .transaction(|tx| {
            tx.upsert_json(comment_json(1))?;
            tx.upsert_json(replica_json("room"))
        })
        .unwrap_err();
    assert_eq!(err, reserved(REPLICA));
    // Reads inside a transaction find nothing either.
    f.store
        .transaction(|tx| {
            assert!(tx.get::<Replica>("room").is_none());
            assert!(tx.get_any(REPLICA, "room").is_none());
            Ok::<_, Error>(())
        })
        .unwrap();
    f.assert_unchanged();
}

// A delete of a reserved kind finds nothing to delete (such a kind never holds an entity)
// and announces nothing: it cannot reach a flush target or the server.
#[test]
fn deletes_of_a_reserved_kind_find_nothing_and_announce_nothing() {
    let f = Fixture::new();
    let deleted = f
        .store
        .transaction_from(Origin::Remote, |tx| {
            Ok::<_, Error>((
                tx.delete_json(REPLICA, "room"),
                tx.delete::<Replica>("room"),
            ))
        })
        .unwrap();
    assert_eq!(deleted, (false, false));
    assert!(!f.store.dynamic(REPLICA).delete("room"));
    f.assert_unchanged();
}

// Bug: a bulk load (`Store::load_entities`) stored reserved kinds.
#[test]
fn a_bulk_load_with_a_reserved_kind_is_refused_whole() {
    let f = Fixture::new();
    let err = f
        .store
        .load_entities([comment_json(1), replica_json("room"), comment_json(2)])
        .unwrap_err();
    assert_eq!(err, reserved(REPLICA));
    f.assert_unchanged();
}

// Bug: hydration stored the `_kalphite_sync_replica` row every old client database holds.
// It must neither be loaded nor stop the app from starting: hydration skips reserved kinds
// (with a warning) and loads everything else.
#[test]
fn hydration_skips_reserved_kinds_and_loads_the_rest() {
    let sink = Arc::new(Sink::default());
    let store = Store::builder().sink(sink.clone()).build();
    let n = store
        .hydrate([
            comment_json(1),
            replica_json("room"),
            Entity::new("[\"todo\",\"t1\"]", "_kalphite_room:r1", json!({})),
            comment_json(2),
        ])
        .unwrap();
    assert_eq!(n, 2, "the count is of the entities loaded");
    assert_eq!(store.collection::<Comment>().unwrap().ids(), ["c1", "c2"]);
    assert_no_reserved_kind(&store);
    let changes = sink.0.lock().unwrap();
    assert_eq!(changes.len(), 2);
    assert!(changes.iter().all(|c| c.origin == Origin::Storage));
}

// Hydration still refuses invalid entities of ordinary kinds (skipping is only for
// reserved ones).
#[test]
fn hydration_still_refuses_other_invalid_entities() {
    let store = Store::new();
    let err = store
        .hydrate([
            replica_json("room"),
            Entity::new("n1", "note", json!("not an object")),
        ])
        .unwrap_err();
    assert!(matches!(err, Error::NotAnObject { .. }), "{err:?}");
    assert!(store.is_empty());
}

// Names that merely look similar are ordinary kinds.
#[test]
fn kinds_that_only_resemble_the_prefix_are_ordinary() {
    let store = Store::new();
    for kind in [
        "_kalphite",
        "kalphite_sync_replica",
        "__kalphite_x",
        "x_kalphite_",
    ] {
        assert!(!is_reserved_kind(kind));
        store.dynamic(kind).put("a", json!({})).unwrap();
        assert!(store.get(kind, "a").is_some());
    }
    assert_eq!(store.len(), 4);
}
