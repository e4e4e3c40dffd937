//! Conflict resolution: what the room does when a change is concurrent with the entity's
//! current state (neither vector clock dominates). Every strategy is a pure function of the
//! two versions (and the merge base), symmetric in its inputs, so the answer does not
//! depend on which one arrived first. The rules are explained in `docs/sync.md`.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use kalphite::{Entity, Kind, Millis};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::protocol::StrategyName;

/// Who wrote a version and when: the last-write-wins key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stamp {
    /// The write's time: the entity's `updatedAt` for upserts (the change's timestamp when
    /// that is unset), the change's timestamp for deletes.
    pub at: Millis,
    /// The author's user id.
    pub user_id: String,
}

/// One version of an entity: its state (`None` = deleted) and its stamp.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Version {
    /// The entity, or `None` for a tombstone.
    pub state: Option<Entity<Value>>,
    /// Who wrote it and when.
    pub stamp: Stamp,
}

impl Version {
    /// A version.
    #[must_use]
    pub fn new(state: Option<Entity<Value>>, stamp: Stamp) -> Self {
        Self { state, stamp }
    }

    /// True for a tombstone.
    #[must_use]
    pub fn is_delete(&self) -> bool {
        self.state.is_none()
    }

    /// The total last-write-wins order: later `at` wins; on equal `at` a delete beats an
    /// upsert; then the greater user id; then the greater content hash. Two versions
    /// compare `Equal` only when they are identical in all four.
    #[must_use]
    pub fn lww_cmp(&self, other: &Self) -> Ordering {
        self.stamp
            .at
            .cmp(&other.stamp.at)
            .then_with(|| self.is_delete().cmp(&other.is_delete()))
            .then_with(|| self.stamp.user_id.cmp(&other.stamp.user_id))
            .then_with(|| {
                content_hash(self.state.as_ref()).cmp(&content_hash(other.state.as_ref()))
            })
    }
}

/// A concurrent pair the room must resolve. `current` is the room's state, `incoming` the
/// change that arrived; strategies treat them symmetrically.
#[derive(Clone, Debug, PartialEq)]
pub struct ConflictCase {
    /// The entity's kind.
    pub kind: Kind,
    /// The common ancestor, when the room still knows it: `Some(None)` means the entity did
    /// not exist at the base; `None` means the base is unknown.
    pub base: Option<Option<Entity<Value>>>,
    /// The room's current version.
    pub current: Version,
    /// The concurrent incoming version.
    pub incoming: Version,
}

impl ConflictCase {
    /// The last-write-wins winner of the two.
    #[must_use]
    pub fn lww_winner(&self) -> &Version {
        if self.incoming.lww_cmp(&self.current) == Ordering::Greater {
            &self.incoming
        } else {
            &self.current
        }
    }
}

/// An application's resolver: given the conflict, the state to keep (`None` = deleted).
/// It must be deterministic. The id and kind of what it returns are forced to the
/// conflicting entity's.
pub type Resolver = Arc<dyn Fn(&ConflictCase) -> Option<Entity<Value>> + Send + Sync>;

/// How concurrent edits of an entity are resolved.
#[derive(Clone)]
#[non_exhaustive]
pub enum Strategy {
    /// The whole version with the greater [`Version::lww_cmp`] wins.
    LastWriteWins,
    /// Three-way merge of the top-level fields of `data`: a field changed on one side only
    /// keeps that change; a field changed on both falls back to last-write-wins.
    FieldMerge,
    /// The room keeps the last-write-wins result for now and tells the author, whose app
    /// picks a version and writes it as a new change.
    Manual,
    /// An application resolver.
    Custom(Resolver),
}

impl Strategy {
    /// A custom strategy from a closure.
    pub fn custom(
        f: impl Fn(&ConflictCase) -> Option<Entity<Value>> + Send + Sync + 'static,
    ) -> Self {
        Self::Custom(Arc::new(f))
    }

    /// The strategy's wire name.
    #[must_use]
    pub fn name(&self) -> StrategyName {
        match self {
            Self::LastWriteWins => StrategyName::LastWriteWins,
            Self::FieldMerge => StrategyName::FieldMerge,
            Self::Manual => StrategyName::Manual,
            Self::Custom(_) => StrategyName::Custom,
        }
    }

