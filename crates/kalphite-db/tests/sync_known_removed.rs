//! `SyncWrite::KnownRemoved` on both backends (issue 10, item 8): a client forgets what
//! the server said about one entity whose tombstone the room collected, so its known-state
//! table stops growing with every deletion it ever saw; the other rows stay.

mod common;

use common::Fixture;
use kalphite_db::{Database, SyncWrite};

both_backends!(one_known_row_is_forgotten_and_the_others_stay);

fn known(id: &str, version: u64) -> SyncWrite {
    SyncWrite::Known {
        kind: "todo".into(),
        id: id.into(),
        version,
        entry: format!("{{\"v\":{version}}}"),
    }
}

async fn one_known_row_is_forgotten_and_the_others_stay(f: Fixture) -> anyhow::Result<()> {
    let db = Database::open(f.config()).await?;
    db.write_with_sync(&[], vec![known("a", 1), known("b", 2), known("c", 3)])
        .await?;
    db.write_with_sync(
        &[],
        vec![
            SyncWrite::KnownRemoved {
                kind: "todo".into(),
                id: "b".into(),
            },
            // Forgetting a row that is not there is no error.
            SyncWrite::KnownRemoved {
                kind: "todo".into(),
                id: "zz".into(),
            },
        ],
    )
    .await?;
    let ids: Vec<String> = db
        .read_sync()
        .await?
        .known
        .iter()
        .map(|k| k.id.to_string())
        .collect();
    assert_eq!(ids, ["a", "c"]);
    db.close().await?;
    Ok(())
}
