//! Data consistency (BEHAVIORS.md §2.1 `Layer1-DataConsistency`, `Layer1-AdvancedEdgeCases`,
//! `Integration-Advanced`): shared entities, read-modify-upsert edits, clear and reuse,
//! extreme values, cross-type isolation, and real-world editing patterns.

mod common;

use std::sync::Arc;

use common::{Comment, Review, comment, comment_json, counter, get, ids, review, review_json};
use kalphite::{Entity, Store};
use serde_json::{Value, json};

#[test]
fn index_find_and_filter_share_one_entity_and_all_see_an_edit() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    comments.put("c1", comment("original", 1)).unwrap();
    let a = comments.get(0).unwrap();
    let b = comments.find(|e| e.id == "c1").unwrap();
    let c = comments.filter(|e| e.data.line_number == 1).remove(0);
    assert!(Arc::ptr_eq(&a, &b) && Arc::ptr_eq(&b, &c));
    let mut edit = (*a).clone();
    edit.data.message = "edited".into();
    comments.upsert(edit).unwrap();
    assert_eq!(comments.get(0).unwrap().data.message, "edited");
    assert_eq!(
        comments.find(|e| e.id == "c1").unwrap().data.message,
        "edited"
    );
    assert_eq!(
        comments.filter(|e| e.data.line_number == 1)[0].data.message,
        "edited"
    );
    assert_eq!(
        a.data.message, "original",
        "an old handle is an immutable snapshot"
    );
}

#[test]
fn replacing_an_entity_updates_every_field() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    comments.put("c1", comment("old", 1)).unwrap();
    comments.put("c1", comment("new", 99)).unwrap();
    let e = comments.find_by_id("c1").unwrap();
    assert_eq!((e.data.message.as_str(), e.data.line_number), ("new", 99));
}

#[test]
fn deep_nested_edits_and_nested_array_appends_are_visible() {
    let store = Store::new();
    let docs = store.dynamic("note");
    docs.put(
        "c1",
        json!({"message": "m", "metadata": {"author": {"name": "Ann"}}, "tags": ["a", "b"]}),
    )
    .unwrap();
    let mut e = (*docs.find_by_id("c1").unwrap()).clone();
    e.data["metadata"]["author"]["name"] = json!("Bob");
    e.data["tags"].as_array_mut().unwrap().push(json!("c"));
    docs.upsert(e).unwrap();
    let back = docs.find_by_id("c1").unwrap();
    assert_eq!(back.data["metadata"]["author"]["name"], "Bob");
    assert_eq!(back.data["tags"].as_array().unwrap().len(), 3);

    let comments = store.collection::<Comment>().unwrap();
    comments.put("c1", comment("typed", 1)).unwrap();
    comments
        .upsert(Entity::of(
            "c1",
            Comment {
                tags: vec!["a".into(), "b".into(), "c".into()],
                ..comment("typed", 1)
            },
        ))
        .unwrap();
    let mut typed = (*comments.find_by_id("c1").unwrap()).clone();
    typed.data.tags.push("d".into());
    comments.upsert(typed).unwrap();
    assert_eq!(
        comments.find_by_id("c1").unwrap().data.tags,
        ["a", "b", "c", "d"]
    );
}

#[test]
fn a_hundred_successive_edits_leave_the_last_one() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    comments.put("c1", comment("start", 0)).unwrap();
    for i in 0..100 {
        let mut e = (*comments.find(|e| e.id == "c1").unwrap()).clone();
        e.data.message = format!("Update {i}");
        e.data.line_number = i;
        comments.upsert(e).unwrap();
    }
    let e = comments.find_by_id("c1").unwrap();
    assert_eq!(
        (e.data.message.as_str(), e.data.line_number),
        ("Update 99", 99)
    );
    assert_eq!(comments.len(), 1);
}

#[test]
fn mixed_cycles_of_upsert_edit_filter_and_sort_stay_consistent() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    for i in 0..10 {
        comments.put(format!("c{i}"), comment("seed", i)).unwrap();
    }
    for cycle in 0..20u64 {
        comments
            .put(format!("n{cycle}"), comment("cycle", 100 + cycle))
            .unwrap();
        let mut e = (*comments.get(usize::try_from(cycle).unwrap()).unwrap()).clone();
        e.data.message = format!("edited {cycle}");
        comments.upsert(e).unwrap();
        assert!(!comments.filter(|e| e.data.line_number >= 100).is_empty());
        let sorted = comments.order_by(|e| std::cmp::Reverse(e.data.line_number));
        assert_eq!(
            sorted.len(),
            comments.len(),
            "sorting neither drops nor duplicates"
        );
    }
    assert_eq!(comments.len(), 30);
}

