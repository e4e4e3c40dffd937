//! Layer 2: the flush engine, on paused tokio time (no wall-clock sleeps). Covers every
//! Layer 2 behaviour of BEHAVIORS.md §2.2 and §8.6-8.7, minus the original's bugs
//! (dropping changes while paused, the in-flight overwrite race, fixed windows); then
//! batches cut at transaction boundaries (against a shadow target), annotations, retries
//! after a give-up, and a store engine fed through a feeder.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use kalphite::{
    Annotation, AnyEntity, Batch, Change, ChangeSink, Durability, Entity, EntityKind, FanOut,
    FlushConfig, FlushEngine, FlushError, FlushEvent, FlushTarget, FnTarget, Op, Origin, Store,
    TargetError,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::time::{Instant, advance, sleep};

/// What a recording target saw: each batch, with the (paused-clock) time it arrived.
#[derive(Clone, Debug)]
struct Seen {
    at: Duration,
    batch: Vec<Change>,
    /// The batch's annotations, as `(key, i64 value)`.
    notes: Vec<(String, i64)>,
}

/// A flush target that records batches and fails or panics on cue.
struct Recorder {
    start: Instant,
    attempts: Mutex<Vec<Duration>>,
    seen: Mutex<Vec<Seen>>,
    /// Fail the next N attempts.
    fail_next: AtomicU32,
    /// Fail every attempt while true.
    fail_always: Mutex<bool>,
    panic_next: AtomicU32,
    /// Time each write takes.
    write_time: Duration,
}

impl Recorder {
    fn new() -> Arc<Self> {
        Self::slow(Duration::ZERO)
    }

    fn slow(write_time: Duration) -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            attempts: Mutex::new(Vec::new()),
            seen: Mutex::new(Vec::new()),
            fail_next: AtomicU32::new(0),
            fail_always: Mutex::new(false),
            panic_next: AtomicU32::new(0),
            write_time,
        })
    }

    fn batches(&self) -> Vec<Vec<Change>> {
        self.seen.lock().iter().map(|s| s.batch.clone()).collect()
    }

    fn sizes(&self) -> Vec<usize> {
        self.seen.lock().iter().map(|s| s.batch.len()).collect()
    }

    fn notes(&self) -> Vec<Vec<(String, i64)>> {
        self.seen.lock().iter().map(|s| s.notes.clone()).collect()
    }

    fn ids(&self) -> Vec<String> {
        self.seen
            .lock()
            .iter()
            .flat_map(|s| s.batch.iter().map(|c| c.id.to_string()))
            .collect()
    }
}

#[async_trait]
impl FlushTarget for Recorder {
    async fn write(&self, changes: &[Change]) -> Result<(), TargetError> {
        self.write_batch(&Batch {
            changes,
            annotations: &[],
        })
        .await
    }

    async fn write_batch(&self, batch: &Batch<'_>) -> Result<(), TargetError> {
        self.attempts.lock().push(self.start.elapsed());
        if !self.write_time.is_zero() {
            sleep(self.write_time).await;
        }
        if self.panic_next.load(Ordering::SeqCst) > 0 {
            self.panic_next.fetch_sub(1, Ordering::SeqCst);
            panic!("target exploded");
        }
        if *self.fail_always.lock() {
            return Err("disk on fire".into());
        }
        if self.fail_next.load(Ordering::SeqCst) > 0 {
            self.fail_next.fetch_sub(1, Ordering::SeqCst);
            return Err("transient failure".into());
        }
        self.seen.lock().push(Seen {
            at: self.start.elapsed(),
            batch: batch.changes.to_vec(),
            notes: notes_of(batch),
        });
        Ok(())
    }

    fn name(&self) -> &'static str {
        "recorder"
    }
}

fn change(id: &str, n: i64) -> Change {
    let e = Entity::new(id, "comment", json!({ "n": n })).at(1);
    Change::upsert(AnyEntity::new(Arc::new(e)), 1, Origin::Local)
}

fn delete(id: &str) -> Change {
    Change::delete("comment".into(), id.into(), 1, Origin::Local)
}

/// An annotation holding `n`.
fn note(key: &str, n: i64) -> (Arc<str>, Annotation) {
    (key.into(), Arc::new(n))
}

/// A batch's annotations as `(key, n)` (-1 for a value that is not an `i64`).
fn notes_of(batch: &Batch<'_>) -> Vec<(String, i64)> {
    batch
        .annotations
        .iter()
        .map(|(k, a)| {
            (
                k.to_string(),
                a.downcast_ref::<i64>().copied().unwrap_or(-1),
            )
        })
        .collect()
}

fn n_of(c: &Change) -> i64 {
    c.entity.as_ref().unwrap().data_json().unwrap()["n"]
        .as_i64()
        .unwrap()
}

fn engine(target: &Arc<Recorder>, config: FlushConfig) -> FlushEngine {
    FlushEngine::spawn(Arc::clone(target) as Arc<dyn FlushTarget>, config).unwrap()
}

/// Lets the worker run until it waits on time again.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn hundred_upserts_within_50ms_give_one_flush_after_the_debounce() {
    let t = Recorder::new();
    let e = engine(&t, FlushConfig::default());
    for i in 0..100 {
        e.schedule(change(&format!("c{}", i % 20), i));
        advance(Duration::from_micros(500)).await;
    }
    // Last change at ~50 ms: nothing before 150 ms.
    advance(Duration::from_millis(95)).await;
    settle().await;
    assert!(t.sizes().is_empty(), "flushed before the debounce ended");
    sleep(Duration::from_millis(10)).await;
    settle().await;
    assert_eq!(
        t.sizes(),
        vec![20],
        "one flush of the 20 deduplicated entities"
    );
    let batch = &t.batches()[0];
    assert_eq!(n_of(&batch[0]), 80, "latest content of c0 wins");
}

#[tokio::test(start_paused = true)]
async fn each_change_restarts_the_debounce_timer() {
    let t = Recorder::new();
    let e = engine(&t, FlushConfig::default());
    for i in 0..3 {
        e.schedule(change("c1", i));
        advance(Duration::from_millis(60)).await;
        settle().await;
        assert!(
            t.sizes().is_empty(),
            "flushed while changes kept coming (at {i})"
        );
    }
    sleep(Duration::from_millis(50)).await;
    settle().await;
    assert_eq!(t.sizes(), vec![1]);
    let at = t.seen.lock()[0].at;
    assert!(
        at >= Duration::from_millis(220),
        "flushed at {at:?}, before last change + 100 ms"
    );
}

