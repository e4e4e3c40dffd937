//! What a room knows about each replica, so that a member speaks only for its own: who
//! owns each replica id, the highest counter of each replica in a stored clock, and the
//! recent message ids of each replica (deduplication). All of it is rebuilt from the
//! stored changes when a room is restored.

use std::collections::{HashMap, VecDeque};

use crate::EntityKey;
use crate::clock::VectorClock;

use super::{RoomError, StoredChange};

/// Who a replica id belongs to in this room.
#[derive(Clone, Debug)]
struct Binding {
    /// The user who first used the replica id here.
    user_id: String,
    /// True once the room holds a change by this replica: the binding then lasts (it is
    /// rebuilt from the log). A binding made by hellos alone is dropped when the last of
    /// those connections leaves, so hellos cannot grow the room without bound.
    stored: bool,
}

/// The room's per-replica bookkeeping.
#[derive(Debug, Default)]
pub(super) struct Replicas {
    /// Replica id → the user it belongs to.
    owners: HashMap<String, Binding>,
    /// Replica id → the highest counter of that replica in any clock the room stored.
    high: HashMap<String, u64>,
    /// Replica id → change message id → (entity, version assigned).
    seen: HashMap<String, HashMap<String, (EntityKey, u64)>>,
    /// The (replica id, message id) pairs in `seen`, oldest first, to bound it.
    seen_order: VecDeque<(String, String)>,
}

impl Replicas {
    /// A hello of `user_id` with `replica`: binds the replica id to the user if it is
    /// free.
    ///
    /// # Errors
    /// [`RoomError::ReplicaTaken`] when it belongs to another user.
    pub(super) fn bind(&mut self, replica: &str, user_id: &str) -> Result<(), RoomError> {
        match self.owners.get(replica) {
            Some(binding) if binding.user_id != user_id => Err(RoomError::ReplicaTaken {
                replica_id: truncate(replica),
            }),
            Some(_) => Ok(()),
            None => {
                self.owners.insert(
                    replica.to_owned(),
                    Binding {
                        user_id: user_id.to_owned(),
                        stored: false,
                    },
                );
                Ok(())
            }
        }
    }

    /// The last connection using `replica` left: a binding that no stored change holds
    /// is released.
    pub(super) fn release(&mut self, replica: &str) {
        if self.owners.get(replica).is_some_and(|b| !b.stored) {
            self.owners.remove(replica);
        }
    }

    /// Checks that `replica` still belongs to `user_id` (a change committed after the
    /// connection joined may have given it back to its author, see [`Replicas::record`]).
    ///
    /// # Errors
    /// [`RoomError::ReplicaTaken`] when it does not.
    pub(super) fn check_owner(&self, replica: &str, user_id: &str) -> Result<(), RoomError> {
        if self
            .owners
            .get(replica)
            .is_some_and(|b| b.user_id == user_id)
        {
            Ok(())
        } else {
            Err(RoomError::ReplicaTaken {
                replica_id: truncate(replica),
            })
        }
    }

    /// Refuses a clock that counts more edits of another replica than the room has ever
    /// stored from it; only the author's (`me`) own counter may advance.
    ///
    /// # Errors
    /// [`RoomError::InvalidClock`] for the first counter too high.
    pub(super) fn check_clock(&self, me: &str, vector: &VectorClock) -> Result<(), RoomError> {
        for (replica, claimed) in vector.iter() {
            if replica == me {
                continue;
            }
            let known = self.high.get(replica).copied().unwrap_or(0);
            if claimed > known {
                return Err(RoomError::InvalidClock {
                    replica: truncate(replica),
                    claimed,
                    known,
                });
            }
        }
        Ok(())
    }

    /// The entity and version of an accepted change of `replica` with `message_id`, if
    /// it is still in the window.
    pub(super) fn seen(&self, replica: &str, message_id: &str) -> Option<&(EntityKey, u64)> {
        self.seen.get(replica)?.get(message_id)
    }

    /// Remembers a change message id of `replica` for deduplication, forgetting the
    /// oldest past `window` pairs.
    pub(super) fn remember(
        &mut self,
        replica: &str,
        message_id: &str,
        key: EntityKey,
        version: u64,
        window: usize,
    ) {
        let ids = self.seen.entry(replica.to_owned()).or_default();
        if ids.insert(message_id.to_owned(), (key, version)).is_none() {
            self.seen_order
                .push_back((replica.to_owned(), message_id.to_owned()));
        }
        while self.seen_order.len() > window.max(1) {
            let Some((replica, message_id)) = self.seen_order.pop_front() else {
                break;
            };
            if let Some(ids) = self.seen.get_mut(&replica) {
                ids.remove(&message_id);
                if ids.is_empty() {
                    self.seen.remove(&replica);
                }
            }
        }
    }

    /// Takes in what the room's identity record kept of collected tombstones: the highest
    /// counters they named and who their authors were (both last like a stored change's).
    pub(super) fn seed<'a>(
        &mut self,
        high: impl IntoIterator<Item = (&'a String, &'a u64)>,
        owners: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) {
        for (replica, counter) in high {
            let entry = self.high.entry(replica.clone()).or_insert(0);
            *entry = (*entry).max(*counter);
        }
        for (replica, user) in owners {
            self.owners.insert(
                replica.clone(),
                Binding {
                    user_id: user.clone(),
                    stored: true,
                },
            );
        }
    }

    /// Takes in a stored change (committed, or replayed by a restore): its clock's
    /// counters, its author's binding, its message id.
    pub(super) fn record(&mut self, record: &StoredChange, window: usize) {
        for (replica, counter) in record.vector.iter() {
            match self.high.get_mut(replica) {
                Some(high) => *high = (*high).max(counter),
                None => {
                    self.high.insert(replica.to_owned(), counter);
                }
            }
        }
        if !record.replica_id.is_empty() {
            match self.owners.get_mut(&record.replica_id) {
                // Bound by an earlier change, or by its author's hello.
                Some(binding) if binding.stored || binding.user_id == record.author => {
                    binding.stored = true;
                }
                // Unbound, or bound by another user's hello after the author left while
                // this change was being written: the stored change decides.
                _ => {
                    self.owners.insert(
                        record.replica_id.clone(),
                        Binding {
                            user_id: record.author.clone(),
                            stored: true,
                        },
                    );
                }
            }
        }
        self.remember(
            &record.replica_id,
            &record.message_id,
            record.key(),
            record.version,
            window,
        );
    }
}

/// At most 64 characters of an untrusted string, for echoing it in an error.
pub(super) fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}
