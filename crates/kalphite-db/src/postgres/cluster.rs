//! Cluster mode on PostgreSQL (see [`crate::cluster`]): the SQL of node liveness locks, room
//! leases and fences. Statements that touch several rooms' rows lock them in room order
//! first, so a node's renewal, release and fenced commits never deadlock each other.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use super::Postgres;
use crate::cluster::{Acquired, Fence, Lease, NodeGuard, NodeInfo, RoomOwner};
use crate::error::{Error, Result};
use crate::writer_lock::{describe, lock_holders};

/// The advisory lock key of the node id `$1` in the connection's schema.
const NODE_KEY: &str =
    "SELECT hashtextextended('kalphite_node:' || COALESCE(current_schema(), '') || ':' || $1, 0)";

/// Whether the liveness lock of the node named by `$owner` is held by some session.
macro_rules! node_alive {
    ($owner:literal) => {
        concat!(
            "EXISTS (SELECT 1 FROM pg_locks l, (SELECT hashtextextended('kalphite_node:' || \
             COALESCE(current_schema(), '') || ':' || ",
            $owner,
            ", 0) AS key) k \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND l.classid = ((k.key >> 32) & 4294967295)::oid \
             AND l.objid = (k.key & 4294967295)::oid)"
        )
    };
}

const JOIN_NODE: &str = "INSERT INTO kalphite_nodes (node, advertise, started_at, seen_at) \
    VALUES ($1, $2, now(), now()) ON CONFLICT (node) DO UPDATE SET \
    advertise = EXCLUDED.advertise, started_at = EXCLUDED.started_at, seen_at = EXCLUDED.seen_at";

/// `$1` room, `$2` node, `$3` TTL in seconds. One row back (term, version) when taken.
const ACQUIRE: &str = concat!(
    "INSERT INTO kalphite_rooms AS r (room, term, owner, lease_until) \
     VALUES ($1, 1, $2, now() + make_interval(secs => $3::float8)) \
     ON CONFLICT (room) DO UPDATE SET term = r.term + 1, owner = EXCLUDED.owner, \
     lease_until = EXCLUDED.lease_until \
     WHERE r.owner IS NULL OR r.lease_until IS NULL OR r.lease_until < now() \
     OR r.owner = EXCLUDED.owner OR NOT ",
    node_alive!("r.owner"),
    " RETURNING r.term, r.version"
);

const HOLDER: &str = "SELECT r.owner, n.advertise, r.term FROM kalphite_rooms r \
    LEFT JOIN kalphite_nodes n ON n.node = r.owner WHERE r.room = $1";

/// `$1` node, `$2` rooms, `$3` terms, `$4` TTL in seconds: the (room, term) renewed.
const RENEW: &str = "WITH held AS MATERIALIZED ( \
        SELECT r.room, h.term FROM kalphite_rooms r \
        JOIN unnest($2::text[], $3::int8[]) AS h(room, term) \
        ON r.room = h.room AND r.term = h.term WHERE r.owner = $1 \
        ORDER BY r.room FOR UPDATE OF r), \
    renewed AS (UPDATE kalphite_rooms r \
        SET lease_until = now() + make_interval(secs => $4::float8) FROM held \
        WHERE r.room = held.room AND r.term = held.term AND r.owner = $1 \
        AND r.lease_until >= now() RETURNING r.room, r.term), \
    seen AS (UPDATE kalphite_nodes SET seen_at = now() WHERE node = $1) \
    SELECT room, term FROM renewed";

/// `$1` node, `$2` rooms, `$3` terms.
const RELEASE: &str = "WITH held AS MATERIALIZED ( \
        SELECT r.room, h.term FROM kalphite_rooms r \
        JOIN unnest($2::text[], $3::int8[]) AS h(room, term) \
        ON r.room = h.room AND r.term = h.term WHERE r.owner = $1 \
        ORDER BY r.room FOR UPDATE OF r) \
    UPDATE kalphite_rooms r SET owner = NULL, lease_until = NULL FROM held \
    WHERE r.room = held.room AND r.term = held.term AND r.owner = $1";

