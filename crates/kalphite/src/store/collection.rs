//! Collection handles: [`Collection<T>`] for the user's own Rust type and [`DynCollection`]
//! for JSON data. A handle is a live view — it holds no rows, it reads the store each time.

use std::marker::PhantomData;
use std::ops::ControlFlow;
use std::sync::{Arc, OnceLock};

use serde_json::Value;

use crate::entity::{Entity, EntityId, EntityKind, Kind};
use crate::error::{Error, Result};
use crate::store::query::{Query, Scan};
use crate::store::table::{ErasedTable, Table};
use crate::store::tx::Tx;
use crate::store::{Notification, Store, Subscription};

/// The entities of one kind, as the user's own type `T` (no JSON on read).
pub struct Collection<T> {
    store: Store,
    slot: usize,
    kind: Kind,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for Collection<T> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            slot: self.slot,
            kind: self.kind.clone(),
            _type: PhantomData,
        }
    }
}

impl<T: EntityKind> Collection<T> {
    pub(crate) fn new(store: Store, slot: usize, kind: Kind) -> Self {
        Self {
            store,
            slot,
            kind,
            _type: PhantomData,
        }
    }

    /// This collection's kind.
    #[must_use]
    pub fn kind(&self) -> &Kind {
        &self.kind
    }

    /// Inserts or replaces `entity` (an existing id keeps its position); returns it as
    /// stored, with `updated_at` stamped if it was unset.
    ///
    /// # Errors
    /// [`Error::WrongKind`] if `entity.kind` is not this collection's, [`Error::EmptyId`],
    /// [`Error::Validation`] if the store's schema rejects it. Nothing changes then.
    pub fn upsert(&self, entity: Entity<T>) -> Result<Arc<Entity<T>>> {
        self.store.transaction(|tx| tx.upsert_in(self.slot, entity))
    }

    /// Inserts or replaces `data` under `id`.
    ///
    /// # Errors
    /// As [`Self::upsert`].
    pub fn put(&self, id: impl Into<EntityId>, data: T) -> Result<Arc<Entity<T>>> {
        self.upsert(Entity::of(id, data))
    }

    /// Deletes the entity `id`; `true` if it existed.
    pub fn delete(&self, id: &str) -> bool {
        self.store
            .transaction::<_, Error>(|tx| Ok(tx.delete_in(self.slot, id)))
            .unwrap_or(false)
    }

    /// Inserts or replaces many entities: all are validated first, then all are applied,
    /// with one notification. Returns how many were written.
    ///
    /// # Errors
    /// The first refused entity's error; nothing is written then.
    pub fn bulk_upsert(&self, entities: impl IntoIterator<Item = Entity<T>>) -> Result<usize> {
        self.store.transaction(|tx| {
            let mut n = 0;
            for e in entities {
                tx.upsert_in(self.slot, e)?;
                n += 1;
            }
            Ok(n)
        })
    }

    /// Removes every entity of this kind, with one notification.
    pub fn clear(&self) {
        // Read the rows through the Tx: calling `self.ids()` here would re-enter the store
        // from inside its own transaction (which panics).
        let _ = self.store.transaction::<_, Error>(|tx| {
            tx.clear_slot(self.slot);
            Ok(())
        });
    }

    /// The entity `id`.
    #[must_use]
    pub fn find_by_id(&self, id: &str) -> Option<Arc<Entity<T>>> {
        self.store
            .with_table::<T, _>(self.slot, |rows| rows.get(id).cloned())
    }

    /// Whether `id` exists.
    #[must_use]
    pub fn contains(&self, id: &str) -> bool {
        self.store
            .with_table::<T, _>(self.slot, |rows| rows.contains_key(id))
    }

    /// The entity at `index` in collection order.
    #[must_use]
    pub fn get(&self, index: usize) -> Option<Arc<Entity<T>>> {
        self.store.with_table::<T, _>(self.slot, |rows| {
            rows.get_index(index).map(|(_, e)| e.clone())
        })
    }

    /// How many entities there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.store
            .with_table::<T, _>(self.slot, indexmap::IndexMap::len)
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entity, in collection order, as of now.
    #[must_use]
    pub fn snapshot(&self) -> Vec<Arc<Entity<T>>> {
        self.store
            .with_table::<T, _>(self.slot, |rows| rows.values().cloned().collect())
    }

    /// Iterates over a snapshot, in collection order.
    pub fn iter(&self) -> std::vec::IntoIter<Arc<Entity<T>>> {
        self.snapshot().into_iter()
    }