#[test]
fn after_loading_a_hundred_every_one_is_found_with_its_fields() {
    let store = Store::new();
    store.load_entities((0..100).map(comment_json)).unwrap();
    let comments = store.collection::<Comment>().unwrap();
    for i in 0..100 {
        let e = comments.find_by_id(&format!("c{i}")).unwrap();
        assert_eq!(e.data, comment(&format!("Message {i}"), i));
    }
}

#[test]
fn clear_then_reuse_leaves_no_stale_entity() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    for i in 0..1000 {
        comments.put(format!("c{i}"), comment("m", i)).unwrap();
    }
    store.dynamic("review").upsert(review_json(1)).unwrap();
    store.clear();
    assert_eq!((comments.len(), store.dynamic("review").len()), (0, 0));
    assert!(comments.find_by_id("c5").is_none());
    assert!(comments.filter(|_| true).is_empty());
    comments.put("fresh", comment("new", 1)).unwrap();
    assert_eq!(comments.len(), 1);
}

#[test]
fn memory_pressure_rounds_of_large_loads_filters_and_clears() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    for round in 0..5 {
        let input = (0..500u64).map(|i| {
            let mut c = comment(&"x".repeat(1000), i);
            c.tags = (0..100).map(|t| format!("t{t}")).collect();
            Entity::of(format!("r{round}-{i}"), c)
        });
        assert_eq!(comments.bulk_upsert(input).unwrap(), 500);
        assert_eq!(comments.len(), 500);
        assert_eq!(
            comments
                .filter(|e| e.data.line_number.is_multiple_of(10))
                .len(),
            50
        );
        store.clear();
        assert_eq!(comments.len(), 0);
    }
    comments.put("after", comment("still works", 1)).unwrap();
    assert_eq!(comments.len(), 1);
}

#[test]
fn extended_use_cycles_with_periodic_clears() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    let mut expected = 0;
    for cycle in 0..50u64 {
        for i in 0..50 {
            comments
                .put(format!("c{cycle}-{i}"), comment("m", i))
                .unwrap();
        }
        expected += 50;
        assert_eq!(
            comments.filter(|e| e.data.line_number < 10).len() * 5,
            expected
        );
        assert_eq!(comments.order_by(|e| e.data.line_number).len(), expected);
        assert!(comments.find_by_id(&format!("c{cycle}-49")).is_some());
        if cycle % 10 == 9 {
            store.clear();
            expected = 0;
        }
        assert_eq!(comments.len(), expected);
    }
    comments.put("final", comment("final", 1)).unwrap();
    assert_eq!(comments.find_by_id("final").unwrap().data.message, "final");
}

#[test]
fn extreme_ids_and_values_are_stored_exactly() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    let long_id = "i".repeat(1500);
    let cases = [
        (long_id.as_str(), "m".repeat(10_000), 999_999),
        (
            "spécial ✨ 🚀\nnew\tline",
            "emoji 🎉 and \"quotes\"\n".to_string(),
            1,
        ),
        ("12345", "numeric-string id".to_string(), 2),
    ];
    for (id, message, line) in &cases {
        comments.put(*id, comment(message, *line)).unwrap();
    }
    assert_eq!(comments.len(), 3);
    for (id, message, line) in &cases {
        let e = comments.find_by_id(id).unwrap();
        assert_eq!((&e.data.message, e.data.line_number), (message, *line));
    }
}

#[test]
fn large_and_boundary_values_are_preserved() {
    let store = Store::new();
    let docs = store.dynamic("comment");
    let big = "z".repeat(100_000);
    docs.put(
        "c1",
        json!({"message": big, "lineNumber": 9_007_199_254_740_991u64}),
    )
    .unwrap();
    let e = docs.find_by_id("c1").unwrap();
    assert_eq!(e.data["message"].as_str().unwrap().len(), 100_000);
    assert_eq!(e.data["lineNumber"], 9_007_199_254_740_991u64);
}