#[tokio::test(start_paused = true)]
async fn a_custom_window_of_250ms_flushes_at_250ms() {
    let t = Recorder::new();
    let e = engine(
        &t,
        FlushConfig::default()
            .debounce(Duration::from_millis(250))
            .max_wait(Duration::from_secs(5)),
    );
    e.schedule(change("c1", 1));
    for _ in 0..2 {
        advance(Duration::from_millis(100)).await;
        settle().await;
        assert!(t.sizes().is_empty());
    }
    sleep(Duration::from_millis(60)).await;
    settle().await;
    assert_eq!(t.sizes(), vec![1]);
}

#[tokio::test(start_paused = true)]
async fn a_steady_stream_of_writes_is_flushed_by_max_wait() {
    let t = Recorder::new();
    let e = engine(&t, FlushConfig::default());
    for i in 0..30 {
        e.schedule(change("c1", i));
        advance(Duration::from_millis(50)).await;
        settle().await;
    }
    assert!(
        !t.sizes().is_empty(),
        "the debounce postponed flushing for 1.5 s"
    );
}

#[tokio::test(start_paused = true)]
async fn two_hundred_fifty_changes_give_batches_of_100_100_50_in_order() {
    let t = Recorder::new();
    let e = engine(&t, FlushConfig::default());
    let expected: Vec<String> = (0..250).map(|i| format!("c{i}")).collect();
    for id in &expected {
        e.schedule(change(id, 0));
    }
    e.flush_now().await.unwrap();
    assert_eq!(t.sizes(), vec![100, 100, 50]);
    assert_eq!(t.ids(), expected);
}

/// The worker is not woken for a write to a queue it already waits on (that costs a
/// thread switch per write); the write that fills a batch must still wake it.
#[tokio::test(start_paused = true)]
async fn the_write_that_fills_a_batch_flushes_it_at_once() {
    let t = Recorder::new();
    let e = engine(&t, FlushConfig::default().max_batch_size(10));
    for i in 0..9 {
        e.schedule(change(&format!("c{i}"), i));
        settle().await;
    }
    assert!(t.sizes().is_empty(), "flushed before the batch was full");
    e.schedule(change("c9", 9));
    settle().await;
    assert_eq!(
        t.sizes(),
        vec![10],
        "the full batch waited for the debounce"
    );
    assert_eq!(t.seen.lock()[0].at, Duration::ZERO);
    // A write after the flush, to a queue now empty, still flushes after the debounce.
    e.schedule(change("c10", 10));
    settle().await;
    sleep(Duration::from_millis(101)).await;
    settle().await;
    assert_eq!(t.sizes(), vec![10, 1]);
}

#[tokio::test(start_paused = true)]
async fn twenty_five_changes_with_batch_ten_give_10_10_5() {
    let t = Recorder::new();
    let e = engine(&t, FlushConfig::default().max_batch_size(10));
    for i in 0..25 {
        e.schedule(change(&format!("c{i}"), i));
    }
    sleep(Duration::from_millis(500)).await;
    assert_eq!(t.sizes(), vec![10, 10, 5]);
}

#[tokio::test(start_paused = true)]
async fn five_hundred_changes_flush_all_five_hundred() {
    let t = Recorder::new();
    let e = engine(
        &t,
        FlushConfig::default().debounce(Duration::from_millis(10)),
    );
    for i in 0..500 {
        e.schedule(change(&format!("c{i}"), i));
    }
    sleep(Duration::from_millis(200)).await;
    assert!(t.sizes().len() >= 5);
    assert_eq!(t.sizes().iter().sum::<usize>(), 500);
}

#[tokio::test(start_paused = true)]
async fn dedup_keeps_latest_content_at_the_first_scheduled_position() {
    let t = Recorder::new();
    let e = engine(&t, FlushConfig::default());
    e.schedule(change("e1", 1));
    e.schedule(change("e2", 2));
    e.schedule(change("e1", 3));
    sleep(Duration::from_millis(150)).await;
    let b = &t.batches()[0];
    assert_eq!(
        b.iter().map(|c| c.id.to_string()).collect::<Vec<_>>(),
        vec!["e1", "e2"]
    );
    assert_eq!(n_of(&b[0]), 3);
    assert_eq!(b[0].op, Op::Upsert);
}

#[tokio::test(start_paused = true)]
async fn a_delete_supersedes_an_upsert_and_an_upsert_after_a_delete_is_an_upsert() {
    let t = Recorder::new();
    let e = engine(&t, FlushConfig::default());
    e.schedule(change("a", 1));
    e.schedule(delete("a"));
    e.schedule(delete("b"));
    e.schedule(change("b", 7));
    e.flush_now().await.unwrap();
    let b = &t.batches()[0];
    assert_eq!(b.len(), 2);
    assert_eq!(b[0].op, Op::Delete);
    assert!(b[0].entity.is_none(), "a delete carries no entity");
    assert_eq!(b[1].op, Op::Upsert);
    assert_eq!(n_of(&b[1]), 7);
}

#[tokio::test(start_paused = true)]
async fn a_flush_with_nothing_pending_does_not_call_the_target() {
    let t = Recorder::new();
    let e = engine(&t, FlushConfig::default());
    e.flush_now().await.unwrap();
    sleep(Duration::from_secs(1)).await;
    assert!(t.attempts.lock().is_empty());
}

