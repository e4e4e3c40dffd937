//! Cluster mode: relaying a connection to the node that owns its room. The node that took
//! the client's hello opens a WebSocket to the owner's advertised address (marked as
//! forwarded, so the owner never relays it again), sends the hello on (the owner checks
//! its token itself, as for any client), then copies frames both ways until either side
//! closes; the owner's close code and reason reach the client unchanged.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message as Upstream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as UpstreamClose;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::Shared;
use super::metrics::Metrics;
use super::outbox::Outbox;

/// The request header that marks a connection relayed by another node (its value: that
/// node's id).
pub(crate) const FORWARDED_BY: &str = "x-kalphite-forwarded-by";

/// Longest wait for the owner to accept the relayed connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const CLOSE_GOING_AWAY: u16 = 1001;

/// The close reason a relayed client gets when the owner's side of the relay ends.
const OWNER_GONE: &str = "the room's owner went away; reconnect";

/// Where a connection is relayed, and the hello that starts it there.
pub(crate) struct Forward {
    /// The owner's node id.
    pub(crate) node: String,
    /// The owner's `/sync` URL.
    pub(crate) url: String,
    /// The client's hello, encoded.
    pub(crate) hello: Utf8Bytes,
}

/// Counts an open relay while it lives.
struct OpenRelay<'a>(&'a Metrics);

impl Drop for OpenRelay<'_> {
    fn drop(&mut self) {
        Metrics::dec(&self.0.cluster.forwarded_open);
    }
}

/// Relays `client` to the owner named in `to` until either side ends (or the server shuts
/// down). What was queued for the client before its hello (replies) is written first.
pub(crate) async fn relay(client: &mut WebSocket, to: Forward, shared: &Shared, outbox: &Outbox) {
    let metrics = &shared.metrics;
    Metrics::inc(&metrics.cluster.forwarded_connections);
    Metrics::inc(&metrics.cluster.forwarded_open);
    let _open = OpenRelay(metrics);
    let write_timeout = shared.config.write_timeout;
    for text in outbox.take_all() {
        if !sent(write_timeout, client, Message::Text(text)).await {
            return;
        }
    }
    let node = shared
        .cluster
        .as_ref()
        .map_or("", |c| c.config.node_id.as_str());
    let mut upstream = match connect(&to, node).await {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::warn!(owner = %to.node, url = %to.url, error = %e,
                "could not relay a connection to its room's owner");
            let reason = "the room's owner could not be reached; reconnect";
            sent(write_timeout, client, close(CLOSE_GOING_AWAY, reason)).await;
            return;
        }
    };
    tracing::debug!(owner = %to.node, "relaying a connection to its room's owner");
    // A paused or cut-off owner keeps the relay's socket open: the relay pings it, and a
    // silence longer than the lease TTL and a half (its rooms have moved by then, or are
    // about to) sends the client away to reconnect.
    let ttl = shared
        .cluster
        .as_ref()
        .map_or(super::cluster::DEFAULT_LEASE_TTL, |c| c.config.lease_ttl);
    let mut ping = tokio::time::interval(ttl / 2);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = tokio::time::Instant::now();
    let hello = Upstream::Text(to.hello.as_str().into());
    if !sent(write_timeout, &mut upstream, hello).await {
        sent(write_timeout, client, close(CLOSE_GOING_AWAY, OWNER_GONE)).await;
        return;
    }
    loop {
        tokio::select! {
            () = shared.cancel.cancelled() => {
                sent(write_timeout, client, close(CLOSE_GOING_AWAY, "server shutting down")).await;
                let _ = timeout(write_timeout, upstream.close(None)).await;
                return;
            }
            _ = ping.tick() => {
                if heard.elapsed() > ttl + ttl / 2 {
                    tracing::warn!(owner = %to.node, "the room's owner stopped answering a relayed connection");
                    sent(write_timeout, client, close(CLOSE_GOING_AWAY, "the room's owner stopped answering; reconnect")).await;
                    return;
                }
                if !sent(write_timeout, &mut upstream, Upstream::Ping(axum::body::Bytes::new())).await {
                    sent(write_timeout, client, close(CLOSE_GOING_AWAY, OWNER_GONE)).await;
                    return;
                }
            }
            from_client = client.next() => {
                let message = match from_client {
                    Some(Ok(Message::Text(text))) => Upstream::Text(text.as_str().into()),
                    Some(Ok(Message::Binary(bytes))) => Upstream::Binary(bytes),
                    // Answered by each WebSocket layer on its own hop.
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(frame))) => {
                        let frame = frame.map(|f| UpstreamClose {
                            code: CloseCode::from(f.code),
                            reason: f.reason.as_str().into(),
                        });
                        let _ = timeout(write_timeout, upstream.close(frame)).await;
                        return;
                    }
                    Some(Err(_)) | None => {
                        let _ = timeout(write_timeout, upstream.close(None)).await;
                        return;
                    }
                };
                if !sent(write_timeout, &mut upstream, message).await {
                    sent(write_timeout, client, close(CLOSE_GOING_AWAY, OWNER_GONE)).await;
                    return;
                }
            }
            from_owner = upstream.next() => {
                heard = tokio::time::Instant::now();
                let message = match from_owner {
                    Some(Ok(Upstream::Text(text))) => Message::Text(text.as_str().into()),
                    Some(Ok(Upstream::Binary(bytes))) => Message::Binary(bytes),
                    Some(Ok(Upstream::Ping(_) | Upstream::Pong(_) | Upstream::Frame(_))) => continue,
                    Some(Ok(Upstream::Close(frame))) => {
                        let (code, reason) = frame.map_or((CLOSE_GOING_AWAY, String::new()), |f| {
                            (u16::from(f.code), f.reason.as_str().to_owned())
                        });
                        sent(write_timeout, client, close(code, &reason)).await;
                        return;
                    }
                    Some(Err(_)) | None => {
                        sent(write_timeout, client, close(CLOSE_GOING_AWAY, OWNER_GONE)).await;
                        return;
                    }
                };
                if !sent(write_timeout, client, message).await {
                    let _ = timeout(write_timeout, upstream.close(None)).await;
                    return;
                }
            }
        }
    }
}

type UpstreamSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the relayed connection to the owner, marked as forwarded by `node`.
async fn connect(to: &Forward, node: &str) -> Result<UpstreamSocket, String> {
    let mut request = to
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let value = node.parse().map_err(|_| "node id is not a header value")?;
    request.headers_mut().insert(FORWARDED_BY, value);
    match timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(request)).await {
        Ok(Ok((socket, _))) => Ok(socket),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
    }
}

/// Sends `message` on `sink`, giving up after `limit`; whether it went out.
async fn sent<S, M>(limit: Duration, sink: &mut S, message: M) -> bool
where
    S: futures_util::Sink<M> + Unpin,
{
    matches!(timeout(limit, sink.send(message)).await, Ok(Ok(())))
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}
