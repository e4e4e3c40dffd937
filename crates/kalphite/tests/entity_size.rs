//! The entity size limit ([`Store::set_max_entity_bytes`], [`StoreBuilder::max_entity_bytes`]):
//! with a limit, a local upsert whose JSON record is larger is refused with
//! [`Error::EntityTooLarge`] and leaves the store as it was; remote and storage writes are
//! not measured; without a limit nothing changes.

mod common;

use std::sync::{Arc, Mutex};

use common::{Comment, comment, counter, get};
use kalphite::{
    Change, ChangeSink, Entity, Error, Origin, Store, StoreBuilder, Subscription, TypedSchema,
};
use serde_json::{Value, json};

/// A fixed timestamp, so that sizes are known in advance.
const AT: u64 = 1_700_000_000_000;

#[derive(Default)]
struct Sink(Mutex<Vec<Change>>);

impl ChangeSink for Sink {
    fn accept(&self, changes: &[Change]) {
        self.0.lock().unwrap().extend_from_slice(changes);
    }
}

/// The size of a record as JSON, the way the limit counts it.
fn size<T: serde::Serialize>(entity: &Entity<T>) -> usize {
    serde_json::to_vec(entity).unwrap().len()
}

/// A note of about `n` bytes of text.
fn note(id: &str, n: usize) -> Entity<Value> {
    Entity::new(id, "note", json!({"text": "x".repeat(n)})).at(AT)
}

fn big_comment(id: &str, n: usize) -> Entity<Comment> {
    Entity::of(id, comment(&"m".repeat(n), 1)).at(AT)
}

fn too_large(e: &Entity<impl serde::Serialize>, limit: usize) -> Error {
    Error::EntityTooLarge {
        kind: e.kind.clone(),
        id: e.id.clone(),
        bytes: size(e),
        limit,
    }
}

/// A seeded store with a limit, a sink and a subscriber; `assert_unchanged` checks all three.
struct Fixture {
    store: Store,
    sink: Arc<Sink>,
    count: Arc<std::sync::atomic::AtomicUsize>,
    _sub: Subscription,
    before: Vec<Entity<Value>>,
}

const LIMIT: usize = 200;

impl Fixture {
    fn new() -> Self {
        Self::with(Store::builder().max_entity_bytes(LIMIT))
    }

    fn with(builder: StoreBuilder) -> Self {
        let sink = Arc::new(Sink::default());
        let store = builder.sink(sink.clone()).build();
        store
            .collection::<Comment>()
            .unwrap()
            .upsert(big_comment("c0", 10))
            .unwrap();
        store.dynamic("note").upsert(note("n0", 10)).unwrap();
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
            "nothing was queued for the flush engines"
        );
    }
}

fn snapshot(store: &Store) -> Vec<Entity<Value>> {
    store.all().iter().map(|e| e.to_json().unwrap()).collect()
}

// Bug: a local entity larger than the sync server's frame limit was accepted, queued and
// resent forever, wedging every change behind it. With a limit it is refused at write time
// and never reaches a sink (the flush engines).
#[test]
fn a_typed_upsert_over_the_limit_is_refused_and_never_queued() {
    let f = Fixture::new();
    let comments = f.store.collection::<Comment>().unwrap();
    let big = big_comment("c1", 500);
    assert_eq!(
        comments.upsert(big.clone()).unwrap_err(),
        too_large(&big, LIMIT)
    );
    let err = comments
        .put("c1", comment(&"m".repeat(500), 1))
        .unwrap_err();
    assert!(
        matches!(err, Error::EntityTooLarge { limit: LIMIT, .. }),
        "{err:?}"
    );
    f.assert_unchanged();
}

// Bug: the same through a dynamic collection.
#[test]
fn a_dynamic_upsert_over_the_limit_is_refused() {
    let f = Fixture::new();
    let notes = f.store.dynamic("note");
    let big = note("n1", 500);
    assert_eq!(
        notes.upsert(big.clone()).unwrap_err(),
        too_large(&big, LIMIT)
    );
    let err = notes
        .put("n1", json!({"text": "x".repeat(500)}))
        .unwrap_err();
    assert!(
        matches!(err, Error::EntityTooLarge { limit: LIMIT, .. }),
        "{err:?}"
    );
    // A JSON entity written to a typed kind is measured too.
    let err = f
        .store
        .dynamic("comment")
        .put("c1", json!({"message": "m".repeat(500), "lineNumber": 1}))
        .unwrap_err();
    assert!(matches!(err, Error::EntityTooLarge { .. }), "{err:?}");
    f.assert_unchanged();
}

