//! The storage quota: a write batch is refused when its net growth (the bytes of the rows it
//! adds or enlarges, less those of the rows it removes or shrinks) does not fit in what the
//! limit leaves. The backends measure the space in use and the stored rows; this decides.

use std::collections::{HashMap, HashSet};

use kalphite::{EntityId, Kind};

use crate::backend::{ROW_OVERHEAD, Write};
use crate::error::{Error, Result};
use crate::sync_state::SyncWrite;

/// The quota a write must respect.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Quota {
    pub limit_mb: u64,
}

impl Quota {
    pub(crate) fn limit_bytes(self) -> u64 {
        self.limit_mb.saturating_mul(1024 * 1024)
    }

    /// Refuses a batch that grows the database (`growth > 0`) past the limit. A batch that
    /// frees at least as much as it adds is accepted even over the limit: it helps.
    pub(crate) fn check(self, used_bytes: u64, growth: i64) -> Result<()> {
        let needed_bytes = u64::try_from(growth).unwrap_or(0);
        if needed_bytes > 0 && used_bytes.saturating_add(needed_bytes) > self.limit_bytes() {
            return Err(Error::QuotaExceeded {
                limit_mb: self.limit_mb,
                used_bytes,
                needed_bytes,
            });
        }
        Ok(())
    }
}

/// A stored row that a write replaces or removes: what a batch's growth depends on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum StoredKey {
    Entity(Kind, EntityId),
    Outbox(Kind, EntityId),
    Known(Kind, EntityId),
    State(String),
}

impl StoredKey {
    /// The bytes the quota counts for the row under this key whose data JSON (entry,
    /// value) has `payload` bytes: the measure of [`crate::backend::Row::size`] and
    /// [`SyncWrite::size`].
    pub(crate) fn size(&self, payload: u64) -> u64 {
        let fixed = match self {
            Self::Entity(kind, id) => kind.len() + id.len() + ROW_OVERHEAD,
            Self::Outbox(kind, id) | Self::Known(kind, id) => kind.len() + id.len(),
            Self::State(key) => key.len(),
        };
        (fixed as u64).saturating_add(payload)
    }
}

/// What one write does to the stored rows.
enum Effect {
    /// Puts a row of this many bytes under the key, replacing any.
    Put(StoredKey, u64),
    Remove(StoredKey),
    /// Removes every `kalphite_sync_known` row.
    ClearKnown,
}

fn effect(w: &Write) -> Effect {
    match w {
        Write::Upsert(row) => Effect::Put(
            StoredKey::Entity(row.kind.clone(), row.id.clone()),
            row.size(),
        ),
        Write::Delete { kind, id } => Effect::Remove(StoredKey::Entity(kind.clone(), id.clone())),
        Write::Sync(s) => match s {
            SyncWrite::State { key, .. } => Effect::Put(StoredKey::State(key.clone()), s.size()),
            SyncWrite::Outbox { kind, id, .. } => {
                Effect::Put(StoredKey::Outbox(kind.clone(), id.clone()), s.size())
            }
            SyncWrite::OutboxRemoved { kind, id } => {
                Effect::Remove(StoredKey::Outbox(kind.clone(), id.clone()))
            }
            SyncWrite::Known { kind, id, .. } => {
                Effect::Put(StoredKey::Known(kind.clone(), id.clone()), s.size())
            }
            SyncWrite::KnownCleared => Effect::ClearKnown,
            SyncWrite::KnownRemoved { kind, id } => {
                Effect::Remove(StoredKey::Known(kind.clone(), id.clone()))
            }
        },
    }
}

/// The stored rows whose sizes [`net_growth`] needs, each once.
pub(crate) fn stored_keys(writes: &[Write]) -> Vec<StoredKey> {
    let mut seen = HashSet::with_capacity(writes.len());
    writes
        .iter()
        .filter_map(|w| match effect(w) {
            Effect::Put(key, _) | Effect::Remove(key) => Some(key),
            Effect::ClearKnown => None,
        })
        .filter(|key| seen.insert(key.clone()))
        .collect()
}

