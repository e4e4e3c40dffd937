//! Issue 10, item 2: "a client that stops reading takes the server down". Writes to a
//! connection had no timeout and were awaited inside the connection's `select!`, so a
//! client that joined and stopped reading was never disconnected (neither the idle timer
//! nor shutdown was seen while its write was stuck), pinned every frame queued for it
//! (16,384 frames of any size), and made a graceful shutdown hang. Each test below runs a
//! real server and a raw client whose socket has a tiny receive buffer and which never
//! reads, so the server's writes to it stall for real; memory is checked on the server's
//! own gauges, never by timing.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use kalphite_sync::ServerMessage;
use serde_json::json;
use tokio::net::TcpSocket;
use tokio_tungstenite::MaybeTlsStream;

/// A raw client whose receive buffer is a few KiB: once it stops reading, the server's
/// writes to it stall after the kernel buffers fill.
async fn connect_unread(addr: SocketAddr) -> Raw {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let tcp = guard(socket.connect(addr)).await.expect("connect");
    let url = format!("ws://{addr}/sync");
    let (ws, _) = guard(tokio_tungstenite::client_async(
        url,
        MaybeTlsStream::Plain(tcp),
    ))
    .await
    .expect("upgrade");
    Raw { ws }
}

const BLOB: usize = 200 * 1024;

/// `writer` sends `n` changes of about 200 KiB; each is acknowledged to it and broadcast to
/// `third` (both read everything), whatever the unread member does. `unread`, when given,
/// sends a heartbeat with each change (it writes, it just never reads).
async fn write_big_changes(
    writer: &mut Raw,
    third: &mut Raw,
    mut unread: Option<&mut Raw>,
    from: u64,
    n: u64,
) {
    let blob = "x".repeat(BLOB);
    for i in from..from + n {
        let id = format!("w-{i}");
        let entity = format!("t{i}");
        writer
            .send_json(change_frame(
                &id,
                "writer",
                &entity,
                json!({"blob": blob}),
                i,
            ))
            .await;
        writer
            .recv_until(|m| match m {
                ServerMessage::Ack(a) if a.payload.ack_of == id => Some(()),
                ServerMessage::Error(e) => panic!("change refused: {:?}", e.payload),
                _ => None,
            })
            .await;
        third
            .recv_until(|m| match m {
                ServerMessage::Change(c) if c.payload.entity_id.as_str() == entity => Some(()),
                _ => None,
            })
            .await;
        // The third member only reads: a heartbeat keeps its idle timer at bay.
        third.send_json(heartbeat("third", i)).await;
        if let Some(unread) = unread.as_deref_mut() {
            unread.send_json(heartbeat("unread", i)).await;
        }
    }
}

fn heartbeat(user: &str, i: u64) -> serde_json::Value {
    json!({"type": "heartbeat", "messageId": format!("{user}-hb-{i}"), "userId": user,
           "timestamp": 1})
}

/// Joins the unread member, then the writer and a third member who both read.
async fn room_with_an_unread_member(server: &Server) -> (Raw, Raw, Raw) {
    let mut unread = connect_unread(server.addr).await;
    unread.join("r", "unread").await;
    let mut writer = Raw::connect(&server.url()).await;
    writer.join("r", "writer").await;
    let mut third = Raw::connect(&server.url()).await;
    third.join("r", "third").await;
    (unread, writer, third)
}

