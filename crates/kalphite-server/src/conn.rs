//! One WebSocket connection: reads frames, enforces the frame-size and rate limits,
//! authenticates the hello, drives the connection's [`Room`](crate::Room) (persist →
//! commit → fan-out), and writes what the room addresses to it. Never panics on input.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;
use kalphite::{Millis, now_millis};
use tokio::time::{Instant, sleep_until};

use super::log::{Job, record_entity};
use super::metrics::Metrics;
use super::outbox::Outbox;
use super::{Frame, RoomHandle, Shared, auth};
use kalphite_sync::{
    ClientMessage, ConnId, Envelope, ErrorCode, ErrorPayload, HeartbeatPayload, HelloPayload,
    Outbound, SERVER_USER_ID, ServerMessage, Step, decode_client, encode, peek_message_id,
};

/// WebSocket close codes used here.
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_POLICY: u16 = 1008;

/// Most queued frames written before one flush.
const WRITE_BATCH: usize = 64;

/// What the frame handler wants the loop to do next.
enum Next {
    Continue,
    Close(u16, String),
}

/// Token bucket for the per-connection rate limit.
struct Bucket {
    tokens: f64,
    per_second: f64,
    burst: f64,
    last: Instant,
}

impl Bucket {
    fn new(per_second: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            tokens: burst,
            per_second: f64::from(per_second.max(1)),
            burst,
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The connection's state between frames.
struct Conn {
    id: ConnId,
    shared: Arc<Shared>,
    /// Set once the hello was accepted: the room and its id.
    room: Option<Arc<RoomHandle>>,
    /// The sending half of this connection's queue, until the room holds it.
    outbox: Arc<Outbox>,
    next_message: u64,
}

/// Serves one upgraded connection to its end.
pub(crate) async fn serve(mut socket: WebSocket, shared: Arc<Shared>) {
    let metrics = Arc::clone(&shared.metrics);
    Metrics::inc(&metrics.connections);
    Metrics::inc(&metrics.connections_total);
    let id = shared
        .next_conn
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let outbox = Arc::new(Outbox::new(shared.config.outbound_queue));
    let cancel = shared.cancel.clone();
    let idle = shared.config.idle_timeout;
    let mut bucket = Bucket::new(
        shared.config.rate_limit.per_second,
        shared.config.rate_limit.burst,
    );
    let mut conn = Conn {
        id,
        shared,
        room: None,
        outbox: Arc::clone(&outbox),
        next_message: 0,
    };
    let mut deadline = Instant::now() + idle;
    let close = loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => {
                break Some((CLOSE_GOING_AWAY, "server shutting down".to_owned()));
            }
            () = outbox.ready(), if conn.room.is_some() => {
                let mut batch = Vec::new();
                if !outbox.drain(&mut batch, WRITE_BATCH) {
                    let text = conn.error_frame(ErrorCode::Internal,
                        "the server dropped this connection from its room (it fell behind, or \
                         the room was reset); reconnect to catch up", None);
                    let _ = Box::pin(socket.send(Message::Text(text))).await;
                    break Some((CLOSE_POLICY, "too slow".to_owned()));
                }
                if Box::pin(write_batch(&mut socket, batch, &metrics)).await.is_err() {
                    break None;
                }
            }
            frame = socket.recv() => {
                let Some(Ok(frame)) = frame else {
                    break None;
                };
                deadline = Instant::now() + idle;
                Metrics::inc(&metrics.messages_in);
                let next = match frame {
                    Message::Text(text) => {
                        if bucket.take() {
                            Box::pin(conn.on_text(&mut socket, text.as_str())).await
                        } else {
                            Box::pin(conn.reply_error(&mut socket, ErrorCode::RateLimited,
                                "too many messages on this connection; slow down and resend",
                                None)).await
                        }
                    }
                    Message::Binary(_) => Box::pin(conn.reply_error(&mut socket,
                        ErrorCode::InvalidMessage,
                        "binary frames are not supported; send JSON text frames", None)).await,
                    Message::Close(_) => Next::Close(CLOSE_NORMAL, String::new()),
                    Message::Ping(_) | Message::Pong(_) => Next::Continue,
                };
                if let Next::Close(code, reason) = next {
                    break Some((code, reason));
                }
            }
            () = sleep_until(deadline) => {
                break Some((CLOSE_POLICY, "idle timeout".to_owned()));
            }
        }
    };
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = Box::pin(socket.send(Message::Close(Some(frame)))).await;
    }
    Box::pin(conn.leave()).await;
    Metrics::dec(&metrics.connections);
}

