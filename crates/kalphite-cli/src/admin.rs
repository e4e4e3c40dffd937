//! Admin commands over any kalphite database: `inspect`, `backup`, `restore`.
//!
//! Like `pg_dump` and `sqlite3 .dump`: `backup FILE` and `restore FILE` take the file as
//! their argument, `-` meaning standard output or input, so `kalphite backup - --db a.db
//! | kalphite restore - --db b.db` copies a database. `inspect --json` prints one JSON
//! object whose shape is documented in the README and kept stable for scripts.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kalphite_db::{Database, DatabaseConfig};
use serde_json::json;

/// `kalphite inspect`.
#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// Database: a file path or `sqlite:PATH` (SQLite), or `postgres://…`.
    #[arg(long, env = "KALPHITE_DB")]
    pub db: String,
    /// One JSON object instead of text (stable for scripts; the shape is in the README).
    #[arg(long)]
    pub json: bool,
}

/// `kalphite backup`.
#[derive(Debug, Args)]
pub(crate) struct BackupArgs {
    /// Database: a file path or `sqlite:PATH` (SQLite), or `postgres://…`.
    #[arg(long, env = "KALPHITE_DB")]
    pub db: String,
    /// Backup file to write; `-` for standard output.
    #[arg(value_name = "FILE", required_unless_present = "out")]
    pub file: Option<PathBuf>,
    /// Old name of FILE.
    #[arg(long, hide = true, conflicts_with = "file")]
    pub out: Option<PathBuf>,
}

/// `kalphite restore`.
#[derive(Debug, Args)]
pub(crate) struct RestoreArgs {
    /// Database: a file path or `sqlite:PATH` (SQLite), or `postgres://…`.
    #[arg(long, env = "KALPHITE_DB")]
    pub db: String,
    /// Backup file to read; `-` for standard input.
    #[arg(value_name = "FILE", required_unless_present = "input")]
    pub file: Option<PathBuf>,
    /// Old name of FILE.
    #[arg(long = "in", hide = true, conflicts_with = "file")]
    pub input: Option<PathBuf>,
    /// For a sync server's database: the rooms were rolled back on purpose, so clients
    /// drop what the backup lacks. Without it they send it back (nothing is lost). Either
    /// way every room gets a new epoch and its clients resync.
    #[arg(long)]
    pub rollback: bool,
}

/// Where a backup goes to or comes from.
#[derive(Debug)]
enum BackupFile {
    /// `-`: standard output (backup) or input (restore).
    Std,
    /// A file.
    Path(PathBuf),
}

impl BackupFile {
    /// FILE, or the old flag's value (clap makes sure one of them is there).
    fn of(file: Option<&PathBuf>, old: Option<&PathBuf>) -> Result<Self> {
        match file.or(old) {
            Some(path) if path.as_os_str() == "-" => Ok(Self::Std),
            Some(path) => Ok(Self::Path(path.clone())),
            None => bail!("give the backup FILE (or - for standard output/input)"),
        }
    }
}

