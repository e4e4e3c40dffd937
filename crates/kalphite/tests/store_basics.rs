//! Layer 1 basics: collections, upsert/delete, order, identity, bulk load, clear —
//! `Acceptance-BasicUsage` and `Layer1-CoreStore` of BEHAVIORS.md §2.1, translated
//! (push / index assignment → upsert, splice → delete, `loadEntities` → `load_entities`).

mod common;

use std::sync::Arc;

use common::{Comment, Review, comment, comment_json, counter, get, ids, review, review_json};
use kalphite::{Entity, EntityKind, Error, Kind, Millis, Store, now_millis};
use serde_json::{Value, json};

#[test]
fn full_local_workflow_bulk_load_upsert_replace_and_totals() {
    let store = Store::new();
    let first_review = Entity::new(
        "r1",
        "review",
        json!({"title": "R", "status": "pending", "approved": false, "priority": "normal"}),
    )
    .at(1);
    store
        .load_entities([first_review.clone(), comment_json(1).at(1)])
        .unwrap();
    let reviews = store.dynamic("review");
    let comments = store.collection::<Comment>().unwrap();
    assert_eq!(*reviews.find_by_id("r1").unwrap(), first_review);
    assert_eq!(comments.len(), 1);

    comments.put("c2", comment("new comment", 2)).unwrap();
    assert_eq!(comments.len(), 2);
    assert_eq!(
        comments.find_by_id("c2").unwrap().data.message,
        "new comment"
    );

    // Index assignment → read-modify-upsert of the same id.
    let mut edited = (*comments.get(1).unwrap()).clone();
    edited.data.message = "edited".into();
    comments.upsert(edited).unwrap();
    assert_eq!(comments.get(1).unwrap().data.message, "edited");

    let mut r = (*reviews.find_by_id("r1").unwrap()).clone();
    r.data["status"] = json!("approved");
    reviews.upsert(r).unwrap();
    assert_eq!(reviews.find_by_id("r1").unwrap().data["status"], "approved");

    assert_eq!(store.len(), 3);
    assert_eq!(reviews.len() + comments.len(), 3);
}

#[test]
fn bulk_load_of_one_review_and_hundred_comments_counts() {
    let store = Store::new();
    let mut input = vec![review_json(1)];
    input.extend((0..100).map(comment_json));
    assert_eq!(store.load_entities(input).unwrap(), 101);
    assert_eq!(store.len(), 101);
    assert_eq!(store.dynamic("comment").len(), 100);
    store.dynamic("comment").upsert(comment_json(100)).unwrap();
    assert_eq!(store.len(), 102);
}

#[test]
fn everything_is_synchronous_writes_visible_at_once() {
    let store = Store::new();
    store
        .load_entities([comment_json(1), comment_json(2), review_json(1)])
        .unwrap();
    let comments = store.collection::<Comment>().unwrap();
    comments.put("c3", comment("third", 3)).unwrap();
    let reviews = store.collection::<Review>().unwrap();
    let mut r = (*reviews.find(|r| r.data.status == "pending").unwrap()).clone();
    r.data.status = "approved".into();
    reviews.upsert(r).unwrap();
    assert_eq!(comments.len(), 3);
    assert_eq!(reviews.len(), 1);
    assert_eq!(reviews.get(0).unwrap().data.status, "approved");
}

#[test]
fn collections_start_empty() {
    let store = Store::new();
    assert!(store.collection::<Comment>().unwrap().is_empty());
    assert!(store.dynamic("review").is_empty());
    assert!(store.is_empty());
    assert!(store.entity_types().is_empty());
}

#[test]
fn upsert_returns_the_stored_entity_and_it_reads_back_equal() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    let stored = comments
        .upsert(Entity::of("c1", comment("hello", 1)).at(5))
        .unwrap();
    assert_eq!(comments.len(), 1);
    assert_eq!(*comments.get(0).unwrap(), *stored);
    assert_eq!(stored.data, comment("hello", 1));
    assert_eq!(stored.updated_at, 5);
}

#[test]
fn upserts_keep_insertion_order() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    for id in ["c3", "c1", "c2"] {
        comments.put(id, comment(id, 0)).unwrap();
    }
    assert_eq!(ids(&comments.snapshot()), ["c3", "c1", "c2"]);
    let iterated: Vec<String> = comments.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(iterated, ["c3", "c1", "c2"]);
    let by_ref: Vec<String> = (&comments).into_iter().map(|e| e.id.to_string()).collect();
    assert_eq!(by_ref, iterated);
}

