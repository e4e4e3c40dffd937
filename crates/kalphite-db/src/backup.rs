//! The portable backup format: JSON Lines with a header, one entity per line, then the sync
//! client's bookkeeping (a client's offline queue is part of what a backup must give back),
//! and a trailer carrying the counts and a checksum, so that a truncated or altered file is
//! refused before anything is restored. Specified in `docs/database.md`.

use std::collections::HashSet;

use kalphite::{Entity, EntityId, Kind, Millis};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::sync_state::{KnownRow, OutboxRow, SyncTables};

/// The `format` value of a backup header.
pub const FORMAT: &str = "kalphite-backup";
/// The format version this crate writes. It reads this one and version 1 (entities only).
pub const FORMAT_VERSION: u32 = 2;
/// How every bookkeeping line starts (its tag is serialized first), which tells it from an
/// entity line without parsing the line twice.
const SYNC_LINE_START: &str = "{\"sync\":";

/// The first line of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// The format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// When the backup was written, ms since the epoch.
    #[serde(rename = "createdAt")]
    pub created_at: Millis,
    /// The backend it was taken from (`sqlite` or `postgres`), for information only.
    pub source: String,
}

/// One entity line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The entity's kind.
    #[serde(rename = "type")]
    pub kind: Kind,
    /// Its id.
    pub id: EntityId,
    /// Its data.
    pub data: Value,
    /// Its `updatedAt`.
    #[serde(rename = "updatedAt")]
    pub updated_at: Millis,
    /// Its stored version (the number of writes it has had).
    pub version: i64,
}

impl From<crate::backend::StoredEntity> for Record {
    fn from(s: crate::backend::StoredEntity) -> Self {
        Self {
            kind: s.entity.kind,
            id: s.entity.id,
            data: s.entity.data,
            updated_at: s.entity.updated_at,
            version: s.version,
        }
    }
}

impl Record {
    /// The entity part of the record.
    #[must_use]
    pub fn into_entity(self) -> (Entity, i64) {
        (
            Entity {
                id: self.id,
                kind: self.kind,
                data: self.data,
                updated_at: self.updated_at,
            },
            self.version,
        )
    }
}

/// One row of the sync client's bookkeeping tables (format version 2).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "sync", rename_all = "camelCase", deny_unknown_fields)]
enum SyncLine {
    /// A value of the replica state.
    State { key: String, value: String },
    /// An offline-queue entry.
    Outbox {
        #[serde(rename = "type")]
        kind: Kind,
        id: EntityId,
        position: u64,
        entry: String,
    },
    /// What the server last said about an entity.
    Known {
        #[serde(rename = "type")]
        kind: Kind,
        id: EntityId,
        version: u64,
        entry: String,
    },
}

impl SyncLine {
    fn all(tables: &SyncTables) -> Vec<Self> {
        let state = tables.state.iter().map(|(key, value)| Self::State {
            key: key.clone(),
            value: value.clone(),
        });
        let outbox = tables.outbox.iter().map(|r| Self::Outbox {
            kind: r.kind.clone(),
            id: r.id.clone(),
            position: r.position,
            entry: r.entry.clone(),
        });
        let known = tables.known.iter().map(|r| Self::Known {
            kind: r.kind.clone(),
            id: r.id.clone(),
            version: r.version,
            entry: r.entry.clone(),
        });
        state.chain(outbox).chain(known).collect()
    }

    fn add_to(self, tables: &mut SyncTables) {
        match self {
            Self::State { key, value } => tables.state.push((key, value)),
            Self::Outbox {
                kind,
                id,
                position,
                entry,
            } => tables.outbox.push(OutboxRow {
                kind,
                id,
                position,
                entry,
            }),
            Self::Known {
                kind,
                id,
                version,
                entry,
            } => tables.known.push(KnownRow {
                kind,
                id,
                version,
                entry,
            }),
        }
    }
}

