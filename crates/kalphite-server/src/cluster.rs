//! Cluster mode: this node's room leases in PostgreSQL. A room is acquired when a hello
//! for it arrives and nobody else holds it, renewed in the background, given up when the
//! room is unloaded or the node shuts down, and dropped (its clients closed with 1001) the
//! moment a renewal does not return it. Safety does not rest on these timers: every commit
//! of a room carries its lease's term as a fence (see `log.rs`), so a node that lost a
//! lease can never acknowledge another write of that room. See `docs/cluster.md`.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use kalphite_db::{Acquired, Database, NodeGuard, NodeInfo};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;
use super::{ServerError, Shared};

/// Default of [`ClusterConfig::lease_ttl`].
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// How a node takes part in a cluster.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// This node's id: unique among the live nodes (a second process with the same id is
    /// refused at start), stable across restarts.
    pub node_id: String,
    /// The `host:port` other nodes reach this node's `/sync` at, to forward connections
    /// of the rooms it owns.
    pub advertise: String,
    /// How long a lease lasts without renewal (by the database's clock). Renewed every
    /// third of it. A dead node's rooms are taken at once (its liveness lock is gone); a
    /// paused or cut-off node's, after this.
    pub lease_ttl: Duration,
}

impl ClusterConfig {
    /// A node `node_id`, reached at `advertise`, with the default lease TTL.
    #[must_use]
    pub fn new(node_id: impl Into<String>, advertise: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
            advertise: advertise.into(),
            lease_ttl: DEFAULT_LEASE_TTL,
        }
    }

    /// Sets the lease TTL.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ServerError> {
        if self.node_id.is_empty() || self.node_id.len() > 128 {
            return Err(ServerError::Config(
                "the cluster node id must be 1 to 128 bytes".into(),
            ));
        }
        if self.advertise.is_empty() || self.advertise.contains('/') {
            return Err(ServerError::Config(format!(
                "the advertised address must be host:port, not '{}'",
                self.advertise
            )));
        }
        if self.lease_ttl < Duration::from_millis(300) {
            return Err(ServerError::Config(
                "the lease TTL must be at least 300 ms".into(),
            ));
        }
        Ok(())
    }
}

/// What a hello's room is to this node.
pub(crate) enum Owner {
    /// This node holds its lease at `term`; `row_version` is the room's version in the
    /// lease row (what the first commit's fence starts from).
    Me { term: i64, row_version: Option<i64> },
    /// Another live node holds it: forward to `advertise`.
    Other { node: String, advertise: String },
}

/// This node's part in the cluster.
pub(crate) struct Cluster {
    pub(crate) config: ClusterConfig,
    db: Database,
    /// The node's liveness lock (its loss means other nodes may take every room at once).
    guard: tokio::sync::Mutex<NodeGuard>,
    /// Rooms this node holds a lease on, with the lease's term.
    owned: parking_lot::Mutex<HashMap<String, i64>>,
    metrics: Arc<Metrics>,
}

