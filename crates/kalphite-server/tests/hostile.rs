//! The hostile-input suite (issue 10, "Acceptance"): a real server on loopback and raw
//! WebSocket clients sending, for each client message type, malformed JSON, wrong-typed,
//! missing, oversized and over-limit fields, unknown types, binary frames, fragments,
//! invalid UTF-8, frames before the hello, a second hello, bad tokens, and half-open or
//! never-upgraded sockets. Every case asserts the error code and close code that
//! `docs/protocol.md` documents, that `/healthz` still answers, that another client of the
//! same room sees nothing (its next frame is the next honest change), and that the server
//! still stops.
//!
//! Covered elsewhere and not repeated here: a reader that stalls (`slow_clients.rs`),
//! sockets that never send a request and the connection limits (`connection_limits.rs`),
//! NUL characters (`unstorable_input.rs`), a bad frame answered without closing and the
//! soft frame limit's `refersTo` (`bad_input.rs`), which tokens are refused with which
//! error (`auth.rs`, which this suite extends with close codes, `alg: none` and an
//! empty key).

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use kalphite_server::{Claims, ServerConfig, encode_claims};
use kalphite_sync::{ErrorCode, ServerMessage};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// The soft frame limit of these servers; the hard one is 64 KiB.
const LIMIT: usize = 4096;

/// A server and two honest members of room `r`: `writer` writes, `watcher` must see
/// exactly the writer's changes, whatever the hostile connections do.
struct Scene {
    server: Server,
    writer: Raw,
    watcher: Raw,
    n: u64,
}

impl Scene {
    async fn new(config: ServerConfig) -> Self {
        let server = start(config).await;
        let mut writer = Raw::connect(&server.url()).await;
        writer.join("r", "writer").await;
        let mut watcher = Raw::connect(&server.url()).await;
        watcher.join("r", "watcher").await;
        Self {
            server,
            writer,
            watcher,
            n: 0,
        }
    }

    async fn hostile(&self) -> Raw {
        Raw::connect(&self.server.url()).await
    }

    /// `/healthz` answers, and the watcher's next frame (heartbeat replies aside) is the
    /// writer's next change: nothing the hostile client did reached it.
    async fn check(&mut self, case: &str) {
        assert_eq!(
            http_get(self.server.addr, "/healthz").await.0,
            200,
            "{case}: /healthz"
        );
        self.n += 1;
        let id = format!("honest-{}", self.n);
        let frame = change_frame(
            &format!("writer-{}", self.n),
            "writer",
            &id,
            json!({"n": self.n}),
            self.n,
        );
        loop {
            self.writer.send_json(frame.clone()).await;
            let acked = self
                .writer
                .recv_until(|m| match m {
                    ServerMessage::Ack(_) => Some(true),
                    // A tight rate limit (one test's): resend later, as clients do.
                    ServerMessage::Error(e) if e.payload.code == ErrorCode::RateLimited => {
                        Some(false)
                    }
                    ServerMessage::Error(e) => panic!("{case}: the writer got {:?}", e.payload),
                    _ => None,
                })
                .await;
            if acked {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        loop {
            match self.watcher.recv().await {
                Some(ServerMessage::Heartbeat(_)) => {}
                Some(ServerMessage::Change(c)) if c.payload.entity_id.as_str() == id => break,
                other => panic!("{case}: the watcher saw {other:?} before the honest change"),
            }
        }
    }

    /// Keeps the honest members from idling out while `until` runs (a heartbeat each from
    /// both every 200 ms), and returns what it returns.
    async fn alive_during<T>(&mut self, until: impl Future<Output = T>) -> T {
        tokio::pin!(until);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                out = &mut until => return out,
                _ = tick.tick() => {
                    for raw in [&mut self.writer, &mut self.watcher] {
                        raw.send_json(json!({"type": "heartbeat", "messageId": "keep",
                            "userId": "x", "timestamp": 1})).await;
                    }
                }
            }
        }
    }

    async fn stop(self) {
        drop((self.writer, self.watcher));
        guard(self.server.stop()).await;
    }
}