impl fmt::Display for BackupFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Std => f.write_str("-"),
            Self::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The SQLite file a `--db` value names (`sqlite:PATH`, `sqlite://PATH` or a bare path,
/// as kalphite-db reads them), if it names one.
pub(crate) fn sqlite_file(db_url: &str) -> Option<&Path> {
    let path = match db_url.strip_prefix("sqlite:") {
        Some(rest) => rest.strip_prefix("//").unwrap_or(rest),
        None if db_url.contains("://") => return None,
        None => db_url,
    };
    (!path.is_empty() && !path.starts_with(":memory:")).then(|| Path::new(path))
}

/// Opens a database that must already exist: reading a mistyped SQLite path would
/// otherwise create an empty database there and report on it.
async fn open_existing(url: &str) -> Result<Database> {
    if let Some(path) = sqlite_file(url)
        && !path.exists()
    {
        bail!("no database at {}", path.display());
    }
    Ok(Database::open(DatabaseConfig::new(url)).await?)
}

/// Prints kinds, counts, size and the last change.
pub(crate) async fn inspect(args: InspectArgs) -> Result<()> {
    let db = open_existing(&args.db).await?;
    let kinds = db.kinds().await?;
    let total: u64 = kinds.iter().map(|(_, n)| n).sum();
    let size = db.storage_bytes().await?;
    let last = db.get_all().await?.into_iter().max_by_key(|e| e.updated_at);
    // Cluster mode's leases (PostgreSQL; none on SQLite, which is never clustered).
    let owners = if db.backend_name() == "postgres" {
        db.room_owners().await?
    } else {
        Vec::new()
    };
    if args.json {
        let rooms: Vec<_> = owners
            .iter()
            .map(|o| {
                json!({
                    "room": o.room,
                    "term": o.term,
                    "version": o.version,
                    "owner": o.owner,
                    "advertise": o.advertise,
                    "live": o.live,
                    "ownerAlive": o.owner_alive,
                    "leaseLeftMs": o.lease_left_ms,
                })
            })
            .collect();
        let kinds: BTreeMap<String, u64> = kinds.iter().map(|(k, n)| (k.to_string(), *n)).collect();
        let mut report = json!({
            "database": db.target(),
            "backend": db.backend_name(),
            "entities": total,
            "kinds": kinds,
            "sizeBytes": size,
            "lastChange": last.map(|e| json!({
                "kind": e.kind.to_string(),
                "id": e.id.to_string(),
                "updatedAt": e.updated_at,
            })),
        });
        if db.backend_name() == "postgres" {
            report["clusterRooms"] = serde_json::Value::Array(rooms);
        }
        println!("{report}");
    } else {
        println!("database: {} ({})", db.target(), db.backend_name());
        println!("entities: {total}");
        for (kind, n) in &kinds {
            println!("  {kind}: {n}");
        }
        println!("size: {size} bytes");
        match last {
            Some(e) => println!("last change: {} '{}' at {} ms", e.kind, e.id, e.updated_at),
            None => println!("last change: none"),
        }
        if !owners.is_empty() {
            println!("cluster rooms: {}", owners.len());
            for o in &owners {
                let version = o.version.map_or_else(|| "-".to_owned(), |v| v.to_string());
                let owner = match (&o.owner, o.live) {
                    (Some(node), true) => {
                        let at = o.advertise.as_deref().unwrap_or("?");
                        let left = o.lease_left_ms.unwrap_or(0);
                        format!("owned by {node} ({at}), lease {left} ms left")
                    }
                    (Some(node), false) => format!("free (lease of {node} expired)"),
                    (None, _) => "free".to_owned(),
                };
                println!("  {}: {owner}, term {}, version {version}", o.room, o.term);
            }
        }
    }
    db.close().await?;
    Ok(())
}

/// A spinner on stderr (drawn only at a terminal, and not with `-q`).
fn spinner(message: &'static str) -> ProgressBar {
    if crate::quiet() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(message);
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    bar
}

/// Writes a portable backup file, or the backup to standard output (`-`; the summary then
/// goes to stderr).
pub(crate) async fn backup(args: BackupArgs) -> Result<()> {
    let to = BackupFile::of(args.file.as_ref(), args.out.as_ref())?;
    let db = open_existing(&args.db).await?;
    let bar = spinner("backing up");
    let result = match &to {
        BackupFile::Path(path) => db.backup_to_file(path).await.map_err(anyhow::Error::from),
        BackupFile::Std => match db.backup().await {
            Ok(bytes) => write_stdout(&bytes),
            Err(e) => Err(e.into()),
        },
    };
    bar.finish_and_clear();
    result.with_context(|| format!("backup to {to} failed"))?;
    let entities: u64 = db.kinds().await?.iter().map(|(_, n)| n).sum();
    match to {
        BackupFile::Path(_) => println!("Backed up {entities} entities to {to}"),
        BackupFile::Std if !crate::quiet() => {
            eprintln!("Backed up {entities} entities to standard output");
        }
        BackupFile::Std => {}
    }
    db.close().await?;
    Ok(())
}

fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()?;
    Ok(())
}

/// The bytes of a backup: the file's, or standard input's (`-`).
fn read_backup(from: &BackupFile) -> Result<Vec<u8>> {
    match from {
        BackupFile::Path(path) => std::fs::read(path)
            .with_context(|| format!("cannot read the backup file {}", path.display())),
        BackupFile::Std => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .lock()
                .read_to_end(&mut bytes)
                .context("cannot read the backup from standard input")?;
            if bytes.is_empty() {
                bail!("no backup on standard input (it was empty)");
            }
            Ok(bytes)
        }
    }
}

/// Replaces the database's contents with a backup's (atomically). The backup is read
/// whole before the database is opened: a missing file or an empty input changes and
/// creates nothing.
pub(crate) async fn restore(args: RestoreArgs) -> Result<()> {
    let from = BackupFile::of(args.file.as_ref(), args.input.as_ref())?;
    let bytes = read_backup(&from)?;
    let db = Database::open(DatabaseConfig::new(&args.db)).await?;
    let bar = spinner("restoring");
    // Rooms of a sync server's database get a new epoch each, in the same transaction as
    // the restore, so that clients holding the history after the backup resync instead of
    // taking its reused versions as theirs.
    let mut rooms = 0;
    let result = db
        .restore_adjusted(&bytes, |records| {
            rooms = kalphite_server::renew_room_epochs_in(records, args.rollback)
                .map_err(|e| format!("its sync rooms cannot be given new epochs: {e}"))?;
            Ok(())
        })
        .await;
    bar.finish_and_clear();
    let n = result
        .with_context(|| format!("restore from {from} refused; the database was left as it was"))?;
    println!("Restored {n} entities from {from}");
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
