//! The history checker: what each client received (welcomes, catch-up, broadcasts, acks),
//! and the rules of `docs/protocol.md` that every history must keep, per room — one content
//! per version, gapless and monotonic per connection, every acknowledged state in the
//! final log, every client converged on it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// An entity, as `kind/id`.
pub(crate) type Key = String;

/// One thing a client saw or did, in the order it happened on that client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// A hello on connection `conn` (numbered from 1 per client).
    Hello {
        /// The connection.
        conn: u32,
        /// The watermark it sent.
        last_version: u64,
    },
    /// The connection's welcome.
    Welcome {
        /// The connection.
        conn: u32,
        /// The room's version at the welcome.
        room_version: u64,
        /// Where catch-up starts.
        catch_up_from: u64,
        /// The room's identity.
        epoch: Option<String>,
    },
    /// One state of a catch-up page.
    CatchUp {
        /// The connection.
        conn: u32,
        /// The entity.
        key: Key,
        /// Its room version.
        version: u64,
        /// Its canonical content.
        content: String,
    },
    /// Another client's change, broadcast.
    Broadcast {
        /// The connection.
        conn: u32,
        /// The entity.
        key: Key,
        /// Its room version.
        version: u64,
        /// Its canonical content.
        content: String,
    },
    /// An ack of one of this client's changes.
    Ack {
        /// The connection.
        conn: u32,
        /// The change acknowledged.
        message_id: String,
        /// The entity.
        key: Key,
        /// The ack's `version`.
        version: u64,
        /// The `roomVersion` of the ack's `result`.
        result_version: u64,
        /// The result's canonical content.
        content: String,
    },
    /// A change the server refused for good (a non-retryable error about it).
    Refused {
        /// The change.
        message_id: String,
        /// The error code.
        code: String,
    },
}

/// Everything one client saw, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ClientLog {
    /// The client's name (its replica id).
    pub(crate) client: String,
    /// Its events.
    pub(crate) events: Vec<Event>,
}

/// A state of an entity: its version and canonical content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct State {
    /// The room version of this state.
    pub(crate) version: u64,
    /// The canonical content.
    pub(crate) content: String,
}

/// The room as a fresh client's full catch-up read it at the end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FinalLog {
    /// The welcome's room version.
    pub(crate) room_version: u64,
    /// The epoch.
    pub(crate) epoch: Option<String>,
    /// Every entity's last state (tombstones included).
    pub(crate) states: BTreeMap<Key, State>,
}

/// A broken rule, with what proves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Violation {
    /// One version seen with two different states.
    TwoContents {
        /// The version.
        version: u64,
        /// The first sighting: client, key, content.
        first: (String, Key, String),
        /// The other one.
        second: (String, Key, String),
    },
    /// A connection skipped a version: after `expected - 1` it received `got`.
    Gap {
        /// The client.
        client: String,
        /// The connection.
        conn: u32,
        /// The version that should have come next.
        expected: u64,
        /// What came.
        got: u64,
    },
    /// A connection received a version at or below one it already had (not a re-ack).
    NotMonotonic {
        /// The client.
        client: String,
        /// The connection.
        conn: u32,
        /// What it expected next.
        expected: u64,
        /// What came.
        got: u64,
        /// Where (broadcast, catch-up).
        what: &'static str,
    },
    /// A catch-up state outside its welcome's range.
    CatchUpOutOfRange {
        /// The client.
        client: String,
        /// The connection.
        conn: u32,
        /// The state's version.
        version: u64,
        /// The welcome's `catchUpFrom`.
        from: u64,
        /// The welcome's room version.
        to: u64,
    },
    /// A welcome's room version below a version the client had already received: the
    /// room lost something it had acknowledged or broadcast.
    WelcomeBehind {
        /// The client.
        client: String,
        /// The connection.
        conn: u32,
        /// The welcome's room version.
        room_version: u64,
        /// The highest version the client had received before.
        seen: u64,
    },
    /// A welcome that did not catch up from the hello's watermark (a resync, or a lost
    /// room).
    Resync {
        /// The client.
        client: String,
        /// The connection.
        conn: u32,
        /// The hello's watermark.
        last_version: u64,
        /// The welcome's `catchUpFrom`.
        catch_up_from: u64,
    },
    /// The room's epoch changed during the test.
    EpochChanged {
        /// The client.
        client: String,
        /// The first epoch seen.
        first: Option<String>,
        /// Another.
        other: Option<String>,
    },
    /// An ack whose `version` is above its result's `roomVersion` (a fresh ack has both
    /// equal; a re-ack of a change the room already held has the version first assigned to
    /// it and the entity's current state, at that version or later: `docs/protocol.md`
    /// §5.2).
    AckMismatch {
        /// The client.
        client: String,
        /// The change.
        message_id: String,
        /// The ack's version.
        version: u64,
        /// The result's version.
        result_version: u64,
    },
    /// An acknowledged state (or any state a client received) missing from the final
    /// log: the entity is older there, absent, or has other content at that version.
    Lost {
        /// The client.
        client: String,
        /// `ack <messageId>`, `broadcast` or `catch-up`.
        what: String,
        /// The entity.
        key: Key,
        /// The version it was received at.
        version: u64,
        /// Its content.
        content: String,
        /// The final log's state of the entity.
        in_final: Option<State>,
    },
    /// A version received above the final log's room version.
    BeyondFinal {
        /// The client.
        client: String,
        /// The version.
        version: u64,
        /// The final room version.
        final_version: u64,
    },
    /// A client's last view of an entity differs from the final log.
    Diverged {
        /// The client.
        client: String,
        /// The entity.
        key: Key,
        /// The client's state.
        client_state: Option<State>,
        /// The final log's.
        in_final: Option<State>,
    },
    /// A change refused for good.
    Refused {
        /// The client.
        client: String,
        /// The change.
        message_id: String,
        /// The code.
        code: String,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// What a passing history held, for the test's printout.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Summary {
    /// Clients.
    pub(crate) clients: usize,
    /// Connections (welcomes), all clients.
    pub(crate) connections: usize,
    /// Acks received (re-acks included).
    pub(crate) acks: usize,
    /// Broadcasts received.
    pub(crate) broadcasts: usize,
    /// Distinct versions seen by anyone.
    pub(crate) versions_seen: usize,
    /// The final room version.
    pub(crate) final_version: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} clients, {} connections, {} acks, {} broadcasts, {} distinct versions seen, \
             final room version {}",
            self.clients,
            self.connections,
            self.acks,
            self.broadcasts,
            self.versions_seen,
            self.final_version
        )
    }
}

