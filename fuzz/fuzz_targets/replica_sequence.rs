//! Fuzzes the client's `Replica` on sequences of operations (see `src/replica_sequence.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kalphite_fuzz::replica_sequence::run(data));