#[test]
fn overwrite_of_an_existing_id_keeps_its_place_and_replaces_data() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    for i in 1..=3 {
        comments.put(format!("c{i}"), comment("old", i)).unwrap();
    }
    comments.put("c2", comment("new", 20)).unwrap();
    assert_eq!(ids(&comments.snapshot()), ["c1", "c2", "c3"]);
    let c2 = comments.get(1).unwrap();
    assert_eq!((c2.data.message.as_str(), c2.data.line_number), ("new", 20));
    assert_eq!(comments.len(), 3);
}

#[test]
fn duplicate_id_is_one_entity_latest_wins_no_duplicate_in_view() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    comments.put("dup", comment("first", 1)).unwrap();
    comments.put("dup", comment("second", 2)).unwrap();
    assert_eq!(comments.len(), 1);
    assert_eq!(comments.find_by_id("dup").unwrap().data.message, "second");
    store
        .load_entities([comment_json(1), comment_json(1)])
        .unwrap();
    assert_eq!(comments.len(), 2);
}

#[test]
fn delete_removes_one_and_keeps_the_others_in_order() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    for i in 1..=3 {
        comments.put(format!("c{i}"), comment("m", i)).unwrap();
    }
    assert!(comments.delete("c2"));
    assert_eq!(ids(&comments.snapshot()), ["c1", "c3"]);
    assert!(
        !comments.delete("c2"),
        "deleting a missing id reports false"
    );
    assert!(comments.find_by_id("c2").is_none());
}

#[test]
fn reinserting_a_deleted_id_appends_it_there_is_no_positional_insert() {
    // splice(1, 0, x) has no Rust counterpart: a new id is always appended.
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    for i in 1..=3 {
        comments.put(format!("c{i}"), comment("m", i)).unwrap();
    }
    comments.delete("c2");
    comments.put("c2", comment("back", 2)).unwrap();
    assert_eq!(ids(&comments.snapshot()), ["c1", "c3", "c2"]);
}

#[test]
fn clear_empties_every_collection() {
    let store = Store::new();
    store.load_entities((0..5).map(comment_json)).unwrap();
    store.load_entities((0..3).map(review_json)).unwrap();
    store.clear();
    assert_eq!(store.dynamic("comment").len(), 0);
    assert_eq!(store.dynamic("review").len(), 0);
    assert!(store.is_empty());
    assert!(store.all().is_empty());
}

#[test]
fn collection_clear_removes_only_its_kind_with_one_notification() {
    let store = Store::new();
    store.load_entities((0..5).map(comment_json)).unwrap();
    store.load_entities((0..3).map(review_json)).unwrap();
    let comments = store.collection::<Comment>().unwrap();
    let (count, _sub) = counter(&store);
    comments.clear();
    assert!(comments.is_empty());
    assert_eq!(store.dynamic("review").len(), 3);
    assert_eq!(get(&count), 1);
}

#[test]
fn types_are_isolated_each_collection_holds_only_its_kind() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    let reviews = store.collection::<Review>().unwrap();
    comments.put("c1", comment("a", 1)).unwrap();
    comments.put("c2", comment("b", 2)).unwrap();
    reviews.put("r1", review("R", "pending")).unwrap();
    assert!(comments.iter().all(|e| e.kind == "comment"));
    assert!(reviews.iter().all(|e| e.kind == "review"));
    comments.delete("c1");
    assert_eq!(
        reviews.len(),
        1,
        "deleting comments leaves reviews unchanged"
    );
    assert_eq!(comments.len(), 1);
}

#[test]
fn mixed_bulk_load_splits_by_kind_and_keeps_input_order() {
    let store = Store::new();
    store
        .load_entities([
            comment_json(1),
            review_json(1),
            comment_json(2),
            review_json(2),
        ])
        .unwrap();
    let comments = store.dynamic("comment");
    let reviews = store.dynamic("review");
    assert_eq!((comments.len(), reviews.len()), (2, 2));
    assert_eq!(comments.get(0).unwrap().id, "c1");
    assert_eq!(reviews.get(0).unwrap().id, "r1");
    assert_eq!(
        store.entity_types(),
        [Kind::from("comment"), Kind::from("review")]
    );
}

