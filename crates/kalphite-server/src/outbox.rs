//! A connection's outbound queue: frames the room addressed to it, waiting for its task
//! to write them. Allocates nothing until the first frame (an idle connection costs a few
//! words), is bounded in frames and in bytes (a client that falls further behind is
//! dropped at once, its queue freed, and catches up when it reconnects), and can be closed
//! by the room. A joiner's catch-up is queued as one item, a [`CatchUpStream`] whose pages
//! are encoded one at a time as the connection's writer takes them (when its socket has
//! room): a joiner holds one encoded page at a time, whatever the size of the room.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use parking_lot::Mutex;
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use kalphite_sync::{CatchUpStream, encode};

use super::metrics::Metrics;

/// Capacity kept after the queue drains; more is released. None: most connections are
/// idle most of the time, and a few slots kept in each cost more than the allocation the
/// next burst makes.
const KEEP_CAPACITY: usize = 0;

/// Why a queue was closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Closed {
    /// The room was reset after a failed write: what is queued is still written.
    Reset,
    /// The client fell behind (its queue went over a bound, or a write stalled): what was
    /// queued is dropped.
    Dropped,
    /// Cluster mode: this node lost the room's lease (another node owns it now): what is
    /// queued (all of it committed under the lease) is still written.
    Moved,
}

/// What [`Outbox::push`] did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Queued.
    Queued,
    /// This frame would have taken the queue over a bound: the queue is now dropped
    /// ([`Closed::Dropped`]) and counted as a slow consumer.
    Overflow,
    /// The queue was already closed; the frame is discarded.
    Closed,
}

/// What [`Outbox::pop`] found.
pub(crate) enum Popped {
    Frame(Utf8Bytes),
    Empty,
    Closed(Closed),
}

/// A queued item. Catch-up (the welcome and the pages after it) is not `live`: its size is
/// the room's, sent once, so it does not count against the bounds; live traffic (acks,
/// broadcasts, replies) does.
enum Queued {
    /// An encoded frame.
    Frame { text: Utf8Bytes, live: bool },
    /// A catch-up whose pages are not made yet; what is queued behind it waits for its last.
    CatchUp(Box<CatchUpStream>),
}

#[derive(Default)]
struct State {
    frames: VecDeque<Queued>,
    /// Bytes of every queued frame.
    bytes: usize,
    /// Live frames and their bytes: what the bounds apply to.
    live_frames: usize,
    live_bytes: usize,
    closed: Option<Closed>,
}

/// The queue.
pub(crate) struct Outbox {
    state: Mutex<State>,
    /// The connection task waiting for frames (one waiter; a few words, where a `Notify`
    /// took several times that in every idle connection).
    waker: AtomicWaker,
    max_frames: usize,
    max_bytes: usize,
    metrics: Arc<Metrics>,
}

