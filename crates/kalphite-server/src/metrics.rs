//! Server counters, rendered as Prometheus text at `/metrics`. Plain relaxed atomics: each
//! counter is independent, and a scrape may see them a few increments apart.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// The server's counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open WebSocket connections (gauge).
    pub connections: AtomicU64,
    /// WebSocket connections accepted since start.
    pub connections_total: AtomicU64,
    /// Rooms loaded in memory (gauge).
    pub rooms: AtomicU64,
    /// Rooms unloaded from memory after going unused.
    pub rooms_unloaded: AtomicU64,
    /// Frames received.
    pub messages_in: AtomicU64,
    /// Frames sent.
    pub messages_out: AtomicU64,
    /// Changes written to the room log.
    pub changes_persisted: AtomicU64,
    /// Conflicts resolved.
    pub conflicts: AtomicU64,
    /// Error replies sent.
    pub errors: AtomicU64,
    /// Hellos refused for auth reasons.
    pub auth_failures: AtomicU64,
    /// Room-log writes that failed.
    pub storage_errors: AtomicU64,
    /// Connections dropped as too slow: their outbound queue went over its bound, or a
    /// write to them made no progress for the write timeout.
    pub slow_consumers: AtomicU64,
    /// Of those, the ones whose write stalled past the write timeout.
    pub write_timeouts: AtomicU64,
    /// Open TCP sockets, WebSocket or not (gauge).
    pub sockets: AtomicU64,
    /// Connections refused because the server was at its connection limit (a socket
    /// closed at once, or a WebSocket upgrade answered 503).
    pub connections_refused: AtomicU64,
    /// Hellos refused because their user was at the per-user connection limit.
    pub user_limit_refusals: AtomicU64,
    /// Sockets closed because no complete HTTP request (or upgrade) arrived in time.
    pub handshake_timeouts: AtomicU64,
    /// Bytes waiting in the outbound queues of all connections (gauge).
    pub outbound_bytes: AtomicU64,
    /// The most bytes one connection's outbound queue has held since start (gauge).
    pub outbound_peak_bytes: AtomicU64,
    /// Cluster mode's counters (rendered only on a cluster node).
    pub cluster: ClusterMetrics,
}

/// What a cluster node counts (see `docs/cluster.md`).
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    /// Set when the server runs as a cluster node: the rows below are rendered.
    pub enabled: std::sync::atomic::AtomicBool,
    /// Rooms whose lease this node holds (gauge).
    pub rooms_owned: AtomicU64,
    /// Lease renewals that failed (the database did not answer, or answered an error).
    pub lease_renew_failures: AtomicU64,
    /// Leases found lost (renewal did not return them, or renewal failed for a whole TTL).
    pub leases_lost: AtomicU64,
    /// Group commits of a room refused by its fence: another node had taken the room.
    pub fencing_rejections: AtomicU64,
    /// Connections forwarded to the room's owner.
    pub forwarded_connections: AtomicU64,
    /// Forwarded connections open now (gauge).
    pub forwarded_open: AtomicU64,
    /// Rooms acquired by this node.
    pub acquisitions: AtomicU64,
    /// Milliseconds from asking for a room's lease to serving it, summed over acquisitions.
    pub handover_ms: AtomicU64,
}

