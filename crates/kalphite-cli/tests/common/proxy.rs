//! A TCP proxy between a node and PostgreSQL that can cut every connection and refuse new
//! ones on cue (the node's database link fails while PostgreSQL and the other nodes go
//! on), or stop carrying bytes while keeping every connection open (a silent partition).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running proxy (stops accepting when dropped).
pub(crate) struct Proxy {
    /// Where the node connects.
    pub(crate) addr: SocketAddr,
    refusing: Arc<AtomicBool>,
    /// While set, no byte moves either way (connections stay open, new ones wait).
    frozen: watch::Sender<bool>,
    /// Bumped by every cut: each connection's task ends when it changes.
    cuts: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards every connection to `target`.
    pub(crate) async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let refusing = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (cuts, _) = watch::channel(0u64);
        let (frozen, _) = watch::channel(false);
        let task = {
            let refusing = Arc::clone(&refusing);
            let accepted = Arc::clone(&accepted);
            let cuts = cuts.clone();
            let frozen = frozen.clone();
            tokio::spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    if refusing.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let mut cut = cuts.subscribe();
                    let frozen = frozen.subscribe();
                    tokio::spawn(async move {
                        let Ok(outbound) = TcpStream::connect(target).await else {
                            return;
                        };
                        let (from_node, to_node) = inbound.into_split();
                        let (from_pg, to_pg) = outbound.into_split();
                        tokio::select! {
                            () = pump(from_node, to_pg, frozen.clone()) => {}
                            () = pump(from_pg, to_node, frozen) => {}
                            _ = cut.changed() => {}
                        }
                        // Dropping both ends closes them: the node sees its connection fail.
                    });
                }
            })
        };
        Self {
            addr,
            refusing,
            frozen,
            cuts,
            accepted,
            task,
        }
    }

    /// Cuts every open connection and refuses new ones until [`Proxy::restore`].
    pub(crate) fn cut(&self) {
        self.refusing.store(true, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Accepts connections again, and carries bytes again.
    pub(crate) fn restore(&self) {
        self.refusing.store(false, Ordering::SeqCst);
        self.frozen.send_replace(false);
    }

    /// Stops carrying bytes, both ways, on every connection (open or new), without
    /// closing any: to each end the other just goes silent, until [`Proxy::restore`].
    pub(crate) fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Connections forwarded so far.
    pub(crate) fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cuts.send_modify(|n| *n += 1);
    }
}

/// Copies `from` to `to` until either ends, holding every read while `frozen` is set.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just before a freeze are held too.
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
