//! The async stream of notifications (the `runtime` feature): a tokio broadcast channel
//! fed with every notification while a stream is live. Writers never wait for it; a reader
//! that falls behind is told how much it missed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::broadcast;

use super::notify::Notification;

/// The sending side, held by the store's notifier.
pub(crate) struct Streams {
    sender: broadcast::Sender<Notification>,
    /// Live [`ChangeStream`]s. Counted here because `broadcast::Sender::receiver_count`
    /// takes the channel's lock, and the store asks on every write whether anyone listens.
    live: Arc<AtomicUsize>,
}

impl Streams {
    pub(crate) fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Self {
            sender,
            live: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Whether any stream is live.
    pub(crate) fn live(&self) -> bool {
        self.live.load(Ordering::Acquire) > 0
    }

    /// Hands `n` to every live stream.
    pub(crate) fn send(&self, n: &Notification) {
        if self.live() {
            // A send only fails when every receiver is gone, which is fine.
            let _ = self.sender.send(n.clone());
        }
    }

    pub(crate) fn subscribe(&self) -> ChangeStream {
        self.live.fetch_add(1, Ordering::AcqRel);
        ChangeStream {
            rx: self.sender.subscribe(),
            count: Arc::clone(&self.live),
        }
    }
}

/// Why [`ChangeStream::recv`] returned no notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// The reader fell behind and this many notifications were skipped; the next `recv`
    /// continues with the oldest one still buffered. Re-read the store to resynchronise.
    #[error("the change stream lagged; {0} notifications were skipped")]
    Lagged(u64),
    /// The store was dropped.
    #[error("the store is gone")]
    Closed,
}

/// An async stream of notifications, for tokio apps. Writers never wait for it: a reader
/// that falls more than the stream capacity behind is told it lagged.
pub struct ChangeStream {
    rx: broadcast::Receiver<Notification>,
    /// The notifier's count of live streams, decremented on drop.
    count: Arc<AtomicUsize>,
}

impl Drop for ChangeStream {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ChangeStream {
    /// The next notification.
    ///
    /// # Errors
    /// [`RecvError::Lagged`] when notifications were skipped, [`RecvError::Closed`] when
    /// the store is gone.
    pub async fn recv(&mut self) -> Result<Notification, RecvError> {
        self.rx.recv().await.map_err(|e| match e {
            broadcast::error::RecvError::Lagged(n) => RecvError::Lagged(n),
            broadcast::error::RecvError::Closed => RecvError::Closed,
        })
    }

    /// The next notification if one is ready, without waiting.
    ///
    /// # Errors
    /// As [`Self::recv`]; `Ok(None)` when nothing is ready.
    pub fn try_recv(&mut self) -> Result<Option<Notification>, RecvError> {
        match self.rx.try_recv() {
            Ok(n) => Ok(Some(n)),
            Err(broadcast::error::TryRecvError::Empty) => Ok(None),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
            Err(broadcast::error::TryRecvError::Closed) => Err(RecvError::Closed),
        }
    }
}
