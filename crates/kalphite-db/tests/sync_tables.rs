//! The sync client's bookkeeping tables on both backends: written in the same transaction
//! as the entity rows (a refused batch leaves neither), read back in queue order, never
//! seen as entities (hydration, `kinds`, a backup's entity lines), put back as they were by a
//! restore, and counted by the quota net of the rows they replace or remove.

mod common;

use std::sync::Arc;

use common::{Fixture, comment, noise};
use kalphite::{AnyEntity, Change, Origin};
use kalphite_db::{Database, Error, SyncWrite};
use serde_json::json;

both_backends!(
    bookkeeping_is_written_with_the_entities,
    a_refused_batch_writes_no_bookkeeping,
    bookkeeping_is_not_user_data,
    bookkeeping_that_frees_space_passes_the_quota,
);

fn up(e: kalphite::Entity) -> Change {
    Change::upsert(AnyEntity::new(Arc::new(e)), 1, Origin::Local)
}

fn outbox(id: &str, position: u64, entry: &str) -> SyncWrite {
    SyncWrite::Outbox {
        kind: "comment".into(),
        id: id.into(),
        position,
        entry: entry.into(),
    }
}

fn known(id: &str, version: u64) -> SyncWrite {
    SyncWrite::Known {
        kind: "comment".into(),
        id: id.into(),
        version,
        entry: format!("{{\"v\":{version}}}"),
    }
}

fn state(key: &str, value: &str) -> SyncWrite {
    SyncWrite::State {
        key: key.into(),
        value: value.into(),
    }
}

async fn bookkeeping_is_written_with_the_entities(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    assert!(db.read_sync().await?.is_empty());
    db.write_with_sync(
        &[
            up(comment("c2", "m", 1, "low")),
            up(comment("c1", "m", 1, "low")),
        ],
        vec![
            outbox("c2", 5, "e2"),
            outbox("c1", 3, "e1"),
            known("k1", 7),
            state("watermark", "7"),
        ],
    )
    .await?;
    let tables = db.read_sync().await?;
    let queue: Vec<_> = tables
        .outbox
        .iter()
        .map(|r| (r.id.as_str(), r.position))
        .collect();
    assert_eq!(queue, [("c1", 3), ("c2", 5)], "oldest position first");
    assert_eq!(tables.outbox[0].entry, "e1");
    assert_eq!(tables.known.len(), 1);
    assert_eq!(
        (tables.known[0].id.as_str(), tables.known[0].version),
        ("k1", 7)
    );
    assert_eq!(tables.state_value("watermark"), Some("7"));

    // Replacing keeps one row per key; removing and clearing take effect.
    db.write_with_sync(
        &[],
        vec![
            outbox("c2", 5, "e2-new"),
            SyncWrite::OutboxRemoved {
                kind: "comment".into(),
                id: "c1".into(),
            },
            SyncWrite::KnownCleared,
            known("k2", 9),
            state("watermark", "9"),
        ],
    )
    .await?;
    let tables = db.read_sync().await?;
    assert_eq!(tables.outbox.len(), 1);
    assert_eq!(tables.outbox[0].entry, "e2-new");
    let known_ids: Vec<_> = tables.known.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(known_ids, ["k2"], "cleared before the new row");
    assert_eq!(tables.state_value("watermark"), Some("9"));
    Ok(())
}

async fn a_refused_batch_writes_no_bookkeeping(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config().schema(common::test_schema())).await?;
    let invalid = up(kalphite::Entity::new(
        "c9",
        "comment",
        json!({"message": 1}),
    ));
    let err = db
        .write_with_sync(
            &[invalid],
            vec![outbox("c9", 1, "e"), state("watermark", "3")],
        )
        .await;
    assert!(matches!(err, Err(Error::Validation { .. })), "{err:?}");
    assert!(
        db.read_sync().await?.is_empty(),
        "no bookkeeping without its data"
    );
    Ok(())
}

async fn bookkeeping_is_not_user_data(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    db.write_with_sync(
        &[up(comment("c1", "m", 1, "low"))],
        vec![
            outbox("c1", 1, "e"),
            known("c1", 1),
            state("replicaId", "r"),
        ],
    )
    .await?;
    assert_eq!(db.get_all().await?.len(), 1, "only the entity is hydrated");
    let kinds: Vec<_> = db
        .kinds()
        .await?
        .into_iter()
        .map(|(k, n)| (k.to_string(), n))
        .collect();
    assert_eq!(kinds, [("comment".to_owned(), 1)]);
    let at_backup = db.read_sync().await?;
    let backup = db.backup().await?;
    assert_eq!(
        String::from_utf8(backup.clone())?
            .lines()
            .filter(|l| l.contains("\"type\":\"comment\""))
            .count(),
        3,
        "the entity line, its queue entry and its known version"
    );
    // Later work: another entity with its own queue entry, the first one acknowledged.
    db.write_with_sync(
        &[up(comment("c2", "m", 2, "low"))],
        vec![
            outbox("c2", 2, "e2"),
            SyncWrite::OutboxRemoved {
                kind: "comment".into(),
                id: "c1".into(),
            },
            state("replicaId", "r2"),
        ],
    )
    .await?;
    // A restore puts the entities and their bookkeeping back as they were together: the
    // offline queue of the backup is not lost, nothing of later work stays.
    assert_eq!(db.restore(&backup).await?, 1);
    assert_eq!(db.read_sync().await?, at_backup);
    assert_eq!(db.get_all().await?.len(), 1);
    assert_eq!(db.kinds().await?.len(), 1);

    // A backup without bookkeeping (a server's, a local-only store's) empties it.
    let plain_fixture = Fixture::sqlite();
    let plain = Database::open(plain_fixture.config()).await?;
    plain
        .apply_changes(&[up(comment("p1", "m", 1, "low"))])
        .await?;
    assert_eq!(db.restore(&plain.backup().await?).await?, 1);
    assert!(db.read_sync().await?.is_empty());
    Ok(())
}

/// The quota counts bookkeeping rows net of what they replace or remove: over the limit, an
/// acknowledgement (the queue entry removed, the server's record and the watermark replaced
/// by same-size ones) is accepted, so it does not hold back the changes queued behind it;
/// new bookkeeping rows are refused.
async fn bookkeeping_that_frees_space_passes_the_quota(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    let big = kalphite::Entity::new("big", "blob", json!({"b": noise(1_200_000, 1)}));
    db.write_with_sync(
        &[up(big)],
        vec![
            outbox("c1", 1, "queued"),
            known("c1", 1),
            state("watermark", "1"),
        ],
    )
    .await?;
    db.close().await?;
    let db = Database::open(f.config().max_storage_mb(1)).await?;
    assert!(
        db.storage_bytes().await? > 1024 * 1024,
        "the premise: over the limit"
    );

    db.write_with_sync(
        &[],
        vec![
            SyncWrite::OutboxRemoved {
                kind: "comment".into(),
                id: "c1".into(),
            },
            known("c1", 2),
            state("watermark", "2"),
        ],
    )
    .await?;
    let err = db
        .write_with_sync(&[], vec![outbox("c2", 3, "queued")])
        .await;
    assert!(matches!(err, Err(Error::QuotaExceeded { .. })), "{err:?}");
    let tables = db.read_sync().await?;
    assert!(tables.outbox.is_empty());
    assert_eq!(tables.known[0].version, 2);
    assert_eq!(tables.state_value("watermark"), Some("2"));
    Ok(())
}
