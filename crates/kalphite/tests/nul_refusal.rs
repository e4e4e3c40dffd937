//! Refusing NUL characters ([`Store::set_refuse_nul`], [`StoreBuilder::refuse_nul`]):
//! PostgreSQL's JSONB cannot hold U+0000 and the sync server refuses it, so an entity holding
//! one, once accepted, was retried by the flush engine forever and held up every change
//! behind it. A store that refuses them says so at write time with [`Error::Unstorable`]
//! naming the entity and where the character is, wherever it hides (kind, id, key, value, at
//! any depth, typed or dynamic); the store is left as it was; remote and stored entities are
//! not checked; off by default.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use common::{Comment, comment};
use kalphite::{Change, ChangeSink, Entity, EntityKind, Error, Origin, Store};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Default)]
struct Sink(Mutex<Vec<Change>>);

impl ChangeSink for Sink {
    fn accept(&self, changes: &[Change]) {
        self.0.lock().unwrap().extend_from_slice(changes);
    }
}

/// A typed kind whose data can carry a NUL in a map key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Labels {
    labels: BTreeMap<String, Vec<String>>,
}

impl EntityKind for Labels {
    const KIND: &'static str = "labels";
}

fn refusing() -> (Store, Arc<Sink>) {
    let sink = Arc::new(Sink::default());
    let store = Store::builder().refuse_nul(true).sink(sink.clone()).build();
    (store, sink)
}

fn field(err: &Error) -> (&str, &str, &str) {
    match err {
        Error::Unstorable { kind, id, field } => (kind.as_str(), id.as_str(), field.as_str()),
        other => panic!("expected Unstorable, got {other:?}"),
    }
}

#[test]
fn a_nul_anywhere_in_a_dynamic_entity_is_refused_and_named() {
    let (store, sink) = refusing();
    let cases = [
        ("note", "n1", json!({"text": "a\u{0}b"}), "data.text"),
        (
            "note",
            "n1",
            json!({"a": {"b": [1, "x", "\u{0}"]}}),
            "data.a.b[2]",
        ),
        (
            "note",
            "n1",
            json!({"a": {"k\u{0}": true}}),
            "a key of data.a",
        ),
        ("note", "n\u{0}1", json!({"text": "fine"}), "the id"),
        ("no\u{0}te", "n1", json!({"text": "fine"}), "the kind"),
    ];
    for (kind, id, data, want) in cases {
        let err = store
            .dynamic(kind)
            .upsert(Entity::new(id, kind, data.clone()))
            .unwrap_err();
        assert_eq!(field(&err), (kind, id, want), "{data}");
        let text = err.to_string();
        assert!(text.contains("NUL") && text.contains(want), "{text}");
    }
    assert!(store.is_empty());
    assert!(sink.0.lock().unwrap().is_empty(), "nothing was queued");
}

#[test]
fn a_nul_in_typed_data_is_refused_too() {
    let (store, _) = refusing();
    let comments = store.collection::<Comment>().unwrap();
    let err = comments.put("c1", comment("line one\u{0}", 1)).unwrap_err();
    assert_eq!(field(&err), ("comment", "c1", "data.message"));
    let labels = store.collection::<Labels>().unwrap();
    let mut map = BTreeMap::new();
    map.insert("ok".to_owned(), vec!["x".to_owned()]);
    map.insert("bad\u{0}key".to_owned(), Vec::new());
    let err = labels.put("l1", Labels { labels: map }).unwrap_err();
    assert_eq!(field(&err), ("labels", "l1", "a key of data.labels"));
    assert!(store.is_empty());
}

#[test]
fn a_refused_write_rolls_its_transaction_back_and_later_writes_go_through() {
    let (store, sink) = refusing();
    let notes = store.dynamic("note");
    notes.put("n0", json!({"text": "before"})).unwrap();
    let result: Result<(), Error> = store.transaction(|tx| {
        tx.upsert_json(Entity::new("n1", "note", json!({"text": "fine"})))?;
        tx.upsert_json(Entity::new("n2", "note", json!({"text": "\u{0}"})))?;
        Ok(())
    });
    assert!(matches!(result, Err(Error::Unstorable { .. })));
    assert!(
        notes.find_by_id("n1").is_none(),
        "the transaction rolled back"
    );
    let err = store
        .load_entities([
            Entity::new("n3", "note", json!({"text": "fine"})),
            Entity::new("n4", "note", json!({"tags": ["\u{0}"]})),
        ])
        .unwrap_err();
    assert_eq!(field(&err), ("note", "n4", "data.tags[0]"));
    notes.put("n5", json!({"text": "after"})).unwrap();
    let ids: Vec<String> = notes.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(ids, ["n0", "n5"]);
    let queued: Vec<String> = sink
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.id.to_string())
        .collect();
    assert_eq!(queued, ["n0", "n5"], "only accepted writes reach the sinks");
}

#[test]
fn text_that_merely_looks_escaped_is_accepted() {
    let (store, _) = refusing();
    let notes = store.dynamic("note");
    for (i, text) in ["\\u0000", "\\\\u0000", "\u{1}\u{1f}", "u0000"]
        .iter()
        .enumerate()
    {
        notes
            .put(format!("n{i}"), json!({ "text": text }))
            .unwrap_or_else(|e| panic!("{text:?} was refused: {e}"));
    }
    assert_eq!(notes.len(), 4);
}

#[test]
fn remote_and_stored_entities_are_not_checked() {
    let (store, _) = refusing();
    let held = Entity::new("n1", "note", json!({"text": "\u{0}"}));
    store.hydrate([held.clone()]).unwrap();
    store
        .transaction_from(Origin::Remote, |tx| {
            tx.upsert_json(Entity::new("n2", "note", json!({"text": "\u{0}"})))
                .map(drop)
        })
        .unwrap();
    assert_eq!(store.len(), 2);
    // Deleting one is always possible.
    assert!(store.dynamic("note").delete("n1"));
}

#[test]
fn off_by_default_and_switchable_at_runtime() {
    let store = Store::new();
    assert!(!store.refuses_nul());
    let notes = store.dynamic("note");
    notes.put("n1", json!({"text": "\u{0}"})).unwrap();
    store.set_refuse_nul(true);
    assert!(store.refuses_nul());
    assert!(notes.put("n2", json!({"text": "\u{0}"})).is_err());
    store.set_refuse_nul(false);
    notes.put("n3", json!({"text": "\u{0}"})).unwrap();
    assert_eq!(notes.len(), 2);
}

#[test]
fn with_a_size_limit_too_both_are_checked() {
    let store = Store::builder()
        .refuse_nul(true)
        .max_entity_bytes(100)
        .build();
    let notes = store.dynamic("note");
    let err = notes
        .put("big", json!({"text": "x".repeat(200)}))
        .unwrap_err();
    assert!(matches!(err, Error::EntityTooLarge { .. }), "{err:?}");
    let err = notes.put("nul", json!({"text": "\u{0}"})).unwrap_err();
    assert!(matches!(err, Error::Unstorable { .. }), "{err:?}");
    notes.put("ok", json!({"text": "fine"})).unwrap();
    assert_eq!(notes.len(), 1);
}
