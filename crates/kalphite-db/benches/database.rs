//! Layer 3 benchmarks (see `docs/benchmarks.md`): 100k entities upserted through
//! `apply_changes` (the flush target's path) in batches of 100, beside raw rusqlite
//! prepared inserts of the same rows in one transaction, with the ratio printed; then
//! `get_by_type` of 100k, point `get_by_id`, and hydrating a Store of 100k. PostgreSQL
//! runs too when `KALPHITE_PG_URL` is set.
//!
//! Run: `cargo bench -p kalphite-db --bench database`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use kalphite::{AnyEntity, Change, Entity, FlushConfig, Origin, Store};
use kalphite_db::{Database, DatabaseConfig, open_store};
use rusqlite::params;
use serde_json::json;
use tokio::runtime::Runtime;
use tokio_postgres::types::ToSql;

const N: usize = 100_000;
const BATCH: usize = 100;

fn entity(i: usize) -> Entity {
    Entity::new(
        format!("c{i}"),
        "comment",
        json!({"message": format!("Message {i}"), "lineNumber": i}),
    )
    .at(1_700_000_000_000)
}

fn changes() -> Vec<Change> {
    (0..N)
        .map(|i| {
            Change::upsert(
                AnyEntity::new(Arc::new(entity(i))),
                1_700_000_000_000,
                Origin::Local,
            )
        })
        .collect()
}

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite:{}", dir.path().join("bench.db").display())
}

/// The engine: a fresh SQLite file, then 1,000 transactions of 100 changes. The time runs
/// until `close` returns, so the WAL checkpoints (which the engine runs on a background
/// thread) are paid in full, as the baseline pays its own.
fn engine_insert(rt: &Runtime, changes: &[Change]) -> Duration {
    let dir = tempfile::tempdir().expect("dir");
    let db = rt
        .block_on(Database::open(DatabaseConfig::new(sqlite_url(&dir))))
        .expect("open");
    let start = Instant::now();
    rt.block_on(async {
        for batch in changes.chunks(BATCH) {
            db.apply_changes(batch).await.expect("apply");
        }
        db.close().await.expect("close");
    });
    start.elapsed()
}

/// The baseline: the same table and pragmas, the same rows (JSON serialized in the loop),
/// raw prepared inserts in one transaction, timed until the connection is closed.
fn raw_insert(entities: &[Entity]) -> Duration {
    let dir = tempfile::tempdir().expect("dir");
    let mut conn = rusqlite::Connection::open(dir.path().join("raw.db")).expect("open");
    // The same settings as the engine's connection (src/sqlite.rs, `PRAGMAS`), with
    // SQLite's own auto-checkpoint.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; \
         PRAGMA journal_size_limit = 67108864;",
    )
    .expect("pragmas");
    conn.execute_batch(include_str!("../migrations/sqlite/0001_entities.up.sql"))
        .expect("table");
    let start = Instant::now();
    let tx = conn.transaction().expect("tx");
    {
        let mut stmt = tx
            .prepare("INSERT INTO kalphite_entities (type, id, data, updated_at) VALUES (?1, ?2, ?3, ?4)")
            .expect("prepare");
        for e in entities {
            let data = serde_json::to_string(&e.data).expect("json");
            stmt.execute(params![
                e.kind.as_str(),
                e.id.as_str(),
                data,
                1_700_000_000_000_i64
            ])
            .expect("insert");
        }
    }
    tx.commit().expect("commit");
    conn.close().expect("close"); // the final checkpoint, as the engine's close does
    start.elapsed()
}

fn bench_insert(c: &mut Criterion, rt: &Runtime) {
    let changes = changes();
    let entities: Vec<Entity> = (0..N).map(entity).collect();
    let mut g = c.benchmark_group("sqlite_upsert_100k");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(15))
        .warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("apply_changes_batches_of_100", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| engine_insert(rt, &changes)).sum());
    });
    g.bench_function("raw_rusqlite_one_transaction", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| raw_insert(&entities)).sum());
    });
    g.finish();

    // The ratio, measured here side by side (medians of 5 alternating runs).
    let (mut engine, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        engine.push(engine_insert(rt, &changes));
        raw.push(raw_insert(&entities));
    }
    engine.sort();
    raw.sort();
    let (e, r) = (engine[2], raw[2]);
    println!(
        "RATIO sqlite upsert 100k: engine (apply_changes, batches of 100) {e:.2?} / raw rusqlite \
         (one transaction) {r:.2?} = {:.2}x",
        e.as_secs_f64() / r.as_secs_f64()
    );
}

