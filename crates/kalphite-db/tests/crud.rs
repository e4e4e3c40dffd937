//! Layer 3 basics on both backends, ported from the original `Layer3-FrontendDatabase`
//! tests (BEHAVIORS.md §2.3) without its bugs: no fake SQL, no process-global memory
//! mode, no substring cascade deletes, corrupt rows skipped rather than failing reads.

mod common;

use common::{Backend, Fixture, comment, ids, review};
use kalphite::Entity;
use kalphite_db::{Database, DatabaseConfig, Error};
use serde_json::json;

both_backends!(
    persists_and_reads_back,
    data_survives_reopening,
    older_records_load_with_missing_fields,
    kinds_appear_per_type,
    upsert_replaces_and_counts_versions,
    deletes_report_whether_they_removed_something,
    bulk_operations,
    deleting_a_review_leaves_comments_that_mention_it,
    concurrent_writers_all_land,
    concurrent_overlapping_batches_all_land,
    corrupt_rows_are_skipped,
    clear_removes_every_entity,
    closed_database_refuses_calls,
    unset_updated_at_is_stamped,
);

async fn persists_and_reads_back(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    let c = comment("c1", "hello", 10, "high");
    db.upsert(c.clone()).await?;
    assert_eq!(db.get_by_id("comment", "c1").await?, Some(c.clone()));
    assert_eq!(db.get_by_id("comment", "nope").await?, None);
    assert_eq!(
        db.get_by_id("review", "c1").await?,
        None,
        "kinds are separate"
    );
    assert_eq!(db.get_by_type("comment").await?, vec![c]);
    db.close().await?;
    Ok(())
}

async fn data_survives_reopening(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    let (c, r) = (comment("c1", "m", 1, "low"), review("r1", "t", "pending"));
    db.upsert_batch(vec![c.clone(), r.clone()]).await?;
    db.close().await?;
    let again = Database::open(f.config()).await?;
    assert_eq!(again.get_by_type("comment").await?, vec![c]);
    assert_eq!(again.get_by_type("review").await?, vec![r]);
    assert_eq!(
        again.applied_migrations().await?.len(),
        3,
        "migrations are not re-run"
    );
    Ok(())
}

async fn older_records_load_with_missing_fields(f: Fixture) -> anyhow::Result<()> {
    // Written by an older program whose comments had no lineNumber.
    let old = Database::open(f.config()).await?;
    old.upsert(Entity::new("c1", "comment", json!({"message": "old"})).at(5))
        .await?;
    old.close().await?;
    let new = Database::open(f.config().schema(common::test_schema())).await?;
    let back = new.get_by_id("comment", "c1").await?.expect("still there");
    assert_eq!(back.data["message"], "old");
    assert!(back.data.get("lineNumber").is_none());
    Ok(())
}

async fn kinds_appear_per_type(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    assert!(db.kinds().await?.is_empty());
    db.upsert(comment("c1", "a", 1, "low")).await?;
    db.upsert(comment("c2", "b", 2, "low")).await?;
    db.upsert(review("r1", "t", "pending")).await?;
    let kinds: Vec<(String, u64)> = db
        .kinds()
        .await?
        .into_iter()
        .map(|(k, n)| (k.to_string(), n))
        .collect();
    assert_eq!(kinds, [("comment".to_owned(), 2), ("review".to_owned(), 1)]);
    assert_eq!(db.count("comment").await?, 2);
    assert_eq!(db.count("todo").await?, 0);
    Ok(())
}

async fn upsert_replaces_and_counts_versions(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    db.upsert(comment("c1", "first", 1, "low")).await?;
    db.upsert(comment("c2", "other", 2, "low")).await?;
    db.upsert(comment("c1", "second", 1, "high").at(1_800_000_000_000))
        .await?;
    let stored = db.get_stored("comment", "c1").await?.expect("stored");
    assert_eq!(stored.entity.data["message"], "second");
    assert_eq!(stored.entity.updated_at, 1_800_000_000_000);
    assert_eq!(stored.version, 2);
    assert_eq!(
        db.get_stored("comment", "c2")
            .await?
            .expect("stored")
            .version,
        1
    );
    // An update keeps the entity's first-insert position.
    assert_eq!(ids(&db.get_by_type("comment").await?), ["c1", "c2"]);
    Ok(())
}

