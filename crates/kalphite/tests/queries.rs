//! Queries over one collection: find, filter (`where`), `order_by` (stable, on a copy), the
//! chainable query, and the original suite's complex and real-world queries
//! (BEHAVIORS.md §2.1 `Layer1-CoreStore`, `Layer1-Performance`, `Integration-Advanced`).

mod common;

use std::cmp::Ordering;
use std::sync::Arc;

use common::{Comment, Review, comment, comment_json, ids, review};
use kalphite::{Collection, Entity, Error, Store, json_cmp};
use serde_json::json;

fn five_comments(store: &Store) -> Collection<Comment> {
    let comments = store.collection::<Comment>().unwrap();
    let rows = [
        ("c1", "First comment", 10),
        ("c2", "Second comment", 20),
        ("c3", "TODO: fix this", 30),
        ("c4", "Looks good", 40),
        ("c5", "TODO: add tests", 50),
    ];
    for (id, message, line) in rows {
        comments.put(id, comment(message, line)).unwrap();
    }
    comments
}

#[test]
fn find_by_predicate_returns_the_entity_or_none() {
    let store = Store::new();
    let comments = five_comments(&store);
    assert_eq!(
        comments.find(|e| e.data.line_number == 40).unwrap().id,
        "c4"
    );
    assert!(comments.find(|e| e.data.line_number == 41).is_none());
}

#[test]
fn filter_returns_matches_in_insertion_order() {
    let store = Store::new();
    let comments = five_comments(&store);
    let todos = comments.filter(|e| e.data.message.contains("TODO"));
    assert_eq!(ids(&todos), ["c3", "c5"]);
}

#[test]
fn map_over_the_collection_gives_every_message_in_order() {
    let store = Store::new();
    let comments = five_comments(&store);
    let messages: Vec<String> = comments.iter().map(|e| e.data.message.clone()).collect();
    assert_eq!(messages.len(), 5);
    assert_eq!(messages[0], "First comment");
}

#[test]
fn order_by_descending_sorts_a_copy_and_leaves_the_collection_in_order() {
    let store = Store::new();
    let comments = five_comments(&store);
    let sorted = comments
        .query()
        .order_by_desc(|e| e.data.line_number)
        .collect();
    assert_eq!(sorted.first().unwrap().data.line_number, 50);
    assert_eq!(sorted.last().unwrap().data.line_number, 10);
    assert_eq!(sorted.len(), comments.len());
    assert_eq!(ids(&comments.snapshot()), ["c1", "c2", "c3", "c4", "c5"]);
}

#[test]
fn order_by_is_stable_ties_keep_collection_order() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    for (id, line) in [("a", 2), ("b", 1), ("c", 2), ("d", 1), ("e", 2)] {
        comments.put(id, comment("m", line)).unwrap();
    }
    let sorted = comments.order_by(|e| e.data.line_number);
    assert_eq!(ids(&sorted), ["b", "d", "a", "c", "e"]);
    let desc = comments
        .query()
        .order_by_desc(|e| e.data.line_number)
        .collect();
    assert_eq!(ids(&desc), ["a", "c", "e", "b", "d"]);
}

#[test]
fn chained_query_filters_orders_and_pages() {
    let store = Store::new();
    let comments = five_comments(&store);
    let page = comments
        .query()
        .filter(|e| e.data.line_number >= 20)
        .order_by_desc(|e| e.data.line_number)
        .offset(1)
        .limit(2)
        .collect();
    assert_eq!(ids(&page), ["c4", "c3"]);
    let unordered = comments
        .query()
        .filter(|e| e.data.line_number != 30)
        .offset(1)
        .limit(2)
        .collect();
    assert_eq!(ids(&unordered), ["c2", "c4"]);
    let two_filters = comments
        .query()
        .filter(|e| e.data.line_number > 10)
        .filter(|e| e.data.message.contains("comment"))
        .collect();
    assert_eq!(ids(&two_filters), ["c2"]);
}

