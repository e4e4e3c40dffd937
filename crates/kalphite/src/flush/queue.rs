//! The flush engine's queue: entries deduplicated per entity and per annotation key, each
//! remembering the first and the last store transaction that touched it, and the rule that
//! cuts batches only at transaction boundaries.

use std::sync::Arc;

use indexmap::IndexMap;

use crate::change::Change;
use crate::entity::{EntityId, Kind};
use crate::flush::target::Annotation;

/// What an entry stands for. Entities and annotation keys live in one map so that both
/// keep their first-scheduled order relative to each other.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    Entity(Kind, EntityId),
    Annotation(Arc<str>),
}

/// The newest content for a key (an annotation keeps its key, for the batch).
enum Content {
    Change(Change),
    Annotation(Arc<str>, Annotation),
}

struct Entry {
    content: Content,
    /// The oldest transaction this entry stands for (a newer write to the same key
    /// replaces the content, not the position or this number).
    first_tx: u64,
    /// The newest transaction this entry's content comes from.
    last_tx: u64,
}

/// Where one entry of a cut went, and its transaction range, to put it back in place.
struct Slot {
    annotation: bool,
    first_tx: u64,
    last_tx: u64,
}

/// A batch taken off the queue: what the target receives, and how to requeue it.
pub(crate) struct Cut {
    pub(crate) changes: Arc<[Change]>,
    pub(crate) annotations: Arc<[(Arc<str>, Annotation)]>,
    /// The cut entries in queue order (so `first_tx` ascends).
    slots: Vec<Slot>,
}

impl Cut {
    /// The oldest transaction the cut stands for.
    pub(crate) fn first_tx(&self) -> Option<u64> {
        self.slots.first().map(|s| s.first_tx)
    }
}

/// Pending entries in first-scheduled order, so `first_tx` never decreases along the queue.
#[derive(Default)]
pub(crate) struct Queue {
    entries: IndexMap<Key, Entry>,
    /// How many of the entries are annotations (so counting changes is O(1)).
    annotations: usize,
}

impl Queue {
    /// Records `change` as written by transaction `tx` (not older than any queued one).
    pub(crate) fn push_change(&mut self, change: Change, tx: u64) {
        let key = Key::Entity(change.kind.clone(), change.id.clone());
        self.push(key, Content::Change(change), tx);
    }

    /// Records annotation `key` as set by transaction `tx` (not older than any queued one).
    pub(crate) fn push_annotation(&mut self, key: Arc<str>, annotation: Annotation, tx: u64) {
        let content = Content::Annotation(Arc::clone(&key), annotation);
        self.push(Key::Annotation(key), content, tx);
    }

    fn push(&mut self, key: Key, content: Content, tx: u64) {
        match self.entries.entry(key) {
            indexmap::map::Entry::Occupied(mut e) => {
                let entry = e.get_mut();
                entry.content = content;
                entry.last_tx = tx;
            }
            indexmap::map::Entry::Vacant(e) => {
                if matches!(e.key(), Key::Annotation(_)) {
                    self.annotations += 1;
                }
                e.insert(Entry {
                    content,
                    first_tx: tx,
                    last_tx: tx,
                });
            }
        }
    }