    /// Resolves a concurrent pair.
    #[must_use]
    pub fn resolve(&self, case: &ConflictCase) -> Version {
        let winner = case.lww_winner();
        match self {
            Self::LastWriteWins | Self::Manual => winner.clone(),
            Self::FieldMerge => field_merge(case),
            Self::Custom(resolver) => {
                let state = resolver(case).map(|mut e| {
                    let (id, kind) = identity(case);
                    e.id = id;
                    e.kind = kind;
                    e
                });
                Version::new(state, winner.stamp.clone())
            }
        }
    }
}

impl fmt::Debug for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::LastWriteWins => "LastWriteWins",
            Self::FieldMerge => "FieldMerge",
            Self::Manual => "Manual",
            Self::Custom(_) => "Custom(..)",
        })
    }
}

/// The id and kind of the conflicting entity.
fn identity(case: &ConflictCase) -> (kalphite::EntityId, Kind) {
    let from = case.current.state.as_ref().or(case.incoming.state.as_ref());
    match from {
        Some(e) => (e.id.clone(), e.kind.clone()),
        // Both deleted: a resolver that resurrects gets an empty id; the room never asks
        // (two deletes are resolved before a strategy runs).
        None => (kalphite::EntityId::from(""), case.kind.clone()),
    }
}

/// The field-level three-way merge. Falls back to whole-entity last-write-wins when either
/// side is a delete, when the base is unknown, or when `data` is not an object on a side.
// `a`/`b` (the two sides), `o` (their base) and `x`/`y` are the usual names of a three-way
// merge.
#[allow(clippy::many_single_char_names)]
fn field_merge(case: &ConflictCase) -> Version {
    let winner = case.lww_winner();
    let (Some(base), Some(a), Some(b)) = (
        case.base.as_ref(),
        case.current.state.as_ref(),
        case.incoming.state.as_ref(),
    ) else {
        return winner.clone();
    };
    let (Some(a_fields), Some(b_fields)) = (a.data.as_object(), b.data.as_object()) else {
        return winner.clone();
    };
    let empty = Map::new();
    let base_fields = match base.as_ref().map(|e| e.data.as_object()) {
        Some(Some(fields)) => fields,
        Some(None) => return winner.clone(),
        None => &empty,
    };
    let winner_fields = if std::ptr::eq(winner, &raw const case.incoming) {
        b_fields
    } else {
        a_fields
    };
    let mut merged = Map::new();
    let keys: std::collections::BTreeSet<&String> =
        a_fields.keys().chain(b_fields.keys()).collect();
    for key in keys {
        let (x, y, o) = (a_fields.get(key), b_fields.get(key), base_fields.get(key));
        let value = if x == y {
            x
        } else if x == o {
            y
        } else if y == o {
            x
        } else {
            winner_fields.get(key)
        };
        if let Some(v) = value {
            merged.insert(key.clone(), v.clone());
        }
    }
    let mut entity = Entity::new(a.id.clone(), a.kind.clone(), Value::Object(merged));
    entity.updated_at = a.updated_at.max(b.updated_at);
    Version::new(Some(entity), winner.stamp.clone())
}

/// Which strategy applies to which kind: one default for the store, overrides per kind.
#[derive(Clone, Debug)]
pub struct ConflictPolicy {
    default: Strategy,
    per_kind: HashMap<Kind, Strategy>,
}

impl Default for ConflictPolicy {
    fn default() -> Self {
        Self::new(Strategy::LastWriteWins)
    }
}

impl ConflictPolicy {
    /// A policy using `default` for every kind.
    #[must_use]
    pub fn new(default: Strategy) -> Self {
        Self {
            default,
            per_kind: HashMap::new(),
        }
    }

    /// Uses `strategy` for `kind`.
    #[must_use]
    pub fn with_kind(mut self, kind: impl Into<Kind>, strategy: Strategy) -> Self {
        self.per_kind.insert(kind.into(), strategy);
        self
    }

    /// The strategy for `kind`.
    #[must_use]
    pub fn strategy_for(&self, kind: &Kind) -> &Strategy {
        self.per_kind.get(kind).unwrap_or(&self.default)
    }
}

