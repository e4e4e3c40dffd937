//! Writes and consistent reads: [`Tx`] applies writes under the store's write lock and can
//! undo them all (a transaction is all or nothing); [`View`] reads several kinds under one
//! read lock, so it never sees half of a transaction.

use std::any::{TypeId, type_name};
use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::change::{Change, Origin};
use crate::entity::{
    AnyEntity, Entity, EntityData, EntityId, EntityKind, Kind, Millis, is_reserved_kind, now_millis,
};
use crate::error::{Error, Result, json_type_name};
use crate::measure::{JsonMeasure, json_measure, nul_field};
use crate::schema::Schema;
use crate::store::table::{ErasedTable, Slot, Table};

/// Every kind's table, in registration order.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) slots: Vec<Slot>,
    pub(crate) by_kind: HashMap<Kind, usize>,
    /// The last transaction's undo log, emptied, so that single writes do not allocate
    /// one each (it is only touched under the write lock).
    spare_undo: Vec<Undo>,
}

/// Largest undo log kept for reuse (a bulk load's is dropped instead of held).
const SPARE_UNDO_MAX: usize = 64;

impl State {
    pub(crate) fn slot_index(&self, kind: &str) -> Option<usize> {
        self.by_kind.get(kind).copied()
    }

    fn add_slot(&mut self, slot: Slot) -> usize {
        let index = self.slots.len();
        self.by_kind.insert(slot.kind.clone(), index);
        self.slots.push(slot);
        index
    }

    /// The slot of `kind`, created as a JSON table if it does not exist.
    ///
    /// # Errors
    /// [`Error::ReservedKind`]: a reserved kind never gets a slot, so it never holds an
    /// entity and every read of it finds nothing.
    pub(crate) fn slot_for_json(&mut self, kind: &Kind) -> Result<usize> {
        refuse_reserved(kind)?;
        Ok(match self.slot_index(kind) {
            Some(i) => i,
            None => self.add_slot(Slot::new::<Value>(kind.clone())),
        })
    }

    /// The slot of `kind` holding `T`: created if absent; converted if it holds JSON
    /// (every row must fit `T`, or nothing changes); an error if it holds another type.
    pub(crate) fn slot_for_type<T: EntityData>(&mut self, kind: &Kind) -> Result<usize> {
        self.slot_for_type_converting::<T>(kind)
            .map(|(index, _)| index)
    }

    /// [`Self::slot_for_type`], also returning the JSON table it replaced when it converted
    /// one, so that a transaction can put it back on rollback.
    pub(crate) fn slot_for_type_converting<T: EntityData>(
        &mut self,
        kind: &Kind,
    ) -> Result<(usize, Option<Box<dyn ErasedTable>>)> {
        refuse_reserved(kind)?;
        let Some(index) = self.slot_index(kind) else {
            return Ok((self.add_slot(Slot::new::<T>(kind.clone())), None));
        };
        let slot = &mut self.slots[index];
        let existing = slot.table.data_type();
        if existing == TypeId::of::<T>() {
            return Ok((index, None));
        }
        if existing != TypeId::of::<Value>() {
            return Err(Error::KindTypeMismatch {
                kind: kind.clone(),
                existing: slot.table.data_type_name(),
                requested: type_name::<T>(),
            });
        }
        let mut typed = Table::<T>::default();
        for row in slot.table.all() {
            let json = row.downcast::<Value>().map(|e| (*e).clone());
            let Some(json) = json else { continue };
            let converted = typed.convert(json)?;
            typed.insert(converted);
        }
        let json_table = std::mem::replace(&mut slot.table, Box::new(typed));
        Ok((index, Some(json_table)))
    }
}

/// [`Error::ReservedKind`] for kalphite's own bookkeeping kinds.
fn refuse_reserved(kind: &Kind) -> Result<()> {
    if is_reserved_kind(kind) {
        return Err(Error::ReservedKind { kind: kind.clone() });
    }
    Ok(())
}

