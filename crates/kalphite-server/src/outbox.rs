//! A connection's outbound queue: frames the room addressed to it, waiting for its task
//! to write them. Allocates nothing until the first frame (an idle connection costs a few
//! words), is bounded (a client that falls further behind is dropped and catches up when
//! it reconnects), and can be closed by the room.

use std::collections::VecDeque;

use axum::extract::ws::Utf8Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

/// Capacity kept after the queue drains; more is released.
const KEEP_CAPACITY: usize = 16;

#[derive(Default)]
struct State {
    frames: VecDeque<Utf8Bytes>,
    closed: bool,
}

/// The queue.
pub(crate) struct Outbox {
    state: Mutex<State>,
    ready: Notify,
    limit: usize,
}

impl Outbox {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            limit: limit.max(1),
        }
    }

    /// Queues a frame; `false` when the queue is full or closed.
    pub(crate) fn push(&self, frame: Utf8Bytes) -> bool {
        {
            let mut st = self.state.lock();
            if st.closed || st.frames.len() >= self.limit {
                return false;
            }
            st.frames.push_back(frame);
        }
        self.ready.notify_one();
        true
    }

    /// Closes the queue: the connection's task ends after what is queued.
    pub(crate) fn close(&self) {
        self.state.lock().closed = true;
        self.ready.notify_one();
    }

    /// Waits until frames are queued or the queue is closed.
    pub(crate) async fn ready(&self) {
        loop {
            {
                let st = self.state.lock();
                if st.closed || !st.frames.is_empty() {
                    return;
                }
            }
            self.ready.notified().await;
        }
    }

    /// Moves up to `max` queued frames into `out`; `false` once closed and drained.
    pub(crate) fn drain(&self, out: &mut Vec<Utf8Bytes>, max: usize) -> bool {
        let mut st = self.state.lock();
        let n = st.frames.len().min(max);
        out.extend(st.frames.drain(..n));
        if st.frames.is_empty() && st.frames.capacity() > KEEP_CAPACITY {
            st.frames.shrink_to(KEEP_CAPACITY);
        }
        !(st.closed && st.frames.is_empty() && n == 0)
    }
}