/// The last line of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Trailer {
    /// Always [`FORMAT`].
    end: String,
    /// The number of entity lines.
    count: u64,
    /// The number of bookkeeping lines (absent in version 1, and when there are none).
    #[serde(default, skip_serializing_if = "is_zero")]
    sync: u64,
    /// `fnv1a64:` and 16 lowercase hex digits: FNV-1a (64-bit) over the bytes of every line
    /// between the header and the trailer, each including its `\n`.
    checksum: String,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a backup holds.
#[derive(Debug)]
pub(crate) struct Decoded {
    /// The entities, in first-insert order.
    pub(crate) records: Vec<Record>,
    /// The sync client's bookkeeping (empty for a server's or a local-only database).
    pub(crate) sync: SyncTables,
}

/// FNV-1a, 64-bit.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    const fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn text(self) -> String {
        format!("fnv1a64:{:016x}", self.0)
    }
}

/// Writes a backup of `records` (in first-insert order) and the sync bookkeeping.
pub(crate) fn encode(
    source: &str,
    created_at: Millis,
    records: &[Record],
    sync: &SyncTables,
) -> Result<Vec<u8>> {
    let ser = |r: &Record, e: serde_json::Error| Error::Serialize {
        kind: r.kind.to_string(),
        id: r.id.to_string(),
        source: e,
    };
    let header = Header {
        format: FORMAT.into(),
        version: FORMAT_VERSION,
        created_at,
        source: source.into(),
    };
    let mut out = serde_json::to_vec(&header).map_err(|e| Error::InvalidBackup {
        line: 1,
        reason: format!("could not write the header: {e}"),
    })?;
    out.push(b'\n');
    let mut sum = Fnv::new();
    for r in records {
        let start = out.len();
        serde_json::to_writer(&mut out, r).map_err(|e| ser(r, e))?;
        out.push(b'\n');
        sum.update(&out[start..]);
    }
    let lines = SyncLine::all(sync);
    for line in &lines {
        let start = out.len();
        serde_json::to_writer(&mut out, line).map_err(|e| Error::InvalidBackup {
            line: 0,
            reason: format!("could not write the sync bookkeeping: {e}"),
        })?;
        out.push(b'\n');
        sum.update(&out[start..]);
    }
    let trailer = Trailer {
        end: FORMAT.into(),
        count: records.len() as u64,
        sync: lines.len() as u64,
        checksum: sum.text(),
    };
    let trailer = serde_json::to_vec(&trailer).map_err(|e| Error::InvalidBackup {
        line: records.len() + lines.len() + 2,
        reason: format!("could not write the trailer: {e}"),
    })?;
    out.extend_from_slice(&trailer);
    out.push(b'\n');
    Ok(out)
}

/// Writes `bytes` to `path` so that a crash at any point leaves either the old file or the
/// whole new one: the bytes go to `<path>.partial`, which is flushed to disk (`fsync`)
/// before it is renamed over `path`, and the directory is flushed after the rename so the
/// new name itself survives a power loss. The partial file is removed when a step fails.
///
/// # Errors
/// The first I/O error (the old file, if any, is untouched).
pub(crate) fn write_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("partial");
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        // Without this the rename can reach the disk before the data: after a power loss
        // the backup would be an empty or partial file under its final name.
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(path)
}

