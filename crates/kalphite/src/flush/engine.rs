//! The [`FlushEngine`]: a background task that takes the store's changes, deduplicates them
//! per entity, waits for a quiet moment (debounce), writes them to its target in ordered
//! batches, retries failures with exponential backoff, and never drops a change.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use indexmap::IndexMap;
use parking_lot::Mutex;
use tokio::sync::{Notify, broadcast, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::change::{Change, Origin};
use crate::entity::{EntityId, Kind};
use crate::error::{Error, Result};
use crate::flush::config::FlushConfig;
use crate::flush::target::FlushTarget;
use crate::store::ChangeSink;

/// Why changes could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FlushError {
    /// The target failed every attempt; the changes stay queued for the next flush.
    #[error(
        "flush target '{target}' failed {attempts} times ({cause}); \
         {queued} changes stay queued and will be tried again on the next flush"
    )]
    TargetFailed {
        /// The target's name.
        target: String,
        /// How many attempts were made.
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
        /// 1-based attempt number.
        attempt: u32,
        /// The target's error.
        cause: String,
        /// The backoff before the next attempt.
        retry_in: Duration,
    },
    /// Every attempt failed; the batch went back to the queue.
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
    /// Batches written.
    pub batches: u64,
    /// Failed attempts.
    pub failed_attempts: u64,
    /// Retries made.
    pub retries: u64,
    /// Batches that exhausted their retries and went back to the queue.
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
    batches: AtomicU64,
    failed_attempts: AtomicU64,
    retries: AtomicU64,
    gave_up: AtomicU64,
}

type Key = (Kind, EntityId);

struct Entry {
    change: Change,
    /// Sequence number of the oldest change this entry stands for (a newer change to
    /// the same entity replaces the content, not the position or the sequence).
    first_seq: u64,
}

struct InFlight {
    changes: Arc<[Change]>,
    first_seqs: Vec<u64>,
}

struct Waiter {
    /// Resolves once no queued change has a sequence number below this.
    upto: u64,
    tx: oneshot::Sender<Result<(), FlushError>>,
}

struct State {
    /// Deduplicated changes, in first-scheduled order (so `first_seq` ascends).
    pending: IndexMap<Key, Entry>,
    in_flight: Option<InFlight>,
    next_seq: u64,
    paused: bool,
    /// `flush_now` asks for every change below this to be flushed without waiting.
    force_upto: u64,
    deadline: Option<Instant>,
    oldest_pending_at: Option<Instant>,
    waiters: Vec<Waiter>,
    closing: bool,
    closed: bool,
    last_error: Option<String>,
    /// A batch gave up: hold the queue until something new happens (a change,
    /// `flush_now`, `resume`, shutdown) instead of hammering a failing target.
    held: bool,
}

impl State {
    /// Lowest sequence number still queued, if any.
    fn oldest_seq(&self) -> Option<u64> {
        let flying = self
            .in_flight
            .as_ref()
            .and_then(|f| f.first_seqs.first().copied());
        let pending = self.pending.first().map(|(_, e)| e.first_seq);
        match (flying, pending) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn queued(&self) -> usize {
        self.pending.len() + self.in_flight.as_ref().map_or(0, |f| f.changes.len())
    }

    fn resolve_waiters(&mut self) {
        let oldest = self.oldest_seq();
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| oldest.is_none_or(|o| o >= w.upto));
        self.waiters = waiting;
        for w in done {
            let _ = w.tx.send(Ok(()));
        }
    }

    fn fail_waiters(&mut self, from_seq: u64, err: &FlushError) {
        let (failed, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.upto > from_seq);
        self.waiters = waiting;
        for w in failed {
            let _ = w.tx.send(Err(err.clone()));
        }
    }

