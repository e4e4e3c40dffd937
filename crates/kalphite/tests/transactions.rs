//! Transactions and bulk writes are all or nothing: an error or a panic inside rolls back
//! every write (upserts, overwrites, deletes, clears) with the original order restored,
//! and a committed one is announced in one notification.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use common::{Comment, Review, comment, comment_json, counter, get, ids, review, review_json};
use kalphite::{Entity, Error, Op, Store};
use serde_json::json;

fn seeded() -> Store {
    let store = Store::new();
    store
        .load_entities((1..=4).map(comment_json).chain((1..=2).map(review_json)))
        .unwrap();
    store
}

fn state(store: &Store) -> Vec<(String, String, serde_json::Value)> {
    store
        .all()
        .iter()
        .map(|e| {
            (
                e.kind().to_string(),
                e.id().to_string(),
                e.data_json().unwrap(),
            )
        })
        .collect()
}

#[test]
fn an_error_inside_a_transaction_rolls_back_every_write_in_original_order() {
    let store = seeded();
    let before = state(&store);
    let (count, _sub) = counter(&store);
    let result: Result<(), Error> = store.transaction(|tx| {
        tx.upsert_json(comment_json(9))?; // new
        tx.upsert_json(Entity::new("c2", "comment", json!({"message": "changed"})))?; // overwrite
        assert!(tx.delete_json("comment", "c1"));
        assert!(tx.delete_json("review", "r2"));
        tx.upsert_json(comment_json(10))?;
        tx.clear();
        tx.upsert_json(comment_json(1))?; // back after the clear
        tx.delete_json("comment", "c3");
        Err(Error::InvalidConfig("abort".into()))
    });
    assert!(matches!(result, Err(Error::InvalidConfig(_))));
    assert_eq!(state(&store), before);
    assert_eq!(
        ids(&store.dynamic("comment").snapshot()),
        ["c1", "c2", "c3", "c4"]
    );
    assert_eq!(get(&count), 0);
}

#[test]
fn a_panic_inside_a_transaction_rolls_back_and_the_panic_propagates() {
    let store = seeded();
    store.collection::<Comment>().unwrap();
    let before = state(&store);
    let (count, _sub) = counter(&store);
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let _: Result<(), Error> = store.transaction(|tx| {
            tx.put("c9", comment("new", 9))?;
            tx.delete::<Comment>("c2");
            tx.clear();
            tx.put("r9", review("R", "pending"))?;
            panic!("boom inside a transaction (expected by this test)");
        });
    }));
    assert!(outcome.is_err(), "the panic reaches the caller");
    assert_eq!(state(&store), before);
    assert_eq!(get(&count), 0);
    // The lock is not poisoned and the store keeps working.
    store
        .collection::<Comment>()
        .unwrap()
        .put("c5", comment("after", 5))
        .unwrap();
    assert_eq!(store.dynamic("comment").len(), 5);
    assert_eq!(get(&count), 1);
}

#[test]
fn a_committed_transaction_applies_everything_with_one_notification() {
    let store = seeded();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let _sub = store.subscribe(move |n| {
        s.lock().unwrap().push(
            n.changes
                .iter()
                .map(|c| (c.op, c.id.to_string()))
                .collect::<Vec<_>>(),
        );
    });
    let n = store
        .transaction::<_, Error>(|tx| {
            tx.put("c9", comment("nine", 9))?;
            tx.delete::<Comment>("c1");
            tx.put("r9", review("R9", "approved"))?;
            Ok(42)
        })
        .unwrap();
    assert_eq!(n, 42, "the closure's value is returned");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0],
        [
            (Op::Upsert, "c9".into()),
            (Op::Delete, "c1".into()),
            (Op::Upsert, "r9".into())
        ]
    );
    assert_eq!(
        store
            .collection::<Review>()
            .unwrap()
            .find_by_id("r9")
            .unwrap()
            .data
            .title,
        "R9"
    );
}

#[test]
fn a_transaction_reads_its_own_writes() {
    let store = Store::new();
    store
        .transaction::<_, Error>(|tx| {
            tx.put("c1", comment("mine", 1))?;
            assert_eq!(tx.get::<Comment>("c1").unwrap().data.message, "mine");
            assert_eq!(tx.get_any("comment", "c1").unwrap().id(), "c1");
            tx.delete::<Comment>("c1");
            assert!(tx.get::<Comment>("c1").is_none());
            Ok(())
        })
        .unwrap();
    assert!(store.is_empty());
}

#[test]
fn calling_the_store_from_inside_its_transaction_panics_instead_of_deadlocking() {
    let store = seeded();
    let before = state(&store);
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let _: Result<(), Error> = store.transaction(|tx| {
            tx.upsert_json(comment_json(9))?;
            let _ = store.len();
            Ok(())
        });
    }));
    assert!(outcome.is_err());
    assert_eq!(state(&store), before, "the partial write was rolled back");
    assert_eq!(store.len(), 6, "usable afterwards on this thread");
}

#[test]
fn load_entities_validates_all_first_one_bad_entity_loads_nothing() {
    let store = seeded();
    let before = state(&store);
    let (count, _sub) = counter(&store);
    let bad = Entity::new("bad", "comment", json!("not an object"));
    let err = store
        .load_entities([comment_json(7), comment_json(8), bad, comment_json(9)])
        .unwrap_err();
    assert!(matches!(err, Error::NotAnObject { ref id, .. } if id == "bad"));
    assert_eq!(state(&store), before);
    assert_eq!(get(&count), 0);
}

#[test]
fn bulk_upsert_validates_all_first_one_bad_entity_writes_nothing() {
    let store = seeded();
    let comments = store.collection::<Comment>().unwrap();
    let before = state(&store);
    let (count, _sub) = counter(&store);
    let err = comments
        .bulk_upsert([
            Entity::of("c7", comment("ok", 7)),
            Entity::of("c1", comment("overwrite", 1)),
            Entity::of("", comment("empty id", 0)),
        ])
        .unwrap_err();
    assert!(matches!(err, Error::EmptyId { .. }));
    let err = store
        .dynamic("review")
        .bulk_upsert([review_json(8), comment_json(8)])
        .unwrap_err();
    assert!(matches!(err, Error::WrongKind { .. }));
    assert_eq!(state(&store), before);
    assert_eq!(get(&count), 0);
    assert_eq!(
        comments
            .bulk_upsert((10..13).map(|i| Entity::of(format!("c{i}"), comment("m", i))))
            .unwrap(),
        3
    );
    assert_eq!(get(&count), 1);
}

#[test]
fn a_clear_rolled_back_restores_every_kind_in_order() {
    let store = seeded();
    let reviews = store.collection::<Review>().unwrap();
    let before = state(&store);
    let _: Result<(), Error> = store.transaction(|tx| {
        tx.clear();
        Err(Error::InvalidConfig("undo the clear".into()))
    });
    assert_eq!(state(&store), before);
    assert_eq!(ids(&reviews.snapshot()), ["r1", "r2"]);
}

#[test]
fn deletes_rolled_back_return_to_their_original_positions() {
    let store = Store::new();
    store.load_entities((0..10).map(comment_json)).unwrap();
    let _: Result<(), Error> = store.transaction(|tx| {
        for id in ["c0", "c5", "c9", "c3"] {
            tx.delete_json("comment", id);
        }
        tx.upsert_json(comment_json(5))?;
        tx.delete_json("comment", "c4");
        Err(Error::InvalidConfig("abort".into()))
    });
    let expected: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
    assert_eq!(ids(&store.dynamic("comment").snapshot()), expected);
}