#[tokio::test(start_paused = true)]
async fn failed_batches_back_off_100_200_400ms() {
    let t = Recorder::new();
    *t.fail_always.lock() = true;
    let e = engine(&t, FlushConfig::default());
    e.schedule(change("c1", 1));
    let result = e.flush_now().await;
    let attempts = t.attempts.lock().clone();
    assert_eq!(attempts.len(), 4, "one attempt plus three retries");
    let gaps: Vec<u128> = attempts
        .windows(2)
        .map(|w| {
            w[1].checked_sub(w[0])
                .expect("attempts in order")
                .as_millis()
        })
        .collect();
    assert_eq!(gaps, vec![100, 200, 400]);
    match result {
        Err(FlushError::TargetFailed {
            attempts,
            cause,
            queued,
            ..
        }) => {
            assert_eq!(attempts, 4);
            assert!(cause.contains("disk on fire"));
            assert_eq!(queued, 1);
        }
        other => panic!("expected TargetFailed, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn fail_twice_then_succeed_writes_once() {
    let t = Recorder::new();
    t.fail_next.store(2, Ordering::SeqCst);
    let e = engine(&t, FlushConfig::default());
    e.schedule(change("c1", 1));
    e.flush_now().await.unwrap();
    assert_eq!(t.attempts.lock().len(), 3);
    assert_eq!(t.sizes(), vec![1], "written exactly once");
    assert!(e.queued_changes().is_empty());
    let s = e.stats();
    assert_eq!(
        (s.failed_attempts, s.retries, s.written, s.batches),
        (2, 2, 1, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn first_attempt_failure_keeps_the_change_queued_during_backoff() {
    let t = Recorder::new();
    t.fail_next.store(1, Ordering::SeqCst);
    let e = engine(&t, FlushConfig::default());
    e.schedule(change("c1", 1));
    sleep(Duration::from_millis(150)).await;
    assert_eq!(t.attempts.lock().len(), 1);
    let queued = e.queued_changes();
    assert_eq!(queued.len(), 1);
    assert_eq!(n_of(&queued[0]), 1);
    sleep(Duration::from_millis(200)).await;
    assert!(e.queued_changes().is_empty());
}

#[tokio::test(start_paused = true)]
async fn permanent_failure_keeps_every_change_reports_it_and_the_next_flush_retries() {
    let t = Recorder::new();
    *t.fail_always.lock() = true;
    let e = engine(&t, FlushConfig::default().max_retries(1));
    let mut events = e.events();
    for i in 0..5 {
        e.schedule(change(&format!("c{i}"), i));
    }
    assert!(e.flush_now().await.is_err());
    let queued: Vec<String> = e
        .queued_changes()
        .iter()
        .map(|c| c.id.to_string())
        .collect();
    assert_eq!(
        queued,
        vec!["c0", "c1", "c2", "c3", "c4"],
        "nothing dropped, order kept"
    );
    assert_eq!(e.stats().gave_up, 1);
    assert!(e.last_error().unwrap().contains("disk on fire"));
    let mut gave_up = false;
    while let Ok(ev) = events.try_recv() {
        if let FlushEvent::GaveUp { changes, cause } = ev {
            assert_eq!(changes, 5);
            assert!(cause.contains("disk on fire"));
            gave_up = true;
        }
    }
    assert!(gave_up, "no GaveUp event");

    // A newer change to a queued entity replaces it; the next flush writes everything.
    *t.fail_always.lock() = false;
    e.schedule(change("c2", 99));
    e.flush_now().await.unwrap();
    assert_eq!(t.ids(), vec!["c0", "c1", "c2", "c3", "c4"]);
    assert_eq!(n_of(&t.batches()[0][2]), 99);
    assert!(e.queued_changes().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_panicking_target_counts_as_a_failure_not_a_crash() {
    let t = Recorder::new();
    t.panic_next.store(1, Ordering::SeqCst);
    let e = engine(&t, FlushConfig::default());
    e.schedule(change("c1", 1));
    e.flush_now().await.unwrap();
    assert_eq!(t.attempts.lock().len(), 2);
    assert_eq!(t.sizes(), vec![1]);
    assert_eq!(e.stats().failed_attempts, 1);
}

#[tokio::test(start_paused = true)]
async fn pause_holds_everything_and_resume_releases_it() {
    let t = Recorder::new();
    let e = engine(
        &t,
        FlushConfig::default().debounce(Duration::from_millis(200)),
    );
    e.pause();
    for i in 0..3 {
        e.schedule(change(&format!("c{i}"), i));
    }
    sleep(Duration::from_secs(5)).await;
    assert!(t.sizes().is_empty(), "flushed while paused");
    assert_eq!(
        e.queued_changes().len(),
        3,
        "changes scheduled while paused are kept"
    );
    e.resume();
    sleep(Duration::from_millis(250)).await;
    assert_eq!(t.sizes(), vec![3]);
}

#[tokio::test(start_paused = true)]
async fn flush_now_writes_even_when_paused() {
    let t = Recorder::new();
    let e = engine(&t, FlushConfig::default());
    e.pause();
    e.schedule(change("c1", 1));
    e.flush_now().await.unwrap();
    assert_eq!(t.sizes(), vec![1]);
    e.schedule(change("c2", 2));
    sleep(Duration::from_secs(1)).await;
    let queued = e.queued_changes();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].id, "c2");
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_what_is_queued() {
    let t = Recorder::new();
    let e = engine(
        &t,
        FlushConfig::default()
            .debounce(Duration::from_secs(10))
            .max_wait(Duration::from_mins(1)),
    );
    e.pause();
    for i in 0..150 {
        e.schedule(change(&format!("c{i}"), i));
    }
    e.shutdown().await.unwrap();
    assert_eq!(t.sizes().iter().sum::<usize>(), 150);
    assert!(matches!(e.flush_now().await, Ok(())));
}

#[tokio::test(start_paused = true)]
async fn shutdown_returns_what_could_not_be_written() {
    let t = Recorder::new();
    *t.fail_always.lock() = true;
    let e = engine(&t, FlushConfig::default().max_retries(1));
    e.schedule(change("c1", 1));
    e.schedule(delete("c2"));
    let err = e.shutdown().await.unwrap_err();
    assert_eq!(err.unwritten.len(), 2);
    assert_eq!(err.unwritten[1].op, Op::Delete);
    assert!(err.cause.contains("disk on fire"));
}

#[tokio::test(start_paused = true)]
async fn changes_made_during_a_slow_flush_go_in_the_next_batch() {
    let t = Recorder::slow(Duration::from_millis(50));
    let e = engine(&t, FlushConfig::default());
    e.schedule(change("a", 1));
    sleep(Duration::from_millis(120)).await; // flight started at 100 ms, ends at 150
    assert_eq!(t.attempts.lock().len(), 1);
    e.schedule(change("a", 2)); // the entity in flight
    e.schedule(change("b", 1));
    e.flush_now().await.unwrap();
    let batches = t.batches();
    assert_eq!(batches.len(), 2);
    assert_eq!(n_of(&batches[0][0]), 1);
    let second: Vec<_> = batches[1]
        .iter()
        .map(|c| (c.id.to_string(), n_of(c)))
        .collect();
    assert_eq!(
        second,
        vec![("a".into(), 2), ("b".into(), 1)],
        "the newer change was not lost"
    );
}

#[tokio::test(start_paused = true)]
async fn one_flush_at_a_time_per_target() {
    struct Overlap {
        active: AtomicU32,
        max: AtomicU32,
    }
    #[async_trait]
    impl FlushTarget for Overlap {
        async fn write(&self, _: &[Change]) -> Result<(), TargetError> {
            let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
            self.max.fetch_max(now, Ordering::SeqCst);
            sleep(Duration::from_millis(30)).await;
            self.active.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
    }
    let t = Arc::new(Overlap {
        active: AtomicU32::new(0),
        max: AtomicU32::new(0),
    });
    let e = FlushEngine::spawn(t.clone(), FlushConfig::default().max_batch_size(5)).unwrap();
    for i in 0..50 {
        e.schedule(change(&format!("c{i}"), i));
        advance(Duration::from_millis(3)).await;
    }
    e.flush_now().await.unwrap();
    assert_eq!(t.max.load(Ordering::SeqCst), 1);
}

/// For one entity, a target always sees its changes in the order they happened — even
/// with failures, retries and give-ups in between.
#[tokio::test(start_paused = true)]
async fn per_entity_order_survives_failures_and_retries() {
    let t = Recorder::slow(Duration::from_millis(7));
    let e = engine(
        &t,
        FlushConfig::default()
            .max_retries(1)
            .max_batch_size(4)
            .debounce(Duration::from_millis(20)),
    );
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut rng = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut last = [0i64; 6];
    for step in 1..=400i64 {
        let id = usize::try_from(rng() % 6).unwrap();
        e.schedule(change(&format!("e{id}"), step));
        last[id] = step;
        if rng() % 5 == 0 {
            t.fail_next
                .store(u32::try_from(rng() % 3).unwrap(), Ordering::SeqCst);
        }
        advance(Duration::from_millis(rng() % 15)).await;
    }
    while e.flush_now().await.is_err() {}
    let mut written = [0i64; 6];
    for b in t.batches() {
        for c in &b {
            let id: usize = c.id[1..].parse().unwrap();
            let n = n_of(c);
            assert!(n > written[id], "e{id}: saw {n} after {}", written[id]);
            written[id] = n;
        }
    }
    assert_eq!(
        written, last,
        "the final version of every entity was written"
    );
}

#[tokio::test(start_paused = true)]
async fn invalid_config_is_refused() {
    let t = Recorder::new();
    let err = FlushEngine::spawn(t, FlushConfig::default().max_batch_size(0)).unwrap_err();
    assert!(matches!(err, kalphite::Error::InvalidConfig(_)));
}

#[test]
fn spawning_outside_a_runtime_is_an_error_not_a_panic() {
    let t = Arc::new(FnTarget::new("noop", |_: Vec<Change>| async { Ok(()) }));
    let err = FlushEngine::spawn(t, FlushConfig::default()).unwrap_err();
    assert!(err.to_string().contains("tokio runtime"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn persistence_disabled_queues_nothing() {
    let t = Recorder::new();
    let e = engine(&t, FlushConfig::default().enable_persistence(false));
    e.schedule(change("c1", 1));
    sleep(Duration::from_secs(1)).await;
    assert!(e.queued_changes().is_empty());
    assert!(t.attempts.lock().is_empty());
}

#[tokio::test(start_paused = true)]
async fn fan_out_and_closure_targets_both_receive_each_batch() {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = Arc::clone(&got);
    let f = Arc::new(FnTarget::new("closure", move |batch: Vec<Change>| {
        let g = Arc::clone(&g);
        async move {
            g.lock().extend(batch.into_iter().map(|c| c.id.to_string()));
            Ok(())
        }
    }));
    let r = Recorder::new();
    let fan = Arc::new(FanOut::new(vec![f, r.clone()]));
    let e = FlushEngine::spawn(fan, FlushConfig::default()).unwrap();
    e.schedule(change("x", 1));
    e.flush_now().await.unwrap();
    assert_eq!(*got.lock(), vec!["x"]);
    assert_eq!(r.ids(), vec!["x"]);
}

#[tokio::test(start_paused = true)]
async fn a_fan_out_fails_when_one_target_fails_and_names_it() {
    let r = Recorder::new();
    *r.fail_always.lock() = true;
    let fan = Arc::new(FanOut::new(vec![r.clone()]));
    let e = FlushEngine::spawn(fan, FlushConfig::default().max_retries(0)).unwrap();
    e.schedule(change("x", 1));
    let err = e.flush_now().await.unwrap_err();
    assert!(err.to_string().contains("recorder: disk on fire"), "{err}");
}

// ---- Store integration ----

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Comment {
    message: String,
}
impl EntityKind for Comment {
    const KIND: &'static str = "comment";
}

fn store_with(t: &Arc<Recorder>, config: FlushConfig) -> Store {
    Store::builder().flush_engine(engine(t, config)).build()
}

#[tokio::test(start_paused = true)]
async fn store_mutations_reach_the_target_after_the_debounce() {
    let t = Recorder::new();
    let store = store_with(&t, FlushConfig::default());
    let comments = store.collection::<Comment>().unwrap();
    comments
        .put(
            "c1",
            Comment {
                message: "hello".into(),
            },
        )
        .unwrap();
    sleep(Duration::from_millis(99)).await;
    assert!(t.sizes().is_empty());
    sleep(Duration::from_millis(2)).await;
    let b = &t.batches()[0];
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].op, Op::Upsert);
    assert_eq!(b[0].origin, Origin::Local);
    let typed = b[0].entity.as_ref().unwrap().downcast::<Comment>().unwrap();
    assert_eq!(typed.data.message, "hello");
}

#[tokio::test(start_paused = true)]
async fn store_replace_after_insert_flushes_one_upsert_with_the_latest_data() {
    let t = Recorder::new();
    let store = store_with(
        &t,
        FlushConfig::default().debounce(Duration::from_millis(50)),
    );
    let comments = store.collection::<Comment>().unwrap();
    comments
        .put(
            "c1",
            Comment {
                message: "v1".into(),
            },
        )
        .unwrap();
    comments
        .put(
            "c1",
            Comment {
                message: "v2".into(),
            },
        )
        .unwrap();
    sleep(Duration::from_millis(60)).await;
    let b = &t.batches()[0];
    assert_eq!(b.len(), 1);
    assert_eq!(
        b[0].entity.as_ref().unwrap().data_json().unwrap(),
        json!({"message": "v2"})
    );
}

#[tokio::test(start_paused = true)]
async fn store_delete_bulk_load_transaction_and_clear_all_schedule_changes() {
    let t = Recorder::new();
    let store = store_with(&t, FlushConfig::default());
    let comments = store.collection::<Comment>().unwrap();
    comments
        .put(
            "c1",
            Comment {
                message: "x".into(),
            },
        )
        .unwrap();
    store.flush_now().await.unwrap();
    assert!(comments.delete("c1"));
    store.flush_now().await.unwrap();
    assert_eq!(t.batches()[1][0].op, Op::Delete);

    store
        .load_entities((0..3).map(|i| Entity::new(format!("d{i}"), "doc", json!({}))))
        .unwrap();
    store
        .transaction(|tx| {
            tx.put(
                "c2",
                Comment {
                    message: "y".into(),
                },
            )?;
            Ok::<_, kalphite::Error>(())
        })
        .unwrap();
    store.flush_now().await.unwrap();
    assert_eq!(t.batches()[2].len(), 4);
    store.clear();
    store.flush_now().await.unwrap();
    let last = t.batches().last().unwrap().clone();
    assert_eq!(last.len(), 4);
    assert!(last.iter().all(|c| c.op == Op::Delete));
}

#[tokio::test(start_paused = true)]
async fn hydrated_entities_are_not_written_back_and_remote_changes_are_marked() {
    let t = Recorder::new();
    let store = store_with(&t, FlushConfig::default());
    store
        .hydrate(vec![Entity::new("h1", "doc", json!({}))])
        .unwrap();
    sleep(Duration::from_secs(1)).await;
    assert!(
        t.sizes().is_empty(),
        "hydration was flushed back to storage"
    );
    store
        .transaction_from(Origin::Remote, |tx| {
            tx.upsert_json(Entity::new("r1", "doc", json!({"from": "server"})))
                .map(drop)
        })
        .unwrap();
    store.flush_now().await.unwrap();
    assert_eq!(t.batches()[0][0].origin, Origin::Remote);
}

#[tokio::test(start_paused = true)]
async fn store_pause_and_resume_flush() {
    let t = Recorder::new();
    let store = store_with(&t, FlushConfig::default());
    store.pause_flush();
    store.dynamic("doc").put("a", json!({})).unwrap();
    sleep(Duration::from_secs(2)).await;
    assert!(t.sizes().is_empty());
    assert_eq!(store.queued_changes().len(), 1);
    store.resume_flush();
    sleep(Duration::from_millis(150)).await;
    assert_eq!(t.sizes(), vec![1]);
    assert!(store.queued_changes().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_store_without_an_engine_still_answers_flush_calls() {
    let store = Store::new();
    store.flush_now().await.unwrap();
    store.pause_flush();
    store.resume_flush();
    assert!(store.queued_changes().is_empty());
    assert!(store.durable(Durability::Memory).await.is_ok());
    assert!(matches!(
        store.durable(Durability::Local).await,
        Err(FlushError::NoTarget {
            level: Durability::Local
        })
    ));
}

#[tokio::test(start_paused = true)]
async fn durable_local_resolves_once_the_write_is_done() {
    let t = Recorder::slow(Duration::from_millis(30));
    let store = store_with(&t, FlushConfig::default());
    store.dynamic("doc").put("a", json!({"v": 1})).unwrap();
    let start = Instant::now();
    store.durable(Durability::Local).await.unwrap();
    assert_eq!(t.ids(), vec!["a"], "resolved before the target wrote it");
    assert!(start.elapsed() >= Duration::from_millis(130));
}

#[tokio::test(start_paused = true)]
async fn durable_local_fails_with_the_cause_and_keeps_the_change() {
    let t = Recorder::new();
    *t.fail_always.lock() = true;
    let store = store_with(&t, FlushConfig::default().max_retries(1));
    store.dynamic("doc").put("a", json!({})).unwrap();
    let err = store.durable(Durability::Local).await.unwrap_err();
    assert!(err.to_string().contains("disk on fire"), "{err}");
    assert_eq!(store.queued_changes().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn closing_the_store_drains() {
    let t = Recorder::new();
    let store = store_with(
        &t,
        FlushConfig::default()
            .debounce(Duration::from_secs(30))
            .max_wait(Duration::from_mins(1)),
    );
    for i in 0..10 {
        store
            .dynamic("doc")
            .put(format!("d{i}"), json!({}))
            .unwrap();
    }
    store.close().await.unwrap();
    assert_eq!(t.sizes().iter().sum::<usize>(), 10);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_store_drains_in_the_background() {
    let t = Recorder::new();
    let store = store_with(
        &t,
        FlushConfig::default()
            .debounce(Duration::from_secs(30))
            .max_wait(Duration::from_mins(1)),
    );
    store
        .dynamic("doc")
        .put("a", Value::Object(serde_json::Map::new()))
        .unwrap();
    drop(store);
    sleep(Duration::from_millis(1)).await;
    assert_eq!(t.ids(), vec!["a"]);
}

#[tokio::test(start_paused = true)]
async fn counters_track_scheduled_written_and_queue_length() {
    let t = Recorder::new();
    let e = engine(&t, FlushConfig::default());
    for i in 0..10 {
        e.schedule(change(&format!("c{}", i % 4), i));
    }
    let s = e.stats();
    assert_eq!((s.scheduled, s.written, s.queued), (10, 0, 4));
    e.flush_now().await.unwrap();
    let s = e.stats();
    assert_eq!((s.scheduled, s.written, s.queued, s.batches), (10, 4, 0, 1));
}

// ---- Batches end at store-transaction boundaries ----

/// Regression: dedup kept an entity's first position with its newest content and each batch
/// was its own transaction, so with `max_batch_size` 2 the first batch was {a=2, b=1} while
/// c=1, accepted before a=2, waited for the next batch — a crash between the two batches
/// left a state the store never had.
#[tokio::test(start_paused = true)]
async fn a_batch_never_holds_a_newer_change_without_the_older_ones() {
    let t = Recorder::new();
    let e = engine(&t, FlushConfig::default().max_batch_size(2));
    e.schedule(change("a", 1));
    e.schedule(change("b", 1));
    e.schedule(change("c", 1));
    e.schedule(change("a", 2));
    e.flush_now().await.unwrap();
    let first: Vec<_> = t.batches()[0]
        .iter()
        .map(|c| (c.id.to_string(), n_of(c)))
        .collect();
    assert_eq!(
        first,
        vec![("a".into(), 2), ("b".into(), 1), ("c".into(), 1)],
        "the first batch must hold the state after the fourth transaction"
    );
}

/// Regression: a store transaction larger than `max_batch_size` was split across batches,
/// so a crash between them left half a transaction in the database.
#[tokio::test(start_paused = true)]
async fn a_transaction_larger_than_max_batch_size_is_written_in_one_batch() {
    let t = Recorder::new();
    let e = engine(&t, FlushConfig::default().max_batch_size(2));
    let tx1: Vec<_> = (0..5).map(|i| change(&format!("a{i}"), i)).collect();
    let tx2: Vec<_> = (0..3).map(|i| change(&format!("b{i}"), i)).collect();
    e.schedule_all(&tx1);
    e.schedule_all(&tx2);
    e.flush_now().await.unwrap();
    assert_eq!(
        t.sizes(),
        vec![5, 3],
        "one batch per transaction, none split"
    );
}

/// What a shadow target holds: entity id `k{i}` → `n`, and annotation key `@n{i}` → value.
type ShadowState = std::collections::BTreeMap<String, i64>;

/// One generated store transaction: `(key, Some(n))` upserts entity `k{key}` with `n`,
/// `(key, None)` deletes it, `(key, v)` in `notes` sets annotation `@n{key}` to `v` (a
/// transaction may hold only annotations); then the clock moves `wait_ms` and the target
/// fails its next `fail_next` attempts.
#[derive(Clone, Debug)]
struct GenTx {
    writes: Vec<(u8, Option<i64>)>,
    notes: Vec<(u8, i64)>,
    wait_ms: u64,
    fail_next: u32,
}

/// A target that applies each batch to a shadow map and checks, after every batch, that
/// the shadow is the store's state after some prefix of the transactions.
struct ShadowTarget {
    prefixes: Vec<ShadowState>,
    shadow: Mutex<ShadowState>,
    violations: Mutex<Vec<String>>,
    fail_next: AtomicU32,
    write_time: Duration,
}

#[async_trait]
impl FlushTarget for ShadowTarget {
    async fn write(&self, _: &[Change]) -> Result<(), TargetError> {
        Err("the engine must call write_batch".into())
    }

    async fn write_batch(&self, batch: &Batch<'_>) -> Result<(), TargetError> {
        if !self.write_time.is_zero() {
            sleep(self.write_time).await;
        }
        if self.fail_next.load(Ordering::SeqCst) > 0 {
            self.fail_next.fetch_sub(1, Ordering::SeqCst);
            return Err("injected failure".into());
        }
        let mut shadow = self.shadow.lock();
        for c in batch.changes {
            match c.op {
                Op::Upsert => shadow.insert(c.id.to_string(), n_of(c)),
                Op::Delete => shadow.remove(c.id.as_str()),
            };
        }
        for (key, n) in notes_of(batch) {
            shadow.insert(format!("@{key}"), n);
        }
        if !self.prefixes.contains(&shadow) {
            self.violations.lock().push(format!(
                "after batch {batch:?}: {shadow:?} is no prefix state"
            ));
        }
        Ok(())
    }
}

/// Runs `txs` through an engine in front of a [`ShadowTarget`]; returns the violations.
fn run_transactions(txs: &[GenTx], max_batch_size: usize, write_ms: u64) -> Vec<String> {
    let mut prefixes = vec![ShadowState::new()];
    for tx in txs {
        let mut next = prefixes[prefixes.len() - 1].clone();
        for &(key, n) in &tx.writes {
            match n {
                Some(n) => next.insert(format!("k{key}"), n),
                None => next.remove(&format!("k{key}")),
            };
        }
        for &(key, n) in &tx.notes {
            next.insert(format!("@n{key}"), n);
        }
        prefixes.push(next);
    }
    let last = prefixes[prefixes.len() - 1].clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let target = Arc::new(ShadowTarget {
            prefixes,
            shadow: Mutex::new(ShadowState::new()),
            violations: Mutex::new(Vec::new()),
            fail_next: AtomicU32::new(0),
            write_time: Duration::from_millis(write_ms),
        });
        let e = FlushEngine::spawn(
            Arc::clone(&target) as Arc<dyn FlushTarget>,
            FlushConfig::default()
                .debounce(Duration::from_millis(10))
                .max_wait(Duration::from_millis(40))
                .max_retries(1)
                .base_retry_delay(Duration::from_millis(5))
                .max_batch_size(max_batch_size),
        )
        .unwrap();
        for tx in txs {
            let changes: Vec<Change> = tx
                .writes
                .iter()
                .map(|&(key, n)| match n {
                    Some(n) => change(&format!("k{key}"), n),
                    None => delete(&format!("k{key}")),
                })
                .collect();
            let notes = tx
                .notes
                .iter()
                .map(|&(key, n)| note(&format!("n{key}"), n))
                .collect();
            e.schedule_annotated(&changes, notes);
            target.fail_next.fetch_add(tx.fail_next, Ordering::SeqCst);
            advance(Duration::from_millis(tx.wait_ms)).await;
            settle().await;
        }
        target.fail_next.store(0, Ordering::SeqCst);
        while e.flush_now().await.is_err() {}
        let mut violations = target.violations.lock().clone();
        if *target.shadow.lock() != last {
            violations.push(format!("final {:?} != {last:?}", target.shadow.lock()));
        }
        violations
    })
}

fn gen_tx() -> impl proptest::strategy::Strategy<Value = GenTx> {
    use proptest::prelude::*;
    (
        prop::collection::vec((0u8..5, prop::option::weighted(0.8, 0i64..1000)), 0..4),
        prop::collection::vec((0u8..2, 0i64..1000), 0..3),
        prop_oneof![4 => Just(0u64), 3 => 1u64..15, 1 => 15u64..60],
        prop_oneof![6 => Just(0u32), 1 => 1u32..4],
    )
        .prop_map(|(writes, notes, wait_ms, fail_next)| GenTx {
            writes,
            notes,
            wait_ms,
            fail_next,
        })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

    /// Whatever the timing, failures and batch size, the target holds the state (entities
    /// and annotations) after some prefix of the transactions after every batch, and the
    /// final state at the end.
    #[test]
    fn every_batch_leaves_the_target_at_a_transaction_boundary(
        txs in proptest::collection::vec(gen_tx(), 1..40),
        max_batch_size in 1usize..4,
        write_ms in proptest::prelude::prop_oneof![proptest::strategy::Just(0u64), 1u64..8],
    ) {
        let violations = run_transactions(&txs, max_batch_size, write_ms);
        proptest::prop_assert!(violations.is_empty(), "{violations:#?}");
    }
}

// ---- Annotations: bookkeeping written with the changes of the same transactions ----

#[tokio::test(start_paused = true)]
async fn annotations_travel_with_their_transactions_changes_latest_per_key() {
    let t = Recorder::new();
    let e = engine(&t, FlushConfig::default());
    e.schedule_annotated(&[change("a", 1)], vec![note("outbox", 1), note("seen", 10)]);
    e.schedule_annotated(&[change("b", 1)], vec![note("outbox", 2)]);
    e.flush_now().await.unwrap();
    assert_eq!(t.ids(), vec!["a", "b"]);
    assert_eq!(
        t.notes(),
        vec![vec![("outbox".into(), 2), ("seen".into(), 10)]],
        "one batch; the latest value per key, in first-scheduled order"
    );
    let s = e.stats();
    assert_eq!((s.scheduled, s.written), (2, 2));
    assert_eq!((s.annotations_scheduled, s.annotations_written), (3, 2));
    assert!(e.queued_changes().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_annotations_only_transaction_is_written_and_waited_for() {
    let t = Recorder::slow(Duration::from_millis(30));
    let e = engine(&t, FlushConfig::default());
    e.schedule_annotated(&[], vec![note("watermark", 7)]);
    assert!(e.queued_changes().is_empty(), "annotations are not changes");
    assert_eq!(e.stats().queued, 0);
    let start = Instant::now();
    e.durable().await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(130),
        "durable resolved before the annotation was written"
    );
    assert_eq!(t.notes(), vec![vec![("watermark".into(), 7)]]);
    assert_eq!(t.sizes(), vec![0]);
    // Nothing at all is not a transaction.
    e.schedule_annotated(&[], Vec::new());
    assert_eq!(e.stats().batches, 1);
    e.flush_now().await.unwrap();
    assert_eq!(t.attempts.lock().len(), 1);
}

/// Annotation keys take part in the transaction-boundary rule like entities: a batch never
/// carries an annotation newer than its entity rows.
#[tokio::test(start_paused = true)]
async fn an_annotation_never_runs_ahead_of_the_changes_before_it() {
    let t = Recorder::new();
    let e = engine(&t, FlushConfig::default().max_batch_size(1));
    e.schedule_annotated(&[], vec![note("watermark", 1)]);
    e.schedule_annotated(&[change("a", 1)], Vec::new());
    e.schedule_annotated(&[], vec![note("watermark", 3)]);
    e.schedule_annotated(&[change("b", 1)], Vec::new());
    e.flush_now().await.unwrap();
    assert_eq!(
        t.batches()[0].len(),
        1,
        "the watermark of the third transaction"
    );
    assert_eq!(
        t.batches()[0][0].id,
        "a",
        "needs a, from the second, beside it"
    );
    assert_eq!(t.notes()[0], vec![("watermark".into(), 3)]);
    assert_eq!(t.ids(), vec!["a", "b"]);
}

#[tokio::test(start_paused = true)]
async fn a_retried_batch_keeps_its_annotations_and_takes_newer_ones() {
    let t = Recorder::slow(Duration::from_millis(10));
    t.fail_next.store(1, Ordering::SeqCst);
    let e = engine(&t, FlushConfig::default());
    e.schedule_annotated(&[change("a", 1)], vec![note("outbox", 1), note("seen", 5)]);
    sleep(Duration::from_millis(105)).await; // the first attempt is under way
    e.schedule_annotated(&[change("b", 1)], vec![note("outbox", 2)]);
    e.flush_now().await.unwrap();
    assert_eq!(t.attempts.lock().len(), 2);
    assert_eq!(t.ids(), vec!["a", "b"]);
    assert_eq!(
        t.notes(),
        vec![vec![("outbox".into(), 2), ("seen".into(), 5)]],
        "the retry carries the newer outbox in its old place"
    );
}

#[tokio::test(start_paused = true)]
async fn a_fan_out_forwards_annotations_and_default_targets_skip_empty_batches() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = Arc::clone(&calls);
    let plain = Arc::new(FnTarget::new("plain", move |_: Vec<Change>| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok(()) }
    }));
    let r = Recorder::new();
    let fan = Arc::new(FanOut::new(vec![plain, r.clone()]));
    let e = FlushEngine::spawn(fan, FlushConfig::default()).unwrap();
    e.schedule_annotated(&[change("x", 1)], vec![note("outbox", 1)]);
    e.flush_now().await.unwrap();
    e.schedule_annotated(&[], vec![note("outbox", 2)]);
    e.flush_now().await.unwrap();
    assert_eq!(
        r.notes(),
        vec![vec![("outbox".into(), 1)], vec![("outbox".into(), 2)]]
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "a target that ignores annotations never sees an empty batch"
    );
}

#[test]
fn batch_accessors_find_and_downcast_annotations() {
    let notes = [note("outbox", 3)];
    let batch = Batch {
        changes: &[],
        annotations: &notes,
    };
    assert_eq!(batch.annotation_as::<i64>("outbox"), Some(&3));
    assert!(batch.annotation_as::<String>("outbox").is_none());
    assert!(batch.annotation("missing").is_none());
    assert!(!batch.is_empty());
    assert!(
        Batch {
            changes: &[],
            annotations: &[]
        }
        .is_empty()
    );
}

// ---- After a give-up ----

/// Regression: after a batch exhausted its retries the engine held the queue until a new
/// change, `flush_now` or `resume`, so a later `durable()` waited forever even though the
/// target had recovered.
#[tokio::test(start_paused = true)]
async fn durable_after_a_give_up_resolves_once_the_target_recovers() {
    let t = Recorder::new();
    *t.fail_always.lock() = true;
    let e = engine(
        &t,
        FlushConfig::default()
            .max_retries(1)
            .max_retry_delay(Duration::from_mins(1)),
    );
    e.schedule(change("c1", 1));
    assert!(matches!(
        e.durable().await,
        Err(FlushError::TargetFailed { attempts: 2, .. })
    ));
    *t.fail_always.lock() = false;
    let start = Instant::now();
    let result = tokio::time::timeout(Duration::from_mins(10), e.durable()).await;
    assert!(matches!(result, Ok(Ok(()))), "durable hung: {result:?}");
    assert!(
        start.elapsed() < Duration::from_millis(10),
        "waited {:?} instead of trying at once",
        start.elapsed()
    );
    assert_eq!(t.ids(), vec!["c1"]);
}

/// Regression: as above, with the target still failing: `durable()` must answer with the
/// cause after a fresh round of attempts, not hang.
#[tokio::test(start_paused = true)]
async fn durable_while_the_target_still_fails_resolves_with_the_cause() {
    let t = Recorder::new();
    *t.fail_always.lock() = true;
    let e = engine(
        &t,
        FlushConfig::default()
            .max_retries(1)
            .max_retry_delay(Duration::from_mins(1)),
    );
    let mut events = e.events();
    e.schedule(change("c1", 1));
    assert!(e.durable().await.is_err());
    let before = t.attempts.lock().len();
    let start = Instant::now();
    let result = tokio::time::timeout(Duration::from_mins(10), e.durable()).await;
    match result {
        Ok(Err(FlushError::TargetFailed { cause, queued, .. })) => {
            assert!(cause.contains("disk on fire"));
            assert_eq!(queued, 1);
        }
        other => panic!("expected TargetFailed, got {other:?}"),
    }
    assert_eq!(
        t.attempts.lock().len(),
        before + 2,
        "a fresh round of 2 attempts"
    );
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(100),
        "fresh tries start at once, from the base delay"
    );
    let gave_up = std::iter::from_fn(|| events.try_recv().ok())
        .filter(|ev| matches!(ev, FlushEvent::GaveUp { .. }))
        .count();
    assert_eq!(gave_up, 2, "one GaveUp per exhausted round");
    assert_eq!(e.queued_changes().len(), 1, "nothing dropped");
}

/// Regression: after a give-up nothing happened until a new trigger; now the engine keeps
/// trying on its own, the backoff doubling up to `max_retry_delay`.
#[tokio::test(start_paused = true)]
async fn the_engine_retries_by_itself_after_a_give_up_with_a_capped_backoff() {
    let t = Recorder::new();
    *t.fail_always.lock() = true;
    let e = engine(
        &t,
        FlushConfig::default()
            .max_retries(1)
            .max_retry_delay(Duration::from_secs(1)),
    );
    e.schedule(change("c1", 1));
    sleep(Duration::from_millis(4650)).await; // attempts at 100, 200, 400, … 3600, 4600 ms
    let attempts = t.attempts.lock().clone();
    let gaps: Vec<u128> = attempts
        .windows(2)
        .map(|w| {
            w[1].checked_sub(w[0])
                .expect("attempts in order")
                .as_millis()
        })
        .collect();
    assert_eq!(gaps, vec![100, 200, 400, 800, 1000, 1000, 1000]);
    assert_eq!(e.stats().gave_up, 4, "a give-up every 2 failed attempts");
    *t.fail_always.lock() = false;
    sleep(Duration::from_secs(1)).await;
    assert_eq!(t.ids(), vec!["c1"], "written with no new trigger");
    assert!(e.queued_changes().is_empty());
    assert!(e.last_error().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_pause_holds_the_retries_after_a_give_up() {
    let t = Recorder::new();
    *t.fail_always.lock() = true;
    let e = engine(&t, FlushConfig::default().max_retries(0));
    e.schedule(change("c1", 1));
    assert!(e.flush_now().await.is_err());
    e.pause();
    *t.fail_always.lock() = false;
    let attempts = t.attempts.lock().len();
    sleep(Duration::from_mins(2)).await;
    assert_eq!(t.attempts.lock().len(), attempts, "tried while paused");
    let waiting = e.durable();
    sleep(Duration::from_mins(2)).await;
    assert_eq!(t.attempts.lock().len(), attempts, "durable broke the pause");
    e.resume();
    waiting.await.unwrap();
    assert_eq!(t.ids(), vec!["c1"]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_after_a_give_up_drains_at_once() {
    let t = Recorder::new();
    *t.fail_always.lock() = true;
    let e = engine(
        &t,
        FlushConfig::default()
            .max_retries(1)
            .max_retry_delay(Duration::from_mins(1)),
    );
    e.schedule(change("c1", 1));
    assert!(e.flush_now().await.is_err());
    *t.fail_always.lock() = false;
    let start = Instant::now();
    e.shutdown().await.unwrap();
    assert!(start.elapsed() < Duration::from_millis(10));
    assert_eq!(t.ids(), vec!["c1"]);
}

// ---- A store engine fed by someone else ----

/// A feeder that schedules each committed write with an annotation counting transactions,
/// and logs the order in which sinks are called.
struct Annotating {
    engine: FlushEngine,
    txs: std::sync::atomic::AtomicI64,
    log: Arc<Mutex<Vec<&'static str>>>,
}

impl ChangeSink for Annotating {
    fn accept(&self, changes: &[Change]) {
        self.log.lock().push("feeder");
        let n = self.txs.fetch_add(1, Ordering::SeqCst) + 1;
        self.engine
            .schedule_annotated(changes, vec![note("txs", n)]);
    }
}

struct Logging(Arc<Mutex<Vec<&'static str>>>, &'static str);

impl ChangeSink for Logging {
    fn accept(&self, _: &[Change]) {
        self.0.lock().push(self.1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_store_engine_fed_through_a_feeder_carries_its_annotations() {
    let t = Recorder::new();
    let e = engine(&t, FlushConfig::default());
    let log = Arc::new(Mutex::new(Vec::new()));
    let feeder = Arc::new(Annotating {
        engine: e.clone(),
        txs: std::sync::atomic::AtomicI64::new(0),
        log: Arc::clone(&log),
    });
    let store = Store::builder()
        .sink(Arc::new(Logging(Arc::clone(&log), "before")))
        .flush_engine_via(e.clone(), feeder)
        .sink(Arc::new(Logging(Arc::clone(&log), "after")))
        .build();
    let docs = store.dynamic("doc");
    docs.put("a", json!({})).unwrap();
    store
        .transaction(|tx| {
            tx.upsert_json(Entity::new("b", "doc", json!({})))?;
            tx.upsert_json(Entity::new("c", "doc", json!({})))?;
            Ok::<_, kalphite::Error>(())
        })
        .unwrap();
    assert_eq!(*log.lock(), ["before", "feeder", "after"].repeat(2));
    assert_eq!(store.queued_changes().len(), 3);
    store.durable(Durability::Local).await.unwrap();
    assert_eq!(t.ids(), vec!["a", "b", "c"]);
    assert_eq!(t.notes(), vec![vec![("txs".into(), 2)]]);
    assert_eq!(
        e.stats().scheduled,
        3,
        "the store must not schedule the changes itself as well"
    );

    // The store still controls the engine: pause, flush_now, close.
    store.pause_flush();
    docs.put("d", json!({})).unwrap();
    sleep(Duration::from_secs(5)).await;
    assert_eq!(store.queued_changes().len(), 1);
    store.flush_now().await.unwrap();
    assert_eq!(t.notes()[1], vec![("txs".into(), 3)]);
    docs.put("e", json!({})).unwrap();
    store.close().await.unwrap();
    assert_eq!(t.ids(), vec!["a", "b", "c", "d", "e"]);
    assert_eq!(t.notes()[2], vec![("txs".into(), 4)]);
}

/// `stop` ends an engine whose queue only stands for work kept elsewhere: no more
/// attempts, no retry of a failure after it, no give-up reported; waiters get `Closed`.
/// (The sync client's server-durability engine: closing a client offline used to make it
/// retry and log warnings for changes that were safely in the offline queue.)
#[tokio::test(start_paused = true)]
async fn stop_ends_the_engine_without_retrying() {
    let t = Recorder::new();
    *t.fail_always.lock() = true;
    let e = engine(&t, FlushConfig::default().max_retries(3));
    let mut events = e.events();
    e.schedule(change("c1", 1));
    let waiter = e.durable();
    sleep(Duration::from_millis(150)).await; // the first attempt failed
    let attempts = t.attempts.lock().len();
    assert!(attempts >= 1);
    e.stop();
    assert!(matches!(waiter.await, Err(FlushError::Closed { .. })));
    sleep(Duration::from_mins(1)).await;
    assert_eq!(t.attempts.lock().len(), attempts, "no attempt after stop");
    let gave_up = std::iter::from_fn(|| events.try_recv().ok())
        .filter(|ev| matches!(ev, FlushEvent::GaveUp { .. }))
        .count();
    assert_eq!(gave_up, 0);
    assert!(matches!(e.durable().await, Err(FlushError::Closed { .. })));
    assert_eq!(e.queued_changes().len(), 1, "kept, not written");
}
