//! What a room knows about each replica, so that a member speaks only for its own: who
//! owns each replica id, the highest counter of each replica in a stored clock, and the
//! recent message ids of each replica (deduplication). All of it is rebuilt from the
//! stored changes when a room is restored.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::EntityKey;
use crate::clock::VectorClock;

use super::{RoomError, StoredChange};

/// Who a replica id belongs to in this room.
#[derive(Clone, Debug)]
struct Binding {
    /// The user who first used the replica id here (shared with its members).
    user_id: Arc<str>,
    /// True once the room holds a change by this replica: the binding then lasts (it is
    /// rebuilt from the log). A binding made by hellos alone is dropped when the last of
    /// those connections leaves, so hellos cannot grow the room without bound.
    stored: bool,
}

/// A replica's recent change message ids → (entity, version assigned).
type SeenIds = HashMap<Arc<str>, (EntityKey, u64)>;

/// The room's per-replica bookkeeping. Replica and user ids are shared (`Arc<str>`)
/// between the bindings, the members and the deduplication window, and a message id
/// between the window's map and its order: one allocation each, not one per place.
#[derive(Debug, Default)]
pub(super) struct Replicas {
    /// Replica id → the user it belongs to.
    owners: HashMap<Arc<str>, Binding>,
    /// Replica id → the highest counter of that replica in any clock the room stored.
    high: HashMap<String, u64>,
    /// Replica id → change message id → (entity, version assigned).
    seen: HashMap<Arc<str>, SeenIds>,
    /// The (replica id, message id) pairs in `seen`, oldest first, to bound it.
    seen_order: VecDeque<(Arc<str>, Arc<str>)>,
}

impl Replicas {
    /// A hello of `user_id` with `replica`: binds the replica id to the user if it is
    /// free. Returns the shared replica and user ids, for the member to hold.
    ///
    /// # Errors
    /// [`RoomError::ReplicaTaken`] when it belongs to another user.
    pub(super) fn bind(
        &mut self,
        replica: &str,
        user_id: &str,
    ) -> Result<(Arc<str>, Arc<str>), RoomError> {
        match self.owners.get_key_value(replica) {
            Some((_, binding)) if &*binding.user_id != user_id => Err(RoomError::ReplicaTaken {
                replica_id: truncate(replica),
            }),
            Some((replica, binding)) => Ok((Arc::clone(replica), Arc::clone(&binding.user_id))),
            None => {
                let (replica, user_id) = (Arc::<str>::from(replica), Arc::<str>::from(user_id));
                self.owners.insert(
                    Arc::clone(&replica),
                    Binding {
                        user_id: Arc::clone(&user_id),
                        stored: false,
                    },
                );
                Ok((replica, user_id))
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
            .is_some_and(|b| &*b.user_id == user_id)
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

    /// The highest counter of `replica` in any clock the room holds (0: none).
    pub(super) fn high(&self, replica: &str) -> u64 {
        self.high.get(replica).copied().unwrap_or(0)
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
        let ids = match self.seen.get_mut(replica) {
            Some(ids) => ids,
            None => {
                let replica = self.shared(replica);
                self.seen.entry(replica).or_default()
            }
        };
        if let Some(entry) = ids.get_mut(message_id) {
            *entry = (key, version);
        } else {
            let message_id = Arc::<str>::from(message_id);
            ids.insert(Arc::clone(&message_id), (key, version));
            let replica = match self.seen.get_key_value(replica) {
                Some((replica, _)) => Arc::clone(replica),
                None => Arc::from(replica),
            };
            self.seen_order.push_back((replica, message_id));
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

    /// Forgets the message ids of changes to `gone` (entities the room no longer holds).
    pub(super) fn forget_entities(&mut self, gone: &HashSet<EntityKey>) {
        self.seen.retain(|_, ids| {
            ids.retain(|_, (key, _)| !gone.contains(key));
            !ids.is_empty()
        });
        let seen = &self.seen;
        self.seen_order.retain(|(replica, message_id)| {
            seen.get(replica)
                .is_some_and(|ids| ids.contains_key(message_id))
        });
    }

    /// `replica` as the binding's shared id when it is bound, else a new one.
    fn shared(&self, replica: &str) -> Arc<str> {
        match self.owners.get_key_value(replica) {
            Some((replica, _)) => Arc::clone(replica),
            None => Arc::from(replica),
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
                Arc::from(replica.as_str()),
                Binding {
                    user_id: Arc::from(user.as_str()),
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
            match self.owners.get_mut(record.replica_id.as_str()) {
                // Bound by an earlier change, or by its author's hello.
                Some(binding) if binding.stored || *binding.user_id == *record.author => {
                    binding.stored = true;
                }
                // Unbound, or bound by another user's hello after the author left while
                // this change was being written: the stored change decides.
                _ => {
                    self.owners.insert(
                        Arc::from(record.replica_id.as_str()),
                        Binding {
                            user_id: Arc::from(record.author.as_str()),
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
