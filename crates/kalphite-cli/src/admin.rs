//! Admin commands over any kalphite database: `inspect`, `backup`, `restore`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kalphite_db::{Database, DatabaseConfig};

/// `kalphite inspect`.
#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// Database URL (`sqlite:PATH` or `postgres://…`).
    #[arg(long, env = "KALPHITE_DB")]
    pub db: String,
}

/// `kalphite backup`.
#[derive(Debug, Args)]
pub(crate) struct BackupArgs {
    /// Database URL.
    #[arg(long, env = "KALPHITE_DB")]
    pub db: String,
    /// Backup file to write.
    #[arg(long)]
    pub out: PathBuf,
}

/// `kalphite restore`.
#[derive(Debug, Args)]
pub(crate) struct RestoreArgs {
    /// Database URL.
    #[arg(long, env = "KALPHITE_DB")]
    pub db: String,
    /// Backup file to read.
    #[arg(long = "in")]
    pub input: PathBuf,
    /// For a sync server's database: the rooms were rolled back on purpose, so clients
    /// drop what the backup lacks. Without it they send it back (nothing is lost). Either
    /// way every room gets a new epoch and its clients resync.
    #[arg(long)]
    pub rollback: bool,
}

async fn open(url: &str) -> Result<Database> {
    Ok(Database::open(DatabaseConfig::new(url)).await?)
}

/// Prints kinds, counts, size and the last change.
pub(crate) async fn inspect(args: InspectArgs) -> Result<()> {
    let db = open(&args.db).await?;
    println!("database: {} ({})", db.target(), db.backend_name());
    let kinds = db.kinds().await?;
    let total: u64 = kinds.iter().map(|(_, n)| n).sum();
    println!("entities: {total}");
    for (kind, n) in &kinds {
        println!("  {kind}: {n}");
    }
    println!("size: {} bytes", db.storage_bytes().await?);
    let last = db.get_all().await?.into_iter().max_by_key(|e| e.updated_at);
    match last {
        Some(e) => println!("last change: {} '{}' at {} ms", e.kind, e.id, e.updated_at),
        None => println!("last change: none"),
    }
    db.close().await?;
    Ok(())
}

fn spinner(message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(message);
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    bar
}

/// Writes a portable backup file.
pub(crate) async fn backup(args: BackupArgs) -> Result<()> {
    let db = open(&args.db).await?;
    let bar = spinner("backing up");
    let result = db.backup_to_file(&args.out).await;
    bar.finish_and_clear();
    result.with_context(|| format!("backup to {} failed", args.out.display()))?;
    let entities: u64 = db.kinds().await?.iter().map(|(_, n)| n).sum();
    println!("Backed up {entities} entities to {}", args.out.display());
    db.close().await?;
    Ok(())
}

/// Replaces the database's contents with a backup file's (atomically).
pub(crate) async fn restore(args: RestoreArgs) -> Result<()> {
    let db = open(&args.db).await?;
    let bar = spinner("restoring");
    let result = db.restore_from_file(&args.input).await;
    bar.finish_and_clear();
    let n = result.with_context(|| {
        format!(
            "restore from {} refused; the database was left as it was",
            args.input.display()
        )
    })?;
    println!("Restored {n} entities from {}", args.input.display());
    // Rooms of a sync server's database: a new epoch each, so that clients holding the
    // history after the backup resync instead of taking its reused versions as theirs.
    let rooms = kalphite_server::renew_room_epochs(&db, args.rollback)
        .await
        .context("the backup was restored, but its rooms could not be given new epochs")?;
    if rooms > 0 {
        let what = if args.rollback {
            "clients will drop what the backup lacks"
        } else {
            "clients will send back what the backup lacks"
        };
        println!("{rooms} sync rooms get a new epoch: {what}");
    }
    db.close().await?;
    Ok(())
}
