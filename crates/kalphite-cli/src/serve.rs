//! `kalphite serve` (the sync server, the main job) and `kalphite token` (a token it
//! accepts).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use kalphite_db::{Database, DatabaseConfig};
use kalphite_server::{
    ClusterConfig, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS_PER_USER, MIN_SECRET_BYTES,
    ServerConfig, issue_token, run,
};

use crate::admin::sqlite_file;
use crate::policy::{ConflictRule, conflict_policy, describe, load_schema, parse_conflict};
use crate::secret::{Given, given_secret, read_secret};

/// `kalphite serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8787")]
    pub listen: SocketAddr,
    /// Database: a file path or `sqlite:PATH` (SQLite), or `postgres://…`.
    #[arg(long, env = "KALPHITE_DB", default_value = "sqlite:./kalphite.db")]
    pub db: String,
    /// Secret that signs access tokens, at least 32 bytes (`openssl rand -hex 32`); or set
    /// `KALPHITE_AUTH_SECRET`. Without it, --secret-file or --open, the server keeps a random
    /// secret in `kalphite.secret` next to the database.
    // Old name: --auth-secret.
    #[arg(long, alias = "auth-secret", conflicts_with = "secret_file")]
    pub secret: Option<String>,
    /// A file holding the secret (at least 32 bytes; surrounding whitespace is ignored).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// No authentication: anyone who can reach the port reads and writes every room.
    /// For local development only.
    #[arg(long, conflicts_with_all = ["secret", "secret_file"])]
    pub open: bool,
    /// Messages per second one connection may send (bursts of twice that).
    #[arg(long, default_value_t = 1000)]
    pub rate_limit: u32,
    /// Most sync connections at once; more are answered 503 (`/healthz` and `/metrics` keep
    /// 16 sockets of their own). Lowered at start to fit the open-file limit (`ulimit -n`).
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Most connections one user (a token's subject) may hold at once; a hello beyond it
    /// is refused (`too_many_connections`, close 1008).
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS_PER_USER)]
    pub max_connections_per_user: usize,
    /// Wait for the disk before acknowledging: acknowledged changes then survive an OS
    /// crash or power loss, not only a crash of the server (SQLite `synchronous = FULL`;
    /// PostgreSQL `synchronous_commit = on`, which also waits for synchronous standbys).
    /// Without it: SQLite `synchronous = NORMAL`, PostgreSQL `synchronous_commit = local`.
    #[arg(long)]
    pub fsync: bool,
    /// How concurrent edits are resolved: last-write-wins (the default), field-merge (a
    /// field changed on one side only keeps that change) or manual (last-write-wins, and
    /// the author is told). KIND=STRATEGY sets it for one kind; repeatable:
    /// `--conflict field-merge --conflict note=manual`.
    #[arg(long, value_name = "[KIND=]STRATEGY", value_parser = parse_conflict)]
    pub conflict: Vec<ConflictRule>,
    /// Check every incoming entity against a JSON file mapping each kind to its JSON
    /// Schema: `{"todo": {"type": "object", …}, …}`. Entities of other kinds are refused.
    #[arg(long, value_name = "FILE.json")]
    pub schema: Option<PathBuf>,
    /// Seconds a room with no connection stays in memory before it is unloaded (the next
    /// hello restores it from the database).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub unload_after: u64,
    /// A deleted entity's tombstone is collected once this many later changes were
    /// accepted in its room and it is --tombstone-age old; a client that last synced
    /// before a collected tombstone gets a full snapshot instead of a catch-up.
    #[arg(long, value_name = "VERSIONS", default_value_t = 10_000)]
    pub tombstone_versions: u64,
    /// Seconds a tombstone must be old before it is collected (default 7 days).
    #[arg(long, value_name = "SECS", default_value_t = 7 * 24 * 3600)]
    pub tombstone_age: u64,
    /// Run as one node of a cluster: several `serve --cluster` on one PostgreSQL database,
    /// each room served by the node holding its lease, the others relaying its connections
    /// there (see docs/cluster.md). PostgreSQL only.
    #[arg(long, requires_all = ["node_id", "advertise"])]
    pub cluster: bool,
    /// This node's id in the cluster: unique among live nodes, stable across restarts.
    #[arg(long, value_name = "ID", requires = "cluster")]
    pub node_id: Option<String>,
    /// The host:port other nodes reach this node at (its --listen address as they see it).
    #[arg(long, value_name = "HOST:PORT", requires = "cluster")]
    pub advertise: Option<String>,
    /// How long a room's lease lasts without renewal: a paused or cut-off node's rooms move
    /// after it (a dead node's at once). `10s`, `2s`, `500ms`.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_lease_ttl, requires = "cluster")]
    pub lease_ttl: Duration,
}

