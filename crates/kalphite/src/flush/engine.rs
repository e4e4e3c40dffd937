//! The [`FlushEngine`]: a background task that takes the store's committed transactions,
//! deduplicates them per entity (and per annotation key), waits for a quiet moment
//! (debounce), writes them to its target in ordered batches, retries failures with a capped
//! exponential backoff, and never drops a change.
//!
//! A batch ends only at a transaction boundary: the oldest `max_batch_size` entries, extended
//! until every entry left queued was first touched after the newest transaction in the batch,
//! so the target, applying batches in order, always holds the state after some transaction.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use parking_lot::Mutex;
use tokio::sync::{Notify, broadcast, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::change::{Change, Origin};
use crate::error::{Error, Result};
use crate::flush::config::FlushConfig;
use crate::flush::queue::{Cut, Queue};
use crate::flush::target::{Annotation, Batch, FlushTarget};
use crate::store::ChangeSink;

/// Why changes could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FlushError {
    /// The target failed `max_retries + 1` attempts in a row; the changes stay queued and
    /// the engine keeps trying (a later `durable`/`flush_now` tries again at once).
    #[error(
        "flush target '{target}' failed {attempts} times in a row ({cause}); \
         {queued} changes stay queued and the engine keeps trying"
    )]
    TargetFailed {
        /// The target's name.
        target: String,
        /// Failed attempts in a row.
        attempts: u32,
        /// The last error, as text.
        cause: String,
        /// How many changes are queued now.
        queued: usize,
    },
    /// No flush engine provides the durability level that was asked for.
    #[error("no flush target provides durability level {level:?}")]
    NoTarget {
        /// The level asked for.
        level: crate::flush::Durability,
    },
    /// The engine was shut down before the changes could be written.
    #[error("the flush engine is shut down; {queued} changes were not written")]
    Closed {
        /// How many changes were left.
        queued: usize,
    },
}

/// What the engine reports as it works (see [`FlushEngine::events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlushEvent {
    /// A batch was written.
    Written {
        /// Changes in the batch.
        changes: usize,
    },
    /// An attempt failed; another follows after `retry_in`.
    AttemptFailed {
        /// Failed attempts in a row, this one included.
        attempt: u32,
        /// The target's error.
        cause: String,
        /// The backoff before the next attempt.
        retry_in: Duration,
    },
    /// `max_retries + 1` attempts in a row failed: the waiters were told, the batch went
    /// back to the queue, and the engine keeps trying after a (capped) backoff.
    GaveUp {
        /// Changes in the batch.
        changes: usize,
        /// The last error.
        cause: String,
    },
}

/// Counters, readable at any time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlushStats {
    /// Changes accepted for flushing (before deduplication).
    pub scheduled: u64,
    /// Changes written by the target (after deduplication).
    pub written: u64,
    /// Annotations accepted for flushing (before deduplication per key).
    pub annotations_scheduled: u64,
    /// Annotations written by the target (after deduplication per key).
    pub annotations_written: u64,
    /// Batches written.
    pub batches: u64,
    /// Failed attempts.
    pub failed_attempts: u64,
    /// Attempts made after a failed one.
    pub retries: u64,
    /// Times `max_retries + 1` attempts in a row failed (the engine kept the batch queued).
    pub gave_up: u64,
    /// Changes queued now (pending and in flight).
    pub queued: usize,
}

/// What went unwritten when the engine shut down.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{} changes could not be written before shutdown: {cause}", unwritten.len())]
pub struct ShutdownError {
    /// The changes still queued, oldest first.
    pub unwritten: Vec<Change>,
    /// Why.
    pub cause: String,
}

#[derive(Default)]
struct Counters {
    scheduled: AtomicU64,
    written: AtomicU64,
    annotations_scheduled: AtomicU64,
    annotations_written: AtomicU64,
    batches: AtomicU64,
    failed_attempts: AtomicU64,
    retries: AtomicU64,
    gave_up: AtomicU64,
}

struct Waiter {
    /// Resolves once no queued entry stands for a transaction below this.
    upto: u64,
    tx: oneshot::Sender<Result<(), FlushError>>,
}

