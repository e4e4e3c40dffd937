//! The accepting side: a listener that closes sockets beyond the server's socket budget at
//! once, and the socket type every connection runs on. Until its WebSocket upgrade a
//! socket must send each complete HTTP request within the header timeout (or it is
//! closed), and it is dropped when shutdown's grace period ends; after the upgrade a write
//! that makes no progress for the write timeout ends it. A socket the server closed with a
//! close frame lingers briefly after it is dropped: its write side is shut (FIN after the
//! close frame) and what the client still sends is read and discarded until it closes, so
//! the kernel does not answer unread input with a reset that can destroy the close frame
//! before the client reads it (a frame over the hard limit is not read at all).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep, sleep, sleep_until};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::metrics::Metrics;

/// Pause after an accept error that is not about one connection (such as running out of
/// file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Longest a closed socket lingers, discarding what the client still sends.
const LINGER: Duration = Duration::from_secs(2);

/// Descriptors kept for everything but client sockets (database, listener, logs) when the
/// connection limit is fitted to the open-file limit.
const SPARE_FILES: usize = 64;

/// What a [`BoundedListener`] enforces.
#[derive(Clone, Copy)]
pub(crate) struct SocketLimits {
    /// Most sockets open at once; more are closed as soon as they are accepted.
    pub(crate) max_sockets: usize,
    pub(crate) handshake_timeout: Duration,
    pub(crate) write_timeout: Duration,
}

/// What every socket of a listener shares (one copy, not one per socket: an idle
/// connection's size is the server's capacity).
struct Common {
    /// Open sockets, decremented as each is dropped.
    open: AtomicUsize,
    metrics: Arc<Metrics>,
    handshake_timeout: Duration,
    write_timeout: Duration,
}

/// A TCP listener that keeps the number of open sockets within a budget.
pub(crate) struct BoundedListener {
    tcp: TcpListener,
    max_sockets: usize,
    common: Arc<Common>,
    /// Shutdown's hard stop: sockets not yet upgraded fail their I/O when it fires.
    stop: CancellationToken,
}

impl BoundedListener {
    pub(crate) fn new(
        tcp: TcpListener,
        limits: SocketLimits,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Self {
        Self {
            tcp,
            max_sockets: limits.max_sockets,
            common: Arc::new(Common {
                open: AtomicUsize::new(0),
                metrics,
                handshake_timeout: limits.handshake_timeout,
                write_timeout: limits.write_timeout,
            }),
            stop,
        }
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = Socket;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Socket, SocketAddr) {
        loop {
            let (tcp, addr) = match self.tcp.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) {
                        tracing::error!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    continue;
                }
            };
            // Only this loop adds, so the check and the add cannot race with each other.
            let common = &self.common;
            if common.open.load(Ordering::Acquire) >= self.max_sockets {
                Metrics::inc(&common.metrics.connections_refused);
                tracing::debug!(%addr, "socket limit reached: connection closed");
                drop(tcp);
                continue;
            }
            common.open.fetch_add(1, Ordering::AcqRel);
            Metrics::inc(&common.metrics.sockets);
            // Small frames (acks, broadcasts) must not wait for Nagle's algorithm.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY");
            }
            let peer = Peer(Arc::new(PeerState {
                upgraded: AtomicBool::new(false),
                stalled: AtomicBool::new(false),
                linger: AtomicBool::new(false),
                deadline: parking_lot::Mutex::new(Some(Instant::now() + common.handshake_timeout)),
                common: Arc::clone(common),
            }));
            let socket = Socket {
                tcp: Some(tcp),
                peer,
                deadline: None,
                stall: None,
                stop: Some(Box::pin(self.stop.clone().cancelled_owned())),
                failed: None,
            };
            return (socket, addr);
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

impl Common {
    /// A socket is gone: it no longer counts against the limit.
    fn closed(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        Metrics::dec(&self.metrics.sockets);
    }
}

/// A socket's state shared with the HTTP handlers (through `ConnectInfo`): its header
/// deadline, whether it was upgraded, whether a write stalled.
#[derive(Clone)]
pub(crate) struct Peer(Arc<PeerState>);

struct PeerState {
    upgraded: AtomicBool,
    stalled: AtomicBool,
    /// The server sent a close frame: linger when the socket is dropped.
    linger: AtomicBool,
    /// When the socket is closed unless a request is under way; `None` while one is
    /// handled, and for good after the upgrade. A plain mutex: read on each poll of a
    /// socket not yet upgraded, written once per request.
    deadline: parking_lot::Mutex<Option<Instant>>,
    common: Arc<Common>,
}

impl Peer {
    /// A request has arrived: no deadline while it is handled.
    pub(crate) fn request_started(&self) {
        *self.0.deadline.lock() = None;
    }

    /// A response is ready: the next request (or the upgrade) must come within the header
    /// timeout; the response itself must be written by then too.
    pub(crate) fn request_done(&self) {
        if !self.0.upgraded.load(Ordering::Acquire) {
            *self.0.deadline.lock() = Some(Instant::now() + self.0.common.handshake_timeout);
        }
    }

    /// The socket becomes a WebSocket: the connection task watches it from now on.
    pub(crate) fn upgrade(&self) {
        self.0.upgraded.store(true, Ordering::Release);
        *self.0.deadline.lock() = None;
    }

    /// True once a write made no progress for the write timeout (the socket has failed).
    pub(crate) fn write_stalled(&self) -> bool {
        self.0.stalled.load(Ordering::Acquire)
    }

