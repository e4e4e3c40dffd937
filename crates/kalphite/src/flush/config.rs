//! [`FlushConfig`]: the flush engine's timing and batching knobs, with the spec's defaults.

use std::time::Duration;

use crate::error::{Error, Result};

/// How far a write has to travel before [`crate::Store::durable`] resolves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Durability {
    /// Accepted in memory (always true once a write returns).
    Memory,
    /// Written by the local flush targets (the database).
    Local,
    /// Acknowledged by the sync server.
    Server,
}

/// Flush engine configuration. `FlushConfig::default()` gives the spec's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlushConfig {
    /// Quiet time after the last change before a flush starts; each change restarts it.
    pub debounce: Duration,
    /// Longest a change waits under a steady stream of writes (the debounce never
    /// postpones a flush past this).
    pub max_wait: Duration,
    /// Retries of a failed batch before the engine gives up for now (so `max_retries + 1`
    /// attempts in a row): the waiters then fail, the batch stays queued and the engine
    /// keeps trying on its own, every `max_retries + 1` further failures giving up again.
    pub max_retries: u32,
    /// Delay before the first retry; doubled for each later one, up to `max_retry_delay`.
    pub base_retry_delay: Duration,
    /// The longest wait between two attempts, however many failed before.
    pub max_retry_delay: Duration,
    /// Changes in one batch, a soft limit: a batch is extended to the end of the store
    /// transactions it holds, and carries their annotations (bookkeeping such as a sync
    /// client's outbox rows) uncounted. A full batch flushes without waiting for the
    /// debounce.
    pub max_batch_size: usize,
    /// `false` makes the engine a no-op (a memory-only store).
    pub enable_persistence: bool,
    /// Which durability level this engine's target provides.
    pub durability: Durability,
}

impl Default for FlushConfig {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(100),
            max_wait: Duration::from_secs(1),
            max_retries: 3,
            base_retry_delay: Duration::from_millis(100),
            max_retry_delay: Duration::from_secs(30),
            max_batch_size: 100,
            enable_persistence: true,
            durability: Durability::Local,
        }
    }
}

impl FlushConfig {
    /// Sets the debounce.
    #[must_use]
    pub fn debounce(mut self, d: Duration) -> Self {
        self.debounce = d;
        self
    }

    /// Sets the longest wait under a steady stream of writes.
    #[must_use]
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.max_wait = d;
        self
    }

    /// Sets the number of retries.
    #[must_use]
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// Sets the first retry delay.
    #[must_use]
    pub fn base_retry_delay(mut self, d: Duration) -> Self {
        self.base_retry_delay = d;
        self
    }

    /// Sets the longest wait between two attempts.
    #[must_use]
    pub fn max_retry_delay(mut self, d: Duration) -> Self {
        self.max_retry_delay = d;
        self
    }

    /// Sets the batch size (a soft limit: transactions are never split).
    #[must_use]
    pub fn max_batch_size(mut self, n: usize) -> Self {
        self.max_batch_size = n;
        self
    }

    /// Turns persistence on or off.
    #[must_use]
    pub fn enable_persistence(mut self, on: bool) -> Self {
        self.enable_persistence = on;
        self
    }

    /// Sets the durability level the target provides.
    #[must_use]
    pub fn durability(mut self, level: Durability) -> Self {
        self.durability = level;
        self
    }

    /// Checks the configuration.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a zero batch size, a `max_wait` shorter than the
    /// debounce, a zero retry delay with retries enabled, a zero `max_retry_delay` or one
    /// shorter than `base_retry_delay`, more than 30 retries, or `Durability::Memory`.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidConfig(m.to_owned()));
        if self.max_batch_size == 0 {
            return bad("max_batch_size must be at least 1");
        }
        if self.max_wait < self.debounce {
            return bad("max_wait must not be shorter than debounce");
        }
        if self.max_retries > 0 && self.base_retry_delay.is_zero() {
            return bad("base_retry_delay must be positive when retries are enabled");
        }
        if self.max_retries > 30 {
            return bad("max_retries must be at most 30");
        }
        if self.max_retry_delay.is_zero() {
            return bad("max_retry_delay must be positive");
        }
        if self.max_retry_delay < self.base_retry_delay {
            return bad("max_retry_delay must not be shorter than base_retry_delay");
        }
        if self.durability == Durability::Memory {
            return bad("a flush target cannot provide Durability::Memory; use Local or Server");
        }
        Ok(())
    }

    /// The wait after failed attempt number `failure` (1-based, counted since the last
    /// successful write): base, 2×base, 4×base, … capped at `max_retry_delay` (which is
    /// also the wait when the base is zero, as it may be without retries).
    #[must_use]
    pub fn retry_delay(&self, failure: u32) -> Duration {
        let delay = self
            .base_retry_delay
            .saturating_mul(1u32 << failure.saturating_sub(1).min(30))
            .min(self.max_retry_delay);
        if delay.is_zero() {
            self.max_retry_delay
        } else {
            delay
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_specs() {
        let c = FlushConfig::default();
        assert_eq!(c.debounce, Duration::from_millis(100));
        assert_eq!(c.max_retries, 3);
        assert_eq!(c.base_retry_delay, Duration::from_millis(100));
        assert_eq!(c.max_retry_delay, Duration::from_secs(30));
        assert_eq!(c.max_batch_size, 100);
        assert!(c.enable_persistence);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn invalid_configs_are_refused_with_a_reason() {
        let e = FlushConfig::default()
            .max_batch_size(0)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("max_batch_size"), "{e}");
        assert!(
            FlushConfig::default()
                .max_wait(Duration::from_millis(1))
                .validate()
                .is_err()
        );
        assert!(
            FlushConfig::default()
                .base_retry_delay(Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(
            FlushConfig::default()
                .base_retry_delay(Duration::ZERO)
                .max_retries(0)
                .validate()
                .is_ok()
        );
        assert!(
            FlushConfig::default()
                .durability(Durability::Memory)
                .validate()
                .is_err()
        );
        let e = FlushConfig::default()
            .max_retry_delay(Duration::ZERO)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("max_retry_delay"), "{e}");
        assert!(
            FlushConfig::default()
                .max_retry_delay(Duration::from_millis(50))
                .validate()
                .is_err()
        );
    }

    #[test]
    fn retry_delays_double() {
        let c = FlushConfig::default();
        let delays: Vec<_> = (1..=3).map(|r| c.retry_delay(r).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400]);
    }

    #[test]
    fn retry_delays_stop_doubling_at_the_cap() {
        let c = FlushConfig::default().max_retry_delay(Duration::from_secs(1));
        let delays: Vec<_> = (1..=6).map(|r| c.retry_delay(r).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(c.retry_delay(u32::MAX), Duration::from_secs(1));
        let no_base = FlushConfig::default()
            .max_retries(0)
            .base_retry_delay(Duration::ZERO);
        assert_eq!(no_base.retry_delay(1), Duration::from_secs(30));
    }
}
