//! Randomized check of the query builder against its in-memory reference
//! ([`Query::apply`]): random entities with mixed JSON types, random conditions, orders,
//! limits and offsets must give the very same entities in the same order from SQLite, and
//! from PostgreSQL when `KALPHITE_PG_URL` is set.

mod common;

use kalphite::Entity;
use kalphite_db::{Cmp, Database, DatabaseConfig, Direction, Field, Query};
use proptest::prelude::*;
use serde_json::{Value, json};

fn scalar() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(Value::Null)),
        any::<bool>().prop_map(|b| Some(json!(b))),
        (-5i64..5).prop_map(|n| Some(json!(n))),
        (-5i64..5).prop_map(|n| Some(json!(f64::from(i32::try_from(n).unwrap_or(0)) + 0.5))),
        prop::sample::select(vec!["a", "B", "b", "ab", "é", "Z", ""]).prop_map(|s| Some(json!(s))),
        Just(Some(json!([1]))),
    ]
}

fn literal() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-5i64..5).prop_map(|n| json!(n)),
        Just(json!(0.5)),
        prop::sample::select(vec!["a", "B", "b", "é", ""]).prop_map(|s| json!(s)),
    ]
}

fn entities() -> impl Strategy<Value = Vec<Entity>> {
    prop::collection::vec((scalar(), scalar(), 0u64..4), 0..25).prop_map(|rows| {
        rows.into_iter()
            .enumerate()
            .map(|(i, (a, c, t))| {
                let mut data = serde_json::Map::new();
                if let Some(a) = a {
                    data.insert("a".into(), a);
                }
                if let Some(c) = c {
                    data.insert("b".into(), json!({"c": c}));
                }
                Entity::new(format!("e{:02}", 24 - i), "item", Value::Object(data)).at(100 + t)
            })
            .collect()
    })
}

fn field() -> impl Strategy<Value = Field> {
    prop_oneof![Just(Field::data("a")), Just(Field::data("b.c"))]
}

fn query() -> impl Strategy<Value = Query> {
    let cmp = prop::sample::select(vec![Cmp::Eq, Cmp::Gt, Cmp::Gte, Cmp::Lt, Cmp::Lte]);
    let condition = prop_oneof![
        (field(), cmp, literal()).prop_map(|(f, op, v)| (f, Some(op), vec![v])),
        (
            field(),
            prop_oneof![Just(json!(true)), Just(json!(false)), Just(Value::Null)]
        )
            .prop_map(|(f, v)| (f, Some(Cmp::Eq), vec![v])),
        (field(), prop::collection::vec(literal(), 0..3)).prop_map(|(f, vs)| (f, None, vs)),
    ];
    let order_field = prop_oneof![field(), Just(Field::UpdatedAt), Just(Field::Id)];
    let dir = prop_oneof![Just(Direction::Asc), Just(Direction::Desc)];
    (
        prop::collection::vec(condition, 0..3),
        prop::collection::vec((order_field, dir), 0..3),
        prop::option::of(0u64..10),
        0u64..5,
    )
        .prop_map(|(conds, order, limit, offset)| {
            let mut q = Query::new("item");
            for (f, op, vs) in conds {
                q = match op {
                    Some(op) => q.compare(f, op, vs.into_iter().next().unwrap_or(Value::Null)),
                    None => q.is_in(f, vs),
                };
            }
            for (f, d) in order {
                q = q.order_by(f, d);
            }
            if let Some(l) = limit {
                q = q.limit(l);
            }
            q.offset(offset)
        })
}

fn check(
    rt: &tokio::runtime::Runtime,
    db: &Database,
    data: &[Entity],
    queries: &[Query],
) -> Result<(), TestCaseError> {
    rt.block_on(async {
        db.clear()
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        db.upsert_batch(data.to_vec())
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        for q in queries {
            let expected = q
                .apply(data.to_vec())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let got = db
                .find(q)
                .await
                .map_err(|e| TestCaseError::fail(format!("{q:?}: {e}")))?;
            prop_assert_eq!(
                common::ids(&got),
                common::ids(&expected),
                "{} {:?}",
                db.backend_name(),
                q
            );
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn sql_queries_match_the_reference(data in entities(), queries in prop::collection::vec(query(), 1..8)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let db = rt.block_on(Database::open(DatabaseConfig::new("sqlite::memory:")))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        check(&rt, &db, &data, &queries)?;
        if let Ok(url) = std::env::var("KALPHITE_PG_URL") {
            let pg = rt.block_on(Database::open(
                DatabaseConfig::new(url).postgres_schema("kdb_query_model").pool_size(1),
            ))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
            check(&rt, &pg, &data, &queries)?;
            rt.block_on(pg.close()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
    }
}
