-- kalphite built-in migration 1 (SQLite): the entities table.
-- seq is the rowid alias: it keeps first-insert order (an upsert keeps its row) and is
-- stable across VACUUM because it is declared.
CREATE TABLE kalphite_entities (
    seq        INTEGER PRIMARY KEY,
    type       TEXT    NOT NULL,
    id         TEXT    NOT NULL,
    data       TEXT    NOT NULL,
    updated_at INTEGER NOT NULL,
    version    INTEGER NOT NULL DEFAULT 1
);
CREATE UNIQUE INDEX kalphite_entities_type_id ON kalphite_entities (type, id);
-- get_by_type reads a kind in first-insert order straight from this index (no sort).
CREATE INDEX kalphite_entities_type_seq ON kalphite_entities (type, seq);