// Four independent flags: `paused` and `gave_up` can each hold in any phase of
// `closing`/`closed`, so an enum would have to spell out their products.
#[allow(clippy::struct_excessive_bools)]
struct State {
    /// Entries not yet handed to the target, in first-scheduled order.
    queue: Queue,
    /// The batch the target is writing now.
    in_flight: Option<Cut>,
    /// Number of the next transaction (one per scheduling call).
    next_tx: u64,
    paused: bool,
    /// `flush_now` asks for every transaction below this to be flushed without waiting.
    force_upto: u64,
    deadline: Option<Instant>,
    oldest_pending_at: Option<Instant>,
    waiters: Vec<Waiter>,
    closing: bool,
    closed: bool,
    last_error: Option<String>,
    /// Failed attempts in a row (since the last write, or since a waiter started fresh
    /// tries): drives the backoff, and every `max_retries + 1` of them is a give-up.
    failures: u32,
    /// After a failed attempt: no attempt before this, whatever the debounce says.
    retry_at: Option<Instant>,
    /// The engine gave up and retries on its own at a slow pace; the next waiter
    /// (`durable`, `flush_now`, shutdown) starts fresh tries at once.
    gave_up: bool,
    /// [`FlushEngine::stop`]: exit at the next step, writing nothing more.
    stopping: bool,
}

impl State {
    /// Lowest transaction still queued, if any.
    fn oldest_tx(&self) -> Option<u64> {
        let flying = self.in_flight.as_ref().and_then(Cut::first_tx);
        let pending = self.queue.first_tx();
        match (flying, pending) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Changes queued (pending and in flight); annotations are not counted.
    fn queued(&self) -> usize {
        self.queue.changes_len() + self.in_flight.as_ref().map_or(0, |f| f.changes.len())
    }

    /// Every change not yet written: in flight (or retrying) first, then pending.
    fn queued_changes(&self) -> Vec<Change> {
        let flying = self.in_flight.iter().flat_map(|f| f.changes.iter());
        flying.chain(self.queue.changes()).cloned().collect()
    }

    fn resolve_waiters(&mut self) {
        let oldest = self.oldest_tx();
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| oldest.is_none_or(|o| o >= w.upto));
        self.waiters = waiting;
        for w in done {
            let _ = w.tx.send(Ok(()));
        }
    }

    fn fail_waiters(&mut self, err: &FlushError) {
        for w in std::mem::take(&mut self.waiters) {
            let _ = w.tx.send(Err(err.clone()));
        }
    }

    /// After a give-up, starts a fresh round of attempts now, with the backoff from its
    /// base (someone is waiting for an answer).
    fn start_fresh_tries(&mut self) {
        if self.gave_up {
            self.gave_up = false;
            self.failures = 0;
            self.retry_at = Some(Instant::now());
        }
    }
}