#[test]
fn bulk_load_of_a_thousand_comments() {
    let store = Store::new();
    assert_eq!(
        store.load_entities((0..1000).map(comment_json)).unwrap(),
        1000
    );
    let comments = store.collection::<Comment>().unwrap();
    assert_eq!(comments.len(), 1000);
    assert_eq!(comments.get(999).unwrap().id, "c999");
}

#[test]
fn element_by_index_and_by_find_are_the_same_shared_entity() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    comments.put("c1", comment("a", 1)).unwrap();
    let by_index = comments.get(0).unwrap();
    let by_find = comments.find(|e| e.data.line_number == 1).unwrap();
    let by_id = comments.find_by_id("c1").unwrap();
    assert!(Arc::ptr_eq(&by_index, &by_find));
    assert!(Arc::ptr_eq(&by_index, &by_id));
}

#[test]
fn missing_id_reads_as_none_and_unknown_kind_as_empty() {
    let store = Store::new();
    store.load_entities([comment_json(1)]).unwrap();
    assert!(
        store
            .collection::<Comment>()
            .unwrap()
            .find_by_id("nope")
            .is_none()
    );
    assert!(store.dynamic("nothing").is_empty());
    assert!(store.dynamic("nothing").find_by_id("c1").is_none());
    assert!(store.get("comment", "nope").is_none());
    assert!(store.get("nothing", "c1").is_none());
    assert!(store.collection::<Comment>().unwrap().get(5).is_none());
}

#[test]
fn store_keeps_working_after_refused_writes() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    assert!(comments.put("", comment("empty id", 0)).is_err());
    assert!(store.dynamic("comment").put("x", Value::Null).is_err());
    comments.put("ok", comment("fine", 1)).unwrap();
    assert_eq!(comments.find_by_id("ok").unwrap().data.message, "fine");
    assert_eq!(comments.len(), 1);
}

#[test]
fn find_in_five_thousand_finds_the_middle_one() {
    let store = Store::new();
    store.load_entities((0..5000).map(comment_json)).unwrap();
    let comments = store.collection::<Comment>().unwrap();
    assert_eq!(
        comments.find(|e| e.id == "c2500").unwrap().data.line_number,
        2500
    );
    assert_eq!(
        comments.find_by_id("c2500").unwrap().data.message,
        "Message 2500"
    );
}

#[test]
fn typed_and_dynamic_handles_on_one_kind_see_the_same_entities() {
    let store = Store::new();
    let typed = store.collection::<Comment>().unwrap();
    let dynamic = store.dynamic("comment");
    typed.put("c1", comment("from typed", 1)).unwrap();
    dynamic
        .put("c2", json!({"message": "from dynamic", "lineNumber": 2}))
        .unwrap();
    assert_eq!(typed.len(), 2);
    assert_eq!(dynamic.len(), 2);
    assert_eq!(typed.find_by_id("c2").unwrap().data.message, "from dynamic");
    assert_eq!(
        dynamic.find_by_id("c1").unwrap().data["message"],
        "from typed"
    );
    assert_eq!(ids(&typed.snapshot()), ids(&dynamic.snapshot()));
    assert!(dynamic.delete("c1"));
    assert!(typed.find_by_id("c1").is_none());
}

#[test]
fn opening_a_json_kind_as_a_typed_collection_converts_its_rows() {
    let store = Store::new();
    store.load_entities((0..3).map(comment_json)).unwrap();
    let typed = store.collection::<Comment>().unwrap();
    assert_eq!(typed.len(), 3);
    assert_eq!(typed.get(2).unwrap().data, comment("Message 2", 2));
    assert_eq!(ids(&typed.snapshot()), ["c0", "c1", "c2"]);
}

#[test]
fn store_level_upsert_and_delete_keep_collection_views_in_sync() {
    // BEHAVIORS §4.1: the original's store-level writes never reached materialised views.
    let store = Store::new();
    let view = store.collection::<Comment>().unwrap();
    assert!(view.is_empty());
    store.load_entities([comment_json(1)]).unwrap();
    store
        .transaction(|tx| tx.upsert_json(comment_json(2)).map(drop))
        .unwrap();
    assert_eq!(ids(&view.snapshot()), ["c1", "c2"]);
    store
        .transaction::<_, Error>(|tx| Ok(tx.delete_json("comment", "c1")))
        .unwrap();
    assert_eq!(ids(&view.snapshot()), ["c2"]);
    assert_eq!(store.get("comment", "c2").unwrap().id(), "c2");
}

