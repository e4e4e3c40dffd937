//! One WebSocket connection: reads frames, enforces the frame-size and rate limits (every
//! frame counts, pings and binary frames too), authenticates the hello and ends the
//! connection when its token expires, drives the connection's [`Room`](crate::Room)
//! (persist → commit → fan-out), and writes what is queued for it from a write loop of its
//! own, so a client that stops reading never holds up its reads, its idle timer or
//! shutdown. Never panics on input: a frame that cannot be read ends the connection with
//! the close code that says why (1009 too large, 1007 not UTF-8, 1002 not WebSocket).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{Sink, SinkExt, StreamExt};
use kalphite::{Millis, now_millis};
use tokio::time::{Instant, sleep_until, timeout};

use super::cluster::Owner;
use super::forward::{self, Forward};
use super::limits::UserPermit;
use super::listener::Peer;
use super::log::{Job, record_entity};
use super::metrics::Metrics;
use super::outbox::{Closed, Outbox, Popped, Pushed};
use super::{Frame, RateLimit, RoomHandle, RoomLease, Shared, auth};
use kalphite_sync::{
    ClientMessage, ConnId, Envelope, ErrorCode, ErrorPayload, HeartbeatPayload, HelloPayload,
    Outbound, SERVER_USER_ID, ServerMessage, Step, decode_client, encode, peek_message_id,
};
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::error::ProtocolError;

/// WebSocket close codes used here.
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_PROTOCOL: u16 = 1002;
const CLOSE_INVALID_DATA: u16 = 1007;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_INTERNAL: u16 = 1011;

/// Most queued frames written before one flush.
const WRITE_BATCH: usize = 64;

/// Longest wait for a closing connection's last frames and close frame.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the frame handler wants the loop to do next.
enum Next {
    Continue,
    Close(u16, String),
    /// Cluster mode: another node owns the hello's room; the connection becomes a relay.
    Forward(Box<Forward>),
}

/// Why a connection ends.
enum End {
    /// The socket failed or the client went away: nothing more can be sent.
    Gone,
    /// A write made no progress for the write timeout (the socket has failed).
    Stalled,
    /// The client sent a close frame.
    Goodbye,
    /// The server closes it with this code and reason, after what is queued (refusals).
    Close(u16, String),
    /// The server is shutting down.
    Shutdown,
    /// No frame for the idle timeout, or no hello within the handshake timeout.
    Idle(&'static str),
    /// The client fell behind: its queue went over a bound and was dropped.
    Slow,
    /// The room was reset after a failed write.
    Reset,
    /// Cluster mode: this node lost the room's lease; the client reconnects (to any node).
    Moved,
    /// The hello's token expired.
    Expired,
    /// A frame for this client was over the largest a client accepts; it was not sent.
    FrameTooLarge(usize),
    /// Cluster mode: relayed to the room's owner from here on.
    Forward(Box<Forward>),
}

/// A frame the WebSocket layer could not read, by what the client is told.
enum Unreadable {
    /// Over the hard size limit (a frame, or a fragmented message in total): not read.
    TooLarge,
    /// A text frame that is not UTF-8.
    NotUtf8,
    /// Not valid WebSocket framing (unmasked, reserved bits, a stray continuation...).
    Protocol,
}

impl Unreadable {
    fn of(e: &axum::Error) -> Option<Self> {
        let source = std::error::Error::source(e)?;
        match source.downcast_ref::<WsError>()? {
            WsError::Capacity(_) => Some(Self::TooLarge),
            WsError::Utf8(_) => Some(Self::NotUtf8),
            // The client went away without a close frame: nobody to tell.
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
            WsError::Protocol(_) => Some(Self::Protocol),
            _ => None,
        }
    }
}

/// Token bucket for the per-connection rate limit.
/// (The rate itself is read from the config at each take: one copy for all connections.)
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(limit: RateLimit) -> Self {
        Self {
            tokens: f64::from(limit.burst.max(1)),
            last: Instant::now(),
        }
    }

