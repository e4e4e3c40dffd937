//! Change notification: one notification per accepted write, unsubscribe on drop, kind
//! scopes, duplicate listeners, panicking subscribers, re-entrant writes, the async change
//! stream, change sinks and origins (BEHAVIORS.md §1.1 "Subscriptions", §2.1, §8.4).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{Comment, Review, comment, comment_json, counter, get, review, review_json};
use kalphite::{
    Change, ChangeSink, Entity, Error, Listener, Notification, Op, Origin, RecvError, Store,
    now_millis,
};
use serde_json::json;

#[test]
fn each_write_notifies_once_and_the_subscriber_sees_the_new_state() {
    let store = Store::new();
    let lengths = Arc::new(Mutex::new(Vec::new()));
    let (l, s) = (Arc::clone(&lengths), store.clone());
    let sub = store.subscribe(move |_| l.lock().unwrap().push(s.len()));
    assert!(lengths.lock().unwrap().is_empty(), "no call at start");

    let comments = store.collection::<Comment>().unwrap();
    comments.put("c1", comment("a", 1)).unwrap();
    comments.put("c2", comment("b", 2)).unwrap();
    assert_eq!(*lengths.lock().unwrap(), [1, 2]);

    store.load_entities((3..6).map(comment_json)).unwrap();
    assert_eq!(
        *lengths.lock().unwrap(),
        [1, 2, 5],
        "a bulk load of 3 is one call"
    );

    drop(sub);
    comments.put("c9", comment("after", 9)).unwrap();
    assert_eq!(
        lengths.lock().unwrap().len(),
        3,
        "no call after unsubscribing"
    );
}

#[test]
fn upsert_edit_and_delete_each_notify_once_and_unsubscribe_stops_them() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    let (count, sub) = counter(&store);
    comments.put("c1", comment("a", 1)).unwrap();
    let mut edited = (*comments.find_by_id("c1").unwrap()).clone();
    edited.data.message = "edited".into();
    comments.upsert(edited).unwrap();
    assert!(comments.delete("c1"));
    assert_eq!(get(&count), 3);
    drop(sub);
    comments.put("c2", comment("b", 2)).unwrap();
    assert_eq!(get(&count), 3);
}

#[test]
fn two_subscribers_are_both_notified_until_one_unsubscribes() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    let (a, sub_a) = counter(&store);
    let (b, _sub_b) = counter(&store);
    comments.put("c1", comment("a", 1)).unwrap();
    assert_eq!((get(&a), get(&b)), (1, 1));
    drop(sub_a);
    comments.put("c2", comment("b", 2)).unwrap();
    assert_eq!((get(&a), get(&b)), (1, 2));
}

#[test]
fn bulk_writes_clear_and_transactions_notify_exactly_once() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    let (count, _sub) = counter(&store);
    store.load_entities((0..3).map(comment_json)).unwrap();
    assert_eq!(get(&count), 1);
    comments
        .bulk_upsert((10..20).map(|i| Entity::of(format!("c{i}"), comment("m", i))))
        .unwrap();
    assert_eq!(get(&count), 2);
    store
        .dynamic("review")
        .bulk_upsert((0..4).map(review_json))
        .unwrap();
    assert_eq!(get(&count), 3);
    store
        .transaction::<_, Error>(|tx| {
            tx.put("x1", comment("x", 1))?;
            tx.put("x2", comment("x", 2))?;
            tx.delete::<Comment>("c0");
            Ok(())
        })
        .unwrap();
    assert_eq!(get(&count), 4);
    store.clear();
    assert_eq!(get(&count), 5);
}

#[test]
fn refused_writes_rollbacks_and_no_op_deletes_do_not_notify() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    let (count, _sub) = counter(&store);
    assert!(comments.put("", comment("x", 0)).is_err());
    assert!(!comments.delete("missing"));
    let _ = store.transaction::<(), Error>(|tx| {
        tx.put("c1", comment("x", 1))?;
        Err(Error::InvalidConfig("abort".into()))
    });
    store.clear();
    assert_eq!(get(&count), 0);
}

