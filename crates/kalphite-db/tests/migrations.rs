//! Versioned migrations on both backends: migrate-to-latest on open, application
//! migrations, rollback, a failing migration leaving the database as it was, migrations
//! turned off, a database from a newer program, and the pre-migration backup.

mod common;

use common::{Backend, Fixture, comment};
use kalphite_db::{Database, Error, Migration};

both_backends!(
    open_applies_the_builtin_migrations,
    app_migrations_apply_and_roll_back,
    a_failing_migration_changes_nothing,
    a_failing_rollback_changes_nothing,
    migrations_off_refuses_a_stale_database,
    a_newer_database_is_refused,
    backup_before_migrate_writes_a_restorable_backup,
);

fn tags() -> Migration {
    Migration::new(1000, "tags").portable(
        "CREATE TABLE app_tags (name TEXT PRIMARY KEY); INSERT INTO app_tags VALUES ('a')",
        "DROP TABLE app_tags",
    )
}

fn notes() -> Migration {
    Migration::new(1001, "notes")
        .sqlite("CREATE TABLE app_notes (body TEXT)", "DROP TABLE app_notes")
        .postgres(
            "CREATE TABLE app_notes (body TEXT NOT NULL)",
            "DROP TABLE app_notes",
        )
}

fn versions(applied: &[kalphite_db::AppliedMigration]) -> Vec<i64> {
    applied.iter().map(|m| m.version).collect()
}

async fn open_applies_the_builtin_migrations(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    let applied = db.applied_migrations().await?;
    assert_eq!(versions(&applied), [1, 2, 3]);
    assert_eq!(applied[0].name, "entities");
    assert_eq!(applied[1].name, "sync_client");
    assert_eq!(applied[2].name, "cluster");
    assert!(f.table_exists("kalphite_entities").await);
    for table in [
        "kalphite_sync_state",
        "kalphite_sync_outbox",
        "kalphite_sync_known",
    ] {
        assert!(f.table_exists(table).await, "{table}");
    }
    // Cluster mode's tables exist on PostgreSQL only (SQLite stays single-node).
    for table in ["kalphite_rooms", "kalphite_nodes"] {
        assert_eq!(
            f.table_exists(table).await,
            f.backend == Backend::Postgres,
            "{table}"
        );
    }
    assert!(db.migrate_to(None).await?.is_empty(), "nothing left to do");
    Ok(())
}

async fn app_migrations_apply_and_roll_back(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config().migration(notes()).migration(tags())).await?;
    assert_eq!(
        versions(&db.applied_migrations().await?),
        [1, 2, 3, 1000, 1001]
    );
    assert!(f.table_exists("app_tags").await && f.table_exists("app_notes").await);
    db.upsert(comment("c1", "m", 1, "low")).await?;

    assert_eq!(db.rollback_to(1000).await?, [1001]);
    assert!(!f.table_exists("app_notes").await);
    assert!(f.table_exists("app_tags").await);
    assert_eq!(db.rollback_to(3).await?, [1000]);
    assert!(!f.table_exists("app_tags").await);
    assert_eq!(
        db.get_by_type("comment").await?.len(),
        1,
        "kalphite's data is untouched"
    );

    assert_eq!(db.migrate_to(None).await?, [1000, 1001]);
    assert!(f.table_exists("app_tags").await && f.table_exists("app_notes").await);

    assert_eq!(db.rollback_to(0).await?, [1001, 1000, 3, 2, 1]);
    assert!(!f.table_exists("kalphite_entities").await);
    assert!(
        db.get_by_type("comment").await.is_err(),
        "no table, no reads"
    );
    assert_eq!(db.migrate_to(Some(3)).await?, [1, 2, 3]);
    assert!(db.get_by_type("comment").await?.is_empty());
    Ok(())
}

