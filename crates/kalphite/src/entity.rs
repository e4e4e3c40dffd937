//! Entities: the `{id, type, data, updatedAt}` record every layer stores and moves,
//! the cheap-to-clone [`EntityId`] and [`Kind`] names, and [`AnyEntity`], a type-erased
//! handle that lets JSON-speaking layers read typed entities without re-parsing them.

use std::any::Any;
use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::measure::{JsonMeasure, json_measure};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// The prefix of kalphite's own bookkeeping kinds (`_kalphite_sync_replica`, the server's
/// `_kalphite_room:<room>` log, …).
///
/// The store never holds an entity whose kind starts with it: every write of such a kind
/// (typed or dynamic, local, bulk or remote) is refused with
/// [`Error::ReservedKind`](crate::Error::ReservedKind), [`Store::hydrate`](crate::Store::hydrate)
/// skips such rows, and reads of such a kind find nothing. This keeps a room member from
/// planting an entity that kalphite code would read as its own state.
pub const RESERVED_KIND_PREFIX: &str = "_kalphite_";

/// Whether `kind` is one of kalphite's own bookkeeping kinds (starts with
/// [`RESERVED_KIND_PREFIX`]).
#[must_use]
pub fn is_reserved_kind(kind: &str) -> bool {
    kind.starts_with(RESERVED_KIND_PREFIX)
}

/// The current wall-clock time in milliseconds since the epoch.
#[must_use]
pub fn now_millis() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

macro_rules! shared_str {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Wraps a string.
            pub fn new(s: impl Into<Arc<str>>) -> Self {
                Self(s.into())
            }

            /// The string itself.
            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.into())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s.into())
            }
        }

        impl From<&String> for $name {
            fn from(s: &String) -> Self {
                Self(s.as_str().into())
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }
    };
}

shared_str!(
    /// An entity's id. Cloning is a reference-count increment.
    EntityId
);
shared_str!(
    /// The name of an entity type ("todo", "comment"), serialized as `type`.
    /// Cloning is a reference-count increment.
    Kind
);

/// Data that can live in a typed collection: the user's own Rust type.
///
/// `KIND` names the collection; every entity stored with this data type has that kind.
/// The type must serialize to a JSON object (it is stored and synced as JSON).
///
/// ```
/// use kalphite::EntityKind;
/// #[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
/// struct Todo { title: String, done: bool }
/// impl EntityKind for Todo { const KIND: &'static str = "todo"; }
/// ```
pub trait EntityKind: EntityData {
    /// The kind (entity type name) of this data type.
    const KIND: &'static str;
}

/// What any entity's `data` must support: cloning, JSON round-trips, and sharing
/// across threads. Implemented for every type that has those, including `serde_json::Value`.
pub trait EntityData:
    Serialize + DeserializeOwned + Clone + fmt::Debug + Send + Sync + 'static
{
}
impl<T> EntityData for T where
    T: Serialize + DeserializeOwned + Clone + fmt::Debug + Send + Sync + 'static
{
}

/// One record: an id, its kind, its data and when it was last written.
///
/// The JSON form is `{"id", "type", "data", "updatedAt"}`, as in the original project.
/// `updated_at == 0` means "unset": the store stamps the current time on write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entity<T = Value> {
    /// The id, unique within the store.
    pub id: EntityId,
    /// The entity type.
    #[serde(rename = "type")]
    pub kind: Kind,
    /// The payload.
    pub data: T,
    /// Milliseconds since the epoch of the last write; 0 when not yet stored.
    #[serde(rename = "updatedAt", default)]
    pub updated_at: Millis,
}

impl<T> Entity<T> {
    /// A new record with `updated_at` unset (the store will stamp it).
    pub fn new(id: impl Into<EntityId>, kind: impl Into<Kind>, data: T) -> Self {
        Self {
            id: id.into(),
            kind: kind.into(),
            data,
            updated_at: 0,
        }
    }

    /// The same record with an explicit `updated_at`.
    #[must_use]
    pub fn at(mut self, updated_at: Millis) -> Self {
        self.updated_at = updated_at;
        self
    }
}

impl<T: EntityKind> Entity<T> {
    /// A record of `T`'s kind with `updated_at` unset.
    pub fn of(id: impl Into<EntityId>, data: T) -> Self {
        Self::new(id, T::KIND, data)
    }
}

impl<T: Serialize> Entity<T> {
    /// The JSON form of this record's data.
    ///
    /// # Errors
    /// When `T`'s `Serialize` impl fails (for example a map with non-string keys).
    pub fn data_json(&self) -> Result<Value, serde_json::Error> {
        serde_json::to_value(&self.data)
    }
}

/// A stored entity of any data type, shared and type-erased.
///
/// Layers that speak JSON (flush targets, the database, sync) read it through
/// [`AnyEntity::to_json`]; code that knows the type gets the original `Arc` back with
/// [`AnyEntity::downcast`], so no JSON is built unless someone asks for it.
#[derive(Clone)]
pub struct AnyEntity(Arc<dyn ErasedEntity>);

