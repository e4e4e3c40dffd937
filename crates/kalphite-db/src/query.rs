//! The query builder: equality, comparisons, `in`, ordering by a JSON field, `updatedAt` or
//! the id, `limit` and `offset`, pushed down into SQL by each backend with the same
//! semantics. [`Query::apply`] evaluates a query in memory with exactly those semantics; it
//! is the reference the backends are tested against.
//!
//! # Semantics
//! - A comparison matches only values of the literal's JSON type: `gt("n", 3)` never matches
//!   a string or a missing field; `eq("x", null)` matches an explicit JSON `null` only.
//! - Strings compare by their UTF-8 bytes (SQLite `BINARY`, PostgreSQL `COLLATE "C"`);
//!   numbers compare numerically (integers and floats together).
//! - Ordering by a data field sorts by JSON type first — missing, null, false, true,
//!   numbers, strings, arrays, objects — then by value within numbers and strings. Ties
//!   (and queries without an order) keep first-insert order.

use std::cmp::Ordering;

use kalphite::Entity;
use serde_json::Value;

use crate::error::{Error, Result};

/// What a condition or an ordering looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Field {
    /// A field inside `data`, as a path of object keys (`["author", "name"]`).
    Data(Vec<String>),
    /// The entity's `updatedAt`.
    UpdatedAt,
    /// The entity's id.
    Id,
}

impl Field {
    /// A data field from a dotted path: `"author.name"`.
    #[must_use]
    pub fn data(path: &str) -> Self {
        Self::Data(path.split('.').map(str::to_owned).collect())
    }
}

impl From<&str> for Field {
    fn from(path: &str) -> Self {
        Self::data(path)
    }
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    /// `=`
    Eq,
    /// `>`
    Gt,
    /// `>=`
    Gte,
    /// `<`
    Lt,
    /// `<=`
    Lte,
}

impl Cmp {
    pub(crate) fn sql(self) -> &'static str {
        match self {
            Self::Eq => "=",
            Self::Gt => ">",
            Self::Gte => ">=",
            Self::Lt => "<",
            Self::Lte => "<=",
        }
    }

    fn holds(self, ord: Ordering) -> bool {
        match self {
            Self::Eq => ord == Ordering::Equal,
            Self::Gt => ord == Ordering::Greater,
            Self::Gte => ord != Ordering::Less,
            Self::Lt => ord == Ordering::Less,
            Self::Lte => ord != Ordering::Greater,
        }
    }
}

/// One condition of a query.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Condition {
    /// `field <op> value`.
    Compare {
        /// What is compared.
        field: Field,
        /// How.
        op: Cmp,
        /// With what (a string, number, boolean or null).
        value: Value,
    },
    /// `field` equals one of `values`; an empty list matches nothing.
    In {
        /// What is compared.
        field: Field,
        /// The accepted values.
        values: Vec<Value>,
    },
}

/// Sort direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Direction {
    /// Smallest first.
    #[default]
    Asc,
    /// Largest first.
    Desc,
}

/// A query over one kind, run by [`crate::Database::find`].
///
/// ```
/// use kalphite_db::{Direction, Field, Query};
/// let q = Query::new("comment")
///     .eq("priority", "high")
///     .gte("lineNumber", 10)
///     .order_by(Field::UpdatedAt, Direction::Desc)
///     .limit(20);
/// assert_eq!(q.kind(), "comment");
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    pub(crate) kind: String,
    pub(crate) conditions: Vec<Condition>,
    pub(crate) order: Vec<(Field, Direction)>,
    pub(crate) limit: Option<u64>,
    pub(crate) offset: u64,
}