#[test]
fn falsy_values_zero_false_and_empty_string_are_preserved() {
    let store = Store::new();
    let docs = store.dynamic("comment");
    docs.upsert(Entity::new(
        "c1",
        "comment",
        json!({"n": 0, "b": false, "s": "", "z": null}),
    ))
    .unwrap();
    assert_eq!(
        docs.find_by_id("c1").unwrap().data,
        json!({"n": 0, "b": false, "s": "", "z": null})
    );
}

#[test]
fn without_a_schema_malformed_fields_are_accepted() {
    let store = Store::new();
    let docs = store.dynamic("comment");
    docs.put("c1", json!({"message": null, "lineNumber": "not a number"}))
        .unwrap();
    docs.put("c2", json!({})).unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(
        docs.find_by_id("c1").unwrap().data["lineNumber"],
        "not a number"
    );
}

#[test]
fn entities_referring_to_each_other_by_id_are_stored_without_trouble() {
    // A JS object cycle becomes a pair of ids in Rust: no cycle exists in the data.
    let store = Store::new();
    let docs = store.dynamic("comment");
    docs.put("a", json!({"message": "a", "ref": "b"})).unwrap();
    docs.put("b", json!({"message": "b", "ref": "a"})).unwrap();
    let a = docs.find_by_id("a").unwrap();
    let b = docs.find_by_id(a.data["ref"].as_str().unwrap()).unwrap();
    assert_eq!(b.data["ref"], "a");
    assert_eq!(docs.len(), 2);
}

#[test]
fn editing_a_copy_of_an_entity_changes_nothing_until_it_is_upserted() {
    // The original's "corrupt an element through its proxy" cannot happen: stored
    // entities are immutable behind Arc.
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    comments.put("c1", comment("safe", 1)).unwrap();
    let mut copy = (*comments.get(0).unwrap()).clone();
    copy.data.message = "corrupted".into();
    copy.id = "".into();
    assert_eq!(comments.get(0).unwrap().data.message, "safe");
    assert!(comments.upsert(copy).is_err(), "an empty id is refused");
    comments.put("c2", comment("next", 2)).unwrap();
    assert_eq!(comments.len(), 2);
}

#[test]
fn cross_type_isolation_under_delete_and_clear() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    let reviews = store.collection::<Review>().unwrap();
    for i in 0..10 {
        comments
            .put(format!("comment-{i}"), comment("m", i))
            .unwrap();
        reviews
            .put(
                format!("review-{i}"),
                review(&format!("Title {i}"), "pending"),
            )
            .unwrap();
    }
    for i in 0..5 {
        comments.delete(&format!("comment-{i}"));
    }
    assert_eq!((comments.len(), reviews.len()), (5, 10));
    comments.clear();
    assert_eq!((comments.len(), reviews.len()), (0, 10));
    assert_eq!(
        reviews.find_by_id("review-0").unwrap().data.title,
        "Title 0"
    );
}

#[test]
fn alternating_bulk_load_puts_each_entity_in_its_own_kind() {
    let store = Store::new();
    let input = (0..20u64).map(|i| {
        if i.is_multiple_of(2) {
            comment_json(i)
        } else {
            review_json(i)
        }
    });
    store.load_entities(input).unwrap();
    let comments = store.dynamic("comment");
    let reviews = store.dynamic("review");
    assert_eq!((comments.len(), reviews.len()), (10, 10));
    assert!(
        comments
            .iter()
            .all(|e| e.kind == "comment" && e.id.starts_with('c'))
    );
    assert!(
        reviews
            .iter()
            .all(|e| e.kind == "review" && e.id.starts_with('r'))
    );
    assert_eq!(reviews.get(0).unwrap().id, "r1");
}

#[test]
fn store_level_upsert_then_get_returns_the_data_intact() {
    let store = Store::new();
    let data = json!({"message": "hello", "nested": {"list": [1, 2, 3]}, "count": 0});
    store
        .dynamic("comment")
        .upsert(Entity::new("c1", "comment", data.clone()))
        .unwrap();
    assert_eq!(
        store.get("comment", "c1").unwrap().data_json().unwrap(),
        data
    );
}

