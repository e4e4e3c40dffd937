//! A lost or restored server database, end to end with the real binary (issue 10, item 4).
//!
//! Bugs pinned: after `kalphite serve`'s database was deleted, clients kept their todos,
//! never re-uploaded them, and `sync` said "room version 0" — the room stayed empty and
//! the clients diverged for good. After a restore from an older backup, new changes
//! reused version numbers the clients already held, and todos the backup lacked stayed on
//! the clients forever. Now every room has an epoch: a lost room is rebuilt from its
//! clients, a restored one gets its todos back from them, and `restore --rollback` makes
//! the clients drop what the backup lacks instead.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

struct Server {
    child: Child,
    url: String,
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
                "--open",
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
        std::thread::spawn(move || for _ in lines {});
        Self { child, url }
    }

    /// Ctrl-C, then wait for a clean exit.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-INT", &pid]).status().unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "serve did not exit cleanly: {status}");
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
        .env_remove("KALPHITE_DB")
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

/// A todo client with its own database file, talking to an open-mode server.
struct Client<'a> {
    dir: &'a Path,
    db: String,
    user: &'static str,
}

impl Client<'_> {
    fn run(&self, server: &Server, cmd: &[&str]) -> String {
        let mut args = vec![
            "todo",
            "--db",
            self.db.as_str(),
            "--user",
            self.user,
            "--server",
            server.url.as_str(),
        ];
        args.extend(cmd);
        ok(self.dir, &args)
    }

    fn offline(&self, cmd: &[&str]) -> String {
        let mut args = vec!["todo", "--db", self.db.as_str(), "--user", self.user];
        args.extend(cmd);
        ok(self.dir, &args)
    }

    /// The titles this client holds (read locally, no sync).
    fn titles(&self) -> Vec<String> {
        let out = self.offline(&["list", "--json"]);
        let mut titles: Vec<String> = serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["title"].as_str().unwrap().to_owned())
            .collect();
        titles.sort();
        titles
    }
}

fn client<'a>(dir: &'a Path, name: &'static str) -> Client<'a> {
    Client {
        dir,
        db: format!("sqlite:{name}.db"),
        user: name,
    }
}

fn sorted(titles: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = titles.iter().map(|t| (*t).to_owned()).collect();
    v.sort();
    v
}

/// Removes the server's SQLite database and everything beside it.
fn delete_server_db(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("server.db") {
            std::fs::remove_file(&path).unwrap();
        }
    }
}

#[test]
fn a_deleted_server_database_is_rebuilt_from_its_clients() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = Server::start(d);
    let (alice, bob) = (client(d, "alice"), client(d, "bob"));
    alice.run(&server, &["add", "milk"]);
    alice.run(&server, &["add", "eggs"]);
    bob.run(&server, &["add", "bread"]);
    alice.run(&server, &["sync"]);
    let all = sorted(&["bread", "eggs", "milk"]);
    assert_eq!(alice.titles(), all);
    assert_eq!(bob.titles(), all);

    server.stop();
    delete_server_db(d);
    let server = Server::start(d);
    alice.run(&server, &["sync"]);
    bob.run(&server, &["sync"]);
    alice.run(&server, &["sync"]);
    assert_eq!(alice.titles(), all, "alice");
    assert_eq!(bob.titles(), all, "bob");
    // The room itself has them again: a new client gets every todo.
    let carol = client(d, "carol");
    carol.run(&server, &["sync"]);
    assert_eq!(carol.titles(), all, "the rebuilt room");
    // And the room moves on normally: new versions reach everyone.
    carol.run(&server, &["add", "jam"]);
    alice.run(&server, &["sync"]);
    assert!(alice.titles().contains(&"jam".to_owned()));
    server.stop();
}

/// Backs up the server database (server stopped), adds todos after the backup, restores
/// it (with `--rollback` or not), and syncs both clients. Returns what each then holds,
/// and what a new client gets from the room.
fn restore_scenario(rollback: bool) -> (Vec<String>, Vec<String>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = Server::start(d);
    let (alice, bob) = (client(d, "alice"), client(d, "bob"));
    alice.run(&server, &["add", "before the backup"]);
    bob.run(&server, &["sync"]);
    server.stop();
    ok(d, &["backup", "rooms.backup", "--db", "sqlite:server.db"]);
    let server = Server::start(d);
    alice.run(&server, &["add", "after the backup"]);
    bob.run(&server, &["sync"]);
    assert_eq!(
        bob.titles(),
        sorted(&["after the backup", "before the backup"])
    );
    // Bob works offline: this is new work, whatever happens to the server.
    bob.offline(&["add", "offline"]);
    server.stop();
    let mut restore = vec!["restore", "rooms.backup", "--db", "sqlite:server.db"];
    if rollback {
        restore.push("--rollback");
    }
    let said = ok(d, &restore);
    assert!(said.contains("new epoch"), "{said}");
    let server = Server::start(d);
    alice.run(&server, &["sync"]);
    bob.run(&server, &["sync"]);
    alice.run(&server, &["sync"]);
    let carol = client(d, "carol");
    carol.run(&server, &["sync"]);
    let got = (alice.titles(), bob.titles(), carol.titles());
    server.stop();
    got
}

#[test]
fn a_restored_server_database_gets_back_what_clients_hold() {
    let (alice, bob, room) = restore_scenario(false);
    let all = sorted(&["after the backup", "before the backup", "offline"]);
    assert_eq!(alice, all, "alice");
    assert_eq!(bob, all, "bob");
    assert_eq!(room, all, "the room");
}

#[test]
fn a_rollback_restore_makes_clients_drop_what_the_backup_lacks() {
    let (alice, bob, room) = restore_scenario(true);
    let kept = sorted(&["before the backup", "offline"]);
    assert_eq!(alice, kept, "alice");
    assert_eq!(bob, kept, "bob");
    assert_eq!(room, kept, "the room");
}