/// `$1` rooms, `$2` terms, `$3` from versions (NULL: none), `$4` to versions: the rooms
/// moved. Runs inside a write batch's transaction.
const FENCE: &str = "WITH locked AS MATERIALIZED ( \
        SELECT r.room FROM kalphite_rooms r WHERE r.room = ANY($1::text[]) \
        ORDER BY r.room FOR UPDATE) \
    UPDATE kalphite_rooms r SET version = f.to_version \
    FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[]) \
        AS f(room, term, from_version, to_version), locked k \
    WHERE k.room = f.room AND r.room = f.room AND r.term = f.term \
    AND r.version IS NOT DISTINCT FROM f.from_version \
    RETURNING r.room";

/// [`FENCE`] for one room.
const FENCE_ONE: &str = "UPDATE kalphite_rooms SET version = $4 \
    WHERE room = $1 AND term = $2 AND version IS NOT DISTINCT FROM $3";

const INIT_VERSION: &str = "UPDATE kalphite_rooms SET version = $3 \
    WHERE room = $1 AND term = $2 AND version IS NULL";

const ROOM_STATE: &str = "SELECT term, version FROM kalphite_rooms WHERE room = $1";

const ROOM_OWNERS: &str = concat!(
    "SELECT r.room, r.term, r.version, r.owner, n.advertise, \
     COALESCE(r.lease_until >= now(), false), r.owner IS NOT NULL AND ",
    node_alive!("r.owner"),
    ", r.lease_until, (EXTRACT(EPOCH FROM r.lease_until - now()) * 1000)::int8, \
     n.seen_at, (EXTRACT(EPOCH FROM now() - n.seen_at) * 1000)::int8 \
     FROM kalphite_rooms r LEFT JOIN kalphite_nodes n ON n.node = r.owner \
     ORDER BY r.room COLLATE \"C\""
);

/// What a restore (or `clear`) does to the rooms' rows: the log they describe is gone, so
/// every room gets a new term (fencing out any owner from before) and no version (the next
/// owner sets it from the restored log). Only where migration 3 is applied.
pub(super) const RESET_ROOMS: &str = "DO $$ BEGIN \
    IF to_regclass('kalphite_rooms') IS NOT NULL THEN \
    UPDATE kalphite_rooms SET term = term + 1, version = NULL, owner = NULL, lease_until = NULL; \
    END IF; END $$";

/// How often a statement that deadlocked is retried.
const DEADLOCK_RETRIES: u32 = 8;

/// How often a lock held by another process is tried again while waiting for it.
const RETRY: Duration = Duration::from_millis(50);

fn is_deadlock(e: &Error) -> bool {
    matches!(e, Error::Postgres { source, .. }
        if source.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED))
}

/// The rooms and terms of `(room, term)` pairs, as the two arrays the statements take.
fn split(pairs: &[(String, i64)]) -> (Vec<&str>, Vec<i64>) {
    pairs.iter().map(|(r, t)| (r.as_str(), *t)).unzip()
}

