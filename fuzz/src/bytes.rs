//! Turns the fuzzer's bytes into choices. The fuzz targets and the replay test
//! (`crates/kalphite-sync/tests/fuzz_regressions.rs`) share this reader, so a corpus file
//! means the same sequence of operations in both, without the `arbitrary` crate in
//! kalphite-sync's dependencies. Exhausted input reads as zeros: every byte string is a
//! valid, finite run.

use serde_json::{Map, Value};

/// A cursor over the fuzzer's input.
pub struct Bytes<'a> {
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// True when every byte was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next byte (0 once exhausted).
    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// A number in `0..n` (`n` > 0, at most 256).
    pub fn below(&mut self, n: usize) -> usize {
        usize::from(self.byte()) % n.max(1)
    }

    /// A coin flip.
    pub fn flag(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    /// Eight bytes, little-endian.
    pub fn u64(&mut self) -> u64 {
        let mut raw = [0u8; 8];
        for b in &mut raw {
            *b = self.byte();
        }
        u64::from_le_bytes(raw)
    }

    /// One of `items` (non-empty).
    pub fn pick<'t, T>(&mut self, items: &'t [T]) -> &'t T {
        &items[self.below(items.len())]
    }

    /// Up to `max` raw bytes (at most 255), read as UTF-8 with invalid sequences replaced.
    pub fn text(&mut self, max: usize) -> String {
        let len = self.below(max.min(255) + 1);
        let take = len.min(self.data.len());
        let (head, rest) = self.data.split_at(take);
        self.data = rest;
        String::from_utf8_lossy(head).into_owned()
    }

    /// Everything left, read as UTF-8 with invalid sequences replaced.
    pub fn rest_text(&mut self) -> String {
        let text = String::from_utf8_lossy(self.data).into_owned();
        self.data = &[];
        text
    }

    /// A JSON value: small and message-like most of the time, sometimes nested `depth`
    /// levels deep (up to 255) to probe the nesting limits, or holding a NUL or a float.
    pub fn json(&mut self, depth: usize) -> Value {
        const STRINGS: [&str; 6] = ["", "x", "milk", "é✓", "a\0b", "\u{10FFFF}"];
        const KEYS: [&str; 5] = ["title", "done", "n", "tags", "\0"];
        match self.below(11) {
            0 => Value::Null,
            1 => Value::Bool(self.flag()),
            2 => Value::from(i64::from(i8::from_le_bytes([self.byte()]))),
            3 => Value::from(self.u64()),
            // Every finite double; NaN and infinities have no JSON form (they read as null).
            4 => serde_json::Number::from_f64(f64::from_bits(self.u64()))
                .map_or(Value::Null, Value::Number),
            5 => Value::from(*self.pick(&STRINGS)),
            6 => Value::from(self.text(16)),
            7 if depth < 3 => {
                let len = self.below(4);
                Value::Array((0..len).map(|_| self.json(depth + 1)).collect())
            }
            8 if depth < 3 => {
                let len = self.below(4);
                let mut map = Map::new();
                for _ in 0..len {
                    let key = (*self.pick(&KEYS)).to_owned();
                    let value = self.json(depth + 1);
                    map.insert(key, value);
                }
                Value::Object(map)
            }
            9 => {
                // Nested `levels` deep: around the room's limit (64) and serde's (128).
                let levels = usize::from(self.byte());
                let mut value = Value::from(1);
                for level in 0..levels {
                    value = if level % 2 == 0 {
                        Value::Array(vec![value])
                    } else {
                        let mut map = Map::new();
                        map.insert("n".to_owned(), value);
                        Value::Object(map)
                    };
                }
                value
            }
            _ => Value::from(self.byte()),
        }
    }
}
