//! `kalphite serve` and the commands that talk to it, consistent with each other (issue
//! 10, "the CLI consistent with itself and its peers"): `--conflict` and `--schema` reach
//! the rooms (checked over real `WebSocket`s), each bad value is one clear error before
//! anything is opened; one secret under one name for `serve`, `token` and `bench`
//! (`--secret`, `--secret-file`, `KALPHITE_AUTH_SECRET`; the old `--auth-secret` kept);
//! one address form (`ws://HOST:PORT`, `/sync` added, a hint for `http://`) for `todo` and
//! `bench`; `-q`/`-v`; and no colour codes on a stderr that is not a terminal.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "0123456789abcdef0123456789abcdef";

/// A running `kalphite serve` (killed when dropped).
struct Server {
    child: Child,
    /// `ws://127.0.0.1:PORT/sync`, as it printed.
    url: String,
    /// Every line it printed before `connect a client`.
    banner: Vec<String>,
}

impl Server {
    fn start(dir: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kalphite"))
            .args(["serve", "--listen", "127.0.0.1:0", "--db", "rooms.db"])
            .args(extra)
            .current_dir(dir)
            .env("RUST_LOG", "off")
            .env_remove("KALPHITE_AUTH_SECRET")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kalphite serve");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut banner = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            let last = line.contains("connect a client");
            banner.push(line);
            if last {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let url = banner
            .first()
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("ws://")))
            .unwrap_or_else(|| panic!("serve did not start: {banner:?}"))
            .to_owned();
        Self { child, url, banner }
    }

    /// `ws://127.0.0.1:PORT`: the form every command takes.
    fn address(&self) -> String {
        self.url.trim_end_matches("/sync").to_owned()
    }

    fn line(&self, prefix: &str) -> &str {
        self.banner
            .iter()
            .find(|l| l.trim_start().starts_with(prefix))
            .unwrap_or_else(|| panic!("no '{prefix}' line in {:?}", self.banner))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kalphite_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kalphite"));
    cmd.args(args)
        .current_dir(dir)
        .env("RUST_LOG", "off")
        .env_remove("KALPHITE_AUTH_SECRET")
        .env_remove("KALPHITE_SERVER")
        .env_remove("KALPHITE_TOKEN")
        .env("XDG_DATA_HOME", dir.join("xdg"))
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run kalphite")
}

fn kalphite(dir: &Path, args: &[&str]) -> Output {
    kalphite_env(dir, args, &[])
}

/// Runs a command that must fail without starting anything: its stderr.
fn refused(dir: &Path, args: &[&str]) -> String {
    let out = kalphite(dir, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "{args:?} started a server"
    );
    err
}

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A protocol client speaking raw frames (`docs/protocol.md`) to an open-mode server.
struct Raw {
    ws: Ws,
    replica: String,
    user: String,
}

impl Raw {
    /// Connects, says hello to room "r" and waits for the complete catch-up.
    async fn join(url: &str, replica: &str, user: &str) -> Self {
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .expect("connect in time")
        .expect("connect");
        let mut raw = Self {
            ws,
            replica: replica.into(),
            user: user.into(),
        };
        raw.send(json!({
            "type": "hello", "messageId": format!("{replica}-hello"), "userId": user,
            "timestamp": now_ms(),
            "payload": {"protocolVersion": 1, "roomId": "r", "replicaId": replica,
                        "lastVersion": 0}
        }))
        .await;
        raw.until(|m| m["type"] == "catchUp" && m["payload"]["complete"] == true)
            .await;
        raw
    }

