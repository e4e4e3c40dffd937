//! Fixtures shared by the integration tests: the comment/review kinds of the original
//! test suite, the workload-W entity, and a counting subscriber.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kalphite::{Entity, EntityKind, Store, Subscription};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A code comment, the original suite's main fixture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Comment {
    pub message: String,
    pub line_number: u64,
    #[serde(default)]
    pub tags: Vec<String>,
}

impl EntityKind for Comment {
    const KIND: &'static str = "comment";
}

/// A review, the second kind of the original suite.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Review {
    pub title: String,
    pub status: String,
    #[serde(default)]
    pub approved: bool,
    #[serde(default)]
    pub priority: String,
}

impl EntityKind for Review {
    const KIND: &'static str = "review";
}

pub(crate) fn comment(message: &str, line_number: u64) -> Comment {
    Comment {
        message: message.to_string(),
        line_number,
        tags: Vec::new(),
    }
}

pub(crate) fn review(title: &str, status: &str) -> Review {
    Review {
        title: title.to_string(),
        status: status.to_string(),
        approved: status == "approved",
        priority: "normal".to_string(),
    }
}

/// The JSON form of the original's `createCommentEntity(i)`.
pub(crate) fn comment_json(i: u64) -> Entity<Value> {
    Entity::new(
        format!("c{i}"),
        "comment",
        json!({"message": format!("Message {i}"), "lineNumber": i}),
    )
}

/// A JSON review entity.
pub(crate) fn review_json(i: u64) -> Entity<Value> {
    Entity::new(
        format!("r{i}"),
        "review",
        json!({"title": format!("Review {i}"), "status": "pending"}),
    )
}

/// Subscribes a counter to the whole store.
pub(crate) fn counter(store: &Store) -> (Arc<AtomicUsize>, Subscription) {
    let count = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&count);
    let sub = store.subscribe(move |_| {
        c.fetch_add(1, Ordering::SeqCst);
    });
    (count, sub)
}

pub(crate) fn get(count: &AtomicUsize) -> usize {
    count.load(Ordering::SeqCst)
}

/// The ids of a snapshot, in order.
pub(crate) fn ids<T>(entities: &[Arc<Entity<T>>]) -> Vec<String> {
    entities.iter().map(|e| e.id.to_string()).collect()
}