struct Shared {
    config: FlushConfig,
    target: Arc<dyn FlushTarget>,
    state: Mutex<State>,
    wake: Notify,
    counters: Counters,
    events: broadcast::Sender<FlushEvent>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

/// The flush engine: a cheap handle (clones share one engine) to a background task.
///
/// Give it to a store with [`crate::StoreBuilder::flush_engine`]; the store then schedules
/// every accepted change on it. With [`crate::StoreBuilder::flush_engine_via`] a feeder
/// schedules them instead, adding its own annotations ([`Self::schedule_annotated`]).
#[derive(Clone)]
pub struct FlushEngine {
    shared: Arc<Shared>,
}

/// What the worker does next.
enum Step {
    Write {
        changes: Arc<[Change]>,
        annotations: Arc<[(Arc<str>, Annotation)]>,
    },
    Wait(Option<Instant>),
    Exit,
}

impl FlushEngine {
    /// Starts an engine writing to `target`, on the current tokio runtime.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a bad configuration or when called outside a tokio
    /// runtime.
    pub fn spawn(target: Arc<dyn FlushTarget>, config: FlushConfig) -> Result<Self> {
        config.validate()?;
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::InvalidConfig("a flush engine must be started inside a tokio runtime".into())
        })?;
        let shared = Arc::new(Shared {
            config,
            target,
            state: Mutex::new(State {
                queue: Queue::default(),
                in_flight: None,
                next_tx: 0,
                paused: false,
                force_upto: 0,
                deadline: None,
                oldest_pending_at: None,
                waiters: Vec::new(),
                closing: false,
                stopping: false,
                closed: false,
                last_error: None,
                failures: 0,
                retry_at: None,
                gave_up: false,
            }),
            wake: Notify::new(),
            counters: Counters::default(),
            events: broadcast::channel(256).0,
            worker: Mutex::new(None),
        });
        let worker = handle.spawn(run(Arc::clone(&shared)));
        *shared.worker.lock() = Some(worker);
        Ok(Self { shared })
    }

    /// The engine's configuration.
    #[must_use]
    pub fn config(&self) -> &FlushConfig {
        &self.shared.config
    }

    /// Schedules one upsert or delete, as a transaction of its own.
    // Public API: takes the change as `Store` writes take their data; `&Change` would
    // change every caller's signature.
    #[allow(clippy::needless_pass_by_value)]
    pub fn schedule(&self, change: Change) {
        self.schedule_all(std::slice::from_ref(&change));
    }

    /// Schedules the changes of one store transaction (the store calls this for every
    /// committed write). They are never split across batches.
    pub fn schedule_all(&self, changes: &[Change]) {
        self.schedule_annotated(changes, Vec::new());
    }

    /// Schedules one transaction holding `changes` and keyed `annotations` (bookkeeping the
    /// engine does not look into, such as a sync outbox). Per key the latest annotation
    /// wins, as the latest change does per entity, and the target receives each annotation
    /// in the same batch as the changes of the transaction that set it
    /// ([`FlushTarget::write_batch`]). A call with annotations and no changes is a
    /// transaction too; changes marked [`Origin::Storage`] are left out.
    pub fn schedule_annotated(&self, changes: &[Change], annotations: Vec<(Arc<str>, Annotation)>) {
        let shared = &*self.shared;
        if !shared.config.enable_persistence {
            return;
        }
        let now = Instant::now();
        let mut accepted = 0u64;
        let notes = annotations.len() as u64;
        let wake = {
            let mut st = shared.state.lock();
            let was_empty = st.queue.is_empty();
            let changes_before = st.queue.changes_len();
            let tx = st.next_tx;
            for change in changes.iter().filter(|c| c.origin != Origin::Storage) {
                st.queue.push_change(change.clone(), tx);
                accepted += 1;
            }
            if accepted == 0 && notes == 0 {
                return;
            }
            for (key, annotation) in annotations {
                st.queue.push_annotation(key, annotation, tx);
            }
            st.next_tx += 1;
            st.deadline = Some(now + shared.config.debounce);
            st.oldest_pending_at.get_or_insert(now);
            // The worker sleeps until a time it computed from a non-empty queue, and a
            // push only moves the debounce later (it sees that when it wakes): waking it
            // for every write costs a thread switch per write. It needs waking when it
            // sleeps with nothing queued, or when this push makes a batch due at once.
            let max = shared.config.max_batch_size;
            was_empty || (changes_before < max && st.queue.changes_len() >= max)
        };
        let c = &shared.counters;
        c.scheduled.fetch_add(accepted, Ordering::Relaxed);
        c.annotations_scheduled.fetch_add(notes, Ordering::Relaxed);
        if wake {
            shared.wake.notify_one();
        }
    }

    /// Writes everything queued up to this call now, ignoring the debounce and a pause;
    /// resolves when all of it (annotations included) has been written, or fails with the
    /// cause.
    ///
    /// # Errors
    /// [`FlushError::TargetFailed`] when `max_retries + 1` attempts in a row failed (the
    /// changes stay queued), [`FlushError::Closed`] after shutdown.
    pub fn flush_now(&self) -> impl Future<Output = Result<(), FlushError>> + Send + 'static {
        self.wait(true)
    }

    /// Resolves once everything scheduled before this call (annotations included) has
    /// been written, on the engine's own schedule, or fails with the cause. After the
    /// engine gave up, this starts a fresh round of attempts at once.
    ///
    /// # Errors
    /// As [`Self::flush_now`].
    pub fn durable(&self) -> impl Future<Output = Result<(), FlushError>> + Send + 'static {
        self.wait(false)
    }

    fn wait(&self, force: bool) -> impl Future<Output = Result<(), FlushError>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.shared.state.lock();
            let upto = st.next_tx;
            if st.oldest_tx().is_none_or(|o| o >= upto) {
                let _ = tx.send(Ok(()));
            } else if st.closed {
                let _ = tx.send(Err(FlushError::Closed {
                    queued: st.queued(),
                }));
            } else {
                if force {
                    st.force_upto = st.force_upto.max(upto);
                }
                st.start_fresh_tries();
                st.waiters.push(Waiter { upto, tx });
            }
        }
        self.shared.wake.notify_one();
        async move { rx.await.unwrap_or(Err(FlushError::Closed { queued: 0 })) }
    }

    /// Holds every flush (and retry) until [`Self::resume`]. Changes keep being queued.
    pub fn pause(&self) {
        self.shared.state.lock().paused = true;
    }

    /// Releases a pause: what was queued flushes on the normal schedule (a batch waiting
    /// for a retry keeps its backoff).
    pub fn resume(&self) {
        {
            let mut st = self.shared.state.lock();
            st.paused = false;
            if !st.queue.is_empty() {
                st.deadline = Some(Instant::now() + self.shared.config.debounce);
            }
        }
        self.shared.wake.notify_one();
    }

    /// Whether the engine is paused.
    #[must_use]
    pub fn is_paused(&self) -> bool {
        self.shared.state.lock().paused
    }

    /// Every change not yet written: in flight first, then pending (annotations left out).
    #[must_use]
    pub fn queued_changes(&self) -> Vec<Change> {
        self.shared.state.lock().queued_changes()
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> FlushStats {
        let c = &self.shared.counters;
        FlushStats {
            scheduled: c.scheduled.load(Ordering::Relaxed),
            written: c.written.load(Ordering::Relaxed),
            annotations_scheduled: c.annotations_scheduled.load(Ordering::Relaxed),
            annotations_written: c.annotations_written.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            failed_attempts: c.failed_attempts.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            gave_up: c.gave_up.load(Ordering::Relaxed),
            queued: self.shared.state.lock().queued(),
        }
    }

    /// The last error the target returned, if the last attempt failed.
    #[must_use]
    pub fn last_error(&self) -> Option<String> {
        self.shared.state.lock().last_error.clone()
    }

    /// Events as they happen (written batches, failed attempts, give-ups).
    #[must_use]
    pub fn events(&self) -> broadcast::Receiver<FlushEvent> {
        self.shared.events.subscribe()
    }

    /// Drains: writes everything queued (even if paused), then stops the worker. Draining
    /// stops at the first give-up.
    ///
    /// # Errors
    /// [`ShutdownError`] with every change that could not be written.
    pub async fn shutdown(&self) -> std::result::Result<(), ShutdownError> {
        self.begin_shutdown();
        let worker = self.shared.worker.lock().take();
        if let Some(Err(e)) = match worker {
            Some(w) => Some(w.await),
            None => None,
        } {
            tracing::error!(error = %e, "flush worker ended abnormally");
        }
        let st = self.shared.state.lock();
        if st.queued() == 0 {
            return Ok(());
        }
        Err(ShutdownError {
            unwritten: st.queued_changes(),
            cause: st
                .last_error
                .clone()
                .unwrap_or_else(|| "the worker stopped".into()),
        })
    }

    /// Stops the worker without writing what is queued: for an engine whose queue only
    /// stands for work kept elsewhere (the sync client's wait for acknowledgements: its
    /// changes are in the persisted offline queue). A write in progress is let finish;
    /// its failure is not retried nor reported. Waiters fail with [`FlushError::Closed`].
    pub fn stop(&self) {
        self.shared.state.lock().stopping = true;
        self.shared.wake.notify_one();
    }

    /// Starts draining without waiting (used when the last store handle is dropped).
    pub fn begin_shutdown(&self) {
        {
            let mut st = self.shared.state.lock();
            st.closing = true;
            st.start_fresh_tries();
        }
        self.shared.wake.notify_one();
    }
}

