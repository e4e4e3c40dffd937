//! `kalphite`: the sync server, a local-first todo app, and admin tools — a thin layer
//! of argument parsing over the kalphite libraries.

mod admin;
mod bench;
mod loadgen;
mod policy;
mod secret;
mod serve;
mod session;
mod todo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// The server allocates and frees a frame, a record and a few keys per change, for many
// connections: jemalloc spends less time on that than glibc's malloc (against the same
// code on glibc: S3 0.91x the time, S2 1.03-1.18x the rate, S1 full clients 0.94x p50;
// docs/benchmarks.md). mimalloc was faster on S3 but cut S2's 100-reader rate by a third.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "kalphite",
    version,
    about = "Memory-first, local-first entity store and sync engine"
)]
struct Cli {
    /// Less output: errors only (no warnings, no progress logs). `RUST_LOG` still wins.
    // Listed after each subcommand's own options in its help.
    #[arg(
        short,
        long,
        global = true,
        conflicts_with = "verbose",
        display_order = 900
    )]
    quiet: bool,
    /// More output: -v one log level more than the default, -vv two, -vvv everything.
    /// `RUST_LOG` still wins.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, display_order = 901)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sync server (the main job).
    Serve(serve::ServeArgs),
    /// Print an access token the server accepts.
    Token(serve::TokenArgs),
    /// A local-first todo app (works offline; syncs with --server).
    Todo(todo::TodoArgs),
    /// Kinds, counts, size and last change of a database.
    Inspect(admin::InspectArgs),
    /// Write a portable backup of a database.
    Backup(admin::BackupArgs),
    /// Replace a database's contents with a backup.
    Restore(admin::RestoreArgs),
    /// Load-test a sync server.
    Bench(bench::BenchArgs),
}

/// The log levels, least output first.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// The log filter without `RUST_LOG`: `serve` logs its progress, the other commands only
/// warnings; `-q` leaves errors only, each `-v` adds a level.
fn default_log(cli: &Cli) -> &'static str {
    if cli.quiet {
        return "error";
    }
    let default = match cli.command {
        Command::Serve(_) => 3,
        _ => 2,
    };
    LEVELS[(default + usize::from(cli.verbose)).min(LEVELS.len() - 1)]
}

/// Whether colour codes may go to stderr: only for a person at a terminal (never into a
/// file or a pipe), and not when `NO_COLOR` is set (no-color.org).
fn colour() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// `-q` was given: commands leave out their warnings and notes on stderr too.
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether `-q` was given.
pub(crate) fn quiet() -> bool {
    QUIET.load(std::sync::atomic::Ordering::Relaxed)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log(&cli))),
        )
        .with_writer(std::io::stderr)
        .with_ansi(colour())
        .init();
    QUIET.store(cli.quiet, std::sync::atomic::Ordering::Relaxed);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::serve(args).await,
            Command::Token(args) => serve::token(&args),
            Command::Todo(args) => todo::run(args).await,
            Command::Inspect(args) => admin::inspect(args).await,
            Command::Backup(args) => admin::backup(args).await,
            Command::Restore(args) => admin::restore(args).await,
            Command::Bench(args) => bench::run_bench(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
