//! Shared helpers for the loopback tests: a real server on 127.0.0.1:0, real clients over
//! SQLite files, a raw protocol client, and bounded waits (timeouts are hang guards only).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use kalphite::Store;
use kalphite_client::{ConnectionStatus, SyncClient, SyncConfig, connect_store};
use kalphite_db::{Database, DatabaseConfig};
use kalphite_server::{ServerConfig, run};
use kalphite_sync::{ServerMessage, decode_server};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// At least `MIN_SECRET_BYTES` (32) long, or the server refuses to start.
pub(crate) const SECRET: &[u8] = b"kalphite-test-secret-0123456789abcdef";
/// Hang guard for every wait.
pub(crate) const GUARD: Duration = Duration::from_secs(30);

/// A running server.
pub(crate) struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), kalphite_server::ServerError>>>,
}

impl Server {
    /// A handle on a server run elsewhere, for the helpers that only read its address.
    pub(crate) fn at(addr: SocketAddr) -> Server {
        Server {
            addr,
            stop: None,
            task: None,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("ws://{}/sync", self.addr)
    }

    pub(crate) fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Graceful shutdown; waits for the server to finish.
    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            guard(task).await.expect("server task").expect("server run");
        }
    }
}

pub(crate) async fn sqlite(path: &Path) -> Database {
    Database::open(DatabaseConfig::new(format!("sqlite:{}", path.display())))
        .await
        .expect("open sqlite")
}

pub(crate) async fn memory_db() -> Database {
    Database::open(DatabaseConfig::new("sqlite::memory:"))
        .await
        .expect("open sqlite memory")
}

/// Starts a server on 127.0.0.1:0.
pub(crate) async fn start(config: ServerConfig) -> Server {
    start_at("127.0.0.1:0".parse().expect("addr"), config).await
}

/// Starts a server on `addr` (a restart reuses the old port).
pub(crate) async fn start_at(addr: SocketAddr, config: ServerConfig) -> Server {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(run(listener, config, async move {
        let _ = rx.await;
    }));
    Server {
        addr,
        stop: Some(stop),
        task: Some(task),
    }
}

/// A server config over `db` with the test secret.
pub(crate) fn config(db: Database) -> ServerConfig {
    ServerConfig::new(db).token_secret(SECRET.to_vec())
}

pub(crate) fn token(user: &str, rooms: &[&str]) -> String {
    kalphite_server::issue_token(SECRET, user, rooms, Duration::from_hours(1)).expect("token")
}

/// Client config with short timings for tests.
pub(crate) fn client_config(url: &str, room: &str, user: &str, replica: &str) -> SyncConfig {
    SyncConfig::new(url, room)
        .user(user)
        .auth_token(token(user, &[room]))
        .replica_id(replica)
        .flush_debounce(Duration::from_millis(5))
        .resend_after(Duration::from_millis(500))
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
}

pub(crate) async fn client(db: &Database, config: SyncConfig) -> (Store, SyncClient) {
    connect_store(Store::builder(), db, config)
        .await
        .expect("connect_store")
}

/// Awaits `f` under the hang guard.
pub(crate) async fn guard<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, f)
        .await
        .expect("hang guard: the operation did not finish")
}

/// Polls `cond` every 5 ms until true (hang guard: panics with `what` after GUARD).
pub(crate) async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + GUARD;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "hang guard: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(crate) async fn wait_connected(client: &SyncClient) {
    let mut rx = client.status_watch();
    guard(rx.wait_for(|s| *s == ConnectionStatus::Connected))
        .await
        .expect("status watch");
}

/// The store's contents: (kind, id) → data.
pub(crate) fn snapshot(store: &Store) -> BTreeMap<(String, String), Value> {
    store
        .all()
        .into_iter()
        .map(|e| {
            (
                (e.kind().to_string(), e.id().to_string()),
                e.data_json().expect("json"),
            )
        })
        .collect()
}

/// Waits until every client has an empty offline queue, the same room version, and the
/// same store contents; returns that contents.
pub(crate) async fn converge(
    clients: &[(&Store, &SyncClient)],
) -> BTreeMap<(String, String), Value> {
    wait_for("clients converge", || {
        let first = snapshot(clients[0].0);
        let v = clients[0].1.room_version();
        clients.iter().all(|(s, c)| {
            c.offline_queue_size() == 0 && c.room_version() == v && snapshot(s) == first
        })
    })
    .await;
    snapshot(clients[0].0)
}

