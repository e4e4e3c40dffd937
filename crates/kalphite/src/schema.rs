//! Schemas: the Rust counterpart of Standard Schema. One small trait, [`Schema`], checks an
//! entity's data for its kind and returns every [`Issue`] (path + message); implementations
//! for JSON Schema documents, serde-typed kinds, and closures.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::entity::{EntityKind, Kind};

/// One reason a value was rejected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issue {
    /// JSON-pointer-like path to the offending part of the data (`""` for the whole value,
    /// `/title`, `/tags/0`).
    pub path: String,
    /// What is wrong, for a person.
    pub message: String,
}

impl Issue {
    /// An issue at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Formats a list of issues as `a; b; c`.
pub(crate) fn join_issues(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Validates entity data, per kind. Validation is synchronous by construction: the
/// original project's "async validator" error cannot happen here.
pub trait Schema: Send + Sync + 'static {
    /// Checks `data` for an entity of kind `kind`; returns every issue found.
    ///
    /// # Errors
    /// The list of issues when `data` is not valid for `kind`.
    fn validate(&self, kind: &Kind, data: &Value) -> Result<(), Vec<Issue>>;

    /// Validates and returns the value to store, with defaults applied. The default
    /// implementation stores `data` unchanged.
    ///
    /// # Errors
    /// The list of issues when `data` is not valid for `kind`.
    fn normalize(&self, kind: &Kind, data: Value) -> Result<Value, Vec<Issue>> {
        self.validate(kind, &data)?;
        Ok(data)
    }
}

/// A schema that can be shared by a store, a database and a sync server.
pub type SharedSchema = Arc<dyn Schema>;

/// Error building a schema from a document.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// A JSON Schema document for a kind is itself invalid.
    #[error("the JSON Schema for kind '{kind}' is invalid: {message}")]
    InvalidDocument {
        /// The kind whose document failed to compile.
        kind: String,
        /// The compiler's explanation.
        message: String,
    },
    /// A union document is not of the form `{"kind": {schema}, ...}`.
    #[error("a kinds document must be a JSON object mapping each kind to its schema")]
    NotAnObject,
}

/// JSON Schema documents, one per kind: a discriminated set of kinds, like the spec's
/// union. Data of a kind that is not in the set is rejected.
pub struct JsonSchema {
    validators: HashMap<Kind, jsonschema::Validator>,
}

impl JsonSchema {
    /// Compiles one document per kind.
    ///
    /// # Errors
    /// [`SchemaError::InvalidDocument`] naming the first kind whose document is invalid.
    pub fn from_kinds<K, I>(kinds: I) -> Result<Self, SchemaError>
    where
        K: Into<Kind>,
        I: IntoIterator<Item = (K, Value)>,
    {
        let mut validators = HashMap::new();
        for (kind, doc) in kinds {
            let kind = kind.into();
            let validator =
                jsonschema::validator_for(&doc).map_err(|e| SchemaError::InvalidDocument {
                    kind: kind.to_string(),
                    message: e.to_string(),
                })?;
            validators.insert(kind, validator);
        }
        Ok(Self { validators })
    }

    /// Compiles a document of the form `{"todo": {…schema…}, "project": {…}}`.
    ///
    /// # Errors
    /// [`SchemaError::NotAnObject`] or [`SchemaError::InvalidDocument`].
    pub fn from_document(doc: &Value) -> Result<Self, SchemaError> {
        let map = doc.as_object().ok_or(SchemaError::NotAnObject)?;
        Self::from_kinds(map.iter().map(|(k, v)| (k.as_str(), v.clone())))
    }

    /// The kinds this schema knows.
    pub fn kinds(&self) -> impl Iterator<Item = &Kind> {
        self.validators.keys()
    }
}

impl Schema for JsonSchema {
    fn validate(&self, kind: &Kind, data: &Value) -> Result<(), Vec<Issue>> {
        let Some(validator) = self.validators.get(kind) else {
            let mut known: Vec<_> = self.validators.keys().map(Kind::as_str).collect();
            known.sort_unstable();
            return Err(vec![Issue::new(
                "/type",
                format!(
                    "unknown kind '{kind}' (expected one of: {})",
                    known.join(", ")
                ),
            )]);
        };
        let issues: Vec<Issue> = validator
            .iter_errors(data)
            .map(|e| Issue::new(e.instance_path().to_string(), e.to_string()))
            .collect();
        if issues.is_empty() {
            Ok(())
        } else {
            Err(issues)
        }
    }
}

type Check = Box<dyn Fn(Value) -> Result<Value, Vec<Issue>> + Send + Sync>;

