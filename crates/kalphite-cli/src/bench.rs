//! `kalphite bench sync`: workload S (latency, fan-out, many rooms, idle connections)
//! against a running server, so users can load-test their own deployment.

use std::path::PathBuf;
use std::time::Duration;

use crate::loadgen::{BenchOptions, Scenario, run};
use crate::secret::given_secret;
use crate::session::parse_server;
use anyhow::Result;
use clap::{Args, Subcommand};

/// `kalphite bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

/// What to benchmark.
#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Load-test a sync server (workload S of docs/benchmarks.md).
    Sync(SyncBenchArgs),
}

/// `kalphite bench sync`.
#[derive(Debug, Args)]
pub(crate) struct SyncBenchArgs {
    /// The server (`ws://HOST:PORT`, `/sync` added when no path is given). Repeat it, or
    /// separate with commas, for several (a cluster's nodes): clients are spread over them
    /// round-robin.
    // Old name: --url.
    #[arg(
        long,
        alias = "url",
        env = "KALPHITE_SERVER",
        default_value = "ws://127.0.0.1:8787",
        value_delimiter = ',',
        value_parser = parse_server
    )]
    pub server: Vec<String>,
    /// s1 (latency), s2 (fan-out), s3 (many rooms), s4 (idle connections), soak (rooms
    /// opened and left, entities deleted) or load (steady writes over many connections).
    #[arg(long, default_value = "s1")]
    pub scenario: Scenario,
    /// The server's token secret, or set `KALPHITE_AUTH_SECRET` (omit for a server in
    /// --open mode).
    #[arg(long, alias = "auth-secret", conflicts_with = "secret_file")]
    pub secret: Option<String>,
    /// A file holding the server's token secret.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// S2 reader counts, comma-separated.
    #[arg(long, default_value = "10,100", value_delimiter = ',')]
    pub readers: Vec<usize>,
    /// S4 clients.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// S4 idle seconds.
    #[arg(long, default_value_t = 20)]
    pub idle_secs: u64,
    /// Multiplies every scenario's change count (0.1 for a quick smoke run).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// S1 through two full clients (a kalphite Store and a local database at each end).
    #[arg(long)]
    pub full_clients: bool,
    /// Soak: rounds.
    #[arg(long, default_value_t = 5)]
    pub soak_rounds: usize,
    /// Soak: rooms opened and left per round.
    #[arg(long, default_value_t = 2_000)]
    pub soak_rooms: usize,
    /// Soak: entities written then deleted per round.
    #[arg(long, default_value_t = 20_000)]
    pub soak_deletes: u64,
    /// Soak: seconds to wait after each round (for the server to unload rooms and collect
    /// tombstones).
    #[arg(long, default_value_t = 70)]
    pub settle_secs: u64,
    /// Load: rooms the --clients connections are spread over.
    #[arg(long, default_value_t = 100)]
    pub load_rooms: usize,
    /// Load: total changes per second.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Load: seconds to run.
    #[arg(long, default_value_t = 300)]
    pub duration_secs: u64,
    /// Load: seconds between memory samples.
    #[arg(long, default_value_t = 30)]
    pub sample_secs: u64,
}

/// Runs one scenario and prints its report.
pub(crate) async fn run_bench(args: BenchArgs) -> Result<()> {
    let BenchCommand::Sync(args) = args.command;
    let mut opts = BenchOptions::new(args.server);
    opts.s1_full_clients = args.full_clients;
    opts.token_secret = given_secret(args.secret.as_deref(), args.secret_file.as_deref())?
        .map(|(secret, _)| secret.into_bytes());
    opts.s2_readers = args.readers;
    opts.s4_clients = args.clients;
    opts.s4_idle = Duration::from_secs(args.idle_secs);
    opts.soak_rounds = args.soak_rounds;
    opts.soak_rooms = args.soak_rooms;
    opts.soak_deletes = args.soak_deletes;
    opts.soak_settle = Duration::from_secs(args.settle_secs);
    opts.load_clients = args.clients;
    opts.load_rooms = args.load_rooms;
    opts.load_rate = args.rate;
    opts.load_duration = Duration::from_secs(args.duration_secs);
    opts.load_sample = Duration::from_secs(args.sample_secs.max(1));
    // A scaled count: f64 is exact far past any count here, and the result is finite and at
    // least 2 when cast (`as` saturates at u64::MAX).
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let scale = |n: u64| {
        let scaled = (n as f64 * args.scale.max(0.0)).round();
        if scaled.is_finite() && scaled >= 2.0 {
            scaled as u64
        } else {
            2
        }
    };
    opts.s1_changes = scale(opts.s1_changes);
    opts.s1_warmup = scale(opts.s1_warmup);
    opts.s2_changes = scale(opts.s2_changes);
    opts.s3_changes = scale(opts.s3_changes);
    let report = run(args.scenario, &opts).await?;
    print!("{report}");
    Ok(())
}