#[test]
fn count_and_first_agree_with_collect() {
    let store = Store::new();
    let comments = five_comments(&store);
    let q = || comments.query().filter(|e| e.data.line_number > 15);
    assert_eq!(q().count(), 4);
    assert_eq!(q().limit(2).count(), 2);
    assert_eq!(q().offset(3).count(), 1);
    assert_eq!(q().first().unwrap().id, "c2");
    assert_eq!(
        q().order_by_desc(|e| e.data.line_number)
            .first()
            .unwrap()
            .id,
        "c5"
    );
    assert!(q().offset(10).first().is_none());
}

#[test]
fn sort_by_comparator_and_order_by_json() {
    let store = Store::new();
    let comments = five_comments(&store);
    let by_len = comments
        .query()
        .sort_by(|a, b| a.data.message.len().cmp(&b.data.message.len()))
        .collect();
    assert_eq!(by_len[0].data.message, "Looks good");
    let dynamic = store.dynamic("comment");
    let by_json = dynamic
        .query()
        .order_by_json(|e| e.data["lineNumber"].clone())
        .collect();
    assert_eq!(by_json.last().unwrap().id, "c5");
    let desc: Vec<_> = dynamic
        .query()
        .sort_by(|a, b| json_cmp(&b.data["message"], &a.data["message"]))
        .collect();
    assert_eq!(desc[0].data["message"], "TODO: fix this");
}

#[test]
fn json_cmp_is_a_total_order_across_types() {
    let ordered = [
        json!(null),
        json!(false),
        json!(true),
        json!(-1),
        json!(2),
        json!(2.5),
        json!("a"),
        json!("b"),
        json!([1]),
        json!([1, 2]),
        json!({"a": 1}),
    ];
    for (i, a) in ordered.iter().enumerate() {
        for (j, b) in ordered.iter().enumerate() {
            assert_eq!(json_cmp(a, b), i.cmp(&j), "{a} vs {b}");
        }
    }
    assert_eq!(json_cmp(&json!(3), &json!(3.0)), Ordering::Equal);
}

#[test]
fn queries_over_five_thousand_entities() {
    let store = Store::new();
    store.load_entities((0..5000).map(comment_json)).unwrap();
    let comments = store.collection::<Comment>().unwrap();
    assert_eq!(comments.filter(|e| e.data.line_number > 4000).len(), 999);
    let desc = comments
        .query()
        .order_by_desc(|e| e.data.line_number)
        .collect();
    assert_eq!(desc[0].data.line_number, 4999);
    assert_eq!(desc[4999].data.line_number, 0);
    let page: Vec<String> = comments
        .query()
        .filter(|e| e.data.line_number.is_multiple_of(10))
        .order_by(|e| e.data.line_number)
        .limit(100)
        .collect()
        .iter()
        .map(|e| e.data.message.clone())
        .collect();
    assert_eq!(page.len(), 100);
    assert_eq!(page[0], "Message 0");
    assert_eq!(page[99], "Message 990");
}

#[test]
fn queries_on_an_empty_collection_return_nothing() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    assert!(comments.filter(|_| true).is_empty());
    assert!(comments.find(|_| true).is_none());
    assert!(comments.order_by(|e| e.data.line_number).is_empty());
    assert_eq!(comments.query().count(), 0);
    assert!(store.dynamic("never").filter(|_| true).is_empty());
    assert!(store.dynamic("never").query().first().is_none());
}

fn code_review_fixture(store: &Store) -> (Collection<Comment>, Collection<Review>) {
    let comments = store.collection::<Comment>().unwrap();
    let reviews = store.collection::<Review>().unwrap();
    let rows = [
        ("c1", "Fix bug in parser", 10, "bug"),
        ("c2", "TODO: add tests", 25, "todo"),
        ("c3", "Another bug here", 30, "bug"),
        ("c4", "TODO: refactor", 22, "todo"),
        ("c5", "Known Issue with the cache", 40, "note"),
    ];
    for (id, message, line, tag) in rows {
        let mut c = comment(message, line);
        c.tags.push(tag.into());
        comments.put(id, c).unwrap();
    }
    reviews.put("r1", review("Parser", "approved")).unwrap();
    let mut urgent = review("Cache", "pending");
    urgent.priority = "high".into();
    reviews.put("r2", urgent).unwrap();
    reviews.put("r3", review("Docs", "pending")).unwrap();
    (comments, reviews)
}