impl Metrics {
    /// Adds one to `counter`.
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to `counter`.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts one from a gauge.
    pub(crate) fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }

    /// Subtracts `n` from a gauge.
    pub(crate) fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, kind, help, value) in self.rows() {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        if self.cluster.enabled.load(Ordering::Relaxed) {
            for (name, kind, help, value) in self.cluster.rows() {
                let _ = writeln!(out, "# HELP {name} {help}");
                let _ = writeln!(out, "# TYPE {name} {kind}");
                let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
            }
        }
        if let Some(bytes) = resident_bytes() {
            let name = "kalphite_sync_process_resident_bytes";
            let _ = writeln!(out, "# HELP {name} Resident memory of the server process.");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {bytes}");
        }
        out
    }

    /// Each metric's name, type, help text and value.
    #[allow(clippy::too_many_lines, reason = "a table: one entry per metric")]
    fn rows(&self) -> [(&'static str, &'static str, &'static str, &AtomicU64); 19] {
        [
            (
                "kalphite_sync_connections",
                "gauge",
                "Open WebSocket connections.",
                &self.connections,
            ),
            (
                "kalphite_sync_connections_total",
                "counter",
                "WebSocket connections accepted.",
                &self.connections_total,
            ),
            (
                "kalphite_sync_rooms",
                "gauge",
                "Rooms loaded in memory.",
                &self.rooms,
            ),
            (
                "kalphite_sync_rooms_unloaded_total",
                "counter",
                "Rooms unloaded from memory after going unused.",
                &self.rooms_unloaded,
            ),
            (
                "kalphite_sync_messages_in_total",
                "counter",
                "Frames received.",
                &self.messages_in,
            ),
            (
                "kalphite_sync_messages_out_total",
                "counter",
                "Frames sent.",
                &self.messages_out,
            ),
            (
                "kalphite_sync_changes_persisted_total",
                "counter",
                "Changes written durably.",
                &self.changes_persisted,
            ),
            (
                "kalphite_sync_conflicts_total",
                "counter",
                "Concurrent edits resolved.",
                &self.conflicts,
            ),
            (
                "kalphite_sync_errors_total",
                "counter",
                "Error replies sent.",
                &self.errors,
            ),
            (
                "kalphite_sync_auth_failures_total",
                "counter",
                "Hellos refused by auth.",
                &self.auth_failures,
            ),
            (
                "kalphite_sync_storage_errors_total",
                "counter",
                "Failed room-log writes.",
                &self.storage_errors,
            ),
            (
                "kalphite_sync_slow_consumers_total",
                "counter",
                "Connections dropped as too slow (queue over its bound, or a stalled write).",
                &self.slow_consumers,
            ),
            (
                "kalphite_sync_write_timeouts_total",
                "counter",
                "Connections dropped because a write made no progress for the write timeout.",
                &self.write_timeouts,
            ),
            (
                "kalphite_sync_sockets",
                "gauge",
                "Open TCP sockets (WebSocket, HTTP, or not yet either).",
                &self.sockets,
            ),
            (
                "kalphite_sync_connections_refused_total",
                "counter",
                "Connections refused at the connection limit.",
                &self.connections_refused,
            ),
            (
                "kalphite_sync_user_limit_refusals_total",
                "counter",
                "Hellos refused at the per-user connection limit.",
                &self.user_limit_refusals,
            ),
            (
                "kalphite_sync_handshake_timeouts_total",
                "counter",
                "Sockets closed for sending no complete HTTP request in time.",
                &self.handshake_timeouts,
            ),
            (
                "kalphite_sync_outbound_bytes",
                "gauge",
                "Bytes queued for all connections.",
                &self.outbound_bytes,
            ),
            (
                "kalphite_sync_outbound_peak_bytes",
                "gauge",
                "Most bytes one connection's queue has held since start.",
                &self.outbound_peak_bytes,
            ),
        ]
    }
}

impl ClusterMetrics {
    fn rows(&self) -> [(&'static str, &'static str, &'static str, &AtomicU64); 8] {
        [
            (
                "kalphite_cluster_rooms_owned",
                "gauge",
                "Rooms whose lease this node holds.",
                &self.rooms_owned,
            ),
            (
                "kalphite_cluster_lease_renew_failures_total",
                "counter",
                "Lease renewals that failed.",
                &self.lease_renew_failures,
            ),
            (
                "kalphite_cluster_leases_lost_total",
                "counter",
                "Room leases this node lost (its clients were closed with 1001).",
                &self.leases_lost,
            ),
            (
                "kalphite_cluster_fencing_rejections_total",
                "counter",
                "Room commits refused by their fence: another node owned the room.",
                &self.fencing_rejections,
            ),
            (
                "kalphite_cluster_forwarded_connections_total",
                "counter",
                "Connections forwarded to their room's owner.",
                &self.forwarded_connections,
            ),
            (
                "kalphite_cluster_forwarded_connections",
                "gauge",
                "Forwarded connections open.",
                &self.forwarded_open,
            ),
            (
                "kalphite_cluster_acquisitions_total",
                "counter",
                "Rooms this node acquired.",
                &self.acquisitions,
            ),
            (
                "kalphite_cluster_handover_ms_total",
                "counter",
                "Milliseconds from asking for a room's lease to serving it, summed over \
                 kalphite_cluster_acquisitions_total.",
                &self.handover_ms,
            ),
        ]
    }
}

/// The process's resident set size (Linux: `VmRSS` of `/proc/self/status`).
#[must_use]
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
