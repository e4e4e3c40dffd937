//! Rendering a [`Query`] as PostgreSQL: numbered parameters, JSON paths walked with `->`
//! (object keys only), type-guarded comparisons, and an order by JSON type then value that
//! matches the SQLite backend and [`Query::apply`].

use std::fmt::Write as _;

use serde_json::Value;

use super::Param;
use crate::query::{Cmp, Condition, Direction, Field, Query};

/// Builds SQL with numbered parameters.
struct Sql {
    text: String,
    params: Vec<Param>,
}

impl Sql {
    fn param(&mut self, p: Param) -> String {
        self.params.push(p);
        format!("${}", self.params.len())
    }

    /// `data -> $a -> $b` (`->>` for the last step when `as_text`): object keys only, so an
    /// array is never indexed (as in SQLite's `$."key"` paths).
    fn path(&mut self, path: &[String], as_text: bool) -> String {
        let mut expr = String::from("data");
        for (i, key) in path.iter().enumerate() {
            let p = self.param(Box::new(key.clone()));
            let arrow = if as_text && i + 1 == path.len() {
                "->>"
            } else {
                "->"
            };
            let _ = write!(expr, " {arrow} {p}::text");
        }
        expr
    }

    fn compare(&mut self, field: &Field, op: Cmp, value: &Value) {
        let op_sql = op.sql();
        let clause = match field {
            Field::UpdatedAt => {
                let p = self.param(Box::new(value.as_i64().unwrap_or(0)));
                format!("updated_at {op_sql} {p}::int8")
            }
            Field::Id => {
                let p = self.param(Box::new(value.as_str().unwrap_or_default().to_owned()));
                format!("id COLLATE \"C\" {op_sql} {p}::text")
            }
            Field::Data(path) => {
                let json = self.path(path, false);
                match value {
                    Value::Number(n) => {
                        let text = self.path(path, true);
                        let p = self.param(Box::new(n.to_string()));
                        format!(
                            "(CASE WHEN jsonb_typeof({json}) = 'number' \
                             THEN ({text})::numeric {op_sql} CAST({p}::text AS numeric) ELSE false END)"
                        )
                    }
                    Value::String(s) => {
                        let text = self.path(path, true);
                        let p = self.param(Box::new(s.clone()));
                        format!(
                            "(CASE WHEN jsonb_typeof({json}) = 'string' \
                             THEN ({text}) COLLATE \"C\" {op_sql} {p}::text ELSE false END)"
                        )
                    }
                    Value::Bool(b) => format!("({json}) = '{b}'::jsonb"),
                    _ => format!("jsonb_typeof({json}) = 'null'"),
                }
            }
        };
        self.text.push_str(&clause);
    }
}

/// Renders a query as PostgreSQL with numbered parameters.
pub(super) fn render(q: &Query) -> (String, Vec<Param>) {
    let mut sql = Sql {
        text: String::from(
            "SELECT type, id, data, updated_at, version FROM kalphite_entities WHERE type = $1",
        ),
        params: vec![Box::new(q.kind.clone())],
    };
    for c in &q.conditions {
        sql.text.push_str(" AND ");
        match c {
            Condition::Compare { field, op, value } => sql.compare(field, *op, value),
            Condition::In { field, values } => {
                if values.is_empty() {
                    sql.text.push_str("false");
                } else {
                    sql.text.push('(');
                    for (i, v) in values.iter().enumerate() {
                        if i > 0 {
                            sql.text.push_str(" OR ");
                        }
                        sql.compare(field, Cmp::Eq, v);
                    }
                    sql.text.push(')');
                }
            }
        }
    }
    let mut order = String::from(" ORDER BY ");
    for (field, dir) in &q.order {
        let d = if *dir == Direction::Desc {
            "DESC"
        } else {
            "ASC"
        };
        match field {
            Field::UpdatedAt => {
                let _ = write!(order, "updated_at {d}, ");
            }
            Field::Id => {
                let _ = write!(order, "id COLLATE \"C\" {d}, ");
            }
            Field::Data(path) => {
                let json = sql.path(path, false);
                let text = sql.path(path, true);
                let _ = write!(
                    order,
                    "CASE jsonb_typeof({json}) WHEN 'null' THEN 1 \
                     WHEN 'boolean' THEN (CASE WHEN ({json}) = 'true'::jsonb THEN 3 ELSE 2 END) \
                     WHEN 'number' THEN 4 WHEN 'string' THEN 5 WHEN 'array' THEN 6 \
                     WHEN 'object' THEN 7 ELSE 0 END {d}, \
                     (CASE WHEN jsonb_typeof({json}) = 'number' THEN ({text})::numeric END) {d} NULLS FIRST, \
                     (CASE WHEN jsonb_typeof({json}) = 'string' THEN ({text}) COLLATE \"C\" END) {d} NULLS FIRST, "
                );
            }
        }
    }
    order.push_str("seq");
    sql.text.push_str(&order);
    let limit = q
        .limit
        .map_or(i64::MAX, |l| i64::try_from(l).unwrap_or(i64::MAX));
    let offset = i64::try_from(q.offset).unwrap_or(i64::MAX);
    let l = sql.param(Box::new(limit));
    let o = sql.param(Box::new(offset));
    let _ = write!(sql.text, " LIMIT {l}::int8 OFFSET {o}::int8");
    (sql.text, sql.params)
}