#[test]
fn a_panicking_subscriber_is_caught_counted_and_the_others_still_run() {
    let store = Store::new();
    let _bad = store.subscribe(|_| panic!("subscriber failure (expected by this test)"));
    let (good, _sub) = counter(&store);
    let comments = store.collection::<Comment>().unwrap();
    comments.put("c1", comment("a", 1)).unwrap();
    assert_eq!(get(&good), 1);
    assert_eq!(store.subscriber_panics(), 1);
    comments.put("c2", comment("b", 2)).unwrap();
    assert_eq!(get(&good), 2);
    assert_eq!(store.subscriber_panics(), 2);
    assert_eq!(comments.len(), 2, "the store keeps working");
}

#[test]
fn a_subscriber_failing_every_third_call_misses_no_notification() {
    let store = Store::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let _sub = store.subscribe(move |_| {
        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
        assert!(
            !n.is_multiple_of(3),
            "failing on call {n} (expected by this test)"
        );
    });
    let comments = store.collection::<Comment>().unwrap();
    let reviews = store.collection::<Review>().unwrap();
    for i in 0..10 {
        comments.put(format!("c{i}"), comment("m", i)).unwrap();
    }
    reviews
        .bulk_upsert((0..10).map(|i| Entity::of(format!("r{i}"), review("R", "pending"))))
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 11);
    assert_eq!(store.subscriber_panics(), 3);
    assert_eq!(store.len(), 20);
    assert!((0..10).all(|i| comments.find_by_id(&format!("c{i}")).is_some()));
}

#[test]
fn the_same_listener_subscribed_twice_is_called_once() {
    let store = Store::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let listener: Listener = Arc::new(move |_: &Notification| {
        c.fetch_add(1, Ordering::SeqCst);
    });
    let first = store.subscribe_listener(None, Arc::clone(&listener));
    let second = store.subscribe_listener(None, Arc::clone(&listener));
    let _bad = store.subscribe(|_| panic!("throwing subscriber (expected by this test)"));
    let comments = store.collection::<Comment>().unwrap();
    comments.put("c1", comment("a", 1)).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(store.subscriber_panics(), 1);

    drop(first);
    comments.put("c2", comment("b", 2)).unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "still subscribed by the second guard"
    );
    drop(second);
    comments.put("c3", comment("c", 3)).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[test]
fn a_kind_scoped_subscription_sees_only_its_kind() {
    let store = Store::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let _sub = store.subscribe_kind("review", move |n| {
        s.lock().unwrap().push(
            n.changes
                .iter()
                .map(|c| c.id.to_string())
                .collect::<Vec<_>>(),
        );
    });
    let comments = store.collection::<Comment>().unwrap();
    comments.put("c1", comment("a", 1)).unwrap();
    assert!(seen.lock().unwrap().is_empty());
    store
        .load_entities([
            comment_json(2),
            review_json(1),
            comment_json(3),
            review_json(2),
        ])
        .unwrap();
    store
        .dynamic("review")
        .put("r3", json!({"title": "t", "status": "s"}))
        .unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        [vec!["r1".to_string(), "r2".into()], vec!["r3".into()]]
    );
}

#[test]
fn a_collection_subscription_is_scoped_to_its_kind() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&count);
    let _sub = comments.subscribe(move |n| {
        assert!(n.changes.iter().all(|c| c.kind == "comment"));
        c.fetch_add(1, Ordering::SeqCst);
    });
    store.dynamic("review").put("r1", json!({})).unwrap();
    comments.put("c1", comment("a", 1)).unwrap();
    store.dynamic("comment").delete("c1");
    assert_eq!(count.load(Ordering::SeqCst), 2);
    assert_eq!(store.subscriber_panics(), 0);
}

#[test]
fn a_write_from_a_subscriber_is_delivered_after_the_current_round_in_order() {
    let store = Store::new();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (la, sa) = (Arc::clone(&log), store.clone());
    let _a = store.subscribe(move |_| {
        la.lock().unwrap().push(format!("A{}", sa.len()));
        if sa.len() == 1 {
            sa.dynamic("comment").upsert(comment_json(2)).unwrap();
        }
    });
    let (lb, sb) = (Arc::clone(&log), store.clone());
    let _b = store.subscribe(move |_| lb.lock().unwrap().push(format!("B{}", sb.len())));
    store.dynamic("comment").upsert(comment_json(1)).unwrap();
    assert_eq!(*log.lock().unwrap(), ["A1", "B2", "A2", "B2"]);
}