    async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("send");
    }

    /// The next frame `pick` accepts (hang guard: 10 s).
    async fn until(&mut self, pick: impl Fn(&Value) -> bool) -> Value {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let msg = self.ws.next().await.expect("open").expect("frame");
                if let Message::Text(text) = msg {
                    let frame: Value = serde_json::from_str(&text).expect("JSON frame");
                    if pick(&frame) {
                        return frame;
                    }
                }
            }
        })
        .await
        .expect("hang guard: the frame never came")
    }

    /// Sends an upsert; returns the server's answer to it (its ack, or its error).
    async fn upsert(
        &mut self,
        n: u64,
        kind: &str,
        data: Value,
        vector: Value,
        base: u64,
        updated_at: u64,
    ) -> Value {
        let id = format!("{}-{n}", self.replica);
        self.send(json!({
            "type": "change", "messageId": id, "userId": self.user, "timestamp": updated_at,
            "payload": {"operation": "upsert", "entityType": kind, "entityId": "e1",
                        "entity": {"id": "e1", "type": kind, "data": data,
                                   "updatedAt": updated_at},
                        "vector": vector, "baseVersion": base}
        }))
        .await;
        self.until(|m| {
            m["payload"]["ackOf"] == id.as_str() || m["payload"]["refersTo"] == id.as_str()
        })
        .await
    }
}