/// Writes a batch of queued frames, then flushes once.
async fn write_batch(
    socket: &mut WebSocket,
    batch: Vec<Utf8Bytes>,
    metrics: &Metrics,
) -> Result<(), axum::Error> {
    Metrics::add(&metrics.messages_out, batch.len() as u64);
    for text in batch {
        socket.feed(Message::Text(text)).await?;
    }
    socket.flush().await
}

impl Conn {
    fn now() -> Millis {
        now_millis()
    }

    fn next_id(&mut self) -> String {
        self.next_message += 1;
        format!("c{}-{}", self.id, self.next_message)
    }

    fn error_frame(
        &mut self,
        code: ErrorCode,
        message: &str,
        refers_to: Option<String>,
    ) -> Utf8Bytes {
        let msg = ServerMessage::Error(Envelope::new(
            self.next_id(),
            SERVER_USER_ID,
            Self::now(),
            ErrorPayload {
                code,
                message: message.to_owned(),
                refers_to,
            },
        ));
        Metrics::inc(&self.shared.metrics.errors);
        encode(&msg).map_or_else(|_| Utf8Bytes::from_static("{}"), Utf8Bytes::from)
    }

    /// Sends an error straight to this socket (outside any room).
    async fn reply_error(
        &mut self,
        socket: &mut WebSocket,
        code: ErrorCode,
        message: &str,
        refers_to: Option<String>,
    ) -> Next {
        let text = self.error_frame(code, message, refers_to);
        self.send_direct(socket, text).await
    }

    async fn send_direct(&self, socket: &mut WebSocket, text: Utf8Bytes) -> Next {
        Metrics::inc(&self.shared.metrics.messages_out);
        match socket.send(Message::Text(text)).await {
            Ok(()) => Next::Continue,
            Err(_) => Next::Close(CLOSE_NORMAL, String::new()),
        }
    }

    async fn on_text(&mut self, socket: &mut WebSocket, text: &str) -> Next {
        let message = match decode_client(text, self.shared.config.max_frame_bytes) {
            Ok(m) => m,
            Err(e) => {
                let mut p = e.to_payload();
                if p.refers_to.is_none() && p.code == ErrorCode::Oversized {
                    // Not parsed, but the client needs to know which change was refused.
                    p.refers_to = peek_message_id(text);
                }
                return self
                    .reply_error(socket, p.code, &p.message, p.refers_to)
                    .await;
            }
        };
        match message {
            // Boxed: the hello path (auth, room restore from the database) is large and
            // rare; inline it would grow every idle connection's task.
            ClientMessage::Hello(hello) => Box::pin(self.on_hello(socket, hello)).await,
            ClientMessage::Heartbeat(beat) if self.room.is_none() => {
                let reply = ServerMessage::Heartbeat(Envelope::new(
                    self.next_id(),
                    SERVER_USER_ID,
                    Self::now(),
                    HeartbeatPayload {},
                ));
                let _ = beat;
                match encode(&reply) {
                    Ok(text) => self.send_direct(socket, text.into()).await,
                    Err(_) => Next::Continue,
                }
            }
            other => {
                let Some(room) = self.room.clone() else {
                    let id = Some(other.message_id().to_owned());
                    return self
                        .reply_error(socket, ErrorCode::NotJoined, "send a hello first", id)
                        .await;
                };
                self.on_room_message(&room, other).await
            }
        }
    }

