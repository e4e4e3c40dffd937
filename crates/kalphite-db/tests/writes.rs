//! Write-path guarantees on both backends: schema validation and normalization (nothing
//! is written when validation fails), the storage quota (a refused write leaves no trace),
//! and the database as a flush target (one transaction per batch, deletes and upserts in
//! order, remote changes stored too).

mod common;

use std::sync::Arc;

use common::{Fixture, comment, ids, noise, review};
use kalphite::{AnyEntity, Change, Entity, FlushTarget, Origin};
use kalphite_db::{Database, Error};
use serde_json::json;

both_backends!(
    schema_violations_write_nothing,
    schema_defaults_are_stored,
    quota_refuses_writes_past_the_limit,
    quota_counts_what_deletes_free,
    quota_accepts_batches_that_free_space_over_the_limit,
    quota_counts_a_replaced_row_once,
    flush_batches_apply_in_one_transaction,
    a_bad_change_refuses_the_whole_batch,
    flush_target_accepts_typed_entities,
);

async fn schema_violations_write_nothing(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config().schema(common::test_schema())).await?;
    let bad = Entity::new("c1", "comment", json!({"message": 42, "lineNumber": "x"}));
    let err = db.upsert(bad).await.unwrap_err();
    match &err {
        Error::Validation { kind, id, issues } => {
            assert_eq!((kind.as_str(), id.as_str()), ("comment", "c1"));
            let paths: Vec<&str> = issues.iter().map(|i| i.path.as_str()).collect();
            assert!(
                paths.contains(&"/message") && paths.contains(&"/lineNumber"),
                "{paths:?}"
            );
        }
        other => panic!("expected Validation, got {other}"),
    }
    let unknown = db
        .upsert(Entity::new("x", "unknown", json!({})))
        .await
        .unwrap_err();
    assert!(matches!(unknown, Error::Validation { .. }), "{unknown}");
    // One bad entity refuses the whole batch.
    let batch = vec![
        comment("c2", "ok", 1, "low"),
        Entity::new("r9", "review", json!({"title": "no author"})),
    ];
    assert!(matches!(
        db.upsert_batch(batch).await,
        Err(Error::Validation { .. })
    ));
    assert!(db.get_all().await?.is_empty(), "something was written");
    Ok(())
}

async fn schema_defaults_are_stored(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config().schema(common::test_schema())).await?;
    let stored = db
        .upsert(Entity::new(
            "c1",
            "comment",
            json!({"message": "m", "lineNumber": 1}),
        ))
        .await?;
    assert_eq!(stored.data["priority"], "medium");
    let back = db.get_by_id("comment", "c1").await?.expect("stored");
    assert_eq!(back.data["priority"], "medium");
    let r = db
        .upsert(Entity::new(
            "r1",
            "review",
            json!({"title": "t", "author": "a"}),
        ))
        .await?;
    assert_eq!(r.data["status"], "pending");
    Ok(())
}

async fn quota_refuses_writes_past_the_limit(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config().max_storage_mb(1)).await?;
    // A single write bigger than the whole quota.
    let huge = Entity::new("huge", "blob", json!({"b": noise(1_200_000, 1)}));
    let err = db.upsert(huge).await.unwrap_err();
    match err {
        Error::QuotaExceeded {
            limit_mb,
            needed_bytes,
            ..
        } => {
            assert_eq!(limit_mb, 1);
            assert!(needed_bytes > 1_200_000);
        }
        other => panic!("expected QuotaExceeded, got {other}"),
    }
    assert_eq!(db.get_by_id("blob", "huge").await?, None);

    // Fill up in 200 KB steps until refused; the refused batch leaves nothing behind.
    let mut accepted = 0;
    let refused = loop {
        assert!(accepted < 20, "1 MB quota never refused 200 KB writes");
        let batch = vec![
            Entity::new(
                format!("b{accepted}"),
                "blob",
                json!({"b": noise(100_000, accepted)}),
            ),
            Entity::new(
                format!("b{accepted}x"),
                "blob",
                json!({"b": noise(100_000, 99 + accepted)}),
            ),
        ];
        match db.upsert_batch(batch).await {
            Ok(_) => accepted += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(refused, Error::QuotaExceeded { .. }), "{refused}");
    assert!(refused.to_string().contains("max_storage_mb"), "{refused}");
    assert!(accepted >= 2, "refused too early: after {accepted} batches");
    assert_eq!(db.count("blob").await?, 2 * accepted);
    assert_eq!(db.get_by_id("blob", &format!("b{accepted}")).await?, None);
    // Deletes are always allowed; small writes still fit after them on SQLite, whose
    // freed pages count as free at once.
    assert!(db.delete("blob", "b0").await?);
    if f.backend == common::Backend::Sqlite {
        db.upsert(Entity::new("small", "blob", json!({"b": "x"})))
            .await?;
    }
    Ok(())
}

