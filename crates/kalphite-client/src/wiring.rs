//! The two hooks that wire a [`Store`](kalphite::Store) to the client: a sink that puts
//! every local change into the replica's outbox as the store commits it (so a remote
//! change can never overtake a local edit still waiting for a flush), and the flush
//! target of the `Server` durability level, whose batches complete once acknowledged.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use kalphite::{Change, ChangeSink, FlushTarget, TargetError, now_millis};

use super::{Inner, SyncError, SyncEvent, is_local};

/// Feeds each committed store transaction to the replica and to the local flush engine
/// (called by the store inside the commit): local changes enter the outbox, and the
/// transaction's changes are scheduled together with every bookkeeping change the
/// replica made up to this point, so the flush writes them in one database transaction.
pub(crate) struct Feeder(pub(crate) Arc<Inner>);

impl ChangeSink for Feeder {
    fn accept(&self, changes: &[Change]) {
        let now = now_millis();
        let mut errors = Vec::new();
        {
            let mut send = Vec::new();
            let mut replica = self.0.replica.lock();
            for change in changes.iter().filter(|c| is_local(c)) {
                match replica.local_change(change, now) {
                    Ok(msgs) => send.extend(msgs),
                    Err(e) => errors.push(format!("{}/{}: {e}", change.kind, change.id)),
                }
            }
            // Sent before the bookkeeping is scheduled, so the message leaves sooner. It
            // never waited for the flush: a crash before it leaves a change the room may
            // have, which the next catch-up brings back, and the welcome's replica
            // counter keeps its message id from being reused.
            self.0.send(send);
            self.0.schedule_with_delta(&mut replica, changes);
        }
        for message in errors {
            self.0.emit(SyncEvent::Error {
                code: None,
                message: format!("local change not queued for sync: {message}"),
            });
        }
    }
}

/// The `Durability::Server` flush target: a batch is written once the server
/// acknowledged every local change made before it. Remote and storage changes need
/// nothing (no echo).
pub(crate) struct ServerTarget(pub(crate) Arc<Inner>);

#[async_trait]
impl FlushTarget for ServerTarget {
    async fn write(&self, batch: &[Change]) -> Result<(), TargetError> {
        if !batch.iter().any(is_local) {
            return Ok(());
        }
        let inner = &self.0;
        // The sink recorded every change of the batch before the engine saw it, so
        // waiting for everything recorded so far covers the batch.
        let target = inner.replica.lock().last_seq();
        let mut rx = inner.acked.subscribe();
        loop {
            if inner.replica.lock().acked_through() >= target {
                return Ok(());
            }
            if inner.closed.load(Ordering::Acquire) {
                return Err(Box::new(SyncError::Closed));
            }
            if rx.changed().await.is_err() {
                return Err(Box::new(SyncError::Closed));
            }
        }
    }

    fn name(&self) -> &'static str {
        "sync-server"
    }
}
