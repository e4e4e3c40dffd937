//! A todo session: the local database, the store hydrated from it, and — when a server
//! is given — the sync client. Every todo command runs inside one.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kalphite::{FlushConfig, Store, StoreBuilder};
use kalphite_db::{Database, DatabaseConfig, open_store};

/// Where the todo data lives and where it syncs.
#[derive(Debug, Args)]
pub struct SessionOptions {
    /// Database URL (`sqlite:PATH` or `postgres://…`); default: todo.db in the user's
    /// data directory.
    #[arg(long, env = "KALPHITE_TODO_DB", global = true)]
    pub db: Option<String>,
    /// Sync server (`ws://HOST:PORT`); without it the app works offline only.
    #[arg(long, env = "KALPHITE_SERVER", global = true)]
    pub server: Option<String>,
    /// Room to sync.
    #[arg(long, env = "KALPHITE_ROOM", global = true, default_value = "todo")]
    pub room: String,
    /// Access token (`kalphite token …`); not needed by a server in --open mode.
    #[arg(long, env = "KALPHITE_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// User name to sync as.
    #[arg(long, env = "KALPHITE_USER", global = true)]
    pub user: Option<String>,
}

/// The user's data directory for kalphite (`$XDG_DATA_HOME/kalphite` or
/// `~/.local/share/kalphite`).
pub fn data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("kalphite")
}

/// An open session.
pub struct Session {
    db: Database,
    store: Store,
}

impl Session {
    /// Opens the database and hydrates the store.
    pub async fn open(options: &SessionOptions, builder: StoreBuilder) -> Result<Self> {
        let url = match &options.db {
            Some(url) => url.clone(),
            None => {
                let dir = data_dir();
                std::fs::create_dir_all(&dir).with_context(|| {
                    format!("cannot create the data directory {}", dir.display())
                })?;
                format!("sqlite:{}", dir.join("todo.db").display())
            }
        };
        let db = Database::open(DatabaseConfig::new(url)).await?;
        let store = open_store(&db, builder, FlushConfig::default()).await?;
        Ok(Self { db, store })
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Pushes and pulls (only with a server).
    pub async fn sync_now(&self) -> Result<String> {
        anyhow::bail!(
            "no server to sync with: pass --server ws://HOST:PORT (or set KALPHITE_SERVER)"
        )
    }

    /// Writes everything to disk and closes.
    pub async fn finish(self) -> Result<()> {
        self.store
            .close()
            .await
            .context("could not save every change")?;
        self.db.close().await?;
        Ok(())
    }
}