/// Parses a lease TTL: `10s`, `2s`, `1m`, `500ms`.
fn parse_lease_ttl(s: &str) -> Result<Duration, String> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms
            .parse()
            .map(Duration::from_millis)
            .map_err(|_| format!("'{s}' is not a duration like 10s or 500ms"));
    }
    parse_ttl(s)
}

/// `kalphite token`.
#[derive(Debug, Args)]
pub(crate) struct TokenArgs {
    /// The server's secret (at least 32 bytes); or set `KALPHITE_AUTH_SECRET`.
    // Old name: --auth-secret, as for `serve`.
    #[arg(long, alias = "auth-secret", conflicts_with = "secret_file")]
    pub secret: Option<String>,
    /// A file holding the server's secret (what `serve` writes when given none).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// The user the token names.
    #[arg(long)]
    pub user: String,
    /// A room the token opens (repeatable).
    #[arg(long = "room", required = true)]
    pub rooms: Vec<String>,
    /// Lifetime: `30s`, `15m`, `1h`, `7d`.
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// Print a link that opens the web todo app of the server at SERVER (default
    /// `http://127.0.0.1:8787`) for this user and the first room, instead of the token.
    #[arg(long, value_name = "SERVER", num_args = 0..=1, default_missing_value = "http://127.0.0.1:8787")]
    pub url: Option<String>,
}

/// Parses `30s`, `15m`, `1h`, `7d`.
pub(crate) fn parse_ttl(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 30s, 15m, 1h or 7d"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" | "" => 3600,
        "d" => 86_400,
        _ => return Err(format!("'{s}' is not a duration like 30s, 15m, 1h or 7d")),
    };
    if n == 0 {
        return Err("a token's lifetime must be positive".into());
    }
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

/// The secret file used when `serve` gets no secret: next to a SQLite database, or in the
/// working directory for PostgreSQL.
fn default_secret_file(db_url: &str) -> PathBuf {
    sqlite_file(db_url)
        .and_then(Path::parent)
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        .join("kalphite.secret")
}

fn load_or_create_secret(path: &Path) -> Result<String> {
    if path.exists() {
        return read_secret(path);
    }
    // 32 random bytes, hex: 64 bytes of secret.
    let secret = (0..MIN_SECRET_BYTES).fold(String::new(), |mut hex, _| {
        let _ = write!(hex, "{:02x}", rand::random::<u8>()); // writing to a String cannot fail
        hex
    });
    write_private(path, &secret)
        .with_context(|| format!("cannot write a new secret to {}", path.display()))?;
    Ok(secret)
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

/// The secret `serve` signs tokens with (`None` in open mode) and how to describe it.
/// Refuses a secret shorter than [`MIN_SECRET_BYTES`].
fn server_secret(args: &ServeArgs) -> Result<(Option<String>, String)> {
    if args.open {
        let auth = "OPEN MODE: no authentication, every room is readable and writable by anyone who can reach this port";
        return Ok((None, auth.to_owned()));
    }
    let (secret, file) = match given_secret(args.secret.as_deref(), args.secret_file.as_deref())? {
        Some((secret, Given::Flag)) => {
            let auth = "tokens signed with --secret (kalphite token --secret … --user U --room R)";
            return Ok((Some(secret), auth.to_owned()));
        }
        Some((secret, Given::Env)) => {
            let auth = "tokens signed with KALPHITE_AUTH_SECRET (kalphite token --user U --room \
                        R, with it set)";
            return Ok((Some(secret), auth.to_owned()));
        }
        Some((secret, Given::File(file))) => (secret, file),
        None => {
            let file = default_secret_file(&args.db);
            let secret = crate::secret::strong(
                load_or_create_secret(&file)?,
                &format!("the secret in {}", file.display()),
            )?;
            (secret, file)
        }
    };
    let auth = format!(
        "tokens signed with the secret in {0}\n  make one: kalphite token --secret-file {0} --user alice --room todo",
        file.display()
    );
    Ok((Some(secret), auth))
}

/// What an acknowledged change survives, per backend and mode (README, "What is
/// guaranteed").
fn survives(backend: &str, fsync: bool) -> &'static str {
    match (backend, fsync) {
        ("sqlite", false) => {
            "an acknowledged change survives a crash of this process, not an OS crash or \
             power loss; --fsync for that"
        }
        ("sqlite", true) => "an acknowledged change survives an OS crash or power loss",
        (_, false) => {
            "an acknowledged change is on the database host's disk; it does not wait for \
             synchronous standbys (--fsync)"
        }
        (_, true) => {
            "an acknowledged change is on the database host's disk and on any synchronous \
             standby"
        }
    }
}

