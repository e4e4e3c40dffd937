//! Cluster mode (`kalphite serve --cluster`): several server nodes on one PostgreSQL, one
//! owner per room. A node joins (a liveness lock), leases rooms (a term bumped by every new
//! owner) and fences every commit of a room's log with that term, so a node that lost a room
//! can never write it again. SQLite refuses every call ([`Error::ClusterNeedsPostgres`]).
//!
//! The term is the fencing token of a room's ownership; it is not the room's identity epoch
//! (the random string in its meta record). Every time is the database's clock (`now()`).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use kalphite::{Change, Entity};
use tokio::sync::watch;

use crate::database::Database;
use crate::error::{Error, Result};

/// A cluster node as it registers itself ([`Database::join_cluster`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node's id, unique in the cluster (`--node-id`).
    pub node: String,
    /// Where other nodes reach it (`--advertise HOST:PORT`).
    pub advertise: String,
}

/// A joined node's liveness lock ([`Database::join_cluster`]): a session advisory lock
/// keyed by the node id, held by a PostgreSQL connection of its own. While it is held,
/// other nodes wait for this node's leases to expire; once it is gone (the guard dropped,
/// the process dead, the connection cut), they take its rooms at once.
pub struct NodeGuard {
    /// The connection holding the lock: dropping it ends the session, and the lock.
    pub(crate) client: tokio_postgres::Client,
    /// The advisory lock's key.
    pub(crate) key: i64,
    pub(crate) node: String,
    /// `true` until the connection ended (set by the task driving it).
    pub(crate) alive: watch::Receiver<bool>,
}

impl std::fmt::Debug for NodeGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeGuard")
            .field("node", &self.node)
            .field("alive", &self.is_alive())
            .finish_non_exhaustive()
    }
}

impl NodeGuard {
    /// Whether the liveness lock is still held: false once its connection ended (then other
    /// nodes may take this node's rooms at once; its leases are not to be trusted, and it
    /// should join again).
    pub fn is_alive(&self) -> bool {
        *self.alive.borrow() && !self.client.is_closed()
    }

    /// Resolves when the liveness lock is lost (its connection ended); at once if it
    /// already is.
    pub async fn lost(&self) {
        let mut alive = self.alive.clone();
        // An error means the task driving the connection is gone: lost as well.
        let _ = alive.wait_for(|alive| !*alive).await;
    }

    /// The node id this guard holds.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Lets the lock go now and closes its connection (dropping the guard does too, as
    /// soon as the connection's end reaches PostgreSQL).
    pub async fn leave(self) {
        let _ = self
            .client
            .execute("SELECT pg_advisory_unlock($1)", &[&self.key])
            .await;
    }
}

/// What [`Database::acquire_room`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// The room is this node's now, at a new term.
    Owned(Lease),
    /// Another live node owns the room, with a live lease.
    Held {
        /// The owner's node id.
        owner: String,
        /// The owner's advertised address, if it registered one.
        advertise: Option<String>,
        /// The owner's term.
        term: i64,
    },
}

/// A room this node owns: the term to fence its commits with, and the room's version after
/// the last fenced commit (`None` until the first owner set it, see
/// [`Database::init_room_version`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The room.
    pub room: String,
    /// The fencing term of this ownership.
    pub term: i64,
    /// The room's version after the last fenced commit.
    pub version: Option<i64>,
}

/// One row of `kalphite_rooms` with its owner, for `kalphite inspect`
/// ([`Database::room_owners`]). Times are the database's clock.
#[derive(Clone, Debug, PartialEq)]
pub struct RoomOwner {
    /// The room.
    pub room: String,
    /// Its current term.
    pub term: i64,
    /// Its version after the last fenced commit.
    pub version: Option<i64>,
    /// The node owning it (`None`: released, or never owned).
    pub owner: Option<String>,
    /// The owner's advertised address.
    pub advertise: Option<String>,
    /// Whether the lease is live now, by the database clock.
    pub live: bool,
    /// Whether the owner's liveness lock is held (its process is up and connected).
    pub owner_alive: bool,
    /// When the lease ends (or ended).
    pub lease_until: Option<SystemTime>,
    /// Milliseconds left on the lease, by the database clock (negative once expired).
    pub lease_left_ms: Option<i64>,
    /// When the owner last renewed its leases.
    pub seen_at: Option<SystemTime>,
    /// Milliseconds since the owner last renewed its leases, by the database clock.
    pub seen_ago_ms: Option<i64>,
}