async fn deletes_report_whether_they_removed_something(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    assert!(
        !db.delete("comment", "ghost").await?,
        "deleting from an empty db is fine"
    );
    db.upsert(comment("c1", "m", 1, "low")).await?;
    assert!(
        !db.delete("review", "c1").await?,
        "same id, other kind: untouched"
    );
    assert!(db.delete("comment", "c1").await?);
    assert_eq!(db.get_by_id("comment", "c1").await?, None);
    assert!(db.get_by_type("comment").await?.is_empty());
    assert!(!db.delete("comment", "c1").await?);
    Ok(())
}

async fn bulk_operations(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    let many: Vec<Entity> = (0..100)
        .map(|i| comment(&format!("c{i}"), "m", i, "low"))
        .collect();
    let stored = db.upsert_batch(many.clone()).await?;
    assert_eq!(stored, many);
    assert_eq!(db.get_by_type("comment").await?, many, "in insertion order");
    let removed = db
        .delete_batch([
            ("comment", "c3"),
            ("comment", "c5"),
            ("comment", "c7"),
            ("comment", "x"),
        ])
        .await?;
    assert_eq!(removed, 3);
    assert_eq!(db.count("comment").await?, 97);
    Ok(())
}

async fn deleting_a_review_leaves_comments_that_mention_it(f: Fixture) -> anyhow::Result<()> {
    // The original deleted any entity whose JSON contained the id as a substring.
    let db = Database::open(f.config()).await?;
    db.upsert(review("r1", "t", "pending")).await?;
    db.upsert(Entity::new(
        "c1",
        "comment",
        json!({"message": "see r1", "reviewId": "r1"}),
    ))
    .await?;
    db.upsert(Entity::new(
        "r10",
        "review",
        json!({"title": "r1 again", "author": "a"}),
    ))
    .await?;
    assert!(db.delete("review", "r1").await?);
    assert!(db.get_by_id("comment", "c1").await?.is_some());
    assert!(db.get_by_id("review", "r10").await?.is_some());
    Ok(())
}

async fn concurrent_writers_all_land(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                db.upsert(comment(&format!("w{w}-{i}"), "m", i, "low"))
                    .await?;
                // Everyone also rewrites one shared entity.
                db.upsert(comment("shared", &format!("{w}-{i}"), i, "low"))
                    .await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    assert_eq!(db.count("comment").await?, 8 * 25 + 1);
    let shared = db.get_stored("comment", "shared").await?.expect("shared");
    assert_eq!(
        shared.version,
        8 * 25,
        "every write to the shared entity counted once"
    );
    let mut expected: Vec<String> = (0..8)
        .flat_map(|w| (0..25).map(move |i| format!("w{w}-{i}")))
        .collect();
    expected.push("shared".into());
    expected.sort();
    let mut got = ids(&db.get_by_type("comment").await?);
    got.sort();
    assert_eq!(got, expected);
    Ok(())
}

