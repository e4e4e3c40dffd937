//! Regression (issue 10, item 9): a client joining a busy room got `change` frames before
//! its `welcome` (15 of 150 joins): membership was checked when the log writer delivered
//! frames, so a change committed before the join, still queued in the log, reached the
//! newcomer ahead of its welcome — whose catch-up already holds it. A newcomer now
//! becomes a member when its own welcome is delivered.

mod common;

use common::*;
use kalphite_sync::ServerMessage;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_welcome_is_always_the_first_frame_even_in_a_busy_room() {
    let server = start(config(memory_db().await)).await;
    let url = server.url();
    let writer = tokio::spawn({
        let url = url.clone();
        async move {
            let mut w = Raw::connect(&url).await;
            w.join("busy", "writer").await;
            for i in 0..3000u64 {
                w.send_json(change_frame(
                    &format!("raw-writer-{i}"),
                    "writer",
                    &format!("t{}", i % 50),
                    json!({"n": i}),
                    i + 1,
                ))
                .await;
            }
            w
        }
    });
    for j in 0..60 {
        let mut joiner = Raw::connect(&url).await;
        let user = format!("joiner{j}");
        joiner
            .hello("busy", &user, Some(&token(&user, &["busy"])))
            .await;
        let first = joiner.recv().await.expect("a first frame");
        assert!(
            matches!(first, ServerMessage::Welcome(_)),
            "join {j}: the first frame was {first:?}"
        );
    }
    let _writer = guard(writer).await.expect("writer");
    server.stop().await;
}