    /// The server has written its close frame: when the socket is dropped, shut its write
    /// side and discard the client's input until it closes (at most [`LINGER`]).
    pub(crate) fn linger(&self) {
        self.0.linger.store(true, Ordering::Release);
    }
}

impl Connected<IncomingStream<'_, BoundedListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, BoundedListener>) -> Self {
        stream.io().peer.clone()
    }
}

/// An accepted TCP socket with the deadlines above. Once it fails it stays failed: every
/// later read or write returns the same error, so the connection ends.
pub(crate) struct Socket {
    /// `None` only once dropped (a lingering socket is handed to its linger task).
    tcp: Option<TcpStream>,
    /// Its shared state, and through it the listener's (counted open until dropped).
    peer: Peer,
    /// The header deadline's timer (allocated on first use, freed at the upgrade).
    deadline: Option<Pin<Box<Sleep>>>,
    /// Runs while a write after the upgrade waits for the client to read.
    stall: Option<Pin<Box<Sleep>>>,
    /// Shutdown's hard stop, until the upgrade (then the connection task watches it).
    stop: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    failed: Option<io::ErrorKind>,
}

impl Socket {
    fn fail(&mut self, kind: io::ErrorKind) -> io::Error {
        self.failed = Some(kind);
        self.deadline = None;
        self.stall = None;
        self.stop = None;
        io::Error::from(kind)
    }

    /// Fails the socket when a deadline has passed; registers the timers' wake-ups.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some(kind) = self.failed {
            return Err(io::Error::from(kind));
        }
        if self.peer.0.upgraded.load(Ordering::Acquire) {
            if self.stop.is_some() {
                self.stop = None;
                self.deadline = None;
            }
            return Ok(());
        }
        if let Some(stop) = &mut self.stop
            && stop.as_mut().poll(cx).is_ready()
        {
            return Err(self.fail(io::ErrorKind::ConnectionAborted));
        }
        let deadline = *self.peer.0.deadline.lock();
        if let Some(at) = deadline {
            let timer = self
                .deadline
                .get_or_insert_with(|| Box::pin(sleep_until(at)));
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            if timer.as_mut().poll(cx).is_ready() {
                Metrics::inc(&self.peer.0.common.metrics.handshake_timeouts);
                return Err(self.fail(io::ErrorKind::TimedOut));
            }
        }
        Ok(())
    }

    /// After a write attempt: a pending write of an upgraded socket starts (or keeps) the
    /// stall timer, progress stops it; past the write timeout the socket fails.
    fn watch_stall<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stall = None;
            return r;
        }
        if !self.peer.0.upgraded.load(Ordering::Acquire) {
            // The header deadline bounds writes before the upgrade.
            return r;
        }
        let timeout = self.peer.0.common.write_timeout;
        let timer = self.stall.get_or_insert_with(|| Box::pin(sleep(timeout)));
        if timer.as_mut().poll(cx).is_ready() {
            self.peer.0.stalled.store(true, Ordering::Release);
            let metrics = &self.peer.0.common.metrics;
            Metrics::inc(&metrics.write_timeouts);
            Metrics::inc(&metrics.slow_consumers);
            return Poll::Ready(Err(self.fail(io::ErrorKind::TimedOut)));
        }
        r
    }
}

impl Socket {
    /// The TCP stream, or `NotConnected` once it was handed to its linger task.
    fn tcp(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        self.tcp
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        let lingering = self.failed.is_none() && self.peer.0.linger.load(Ordering::Acquire);
        if lingering
            && let Some(tcp) = self.tcp.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // The socket stays counted until its linger ends.
            let common = Arc::clone(&self.peer.0.common);
            runtime.spawn(async move {
                linger(tcp).await;
                common.closed();
            });
            return;
        }
        self.peer.0.common.closed();
    }
}

/// Shuts the write side (the client reads our close frame, then end of stream) and reads
/// and discards until the client closes, or for at most [`LINGER`].
async fn linger(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let drain = async {
        let _ = tcp.shutdown().await;
        let mut scratch = [0u8; 4096];
        while matches!(tcp.read(&mut scratch).await, Ok(n) if n > 0) {}
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        this.tcp()?.poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        let r = this.tcp()?.poll_write(cx, buf);
        this.watch_stall(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        let r = this.tcp()?.poll_write_vectored(cx, bufs);
        this.watch_stall(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.as_ref().is_some_and(TcpStream::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Not a sign of progress: a TCP flush is immediate whatever the peer reads.
        let this = self.get_mut();
        this.check(cx)?;
        this.tcp()?.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().tcp()?.poll_shutdown(cx)
    }
}

/// The soft limit on open files of this process (Linux: `/proc/self/limits`).
pub(crate) fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The connection limit that fits `files` open files with `reserved` more sockets and the
/// server's own descriptors; `None` when `max_connections` already fits.
pub(crate) fn fit_to_files(max_connections: usize, reserved: usize, files: usize) -> Option<usize> {
    let fit = files
        .saturating_sub(reserved.saturating_add(SPARE_FILES))
        .max(1);
    (max_connections > fit).then_some(fit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_limit_is_fitted_to_the_open_file_limit() {
        // The case: 256 descriptors. 176 WebSockets + 16 reserved sockets + 64.
        assert_eq!(fit_to_files(10_000, 16, 256), Some(176));
        assert_eq!(fit_to_files(100, 16, 256), None);
        assert_eq!(fit_to_files(10_000, 16, 20), Some(1));
        assert!(open_file_limit().is_none_or(|n| n > 0));
    }
}
