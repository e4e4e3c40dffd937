//! [`FlushTarget`]: where the flush engine writes batches of changes, and the ready-made
//! targets: a closure ([`FnTarget`]) and a fan-out to several targets ([`FanOut`]).

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;

use crate::change::Change;

/// Why a target could not write a batch. Targets return their own error types boxed.
pub type TargetError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A destination for batches of changes: the database, a sync client, a test double.
///
/// `write` receives changes deduplicated per entity, in the order they happened, at most
/// `max_batch_size` at a time. It must either write the whole batch or return an error
/// (the engine then retries the whole batch, so writes must be idempotent per entity).
#[async_trait]
pub trait FlushTarget: Send + Sync + 'static {
    /// Writes one batch.
    async fn write(&self, batch: &[Change]) -> Result<(), TargetError>;

    /// A short name for logs and error events.
    fn name(&self) -> &str {
        "target"
    }
}

#[async_trait]
impl<T: FlushTarget + ?Sized> FlushTarget for Arc<T> {
    async fn write(&self, batch: &[Change]) -> Result<(), TargetError> {
        (**self).write(batch).await
    }
    fn name(&self) -> &str {
        (**self).name()
    }
}

/// A target made from an async closure that receives an owned copy of each batch.
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

/// Sends every batch to each of several targets, in order; fails if any of them fails.
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
    fn name(&self) -> &str {
        "fan-out"
    }
}