    fn take(&mut self, limit: RateLimit) -> bool {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let (per_second, burst) = (
            f64::from(limit.per_second.max(1)),
            f64::from(limit.burst.max(1)),
        );
        self.tokens = (self.tokens + elapsed * per_second).min(burst);
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
    /// This connection's queue: the room's frames and direct replies, in order.
    outbox: Arc<Outbox>,
    /// One of its user's connection slots, from the accepted hello on.
    user_slot: Option<UserPermit>,
    /// When the hello's token expires (none in open mode without a token).
    expires: Option<Instant>,
    next_message: u64,
    /// Cluster mode: another node forwarded this connection here (it is never forwarded
    /// again: if this node does not own the room either, the client reconnects).
    forwarded: bool,
}

/// Counts an open connection while it lives.
struct OpenGauge(Arc<Metrics>);

impl OpenGauge {
    fn new(metrics: &Arc<Metrics>) -> Self {
        Metrics::inc(&metrics.connections);
        Metrics::inc(&metrics.connections_total);
        Self(Arc::clone(metrics))
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        Metrics::dec(&self.0.connections);
    }
}

/// Serves one upgraded connection to its end.
// Not an `async fn`: one of those keeps its arguments twice (as arguments and as the
// body's locals), and the socket is 368 bytes in every connection's task. The block below
// uses the captured socket in place.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold the socket twice"
)]
pub(crate) fn serve(
    mut socket: WebSocket,
    shared: Arc<Shared>,
    peer: Peer,
    forwarded: bool,
) -> impl Future<Output = ()> + Send {
    async move {
        let metrics = Arc::clone(&shared.metrics);
        let _open = OpenGauge::new(&metrics);
        let id = shared
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let config = &shared.config;
        let outbox = Arc::new(Outbox::new(
            config.outbound_queue,
            config.outbound_queue_bytes,
            Arc::clone(&metrics),
        ));
        let cancel = shared.cancel.clone();
        let idle = config.idle_timeout;
        let max_out = config.max_server_frame_bytes;
        let hello_by = Instant::now() + config.handshake_timeout;
        let mut bucket = Bucket::new(config.rate_limit);
        let mut conn = Conn {
            id,
            shared,
            room: None,
            outbox: Arc::clone(&outbox),
            user_slot: None,
            expires: None,
            next_message: 0,
            forwarded,
        };
        let mut writer = Writer {
            unflushed: 0,
            max_bytes: max_out,
        };
        let mut deadline = Instant::now() + idle;
        let end = {
            loop {
                let joined = conn.room.is_some();
                let mut wake = if joined {
                    deadline
                } else {
                    deadline.min(hello_by)
                };
                if let Some(expires) = conn.expires {
                    wake = wake.min(expires);
                }
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => break End::Shutdown,
                    // Writes run beside the reads: a client that does not read stalls only the
                    // write half of this poll, never the reads, the idle timer or shutdown.
                    event = std::future::poll_fn(|cx| {
                        if let Poll::Ready(end) = writer.poll_write(&mut socket, &outbox, &metrics, cx) {
                            return Poll::Ready(Err(end));
                        }
                        socket.poll_next_unpin(cx).map(Ok)
                    }) => {
                        let frame = match event {
                            Err(end) => break end,
                            Ok(Some(Ok(frame))) => frame,
                            Ok(Some(Err(e))) => break conn.unreadable(&e),
                            Ok(None) => break End::Gone,
                        };
                        // Nothing is taken from a connection whose token has expired.
                        if conn.expires.is_some_and(|at| Instant::now() >= at) {
                            break End::Expired;
                        }
                        deadline = Instant::now() + idle;
                        Metrics::inc(&metrics.messages_in);
                        if matches!(frame, Message::Close(_)) {
                            break End::Goodbye;
                        }
                        // Every frame counts against the rate limit: a flood of pings or binary
                        // frames costs the server as much as one of messages.
                        let next = if bucket.take(conn.shared.config.rate_limit) {
                            match frame {
                                Message::Text(text) => Box::pin(conn.on_text(text.as_str())).await,
                                Message::Binary(_) => conn.reply_error(ErrorCode::InvalidMessage,
                                    "binary frames are not supported; send JSON text frames", None),
                                // Pings are answered by the WebSocket layer.
                                Message::Ping(_) | Message::Pong(_) | Message::Close(_) => {
                                    Next::Continue
                                }
                            }
                        } else {
                            let refers_to = match &frame {
                                Message::Text(text) => peek_message_id(text.as_str()),
                                _ => None,
                            };
                            conn.reply_error(ErrorCode::RateLimited,
                                "too many messages on this connection; slow down and resend",
                                refers_to)
                        };
                        match next {
                            Next::Continue => {}
                            Next::Close(code, reason) => break End::Close(code, reason),
                            Next::Forward(to) => break End::Forward(to),
                        }
                    }
                    () = sleep_until(wake) => {
                        if conn.expires.is_some_and(|at| Instant::now() >= at) {
                            break End::Expired;
                        }
                        break End::Idle(if joined { "idle timeout" } else { "no hello in time" });
                    }
                }
            }
        };
        let end = match end {
            End::Gone if peer.write_stalled() => End::Stalled,
            End::Forward(to) => {
                // Boxed: relaying is the rare path; inline it would grow every task.
                Box::pin(forward::relay(&mut socket, *to, &conn.shared, &outbox)).await;
                drop(socket);
                Box::pin(conn.leave()).await;
                return;
            }
            other => other,
        };
        let (frames, close) = conn.last_words(end);
        // Whatever is still queued is freed now, and the room's later frames are discarded.
        outbox.abandon();
        if let Some((code, reason)) = close {
            let n = frames.len() as u64;
            // Boxed: a closing connection's writes and their timer are needed once, at the end;
            // inline they would grow every idle connection's task.
            let last = Box::pin(timeout(
                CLOSE_WRITE_TIMEOUT,
                finish(&mut socket, frames, code, reason),
            ));
            if matches!(last.await, Ok(Ok(()))) {
                Metrics::add(&metrics.messages_out, n);
                // The close frame is out: the socket lingers so that it is read, not reset.
                peer.linger();
            }
        }
        drop(socket);
        Box::pin(conn.leave()).await;
    }
}