    /// Every id, in collection order.
    #[must_use]
    pub fn ids(&self) -> Vec<EntityId> {
        self.store
            .with_table::<T, _>(self.slot, |rows| rows.keys().cloned().collect())
    }

    /// The entities for which `pred` holds, in collection order (the spec's `where`).
    pub fn filter(&self, pred: impl Fn(&Entity<T>) -> bool) -> Vec<Arc<Entity<T>>> {
        // A direct scan: the predicate is inlined instead of called through the query's
        // boxed filters (twice as fast over 100k rows).
        self.store.with_table::<T, _>(self.slot, |rows| {
            rows.values().filter(|e| pred(e)).cloned().collect()
        })
    }

    /// The first entity for which `pred` holds.
    pub fn find(&self, pred: impl Fn(&Entity<T>) -> bool) -> Option<Arc<Entity<T>>> {
        self.store
            .with_table::<T, _>(self.slot, |rows| rows.values().find(|e| pred(e)).cloned())
    }

    /// Every entity ordered by `key` (stable: ties keep collection order). The
    /// collection itself is not reordered.
    pub fn order_by<K: Ord>(&self, key: impl Fn(&Entity<T>) -> K) -> Vec<Arc<Entity<T>>> {
        self.query().order_by(key).collect()
    }

    /// A chainable query.
    pub fn query(&self) -> Query<'_, T> {
        Query::new(self)
    }

    /// Calls `f` once per accepted write that touched this kind.
    pub fn subscribe(&self, f: impl Fn(&Notification) + Send + Sync + 'static) -> Subscription {
        self.store.subscribe_kind(self.kind.clone(), f)
    }
}

impl<T: EntityKind> Scan<T> for Collection<T> {
    fn scan(&self, f: &mut dyn FnMut(&Arc<Entity<T>>) -> ControlFlow<()>) {
        self.store.with_table::<T, _>(self.slot, |rows| {
            for e in rows.values() {
                if f(e).is_break() {
                    break;
                }
            }
        });
    }
}

impl<T: EntityKind> IntoIterator for &Collection<T> {
    type Item = Arc<Entity<T>>;
    type IntoIter = std::vec::IntoIter<Arc<Entity<T>>>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<T: EntityKind> std::fmt::Debug for Collection<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collection")
            .field("kind", &self.kind)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

/// The entities of one kind as JSON. Works for every kind, including typed ones (their
/// data is converted to and from JSON at the boundary).
#[derive(Clone)]
pub struct DynCollection {
    store: Store,
    kind: Kind,
    /// The kind's slot once it exists. Slots are never removed or moved (a conversion to a
    /// typed table replaces the table in place), so the index stays valid, and reads skip
    /// hashing the kind name on every call.
    slot: OnceLock<usize>,
}

impl DynCollection {
    pub(crate) fn new(store: Store, kind: Kind) -> Self {
        Self {
            store,
            kind,
            slot: OnceLock::new(),
        }
    }

    /// This collection's kind.
    #[must_use]
    pub fn kind(&self) -> &Kind {
        &self.kind
    }

    /// The kind's slot inside a write, created as a JSON table if it does not exist.
    ///
    /// # Errors
    /// [`Error::ReservedKind`] for kalphite's own bookkeeping kinds.
    fn slot_in(&self, tx: &mut Tx<'_>) -> Result<usize> {
        if let Some(&slot) = self.slot.get() {
            return Ok(slot);
        }
        let slot = tx.state.slot_for_json(&self.kind)?;
        let _ = self.slot.set(slot);
        Ok(slot)
    }

    /// Runs a read against the kind's table (`None` while the kind has no slot).
    fn with_table<R>(&self, f: impl FnOnce(Option<&dyn ErasedTable>) -> R) -> R {
        self.store.read(|view| {
            let slot = self.slot.get().copied().or_else(|| {
                let slot = view.state.slot_index(&self.kind)?;
                let _ = self.slot.set(slot);
                Some(slot)
            });
            f(slot.map(|s| &*view.state.slots[s].table))
        })
    }

    /// Inserts or replaces `entity`; returns it as stored (schema defaults applied,
    /// `updated_at` stamped if unset).
    ///
    /// # Errors
    /// [`Error::ReservedKind`] for kalphite's own bookkeeping kinds, [`Error::WrongKind`],
    /// [`Error::EmptyId`], [`Error::NotAnObject`], [`Error::Validation`],
    /// [`Error::Conversion`]. Nothing changes then.
    pub fn upsert(&self, entity: Entity<Value>) -> Result<Arc<Entity<Value>>> {
        let stored = self.store.transaction(|tx| {
            let slot = self.slot_in(tx)?;
            tx.upsert_json_in(slot, entity)
        })?;
        Ok(stored.downcast::<Value>().unwrap_or_else(|| {
            Arc::new(stored.to_json().unwrap_or_else(|_| {
                Entity::new(stored.id().clone(), self.kind.clone(), Value::Null)
            }))
        }))
    }