impl Cluster {
    /// Registers the node and takes its liveness lock.
    pub(crate) async fn join(
        db: Database,
        config: ClusterConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ServerError> {
        config.validate()?;
        let guard = db
            .join_cluster(&node_info(&config))
            .await
            .map_err(ServerError::Cluster)?;
        metrics
            .cluster
            .enabled
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(Self {
            config,
            db,
            guard: tokio::sync::Mutex::new(guard),
            owned: parking_lot::Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// Takes `room`'s lease if nobody else holds it. Called under the room's state lock,
    /// so one node never races itself for a room (each acquisition bumps the term).
    pub(crate) async fn acquire(&self, room: &str) -> Result<Owner, kalphite_db::Error> {
        let ttl = self.config.lease_ttl;
        // Bounded like the renewals: a hello to a node cut off from the database is
        // answered (storage_failed) instead of hanging.
        let request = self.db.acquire_room(room, &self.config.node_id, ttl);
        let acquired = bounded(&self.db, "the lease request", ttl, request).await?;
        match acquired {
            Acquired::Owned(lease) => {
                let n = {
                    let mut owned = self.owned.lock();
                    owned.insert(room.to_owned(), lease.term);
                    owned.len()
                };
                self.set_owned_gauge(n);
                Metrics::inc(&self.metrics.cluster.acquisitions);
                Ok(Owner::Me {
                    term: lease.term,
                    row_version: lease.version,
                })
            }
            Acquired::Held {
                owner, advertise, ..
            } => Ok(Owner::Other {
                advertise: advertise.unwrap_or_default(),
                node: owner,
            }),
        }
    }

    /// Forgets `room`'s lease at `term` (lost, or given up); true if it was held.
    pub(crate) fn forget(&self, room: &str, term: i64) -> bool {
        let (held, n) = {
            let mut owned = self.owned.lock();
            let held = owned.get(room) == Some(&term);
            if held {
                owned.remove(room);
            }
            (held, owned.len())
        };
        self.set_owned_gauge(n);
        held
    }

    /// Gives up the leases of `rooms` (unloaded rooms): another node may take them at once.
    pub(crate) async fn release(&self, rooms: Vec<(String, i64)>) {
        let rooms: Vec<(String, i64)> = rooms
            .into_iter()
            .filter(|(room, term)| self.forget(room, *term))
            .collect();
        if rooms.is_empty() {
            return;
        }
        if let Err(e) = self.db.release_rooms(&self.config.node_id, &rooms).await {
            // Not lost: the leases run out after the TTL.
            tracing::warn!(error = %e, rooms = rooms.len(),
                "could not give up the leases of unloaded rooms; they expire after the TTL");
        }
    }

    /// Gives up every lease (graceful shutdown, after the last commit).
    pub(crate) async fn release_all(&self) {
        let rooms = self.held();
        let n = rooms.len();
        self.release(rooms).await;
        if n > 0 {
            tracing::info!(rooms = n, "gave up the leases of this node's rooms");
        }
    }

    /// The leases held now.
    fn held(&self) -> Vec<(String, i64)> {
        self.owned
            .lock()
            .iter()
            .map(|(room, term)| (room.clone(), *term))
            .collect()
    }

    pub(crate) fn rooms_owned(&self) -> usize {
        self.owned.lock().len()
    }

    fn set_owned_gauge(&self, n: usize) {
        self.metrics
            .cluster
            .rooms_owned
            .store(n as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

fn node_info(config: &ClusterConfig) -> NodeInfo {
    NodeInfo {
        node: config.node_id.clone(),
        advertise: config.advertise.clone(),
    }
}

/// Renews this node's leases every third of the TTL until shutdown. A room the renewal
/// does not return was taken by another node (or expired): it is dropped here and its
/// clients closed. When renewals fail for a whole TTL (the database is unreachable), every
/// room is dropped: another node may own them by now. When the liveness lock is lost (its
/// connection ended), every room is dropped too (others may take them at once) and the
/// node joins again.
pub(crate) async fn renew_leases(shared: Weak<Shared>, cancel: CancellationToken) {
    let Some((ttl, period)) = shared.upgrade().and_then(|s| {
        let ttl = s.cluster.as_ref()?.config.lease_ttl;
        Some((ttl, ttl / 3))
    }) else {
        return;
    };
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(cluster) = shared.cluster.as_ref() else {
            return;
        };
        let alive = cluster.guard.lock().await.is_alive();
        if !alive {
            tracing::error!(
                "this node's liveness lock is gone (its database connection ended): \
                 dropping every room, then joining again"
            );
            drop_rooms(&shared, cluster, cluster.held());
            let info = node_info(&cluster.config);
            let rejoin = cluster.db.join_cluster(&info);
            match bounded(&cluster.db, "the rejoin", period, rejoin).await {
                Ok(guard) => *cluster.guard.lock().await = guard,
                Err(e) => {
                    Metrics::inc(&shared.metrics.cluster.lease_renew_failures);
                    tracing::warn!(error = %e, "could not join the cluster again");
                }
            }
            continue;
        }
        let held = cluster.held();
        let started = Instant::now();
        // Bounded: a database that stops answering (a silent partition) must count as a
        // failed renewal, or the node would hold its rooms for as long as the link hangs.
        let request = cluster.db.renew_leases(&cluster.config.node_id, &held, ttl);
        match bounded(&cluster.db, "the lease renewal", period, request).await {
            Ok(renewed) => {
                last_ok = started;
                let lost: Vec<(String, i64)> = held
                    .into_iter()
                    .filter(|lease| !renewed.contains(lease))
                    .collect();
                if !lost.is_empty() {
                    tracing::warn!(rooms = lost.len(), "leases lost: dropping those rooms");
                    drop_rooms(&shared, cluster, lost);
                }
            }
            Err(e) => {
                Metrics::inc(&shared.metrics.cluster.lease_renew_failures);
                tracing::warn!(error = %e, "lease renewal failed");
                if Instant::now().saturating_duration_since(last_ok) >= ttl && !held.is_empty() {
                    tracing::error!(
                        rooms = held.len(),
                        "no lease renewed for a whole TTL: dropping every room (another \
                         node may own them now)"
                    );
                    drop_rooms(&shared, cluster, held);
                }
            }
        }
    }
}

/// `request` to `db`, failed as unreachable ([`kalphite_db::Error::Connect`]) when it has
/// no answer within `limit`: a silent database must not hold a node's cluster duties.
async fn bounded<T>(
    db: &Database,
    what: &str,
    limit: Duration,
    request: impl Future<Output = Result<T, kalphite_db::Error>>,
) -> Result<T, kalphite_db::Error> {
    tokio::time::timeout(limit, request)
        .await
        .unwrap_or_else(|_| {
            Err(kalphite_db::Error::Connect {
                target: db.target().to_owned(),
                message: format!("no answer to {what} within {limit:?}"),
            })
        })
}

/// Drops the rooms of lost leases: forgotten, their handles closed (clients get 1001 and
/// reconnect, to whichever node owns the room now) and removed from the room map.
fn drop_rooms(shared: &Shared, cluster: &Cluster, lost: Vec<(String, i64)>) {
    for (room, term) in lost {
        if cluster.forget(&room, term) {
            Metrics::inc(&shared.metrics.cluster.leases_lost);
        }
        let handle = shared.rooms.lock().get(&room).cloned();
        if let Some(handle) = handle
            && handle.term() == Some(term)
        {
            handle.moved();
        }
    }
}
