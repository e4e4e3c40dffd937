//! The end-to-end harness shared by the cluster tests: protocol clients that log what they
//! receive, the history checker over those logs, `kalphite serve` processes, a TCP proxy
//! that cuts a node off PostgreSQL, and PostgreSQL helpers.

// Each test binary that includes this module uses part of it.
#![allow(dead_code)]

pub(crate) mod client;
pub(crate) mod history;
pub(crate) mod nodes;
pub(crate) mod pg;
pub(crate) mod proxy;