    /// Inserts or replaces `data` under `id`.
    ///
    /// # Errors
    /// As [`Self::upsert`].
    pub fn put(&self, id: impl Into<EntityId>, data: Value) -> Result<Arc<Entity<Value>>> {
        self.upsert(Entity::new(id, self.kind.clone(), data))
    }

    /// Deletes the entity `id`; `true` if it existed.
    pub fn delete(&self, id: &str) -> bool {
        self.store
            .transaction::<_, Error>(|tx| Ok(tx.delete_json(&self.kind, id)))
            .unwrap_or(false)
    }

    /// Inserts or replaces many entities, validated first, one notification.
    ///
    /// # Errors
    /// The first refused entity's error; nothing is written then.
    pub fn bulk_upsert(&self, entities: impl IntoIterator<Item = Entity<Value>>) -> Result<usize> {
        self.store.transaction(|tx| {
            let slot = self.slot_in(tx)?;
            let mut n = 0;
            for e in entities {
                tx.upsert_json_in(slot, e)?;
                n += 1;
            }
            Ok(n)
        })
    }

    /// The entity `id`.
    #[must_use]
    pub fn find_by_id(&self, id: &str) -> Option<Arc<Entity<Value>>> {
        self.with_table(|t| {
            let t = t?;
            // JSON rows are handed out as they are, without a round trip through AnyEntity.
            match t.as_any().downcast_ref::<Table<Value>>() {
                Some(table) => table.rows.get(id).cloned(),
                None => t.get(id).and_then(|e| json_arc(&e)),
            }
        })
    }

    /// The entity at `index` in collection order.
    #[must_use]
    pub fn get(&self, index: usize) -> Option<Arc<Entity<Value>>> {
        self.with_table(|t| {
            t.and_then(|t| t.get_index(index))
                .and_then(|e| json_arc(&e))
        })
    }

    /// How many entities there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.with_table(|t| t.map_or(0, ErasedTable::len))
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entity, in collection order, as of now.
    #[must_use]
    pub fn snapshot(&self) -> Vec<Arc<Entity<Value>>> {
        self.query().collect()
    }

    /// Iterates over a snapshot.
    pub fn iter(&self) -> std::vec::IntoIter<Arc<Entity<Value>>> {
        self.snapshot().into_iter()
    }

    /// The entities for which `pred` holds, in collection order.
    pub fn filter(&self, pred: impl Fn(&Entity<Value>) -> bool) -> Vec<Arc<Entity<Value>>> {
        self.query().filter(pred).collect()
    }

    /// The first entity for which `pred` holds.
    pub fn find(&self, pred: impl Fn(&Entity<Value>) -> bool) -> Option<Arc<Entity<Value>>> {
        self.query().filter(pred).first()
    }

    /// A chainable query.
    pub fn query(&self) -> Query<'_, Value> {
        Query::new(self)
    }

    /// Calls `f` once per accepted write that touched this kind.
    pub fn subscribe(&self, f: impl Fn(&Notification) + Send + Sync + 'static) -> Subscription {
        self.store.subscribe_kind(self.kind.clone(), f)
    }
}

fn json_arc(e: &crate::AnyEntity) -> Option<Arc<Entity<Value>>> {
    e.downcast::<Value>()
        .or_else(|| e.to_json().ok().map(Arc::new))
}

impl Scan<Value> for DynCollection {
    fn scan(&self, f: &mut dyn FnMut(&Arc<Entity<Value>>) -> ControlFlow<()>) {
        self.with_table(|t| {
            let Some(t) = t else { return };
            if let Some(table) = t.as_any().downcast_ref::<Table<Value>>() {
                for e in table.rows.values() {
                    if f(e).is_break() {
                        break;
                    }
                }
            } else {
                for e in t.all() {
                    let Some(json) = json_arc(&e) else { continue };
                    if f(&json).is_break() {
                        break;
                    }
                }
            }
        });
    }
}

impl IntoIterator for &DynCollection {
    type Item = Arc<Entity<Value>>;
    type IntoIter = std::vec::IntoIter<Arc<Entity<Value>>>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl std::fmt::Debug for DynCollection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynCollection")
            .field("kind", &self.kind)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}