/// A blob of `len` noise characters (a little more as JSON: `"` and `\\` are escaped).
fn blob(id: &str, len: usize, seed: u64) -> Entity {
    Entity::new(id, "blob", json!({"b": noise(len, seed)})).at(1)
}

const MIB: u64 = 1024 * 1024;

fn is_quota_error(e: &kalphite::TargetError) -> bool {
    matches!(e.downcast_ref::<Error>(), Some(Error::QuotaExceeded { .. }))
}

/// Regression (issue 9, item 9: deletes wait behind quota-refused upserts): the quota
/// counted only the bytes a batch adds, never what it frees. The flush engine retries a
/// refused batch merged with the transactions queued since, so the retry of a refused
/// upsert together with the deletes the user made to free space ([big upsert, delete a,
/// delete b]) was refused as well, and every later change waited behind it.
async fn quota_counts_what_deletes_free(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config().max_storage_mb(1)).await?;
    let target: Arc<dyn FlushTarget> = Arc::new(db.clone());
    let write = |batch: Vec<Change>| {
        let target = Arc::clone(&target);
        async move { target.write(&batch).await }
    };
    write(vec![
        up(blob("a", 420_000, 1), Origin::Local),
        up(blob("b", 420_000, 2), Origin::Local),
    ])
    .await
    .map_err(|e| anyhow::anyhow!(e))?;
    let big = up(blob("big", 420_000, 3), Origin::Local);
    let refused = write(vec![big.clone()]).await.unwrap_err();
    assert!(is_quota_error(&refused), "{refused}");

    // The engine's retry: the refused upsert first, then the deletes queued behind it.
    write(vec![big, del("blob", "a"), del("blob", "b")])
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    assert_eq!(ids(&db.get_by_type("blob").await?), ["big"]);
    Ok(())
}

/// A database already over its limit (filled without a quota, reopened with one) accepts
/// every batch that frees more than it adds, and refuses the ones that grow it.
async fn quota_accepts_batches_that_free_space_over_the_limit(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    db.upsert_batch((0..4).map(|i| blob(&format!("b{i}"), 400_000, i)).collect())
        .await?;
    db.close().await?;
    let db = Database::open(f.config().max_storage_mb(1)).await?;
    assert!(
        db.storage_bytes().await? > MIB,
        "the premise: over the limit"
    );

    let refused = db.upsert(blob("new", 10, 9)).await.unwrap_err();
    assert!(matches!(refused, Error::QuotaExceeded { .. }), "{refused}");
    // A replacement that shrinks a row.
    db.upsert(blob("b0", 10, 10)).await?;
    assert!(
        db.storage_bytes().await? > MIB,
        "the premise: still over the limit"
    );
    // Shrinking, deleting and adding less than that frees, in one batch.
    db.apply_changes(&[
        up(blob("b1", 20, 11), Origin::Local),
        up(blob("new", 1_000, 12), Origin::Local),
        del("blob", "b2"),
    ])
    .await?;
    // Only deleting.
    db.apply_changes(&[del("blob", "b3")]).await?;
    assert_eq!(ids(&db.get_by_type("blob").await?), ["b0", "b1", "new"]);
    Ok(())
}

/// Regression (issue 9, item 9): a replaced row was counted as if it were new, so a
/// database near its limit could not even rewrite an entity with data of the same size.
async fn quota_counts_a_replaced_row_once(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config().max_storage_mb(1)).await?;
    let a = blob("a", 420_000, 1);
    db.upsert_batch(vec![a.clone(), blob("b", 420_000, 2)])
        .await?;
    assert!(
        db.storage_bytes().await? + 420_000 > MIB,
        "the premise: a as a new row would not fit"
    );
    // The same text backwards: the same size.
    let text: String = a.data["b"]
        .as_str()
        .unwrap_or_default()
        .chars()
        .rev()
        .collect();
    let same_size = Entity::new("a", "blob", json!({"b": text})).at(2);
    db.upsert(same_size).await?;
    assert_eq!(
        db.get_stored("blob", "a").await?.map(|s| s.version),
        Some(2)
    );
    // Growing a row by more than is left is still refused.
    let refused = db.upsert(blob("a", 700_000, 3)).await.unwrap_err();
    assert!(matches!(refused, Error::QuotaExceeded { .. }), "{refused}");
    Ok(())
}

