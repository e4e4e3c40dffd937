//! The todo app's entities — todo, project, tag — as Rust types the store keeps typed,
//! and the ordering every command shares (so `list` numbers and `complete N` agree).

use std::fmt;
use std::str::FromStr;

use kalphite::{Entity, EntityKind};
use serde::{Deserialize, Serialize};

/// Where a todo stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Status {
    /// Not started.
    Pending,
    /// Being worked on.
    InProgress,
    /// Done.
    Completed,
    /// Abandoned.
    Cancelled,
}

/// How urgent a todo is.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Priority {
    /// Whenever.
    Low,
    /// The default.
    Medium,
    /// Soon.
    High,
    /// Now.
    Urgent,
}

macro_rules! text_enum {
    ($ty:ty { $($variant:ident => $text:literal),* $(,)? }) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $(Self::$variant => $text),* })
            }
        }
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok(Self::$variant),)*
                    other => Err(format!(
                        "'{other}' is not one of: {}", [$($text),*].join(", ")
                    )),
                }
            }
        }
    };
}

text_enum!(Status { Pending => "pending", InProgress => "in-progress", Completed => "completed", Cancelled => "cancelled" });
text_enum!(Priority { Low => "low", Medium => "medium", High => "high", Urgent => "urgent" });

/// A todo.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Todo {
    /// What to do.
    pub title: String,
    /// Where it stands.
    pub status: Status,
    /// How urgent.
    pub priority: Priority,
    /// Due date, `YYYY-MM-DD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<String>,
    /// Tag names.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The project's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    /// Creation time, ms since the epoch.
    pub created_at: u64,
}

impl EntityKind for Todo {
    const KIND: &'static str = "todo";
}

/// A project todos can belong to; its id is its name, lower-cased.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Project {
    /// Display name.
    pub name: String,
    /// Creation time, ms since the epoch.
    pub created_at: u64,
}

impl EntityKind for Project {
    const KIND: &'static str = "project";
}

/// A tag; its id is its name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Tag {
    /// The tag.
    pub name: String,
}

impl EntityKind for Tag {
    const KIND: &'static str = "tag";
}

/// The id of the project named `name`.
pub(crate) fn project_id(name: &str) -> String {
    name.trim().to_lowercase()
}

/// The one order every command numbers todos in: open before finished, then most urgent
/// first, then oldest first, then by id (so it is total and the same on every replica).
pub(crate) fn display_order(a: &Entity<Todo>, b: &Entity<Todo>) -> std::cmp::Ordering {
    let finished = |t: &Todo| matches!(t.status, Status::Completed | Status::Cancelled);
    finished(&a.data)
        .cmp(&finished(&b.data))
        .then(b.data.priority.cmp(&a.data.priority))
        .then(a.data.created_at.cmp(&b.data.created_at))
        .then(a.id.cmp(&b.id))
}

/// Checks a `YYYY-MM-DD` date.
pub(crate) fn parse_due(s: &str) -> Result<String, String> {
    let parts: Vec<&str> = s.split('-').collect();
    let ok = parts.len() == 3
        && parts[0].len() == 4
        && parts[1].len() == 2
        && parts[2].len() == 2
        && parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit()))
        && (1..=12).contains(&parts[1].parse::<u32>().unwrap_or(0))
        && (1..=31).contains(&parts[2].parse::<u32>().unwrap_or(0));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!("'{s}' is not a date of the form YYYY-MM-DD"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_priority_round_trip_as_text() {
        for s in ["pending", "in-progress", "completed", "cancelled"] {
            assert_eq!(s.parse::<Status>().unwrap().to_string(), s);
        }
        assert!("done".parse::<Status>().unwrap_err().contains("pending"));
        assert_eq!(
            serde_json::to_value(Status::InProgress).unwrap(),
            "in-progress"
        );
        assert!(Priority::Urgent > Priority::High && Priority::Medium > Priority::Low);
    }

    #[test]
    fn due_dates_are_checked() {
        assert!(parse_due("2026-12-01").is_ok());
        for bad in ["2026-13-01", "tomorrow", "2026-1-1", "2026-12-00"] {
            assert!(parse_due(bad).is_err(), "{bad}");
        }
    }
}
