-- kalphite built-in migration 2 (PostgreSQL): the sync client's bookkeeping, in tables of its
-- own (never entities). The client writes them in the same transaction as the entity rows
-- they describe, so after a crash they always agree with the data.
-- The replica state: replica id, room binding, watermark, ... one row per key.
CREATE TABLE kalphite_sync_state (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- The offline queue: the latest unacknowledged change per entity, in queue order.
CREATE TABLE kalphite_sync_outbox (
    type     TEXT    NOT NULL,
    id       TEXT    NOT NULL,
    position BIGINT  NOT NULL,
    entry    TEXT    NOT NULL,
    PRIMARY KEY (type, id)
);
-- Per entity, what the server last said about it (room version, clock, content hash).
CREATE TABLE kalphite_sync_known (
    type    TEXT    NOT NULL,
    id      TEXT    NOT NULL,
    version BIGINT  NOT NULL,
    entry   TEXT    NOT NULL,
    PRIMARY KEY (type, id)
);