fn up(e: Entity, origin: Origin) -> Change {
    let ts = e.updated_at;
    Change::upsert(AnyEntity::new(Arc::new(e)), ts, origin)
}

fn del(kind: &str, id: &str) -> Change {
    Change::delete(kind.into(), id.into(), 1, Origin::Local)
}

async fn flush_batches_apply_in_one_transaction(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    db.upsert(comment("gone", "m", 1, "low")).await?;
    let target: Arc<dyn FlushTarget> = Arc::new(db.clone());
    assert_eq!(target.name(), db.backend_name());
    let batch = vec![
        up(comment("c1", "v1", 1, "low"), Origin::Local),
        up(review("r1", "remote", "approved"), Origin::Remote),
        del("comment", "gone"),
        up(comment("c1", "v2", 2, "high"), Origin::Local),
        del("comment", "never-existed"),
        up(comment("c3", "x", 3, "low"), Origin::Local),
        del("comment", "c3"),
    ];
    target.write(&batch).await.map_err(|e| anyhow::anyhow!(e))?;
    assert_eq!(ids(&db.get_by_type("comment").await?), ["c1"]);
    assert_eq!(
        db.get_by_id("comment", "c1").await?.expect("c1").data["message"],
        "v2"
    );
    assert_eq!(
        db.get_by_id("review", "r1")
            .await?
            .expect("remote stored")
            .data["title"],
        "remote"
    );
    // Retrying the same batch (as the flush engine does after an error) is harmless.
    target.write(&batch).await.map_err(|e| anyhow::anyhow!(e))?;
    assert_eq!(ids(&db.get_by_type("comment").await?), ["c1"]);
    // A batch touching each entity once (the flush engine's usual shape).
    let distinct = vec![
        up(comment("d1", "x", 1, "low"), Origin::Local),
        del("comment", "c1"),
        up(comment("d2", "y", 2, "low"), Origin::Remote),
        del("review", "nope"),
        up(review("r1", "again", "rejected"), Origin::Local),
    ];
    target
        .write(&distinct)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    assert_eq!(ids(&db.get_by_type("comment").await?), ["d1", "d2"]);
    let r1 = db.get_stored("review", "r1").await?.expect("r1");
    assert_eq!(
        (r1.entity.data["title"].as_str(), r1.version),
        (Some("again"), 3)
    );
    Ok(())
}

async fn a_bad_change_refuses_the_whole_batch(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config().schema(common::test_schema())).await?;
    let no_entity = Change {
        entity: None,
        ..del("comment", "c9")
    };
    let no_entity = Change {
        op: kalphite::Op::Upsert,
        ..no_entity
    };
    let err = db
        .apply_changes(&[up(comment("c1", "m", 1, "low"), Origin::Local), no_entity])
        .await;
    assert!(matches!(err, Err(Error::InvalidChange { .. })), "{err:?}");
    let invalid = up(
        Entity::new("c2", "comment", json!({"message": 1})),
        Origin::Remote,
    );
    let err = db
        .apply_changes(&[up(comment("c1", "m", 1, "low"), Origin::Local), invalid])
        .await;
    assert!(matches!(err, Err(Error::Validation { .. })), "{err:?}");
    assert!(db.get_all().await?.is_empty());
    Ok(())
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Comment {
    message: String,
    #[serde(rename = "lineNumber")]
    line_number: i64,
}

async fn flush_target_accepts_typed_entities(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    let typed = Entity::new(
        "c1",
        "comment",
        Comment {
            message: "typed".into(),
            line_number: 3,
        },
    );
    let change = Change::upsert(AnyEntity::new(Arc::new(typed)), 77, Origin::Local);
    db.apply_changes(&[change]).await?;
    let back = db.get_by_id("comment", "c1").await?.expect("stored");
    assert_eq!(back.data, json!({"message": "typed", "lineNumber": 3}));
    assert_eq!(
        back.updated_at, 77,
        "an unset updatedAt takes the change's timestamp"
    );
    Ok(())
}
