//! The admin commands as a `pg_dump`/`sqlite3` user expects them (issue 10, "the CLI
//! consistent with itself and its peers"): `backup FILE` and `restore FILE` take the file
//! as their argument, `-` meaning standard output/input, so a pipe copies a database;
//! `--db` takes a bare file path as SQLite everywhere; `inspect --json` prints one stable
//! JSON object; the old `--out`/`--in` flags still work; and reading a database that does
//! not exist is an error instead of a new empty file.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn kalphite(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kalphite"))
        .args(args)
        .current_dir(dir)
        .env_remove("KALPHITE_SERVER")
        .env_remove("KALPHITE_TOKEN")
        .env_remove("KALPHITE_DB")
        .env("XDG_DATA_HOME", dir.join("xdg"))
        .env("RUST_LOG", "off")
        .output()
        .expect("run kalphite")
}

fn ok(dir: &Path, args: &[&str]) -> Output {
    let out = kalphite(dir, args);
    assert!(
        out.status.success(),
        "kalphite {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let out = kalphite(dir, args);
    assert!(
        !out.status.success(),
        "kalphite {args:?} should have failed"
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn inspect_json(dir: &Path, db: &str) -> Value {
    let out = ok(dir, &["inspect", "--db", db, "--json"]);
    serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)))
}

/// `kalphite backup - --db a.db | kalphite restore - --db b.db`, with bare file paths.
#[test]
fn backup_to_stdout_piped_into_restore_from_stdin_copies_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["todo", "--db", "a.db", "demo"]);
    let before = inspect_json(d, "a.db");

    let mut backup = Command::new(env!("CARGO_BIN_EXE_kalphite"))
        .args(["backup", "-", "--db", "a.db"])
        .current_dir(d)
        .env("RUST_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let restore = Command::new(env!("CARGO_BIN_EXE_kalphite"))
        .args(["restore", "-", "--db", "b.db"])
        .current_dir(d)
        .env("RUST_LOG", "off")
        .stdin(backup.stdout.take().unwrap())
        .output()
        .unwrap();
    let backed_up = backup.wait_with_output().unwrap();
    assert!(backed_up.status.success(), "backup -");
    let backup_err = String::from_utf8_lossy(&backed_up.stderr);
    assert!(
        restore.status.success(),
        "restore -: {}",
        String::from_utf8_lossy(&restore.stderr)
    );
    // The summary of a backup to stdout goes to stderr, never into the data.
    assert!(backup_err.contains("Backed up"), "{backup_err}");
    assert!(
        stdout(&restore).contains("Restored"),
        "{}",
        stdout(&restore)
    );

    let after = inspect_json(d, "b.db");
    assert_eq!(after["entities"], before["entities"]);
    assert_eq!(after["kinds"], before["kinds"]);
    assert!(before["entities"].as_u64().unwrap() > 0, "{before}");
    let list = |db: &str| stdout(&ok(d, &["todo", "--db", db, "list", "--json"]));
    assert_eq!(list("a.db"), list("b.db"));
}

/// A backup file as the positional argument, and the old flags as hidden aliases.
#[test]
fn backup_and_restore_take_the_file_as_argument_and_the_old_flags_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["todo", "--db", "a.db", "add", "one"]);
    ok(d, &["backup", "a.backup", "--db", "a.db"]);
    ok(d, &["restore", "a.backup", "--db", "b.db"]);
    ok(d, &["backup", "--db", "sqlite:a.db", "--out", "old.backup"]);
    ok(d, &["restore", "--db", "sqlite:c.db", "--in", "old.backup"]);
    for db in ["b.db", "c.db"] {
        assert_eq!(inspect_json(d, db)["kinds"]["todo"], 1, "{db}");
    }
    // The old names are hidden from help, the new form shown.
    let help = stdout(&ok(d, &["backup", "--help"]));
    assert!(help.contains("[FILE]") && !help.contains("--out"), "{help}");
    let help = stdout(&ok(d, &["restore", "--help"]));
    assert!(help.contains("[FILE]") && !help.contains("--in "), "{help}");

    // Both spellings at once, or neither, is a usage error.
    let err = fails(
        d,
        &["backup", "x.backup", "--out", "y.backup", "--db", "a.db"],
    );
    assert!(err.contains("cannot be used with"), "{err}");
    let err = fails(d, &["restore", "--db", "a.db"]);
    assert!(err.contains("FILE"), "{err}");
}

#[test]
fn restore_refuses_an_empty_stdin_or_a_missing_file_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kalphite"))
        .args(["restore", "-", "--db", "new.db"])
        .current_dir(d)
        .env("RUST_LOG", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("standard input"), "{err}");
    let err = fails(d, &["restore", "missing.backup", "--db", "new.db"]);
    assert!(err.contains("missing.backup"), "{err}");
    assert!(!d.join("new.db").exists(), "nothing was created");

    // Garbage on stdin is refused like a corrupt file.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kalphite"))
        .args(["restore", "-", "--db", "new.db"])
        .current_dir(d)
        .env("RUST_LOG", "off")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"not a backup\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused"), "{err}");
}

/// `--db` takes a bare path as SQLite in every command; reading one that does not exist
/// says so (before, `inspect --db typo.db` created an empty database and reported on it).
#[test]
fn a_bare_path_is_a_sqlite_database_everywhere_and_a_missing_one_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    ok(d, &["todo", "--db", "sub/t.db", "add", "x"]);
    let report = inspect_json(d, "sub/t.db");
    assert_eq!(report["backend"], "sqlite");
    assert_eq!(report["kinds"]["todo"], 1);
    // The same file through its URL.
    assert_eq!(inspect_json(d, "sqlite:sub/t.db")["kinds"]["todo"], 1);

    for args in [
        &["inspect", "--db", "typo.db"][..],
        &["backup", "x.backup", "--db", "typo.db"][..],
    ] {
        let err = fails(d, args);
        assert!(err.contains("no database at typo.db"), "{args:?}: {err}");
    }
    assert!(!d.join("typo.db").exists());
    assert!(!d.join("x.backup").exists());
}