/// Object-safe view of an `Entity<T>`.
trait ErasedEntity: Send + Sync + 'static {
    fn id(&self) -> &EntityId;
    fn kind(&self) -> &Kind;
    fn updated_at(&self) -> Millis;
    fn data_json(&self) -> Result<Value, serde_json::Error>;
    fn json_measure(&self, find_nul: bool) -> Result<JsonMeasure, serde_json::Error>;
    fn debug(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result;
    fn as_any_arc(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

impl<T: EntityData> ErasedEntity for Entity<T> {
    fn id(&self) -> &EntityId {
        &self.id
    }
    fn kind(&self) -> &Kind {
        &self.kind
    }
    fn updated_at(&self) -> Millis {
        self.updated_at
    }
    fn data_json(&self) -> Result<Value, serde_json::Error> {
        serde_json::to_value(&self.data)
    }
    fn json_measure(&self, find_nul: bool) -> Result<JsonMeasure, serde_json::Error> {
        json_measure(self, find_nul)
    }
    fn debug(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
    fn as_any_arc(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

impl AnyEntity {
    /// Wraps a shared typed entity.
    pub fn new<T: EntityData>(entity: Arc<Entity<T>>) -> Self {
        Self(entity)
    }

    /// The entity's id.
    #[must_use]
    pub fn id(&self) -> &EntityId {
        self.0.id()
    }

    /// The entity's kind.
    #[must_use]
    pub fn kind(&self) -> &Kind {
        self.0.kind()
    }

    /// When the entity was last written, in ms since the epoch.
    #[must_use]
    pub fn updated_at(&self) -> Millis {
        self.0.updated_at()
    }

    /// The entity's data as JSON.
    ///
    /// # Errors
    /// When the data type's `Serialize` impl fails.
    pub fn data_json(&self) -> Result<Value, serde_json::Error> {
        self.0.data_json()
    }

    /// The whole record as JSON data (`Entity<Value>`).
    ///
    /// # Errors
    /// When the data type's `Serialize` impl fails.
    pub fn to_json(&self) -> Result<Entity<Value>, serde_json::Error> {
        Ok(Entity {
            id: self.id().clone(),
            kind: self.kind().clone(),
            data: self.data_json()?,
            updated_at: self.updated_at(),
        })
    }

    /// The whole record measured as JSON, without building the JSON.
    pub(crate) fn json_measure(&self, find_nul: bool) -> Result<JsonMeasure, serde_json::Error> {
        self.0.json_measure(find_nul)
    }

    /// The typed entity, if its data type is `T`.
    #[must_use]
    pub fn downcast<T: EntityData>(&self) -> Option<Arc<Entity<T>>> {
        Arc::clone(&self.0)
            .as_any_arc()
            .downcast::<Entity<T>>()
            .ok()
    }
}

impl fmt::Debug for AnyEntity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.debug(f)
    }
}

impl PartialEq for AnyEntity {
    /// Two handles are equal when they point at the same stored entity, or when their
    /// JSON forms are equal.
    fn eq(&self, other: &Self) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.0), Arc::as_ptr(&other.0))
            || match (self.to_json(), other.to_json()) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            }
    }
}

impl Serialize for AnyEntity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json()
            .map_err(serde::ser::Error::custom)?
            .serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct Comment {
        message: String,
    }

    #[test]
    fn json_form_matches_the_original_field_names() {
        let e = Entity::new("c1", "comment", json!({"message": "hi"})).at(1_700_000_000_000);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            json!({"id": "c1", "type": "comment", "data": {"message": "hi"}, "updatedAt": 1_700_000_000_000u64})
        );
        let back: Entity = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn missing_updated_at_reads_as_unset() {
        let e: Entity =
            serde_json::from_value(json!({"id": "a", "type": "t", "data": {}})).unwrap();
        assert_eq!(e.updated_at, 0);
    }

    #[test]
    fn any_entity_downcasts_to_its_own_type_only() {
        let typed = Arc::new(Entity::new(
            "c1",
            "comment",
            Comment {
                message: "m".into(),
            },
        ));
        let any = AnyEntity::new(Arc::clone(&typed));
        assert!(Arc::ptr_eq(&any.downcast::<Comment>().unwrap(), &typed));
        assert!(any.downcast::<Value>().is_none());
        assert_eq!(any.to_json().unwrap().data, json!({"message": "m"}));
    }

    #[test]
    fn json_measure_counts_the_bytes_of_the_whole_record() {
        let typed = Arc::new(
            Entity::new(
                "c1",
                "comment",
                Comment {
                    message: "héllo \"x\"".into(),
                },
            )
            .at(42),
        );
        let any = AnyEntity::new(Arc::clone(&typed));
        let expected = serde_json::to_vec(&*typed).unwrap().len();
        assert_eq!(json_measure(&*typed, true).unwrap().bytes, expected);
        assert_eq!(any.json_measure(true).unwrap().bytes, expected);
        assert_eq!(
            serde_json::to_vec(&any.to_json().unwrap()).unwrap().len(),
            expected
        );
    }

    #[test]
    fn reserved_kinds_are_the_ones_with_the_prefix() {
        assert!(is_reserved_kind("_kalphite_sync_replica"));
        assert!(is_reserved_kind("_kalphite_"));
        assert!(!is_reserved_kind("kalphite_todo"));
        assert!(!is_reserved_kind("_kalphite"));
        assert!(!is_reserved_kind(""));
    }

    #[test]
    fn ids_compare_with_str_and_clone_cheaply() {
        let id = EntityId::from("abc");
        let copy = id.clone();
        assert_eq!(copy, "abc");
        assert!(std::ptr::eq(id.as_str(), copy.as_str()));
    }
}
