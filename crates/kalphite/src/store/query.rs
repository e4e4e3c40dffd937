//! A small chainable query over one collection: `filter`, `order_by`, `offset`, `limit`,
//! then `collect`, `count` or `first`. Filters run under the store's read lock, so only
//! matching entities are cloned (an `Arc` increment each).

use std::cmp::Ordering;
use std::ops::ControlFlow;
use std::sync::Arc;

use serde_json::Value;

use crate::entity::Entity;

/// Something whose rows a query can scan: a typed or a JSON collection.
pub(crate) trait Scan<T> {
    /// Calls `f` on each row in collection order until it breaks.
    fn scan(&self, f: &mut dyn FnMut(&Arc<Entity<T>>) -> ControlFlow<()>);
}

type Filter<'a, T> = Box<dyn Fn(&Entity<T>) -> bool + 'a>;
type Comparator<'a, T> = Box<dyn Fn(&Entity<T>, &Entity<T>) -> Ordering + 'a>;

/// A query under construction; nothing runs until `collect`, `count` or `first`.
#[must_use = "a query does nothing until collect(), count() or first()"]
pub struct Query<'a, T> {
    source: &'a dyn Scan<T>,
    filters: Vec<Filter<'a, T>>,
    order: Option<Comparator<'a, T>>,
    offset: usize,
    limit: Option<usize>,
}

impl<'a, T> Query<'a, T> {
    pub(crate) fn new(source: &'a dyn Scan<T>) -> Self {
        Self {
            source,
            filters: Vec::new(),
            order: None,
            offset: 0,
            limit: None,
        }
    }

    /// Keeps entities for which `pred` holds (several filters: all must hold).
    pub fn filter(mut self, pred: impl Fn(&Entity<T>) -> bool + 'a) -> Self {
        self.filters.push(Box::new(pred));
        self
    }

    /// Orders by a key, ascending; ties keep collection order (the sort is stable).
    pub fn order_by<K: Ord>(mut self, key: impl Fn(&Entity<T>) -> K + 'a) -> Self {
        self.order = Some(Box::new(move |a, b| key(a).cmp(&key(b))));
        self
    }

    /// Orders by a key, descending; ties keep collection order.
    pub fn order_by_desc<K: Ord>(mut self, key: impl Fn(&Entity<T>) -> K + 'a) -> Self {
        self.order = Some(Box::new(move |a, b| key(b).cmp(&key(a))));
        self
    }

    /// Orders by a JSON value, ascending, using [`json_cmp`].
    pub fn order_by_json(mut self, key: impl Fn(&Entity<T>) -> Value + 'a) -> Self {
        self.order = Some(Box::new(move |a, b| json_cmp(&key(a), &key(b))));
        self
    }

    /// Orders with a comparator; ties keep collection order.
    pub fn sort_by(mut self, cmp: impl Fn(&Entity<T>, &Entity<T>) -> Ordering + 'a) -> Self {
        self.order = Some(Box::new(cmp));
        self
    }

    /// Skips the first `n` results.
    pub fn offset(mut self, n: usize) -> Self {
        self.offset = n;
        self
    }

    /// Returns at most `n` results.
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = Some(n);
        self
    }

    fn matches(&self, e: &Entity<T>) -> bool {
        self.filters.iter().all(|f| f(e))
    }

    /// Runs the query.
    pub fn collect(self) -> Vec<Arc<Entity<T>>> {
        let limit = self.limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        if self.order.is_none() {
            // Without ordering, stop scanning as soon as the page is full.
            let mut skipped = 0;
            self.source.scan(&mut |e| {
                if out.len() >= limit {
                    return ControlFlow::Break(());
                }
                if self.matches(e) {
                    if skipped < self.offset {
                        skipped += 1;
                    } else {
                        out.push(Arc::clone(e));
                    }
                }
                ControlFlow::Continue(())
            });
            return out;
        }
        self.source.scan(&mut |e| {
            if self.matches(e) {
                out.push(Arc::clone(e));
            }
            ControlFlow::Continue(())
        });
        if let Some(order) = &self.order {
            out.sort_by(|a, b| order(a, b));
        }
        out.into_iter().skip(self.offset).take(limit).collect()
    }

    /// How many entities the query returns.
    pub fn count(self) -> usize {
        if self.order.is_some() || self.offset > 0 || self.limit.is_some() {
            return self.collect().len();
        }
        let mut n = 0;
        self.source.scan(&mut |e| {
            if self.matches(e) {
                n += 1;
            }
            ControlFlow::Continue(())
        });
        n
    }

    /// The first result.
    pub fn first(self) -> Option<Arc<Entity<T>>> {
        self.limit(1).collect().into_iter().next()
    }
}

/// A total order on JSON values: null < booleans < numbers < strings < arrays < objects;
/// numbers by value, strings by code point, arrays element-wise, objects by length.
#[must_use]
pub fn json_cmp(a: &Value, b: &Value) -> Ordering {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Number(_) => 2,
            Value::String(_) => 3,
            Value::Array(_) => 4,
            Value::Object(_) => 5,
        }
    }
    match (a, b) {
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x.cmp(&y),
            _ => x
                .as_f64()
                .unwrap_or(f64::NAN)
                .total_cmp(&y.as_f64().unwrap_or(f64::NAN)),
        },
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Array(x), Value::Array(y)) => x
            .iter()
            .zip(y)
            .map(|(x, y)| json_cmp(x, y))
            .find(|o| o.is_ne())
            .unwrap_or_else(|| x.len().cmp(&y.len())),
        (Value::Object(x), Value::Object(y)) => x.len().cmp(&y.len()),
        _ => rank(a).cmp(&rank(b)),
    }
}