/// The write half of a connection: moves queued frames into the socket as it takes them,
/// flushing when the queue runs empty (or every [`WRITE_BATCH`] frames). Polled beside the
/// reads on the one socket, with no split and no future of its own, so an idle connection
/// costs only these two words. One frame at a time leaves the queue, so the queue's bound
/// is the connection's memory bound.
struct Writer {
    unflushed: usize,
    max_bytes: usize,
}

impl Writer {
    /// Writes what it can; ready with why the connection ends once the queue is closed, a
    /// frame is too large to send, or a write fails.
    fn poll_write(
        &mut self,
        socket: &mut WebSocket,
        outbox: &Outbox,
        metrics: &Metrics,
        cx: &mut Context<'_>,
    ) -> Poll<End> {
        loop {
            // Room in the socket first, so a frame taken from the queue is never held here.
            match Pin::new(&mut *socket).poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(End::Gone),
                Poll::Pending => return Poll::Pending,
            }
            if self.unflushed >= WRITE_BATCH {
                match Pin::new(&mut *socket).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.unflushed = 0,
                    Poll::Ready(Err(_)) => return Poll::Ready(End::Gone),
                    Poll::Pending => return Poll::Pending,
                }
            }
            match outbox.pop() {
                // A client refuses such a frame (and would never get past it): say so instead.
                Popped::Frame(text) if text.len() > self.max_bytes => {
                    return Poll::Ready(End::FrameTooLarge(text.len()));
                }
                Popped::Frame(text) => {
                    if Pin::new(&mut *socket)
                        .start_send(Message::Text(text))
                        .is_err()
                    {
                        return Poll::Ready(End::Gone);
                    }
                    Metrics::inc(&metrics.messages_out);
                    self.unflushed += 1;
                }
                Popped::Empty => {
                    if self.unflushed > 0 {
                        match Pin::new(&mut *socket).poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.unflushed = 0,
                            Poll::Ready(Err(_)) => return Poll::Ready(End::Gone),
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                    match outbox.poll_ready(cx) {
                        Poll::Ready(()) => {}
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Popped::Closed(Closed::Reset) => return Poll::Ready(End::Reset),
                Popped::Closed(Closed::Dropped) => return Poll::Ready(End::Slow),
                Popped::Closed(Closed::Moved) => return Poll::Ready(End::Moved),
            }
        }
    }
}

/// A closing connection's last frames, then its close frame.
async fn finish(
    sink: &mut WebSocket,
    frames: Vec<Utf8Bytes>,
    code: u16,
    reason: String,
) -> Result<(), axum::Error> {
    for text in frames {
        sink.feed(Message::Text(text)).await?;
    }
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    sink.send(Message::Close(Some(frame))).await
}

impl Conn {
    /// What a connection ending for `end` still sends: frames, then a close frame.
    fn last_words(&mut self, end: End) -> (Vec<Utf8Bytes>, Option<(u16, String)>) {
        match end {
            // (A relayed connection ended in its relay: nothing more to send here.)
            End::Gone | End::Forward(_) => (Vec::new(), None),
            End::Stalled => {
                tracing::warn!(conn = self.id, "dropping a connection whose writes stalled");
                (Vec::new(), None)
            }
            End::Goodbye => (Vec::new(), Some((CLOSE_NORMAL, String::new()))),
            End::Close(code, reason) => (self.outbox.take_all(), Some((code, reason))),
            End::Shutdown => (
                Vec::new(),
                Some((CLOSE_GOING_AWAY, "server shutting down".to_owned())),
            ),
            End::Idle(reason) => (Vec::new(), Some((CLOSE_POLICY, reason.to_owned()))),
            End::Slow => (
                vec![self.error_frame(
                    ErrorCode::Internal,
                    "this connection fell too far behind its room's traffic and was dropped; \
                     reconnect to catch up",
                    None,
                )],
                Some((
                    CLOSE_POLICY,
                    "too slow: outbound queue over its bound".to_owned(),
                )),
            ),
            End::Reset => (
                vec![self.error_frame(
                    ErrorCode::Internal,
                    "the room was reset after a storage failure; reconnect to catch up",
                    None,
                )],
                Some((CLOSE_GOING_AWAY, "room reset; reconnect".to_owned())),
            ),
            End::Moved => (
                Vec::new(),
                Some((
                    CLOSE_GOING_AWAY,
                    "room moved to another node; reconnect".to_owned(),
                )),
            ),
            End::Expired => (
                vec![self.error_frame(
                    ErrorCode::TokenExpired,
                    "the token has expired; get a new one and reconnect",
                    None,
                )],
                Some((CLOSE_POLICY, "token expired".to_owned())),
            ),
            End::FrameTooLarge(size) => {
                tracing::error!(
                    conn = self.id,
                    size,
                    "a frame for this connection is over the largest a client accepts; \
                     closing it"
                );
                let message = format!(
                    "the server had a {size}-byte frame for this connection, over the largest \
                     frame a client accepts; the connection is closed"
                );
                (
                    vec![self.error_frame(ErrorCode::Internal, &message, None)],
                    Some((
                        CLOSE_INTERNAL,
                        "frame over the server frame limit".to_owned(),
                    )),
                )
            }
        }
    }

