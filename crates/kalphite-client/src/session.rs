//! The connection loop: open a WebSocket, say hello, shuttle frames between the socket and
//! the replica (applying remote changes to the store), tick for resends and heartbeats,
//! notice a dead server, and reconnect with exponential backoff and jitter.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use kalphite::{Change, Error as StoreError, Op, Origin, now_millis};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use super::{ConnectionStatus, Inner, SyncEvent};
use kalphite_sync::{ClientMessage, ErrorCode, ReplicaEvent, ServerMessage, decode_server, encode};

/// Largest server frame the client reads: what the protocol says servers may send.
const MAX_SERVER_FRAME: usize = kalphite_sync::MAX_SERVER_FRAME_BYTES;

/// The delay before reconnect attempt `attempt` (1-based): `base·2^(attempt-1)` capped at
/// `max`, then a uniformly random point of its upper half (`jitter` in `[0, 1)`), so
/// clients cut off together do not reconnect together.
#[must_use]
pub fn backoff(attempt: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max);
    let jitter = jitter.clamp(0.0, 1.0);
    exp.mul_f64(0.5 + 0.5 * jitter)
}

/// How a session ended.
enum End {
    /// The client was told to stop.
    Cancelled,
    /// The server refused us for good (auth, version): do not retry.
    Refused(String),
    /// The connection failed or was lost.
    Lost { welcomed: bool, reason: String },
}

/// Connects and reconnects until cancelled, refused, or out of attempts.
pub(crate) async fn run(inner: Arc<Inner>, cancel: CancellationToken) {
    let mut failures = 0u32;
    // Several servers (cluster nodes): each lost connection moves on to the next one, so a
    // client of a node that died reaches the node that takes its room over.
    let urls: Vec<String> = inner.config.ws_url.split(',').map(str::to_owned).collect();
    let mut at = 0usize;
    loop {
        inner.set_status(ConnectionStatus::Connecting);
        let end = session(&inner, &urls[at % urls.len()], &cancel).await;
        at = at.wrapping_add(1);
        {
            inner.replica.lock().disconnected();
            *inner.outgoing.lock() = None;
        }
        inner.caught_up.send_replace(false);
        inner.set_status(ConnectionStatus::Disconnected);
        inner.persist_bookkeeping();
        let reason = match end {
            End::Cancelled => {
                inner.emit(SyncEvent::Disconnected {
                    reason: "disconnected by the app".into(),
                });
                return;
            }
            End::Refused(reason) => {
                inner.emit(SyncEvent::Disconnected { reason });
                return;
            }
            End::Lost { welcomed, reason } => {
                if welcomed {
                    failures = 0;
                }
                reason
            }
        };
        inner.emit(SyncEvent::Disconnected {
            reason: reason.clone(),
        });
        failures = failures.saturating_add(1);
        let attempts = inner.config.reconnect_attempts;
        if attempts != 0 && failures > attempts {
            inner.emit(SyncEvent::Error {
                code: None,
                message: format!(
                    "gave up after {attempts} reconnect attempts ({reason}); call connect() to retry"
                ),
            });
            return;
        }
        let delay = backoff(
            failures,
            inner.config.backoff_base,
            inner.config.backoff_max,
            rand::random::<f64>(),
        );
        tracing::debug!(?delay, failures, %reason, "sync connection lost; reconnecting");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => return,
        }
    }
}

