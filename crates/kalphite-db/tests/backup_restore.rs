//! Backup and restore on both backends and across them (SQLite → PostgreSQL and back), and
//! the refusal of corrupt, truncated or invalid backups with the old contents kept.

mod common;

use common::{Fixture, comment, review};
use kalphite::Entity;
use kalphite_db::{Database, Error};
use serde_json::json;

both_backends!(
    round_trip_on_one_backend,
    restore_replaces_the_contents,
    corrupt_and_truncated_backups_are_refused,
    schema_invalid_backups_are_refused,
);

fn sample() -> Vec<Entity> {
    vec![
        comment("c1", "hello \"world\" \n ünïcödé 🎉", 10, "high"),
        review("r1", "title", "pending"),
        comment("c2", "second", -3, "low"),
        Entity::new(
            "n1",
            "note",
            json!({"f": 0.1, "big": 9_007_199_254_740_993_i64, "nil": null,
            "list": [1, "two", {"three": 3}], "deep": {"a": {"b": [true, false]}}}),
        )
        .at(42),
    ]
}

async fn round_trip_on_one_backend(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    db.upsert_batch(sample()).await?;
    db.upsert(comment("c1", "updated", 11, "high")).await?; // version 2
    let before = db.get_all().await?;
    let bytes = db.backup().await?;
    let text = std::str::from_utf8(&bytes)?;
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.contains("\"format\":\"kalphite-backup\"") && first.contains("\"version\":2"),
        "{first}"
    );
    assert_eq!(text.lines().count(), 2 + before.len());

    db.clear().await?;
    assert_eq!(db.restore(&bytes).await?, 4);
    assert_eq!(
        db.get_all().await?,
        before,
        "same entities in the same order"
    );
    assert_eq!(
        db.get_stored("comment", "c1").await?.expect("c1").version,
        2,
        "versions kept"
    );
    Ok(())
}

async fn restore_replaces_the_contents(f: Fixture) -> anyhow::Result<()> {
    let source = Database::open(kalphite_db::DatabaseConfig::new("sqlite::memory:")).await?;
    source.upsert_batch(sample()).await?;
    let bytes = source.backup().await?;
    let db = Database::open(f.config()).await?;
    db.upsert(comment("old", "will go", 1, "low")).await?;
    db.restore(&bytes).await?;
    assert_eq!(db.get_by_id("comment", "old").await?, None);
    assert_eq!(db.get_all().await?, source.get_all().await?);
    Ok(())
}

async fn corrupt_and_truncated_backups_are_refused(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    db.upsert_batch(sample()).await?;
    let good = db.backup().await?;
    db.clear().await?;
    db.upsert(comment("keep", "me", 1, "low")).await?;
    let kept = db.get_all().await?;

    let text = String::from_utf8(good.clone())?;
    let lines: Vec<&str> = text.lines().collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated mid-line", good[..good.len() / 2].to_vec()),
        (
            "last line dropped",
            (lines[..lines.len() - 1].join("\n") + "\n").into_bytes(),
        ),
        ("an entity dropped", {
            let mut l = lines.clone();
            l.remove(2);
            (l.join("\n") + "\n").into_bytes()
        }),
        (
            "a value altered",
            text.replacen("second", "SECOND", 1).into_bytes(),
        ),
        (
            "garbage line",
            text.replacen('\n', "\n{not json\n", 1).into_bytes(),
        ),
        ("not a backup", b"hello\n".to_vec()),
        ("empty", Vec::new()),
        (
            "future version",
            text.replacen("\"version\":2", "\"version\":99", 1)
                .into_bytes(),
        ),
    ];
    for (what, bytes) in cases {
        let err = db.restore(&bytes).await.unwrap_err();
        assert!(matches!(err, Error::InvalidBackup { .. }), "{what}: {err}");
        assert_eq!(
            db.get_all().await?,
            kept,
            "{what}: the old contents were touched"
        );
    }
    Ok(())
}

async fn schema_invalid_backups_are_refused(f: Fixture) -> anyhow::Result<()> {
    let loose = Database::open(kalphite_db::DatabaseConfig::new("sqlite::memory:")).await?;
    loose.upsert(comment("c1", "fine", 1, "low")).await?;
    loose
        .upsert(Entity::new("c2", "comment", json!({"message": 5})))
        .await?;
    let bytes = loose.backup().await?;
    let db = Database::open(f.config().schema(common::test_schema())).await?;
    db.upsert(comment("keep", "me", 1, "low")).await?;
    let err = db.restore(&bytes).await.unwrap_err();
    assert!(
        matches!(&err, Error::Validation { id, .. } if id == "c2"),
        "{err}"
    );
    assert_eq!(db.get_all().await?.len(), 1);
    Ok(())
}

async fn across(from: &Database, to: &Database) -> anyhow::Result<()> {
    from.upsert_batch(sample()).await?;
    from.upsert(review("r1", "retitled", "approved")).await?;
    let bytes = from.backup().await?;
    to.upsert(comment("old", "x", 1, "low")).await?;
    assert_eq!(to.restore(&bytes).await?, 4);
    assert_eq!(to.get_all().await?, from.get_all().await?);
    assert_eq!(
        to.get_stored("review", "r1").await?,
        from.get_stored("review", "r1").await?
    );
    // And back again, byte for byte apart from the header.
    let again = to.backup().await?;
    let body = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .lines()
            .skip(1)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(body(&again), body(&bytes));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_to_postgres() -> anyhow::Result<()> {
    let Some(pg) = Fixture::postgres("sqlite_to_postgres").await else {
        return Ok(());
    };
    let lite = Fixture::sqlite();
    across(
        &Database::open(lite.config()).await?,
        &Database::open(pg.config()).await?,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_to_sqlite() -> anyhow::Result<()> {
    let Some(pg) = Fixture::postgres("postgres_to_sqlite").await else {
        return Ok(());
    };
    let lite = Fixture::sqlite();
    across(
        &Database::open(pg.config()).await?,
        &Database::open(lite.config()).await?,
    )
    .await
}
