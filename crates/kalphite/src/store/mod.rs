//! Layer 1: the memory-first [`Store`]. Reads are synchronous and come from memory; every
//! accepted write is validated, applied atomically, turned into [`Change`]s, handed to the
//! change sinks (the flush engine) and announced to subscribers.

mod collection;
mod notify;
mod query;
#[cfg(feature = "runtime")]
mod runtime;
#[cfg(feature = "runtime")]
mod stream;
mod table;
mod tx;

use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::RwLock;
use serde_json::Value;

pub use collection::{Collection, DynCollection};
pub use notify::{Listener, Notification, Subscription};
pub use query::{Query, json_cmp};
#[cfg(feature = "runtime")]
pub use stream::{ChangeStream, RecvError};
pub use tx::{Tx, View};

use crate::change::{Change, Origin};
use crate::entity::{AnyEntity, Entity, EntityData, EntityKind, Kind, is_reserved_kind};
use crate::error::{Error, Result};
#[cfg(feature = "runtime")]
use crate::flush::FlushEngine;
use crate::schema::SharedSchema;
use notify::Notifier;
use tx::{LocalChecks, State};

/// Receives every accepted change, in commit order, while the write is being committed.
///
/// This is the seam between Layer 1 and the layers above: the flush engine implements it,
/// and a feeder given to `StoreBuilder::flush_engine_via` (the `runtime` feature)
/// implements it to schedule the changes on its engine with annotations of its own.
/// `accept` runs under the store's write lock, so it must be quick and must not call back
/// into the store (queue the changes and return).
pub trait ChangeSink: Send + Sync + 'static {
    /// Takes the changes of one committed write.
    fn accept(&self, changes: &[Change]);
}

/// The in-memory entity store: a cheap, `Send + Sync` handle; clones share one store.
///
/// ```
/// use kalphite::{Store, Entity, EntityKind};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Debug, Serialize, Deserialize)]
/// struct Todo { title: String, done: bool }
/// impl EntityKind for Todo { const KIND: &'static str = "todo"; }
///
/// let store = Store::new();
/// let todos = store.collection::<Todo>().unwrap();
/// todos.put("t1", Todo { title: "write docs".into(), done: false }).unwrap();
/// assert_eq!(todos.find_by_id("t1").unwrap().data.title, "write docs");
/// assert_eq!(todos.len(), 1);
/// ```
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    state: RwLock<State>,
    schema: Option<SharedSchema>,
    sinks: Vec<Arc<dyn ChangeSink>>,
    /// The flush engines (fed directly or through a feeder among the sinks), for flush
    /// control and durability waits.
    #[cfg(feature = "runtime")]
    engines: Vec<FlushEngine>,
    notifier: Arc<Notifier>,
    /// The entity size limit for local writes, [`NO_LIMIT`] when there is none.
    max_entity_bytes: AtomicUsize,
    /// Whether local writes holding a NUL character are refused.
    refuse_nul: AtomicBool,
}

/// `max_entity_bytes` when the store has no size limit.
const NO_LIMIT: usize = usize::MAX;

#[cfg(feature = "runtime")]
impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: let each engine drain what is queued in the background.
        for engine in &self.engines {
            engine.begin_shutdown();
        }
    }
}

/// Configures a [`Store`].
#[must_use]
pub struct StoreBuilder {
    schema: Option<SharedSchema>,
    sinks: Vec<Arc<dyn ChangeSink>>,
    #[cfg(feature = "runtime")]
    engines: Vec<FlushEngine>,
    /// How many notifications an async change stream buffers (only the stream reads it).
    stream_capacity: usize,
    typed: Vec<Registration>,
    max_entity_bytes: Option<usize>,
    refuse_nul: bool,
}

/// Registers a Rust type for a kind when the store is built.
type Registration = Box<dyn FnOnce(&mut State) -> Result<()> + Send>;