async fn concurrent_overlapping_batches_all_land(f: Fixture) -> anyhow::Result<()> {
    // Writers upserting the same entities in opposite orders: on PostgreSQL their row
    // locks can deadlock, and the aborted batch must be retried, not lost.
    let db = Database::open(f.config()).await?;
    let mut tasks = Vec::new();
    for w in 0..4_i64 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..4_i64 {
                let mut keys: Vec<i64> = (0..10).collect();
                if w % 2 == 1 {
                    keys.reverse();
                }
                let batch = keys
                    .iter()
                    .map(|k| comment(&format!("k{k}"), &format!("{w}/{round}"), *k, "low"));
                db.upsert_batch(batch.collect()).await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    assert_eq!(db.count("comment").await?, 10);
    for k in 0..10 {
        let stored = db
            .get_stored("comment", &format!("k{k}"))
            .await?
            .expect("stored");
        assert_eq!(
            stored.version, 16,
            "k{k}: a batch was lost or applied twice"
        );
    }
    Ok(())
}

async fn corrupt_rows_are_skipped(f: Fixture) -> anyhow::Result<()> {
    if f.backend == Backend::Postgres {
        // JSONB cannot hold invalid JSON: PostgreSQL refuses the corrupting UPDATE itself.
        let db = Database::open(f.config()).await?;
        db.upsert(comment("c1", "m", 1, "low")).await?;
        let (client, conn) =
            tokio_postgres::connect(&std::env::var("KALPHITE_PG_URL")?, tokio_postgres::NoTls)
                .await?;
        tokio::spawn(conn);
        let err = client
            .batch_execute(
                "UPDATE kdb_corrupt_rows_are_skipped.kalphite_entities SET data = 'invalid-json'",
            )
            .await;
        assert!(err.is_err(), "PostgreSQL accepted invalid JSON");
        return Ok(());
    }
    let db = Database::open(f.config()).await?;
    db.upsert(comment("c1", "m", 1, "low")).await?;
    db.upsert(comment("c3", "m", 3, "high")).await?;
    f.raw_sql("UPDATE kalphite_entities SET data = 'invalid-json' WHERE id = 'c1'")
        .await;
    assert_eq!(db.get_by_id("comment", "c1").await?, None);
    assert_eq!(ids(&db.get_by_type("comment").await?), ["c3"]);
    let q = kalphite_db::Query::new("comment").eq("priority", "high");
    assert_eq!(
        ids(&db.find(&q).await?),
        ["c3"],
        "JSON queries skip the corrupt row too"
    );
    db.upsert(comment("c2", "m", 2, "low")).await?;
    assert_eq!(ids(&db.get_by_type("comment").await?), ["c3", "c2"]);
    assert_eq!(db.get_all().await?.len(), 2);
    Ok(())
}

async fn clear_removes_every_entity(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    db.upsert_batch(vec![
        comment("c1", "m", 1, "low"),
        review("r1", "t", "pending"),
    ])
    .await?;
    db.clear().await?;
    assert!(db.get_all().await?.is_empty());
    assert!(db.kinds().await?.is_empty());
    db.upsert(comment("c2", "m", 2, "low")).await?;
    assert_eq!(db.count("comment").await?, 1);
    Ok(())
}

async fn closed_database_refuses_calls(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    db.close().await?;
    assert!(matches!(
        db.get_by_id("comment", "c1").await,
        Err(Error::Closed)
    ));
    assert!(matches!(
        db.upsert(comment("c1", "m", 1, "low")).await,
        Err(Error::Closed)
    ));
    Ok(())
}

async fn unset_updated_at_is_stamped(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    let before = kalphite::now_millis();
    let stored = db
        .upsert(Entity::new("c1", "comment", json!({"message": "m"})))
        .await?;
    assert!(stored.updated_at >= before);
    assert_eq!(
        db.get_by_id("comment", "c1")
            .await?
            .expect("stored")
            .updated_at,
        stored.updated_at
    );
    Ok(())
}

#[tokio::test]
async fn memory_databases_are_private() -> anyhow::Result<()> {
    let a = Database::open(DatabaseConfig::new("sqlite::memory:")).await?;
    let b = Database::open(DatabaseConfig::new("sqlite::memory:")).await?;
    a.upsert(comment("c1", "m", 1, "low")).await?;
    assert_eq!(b.get_by_id("comment", "c1").await?, None);
    Ok(())
}

#[tokio::test]
async fn bad_urls_and_unreachable_servers_name_what_was_tried() {
    let err = Database::open(DatabaseConfig::new("mysql://db"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err}");
    assert!(err.to_string().contains("mysql://db"), "{err}");

    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("no/such/dir/x.db");
    let err = Database::open(DatabaseConfig::new(format!("sqlite:{}", missing.display())))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(err.to_string().contains("no/such/dir"), "{err}");

    let not_a_db = dir.path().join("text.db");
    std::fs::write(
        &not_a_db,
        "this is not a database, just some text to fill the header....",
    )
    .expect("write");
    let err = Database::open(DatabaseConfig::new(format!(
        "sqlite:{}",
        not_a_db.display()
    )))
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");

    // Port 1 on loopback: nothing listens there.
    let err = Database::open(DatabaseConfig::new(
        "postgres://kalphite:pw@127.0.0.1:1/none",
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains("pw@"), "the password leaked: {text}");

    let err = Database::open(DatabaseConfig::new("postgres://u@h:notaport/db"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidUrl { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_close_checkpoints_and_removes_the_wal() -> anyhow::Result<()> {
    // Checkpoints run on a separate thread and connection; closing must still end with a
    // complete checkpoint (the WAL file removed) and every row in the main file.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("wal.db");
    let db = Database::open(DatabaseConfig::new(format!("sqlite:{}", path.display()))).await?;
    for b in 0..50 {
        let batch = (0..100).map(|i| comment(&format!("c{b}-{i}"), &"x".repeat(200), i, "low"));
        db.upsert_batch(batch.collect()).await?;
    }
    db.close().await?;
    let wal = dir.path().join("wal.db-wal");
    assert!(!wal.exists(), "the WAL is still there after close");
    let conn = rusqlite::Connection::open(&path)?;
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM kalphite_entities", [], |r| r.get(0))?;
    assert_eq!(n, 5000);
    Ok(())
}
