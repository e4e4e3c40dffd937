//! Issue 11: the server serves the web todo app (`clients/js/app/todo.html`, built by
//! `npm run app` and committed) at `/`, next to `/sync`, so `cargo run -- serve` needs
//! nothing but Rust. The app itself is tested in Chromium by `clients/js`.

mod common;

use common::*;

#[tokio::test]
async fn the_web_app_is_served_at_the_root() {
    let server = start(config(memory_db().await)).await;
    let (status, body) = http_get(server.addr, "/").await;
    assert_eq!(status, 200);
    assert_eq!(body, include_str!("../../../clients/js/app/todo.html"));
    assert!(body.contains("<title>kalphite todo</title>"));
    let (status, _) = http_get(server.addr, "/healthz").await;
    assert_eq!(status, 200, "the other routes stay");
    server.stop().await;
}

/// The status line and headers, and the body, of a GET (`http_get` keeps only the body).
async fn get_with_head(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = guard(tokio::net::TcpStream::connect(addr))
        .await
        .expect("tcp");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    guard(stream.read_to_end(&mut buf)).await.expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    (head.to_owned(), body.to_owned())
}

#[tokio::test]
async fn the_service_worker_is_served_as_javascript_next_to_the_page() {
    let server = start(config(memory_db().await)).await;
    let (head, body) = get_with_head(server.addr, "/sw.js").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // A browser refuses to register a worker served with another type.
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/javascript"),
        "{head}"
    );
    assert_eq!(body, include_str!("../../../clients/js/app/sw.js"));
    assert!(
        body.contains("caches.match"),
        "it falls back to its copy of the page"
    );
    server.stop().await;
}
