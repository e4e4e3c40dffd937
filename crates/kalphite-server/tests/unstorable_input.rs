//! Regression (issue 10, item 3): one NUL character reset other people's rooms. PostgreSQL's
//! JSONB refuses `\u0000`; the room accepted the change, the group commit wrote every
//! queued room's records in one transaction, and a failed batch reset each room in it, so
//! a change in room "a" cut room "b"'s client off after 1 of 400 acks (and the author's
//! resend after reconnecting did it again). SQLite stored the character, so a room log
//! could not move to PostgreSQL. Now a NUL in an entity (data, key, id, kind), a message
//! id or a replica id is refused up front, the same on both backends, with a typed error
//! naming the change (`refersTo`); room "b" is acknowledged throughout.
//!
//! The PostgreSQL half runs when `KALPHITE_PG_URL` is set (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`); otherwise it says loudly that it was skipped.

mod common;

use std::io::Write as _;
use std::path::PathBuf;

use common::*;
use kalphite_db::{Database, DatabaseConfig};
use kalphite_sync::{ErrorCode, ServerMessage};
use serde_json::{Value, json};

/// Changes room "b"'s client sends while room "a"'s client sends NUL characters.
const B_CHANGES: u64 = 400;

/// Where the room log lives; opened again for the restart.
enum Log {
    Sqlite(PathBuf),
    Postgres { url: String, schema: String },
}

impl Log {
    async fn open(&self) -> Database {
        let config = match self {
            Log::Sqlite(path) => DatabaseConfig::new(format!("sqlite:{}", path.display())),
            Log::Postgres { url, schema } => DatabaseConfig::new(url).postgres_schema(schema),
        };
        Database::open(config).await.expect("open the room log")
    }
}

/// Sends `B_CHANGES` changes and waits for every ack; panics if the connection is cut
/// off or an error comes back.
async fn send_and_count_acks(mut b: Raw) -> Raw {
    for i in 1..=B_CHANGES {
        let frame = change_frame(
            &format!("raw-bob-1-{i}"),
            "bob",
            &format!("t{i}"),
            json!({"i": i}),
            i,
        );
        b.send_json(frame).await;
    }
    let mut acks = 0;
    while acks < B_CHANGES {
        match b.recv().await {
            Some(ServerMessage::Ack(_)) => acks += 1,
            Some(ServerMessage::Error(e)) => panic!("room b got an error: {:?}", e.payload),
            Some(_) => {}
            None => panic!("room b's client was cut off after {acks} of {B_CHANGES} acks"),
        }
    }
    b
}

/// The entities a new member of `room` catches up with.
async fn caught_up(url: &str, room: &str, user: &str) -> usize {
    let mut raw = Raw::connect(url).await;
    raw.hello(room, user, Some(&token(user, &[room]))).await;
    let mut n = 0;
    loop {
        match raw.recv().await.expect("connected") {
            ServerMessage::CatchUp(c) => {
                n += c.payload.changes.len();
                if c.payload.complete {
                    return n;
                }
            }
            ServerMessage::Error(e) => panic!("join refused: {:?}", e.payload),
            _ => {}
        }
    }
}

async fn nul_in_room_a_leaves_room_b_alone(log: Log) {
    let server = start(config(log.open().await)).await;
    let url = server.url();
    let addr = server.addr;
    let mut a = Raw::connect(&url).await;
    a.join("a", "alice").await;
    let mut b = Raw::connect(&url).await;
    b.join("b", "bob").await;
    let bob = tokio::spawn(send_and_count_acks(b));

    let cases: [(&str, &str, Value, ErrorCode); 5] = [
        (
            "raw-alice-1-1",
            "t1",
            json!({"title": "a\u{0}b"}),
            ErrorCode::InvalidEntity,
        ),
        (
            "raw-alice-1-2",
            "t2",
            json!({"tags": ["x", "\u{0}"]}),
            ErrorCode::InvalidEntity,
        ),
        (
            "raw-alice-1-3",
            "t3",
            json!({"k\u{0}": 1}),
            ErrorCode::InvalidEntity,
        ),
        (
            "raw-alice-1-4",
            "t\u{0}4",
            json!({}),
            ErrorCode::InvalidEntity,
        ),
        (
            "raw-alice-\u{0}-5",
            "t5",
            json!({}),
            ErrorCode::InvalidMessage,
        ),
    ];
    for (n, (message_id, id, data, code)) in cases.into_iter().enumerate() {
        // Resent, as a client does after it reconnects: refused again, the same way.
        for _ in 0..3 {
            a.send_json(change_frame(
                message_id,
                "alice",
                id,
                data.clone(),
                n as u64 + 1,
            ))
            .await;
            let (got, refers_to) = a
                .recv_until(|m| match m {
                    ServerMessage::Error(e) => Some((e.payload.code, e.payload.refers_to.clone())),
                    ServerMessage::Ack(ack) => panic!("case {n} was accepted: {:?}", ack.payload),
                    _ => None,
                })
                .await;
            assert_eq!(got, code, "case {n}");
            assert_eq!(refers_to.as_deref(), Some(message_id), "case {n}");
        }
    }
    // Room a's client is still connected and its next change is stored.
    a.send_json(change_frame(
        "raw-alice-1-9",
        "alice",
        "fine",
        json!({"ok": true}),
        9,
    ))
    .await;
    a.recv_until(|m| matches!(m, ServerMessage::Ack(_)).then_some(()))
        .await;

    // A replica id with a NUL would be in every record its member writes: refused at the
    // hello.
    let mut c = Raw::connect(&url).await;
    c.hello_as("a", "carol", "r\u{0}c", Some(&token("carol", &["a"])))
        .await;
    let code = c
        .recv_until(|m| match m {
            ServerMessage::Error(e) => Some(e.payload.code),
            _ => None,
        })
        .await;
    assert_eq!(code, ErrorCode::InvalidMessage);

    let b = guard(bob).await.expect("room b's client");
    drop(b);
    server.stop().await;

    // Everything acknowledged is in the log, and the log loads.
    let server = start_at(addr, config(log.open().await)).await;
    assert_eq!(caught_up(&url, "b", "dave").await as u64, B_CHANGES);
    assert_eq!(caught_up(&url, "a", "erin").await, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_refuses_nul_up_front_and_room_b_is_acknowledged() {
    let dir = tempfile::tempdir().expect("temp dir");
    nul_in_room_a_leaves_room_b_alone(Log::Sqlite(dir.path().join("rooms.db"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refuses_nul_up_front_and_room_b_is_acknowledged() {
    let Ok(url) = std::env::var("KALPHITE_PG_URL") else {
        // Straight to stderr: the test harness captures `eprintln!`, hiding the skip.
        let _ = writeln!(
            std::io::stderr(),
            "*** SKIPPED postgres_refuses_nul_up_front_and_room_b_is_acknowledged: set \
             KALPHITE_PG_URL (e.g. postgres://postgres@127.0.0.1:5432/test) to run it ***"
        );
        return;
    };
    let schema = format!("nul_test_{:08x}", rand::random::<u32>());
    nul_in_room_a_leaves_room_b_alone(Log::Postgres { url, schema }).await;
}
