//! Regression (issue 10, item 3): a NUL character (U+0000) in an entity failed deep inside
//! a PostgreSQL write (JSONB has no `\u0000`, `text` no 0x00) with an opaque driver error
//! that took the whole batch down; the sync server's room log wrote every room's records
//! in one such batch. PostgreSQL now refuses it up front with `Error::Unstorable` naming
//! the field, nothing written; SQLite stores it (a local store keeps what it was given);
//! `check_storable` tells any caller whose data must move between backends.

mod common;

use std::sync::Arc;

use common::{Backend, Fixture};
use kalphite::{AnyEntity, Change, Entity, Origin};
use kalphite_db::{Database, Error, check_storable};
use serde_json::{Value, json};

both_backends!(nul_characters_are_refused_up_front_by_postgresql_only);

fn refused_field(result: Result<impl std::fmt::Debug, Error>) -> String {
    match result {
        Err(Error::Unstorable { field, .. }) => field,
        other => panic!("expected Error::Unstorable, got {other:?}"),
    }
}

async fn nul_characters_are_refused_up_front_by_postgresql_only(f: Fixture) -> anyhow::Result<()> {
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
        let bad = Entity::new(id, kind, data).at(1);
        assert_eq!(
            refused_field(check_storable(kind, id, &bad.data)),
            field,
            "check_storable, on any backend"
        );
        let change = Change::upsert(AnyEntity::new(Arc::new(bad.clone())), 1, Origin::Local);
        match f.backend {
            Backend::Postgres => {
                assert_eq!(refused_field(db.upsert(bad.clone()).await), field);
                // One bad entity refuses its batch, typed; the good one is not written
                // either (a batch is all or nothing).
                assert_eq!(
                    refused_field(db.upsert_batch(vec![good.clone(), bad.clone()]).await),
                    field
                );
                assert_eq!(refused_field(db.apply_changes(&[change]).await), field);
                assert!(db.get_all().await?.is_empty(), "nothing was written");
            }
            Backend::Sqlite => {
                db.apply_changes(&[change]).await?;
                assert_eq!(db.get_by_id(kind, id).await?, Some(bad), "kept intact");
            }
        }
    }
    let err = check_storable("todo", "t1", &json!("a\u{0}b")).expect_err("refused");
    assert!(err.to_string().contains("NUL character"), "{err}");

    // A backup holding one (written by SQLite) is refused by PostgreSQL as a whole, and
    // the database keeps its contents.
    db.clear().await?;
    db.upsert(good.clone()).await?;
    let old = Fixture::sqlite();
    let old_db = Database::open(old.config()).await?;
    old_db
        .upsert(Entity::new("old", "todo", json!({"title": "fi\u{0}ne"})).at(1))
        .await?;
    let backup = old_db.backup().await?;
    old_db.close().await?;
    match f.backend {
        Backend::Postgres => {
            assert_eq!(refused_field(db.restore(&backup).await), "data.title");
            assert_eq!(db.get_all().await?, vec![good]);
        }
        Backend::Sqlite => assert_eq!(db.restore(&backup).await?, 1),
    }
    db.close().await?;
    Ok(())
}
