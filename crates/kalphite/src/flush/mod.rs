//! Layer 2: the flush engine that persists accepted changes in the background —
//! debounced, deduplicated per entity, batched, retried, and never dropping a change.

mod config;
mod engine;
mod target;

pub use config::{Durability, FlushConfig};
pub use engine::{FlushEngine, FlushError, FlushEvent, FlushStats, ShutdownError};
pub use target::{FanOut, FlushTarget, FnTarget, TargetError};
