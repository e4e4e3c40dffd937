//! The real `kalphite serve` and two todo clients with their own database files, over
//! WebSockets on loopback: they see each other's changes, work offline and catch up,
//! converge after conflicting offline edits, and fail with one clear line when the
//! server is down or the token is bad.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

struct Server {
    child: Child,
    url: String,
    http: String,
}

impl Server {
    fn start(dir: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kalphite"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--db",
                "sqlite:server.db",
            ])
            .current_dir(dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kalphite serve");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().expect("serve printed nothing").unwrap();
        let url = first
            .split_whitespace()
            .find(|w| w.starts_with("ws://"))
            .unwrap_or_else(|| panic!("no ws:// address in {first:?}"))
            .to_owned();
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let http = url.replace("ws://", "http://").replace("/sync", "");
        Self { child, url, http }
    }

    fn token(&self, dir: &Path, user: &str, room: &str) -> String {
        ok(
            dir,
            &[
                "token",
                "--secret-file",
                "kalphite.secret",
                "--user",
                user,
                "--room",
                room,
            ],
        )
        .trim()
        .to_owned()
    }

    /// Ctrl-C, then wait for a clean exit.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-INT", &pid]).status().unwrap();
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "serve did not exit cleanly after Ctrl-C: {status}"
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn kalphite(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kalphite"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "off")
        .env_remove("KALPHITE_SERVER")
        .env_remove("KALPHITE_TOKEN")
        .output()
        .expect("run kalphite")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = kalphite(dir, args);
    assert!(
        out.status.success(),
        "kalphite {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A todo client: its own database file, user and token.
struct Client<'a> {
    dir: &'a Path,
    db: String,
    server: String,
    token: String,
    user: &'static str,
}

impl Client<'_> {
    fn args<'b>(&'b self, online: bool, cmd: &[&'b str]) -> Vec<&'b str> {
        let mut args = vec!["todo", "--db", self.db.as_str(), "--user", self.user];
        if online {
            args.extend([
                "--server",
                self.server.as_str(),
                "--token",
                self.token.as_str(),
            ]);
        }
        args.extend(cmd);
        args
    }

    fn run(&self, cmd: &[&str]) -> String {
        ok(self.dir, &self.args(true, cmd))
    }

    fn offline(&self, cmd: &[&str]) -> String {
        ok(self.dir, &self.args(false, cmd))
    }

    fn list(&self) -> Vec<Value> {
        let out = self.run(&["list", "--json"]);
        serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }
}

fn titles_and_status(list: &[Value]) -> Vec<(String, String)> {
    list.iter()
        .map(|t| {
            (
                t["title"].as_str().unwrap().to_owned(),
                t["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn clients<'a>(dir: &'a Path, server: &Server) -> (Client<'a>, Client<'a>) {
    let a = Client {
        dir,
        db: "sqlite:alice.db".into(),
        server: server.url.clone(),
        token: server.token(dir, "alice", "todo"),
        user: "alice",
    };
    let b = Client {
        dir,
        db: "sqlite:bob.db".into(),
        server: server.url.clone(),
        token: server.token(dir, "bob", "todo"),
        user: "bob",
    };
    (a, b)
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let host = addr.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

#[test]
fn serve_answers_healthz_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    assert!(http_get(&server.http, "/healthz").contains("200 OK"));
    assert!(http_get(&server.http, "/metrics").contains("kalphite_sync_connections"));
    assert!(
        dir.path().join("kalphite.secret").exists(),
        "serve made no secret file"
    );
    server.stop();
}

#[test]
fn two_clients_see_each_others_changes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let (a, b) = clients(dir.path(), &server);
    a.run(&["add", "from alice", "--priority", "high"]);
    let seen = b.list();
    assert_eq!(
        titles_and_status(&seen),
        vec![("from alice".into(), "pending".into())]
    );
    b.run(&["complete", "1"]);
    assert_eq!(
        titles_and_status(&a.list()),
        vec![("from alice".into(), "completed".into())]
    );
    server.stop();
}

#[test]
fn offline_work_syncs_later_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let (a, b) = clients(dir.path(), &server);
    for title in ["one", "two", "three"] {
        a.offline(&["add", title]);
    }
    a.offline(&["complete", "2"]);
    assert!(b.list().is_empty(), "offline changes leaked before a sync");
    let report = a.run(&["sync"]);
    assert!(report.contains("pushed 3 changes"), "{report}"); // the completion coalesces with its add
    let mut got = titles_and_status(&b.list());
    got.sort();
    let mut want = titles_and_status(&a.list());
    want.sort();
    assert_eq!(got, want);
    assert_eq!(got.len(), 3);
    assert_eq!(got.iter().filter(|(_, s)| s == "completed").count(), 1);
    server.stop();
}

#[test]
fn conflicting_offline_edits_end_identical_on_both() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let (a, b) = clients(dir.path(), &server);
    a.run(&["add", "shared"]);
    assert_eq!(b.list().len(), 1);
    a.offline(&["status", "1", "in-progress"]);
    b.offline(&["status", "1", "cancelled"]);
    a.run(&["sync"]);
    b.run(&["sync"]);
    a.run(&["sync"]);
    let (la, lb) = (a.list(), b.list());
    assert_eq!(titles_and_status(&la), titles_and_status(&lb));
    assert_eq!(la.len(), 1);
    assert!(["in-progress", "cancelled"].contains(&la[0]["status"].as_str().unwrap()));
    server.stop();
}

#[test]
fn server_restart_keeps_every_acknowledged_change() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let (a, b) = clients(dir.path(), &server);
    a.run(&["add", "before restart"]);
    server.stop();
    let server = Server::start(dir.path());
    let b = Client {
        server: server.url.clone(),
        ..b
    };
    assert_eq!(
        titles_and_status(&b.list()),
        vec![("before restart".into(), "pending".into())]
    );
    server.stop();
    drop(a);
}

#[test]
fn a_server_that_is_not_running_is_one_clear_line_and_the_change_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Find a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("ws://127.0.0.1:{port}");
    let out = kalphite(
        d,
        &[
            "todo",
            "--db",
            "sqlite:x.db",
            "--server",
            &url,
            "--token",
            "t",
            "add",
            "kept",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("cannot reach the sync server"), "{err}");
    assert!(err.contains("saved locally"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let list = ok(d, &["todo", "--db", "sqlite:x.db", "list", "--json"]);
    assert!(list.contains("\"kept\""), "{list}");
}

#[test]
fn a_bad_token_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let d = dir.path();
    let wrong_room = server.token(d, "mallory", "other-room");
    for token in ["not-a-token", wrong_room.as_str()] {
        let out = kalphite(
            d,
            &[
                "todo",
                "--db",
                "sqlite:m.db",
                "--server",
                &server.url,
                "--token",
                token,
                "list",
            ],
        );
        assert!(!out.status.success(), "token {token:?} was accepted");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.to_lowercase().contains("token") || err.contains("room"),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    server.stop();
}

#[test]
fn bench_sync_runs_a_small_latency_scenario_against_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let out = ok(
        dir.path(),
        &[
            "bench",
            "sync",
            "--url",
            &server.url,
            "--secret-file",
            "kalphite.secret",
            "--scenario",
            "s1",
            "--scale",
            "0.01",
        ],
    );
    assert!(
        out.to_lowercase().contains("p50"),
        "no latency percentiles in: {out}"
    );
    let err = kalphite(
        dir.path(),
        &["bench", "sync", "--url", &server.url, "--scenario", "s9"],
    );
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("s9"));
    server.stop();
}