/// The server's gauge of open sync connections.
async fn connections(addr: std::net::SocketAddr) -> u64 {
    let (_, body) = http_get(addr, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix("kalphite_sync_connections "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the connections gauge")
}

/// The next error on `raw` (other frames skipped): its code and `refersTo`.
async fn next_error(raw: &mut Raw, case: &str) -> (ErrorCode, Option<String>) {
    loop {
        match guard(raw.ws.next()).await {
            Some(Ok(Message::Text(t))) => {
                let m = kalphite_sync::decode_server(t.as_str(), usize::MAX).expect("frame");
                if let ServerMessage::Error(e) = m {
                    return (e.payload.code, e.payload.refers_to);
                }
            }
            Some(Ok(Message::Close(c))) => panic!("{case}: closed ({c:?}) without an error"),
            Some(Ok(_)) => {}
            other => panic!("{case}: connection ended without an error: {other:?}"),
        }
    }
}

/// The close frame that ends `raw` (frames before it skipped): (code, reason).
async fn close_of(raw: &mut Raw, case: &str) -> (u16, String) {
    loop {
        match guard(raw.ws.next()).await {
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
            Some(Ok(Message::Close(None))) => panic!("{case}: a close frame without a code"),
            Some(Ok(_)) => {}
            other => panic!("{case}: the connection ended without a close frame: {other:?}"),
        }
    }
}

/// The connection still works: a heartbeat is answered.
async fn still_open(raw: &mut Raw, case: &str) {
    raw.send_json(
        json!({"type": "heartbeat", "messageId": "alive", "userId": "h", "timestamp": 1}),
    )
    .await;
    loop {
        match raw.recv().await {
            Some(ServerMessage::Heartbeat(_)) => return,
            Some(ServerMessage::Error(e)) => panic!("{case}: {:?}", e.payload),
            Some(_) => {}
            None => panic!("{case}: the connection was closed"),
        }
    }
}

fn nested(levels: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..levels {
        v = json!({ "a": v });
    }
    v
}

fn change(id: &str, payload: &Value) -> String {
    json!({"type": "change", "messageId": id, "userId": "h", "timestamp": 1, "payload": payload})
        .to_string()
}

fn upsert_payload(entity_id: &str, entity: &Value) -> Value {
    json!({"operation": "upsert", "entityType": "todo", "entityId": entity_id,
           "entity": entity, "vector": {"raw-h": 1}, "baseVersion": 0})
}

fn hello(id: &str, payload: &Value) -> String {
    json!({"type": "hello", "messageId": id, "userId": "h", "timestamp": 1, "payload": payload})
        .to_string()
}

/// Every bad frame a joined client can send without losing its connection, with the error
/// it gets and that error's `refersTo`.
fn bad_frames() -> Vec<(&'static str, String, ErrorCode, Option<String>)> {
    use ErrorCode::*;
    let some = |s: &str| Some(s.to_owned());
    let pad = "x".repeat(LIMIT + 100);
    let long = "i".repeat(600);
    let entity = |id: &str| json!({"id": id, "type": "todo", "data": {"title": "t"}});
    let clock: serde_json::Map<String, Value> =
        (0..300).map(|i| (format!("r{i}"), json!(1))).collect();
    let deep_json = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    vec![
        // hello
        ("hello: malformed", r#"{"type":"hello","messageId":"h-1","#.into(), MalformedJson, None),
        (
            "hello: protocolVersion is a string",
            hello("h-2", &json!({"protocolVersion": "one", "roomId": "r", "replicaId": "x"})),
            InvalidMessage,
            some("h-2"),
        ),
        (
            "hello: roomId missing",
            hello("h-3", &json!({"protocolVersion": 1, "replicaId": "x"})),
            MissingField,
            some("h-3"),
        ),
        (
            "hello: oversized",
            hello("h-4", &json!({"protocolVersion": 1, "roomId": "r", "replicaId": "x", "pad": pad})),
            Oversized,
            some("h-4"),
        ),
        (
            "hello: a second one",
            hello("h-5", &json!({"protocolVersion": 1, "roomId": "r", "replicaId": "raw-h",
                                  "token": token("h", &["r"])})),
            AlreadyJoined,
            some("h-5"),
        ),
        // change
        ("change: malformed", r#"{"type":"change","messageId":"c-1","payload":{"#.into(), MalformedJson, None),
        (
            "change: entityId is a number",
            change("c-2", &json!({"operation": "delete", "entityType": "todo", "entityId": 5})),
            InvalidMessage,
            some("c-2"),
        ),
        (
            "change: a negative clock counter",
            change("c-3", &json!({"operation": "delete", "entityType": "todo", "entityId": "a",
                                  "vector": {"raw-h": -1}})),
            InvalidMessage,
            some("c-3"),
        ),
        (
            "change: timestamp is a string",
            json!({"type": "change", "messageId": "c-4", "userId": "h", "timestamp": "now",
                   "payload": {"operation": "delete", "entityType": "todo", "entityId": "a"}})
                .to_string(),
            InvalidMessage,
            some("c-4"),
        ),
        (
            "change: operation missing",
            change("c-5", &json!({"entityType": "todo", "entityId": "a"})),
            MissingField,
            some("c-5"),
        ),
        (
            "change: payload missing",
            json!({"type": "change", "messageId": "c-6", "userId": "h", "timestamp": 1}).to_string(),
            MissingField,
            some("c-6"),
        ),
        (
            "change: oversized",
            change("c-7", &upsert_payload("a", &json!({"id": "a", "type": "todo", "data": {"pad": pad}}))),
            Oversized,
            some("c-7"),
        ),
        (
            "change: data nested 65 deep",
            change("c-8", &upsert_payload("a", &json!({"id": "a", "type": "todo", "data": nested(65)}))),
            InvalidEntity,
            some("c-8"),
        ),
        (
            "change: a 600-byte entity id",
            change("c-9", &upsert_payload(&long, &entity(&long))),
            InvalidEntity,
            some("c-9"),
        ),
        (
            "change: a 600-byte message id",
            change(&long, &upsert_payload("a", &entity("a"))),
            InvalidMessage,
            Some(long.clone()),
        ),
        (
            "change: a clock of 300 replicas",
            change("c-11", &json!({"operation": "upsert", "entityType": "todo", "entityId": "a",
                                   "entity": entity("a"), "vector": clock})),
            InvalidEntity,
            some("c-11"),
        ),
        (
            "change: an unknown field in the entity",
            change("c-12", &upsert_payload("a", &json!({"id": "a", "type": "todo", "data": {},
                                                         "title": "lost"}))),
            InvalidEntity,
            some("c-12"),
        ),
        (
            "change: data that is not an object",
            change("c-13", &upsert_payload("a", &json!({"id": "a", "type": "todo", "data": [1]}))),
            InvalidEntity,
            some("c-13"),
        ),
        ("change: JSON nested 200 deep", deep_json, MalformedJson, None),
        (
            "change: an upsert without its entity",
            change("c-15", &json!({"operation": "upsert", "entityType": "todo", "entityId": "a"})),
            InvalidEntity,
            some("c-15"),
        ),
        (
            "change: the entity names another id",
            change("c-16", &upsert_payload("a", &entity("b"))),
            InvalidEntity,
            some("c-16"),
        ),
        // heartbeat
        ("heartbeat: malformed", r#"{"type":"heartbeat""#.into(), MalformedJson, None),
        (
            "heartbeat: timestamp is a string",
            json!({"type": "heartbeat", "messageId": "hb-2", "userId": "h", "timestamp": "x"}).to_string(),
            InvalidMessage,
            some("hb-2"),
        ),
        (
            "heartbeat: messageId missing",
            json!({"type": "heartbeat", "userId": "h", "timestamp": 1}).to_string(),
            MissingField,
            None,
        ),
        (
            "heartbeat: oversized",
            json!({"type": "heartbeat", "messageId": "hb-4", "userId": "h", "timestamp": 1,
                   "pad": pad}).to_string(),
            Oversized,
            some("hb-4"),
        ),
        // Other types, and frames that are not messages.
        (
            "ack from a client",
            json!({"type": "ack", "messageId": "x-1", "userId": "h", "timestamp": 1, "payload": {}}).to_string(),
            UnknownType,
            some("x-1"),
        ),
        (
            "an unknown type",
            json!({"type": "presence", "messageId": "x-2", "userId": "h", "timestamp": 1}).to_string(),
            UnknownType,
            some("x-2"),
        ),
        ("type is a number", json!({"type": 7, "messageId": "x-3"}).to_string(), InvalidMessage, None),
        ("an array", "[1, 2]".into(), InvalidMessage, None),
        ("a string", "\"hello\"".into(), InvalidMessage, None),
        ("null", "null".into(), InvalidMessage, None),
        ("an empty frame", String::new(), MalformedJson, None),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_type_malformed_wrong_typed_missing_oversized_or_over_limit() {
    let mut scene = Scene::new(config(memory_db().await).max_frame_bytes(LIMIT)).await;
    let mut bad = scene.hostile().await;
    bad.join("r", "h").await;
    for (case, frame, code, refers_to) in bad_frames() {
        bad.send(frame).await;
        assert_eq!(
            next_error(&mut bad, case).await,
            (code, refers_to),
            "{case}"
        );
        still_open(&mut bad, case).await;
        scene.check(case).await;
    }
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_before_the_hello_and_hellos_that_close_the_connection() {
    let mut scene = Scene::new(config(memory_db().await).max_frame_bytes(LIMIT)).await;
    // Before the hello: a change is not_joined (named), a heartbeat is answered, an
    // unknown type is unknown_type; none of them joins anything.
    let mut early = scene.hostile().await;
    early
        .send_json(change_frame("e-1", "h", "a", json!({}), 1))
        .await;
    assert_eq!(
        next_error(&mut early, "change before hello").await,
        (ErrorCode::NotJoined, Some("e-1".into()))
    );
    still_open(&mut early, "heartbeat before hello").await;
    early
        .send_json(json!({"type": "ack", "messageId": "e-2", "userId": "h", "timestamp": 1}))
        .await;
    assert_eq!(
        next_error(&mut early, "unknown type before hello").await,
        (ErrorCode::UnknownType, Some("e-2".into()))
    );
    scene.check("frames before hello").await;
    // A hello is still accepted after all of that.
    early.join("r", "h").await;
    scene.check("joined after bad frames").await;

    // Hellos refused for good are answered, then closed with 1008.
    let expired = encode_claims(
        SECRET,
        &Claims {
            sub: "h".into(),
            rooms: vec!["r".into()],
            exp: jsonwebtoken::get_current_timestamp() - 10,
        },
    )
    .expect("token");
    let forged = kalphite_server::issue_token(
        b"another-secret-that-is-long-enough-too",
        "h",
        &["*"],
        Duration::from_mins(1),
    )
    .expect("token");
    let claims =
        json!({"sub": "h", "rooms": ["*"], "exp": jsonwebtoken::get_current_timestamp() + 60});
    let alg_none = format!(
        "{}.{}.",
        base64url(br#"{"alg":"none","typ":"JWT"}"#),
        base64url(claims.to_string().as_bytes())
    );
    let empty_key = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b""),
    )
    .expect("sign");
    let payload = |token: Option<&str>, version: u32| {
        let mut p = json!({"protocolVersion": version, "roomId": "r", "replicaId": "mallory"});
        if let Some(t) = token {
            p["token"] = json!(t);
        }
        p
    };
    let own = token("h", &["r"]);
    let too_long = "r".repeat(600);
    let cases: Vec<(&str, Value, ErrorCode, &str)> = vec![
        (
            "no token",
            payload(None, 1),
            ErrorCode::Unauthorized,
            "unauthorized",
        ),
        (
            "a forged token",
            payload(Some(&forged), 1),
            ErrorCode::Unauthorized,
            "unauthorized",
        ),
        (
            "an expired token",
            payload(Some(&expired), 1),
            ErrorCode::TokenExpired,
            "unauthorized",
        ),
        (
            "a token for another room",
            payload(Some(&token("h", &["other"])), 1),
            ErrorCode::Forbidden,
            "unauthorized",
        ),
        (
            "an alg: none token",
            payload(Some(&alg_none), 1),
            ErrorCode::Unauthorized,
            "unauthorized",
        ),
        (
            "an empty-key token",
            payload(Some(&empty_key), 1),
            ErrorCode::Unauthorized,
            "unauthorized",
        ),
        (
            "garbage for a token",
            payload(Some("a.b.c"), 1),
            ErrorCode::Unauthorized,
            "unauthorized",
        ),
        (
            "protocol version 2",
            payload(Some(&own), 2),
            ErrorCode::UnsupportedVersion,
            "hello refused",
        ),
        (
            "a 600-byte replica id",
            json!({"protocolVersion": 1, "roomId": "r", "replicaId": too_long, "token": own}),
            ErrorCode::InvalidMessage,
            "hello refused",
        ),
    ];
    for (case, payload, code, reason) in cases {
        let mut raw = scene.hostile().await;
        raw.send(hello("m-1", &payload)).await;
        assert_eq!(
            next_error(&mut raw, case).await,
            (code, Some("m-1".into())),
            "{case}"
        );
        assert_eq!(
            close_of(&mut raw, case).await,
            (1008, reason.to_owned()),
            "{case}"
        );
        scene.check(case).await;
    }
    scene.stop().await;
}

/// Base64url without padding (for hand-made tokens).
fn base64url(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(char::from(ABC[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// A raw frame: text or continuation, final or not.
fn fragment(bytes: &[u8], first: bool, last: bool) -> Message {
    let op = if first { Data::Text } else { Data::Continue };
    Message::Frame(Frame::message(bytes.to_vec(), OpCode::Data(op), last))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_fragments_invalid_utf8_and_frames_over_the_hard_limit() {
    let mut scene = Scene::new(config(memory_db().await).max_frame_bytes(LIMIT)).await;
    let mut bad = scene.hostile().await;
    bad.join("r", "h").await;

    // A binary frame is refused; the connection stays.
    bad.ws
        .send(Message::Binary(vec![0xff, 0, 1].into()))
        .await
        .expect("send");
    assert_eq!(
        next_error(&mut bad, "binary").await,
        (ErrorCode::InvalidMessage, None)
    );
    still_open(&mut bad, "binary").await;
    scene.check("binary").await;

    // A message in fragments is one message.
    let frame = change_frame("h-frag", "h", "frag", json!({"n": 1}), 1).to_string();
    let (a, rest) = frame.as_bytes().split_at(10);
    let (b, c) = rest.split_at(20);
    for (i, part) in [a, b, c].into_iter().enumerate() {
        bad.ws
            .send(fragment(part, i == 0, i == 2))
            .await
            .expect("send fragment");
    }
    bad.recv_until(|m| {
        matches!(m, ServerMessage::Ack(a) if a.payload.ack_of == "h-frag").then_some(())
    })
    .await;
    // (That change was honest: the watcher gets it, then the next one.)
    scene
        .watcher
        .recv_until(|m| matches!(m, ServerMessage::Change(_)).then_some(()))
        .await;
    scene.check("fragments").await;

    // Each of these ends its connection with an error and the close code that says why.
    let utf8 = b"{\"type\":\"heartbeat\",\"messageId\":\"\xff\xfe\"}".to_vec();
    let big = format!(r#"{{"type":"heartbeat","pad":"{}"}}"#, "x".repeat(5 << 20));
    let cases: Vec<(&str, Vec<Message>, Option<ErrorCode>, u16)> = vec![
        (
            "invalid UTF-8",
            vec![fragment(&utf8, true, true)],
            Some(ErrorCode::InvalidMessage),
            1007,
        ),
        (
            "invalid UTF-8 split across fragments",
            vec![
                fragment(&utf8[..30], true, false),
                fragment(&utf8[30..], false, true),
            ],
            Some(ErrorCode::InvalidMessage),
            1007,
        ),
        (
            "a continuation without a start",
            vec![fragment(b"{}", false, true)],
            Some(ErrorCode::InvalidMessage),
            1002,
        ),
        (
            "a frame over the hard limit",
            vec![Message::Text(big.clone().into())],
            Some(ErrorCode::Oversized),
            1009,
        ),
        (
            "fragments over the hard limit in total",
            (0..20)
                .map(|i| fragment(&[b'x'; 4000], i == 0, i == 19))
                .collect(),
            Some(ErrorCode::Oversized),
            1009,
        ),
    ];
    for (case, frames, code, close) in cases {
        let mut raw = scene.hostile().await;
        raw.join("r", "h").await;
        for frame in frames {
            // The server may close before it has read everything.
            if raw.ws.send(frame).await.is_err() {
                break;
            }
        }
        if let Some(code) = code {
            assert_eq!(next_error(&mut raw, case).await.0, code, "{case}");
        }
        assert_eq!(close_of(&mut raw, case).await.0, close, "{case}");
        scene.check(case).await;
    }
    // Before the hello too.
    let mut raw = scene.hostile().await;
    raw.ws.send(Message::Text(big.into())).await.expect("send");
    assert_eq!(
        close_of(&mut raw, "over the limit before hello").await.0,
        1009
    );
    scene.check("over the limit before hello").await;
    scene.stop().await;
}

/// Builds the `i`-th frame of a flood.
type MakeFrame = Box<dyn Fn(usize) -> Message>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_and_binary_frames_count_against_the_rate_limit_and_refusals_name_the_message() {
    // Bug (issue 10, item 9): pings and binary frames were not rate limited, and
    // rate_limited had no refersTo.
    let mut scene = Scene::new(config(memory_db().await).rate_limit(1, 3)).await;
    let floods: Vec<(&str, MakeFrame)> = vec![
        ("pings", Box::new(|_| Message::Ping(vec![1u8].into()))),
        (
            "binary frames",
            Box::new(|_| Message::Binary(vec![1u8].into())),
        ),
        (
            "heartbeats",
            Box::new(|i| {
                Message::Text(
                    json!({"type": "heartbeat", "messageId": format!("hb-{i}"), "userId": "h",
                           "timestamp": 1})
                    .to_string()
                    .into(),
                )
            }),
        ),
    ];
    for (case, make) in floods {
        let mut raw = scene.hostile().await;
        raw.join("r", "h").await; // one of the three tokens
        for i in 0..10 {
            raw.ws.send(make(i)).await.expect("send");
        }
        let mut limited = Vec::new();
        while limited.len() < 6 {
            let (code, refers_to) = next_error(&mut raw, case).await;
            if code == ErrorCode::RateLimited {
                limited.push(refers_to);
            }
        }
        if case == "heartbeats" {
            for refers_to in &limited {
                let id = refers_to
                    .as_deref()
                    .expect("rate_limited names the message");
                assert!(id.starts_with("hb-"), "{case}: {id}");
            }
        } else {
            assert!(limited.iter().all(Option::is_none), "{case}: {limited:?}");
        }
        scene.check(case).await;
    }
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_expires_after_the_hello_ends_the_connection() {
    // Bug (issue 10, item 9): the token's exp was checked only at the hello; a connection
    // lived on, and wrote, for as long as it liked after its token expired.
    let mut scene = Scene::new(config(memory_db().await)).await;
    let exp = jsonwebtoken::get_current_timestamp() + 2;
    let short = encode_claims(
        SECRET,
        &Claims {
            sub: "h".into(),
            rooms: vec!["r".into()],
            exp,
        },
    )
    .expect("token");
    let mut raw = scene.hostile().await;
    raw.hello("r", "h", Some(&short)).await;
    raw.recv_until(|m| matches!(m, ServerMessage::Welcome(_)).then_some(()))
        .await;
    let (code, _) = scene.alive_during(next_error(&mut raw, "expiry")).await;
    assert_eq!(code, ErrorCode::TokenExpired);
    assert!(
        jsonwebtoken::get_current_timestamp() >= exp,
        "not before the expiry"
    );
    assert_eq!(
        close_of(&mut raw, "expiry").await,
        (1008, "token expired".to_owned())
    );
    scene.check("expired token").await;
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_and_never_upgraded_connections_are_closed() {
    let config = config(memory_db().await)
        .idle_timeout(Duration::from_secs(2))
        .handshake_timeout(Duration::from_secs(1));
    let mut scene = Scene::new(config).await;
    let addr = scene.server.addr;
    assert_eq!(connections(addr).await, 2);

    // A member that goes silent without closing (its peer vanished): the idle timer ends it.
    let mut silent = scene.hostile().await;
    silent.join("r", "h").await;
    let (code, reason) = scene.alive_during(close_of(&mut silent, "silent")).await;
    assert_eq!((code, reason.as_str()), (1008, "idle timeout"));
    scene.check("silent member").await;

    // A client that shuts its sending side after the upgrade: the connection ends.
    let mut half = scene.hostile().await;
    half.join("r", "h").await;
    assert_eq!(connections(addr).await, 3);
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = half.ws.get_mut() else {
        panic!("plain TCP expected");
    };
    tcp.shutdown().await.expect("shutdown");
    // The server ends the connection: the socket reaches its end (no close handshake was
    // started by the client, so none is owed to it).
    let mut rest = Vec::new();
    let _ = guard(tcp.read_to_end(&mut rest)).await;
    let deadline = tokio::time::Instant::now() + GUARD;
    while connections(addr).await != 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "hang guard: half-closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    scene.check("half-closed").await;

    // A request cut off in its headers: closed after the header timeout.
    let mut cut = guard(TcpStream::connect(scene.server.addr))
        .await
        .expect("tcp");
    cut.write_all(b"GET /sync HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let read = scene.alive_during(guard(cut.read_to_end(&mut buf))).await;
    assert!(
        read.is_err() || buf.is_empty(),
        "no response to half a request"
    );
    scene.check("cut-off request").await;

    // A plain GET of the sync route, never upgraded: an HTTP error, nothing else.
    let (status, _) = http_get(scene.server.addr, "/sync").await;
    assert!((400..500).contains(&status), "status {status}");
    scene.check("never upgraded").await;
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_never_sends_a_frame_over_what_clients_accept() {
    // Server frames may be larger than client frames (a catch-up page, a conflict notice);
    // one over the largest a client accepts is not sent: its recipient gets `internal` and
    // close 1011, and nobody else notices.
    let mut scene = Scene::new(
        config(memory_db().await)
            .max_frame_bytes(LIMIT)
            .max_server_frame_bytes(6_000),
    )
    .await;
    for i in 0..3 {
        let id = format!("big-{i}");
        scene
            .writer
            .send_json(change_frame(
                &format!("writer-big-{i}"),
                "writer",
                &id,
                json!({"text": "y".repeat(2_500)}),
                100 + i,
            ))
            .await;
        scene
            .writer
            .recv_until(|m| matches!(m, ServerMessage::Ack(_)).then_some(()))
            .await;
        scene
            .watcher
            .recv_until(|m| matches!(m, ServerMessage::Change(_)).then_some(()))
            .await;
    }
    // A newcomer's catch-up page holds all three: about 8 KB.
    let mut newcomer = scene.hostile().await;
    newcomer.hello("r", "h", Some(&token("h", &["r"]))).await;
    assert_eq!(
        next_error(&mut newcomer, "catch-up over the limit").await.0,
        ErrorCode::Internal
    );
    assert_eq!(
        close_of(&mut newcomer, "catch-up over the limit").await.0,
        1011
    );
    scene.check("catch-up over the limit").await;
    scene.stop().await;
}
