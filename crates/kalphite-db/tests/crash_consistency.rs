//! A child process writes through a Store into SQLite and is killed with SIGKILL. After
//! the crash the database must hold every change the child saw as durable, and what it
//! holds must be a prefix of what the child accepted (batches are transactions, written in
//! order): only the changes of the last flush window may be missing.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use kalphite::{Durability, Entity, FlushConfig, Store};
use kalphite_db::{Database, DatabaseConfig, open_store};
use serde_json::json;

const DB_ENV: &str = "KALPHITE_CRASH_DB";

/// The child: writes forever (until killed), reporting each accepted write and every 50th
/// write once it is durable.
#[tokio::test]
#[ignore = "helper: run as a child process by crash_leaves_a_durable_prefix"]
async fn crash_child() -> anyhow::Result<()> {
    let path = std::env::var(DB_ENV)?;
    let db = Database::open(DatabaseConfig::new(format!("sqlite:{path}"))).await?;
    let flush = FlushConfig::default()
        .debounce(Duration::from_millis(10))
        .max_wait(Duration::from_millis(50));
    let store = open_store(&db, Store::builder(), flush).await?;
    let items = store.dynamic("item");
    for i in 0u64.. {
        items.upsert(Entity::new(format!("i{i:07}"), "item", json!({"n": i})))?;
        println!("accepted {i}");
        if i % 50 == 49 {
            store
                .durable(Durability::Local)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("durable {i}");
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_leaves_a_durable_prefix() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("crash.db");
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "--ignored",
            "--exact",
            "crash_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DB_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let (mut accepted, mut durable) = (None::<u64>, None::<u64>);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(n) = line.strip_prefix("accepted ") {
            accepted = Some(n.parse()?);
            // Kill mid-stream: some writes after the last durable point are still queued.
            if durable >= Some(299) && accepted >= Some(325) {
                break;
            }
        } else if let Some(n) = line.strip_prefix("durable ") {
            durable = Some(n.parse()?);
        }
    }
    child.kill()?; // SIGKILL
    child.wait()?;
    let (Some(accepted), Some(durable)) = (accepted, durable) else {
        anyhow::bail!("the child wrote nothing (accepted {accepted:?}, durable {durable:?})");
    };

    let db = Database::open(DatabaseConfig::new(format!("sqlite:{}", path.display()))).await?;
    let mut ns: Vec<u64> = db
        .get_by_type("item")
        .await?
        .iter()
        .map(|e| e.data["n"].as_u64().unwrap_or(u64::MAX))
        .collect();
    ns.sort_unstable();
    let on_disk = ns.len() as u64;
    assert_eq!(
        ns,
        (0..on_disk).collect::<Vec<_>>(),
        "the database does not hold a prefix"
    );
    assert!(
        on_disk > durable,
        "durable write {durable} lost: only {on_disk} on disk"
    );
    eprintln!("accepted ≥ {accepted}, durable {durable}, on disk after SIGKILL {on_disk}");
    Ok(())
}