async fn session(inner: &Arc<Inner>, url: &str, cancel: &CancellationToken) -> End {
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_SERVER_FRAME))
        .max_frame_size(Some(MAX_SERVER_FRAME));
    let connect = tokio_tungstenite::connect_async_with_config(url, Some(ws_config), true);
    let (mut ws, _) = tokio::select! {
        r = connect => match r {
            Ok(ok) => ok,
            Err(e) => return End::Lost { welcomed: false, reason: format!("connect failed: {e}") },
        },
        () = cancel.cancelled() => return End::Cancelled,
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<ClientMessage>();
    let hello = {
        let mut replica = inner.replica.lock();
        *inner.outgoing.lock() = Some(tx);
        replica.connect(now_millis())
    };
    let mut welcomed = false;
    if let Err(e) = send(&mut ws, &[hello]).await {
        return End::Lost {
            welcomed,
            reason: e,
        };
    }
    let heartbeat = inner.config.heartbeat_interval;
    let dead_after = heartbeat.saturating_mul(2);
    let period = heartbeat
        .min(inner.config.resend_after)
        .div_f64(4.0)
        .clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => {
                let _ = ws.close(None).await;
                return End::Cancelled;
            }
            frame = ws.next() => {
                let text = match frame {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(frame))) => {
                        let reason = frame.map_or_else(
                            || "the server closed the connection".to_owned(),
                            |f| format!("the server closed the connection: {}", f.reason),
                        );
                        return End::Lost { welcomed, reason };
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return End::Lost { welcomed, reason: e.to_string() },
                    None => return End::Lost { welcomed, reason: "connection closed".into() },
                };
                let message = match decode_server(text.as_str(), MAX_SERVER_FRAME) {
                    Ok(m) => m,
                    Err(e) => {
                        inner.emit(SyncEvent::Error { code: Some(e.code()),
                            message: format!("undecodable server frame: {e}") });
                        continue;
                    }
                };
                if let ServerMessage::Welcome(_) = &message {
                    welcomed = true;
                }
                match on_message(inner, message) {
                    Ok(out) => {
                        if let Err(e) = send(&mut ws, &out).await {
                            return End::Lost { welcomed, reason: e };
                        }
                    }
                    Err(reason) => {
                        let _ = ws.close(None).await;
                        return End::Refused(reason);
                    }
                }
            }
            out = rx.recv() => {
                let Some(first) = out else { continue };
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                if let Err(e) = send(&mut ws, &batch).await {
                    return End::Lost { welcomed, reason: e };
                }
            }
            _ = tick.tick() => {
                let now = now_millis();
                let (out, silence) = {
                    let mut replica = inner.replica.lock();
                    (replica.tick(now), replica.silence(now))
                };
                if u128::from(silence) > dead_after.as_millis() {
                    let _ = ws.close(None).await;
                    return End::Lost {
                        welcomed,
                        reason: format!("no answer from the server for {silence} ms"),
                    };
                }
                if let Err(e) = send(&mut ws, &out).await {
                    return End::Lost { welcomed, reason: e };
                }
            }
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn send(ws: &mut Ws, messages: &[ClientMessage]) -> Result<(), String> {
    if messages.is_empty() {
        return Ok(());
    }
    for m in messages {
        let text = encode(m).map_err(|e| e.to_string())?;
        ws.feed(Message::Text(text.into()))
            .await
            .map_err(|e| e.to_string())?;
    }
    ws.flush().await.map_err(|e| e.to_string())
}

/// Handles one server message: the replica and the store change together, under the
/// store's write lock, so no local edit can slip in between. Returns what to send, or
/// `Err` when the server refused the session for good.
fn on_message(inner: &Arc<Inner>, message: ServerMessage) -> Result<Vec<ClientMessage>, String> {
    if let ServerMessage::Error(e) = &message {
        let fatal = matches!(
            e.payload.code,
            ErrorCode::Unauthorized
                | ErrorCode::TokenExpired
                | ErrorCode::Forbidden
                | ErrorCode::UnsupportedVersion
                | ErrorCode::ReplicaTaken
        );
        if fatal {
            let reason = format!("{:?}: {}", e.payload.code, e.payload.message);
            inner.emit(SyncEvent::Error {
                code: Some(e.payload.code),
                message: e.payload.message.clone(),
            });
            return Err(reason);
        }
    }
    let is_welcome = matches!(message, ServerMessage::Welcome(_));
    let now = now_millis();
    let Some(store) = inner.store.lock().clone() else {
        return Ok(Vec::new());
    };
    let mut resent = false;
    let result = store.transaction_from(Origin::Remote, |tx| {
        let (out, settled) = {
            let mut replica = inner.replica.lock();
            let before = replica.outbox_len();
            let mut out = replica.handle(message, now);
            let settled = before.saturating_sub(replica.outbox_len());
            if resend_after_resync(&mut replica, tx, &mut out, now) > 0 {
                resent = true;
            }
            (out, settled)
        };
        let mut applied = Vec::with_capacity(out.apply.len());
        let mut refused = Vec::new();
        for change in out.apply {
            match apply(tx, &change) {
                Ok(()) => applied.push(change),
                Err(e) => refused.push(format!("{}/{}: {e}", change.kind, change.id)),
            }
        }
        Ok::<_, StoreError>((out.send, out.events, applied, refused, settled))
    });
    let Ok((send, events, applied, refused, settled)) = result else {
        return Ok(Vec::new());
    };
    // What the message changed in the replica outside a store transaction (an ack) is
    // scheduled before any event tells of it: an app that answers an `Ack` with
    // `flush_now` or `durable(Local)` then waits for that bookkeeping too, and gets it.
    inner.persist_bookkeeping();
    if resent {
        // Entities sent back after a resync never went through the store, so the
        // server-durability engine does not know them: a marker makes `durable(Server)`
        // wait for their acknowledgements too.
        crate::wait_for_queued(&store, &inner.config.room_id);
    }
    let rejected = events
        .iter()
        .filter(|e| matches!(e, ReplicaEvent::Rejected { .. }))
        .count();
    inner
        .pushed
        .fetch_add((settled.saturating_sub(rejected)) as u64, Ordering::Relaxed);
    inner
        .pulled
        .fetch_add(applied.len() as u64, Ordering::Relaxed);
    if is_welcome && inner.replica.lock().link() == kalphite_sync::LinkState::Connected {
        inner.set_status(ConnectionStatus::Connected);
    }
    let mut woke = false;
    for event in events {
        let event = match event {
            ReplicaEvent::Connected { room_version } => SyncEvent::Connected { room_version },
            ReplicaEvent::CaughtUp { version } => {
                if inner.adopt_local.swap(false, Ordering::AcqRel) {
                    adopt_local(inner, &store);
                }
                inner.caught_up.send_replace(true);
                SyncEvent::CaughtUp { version }
            }
            ReplicaEvent::Acked {
                message_id,
                version,
            } => {
                woke = true;
                SyncEvent::Ack {
                    message_id,
                    version,
                }
            }
            ReplicaEvent::Conflict(c) => SyncEvent::Conflict(c),
            ReplicaEvent::Rejected {
                change,
                code,
                message,
            } => {
                woke = true;
                SyncEvent::Rejected {
                    message_id: change.message_id,
                    code,
                    message,
                }
            }
            ReplicaEvent::Resynced {
                snapshot,
                resend,
                dropped,
            } => {
                if !snapshot {
                    // Local entities the replica never heard of go back too.
                    inner.adopt_local.store(true, Ordering::Release);
                }
                if resend.is_empty() && dropped.is_empty() {
                    tracing::debug!(room = %inner.config.room_id, snapshot,
                        "resynced with the room; nothing to send back or drop");
                } else {
                    tracing::warn!(
                        room = %inner.config.room_id,
                        snapshot,
                        sent_back = resend.len(),
                        dropped = dropped.len(),
                        "the room's history is not the one this database synced with (a \
                         lost, restored or collected room): resynced from scratch"
                    );
                }
                SyncEvent::Resynced {
                    snapshot,
                    sent_back: resend.len(),
                    dropped: dropped.len(),
                }
            }
            ReplicaEvent::ServerError { code, message, .. } => SyncEvent::Error {
                code: Some(code),
                message,
            },
            // Events a newer replica reports that this client does not surface yet.
            _ => continue,
        };
        inner.emit(event);
    }
    for change in applied {
        inner.emit(SyncEvent::RemoteChange(Box::new(change)));
    }
    for message in refused {
        inner.emit(SyncEvent::Error {
            code: Some(ErrorCode::InvalidEntity),
            message: format!("remote change refused by the local store: {message}"),
        });
    }
    if woke {
        inner.wake_waiters();
    }
    Ok(send)
}

