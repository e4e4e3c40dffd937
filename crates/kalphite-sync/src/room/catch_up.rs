//! A joiner's catch-up as a stream of pages: taken as a snapshot of shared records when
//! the client joins (pointer copies, nothing encoded), cut into pages only as the caller
//! asks for them, so a server holds at most one page of it at a time.

use std::sync::Arc;

use kalphite::Millis;

use crate::protocol::{CatchUpPayload, ChangePayload, Envelope, SERVER_USER_ID, ServerMessage};

use super::{ConnId, Outbound, Recipient, StoredChange, encoded_len};

/// What [`Room::join_streamed`](super::Room::join_streamed) hands back: the welcome to send
/// at once, then the catch-up pages to send after it, in order, before anything else of
/// the room.
#[derive(Debug)]
pub struct Joined {
    /// The welcome, for the joining connection.
    pub welcome: Outbound,
    /// The catch-up pages, produced one at a time.
    pub catch_up: CatchUpStream,
}

/// The catch-up of one join: the current state of every entity changed after the client's
/// version, in version order, as of the join. It holds the room's records themselves
/// (shared, immutable: a change committed later replaces the room's record, never this
/// one), so taking it costs a pointer per entity and later changes do not alter it.
///
/// Pages come out one at a time ([`CatchUpStream::next_page`], or as addressed messages
/// through [`Iterator`]), cut exactly as [`Room::catch_up`](super::Room::catch_up) cuts
/// them: at most [`RoomLimits::catch_up_page`](super::RoomLimits::catch_up_page) entities
/// and about [`RoomLimits::catch_up_page_bytes`](super::RoomLimits::catch_up_page_bytes)
/// bytes each (at least one entity), contiguous (each page's `fromVersion` is the
/// `toVersion` of the one before), the last one `complete`. There is always at least one
/// page. Records are released as their pages are produced.
pub struct CatchUpStream {
    /// The records still to send, in version order.
    records: std::vec::IntoIter<Arc<StoredChange>>,
    /// The record read past the end of the last page (its version, wire form and encoded
    /// size): it opens the next one.
    carry: Option<(u64, ChangePayload, usize)>,
    /// The next page's `fromVersion`.
    from: u64,
    /// The room's version at the join: the last page's `toVersion`.
    to: u64,
    max_count: usize,
    max_bytes: usize,
    /// The last (complete) page was produced.
    finished: bool,
    address: Address,
}

/// Where the pages go and what their envelopes say.
struct Address {
    conn: ConnId,
    room_id: String,
    /// The message id number of the next page (`<room>#<n>`): the room reserved one per
    /// possible page, so the ids stay unique on the connection whenever pages are made.
    next_id: u64,
    /// The join's time, every page's timestamp (as when pages were built at the join).
    now: Millis,
}

impl std::fmt::Debug for CatchUpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatchUpStream")
            .field("conn", &self.address.conn)
            .field("from", &self.from)
            .field("to", &self.to)
            .field("records_left", &self.records_left())
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl CatchUpStream {
    /// A stream over `records` (in version order, each newer than `after`), ending at
    /// room version `to`; addressed to no one until [`CatchUpStream::address`].
    pub(super) fn new(
        records: Vec<Arc<StoredChange>>,
        after: u64,
        to: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Self {
        Self {
            records: records.into_iter(),
            carry: None,
            from: after,
            to: to.max(after),
            max_count: max_count.max(1),
            max_bytes,
            finished: false,
            address: Address {
                conn: 0,
                room_id: String::new(),
                next_id: 0,
                now: 0,
            },
        }
    }

    /// Sends the pages to `conn`, with ids from `<room_id>#<first_id>` on (the caller
    /// reserved [`CatchUpStream::max_pages`] of them) and the join's time.
    pub(super) fn address(&mut self, conn: ConnId, room_id: String, first_id: u64, now: Millis) {
        self.address = Address {
            conn,
            room_id,
            next_id: first_id,
            now,
        };
    }

    /// The most pages a catch-up of `records` entities can take: one per entity (each
    /// page holds at least one), and one when there is none.
    pub(super) fn max_pages(records: usize) -> u64 {
        records.max(1) as u64
    }

    /// The connection the pages are for.
    #[must_use]
    pub fn conn(&self) -> ConnId {
        self.address.conn
    }

    /// True once the last page (the `complete` one) has been produced.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Entities not yet placed in a page.
    #[must_use]
    pub fn records_left(&self) -> usize {
        self.records.len() + usize::from(self.carry.is_some())
    }

    /// The next page's payload, or `None` after the last one.
    pub fn next_page(&mut self) -> Option<CatchUpPayload> {
        if self.finished {
            return None;
        }
        let mut changes = Vec::new();
        let mut bytes = 0usize;
        let mut last = self.from;
        if let Some((version, payload, size)) = self.carry.take() {
            last = version;
            changes.push(payload);
            bytes = size;
        }
        for record in self.records.by_ref() {
            let version = record.version;
            let payload = record.to_payload();
            // Released now: a record the room has since replaced is freed as it is sent.
            drop(record);
            let size = encoded_len(&payload);
            if !changes.is_empty()
                && (changes.len() == self.max_count || bytes.saturating_add(size) > self.max_bytes)
            {
                self.carry = Some((version, payload, size));
                let page = CatchUpPayload {
                    from_version: self.from,
                    to_version: last,
                    changes,
                    complete: false,
                };
                self.from = last;
                return Some(page);
            }
            last = version;
            changes.push(payload);
            bytes = bytes.saturating_add(size);
        }
        self.finished = true;
        Some(CatchUpPayload {
            from_version: self.from,
            to_version: self.to.max(self.from),
            changes,
            complete: true,
        })
    }

    /// The next page as a message to its connection, or `None` after the last one.
    pub fn next_message(&mut self) -> Option<Outbound> {
        let page = self.next_page()?;
        let id = format!("{}#{}", self.address.room_id, self.address.next_id);
        self.address.next_id += 1;
        Some(Outbound {
            to: Recipient::One(self.address.conn),
            message: ServerMessage::CatchUp(Envelope::new(
                id,
                SERVER_USER_ID,
                self.address.now,
                page,
            )),
        })
    }
}

impl Iterator for CatchUpStream {
    type Item = Outbound;

    fn next(&mut self) -> Option<Outbound> {
        self.next_message()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.finished {
            (0, Some(0))
        } else {
            (1, Some(self.records_left().max(1)))
        }
    }
}

impl std::iter::FusedIterator for CatchUpStream {}
