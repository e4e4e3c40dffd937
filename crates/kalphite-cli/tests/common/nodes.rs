//! `kalphite serve` processes for the end-to-end tests: started on a port of their own,
//! killed (`kill -9`), paused (`SIGSTOP`/`SIGCONT`), stopped (`SIGTERM`) and restarted on
//! the same port; never left behind (killed when dropped, their log shown if a test fails).

use std::io::{BufRead, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A free port on 127.0.0.1 (bound, then released).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One `kalphite serve` process, by name, on a fixed port across restarts.
pub(crate) struct Node {
    /// Its name (the cluster node id).
    pub(crate) name: String,
    /// Its port.
    pub(crate) port: u16,
    args: Vec<String>,
    dir: PathBuf,
    child: Option<Child>,
    paused: bool,
    /// Every line it printed on stdout, all runs.
    stdout: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// Starts `kalphite serve --listen 127.0.0.1:PORT ARGS…` (stderr into `DIR/NAME.log`)
    /// and waits for its `listening on` line.
    pub(crate) fn start(name: &str, dir: &Path, port: u16, args: &[String]) -> Self {
        let mut node = Self {
            name: name.to_owned(),
            port,
            args: args.to_vec(),
            dir: dir.to_owned(),
            child: None,
            paused: false,
            stdout: Arc::default(),
        };
        node.spawn();
        node
    }

    /// `ws://127.0.0.1:PORT/sync`.
    pub(crate) fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/sync", self.port)
    }

    /// `127.0.0.1:PORT`.
    pub(crate) fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The process id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether a process is running (not killed or exited; a paused one counts).
    pub(crate) fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Its log file (stderr of every run).
    pub(crate) fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    /// Its stderr so far (last `n` lines).
    pub(crate) fn log_tail(&self, n: usize) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.log_path()) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Everything it printed on stdout.
    pub(crate) fn stdout(&self) -> Vec<String> {
        self.stdout.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        // A port just released by a killed process may take a moment to bind again.
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.log_path())
                .expect("open the node's log");
            let mut child = Command::new(env!("CARGO_BIN_EXE_kalphite"))
                .arg("serve")
                .args(["--listen", &self.address()])
                .args(&self.args)
                .current_dir(&self.dir)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .env_remove("KALPHITE_AUTH_SECRET")
                .env_remove("KALPHITE_DB")
                .env_remove("KALPHITE_SERVER")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log)
                .spawn()
                .expect("start kalphite serve");
            // Read stdout until EOF in a thread of its own (never drop the pipe early: a
            // server whose stdout is closed must not be what a test measures).
            let out = child.stdout.take().expect("stdout");
            let (tx, rx) = mpsc::channel::<String>();
            let lines = Arc::clone(&self.stdout);
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut l) = lines.lock() {
                        l.push(line.clone());
                    }
                    let _ = tx.send(line);
                }
            });
            let attempt = Instant::now();
            let started = loop {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(line) if line.contains("listening on ws://") => break true,
                    Ok(_) => {}
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if !matches!(child.try_wait(), Ok(None)) {
                            break false;
                        }
                        if attempt.elapsed() > Duration::from_secs(30) {
                            let _ = child.kill();
                            let _ = child.wait();
                            panic!(
                                "{} did not start within 30 s: {}",
                                self.name,
                                self.log_tail(20)
                            );
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break false,
                }
            };
            if started {
                self.child = Some(child);
                self.paused = false;
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                Instant::now() < until,
                "{} did not start: {}",
                self.name,
                self.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts it again (same port, same arguments) after a kill or a stop.
    pub(crate) fn restart(&mut self) {
        self.spawn();
    }

    fn signal(&self, sig: &str) {
        let pid = self.pid().expect("a running node");
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {pid} failed");
    }

    /// `kill -9`, and waits for the process to be gone.
    pub(crate) fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// `SIGSTOP`: the process is frozen (its sockets stay open, nothing answers).
    pub(crate) fn pause(&mut self) {
        self.signal("-STOP");
        self.paused = true;
    }

    /// `SIGCONT`.
    pub(crate) fn resume(&mut self) {
        self.signal("-CONT");
        self.paused = false;
    }

    /// `SIGTERM`, and waits up to `grace` for it to exit (then `kill -9`); its exit status
    /// (`None` when it had to be killed).
    pub(crate) fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.paused {
            self.resume();
        }
        self.signal("-TERM");
        let mut child = self.child.take().expect("a running node");
        let until = Instant::now() + grace;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- {} (port {}), last lines of {} ---\n{}\n---",
                self.name,
                self.port,
                self.log_path().display(),
                self.log_tail(40)
            );
        }
    }
}

/// A plain HTTP GET on `127.0.0.1:PORT` (`/healthz`, `/metrics`): status and body, or
/// `None` when it does not answer within 2 s.
pub(crate) async fn http_get(address: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(address).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.ok()?;
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .ok()
        .flatten()
}

/// A gauge or counter from a node's `/metrics` (the first sample of that name).
pub(crate) async fn metric(address: &str, name: &str) -> Option<f64> {
    let (_, body) = http_get(address, "/metrics").await?;
    body.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let value = if rest.starts_with('{') {
            rest.split_once("} ")?.1
        } else {
            rest.strip_prefix(' ')?
        };
        value.trim().parse().ok()
    })
}