// Bug: an oversized write inside a local transaction was accepted with the rest of it;
// now the refusal rolls the whole transaction back like any other error.
#[test]
fn a_refused_write_rolls_the_transaction_back() {
    let f = Fixture::new();
    let big = note("n2", 500);
    let err = f
        .store
        .transaction(|tx| {
            tx.upsert(big_comment("c0", 20))?; // replaces the seed
            tx.upsert(big_comment("c1", 20))?;
            tx.delete_json("note", "n0");
            tx.upsert_json(note("n1", 20))?;
            tx.upsert_json(big.clone())
        })
        .unwrap_err();
    assert_eq!(err, too_large(&big, LIMIT));
    let err = f
        .store
        .transaction(|tx| {
            tx.upsert_json(note("n1", 20))?;
            tx.upsert(big_comment("c1", 500))
        })
        .unwrap_err();
    assert!(matches!(err, Error::EntityTooLarge { .. }), "{err:?}");
    f.assert_unchanged();
}

// Bug: bulk loads accepted oversized entities; they are refused whole.
#[test]
fn bulk_writes_with_one_oversized_entity_are_refused_whole() {
    let f = Fixture::new();
    let big = note("n2", 500);
    assert_eq!(
        f.store
            .load_entities([note("n1", 5), big.clone(), note("n3", 5)])
            .unwrap_err(),
        too_large(&big, LIMIT)
    );
    assert_eq!(
        f.store
            .dynamic("note")
            .bulk_upsert([note("n1", 5), big.clone()])
            .unwrap_err(),
        too_large(&big, LIMIT)
    );
    let big_c = big_comment("c2", 500);
    assert_eq!(
        f.store
            .collection::<Comment>()
            .unwrap()
            .bulk_upsert([big_comment("c1", 5), big_c.clone()])
            .unwrap_err(),
        too_large(&big_c, LIMIT)
    );
    f.assert_unchanged();
}

// The limit is inclusive and counts the whole `{id, type, data, updatedAt}` record.
#[test]
fn the_limit_counts_the_whole_json_record_and_is_inclusive() {
    let e = note("n1", 100);
    let n = size(&e);
    let store = Store::builder().max_entity_bytes(n).build();
    store.dynamic("note").upsert(e.clone()).unwrap();
    store.set_max_entity_bytes(Some(n - 1));
    assert_eq!(
        store.dynamic("note").upsert(e.clone()).unwrap_err(),
        too_large(&e, n - 1)
    );
    let c = big_comment("c1", 100);
    let n = size(&c);
    store.set_max_entity_bytes(Some(n));
    store
        .collection::<Comment>()
        .unwrap()
        .upsert(c.clone())
        .unwrap();
    store.set_max_entity_bytes(Some(n - 1));
    assert_eq!(
        store
            .collection::<Comment>()
            .unwrap()
            .upsert(c.clone())
            .unwrap_err(),
        too_large(&c, n - 1)
    );
}

// The record is measured as it would be stored and sent: with `updatedAt` stamped and the
// schema's defaults applied.
#[test]
fn the_record_is_measured_as_stored() {
    let unstamped = Entity::new("n1", "note", json!({"text": "x"}));
    let n = size(&unstamped); // "updatedAt":0
    let store = Store::builder().max_entity_bytes(n + 5).build();
    let err = store.dynamic("note").upsert(unstamped).unwrap_err();
    let Error::EntityTooLarge { bytes, .. } = err else {
        panic!("{err:?}")
    };
    assert_eq!(bytes, n + 12, "a 13-digit timestamp instead of 0");

    // A serde default the schema adds (`"tags":[]`, 10 bytes) counts.
    let schema = TypedSchema::new().kind::<Comment>();
    let e = Entity::new("c1", "comment", json!({"message": "m", "lineNumber": 1})).at(AT);
    let n = size(&e);
    let store = Store::builder()
        .schema(Arc::new(schema))
        .max_entity_bytes(n + 5)
        .build();
    let err = store.dynamic("comment").upsert(e).unwrap_err();
    let Error::EntityTooLarge { bytes, .. } = err else {
        panic!("{err:?}")
    };
    assert_eq!(bytes, n + 10);
}

