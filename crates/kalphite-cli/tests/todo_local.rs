//! The `kalphite` binary end to end, offline: the todo app keeps its data in its own
//! SQLite file across runs, admin commands back up and restore it, and every error is one
//! clear line with a non-zero exit.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn kalphite(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kalphite"))
        .args(args)
        .current_dir(dir)
        .env_remove("KALPHITE_SERVER")
        .env_remove("KALPHITE_TOKEN")
        .env("XDG_DATA_HOME", dir.join("xdg"))
        .env("RUST_LOG", "off")
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

fn fails(dir: &Path, args: &[&str]) -> String {
    let out = kalphite(dir, args);
    assert!(
        !out.status.success(),
        "kalphite {args:?} should have failed"
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    err
}

fn list_json(dir: &Path, db: &str) -> Vec<Value> {
    let out = ok(dir, &["todo", "--db", db, "list", "--json"]);
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn todos_persist_across_runs_in_the_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        &[
            "todo",
            "--db",
            "sqlite:t.db",
            "add",
            "Write tests",
            "--priority",
            "high",
            "--tag",
            "dev",
        ],
    );
    ok(
        d,
        &[
            "todo",
            "--db",
            "sqlite:t.db",
            "add",
            "Buy milk",
            "--due",
            "2020-01-01",
            "--project",
            "Home",
        ],
    );
    let todos = list_json(d, "sqlite:t.db");
    assert_eq!(todos.len(), 2);
    assert_eq!(todos[0]["title"], "Write tests");
    assert_eq!(todos[0]["number"], 1);
    assert_eq!(todos[0]["priority"], "high");
    assert_eq!(todos[0]["tags"], serde_json::json!(["dev"]));
    assert_eq!(todos[1]["project"], "Home");
    assert_eq!(todos[1]["due"], "2020-01-01");
    let human = ok(d, &["todo", "--db", "sqlite:t.db", "list"]);
    assert!(human.contains("OVERDUE"), "{human}");
}

#[test]
fn complete_status_and_delete_use_the_numbers_list_shows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = "sqlite:n.db";
    ok(
        d,
        &["todo", "--db", db, "add", "low one", "--priority", "low"],
    );
    ok(
        d,
        &[
            "todo",
            "--db",
            db,
            "add",
            "urgent one",
            "--priority",
            "urgent",
        ],
    );
    // Urgent sorts first, so it is number 1 even though it was added second.
    ok(d, &["todo", "--db", db, "complete", "1"]);
    let todos = list_json(d, db);
    let urgent = todos.iter().find(|t| t["title"] == "urgent one").unwrap();
    assert_eq!(urgent["status"], "completed");
    ok(d, &["todo", "--db", db, "status", "1", "in-progress"]);
    assert_eq!(list_json(d, db)[0]["status"], "in-progress");
    assert_eq!(list_json(d, db)[0]["title"], "low one");
    ok(d, &["todo", "--db", db, "delete", "2"]);
    let left = list_json(d, db);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["title"], "low one");
    let filtered = ok(
        d,
        &[
            "todo",
            "--db",
            db,
            "list",
            "--status",
            "completed",
            "--json",
        ],
    );
    assert_eq!(
        serde_json::from_str::<Value>(&filtered).unwrap(),
        serde_json::json!([])
    );
}

#[test]
fn demo_projects_tags_stats_and_clear() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = "sqlite:demo.db";
    ok(d, &["todo", "--db", db, "demo"]);
    ok(d, &["todo", "--db", db, "complete", "1"]);
    let projects = ok(d, &["todo", "--db", db, "projects"]);
    assert!(projects.contains("Kalphite  1/3 completed"), "{projects}");
    let tags = ok(d, &["todo", "--db", db, "tags"]);
    assert!(tags.contains("#demo  2 todos"), "{tags}");
    let stats = ok(d, &["todo", "--db", db, "stats"]);
    assert!(
        stats.contains("todos: 3") && stats.contains("completed: 1"),
        "{stats}"
    );
    ok(d, &["todo", "--db", db, "clear"]);
    assert!(list_json(d, db).is_empty());
}

#[test]
fn the_default_database_is_in_the_users_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["todo", "add", "somewhere"]);
    assert!(d.join("xdg/kalphite/todo.db").exists());
}

#[test]
fn backup_then_restore_into_a_fresh_file_gives_the_same_list() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["todo", "--db", "sqlite:a.db", "demo"]);
    ok(d, &["todo", "--db", "sqlite:a.db", "complete", "2"]);
    ok(d, &["backup", "--db", "sqlite:a.db", "--out", "a.backup"]);
    let restored = ok(d, &["restore", "--db", "sqlite:b.db", "--in", "a.backup"]);
    // 3 todos, 1 project, 2 tags: the sync bookkeeping is not user data (it used to be
    // an entity, counted and backed up as one).
    assert!(restored.contains("Restored 6 entities"), "{restored}");
    assert_eq!(list_json(d, "sqlite:a.db"), list_json(d, "sqlite:b.db"));
    let inspect = ok(d, &["inspect", "--db", "sqlite:b.db"]);
    assert!(
        inspect.contains("todo: 3")
            && inspect.contains("entities: 6")
            && !inspect.contains("_kalphite"),
        "{inspect}"
    );
}

#[test]
fn a_corrupt_backup_is_refused_and_the_database_is_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["todo", "--db", "sqlite:a.db", "demo"]);
    ok(
        d,
        &["backup", "--db", "sqlite:a.db", "--out", "full.backup"],
    );
    let text = std::fs::read_to_string(d.join("full.backup")).unwrap();
    std::fs::write(d.join("cut.backup"), &text[..text.len() / 2]).unwrap();
    ok(d, &["todo", "--db", "sqlite:b.db", "add", "keep me"]);
    let err = fails(d, &["restore", "--db", "sqlite:b.db", "--in", "cut.backup"]);
    assert!(err.contains("left as it was"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let left = list_json(d, "sqlite:b.db");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["title"], "keep me");
}

#[test]
fn errors_are_one_clear_line_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let err = fails(d, &["todo", "--db", "sqlite:x.db", "complete", "7"]);
    assert!(err.contains("no todo number 7"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let err = fails(
        d,
        &[
            "todo",
            "--db",
            "sqlite:x.db",
            "add",
            "x",
            "--priority",
            "extreme",
        ],
    );
    assert!(err.contains("extreme"), "{err}");

    let err = fails(
        d,
        &["todo", "--db", "sqlite:x.db", "add", "x", "--due", "soon"],
    );
    assert!(err.contains("YYYY-MM-DD"), "{err}");

    let err = fails(d, &["frobnicate"]);
    assert!(
        err.contains("unrecognized subcommand 'frobnicate'"),
        "{err}"
    );

    // An unreadable database file: a directory where the file should be.
    std::fs::create_dir(d.join("dir.db")).unwrap();
    let err = fails(d, &["todo", "--db", "sqlite:dir.db", "list"]);
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let err = fails(d, &["inspect", "--db", "mysql://nope"]);
    assert!(err.contains("mysql://nope"), "{err}");

    let err = fails(d, &["todo", "--db", "sqlite:x.db", "sync"]);
    assert!(err.contains("--server"), "{err}");
}
