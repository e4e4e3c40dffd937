//! Vector clocks: one counter per replica, per entity. They tell a sequential edit (one
//! clock dominates the other) from a concurrent one (neither does), which is the only
//! case where a conflict strategy runs.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How two vector clocks relate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Causality {
    /// `self` happened before `other` (every counter ≤, at least one <).
    Before,
    /// `self` happened after `other`.
    After,
    /// Identical clocks.
    Equal,
    /// Neither dominates: the edits were made without seeing each other.
    Concurrent,
}

/// A vector clock: replica id → number of edits that replica made. Missing entries are 0.
///
/// Serialized as a JSON object (`Record<string, number>` in the spec); zero entries are
/// never stored, so equal clocks have equal JSON forms.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VectorClock(BTreeMap<String, u64>);

impl VectorClock {
    /// The empty clock (nothing happened yet).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The counter of `replica` (0 when absent).
    #[must_use]
    pub fn get(&self, replica: &str) -> u64 {
        self.0.get(replica).copied().unwrap_or(0)
    }

    /// Records one more edit by `replica` (saturating at `u64::MAX`).
    pub fn increment(&mut self, replica: &str) {
        let counter = self.0.entry(replica.to_owned()).or_insert(0);
        *counter = counter.saturating_add(1);
    }

    /// This clock with one more edit by `replica`.
    #[must_use]
    pub fn incremented(&self, replica: &str) -> Self {
        let mut next = self.clone();
        next.increment(replica);
        next
    }

    /// Only the counter of `replica` (what a replica can vouch for on its own).
    #[must_use]
    pub fn only(&self, replica: &str) -> Self {
        let mut only = Self::new();
        let n = self.get(replica);
        if n > 0 {
            only.0.insert(replica.to_owned(), n);
        }
        only
    }

    /// Takes the element-wise maximum of both clocks.
    pub fn merge(&mut self, other: &Self) {
        for (replica, &count) in &other.0 {
            if count == 0 {
                continue;
            }
            let mine = self.0.entry(replica.clone()).or_insert(0);
            *mine = (*mine).max(count);
        }
    }

    /// The element-wise maximum of both clocks.
    #[must_use]
    pub fn merged(&self, other: &Self) -> Self {
        let mut next = self.clone();
        next.merge(other);
        next
    }

    /// A copy with `replica`'s counter raised to at least `counter`.
    #[must_use]
    pub fn with_at_least(mut self, replica: &str, counter: u64) -> Self {
        if self.get(replica) < counter {
            self.0.insert(replica.to_owned(), counter);
        }
        self
    }

    /// How `self` relates to `other`.
    #[must_use]
    pub fn compare(&self, other: &Self) -> Causality {
        let mut less = false;
        let mut greater = false;
        for replica in self.0.keys().chain(other.0.keys()) {
            match self.get(replica).cmp(&other.get(replica)) {
                Ordering::Less => less = true,
                Ordering::Greater => greater = true,
                Ordering::Equal => {}
            }
            if less && greater {
                return Causality::Concurrent;
            }
        }
        match (less, greater) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Before,
            (false, true) => Causality::After,
            (true, true) => Causality::Concurrent,
        }
    }

    /// True when every counter of `other` is ≤ the same counter here.
    #[must_use]
    pub fn dominates(&self, other: &Self) -> bool {
        matches!(self.compare(other), Causality::After | Causality::Equal)
    }

    /// The non-zero entries, by replica id.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0
            .iter()
            .filter(|(_, c)| **c > 0)
            .map(|(r, c)| (r.as_str(), *c))
    }

    /// True when no replica has edited yet.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.values().all(|c| *c == 0)
    }

    /// Drops zero entries (a peer may send them) so that equal clocks compare and hash equal.
    #[must_use]
    pub fn normalized(mut self) -> Self {
        self.0.retain(|_, c| *c > 0);
        self
    }
}

impl From<BTreeMap<String, u64>> for VectorClock {
    fn from(map: BTreeMap<String, u64>) -> Self {
        Self(map).normalized()
    }
}

impl<const N: usize> From<[(&str, u64); N]> for VectorClock {
    fn from(entries: [(&str, u64); N]) -> Self {
        Self(
            entries
                .into_iter()
                .map(|(r, c)| (r.to_owned(), c))
                .collect(),
        )
        .normalized()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn clock() -> impl Strategy<Value = VectorClock> {
        prop::collection::btree_map("[a-d]", 0u64..5, 0..4).prop_map(VectorClock::from)
    }

    #[test]
    fn increment_then_compare() {
        let a = VectorClock::new().incremented("a");
        let ab = a.incremented("b");
        assert_eq!(a.compare(&ab), Causality::Before);
        assert_eq!(ab.compare(&a), Causality::After);
        assert_eq!(ab.compare(&ab.clone()), Causality::Equal);
        let b = VectorClock::new().incremented("b");
        assert_eq!(a.compare(&b), Causality::Concurrent);
        assert_eq!(a.merged(&b), VectorClock::from([("a", 1), ("b", 1)]));
    }

    #[test]
    fn zero_entries_do_not_matter() {
        let with_zero: VectorClock = serde_json::from_str(r#"{"a":0,"b":2}"#).unwrap();
        assert_eq!(
            with_zero.compare(&VectorClock::from([("b", 2)])),
            Causality::Equal
        );
        assert_eq!(with_zero.normalized(), VectorClock::from([("b", 2)]));
        assert_eq!(
            serde_json::to_string(&VectorClock::from([("b", 2)])).unwrap(),
            r#"{"b":2}"#
        );
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in clock(), b in clock()) {
            prop_assert_eq!(a.merged(&b), b.merged(&a));
        }

        #[test]
        fn merge_is_associative(a in clock(), b in clock(), c in clock()) {
            prop_assert_eq!(a.merged(&b).merged(&c), a.merged(&b.merged(&c)));
        }

        #[test]
        fn merge_is_idempotent(a in clock(), b in clock()) {
            prop_assert_eq!(a.merged(&a), a.clone());
            let ab = a.merged(&b);
            prop_assert_eq!(ab.merged(&b), ab);
        }

        #[test]
        fn merge_dominates_both_inputs(a in clock(), b in clock()) {
            let m = a.merged(&b);
            prop_assert!(m.dominates(&a));
            prop_assert!(m.dominates(&b));
        }

        #[test]
        fn compare_is_antisymmetric(a in clock(), b in clock()) {
            let expected = match a.compare(&b) {
                Causality::Before => Causality::After,
                Causality::After => Causality::Before,
                other => other,
            };
            prop_assert_eq!(b.compare(&a), expected);
        }

        #[test]
        fn compare_equal_iff_equal(a in clock(), b in clock()) {
            prop_assert_eq!(a.compare(&b) == Causality::Equal, a == b);
        }

        #[test]
        fn increment_moves_strictly_after(a in clock(), r in "[a-e]") {
            prop_assert_eq!(a.incremented(&r).compare(&a), Causality::After);
        }

        #[test]
        fn before_is_transitive(a in clock(), b in clock(), c in clock()) {
            if a.compare(&b) == Causality::Before && b.compare(&c) == Causality::Before {
                prop_assert_eq!(a.compare(&c), Causality::Before);
            }
        }
    }
}
