//! Versioned schema migrations: the [`Migration`] type (up and down SQL per backend), the
//! built-in migrations that create kalphite's tables, and the pure planning step that
//! turns "applied" + "known" + "target" into the ordered steps the backends execute.
//!
//! Each step runs in its own transaction, recorded in `kalphite_migrations`; a failing
//! step rolls back and leaves the database as it was before that step.

use std::borrow::Cow;

use crate::error::{Error, Result};

/// Versions below this are reserved for kalphite's built-in migrations.
pub const FIRST_APP_VERSION: i64 = 1000;

/// The SQL of one migration for one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationSql {
    /// Applies the migration (may hold several statements).
    pub up: Cow<'static, str>,
    /// Reverts it.
    pub down: Cow<'static, str>,
}

/// One versioned migration with SQL for SQLite, PostgreSQL, or both.
///
/// ```
/// use kalphite_db::Migration;
/// let m = Migration::new(1000, "tags")
///     .portable("CREATE TABLE tags (name TEXT PRIMARY KEY)", "DROP TABLE tags");
/// assert_eq!(m.version, 1000);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migration {
    /// Its version; migrations apply in ascending order.
    pub version: i64,
    /// A short name, recorded and used in error messages.
    pub name: Cow<'static, str>,
    /// The SQLite SQL, if this migration supports SQLite.
    pub sqlite: Option<MigrationSql>,
    /// The PostgreSQL SQL, if this migration supports PostgreSQL.
    pub postgres: Option<MigrationSql>,
}

impl Migration {
    /// A migration with no SQL yet.
    pub fn new(version: i64, name: impl Into<Cow<'static, str>>) -> Self {
        Self {
            version,
            name: name.into(),
            sqlite: None,
            postgres: None,
        }
    }

    /// The same SQL for both backends.
    #[must_use]
    pub fn portable(
        self,
        up: impl Into<Cow<'static, str>>,
        down: impl Into<Cow<'static, str>>,
    ) -> Self {
        let sql = MigrationSql {
            up: up.into(),
            down: down.into(),
        };
        Self {
            sqlite: Some(sql.clone()),
            postgres: Some(sql),
            ..self
        }
    }

    /// The SQLite SQL.
    #[must_use]
    pub fn sqlite(
        mut self,
        up: impl Into<Cow<'static, str>>,
        down: impl Into<Cow<'static, str>>,
    ) -> Self {
        self.sqlite = Some(MigrationSql {
            up: up.into(),
            down: down.into(),
        });
        self
    }

    /// The PostgreSQL SQL.
    #[must_use]
    pub fn postgres(
        mut self,
        up: impl Into<Cow<'static, str>>,
        down: impl Into<Cow<'static, str>>,
    ) -> Self {
        self.postgres = Some(MigrationSql {
            up: up.into(),
            down: down.into(),
        });
        self
    }
}

/// kalphite's own migrations.
#[must_use]
pub(crate) fn builtin() -> Vec<Migration> {
    vec![
        Migration::new(1, "entities")
            .sqlite(
                include_str!("../migrations/sqlite/0001_entities.up.sql"),
                include_str!("../migrations/sqlite/0001_entities.down.sql"),
            )
            .postgres(
                include_str!("../migrations/postgres/0001_entities.up.sql"),
                include_str!("../migrations/postgres/0001_entities.down.sql"),
            ),
        Migration::new(2, "sync_client")
            .sqlite(
                include_str!("../migrations/sqlite/0002_sync_client.up.sql"),
                include_str!("../migrations/sqlite/0002_sync_client.down.sql"),
            )
            .postgres(
                include_str!("../migrations/postgres/0002_sync_client.up.sql"),
                include_str!("../migrations/postgres/0002_sync_client.down.sql"),
            ),
        Migration::new(3, "cluster")
            .sqlite(
                include_str!("../migrations/sqlite/0003_cluster.up.sql"),
                include_str!("../migrations/sqlite/0003_cluster.down.sql"),
            )
            .postgres(
                include_str!("../migrations/postgres/0003_cluster.up.sql"),
                include_str!("../migrations/postgres/0003_cluster.down.sql"),
            ),
    ]
}

/// Which backend a plan is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// One migration as the runner executes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Step {
    pub version: i64,
    pub name: String,
    /// `true` to apply (`up`), `false` to roll back (`down`).
    pub up: bool,
    pub sql: String,
}

impl Step {
    pub(crate) fn direction(&self) -> &'static str {
        if self.up { "applying" } else { "rolling back" }
    }
}