/// Flushes the directory holding `path`, so a rename into it is durable (Unix; elsewhere
/// directories cannot be opened for this and the rename is what the OS makes of it).
fn sync_dir(path: &std::path::Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => std::path::Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

/// Reads and checks a whole backup: header, every line, the trailer's counts and checksum,
/// that no `(type, id)` appears twice, and that bookkeeping lines come after the entities.
pub(crate) fn decode(bytes: &[u8]) -> Result<Decoded> {
    let refuse = |line: usize, reason: String| Error::InvalidBackup { line, reason };
    let text = std::str::from_utf8(bytes)
        .map_err(|e| refuse(0, format!("the backup is not UTF-8 text: {e}")))?;
    let Some(body) = text.strip_suffix('\n') else {
        return Err(refuse(
            0,
            "the backup does not end with a newline (truncated?)".into(),
        ));
    };
    let lines: Vec<&str> = body.split('\n').collect();
    let first = lines.first().copied().unwrap_or_default();
    let header: Header = serde_json::from_str(first)
        .map_err(|e| refuse(1, format!("not a kalphite backup header: {e}")))?;
    if header.format != FORMAT {
        return Err(refuse(
            1,
            format!("format is '{}', expected '{FORMAT}'", header.format),
        ));
    }
    if !(1..=FORMAT_VERSION).contains(&header.version) {
        return Err(refuse(
            1,
            format!(
                "format version {} is not supported (this build reads 1 to {FORMAT_VERSION})",
                header.version
            ),
        ));
    }
    if lines.len() < 2 {
        return Err(refuse(2, "the trailer is missing (truncated?)".into()));
    }
    let last = lines.len();
    let trailer: Trailer = serde_json::from_str(lines[last - 1])
        .ok()
        .filter(|t: &Trailer| t.end == FORMAT)
        .ok_or_else(|| {
            refuse(
                last,
                "the trailer is missing or damaged (truncated?)".into(),
            )
        })?;
    let mut sum = Fnv::new();
    let mut records = Vec::with_capacity(last - 2);
    let mut sync = SyncTables::default();
    let mut sync_lines = 0u64;
    let mut seen = HashSet::with_capacity(last - 2);
    for (i, line) in lines[1..last - 1].iter().enumerate() {
        let n = i + 2;
        sum.update(line.as_bytes());
        sum.update(b"\n");
        if header.version >= 2 && line.starts_with(SYNC_LINE_START) {
            let entry: SyncLine = serde_json::from_str(line)
                .map_err(|e| refuse(n, format!("not a bookkeeping line: {e}")))?;
            entry.add_to(&mut sync);
            sync_lines += 1;
            continue;
        }
        if sync_lines > 0 {
            return Err(refuse(
                n,
                "an entity line after the bookkeeping lines".into(),
            ));
        }
        let record: Record = serde_json::from_str(line)
            .map_err(|e| refuse(n, format!("not an entity record: {e}")))?;
        if !seen.insert((record.kind.clone(), record.id.clone())) {
            return Err(refuse(
                n,
                format!("entity {}/{} appears twice", record.kind, record.id),
            ));
        }
        records.push(record);
    }
    if trailer.count != records.len() as u64 {
        return Err(refuse(
            last,
            format!(
                "the trailer counts {} entities but {} were read",
                trailer.count,
                records.len()
            ),
        ));
    }
    if trailer.sync != sync_lines {
        return Err(refuse(
            last,
            format!(
                "the trailer counts {} bookkeeping lines but {sync_lines} were read",
                trailer.sync
            ),
        ));
    }
    if trailer.checksum != sum.text() {
        return Err(refuse(
            last,
            format!(
                "checksum mismatch: trailer says {}, content is {}",
                trailer.checksum,
                sum.text()
            ),
        ));
    }
    Ok(Decoded { records, sync })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(id: &str) -> Record {
        Record {
            kind: "comment".into(),
            id: id.into(),
            data: json!({"message": id}),
            updated_at: 7,
            version: 1,
        }
    }

    fn none() -> SyncTables {
        SyncTables::default()
    }

    fn bookkeeping() -> SyncTables {
        SyncTables {
            state: vec![("replicaId".into(), "\"alice-1\"".into())],
            outbox: vec![OutboxRow {
                kind: "comment".into(),
                id: "a".into(),
                position: 3,
                entry: "{\"queued\":true}".into(),
            }],
            known: vec![KnownRow {
                kind: "comment".into(),
                id: "b".into(),
                version: 7,
                entry: "{}".into(),
            }],
        }
    }

    #[test]
    fn round_trips() {
        let bytes = encode("sqlite", 1, &[rec("a"), rec("b")], &none()).unwrap();
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.records, vec![rec("a"), rec("b")]);
        assert!(decoded.sync.is_empty());
        let empty = encode("postgres", 1, &[], &none()).unwrap();
        assert!(decode(&empty).unwrap().records.is_empty());
    }

    #[test]
    fn the_sync_bookkeeping_round_trips_after_the_entities() {
        let bytes = encode("sqlite", 1, &[rec("a"), rec("b")], &bookkeeping()).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + 2 + 3 + 1);
        assert!(lines[3..6].iter().all(|l| l.starts_with(SYNC_LINE_START)));
        assert!(lines[6].contains("\"sync\":3"), "{}", lines[6]);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.records, vec![rec("a"), rec("b")]);
        assert_eq!(decoded.sync, bookkeeping());
    }

    #[test]
    fn a_version_1_backup_still_restores() {
        let v1 = concat!(
            "{\"format\":\"kalphite-backup\",\"version\":1,\"createdAt\":1,\"source\":\"sqlite\"}\n",
            "{\"type\":\"comment\",\"id\":\"a\",\"data\":{\"message\":\"a\"},\"updatedAt\":7,\"version\":1}\n",
        );
        let mut sum = Fnv::new();
        sum.update(v1.lines().nth(1).unwrap().as_bytes());
        sum.update(b"\n");
        let text = format!(
            "{v1}{{\"end\":\"kalphite-backup\",\"count\":1,\"checksum\":\"{}\"}}\n",
            sum.text()
        );
        let decoded = decode(text.as_bytes()).unwrap();
        assert_eq!(decoded.records, vec![rec("a")]);
        assert!(decoded.sync.is_empty());
    }

    #[test]
    fn refuses_truncation_and_tampering() {
        let bytes = encode("sqlite", 1, &[rec("a"), rec("b"), rec("c")], &bookkeeping()).unwrap();
        for cut in 1..bytes.len() {
            assert!(
                decode(&bytes[..cut]).is_err(),
                "a backup cut at {cut} bytes was accepted"
            );
        }
        let text = String::from_utf8(bytes).unwrap();
        let tampered = text.replacen("\"message\":\"b\"", "\"message\":\"x\"", 1);
        assert!(matches!(
            decode(tampered.as_bytes()),
            Err(Error::InvalidBackup { .. })
        ));
        let queue_altered = text.replacen("\"position\":3", "\"position\":4", 1);
        assert!(matches!(
            decode(queue_altered.as_bytes()),
            Err(Error::InvalidBackup { .. })
        ));
        let dropped: Vec<&str> = text
            .lines()
            .filter(|l| !l.contains("\"id\":\"b\""))
            .collect();
        let dropped = dropped.join("\n") + "\n";
        assert!(decode(dropped.as_bytes()).is_err());
        // An entity line moved after the bookkeeping (checksum recomputed): refused.
        let mut lines: Vec<&str> = text.lines().collect();
        let moved = lines.remove(1);
        lines.insert(lines.len() - 1, moved);
        let mut sum = Fnv::new();
        for l in &lines[1..lines.len() - 1] {
            sum.update(l.as_bytes());
            sum.update(b"\n");
        }
        let trailer = format!(
            "{{\"end\":\"kalphite-backup\",\"count\":3,\"sync\":3,\"checksum\":\"{}\"}}",
            sum.text()
        );
        let n = lines.len();
        lines[n - 1] = &trailer;
        let reordered = lines.join("\n") + "\n";
        let err = decode(reordered.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("after the bookkeeping"), "{err}");
    }

    #[test]
    fn a_durable_write_replaces_the_file_whole_or_not_at_all() {
        // The fsyncs themselves cannot be observed without cutting the power; this pins the
        // rest of the contract: the new bytes under the final name, no partial file left,
        // and a failed write leaves the old file as it was.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rooms.backup");
        std::fs::write(&path, b"old").unwrap();
        write_durably(&path, b"new backup").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new backup");
        assert!(!path.with_extension("partial").exists());

        // The rename fails (the target is a non-empty directory): nothing is left behind.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("keep"), b"x").unwrap();
        assert!(write_durably(&blocked, b"data").is_err());
        assert!(blocked.join("keep").exists());
        assert!(!blocked.with_extension("partial").exists());
        // A relative path in the current directory has a parent to flush too.
        assert!(sync_dir(std::path::Path::new("plain-name")).is_ok());
    }
}