/// Two replicas edit different fields of one entity of `kind` concurrently: the stored
/// result, and the strategy of the conflict frame its author got.
async fn concurrent_edit(url: &str, kind: &str) -> (Value, String) {
    let t = now_ms();
    // Replica ids of their own per call: message ids are scoped per replica.
    let (ra, rb) = (format!("{kind}-a"), format!("{kind}-b"));
    let mut a = Raw::join(url, &ra, "alice").await;
    let first = a
        .upsert(1, kind, json!({"x": 0, "y": 0}), json!({&ra: 1}), 0, t)
        .await;
    let v1 = first["payload"]["version"].as_u64().expect("ack");
    let second = a
        .upsert(2, kind, json!({"x": 1, "y": 0}), json!({&ra: 2}), v1, t + 1)
        .await;
    assert_eq!(second["type"], "ack", "{second}");
    // B edited version 1 too, without seeing A's second edit, and later.
    let mut b = Raw::join(url, &rb, "bob").await;
    let ack = b
        .upsert(
            1,
            kind,
            json!({"x": 0, "y": 1}),
            json!({&ra: 1, &rb: 1}),
            v1,
            t + 2,
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let conflict = b.until(|m| m["type"] == "conflict").await;
    (
        ack["payload"]["result"]["entity"]["data"].clone(),
        conflict["payload"]["strategy"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_conflict_sets_the_strategy_for_every_kind_or_per_kind() {
    let dir = tempfile::tempdir().unwrap();
    let plain = Server::start(dir.path(), &["--open"]);
    assert_eq!(
        plain.line("conflicts:").trim(),
        "conflicts: last-write-wins"
    );
    // The later edit wins whole.
    assert_eq!(
        concurrent_edit(&plain.url, "todo").await,
        (json!({"x": 0, "y": 1}), "last-write-wins".to_owned())
    );
    drop(plain);

    let dir = tempfile::tempdir().unwrap();
    let per_kind = Server::start(
        dir.path(),
        &[
            "--open",
            "--conflict",
            "manual",
            "--conflict",
            "todo=field-merge",
        ],
    );
    assert_eq!(
        per_kind.line("conflicts:").trim(),
        "conflicts: manual (todo: field-merge)"
    );
    // todo: both field edits survive.
    assert_eq!(
        concurrent_edit(&per_kind.url, "todo").await,
        (json!({"x": 1, "y": 1}), "field-merge".to_owned())
    );
    // Every other kind: manual (the last write stored for now, the author told).
    assert_eq!(
        concurrent_edit(&per_kind.url, "note").await,
        (json!({"x": 0, "y": 1}), "manual".to_owned())
    );
}

#[test]
fn a_bad_conflict_value_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let err = refused(d, &["serve", "--open", "--conflict", "newest-wins"]);
    assert!(
        err.contains("newest-wins")
            && err.contains("last-write-wins, field-merge or manual")
            && err.contains("--conflict"),
        "{err}"
    );
    let err = refused(d, &["serve", "--open", "--conflict", "=manual"]);
    assert!(err.contains("names no kind"), "{err}");
    let err = refused(
        d,
        &[
            "serve",
            "--open",
            "--conflict",
            "manual",
            "--conflict",
            "field-merge",
        ],
    );
    assert!(err.contains("two strategies"), "{err}");
    let err = refused(
        d,
        &[
            "serve",
            "--open",
            "--conflict",
            "todo=manual",
            "--conflict",
            "todo=field-merge",
        ],
    );
    assert!(err.contains("'todo' more than one"), "{err}");
    assert!(!d.join("rooms.db").exists() && !d.join("kalphite.db").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_schema_checks_every_incoming_entity() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("schema.json"),
        json!({"todo": {"type": "object", "required": ["title"],
                        "properties": {"title": {"type": "string", "maxLength": 10}}}})
        .to_string(),
    )
    .unwrap();
    let server = Server::start(d, &["--open", "--schema", "schema.json"]);
    assert!(
        server.line("schema:").contains("kinds: todo"),
        "{:?}",
        server.banner
    );
    let mut raw = Raw::join(&server.url, "a", "alice").await;
    let t = now_ms();
    let good = raw
        .upsert(1, "todo", json!({"title": "milk"}), json!({"a": 1}), 0, t)
        .await;
    assert_eq!(good["type"], "ack", "{good}");
    let long = raw
        .upsert(
            2,
            "todo",
            json!({"title": "a title far too long"}),
            json!({"a": 2}),
            good["payload"]["version"].as_u64().unwrap(),
            t + 1,
        )
        .await;
    assert_eq!(long["type"], "error", "{long}");
    assert_eq!(long["payload"]["code"], "invalid_entity", "{long}");
    let other = raw
        .upsert(3, "note", json!({"title": "x"}), json!({"a": 3}), 0, t + 2)
        .await;
    assert_eq!(other["payload"]["code"], "invalid_entity", "{other}");
    assert!(
        other["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown kind"),
        "{other}"
    );
}

#[test]
fn a_bad_schema_file_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let err = refused(d, &["serve", "--open", "--schema", "missing.json"]);
    assert!(
        err.contains("cannot read the schema file missing.json"),
        "{err}"
    );
    std::fs::create_dir(d.join("adir.json")).unwrap();
    let err = refused(d, &["serve", "--open", "--schema", "adir.json"]);
    assert!(
        err.contains("cannot read the schema file adir.json"),
        "{err}"
    );
    for (name, text, says) in [
        ("broken.json", "{\"todo\": ", "is not JSON"),
        ("list.json", "[1, 2]", "mapping each kind"),
        (
            "bad.json",
            "{\"todo\": {\"type\": 12}}",
            "kind 'todo' is invalid",
        ),
        ("empty.json", "{}", "names no kind"),
    ] {
        std::fs::write(d.join(name), text).unwrap();
        let err = refused(d, &["serve", "--open", "--schema", name]);
        assert!(err.contains(name) && err.contains(says), "{name}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: one line: {err}");
    }
    assert!(!d.join("rooms.db").exists() && !d.join("kalphite.db").exists());
}

/// One secret, one name: `--secret`, `--secret-file`, `KALPHITE_AUTH_SECRET` for `serve`,
/// `token` and `bench`. A flag beats the variable (before, clap called `--secret-file`
/// with the variable exported a conflict), and `--auth-secret` is still accepted.
#[test]
fn the_secret_has_one_name_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let other = "ffffffffffffffffffffffffffffffff";
    std::fs::write(d.join("my.secret"), format!("{SECRET}\n")).unwrap();
    let token = |args: &[&str], env: &[(&str, &str)]| -> String {
        let mut all = vec!["token", "--user", "u", "--room", "r"];
        all.extend_from_slice(args);
        let out = kalphite_env(d, &all, env);
        assert!(
            out.status.success(),
            "token {args:?} {env:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    for (args, env) in [
        (&["--secret", SECRET][..], &[][..]),
        (&["--auth-secret", SECRET][..], &[][..]),
        (&["--secret-file", "my.secret"][..], &[][..]),
        (&[][..], &[("KALPHITE_AUTH_SECRET", SECRET)][..]),
        (
            &["--secret-file", "my.secret"][..],
            &[("KALPHITE_AUTH_SECRET", other)][..],
        ),
    ] {
        assert_eq!(token(args, env).split('.').count(), 3, "{args:?} {env:?}");
    }

    // A server with the secret in the variable accepts a token made from the file.
    let server = {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kalphite"))
            .args(["serve", "--listen", "127.0.0.1:0", "--db", "rooms.db"])
            .current_dir(d)
            .env("RUST_LOG", "off")
            .env("KALPHITE_AUTH_SECRET", SECRET)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let auth = lines
            .by_ref()
            .map(Result::unwrap)
            .find(|l| l.contains("auth:"))
            .unwrap();
        std::thread::spawn(move || for _ in lines {});
        assert!(auth.contains("KALPHITE_AUTH_SECRET"), "{auth}");
        let url = first
            .split_whitespace()
            .find(|w| w.starts_with("ws://"))
            .unwrap()
            .trim_end_matches("/sync")
            .to_owned();
        Server {
            child,
            url,
            banner: Vec::new(),
        }
    };
    let tok = token(&["--secret-file", "my.secret"], &[]);
    let out = kalphite(
        d,
        &[
            "todo",
            "--db",
            "t.db",
            "--server",
            &server.url,
            "--token",
            &tok,
            "--room",
            "r",
            "add",
            "hi",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!d.join("kalphite.secret").exists(), "no generated secret");

    let out = kalphite(d, &["token", "--user", "u", "--room", "r"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--secret-file") && err.contains("KALPHITE_AUTH_SECRET"),
        "{err}"
    );
}

/// `serve --db DIR/FILE` keeps its generated secret beside the database, whether `--db`
/// is a bare path or a URL (a bare path put it in the working directory).
#[test]
fn serve_keeps_its_secret_beside_a_bare_path_database() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("data")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kalphite"))
        .args(["serve", "--listen", "127.0.0.1:0", "--db", "data/rooms.db"])
        .current_dir(d)
        .env("RUST_LOG", "off")
        .env_remove("KALPHITE_AUTH_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("listening"), "{line}");
    assert!(d.join("data/kalphite.secret").exists());
    assert!(d.join("data/rooms.db").exists());
    assert!(!d.join("kalphite.secret").exists());
}

/// Every command that takes a server takes `ws://HOST:PORT` (no path needed), and an
/// `http://` address is refused at once with the `ws://` one to use.
#[test]
fn server_addresses_have_one_form_and_http_gets_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = Server::start(d, &["--open"]);
    let address = server.address();
    let http = address.replace("ws://", "http://");
    let https = address.replace("ws://", "https://");
    for args in [
        &["todo", "--db", "t.db", "--server", &http, "list"][..],
        &["bench", "sync", "--server", &http, "--scale", "0.01"][..],
        &["bench", "sync", "--url", &https, "--scale", "0.01"][..],
    ] {
        let err = refused(d, args);
        let ws = if args.contains(&https.as_str()) {
            address.replace("ws://", "wss://")
        } else {
            address.clone()
        };
        assert!(
            err.contains("speaks WebSocket") && err.contains(&format!("use {ws}")),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let err = refused(d, &["todo", "--server", "127.0.0.1:1", "list"]);
    assert!(err.contains("ws://HOST:PORT"), "{err}");
    // The same env variable for both.
    let out = kalphite_env(
        d,
        &["bench", "sync", "--scale", "0.01"],
        &[("KALPHITE_SERVER", &http)],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("use ws://"));

    // ws://HOST:PORT without /sync works for both.
    let out = kalphite(
        d,
        &["todo", "--db", "t.db", "--server", &address, "add", "x"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kalphite(
        d,
        &["bench", "sync", "--server", &address, "--scale", "0.01"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .to_lowercase()
            .contains("p50")
    );
}

/// Runs with `RUST_LOG` unset (the flags decide) and stderr a pipe, stopping a server after
/// `wait` as Ctrl-C would: its stderr.
fn logged(dir: &Path, args: &[&str], env: &[(&str, &str)], wait: Duration) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kalphite"));
    cmd.args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env_remove("KALPHITE_AUTH_SECRET")
        .env_remove("KALPHITE_SERVER")
        .env_remove("NO_COLOR")
        .env_remove("CLICOLOR_FORCE")
        .env("XDG_DATA_HOME", dir.join("xdg"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + wait;
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // A server still running: stop it as Ctrl-C would, so it logs its shutdown.
    if child.try_wait().unwrap().is_none() {
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn quiet_and_verbose_set_the_log_level_and_rust_log_still_wins() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let serve = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--db",
        "rooms.db",
        "--open",
    ];
    let with = |flags: &[&'static str]| -> Vec<&str> {
        let mut args: Vec<&str> = serve.to_vec();
        args.extend_from_slice(flags);
        args
    };
    let wait = Duration::from_secs(2);
    let default = logged(d, &serve, &[], wait);
    assert!(default.contains("OPEN mode"), "a warning: {default}");
    assert!(default.contains("INFO"), "serve logs progress: {default}");
    assert!(!default.contains("DEBUG"), "{default}");

    let quiet = logged(d, &with(&["-q"]), &[], wait);
    assert!(
        !quiet.contains("WARN") && !quiet.contains("INFO"),
        "errors only: {quiet}"
    );
    assert!(!quiet.contains("shutting down"), "{quiet}");
    let quiet = logged(
        d,
        &[
            "--quiet",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            "rooms.db",
            "--open",
        ],
        &[],
        wait,
    );
    assert!(!quiet.contains("WARN"), "before the command too: {quiet}");

    // `todo` logs warnings by default; -v adds progress, -vv debugging.
    let unreachable = "ws://127.0.0.1:1";
    let todo = ["todo", "--db", "t.db", "--server", unreachable, "list"];
    let plain = logged(d, &todo, &[], wait);
    assert!(
        !plain.contains("DEBUG") && !plain.contains("INFO"),
        "{plain}"
    );
    let mut vv = vec!["-vv"];
    vv.extend_from_slice(&todo);
    let verbose = logged(d, &vv, &[], wait);
    assert!(verbose.contains("DEBUG"), "{verbose}");

    // RUST_LOG wins over the flags.
    let overridden = logged(d, &vv, &[("RUST_LOG", "error")], wait);
    assert!(
        !overridden.contains("DEBUG") && !overridden.contains("WARN"),
        "{overridden}"
    );
    let overridden = logged(d, &with(&["-q"]), &[("RUST_LOG", "info")], wait);
    assert!(
        overridden.contains("WARN") && overridden.contains("INFO"),
        "{overridden}"
    );

    let err = refused(d, &["-q", "-v", "inspect", "--db", "rooms.db"]);
    assert!(err.contains("cannot be used with"), "{err}");

    // An offline todo run: its warning goes with -q (the error of a failing command
    // never does).
    assert!(plain.contains("warning:"), "{plain}");
    let silent = logged(
        d,
        &[
            "-q",
            "todo",
            "--db",
            "t.db",
            "--server",
            unreachable,
            "list",
        ],
        &[],
        wait,
    );
    assert!(silent.trim().is_empty(), "{silent}");
    let failed = logged(d, &["-q", "inspect", "--db", "nope.db"], &[], wait);
    assert!(failed.contains("error:"), "{failed}");
}

/// No colour codes on a stderr that is a pipe, on every path that writes there: usage
/// errors, command errors, warnings, every log level of `serve` and `todo`, and progress
/// spinners.
#[test]
fn no_colour_codes_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let wait = Duration::from_secs(2);
    let unreachable = "ws://127.0.0.1:1";
    let runs: Vec<Vec<&str>> = vec![
        vec!["serve", "--bogus"],
        vec!["serve", "--open", "--conflict", "nope"],
        vec![
            "-vvv",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            "rooms.db",
            "--open",
        ],
        vec![
            "-vvv",
            "todo",
            "--db",
            "t.db",
            "--server",
            unreachable,
            "add",
            "x",
        ],
        vec!["todo", "--db", "t.db", "--server", unreachable, "list"],
        vec!["-vvv", "backup", "t.backup", "--db", "t.db"],
        vec!["-vvv", "restore", "t.backup", "--db", "u.db"],
        vec!["inspect", "--db", "missing.db"],
        vec![
            "todo",
            "--db",
            "t.db",
            "--server",
            "http://127.0.0.1:1",
            "list",
        ],
        vec!["--help"],
    ];
    for args in &runs {
        let err = logged(d, args, &[], wait);
        assert!(
            !err.contains('\u{1b}'),
            "colour codes for {args:?}: {err:?}"
        );
    }
    // And the runs were not silent: there was something to colour.
    let logs = logged(d, &runs[2], &[], wait);
    assert!(logs.contains("TRACE") || logs.contains("DEBUG"), "{logs}");
}

/// At a terminal (a pseudo-terminal from util-linux `script`) log lines and usage errors
/// are coloured, and `NO_COLOR` turns that off (no-color.org); skipped, loudly, without
/// `script`.
#[test]
fn colour_only_at_a_terminal_and_never_with_no_color() {
    if Command::new("script").arg("--version").output().is_err() {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"*** SKIPPED colour_only_at_a_terminal_and_never_with_no_color: no `script` \
              (util-linux) to make a terminal ***\n",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bin = env!("CARGO_BIN_EXE_kalphite");
    let at_terminal = |command: &str, no_color: bool| -> String {
        let mut cmd = Command::new("script");
        cmd.args(["-qec", &format!("{bin} {command}"), "/dev/null"])
            .current_dir(d)
            .env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .env_remove("CLICOLOR_FORCE")
            .env("XDG_DATA_HOME", d.join("xdg"))
            .stdin(Stdio::null());
        if no_color {
            cmd.env("NO_COLOR", "1");
        }
        String::from_utf8_lossy(&cmd.output().unwrap().stdout).into_owned()
    };
    for command in [
        "-vv todo --db t.db --server ws://127.0.0.1:1 list",
        "serve --conflict nope",
    ] {
        let coloured = at_terminal(command, false);
        assert!(coloured.contains('\u{1b}'), "{command}: {coloured:?}");
        let plain = at_terminal(command, true);
        assert!(!plain.contains('\u{1b}'), "{command}: {plain:?}");
        assert!(!plain.trim().is_empty(), "{command}: no output");
    }
}

/// A metric's value from the server's `/metrics` (plain HTTP over a TCP stream).
fn metric(address: &str, name: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let host = address.trim_start_matches("ws://");
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_unloads_rooms_left_by_everyone_after_unload_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--open", "--unload-after", "1"]);
    let address = server.address();
    let raw = Raw::join(&server.url, "u1", "ann").await;
    assert_eq!(metric(&address, "kalphite_sync_rooms"), Some(1));
    drop(raw);
    // Unloaded within a few sweeps of a second (a hang guard, not a timing assertion).
    let mut waited = Duration::ZERO;
    while metric(&address, "kalphite_sync_rooms") != Some(0) {
        assert!(waited < Duration::from_secs(30), "room never unloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    assert_eq!(
        metric(&address, "kalphite_sync_rooms_unloaded_total"),
        Some(1)
    );

    let err = refused(dir.path(), &["serve", "--open", "--unload-after", "0"]);
    assert!(err.contains("--unload-after"), "{err}");
    let fresh = tempfile::tempdir().unwrap();
    refused(fresh.path(), &["serve", "--open", "--unload-after", "0"]);
    assert!(!fresh.path().join("rooms.db").exists() && !fresh.path().join("kalphite.db").exists());
}

/// Cluster mode is PostgreSQL only, and needs its node id and address: each missing piece
/// is one clear error before anything starts (issue 12).
#[test]
fn serve_cluster_refuses_sqlite_and_missing_node_settings() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = [
        "serve",
        "--cluster",
        "--node-id",
        "a",
        "--advertise",
        "127.0.0.1:1",
        "--open",
        "--listen",
        "127.0.0.1:0",
    ];
    let err = refused(d, &cluster);
    assert!(err.contains("cluster mode needs PostgreSQL"), "{err}");
    assert!(
        !d.join("kalphite.db").exists() || err.contains("SQLite"),
        "{err}"
    );
    let err = refused(d, &["serve", "--cluster", "--open", "--node-id", "a"]);
    assert!(err.contains("--advertise"), "{err}");
    let err = refused(d, &["serve", "--node-id", "a", "--open"]);
    assert!(err.contains("--cluster"), "{err}");
    let err = refused(
        d,
        &[
            "serve",
            "--cluster",
            "--node-id",
            "a",
            "--advertise",
            "h:1",
            "--lease-ttl",
            "soon",
        ],
    );
    assert!(err.contains("soon"), "{err}");
}