/// Serde-typed kinds: data is valid for a kind when it deserializes into the Rust type
/// registered for it; the stored value is the re-serialized type, so serde defaults apply.
/// Kinds that were not registered are accepted unchanged unless [`TypedSchema::strict`].
#[derive(Default)]
pub struct TypedSchema {
    kinds: HashMap<Kind, Check>,
    strict: bool,
}

impl TypedSchema {
    /// An empty schema.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `T` for `T::KIND`.
    #[must_use]
    pub fn kind<T: EntityKind>(mut self) -> Self {
        let check: Check = Box::new(|value| {
            let typed: T = serde_json::from_value(value).map_err(|e| vec![serde_issue(&e)])?;
            serde_json::to_value(typed).map_err(|e| vec![Issue::new("", e.to_string())])
        });
        self.kinds.insert(Kind::from(T::KIND), check);
        self
    }

    /// Rejects kinds that were not registered.
    #[must_use]
    pub fn strict(mut self) -> Self {
        self.strict = true;
        self
    }
}

/// Turns a serde error into an issue; `serde_json` reports a message, not a path.
fn serde_issue(e: &serde_json::Error) -> Issue {
    Issue::new("", e.to_string())
}

impl Schema for TypedSchema {
    fn validate(&self, kind: &Kind, data: &Value) -> Result<(), Vec<Issue>> {
        self.normalize(kind, data.clone()).map(drop)
    }

    fn normalize(&self, kind: &Kind, data: Value) -> Result<Value, Vec<Issue>> {
        match self.kinds.get(kind) {
            Some(check) => check(data),
            None if self.strict => Err(vec![Issue::new("/type", format!("unknown kind '{kind}'"))]),
            None => Ok(data),
        }
    }
}

/// A schema made from a closure `(kind, data) -> Result<(), Vec<Issue>>`.
pub struct FnSchema<F>(pub F);

impl<F> Schema for FnSchema<F>
where
    F: Fn(&Kind, &Value) -> Result<(), Vec<Issue>> + Send + Sync + 'static,
{
    fn validate(&self, kind: &Kind, data: &Value) -> Result<(), Vec<Issue>> {
        (self.0)(kind, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn todo_schema() -> JsonSchema {
        JsonSchema::from_document(&json!({
            "todo": {
                "type": "object",
                "required": ["title"],
                "properties": {
                    "title": {"type": "string", "minLength": 1},
                    "meta": {"type": "object", "properties": {"nested": {"type": "integer"}}}
                }
            }
        }))
        .unwrap()
    }

    #[test]
    fn json_schema_reports_every_issue_with_its_path() {
        let s = todo_schema();
        let issues = s
            .validate(
                &"todo".into(),
                &json!({"title": "", "meta": {"nested": "x"}}),
            )
            .unwrap_err();
        assert_eq!(issues.len(), 2, "{issues:?}");
        assert!(issues.iter().any(|i| i.path == "/title"));
        assert!(issues.iter().any(|i| i.path == "/meta/nested"));
    }

    #[test]
    fn json_schema_rejects_unknown_kinds_like_a_discriminated_union() {
        let issues = todo_schema()
            .validate(&"user".into(), &json!({}))
            .unwrap_err();
        assert_eq!(issues[0].path, "/type");
        assert!(issues[0].message.contains("unknown kind 'user'"));
    }

    #[test]
    fn invalid_document_is_a_typed_error() {
        let err = JsonSchema::from_kinds([("todo", json!({"type": 12}))])
            .err()
            .unwrap();
        assert!(matches!(err, SchemaError::InvalidDocument { ref kind, .. } if kind == "todo"));
    }

    #[derive(Clone, Debug, Serialize, Deserialize)]
    struct Task {
        title: String,
        #[serde(default)]
        tags: Vec<String>,
    }
    impl EntityKind for Task {
        const KIND: &'static str = "task";
    }

    #[test]
    fn typed_schema_applies_serde_defaults() {
        let s = TypedSchema::new().kind::<Task>();
        let out = s.normalize(&"task".into(), json!({"title": "x"})).unwrap();
        assert_eq!(out, json!({"title": "x", "tags": []}));
        assert!(s.validate(&"task".into(), &json!({"tags": []})).is_err());
        assert!(s.validate(&"other".into(), &json!({"anything": 1})).is_ok());
        assert!(s.strict().validate(&"other".into(), &json!({})).is_err());
    }

    #[test]
    fn closure_schema_is_called_with_kind_and_data() {
        let s = FnSchema(|kind: &Kind, data: &Value| {
            if kind == "x" && data.get("ok").is_some() {
                Ok(())
            } else {
                Err(vec![Issue::new("/ok", "required")])
            }
        });
        assert!(s.validate(&"x".into(), &json!({"ok": true})).is_ok());
        assert_eq!(
            s.validate(&"x".into(), &json!({})).unwrap_err()[0].path,
            "/ok"
        );
    }
}
