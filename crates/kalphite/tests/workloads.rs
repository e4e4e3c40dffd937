//! The original `Layer1-Performance` suite's workloads (BEHAVIORS.md §2.1) as correctness
//! tests: same operations and result checks, no wall-clock asserts (timings live in
//! `benches/store.rs` and `docs/benchmarks.md`).

mod common;

use common::{Comment, Review, comment, comment_json, counter, get, review, review_json};
use kalphite::{Entity, Store};
use serde_json::json;

#[test]
fn load_two_thousand_comments_and_a_thousand_mixed_entities() {
    let store = Store::new();
    store.load_entities((0..2000).map(comment_json)).unwrap();
    assert_eq!(store.dynamic("comment").len(), 2000);
    let mixed = Store::new();
    mixed
        .load_entities((0..500).map(comment_json).chain((0..500).map(review_json)))
        .unwrap();
    assert_eq!(
        (
            mixed.dynamic("comment").len(),
            mixed.dynamic("review").len()
        ),
        (500, 500)
    );
}

#[test]
fn descending_deletes_by_position_on_a_thousand() {
    let store = Store::new();
    store.load_entities((0..1000).map(comment_json)).unwrap();
    let comments = store.collection::<Comment>().unwrap();
    let mut deleted = 0;
    for i in (0..=500usize).rev() {
        if let Some(e) = comments.get(i * 2) {
            assert!(comments.delete(&e.id));
            deleted += 1;
        }
    }
    assert_eq!(deleted, 500, "index 1000 does not exist");
    assert_eq!(comments.len(), 500);
    assert!(comments.iter().all(|e| e.data.line_number % 2 == 1));
}

#[test]
fn five_hundred_mixed_operations_comment_review_delete_first() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    let reviews = store.collection::<Review>().unwrap();
    let (count, _sub) = counter(&store);
    for i in 0..500u64 {
        match i % 3 {
            0 => drop(comments.put(format!("c{i}"), comment("m", i)).unwrap()),
            1 => drop(
                reviews
                    .put(format!("r{i}"), review("R", "pending"))
                    .unwrap(),
            ),
            _ => {
                let first = comments.get(0).unwrap();
                assert!(comments.delete(&first.id));
            }
        }
    }
    assert_eq!(get(&count), 500);
    assert_eq!((comments.len(), reviews.len()), (1, 167));
}

#[test]
fn a_hundred_large_entities_load_and_read_back() {
    let store = Store::new();
    let large = (0..100).map(|i| {
        Entity::new(
            format!("big{i}"),
            "comment",
            json!({
                "message": "x".repeat(10_000),
                "tags": (0..100).map(|t| format!("tag{t}")).collect::<Vec<_>>(),
                "timestamps": (0..50).collect::<Vec<_>>(),
                "content": "y".repeat(5_000),
                "lineNumber": i,
            }),
        )
    });
    assert_eq!(store.load_entities(large).unwrap(), 100);
    let e = store.dynamic("comment").find_by_id("big42").unwrap();
    assert_eq!(e.data["message"].as_str().unwrap().len(), 10_000);
    assert_eq!(e.data["tags"].as_array().unwrap().len(), 100);
    assert_eq!(e.data["timestamps"].as_array().unwrap().len(), 50);
}

#[test]
fn twenty_load_filter_sort_cycles_with_a_clear_every_fifth() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    for cycle in 0..20u64 {
        let base = cycle * 100;
        store
            .load_entities((base..base + 100).map(comment_json))
            .unwrap();
        assert!(
            !comments
                .filter(|e| e.data.line_number.is_multiple_of(10))
                .is_empty()
        );
        assert_eq!(
            comments.order_by(|e| e.data.line_number).len(),
            comments.len()
        );
        if cycle % 5 == 4 {
            store.clear();
            assert!(comments.is_empty());
        }
    }
    comments.put("final", comment("final", 1)).unwrap();
    assert_eq!(comments.find_by_id("final").unwrap().data.message, "final");
    assert_eq!(comments.len(), 1);
}

#[test]
fn a_hundred_cycles_of_fifty_upserts_then_emptying_the_collection() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    for cycle in 0..100u64 {
        comments
            .bulk_upsert((0..50).map(|i| Entity::of(format!("c{cycle}-{i}"), comment("m", i))))
            .unwrap();
        assert_eq!(comments.len(), 50);
        comments.clear();
    }
    assert_eq!(comments.len(), 0);
    assert!(
        store.is_empty(),
        "emptying the collection empties the store too"
    );
}