    /// Puts a failed batch back in front of the queue. Where a newer change to the same
    /// entity arrived meanwhile, the newer content is kept, at the older position.
    fn requeue(&mut self, flight: InFlight) {
        let mut merged: IndexMap<Key, Entry> =
            IndexMap::with_capacity(self.pending.len() + flight.changes.len());
        for (change, first_seq) in flight.changes.iter().zip(flight.first_seqs) {
            let key = (change.kind.clone(), change.id.clone());
            let change = match self.pending.shift_remove(&key) {
                Some(newer) => newer.change,
                None => change.clone(),
            };
            merged.insert(key, Entry { change, first_seq });
        }
        merged.extend(self.pending.drain(..));
        self.pending = merged;
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
/// every accepted change on it.
#[derive(Clone)]
pub struct FlushEngine {
    shared: Arc<Shared>,
}

/// What the worker does next.
enum Step {
    Write(Arc<[Change]>),
    Wait(Option<Instant>),
    Exit,
}

/// How a batch ended.
enum Outcome {
    Written,
    GaveUp {
        attempts: u32,
        cause: String,
    },
    /// Paused between retries: back to the queue, nothing failed.
    Interrupted,
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
                pending: IndexMap::new(),
                in_flight: None,
                next_seq: 0,
                paused: false,
                force_upto: 0,
                deadline: None,
                oldest_pending_at: None,
                waiters: Vec::new(),
                closing: false,
                closed: false,
                last_error: None,
                held: false,
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

    /// Schedules an upsert or delete (the store calls this for every accepted change).
    pub fn schedule(&self, change: Change) {
        self.schedule_all(std::slice::from_ref(&change));
    }

    /// Schedules several changes at once.
    pub fn schedule_all(&self, changes: &[Change]) {
        let shared = &*self.shared;
        if !shared.config.enable_persistence {
            return;
        }
        let now = Instant::now();
        let mut accepted = 0u64;
        {
            let mut st = shared.state.lock();
            for change in changes.iter().filter(|c| c.origin != Origin::Storage) {
                let seq = st.next_seq;
                st.next_seq += 1;
                accepted += 1;
                let key = (change.kind.clone(), change.id.clone());
                match st.pending.entry(key) {
                    indexmap::map::Entry::Occupied(mut e) => e.get_mut().change = change.clone(),
                    indexmap::map::Entry::Vacant(e) => {
                        e.insert(Entry {
                            change: change.clone(),
                            first_seq: seq,
                        });
                    }
                }
            }
            if accepted == 0 {
                return;
            }
            st.held = false;
            st.deadline = Some(now + shared.config.debounce);
            st.oldest_pending_at.get_or_insert(now);
        }
        shared
            .counters
            .scheduled
            .fetch_add(accepted, Ordering::Relaxed);
        shared.wake.notify_one();
    }

    /// Writes everything queued up to this call now, ignoring the debounce and a pause;
    /// resolves when all of it has been written, or fails with the cause.
    ///
    /// # Errors
    /// [`FlushError::TargetFailed`] when a batch holding these changes exhausted its
    /// retries (the changes stay queued), [`FlushError::Closed`] after shutdown.
    pub fn flush_now(&self) -> impl Future<Output = Result<(), FlushError>> + Send + 'static {
        self.wait(true)
    }

    /// Resolves once every change scheduled before this call has been written (on the
    /// engine's own schedule), or fails with the cause.
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
            let upto = st.next_seq;
            if st.oldest_seq().is_none_or(|o| o >= upto) {
                let _ = tx.send(Ok(()));
            } else if st.closed {
                let _ = tx.send(Err(FlushError::Closed {
                    queued: st.queued(),
                }));
            } else {
                if force {
                    st.force_upto = st.force_upto.max(upto);
                    st.held = false;
                }
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

    /// Releases a pause: what was queued flushes on the normal schedule.
    pub fn resume(&self) {
        {
            let mut st = self.shared.state.lock();
            st.paused = false;
            st.held = false;
            if !st.pending.is_empty() {
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

    /// Every change not yet written: in flight (or retrying) first, then pending.
    #[must_use]
    pub fn queued_changes(&self) -> Vec<Change> {
        let st = self.shared.state.lock();
        let flying = st.in_flight.iter().flat_map(|f| f.changes.iter().cloned());
        flying
            .chain(st.pending.values().map(|e| e.change.clone()))
            .collect()
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> FlushStats {
        let c = &self.shared.counters;
        FlushStats {
            scheduled: c.scheduled.load(Ordering::Relaxed),
            written: c.written.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            failed_attempts: c.failed_attempts.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            gave_up: c.gave_up.load(Ordering::Relaxed),
            queued: self.shared.state.lock().queued(),
        }
    }

    /// The last error the target returned, if the last batch failed.
    #[must_use]
    pub fn last_error(&self) -> Option<String> {
        self.shared.state.lock().last_error.clone()
    }

    /// Events as they happen (written batches, failed attempts, batches given up).
    #[must_use]
    pub fn events(&self) -> broadcast::Receiver<FlushEvent> {
        self.shared.events.subscribe()
    }

    /// Drains: writes everything queued (even if paused), then stops the worker.
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
        let flying = st.in_flight.iter().flat_map(|f| f.changes.iter().cloned());
        Err(ShutdownError {
            unwritten: flying
                .chain(st.pending.values().map(|e| e.change.clone()))
                .collect(),
            cause: st
                .last_error
                .clone()
                .unwrap_or_else(|| "the worker stopped".into()),
        })
    }

    /// Starts draining without waiting (used when the last store handle is dropped).
    pub fn begin_shutdown(&self) {
        self.shared.state.lock().closing = true;
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
            Step::Write(batch) => {
                let outcome = write_with_retries(&shared, &batch).await;
                if !finish_batch(&shared, outcome) {
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
    let Some((_, front)) = st.pending.first() else {
        if st.closing {
            st.closed = true;
            let queued = st.queued();
            st.fail_waiters(0, &FlushError::Closed { queued });
            return Step::Exit;
        }
        return Step::Wait(None);
    };
    let forced = st.closing || front.first_seq < st.force_upto;
    if (st.paused || st.held) && !forced {
        return Step::Wait(None);
    }
    let now = Instant::now();
    let by_debounce = st.deadline.unwrap_or(now);
    let by_max_wait = st.oldest_pending_at.map_or(now, |t| t + cfg.max_wait);
    let due_at = by_debounce.min(by_max_wait);
    if !(forced || st.pending.len() >= cfg.max_batch_size || due_at <= now) {
        return Step::Wait(Some(due_at));
    }
    let n = st.pending.len().min(cfg.max_batch_size);
    let (changes, first_seqs): (Vec<Change>, Vec<u64>) = st
        .pending
        .drain(..n)
        .map(|(_, e)| (e.change, e.first_seq))
        .unzip();
    let changes: Arc<[Change]> = changes.into();
    st.oldest_pending_at = if st.pending.is_empty() {
        None
    } else {
        Some(now)
    };
    st.in_flight = Some(InFlight {
        changes: Arc::clone(&changes),
        first_seqs,
    });
    Step::Write(changes)
}

async fn write_with_retries(shared: &Shared, batch: &[Change]) -> Outcome {
    let cfg = &shared.config;
    let name = shared.target.name().to_owned();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        tracing::debug!(target: "kalphite::flush", target_name = %name, changes = batch.len(), attempt, "flush start");
        let result = AssertUnwindSafe(shared.target.write(batch))
            .catch_unwind()
            .await;
        let cause = match result {
            Ok(Ok(())) => {
                tracing::debug!(target: "kalphite::flush", target_name = %name, changes = batch.len(), "flush done");
                return Outcome::Written;
            }
            Ok(Err(e)) => e.to_string(),
            Err(panic) => format!("the target panicked: {}", panic_message(&*panic)),
        };
        shared
            .counters
            .failed_attempts
            .fetch_add(1, Ordering::Relaxed);
        shared.state.lock().last_error = Some(cause.clone());
        if attempt > cfg.max_retries {
            return Outcome::GaveUp {
                attempts: attempt,
                cause,
            };
        }
        let delay = cfg.retry_delay(attempt);
        tracing::warn!(target: "kalphite::flush", target_name = %name, attempt, error = %cause, retry_in_ms = delay.as_millis() as u64, "flush attempt failed");
        let _ = shared.events.send(FlushEvent::AttemptFailed {
            attempt,
            cause,
            retry_in: delay,
        });
        tokio::time::sleep(delay).await;
        {
            let st = shared.state.lock();
            let forced = st.closing || st.force_upto > 0;
            if st.paused && !forced {
                return Outcome::Interrupted;
            }
        }
        shared.counters.retries.fetch_add(1, Ordering::Relaxed);
    }
}

/// Records how a batch ended; `false` when the worker must stop.
fn finish_batch(shared: &Shared, outcome: Outcome) -> bool {
    let mut st = shared.state.lock();
    let Some(flight) = st.in_flight.take() else {
        return true;
    };
    let n = flight.changes.len();
    match outcome {
        Outcome::Written => {
            st.last_error = None;
            shared
                .counters
                .written
                .fetch_add(n as u64, Ordering::Relaxed);
            shared.counters.batches.fetch_add(1, Ordering::Relaxed);
            let _ = shared.events.send(FlushEvent::Written { changes: n });
            if st.pending.is_empty() || st.oldest_seq() >= Some(st.force_upto) {
                st.force_upto = 0;
            }
            st.resolve_waiters();
        }
        Outcome::Interrupted => st.requeue(flight),
        Outcome::GaveUp { attempts, cause } => {
            let from_seq = flight.first_seqs.first().copied().unwrap_or(0);
            st.requeue(flight);
            shared.counters.gave_up.fetch_add(1, Ordering::Relaxed);
            let queued = st.queued();
            tracing::error!(
                target: "kalphite::flush",
                target_name = %shared.target.name(), attempts, error = %cause, queued,
                "flush gave up; the changes stay queued"
            );
            let err = FlushError::TargetFailed {
                target: shared.target.name().to_owned(),
                attempts,
                cause: cause.clone(),
                queued,
            };
            st.fail_waiters(from_seq, &err);
            // Stop forcing: the next flush_now, change or resume tries again.
            st.force_upto = 0;
            st.held = true;
            let _ = shared.events.send(FlushEvent::GaveUp { changes: n, cause });
            if st.closing {
                // Draining failed: stop here and let shutdown report what is left.
                st.closed = true;
                let queued = st.queued();
                st.fail_waiters(0, &FlushError::Closed { queued });
                return false;
            }
        }
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