/// What a local transaction checks each upsert against: what the store knows at write
/// time that the database or the server would refuse later (and then forever).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LocalChecks {
    /// The entity size limit (see [`crate::Store::set_max_entity_bytes`]).
    pub(crate) max_bytes: Option<usize>,
    /// Refuse NUL characters (see [`crate::Store::set_refuse_nul`]).
    pub(crate) refuse_nul: bool,
}

impl LocalChecks {
    /// Whether anything is checked (otherwise nothing is measured).
    fn any(self) -> bool {
        self.max_bytes.is_some() || self.refuse_nul
    }

    /// Refuses a record measured as `measure`: [`Error::EntityTooLarge`] over the limit,
    /// [`Error::Unstorable`] when it holds a NUL (`data` gives the JSON to say where).
    fn check(
        self,
        measure: JsonMeasure,
        kind: &Kind,
        id: &EntityId,
        data: impl FnOnce() -> Result<Value, serde_json::Error>,
    ) -> Result<()> {
        if let Some(limit) = self.max_bytes
            && measure.bytes > limit
        {
            return Err(Error::EntityTooLarge {
                kind: kind.clone(),
                id: id.clone(),
                bytes: measure.bytes,
                limit,
            });
        }
        if measure.nul {
            let data = data().map_err(|e| serialize_error(kind, id, &e))?;
            return Err(Error::Unstorable {
                kind: kind.clone(),
                id: id.clone(),
                // The measure found one, so the walk does too; the fallback is for form.
                field: nul_field(kind, id, &data).unwrap_or_else(|| "a string".to_owned()),
            });
        }
        Ok(())
    }
}

fn serialize_error(kind: &Kind, id: &EntityId, e: &serde_json::Error) -> Error {
    Error::Serialize {
        kind: kind.clone(),
        id: id.clone(),
        message: e.to_string(),
    }
}

enum Undo {
    /// `count` new ids were appended to the slot (consecutive inserts share one entry).
    Inserted {
        slot: usize,
        count: usize,
    },
    Replaced {
        slot: usize,
        prev: AnyEntity,
    },
    Removed {
        slot: usize,
        index: usize,
        prev: AnyEntity,
    },
    Cleared {
        slot: usize,
        rows: Vec<AnyEntity>,
    },
    /// A JSON table was converted to a typed one; earlier undo entries of this slot hold
    /// JSON entities, so the JSON table must be back in place before they are undone.
    Converted {
        slot: usize,
        json_table: Box<dyn ErasedTable>,
    },
}

/// A write in progress, handed to [`crate::Store::transaction`]'s closure. Everything it
/// writes is applied together, or — if the closure fails or panics — not at all.
///
/// Use the `Tx` for every read and write inside the closure: calling the store itself
/// there would wait on the lock the transaction holds (kalphite panics instead, loudly).
pub struct Tx<'a> {
    pub(crate) state: &'a mut State,
    pub(crate) schema: Option<&'a dyn Schema>,
    pub(crate) origin: Origin,
    /// The transaction's timestamp (every change and stamped `updated_at` share it), read
    /// from the clock on first use: writes that carry their own `updated_at` and that
    /// nobody observes never read the clock (a measurable cost per single write).
    now: Option<Millis>,
    /// Whether anyone (a sink, a subscriber) will read the change records.
    pub(crate) record: bool,
    /// What this transaction's upserts are checked against (nothing for a remote or
    /// storage transaction).
    checks: LocalChecks,
    pub(crate) changes: Vec<Change>,
    undo: Vec<Undo>,
}

impl<'a> Tx<'a> {
    pub(crate) fn new(
        state: &'a mut State,
        schema: Option<&'a dyn Schema>,
        origin: Origin,
        record: bool,
        checks: LocalChecks,
    ) -> Self {
        let undo = std::mem::take(&mut state.spare_undo);
        Self {
            state,
            schema,
            origin,
            now: None,
            record,
            checks,
            changes: Vec::new(),
            undo,
        }
    }

