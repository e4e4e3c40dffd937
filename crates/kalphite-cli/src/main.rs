//! `kalphite`: the sync server, a local-first todo app, and admin tools — a thin layer
//! of argument parsing over the kalphite libraries.

mod admin;
mod bench;
mod loadgen;
mod serve;
mod session;
mod todo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kalphite",
    version,
    about = "Memory-first, local-first entity store and sync engine"
)]
struct Cli {
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

/// `serve` logs its progress; the other commands only warnings.
fn default_log(cli: &Cli) -> &'static str {
    match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log(&cli))),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in a file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
