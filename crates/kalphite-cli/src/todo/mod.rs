//! `kalphite todo`: the original project's todo CLI rebuilt as a local-first app. Data
//! lives in a kalphite Store over its own SQLite file; with `--server` every command also
//! syncs through a kalphite server.

pub(crate) mod model;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use kalphite::{Durability, Entity, EntityId, Store, TypedSchema, now_millis};
use serde_json::json;

use crate::session::{Session, SessionOptions};
use model::{Priority, Project, Status, Tag, Todo, display_order, parse_due, project_id};

/// `kalphite todo` options.
#[derive(Debug, Args)]
pub(crate) struct TodoArgs {
    #[command(flatten)]
    pub session: SessionOptions,
    #[command(subcommand)]
    pub command: TodoCommand,
}

/// The todo commands.
#[derive(Debug, Subcommand)]
pub(crate) enum TodoCommand {
    /// Add a todo.
    Add {
        /// What to do.
        title: String,
        /// How urgent.
        #[arg(long, default_value = "medium")]
        priority: Priority,
        /// Due date, YYYY-MM-DD.
        #[arg(long, value_parser = parse_due)]
        due: Option<String>,
        /// A tag (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// The project (created if new).
        #[arg(long)]
        project: Option<String>,
    },
    /// List todos, most urgent first; numbers are what the other commands take.
    List {
        /// Only this status.
        #[arg(long)]
        status: Option<Status>,
        /// Only this priority.
        #[arg(long)]
        priority: Option<Priority>,
        /// Only todos with this tag.
        #[arg(long)]
        tag: Option<String>,
        /// Only todos of this project.
        #[arg(long)]
        project: Option<String>,
        /// Machine-readable output (stable for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Mark todo N completed.
    Complete {
        /// The number `list` shows.
        n: usize,
    },
    /// Set todo N's status.
    Status {
        /// The number `list` shows.
        n: usize,
        /// The new status.
        status: Status,
    },
    /// Delete todo N.
    Delete {
        /// The number `list` shows.
        n: usize,
    },
    /// Projects with their completed/total counts.
    Projects,
    /// Tags with how many todos carry each.
    Tags,
    /// Counts per kind and status, and overdue todos.
    Stats,
    /// Load demo data.
    Demo,
    /// Delete everything.
    Clear,
    /// Push what is pending to the server and pull until caught up.
    Sync,
}

fn schema() -> Arc<TypedSchema> {
    Arc::new(
        TypedSchema::new()
            .kind::<Todo>()
            .kind::<Project>()
            .kind::<Tag>(),
    )
}

/// Runs one todo command.
pub(crate) async fn run(args: TodoArgs) -> Result<()> {
    let mut session = Session::open(&args.session, schema()).await?;
    let changes = args.command.changes_data();
    let outcome = execute(&mut session, args.command).await;
    let finished = session
        .finish(changes && outcome.is_ok(), outcome.is_err())
        .await;
    outcome?;
    finished
}

impl TodoCommand {
    /// Whether the command writes (read-only commands never wait for the server).
    fn changes_data(&self) -> bool {
        matches!(
            self,
            Self::Add { .. }
                | Self::Complete { .. }
                | Self::Status { .. }
                | Self::Delete { .. }
                | Self::Demo
                | Self::Clear
        )
    }
}

async fn execute(session: &mut Session, command: TodoCommand) -> Result<()> {
    let store = &session.store().clone();
    let todos = store.collection::<Todo>()?;
    match command {
        TodoCommand::Add {
            title,
            priority,
            due,
            tags,
            project,
        } => {
            if title.trim().is_empty() {
                bail!("a todo needs a title");
            }
            let project_id = project.as_deref().map(project_id);
            store.transaction(|tx| {
                if let (Some(id), Some(name)) = (&project_id, &project)
                    && tx.get::<Project>(id).is_none()
                {
                    let project = Project {
                        name: name.trim().into(),
                        created_at: now_millis(),
                    };
                    tx.put(id.as_str(), project)?;
                }
                for tag in &tags {
                    if tx.get::<Tag>(tag).is_none() {
                        tx.put(tag.as_str(), Tag { name: tag.clone() })?;
                    }
                }
                let todo = Todo {
                    title: title.trim().into(),
                    status: Status::Pending,
                    priority,
                    due,
                    tags: tags.clone(),
                    project_id: project_id.clone(),
                    created_at: now_millis(),
                };
                tx.put(new_id(), todo)?;
                Ok::<_, kalphite::Error>(())
            })?;
            saved(store).await?;
            println!("Added \"{}\". {} todos in all.", title.trim(), todos.len());
        }
        TodoCommand::List {
            status,
            priority,
            tag,
            project,
            json,
        } => {
            let projects = project_names(store)?;
            let want_project = project.as_deref().map(project_id);
            let rows: Vec<(usize, Arc<Entity<Todo>>)> = numbered(store)?
                .into_iter()
                .filter(|(_, t)| status.is_none_or(|s| t.data.status == s))
                .filter(|(_, t)| priority.is_none_or(|p| t.data.priority == p))
                .filter(|(_, t)| tag.as_ref().is_none_or(|g| t.data.tags.contains(g)))
                .filter(|(_, t)| {
                    want_project
                        .as_ref()
                        .is_none_or(|p| t.data.project_id.as_ref() == Some(p))
                })
                .collect();
            if json {
                let out: Vec<_> = rows
                    .iter()
                    .map(|(n, t)| {
                        json!({
                            "number": n,
                            "id": t.id,
                            "title": t.data.title,
                            "status": t.data.status,
                            "priority": t.data.priority,
                            "due": t.data.due,
                            "tags": t.data.tags,
                            "project": t.data.project_id.as_ref().map(|p| projects.get(p).cloned().unwrap_or_else(|| p.clone())),
                            "createdAt": t.data.created_at,
                            "updatedAt": t.updated_at,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else if rows.is_empty() {
                println!("No todos. Add one with: kalphite todo add \"title\"");
            } else {
                let today = today();
                for (n, t) in &rows {
                    println!("{}", render(*n, t, &projects, &today));
                }
            }
        }
        TodoCommand::Complete { n } => {
            let done = set_status(store, n, Status::Completed)?;
            saved(store).await?;
            println!("{done}");
        }
        TodoCommand::Status { n, status } => {
            let done = set_status(store, n, status)?;
            saved(store).await?;
            println!("{done}");
        }
        TodoCommand::Delete { n } => {
            let todo = nth(store, n)?;
            todos.delete(&todo.id);
            saved(store).await?;
            println!("Deleted {n}: {}", todo.data.title);
        }
        TodoCommand::Projects => {
            let all = todos.snapshot();
            let projects = store
                .collection::<Project>()?
                .order_by(|p| p.data.name.to_lowercase());
            if projects.is_empty() {
                println!("No projects. Add a todo with --project NAME to create one.");
            }
            for p in projects {
                let mine: Vec<_> = all
                    .iter()
                    .filter(|t| t.data.project_id.as_deref() == Some(&*p.id))
                    .collect();
                let done = mine
                    .iter()
                    .filter(|t| t.data.status == Status::Completed)
                    .count();
                println!("{}  {done}/{} completed", p.data.name, mine.len());
            }
        }
        TodoCommand::Tags => {
            let mut counts: BTreeMap<String, usize> = store
                .collection::<Tag>()?
                .iter()
                .map(|t| (t.data.name.clone(), 0))
                .collect();
            for t in &todos {
                for tag in &t.data.tags {
                    *counts.entry(tag.clone()).or_default() += 1;
                }
            }
            if counts.is_empty() {
                println!("No tags. Add a todo with --tag NAME to create one.");
            }
            for (tag, n) in counts {
                println!("#{tag}  {n} todos");
            }
        }
        TodoCommand::Stats => {
            let today = today();
            println!("todos: {}", todos.len());
            println!("projects: {}", store.collection::<Project>()?.len());
            println!("tags: {}", store.collection::<Tag>()?.len());
            for s in [
                Status::Pending,
                Status::InProgress,
                Status::Completed,
                Status::Cancelled,
            ] {
                println!(
                    "{s}: {}",
                    todos.query().filter(|t| t.data.status == s).count()
                );
            }
            println!(
                "overdue: {}",
                todos
                    .query()
                    .filter(|t| is_overdue(&t.data, &today))
                    .count()
            );
        }
        TodoCommand::Demo => {
            let now = now_millis();
            store.transaction(|tx| {
                tx.put(
                    "kalphite",
                    Project {
                        name: "Kalphite".into(),
                        created_at: now,
                    },
                )?;
                tx.put(
                    "demo",
                    Tag {
                        name: "demo".into(),
                    },
                )?;
                tx.put(
                    "docs",
                    Tag {
                        name: "docs".into(),
                    },
                )?;
                let demo = [
                    ("Try the sync server", Priority::High, vec!["demo"]),
                    ("Write the README tour", Priority::Medium, vec!["docs"]),
                    ("Ship it", Priority::Urgent, vec!["demo"]),
                ];
                for (i, (title, priority, tags)) in demo.into_iter().enumerate() {
                    tx.put(
                        format!("demo-{i}"),
                        Todo {
                            title: title.into(),
                            status: Status::Pending,
                            priority,
                            due: None,
                            tags: tags.into_iter().map(String::from).collect(),
                            project_id: Some("kalphite".into()),
                            created_at: now + i as u64,
                        },
                    )?;
                }
                Ok::<_, kalphite::Error>(())
            })?;
            saved(store).await?;
            println!("Loaded demo data: 1 project, 2 tags, 3 todos.");
        }
        TodoCommand::Clear => {
            let n = store.len();
            store.clear();
            saved(store).await?;
            println!("Deleted {n} entities.");
        }
        TodoCommand::Sync => {
            let report = session.sync_now().await?;
            println!("{report}");
        }
    }
    Ok(())
}

fn new_id() -> EntityId {
    use rand::Rng;
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let suffix: String = (0..9)
        .map(|_| DIGITS[rng.random_range(0..36)] as char)
        .collect();
    EntityId::from(format!("{}-{suffix}", now_millis()))
}

/// Every todo with its number, in the shared display order.
fn numbered(store: &Store) -> Result<Vec<(usize, Arc<Entity<Todo>>)>> {
    let todos = store
        .collection::<Todo>()?
        .query()
        .sort_by(display_order)
        .collect();
    Ok(todos
        .into_iter()
        .enumerate()
        .map(|(i, t)| (i + 1, t))
        .collect())
}

fn nth(store: &Store, n: usize) -> Result<Arc<Entity<Todo>>> {
    let all = numbered(store)?;
    let count = all.len();
    all.into_iter()
        .find(|(i, _)| *i == n)
        .map(|(_, t)| t)
        .with_context(|| {
            format!("there is no todo number {n} (there are {count}; see `kalphite todo list`)")
        })
}

/// Sets a todo's status; returns what to tell the user once it is saved.
fn set_status(store: &Store, n: usize, status: Status) -> Result<String> {
    let todo = nth(store, n)?;
    let mut data = todo.data.clone();
    data.status = status;
    store.collection::<Todo>()?.put(todo.id.clone(), data)?;
    Ok(format!("{n}: {} is now {status}", todo.data.title))
}

/// Writes the command's changes to the database file now: a confirmation ("Added …") is
/// printed only once it is true after a crash, and with a server the same transaction
/// holds the change's place in the offline queue.
async fn saved(store: &Store) -> Result<()> {
    store
        .durable(Durability::Local)
        .await
        .context("could not write the change to the database")?;
    Ok(())
}

fn project_names(store: &Store) -> Result<BTreeMap<String, String>> {
    Ok(store
        .collection::<Project>()?
        .iter()
        .map(|p| (p.id.to_string(), p.data.name.clone()))
        .collect())
}

fn is_overdue(t: &Todo, today: &str) -> bool {
    !matches!(t.status, Status::Completed | Status::Cancelled)
        && t.due.as_deref().is_some_and(|d| d < today)
}

fn render(n: usize, t: &Entity<Todo>, projects: &BTreeMap<String, String>, today: &str) -> String {
    let status = match t.data.status {
        Status::Pending => "[ ]",
        Status::InProgress => "[~]",
        Status::Completed => "[x]",
        Status::Cancelled => "[-]",
    };
    let priority = match t.data.priority {
        Priority::Low => "   ",
        Priority::Medium => "!  ",
        Priority::High => "!! ",
        Priority::Urgent => "!!!",
    };
    let mut line = format!("{n:>3}. {status} {priority} {}", t.data.title);
    if let Some(p) = &t.data.project_id {
        let _ = write!(line, "  [{}]", projects.get(p).unwrap_or(p));
    }
    if let Some(due) = &t.data.due {
        let _ = write!(line, "  due {due}");
        if is_overdue(&t.data, today) {
            line.push_str(" OVERDUE");
        }
    }
    for tag in &t.data.tags {
        let _ = write!(line, "  #{tag}");
    }
    line
}

/// Today's date (UTC) as `YYYY-MM-DD`.
fn today() -> String {
    let days = i64::try_from(now_millis() / 86_400_000).unwrap_or(0);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn today_is_a_plausible_date() {
        let t = today();
        assert!(parse_due(&t).is_ok(), "{t}");
        assert!(t.as_str() >= "2024-01-01");
    }

    #[test]
    fn overdue_needs_a_past_date_and_an_open_status() {
        let mut t = Todo {
            title: "x".into(),
            status: Status::Pending,
            priority: Priority::Low,
            due: Some("2020-01-01".into()),
            tags: vec![],
            project_id: None,
            created_at: 0,
        };
        assert!(is_overdue(&t, "2026-01-01"));
        t.status = Status::Completed;
        assert!(!is_overdue(&t, "2026-01-01"));
    }
}
