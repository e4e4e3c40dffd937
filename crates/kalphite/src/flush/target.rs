//! [`FlushTarget`]: where the flush engine writes [`Batch`]es of changes and annotations, and
//! the ready-made targets: a closure ([`FnTarget`]) and a fan-out to several targets
//! ([`FanOut`]).

use std::any::Any;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;

use crate::change::Change;

/// Why a target could not write a batch. Targets return their own error types boxed.
pub type TargetError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Opaque bookkeeping that travels with the changes of the transaction that scheduled it
/// (see [`crate::FlushEngine::schedule_annotated`]). The engine never looks inside: it
/// keeps the latest annotation per key and hands it to [`FlushTarget::write_batch`] in the
/// same batch as that transaction's changes.
pub type Annotation = Arc<dyn Any + Send + Sync>;

/// One batch: the changes and annotations of a run of whole store transactions.
///
/// Written on top of the previous batches, it leaves the target at the state after the
/// newest transaction it holds: no transaction is split, and nothing a later batch holds
/// was written before that transaction.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    /// The changes, deduplicated per entity (the newest content), in first-scheduled order.
    pub changes: &'a [Change],
    /// The annotations, the newest per key, in first-scheduled order.
    pub annotations: &'a [(Arc<str>, Annotation)],
}

impl Batch<'_> {
    /// The annotation under `key`, if the batch carries one.
    #[must_use]
    pub fn annotation(&self, key: &str) -> Option<&Annotation> {
        self.annotations
            .iter()
            .find(|(k, _)| &**k == key)
            .map(|(_, a)| a)
    }

    /// The annotation under `key`, if the batch carries one of type `T`.
    #[must_use]
    pub fn annotation_as<T: Any>(&self, key: &str) -> Option<&T> {
        self.annotation(key).and_then(|a| a.downcast_ref::<T>())
    }

    /// Whether the batch holds neither changes nor annotations.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.annotations.is_empty()
    }
}

/// A destination for batches of changes: the database, a sync client, a test double.
///
/// A batch holds changes deduplicated per entity, in the order they happened, and ends only
/// at a store-transaction boundary: a transaction is never split (so a batch may exceed
/// `max_batch_size`), and applying the batches in order always leaves the target at the
/// state after some transaction. A target must either write the whole batch or return an
/// error (the engine then tries again, possibly with a larger batch that also holds newer
/// transactions, so writes must be idempotent per entity).
///
/// The engine calls [`Self::write_batch`]; a target that stores annotations overrides it,
/// any other implements only [`Self::write`].
#[async_trait]
pub trait FlushTarget: Send + Sync + 'static {
    /// Writes the changes of one batch (never empty when called by [`Self::write_batch`]'s
    /// default).
    async fn write(&self, batch: &[Change]) -> Result<(), TargetError>;

    /// Writes one batch, changes and annotations together (in one database transaction,
    /// for a database). The default writes the changes with [`Self::write`], ignores the
    /// annotations, and does nothing for a batch without changes.
    async fn write_batch(&self, batch: &Batch<'_>) -> Result<(), TargetError> {
        if batch.changes.is_empty() {
            return Ok(());
        }
        self.write(batch.changes).await
    }

    /// A short name for logs and error events.
    // The default returns a literal, but implementors may return a name they own.
    #[allow(clippy::unnecessary_literal_bound)]
    fn name(&self) -> &str {
        "target"
    }
}

#[async_trait]
impl<T: FlushTarget + ?Sized> FlushTarget for Arc<T> {
    async fn write(&self, batch: &[Change]) -> Result<(), TargetError> {
        (**self).write(batch).await
    }
    async fn write_batch(&self, batch: &Batch<'_>) -> Result<(), TargetError> {
        (**self).write_batch(batch).await
    }
    fn name(&self) -> &str {
        (**self).name()
    }
}

/// A target made from an async closure that receives an owned copy of each batch's changes
/// (annotations are ignored).
pub struct FnTarget<F> {
    name: String,
    f: F,
}

impl<F, Fut> FnTarget<F>
where
    F: Fn(Vec<Change>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), TargetError>> + Send + 'static,
{
    /// Wraps `f`.
    pub fn new(name: impl Into<String>, f: F) -> Self {
        Self {
            name: name.into(),
            f,
        }
    }
}

#[async_trait]
impl<F, Fut> FlushTarget for FnTarget<F>
where
    F: Fn(Vec<Change>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), TargetError>> + Send + 'static,
{
    async fn write(&self, batch: &[Change]) -> Result<(), TargetError> {
        (self.f)(batch.to_vec()).await
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// Sends every batch (changes and annotations) to each of several targets, in order; fails
/// if any of them fails.
///
/// Because the engine retries a failed batch as a whole, targets behind a fan-out must
/// accept the same batch twice (every built-in target does: writes are upserts/deletes).
pub struct FanOut {
    targets: Vec<Arc<dyn FlushTarget>>,
}

impl FanOut {
    /// A fan-out over `targets`.
    #[must_use]
    pub fn new(targets: Vec<Arc<dyn FlushTarget>>) -> Self {
        Self { targets }
    }
}

#[async_trait]
impl FlushTarget for FanOut {
    async fn write(&self, batch: &[Change]) -> Result<(), TargetError> {
        for target in &self.targets {
            target
                .write(batch)
                .await
                .map_err(|e| -> TargetError { format!("{}: {e}", target.name()).into() })?;
        }
        Ok(())
    }
    async fn write_batch(&self, batch: &Batch<'_>) -> Result<(), TargetError> {
        for target in &self.targets {
            target
                .write_batch(batch)
                .await
                .map_err(|e| -> TargetError { format!("{}: {e}", target.name()).into() })?;
        }
        Ok(())
    }
    fn name(&self) -> &'static str {
        "fan-out"
    }
}