impl Query {
    /// Every entity of `kind`, in first-insert order.
    pub fn new(kind: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            conditions: Vec::new(),
            order: Vec::new(),
            limit: None,
            offset: 0,
        }
    }

    /// The kind this query reads.
    #[must_use]
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Adds `field <op> value`.
    #[must_use]
    pub fn compare(mut self, field: impl Into<Field>, op: Cmp, value: impl Into<Value>) -> Self {
        self.conditions.push(Condition::Compare {
            field: field.into(),
            op,
            value: value.into(),
        });
        self
    }

    /// `field == value`.
    #[must_use]
    pub fn eq(self, field: impl Into<Field>, value: impl Into<Value>) -> Self {
        self.compare(field, Cmp::Eq, value)
    }

    /// `field > value`.
    #[must_use]
    pub fn gt(self, field: impl Into<Field>, value: impl Into<Value>) -> Self {
        self.compare(field, Cmp::Gt, value)
    }

    /// `field >= value`.
    #[must_use]
    pub fn gte(self, field: impl Into<Field>, value: impl Into<Value>) -> Self {
        self.compare(field, Cmp::Gte, value)
    }

    /// `field < value`.
    #[must_use]
    pub fn lt(self, field: impl Into<Field>, value: impl Into<Value>) -> Self {
        self.compare(field, Cmp::Lt, value)
    }

    /// `field <= value`.
    #[must_use]
    pub fn lte(self, field: impl Into<Field>, value: impl Into<Value>) -> Self {
        self.compare(field, Cmp::Lte, value)
    }

    /// `field` is one of `values`.
    #[must_use]
    pub fn is_in<V: Into<Value>>(
        mut self,
        field: impl Into<Field>,
        values: impl IntoIterator<Item = V>,
    ) -> Self {
        let values = values.into_iter().map(Into::into).collect();
        self.conditions.push(Condition::In {
            field: field.into(),
            values,
        });
        self
    }

    /// Sorts by `field` (later calls break ties of earlier ones).
    #[must_use]
    pub fn order_by(mut self, field: impl Into<Field>, direction: Direction) -> Self {
        self.order.push((field.into(), direction));
        self
    }

    /// Returns at most `n` entities.
    #[must_use]
    pub fn limit(mut self, n: u64) -> Self {
        self.limit = Some(n);
        self
    }

    /// Skips the first `n` matching entities.
    #[must_use]
    pub fn offset(mut self, n: u64) -> Self {
        self.offset = n;
        self
    }

    /// Checks that every condition can be evaluated the same way on every backend.
    pub(crate) fn validate(&self) -> Result<()> {
        let check = |field: &Field, value: &Value| -> Result<()> {
            if let Field::Data(path) = field
                && (path.is_empty() || path.iter().any(|k| k.is_empty() || k.contains('"')))
            {
                return Err(invalid(
                    "a data field path has an empty segment or a '\"'".into(),
                ));
            }
            match (field, value) {
                (Field::Data(_), Value::Array(_) | Value::Object(_)) => {
                    Err(invalid(format!("cannot compare a field with {value}")))
                }
                (Field::UpdatedAt, v) if v.as_i64().is_none_or(|n| n < 0) => Err(invalid(format!(
                    "updatedAt compares with non-negative integers, not {v}"
                ))),
                (Field::Id, v) if !v.is_string() => {
                    Err(invalid(format!("the id compares with strings, not {v}")))
                }
                _ => Ok(()),
            }
        };
        for c in &self.conditions {
            match c {
                Condition::Compare { field, op, value } => {
                    check(field, value)?;
                    if *op != Cmp::Eq && (value.is_boolean() || value.is_null()) {
                        return Err(invalid(format!(
                            "'{}' cannot compare with {value}",
                            op.sql()
                        )));
                    }
                }
                Condition::In { field, values } => {
                    for v in values {
                        check(field, v)?;
                    }
                }
            }
        }
        for (field, _) in &self.order {
            if let Field::Data(path) = field
                && (path.is_empty() || path.iter().any(|k| k.is_empty() || k.contains('"')))
            {
                return Err(invalid(
                    "an order field path has an empty segment or a '\"'".into(),
                ));
            }
        }
        if self.limit.is_some_and(|l| l > i64::MAX as u64) || self.offset > i64::MAX as u64 {
            return Err(invalid("limit and offset must fit in an i64".into()));
        }
        Ok(())
    }

    /// Runs this query over `entities` (given in first-insert order) in memory, with the
    /// same semantics as the SQL backends.
    ///
    /// # Errors
    /// [`Error::InvalidQuery`] for conditions no backend can run.
    pub fn apply(&self, entities: impl IntoIterator<Item = Entity>) -> Result<Vec<Entity>> {
        self.validate()?;
        let mut out: Vec<Entity> = entities
            .into_iter()
            .filter(|e| *e.kind == *self.kind && self.conditions.iter().all(|c| matches(c, e)))
            .collect();
        // A stable sort keeps first-insert order among ties.
        out.sort_by(|a, b| {
            self.order
                .iter()
                .fold(Ordering::Equal, |acc, (field, dir)| {
                    acc.then_with(|| {
                        let ord = order_key_cmp(field, a, b);
                        if *dir == Direction::Desc {
                            ord.reverse()
                        } else {
                            ord
                        }
                    })
                })
        });
        let skip = usize::try_from(self.offset).unwrap_or(usize::MAX);
        let take = self
            .limit
            .map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
        Ok(out.into_iter().skip(skip).take(take).collect())
    }
}

