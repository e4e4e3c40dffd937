//! Layer 2: the flush engine that persists accepted changes (and opaque annotations) in the
//! background — debounced, deduplicated per entity, batched at transaction boundaries,
//! retried, and never dropping a change.

mod config;
mod engine;
mod queue;
mod target;

pub use config::{Durability, FlushConfig};
pub use engine::{FlushEngine, FlushError, FlushEvent, FlushStats, ShutdownError};
pub use target::{Annotation, Batch, FanOut, FlushTarget, FnTarget, TargetError};
