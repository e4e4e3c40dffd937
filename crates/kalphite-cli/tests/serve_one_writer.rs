//! Regression (issue 10, item 5): two `kalphite serve` on one database both started and
//! both wrote it (both acknowledged version 1 of the same room; after a restart the room
//! could not be loaded). Now the second exits non-zero at start with one clear line
//! naming the first one's pid, before it prints that it listens; the first keeps serving.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVE: [&str; 6] = [
    "serve",
    "--listen",
    "127.0.0.1:0",
    "--db",
    "sqlite:rooms.db",
    "--open",
];

/// Kills the child when dropped (a failed assertion never leaves a server running).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_second_serve_on_the_same_file_is_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Command::new(env!("CARGO_BIN_EXE_kalphite"))
        .args(SERVE)
        .current_dir(dir.path())
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run kalphite serve");
    let stdout = first.stdout.take().expect("piped stdout");
    let mut first = Running(first);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("read");
    assert!(
        line.contains("listening"),
        "the first serve started: {line}"
    );

    // The default log level, as a user runs it: still one line.
    let second = Command::new(env!("CARGO_BIN_EXE_kalphite"))
        .args(SERVE)
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kalphite serve again");
    let mut second = Running(second);
    let deadline = Instant::now() + Duration::from_secs(30);
    while second.0.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "the second serve did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let Running(child) = &mut second;
    let status = child.wait().expect("status");
    let mut stdout = String::new();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "the second serve exited non-zero");
    assert!(!stdout.contains("listening"), "it never listened: {stdout}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("already being written"), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", first.0.id())),
        "names the first server's pid: {stderr}"
    );
    assert!(
        first.0.try_wait().expect("wait").is_none(),
        "the first serve keeps running"
    );
}
