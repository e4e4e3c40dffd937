DROP TABLE kalphite_sync_known;
DROP TABLE kalphite_sync_outbox;
DROP TABLE kalphite_sync_state;
