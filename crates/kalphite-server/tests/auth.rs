//! Tokens: missing, bad, expired and wrong-room tokens are refused with a clear error and
//! the connection is closed; a valid token joins; open mode admits hellos without one; a
//! refused client stops reconnecting and says why; a server with a short secret does not
//! start.

mod common;

use common::*;
use kalphite_client::ConnectionStatus;
use kalphite_server::{Claims, encode_claims};
use kalphite_sync::{ErrorCode, ServerMessage};

/// Sends a hello with `token` and returns the error code and message the server answered.
async fn refused(url: &str, room: &str, token: Option<&str>) -> (ErrorCode, String) {
    let mut raw = Raw::connect(url).await;
    raw.hello(room, "mallory", token).await;
    let (code, message) = raw
        .recv_until(|m| match m {
            ServerMessage::Error(e) => Some((e.payload.code, e.payload.message.clone())),
            ServerMessage::Welcome(_) => panic!("a bad token was welcomed"),
            _ => None,
        })
        .await;
    assert!(
        raw.recv().await.is_none(),
        "the connection is closed after a refusal"
    );
    (code, message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_a_clear_error() {
    let server = start(config(memory_db().await)).await;
    let url = server.url();

    let (code, msg) = refused(&url, "r", None).await;
    assert_eq!(code, ErrorCode::Unauthorized);
    assert!(msg.contains("requires a token"), "{msg}");

    let (code, msg) = refused(&url, "r", Some("not.a.jwt")).await;
    assert_eq!(code, ErrorCode::Unauthorized);
    assert!(msg.contains("invalid token"), "{msg}");

    let forged = kalphite_server::issue_token(
        b"another-secret-that-is-long-enough-too",
        "mallory",
        &["r"],
        std::time::Duration::from_mins(1),
    )
    .expect("token");
    let (code, msg) = refused(&url, "r", Some(&forged)).await;
    assert_eq!(code, ErrorCode::Unauthorized);
    assert!(msg.contains("invalid token"), "{msg}");

    let expired = encode_claims(
        SECRET,
        &Claims {
            sub: "mallory".into(),
            rooms: vec!["r".into()],
            exp: jsonwebtoken::get_current_timestamp() - 10,
        },
    )
    .expect("token");
    let (code, msg) = refused(&url, "r", Some(&expired)).await;
    assert_eq!(code, ErrorCode::TokenExpired);
    assert!(msg.contains("expired"), "{msg}");

    let other_room = token("mallory", &["other"]);
    let (code, msg) = refused(&url, "r", Some(&other_room)).await;
    assert_eq!(code, ErrorCode::Forbidden);
    assert!(msg.contains("does not allow room 'r'"), "{msg}");

    // A valid token for the room, and a wildcard one, are welcomed.
    let mut ok = Raw::connect(&url).await;
    ok.join("r", "alice").await;
    let mut star = Raw::connect(&url).await;
    star.hello("r", "root", Some(&token("root", &["*"]))).await;
    star.recv_until(|m| matches!(m, ServerMessage::Welcome(_)).then_some(()))
        .await;

    let (_, metrics) = http_get(server.addr, "/metrics").await;
    assert!(
        metrics.contains("kalphite_sync_auth_failures_total 5"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mode_admits_hellos_without_a_token() {
    let server = start(kalphite_server::ServerConfig::new(memory_db().await).open(true)).await;
    let mut raw = Raw::connect(&server.url()).await;
    raw.hello("r", "guest", None).await;
    raw.recv_until(|m| matches!(m, ServerMessage::Welcome(_)).then_some(()))
        .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_stops_and_reports_why() {
    let server = start(config(memory_db().await)).await;
    let db = memory_db().await;
    let cfg = client_config(&server.url(), "r", "alice", "a").auth_token(token("alice", &["x"]));
    let (store, client) = client(&db, cfg).await;
    let mut status = client.status_watch();
    guard(status.wait_for(|s| *s == ConnectionStatus::Disconnected))
        .await
        .expect("watch");
    let message = client.last_error().expect("an error was reported");
    assert!(message.contains("does not allow room"), "{message}");
    // It does not retry: still disconnected after a later event round-trip.
    assert_eq!(client.connection_status(), ConnectionStatus::Disconnected);
    // Local writes still work and queue for a later session.
    store
        .dynamic("todo")
        .put("t1", serde_json::json!({}))
        .expect("put");
    assert_eq!(client.offline_queue_size(), 1);
    client.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_a_short_secret_refuses_to_start() {
    // Bug: an empty (or short) secret started a server that welcomed tokens HMAC'd with
    // an empty key, which anyone can make.
    for secret in [&b""[..], b"short", &[7u8; 31]] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let config = kalphite_server::ServerConfig::new(memory_db().await).token_secret(secret);
        assert!(matches!(
            config.validate(),
            Err(kalphite_server::ServerError::WeakSecret(_))
        ));
        let result = guard(kalphite_server::run(listener, config, async {})).await;
        let err = result.expect_err("a short secret must not start a server");
        assert!(
            matches!(err, kalphite_server::ServerError::WeakSecret(ref w) if w.len == secret.len()),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("at least 32 bytes"), "{message}");
        assert!(
            message.contains("openssl rand -hex 32"),
            "says how: {message}"
        );
    }
    let ok = kalphite_server::ServerConfig::new(memory_db().await).token_secret([7u8; 32]);
    ok.validate().expect("32 bytes are enough");
    // Nor can a short secret sign or check tokens.
    assert!(matches!(
        kalphite_server::issue_token(b"", "u", &["r"], std::time::Duration::from_mins(1)),
        Err(kalphite_server::AuthError::WeakSecret(_))
    ));
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &Claims {
            sub: "mallory".into(),
            rooms: vec!["*".into()],
            exp: jsonwebtoken::get_current_timestamp() + 60,
        },
        &jsonwebtoken::EncodingKey::from_secret(b""),
    )
    .expect("forge");
    assert!(kalphite_server::verify_token(b"", &forged).is_err());
}