/// Runs the server until Ctrl-C.
pub(crate) async fn serve(args: ServeArgs) -> Result<()> {
    if args.unload_after == 0 {
        anyhow::bail!("--unload-after must be at least 1 second");
    }
    if args.rate_limit == 0 {
        bail!("--rate-limit must be at least 1");
    }
    if args.max_connections == 0 || args.max_connections_per_user == 0 {
        bail!("--max-connections and --max-connections-per-user must be at least 1");
    }
    // Before anything is opened or created: a bad secret, conflict rule or schema file is
    // a one-line error.
    let (secret, auth) = server_secret(&args)?;
    let policy = conflict_policy(&args.conflict)?;
    let schema = args.schema.as_deref().map(load_schema).transpose()?;
    // One server per database: a second one on the same SQLite file or PostgreSQL schema
    // is refused here, before it writes anything (kalphite_db::Error::Busy, one line).
    // A cluster node shares the database with the other nodes, never with a single server.
    let db_config = DatabaseConfig::new(&args.db).fsync(args.fsync);
    let db_config = if args.cluster {
        // A transaction a node leaves open when it is cut off holds its rooms' rows for
        // every node: PostgreSQL ends it after a lease TTL.
        db_config
            .cluster_writer(true)
            .idle_transaction_timeout(args.lease_ttl)
    } else {
        db_config.writer_lock(true)
    };
    let db = Database::open(db_config).await?;
    let durability = format!(
        "{} ({})",
        db.commit_sync().await?,
        survives(db.backend_name(), args.fsync)
    );
    let mut config = ServerConfig::new(db.clone())
        .room_unload_after(Duration::from_secs(args.unload_after))
        .rate_limit(args.rate_limit, args.rate_limit.saturating_mul(2))
        .max_connections(args.max_connections)
        .max_connections_per_user(args.max_connections_per_user)
        .open(args.open)
        .policy(policy);
    if args.cluster {
        let (Some(node), Some(advertise)) = (&args.node_id, &args.advertise) else {
            bail!("--cluster needs --node-id and --advertise");
        };
        config = config.cluster(ClusterConfig::new(node, advertise).lease_ttl(args.lease_ttl));
    }
    config.room_limits.tombstone_versions = args.tombstone_versions;
    config.room_limits.tombstone_age = args.tombstone_age.saturating_mul(1_000);
    let schema_line = match schema {
        Some((schema, kinds)) => {
            config = config.schema(schema);
            format!(
                "{} (kinds: {}; others refused)",
                args.schema.as_deref().unwrap_or(Path::new("?")).display(),
                kinds.join(", ")
            )
        }
        None => "none (any JSON accepted)".to_owned(),
    };
    if let Some(secret) = secret {
        config = config.token_secret(secret.into_bytes());
    }
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    if args.open {
        tracing::warn!("the server is in OPEN mode: no authentication");
    }
    let mut banner = format!("kalphite sync server listening on ws://{addr}/sync\n");
    let _ = writeln!(
        banner,
        "  database: {} ({})",
        db.target(),
        db.backend_name()
    );
    let _ = writeln!(banner, "  durability: {durability}");
    let _ = writeln!(banner, "  auth: {auth}");
    let _ = writeln!(banner, "  conflicts: {}", describe(&args.conflict));
    let _ = writeln!(banner, "  schema: {schema_line}");
    let _ = writeln!(
        banner,
        "  health: http://{addr}/healthz   metrics: http://{addr}/metrics"
    );
    let _ = writeln!(
        banner,
        "  limits: {} connections, {} per user",
        args.max_connections, args.max_connections_per_user
    );
    if let (true, Some(node), Some(advertise)) = (args.cluster, &args.node_id, &args.advertise) {
        let _ = writeln!(
            banner,
            "  cluster: node {node}, reached at {advertise}, lease TTL {:?}",
            args.lease_ttl
        );
    }
    let _ = writeln!(
        banner,
        "  connect a client: kalphite todo --server ws://{addr} --room todo{} list",
        if args.open { "" } else { " --token TOKEN" }
    );
    say(&mut std::io::stdout(), &banner);
    let shutdown = async {
        stop_signal().await;
        if !crate::quiet() {
            say(
                &mut std::io::stderr(),
                "shutting down: finishing in-flight writes…\n",
            );
        }
    };
    run(listener, config, shutdown).await?;
    db.close().await?;
    say(&mut std::io::stdout(), "stopped cleanly\n");
    Ok(())
}