    async fn on_hello(&mut self, socket: &mut WebSocket, hello: Envelope<HelloPayload>) -> Next {
        let refers_to = Some(hello.message_id.clone());
        if self.room.is_some() {
            return self
                .reply_error(
                    socket,
                    ErrorCode::AlreadyJoined,
                    "this connection has already joined a room",
                    refers_to,
                )
                .await;
        }
        let config = &self.shared.config;
        let room_id = hello.payload.room_id.clone();
        let user = match auth::authorize(
            config.token_secret.as_deref(),
            config.open,
            hello.payload.token.as_deref(),
            &room_id,
        ) {
            Ok(Some(user)) => user,
            Ok(None) => hello.user_id.clone(),
            Err(e) => {
                Metrics::inc(&self.shared.metrics.auth_failures);
                tracing::debug!(conn = self.id, room = %room_id, error = %e, "hello refused");
                let text = self.error_frame(e.code(), &e.to_string(), refers_to);
                let _ = self.send_direct(socket, text).await;
                return Next::Close(CLOSE_POLICY, "unauthorized".to_owned());
            }
        };
        if room_id.is_empty() || room_id.len() > 256 {
            return self
                .reply_error(
                    socket,
                    ErrorCode::InvalidMessage,
                    "roomId must be 1 to 256 bytes",
                    refers_to,
                )
                .await;
        }
        let handle = self.shared.room(&room_id);
        let mut guard = handle.state.lock().await;
        if guard.is_none() {
            match self.shared.load_room(&room_id).await {
                Ok(room) => *guard = Some(room),
                Err(e) => {
                    tracing::error!(room = %room_id, error = %e, "could not restore room");
                    drop(guard);
                    return self
                        .reply_error(
                            socket,
                            ErrorCode::StorageFailed,
                            "the room could not be loaded; try again later",
                            refers_to,
                        )
                        .await;
                }
            }
        }
        let Some(room) = guard.as_mut() else {
            return Next::Continue;
        };
        match room.join(self.id, &user, &hello, Self::now()) {
            Ok(outs) => {
                handle
                    .members
                    .lock()
                    .insert(self.id, Arc::clone(&self.outbox));
                let frames = encode_all(outs, &self.shared.metrics);
                let job = Job {
                    room: Arc::clone(&handle),
                    record: None,
                    frames,
                };
                let submitted = self.shared.log.submit(job).await;
                drop(guard);
                self.room = Some(handle);
                match submitted {
                    Ok(()) => Next::Continue,
                    Err(_) => Next::Close(CLOSE_GOING_AWAY, "server shutting down".into()),
                }
            }
            Err(e) => {
                // A refused hello (unsupported version, another room, a replica id of
                // another user) ends the connection, as the auth refusals do.
                drop(guard);
                tracing::debug!(conn = self.id, room = %room_id, error = %e, "hello refused");
                let text = self.error_frame(e.code(), &e.to_string(), refers_to);
                let _ = self.send_direct(socket, text).await;
                Next::Close(CLOSE_POLICY, "hello refused".to_owned())
            }
        }
    }

    /// Handles a message of a joined connection. The room commits changes in memory and
    /// queues them, with the frames they produce, to the log writer, which makes them
    /// durable before delivering anything (in order); the room lock is held only while
    /// queueing, so a room's changes pipeline into group commits.
    async fn on_room_message(&mut self, handle: &Arc<RoomHandle>, message: ClientMessage) -> Next {
        let mut guard = handle.state.lock().await;
        if handle.is_poisoned() {
            return Next::Close(CLOSE_GOING_AWAY, "room reset; reconnect".into());
        }
        let Some(room) = guard.as_mut() else {
            return Next::Continue;
        };
        let now = Self::now();
        let metrics = &self.shared.metrics;
        let job = match room.handle(self.id, message, now) {
            Step::Reply(outs) => Job {
                room: Arc::clone(handle),
                record: None,
                frames: encode_all(outs, metrics),
            },
            Step::Persist(pending) => match record_entity(&handle.id, pending.record()) {
                Ok(entity) => match room.commit(pending) {
                    Ok(outs) => Job {
                        room: Arc::clone(handle),
                        record: Some(entity),
                        frames: encode_all(outs, metrics),
                    },
                    Err(e) => {
                        tracing::error!(room = %handle.id, error = %e, "commit refused");
                        return Next::Continue;
                    }
                },
                Err(e) => match room.abort(pending, &e.to_string(), now) {
                    Ok(out) => Job {
                        room: Arc::clone(handle),
                        record: None,
                        frames: encode_all(vec![out], metrics),
                    },
                    Err(e) => {
                        tracing::error!(room = %handle.id, error = %e, "abort refused");
                        return Next::Continue;
                    }
                },
            },
        };
        match self.shared.log.submit(job).await {
            Ok(()) => Next::Continue,
            Err(_) => Next::Close(CLOSE_GOING_AWAY, "server shutting down".into()),
        }
    }

    /// Leaves the room, if joined.
    async fn leave(&mut self) {
        if let Some(handle) = self.room.take() {
            handle.members.lock().remove(&self.id);
            let mut guard = handle.state.lock().await;
            if let Some(room) = guard.as_mut() {
                room.leave(self.id);
            }
        }
    }
}

/// Encodes each outbound message once, counting conflicts and errors.
fn encode_all(outs: Vec<Outbound>, metrics: &Metrics) -> Vec<Frame> {
    let mut frames = Vec::with_capacity(outs.len());
    for out in outs {
        match &out.message {
            ServerMessage::Conflict(_) => Metrics::inc(&metrics.conflicts),
            ServerMessage::Error(_) => Metrics::inc(&metrics.errors),
            _ => {}
        }
        match encode(&out.message) {
            Ok(text) => frames.push(Frame {
                to: out.to,
                text: text.into(),
            }),
            Err(e) => tracing::error!(error = %e, "could not encode a server message"),
        }
    }
    frames
}
