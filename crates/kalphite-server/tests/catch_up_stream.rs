//! Issue 10, item 8: "a join builds the whole catch-up in memory under the room lock". A
//! join encoded every page of its catch-up at once and queued them all for the joiner: a
//! room of 2,000 entities of 10 KB put 20 MB in one connection's queue, per join, however
//! slowly the client read. The catch-up is now a snapshot of the room's records, queued as
//! one item, whose pages the connection encodes one at a time when its socket has room.
//! Memory is checked on the server's own gauges (`kalphite_sync_outbound_bytes`, and
//! `kalphite_sync_outbound_peak_bytes`, which counts the page in hand), never by timing;
//! the order contract (welcome, every page, then live changes) is checked on the wire.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use kalphite_sync::{CatchUpPayload, ServerMessage};
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio_tungstenite::MaybeTlsStream;

/// The server's default catch-up page size in bytes (`RoomLimits::catch_up_page_bytes`).
const PAGE: u64 = 256 * 1024;

/// A raw client whose receive buffer is a few KiB: the server's writes to it wait for it
/// to read.
async fn connect_small_buffer(addr: SocketAddr) -> Raw {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let tcp = guard(socket.connect(addr)).await.expect("connect");
    let (ws, _) = guard(tokio_tungstenite::client_async(
        format!("ws://{addr}/sync"),
        MaybeTlsStream::Plain(tcp),
    ))
    .await
    .expect("upgrade");
    Raw { ws }
}

/// `writer` (joined) upserts `n` entities `t<from>..` with `bytes` of data each, `batch`
/// at a time, reading the acks of each batch before the next (so its own queue stays
/// small). Returns the room version of the last ack.
async fn fill(writer: &mut Raw, from: u64, n: u64, bytes: usize, batch: u64) -> u64 {
    let blob = "x".repeat(bytes);
    let mut version = 0;
    let mut i = from;
    while i < from + n {
        let end = (i + batch).min(from + n);
        for j in i..end {
            let frame = change_frame(
                &format!("fill-{j}"),
                "writer",
                &format!("t{j}"),
                json!({"n": j, "blob": blob}),
                j + 1,
            );
            writer.send_json(frame).await;
        }
        for _ in i..end {
            version = writer
                .recv_until(|m| match m {
                    ServerMessage::Ack(a) => Some(a.payload.version),
                    ServerMessage::Error(e) => panic!("change refused: {:?}", e.payload),
                    _ => None,
                })
                .await;
        }
        i = end;
    }
    version
}

