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
