//! A todo session: one kalphite [`Client`] over the todo database — always with its sync
//! side, so that offline edits are queued for the room the database is bound to — and,
//! when a server is given, connected to it. Every todo command runs inside one.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use kalphite::{Durability, FlushConfig, SharedSchema, Store};
use kalphite_client::{
    Client, ClientError, ConnectionStatus, DurableError, SyncConfig, SyncError, sync_url,
};

use crate::todo::model::{Project, Tag, Todo};

/// How long a command waits for the server's catch-up before going on offline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a command waits for the server to acknowledge its changes.
const PUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// The room of a database that syncs with none yet.
const DEFAULT_ROOM: &str = "todo";

/// Where the todo data lives and where it syncs.
#[derive(Debug, Args)]
pub(crate) struct SessionOptions {
    /// Database: a file path, `sqlite:PATH` or `postgres://…`; default: todo.db in the
    /// user's data directory.
    #[arg(long, env = "KALPHITE_TODO_DB", global = true)]
    pub db: Option<String>,
    /// Sync server (`ws://HOST:PORT`, or `wss://`; `/sync` is added when no path is
    /// given); without it the app works offline only.
    #[arg(long, env = "KALPHITE_SERVER", global = true, value_parser = parse_server)]
    pub server: Option<String>,
    /// Room to sync; default: the room this database syncs with (`todo` for a new one).
    #[arg(long, env = "KALPHITE_ROOM", global = true)]
    pub room: Option<String>,
    /// Access token (`kalphite token …`); not needed by a server in --open mode.
    #[arg(long, env = "KALPHITE_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// User name to sync as.
    #[arg(long, env = "KALPHITE_USER", global = true)]
    pub user: Option<String>,
}

/// Reads a `--server` address (every command that takes one): `ws://HOST:PORT` or
/// `wss://…`, with `/sync` added when it has no path; an `http://` address gets the
/// `ws://` one to use instead (kalphite-client's [`sync_url`], so the CLI and the library
/// accept the same addresses).
pub(crate) fn parse_server(address: &str) -> Result<String, String> {
    sync_url(address).map_err(|e| match e {
        SyncError::Config(why) => why,
        other => other.to_string(),
    })
}

/// The user's data directory for kalphite (`$XDG_DATA_HOME/kalphite` or
/// `~/.local/share/kalphite`).
pub(crate) fn data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("kalphite")
}

/// An open session.
pub(crate) struct Session {
    client: Client,
    /// The server URL, when one was given.
    url: Option<String>,
    /// Whether a token was given.
    has_token: bool,
    /// Why the server could not be used, if it could not.
    problem: Option<String>,
    /// Whether the server refused us (a bad token, a wrong room): an error even for a
    /// read-only command, unlike a server that cannot be reached.
    refused: bool,
}

