//! Cluster mode's database layer (issue 12) against real PostgreSQL: one owner per room and
//! term among concurrent acquirers, terms that only grow, fenced commits that a stale owner
//! cannot get through (nothing of them written), leases that cannot be renewed once
//! expired, a dead owner's rooms taken at once, node ids held by one live process, and
//! SQLite refusing every call with a typed error. Every PostgreSQL test has a schema of its
//! own; without `KALPHITE_PG_URL` they say loudly that they skipped.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::Fixture;
use kalphite::Entity;
use kalphite_db::{Acquired, Database, DatabaseConfig, Error, Fence, Lease, NodeInfo};
use serde_json::json;

/// A lease no test waits out.
const LONG: Duration = Duration::from_mins(1);
/// Nodes acquiring one room at once.
const NODES: usize = 8;
/// Rounds of them (over three rooms, each freed by a release or an expiry).
const ROUNDS: usize = 9;
/// A lease a test waits out.
const SHORT: Duration = Duration::from_millis(300);

fn node(name: &str) -> NodeInfo {
    NodeInfo {
        node: name.into(),
        advertise: format!("{name}.local:8787"),
    }
}

fn owned(a: Acquired) -> Lease {
    match a {
        Acquired::Owned(lease) => lease,
        Acquired::Held { owner, term, .. } => panic!("held by {owner} at term {term}"),
    }
}

fn fence(room: &str, term: i64, from: Option<i64>, to: i64) -> Fence {
    Fence {
        room: room.into(),
        term,
        from_version: from,
        to_version: to,
    }
}

fn record(room: &str, n: u32) -> Entity {
    Entity::new(
        format!("{room}:{n}"),
        "record",
        json!({"room": room, "n": n}),
    )
    .at(1)
}

/// Opens one more handle (its own pool) on the fixture's database.
async fn open(f: &Fixture) -> Database {
    Database::open(f.config().pool_size(2))
        .await
        .expect("open the database")
}

/// The room's row: (term, version, owner).
async fn row(f: &Fixture, room: &str) -> (i64, Option<i64>, Option<String>) {
    let r = f
        .pg_client()
        .await
        .query_one(
            "SELECT term, version, owner FROM kalphite_rooms WHERE room = $1",
            &[&room],
        )
        .await
        .expect("the room's row");
    (r.get(0), r.get(1), r.get(2))
}

