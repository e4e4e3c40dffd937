//! Both query forms on both backends: the closure query (the spec's `query(type, filter,
//! orderBy)`) and the SQL query builder, whose results must equal the in-memory reference
//! [`Query::apply`] — and therefore each other — on SQLite and PostgreSQL.

mod common;

use common::{Fixture, comment, ids, review};
use kalphite::Entity;
use kalphite_db::{Database, Direction, Field, Query};
use serde_json::{Value, json};

both_backends!(
    closure_queries,
    builder_matches_the_reference,
    builder_on_updated_at_and_id
);

async fn closure_queries(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    db.upsert_batch(vec![
        comment("c1", "urgent", 10, "high"),
        comment("c2", "later", 20, "low"),
        review("r1", "first", "pending"),
    ])
    .await?;
    let high = db
        .query("comment", |e| e.data["priority"] == "high")
        .await?;
    assert_eq!(ids(&high), ["c1"]);
    let pending = db
        .query("review", |e| e.data["status"] == "pending")
        .await?;
    assert_eq!(ids(&pending), ["r1"]);
    let by_line_desc = db
        .query_sorted(
            "comment",
            |_| true,
            |e| std::cmp::Reverse(e.data["lineNumber"].as_i64()),
        )
        .await?;
    assert_eq!(ids(&by_line_desc), ["c2", "c1"]);
    Ok(())
}

/// A data set with every JSON type, missing fields, ties, non-ASCII and mixed-case text.
fn dataset() -> Vec<Entity> {
    let values: Vec<Value> = vec![
        json!(3),
        json!(-1.5),
        json!(10),
        json!("apple"),
        json!("Banana"),
        json!("été"),
        json!("banana"),
        json!(true),
        json!(false),
        json!(null),
        json!([1, 2]),
        json!({"a": 1}),
        json!(3.0),
        json!("10"),
        json!(1e20),
    ];
    let mut out = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let tag = ["red", "green", "blue"][i % 3];
        let mut data = json!({
            "v": v,
            "n": (i * 7) % 5,
            "tag": tag,
            "nested": {"depth": i64::try_from(i % 4).unwrap() - 1},
        });
        if i % 4 == 0 {
            data.as_object_mut().expect("object").remove("n");
        }
        out.push(Entity::new(format!("e{i:02}"), "item", data).at(1_000 + (i as u64 % 6)));
    }
    out.push(Entity::new("missing", "item", json!({})).at(999));
    out.push(Entity::new("other-kind", "thing", json!({"v": 3})).at(5));
    out
}

fn queries() -> Vec<Query> {
    let q = || Query::new("item");
    vec![
        q(),
        q().eq("v", 3),
        q().eq("v", "banana"),
        q().eq("v", true),
        q().eq("v", false),
        q().eq("v", Value::Null),
        q().gt("v", 2),
        q().gte("v", 3),
        q().lt("v", 10),
        q().lte("v", -1.5),
        q().gt("v", "B"),
        q().lt("v", "b"),
        q().gte("v", "apple"),
        q().is_in("v", [json!(3), json!("apple"), json!(true), json!(null)]),
        q().is_in("tag", Vec::<Value>::new()),
        q().is_in("tag", ["red", "blue"]),
        q().eq("nested.depth", 0),
        q().gte("nested.depth", 1).eq("tag", "green"),
        q().eq("n", 2).order_by("v", Direction::Asc),
        q().order_by("v", Direction::Asc),
        q().order_by("v", Direction::Desc),
        q().order_by("n", Direction::Asc)
            .order_by("v", Direction::Desc),
        q().order_by("tag", Direction::Desc)
            .order_by(Field::UpdatedAt, Direction::Asc),
        q().order_by("nested.depth", Direction::Asc).limit(4),
        q().order_by("v", Direction::Asc).offset(3).limit(5),
        q().offset(100),
        q().limit(0),
        q().order_by("nosuchfield", Direction::Desc).limit(3),
        Query::new("thing").eq("v", 3),
        Query::new("nothing"),
    ]
}

async fn builder_matches_the_reference(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    let data = dataset();
    db.upsert_batch(data.clone()).await?;
    for q in queries() {
        let expected = q.apply(data.clone())?;
        let got = db.find(&q).await?;
        assert_eq!(ids(&got), ids(&expected), "{q:?}");
        assert_eq!(got, expected, "{q:?}");
    }
    Ok(())
}

async fn builder_on_updated_at_and_id(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    let data = dataset();
    db.upsert_batch(data.clone()).await?;
    let cases = vec![
        Query::new("item")
            .gte(Field::UpdatedAt, 1_003)
            .order_by(Field::UpdatedAt, Direction::Desc),
        Query::new("item").eq(Field::UpdatedAt, 1_001),
        Query::new("item")
            .gt(Field::Id, "e10")
            .order_by(Field::Id, Direction::Desc),
        Query::new("item").is_in(Field::Id, ["e01", "missing", "zzz"]),
        Query::new("item").lt(Field::UpdatedAt, 1_000),
    ];
    for q in cases {
        assert_eq!(
            ids(&db.find(&q).await?),
            ids(&q.apply(data.clone())?),
            "{q:?}"
        );
    }
    let bad = Query::new("item").gt("v", true);
    assert!(matches!(
        db.find(&bad).await,
        Err(kalphite_db::Error::InvalidQuery { .. })
    ));
    Ok(())
}

/// The same queries give the very same entities, in the same order, on both backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_and_postgres_agree() -> anyhow::Result<()> {
    let Some(pg) = Fixture::postgres("sqlite_and_postgres_agree").await else {
        return Ok(());
    };
    let lite = Fixture::sqlite();
    let (a, b) = (
        Database::open(lite.config()).await?,
        Database::open(pg.config()).await?,
    );
    let data = dataset();
    a.upsert_batch(data.clone()).await?;
    b.upsert_batch(data).await?;
    for q in queries() {
        assert_eq!(a.find(&q).await?, b.find(&q).await?, "{q:?}");
    }
    assert_eq!(a.get_all().await?, b.get_all().await?);
    Ok(())
}