    /// How a connection whose frame could not be read ends: with a close code saying why
    /// (after an error frame), or silently when the socket itself failed.
    fn unreadable(&mut self, e: &axum::Error) -> End {
        let (code, error, message, reason) = match Unreadable::of(e) {
            Some(Unreadable::TooLarge) => {
                let hard = self.shared.config.hard_frame_bytes;
                (
                    CLOSE_TOO_BIG,
                    ErrorCode::Oversized,
                    format!(
                        "a frame (or a fragmented message) over {hard} bytes, the hard limit; \
                         it was not read and the connection is closed"
                    ),
                    "frame too large",
                )
            }
            Some(Unreadable::NotUtf8) => (
                CLOSE_INVALID_DATA,
                ErrorCode::InvalidMessage,
                "a text frame that is not valid UTF-8; the connection is closed".to_owned(),
                "text frame is not UTF-8",
            ),
            Some(Unreadable::Protocol) => (
                CLOSE_PROTOCOL,
                ErrorCode::InvalidMessage,
                format!("not a valid WebSocket frame ({e}); the connection is closed"),
                "WebSocket protocol error",
            ),
            None => return End::Gone,
        };
        tracing::debug!(conn = self.id, error = %e, "unreadable frame: closing");
        self.reply_error(error, &message, None);
        End::Close(code, reason.to_owned())
    }

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