/// A stable 64-bit hash of an entity state (`None` = deleted): FNV-1a over a canonical
/// encoding with object keys sorted, so every replica and every build computes the same
/// number for the same content.
#[must_use]
pub fn content_hash(state: Option<&Entity<Value>>) -> u64 {
    let mut h = Fnv::new();
    match state {
        None => h.write(&[0]),
        Some(e) => {
            h.write(&[1]);
            h.write_str(&e.kind);
            h.write_str(&e.id);
            h.write(&e.updated_at.to_le_bytes());
            hash_value(&mut h, &e.data);
        }
    }
    h.0
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn write_str(&mut self, s: &str) {
        self.write(&(s.len() as u64).to_le_bytes());
        self.write(s.as_bytes());
    }
}

fn hash_value(h: &mut Fnv, v: &Value) {
    match v {
        Value::Null => h.write(b"n"),
        Value::Bool(b) => h.write(if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            h.write(b"#");
            h.write_str(&n.to_string());
        }
        Value::String(s) => {
            h.write(b"s");
            h.write_str(s);
        }
        Value::Array(items) => {
            h.write(b"[");
            h.write(&(items.len() as u64).to_le_bytes());
            for item in items {
                hash_value(h, item);
            }
        }
        Value::Object(map) => {
            h.write(b"{");
            h.write(&(map.len() as u64).to_le_bytes());
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            for k in keys {
                h.write_str(k);
                if let Some(item) = map.get(k) {
                    hash_value(h, item);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{prop, prop_assert_eq, proptest};
    use proptest::strategy::Strategy as _;
    use serde_json::json;

    fn v(data: Option<Value>, at: Millis, user: &str) -> Version {
        Version::new(
            data.map(|d| Entity::new("e", "todo", d).at(at)),
            Stamp {
                at,
                user_id: user.into(),
            },
        )
    }

    fn case(base: Option<Value>, current: Version, incoming: Version) -> ConflictCase {
        ConflictCase {
            kind: "todo".into(),
            base: Some(base.map(|d| Entity::new("e", "todo", d).at(1))),
            current,
            incoming,
        }
    }

    #[test]
    fn lww_later_wins_then_delete_then_user_then_hash() {
        let old = v(Some(json!({"a": 1})), 10, "zed");
        let new = v(Some(json!({"a": 2})), 11, "amy");
        assert_eq!(new.lww_cmp(&old), Ordering::Greater);
        let del = v(None, 11, "amy");
        assert_eq!(
            del.lww_cmp(&new),
            Ordering::Greater,
            "delete wins a timestamp tie"
        );
        let bob = v(Some(json!({"a": 3})), 11, "bob");
        assert_eq!(
            bob.lww_cmp(&new),
            Ordering::Greater,
            "then the greater user id"
        );
        let amy2 = v(Some(json!({"a": 4})), 11, "amy");
        assert_ne!(amy2.lww_cmp(&new), Ordering::Equal, "then the content hash");
        assert_eq!(amy2.lww_cmp(&new), new.lww_cmp(&amy2).reverse());
    }

    #[test]
    fn field_merge_keeps_both_sides_edits() {
        let c = case(
            Some(json!({"title": "t", "done": false, "n": 1})),
            v(Some(json!({"title": "T", "done": false, "n": 1})), 20, "a"),
            v(Some(json!({"title": "t", "done": true, "n": 1})), 21, "b"),
        );
        let out = Strategy::FieldMerge.resolve(&c);
        let e = out.state.unwrap();
        assert_eq!(e.data, json!({"title": "T", "done": true, "n": 1}));
        assert_eq!(e.updated_at, 21);
    }

    #[test]
    fn field_merge_same_field_falls_back_to_lww_and_keeps_removals() {
        let c = case(
            Some(json!({"title": "t", "tag": "x"})),
            v(Some(json!({"title": "A"})), 30, "a"),
            v(Some(json!({"title": "B", "tag": "x"})), 29, "b"),
        );
        let e = Strategy::FieldMerge.resolve(&c).state.unwrap();
        assert_eq!(
            e.data,
            json!({"title": "A"}),
            "the later title wins; the removed tag stays removed"
        );
    }

    #[test]
    fn field_merge_with_a_delete_or_unknown_base_is_lww() {
        let c = case(
            Some(json!({"a": 1})),
            v(None, 5, "a"),
            v(Some(json!({"a": 2})), 4, "b"),
        );
        assert!(Strategy::FieldMerge.resolve(&c).state.is_none());
        let mut c = case(
            None,
            v(Some(json!({"a": 1, "b": 1})), 5, "a"),
            v(Some(json!({"a": 2})), 6, "b"),
        );
        c.base = None;
        assert_eq!(
            Strategy::FieldMerge.resolve(&c).state.unwrap().data,
            json!({"a": 2})
        );
    }

    #[test]
    fn custom_resolver_gets_both_and_cannot_change_identity() {
        let s = Strategy::custom(|c| {
            let a = c.current.state.as_ref()?.data["n"].as_i64()?;
            let b = c.incoming.state.as_ref()?.data["n"].as_i64()?;
            Some(Entity::new("other", "other", json!({"n": a + b})))
        });
        let out = s.resolve(&case(
            None,
            v(Some(json!({"n": 2})), 1, "a"),
            v(Some(json!({"n": 3})), 2, "b"),
        ));
        let e = out.state.unwrap();
        assert_eq!(
            (e.id.as_str(), e.kind.as_str(), &e.data),
            ("e", "todo", &json!({"n": 5}))
        );
    }

    #[test]
    fn policy_picks_per_kind() {
        let p = ConflictPolicy::new(Strategy::FieldMerge).with_kind("doc", Strategy::Manual);
        assert_eq!(p.strategy_for(&"doc".into()).name(), StrategyName::Manual);
        assert_eq!(
            p.strategy_for(&"todo".into()).name(),
            StrategyName::FieldMerge
        );
    }

    #[test]
    fn content_hash_ignores_key_order() {
        let a: Value = serde_json::from_str(r#"{"x":1,"y":{"p":true,"q":[1,"2"]}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"y":{"q":[1,"2"],"p":true},"x":1}"#).unwrap();
        let ea = Entity::new("i", "k", a);
        let eb = Entity::new("i", "k", b);
        assert_eq!(content_hash(Some(&ea)), content_hash(Some(&eb)));
        assert_ne!(content_hash(Some(&ea)), content_hash(None));
        assert_ne!(
            content_hash(Some(&ea)),
            content_hash(Some(&ea.clone().at(1)))
        );
    }

    fn version() -> impl proptest::strategy::Strategy<Value = Version> {
        (
            prop::option::weighted(0.8, prop::collection::btree_map("[a-c]", 0i64..3, 0..3)),
            0u64..4,
            "[a-b]",
        )
            .prop_map(|(data, at, user)| v(data.map(|m| json!(m)), at, &user))
    }

    proptest! {
        #[test]
        fn every_strategy_is_symmetric(
            base in prop::option::of(prop::collection::btree_map("[a-c]", 0i64..3, 0..3)),
            a in version(),
            b in version(),
        ) {
            let base = Some(base.map(|m| Entity::new("e", "todo", json!(m)).at(1)));
            let ab = ConflictCase { kind: "todo".into(), base: base.clone(), current: a.clone(), incoming: b.clone() };
            let ba = ConflictCase { kind: "todo".into(), base, current: b, incoming: a };
            let sum = Strategy::custom(|c| {
                let n = |v: &Version| v.state.as_ref().map_or(0, |e| e.data.as_object().map_or(0, Map::len));
                Some(Entity::new("e", "todo", json!({"n": n(&c.current) + n(&c.incoming)})))
            });
            for s in [Strategy::LastWriteWins, Strategy::FieldMerge, Strategy::Manual, sum] {
                prop_assert_eq!(s.resolve(&ab), s.resolve(&ba), "{:?}", s);
            }
        }

        #[test]
        fn lww_is_a_total_order(a in version(), b in version()) {
            prop_assert_eq!(a.lww_cmp(&b), b.lww_cmp(&a).reverse());
            if a.lww_cmp(&b) == Ordering::Equal {
                prop_assert_eq!(content_hash(a.state.as_ref()), content_hash(b.state.as_ref()));
            }
        }
    }
}
