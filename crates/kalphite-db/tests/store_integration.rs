//! A kalphite Store over a database on both backends: hydration at start-up (nothing
//! written back), flushing of every later change, and a reopen that sees the same state.

mod common;

use std::time::Duration;

use common::{Fixture, comment, review};
use kalphite::{Entity, FlushConfig, Store};
use kalphite_db::{Database, Error, open_store};
use serde_json::json;

both_backends!(
    hydrate_then_flush_round_trip,
    invalid_stored_data_refuses_to_hydrate
);

fn sorted(mut v: Vec<Entity>) -> Vec<Entity> {
    v.sort_by(|a, b| (a.kind.as_str(), a.id.as_str()).cmp(&(b.kind.as_str(), b.id.as_str())));
    v
}

fn store_contents(store: &Store) -> Vec<Entity> {
    sorted(
        store
            .all()
            .iter()
            .map(|e| e.to_json().expect("json"))
            .collect(),
    )
}

async fn hydrate_then_flush_round_trip(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    db.upsert_batch(vec![
        comment("c1", "one", 1, "low"),
        comment("c2", "two", 2, "low"),
        review("r1", "t", "pending"),
    ])
    .await?;
    let flush = FlushConfig::default()
        .debounce(Duration::from_millis(5))
        .max_batch_size(10);
    let store = open_store(&db, Store::builder(), flush.clone()).await?;
    assert_eq!(store.len(), 3);
    assert_eq!(
        store
            .dynamic("comment")
            .find_by_id("c1")
            .expect("hydrated")
            .data["message"],
        "one"
    );
    assert!(
        store.queued_changes().is_empty(),
        "hydration must not be written back"
    );
    assert_eq!(
        db.get_stored("comment", "c1").await?.expect("c1").version,
        1
    );

    let comments = store.dynamic("comment");
    comments.put("c1", json!({"message": "edited", "lineNumber": 1}))?;
    assert!(comments.delete("c2"));
    store.load_entities((0..95).map(|i| Entity::new(format!("b{i}"), "bulk", json!({"i": i}))))?;
    store
        .dynamic("review")
        .put("r2", json!({"title": "new", "author": "bo"}))?;
    store.close().await.map_err(|e| anyhow::anyhow!("{e}"))?;

    assert_eq!(sorted(db.get_all().await?), store_contents(&store));
    assert_eq!(db.get_by_id("comment", "c2").await?, None);
    assert_eq!(db.count("bulk").await?, 95);
    assert_eq!(
        db.get_stored("comment", "c1").await?.expect("c1").version,
        2
    );

    let again = open_store(&db, Store::builder(), flush).await?;
    assert_eq!(store_contents(&again), store_contents(&store));
    again.close().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

async fn invalid_stored_data_refuses_to_hydrate(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    db.upsert(Entity::new("c1", "comment", json!({"message": 5})))
        .await?;
    let builder = Store::builder().schema(common::test_schema());
    let err = open_store(&db, builder, FlushConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Store { .. }), "{err}");
    Ok(())
}