/// Reads what the unread member was sent until its connection ends (hang guard).
async fn drain_until_closed(raw: &mut Raw) {
    use futures_util::StreamExt;
    while let Some(Ok(_)) = guard(raw.ws.next()).await {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_and_its_queue_stays_bounded() {
    // Bug: the queue was bounded only in frames (16,384), so a member that stopped reading
    // pinned every broadcast (gigabytes with large entities) and was never disconnected.
    const BOUND: usize = 1 << 20;
    let server = start(config(memory_db().await).outbound_queue_bytes(BOUND)).await;
    let (mut unread, mut writer, mut third) = room_with_an_unread_member(&server).await;

    // 12 MiB of broadcasts: more than the kernel buffers and the 1 MiB bound together.
    write_big_changes(&mut writer, &mut third, None, 1, 60).await;

    assert!(metric(&server, "kalphite_sync_slow_consumers_total").await >= 1);
    wait_metric(&server, "kalphite_sync_connections", |n| n == 2).await;
    // The unread member's queue never held more than the bound and one frame, and was
    // freed when it was dropped.
    let peak = metric(&server, "kalphite_sync_outbound_peak_bytes").await;
    assert!(
        peak <= (BOUND + 2 * BLOB) as u64,
        "one connection's queue reached {peak} bytes (bound {BOUND})"
    );
    wait_metric(&server, "kalphite_sync_outbound_bytes", |b| b == 0).await;
    // The others are unaffected.
    write_big_changes(&mut writer, &mut third, None, 61, 2).await;
    drain_until_closed(&mut unread).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_write_ends_the_connection_after_the_write_timeout() {
    // Bug: a write that never completed was awaited forever.
    let server = start(
        config(memory_db().await)
            .outbound_queue_bytes(256 << 20)
            .write_timeout(Duration::from_millis(500)),
    )
    .await;
    let (mut unread, mut writer, mut third) = room_with_an_unread_member(&server).await;
    write_big_changes(&mut writer, &mut third, None, 1, 40).await;

    wait_metric(&server, "kalphite_sync_write_timeouts_total", |n| n >= 1).await;
    wait_metric(&server, "kalphite_sync_connections", |n| n == 2).await;
    wait_metric(&server, "kalphite_sync_outbound_bytes", |b| b == 0).await;
    write_big_changes(&mut writer, &mut third, None, 41, 2).await;
    drain_until_closed(&mut unread).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timer_fires_while_a_write_is_stalled() {
    // Bug: the idle timer sat in the same `select!` as the stuck write, so it never fired.
    let server = start(
        config(memory_db().await)
            .outbound_queue_bytes(256 << 20)
            .write_timeout(Duration::from_mins(10))
            .idle_timeout(Duration::from_secs(2)),
    )
    .await;
    let (mut unread, mut writer, mut third) = room_with_an_unread_member(&server).await;
    // The unread member sends heartbeats while the others write, so its idle timer starts
    // only once its writes are stalled.
    write_big_changes(&mut writer, &mut third, Some(&mut unread), 1, 40).await;
    // It is still there, its writes stalled (frames wait for it).
    assert_eq!(metric(&server, "kalphite_sync_connections").await, 3);
    assert!(metric(&server, "kalphite_sync_outbound_bytes").await > 0);

    // The writer and the third member stay alive with heartbeats; the unread member sends
    // nothing, so only its idle timer can end it.
    let deadline = tokio::time::Instant::now() + GUARD;
    while metric(&server, "kalphite_sync_connections").await > 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "hang guard: never idled out"
        );
        for (raw, user) in [(&mut writer, "writer"), (&mut third, "third")] {
            raw.send_json(heartbeat(user, 0)).await;
            raw.recv_until(|m| matches!(m, ServerMessage::Heartbeat(_)).then_some(()))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        metric(&server, "kalphite_sync_write_timeouts_total").await,
        0
    );
    assert_eq!(
        metric(&server, "kalphite_sync_slow_consumers_total").await,
        0
    );
    wait_metric(&server, "kalphite_sync_outbound_bytes", |b| b == 0).await;
    drain_until_closed(&mut unread).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_completes_while_a_reader_is_stalled() {
    // Bug: SIGTERM hung: the connection task was stuck in its write and never saw the
    // shutdown; a socket that sent half a request also kept the server waiting.
    use tokio::io::AsyncWriteExt;
    let server = start(
        config(memory_db().await)
            .outbound_queue_bytes(256 << 20)
            .write_timeout(Duration::from_mins(10))
            .handshake_timeout(Duration::from_mins(10))
            .shutdown_grace(Duration::from_secs(2)),
    )
    .await;
    let (_unread, mut writer, mut third) = room_with_an_unread_member(&server).await;
    write_big_changes(&mut writer, &mut third, None, 1, 40).await;
    // Frames are still waiting for the unread member: its write is stalled.
    assert!(metric(&server, "kalphite_sync_outbound_bytes").await > 0);
    let mut half = guard(tokio::net::TcpStream::connect(server.addr))
        .await
        .expect("tcp");
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    // `stop` waits for the server's task under the hang guard.
    server.stop().await;
}