/// Per connection: what should come next.
struct Conn {
    id: u32,
    /// The next fresh version expected (welcome's room version + 1, then + 1 per version).
    next: u64,
    /// The welcome's range, for catch-up states.
    from: u64,
    to: u64,
    /// The last catch-up state's version (they come in version order).
    last_catch_up: u64,
}

/// Checks one room's history: every client's log and the final log. Returns what it
/// held, or every violation found.
///
/// # Errors
/// The violations, in the order found.
pub(crate) fn check(logs: &[ClientLog], last: &FinalLog) -> Result<Summary, Vec<Violation>> {
    let mut out = Vec::new();
    let mut summary = Summary {
        clients: logs.len(),
        final_version: last.room_version,
        ..Summary::default()
    };
    // version -> (client, key, content) of its first sighting.
    let mut by_version: HashMap<u64, (String, Key, String)> = HashMap::new();
    let mut epoch: Option<(String, Option<String>)> = None;
    for log in logs {
        let client = &log.client;
        let mut conn: Option<Conn> = None;
        let mut hello_last = 0;
        // The highest version this client has received, over all its connections.
        let mut seen = 0;
        let mut view: BTreeMap<Key, State> = BTreeMap::new();
        let mut sighting = |version: u64, key: &Key, content: &String, out: &mut Vec<_>| {
            let here = (client.clone(), key.clone(), content.clone());
            match by_version.get(&version) {
                Some(first) if first.1 != here.1 || first.2 != here.2 => {
                    out.push(Violation::TwoContents {
                        version,
                        first: first.clone(),
                        second: here,
                    });
                }
                Some(_) => {}
                None => {
                    by_version.insert(version, here);
                }
            }
            if version > last.room_version {
                out.push(Violation::BeyondFinal {
                    client: client.clone(),
                    version,
                    final_version: last.room_version,
                });
            }
        };
        let missing =
            |what: String, key: &Key, version: u64, content: &String, out: &mut Vec<_>| {
                let in_final = last.states.get(key);
                let kept = in_final.is_some_and(|s| {
                    s.version > version || (s.version == version && s.content == *content)
                });
                if !kept {
                    out.push(Violation::Lost {
                        client: client.clone(),
                        what,
                        key: key.clone(),
                        version,
                        content: content.clone(),
                        in_final: in_final.cloned(),
                    });
                }
            };
        let apply = |view: &mut BTreeMap<Key, State>, key: &Key, version: u64, content: &String| {
            if view.get(key).is_none_or(|s| s.version < version) {
                view.insert(
                    key.clone(),
                    State {
                        version,
                        content: content.clone(),
                    },
                );
            }
        };
        for event in &log.events {
            match event {
                Event::Hello { last_version, .. } => hello_last = *last_version,
                Event::Welcome {
                    conn: c,
                    room_version,
                    catch_up_from,
                    epoch: e,
                } => {
                    summary.connections += 1;
                    match &epoch {
                        None => epoch = Some((client.clone(), e.clone())),
                        Some((_, first)) if first != e => out.push(Violation::EpochChanged {
                            client: client.clone(),
                            first: first.clone(),
                            other: e.clone(),
                        }),
                        Some(_) => {}
                    }
                    if *room_version < seen {
                        out.push(Violation::WelcomeBehind {
                            client: client.clone(),
                            conn: *c,
                            room_version: *room_version,
                            seen,
                        });
                    }
                    if *catch_up_from != hello_last {
                        out.push(Violation::Resync {
                            client: client.clone(),
                            conn: *c,
                            last_version: hello_last,
                            catch_up_from: *catch_up_from,
                        });
                    }
                    conn = Some(Conn {
                        id: *c,
                        next: room_version + 1,
                        from: *catch_up_from,
                        to: *room_version,
                        last_catch_up: *catch_up_from,
                    });
                }
                Event::CatchUp {
                    conn: c,
                    key,
                    version,
                    content,
                } => {
                    sighting(*version, key, content, &mut out);
                    missing("catch-up".into(), key, *version, content, &mut out);
                    apply(&mut view, key, *version, content);
                    seen = seen.max(*version);
                    if let Some(k) = conn.as_mut().filter(|k| k.id == *c) {
                        if *version <= k.from || *version > k.to {
                            out.push(Violation::CatchUpOutOfRange {
                                client: client.clone(),
                                conn: *c,
                                version: *version,
                                from: k.from,
                                to: k.to,
                            });
                        } else if *version <= k.last_catch_up {
                            out.push(Violation::NotMonotonic {
                                client: client.clone(),
                                conn: *c,
                                expected: k.last_catch_up + 1,
                                got: *version,
                                what: "catch-up",
                            });
                        }
                        k.last_catch_up = k.last_catch_up.max(*version);
                    }
                }
                Event::Broadcast {
                    conn: c,
                    key,
                    version,
                    content,
                } => {
                    summary.broadcasts += 1;
                    sighting(*version, key, content, &mut out);
                    missing("broadcast".into(), key, *version, content, &mut out);
                    apply(&mut view, key, *version, content);
                    seen = seen.max(*version);
                    if let Some(k) = conn.as_mut().filter(|k| k.id == *c) {
                        if *version < k.next {
                            out.push(Violation::NotMonotonic {
                                client: client.clone(),
                                conn: *c,
                                expected: k.next,
                                got: *version,
                                what: "broadcast",
                            });
                        } else {
                            if *version > k.next {
                                out.push(Violation::Gap {
                                    client: client.clone(),
                                    conn: *c,
                                    expected: k.next,
                                    got: *version,
                                });
                            }
                            k.next = version + 1;
                        }
                    }
                }
                Event::Ack {
                    conn: c,
                    message_id,
                    key,
                    version,
                    result_version,
                    content,
                } => {
                    summary.acks += 1;
                    if version > result_version {
                        out.push(Violation::AckMismatch {
                            client: client.clone(),
                            message_id: message_id.clone(),
                            version: *version,
                            result_version: *result_version,
                        });
                    }
                    sighting(*result_version, key, content, &mut out);
                    missing(
                        format!("ack {message_id}"),
                        key,
                        *result_version,
                        content,
                        &mut out,
                    );
                    apply(&mut view, key, *result_version, content);
                    seen = seen.max(*result_version);
                    // An ack below what the connection expects acknowledges a change the
                    // room already held (a resend): a re-ack, whose content the
                    // one-content-per-version rule checks. Above it, a version was skipped.
                    if let Some(k) = conn.as_mut().filter(|k| k.id == *c)
                        && *version >= k.next
                    {
                        if *version > k.next {
                            out.push(Violation::Gap {
                                client: client.clone(),
                                conn: *c,
                                expected: k.next,
                                got: *version,
                            });
                        }
                        k.next = version + 1;
                    }
                }
                Event::Refused { message_id, code } => out.push(Violation::Refused {
                    client: client.clone(),
                    message_id: message_id.clone(),
                    code: code.clone(),
                }),
            }
        }
        // Convergence: the client's last view is the final log.
        let keys: std::collections::BTreeSet<&Key> =
            view.keys().chain(last.states.keys()).collect();
        for key in keys {
            let mine = view.get(key);
            let theirs = last.states.get(key);
            if mine != theirs {
                out.push(Violation::Diverged {
                    client: client.clone(),
                    key: key.clone(),
                    client_state: mine.cloned(),
                    in_final: theirs.cloned(),
                });
            }
        }
    }
    if let Some((client, first)) = &epoch
        && last.epoch != *first
    {
        out.push(Violation::EpochChanged {
            client: client.clone(),
            first: first.clone(),
            other: last.epoch.clone(),
        });
    }
    summary.versions_seen = by_version.len();
    if out.is_empty() {
        Ok(summary)
    } else {
        Err(out)
    }
}