#[test]
fn a_hundred_subscribers_each_get_exactly_fifty_calls() {
    let store = Store::new();
    let subs: Vec<_> = (0..100).map(|_| counter(&store)).collect();
    let comments = store.collection::<Comment>().unwrap();
    for i in 0..50 {
        comments.put(format!("c{i}"), comment("m", i)).unwrap();
    }
    assert!(subs.iter().all(|(c, _)| get(c) == 50));
}

#[test]
fn subscriber_churn_counts_exactly_the_writes_each_was_subscribed_for() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    // (counter, guard, writes made while subscribed)
    let mut live: Vec<(Arc<AtomicUsize>, _, usize)> = Vec::new();
    let mut finished = Vec::new();
    for i in 0..200u64 {
        let (c, g) = counter(&store);
        live.push((c, g, 0));
        comments.put(format!("c{i}"), comment("m", i)).unwrap();
        for entry in &mut live {
            entry.2 += 1;
        }
        if i % 10 == 9 {
            for (c, g, expected) in live.drain(..5) {
                drop(g);
                finished.push((c, expected));
            }
        }
    }
    finished.extend(live.into_iter().map(|(c, _g, e)| (c, e)));
    assert_eq!(finished.len(), 200);
    for (c, expected) in finished {
        assert_eq!(get(&c), expected);
    }
}

#[test]
fn code_review_subscriber_recomputes_counts_from_the_store() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    let reviews = store.collection::<Review>().unwrap();
    let summary = Arc::new(Mutex::new((0, 0, false)));
    let (out, c, r) = (Arc::clone(&summary), comments.clone(), reviews.clone());
    let _sub = store.subscribe(move |_| {
        let approved = r.iter().all(|e| e.data.approved);
        *out.lock().unwrap() = (c.len(), r.len(), approved);
    });
    comments.put("c1", comment("a", 1)).unwrap();
    comments.put("c2", comment("b", 2)).unwrap();
    reviews.put("r1", review("A", "approved")).unwrap();
    reviews.put("r2", review("B", "pending")).unwrap();
    assert_eq!(*summary.lock().unwrap(), (2, 2, false));
    comments.delete("c1");
    comments.delete("c2");
    let mut r2 = (*reviews.find_by_id("r2").unwrap()).clone();
    r2.data.approved = true;
    reviews.upsert(r2).unwrap();
    assert_eq!(*summary.lock().unwrap(), (0, 2, true));
}

#[test]
fn team_collaboration_six_writes_then_an_edit_make_seven_notifications() {
    let store = Store::new();
    let comments = store.collection::<Comment>().unwrap();
    let reviews = store.collection::<Review>().unwrap();
    let (count, _sub) = counter(&store);
    for i in 0..3 {
        comments.put(format!("c{i}"), comment("m", i)).unwrap();
        reviews
            .put(format!("r{i}"), review("R", "pending"))
            .unwrap();
    }
    assert_eq!(get(&count), 6);
    let mut c = (*comments.get(1).unwrap()).clone();
    c.data.message.push_str(" (edited)");
    comments.upsert(c).unwrap();
    assert_eq!(get(&count), 7);
    assert_eq!(comments.get(1).unwrap().data.message, "m (edited)");
}

#[test]
fn notifications_carry_every_change_with_op_kind_id_entity_timestamp_and_origin() {
    let store = Store::new();
    let seen: Arc<Mutex<Vec<Notification>>> = Arc::default();
    let s = Arc::clone(&seen);
    let _sub = store.subscribe(move |n| s.lock().unwrap().push(n.clone()));
    let comments = store.collection::<Comment>().unwrap();
    let before = now_millis();
    let stored = comments.put("c1", comment("a", 1)).unwrap();
    comments.delete("c1");
    let after = now_millis();

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    let up = &seen[0].changes[0];
    assert_eq!(
        (up.op, up.kind.as_str(), up.id.as_str()),
        (Op::Upsert, "comment", "c1")
    );
    let entity = up.entity.as_ref().unwrap().downcast::<Comment>().unwrap();
    assert!(
        Arc::ptr_eq(&entity, &stored),
        "the change carries the stored entity"
    );
    assert!((before..=after).contains(&up.timestamp));
    assert_eq!(up.origin, Origin::Local);
    let del = &seen[1].changes[0];
    assert_eq!((del.op, del.id.as_str()), (Op::Delete, "c1"));
    assert!(del.entity.is_none());
    assert_eq!(
        serde_json::to_value(del).unwrap(),
        json!({"operation": "delete", "entityType": "comment", "entityId": "c1",
               "timestamp": del.timestamp, "origin": "local"})
    );
}