    /// Inserts or replaces a typed entity; returns it as stored.
    ///
    /// # Errors
    /// [`Error::ReservedKind`] if `T::KIND` is reserved (see
    /// [`crate::RESERVED_KIND_PREFIX`]), [`Error::WrongKind`] if `entity.kind` is not
    /// `T::KIND`, [`Error::EmptyId`], [`Error::Validation`] if the store's schema rejects it,
    /// [`Error::EntityTooLarge`] in a local transaction when the store has a size limit
    /// (see [`crate::Store::set_max_entity_bytes`]), [`Error::Unstorable`] in one when it
    /// refuses NUL characters (see [`crate::Store::set_refuse_nul`]).
    pub fn upsert<T: EntityKind>(&mut self, entity: Entity<T>) -> Result<Arc<Entity<T>>> {
        let (slot, converted) = self
            .state
            .slot_for_type_converting::<T>(&Kind::from(T::KIND))?;
        if let Some(json_table) = converted {
            self.undo.push(Undo::Converted { slot, json_table });
        }
        self.upsert_in(slot, entity)
    }

    /// Inserts or replaces `T` data under `id`.
    ///
    /// # Errors
    /// As [`Self::upsert`].
    pub fn put<T: EntityKind>(
        &mut self,
        id: impl Into<EntityId>,
        data: T,
    ) -> Result<Arc<Entity<T>>> {
        self.upsert(Entity::of(id, data))
    }

    /// Deletes a typed entity; `true` if it existed.
    pub fn delete<T: EntityKind>(&mut self, id: &str) -> bool {
        self.state
            .slot_index(T::KIND)
            .is_some_and(|slot| self.delete_in(slot, id))
    }

    /// Inserts or replaces an entity given as JSON, in whatever collection its kind has.
    ///
    /// # Errors
    /// [`Error::ReservedKind`] for kalphite's own bookkeeping kinds (see
    /// [`crate::RESERVED_KIND_PREFIX`]; whatever the origin: a room member cannot plant
    /// one), [`Error::EmptyId`], [`Error::EmptyKind`], [`Error::NotAnObject`],
    /// [`Error::Validation`], [`Error::Conversion`] when the kind is typed and the data
    /// does not fit its Rust type, or, in a local transaction, [`Error::EntityTooLarge`]
    /// when the store has a size limit (see [`crate::Store::set_max_entity_bytes`]) and
    /// [`Error::Unstorable`] when it refuses NUL characters (see
    /// [`crate::Store::set_refuse_nul`]).
    pub fn upsert_json(&mut self, entity: Entity<Value>) -> Result<AnyEntity> {
        let slot = self.state.slot_for_json(&entity.kind)?;
        self.upsert_json_in(slot, entity)
    }

    /// Deletes the entity `(kind, id)`; `true` if it existed. A reserved kind never holds
    /// an entity, so deleting one finds nothing and announces nothing.
    pub fn delete_json(&mut self, kind: &str, id: &str) -> bool {
        self.state
            .slot_index(kind)
            .is_some_and(|slot| self.delete_in(slot, id))
    }

    /// Removes every entity of every kind.
    pub fn clear(&mut self) {
        for slot in 0..self.state.slots.len() {
            self.clear_slot(slot);
        }
    }

    /// Removes every entity of one kind (a delete change each, in collection order).
    pub(crate) fn clear_slot(&mut self, slot: usize) {
        let rows = self.state.slots[slot].table.take_all();
        if rows.is_empty() {
            return;
        }
        if self.record {
            let now = self.now();
            let kind = &self.state.slots[slot].kind;
            self.changes.extend(
                rows.iter()
                    .map(|e| Change::delete(kind.clone(), e.id().clone(), now, self.origin)),
            );
        }
        self.undo.push(Undo::Cleared { slot, rows });
    }

    /// Reads a typed entity, seeing this transaction's own writes.
    #[must_use]
    pub fn get<T: EntityKind>(&self, id: &str) -> Option<Arc<Entity<T>>> {
        get_typed(self.state, T::KIND, id)
    }

    /// Reads any entity, seeing this transaction's own writes.
    #[must_use]
    pub fn get_any(&self, kind: &str, id: &str) -> Option<AnyEntity> {
        let slot = self.state.slot_index(kind)?;
        self.state.slots[slot].table.get(id)
    }