/// The documented shape of `inspect --json` (README, "Admin").
#[test]
fn inspect_json_has_the_documented_shape() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let empty = {
        ok(d, &["todo", "--db", "e.db", "list"]);
        inspect_json(d, "e.db")
    };
    assert_eq!(empty["entities"], 0);
    assert_eq!(empty["lastChange"], Value::Null);
    assert_eq!(empty["kinds"], serde_json::json!({}));

    ok(d, &["todo", "--db", "a.db", "add", "first"]);
    ok(
        d,
        &["todo", "--db", "a.db", "add", "second", "--project", "p"],
    );
    let report = inspect_json(d, "a.db");
    let mut keys: Vec<&str> = report
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "backend",
            "database",
            "entities",
            "kinds",
            "lastChange",
            "sizeBytes"
        ]
    );
    assert!(report["database"].as_str().unwrap().ends_with("a.db"));
    assert_eq!(report["entities"], 3);
    assert_eq!(
        report["kinds"],
        serde_json::json!({"project": 1, "todo": 2})
    );
    assert!(report["sizeBytes"].as_u64().unwrap() > 0);
    let last = &report["lastChange"];
    assert!(last["kind"].is_string() && last["id"].is_string(), "{last}");
    assert!(last["updatedAt"].as_u64().unwrap() > 0, "{last}");
    // Text stays the default.
    assert!(stdout(&ok(d, &["inspect", "--db", "a.db"])).contains("entities: 3"));
}

/// The same commands on PostgreSQL (`KALPHITE_PG_URL`, e.g.
/// `postgres://postgres@127.0.0.1:5432/test`; loudly skipped without it): a SQLite
/// database piped into a PostgreSQL schema, and `inspect --json` of it, with any password
/// in the URL replaced by `***`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_backup_piped_into_postgres_and_inspected_as_json() {
    let Ok(pg) = std::env::var("KALPHITE_PG_URL") else {
        let _ = std::io::stderr().write_all(
            b"*** SKIPPED a_sqlite_backup_piped_into_postgres_and_inspected_as_json: set \
              KALPHITE_PG_URL (e.g. postgres://postgres@127.0.0.1:5432/test) to run it ***\n",
        );
        return;
    };
    // A schema of its own, made by kalphite-db; the CLI reaches it through the URL.
    let schema = format!("cli_admin_{:08x}", rand::random::<u32>());
    kalphite_db::Database::open(kalphite_db::DatabaseConfig::new(&pg).postgres_schema(&schema))
        .await
        .expect("create the schema")
        .close()
        .await
        .expect("close");
    let sep = if pg.contains('?') { '&' } else { '?' };
    let url = format!("{pg}{sep}options=-c%20search_path%3D{schema}");

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["todo", "--db", "a.db", "demo"]);
    let backup = Command::new(env!("CARGO_BIN_EXE_kalphite"))
        .args(["backup", "-", "--db", "a.db"])
        .current_dir(d)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(backup.status.success());
    let mut restore = Command::new(env!("CARGO_BIN_EXE_kalphite"))
        .args(["restore", "-", "--db", &url])
        .current_dir(d)
        .env("RUST_LOG", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    restore
        .stdin
        .take()
        .unwrap()
        .write_all(&backup.stdout)
        .unwrap();
    let restored = restore.wait_with_output().unwrap();
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );

    let report = inspect_json(d, &url);
    assert_eq!(report["backend"], "postgres");
    assert_eq!(report["kinds"], inspect_json(d, "a.db")["kinds"]);
    assert_eq!(
        report["clusterRooms"],
        serde_json::json!([]),
        "no cluster yet"
    );

    // Cluster mode's leases: a node holds room r1 (issue 12: `inspect` shows room owners).
    let db =
        kalphite_db::Database::open(kalphite_db::DatabaseConfig::new(&pg).postgres_schema(&schema))
            .await
            .expect("open");
    let node = db
        .join_cluster(&kalphite_db::NodeInfo {
            node: "n1".into(),
            advertise: "127.0.0.1:9999".into(),
        })
        .await
        .expect("join");
    let acquired = db
        .acquire_room("r1", "n1", std::time::Duration::from_mins(1))
        .await
        .expect("acquire");
    assert!(matches!(acquired, kalphite_db::Acquired::Owned(_)));
    let rooms = inspect_json(d, &url)["clusterRooms"].clone();
    assert_eq!(rooms.as_array().map(Vec::len), Some(1), "{rooms}");
    assert_eq!(rooms[0]["room"], "r1");
    assert_eq!(rooms[0]["owner"], "n1");
    assert_eq!(rooms[0]["advertise"], "127.0.0.1:9999");
    assert_eq!(rooms[0]["live"], true);
    assert_eq!(rooms[0]["term"], 1);
    let text = stdout(&ok(d, &["inspect", "--db", &url]));
    assert!(text.contains("r1: owned by n1 (127.0.0.1:9999)"), "{text}");
    drop(node);
    db.close().await.expect("close");
    let shown = report["database"].as_str().unwrap();
    let authority = pg.split("://").nth(1).unwrap().split('/').next().unwrap();
    if let Some((user_pw, _)) = authority.rsplit_once('@')
        && let Some((_, password)) = user_pw.split_once(':')
    {
        assert!(
            !shown.contains(password) && shown.contains("***"),
            "{shown}"
        );
    }
}