    /// Queues an error for this connection only (outside the room's log order).
    fn reply_error(&mut self, code: ErrorCode, message: &str, refers_to: Option<String>) -> Next {
        let text = self.error_frame(code, message, refers_to);
        self.send_direct(text)
    }

    /// Queues a frame for this connection only. A client that lets its replies pile up
    /// past the queue's bound is dropped like any slow member (the write loop ends it).
    fn send_direct(&self, text: Utf8Bytes) -> Next {
        if self.outbox.push(text) == Pushed::Overflow {
            Metrics::inc(&self.shared.metrics.slow_consumers);
            tracing::warn!(
                conn = self.id,
                "dropping a connection that does not read its replies"
            );
        }
        Next::Continue
    }

    async fn on_text(&mut self, text: &str) -> Next {
        let message = match decode_client(text, self.shared.config.max_frame_bytes) {
            Ok(m) => m,
            Err(e) => {
                let mut p = e.to_payload();
                if p.refers_to.is_none() && p.code == ErrorCode::Oversized {
                    // Not parsed, but the client needs to know which change was refused.
                    p.refers_to = peek_message_id(text);
                }
                return self.reply_error(p.code, &p.message, p.refers_to);
            }
        };
        match message {
            // Boxed: the hello path (auth, room restore from the database) is large and
            // rare; inline it would grow every idle connection's task.
            ClientMessage::Hello(hello) => Box::pin(self.on_hello(hello)).await,
            ClientMessage::Heartbeat(beat) if self.room.is_none() => {
                let reply = ServerMessage::Heartbeat(Envelope::new(
                    self.next_id(),
                    SERVER_USER_ID,
                    Self::now(),
                    HeartbeatPayload {},
                ));
                let _ = beat;
                match encode(&reply) {
                    Ok(text) => self.send_direct(text.into()),
                    Err(_) => Next::Continue,
                }
            }
            other => {
                let Some(room) = self.room.clone() else {
                    let id = Some(other.message_id().to_owned());
                    return self.reply_error(ErrorCode::NotJoined, "send a hello first", id);
                };
                self.on_room_message(&room, other).await
            }
        }
    }

