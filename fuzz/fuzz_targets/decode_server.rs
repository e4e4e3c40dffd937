//! Fuzzes `decode_server` on arbitrary frames: no panic, and decode → encode → decode gives the
//! same message (see `src/frames.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    kalphite_fuzz::frames::check_server(&text);
});