#[test]
fn a_thousand_store_level_upserts_read_back_exactly() {
    let store = Store::new();
    let docs = store.dynamic("comment");
    for i in 0..1000u64 {
        docs.upsert(comment_json(i).at(i + 1)).unwrap();
    }
    for i in 0..1000u64 {
        let e = store
            .get("comment", &format!("c{i}"))
            .unwrap()
            .to_json()
            .unwrap();
        assert_eq!(e, comment_json(i).at(i + 1));
    }
}

#[test]
fn large_entities_upserted_one_by_one_with_periodic_clears() {
    let store = Store::new();
    let docs = store.dynamic("comment");
    let message = "L".repeat(5_000);
    let tags: Vec<Value> = (0..100).map(|t| json!(t)).collect();
    let mut live = 0;
    for i in 0..2000 {
        docs.put(
            format!("c{i}"),
            json!({"message": message, "tags": tags, "lineNumber": i}),
        )
        .unwrap();
        live += 1;
        assert_eq!(
            docs.filter(|e| e.data["lineNumber"].as_u64().is_some())
                .len(),
            live
        );
        if i % 3 == 2 {
            store.clear();
            live = 0;
        }
    }
    assert_eq!(docs.len(), live);
}

#[test]
fn document_editing_load_add_remove_edit() {
    let store = Store::new();
    store.load_entities((1..=3).map(comment_json)).unwrap();
    let comments = store.collection::<Comment>().unwrap();
    comments.put("c4", comment("added", 4)).unwrap();
    comments.delete("c2");
    let mut e = (*comments.find_by_id("c3").unwrap()).clone();
    e.data.message = "edited".into();
    comments.upsert(e).unwrap();
    assert_eq!(ids(&comments.snapshot()), ["c1", "c3", "c4"]);
    assert_eq!(comments.get(1).unwrap().data.message, "edited");
}

#[test]
fn undo_by_snapshot_clear_and_reload() {
    let store = Store::new();
    let snapshot = |s: &Store| -> Vec<Entity<Value>> {
        s.all().iter().map(|e| e.to_json().unwrap()).collect()
    };
    let initial = snapshot(&store);
    store
        .load_entities([comment_json(1), review_json(1)])
        .unwrap();
    let state2 = snapshot(&store);
    store
        .load_entities([comment_json(2), review_json(2)])
        .unwrap();
    assert_eq!(store.len(), 4);

    store.clear();
    store.load_entities(state2.clone()).unwrap();
    assert_eq!(
        (
            store.dynamic("comment").len(),
            store.dynamic("review").len()
        ),
        (1, 1)
    );
    assert_eq!(snapshot(&store), state2);

    store.clear();
    store.load_entities(initial).unwrap();
    assert_eq!(
        (
            store.dynamic("comment").len(),
            store.dynamic("review").len()
        ),
        (0, 0)
    );
}

#[test]
fn a_thousand_mixed_operations_with_a_subscriber() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    let (count, _sub) = counter(&store);
    let mut expected_notifications = 0;
    for i in 0..1000u64 {
        match i % 3 {
            0 => {
                comments.put(format!("c{i}"), comment("m", i)).unwrap();
                expected_notifications += 1;
            }
            1 => {
                if let Some(first) = comments.get(0) {
                    assert!(comments.delete(&first.id));
                    expected_notifications += 1;
                }
            }
            _ => {
                if let Some(first) = comments.get(0) {
                    let mut e = (*first).clone();
                    e.data.message.push('!');
                    comments.upsert(e).unwrap();
                    expected_notifications += 1;
                }
            }
        }
    }
    assert_eq!(get(&count), expected_notifications);
    assert!(get(&count) > 500);
}

#[test]
fn five_hundred_mixed_operations_record_five_hundred_results() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    let mut results = Vec::new();
    let mut model: Vec<String> = Vec::new();
    for i in 0..500u64 {
        let r = match i % 4 {
            0 => {
                comments.put(format!("c{i}"), comment("m", i)).unwrap();
                model.push(format!("c{i}"));
                1
            }
            1 => usize::from(comments.find_by_id(&format!("c{}", i - 1)).is_some()),
            2 => comments
                .filter(|e| e.data.line_number.is_multiple_of(2))
                .len(),
            _ => {
                let victim = usize::try_from(i * 7919).unwrap() % model.len();
                let id = model.remove(victim);
                usize::from(comments.delete(&id))
            }
        };
        results.push(r);
    }
    assert_eq!(results.len(), 500);
    assert_eq!(ids(&comments.snapshot()), model);
}
