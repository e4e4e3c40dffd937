//! PostgreSQL for the end-to-end tests: `KALPHITE_PG_URL` (a test is skipped loudly
//! without it), a schema per test, a URL through a proxy, and the cluster's room and node
//! tables read directly.

use std::io::Write as _;
use std::net::SocketAddr;

/// `KALPHITE_PG_URL`, or `None` after saying loudly that `test` is skipped.
pub(crate) fn pg_url_or_skip(test: &str) -> Option<String> {
    if let Ok(pg) = std::env::var("KALPHITE_PG_URL") {
        return Some(pg);
    }
    let _ = std::io::stderr().write_all(
        format!(
            "*** SKIPPED {test}: set KALPHITE_PG_URL (e.g. \
             postgres://postgres@127.0.0.1:5432/test) to run it ***\n"
        )
        .as_bytes(),
    );
    None
}

/// A new schema made by kalphite-db (its migrations run), named `PREFIX_<random>`; returns
/// the schema.
pub(crate) async fn fresh_schema(pg: &str, prefix: &str) -> String {
    let schema = format!("{prefix}_{:08x}", rand::random::<u32>());
    kalphite_db::Database::open(kalphite_db::DatabaseConfig::new(pg).postgres_schema(&schema))
        .await
        .expect("create the schema")
        .close()
        .await
        .expect("close");
    schema
}

/// `pg` with `search_path` set to `schema` (the URL a node gets).
pub(crate) fn schema_url(pg: &str, schema: &str) -> String {
    let sep = if pg.contains('?') { '&' } else { '?' };
    format!("{pg}{sep}options=-c%20search_path%3D{schema}")
}

/// The `host:port` a PostgreSQL URL names (default port 5432).
pub(crate) fn server_addr(pg: &str) -> SocketAddr {
    let rest = pg.split_once("://").map_or(pg, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    };
    let host = host.replace("localhost", "127.0.0.1");
    host.parse().expect("PostgreSQL address as IP:PORT")
}

/// `pg` with its `host:port` replaced by `addr` (to go through a proxy).
pub(crate) fn via(pg: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = pg.split_once("://").expect("a URL");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let userinfo = authority
        .rsplit_once('@')
        .map(|(u, _)| format!("{u}@"))
        .unwrap_or_default();
    format!("{scheme}://{userinfo}{addr}{tail}")
}

/// A client of the test database (on its own connection task).
pub(crate) async fn connect(pg: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(pg, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A room's row in `kalphite_rooms`: owner, term, version, and whether the lease is live
/// by the database's clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RoomRow {
    /// The owner's node id, if any.
    pub(crate) owner: Option<String>,
    /// The fencing term.
    pub(crate) term: i64,
    /// The version after the last fenced commit.
    pub(crate) version: Option<i64>,
    /// `lease_until > now()`.
    pub(crate) live: bool,
}

/// `kalphite_rooms`' row of `room` in `schema`, if there is one (or the table is missing).
pub(crate) async fn room_row(pg: &str, schema: &str, room: &str) -> Option<RoomRow> {
    let client = connect(pg).await;
    let sql = format!(
        "SELECT owner, term, version, coalesce(lease_until > now(), false) \
         FROM \"{schema}\".kalphite_rooms WHERE room = $1"
    );
    let row = client.query_opt(&sql, &[&room]).await.ok()??;
    Some(RoomRow {
        owner: row.get(0),
        term: row.get(1),
        version: row.get(2),
        live: row.get(3),
    })
}

/// Drops a test's schema (at the end of a passing test; a failing one leaves it to look
/// at).
pub(crate) async fn drop_schema(pg: &str, schema: &str) {
    let client = connect(pg).await;
    let _ = client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await;
}
