//! Regression: `kalphite serve --auth-secret ''` (or `KALPHITE_AUTH_SECRET=`) started a
//! server that welcomed tokens HMAC'd with an empty key, which anyone can make. Now
//! `serve` and `token` refuse a secret shorter than 32 bytes with one clear error that
//! says how to make one, and exit non-zero; `--secret-file` and the `--secret` /
//! `--auth-secret` spellings work with a long enough secret.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How a run of the binary ended.
#[derive(Debug)]
enum Ended {
    /// It exited by itself: success?, stdout, stderr.
    Exited(bool, String, String),
    /// Still running after the wait (a server that started): killed.
    Running,
}

/// Runs `kalphite args` in `dir` with `env`; a process still running after `wait` is
/// killed (never a hang).
fn run(dir: &Path, args: &[&str], env: &[(&str, &str)], wait: Duration) -> Ended {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kalphite"));
    cmd.args(args)
        .current_dir(dir)
        .env("RUST_LOG", "off")
        .env_remove("KALPHITE_AUTH_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run kalphite");
    let deadline = Instant::now() + wait;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            return Ended::Exited(
                status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ended::Running;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `kalphite args` in `dir`, returns the first line it prints (empty if it exited
/// without printing), and kills it.
fn first_line(dir: &Path, args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kalphite"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "off")
        .env_remove("KALPHITE_AUTH_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run kalphite");
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
    }
    let _ = child.kill();
    let _ = child.wait();
    line
}

/// Asserts that the run failed with the short-secret message.
fn refused(ended: Ended, what: &str) {
    let Ended::Exited(success, _, stderr) = ended else {
        panic!("{what}: started anyway: {ended:?}");
    };
    assert!(!success, "{what}: exited successfully");
    assert!(stderr.contains("at least 32 bytes"), "{what}: {stderr}");
    assert!(stderr.contains("openssl rand -hex 32"), "{what}: {stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "{what}: one line: {stderr}"
    );
}

const SERVE: [&str; 5] = ["serve", "--listen", "127.0.0.1:0", "--db", "sqlite:s.db"];
const WAIT: Duration = Duration::from_secs(15);

#[test]
fn serve_refuses_an_empty_or_short_secret() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("short.secret"), "0123456789abcdef0123456789abcde\n").unwrap();
    for (extra, env, what) in [
        (&["--auth-secret", ""][..], &[][..], "--auth-secret ''"),
        (&["--secret", "hunter2"][..], &[][..], "--secret hunter2"),
        (
            &[][..],
            &[("KALPHITE_AUTH_SECRET", "")][..],
            "KALPHITE_AUTH_SECRET=",
        ),
        (
            &["--secret-file", "short.secret"][..],
            &[][..],
            "a 31-byte secret file",
        ),
    ] {
        let args: Vec<&str> = SERVE.iter().copied().chain(extra.iter().copied()).collect();
        refused(run(d, &args, env, WAIT), what);
    }
    assert!(
        !d.join("s.db").exists(),
        "refused before opening the database"
    );
    assert!(
        !d.join("kalphite.secret").exists(),
        "and before making a secret"
    );
}

#[test]
fn token_refuses_a_short_secret() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let token = ["token", "--user", "u", "--room", "r"];
    let with = |extra: &[&str]| -> Vec<String> {
        token.iter().chain(extra).map(|s| (*s).to_owned()).collect()
    };
    let args = with(&["--secret", ""]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(run(d, &args, &[], WAIT), "token --secret ''");
    std::fs::write(d.join("short.secret"), "tiny").unwrap();
    let args = with(&["--secret-file", "short.secret"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(run(d, &args, &[], WAIT), "token --secret-file (short)");
}

#[test]
fn a_long_enough_secret_from_a_file_or_a_flag_serves_and_signs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let secret = "0123456789abcdef0123456789abcdef";
    std::fs::write(d.join("my.secret"), format!("{secret}\n")).unwrap();
    for extra in [
        ["--secret-file", "my.secret"],
        ["--secret", secret],
        ["--auth-secret", secret],
    ] {
        let args: Vec<&str> = SERVE.iter().copied().chain(extra).collect();
        let first = first_line(d, &args);
        assert!(first.contains("listening"), "{extra:?}: {first}");
    }
    let Ended::Exited(true, stdout, _) = run(
        d,
        &[
            "token",
            "--secret-file",
            "my.secret",
            "--user",
            "u",
            "--room",
            "r",
        ],
        &[],
        WAIT,
    ) else {
        panic!("token with a 32-byte secret file failed");
    };
    assert_eq!(stdout.trim().split('.').count(), 3, "a JWT: {stdout}");
}