    /// Entries queued (changes and annotations).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Changes queued.
    pub(crate) fn changes_len(&self) -> usize {
        self.entries.len().saturating_sub(self.annotations)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The oldest transaction still queued.
    pub(crate) fn first_tx(&self) -> Option<u64> {
        self.entries.first().map(|(_, e)| e.first_tx)
    }

    /// The queued changes, oldest first (annotations left out).
    pub(crate) fn changes(&self) -> impl Iterator<Item = &Change> {
        self.entries.values().filter_map(|e| match &e.content {
            Content::Change(c) => Some(c),
            Content::Annotation(..) => None,
        })
    }

    /// Takes the next batch: the entries up to the `max`-th change (annotations ride
    /// along, uncounted: they are bookkeeping of the changes, not more of them), extended
    /// until every entry first touched by a transaction up to the newest one in the batch
    /// is in it. Because `first_tx` ascends along the queue, that closed set is always a
    /// prefix; everything left behind was first touched after the batch's newest
    /// transaction `T`, so writing the batch on top of the state after the previous one
    /// gives the state after `T`.
    pub(crate) fn cut(&mut self, max: usize) -> Option<Cut> {
        if self.entries.is_empty() {
            return None;
        }
        let max = max.max(1);
        let mut n = 0;
        let mut changes_seen = 0;
        for (_, e) in &self.entries {
            n += 1;
            if matches!(e.content, Content::Change(_)) {
                changes_seen += 1;
                if changes_seen == max {
                    break;
                }
            }
        }
        let mut upto = self
            .entries
            .values()
            .take(n)
            .map(|e| e.last_tx)
            .max()
            .unwrap_or(0);
        while let Some((_, e)) = self.entries.get_index(n) {
            if e.first_tx > upto {
                break;
            }
            upto = upto.max(e.last_tx);
            n += 1;
        }
        let mut changes = Vec::with_capacity(n);
        let mut annotations = Vec::new();
        let mut slots = Vec::with_capacity(n);
        for entry in self.entries.drain(..n).map(|(_, e)| e) {
            let annotation = match entry.content {
                Content::Change(c) => {
                    changes.push(c);
                    false
                }
                Content::Annotation(k, a) => {
                    annotations.push((k, a));
                    true
                }
            };
            slots.push(Slot {
                annotation,
                first_tx: entry.first_tx,
                last_tx: entry.last_tx,
            });
        }
        self.annotations = self.annotations.saturating_sub(annotations.len());
        Some(Cut {
            changes: changes.into(),
            annotations: annotations.into(),
            slots,
        })
    }

    /// Puts a failed cut back in front of the queue, at its old positions. Where a newer
    /// write to the same key arrived meanwhile, the entry keeps the newer content and the
    /// newer `last_tx` (so the next cut takes that transaction's other writes along).
    pub(crate) fn requeue(&mut self, cut: Cut) {
        let mut merged: IndexMap<Key, Entry> =
            IndexMap::with_capacity(self.entries.len() + cut.slots.len());
        let mut changes = cut.changes.iter();
        let mut annotations = cut.annotations.iter();
        for slot in cut.slots {
            let (key, content) = if slot.annotation {
                let Some((k, a)) = annotations.next() else {
                    continue;
                };
                (
                    Key::Annotation(Arc::clone(k)),
                    Content::Annotation(Arc::clone(k), Arc::clone(a)),
                )
            } else {
                let Some(c) = changes.next() else {
                    continue;
                };
                (
                    Key::Entity(c.kind.clone(), c.id.clone()),
                    Content::Change(c.clone()),
                )
            };
            let entry = match self.entries.shift_remove(&key) {
                Some(newer) => Entry {
                    content: newer.content,
                    first_tx: slot.first_tx,
                    last_tx: newer.last_tx,
                },
                None => Entry {
                    content,
                    first_tx: slot.first_tx,
                    last_tx: slot.last_tx,
                },
            };
            merged.insert(key, entry);
        }
        merged.extend(self.entries.drain(..));
        self.entries = merged;
        self.annotations = self
            .entries
            .keys()
            .filter(|k| matches!(k, Key::Annotation(_)))
            .count();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Origin;

    fn delete(id: &str) -> Change {
        Change::delete("doc".into(), id.into(), 1, Origin::Local)
    }

    fn note() -> Annotation {
        Arc::new(())
    }

    fn ids(cut: &Cut) -> Vec<String> {
        cut.changes.iter().map(|c| c.id.to_string()).collect()
    }

    #[test]
    fn a_cut_extends_to_every_entry_first_touched_up_to_its_newest_transaction() {
        let mut q = Queue::default();
        q.push_change(delete("a"), 0);
        q.push_change(delete("b"), 1);
        q.push_annotation("w".into(), note(), 2);
        q.push_change(delete("a"), 2);
        q.push_change(delete("c"), 3);
        let cut = q.cut(1).unwrap_or_else(|| unreachable!());
        assert_eq!(
            ids(&cut),
            ["a", "b"],
            "a was last touched by 2, which also set w"
        );
        assert_eq!(cut.annotations.len(), 1);
        assert_eq!((q.len(), q.changes_len()), (1, 1));
        assert_eq!(q.first_tx(), Some(3));
    }

    #[test]
    fn a_cut_counts_changes_not_the_annotations_riding_along() {
        let mut q = Queue::default();
        for (tx, id) in ["a", "b", "c"].into_iter().enumerate() {
            let tx = tx as u64;
            q.push_change(delete(id), tx);
            q.push_annotation(format!("o{id}").into(), note(), tx);
            q.push_annotation(format!("k{id}").into(), note(), tx);
        }
        let cut = q.cut(2).unwrap_or_else(|| unreachable!());
        assert_eq!(ids(&cut), ["a", "b"]);
        assert_eq!(cut.annotations.len(), 4, "each change's two annotations");
        assert_eq!((q.len(), q.changes_len()), (3, 1));
    }

    #[test]
    fn a_requeued_cut_goes_back_in_front_with_the_newer_content() {
        let mut q = Queue::default();
        q.push_annotation("w".into(), note(), 0);
        q.push_change(delete("a"), 0);
        let cut = q.cut(10).unwrap_or_else(|| unreachable!());
        assert_eq!((q.len(), q.changes_len()), (0, 0));
        q.push_change(delete("b"), 1);
        q.push_annotation("w".into(), note(), 2);
        q.requeue(cut);
        assert_eq!((q.len(), q.changes_len()), (3, 2));
        assert_eq!(q.first_tx(), Some(0));
        let again = q.cut(1).unwrap_or_else(|| unreachable!());
        assert_eq!(ids(&again), ["a", "b"], "w now stands for transaction 2");
        assert_eq!(again.annotations.len(), 1);
        assert!(q.is_empty());
    }
}