    pub(crate) fn upsert_in<T: EntityData>(
        &mut self,
        slot: usize,
        mut entity: Entity<T>,
    ) -> Result<Arc<Entity<T>>> {
        self.check_identity(slot, &entity.kind, &entity.id)?;
        if entity.updated_at == 0 {
            entity.updated_at = self.now();
        }
        if let Some(schema) = self.schema {
            let ser = |e: serde_json::Error| Error::Serialize {
                kind: entity.kind.clone(),
                id: entity.id.clone(),
                message: e.to_string(),
            };
            let json = serde_json::to_value(&entity.data).map_err(ser)?;
            let normalized = schema
                .normalize(&entity.kind, json.clone())
                .map_err(|issues| Error::Validation {
                    kind: entity.kind.clone(),
                    id: entity.id.clone(),
                    issues,
                })?;
            if normalized != json {
                entity.data =
                    serde_json::from_value(normalized).map_err(|e| Error::Conversion {
                        kind: entity.kind.clone(),
                        id: entity.id.clone(),
                        type_name: type_name::<T>(),
                        message: e.to_string(),
                    })?;
            }
        }
        if self.checks.any() {
            let measure = json_measure(&entity, self.checks.refuse_nul)
                .map_err(|e| serialize_error(&entity.kind, &entity.id, &e))?;
            self.checks.check(measure, &entity.kind, &entity.id, || {
                serde_json::to_value(&entity.data)
            })?;
        }
        let entity = Arc::new(entity);
        let Some(table) = self.state.slots[slot].typed_mut::<T>() else {
            return Err(Error::KindTypeMismatch {
                kind: entity.kind.clone(),
                existing: self.state.slots[slot].table.data_type_name(),
                requested: type_name::<T>(),
            });
        };
        match table.insert_typed(Arc::clone(&entity)) {
            Some(prev) => self.undo.push(Undo::Replaced {
                slot,
                prev: AnyEntity::new(prev),
            }),
            None => self.push_inserted(slot),
        }
        if self.record {
            let now = self.now();
            self.changes.push(Change::upsert(
                AnyEntity::new(Arc::clone(&entity)),
                now,
                self.origin,
            ));
        }
        Ok(entity)
    }

    pub(crate) fn upsert_json_in(
        &mut self,
        slot: usize,
        mut entity: Entity<Value>,
    ) -> Result<AnyEntity> {
        self.check_identity(slot, &entity.kind, &entity.id)?;
        if !entity.data.is_object() {
            return Err(Error::NotAnObject {
                kind: entity.kind,
                id: entity.id,
                found: json_type_name(&entity.data),
            });
        }
        if entity.updated_at == 0 {
            entity.updated_at = self.now();
        }
        if let Some(schema) = self.schema {
            entity.data = schema
                .normalize(&entity.kind, entity.data)
                .map_err(|issues| Error::Validation {
                    kind: entity.kind.clone(),
                    id: entity.id.clone(),
                    issues,
                })?;
        }
        let table = &mut self.state.slots[slot].table;
        let stored = if table.data_type() == TypeId::of::<Value>() {
            AnyEntity::new(Arc::new(entity))
        } else {
            table.convert(entity)?
        };
        if self.checks.any() {
            // Measured as stored: a typed kind's record is what its Rust type serializes to.
            let measure = stored
                .json_measure(self.checks.refuse_nul)
                .map_err(|e| serialize_error(stored.kind(), stored.id(), &e))?;
            self.checks
                .check(measure, stored.kind(), stored.id(), || stored.data_json())?;
        }
        match table.insert(stored.clone()) {
            Some(prev) => self.undo.push(Undo::Replaced { slot, prev }),
            None => self.push_inserted(slot),
        }
        if self.record {
            let now = self.now();
            self.changes
                .push(Change::upsert(stored.clone(), now, self.origin));
        }
        Ok(stored)
    }

    /// The transaction's timestamp, read from the clock the first time it is needed.
    fn now(&mut self) -> Millis {
        *self.now.get_or_insert_with(now_millis)
    }