    async fn on_hello(&mut self, hello: Envelope<HelloPayload>) -> Next {
        let refers_to = Some(hello.message_id.clone());
        if self.room.is_some() {
            return self.reply_error(
                ErrorCode::AlreadyJoined,
                "this connection has already joined a room",
                refers_to,
            );
        }
        let config = &self.shared.config;
        let room_id = hello.payload.room_id.clone();
        let (user, expires) = match auth::authorize(
            config.token_secret.as_deref(),
            config.open,
            hello.payload.token.as_deref(),
            &room_id,
        ) {
            Ok(Some(admitted)) => (admitted.user, Some(admitted.expires)),
            Ok(None) => (hello.user_id.clone(), None),
            Err(e) => {
                Metrics::inc(&self.shared.metrics.auth_failures);
                tracing::debug!(conn = self.id, room = %room_id, error = %e, "hello refused");
                let text = self.error_frame(e.code(), &e.to_string(), refers_to);
                self.send_direct(text);
                return Next::Close(CLOSE_POLICY, "unauthorized".to_owned());
            }
        };
        if room_id.is_empty() || room_id.len() > 256 {
            return self.reply_error(
                ErrorCode::InvalidMessage,
                "roomId must be 1 to 256 bytes",
                refers_to,
            );
        }
        if self.user_slot.is_none() {
            let Some(slot) = self.shared.budgets.user(&user) else {
                Metrics::inc(&self.shared.metrics.user_limit_refusals);
                let limit = self.shared.budgets.max_per_user();
                tracing::debug!(conn = self.id, %user, limit, "hello refused: per-user limit");
                let message = format!(
                    "user '{user}' already has {limit} connections open, the server's limit \
                     per user; close one, or retry later"
                );
                self.reply_error(ErrorCode::TooManyConnections, &message, refers_to);
                return Next::Close(CLOSE_POLICY, "too many connections for this user".into());
            };
            self.user_slot = Some(slot);
        }
        let handle = self.shared.room(&room_id);
        let mut guard = handle.state.lock().await;
        if guard.is_none() {
            let asked = Instant::now();
            let lease = match self.owner(&room_id, &hello).await {
                Ok(Ok(lease)) => lease,
                Ok(Err(next)) => return next,
                Err(e) => {
                    tracing::error!(room = %room_id, error = %e, "could not acquire the room");
                    drop(guard);
                    return self.reply_error(
                        ErrorCode::StorageFailed,
                        "the room's owner could not be determined; try again later",
                        refers_to,
                    );
                }
            };
            match self.shared.load_room(&room_id, lease).await {
                Ok((room, lease)) => {
                    *guard = Some(room);
                    handle.set_lease(lease);
                    if lease.is_some() {
                        let ms = asked.elapsed().as_millis();
                        let metrics = &self.shared.metrics.cluster;
                        Metrics::add(&metrics.handover_ms, u64::try_from(ms).unwrap_or(u64::MAX));
                    }
                }
                Err(e) => {
                    tracing::error!(room = %room_id, error = %e, "could not restore room");
                    drop(guard);
                    if let (Some(cluster), Some(lease)) = (&self.shared.cluster, lease) {
                        cluster.release(vec![(room_id.clone(), lease.term)]).await;
                    }
                    return self.reply_error(
                        ErrorCode::StorageFailed,
                        "the room could not be loaded; try again later",
                        refers_to,
                    );
                }
            }
        }
        let Some(room) = guard.as_mut() else {
            return Next::Continue;
        };
        // The catch-up is a snapshot of pointers, made into pages only as this connection's
        // socket takes them: nothing of it is encoded under the room lock.
        match room.join_streamed(self.id, &user, &hello, Self::now()) {
            Ok(joined) => {
                handle
                    .joining
                    .lock()
                    .insert(self.id, Arc::clone(&self.outbox));
                // A room reset, or (cluster mode) dropped with its lease, after this hello
                // found it: its members were closed before this one was listed, and the log
                // drops its jobs, so nothing would ever answer this hello. Checked after the
                // listing: a reset from then on closes this connection with the others.
                if handle.is_poisoned() {
                    handle.joining.lock().remove(&self.id);
                    room.leave(self.id);
                    drop(guard);
                    return Next::Close(CLOSE_GOING_AWAY, "room reset; reconnect".into());
                }
                let mut frames = encode_all(vec![joined.welcome], &self.shared.metrics);
                frames.push(Frame::CatchUp(Box::new(joined.catch_up)));
                let job = Job {
                    room: Arc::clone(&handle),
                    record: None,
                    version: 0,
                    frames,
                };
                let submitted = self.shared.log.submit(job).await;
                drop(guard);
                self.room = Some(handle);
                self.expires = expires.map(expiry_instant);
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
                self.send_direct(text);
                Next::Close(CLOSE_POLICY, "hello refused".to_owned())
            }
        }
    }

