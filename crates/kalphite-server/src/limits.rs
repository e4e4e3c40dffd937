//! Connection budgets: how many WebSocket connections the server holds at once, and how
//! many one user holds. Each admitted connection carries a permit; dropping it (however the
//! connection ends) gives the slot back.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

/// The budgets, shared by every connection.
pub(crate) struct Budgets {
    /// Open WebSocket connections (admitted at the upgrade).
    connections: AtomicUsize,
    max_connections: usize,
    /// Open joined connections per user. A plain mutex: taken once per hello and once per
    /// leave, never across an await.
    /// Open connections per user; the key is shared with each of the user's permits.
    users: Mutex<HashMap<Arc<str>, usize>>,
    max_per_user: usize,
}

impl Budgets {
    pub(crate) fn new(max_connections: usize, max_per_user: usize) -> Arc<Self> {
        Arc::new(Self {
            connections: AtomicUsize::new(0),
            max_connections: max_connections.max(1),
            users: Mutex::new(HashMap::new()),
            max_per_user: max_per_user.max(1),
        })
    }

    pub(crate) fn max_per_user(&self) -> usize {
        self.max_per_user
    }

    /// A WebSocket slot, or `None` at the limit.
    pub(crate) fn connection(self: &Arc<Self>) -> Option<ConnectionPermit> {
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_connections).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionPermit(Arc::clone(self)))
    }

    /// A slot for one more connection of `user`, or `None` at the per-user limit.
    pub(crate) fn user(self: &Arc<Self>, user: &str) -> Option<UserPermit> {
        let mut users = self.users.lock();
        let key = match users.get_key_value(user) {
            Some((key, _)) => Arc::clone(key),
            None => Arc::from(user),
        };
        let n = users.entry(Arc::clone(&key)).or_insert(0);
        if *n >= self.max_per_user {
            return None;
        }
        *n += 1;
        Some(UserPermit {
            budgets: Arc::clone(self),
            user: key,
        })
    }
}

/// One WebSocket connection's slot.
pub(crate) struct ConnectionPermit(Arc<Budgets>);

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One of a user's connection slots.
pub(crate) struct UserPermit {
    budgets: Arc<Budgets>,
    user: Arc<str>,
}

impl Drop for UserPermit {
    fn drop(&mut self) {
        let mut users = self.budgets.users.lock();
        if let Some(n) = users.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                users.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_counted_and_given_back() {
        let budgets = Budgets::new(2, 1);
        let a = budgets.connection().expect("first");
        let b = budgets.connection().expect("second");
        assert!(budgets.connection().is_none(), "at the limit");
        drop(a);
        let _c = budgets.connection().expect("a slot was given back");
        drop(b);

        let alice = budgets.user("alice").expect("alice");
        assert!(budgets.user("alice").is_none(), "per-user limit");
        let _bob = budgets.user("bob").expect("another user is not affected");
        drop(alice);
        let _alice = budgets.user("alice").expect("given back");
        assert_eq!(budgets.users.lock().len(), 2);
    }
}
