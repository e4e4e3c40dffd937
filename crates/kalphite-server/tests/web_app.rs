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

#[tokio::test]
async fn the_service_worker_is_served_as_javascript_next_to_the_page() {
    let server = start(config(memory_db().await)).await;
    let (head, body) = http_get_with_head(server.addr, "/sw.js").await;
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