    /// Cluster mode: the lease this node may serve `room` under, acquired now (`Ok(Ok)`), or
    /// what the connection does instead (`Ok(Err)`): relay to the owner, or, when it was
    /// forwarded here already, reconnect. A single server: `Ok(Ok(None))`.
    async fn owner(
        &mut self,
        room: &str,
        hello: &Envelope<HelloPayload>,
    ) -> Result<Result<Option<RoomLease>, Next>, kalphite_db::Error> {
        let Some(cluster) = &self.shared.cluster else {
            return Ok(Ok(None));
        };
        match cluster.acquire(room).await? {
            Owner::Me { term, row_version } => Ok(Ok(Some(RoomLease { term, row_version }))),
            Owner::Other { node, advertise } if self.forwarded || advertise.is_empty() => {
                tracing::debug!(conn = self.id, room, owner = %node,
                    "a forwarded hello for a room another node owns: the client reconnects");
                Ok(Err(Next::Close(
                    CLOSE_GOING_AWAY,
                    "room moved to another node; reconnect".into(),
                )))
            }
            Owner::Other { node, advertise } => {
                let hello = encode(&ClientMessage::Hello(hello.clone()))
                    .map_or_else(|_| Utf8Bytes::from_static("{}"), Utf8Bytes::from);
                Ok(Err(Next::Forward(Box::new(Forward {
                    node,
                    url: format!("ws://{advertise}/sync"),
                    hello,
                }))))
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
                version: 0,
                frames: encode_all(outs, metrics),
            },
            Step::Persist(pending) => match record_entity(&handle.id, pending.record()) {
                Ok(entity) => {
                    let version = pending.record().version;
                    match room.commit(pending) {
                        Ok(outs) => Job {
                            room: Arc::clone(handle),
                            record: Some(entity),
                            version,
                            frames: encode_all(outs, metrics),
                        },
                        Err(e) => {
                            tracing::error!(room = %handle.id, error = %e, "commit refused");
                            return Next::Continue;
                        }
                    }
                }
                Err(e) => match room.abort(pending, &e.to_string(), now) {
                    Ok(out) => Job {
                        room: Arc::clone(handle),
                        record: None,
                        version: 0,
                        frames: encode_all(vec![out], metrics),
                    },
                    Err(e) => {
                        tracing::error!(room = %handle.id, error = %e, "abort refused");
                        return Next::Continue;
                    }
                },
            },
        };
        // Tombstones past the horizon leave now and then, right behind this job.
        match self.shared.log.submit_then_collect(job, room, now).await {
            Ok(()) => Next::Continue,
            Err(_) => Next::Close(CLOSE_GOING_AWAY, "server shutting down".into()),
        }
    }

    /// Leaves the room, if joined.
    async fn leave(&mut self) {
        if let Some(handle) = self.room.take() {
            handle.members.lock().remove(&self.id);
            handle.joining.lock().remove(&self.id);
            let mut guard = handle.state.lock().await;
            if let Some(room) = guard.as_mut() {
                room.leave(self.id);
            }
        }
    }
}

/// The instant a token expiring at `exp` (seconds since the epoch) runs out; far in the
/// future when that is past what an [`Instant`] can hold.
fn expiry_instant(exp: u64) -> Instant {
    let left = exp.saturating_mul(1_000).saturating_sub(now_millis());
    let far = Duration::from_hours(100 * 365 * 24);
    let now = Instant::now();
    // (Only a clock near the end of what an Instant holds could fail the addition.)
    now.checked_add(Duration::from_millis(left).min(far))
        .unwrap_or(now)
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
        let live = !matches!(
            out.message,
            ServerMessage::Welcome(_) | ServerMessage::CatchUp(_)
        );
        match encode(&out.message) {
            Ok(text) => frames.push(Frame::Text {
                to: out.to,
                text: text.into(),
                live,
            }),
            Err(e) => tracing::error!(error = %e, "could not encode a server message"),
        }
    }
    frames
}
