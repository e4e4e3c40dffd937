//! What every backend can store. PostgreSQL's `text` and `jsonb` cannot hold the NUL
//! character (U+0000): the PostgreSQL backend refuses it before anything is written.
//! SQLite stores it; data that must move between backends (the sync server's room log)
//! is checked with [`check_storable`] on every backend. Where a NUL hides is
//! [`kalphite::nul_field`]'s to find: the store refuses the same entities at write time when
//! told to.

use serde_json::Value;

use crate::error::{Error, Result};

/// Checks that every backend can store an entity: no NUL character (U+0000) in its kind,
/// its id, or any string or object key of its data.
///
/// ```
/// use kalphite_db::{Error, check_storable};
/// use serde_json::json;
/// assert!(check_storable("todo", "t1", &json!({"title": "fine"})).is_ok());
/// let err = check_storable("todo", "t1", &json!({"tags": ["ok", "a\u{0}b"]})).unwrap_err();
/// assert!(matches!(err, Error::Unstorable { ref field, .. } if field == "data.tags[1]"));
/// ```
///
/// # Errors
/// [`Error::Unstorable`] naming the first field that holds one.
pub fn check_storable(kind: &str, id: &str, data: &Value) -> Result<()> {
    match kalphite::nul_field(kind, id, data) {
        None => Ok(()),
        Some(field) => Err(Error::Unstorable {
            kind: kind.to_owned(),
            id: id.to_owned(),
            field,
        }),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn field(kind: &str, id: &str, data: &Value) -> Option<String> {
        match check_storable(kind, id, data) {
            Ok(()) => None,
            Err(Error::Unstorable { field, .. }) => Some(field),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn every_place_a_nul_can_hide_is_named() {
        let ok = json!({"a": [1, "x", {"b": null}], "c": true});
        assert_eq!(field("todo", "t", &ok), None);
        assert_eq!(field("to\0do", "t", &ok).as_deref(), Some("the kind"));
        assert_eq!(field("todo", "t\0", &ok).as_deref(), Some("the id"));
        assert_eq!(
            field("todo", "t", &json!("\0")).as_deref(),
            Some("data"),
            "a bare string"
        );
        assert_eq!(
            field("todo", "t", &json!({"a": [1, {"b": "x\0"}]})).as_deref(),
            Some("data.a[1].b")
        );
        assert_eq!(
            field("todo", "t", &json!({"a": {"k\0": 1}})).as_deref(),
            Some("a key of data.a")
        );
    }
}