    /// Records that a new id was appended to `slot`, merging with a preceding insert into
    /// the same slot (a bulk load keeps one undo entry per run instead of one per entity).
    fn push_inserted(&mut self, slot: usize) {
        if let Some(Undo::Inserted { slot: last, count }) = self.undo.last_mut()
            && *last == slot
        {
            *count += 1;
            return;
        }
        self.undo.push(Undo::Inserted { slot, count: 1 });
    }

    pub(crate) fn delete_in(&mut self, slot: usize, id: &str) -> bool {
        let Some((index, prev)) = self.state.slots[slot].table.remove(id) else {
            return false;
        };
        if self.record {
            let now = self.now();
            let kind = self.state.slots[slot].kind.clone();
            self.changes
                .push(Change::delete(kind, prev.id().clone(), now, self.origin));
        }
        self.undo.push(Undo::Removed { slot, index, prev });
        true
    }

    fn check_identity(&self, slot: usize, kind: &Kind, id: &EntityId) -> Result<()> {
        let expected = &self.state.slots[slot].kind;
        if kind != expected {
            return Err(Error::WrongKind {
                expected: expected.clone(),
                actual: kind.clone(),
                id: id.clone(),
            });
        }
        if kind.is_empty() {
            return Err(Error::EmptyKind { id: id.clone() });
        }
        if id.is_empty() {
            return Err(Error::EmptyId { kind: kind.clone() });
        }
        Ok(())
    }

    /// Undoes every write, newest first, leaving the tables as they were.
    pub(crate) fn rollback(&mut self) {
        while let Some(undo) = self.undo.pop() {
            match undo {
                Undo::Inserted { slot, count } => self.state.slots[slot].table.pop_last(count),
                Undo::Replaced { slot, prev } => {
                    self.state.slots[slot].table.insert(prev);
                }
                Undo::Removed { slot, index, prev } => {
                    self.state.slots[slot].table.reinsert(index, prev);
                }
                Undo::Cleared { slot, rows } => self.state.slots[slot].table.restore_all(rows),
                Undo::Converted { slot, json_table } => self.state.slots[slot].table = json_table,
            }
        }
        self.changes.clear();
    }

    /// Whether anything was written.
    pub(crate) fn is_dirty(&self) -> bool {
        // A conversion alone changes no entity (and announces nothing).
        self.undo
            .iter()
            .any(|u| !matches!(u, Undo::Converted { .. }))
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.undo.capacity() <= SPARE_UNDO_MAX {
            self.undo.clear();
            self.state.spare_undo = std::mem::take(&mut self.undo);
        }
    }
}

pub(crate) fn get_typed<T: EntityData>(
    state: &State,
    kind: &str,
    id: &str,
) -> Option<Arc<Entity<T>>> {
    let slot = state.slot_index(kind)?;
    state.slots[slot].typed::<T>()?.rows.get(id).cloned()
}

/// A consistent read of the whole store, handed to [`crate::Store::read`]'s closure.
pub struct View<'a> {
    pub(crate) state: &'a State,
}

impl View<'_> {
    /// A typed entity.
    #[must_use]
    pub fn get<T: EntityKind>(&self, id: &str) -> Option<Arc<Entity<T>>> {
        get_typed(self.state, T::KIND, id)
    }

    /// Any entity.
    #[must_use]
    pub fn get_any(&self, kind: &str, id: &str) -> Option<AnyEntity> {
        let slot = self.state.slot_index(kind)?;
        self.state.slots[slot].table.get(id)
    }

    /// How many entities `kind` holds.
    #[must_use]
    pub fn len(&self, kind: &str) -> usize {
        self.state
            .slot_index(kind)
            .map_or(0, |s| self.state.slots[s].table.len())
    }

    /// Every entity of `T`'s kind, in order.
    #[must_use]
    pub fn all<T: EntityKind>(&self) -> Vec<Arc<Entity<T>>> {
        self.state
            .slot_index(T::KIND)
            .and_then(|s| self.state.slots[s].typed::<T>())
            .map(|t| t.rows.values().cloned().collect())
            .unwrap_or_default()
    }
}