/// A room's fence in a fenced commit ([`Database::upsert_batch_fenced`]): the commit goes
/// through only if the room is still at `term` and at `from_version`, and moves it to
/// `to_version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The room.
    pub room: String,
    /// The writer's term for the room.
    pub term: i64,
    /// The room's version the commit builds on (`None`: the room's row has none yet).
    pub from_version: Option<i64>,
    /// The room's version after the commit.
    pub to_version: i64,
}

impl Database {
    /// Registers the node (upserts it into `kalphite_nodes`, with its advertised address)
    /// and takes its liveness lock: a session advisory lock keyed by the node id (and the
    /// schema), on a dedicated connection held by the returned guard. Dropping the guard, or
    /// the process dying, releases it; then other nodes take this node's rooms at once,
    /// without waiting for the leases to expire. A lock held by another process is tried
    /// for [`crate::DatabaseConfig::writer_lock_wait`] (one that is shutting down lets go).
    ///
    /// Join before acquiring rooms: a room whose owner holds no liveness lock is taken by
    /// the next node that asks.
    ///
    /// # Errors
    /// [`Error::NodeTaken`] if another live process holds that node id;
    /// [`Error::ClusterNeedsPostgres`] on SQLite; [`Error::InvalidConfig`] for an empty
    /// node id; connection errors.
    pub async fn join_cluster(&self, node: &NodeInfo) -> Result<NodeGuard> {
        let pg = self.cluster_backend()?;
        if node.node.is_empty() {
            return Err(Error::InvalidConfig {
                reason: "a cluster node id cannot be empty".into(),
            });
        }
        pg.join_cluster(node, self.lock_wait()).await
    }

    /// Takes `room` for `node` if it can, in one conditional statement: creates the room's
    /// row (term 1) if it has none, or takes it (term + 1, owner = `node`, lease until
    /// `now() + ttl`) if it is free (no owner), its lease expired, it is owned by `node`
    /// itself (a restarted incarnation: the new term fences the old one), or its owner's
    /// liveness lock is not held (the owner is dead: taken at once). Otherwise the room is
    /// [`Acquired::Held`] by its owner, with the owner's advertised address.
    ///
    /// # Errors
    /// [`Error::ClusterNeedsPostgres`] on SQLite; database errors.
    pub async fn acquire_room(&self, room: &str, node: &str, ttl: Duration) -> Result<Acquired> {
        let pg = self.cluster_backend()?;
        self.writable().await?;
        pg.acquire_room(room, node, ttl).await
    }

    /// Extends every lease of `node` still held at the given terms to `now() + ttl`, and
    /// bumps the node's `seen_at`; returns the `(room, term)` pairs renewed. A room missing
    /// from the answer is lost: another node took it, it was released, or its lease had
    /// already expired (an expired lease is never renewed, even if nobody took the room).
    ///
    /// # Errors
    /// [`Error::ClusterNeedsPostgres`] on SQLite; database errors (then nothing was renewed).
    pub async fn renew_leases(
        &self,
        node: &str,
        held: &[(String, i64)],
        ttl: Duration,
    ) -> Result<Vec<(String, i64)>> {
        self.cluster_backend()?.renew_leases(node, held, ttl).await
    }

    /// Gives rooms up (no owner, no lease) where `node` owns them at the given terms, so
    /// another node can take them at once: for a graceful shutdown and for idle unloads.
    /// A room that is no longer `node`'s at that term is left alone.
    ///
    /// # Errors
    /// [`Error::ClusterNeedsPostgres`] on SQLite; database errors.
    pub async fn release_rooms(&self, node: &str, rooms: &[(String, i64)]) -> Result<()> {
        self.cluster_backend()?.release_rooms(node, rooms).await
    }

    /// Sets the room's version in its row, at `term`, if it has none yet: what the first
    /// owner does after loading the log of a room whose row has no version (a room that
    /// predates fencing, or was just restored). Setting the same version again is a no-op.
    ///
    /// # Errors
    /// [`Error::Fenced`] if the room is no longer at `term`; [`Error::VersionAlreadySet`]
    /// if it has another version at this term; [`Error::ClusterNeedsPostgres`] on SQLite;
    /// database errors.
    pub async fn init_room_version(&self, room: &str, term: i64, version: i64) -> Result<()> {
        let pg = self.cluster_backend()?;
        self.writable().await?;
        pg.init_room_version(room, term, version).await
    }

