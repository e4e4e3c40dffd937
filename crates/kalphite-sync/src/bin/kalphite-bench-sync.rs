//! `kalphite-bench-sync`: the workload-S load generator against a running sync server
//! (`--url ws://…/sync --scenario s1|s2|s3|s4`), and a `serve` mode that runs a sync
//! server for it (until `kalphite serve` exists).
//!
//! ```text
//! taskset -c 0 kalphite-bench-sync serve --addr 127.0.0.1:8787 --db sqlite:/tmp/rooms.db --open
//! taskset -c 1 kalphite-bench-sync --url ws://127.0.0.1:8787/sync --scenario s1
//! ```

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kalphite_db::{Database, DatabaseConfig};
use kalphite_sync::loadgen::{BenchOptions, Scenario, run};
use kalphite_sync::server::{ServerConfig, run as serve};

#[derive(Parser, Debug)]
#[command(
    name = "kalphite-bench-sync",
    about = "Workload-S load generator for kalphite sync"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Server URL.
    #[arg(long, default_value = "ws://127.0.0.1:8787/sync")]
    url: String,
    /// s1, s2, s3 or s4.
    #[arg(long, default_value = "s1")]
    scenario: String,
    /// Token secret (omit for a server in open mode).
    #[arg(long, env = "KALPHITE_TOKEN_SECRET")]
    secret: Option<String>,
    /// S2 reader counts, comma-separated.
    #[arg(long, default_value = "10,100", value_delimiter = ',')]
    readers: Vec<usize>,
    /// S4 idle seconds.
    #[arg(long, default_value_t = 20)]
    idle_secs: u64,
    /// S4 clients.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// S1 through two full SyncClients over kalphite Stores.
    #[arg(long)]
    full_clients: bool,
    /// Multiplies every scenario's change count (0.1 for a quick smoke run).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs a sync server for the benchmark.
    Serve {
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1:8787")]
        addr: String,
        /// Room-log database URL (sqlite:PATH, sqlite::memory:, postgres://…).
        #[arg(long, default_value = "sqlite:kalphite-bench-rooms.db")]
        db: String,
        /// Open mode: no tokens needed.
        #[arg(long)]
        open: bool,
        /// Token secret.
        #[arg(long, env = "KALPHITE_TOKEN_SECRET")]
        secret: Option<String>,
        /// Messages per second per connection (burst: twice that).
        #[arg(long, default_value_t = 1_000_000)]
        rate_limit: u32,
        /// WebSocket read buffer per connection, bytes.
        #[arg(long)]
        read_buffer: Option<usize>,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    runtime.block_on(async move {
        match args.command {
            Some(Command::Serve {
                addr,
                db,
                open,
                secret,
                rate_limit,
                read_buffer,
            }) => {
                let database = Database::open(DatabaseConfig::new(db))
                    .await
                    .context("opening the room-log database")?;
                let mut config = ServerConfig::new(database)
                    .open(open)
                    .rate_limit(rate_limit, rate_limit.saturating_mul(2));
                if let Some(secret) = secret {
                    config = config.token_secret(secret.into_bytes());
                }
                if let Some(bytes) = read_buffer {
                    config.read_buffer_bytes = bytes;
                }
                let listener = tokio::net::TcpListener::bind(&addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                println!("serving on ws://{addr}/sync");
                serve(listener, config, async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?;
                Ok(())
            }
            None => {
                let scenario: Scenario = args.scenario.parse()?;
                let mut opts = BenchOptions::new(args.url);
                opts.token_secret = args.secret.map(String::into_bytes);
                opts.s2_readers = args.readers;
                opts.s4_idle = Duration::from_secs(args.idle_secs);
                opts.s4_clients = args.clients;
                opts.s1_full_clients = args.full_clients;
                let scale = |n: u64| ((n as f64 * args.scale).round() as u64).max(2);
                opts.s1_changes = scale(opts.s1_changes);
                opts.s1_warmup = scale(opts.s1_warmup);
                opts.s2_changes = scale(opts.s2_changes);
                opts.s3_changes = scale(opts.s3_changes);
                let report = run(scenario, &opts).await?;
                print!("{report}");
                Ok(())
            }
        }
    })
}