/// Reads a join's answer: the welcome's room version, then its catch-up pages (asserting
/// they are contiguous from 0, and come before anything else). `between` runs after each
/// page.
async fn read_catch_up(
    raw: &mut Raw,
    mut between: impl AsyncFnMut(&CatchUpPayload),
) -> (u64, Vec<CatchUpPayload>) {
    let first = raw.recv().await.expect("a first frame");
    let ServerMessage::Welcome(welcome) = first else {
        panic!("the first frame is not the welcome: {first:?}")
    };
    assert_eq!(welcome.payload.catch_up_from, 0);
    let version = welcome.payload.room_version;
    let mut pages: Vec<CatchUpPayload> = Vec::new();
    loop {
        let frame = raw.recv().await.expect("a catch-up page");
        let ServerMessage::CatchUp(page) = frame else {
            panic!("a frame before the last catch-up page: {frame:?}")
        };
        let page = page.payload;
        let from = pages.last().map_or(0, |p| p.to_version);
        assert_eq!(page.from_version, from, "pages are contiguous");
        between(&page).await;
        let complete = page.complete;
        pages.push(page);
        if complete {
            assert_eq!(pages.last().map(|p| p.to_version), Some(version));
            return (version, pages);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_holds_one_encoded_page_of_its_catch_up_at_a_time() {
    const ENTITIES: u64 = 2_000;
    const BYTES: usize = 10 * 1024;
    let server = start(config(memory_db().await).rate_limit(100_000, 100_000)).await;
    let mut writer = Raw::connect(&server.url()).await;
    writer.join("big", "writer").await;
    let version = fill(&mut writer, 0, ENTITIES, BYTES, 10).await;
    let before = metric(&server, "kalphite_sync_outbound_peak_bytes").await;

    let mut reader = connect_small_buffer(server.addr).await;
    reader
        .hello("big", "reader", Some(&token("reader", &["big"])))
        .await;
    let mut queued_max = 0;
    let (welcomed, pages) = read_catch_up(&mut reader, async |_| {
        // A slow reader: the server's writes wait for it between pages.
        tokio::time::sleep(Duration::from_millis(5)).await;
        queued_max = queued_max.max(metric(&server, "kalphite_sync_outbound_bytes").await);
    })
    .await;
    let peak = metric(&server, "kalphite_sync_outbound_peak_bytes").await;

    assert_eq!(welcomed, version);
    let entities: usize = pages.iter().map(|p| p.changes.len()).sum();
    assert_eq!(entities as u64, ENTITIES, "every entity in the catch-up");
    let total = ENTITIES * BYTES as u64;
    assert!(
        pages.len() > 20,
        "a catch-up of {total} bytes takes many pages ({})",
        pages.len()
    );
    assert!(
        peak <= before.max(2 * PAGE),
        "the joiner held {peak} bytes at once (before the join: {before}; a page: {PAGE}; \
         the whole catch-up: {total})"
    );
    assert!(
        queued_max <= 2 * PAGE,
        "{queued_max} bytes queued while the joiner read slowly"
    );
    server.stop().await;
}

/// One entity's state as a client holds it: (room version, data).
type Model = BTreeMap<String, (u64, Value)>;

fn apply(model: &mut Model, change: &kalphite_sync::ChangePayload) {
    let version = change.room_version.expect("a room version");
    let data = change
        .entity
        .as_ref()
        .map_or(Value::Null, |e| e.data.clone());
    let slot = model
        .entry(change.entity_id.to_string())
        .or_insert((0, Value::Null));
    if version > slot.0 {
        *slot = (version, data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joiners_during_writes_get_welcome_pages_then_live_changes_and_converge() {
    const JOINERS: usize = 6;
    let server = start(config(memory_db().await).rate_limit(100_000, 100_000)).await;
    let url = server.url();
    let mut seed = Raw::connect(&url).await;
    seed.join("busy", "writer").await;
    // About 2 KB each: a catch-up of several pages.
    fill(&mut seed, 0, 600, 2_000, 50).await;
    drop(seed);

    let stop = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn({
        let (url, stop) = (url.clone(), Arc::clone(&stop));
        async move {
            let mut w = Raw::connect(&url).await;
            w.join("busy", "writer").await;
            let mut version = 0;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) || i < 200 {
                // Edits of entities in the catch-up, and new entities.
                let id = format!("t{}", (i * 7) % 700);
                let frame = change_frame(
                    &format!("live-{i}"),
                    "writer",
                    &id,
                    json!({"live": i}),
                    10_000 + i,
                );
                w.send_json(frame).await;
                version = w
                    .recv_until(|m| match m {
                        ServerMessage::Ack(a) => Some(a.payload.version),
                        _ => None,
                    })
                    .await;
                i += 1;
            }
            version
        }
    });

    let mut joiners = Vec::new();
    for j in 0..JOINERS {
        let mut raw = Raw::connect(&url).await;
        let user = format!("joiner{j}");
        raw.hello("busy", &user, Some(&token(&user, &["busy"])))
            .await;
        let (welcomed, pages) = read_catch_up(&mut raw, async |_| {}).await;
        let mut model = Model::new();
        for change in pages.iter().flat_map(|p| &p.changes) {
            apply(&mut model, change);
        }
        assert!(pages.len() > 1, "joiner {j}: a catch-up of one page");
        joiners.push((raw, welcomed, model));
    }
    stop.store(true, Ordering::Relaxed);
    let last = guard(writing).await.expect("writer");
    let welcomed: std::collections::BTreeSet<u64> = joiners.iter().map(|(_, w, _)| *w).collect();
    assert!(
        welcomed.len() > 1 && welcomed.first() < Some(&last),
        "the joins happened while the room was written to (welcomed at {welcomed:?}, last {last})"
    );

    for (j, (raw, welcomed, model)) in joiners.iter_mut().enumerate() {
        // After its catch-up, a joiner gets every later version, in order, as live changes.
        let mut next = *welcomed + 1;
        while next <= last {
            let frame = raw.recv().await.expect("a live change");
            let ServerMessage::Change(change) = frame else {
                panic!("joiner {j}: a {frame:?} after the catch-up")
            };
            assert_eq!(
                change.payload.room_version,
                Some(next),
                "joiner {j}: in order"
            );
            apply(model, &change.payload);
            next += 1;
        }
    }
    // A late joiner's catch-up is the room's state: everyone converged to it.
    let mut late = Raw::connect(&url).await;
    late.hello("busy", "late", Some(&token("late", &["busy"])))
        .await;
    let (version, pages) = read_catch_up(&mut late, async |_| {}).await;
    assert_eq!(version, last);
    let mut room = Model::new();
    for change in pages.iter().flat_map(|p| &p.changes) {
        apply(&mut room, change);
    }
    for (j, (_, _, model)) in joiners.iter().enumerate() {
        assert!(*model == room, "joiner {j} did not converge");
    }
    server.stop().await;
}