/// The built-in migrations followed by the application's, checked: versions unique,
/// application versions ≥ [`FIRST_APP_VERSION`], SQL present for `dialect`.
pub(crate) fn all_migrations(app: &[Migration], dialect: Dialect) -> Result<Vec<Migration>> {
    let mut all = builtin();
    for m in app {
        if m.version < FIRST_APP_VERSION {
            return Err(Error::InvalidMigration {
                reason: format!(
                    "migration {} '{}': application versions start at {FIRST_APP_VERSION} \
                     (lower ones are kalphite's)",
                    m.version, m.name
                ),
            });
        }
        all.push(m.clone());
    }
    all.sort_by_key(|m| m.version);
    for pair in all.windows(2) {
        if pair[0].version == pair[1].version {
            return Err(Error::InvalidMigration {
                reason: format!("version {} is used twice", pair[0].version),
            });
        }
    }
    for m in &all {
        if sql_for(m, dialect).is_none() {
            return Err(Error::InvalidMigration {
                reason: format!(
                    "migration {} '{}' has no SQL for {dialect:?}",
                    m.version, m.name
                ),
            });
        }
    }
    Ok(all)
}

fn sql_for(m: &Migration, dialect: Dialect) -> Option<&MigrationSql> {
    match dialect {
        Dialect::Sqlite => m.sqlite.as_ref(),
        Dialect::Postgres => m.postgres.as_ref(),
    }
}

/// The steps that take a database with `applied` versions to `target` (`None`: latest).
/// Rolling back runs `down` of every applied version above `target`, newest first;
/// migrating up applies every known version ≤ `target` that is not applied, oldest first.
pub(crate) fn plan(
    known: &[Migration],
    applied: &[i64],
    target: Option<i64>,
    dialect: Dialect,
) -> Result<Vec<Step>> {
    if let Some(&unknown) = applied
        .iter()
        .find(|v| !known.iter().any(|m| m.version == **v))
    {
        return Err(Error::UnknownMigration { version: unknown });
    }
    let target = target.unwrap_or(i64::MAX);
    let mut steps = Vec::new();
    let mut to_undo: Vec<&Migration> = known
        .iter()
        .filter(|m| m.version > target && applied.contains(&m.version))
        .collect();
    to_undo.sort_by_key(|m| std::cmp::Reverse(m.version));
    for m in to_undo {
        let sql = sql_for(m, dialect)
            .map(|s| s.down.to_string())
            .unwrap_or_default();
        steps.push(Step {
            version: m.version,
            name: m.name.to_string(),
            up: false,
            sql,
        });
    }
    for m in known
        .iter()
        .filter(|m| m.version <= target && !applied.contains(&m.version))
    {
        let sql = sql_for(m, dialect)
            .map(|s| s.up.to_string())
            .unwrap_or_default();
        steps.push(Step {
            version: m.version,
            name: m.name.to_string(),
            up: true,
            sql,
        });
    }
    Ok(steps)
}

/// One row of `kalphite_migrations`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedMigration {
    /// The version.
    pub version: i64,
    /// Its name when it was applied.
    pub name: String,
    /// When it was applied (ms since the epoch).
    pub applied_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(v: i64) -> Migration {
        Migration::new(v, format!("m{v}")).portable(format!("up{v}"), format!("down{v}"))
    }

    #[test]
    fn plans_up_in_order_and_down_in_reverse() {
        let known = all_migrations(&[app(1001), app(1000)], Dialect::Sqlite).unwrap();
        let up = plan(&known, &[], None, Dialect::Sqlite).unwrap();
        assert_eq!(
            up.iter().map(|s| s.version).collect::<Vec<_>>(),
            [1, 2, 3, 1000, 1001]
        );
        assert!(up.iter().all(|s| s.up));
        let down = plan(&known, &[1, 2, 3, 1000, 1001], Some(3), Dialect::Sqlite).unwrap();
        assert_eq!(
            down.iter().map(|s| (s.version, s.up)).collect::<Vec<_>>(),
            [(1001, false), (1000, false)]
        );
        assert_eq!(down[0].sql, "down1001");
    }

    #[test]
    fn refuses_reserved_duplicate_and_unknown_versions() {
        assert!(matches!(
            all_migrations(&[app(5)], Dialect::Sqlite),
            Err(Error::InvalidMigration { .. })
        ));
        assert!(matches!(
            all_migrations(&[app(1000), app(1000)], Dialect::Sqlite),
            Err(Error::InvalidMigration { .. })
        ));
        let pg_only = Migration::new(1000, "pg").postgres("a", "b");
        assert!(matches!(
            all_migrations(&[pg_only], Dialect::Sqlite),
            Err(Error::InvalidMigration { .. })
        ));
        let known = all_migrations(&[], Dialect::Sqlite).unwrap();
        assert!(matches!(
            plan(&known, &[1, 2, 3, 4242], None, Dialect::Sqlite),
            Err(Error::UnknownMigration { version: 4242 })
        ));
    }
}