impl Outbox {
    /// A queue holding at most `max_frames` live frames and `max_bytes` bytes of them (one
    /// frame is always accepted into an empty queue, whatever its size).
    pub(crate) fn new(max_frames: usize, max_bytes: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            waker: AtomicWaker::new(),
            max_frames: max_frames.max(1),
            max_bytes: max_bytes.max(1),
            metrics,
        }
    }

    /// Queues a live frame (counted against the bounds).
    pub(crate) fn push(&self, frame: Utf8Bytes) -> Pushed {
        self.push_frame(frame, true)
    }

    /// Queues a frame; `live: false` for catch-up frames, which the bounds ignore.
    pub(crate) fn push_frame(&self, text: Utf8Bytes, live: bool) -> Pushed {
        let len = text.len();
        {
            let mut st = self.state.lock();
            if st.closed.is_some() {
                return Pushed::Closed;
            }
            if live
                && st.live_frames > 0
                && (st.live_frames >= self.max_frames
                    || st.live_bytes.saturating_add(len) > self.max_bytes)
            {
                self.drop_locked(&mut st);
                Metrics::inc(&self.metrics.slow_consumers);
                drop(st);
                self.waker.wake();
                return Pushed::Overflow;
            }
            st.bytes += len;
            if live {
                st.live_frames += 1;
                st.live_bytes += len;
            }
            st.frames.push_back(Queued::Frame { text, live });
            Metrics::add(&self.metrics.outbound_bytes, len as u64);
            self.metrics
                .outbound_peak_bytes
                .fetch_max(st.bytes as u64, std::sync::atomic::Ordering::Relaxed);
        }
        self.waker.wake();
        Pushed::Queued
    }

    /// Queues a joiner's catch-up: its pages are made and encoded one at a time by
    /// [`Outbox::pop`], and what is queued after it is written after its last page. Not
    /// bounded, like the catch-up frames it replaces.
    pub(crate) fn push_catch_up(&self, pages: Box<CatchUpStream>) -> Pushed {
        {
            let mut st = self.state.lock();
            if st.closed.is_some() {
                return Pushed::Closed;
            }
            st.frames.push_back(Queued::CatchUp(pages));
        }
        self.waker.wake();
        Pushed::Queued
    }

    /// Closes the queue after a room reset: the connection's task writes what is queued,
    /// then ends.
    pub(crate) fn close(&self) {
        self.close_for(Closed::Reset);
    }

    /// Closes the queue for `why` ([`Closed::Reset`] or [`Closed::Moved`]): the
    /// connection's task writes what is queued, then ends.
    pub(crate) fn close_for(&self, why: Closed) {
        {
            let mut st = self.state.lock();
            if st.closed.is_none() {
                st.closed = Some(why);
            }
        }
        self.waker.wake();
    }

    /// Drops the queue (the client is too slow, or the connection is ending): every queued
    /// frame is freed now, later pushes are discarded.
    pub(crate) fn abandon(&self) {
        self.drop_locked(&mut self.state.lock());
        self.waker.wake();
    }

    fn drop_locked(&self, st: &mut State) {
        st.closed = Some(Closed::Dropped);
        Metrics::sub(&self.metrics.outbound_bytes, st.bytes as u64);
        *st = State {
            closed: st.closed,
            ..State::default()
        };
    }

    /// Ready once frames are queued or the queue is closed; otherwise the task of `cx` is
    /// woken when that happens.
    pub(crate) fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        // Registered before the check, so a push between the two still wakes the task.
        self.waker.register(cx.waker());
        let st = self.state.lock();
        if st.closed.is_some() || !st.frames.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Takes the oldest queued frame; at a catch-up, makes and encodes its next page (the
    /// only page of it that exists until the next call).
    pub(crate) fn pop(&self) -> Popped {
        loop {
            let mut st = self.state.lock();
            let pages = match st.frames.pop_front() {
                Some(Queued::Frame { text, live }) => {
                    let len = text.len();
                    st.bytes -= len;
                    if live {
                        st.live_frames -= 1;
                        st.live_bytes -= len;
                    }
                    Metrics::sub(&self.metrics.outbound_bytes, len as u64);
                    if st.frames.is_empty() && st.frames.capacity() > KEEP_CAPACITY {
                        st.frames.shrink_to(KEEP_CAPACITY);
                    }
                    return Popped::Frame(text);
                }
                Some(Queued::CatchUp(pages)) => pages,
                None => return st.closed.map_or(Popped::Empty, Popped::Closed),
            };
            drop(st);
            if let Some(text) = self.next_page(pages) {
                return Popped::Frame(text);
            }
        }
    }

    /// The next page of `pages`, encoded; the rest goes back to the head of the queue. Made
    /// outside the queue's lock, so the room's deliveries to it never wait for the encoding
    /// (this task is the queue's only reader: nothing else takes from its head meanwhile).
    /// `None` when the catch-up is over, or the queue was dropped meanwhile.
    fn next_page(&self, mut pages: Box<CatchUpStream>) -> Option<Utf8Bytes> {
        let page = pages.next_message();
        let text = page.and_then(|out| match encode(&out.message) {
            Ok(text) => Some(Utf8Bytes::from(text)),
            Err(e) => {
                tracing::error!(conn = pages.conn(), error = %e, "could not encode a catch-up page");
                None
            }
        });
        let mut st = self.state.lock();
        if st.closed == Some(Closed::Dropped) {
            return None;
        }
        if !pages.is_finished() {
            st.frames.push_front(Queued::CatchUp(pages));
        }
        let text = text?;
        // The page in hand is this connection's too, until the socket takes it.
        self.metrics.outbound_peak_bytes.fetch_max(
            st.bytes.saturating_add(text.len()) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        Some(text)
    }

    /// Takes every queued frame (to write them before a close). A catch-up still queued is
    /// dropped, not made: the client catches up when it reconnects.
    pub(crate) fn take_all(&self) -> Vec<Utf8Bytes> {
        let mut st = self.state.lock();
        Metrics::sub(&self.metrics.outbound_bytes, st.bytes as u64);
        let frames = std::mem::take(&mut st.frames);
        st.bytes = 0;
        st.live_frames = 0;
        st.live_bytes = 0;
        drop(st);
        frames
            .into_iter()
            .filter_map(|q| match q {
                Queued::Frame { text, .. } => Some(text),
                Queued::CatchUp(_) => None,
            })
            .collect()
    }

    /// Bytes queued now.
    #[cfg(test)]
    fn queued_bytes(&self) -> usize {
        self.state.lock().bytes
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        Metrics::sub(
            &self.metrics.outbound_bytes,
            self.state.get_mut().bytes as u64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Utf8Bytes {
        Utf8Bytes::from("x".repeat(n))
    }

    #[test]
    fn the_byte_bound_drops_the_queue_and_frees_it() {
        let metrics = Arc::new(Metrics::default());
        let outbox = Outbox::new(1_000, 100, Arc::clone(&metrics));
        assert_eq!(outbox.push(frame(60)), Pushed::Queued);
        assert_eq!(outbox.push(frame(40)), Pushed::Queued);
        assert_eq!(outbox.queued_bytes(), 100);
        assert_eq!(
            metrics
                .outbound_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            100
        );
        assert_eq!(outbox.push(frame(1)), Pushed::Overflow);
        assert_eq!(outbox.queued_bytes(), 0, "the queue is freed at once");
        assert_eq!(
            metrics
                .outbound_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        assert_eq!(
            metrics
                .slow_consumers
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert_eq!(outbox.push(frame(1)), Pushed::Closed, "counted once");
        assert!(matches!(outbox.pop(), Popped::Closed(Closed::Dropped)));
    }

    #[test]
    fn an_empty_queue_takes_one_frame_of_any_size_and_catch_up_is_not_bounded() {
        let metrics = Arc::new(Metrics::default());
        let outbox = Outbox::new(2, 100, Arc::clone(&metrics));
        for _ in 0..10 {
            assert_eq!(outbox.push_frame(frame(500), false), Pushed::Queued);
        }
        assert_eq!(outbox.push(frame(500)), Pushed::Queued, "first live frame");
        assert_eq!(outbox.push(frame(1)), Pushed::Overflow);
        let outbox = Outbox::new(2, 100, Arc::clone(&metrics));
        assert_eq!(outbox.push(frame(1)), Pushed::Queued);
        assert_eq!(outbox.push(frame(1)), Pushed::Queued);
        assert_eq!(outbox.push(frame(1)), Pushed::Overflow, "frame bound");
    }

    /// A room of `n` entities whose catch-up takes one page per entity.
    fn catch_up(n: u64) -> Box<CatchUpStream> {
        use kalphite_sync::{ConflictPolicy, Room, RoomLimits, Stamp, StoredChange, VectorClock};
        let records = (1..=n).map(|v| StoredChange {
            version: v,
            kind: "todo".into(),
            id: format!("t{v}").as_str().into(),
            state: Some(kalphite::Entity::new(
                format!("t{v}"),
                "todo",
                serde_json::json!({"v": v}),
            )),
            vector: VectorClock::from([("r", v)]),
            stamp: Stamp {
                at: v,
                user_id: "u".into(),
            },
            message_id: format!("m{v}"),
            replica_id: "r".into(),
            author: "u".into(),
        });
        let room = Room::new("room", ConflictPolicy::default())
            .with_limits(RoomLimits {
                catch_up_page: 1,
                ..RoomLimits::default()
            })
            .restore(records)
            .expect("restore");
        Box::new(room.catch_up_stream(0))
    }

    fn popped_text(outbox: &Outbox) -> String {
        match outbox.pop() {
            Popped::Frame(text) => text.as_str().to_owned(),
            Popped::Empty => panic!("empty"),
            Popped::Closed(c) => panic!("closed: {c:?}"),
        }
    }

    #[test]
    fn a_catch_up_is_encoded_a_page_at_a_time_and_what_follows_it_waits() {
        let metrics = Arc::new(Metrics::default());
        let outbox = Outbox::new(10, 1_000, Arc::clone(&metrics));
        assert_eq!(outbox.push_frame(frame(7), false), Pushed::Queued);
        assert_eq!(outbox.push_catch_up(catch_up(3)), Pushed::Queued);
        assert_eq!(outbox.push(frame(5)), Pushed::Queued);
        assert_eq!(
            outbox.queued_bytes(),
            12,
            "no page is made before it is taken"
        );
        assert_eq!(popped_text(&outbox), "x".repeat(7));
        for v in 1..=3 {
            let page = popped_text(&outbox);
            assert!(page.contains("\"catchUp\"") && page.contains(&format!("\"t{v}\"")));
            assert_eq!(page.contains("\"complete\":true"), v == 3, "{page}");
            assert_eq!(
                outbox.queued_bytes(),
                5,
                "one page exists at a time, none queued"
            );
        }
        assert_eq!(
            popped_text(&outbox),
            "x".repeat(5),
            "queued behind the catch-up"
        );
        assert!(matches!(outbox.pop(), Popped::Empty));
        let peak = metrics
            .outbound_peak_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            peak >= 12,
            "the page in hand counts towards the peak ({peak})"
        );
    }

    #[test]
    fn a_closing_connection_drops_its_catch_up() {
        let metrics = Arc::new(Metrics::default());
        let outbox = Outbox::new(10, 1_000, Arc::clone(&metrics));
        outbox.push_frame(frame(3), false);
        outbox.push_catch_up(catch_up(2));
        outbox.push(frame(4));
        assert_eq!(
            outbox
                .take_all()
                .iter()
                .map(|t| t.len())
                .collect::<Vec<_>>(),
            [3, 4],
            "written before a close: the frames, not the catch-up"
        );
        outbox.push_catch_up(catch_up(2));
        assert!(popped_text(&outbox).contains("catchUp"));
        outbox.abandon();
        assert!(matches!(outbox.pop(), Popped::Closed(Closed::Dropped)));
        assert_eq!(outbox.push_catch_up(catch_up(1)), Pushed::Closed);
    }

    #[test]
    fn a_reset_queue_is_written_out_first() {
        let metrics = Arc::new(Metrics::default());
        let outbox = Outbox::new(10, 100, Arc::clone(&metrics));
        assert_eq!(outbox.push(frame(3)), Pushed::Queued);
        outbox.close();
        assert_eq!(outbox.push(frame(3)), Pushed::Closed);
        assert!(matches!(outbox.pop(), Popped::Frame(_)));
        assert!(matches!(outbox.pop(), Popped::Closed(Closed::Reset)));
        drop(outbox);
        assert_eq!(
            metrics
                .outbound_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
}