impl Session {
    /// Opens the database (hydrating the store) and, with a server, catches up with it.
    pub(crate) async fn open(options: &SessionOptions, schema: SharedSchema) -> Result<Self> {
        let db_url = match &options.db {
            Some(url) => url.clone(),
            None => {
                let dir = data_dir();
                std::fs::create_dir_all(&dir).with_context(|| {
                    format!("cannot create the data directory {}", dir.display())
                })?;
                format!("sqlite:{}", dir.join("todo.db").display())
            }
        };
        // Already in the form `parse_server` gives.
        let url = options.server.clone();
        let user = options
            .user
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "me".into());
        // Even offline, local changes go into the database's offline queue for its room,
        // so a later run with --server sends them.
        let mut config = SyncConfig::new(
            url.clone().unwrap_or_default(),
            options.room.clone().unwrap_or_default(),
        )
        .default_room(DEFAULT_ROOM)
        .user(user)
        // One more try for each further server given (a cluster's nodes, tried in turn).
        .reconnect_attempts(url.as_deref().map_or(1, |u| {
            u32::try_from(u.split(',').count()).unwrap_or(u32::MAX)
        }))
        .backoff(Duration::from_millis(100), Duration::from_millis(500))
        .connect_on_start(url.is_some());
        if let Some(token) = &options.token {
            config = config.token(token.clone());
        }
        let client = Client::builder(db_url)
            // A command makes one change and exits: nothing to batch, and its confirmation
            // waits for the write (see `todo::saved`).
            .flush(FlushConfig::default().debounce(Duration::ZERO))
            .schema(schema)
            .kind::<Todo>()
            .kind::<Project>()
            .kind::<Tag>()
            .sync(config)
            .open()
            .await
            .map_err(|e| match e {
                ClientError::Sync(e) => anyhow!("{}", sync_problem(&e)),
                other => anyhow!(other),
            })?;
        let mut session = Self {
            client,
            url,
            has_token: options.token.is_some(),
            problem: None,
            refused: false,
        };
        if session.url.is_some() {
            session.catch_up().await;
        }
        Ok(session)
    }

    /// The store.
    pub(crate) fn store(&self) -> &Store {
        self.client.store()
    }

    /// Waits until the server has sent everything the room holds, or notes why not.
    async fn catch_up(&mut self) {
        let Some(sync) = self.client.sync() else {
            return;
        };
        let mut status = sync.status_watch();
        let servers = self.url.as_deref().map_or(1, |u| u.split(',').count());
        let gave_up = async {
            // Connecting failed for good (refused), or failed with every server given.
            for tried in 1..=servers {
                let _ = status
                    .wait_for(|s| *s == ConnectionStatus::Disconnected)
                    .await;
                if tried < servers {
                    let _ = status
                        .wait_for(|s| *s != ConnectionStatus::Disconnected)
                        .await;
                }
            }
            // The first status may be a transient one; a failed session ends with an
            // error event before the status settles.
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let caught_up = tokio::time::timeout(CONNECT_TIMEOUT, async {
            tokio::select! {
                () = sync.caught_up() => true,
                () = gave_up => sync.is_caught_up(),
            }
        })
        .await;
        if caught_up != Ok(true) {
            self.refused = sync.last_error().is_some();
            self.problem = Some(self.connection_problem());
        }
    }

    fn connection_problem(&self) -> String {
        let url = self.url.as_deref().unwrap_or("?");
        let sync = self.client.sync();
        // (Running out of reconnect attempts is the library's way of saying the servers
        // could not be reached: the reason is the last disconnect, below.)
        if let Some(error) = sync
            .and_then(kalphite_client::SyncClient::last_error)
            .filter(|e| !e.starts_with("gave up after"))
        {
            return explain(url, &error, self.has_token);
        }
        let why = sync
            .and_then(kalphite_client::SyncClient::last_disconnect)
            .unwrap_or_else(|| format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()));
        format!("cannot reach the sync server at {url}: {why}")
    }

    /// Pushes what is pending and reports what moved in this run.
    pub(crate) async fn sync_now(&mut self) -> Result<String> {
        let Some(url) = self.url.clone() else {
            return Err(anyhow!(
                "no server to sync with: pass --server ws://HOST:PORT (or set KALPHITE_SERVER)"
            ));
        };
        if let Some(problem) = &self.problem {
            return Err(match self.client.unsynced() {
                0 => anyhow!("{problem}"),
                n => anyhow!("{problem} ({n} changes wait in the database for the next sync)"),
            });
        }
        self.push().await?;
        let sync = self
            .client
            .sync()
            .ok_or_else(|| anyhow!("no sync client"))?;
        let stats = sync.stats();
        Ok(format!(
            "Synced room '{}' with {url}: pushed {} changes, pulled {} changes; room version {}.",
            sync.room(),
            stats.pushed,
            stats.pulled,
            sync.room_version()
        ))
    }

    /// Waits until the server acknowledged every change made so far — in this run and in
    /// earlier offline runs (those wait in the database's offline queue).
    async fn push(&mut self) -> Result<()> {
        let url = self.url.clone().unwrap_or_default();
        match tokio::time::timeout(PUSH_TIMEOUT, self.client.durable(Durability::Server)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(DurableError::Undelivered(list))) => Err(anyhow!(
                "the server refused {} changes: {}",
                list.len(),
                list.iter()
                    .map(|u| format!("{}/{}: {}", u.key.kind, u.key.id, u.reason))
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
            Ok(Err(e)) => Err(anyhow!("the server did not take the changes: {e}")),
            Err(_) => Err(anyhow!(
                "the server at {url} did not acknowledge the changes within {}s",
                PUSH_TIMEOUT.as_secs()
            )),
        }
    }

    /// Sends what this command changed (with a server), writes everything to disk and
    /// closes. A sync problem is reported after the local data is safe, and only a
    /// command that changed something is told its changes wait in the file. After a
    /// command that failed (its error is the one line to print) nothing more is said.
    pub(crate) async fn finish(mut self, changed: bool, failed: bool) -> Result<()> {
        let mut problem = if failed { None } else { self.problem.clone() };
        if self.url.is_some()
            && problem.is_none()
            && changed
            && let Err(e) = self.push().await
        {
            problem = Some(e.to_string());
        }
        let report = self
            .client
            .close()
            .await
            .context("could not save every change")?;
        match problem {
            None => Ok(()),
            Some(p) if changed => Err(anyhow!(
                "{p} (your changes are saved locally and will be sent on the next sync)"
            )),
            Some(p) if self.refused => Err(anyhow!("{p}")),
            // A read-only command did what was asked, from the local data.
            Some(_) if crate::quiet() => Ok(()),
            Some(p) if report.unsynced > 0 => {
                eprintln!(
                    "warning: {p} ({} changes wait in the database for the next sync)",
                    report.unsynced
                );
                Ok(())
            }
            Some(p) => {
                eprintln!("warning: {p} (showing the local data)");
                Ok(())
            }
        }
    }
}

/// A sync error in the CLI's words.
fn sync_problem(e: &SyncError) -> String {
    match e {
        SyncError::RoomMismatch {
            bound,
            requested,
            pending,
        } => format!(
            "this database syncs with room '{bound}' ({pending} changes waiting to be sent \
             there), not '{requested}': run it with --room {bound}, or use another --db for \
             '{requested}'"
        ),
        other => other.to_string(),
    }
}

/// Why the server could not be used, for a person.
fn explain(url: &str, why: &str, has_token: bool) -> String {
    if !has_token && why.contains("token") {
        return format!(
            "the sync server at {url} needs a token: make one with `kalphite token --user \
             NAME --room ROOM` and pass it with --token (or KALPHITE_TOKEN)"
        );
    }
    format!("cannot use the sync server at {url}: {why}")
}
