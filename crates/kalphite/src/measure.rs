//! What a record is as JSON, found while it is serialized and without building it: its size
//! (the store's entity size limit) and whether a string in it holds the NUL character
//! U+0000, which PostgreSQL's `text` and `jsonb` cannot store and the sync server refuses.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

/// A record measured as compact JSON.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct JsonMeasure {
    /// Its size in bytes.
    pub(crate) bytes: usize,
    /// Whether a string in it (a key, a value, the id, the kind) holds a NUL character;
    /// always `false` when it was not looked for.
    pub(crate) nul: bool,
}

/// Measures `value` as compact JSON, looking for NUL characters too when `find_nul`.
pub(crate) fn json_measure<T: Serialize + ?Sized>(
    value: &T,
    find_nul: bool,
) -> Result<JsonMeasure, serde_json::Error> {
    let mut measurer = Measurer {
        bytes: 0,
        scan: find_nul.then_some(Scan::Plain),
        nul: false,
    };
    serde_json::to_writer(&mut measurer, value)?;
    Ok(JsonMeasure {
        bytes: measurer.bytes,
        nul: measurer.nul,
    })
}

/// Where the serializer's output stands in an escape sequence. `serde_json` always writes
/// U+0000 as `\u0000`, and outside strings JSON has no backslash, so a `\u0000` escape in
/// the output is exactly a NUL in some string (`\\u0000` is an escaped backslash followed by
/// text, which the state machine skips).
#[derive(Clone, Copy)]
enum Scan {
    Plain,
    /// Just after a backslash.
    Escape,
    /// Inside `\uXXXX`: how many hex digits were seen, and whether all were `0`.
    Hex {
        digits: u8,
        zero: bool,
    },
}

struct Measurer {
    bytes: usize,
    /// `None` when NUL characters are not looked for.
    scan: Option<Scan>,
    nul: bool,
}

impl std::io::Write for Measurer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes += buf.len();
        let Some(mut scan) = self.scan else {
            return Ok(buf.len());
        };
        // Nearly every piece has no escape in it: skip the byte-by-byte walk then.
        if matches!(scan, Scan::Plain) && !buf.contains(&b'\\') {
            return Ok(buf.len());
        }
        for &b in buf {
            scan = match scan {
                Scan::Plain if b == b'\\' => Scan::Escape,
                Scan::Escape if b == b'u' => Scan::Hex {
                    digits: 0,
                    zero: true,
                },
                // Any other escape is one character long.
                Scan::Plain | Scan::Escape => Scan::Plain,
                Scan::Hex { digits, zero } => {
                    let zero = zero && b == b'0';
                    if digits == 3 {
                        self.nul |= zero;
                        Scan::Plain
                    } else {
                        Scan::Hex {
                            digits: digits + 1,
                            zero,
                        }
                    }
                }
            };
        }
        self.scan = Some(scan);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where an entity holds a NUL character (U+0000), if it does: `"the kind"`, `"the id"`,
/// or the path of the first string or object key in its data that holds one
/// (`"data.tags[1]"`, `"a key of data.meta"`).
///
/// PostgreSQL's `text` and `jsonb` cannot store the character, and the sync server refuses
/// it on every backend; a store that must not accept such an entity refuses it with
/// [`crate::Error::Unstorable`] (see [`crate::Store::set_refuse_nul`]).
///
/// ```
/// use serde_json::json;
/// assert_eq!(kalphite::nul_field("todo", "t1", &json!({"title": "fine"})), None);
/// assert_eq!(
///     kalphite::nul_field("todo", "t1", &json!({"tags": ["ok", "a\u{0}b"]})).as_deref(),
///     Some("data.tags[1]")
/// );
/// ```
#[must_use]
pub fn nul_field(kind: &str, id: &str, data: &Value) -> Option<String> {
    if kind.contains('\0') {
        Some("the kind".to_owned())
    } else if id.contains('\0') {
        Some("the id".to_owned())
    } else if holds_nul(data) {
        path_to_nul(data, &mut String::from("data"))
    } else {
        None
    }
}

/// Whether any string or key under `value` holds a NUL. Checked first, without building
/// paths: every record of the sync server's log goes through here, and it is almost never
/// true.
fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// The path of the first string or key under `value` (at `path`) holding a NUL.
fn path_to_nul(value: &Value, path: &mut String) -> Option<String> {
    match value {
        Value::String(s) => s.contains('\0').then(|| path.clone()),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let len = path.len();
            let _ = write!(path, "[{i}]");
            let found = path_to_nul(item, path);
            path.truncate(len);
            found
        }),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            if key.contains('\0') {
                return Some(format!("a key of {path}"));
            }
            let len = path.len();
            path.push('.');
            path.push_str(key);
            let found = path_to_nul(item, path);
            path.truncate(len);
            found
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_size_is_the_serialized_size() {
        let value = json!({"message": "héllo \"x\"", "n": [1, 2.5, null], "\u{0}": "\u{0}"});
        let expected = serde_json::to_vec(&value).unwrap().len();
        assert_eq!(json_measure(&value, false).unwrap().bytes, expected);
        assert_eq!(json_measure(&value, true).unwrap().bytes, expected);
    }

    #[test]
    fn a_nul_is_found_in_any_string_and_only_when_looked_for() {
        for value in [
            json!({"a": "x\u{0}"}),
            json!({"a": {"b": [1, "\u{0}"]}}),
            json!({"k\u{0}ey": 1}),
            json!({"a": "\\\u{0}"}),
            json!(["\u{0}\u{0}"]),
        ] {
            assert!(json_measure(&value, true).unwrap().nul, "{value}");
            assert!(!json_measure(&value, false).unwrap().nul, "{value}");
        }
    }

    #[test]
    fn text_that_only_looks_like_an_escaped_nul_is_not_one() {
        for value in [
            json!({"a": "\\u0000"}),
            json!({"a": "\\\\u0000", "\\u0000": "\u{1}\u{10}\u{2000}"}),
            json!({"a": "u0000", "b": "\"\\"}),
        ] {
            assert!(!json_measure(&value, true).unwrap().nul, "{value}");
        }
    }

    #[test]
    fn an_escape_split_across_writes_is_followed() {
        use std::io::Write as _;
        for (json, nul) in [
            (&br#"{"a":"\u0000"}"#[..], true),
            (br#"{"a":"\\u0000"}"#, false),
        ] {
            let mut measurer = Measurer {
                bytes: 0,
                scan: Some(Scan::Plain),
                nul: false,
            };
            for byte in json {
                measurer.write_all(std::slice::from_ref(byte)).unwrap();
            }
            assert_eq!(measurer.nul, nul, "{}", String::from_utf8_lossy(json));
            assert_eq!(measurer.bytes, json.len());
        }
    }

    #[test]
    fn every_place_a_nul_can_hide_is_named() {
        let ok = json!({"a": [1, "x", {"b": null}], "c": true});
        assert_eq!(nul_field("todo", "t", &ok), None);
        assert_eq!(nul_field("to\0do", "t", &ok).as_deref(), Some("the kind"));
        assert_eq!(nul_field("todo", "t\0", &ok).as_deref(), Some("the id"));
        assert_eq!(
            nul_field("todo", "t", &json!("\0")).as_deref(),
            Some("data")
        );
        assert_eq!(
            nul_field("todo", "t", &json!({"a": [1, {"b": "x\0"}]})).as_deref(),
            Some("data.a[1].b")
        );
        assert_eq!(
            nul_field("todo", "t", &json!({"a": {"k\0": 1}})).as_deref(),
            Some("a key of data.a")
        );
    }
}