impl ChangeSink for FlushEngine {
    fn accept(&self, changes: &[Change]) {
        self.schedule_all(changes);
    }
}

impl std::fmt::Debug for FlushEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlushEngine")
            .field("target", &self.shared.target.name())
            .field("stats", &self.stats())
            .finish()
    }
}

/// The worker: decide, write, record, repeat.
async fn run(shared: Arc<Shared>) {
    loop {
        match next_step(&shared) {
            Step::Exit => return,
            Step::Wait(until) => match until {
                Some(t) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(t) => {}
                        () = shared.wake.notified() => {}
                    }
                }
                None => shared.wake.notified().await,
            },
            Step::Write {
                changes,
                annotations,
            } => {
                let batch = Batch {
                    changes: &changes,
                    annotations: &annotations,
                };
                let result = attempt(&shared, &batch).await;
                if !finish_batch(&shared, result) {
                    return;
                }
                // Targets that never wait would otherwise keep this task from yielding.
                tokio::task::yield_now().await;
            }
        }
    }
}

fn next_step(shared: &Shared) -> Step {
    let cfg = &shared.config;
    let mut st = shared.state.lock();
    st.resolve_waiters();
    if st.stopping {
        st.closed = true;
        let queued = st.queued();
        st.fail_waiters(&FlushError::Closed { queued });
        return Step::Exit;
    }
    let Some(front_tx) = st.queue.first_tx() else {
        if st.closing {
            st.closed = true;
            let queued = st.queued();
            st.fail_waiters(&FlushError::Closed { queued });
            return Step::Exit;
        }
        return Step::Wait(None);
    };
    let forced = st.closing || front_tx < st.force_upto;
    if st.paused && !forced {
        return Step::Wait(None);
    }
    let now = Instant::now();
    let due_at = match st.retry_at {
        // A failed batch waits out its backoff, whatever else happens.
        Some(t) => t,
        None if forced || st.queue.changes_len() >= cfg.max_batch_size => now,
        None => {
            let by_debounce = st.deadline.unwrap_or(now);
            let by_max_wait = st.oldest_pending_at.map_or(now, |t| t + cfg.max_wait);
            by_debounce.min(by_max_wait)
        }
    };
    if due_at > now {
        return Step::Wait(Some(due_at));
    }
    let Some(cut) = st.queue.cut(cfg.max_batch_size) else {
        return Step::Wait(None);
    };
    if st.last_error.is_some() {
        shared.counters.retries.fetch_add(1, Ordering::Relaxed);
    }
    st.oldest_pending_at = if st.queue.is_empty() { None } else { Some(now) };
    let step = Step::Write {
        changes: Arc::clone(&cut.changes),
        annotations: Arc::clone(&cut.annotations),
    };
    st.in_flight = Some(cut);
    step
}

