//! Regression (issue 10, item 3): a NUL character (U+0000) in an entity was stored by
//! SQLite but refused by PostgreSQL deep inside a write (JSONB has no `\u0000`), with an
//! opaque driver error that failed the whole batch. The sync server's room log writes
//! every room's records in one transaction, so one such string reset other people's rooms,
//! and a room log written on SQLite could not move to PostgreSQL. Now both backends refuse
//! it up front, the same way: `Error::Unstorable` naming the field, nothing written.

mod common;

use common::Fixture;
use std::sync::Arc;

use kalphite::{AnyEntity, Change, Entity, Origin};
use kalphite_db::{Database, Error};
use serde_json::{Value, json};

both_backends!(nul_characters_are_refused_before_anything_is_written);

fn refused_field(result: Result<impl std::fmt::Debug, Error>) -> String {
    match result {
        Err(Error::Unstorable { field, .. }) => field,
        other => panic!("expected Error::Unstorable, got {other:?}"),
    }
}

async fn nul_characters_are_refused_before_anything_is_written(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    let good = Entity::new("ok", "todo", json!({"title": "fine"})).at(1);
    let cases: [(&str, &str, Value, &str); 5] = [
        ("todo", "t1", json!({"title": "a\u{0}b"}), "data.title"),
        (
            "todo",
            "t2",
            json!({"tags": ["x", "\u{0}"]}),
            "data.tags[1]",
        ),
        (
            "todo",
            "t3",
            json!({"nested": {"k\u{0}": 1}}),
            "a key of data.nested",
        ),
        ("todo", "t\u{0}4", json!({}), "the id"),
        ("to\u{0}do", "t5", json!({}), "the kind"),
    ];
    for (kind, id, data, field) in cases {
        let bad = Entity::new(id, kind, data);
        assert_eq!(refused_field(db.upsert(bad.clone()).await), field);
        // One bad entity refuses its batch, typed, on both backends; the good one is not
        // written either (a batch is all or nothing).
        assert_eq!(
            refused_field(db.upsert_batch(vec![good.clone(), bad.clone()]).await),
            field
        );
        let change = Change::upsert(AnyEntity::new(Arc::new(bad)), 1, Origin::Local);
        assert_eq!(refused_field(db.apply_changes(&[change]).await), field);
    }
    assert!(db.get_all().await?.is_empty(), "nothing was written");
    let err = db
        .upsert(Entity::new("t1", "todo", json!({"title": "a\u{0}b"})))
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("NUL character"), "{err}");

    // A backup holding one (written by SQLite before this check) is refused as a whole,
    // and the database keeps its contents.
    db.upsert(good.clone()).await?;
    let old = Fixture::sqlite();
    let old_db = Database::open(old.config()).await?;
    old.raw_sql(
        r#"INSERT INTO kalphite_entities (type, id, data, updated_at)
           VALUES ('todo', 'old', '{"title": "fi\u0000ne"}', 1)"#,
    )
    .await;
    let backup = old_db.backup().await?;
    old_db.close().await?;
    assert_eq!(refused_field(db.restore(&backup).await), "data.title");
    assert_eq!(db.get_all().await?, vec![good]);
    db.close().await?;
    Ok(())
}