/// The bytes a batch adds, net: the size of each row it puts, less that of the row it
/// replaces (a shrinking replacement counts negative), less the size of each row it
/// removes, the writes taken in order. `stored` has the size ([`StoredKey::size`]) of each
/// row of [`stored_keys`] that exists before the batch. Clearing the known-state table
/// frees what it frees but counts nothing (measuring it would read the whole table).
pub(crate) fn net_growth(writes: &[Write], mut stored: HashMap<StoredKey, u64>) -> i64 {
    let signed = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let mut growth = 0i64;
    for w in writes {
        match effect(w) {
            Effect::Put(key, size) => {
                let replaced = stored.insert(key, size).unwrap_or(0);
                growth = growth
                    .saturating_add(signed(size))
                    .saturating_sub(signed(replaced));
            }
            Effect::Remove(key) => {
                growth = growth.saturating_sub(signed(stored.remove(&key).unwrap_or(0)));
            }
            Effect::ClearKnown => stored.retain(|key, _| !matches!(key, StoredKey::Known(..))),
        }
    }
    growth
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Row;

    fn upsert(id: &str, data: &str) -> Write {
        Write::Upsert(Row {
            kind: "t".into(),
            id: id.into(),
            data: data.into(),
            updated_at: 1,
        })
    }

    fn delete(id: &str) -> Write {
        Write::Delete {
            kind: "t".into(),
            id: id.into(),
        }
    }

    fn known(id: &str, entry: &str) -> Write {
        Write::Sync(SyncWrite::Known {
            kind: "t".into(),
            id: id.into(),
            version: 1,
            entry: entry.into(),
        })
    }

    fn entity(id: &str) -> StoredKey {
        StoredKey::Entity("t".into(), id.into())
    }

    /// The stored size of a row whose payload is `n` bytes, keyed as the tests key them.
    fn stored(keys: &[(StoredKey, u64)]) -> HashMap<StoredKey, u64> {
        keys.iter().map(|(k, n)| (k.clone(), k.size(*n))).collect()
    }

    #[test]
    fn stored_rows_are_measured_as_writes_are() {
        let writes = [
            upsert("a", "{\"x\":1}"),
            known("a", "entry"),
            Write::Sync(SyncWrite::Outbox {
                kind: "t".into(),
                id: "a".into(),
                position: 3,
                entry: "queued".into(),
            }),
            Write::Sync(SyncWrite::State {
                key: "watermark".into(),
                value: "7".into(),
            }),
        ];
        let payloads = [7, 5, 6, 1];
        for (w, payload) in writes.iter().zip(payloads) {
            let Effect::Put(key, size) = effect(w) else {
                panic!("{w:?} puts a row");
            };
            assert_eq!(key.size(payload), size, "{w:?}");
        }
    }

    #[test]
    fn growth_is_net_of_replaced_and_removed_rows() {
        let new = upsert("new", "0123456789");
        assert_eq!(
            net_growth(std::slice::from_ref(&new), HashMap::new()),
            10 + 4 + i64::try_from(ROW_OVERHEAD).unwrap()
        );
        // Same size as stored: nothing; shrinking: negative; deleting: minus the row.
        let before = stored(&[(entity("a"), 10), (entity("b"), 100)]);
        assert_eq!(net_growth(&[upsert("a", "9876543210")], before.clone()), 0);
        assert_eq!(net_growth(&[upsert("a", "x")], before.clone()), -9);
        let b_size = entity("b").size(100).cast_signed();
        assert_eq!(net_growth(&[delete("b")], before.clone()), -b_size);
        // Deleting what does not exist frees nothing.
        assert_eq!(net_growth(&[delete("zz")], before.clone()), 0);
        // In order: a row put then deleted in the same batch adds nothing; deleted then
        // put back, it adds its new size less what it had.
        assert_eq!(net_growth(&[new.clone(), delete("new")], before.clone()), 0);
        assert_eq!(
            net_growth(&[delete("b"), upsert("b", "x")], before.clone()),
            entity("b").size(1).cast_signed() - b_size
        );
        assert_eq!(
            stored_keys(&[new, delete("new"), delete("b")]),
            [entity("new"), entity("b")]
        );
    }

    #[test]
    fn clearing_known_rows_counts_later_puts_in_full() {
        let k = StoredKey::Known("t".into(), "a".into());
        let before = stored(&[(k.clone(), 5)]);
        assert_eq!(net_growth(&[known("a", "12345")], before.clone()), 0);
        let cleared = [Write::Sync(SyncWrite::KnownCleared), known("a", "12345")];
        assert_eq!(net_growth(&cleared, before), k.size(5).cast_signed());
    }

    #[test]
    fn only_growth_past_the_limit_is_refused() {
        let quota = Quota { limit_mb: 1 };
        let limit = quota.limit_bytes();
        assert!(quota.check(limit - 10, 10).is_ok());
        assert!(matches!(
            quota.check(limit - 10, 11),
            Err(Error::QuotaExceeded {
                needed_bytes: 11,
                ..
            })
        ));
        // Over the limit already: freeing (or adding nothing) is still accepted.
        assert!(quota.check(limit * 2, 0).is_ok());
        assert!(quota.check(limit * 2, -5).is_ok());
        assert!(quota.check(limit * 2, 1).is_err());
    }
}