impl Default for StoreBuilder {
    fn default() -> Self {
        Self {
            schema: None,
            sinks: Vec::new(),
            #[cfg(feature = "runtime")]
            engines: Vec::new(),
            stream_capacity: 1024,
            typed: Vec::new(),
            max_entity_bytes: None,
            refuse_nul: false,
        }
    }
}

impl StoreBuilder {
    /// Validates every write (local, bulk, remote, hydrated) against `schema`.
    pub fn schema(mut self, schema: SharedSchema) -> Self {
        self.schema = Some(schema);
        self
    }

    /// Adds a sink that receives every accepted change (see [`ChangeSink`]).
    pub fn sink(mut self, sink: Arc<dyn ChangeSink>) -> Self {
        self.sinks.push(sink);
        self
    }

    /// Registers `T` as the data type of `T::KIND` up front, so JSON arriving for that
    /// kind (bulk loads, hydration, sync) is checked against it from the start.
    ///
    /// A reserved `T::KIND` (see [`crate::RESERVED_KIND_PREFIX`]) registers nothing; its
    /// [`Store::collection`] reports [`Error::ReservedKind`].
    pub fn register<T: EntityKind>(mut self) -> Self {
        self.typed.push(Box::new(|state| {
            state.slot_for_type::<T>(&Kind::from(T::KIND)).map(drop)
        }));
        self
    }

    /// Refuses every local upsert whose entity is larger than `bytes` as JSON, with
    /// [`Error::EntityTooLarge`] (see [`Store::set_max_entity_bytes`], which can also
    /// change or lift the limit later). No limit by default.
    pub fn max_entity_bytes(mut self, bytes: usize) -> Self {
        self.max_entity_bytes = Some(bytes);
        self
    }

    /// Refuses every local upsert holding a NUL character (U+0000) in any string, with
    /// [`Error::Unstorable`] (see [`Store::set_refuse_nul`]). Off by default.
    pub fn refuse_nul(mut self, refuse: bool) -> Self {
        self.refuse_nul = refuse;
        self
    }

    /// Builds the store.
    pub fn build(self) -> Store {
        let mut state = State::default();
        for register in self.typed {
            // An empty state cannot hold conflicting data, so registration fails only for
            // a reserved kind, which must not get a slot (`collection` reports it).
            if let Err(e) = register(&mut state) {
                tracing::warn!(error = %e, "kalphite: a registered kind was not registered");
            }
        }
        Store {
            inner: Arc::new(Inner {
                state: RwLock::new(state),
                schema: self.schema,
                sinks: self.sinks,
                #[cfg(feature = "runtime")]
                engines: self.engines,
                notifier: Arc::new(Notifier::new(self.stream_capacity)),
                max_entity_bytes: AtomicUsize::new(self.max_entity_bytes.unwrap_or(NO_LIMIT)),
                refuse_nul: AtomicBool::new(self.refuse_nul),
            }),
        }
    }
}