#[test]
fn a_collection_handle_is_a_live_view_taken_before_writes() {
    let store = Store::new();
    let early = store.collection::<Comment>().unwrap();
    let early_dyn = store.dynamic("comment");
    store.load_entities((0..3).map(comment_json)).unwrap();
    assert_eq!(early.len(), 3);
    assert_eq!(early_dyn.len(), 3);
    let clone = early.clone();
    store
        .collection::<Comment>()
        .unwrap()
        .put("c9", comment("late", 9))
        .unwrap();
    assert_eq!(clone.len(), 4);
}

#[test]
fn a_collection_handle_survives_clear() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    let dynamic = store.dynamic("comment");
    comments.put("c1", comment("a", 1)).unwrap();
    store.clear();
    assert!(comments.is_empty());
    assert!(dynamic.is_empty());
    comments.put("c2", comment("after clear", 2)).unwrap();
    assert_eq!(ids(&comments.snapshot()), ["c2"]);
    assert_eq!(dynamic.len(), 1);
}

#[test]
fn updated_at_is_stamped_when_zero_and_kept_when_set() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    let before: Millis = now_millis();
    let stamped = comments.put("c1", comment("a", 1)).unwrap();
    let after = now_millis();
    assert!(
        (before..=after).contains(&stamped.updated_at),
        "{before} <= {} <= {after}",
        stamped.updated_at
    );
    let kept = comments
        .upsert(Entity::of("c2", comment("b", 2)).at(42))
        .unwrap();
    assert_eq!(kept.updated_at, 42);
    assert_eq!(comments.find_by_id("c2").unwrap().updated_at, 42);
    let json = store
        .dynamic("comment")
        .upsert(comment_json(3).at(1_700_000_000_000))
        .unwrap();
    assert_eq!(json.updated_at, 1_700_000_000_000);
    let json_stamped = store.dynamic("comment").upsert(comment_json(4)).unwrap();
    assert!(json_stamped.updated_at >= before);
}

#[test]
fn entity_types_lists_kinds_holding_entities_in_first_seen_order() {
    let store = Store::new();
    let _notes = store.dynamic("note");
    let _comments = store.collection::<Comment>().unwrap();
    assert!(
        store.entity_types().is_empty(),
        "an empty opened kind is not listed"
    );
    store.load_entities([comment_json(1)]).unwrap();
    store.load_entities([review_json(1)]).unwrap();
    store.dynamic("note").put("n1", json!({})).unwrap();
    let names: Vec<String> = store
        .entity_types()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(names, ["comment", "review", "note"].map(String::from));
    store.dynamic("comment").delete("c1");
    let names: Vec<String> = store
        .entity_types()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(names, ["review", "note"].map(String::from));
}

#[test]
fn store_all_and_get_see_every_kind() {
    let store = Store::new();
    store
        .load_entities([comment_json(1), review_json(1), comment_json(2)])
        .unwrap();
    let all: Vec<String> = store.all().iter().map(|e| e.id().to_string()).collect();
    assert_eq!(all, ["c1", "c2", "r1"]);
    let r = store.get("review", "r1").unwrap();
    assert_eq!(r.kind(), "review");
    assert_eq!(r.data_json().unwrap()["title"], "Review 1");
    let c = store
        .collection::<Comment>()
        .unwrap()
        .find_by_id("c1")
        .unwrap();
    let typed = store.get("comment", "c1").unwrap();
    assert!(Arc::ptr_eq(&typed.downcast::<Comment>().unwrap(), &c));
}

#[test]
fn typed_entity_json_form_uses_the_original_field_names() {
    let store = Store::new();
    let stored = store
        .collection::<Comment>()
        .unwrap()
        .upsert(Entity::of("c1", comment("m", 3)).at(7))
        .unwrap();
    assert_eq!(
        serde_json::to_value(&*stored).unwrap(),
        json!({"id": "c1", "type": "comment", "data": {"message": "m", "lineNumber": 3, "tags": []}, "updatedAt": 7})
    );
    assert_eq!(Comment::KIND, "comment");
}
