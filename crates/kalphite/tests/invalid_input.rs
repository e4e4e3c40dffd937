//! Invalid input gets a typed [`kalphite::Error`] and leaves the store exactly as it was:
//! no entity written, no notification, no change handed to a sink.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use common::{Comment, comment, comment_json, counter, get};
use kalphite::{Change, ChangeSink, Entity, EntityKind, Error, JsonSchema, Store, Subscription};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Default)]
struct Sink(Mutex<usize>);

impl ChangeSink for Sink {
    fn accept(&self, changes: &[Change]) {
        *self.0.lock().unwrap() += changes.len();
    }
}

/// A seeded store, a sink, and a subscriber counter; `assert_unchanged` checks all three.
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
        store
            .dynamic("note")
            .put("n0", json!({"text": "seed"}))
            .unwrap();
        let before = snapshot(&store);
        *sink.0.lock().unwrap() = 0;
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
        assert_eq!(
            *self.sink.0.lock().unwrap(),
            0,
            "no change reached the sink"
        );
    }
}

fn snapshot(store: &Store) -> Vec<Entity<Value>> {
    store.all().iter().map(|e| e.to_json().unwrap()).collect()
}

#[test]
fn wrong_kind_is_refused_by_typed_and_dynamic_collections() {
    let f = Fixture::new();
    let comments = f.store.collection::<Comment>().unwrap();
    let err = comments
        .upsert(Entity::new("x", "review", comment("m", 1)))
        .unwrap_err();
    assert_eq!(
        err,
        Error::WrongKind {
            expected: "comment".into(),
            actual: "review".into(),
            id: "x".into()
        }
    );
    let err = f.store.dynamic("note").upsert(comment_json(5)).unwrap_err();
    assert!(matches!(err, Error::WrongKind { ref expected, .. } if expected == "note"));
    assert!(err.to_string().contains("'comment'") && err.to_string().contains("'note'"));
    f.assert_unchanged();
}

#[test]
fn a_schema_violation_lists_every_issue_with_its_path() {
    let schema = JsonSchema::from_document(&json!({
        "note": {"type": "object", "required": ["text"],
                 "properties": {"text": {"type": "string"}, "n": {"type": "integer"}}},
        "comment": {"type": "object"}
    }))
    .unwrap();
    let f = Fixture::with(Store::builder().schema(Arc::new(schema)));
    let err = f
        .store
        .dynamic("note")
        .put("n0", json!({"n": "x"}))
        .unwrap_err();
    let Error::Validation { issues, .. } = &err else {
        panic!("{err:?}")
    };
    let mut paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        ["", "/n"],
        "the missing field is reported at the root: {issues:?}"
    );
    assert!(
        err.to_string()
            .starts_with("Validation failed for note 'n0'")
    );
    f.assert_unchanged();
}

#[test]
fn non_object_data_is_refused_with_what_it_was() {
    let f = Fixture::new();
    for (data, found) in [
        (json!("text"), "a string"),
        (json!([1, 2]), "an array"),
        (Value::Null, "null"),
        (json!(3), "a number"),
        (json!(true), "a boolean"),
    ] {
        let err = f.store.dynamic("note").put("n9", data).unwrap_err();
        assert_eq!(
            err,
            Error::NotAnObject {
                kind: "note".into(),
                id: "n9".into(),
                found
            }
        );
    }
    f.assert_unchanged();
}

#[test]
fn an_empty_id_is_refused_on_every_write_path() {
    let f = Fixture::new();
    let comments = f.store.collection::<Comment>().unwrap();
    assert_eq!(
        comments.put("", comment("m", 1)).unwrap_err(),
        Error::EmptyId {
            kind: "comment".into()
        }
    );
    assert!(matches!(
        f.store.dynamic("note").put("", json!({})),
        Err(Error::EmptyId { .. })
    ));
    assert!(matches!(
        f.store.load_entities([Entity::new("", "note", json!({}))]),
        Err(Error::EmptyId { .. })
    ));
    f.assert_unchanged();
}

#[test]
fn an_empty_kind_is_refused() {
    let f = Fixture::new();
    let err = f
        .store
        .load_entities([Entity::new("e1", "", json!({}))])
        .unwrap_err();
    assert_eq!(err, Error::EmptyKind { id: "e1".into() });
    assert!(matches!(
        f.store.dynamic("").put("e1", json!({})),
        Err(Error::EmptyKind { .. })
    ));
    f.assert_unchanged();
    assert_eq!(f.store.entity_types().len(), 2);
}

#[test]
fn json_that_does_not_fit_a_typed_kind_is_refused() {
    let f = Fixture::new();
    let err = f
        .store
        .dynamic("comment")
        .put("c1", json!({"message": 42}))
        .unwrap_err();
    let Error::Conversion {
        kind,
        id,
        type_name,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!((kind.as_str(), id.as_str()), ("comment", "c1"));
    assert!(type_name.ends_with("Comment"));
    assert!(
        f.store
            .load_entities([comment_json(1), Entity::new("c2", "comment", json!({}))])
            .is_err()
    );
    f.assert_unchanged();
}

/// Another Rust type claiming the same kind.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct OtherComment {
    body: String,
}

impl EntityKind for OtherComment {
    const KIND: &'static str = "comment";
}

#[test]
fn a_kind_opened_as_two_different_rust_types_is_refused() {
    let f = Fixture::new();
    let err = f.store.collection::<OtherComment>().unwrap_err();
    let Error::KindTypeMismatch {
        kind,
        existing,
        requested,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(kind, "comment");
    assert!(existing.ends_with("Comment") && requested.ends_with("OtherComment"));
    let err = f
        .store
        .transaction(|tx| tx.put("c9", OtherComment { body: "x".into() }).map(drop))
        .unwrap_err();
    assert!(matches!(err, Error::KindTypeMismatch { .. }));
    f.assert_unchanged();
}

#[test]
fn a_json_kind_whose_rows_do_not_fit_cannot_be_opened_typed() {
    #[derive(Clone, Debug, Serialize, Deserialize)]
    struct Note {
        title: String,
    }
    impl EntityKind for Note {
        const KIND: &'static str = "note";
    }
    let f = Fixture::new();
    let err = f.store.collection::<Note>().unwrap_err();
    assert!(matches!(err, Error::Conversion { ref id, .. } if id == "n0"));
    f.assert_unchanged();
    assert_eq!(
        f.store.dynamic("note").find_by_id("n0").unwrap().data["text"],
        "seed"
    );
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Unserializable {
    by_pair: BTreeMap<Vec<u8>, u8>,
}

impl EntityKind for Unserializable {
    const KIND: &'static str = "odd";
}

#[test]
fn typed_data_that_cannot_become_json_is_refused_when_validating() {
    let schema = JsonSchema::from_kinds([
        ("odd", json!({})),
        ("comment", json!({})),
        ("note", json!({})),
    ])
    .unwrap();
    let f = Fixture::with(Store::builder().schema(Arc::new(schema)));
    let data = Unserializable {
        by_pair: BTreeMap::from([(vec![1], 1)]),
    };
    let err = f
        .store
        .transaction(|tx| tx.put("o1", data).map(drop))
        .unwrap_err();
    assert!(
        matches!(err, Error::Serialize { ref id, .. } if id == "o1"),
        "{err:?}"
    );
    f.assert_unchanged();
}