thread_local! {
    /// Stores whose write lock this thread holds inside a transaction closure.
    static IN_TRANSACTION: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store with no schema (any JSON object is accepted).
    #[must_use]
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder for a store with a schema, sinks or registered types.
    pub fn builder() -> StoreBuilder {
        StoreBuilder::default()
    }

    /// The typed collection of `T::KIND`: a live view that always shows the current state.
    ///
    /// # Errors
    /// [`Error::ReservedKind`] if `T::KIND` is one of kalphite's own bookkeeping kinds
    /// (see [`crate::RESERVED_KIND_PREFIX`]), [`Error::KindTypeMismatch`] if the kind is
    /// already open as another Rust type, or [`Error::Conversion`] if it holds JSON
    /// entities that do not fit `T` (nothing changes).
    pub fn collection<T: EntityKind>(&self) -> Result<Collection<T>> {
        let kind = Kind::from(T::KIND);
        let existing = {
            let state = self.read_state();
            state
                .slot_index(&kind)
                .filter(|&s| state.slots[s].typed::<T>().is_some())
        };
        let slot = match existing {
            Some(slot) => slot,
            None => self.write_state().slot_for_type::<T>(&kind)?,
        };
        Ok(Collection::new(self.clone(), slot, kind))
    }

    /// The collection of `kind` as JSON (`serde_json::Value` data), whatever its Rust type.
    ///
    /// For a reserved kind (see [`crate::RESERVED_KIND_PREFIX`]) every write is refused
    /// with [`Error::ReservedKind`] and every read finds nothing.
    pub fn dynamic(&self, kind: impl Into<Kind>) -> DynCollection {
        DynCollection::new(self.clone(), kind.into())
    }

    /// Any entity by kind and id.
    #[must_use]
    pub fn get(&self, kind: &str, id: &str) -> Option<AnyEntity> {
        self.read(|v| v.get_any(kind, id))
    }

    /// Total number of entities.
    #[must_use]
    pub fn len(&self) -> usize {
        self.read_state().slots.iter().map(|s| s.table.len()).sum()
    }

    /// Whether the store holds no entity.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The kinds that hold at least one entity, in the order they first appeared.
    #[must_use]
    pub fn entity_types(&self) -> Vec<Kind> {
        self.read_state()
            .slots
            .iter()
            .filter(|s| s.table.len() > 0)
            .map(|s| s.kind.clone())
            .collect()
    }

    /// Every entity, kind by kind, each kind in insertion order.
    #[must_use]
    pub fn all(&self) -> Vec<AnyEntity> {
        self.read_state()
            .slots
            .iter()
            .flat_map(|s| s.table.all())
            .collect()
    }

    /// Loads many JSON entities at once: every one is validated first, then all are
    /// applied (a duplicate id: the last wins), with one notification. Returns how many
    /// were loaded.
    ///
    /// # Errors
    /// The first invalid entity's error; nothing is loaded then.
    pub fn load_entities(
        &self,
        entities: impl IntoIterator<Item = Entity<Value>>,
    ) -> Result<usize> {
        self.load_with_origin(entities, Origin::Local)
    }

    /// Loads entities read from local storage at start-up: like [`Self::load_entities`],
    /// but the changes are marked [`Origin::Storage`] so they are not written back.
    ///
    /// Entities of reserved kinds (see [`crate::RESERVED_KIND_PREFIX`]) are skipped with a
    /// warning instead of refusing the load: databases written by older clients hold such
    /// rows (the sync client's `_kalphite_sync_replica` state), and they must not keep the
    /// app from starting. The returned count does not include them.
    ///
    /// # Errors
    /// As [`Self::load_entities`], for any other invalid entity.
    pub fn hydrate(&self, entities: impl IntoIterator<Item = Entity<Value>>) -> Result<usize> {
        let mut skipped: Vec<Kind> = Vec::new();
        let mut skipped_count = 0usize;
        let entities = entities.into_iter().filter(|e| {
            if !is_reserved_kind(&e.kind) {
                return true;
            }
            skipped_count += 1;
            if !skipped.contains(&e.kind) {
                skipped.push(e.kind.clone());
            }
            false
        });
        let loaded = self.load_with_origin(entities, Origin::Storage);
        if skipped_count > 0 {
            tracing::warn!(
                skipped = skipped_count,
                kinds = ?skipped,
                "kalphite: hydration skipped stored entities of reserved kinds \
                 (kalphite's own bookkeeping, never loaded as entities)"
            );
        }
        loaded
    }

    fn load_with_origin(
        &self,
        entities: impl IntoIterator<Item = Entity<Value>>,
        origin: Origin,
    ) -> Result<usize> {
        self.transaction_from(origin, |tx| {
            let mut n = 0;
            for e in entities {
                tx.upsert_json(e)?;
                n += 1;
            }
            Ok(n)
        })
    }

    /// Removes every entity, with one notification (a delete change per entity).
    pub fn clear(&self) {
        let _: Result<()> = self.transaction(|tx| {
            tx.clear();
            Ok(())
        });
    }

    /// Runs `f` as one transaction: its writes are applied together and announced in
    /// one notification, or — if `f` returns an error or panics — not applied at all.
    /// Readers never see part of it.
    ///
    /// # Errors
    /// Whatever `f` returns.
    ///
    /// # Panics
    /// If `f` calls this same store directly instead of through the [`Tx`] (that would
    /// deadlock); a panic inside `f` is re-raised after the rollback.
    pub fn transaction<R, E: From<Error>>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        self.transaction_from(Origin::Local, f)
    }

    /// [`Self::transaction`] with the changes marked as coming from `origin` (the sync
    /// client applies remote changes with [`Origin::Remote`]).
    ///
    /// # Errors
    /// Whatever `f` returns.
    pub fn transaction_from<R, E: From<Error>>(
        &self,
        origin: Origin,
        f: impl FnOnce(&mut Tx<'_>) -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        let inner = &*self.inner;
        let record = !inner.sinks.is_empty() || inner.notifier.wanted();
        let mut guard = self.write_state();
        // Only local writes are checked: remote ones were accepted by the server already,
        // stored ones by this store earlier (and a database written before the check was on
        // must still open).
        let checks = match origin {
            Origin::Local => LocalChecks {
                max_bytes: self.max_entity_bytes(),
                refuse_nul: self.refuses_nul(),
            },
            Origin::Remote | Origin::Storage => LocalChecks::default(),
        };
        let mut tx = Tx::new(&mut guard, inner.schema.as_deref(), origin, record, checks);
        let key = self.key();
        IN_TRANSACTION.with(|t| t.borrow_mut().push(key));
        let outcome = catch_unwind(AssertUnwindSafe(|| f(&mut tx)));
        IN_TRANSACTION.with(|t| t.borrow_mut().retain(|&k| k != key));
        match outcome {
            Ok(Ok(r)) => {
                if tx.is_dirty() && record {
                    let changes = std::mem::take(&mut tx.changes);
                    for sink in &inner.sinks {
                        sink.accept(&changes);
                    }
                    if inner.notifier.wanted() {
                        inner.notifier.enqueue(changes);
                    }
                }
                drop(tx);
                drop(guard);
                inner.notifier.deliver();
                Ok(r)
            }
            Ok(Err(e)) => {
                tx.rollback();
                Err(e)
            }
            Err(panic) => {
                tx.rollback();
                drop(tx);
                drop(guard);
                resume_unwind(panic)
            }
        }
    }

    /// Sets (`Some`) or lifts (`None`) the entity size limit; it applies to transactions
    /// that start afterwards.
    ///
    /// With a limit, every local upsert — typed or dynamic, single, in a transaction or in
    /// a bulk load — whose whole `{id, type, data, updatedAt}` record (as stored: schema
    /// defaults applied, `updatedAt` stamped) is more than `bytes` bytes of JSON is
    /// refused with [`Error::EntityTooLarge`], like any invalid write (a transaction rolls
    /// back). The sync client sets it to the server's frame limit once it learns it: an
    /// entity the server would refuse is then refused at write time instead of being
    /// queued and resent forever, holding up every change behind it.
    ///
    /// Remote changes ([`Origin::Remote`]) and hydration ([`Origin::Storage`]) are never
    /// size-checked: the server already accepted them. Deletes are never size-checked.
    /// Without a limit (the default) nothing is measured.
    pub fn set_max_entity_bytes(&self, bytes: Option<usize>) {
        self.inner
            .max_entity_bytes
            .store(bytes.unwrap_or(NO_LIMIT), Ordering::Relaxed);
    }

    /// The entity size limit for local writes, if any (see [`Self::set_max_entity_bytes`]).
    #[must_use]
    pub fn max_entity_bytes(&self) -> Option<usize> {
        match self.inner.max_entity_bytes.load(Ordering::Relaxed) {
            NO_LIMIT => None,
            bytes => Some(bytes),
        }
    }

    /// Refuses (`true`) or accepts (`false`, the default) local upserts holding a NUL
    /// character (U+0000); it applies to transactions that start afterwards.
    ///
    /// When refusing, every local upsert — typed or dynamic, single, in a transaction or
    /// in a bulk load — whose record (as stored) holds the character anywhere (its kind,
    /// its id, a key or a string value at any depth) is refused with [`Error::Unstorable`]
    /// naming the entity and where the character is, like any invalid write (a transaction
    /// rolls back). PostgreSQL cannot store the character and the sync server refuses it,
    /// so the client turns this on for a PostgreSQL database or with sync: such an entity
    /// is refused at write time instead of being retried by the flush engine forever,
    /// holding up every change behind it.
    ///
    /// Remote changes and hydration are never checked, as for
    /// [`Self::set_max_entity_bytes`].
    pub fn set_refuse_nul(&self, refuse: bool) {
        self.inner.refuse_nul.store(refuse, Ordering::Relaxed);
    }

    /// Whether local upserts holding a NUL character are refused (see
    /// [`Self::set_refuse_nul`]).
    #[must_use]
    pub fn refuses_nul(&self) -> bool {
        self.inner.refuse_nul.load(Ordering::Relaxed)
    }

    /// Runs `f` over a consistent view of the whole store.
    pub fn read<R>(&self, f: impl FnOnce(&View<'_>) -> R) -> R {
        let state = self.read_state();
        f(&View { state: &state })
    }

    /// Calls `f` once per accepted write, with every change it made. Dropping the
    /// returned guard unsubscribes.
    pub fn subscribe(&self, f: impl Fn(&Notification) + Send + Sync + 'static) -> Subscription {
        self.inner.notifier.subscribe(None, Arc::new(f))
    }

    /// Calls `f` once per accepted write that touched `kind`, with only that kind's changes.
    pub fn subscribe_kind(
        &self,
        kind: impl Into<Kind>,
        f: impl Fn(&Notification) + Send + Sync + 'static,
    ) -> Subscription {
        self.inner
            .notifier
            .subscribe(Some(kind.into()), Arc::new(f))
    }

    /// Subscribes a shared listener, to the whole store (`kind = None`) or one kind.
    /// Subscribing the same `Arc` twice registers it once.
    pub fn subscribe_listener(&self, kind: Option<Kind>, listener: Listener) -> Subscription {
        self.inner.notifier.subscribe(kind, listener)
    }

    /// How many subscriber panics were caught so far.
    #[must_use]
    pub fn subscriber_panics(&self) -> u64 {
        self.inner.notifier.panics()
    }

    fn key(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    fn guard_reentry(&self) {
        let key = self.key();
        assert!(
            !IN_TRANSACTION.with(|t| t.borrow().contains(&key)),
            "kalphite: the store was called from inside its own transaction; \
             use the Tx handed to the closure instead"
        );
    }

    fn read_state(&self) -> parking_lot::RwLockReadGuard<'_, State> {
        self.guard_reentry();
        self.inner.state.read()
    }

    fn write_state(&self) -> parking_lot::RwLockWriteGuard<'_, State> {
        self.guard_reentry();
        self.inner.state.write()
    }

    /// Runs a typed read against one slot.
    pub(crate) fn with_table<T: EntityData, R>(
        &self,
        slot: usize,
        f: impl FnOnce(&indexmap::IndexMap<crate::EntityId, Arc<Entity<T>>>) -> R,
    ) -> R {
        let state = self.read_state();
        match state.slots[slot].typed::<T>() {
            Some(table) => f(&table.rows),
            None => f(&indexmap::IndexMap::new()),
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}