fn filled(rt: &Runtime, config: DatabaseConfig) -> Database {
    let db = rt.block_on(Database::open(config)).expect("open");
    rt.block_on(async {
        db.clear().await.expect("clear");
        let all = changes();
        for batch in all.chunks(1000) {
            db.apply_changes(batch).await.expect("fill");
        }
    });
    db
}

fn bench_reads(c: &mut Criterion, rt: &Runtime, name: &str, db: &Database) {
    let mut g = c.benchmark_group(format!("{name}_reads_100k"));
    g.sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("get_by_type", |b| {
        b.iter(|| {
            let all = rt.block_on(db.get_by_type("comment")).expect("read");
            assert_eq!(all.len(), N);
            all
        });
    });
    g.bench_function("hydrate_store", |b| {
        b.iter(|| {
            let store = rt
                .block_on(open_store(db, Store::builder(), FlushConfig::default()))
                .expect("store");
            assert_eq!(store.len(), N);
            rt.block_on(store.close()).expect("close");
        });
    });
    g.finish();

    let mut g = c.benchmark_group(format!("{name}_point_read"));
    g.sample_size(20)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    let mut i = 0usize;
    g.bench_with_input(BenchmarkId::new("get_by_id", "of 100k"), &(), |b, ()| {
        b.iter(|| {
            i = (i + 7919) % N;
            let id = format!("c{i}");
            rt.block_on(db.get_by_id("comment", &id))
                .expect("read")
                .map(|e| e.data)
        });
    });
    g.finish();
}

/// The PostgreSQL baseline: the same rows as raw prepared inserts, pipelined, in one
/// transaction, on a plain tokio-postgres connection.
fn raw_postgres_insert(rt: &Runtime, url: &str, entities: &[Entity]) -> Duration {
    rt.block_on(async {
        let (mut client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        client
            .batch_execute("SET search_path = kdb_bench; DELETE FROM kalphite_entities")
            .await
            .expect("clear");
        let start = Instant::now();
        let tx = client.transaction().await.expect("tx");
        let stmt = tx
            .prepare(
                "INSERT INTO kalphite_entities (type, id, data, updated_at) \
                 VALUES ($1, $2, $3::text::jsonb, $4)",
            )
            .await
            .expect("prepare");
        for chunk in entities.chunks(512) {
            let rows: Vec<(String, String, String, i64)> = chunk
                .iter()
                .map(|e| {
                    let data = serde_json::to_string(&e.data).expect("json");
                    (
                        e.kind.to_string(),
                        e.id.to_string(),
                        data,
                        1_700_000_000_000_i64,
                    )
                })
                .collect();
            let pending = rows
                .iter()
                .map(|(k, i, d, u)| tx.execute_raw(&stmt, [k as &(dyn ToSql + Sync), i, d, u]));
            futures_util::future::try_join_all(pending)
                .await
                .expect("insert");
        }
        tx.commit().await.expect("commit");
        start.elapsed()
    })
}

fn bench_postgres_insert(c: &mut Criterion, rt: &Runtime, url: &str, config: &DatabaseConfig) {
    let changes = changes();
    let entities: Vec<Entity> = (0..N).map(entity).collect();
    let db = rt.block_on(Database::open(config.clone())).expect("open");
    let mut g = c.benchmark_group("postgres_upsert_100k");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("apply_changes_batches_of_100", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    rt.block_on(db.clear()).expect("clear");
                    let start = Instant::now();
                    rt.block_on(async {
                        for batch in changes.chunks(BATCH) {
                            db.apply_changes(batch).await.expect("apply");
                        }
                    });
                    start.elapsed()
                })
                .sum()
        });
    });
    g.bench_function("raw_tokio_postgres_one_transaction", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| raw_postgres_insert(rt, url, &entities))
                .sum()
        });
    });
    g.finish();
}

fn main() {
    let rt = Runtime::new().expect("runtime");
    let mut c = Criterion::default().configure_from_args();
    bench_insert(&mut c, &rt);

    let dir = tempfile::tempdir().expect("dir");
    let db = filled(&rt, DatabaseConfig::new(sqlite_url(&dir)));
    bench_reads(&mut c, &rt, "sqlite", &db);
    rt.block_on(db.close()).expect("close");

    match std::env::var("KALPHITE_PG_URL") {
        Ok(url) => {
            let config = DatabaseConfig::new(url.clone()).postgres_schema("kdb_bench");
            bench_postgres_insert(&mut c, &rt, &url, &config);
            let db = filled(&rt, config);
            bench_reads(&mut c, &rt, "postgres", &db);
            rt.block_on(db.close()).expect("close");
        }
        Err(_) => eprintln!("*** PostgreSQL benchmarks skipped: KALPHITE_PG_URL is not set ***"),
    }
    c.final_summary();
}