#[test]
fn clear_notifies_once_with_a_delete_per_entity() {
    let store = Store::new();
    store
        .load_entities([comment_json(1), review_json(1), comment_json(2)])
        .unwrap();
    let seen: Arc<Mutex<Vec<Notification>>> = Arc::default();
    let s = Arc::clone(&seen);
    let _sub = store.subscribe(move |n| s.lock().unwrap().push(n.clone()));
    store.clear();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    let ids: Vec<_> = seen[0]
        .changes
        .iter()
        .map(|c| (c.op, c.id.to_string()))
        .collect();
    assert_eq!(
        ids,
        [
            (Op::Delete, "c1".into()),
            (Op::Delete, "c2".into()),
            (Op::Delete, "r1".into())
        ]
    );
}

/// Records every batch of changes a sink receives.
#[derive(Default)]
struct RecordingSink(Mutex<Vec<Vec<Change>>>);

impl ChangeSink for RecordingSink {
    fn accept(&self, changes: &[Change]) {
        self.0.lock().unwrap().push(changes.to_vec());
    }
}

impl RecordingSink {
    fn flat(&self) -> Vec<(Op, String, Origin)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .map(|c| (c.op, c.id.to_string(), c.origin))
            .collect()
    }
}

#[test]
fn a_change_sink_receives_every_change_in_commit_order() {
    let sink = Arc::new(RecordingSink::default());
    let store = Store::builder().sink(sink.clone()).build();
    let comments = store.collection::<Comment>().unwrap();
    comments.put("c1", comment("a", 1)).unwrap();
    store
        .load_entities([comment_json(2), review_json(1)])
        .unwrap();
    let _ = store.transaction::<(), Error>(|tx| {
        tx.put("lost", comment("x", 0))?;
        Err(Error::InvalidConfig("rolled back".into()))
    });
    comments.delete("c1");
    store.clear();
    let l = Origin::Local;
    assert_eq!(
        sink.flat(),
        [
            (Op::Upsert, "c1".into(), l),
            (Op::Upsert, "c2".into(), l),
            (Op::Upsert, "r1".into(), l),
            (Op::Delete, "c1".into(), l),
            (Op::Delete, "c2".into(), l),
            (Op::Delete, "r1".into(), l),
        ]
    );
    assert_eq!(
        sink.0.lock().unwrap().len(),
        4,
        "one batch per committed write"
    );
}

#[test]
fn hydrate_marks_changes_storage_and_transaction_from_remote_marks_remote() {
    let sink = Arc::new(RecordingSink::default());
    let store = Store::builder().sink(sink.clone()).build();
    let origins: Arc<Mutex<Vec<Origin>>> = Arc::default();
    let o = Arc::clone(&origins);
    let _sub =
        store.subscribe(move |n| o.lock().unwrap().extend(n.changes.iter().map(|c| c.origin)));
    assert_eq!(
        store.hydrate([comment_json(1), comment_json(2)]).unwrap(),
        2
    );
    store
        .transaction_from(Origin::Remote, |tx| {
            tx.upsert_json(review_json(1)).map(drop)
        })
        .unwrap();
    store.dynamic("comment").delete("c1");
    let expected = [
        Origin::Storage,
        Origin::Storage,
        Origin::Remote,
        Origin::Local,
    ];
    assert_eq!(*origins.lock().unwrap(), expected);
    let from_sink: Vec<Origin> = sink.flat().into_iter().map(|(_, _, o)| o).collect();
    assert_eq!(from_sink, expected);
}

