//! Issue 10, item 11: `kalphite serve` said nothing about what an acknowledgement survives
//! (SQLite `synchronous = NORMAL`: a crash of the process, not a power loss). It now
//! prints the setting its database reports, and `--fsync` makes it `synchronous = FULL`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// Starts `kalphite serve` with `extra` args on a fresh SQLite file and returns its
/// `durability:` line; the server is killed.
fn durability(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kalphite"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            "sqlite:rooms.db",
            "--open",
        ])
        .args(extra)
        .current_dir(dir.path())
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run kalphite serve");
    let stdout = child.stdout.take().expect("piped stdout");
    let line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("durability:"))
        .unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    line
}

#[test]
fn serve_prints_and_applies_the_commit_setting_of_each_mode() {
    let default = durability(&[]);
    assert!(default.contains("synchronous = NORMAL"), "{default}");
    assert!(
        default.contains("not an OS crash or power loss"),
        "{default}"
    );
    let fsync = durability(&["--fsync"]);
    assert!(fsync.contains("synchronous = FULL"), "{fsync}");
    assert!(
        fsync.contains("survives an OS crash or power loss"),
        "{fsync}"
    );
}