/// Checks and panics with every violation (the first 40) when the history breaks a rule.
pub(crate) fn assert_history(logs: &[ClientLog], last: &FinalLog) -> Summary {
    match check(logs, last) {
        Ok(summary) => summary,
        Err(violations) => {
            let shown: Vec<String> = violations
                .iter()
                .take(40)
                .map(|v| format!("  {v}"))
                .collect();
            panic!(
                "the history checker found {} violation(s):\n{}",
                violations.len(),
                shown.join("\n")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    //! The checker fails on what it must catch: a version with two contents, a gap, a lost
    //! ack, a broadcast going backwards, a welcome behind what was seen, divergence.

    use super::*;

    fn welcome(conn: u32, room_version: u64, catch_up_from: u64) -> Event {
        Event::Welcome {
            conn,
            room_version,
            catch_up_from,
            epoch: Some("e1".into()),
        }
    }

    fn hello(conn: u32, last_version: u64) -> Event {
        Event::Hello { conn, last_version }
    }

    fn broadcast(conn: u32, key: &str, version: u64, content: &str) -> Event {
        Event::Broadcast {
            conn,
            key: key.into(),
            version,
            content: content.into(),
        }
    }

    fn ack(conn: u32, id: &str, key: &str, version: u64, content: &str) -> Event {
        Event::Ack {
            conn,
            message_id: id.into(),
            key: key.into(),
            version,
            result_version: version,
            content: content.into(),
        }
    }

    fn log(client: &str, events: Vec<Event>) -> ClientLog {
        ClientLog {
            client: client.into(),
            events,
        }
    }

    fn state(version: u64, content: &str) -> State {
        State {
            version,
            content: content.into(),
        }
    }

    fn final_log(version: u64, states: &[(&str, u64, &str)]) -> FinalLog {
        FinalLog {
            room_version: version,
            epoch: Some("e1".into()),
            states: states
                .iter()
                .map(|(k, v, c)| ((*k).to_owned(), state(*v, c)))
                .collect(),
        }
    }

    /// Two clients: a writes x at 1 and y at 3, b writes x at 2; each sees the other's.
    fn good() -> (Vec<ClientLog>, FinalLog) {
        let a = log(
            "a",
            vec![
                hello(1, 0),
                welcome(1, 0, 0),
                ack(1, "a-1", "x", 1, "x1"),
                broadcast(1, "x", 2, "x2"),
                ack(1, "a-2", "y", 3, "y3"),
            ],
        );
        let b = log(
            "b",
            vec![
                hello(1, 0),
                welcome(1, 0, 0),
                broadcast(1, "x", 1, "x1"),
                ack(1, "b-1", "x", 2, "x2"),
                broadcast(1, "y", 3, "y3"),
            ],
        );
        (vec![a, b], final_log(3, &[("x", 2, "x2"), ("y", 3, "y3")]))
    }

    #[test]
    fn a_good_history_passes() {
        let (logs, last) = good();
        let summary = check(&logs, &last).expect("passes");
        assert_eq!(summary.acks, 3);
        assert_eq!(summary.versions_seen, 3);
    }

    #[test]
    fn a_reconnect_with_catch_up_and_a_re_ack_passes() {
        let (mut logs, last) = good();
        // b drops after version 1, reconnects from 1, catches up x@2 and y@3, and its
        // resent change is acknowledged again at x's current version.
        logs[1] = log(
            "b",
            vec![
                hello(1, 0),
                welcome(1, 0, 0),
                broadcast(1, "x", 1, "x1"),
                hello(2, 1),
                welcome(2, 3, 1),
                Event::CatchUp {
                    conn: 2,
                    key: "x".into(),
                    version: 2,
                    content: "x2".into(),
                },
                Event::CatchUp {
                    conn: 2,
                    key: "y".into(),
                    version: 3,
                    content: "y3".into(),
                },
                ack(2, "b-1", "x", 2, "x2"),
            ],
        );
        check(&logs, &last).expect("passes");
    }

    #[test]
    fn a_re_ack_with_the_first_version_and_a_later_state_passes() {
        let (mut logs, last) = good();
        // a resends a-1 (x, first acknowledged at 1) and is acknowledged again with version
        // 1 and x's current state, version 2.
        logs[0].events.push(Event::Ack {
            conn: 1,
            message_id: "a-1".into(),
            key: "x".into(),
            version: 1,
            result_version: 2,
            content: "x2".into(),
        });
        check(&logs, &last).expect("passes");
        // The other way round is wrong.
        logs[0].events.push(Event::Ack {
            conn: 1,
            message_id: "a-1".into(),
            key: "x".into(),
            version: 3,
            result_version: 2,
            content: "x2".into(),
        });
        let v = check(&logs, &last).unwrap_err();
        assert!(
            v.iter().any(|v| matches!(v, Violation::AckMismatch { .. })),
            "{v:?}"
        );
    }

    #[test]
    fn a_version_with_two_contents_fails() {
        let (mut logs, last) = good();
        logs[1].events[2] = broadcast(1, "x", 1, "something else");
        let v = check(&logs, &last).unwrap_err();
        assert!(
            v.iter()
                .any(|v| matches!(v, Violation::TwoContents { version: 1, .. })),
            "{v:?}"
        );
    }

    #[test]
    fn a_duplicate_version_for_two_entities_fails() {
        let (mut logs, last) = good();
        // b's change got version 1 too, for another entity.
        logs[1].events[3] = ack(1, "b-1", "z", 1, "z1");
        let v = check(&logs, &last).unwrap_err();
        assert!(
            v.iter()
                .any(|v| matches!(v, Violation::TwoContents { version: 1, .. })),
            "{v:?}"
        );
    }

    #[test]
    fn a_gap_fails() {
        let (mut logs, last) = good();
        // b never received version 1.
        logs[1].events.remove(2);
        let v = check(&logs, &last).unwrap_err();
        assert!(
            v.iter().any(|v| matches!(
                v,
                Violation::Gap {
                    expected: 1,
                    got: 2,
                    ..
                }
            )),
            "{v:?}"
        );
    }

    #[test]
    fn a_broadcast_going_backwards_fails() {
        let (mut logs, last) = good();
        logs[0].events.push(broadcast(1, "x", 2, "x2"));
        let v = check(&logs, &last).unwrap_err();
        assert!(
            v.iter()
                .any(|v| matches!(v, Violation::NotMonotonic { .. })),
            "{v:?}"
        );
    }

    #[test]
    fn a_lost_ack_fails() {
        let (logs, _) = good();
        // The final log lost y (acknowledged to a at 3) and went back to version 2.
        let last = final_log(2, &[("x", 2, "x2")]);
        let v = check(&logs, &last).unwrap_err();
        assert!(
            v.iter()
                .any(|v| matches!(v, Violation::Lost { what, .. } if what == "ack a-2")),
            "{v:?}"
        );
        assert!(
            v.iter().any(|v| matches!(v, Violation::BeyondFinal { .. })),
            "{v:?}"
        );
    }

    #[test]
    fn an_acknowledged_content_replaced_at_its_version_fails() {
        let (logs, _) = good();
        let last = final_log(3, &[("x", 2, "x2"), ("y", 3, "not what was acked")]);
        let v = check(&logs, &last).unwrap_err();
        assert!(
            v.iter()
                .any(|v| matches!(v, Violation::Lost { what, .. } if what == "ack a-2")),
            "{v:?}"
        );
    }

    #[test]
    fn a_welcome_behind_what_the_client_saw_fails() {
        let (mut logs, last) = good();
        // a reconnects and the room says version 1 although a had 3 acknowledged.
        logs[0].events.push(hello(2, 3));
        logs[0].events.push(welcome(2, 1, 0));
        let v = check(&logs, &last).unwrap_err();
        assert!(
            v.iter()
                .any(|v| matches!(v, Violation::WelcomeBehind { seen: 3, .. })),
            "{v:?}"
        );
        assert!(
            v.iter().any(|v| matches!(v, Violation::Resync { .. })),
            "{v:?}"
        );
    }

    #[test]
    fn a_client_that_did_not_converge_fails() {
        let (mut logs, last) = good();
        // b never got y.
        logs[1].events.pop();
        let v = check(&logs, &last).unwrap_err();
        assert!(
            v.iter()
                .any(|v| matches!(v, Violation::Diverged { client, .. } if client == "b")),
            "{v:?}"
        );
    }
}