/// Writes what the server tells its operator, ignoring a closed or broken stream:
/// `println!` panics when stdout is gone (`kalphite serve | head -1`, a supervisor that
/// stopped reading), and a server must not stop serving, nor drop its writer lock, for that.
fn say(out: &mut impl std::io::Write, text: &str) {
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Ctrl-C, or SIGTERM (what service managers send).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Prints a token.
pub(crate) fn token(args: &TokenArgs) -> Result<()> {
    let Some((secret, _)) = given_secret(args.secret.as_deref(), args.secret_file.as_deref())?
    else {
        bail!(
            "no secret to sign with: give --secret-file FILE (serve's kalphite.secret), \
             --secret S, or set KALPHITE_AUTH_SECRET"
        );
    };
    let rooms: Vec<&str> = args.rooms.iter().map(String::as_str).collect();
    let token = issue_token(secret.as_bytes(), &args.user, &rooms, args.ttl)?;
    match &args.url {
        None => println!("{token}"),
        Some(server) => {
            let room = rooms.iter().find(|r| **r != "*").copied().unwrap_or("todo");
            println!("{}", app_link(server, &args.user, room, &token));
        }
    }
    Ok(())
}

/// The web app's address on `server` (`http(s)://` or `ws(s)://`), for `user` in `room`.
fn app_link(server: &str, user: &str, room: &str, token: &str) -> String {
    let base = server.trim_end_matches('/');
    let base = if let Some(rest) = base.strip_prefix("ws://") {
        format!("http://{rest}")
    } else if let Some(rest) = base.strip_prefix("wss://") {
        format!("https://{rest}")
    } else {
        base.to_owned()
    };
    let base = base.strip_suffix("/sync").unwrap_or(&base);
    let query = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    format!(
        "{base}/?room={}&user={}&token={}",
        query(room),
        query(user),
        query(token)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_links() {
        assert_eq!(
            app_link("ws://127.0.0.1:9/sync", "a b", "r&1", "x.y"),
            "http://127.0.0.1:9/?room=r%261&user=a%20b&token=x.y"
        );
        assert_eq!(
            app_link("https://k.example/", "é", "r", "t"),
            "https://k.example/?room=r&user=%C3%A9&token=t"
        );
    }

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_ttl("2h").unwrap(), Duration::from_hours(2));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_hours(7 * 24));
        assert!(parse_ttl("soon").is_err());
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("5y").is_err());
    }

    #[test]
    fn connection_limits_have_flags_with_the_servers_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let args = Cli::parse_from(["kalphite", "--open"]).serve;
        assert_eq!(args.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(
            args.max_connections_per_user,
            DEFAULT_MAX_CONNECTIONS_PER_USER
        );
        let args = Cli::parse_from([
            "kalphite",
            "--open",
            "--max-connections",
            "200",
            "--max-connections-per-user",
            "4",
        ])
        .serve;
        assert_eq!(
            (args.max_connections, args.max_connections_per_user),
            (200, 4)
        );
    }

    #[test]
    fn the_secret_file_sits_next_to_a_sqlite_database() {
        assert_eq!(
            default_secret_file("sqlite:/var/k/k.db"),
            PathBuf::from("/var/k/kalphite.secret")
        );
        assert_eq!(
            default_secret_file("sqlite:k.db"),
            PathBuf::from("./kalphite.secret")
        );
        assert_eq!(
            default_secret_file("postgres://x/y"),
            PathBuf::from("./kalphite.secret")
        );
        // A bare path is a SQLite file too (regression: the secret went to the working
        // directory instead of beside it).
        assert_eq!(
            default_secret_file("/var/k/k.db"),
            PathBuf::from("/var/k/kalphite.secret")
        );
        assert_eq!(
            default_secret_file("sqlite:///var/k/k.db"),
            PathBuf::from("/var/k/kalphite.secret")
        );
        assert_eq!(
            default_secret_file("sqlite::memory:"),
            PathBuf::from("./kalphite.secret")
        );
    }
}
