//! Change notification: callback subscriptions (guards that unsubscribe on drop, one call
//! per accepted write, panics caught, re-entrant writes deferred to the next round) and,
//! with the `runtime` feature, the async streams of `stream`.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};

use crate::change::Change;
use crate::entity::Kind;

/// What subscribers receive once per accepted write (a single upsert, a bulk load, a
/// transaction, a clear): every change it made, in order.
#[derive(Clone, Debug)]
pub struct Notification {
    /// The changes, in the order they were applied.
    pub changes: Arc<[Change]>,
}

impl Notification {
    /// The changes that concern `kind`.
    pub fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Change> + 'a {
        self.changes.iter().filter(move |c| c.kind == *kind)
    }
}

/// A subscriber callback. Subscribing the same `Arc` twice (to the same scope) registers
/// it once: it is called once per notification.
pub type Listener = Arc<dyn Fn(&Notification) + Send + Sync + 'static>;

struct Registration {
    id: u64,
    kind: Option<Kind>,
    listener: Listener,
    /// Live guards for this registration (the same listener subscribed several times).
    guards: usize,
}

/// What a delivery round calls: each registration's scope and listener.
type Targets = Arc<[(Option<Kind>, Listener)]>;

#[derive(Default)]
struct Queue {
    items: VecDeque<Notification>,
    delivering: bool,
}

/// Holds the subscribers and delivers notifications in commit order.
pub(crate) struct Notifier {
    registrations: RwLock<Vec<Registration>>,
    /// A copy of `registrations` rebuilt on (un)subscribe, so that a delivery round takes
    /// one `Arc` instead of allocating and cloning every listener for each notification.
    targets: RwLock<Targets>,
    /// Fast path: skip building notifications when nobody listens.
    has_listeners: AtomicBool,
    /// Notifications in `queue` (changed under its lock): lets `deliver` return without
    /// locking when there is nothing to deliver, which is every write nobody listens to.
    queued: AtomicUsize,
    queue: Mutex<Queue>,
    #[cfg(feature = "runtime")]
    streams: super::stream::Streams,
    next_id: AtomicU64,
    panics: AtomicU64,
}

impl Notifier {
    pub(crate) fn new(stream_capacity: usize) -> Self {
        // Only an async stream buffers notifications.
        #[cfg(not(feature = "runtime"))]
        let _ = stream_capacity;
        Self {
            registrations: RwLock::new(Vec::new()),
            targets: RwLock::new(Arc::from(Vec::new())),
            has_listeners: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            queue: Mutex::new(Queue::default()),
            #[cfg(feature = "runtime")]
            streams: super::stream::Streams::new(stream_capacity),
            next_id: AtomicU64::new(1),
            panics: AtomicU64::new(0),
        }
    }

    /// Whether anyone would see a notification (callbacks or streams).
    pub(crate) fn wanted(&self) -> bool {
        self.has_listeners.load(Ordering::Acquire) || self.streams_live()
    }

    #[cfg(feature = "runtime")]
    fn streams_live(&self) -> bool {
        self.streams.live()
    }

    #[cfg(not(feature = "runtime"))]
    #[allow(clippy::unused_self)] // the runtime version reads the streams
    fn streams_live(&self) -> bool {
        false
    }

    /// Queues a notification. Called with the store's write lock held, so notifications
    /// are queued in commit order.
    pub(crate) fn enqueue(&self, changes: Vec<Change>) {
        let n = Notification {
            changes: changes.into(),
        };
        #[cfg(feature = "runtime")]
        self.streams.send(&n);
        if self.has_listeners.load(Ordering::Acquire) {
            let mut q = self.queue.lock();
            q.items.push_back(n);
            self.queued.store(q.items.len(), Ordering::Release);
        }
    }

    /// Delivers queued notifications, unless a delivery round is already running — on
    /// this thread (a subscriber wrote to the store) or another; that round delivers ours
    /// after the current one, so notifications never interleave or reorder.
    pub(crate) fn deliver(&self) {
        // Nothing queued: another round (or nobody) has it. A notification queued by this
        // thread is counted before this load, so it is never skipped.
        if self.queued.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut next = {
            let mut q = self.queue.lock();
            if q.delivering {
                return;
            }
            let Some(first) = q.items.pop_front() else {
                return;
            };
            self.queued.store(q.items.len(), Ordering::Release);
            q.delivering = true;
            first
        };
        loop {
            self.dispatch(&next);
            next = {
                let mut q = self.queue.lock();
                if let Some(n) = q.items.pop_front() {
                    self.queued.store(q.items.len(), Ordering::Release);
                    n
                } else {
                    q.delivering = false;
                    return;
                }
            };
        }
    }

    fn dispatch(&self, n: &Notification) {
        let targets = Arc::clone(&self.targets.read());
        for (kind, listener) in targets.iter() {
            let scoped;
            let n = match kind {
                None => n,
                Some(kind) if n.changes.iter().all(|c| c.kind == *kind) => n,
                Some(kind) => {
                    let changes: Vec<Change> = n.of_kind(kind).cloned().collect();
                    if changes.is_empty() {
                        continue;
                    }
                    scoped = Notification {
                        changes: changes.into(),
                    };
                    &scoped
                }
            };
            if catch_unwind(AssertUnwindSafe(|| listener(n))).is_err() {
                let total = self.panics.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(
                    total,
                    "a store subscriber panicked; other subscribers still ran"
                );
            }
        }
    }

    pub(crate) fn subscribe(
        self: &Arc<Self>,
        kind: Option<Kind>,
        listener: Listener,
    ) -> Subscription {
        let mut regs = self.registrations.write();
        let id = if let Some(r) = regs
            .iter_mut()
            .find(|r| r.kind == kind && Arc::ptr_eq(&r.listener, &listener))
        {
            r.guards += 1;
            r.id
        } else {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            regs.push(Registration {
                id,
                kind,
                listener,
                guards: 1,
            });
            id
        };
        self.publish(&regs);
        Subscription {
            notifier: Arc::downgrade(self),
            id,
        }
    }

    fn unsubscribe(&self, id: u64) {
        let mut regs = self.registrations.write();
        if let Some(pos) = regs.iter().position(|r| r.id == id) {
            regs[pos].guards -= 1;
            if regs[pos].guards == 0 {
                regs.remove(pos);
            }
        }
        self.publish(&regs);
    }

    /// Rebuilds the delivery targets after a (un)subscription; called with the
    /// registrations' write lock held, so publications happen in order.
    fn publish(&self, regs: &[Registration]) {
        let targets: Targets = regs
            .iter()
            .map(|r| (r.kind.clone(), Arc::clone(&r.listener)))
            .collect();
        *self.targets.write() = targets;
        self.has_listeners
            .store(!regs.is_empty(), Ordering::Release);
    }

    #[cfg(feature = "runtime")]
    pub(crate) fn stream(&self) -> super::stream::ChangeStream {
        self.streams.subscribe()
    }

    pub(crate) fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }
}

/// A live subscription; dropping it unsubscribes.
#[must_use = "dropping a Subscription unsubscribes at once"]
pub struct Subscription {
    notifier: Weak<Notifier>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(n) = self.notifier.upgrade() {
            n.unsubscribe(self.id);
        }
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}