/// Waits until the room's lease has expired by the database clock (hang guard: 10 s).
async fn wait_expired(f: &Fixture, room: &str) {
    let client = f.pg_client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let expired: bool = client
            .query_one(
                "SELECT lease_until < now() FROM kalphite_rooms WHERE room = $1",
                &[&room],
            )
            .await
            .expect("lease_until")
            .get(0);
        if expired {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "hang guard");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn exists(db: &Database, e: &Entity) -> bool {
    db.get_by_id(&e.kind, &e.id).await.expect("read").is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acquirers_get_one_owner_per_term() {
    let Some(f) = Fixture::postgres("cluster_concurrent").await else {
        return;
    };
    let rooms = ["r0", "r1", "r2"];
    let mut nodes = Vec::new();
    for i in 0..NODES {
        let db = open(&f).await;
        let info = node(&format!("n{i}"));
        let guard = db.join_cluster(&info).await.expect("join");
        nodes.push((db, info, guard));
    }
    // Per room, every term granted and to whom.
    let mut granted: BTreeMap<&str, Vec<(i64, String)>> = BTreeMap::new();
    for round in 0..ROUNDS {
        let room = rooms[round % rooms.len()];
        let start = Arc::new(tokio::sync::Barrier::new(NODES));
        let tasks: Vec<_> = nodes
            .iter()
            .map(|(db, info, _)| {
                let (db, name, start) = (db.clone(), info.node.clone(), Arc::clone(&start));
                tokio::spawn(async move {
                    start.wait().await;
                    let got = db.acquire_room(room, &name, LONG).await.expect("acquire");
                    (name, got)
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut held = Vec::new();
        for task in tasks {
            match task.await.expect("task") {
                (name, Acquired::Owned(lease)) => winners.push((name, lease)),
                (
                    name,
                    Acquired::Held {
                        owner,
                        advertise,
                        term,
                    },
                ) => {
                    held.push((name, owner, advertise, term));
                }
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: one owner, got {winners:?}"
        );
        let (winner, lease) = winners.pop().expect("one");
        assert_eq!(lease.room, room);
        for (name, owner, advertise, term) in held {
            assert_eq!(
                (owner.as_str(), term),
                (winner.as_str(), lease.term),
                "{name} sees the winner"
            );
            assert_eq!(advertise, Some(format!("{winner}.local:8787")));
        }
        assert_eq!(
            row(&f, room).await,
            (lease.term, None, Some(winner.clone()))
        );
        let history = granted.entry(room).or_default();
        if let Some((last, _)) = history.last() {
            assert!(
                lease.term > *last,
                "{room}: term {} after {last}",
                lease.term
            );
        }
        history.push((lease.term, winner.clone()));

        // Free the room for the next round of it: given up, or left to expire.
        let (db, _, _) = nodes
            .iter()
            .find(|(_, info, _)| info.node == winner)
            .expect("the winner");
        if round % 2 == 0 {
            db.release_rooms(&winner, &[(room.to_owned(), lease.term)])
                .await
                .expect("release");
        } else {
            let renewed = db
                .renew_leases(&winner, &[(room.to_owned(), lease.term)], SHORT)
                .await
                .expect("renew");
            assert_eq!(renewed, [(room.to_owned(), lease.term)]);
            wait_expired(&f, room).await;
        }
    }
    for (room, history) in &granted {
        let terms: BTreeSet<i64> = history.iter().map(|(t, _)| *t).collect();
        assert_eq!(terms.len(), history.len(), "{room}: a term granted twice");
    }
    assert_eq!(granted.values().map(Vec::len).sum::<usize>(), ROUNDS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_terms_commit_is_rejected_and_writes_nothing() {
    let Some(f) = Fixture::postgres("cluster_fencing").await else {
        return;
    };
    let (a, b) = (open(&f).await, open(&f).await);
    let _ga = a.join_cluster(&node("a")).await.expect("join a");
    let _gb = b.join_cluster(&node("b")).await.expect("join b");
    let t = owned(a.acquire_room("room", "a", SHORT).await.expect("acquire"));
    assert_eq!((t.term, t.version), (1, None));

    // A good commit writes its records and the room's version together.
    let first = [record("room", 1), record("room", 2)];
    a.upsert_batch_fenced(&first, &[fence("room", t.term, None, 2)])
        .await
        .expect("a good fenced commit");
    assert!(exists(&a, &first[0]).await && exists(&a, &first[1]).await);
    assert_eq!(row(&f, "room").await, (t.term, Some(2), Some("a".into())));

    // The wrong from_version: refused, nothing written.
    let wrong = record("room", 3);
    let err = a
        .upsert_batch_fenced([&wrong], &[fence("room", t.term, Some(5), 6)])
        .await
        .expect_err("wrong from_version");
    assert!(
        matches!(&err, Error::Fenced { room } if room == "room"),
        "{err:?}"
    );
    assert!(err.is_fenced() && !err.is_unavailable());
    assert!(
        !exists(&a, &wrong).await,
        "a fenced commit wrote its record"
    );
    assert_eq!(row(&f, "room").await.1, Some(2));

    // The lease expires and b takes the room: a's next commit is refused.
    wait_expired(&f, "room").await;
    let t2 = owned(b.acquire_room("room", "b", LONG).await.expect("b acquires"));
    assert_eq!((t2.term, t2.version), (t.term + 1, Some(2)));
    let stale = record("room", 4);
    let err = a
        .upsert_batch_fenced([&stale], &[fence("room", t.term, Some(2), 3)])
        .await
        .expect_err("a stale term");
    assert!(err.is_fenced(), "{err:?}");
    assert!(
        !exists(&a, &stale).await,
        "a stale owner's record was written"
    );
    assert_eq!(row(&f, "room").await, (t2.term, Some(2), Some("b".into())));

    // One stale fence rolls back the whole batch, the other rooms' records and versions too.
    let other = owned(a.acquire_room("other", "a", LONG).await.expect("other"));
    let mixed = [record("other", 1), record("room", 5)];
    let err = a
        .upsert_batch_fenced(
            &mixed,
            &[
                fence("other", other.term, None, 1),
                fence("room", t.term, Some(2), 3),
            ],
        )
        .await
        .expect_err("one stale fence");
    assert!(
        matches!(&err, Error::Fenced { room } if room == "room"),
        "{err:?}"
    );
    assert!(!exists(&a, &mixed[0]).await && !exists(&a, &mixed[1]).await);
    assert_eq!(row(&f, "other").await.1, None);

    // The new owner commits from where the room was.
    let next = record("room", 6);
    b.upsert_batch_fenced([&next], &[fence("room", t2.term, Some(2), 3)])
        .await
        .expect("the new owner commits");
    assert!(exists(&b, &next).await);
    assert_eq!(row(&f, "room").await.1, Some(3));
    // Fences of one room chain into one; a fence alone moves the version.
    b.upsert_batch_fenced(
        [],
        &[
            fence("room", t2.term, Some(3), 4),
            fence("room", t2.term, Some(4), 5),
        ],
    )
    .await
    .expect("chained fences");
    assert_eq!(row(&f, "room").await.1, Some(5));
    let err = b
        .upsert_batch_fenced(
            [],
            &[
                fence("room", t2.term, Some(5), 6),
                fence("room", t2.term, Some(7), 8),
            ],
        )
        .await
        .expect_err("fences that do not chain");
    assert!(matches!(err, Error::InvalidFences { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_extends_a_live_lease_and_fails_after_expiry() {
    let Some(f) = Fixture::postgres("cluster_renewal").await else {
        return;
    };
    let a = open(&f).await;
    let _guard = a.join_cluster(&node("a")).await.expect("join");
    let client = f.pg_client().await;
    let lease_until = |room: &'static str| {
        let client = &client;
        async move {
            let r = client
                .query_one(
                    "SELECT lease_until FROM kalphite_rooms WHERE room = $1",
                    &[&room],
                )
                .await
                .expect("lease_until");
            r.get::<_, SystemTime>(0)
        }
    };
    let seen_at = || async {
        client
            .query_one("SELECT seen_at FROM kalphite_nodes WHERE node = 'a'", &[])
            .await
            .expect("seen_at")
            .get::<_, SystemTime>(0)
    };
    let live = owned(
        a.acquire_room("live", "a", Duration::from_secs(5))
            .await
            .expect("live"),
    );
    let short = owned(a.acquire_room("short", "a", SHORT).await.expect("short"));
    let (before, seen_before) = (lease_until("live").await, seen_at().await);

    // Before expiry: extended, by the database clock.
    let renewed = a
        .renew_leases("a", &[("live".into(), live.term)], LONG)
        .await
        .expect("renew");
    assert_eq!(renewed, [("live".to_owned(), live.term)]);
    let after = lease_until("live").await;
    assert!(after > before, "lease_until moved: {before:?} -> {after:?}");
    let left: bool = client
        .query_one(
            "SELECT lease_until > now() + interval '30 seconds' FROM kalphite_rooms \
             WHERE room = 'live'",
            &[],
        )
        .await
        .expect("query")
        .get(0);
    assert!(left, "renewed for the new TTL");
    assert!(seen_at().await > seen_before, "seen_at bumped");

    // A wrong term is not renewed.
    let renewed = a
        .renew_leases("a", &[("live".into(), live.term + 1)], LONG)
        .await
        .expect("renew");
    assert!(renewed.is_empty(), "{renewed:?}");

    // After expiry: not renewed, even though nobody took the room; the others still are.
    wait_expired(&f, "short").await;
    let expired = lease_until("short").await;
    let renewed = a
        .renew_leases(
            "a",
            &[("short".into(), short.term), ("live".into(), live.term)],
            LONG,
        )
        .await
        .expect("renew");
    assert_eq!(renewed, [("live".to_owned(), live.term)]);
    assert_eq!(
        lease_until("short").await,
        expired,
        "an expired lease stays expired"
    );
    assert_eq!(row(&f, "short").await.2.as_deref(), Some("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_owners_rooms_are_taken_before_the_lease_ends() {
    let Some(f) = Fixture::postgres("cluster_dead_owner").await else {
        return;
    };
    let (a, b) = (open(&f).await, open(&f).await);
    let _gb = b.join_cluster(&node("b")).await.expect("join b");

    // The owner's guard dropped (its process gone).
    let ga = a.join_cluster(&node("a")).await.expect("join a");
    let t1 = owned(a.acquire_room("room", "a", LONG).await.expect("a acquires"));
    let held = b.acquire_room("room", "b", LONG).await.expect("b asks");
    assert_eq!(
        held,
        Acquired::Held {
            owner: "a".into(),
            advertise: Some("a.local:8787".into()),
            term: t1.term
        }
    );
    drop(ga);
    let t2 = acquire_within_hang_guard(&b, "room", "b").await;
    assert_eq!(t2.term, t1.term + 1);

    // The owner's liveness session terminated by the server (a cut connection).
    let ga = a.join_cluster(&node("a")).await.expect("a joins again");
    assert!(ga.is_alive());
    let t3 = owned(
        a.acquire_room("room2", "a", LONG)
            .await
            .expect("a acquires"),
    );
    assert!(matches!(
        b.acquire_room("room2", "b", LONG).await.expect("b asks"),
        Acquired::Held { .. }
    ));
    let ended: i64 = f
        .pg_client()
        .await
        .query_one(
            // The session holding node a's lock in this test's schema (other tests run
            // nodes named a at the same time, in schemas of their own).
            "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l, \
             (SELECT hashtextextended('kalphite_node:' || current_schema() || ':a', 0) AS key) k \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND l.classid = ((k.key >> 32) & 4294967295)::oid \
             AND l.objid = (k.key & 4294967295)::oid",
            &[],
        )
        .await
        .expect("terminate")
        .get(0);
    assert_eq!(ended, 1, "one liveness session");
    tokio::time::timeout(Duration::from_secs(10), ga.lost())
        .await
        .expect("hang guard: the guard notices");
    assert!(!ga.is_alive());
    let t4 = acquire_within_hang_guard(&b, "room2", "b").await;
    assert_eq!(t4.term, t3.term + 1);

    // A restarted incarnation of an owner takes its own room back at a new term.
    let gb2 = b.join_cluster(&node("c")).await.expect("join c");
    let mine = owned(b.acquire_room("room3", "c", LONG).await.expect("c"));
    let again = owned(b.acquire_room("room3", "c", LONG).await.expect("c again"));
    assert_eq!(again.term, mine.term + 1);
    gb2.leave().await;
}

/// Acquires `room` for `node`, asking again until the dead owner's lock is gone (hang
/// guard: 10 s, far below the 60 s lease).
async fn acquire_within_hang_guard(db: &Database, room: &str, node: &str) -> Lease {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match db.acquire_room(room, node, LONG).await.expect("acquire") {
            Acquired::Owned(lease) => return lease,
            Acquired::Held { .. } => {
                assert!(tokio::time::Instant::now() < deadline, "hang guard");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_id_is_held_by_one_live_process() {
    let Some(f) = Fixture::postgres("cluster_node_taken").await else {
        return;
    };
    let first = open(&f).await;
    let guard = first.join_cluster(&node("n1")).await.expect("join");
    let impatient = Database::open(f.config().writer_lock_wait(Duration::from_millis(200)))
        .await
        .expect("open");
    let err = impatient
        .join_cluster(&node("n1"))
        .await
        .expect_err("a second process with the same node id");
    let Error::NodeTaken { node: id, holder } = &err else {
        panic!("expected NodeTaken, got {err:?}");
    };
    assert_eq!(id, "n1");
    assert!(
        holder
            .as_deref()
            .is_some_and(|h| h.contains("kalphite node n1")),
        "{holder:?}"
    );
    let message = err.to_string();
    assert!(message.contains("'n1'"), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
    // Another id joins, and the same id once the first process let go.
    let _other = impatient.join_cluster(&node("n2")).await.expect("n2");
    guard.leave().await;
    let patient = Database::open(f.config().writer_lock_wait(Duration::from_secs(10)))
        .await
        .expect("open");
    let again = patient.join_cluster(&node("n1")).await.expect("n1 again");
    assert!(again.is_alive());
    assert!(matches!(
        impatient.join_cluster(&node("")).await,
        Err(Error::InvalidConfig { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_rooms_are_taken_at_once_and_versions_set_once() {
    let Some(f) = Fixture::postgres("cluster_release").await else {
        return;
    };
    let (a, b) = (open(&f).await, open(&f).await);
    let _ga = a.join_cluster(&node("a")).await.expect("join a");
    let _gb = b.join_cluster(&node("b")).await.expect("join b");
    let t1 = owned(a.acquire_room("room", "a", LONG).await.expect("a"));
    assert!(matches!(
        b.acquire_room("room", "b", LONG).await.expect("b asks"),
        Acquired::Held { .. }
    ));
    a.release_rooms("a", &[("room".into(), t1.term)])
        .await
        .expect("release");
    assert_eq!(row(&f, "room").await, (t1.term, None, None));
    let t2 = owned(b.acquire_room("room", "b", LONG).await.expect("b takes it"));
    assert_eq!(t2.term, t1.term + 1);
    // A stale release leaves the new owner alone.
    a.release_rooms("a", &[("room".into(), t1.term)])
        .await
        .expect("release");
    assert_eq!(row(&f, "room").await.2.as_deref(), Some("b"));

    // The version is set once per room, by the owner at its term.
    b.init_room_version("room", t2.term, 10)
        .await
        .expect("init");
    b.init_room_version("room", t2.term, 10)
        .await
        .expect("the same again");
    let err = b
        .init_room_version("room", t2.term, 11)
        .await
        .expect_err("another");
    assert!(
        matches!(
            err,
            Error::VersionAlreadySet {
                stored: 10,
                given: 11,
                ..
            }
        ),
        "{err:?}"
    );
    let err = a
        .init_room_version("room", t1.term, 12)
        .await
        .expect_err("stale");
    assert!(err.is_fenced(), "{err:?}");
    assert_eq!(row(&f, "room").await, (t2.term, Some(10), Some("b".into())));

    // inspect's view.
    let owners = a.room_owners().await.expect("room owners");
    assert_eq!(owners.len(), 1);
    let o = &owners[0];
    assert_eq!(
        (o.room.as_str(), o.term, o.version),
        ("room", t2.term, Some(10))
    );
    assert_eq!(o.owner.as_deref(), Some("b"));
    assert_eq!(o.advertise.as_deref(), Some("b.local:8787"));
    assert!(o.live && o.owner_alive, "{o:?}");
    assert!(o.lease_left_ms.is_some_and(|ms| ms > 30_000), "{o:?}");
    assert!(o.seen_at.is_some() && o.seen_ago_ms.is_some(), "{o:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_gives_every_room_a_new_term_and_no_version() {
    let Some(f) = Fixture::postgres("cluster_restore").await else {
        return;
    };
    let a = open(&f).await;
    let _ga = a.join_cluster(&node("a")).await.expect("join");
    let t = owned(a.acquire_room("room", "a", LONG).await.expect("acquire"));
    a.upsert_batch_fenced([&record("room", 1)], &[fence("room", t.term, None, 1)])
        .await
        .expect("commit");
    let backup = a.backup().await.expect("backup");
    a.restore(&backup).await.expect("restore");
    assert_eq!(row(&f, "room").await, (t.term + 1, None, None));
    let err = a
        .upsert_batch_fenced([&record("room", 2)], &[fence("room", t.term, Some(1), 2)])
        .await
        .expect_err("the owner from before the restore");
    assert!(err.is_fenced(), "{err:?}");
}

#[tokio::test]
async fn sqlite_refuses_every_cluster_call() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("single.db");
    let url = format!("sqlite:{}", path.display());
    let db = Database::open(DatabaseConfig::new(url.clone()))
        .await
        .expect("open");
    let refused = |r: Result<(), Error>, call: &str| match r {
        Err(Error::ClusterNeedsPostgres { target }) => {
            assert!(target.contains("single.db"), "{call}: {target}");
        }
        other => panic!("{call}: expected ClusterNeedsPostgres, got {other:?}"),
    };
    refused(db.join_cluster(&node("a")).await.map(drop), "join_cluster");
    refused(
        db.acquire_room("r", "a", LONG).await.map(drop),
        "acquire_room",
    );
    refused(
        db.renew_leases("a", &[("r".into(), 1)], LONG)
            .await
            .map(drop),
        "renew_leases",
    );
    refused(
        db.release_rooms("a", &[("r".into(), 1)]).await,
        "release_rooms",
    );
    refused(db.init_room_version("r", 1, 1).await, "init_room_version");
    refused(db.room_owners().await.map(drop), "room_owners");
    let e = record("r", 1);
    refused(
        db.upsert_batch_fenced([&e], &[fence("r", 1, None, 1)])
            .await,
        "upsert_batch_fenced",
    );
    assert!(!exists(&db, &e).await, "nothing written");
    let message = db.room_owners().await.expect_err("refused").to_string();
    assert!(
        message.contains("cluster mode needs PostgreSQL"),
        "{message}"
    );

    // A cluster writer cannot open SQLite at all.
    for url in [url.as_str(), "sqlite::memory:"] {
        let err = Database::open(DatabaseConfig::new(url).cluster_writer(true))
            .await
            .expect_err("cluster_writer on SQLite");
        assert!(matches!(err, Error::ClusterNeedsPostgres { .. }), "{err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owners_fenced_changes_delete_nothing() {
    // apply_changes_fenced: what a node writes besides its commits (a room's identity
    // record, collected tombstones' deletes) is fenced too; a fence from a version to the
    // same version checks the term and moves nothing.
    use kalphite::{AnyEntity, Change, Origin};
    let Some(f) = Fixture::postgres("cluster_fenced_changes").await else {
        return;
    };
    let (a, b) = (open(&f).await, open(&f).await);
    let _ga = a.join_cluster(&node("a")).await.expect("join a");
    let _gb = b.join_cluster(&node("b")).await.expect("join b");
    let t = owned(a.acquire_room("room", "a", SHORT).await.expect("a"));
    a.init_room_version("room", t.term, 0).await.expect("init");
    let (kept, meta) = (record("room", 1), record("room", 2));
    let upsert = |e: &Entity| Change::upsert(AnyEntity::new(Arc::new(e.clone())), 1, Origin::Local);
    a.apply_changes_fenced(&[upsert(&kept)], &[fence("room", t.term, Some(0), 0)])
        .await
        .expect("a term check");
    assert!(exists(&a, &kept).await);
    assert_eq!(
        row(&f, "room").await.1,
        Some(0),
        "a term check moves nothing"
    );

    wait_expired(&f, "room").await;
    let t2 = owned(b.acquire_room("room", "b", LONG).await.expect("b"));
    let delete = Change::delete(kept.kind.clone(), kept.id.clone(), 1, Origin::Local);
    let err = a
        .apply_changes_fenced(
            &[delete, upsert(&meta)],
            &[fence("room", t.term, Some(0), 0)],
        )
        .await
        .expect_err("a stale owner's changes");
    assert!(err.is_fenced(), "{err:?}");
    assert!(exists(&a, &kept).await, "a stale owner deleted a record");
    assert!(!exists(&a, &meta).await, "a stale owner wrote a record");
    assert_eq!(row(&f, "room").await, (t2.term, Some(0), Some("b".into())));
}
