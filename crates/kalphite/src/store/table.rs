//! One kind's entities in insertion order (`Table<T>`), and the object-safe [`ErasedTable`]
//! the store's registry holds, so typed and JSON collections live side by side.

use std::any::{Any, TypeId, type_name};
use std::sync::Arc;

use indexmap::IndexMap;
use serde_json::Value;

use crate::entity::{AnyEntity, Entity, EntityData, EntityId, Kind};
use crate::error::{Error, Result};

/// The entities of one kind, keyed by id, in insertion order (an overwrite keeps its place).
pub(crate) struct Table<T> {
    pub(crate) rows: IndexMap<EntityId, Arc<Entity<T>>>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Self {
            rows: IndexMap::new(),
        }
    }
}

/// The registry's view of a table whose data type it does not know statically.
pub(crate) trait ErasedTable: Send + Sync + 'static {
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    /// `TypeId` of the data type (`serde_json::Value` for dynamic tables).
    fn data_type(&self) -> TypeId;
    fn data_type_name(&self) -> &'static str;
    fn len(&self) -> usize;
    fn get(&self, id: &str) -> Option<AnyEntity>;
    fn get_index(&self, index: usize) -> Option<AnyEntity>;
    fn all(&self) -> Vec<AnyEntity>;
    /// Converts a JSON record into this table's data type (the check a typed kind makes
    /// on data arriving as JSON: from dynamic writes, storage, or the network).
    fn convert(&self, entity: Entity<Value>) -> Result<AnyEntity>;
    /// Inserts (or replaces in place) an entity already converted by [`Self::convert`] or
    /// built for this table; returns the previous entity.
    fn insert(&mut self, entity: AnyEntity) -> Option<AnyEntity>;
    /// Removes an entity, returning where it was and what it was.
    fn remove(&mut self, id: &str) -> Option<(usize, AnyEntity)>;
    /// Puts back an entity removed from `index` (undo of a delete).
    fn reinsert(&mut self, index: usize, entity: AnyEntity);
    /// Undoes the insertion of the last `n` new ids (they are the last rows).
    fn pop_last(&mut self, n: usize);
    /// Removes everything, returning what was there.
    fn take_all(&mut self) -> Vec<AnyEntity>;
    /// Replaces the contents wholesale (undo of a clear).
    fn restore_all(&mut self, rows: Vec<AnyEntity>);
}

impl<T: EntityData> Table<T> {
    fn unerase(entity: &AnyEntity) -> Arc<Entity<T>> {
        // The store only hands a table entities built for its own data type; a mismatch
        // would be a bug in the store, never something input can cause.
        entity.downcast::<T>().unwrap_or_else(|| {
            unreachable!(
                "table of {} given an entity of another type",
                type_name::<T>()
            )
        })
    }

    /// Inserts a typed entity, returning the previous one.
    pub(crate) fn insert_typed(&mut self, entity: Arc<Entity<T>>) -> Option<Arc<Entity<T>>> {
        self.rows.insert(entity.id.clone(), entity)
    }
}

impl<T: EntityData> ErasedTable for Table<T> {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    fn data_type(&self) -> TypeId {
        TypeId::of::<T>()
    }
    fn data_type_name(&self) -> &'static str {
        type_name::<T>()
    }
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn get(&self, id: &str) -> Option<AnyEntity> {
        self.rows.get(id).map(|e| AnyEntity::new(Arc::clone(e)))
    }
    fn get_index(&self, index: usize) -> Option<AnyEntity> {
        self.rows
            .get_index(index)
            .map(|(_, e)| AnyEntity::new(Arc::clone(e)))
    }
    fn all(&self) -> Vec<AnyEntity> {
        self.rows
            .values()
            .map(|e| AnyEntity::new(Arc::clone(e)))
            .collect()
    }
    fn convert(&self, entity: Entity<Value>) -> Result<AnyEntity> {
        let Entity {
            id,
            kind,
            data,
            updated_at,
        } = entity;
        let data: T = serde_json::from_value(data).map_err(|e| Error::Conversion {
            kind: kind.clone(),
            id: id.clone(),
            type_name: type_name::<T>(),
            message: e.to_string(),
        })?;
        Ok(AnyEntity::new(Arc::new(Entity {
            id,
            kind,
            data,
            updated_at,
        })))
    }
    fn insert(&mut self, entity: AnyEntity) -> Option<AnyEntity> {
        self.insert_typed(Self::unerase(&entity))
            .map(AnyEntity::new)
    }
    fn remove(&mut self, id: &str) -> Option<(usize, AnyEntity)> {
        self.rows
            .shift_remove_full(id)
            .map(|(i, _, e)| (i, AnyEntity::new(e)))
    }
    fn reinsert(&mut self, index: usize, entity: AnyEntity) {
        let e = Self::unerase(&entity);
        self.rows.shift_insert(index, e.id.clone(), e);
    }
    fn pop_last(&mut self, n: usize) {
        debug_assert!(n <= self.rows.len());
        self.rows.truncate(self.rows.len().saturating_sub(n));
    }
    fn take_all(&mut self) -> Vec<AnyEntity> {
        std::mem::take(&mut self.rows)
            .into_values()
            .map(AnyEntity::new)
            .collect()
    }
    fn restore_all(&mut self, rows: Vec<AnyEntity>) {
        self.rows = rows
            .iter()
            .map(Self::unerase)
            .map(|e| (e.id.clone(), e))
            .collect::<IndexMap<_, _>>();
    }
}

/// A registered kind: its name and its table.
pub(crate) struct Slot {
    pub(crate) kind: Kind,
    pub(crate) table: Box<dyn ErasedTable>,
}

impl Slot {
    pub(crate) fn new<T: EntityData>(kind: Kind) -> Self {
        Self {
            kind,
            table: Box::new(Table::<T>::default()),
        }
    }

    pub(crate) fn typed<T: EntityData>(&self) -> Option<&Table<T>> {
        self.table.as_any().downcast_ref()
    }

    pub(crate) fn typed_mut<T: EntityData>(&mut self) -> Option<&mut Table<T>> {
        self.table.as_any_mut().downcast_mut()
    }
}