impl Postgres {
    /// See [`crate::Database::join_cluster`].
    pub(crate) async fn join_cluster(&self, node: &NodeInfo, wait: Duration) -> Result<NodeGuard> {
        let mut config = self.config.clone();
        config.application_name(format!(
            "kalphite node {} (pid {})",
            node.node,
            std::process::id()
        ));
        // A dead peer host is noticed by PostgreSQL within about 20 s rather than hours
        // (ignored on Unix sockets); its lock, and so its rooms, are free then.
        let options = config.get_options().map(str::to_owned).unwrap_or_default();
        config.options(
            format!(
                "{options} -c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 \
                 -c tcp_keepalives_count=2"
            )
            .trim_start()
            .to_owned(),
        );
        let (client, connection) = config.connect(NoTls).await.map_err(|e| Error::Connect {
            target: self.label.clone(),
            message: format!("opening the cluster node's liveness connection: {e}"),
        })?;
        let (alive_tx, alive) = watch::channel(true);
        let name = node.node.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(node = %name, error = %e,
                    "the connection of the cluster node's liveness lock failed");
            }
            alive_tx.send_replace(false);
        });
        let ctx = "joining the cluster";
        let key: i64 = client
            .query_one(NODE_KEY, &[&node.node])
            .await
            .map_err(Error::postgres(ctx))?
            .get(0);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let locked: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                .await
                .map_err(Error::postgres(ctx))?
                .get(0);
            if locked {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::NodeTaken {
                    node: node.node.clone(),
                    holder: describe(&lock_holders(&client, key).await),
                });
            }
            tokio::time::sleep(RETRY).await;
        }
        client
            .execute(JOIN_NODE, &[&node.node, &node.advertise])
            .await
            .map_err(Error::postgres(ctx))?;
        Ok(NodeGuard {
            client,
            key,
            node: node.node.clone(),
            alive,
        })
    }

    /// See [`crate::Database::acquire_room`].
    pub(crate) async fn acquire_room(
        &self,
        room: &str,
        node: &str,
        ttl: Duration,
    ) -> Result<Acquired> {
        let ctx = "acquiring a room";
        let client = self.client(ctx).await?;
        let acquire = client
            .prepare_cached(ACQUIRE)
            .await
            .map_err(Error::postgres(ctx))?;
        let ttl = ttl.as_secs_f64();
        // Taken, or held by another owner; a room released between the two statements is
        // tried again (each round needs another node to take and release it meanwhile).
        loop {
            if let Some(row) = client
                .query_opt(&acquire, &[&room, &node, &ttl])
                .await
                .map_err(Error::postgres(ctx))?
            {
                return Ok(Acquired::Owned(Lease {
                    room: room.to_owned(),
                    term: row.try_get(0).map_err(Error::postgres(ctx))?,
                    version: row.try_get(1).map_err(Error::postgres(ctx))?,
                }));
            }
            let Some(row) = client
                .query_opt(HOLDER, &[&room])
                .await
                .map_err(Error::postgres(ctx))?
            else {
                continue;
            };
            let owner: Option<String> = row.try_get(0).map_err(Error::postgres(ctx))?;
            if let Some(owner) = owner {
                return Ok(Acquired::Held {
                    owner,
                    advertise: row.try_get(1).map_err(Error::postgres(ctx))?,
                    term: row.try_get(2).map_err(Error::postgres(ctx))?,
                });
            }
        }
    }

    /// See [`crate::Database::renew_leases`].
    pub(crate) async fn renew_leases(
        &self,
        node: &str,
        held: &[(String, i64)],
        ttl: Duration,
    ) -> Result<Vec<(String, i64)>> {
        let ctx = "renewing room leases";
        let (rooms, terms) = split(held);
        let ttl = ttl.as_secs_f64();
        let mut attempt = 0;
        loop {
            let client = self.client(ctx).await?;
            match client
                .query(RENEW, &[&node, &rooms, &terms, &ttl])
                .await
                .map_err(Error::postgres(ctx))
            {
                Ok(rows) => {
                    return rows
                        .iter()
                        .map(|r| {
                            Ok((
                                r.try_get(0).map_err(Error::postgres(ctx))?,
                                r.try_get(1).map_err(Error::postgres(ctx))?,
                            ))
                        })
                        .collect();
                }
                Err(e) if attempt < DEADLOCK_RETRIES && is_deadlock(&e) => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// See [`crate::Database::release_rooms`].
    pub(crate) async fn release_rooms(&self, node: &str, rooms: &[(String, i64)]) -> Result<()> {
        if rooms.is_empty() {
            return Ok(());
        }
        let ctx = "releasing rooms";
        let (names, terms) = split(rooms);
        let mut attempt = 0;
        loop {
            let client = self.client(ctx).await?;
            match client
                .execute(RELEASE, &[&node, &names, &terms])
                .await
                .map_err(Error::postgres(ctx))
            {
                Ok(_) => return Ok(()),
                Err(e) if attempt < DEADLOCK_RETRIES && is_deadlock(&e) => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// See [`crate::Database::init_room_version`].
    pub(crate) async fn init_room_version(
        &self,
        room: &str,
        term: i64,
        version: i64,
    ) -> Result<()> {
        let ctx = "setting a room's version";
        let client = self.client(ctx).await?;
        let set = client
            .execute(INIT_VERSION, &[&room, &term, &version])
            .await
            .map_err(Error::postgres(ctx))?;
        if set == 1 {
            return Ok(());
        }
        let fenced = || Error::Fenced {
            room: room.to_owned(),
        };
        let row = client
            .query_opt(ROOM_STATE, &[&room])
            .await
            .map_err(Error::postgres(ctx))?
            .ok_or_else(fenced)?;
        let now_term: i64 = row.try_get(0).map_err(Error::postgres(ctx))?;
        let stored: Option<i64> = row.try_get(1).map_err(Error::postgres(ctx))?;
        match stored {
            _ if now_term != term => Err(fenced()),
            Some(stored) if stored == version => Ok(()),
            Some(stored) => Err(Error::VersionAlreadySet {
                room: room.to_owned(),
                stored,
                given: version,
            }),
            // Moved on between the two statements: at this term, only its owner sets it.
            None => Err(fenced()),
        }
    }

    /// See [`crate::Database::room_owners`].
    pub(crate) async fn room_owners(&self) -> Result<Vec<RoomOwner>> {
        let ctx = "listing room owners";
        let client = self.client(ctx).await?;
        let rows = client
            .query(ROOM_OWNERS, &[])
            .await
            .map_err(Error::postgres(ctx))?;
        rows.iter()
            .map(|r| {
                let lease_until: Option<SystemTime> = r.try_get(7).map_err(Error::postgres(ctx))?;
                let seen_at: Option<SystemTime> = r.try_get(9).map_err(Error::postgres(ctx))?;
                Ok(RoomOwner {
                    room: r.try_get(0).map_err(Error::postgres(ctx))?,
                    term: r.try_get(1).map_err(Error::postgres(ctx))?,
                    version: r.try_get(2).map_err(Error::postgres(ctx))?,
                    owner: r.try_get(3).map_err(Error::postgres(ctx))?,
                    advertise: r.try_get(4).map_err(Error::postgres(ctx))?,
                    live: r.try_get(5).map_err(Error::postgres(ctx))?,
                    owner_alive: r.try_get(6).map_err(Error::postgres(ctx))?,
                    lease_until,
                    lease_left_ms: r.try_get(8).map_err(Error::postgres(ctx))?,
                    seen_at,
                    seen_ago_ms: r.try_get(10).map_err(Error::postgres(ctx))?,
                })
            })
            .collect()
    }
}

/// Runs the fences of a write batch inside its transaction: one statement for all rooms.
///
/// # Errors
/// [`Error::Fenced`] naming the first room whose fence failed (the caller's transaction
/// must then roll back); database errors.
pub(super) async fn fence(tx: &deadpool_postgres::Transaction<'_>, fences: &[Fence]) -> Result<()> {
    if fences.is_empty() {
        return Ok(());
    }
    let ctx = "fencing a write batch";
    // The common case, one room: a plain keyed update (no array unnesting, no ordering CTE:
    // a single row lock cannot deadlock with another).
    if let [f] = fences {
        let stmt = tx
            .prepare_cached(FENCE_ONE)
            .await
            .map_err(Error::postgres(ctx))?;
        let n = tx
            .execute(&stmt, &[&f.room, &f.term, &f.from_version, &f.to_version])
            .await
            .map_err(Error::postgres(ctx))?;
        return if n == 1 {
            Ok(())
        } else {
            Err(Error::Fenced {
                room: f.room.clone(),
            })
        };
    }
    let rooms: Vec<&str> = fences.iter().map(|f| f.room.as_str()).collect();
    let terms: Vec<i64> = fences.iter().map(|f| f.term).collect();
    let from: Vec<Option<i64>> = fences.iter().map(|f| f.from_version).collect();
    let to: Vec<i64> = fences.iter().map(|f| f.to_version).collect();
    let stmt = tx
        .prepare_cached(FENCE)
        .await
        .map_err(Error::postgres(ctx))?;
    let rows = tx
        .query(&stmt, &[&rooms, &terms, &from, &to])
        .await
        .map_err(Error::postgres(ctx))?;
    if rows.len() == fences.len() {
        return Ok(());
    }
    let moved: HashSet<String> = rows
        .iter()
        .filter_map(|r| r.try_get::<_, String>(0).ok())
        .collect();
    let room = fences
        .iter()
        .find(|f| !moved.contains(&f.room))
        .map_or_else(|| fences[0].room.clone(), |f| f.room.clone());
    Err(Error::Fenced { room })
}