/// A raw protocol client for wire-level tests.
pub(crate) struct Raw {
    pub ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Raw {
    pub(crate) async fn connect(url: &str) -> Raw {
        let (ws, _) = guard(tokio_tungstenite::connect_async(url))
            .await
            .expect("raw connect");
        Raw { ws }
    }

    pub(crate) async fn send(&mut self, text: impl Into<String>) {
        self.ws
            .send(Message::Text(text.into().into()))
            .await
            .expect("raw send");
    }

    pub(crate) async fn send_json(&mut self, value: Value) {
        self.send(value.to_string()).await;
    }

    /// The next server message (skipping non-text frames); `None` when the connection ended.
    pub(crate) async fn recv(&mut self) -> Option<ServerMessage> {
        loop {
            match guard(self.ws.next()).await {
                Some(Ok(Message::Text(t))) => {
                    return Some(decode_server(t.as_str(), 64 << 20).expect("server frame"));
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return None,
                Some(Ok(_)) => {}
            }
        }
    }

    /// Receives until `pick` matches.
    pub(crate) async fn recv_until<T>(
        &mut self,
        mut pick: impl FnMut(&ServerMessage) -> Option<T>,
    ) -> T {
        loop {
            let m = self.recv().await.expect("connection ended while waiting");
            if let Some(t) = pick(&m) {
                return t;
            }
        }
    }

    pub(crate) async fn hello(&mut self, room: &str, user: &str, token: Option<&str>) {
        self.hello_as(room, user, &format!("raw-{user}"), token)
            .await;
    }

    /// A hello with the replica id `replica`.
    pub(crate) async fn hello_as(
        &mut self,
        room: &str,
        user: &str,
        replica: &str,
        token: Option<&str>,
    ) {
        let mut payload = serde_json::json!({
            "protocolVersion": 1, "roomId": room, "replicaId": replica, "lastVersion": 0
        });
        if let Some(t) = token {
            payload["token"] = Value::String(t.to_owned());
        }
        self.send_json(serde_json::json!({
            "type": "hello", "messageId": format!("{user}-hello"), "userId": user,
            "timestamp": 1, "payload": payload
        }))
        .await;
    }

    /// Hello + wait for the welcome and the complete catch-up.
    pub(crate) async fn join(&mut self, room: &str, user: &str) {
        self.hello(room, user, Some(&token(user, &[room]))).await;
        self.recv_until(|m| match m {
            ServerMessage::CatchUp(c) if c.payload.complete => Some(()),
            ServerMessage::Error(e) => panic!("join refused: {:?}", e.payload),
            _ => None,
        })
        .await;
    }
}

/// A raw change frame.
// Callers hand over `json!(..)` values, as to `json!` itself.
#[allow(clippy::needless_pass_by_value)]
pub(crate) fn change_frame(
    message_id: &str,
    user: &str,
    id: &str,
    data: Value,
    clock: u64,
) -> Value {
    serde_json::json!({
        "type": "change", "messageId": message_id, "userId": user, "timestamp": 1_700_000_000_000u64,
        "payload": {
            "operation": "upsert", "entityType": "todo", "entityId": id,
            "entity": {"id": id, "type": "todo", "data": data, "updatedAt": 1_700_000_000_000u64},
            "vector": {format!("raw-{user}"): clock}, "baseVersion": 0
        }
    })
}

/// Minimal HTTP GET over a raw TCP stream (no HTTP client dependency): the status and the
/// body.
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (head, body) = http_get_with_head(addr, path).await;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body)
}

/// [`http_get`], with the status line and headers instead of the status alone.
pub(crate) async fn http_get_with_head(addr: SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = guard(tokio::net::TcpStream::connect(addr))
        .await
        .expect("tcp");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    guard(stream.read_to_end(&mut buf)).await.expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_owned(), body.to_owned())
}

/// A metric's value from `/metrics`.
pub(crate) async fn metric(server: &Server, name: &str) -> u64 {
    let (status, body) = http_get(server.addr, "/metrics").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{body}"))
}

/// Polls `/metrics` until `cond` holds for `name` (hang guard: GUARD).
pub(crate) async fn wait_metric(server: &Server, name: &str, cond: impl Fn(u64) -> bool) -> u64 {
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let v = metric(server, name).await;
        if cond(v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "hang guard: {name} is still {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
