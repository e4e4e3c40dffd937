//! Issue 10, item 11: what a commit (and so a sync server's acknowledgement) survives.
//! The room log ran SQLite with `synchronous = NORMAL` while the README promised that a
//! restarted server loses no acknowledged change: true after a crash of the process, not
//! after an OS crash or power loss. Each mode now sets its setting explicitly, and says so:
//! default SQLite `synchronous = NORMAL`, PostgreSQL `synchronous_commit = local`;
//! `fsync` SQLite `synchronous = FULL`, PostgreSQL `synchronous_commit = on`.

mod common;

use common::{Backend, Fixture};
use kalphite_db::Database;

both_backends!(each_mode_applies_its_setting);

async fn each_mode_applies_its_setting(f: Fixture) -> anyhow::Result<()> {
    let (default, fsync) = match f.backend {
        Backend::Sqlite => ("synchronous = NORMAL", "synchronous = FULL"),
        Backend::Postgres => ("synchronous_commit = local", "synchronous_commit = on"),
    };
    for (on, expected) in [(false, default), (true, fsync), (false, default)] {
        let db = Database::open(f.config().fsync(on)).await?;
        // Every pooled connection has it: ask from several at once.
        let seen = futures_util::future::try_join_all((0..4).map(|_| db.commit_sync())).await?;
        assert!(
            seen.iter().all(|s| s == expected),
            "fsync {on}: {seen:?}, expected {expected}"
        );
        db.close().await?;
    }
    Ok(())
}