/// Sends the room every local entity it has never mentioned, as ordinary local edits
/// (entities that predate this database's sync state: a local-only database that starts
/// syncing, a restored backup).
fn adopt_local(inner: &Arc<Inner>, store: &kalphite::Store) {
    let unknown: Vec<kalphite::Entity<serde_json::Value>> = {
        let replica = inner.replica.lock();
        let known = &replica.state().known;
        store
            .all()
            .into_iter()
            .filter(|e| {
                !known.contains_key(&kalphite_sync::EntityKey::new(
                    e.kind().clone(),
                    e.id().clone(),
                ))
            })
            .filter_map(|e| e.to_json().ok())
            .collect()
    };
    if unknown.is_empty() {
        return;
    }
    let n = unknown.len();
    let result = store.transaction(|tx| {
        for entity in unknown {
            tx.upsert_json(entity)?;
        }
        Ok::<_, StoreError>(())
    });
    match result {
        Ok(()) => tracing::info!(entities = n, "sent local entities the room did not have"),
        Err(e) => inner.emit(SyncEvent::Error {
            code: None,
            message: format!("could not queue local entities the room did not have: {e}"),
        }),
    }
}

/// After a resync that sends back what the room lacks: queues each reported entity as the
/// store holds it (inside the transaction that applied the catch-up, so the queue and the
/// data are written together).
/// Returns how many were queued.
fn resend_after_resync(
    replica: &mut kalphite_sync::Replica,
    tx: &kalphite::Tx<'_>,
    out: &mut kalphite_sync::Output,
    now: u64,
) -> usize {
    let keys: Vec<kalphite_sync::EntityKey> = out
        .events
        .iter()
        .filter_map(|e| match e {
            ReplicaEvent::Resynced { resend, .. } => Some(resend.iter().cloned()),
            _ => None,
        })
        .flatten()
        .collect();
    let mut queued = 0;
    for key in keys {
        let Some(entity) = tx.get_any(&key.kind, &key.id) else {
            continue;
        };
        match entity.to_json().map_err(kalphite_sync::ReplicaError::from) {
            Ok(json) => match replica.resend(json, now) {
                Ok(send) => {
                    queued += 1;
                    out.send.extend(send);
                }
                Err(e) => tracing::warn!(kind = %key.kind, id = %key.id, error = %e,
                    "could not send an entity back to the room"),
            },
            Err(e) => tracing::warn!(kind = %key.kind, id = %key.id, error = %e,
                "could not send an entity back to the room"),
        }
    }
    queued
}

/// Applies one remote change inside the store transaction.
fn apply(tx: &mut kalphite::Tx<'_>, change: &Change) -> Result<(), String> {
    match (change.op, &change.entity) {
        (Op::Delete, _) => {
            tx.delete_json(&change.kind, &change.id);
            Ok(())
        }
        (Op::Upsert, Some(entity)) => {
            let json = entity.to_json().map_err(|e| e.to_string())?;
            tx.upsert_json(json).map(drop).map_err(|e| e.to_string())
        }
        (Op::Upsert, None) => Err("upsert without an entity".into()),
    }
}
