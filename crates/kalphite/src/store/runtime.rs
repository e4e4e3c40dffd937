//! The store's async half (the `runtime` feature): the flush engines it feeds and controls
//! (flush now, durability waits, pause, close) and its async change stream. Without it the
//! store is synchronous and memory-only, which is all the sans-IO sync core needs.

use std::sync::Arc;

use super::{ChangeSink, ChangeStream, Store, StoreBuilder};
use crate::change::Change;
use crate::flush::{Durability, FlushEngine, FlushError, ShutdownError};

impl StoreBuilder {
    /// Persists every accepted change through `engine` (several engines may be added:
    /// one per target, such as the database and the sync client).
    pub fn flush_engine(mut self, engine: FlushEngine) -> Self {
        self.sinks.push(Arc::new(engine.clone()));
        self.engines.push(engine);
        self
    }

    /// Like [`Self::flush_engine`], except that the store does not schedule changes on
    /// `engine` itself: `feeder` is added as a sink (in builder order with the other sinks)
    /// and is expected to schedule each committed write on the engine, typically with
    /// [`FlushEngine::schedule_annotated`] to write bookkeeping in the same batches. The
    /// store still controls the engine: [`Store::flush_now`], [`Store::durable`] at its
    /// durability level, pause and resume, [`Store::queued_changes`], [`Store::close`],
    /// and draining when the last handle is dropped.
    pub fn flush_engine_via(mut self, engine: FlushEngine, feeder: Arc<dyn ChangeSink>) -> Self {
        self.sinks.push(feeder);
        self.engines.push(engine);
        self
    }

    /// How many notifications an async [`ChangeStream`] buffers before a slow reader is
    /// told it lagged (default 1024).
    pub fn stream_capacity(mut self, capacity: usize) -> Self {
        self.stream_capacity = capacity;
        self
    }
}

impl Store {
    /// An async stream of notifications (for tokio apps).
    #[must_use]
    pub fn changes(&self) -> ChangeStream {
        self.inner.notifier.stream()
    }

    /// Writes everything queued so far to every flush target now (ignoring debounce and
    /// pause); resolves when it is written.
    ///
    /// # Errors
    /// The first engine's [`FlushError`]; the changes stay queued.
    pub fn flush_now(&self) -> impl Future<Output = Result<(), FlushError>> + Send + 'static {
        let waits: Vec<_> = self
            .inner
            .engines
            .iter()
            .map(FlushEngine::flush_now)
            .collect();
        async move {
            for w in waits {
                w.await?;
            }
            Ok(())
        }
    }

    /// Resolves once every change accepted before this call is durable at `level`:
    /// [`Durability::Memory`] at once, [`Durability::Local`] when the local targets (the
    /// database) have written it, [`Durability::Server`] when the server acknowledged it.
    ///
    /// # Errors
    /// [`FlushError::NoTarget`] if no engine provides `level`; otherwise the cause of the
    /// failed write (the changes stay queued and are retried).
    pub fn durable(
        &self,
        level: Durability,
    ) -> impl Future<Output = Result<(), FlushError>> + Send + 'static {
        let engines: Vec<_> = self
            .inner
            .engines
            .iter()
            .filter(|e| e.config().durability == level)
            .collect();
        let missing = level != Durability::Memory && engines.is_empty();
        let waits: Vec<_> = engines.into_iter().map(FlushEngine::durable).collect();
        async move {
            if missing {
                return Err(FlushError::NoTarget { level });
            }
            for w in waits {
                w.await?;
            }
            Ok(())
        }
    }

    /// Holds all flushing until [`Self::resume_flush`]; nothing is dropped meanwhile.
    pub fn pause_flush(&self) {
        self.inner.engines.iter().for_each(FlushEngine::pause);
    }

    /// Releases [`Self::pause_flush`].
    pub fn resume_flush(&self) {
        self.inner.engines.iter().for_each(FlushEngine::resume);
    }

    /// Every change not yet written by every engine (empty without engines).
    #[must_use]
    pub fn queued_changes(&self) -> Vec<Change> {
        self.inner
            .engines
            .iter()
            .flat_map(FlushEngine::queued_changes)
            .collect()
    }

    /// The store's flush engines.
    #[must_use]
    pub fn flush_engines(&self) -> &[FlushEngine] {
        &self.inner.engines
    }

    /// Drains every flush engine and stops them. The store stays readable and writable
    /// in memory, but later writes are no longer persisted.
    ///
    /// # Errors
    /// [`ShutdownError`] with every change that could not be written.
    pub async fn close(&self) -> Result<(), ShutdownError> {
        let mut unwritten = Vec::new();
        let mut cause = None;
        for engine in &self.inner.engines {
            if let Err(e) = engine.shutdown().await {
                unwritten.extend(e.unwritten);
                cause = Some(e.cause);
            }
        }
        match cause {
            None => Ok(()),
            Some(cause) => Err(ShutdownError { unwritten, cause }),
        }
    }
}
