//! kalphite's fuzz targets' shared code (docs/fuzzing.md). Each module is also compiled
//! into `crates/kalphite-sync/tests/fuzz_regressions.rs`, which replays the committed
//! corpus and every crasher through the same checks under plain `cargo test`.

pub mod bytes;
pub mod frames;
pub mod replica_sequence;
pub mod room_sequence;
