//! Regression tests for store bugs found while porting the behaviours:
//!
//! 1. `Collection::clear` read the store from inside its own transaction and so always
//!    panicked (the re-entry guard), clearing nothing.
//! 2. A transaction that opened a JSON kind as a typed one (`Tx::upsert::<T>` converts the
//!    kind's table) and then rolled back handed JSON entities to the typed table: rollback
//!    itself panicked ("table of T given an entity of another type") and every row of the
//!    cleared or deleted kinds was lost.

mod common;

use common::{Comment, Review, comment, comment_json, ids, review};
use kalphite::{Entity, Error, Store};
use serde_json::json;

/// Bug 1.
#[test]
fn collection_clear_does_not_panic_and_clears_only_its_kind() {
    let store = Store::new();
    store.load_entities((0..3).map(comment_json)).unwrap();
    store
        .dynamic("review")
        .put("r1", json!({"title": "t"}))
        .unwrap();
    let comments = store.collection::<Comment>().unwrap();
    comments.clear();
    assert!(comments.is_empty());
    assert_eq!(store.len(), 1);
}

/// Bug 2: the rows removed before the conversion do not even fit the typed kind.
#[test]
fn rollback_after_a_json_kind_was_opened_typed_restores_the_json_rows() {
    let store = Store::new();
    let misfit = Entity::new("r0", "review", json!({"no_title": true}));
    store
        .load_entities([
            misfit.clone(),
            Entity::new("r1", "review", json!({"title": "a", "status": "s"})),
            comment_json(1),
        ])
        .unwrap();
    let result: Result<(), Error> = store.transaction(|tx| {
        assert!(tx.delete_json("review", "r0"));
        tx.put("r2", review("typed", "pending"))?; // converts the review table to Review
        tx.clear();
        tx.put("c2", comment("x", 2))?;
        Err(Error::InvalidConfig("abort".into()))
    });
    assert!(result.is_err());
    let reviews = store.dynamic("review");
    assert_eq!(ids(&reviews.snapshot()), ["r0", "r1"]);
    assert_eq!(reviews.find_by_id("r0").unwrap().data, misfit.data);
    assert_eq!(store.len(), 3);
    // The kind is still JSON: opening it as Review fails on the misfit, changing nothing.
    assert!(matches!(
        store.collection::<Review>(),
        Err(Error::Conversion { ref id, .. }) if id == "r0"
    ));
    assert_eq!(reviews.len(), 2);
}

/// Bug 2, the committed side: a conversion inside a committed transaction keeps the rows.
#[test]
fn a_committed_transaction_that_opens_a_json_kind_typed_keeps_all_rows() {
    let store = Store::new();
    store
        .load_entities([Entity::new(
            "r1",
            "review",
            json!({"title": "a", "status": "s"}),
        )])
        .unwrap();
    store
        .transaction::<_, Error>(|tx| tx.put("r2", review("b", "pending")).map(drop))
        .unwrap();
    let reviews = store.collection::<Review>().unwrap();
    assert_eq!(ids(&reviews.snapshot()), ["r1", "r2"]);
    assert_eq!(reviews.get(0).unwrap().data.title, "a");
}
