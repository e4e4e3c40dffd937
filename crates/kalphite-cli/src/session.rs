//! A todo session: the local database, the store hydrated from it, and — when a server
//! is given — the sync client. Every todo command runs inside one.

use std::path::PathBuf;

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use kalphite::{Durability, Store, StoreBuilder};
use kalphite_client::{ConnectionStatus, SyncClient, SyncConfig, SyncEvent, connect_store};
use kalphite_db::{Database, DatabaseConfig};

/// How long a command waits for the server before going on offline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a command waits for the server to acknowledge its changes.
const PUSH_TIMEOUT: Duration = Duration::from_secs(10);

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
    sync: Sync,
}

/// The sync side of a session.
struct Sync {
    url: String,
    client: SyncClient,
    events: BoxStream<'static, SyncEvent>,
    /// Why the server could not be used, if it could not.
    problem: Option<String>,
    pulled: usize,
    /// Whether a server was given.
    online: bool,
}

/// `ws://host:port` → `ws://host:port/sync`; a URL with a path is kept as given.
fn sync_url(server: &str) -> String {
    let rest = server.split_once("://").map_or(server, |(_, r)| r);
    if rest.contains('/') {
        server.to_owned()
    } else {
        format!("{}/sync", server.trim_end_matches('/'))
    }
}

impl Sync {
    /// Waits until the server has sent everything the room holds (or gives up).
    async fn catch_up(&mut self) {
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.next()).await {
                Ok(Some(SyncEvent::CaughtUp { .. })) => return,
                Ok(Some(SyncEvent::RemoteChange(_))) => self.pulled += 1,
                Ok(Some(SyncEvent::Error { message, .. })) => {
                    self.problem = Some(message);
                    return;
                }
                Ok(Some(SyncEvent::Disconnected { reason })) => {
                    self.problem = Some(format!(
                        "cannot reach the sync server at {}: {reason}",
                        self.url
                    ));
                    return;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    if self.client.connection_status() != ConnectionStatus::Connected {
                        let why = self
                            .client
                            .last_error()
                            .unwrap_or_else(|| "no answer".into());
                        self.problem = Some(format!(
                            "cannot reach the sync server at {}: {why}",
                            self.url
                        ));
                    }
                    return;
                }
            }
        }
    }
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
        // Even offline, local changes go into the room's persisted offline queue, so a
        // later run with --server sends them.
        let online = options.server.is_some();
        let url = options.server.as_deref().map_or_else(String::new, sync_url);
        let user = options
            .user
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "me".into());
        let mut config = SyncConfig::new(&url, &options.room)
            .user(user)
            .reconnect_attempts(1)
            .backoff(Duration::from_millis(100), Duration::from_millis(500))
            .connect_on_start(online);
        if let Some(token) = &options.token {
            config = config.auth_token(token.clone());
        }
        let (store, client) = connect_store(builder, &db, config).await?;
        let events = client.events();
        let mut sync = Sync {
            url,
            client,
            events,
            problem: None,
            pulled: 0,
            online,
        };
        if online {
            sync.catch_up().await;
        }
        Ok(Self { db, store, sync })
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Pushes what is pending and reports what moved (pulling happened at open).
    pub async fn sync_now(&mut self) -> Result<String> {
        if !self.sync.online {
            return Err(anyhow!(
                "no server to sync with: pass --server ws://HOST:PORT (or set KALPHITE_SERVER)"
            ));
        }
        if let Some(problem) = &self.sync.problem {
            return Err(anyhow!("{problem}"));
        }
        let queued = self.sync.client.offline_queue_size();
        self.push().await?;
        let sync = &self.sync;
        Ok(format!(
            "Synced with {}: pushed {queued} changes, pulled {} changes; room version {}.",
            sync.url,
            sync.pulled,
            sync.client.room_version()
        ))
    }

    /// Waits until the server acknowledged every change made so far — in this run and
    /// in earlier offline runs (those wait in the persisted offline queue).
    async fn push(&mut self) -> Result<()> {
        if !self.sync.online {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + PUSH_TIMEOUT;
        let timed_out = || {
            anyhow!(
                "the server at {} did not acknowledge the changes within {}s",
                self.sync.url,
                PUSH_TIMEOUT.as_secs()
            )
        };
        match tokio::time::timeout_at(deadline, self.store.durable(Durability::Server)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(anyhow!("the server did not take the changes: {e}")),
            Err(_) => return Err(timed_out()),
        }
        while self.sync.client.offline_queue_size() > 0 {
            let next = tokio::time::timeout(Duration::from_millis(50), self.sync.events.next());
            match next.await {
                Ok(Some(SyncEvent::RemoteChange(_))) => self.sync.pulled += 1,
                Ok(Some(SyncEvent::Error { message, .. })) => return Err(anyhow!("{message}")),
                Ok(Some(_) | None) | Err(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(timed_out());
            }
        }
        Ok(())
    }

    /// Sends what is pending (with a server), writes everything to disk and closes. A
    /// sync problem is reported after the local data is safe.
    pub async fn finish(mut self) -> Result<()> {
        let mut problem = self.sync.problem.clone();
        if problem.is_none()
            && let Err(e) = self.push().await
        {
            problem = Some(e.to_string());
        }
        // The client persists what the server has not acknowledged yet, so only the
        // local database must hold every change now; the server-side engine is dropped
        // (its changes wait in the persisted offline queue for the next sync).
        self.sync.client.close().await;
        for engine in self.store.flush_engines() {
            if engine.config().durability == Durability::Local {
                engine
                    .shutdown()
                    .await
                    .context("could not save every change")?;
            }
        }
        self.db.close().await?;
        match problem {
            None => Ok(()),
            Some(p) => Err(anyhow!(
                "{p} (your changes are saved locally and will be sent on the next sync)"
            )),
        }
    }
}