#[tokio::test]
async fn the_change_stream_receives_notifications_with_their_changes() {
    let store = Store::new();
    let mut stream = store.changes();
    assert!(stream.try_recv().unwrap().is_none());
    let comments = store.collection::<Comment>().unwrap();
    comments.put("c1", comment("a", 1)).unwrap();
    store
        .transaction_from(Origin::Remote, |tx| {
            tx.upsert_json(comment_json(2)).map(drop)
        })
        .unwrap();
    comments.delete("c1");

    let n = stream.recv().await.unwrap();
    let c = &n.changes[0];
    assert_eq!(
        (c.op, c.kind.as_str(), c.id.as_str(), c.origin),
        (Op::Upsert, "comment", "c1", Origin::Local)
    );
    assert_eq!(
        c.entity
            .as_ref()
            .unwrap()
            .downcast::<Comment>()
            .unwrap()
            .data
            .message,
        "a"
    );
    assert!(c.timestamp > 0);
    let n = stream.recv().await.unwrap();
    assert_eq!(
        (n.changes[0].id.as_str(), n.changes[0].origin),
        ("c2", Origin::Remote)
    );
    let n = stream.recv().await.unwrap();
    assert_eq!(
        (n.changes[0].op, n.changes[0].entity.is_none()),
        (Op::Delete, true)
    );
    assert!(stream.try_recv().unwrap().is_none());
}

#[tokio::test]
async fn a_slow_stream_reader_is_told_it_lagged_and_writers_never_block() {
    let store = Store::builder().stream_capacity(4).build();
    let mut stream = store.changes();
    let comments = store.collection::<Comment>().unwrap();
    for i in 0..10 {
        comments.put(format!("c{i}"), comment("m", i)).unwrap();
    }
    assert_eq!(
        comments.len(),
        10,
        "every write completed with nobody reading"
    );
    assert_eq!(stream.recv().await.unwrap_err(), RecvError::Lagged(6));
    let next = stream.recv().await.unwrap();
    assert_eq!(
        next.changes[0].id, "c6",
        "continues with the oldest still buffered"
    );
    for id in ["c7", "c8", "c9"] {
        assert_eq!(stream.recv().await.unwrap().changes[0].id, id);
    }
}

#[tokio::test]
async fn the_change_stream_closes_when_the_store_is_dropped() {
    let store = Store::new();
    let mut stream = store.changes();
    store.dynamic("comment").upsert(comment_json(1)).unwrap();
    drop(store);
    assert_eq!(stream.recv().await.unwrap().changes[0].id, "c1");
    assert_eq!(stream.recv().await.unwrap_err(), RecvError::Closed);
}

#[test]
fn a_subscription_guard_may_outlive_its_store() {
    let store = Store::new();
    let (count, sub) = counter(&store);
    drop(store);
    drop(sub);
    assert_eq!(get(&count), 0);
}

#[test]
fn a_subscriber_may_subscribe_and_unsubscribe_from_inside_a_notification() {
    let store = Store::new();
    let inner_calls = Arc::new(AtomicUsize::new(0));
    let held: Arc<Mutex<Vec<kalphite::Subscription>>> = Arc::default();
    let (s, ic, h) = (store.clone(), Arc::clone(&inner_calls), Arc::clone(&held));
    let _outer = store.subscribe(move |_| {
        let mut held = h.lock().unwrap();
        if held.is_empty() {
            let ic = Arc::clone(&ic);
            held.push(s.subscribe(move |_| {
                ic.fetch_add(1, Ordering::SeqCst);
            }));
        } else {
            held.clear(); // unsubscribes the inner one, from inside a delivery round
        }
    });
    let docs = store.dynamic("comment");
    docs.upsert(comment_json(1)).unwrap(); // outer subscribes inner
    docs.upsert(comment_json(2)).unwrap(); // inner counts; outer unsubscribes it
    docs.upsert(comment_json(3)).unwrap(); // outer subscribes it again
    // A round calls the listeners subscribed when it started: inner ran for write 2 only.
    assert_eq!(inner_calls.load(Ordering::SeqCst), 1);
    let before = inner_calls.load(Ordering::SeqCst);
    docs.upsert(comment_json(4)).unwrap();
    assert_eq!(inner_calls.load(Ordering::SeqCst), before + 1);
    assert_eq!(store.subscriber_panics(), 0);
}
