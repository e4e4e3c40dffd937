//! Fuzzes the server's `Room` on sequences of operations (see `src/room_sequence.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kalphite_fuzz::room_sequence::run(data));