fn tagged(e: &Entity<Comment>, tag: &str) -> bool {
    e.data.tags.iter().any(|t| t == tag)
}

#[test]
fn complex_queries_over_comments_and_reviews() {
    let store = Store::new();
    let (comments, reviews) = code_review_fixture(&store);

    let bugs = comments.query().filter(|e| tagged(e, "bug")).count();
    let high = reviews
        .query()
        .filter(|e| e.data.priority == "high")
        .count();
    assert_eq!(bugs + high, 3, "critical items");

    let todos = comments.query().filter(|e| tagged(e, "todo")).count();
    let unapproved = reviews.query().filter(|e| !e.data.approved).count();
    assert_eq!(todos + unapproved, 4, "pending items");

    #[allow(clippy::cast_precision_loss)]
    let rate = reviews.query().filter(|e| e.data.approved).count() as f64 / reviews.len() as f64;
    assert!((rate - 1.0 / 3.0).abs() < 1e-9);

    let developer = comments.filter(|e| tagged(e, "bug") || tagged(e, "todo"));
    assert_eq!(developer.len(), 4);
    let reviewer = reviews.filter(|e| !e.data.approved);
    assert_eq!(ids(&reviewer), ["r2", "r3"]);
    assert_eq!((bugs, reviewer.len()), (2, 2), "manager view");

    let search = comments.filter(|e| e.data.message.to_lowercase().contains("issue"));
    assert_eq!(ids(&search), ["c5"]);

    let late =
        comments.filter(|e| (tagged(e, "bug") || tagged(e, "todo")) && e.data.line_number > 20);
    assert_eq!(ids(&late), ["c2", "c3", "c4"]);

    let in_range = comments.filter(|e| (20..=40).contains(&e.data.line_number));
    assert!(in_range.len() + reviews.len() > 2);
}

#[test]
fn linter_plugin_query_finds_todo_and_fixme() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    comments.put("a", comment("TODO: x", 1)).unwrap();
    comments.put("b", comment("all fine", 2)).unwrap();
    comments.put("c", comment("FIXME: y", 3)).unwrap();
    let hits = comments.filter(|e| {
        let m = &e.data.message;
        m.contains("TODO") || m.contains("FIXME")
    });
    assert_eq!(ids(&hits), ["a", "c"]);
}

#[test]
fn multi_file_prefix_filter_and_replacing_a_collection_with_a_filtered_set() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    for id in ["main.rs:1", "lib.rs:1", "lib.rs:2", "util.rs:1"] {
        comments.put(id, comment(id, 1)).unwrap();
    }
    let count = |prefix: &str| comments.filter(|e| e.id.starts_with(prefix)).len();
    assert_eq!((count("main"), count("lib"), count("util")), (1, 2, 1));

    // "store.comment = filtered": replace the kind's contents in one transaction.
    let keep = comments.filter(|e| e.id.starts_with("lib"));
    store
        .transaction::<_, Error>(|tx| {
            for id in comments_ids_except(&keep, &["main.rs:1", "util.rs:1"]) {
                tx.delete::<Comment>(&id);
            }
            for e in &keep {
                tx.upsert((**e).clone())?;
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(ids(&comments.snapshot()), ["lib.rs:1", "lib.rs:2"]);
}

fn comments_ids_except(keep: &[Arc<Entity<Comment>>], all: &[&str]) -> Vec<String> {
    all.iter()
        .filter(|id| !keep.iter().any(|k| k.id == **id))
        .map(|id| (*id).to_string())
        .collect()
}

#[test]
fn filter_on_a_fresh_store_returns_an_empty_vec() {
    let store = Store::new();
    let out = store.collection::<Comment>().unwrap().filter(|_| true);
    assert_eq!(out.len(), 0);
}