async fn a_failing_migration_changes_nothing(f: Fixture) -> anyhow::Result<()> {
    let broken = Migration::new(1001, "broken").portable(
        "CREATE TABLE app_half (x INTEGER); INSERT INTO no_such_table VALUES (1)",
        "DROP TABLE app_half",
    );
    let err = Database::open(f.config().migration(tags()).migration(broken))
        .await
        .unwrap_err();
    match &err {
        Error::MigrationFailed {
            version,
            name,
            direction,
            ..
        } => {
            assert_eq!(
                (*version, name.as_str(), *direction),
                (1001, "broken", "applying")
            );
        }
        other => panic!("expected MigrationFailed, got {other}"),
    }
    assert!(err.to_string().contains("1001 'broken'"), "{err}");
    assert!(
        !f.table_exists("app_half").await,
        "the failed migration left a table behind"
    );
    // The migrations before it are applied and recorded.
    let db = Database::open(f.config().migration(tags())).await?;
    assert_eq!(versions(&db.applied_migrations().await?), [1, 2, 3, 1000]);
    assert!(f.table_exists("app_tags").await);
    Ok(())
}

async fn a_failing_rollback_changes_nothing(f: Fixture) -> anyhow::Result<()> {
    let bad_down = Migration::new(1001, "bad-down").portable(
        "CREATE TABLE app_keep (x INTEGER)",
        "DROP TABLE app_keep; DROP TABLE no_such",
    );
    let db = Database::open(f.config().migration(tags()).migration(bad_down)).await?;
    let err = db.rollback_to(3).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::MigrationFailed {
                version: 1001,
                direction: "rolling back",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        f.table_exists("app_keep").await,
        "the failed rollback dropped the table anyway"
    );
    assert!(
        f.table_exists("app_tags").await,
        "later steps ran after a failure"
    );
    assert_eq!(
        versions(&db.applied_migrations().await?),
        [1, 2, 3, 1000, 1001]
    );
    Ok(())
}

async fn migrations_off_refuses_a_stale_database(f: Fixture) -> anyhow::Result<()> {
    let err = Database::open(f.config().migrations(false))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotMigrated { pending } if pending == &[1, 2, 3]),
        "{err}"
    );
    assert!(!f.table_exists("kalphite_entities").await);
    Database::open(f.config()).await?.close().await?;
    let db = Database::open(f.config().migrations(false)).await?;
    db.upsert(comment("c1", "m", 1, "low")).await?;
    let err = Database::open(f.config().migrations(false).migration(tags()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotMigrated { pending } if pending == &[1000]),
        "{err}"
    );
    Ok(())
}

async fn a_newer_database_is_refused(f: Fixture) -> anyhow::Result<()> {
    Database::open(f.config().migration(tags()))
        .await?
        .close()
        .await?;
    let err = Database::open(f.config()).await.unwrap_err();
    assert!(
        matches!(err, Error::UnknownMigration { version: 1000 }),
        "{err}"
    );
    Ok(())
}

async fn backup_before_migrate_writes_a_restorable_backup(f: Fixture) -> anyhow::Result<()> {
    let backups = f.path("backups");
    std::fs::create_dir_all(&backups)?;
    let db = Database::open(f.config().backup_before_migrate(true).backup_dir(&backups)).await?;
    assert_eq!(
        std::fs::read_dir(&backups)?.count(),
        0,
        "a fresh database needs no backup"
    );
    db.upsert_batch(vec![
        comment("c1", "a", 1, "low"),
        comment("c2", "b", 2, "high"),
    ])
    .await?;
    let before = db.get_all().await?;
    db.close().await?;

    let db = Database::open(
        f.config()
            .backup_before_migrate(true)
            .backup_dir(&backups)
            .migration(tags()),
    )
    .await?;
    let files: Vec<_> = std::fs::read_dir(&backups)?.collect::<Result<_, _>>()?;
    assert_eq!(files.len(), 1);
    let name = files[0].file_name().to_string_lossy().into_owned();
    assert!(name.starts_with("kalphite-pre-migrate-v3-"), "{name}");
    db.clear().await?;
    assert_eq!(db.restore_from_file(&files[0].path()).await?, 2);
    assert_eq!(db.get_all().await?, before);
    Ok(())
}

#[tokio::test]
async fn reserved_and_duplicate_versions_are_refused() {
    let err = Database::open(
        kalphite_db::DatabaseConfig::new("sqlite::memory:")
            .migration(Migration::new(7, "mine").portable("SELECT 1", "SELECT 1")),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::InvalidMigration { .. }), "{err}");
}

#[tokio::test]
async fn backup_before_migrate_needs_a_directory_in_memory() {
    let err = Database::open(
        kalphite_db::DatabaseConfig::new("sqlite::memory:").backup_before_migrate(true),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
}
