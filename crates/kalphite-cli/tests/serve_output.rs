//! Regression: `kalphite serve` panicked (exit 101) when its stdout or stderr had been
//! closed by the reader (`kalphite serve | head -1`, a supervisor that stopped reading):
//! `println!` panics on a broken pipe. It died at its next line, dropping its writer lock
//! (a second server then took the database: CI saw it in `serve_one_writer`). Now what it
//! tells the operator is best effort and the server serves and stops cleanly regardless.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn serve_keeps_serving_and_stops_cleanly_after_its_output_was_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_kalphite"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            "sqlite:rooms.db",
            "--open",
        ])
        .current_dir(dir.path())
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kalphite serve");
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // Both readers are gone from here on: every later write of the server hits a broken pipe.
    drop(server.stderr.take());
    let address = line
        .split("ws://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("an address in {line:?}"))
        .to_owned();

    let mut health = TcpStream::connect(&address).expect("still listening");
    health
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    health.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let pid = server.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = server.kill();
            panic!("serve did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "a closed stdout is no reason to fail: {status:?}"
    );
}
