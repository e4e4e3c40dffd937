//! Layer 2: the flush engine that persists accepted changes in the background.

mod target;

pub use target::{FanOut, FlushTarget, FnTarget, TargetError};
