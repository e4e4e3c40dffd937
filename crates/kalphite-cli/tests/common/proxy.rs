//! A TCP proxy between a node and PostgreSQL that can cut every connection and refuse new
//! ones on cue: the node's database link fails while PostgreSQL and the other nodes go on.

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
        let task = {
            let refusing = Arc::clone(&refusing);
            let accepted = Arc::clone(&accepted);
            let cuts = cuts.clone();
            tokio::spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    if refusing.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let mut cut = cuts.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(target).await else {
                            return;
                        };
                        let mut inbound = inbound;
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = cut.changed() => {}
                        }
                        // Dropping both ends resets them: the node sees its connection fail.
                    });
                }
            })
        };
        Self {
            addr,
            refusing,
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

    /// Accepts connections again.
    pub(crate) fn restore(&self) {
        self.refusing.store(false, Ordering::SeqCst);
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
