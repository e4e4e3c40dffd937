//! Shared fixtures: every test runs against SQLite (a file in a fresh temporary directory)
//! and, when `KALPHITE_PG_URL` is set, against PostgreSQL in its own schema, so tests can
//! run in parallel. Without the variable the PostgreSQL half says loudly that it skipped.

#![allow(dead_code)]

use std::io::Write as _;
use std::path::PathBuf;

use kalphite::Entity;
use kalphite_db::DatabaseConfig;
use serde_json::{Value, json};
use tempfile::TempDir;

/// Which backend a fixture opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// A private database for one test.
pub(crate) struct Fixture {
    pub backend: Backend,
    /// Holds the SQLite file and any backup files.
    pub dir: TempDir,
    url: String,
    pg_schema: Option<String>,
}

impl Fixture {
    pub(crate) fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite:{}", dir.path().join("test.db").display());
        Self {
            backend: Backend::Sqlite,
            dir,
            url,
            pg_schema: None,
        }
    }

    /// A PostgreSQL fixture in a fresh schema `kdb_<name>`, or `None` (with a loud
    /// message) when `KALPHITE_PG_URL` is not set.
    pub(crate) async fn postgres(name: &str) -> Option<Self> {
        let Ok(url) = std::env::var("KALPHITE_PG_URL") else {
            // Straight to stderr: the test harness captures `eprintln!`, hiding the skip.
            let _ = writeln!(
                std::io::stderr(),
                "*** SKIPPED PostgreSQL test '{name}': set KALPHITE_PG_URL \
                 (e.g. postgres://postgres@127.0.0.1:5432/test) to run it ***"
            );
            return None;
        };
        let schema = format!("kdb_{name}");
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect to KALPHITE_PG_URL");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .await
            .expect("drop the test schema");
        Some(Self {
            backend: Backend::Postgres,
            dir: tempfile::tempdir().expect("temp dir"),
            url,
            pg_schema: Some(schema),
        })
    }

    /// The configuration of this fixture's database (open it as often as needed).
    pub(crate) fn config(&self) -> DatabaseConfig {
        let mut config = DatabaseConfig::new(self.url.clone());
        if let Some(schema) = &self.pg_schema {
            config = config.postgres_schema(schema.clone());
        }
        config
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A raw SQL statement on the fixture's database, outside kalphite.
    pub(crate) async fn raw_sql(&self, sql: &str) {
        match self.backend {
            Backend::Sqlite => {
                let conn =
                    rusqlite::Connection::open(self.dir.path().join("test.db")).expect("open");
                conn.execute_batch(sql).expect("raw sql");
            }
            Backend::Postgres => {
                let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                    .await
                    .expect("connect");
                tokio::spawn(conn);
                let schema = self.pg_schema.as_deref().unwrap_or("public");
                client
                    .batch_execute(&format!("SET search_path = {schema}; {sql}"))
                    .await
                    .expect("raw sql");
            }
        }
    }
}

impl Fixture {
    /// A PostgreSQL connection of its own to the fixture's schema, outside kalphite (for
    /// reading rows and the database clock). Panics on a SQLite fixture.
    pub(crate) async fn pg_client(&self) -> tokio_postgres::Client {
        assert_eq!(self.backend, Backend::Postgres, "pg_client on SQLite");
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        let schema = self.pg_schema.as_deref().unwrap_or("public");
        client
            .batch_execute(&format!("SET search_path = {schema}"))
            .await
            .expect("search_path");
        client
    }

    /// Whether a table of this name exists in the fixture's database (schema).
    pub(crate) async fn table_exists(&self, table: &str) -> bool {
        match self.backend {
            Backend::Sqlite => {
                let conn =
                    rusqlite::Connection::open(self.dir.path().join("test.db")).expect("open");
                conn.query_row(
                    "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
                    [table],
                    |r| r.get(0),
                )
                .expect("query")
            }
            Backend::Postgres => {
                let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                    .await
                    .expect("connect");
                tokio::spawn(conn);
                let schema = self.pg_schema.clone().unwrap_or_else(|| "public".into());
                client
                    .query_one(
                        "SELECT COUNT(*) > 0 FROM information_schema.tables \
                         WHERE table_schema = $1 AND table_name = $2",
                        &[&schema, &table],
                    )
                    .await
                    .expect("query")
                    .get(0)
            }
        }
    }
}

/// Runs `async fn $name(f: Fixture) -> anyhow::Result<()>` on SQLite and on PostgreSQL.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() -> anyhow::Result<()> {
                super::$name($crate::common::Fixture::sqlite()).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() -> anyhow::Result<()> {
                match $crate::common::Fixture::postgres(stringify!($name)).await {
                    Some(f) => super::$name(f).await,
                    None => Ok(()),
                }
            }
        }
    )*};
}

pub(crate) fn comment(id: &str, message: &str, line: i64, priority: &str) -> Entity {
    Entity::new(
        id,
        "comment",
        json!({"message": message, "lineNumber": line, "priority": priority}),
    )
    .at(1_700_000_000_000)
}

pub(crate) fn review(id: &str, title: &str, status: &str) -> Entity {
    Entity::new(
        id,
        "review",
        json!({"title": title, "status": status, "author": "ann"}),
    )
    .at(1_700_000_000_000)
}

/// Text that compresses badly, so PostgreSQL's TOAST compression cannot hide its size.
pub(crate) fn noise(len: usize, seed: u64) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'!' + u8::try_from(x % 90).unwrap_or(0))
        })
        .collect()
}

pub(crate) fn ids(entities: &[Entity]) -> Vec<String> {
    entities.iter().map(|e| e.id.to_string()).collect()
}

/// The spec's test schema: comment {message, lineNumber, priority = "medium"} and
/// review {title, status = "pending", author}, as JSON Schema with defaults applied by a
/// normalizing wrapper.
pub(crate) fn test_schema() -> kalphite::SharedSchema {
    use kalphite::{Issue, JsonSchema, Kind, Schema};
    struct WithDefaults(JsonSchema);
    impl Schema for WithDefaults {
        fn validate(&self, kind: &Kind, data: &Value) -> Result<(), Vec<Issue>> {
            self.0.validate(kind, data)
        }
        fn normalize(&self, kind: &Kind, mut data: Value) -> Result<Value, Vec<Issue>> {
            self.0.validate(kind, &data)?;
            let (field, default) = match kind.as_str() {
                "comment" => ("priority", "medium"),
                _ => ("status", "pending"),
            };
            if let Some(obj) = data.as_object_mut() {
                obj.entry(field).or_insert_with(|| json!(default));
            }
            Ok(data)
        }
    }
    let doc = json!({
        "comment": {
            "type": "object",
            "required": ["message", "lineNumber"],
            "properties": {
                "message": {"type": "string"},
                "lineNumber": {"type": "integer"},
                "priority": {"enum": ["low", "medium", "high"]}
            }
        },
        "review": {
            "type": "object",
            "required": ["title", "author"],
            "properties": {
                "title": {"type": "string"},
                "status": {"enum": ["pending", "approved", "rejected"]},
                "author": {"type": "string"}
            }
        }
    });
    std::sync::Arc::new(WithDefaults(
        JsonSchema::from_document(&doc).expect("valid schema"),
    ))
}