/// One attempt at writing `batch`; a panicking target counts as a failed attempt.
async fn attempt(shared: &Shared, batch: &Batch<'_>) -> std::result::Result<(), String> {
    let name = shared.target.name();
    let (changes, annotations) = (batch.changes.len(), batch.annotations.len());
    tracing::debug!(target: "kalphite::flush", target_name = %name, changes, annotations, "flush start");
    let result = AssertUnwindSafe(shared.target.write_batch(batch))
        .catch_unwind()
        .await;
    match result {
        Ok(Ok(())) => {
            tracing::debug!(target: "kalphite::flush", target_name = %name, changes, annotations, "flush done");
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!("the target panicked: {}", panic_message(&*panic))),
    }
}

/// Records how an attempt ended; `false` when the worker must stop.
fn finish_batch(shared: &Shared, result: std::result::Result<(), String>) -> bool {
    let cfg = &shared.config;
    let mut st = shared.state.lock();
    let Some(flight) = st.in_flight.take() else {
        return true;
    };
    let n = flight.changes.len();
    let cause = match result {
        Ok(()) => {
            st.last_error = None;
            st.failures = 0;
            st.retry_at = None;
            st.gave_up = false;
            let c = &shared.counters;
            c.written.fetch_add(n as u64, Ordering::Relaxed);
            c.annotations_written
                .fetch_add(flight.annotations.len() as u64, Ordering::Relaxed);
            c.batches.fetch_add(1, Ordering::Relaxed);
            let _ = shared.events.send(FlushEvent::Written { changes: n });
            if st.queue.is_empty() || st.oldest_tx() >= Some(st.force_upto) {
                st.force_upto = 0;
            }
            st.resolve_waiters();
            return true;
        }
        Err(cause) => cause,
    };
    // Back in front of the queue; the next attempt waits out the backoff and may take
    // newer transactions along.
    st.queue.requeue(flight);
    if st.stopping {
        // Stopped while writing: the failure is expected, nothing is retried.
        st.closed = true;
        let queued = st.queued();
        st.fail_waiters(&FlushError::Closed { queued });
        return false;
    }
    shared
        .counters
        .failed_attempts
        .fetch_add(1, Ordering::Relaxed);
    st.failures = st.failures.saturating_add(1);
    let failures = st.failures;
    let delay = cfg.retry_delay(failures);
    st.retry_at = Some(Instant::now() + delay);
    st.last_error = Some(cause.clone());
    let name = shared.target.name();
    if !failures.is_multiple_of(cfg.max_retries + 1) {
        tracing::warn!(target: "kalphite::flush", target_name = %name, attempt = failures, error = %cause, retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), "flush attempt failed");
        let _ = shared.events.send(FlushEvent::AttemptFailed {
            attempt: failures,
            cause,
            retry_in: delay,
        });
        return true;
    }
    shared.counters.gave_up.fetch_add(1, Ordering::Relaxed);
    let queued = st.queued();
    tracing::error!(
        target: "kalphite::flush",
        target_name = %name, attempts = failures, error = %cause, queued,
        retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        "flush gave up for now; the changes stay queued"
    );
    st.fail_waiters(&FlushError::TargetFailed {
        target: name.to_owned(),
        attempts: failures,
        cause: cause.clone(),
        queued,
    });
    // Stop forcing (a pause holds again) and retry on the slow schedule until a waiter
    // asks for fresh tries.
    st.force_upto = 0;
    st.gave_up = true;
    let _ = shared.events.send(FlushEvent::GaveUp { changes: n, cause });
    if st.closing {
        // Draining failed: stop here and let shutdown report what is left.
        st.closed = true;
        let queued = st.queued();
        st.fail_waiters(&FlushError::Closed { queued });
        return false;
    }
    true
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
