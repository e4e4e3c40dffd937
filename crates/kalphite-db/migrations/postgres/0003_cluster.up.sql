-- kalphite built-in migration 3 (PostgreSQL): cluster mode (`kalphite serve --cluster`).
-- One row per room that a cluster node has owned: its fencing term (bumped by every new
-- owner), the room's version after the last fenced commit (NULL until the first owner
-- sets it from the room's log), and the current owner's lease (by the database clock).
CREATE TABLE kalphite_rooms (
    room        TEXT PRIMARY KEY,
    term        BIGINT NOT NULL,
    version     BIGINT NULL,
    owner       TEXT NULL,
    lease_until TIMESTAMPTZ NULL
);
-- One row per cluster node id: where other nodes reach it, when it joined and when it last
-- renewed its leases. Its liveness is a session advisory lock, not a column.
CREATE TABLE kalphite_nodes (
    node       TEXT PRIMARY KEY,
    advertise  TEXT NOT NULL,
    started_at TIMESTAMPTZ,
    seen_at    TIMESTAMPTZ
);