fn invalid(reason: String) -> Error {
    Error::InvalidQuery { reason }
}

/// The value a field has in an entity (`None` when missing).
fn lookup(field: &Field, e: &Entity) -> Option<Value> {
    match field {
        Field::Id => Some(Value::String(e.id.to_string())),
        Field::UpdatedAt => Some(Value::from(e.updated_at)),
        Field::Data(path) => {
            let mut v = &e.data;
            for key in path {
                v = v.as_object()?.get(key)?;
            }
            Some(v.clone())
        }
    }
}

fn matches(c: &Condition, e: &Entity) -> bool {
    match c {
        Condition::Compare { field, op, value } => {
            lookup(field, e).is_some_and(|v| same_type_cmp(&v, value).is_some_and(|o| op.holds(o)))
        }
        Condition::In { field, values } => lookup(field, e).is_some_and(|v| {
            values
                .iter()
                .any(|x| same_type_cmp(&v, x) == Some(Ordering::Equal))
        }),
    }
}

/// Compares two values of the same JSON type; `None` across types.
fn same_type_cmp(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => number_cmp(x, y),
        (Value::String(x), Value::String(y)) => Some(x.as_bytes().cmp(y.as_bytes())),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        (Value::Null, Value::Null) => Some(Ordering::Equal),
        _ => None,
    }
}

fn number_cmp(x: &serde_json::Number, y: &serde_json::Number) -> Option<Ordering> {
    if let (Some(a), Some(b)) = (x.as_i64(), y.as_i64()) {
        return Some(a.cmp(&b));
    }
    if let (Some(a), Some(b)) = (x.as_u64(), y.as_u64()) {
        return Some(a.cmp(&b));
    }
    x.as_f64()?.partial_cmp(&y.as_f64()?)
}

/// The rank of a value's JSON type in an ordering (missing first).
fn type_rank(v: Option<&Value>) -> u8 {
    match v {
        None => 0,
        Some(Value::Null) => 1,
        Some(Value::Bool(false)) => 2,
        Some(Value::Bool(true)) => 3,
        Some(Value::Number(_)) => 4,
        Some(Value::String(_)) => 5,
        Some(Value::Array(_)) => 6,
        Some(Value::Object(_)) => 7,
    }
}

fn order_key_cmp(field: &Field, a: &Entity, b: &Entity) -> Ordering {
    let (va, vb) = (lookup(field, a), lookup(field, b));
    type_rank(va.as_ref())
        .cmp(&type_rank(vb.as_ref()))
        .then_with(|| match (&va, &vb) {
            (Some(x @ (Value::Number(_) | Value::String(_))), Some(y)) => {
                same_type_cmp(x, y).unwrap_or(Ordering::Equal)
            }
            _ => Ordering::Equal,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn e(id: &str, data: Value) -> Entity {
        Entity::new(id, "t", data).at(1)
    }

    #[test]
    fn comparisons_only_match_their_own_type() {
        let all = vec![
            e("a", json!({"n": 5})),
            e("b", json!({"n": "7"})),
            e("c", json!({})),
            e("d", json!({"n": 9.5})),
        ];
        let ids = |q: Query| -> Vec<String> {
            q.apply(all.clone())
                .unwrap()
                .into_iter()
                .map(|e| e.id.to_string())
                .collect()
        };
        assert_eq!(ids(Query::new("t").gt("n", 4)), ["a", "d"]);
        assert_eq!(ids(Query::new("t").eq("n", "7")), ["b"]);
        assert_eq!(
            ids(Query::new("t").is_in("n", [json!(5), json!("7")])),
            ["a", "b"]
        );
        assert!(ids(Query::new("t").is_in("n", Vec::<Value>::new())).is_empty());
        assert_eq!(
            ids(Query::new("t").order_by("n", Direction::Desc)),
            ["b", "d", "a", "c"]
        );
        assert_eq!(
            ids(Query::new("t")
                .order_by("n", Direction::Asc)
                .offset(1)
                .limit(2)),
            ["a", "d"]
        );
    }

    #[test]
    fn refuses_what_backends_cannot_run_alike() {
        assert!(Query::new("t").gt("x", true).validate().is_err());
        assert!(Query::new("t").eq("x", json!([1])).validate().is_err());
        assert!(
            Query::new("t")
                .eq(Field::UpdatedAt, "soon")
                .validate()
                .is_err()
        );
        assert!(Query::new("t").eq("a..b", 1).validate().is_err());
        assert!(Query::new("t").eq(Field::Id, "x").validate().is_ok());
    }
}