// Remote changes and hydration are never measured: the server (or this store, earlier)
// already accepted them. Deletes are never measured either, so an oversized entity that
// came from elsewhere can still be deleted locally.
#[test]
fn remote_and_storage_writes_and_deletes_are_not_size_checked() {
    let store = Store::builder().max_entity_bytes(LIMIT).build();
    store.hydrate([note("n1", 500)]).unwrap();
    store
        .transaction_from(Origin::Remote, |tx| {
            tx.upsert_json(note("n2", 500))?;
            tx.upsert(big_comment("c1", 500))
        })
        .unwrap();
    assert_eq!(store.len(), 3);
    assert!(store.dynamic("note").delete("n1"));
    assert!(store.collection::<Comment>().unwrap().delete("c1"));
    let deleted = store
        .transaction(|tx| Ok::<_, Error>(tx.delete_json("note", "n2")))
        .unwrap();
    assert!(deleted);
    assert!(store.is_empty());
}

// The sync client learns the server's limit at runtime: it can be set, changed and lifted
// on a live store, and applies to the writes that follow.
#[test]
fn the_limit_can_be_set_changed_and_lifted_at_runtime() {
    let store = Store::new();
    assert_eq!(store.max_entity_bytes(), None, "no limit by default");
    let notes = store.dynamic("note");
    notes.upsert(note("n1", 500)).unwrap();
    store.set_max_entity_bytes(Some(LIMIT));
    assert_eq!(store.max_entity_bytes(), Some(LIMIT));
    assert!(matches!(
        notes.upsert(note("n2", 500)).unwrap_err(),
        Error::EntityTooLarge { .. }
    ));
    notes.upsert(note("n2", 5)).unwrap();
    store.set_max_entity_bytes(Some(10_000));
    notes.upsert(note("n3", 500)).unwrap();
    store.set_max_entity_bytes(None);
    assert_eq!(store.max_entity_bytes(), None);
    notes.upsert(note("n4", 50_000)).unwrap();
    assert_eq!(notes.len(), 4);
    // Clones share the limit.
    let clone = store.clone();
    clone.set_max_entity_bytes(Some(LIMIT));
    assert_eq!(store.max_entity_bytes(), Some(LIMIT));
}

// A store without a limit accepts entities of any size, exactly as before.
#[test]
fn without_a_limit_any_size_is_accepted() {
    let f = Fixture::with(Store::builder());
    assert_eq!(f.store.max_entity_bytes(), None);
    f.store.dynamic("note").upsert(note("n1", 1 << 20)).unwrap();
    f.store
        .collection::<Comment>()
        .unwrap()
        .upsert(big_comment("c1", 1 << 20))
        .unwrap();
    f.store
        .load_entities((0..10).map(|i| note(&format!("b{i}"), 10_000)))
        .unwrap();
    assert_eq!(f.store.len(), 14);
    assert_eq!(f.sink.0.lock().unwrap().len(), 12);
}

/// Data whose `Serialize` impl always fails.
#[derive(Clone, Debug, serde::Deserialize)]
struct Unserializable;

impl serde::Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("no JSON form"))
    }
}

impl kalphite::EntityKind for Unserializable {
    const KIND: &'static str = "odd";
}

// With a limit, typed data that cannot become JSON cannot be measured: it is refused (it
// could be neither stored nor synced). Without a limit nothing serializes it, as before.
#[test]
fn with_a_limit_unserializable_typed_data_is_refused() {
    let f = Fixture::new();
    let err = f
        .store
        .collection::<Unserializable>()
        .unwrap()
        .put("o1", Unserializable)
        .unwrap_err();
    assert!(
        matches!(err, Error::Serialize { ref id, ref message, .. } if id == "o1" && message.contains("no JSON form")),
        "{err:?}"
    );
    f.assert_unchanged();
    let store = Store::new();
    store
        .collection::<Unserializable>()
        .unwrap()
        .put("o1", Unserializable)
        .unwrap();
}

#[test]
fn the_error_says_what_the_limit_is_and_why() {
    let e = note("n1", 500);
    let message = too_large(&e, LIMIT).to_string();
    assert!(message.contains("note 'n1'"), "{message}");
    assert!(message.contains(&size(&e).to_string()), "{message}");
    assert!(message.contains("limit of 200 bytes"), "{message}");
    assert!(message.contains("sync server"), "{message}");
}