    /// Every row of `kalphite_rooms` (sorted by room) with its owner's advertised address,
    /// whether the lease is live and the owner alive, and when the owner was last seen; for
    /// `kalphite inspect`.
    ///
    /// # Errors
    /// [`Error::ClusterNeedsPostgres`] on SQLite; database errors.
    pub async fn room_owners(&self) -> Result<Vec<RoomOwner>> {
        self.cluster_backend()?.room_owners().await
    }

    /// [`Database::upsert_batch_borrowed`] and the rooms' fences, all in one transaction:
    /// for each fence, the room's row moves to `to_version` only where it is at `term` and
    /// at `from_version` (`NULL` matching `None`); if any fence fails, nothing is written.
    /// Several fences of one room must chain (same term, each starting where the previous
    /// ends) and count as one.
    ///
    /// # Errors
    /// [`Error::Fenced`] naming a room whose fence failed (never
    /// [`Error::is_unavailable`]; see [`Error::is_fenced`]); [`Error::InvalidFences`];
    /// [`Error::ClusterNeedsPostgres`] on SQLite; otherwise as
    /// [`Database::upsert_batch_borrowed`].
    pub async fn upsert_batch_fenced<'a, I>(&self, entities: I, fences: &[Fence]) -> Result<()>
    where
        I: IntoIterator<Item = &'a Entity> + Send,
    {
        let pg = self.cluster_backend()?;
        let fences = merge_fences(fences)?;
        let writes = self.borrowed_writes(entities)?;
        self.writable().await?;
        pg.write_fenced(writes, &fences, self.quota()).await?;
        Ok(())
    }
}

impl Database {
    /// [`Database::apply_changes`] (upserts and deletes, in order) with fences, in one
    /// transaction, as [`Database::upsert_batch_fenced`]: what a cluster node writes
    /// besides its commits (a room's identity record, collected tombstones' deletes), so
    /// that a node that lost a room never writes over what the new owner wrote. A fence
    /// whose `from_version` equals its `to_version` checks the term and moves nothing.
    ///
    /// # Errors
    /// As [`Database::upsert_batch_fenced`] and [`Database::apply_changes`].
    pub async fn apply_changes_fenced(&self, changes: &[Change], fences: &[Fence]) -> Result<()> {
        let pg = self.cluster_backend()?;
        let fences = merge_fences(fences)?;
        let writes = self.change_writes(changes)?;
        self.writable().await?;
        pg.write_fenced(writes, &fences, self.quota()).await?;
        Ok(())
    }
}

/// One fence per room, in first-seen order: a room's later fences must continue its first
/// (same term, starting at the version the previous one ends at).
fn merge_fences(fences: &[Fence]) -> Result<Vec<Fence>> {
    let mut merged: Vec<Fence> = Vec::with_capacity(fences.len());
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(fences.len());
    for f in fences {
        match index.get(f.room.as_str()) {
            None => {
                index.insert(&f.room, merged.len());
                merged.push(f.clone());
            }
            Some(&i) => {
                let first = &mut merged[i];
                if first.term != f.term || f.from_version != Some(first.to_version) {
                    return Err(Error::InvalidFences {
                        reason: format!(
                            "room '{}' has fences that do not chain (term {}, to version {}; \
                             then term {}, from version {:?})",
                            f.room, first.term, first.to_version, f.term, f.from_version
                        ),
                    });
                }
                first.to_version = f.to_version;
            }
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(room: &str, term: i64, from: Option<i64>, to: i64) -> Fence {
        Fence {
            room: room.into(),
            term,
            from_version: from,
            to_version: to,
        }
    }

    #[test]
    fn a_rooms_fences_chain_into_one() {
        let merged = merge_fences(&[
            fence("a", 2, None, 3),
            fence("b", 1, Some(7), 8),
            fence("a", 2, Some(3), 5),
        ])
        .unwrap();
        assert_eq!(merged, [fence("a", 2, None, 5), fence("b", 1, Some(7), 8)]);
        assert!(matches!(
            merge_fences(&[fence("a", 2, None, 3), fence("a", 2, Some(4), 5)]),
            Err(Error::InvalidFences { .. })
        ));
        assert!(matches!(
            merge_fences(&[fence("a", 2, None, 3), fence("a", 3, Some(3), 5)]),
            Err(Error::InvalidFences { .. })
        ));
    }
}
