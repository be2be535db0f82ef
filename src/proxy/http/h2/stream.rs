//! A stream's state as the connection and its handles share it, and the
//! handles: a request's body ([`RecvBody`]) and a response's sending side
//! ([`StreamHandle`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use h2::Reason;
use hyper::header::HeaderMap;
use hyper::StatusCode;
use rustc_hash::FxHashMap;

use super::frame;
use super::hpack;

/// Bytes waiting to be written above which streams wait to add more and no
/// frame is read (a client that sends PINGs and reads nothing is held here).
pub(super) const OUT_HIGH: usize = 256 * 1024;

/// A stream's state as its handles and the connection share it.
#[derive(Default)]
pub(super) struct Slot {
    /// DATA received and not yet taken by the request body: large chunks as
    /// they came (slices of the read buffer), then small or padded ones
    /// copied together into `rx_tail`, so that a client's tiny frames cannot
    /// pin more memory than the window they fill.
    pub(super) rx: VecDeque<Bytes>,
    pub(super) rx_tail: BytesMut,
    pub(super) rx_trailers: Option<HeaderMap>,
    /// END_STREAM received.
    pub(super) rx_end: bool,
    /// What the client may still send on the stream.
    pub(super) rx_window: i64,
    /// Taken by the body and not yet given back in a WINDOW_UPDATE.
    pub(super) rx_release: u32,
    /// What the request's Content-Length says is still to come.
    pub(super) rx_left: Option<u64>,
    pub(super) rx_waker: Option<Waker>,
    /// The request body exists (received DATA is dropped once it is gone).
    pub(super) body: bool,
    /// What the stream may still send.
    pub(super) tx_window: i64,
    /// The response's task: waiting for window, for room to write, or for a
    /// reset.
    pub(super) tx_waker: Option<Waker>,
    /// END_STREAM sent.
    pub(super) tx_end: bool,
    /// RST_STREAM sent or received.
    pub(super) reset: Option<Reason>,
    /// The response handle exists.
    pub(super) handle: bool,
    /// Counts towards SETTINGS_MAX_CONCURRENT_STREAMS.
    pub(super) counted: bool,
    /// The body's length, if it was taken whole (see `Inner::whole_held`).
    pub(super) whole: usize,
}

impl Slot {
    pub(super) fn closed(&self) -> bool {
        self.reset.is_some() || (self.rx_end && self.tx_end)
    }

    pub(super) fn wake(&mut self) {
        if let Some(w) = self.rx_waker.take() {
            w.wake();
        }
        if let Some(w) = self.tx_waker.take() {
            w.wake();
        }
    }
}

pub(super) struct Inner {
    pub(super) streams: FxHashMap<u32, Slot>,
    /// Open streams (not closed both ways nor reset).
    pub(super) active: u32,
    /// Frames waiting to be written.
    pub(super) out: BytesMut,
    /// Scratch space for a header block being encoded.
    pub(super) block: BytesMut,
    pub(super) conn_send: i64,
    /// The client's SETTINGS_INITIAL_WINDOW_SIZE and SETTINGS_MAX_FRAME_SIZE.
    pub(super) init_send: i64,
    pub(super) max_send_frame: usize,
    /// Taken by request bodies (or dropped) and not yet given back to the
    /// connection's window.
    pub(super) conn_release: u32,
    /// What the client may still send on the connection.
    pub(super) conn_recv: i64,
    pub(super) stream_window: u32,
    pub(super) conn_window: u32,
    /// The connection's task, woken when a handle in another task queued a
    /// frame; not needed while it is polling its streams itself.
    pub(super) driver: Option<Waker>,
    pub(super) polling: bool,
    /// Streams waiting for `out` to drain.
    pub(super) out_waiters: Vec<Waker>,
    /// The connection is gone: every handle fails with this.
    pub(super) gone: Option<Reason>,
    /// Streams reset for the client's errors.
    pub(super) error_resets: usize,
    /// Bytes of request bodies taken whole (their window given back) whose
    /// streams are not over: held to the connection's window, so that what a
    /// connection's requests hold stays bounded by it.
    pub(super) whole_held: usize,
}

impl Inner {
    pub(super) fn queued(&mut self) {
        if !self.polling {
            if let Some(w) = self.driver.take() {
                w.wake();
            }
        }
    }

    /// Resets a stream from this side (once).
    pub(super) fn reset(&mut self, id: u32, reason: Reason) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.reset.is_some() {
            return;
        }
        s.reset = Some(reason);
        frame::rst_stream(&mut self.out, id, reason);
        s.wake();
        self.settle(id);
    }

    /// A stream that both ended stops counting, and goes once neither handle
    /// is left. What a gone body left unread goes back to the window.
    pub(super) fn settle(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.closed() && s.counted {
            s.counted = false;
            self.active -= 1;
        }
        if !s.body {
            let n: usize = s.rx.drain(..).map(|b| b.len()).sum::<usize>() + s.rx_tail.len();
            s.rx_tail = BytesMut::new();
            self.conn_release += n as u32;
        }
        if s.closed() && !s.body && !s.handle {
            self.whole_held -= s.whole;
            self.streams.remove(&id);
        }
    }

    /// The response ended: a request still coming is cut short (RFC 9113
    /// §8.1: RST_STREAM with NO_ERROR).
    pub(super) fn sent_end(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.tx_end = true;
        if !s.rx_end && s.reset.is_none() {
            self.reset(id, Reason::NO_ERROR);
        }
        self.settle(id);
    }

    /// WINDOW_UPDATEs for what was taken, once half a window's worth.
    pub(super) fn give_back(&mut self, id: u32) {
        if let Some(s) = self.streams.get_mut(&id) {
            if s.rx_release >= self.stream_window / 2 && !s.rx_end && s.reset.is_none() {
                frame::window_update(&mut self.out, id, s.rx_release);
                s.rx_window += s.rx_release as i64;
                s.rx_release = 0;
            }
        }
        if self.conn_release >= self.conn_window / 2 {
            frame::window_update(&mut self.out, 0, self.conn_release);
            self.conn_recv += self.conn_release as i64;
            self.conn_release = 0;
        }
    }

    pub(super) fn wake_senders(&mut self) {
        for s in self.streams.values_mut() {
            if let Some(w) = s.tx_waker.take() {
                w.wake();
            }
        }
    }
}

/// The shared state.
pub struct Shared(pub(super) Mutex<Inner>);

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request's body: its DATA, each chunk's window given back as it is taken,
/// then its trailers.
pub struct RecvBody {
    pub(super) shared: Arc<Shared>,
    pub(super) id: u32,
    pub(super) data_done: bool,
}

impl std::fmt::Debug for RecvBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBody")
            .field("stream", &self.id)
            .finish()
    }
}

impl RecvBody {
    /// The next chunk; `None` at the end. A reset stream fails with its
    /// reason (NO_ERROR: the client was told the response came first).
    pub fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Reason>>> {
        if self.data_done {
            return Poll::Ready(None);
        }
        let mut g = self.shared.lock();
        let g = &mut *g;
        let gone = g.gone;
        let Some(s) = g.streams.get_mut(&self.id) else {
            return Poll::Ready(Some(Err(gone.unwrap_or(Reason::CANCEL))));
        };
        let next = match s.rx.pop_front() {
            Some(d) => Some(d),
            None if !s.rx_tail.is_empty() => Some(s.rx_tail.split().freeze()),
            None => None,
        };
        if let Some(d) = next {
            s.rx_release += d.len() as u32;
            g.conn_release += d.len() as u32;
            let before = g.out.len();
            g.give_back(self.id);
            if g.out.len() != before {
                g.queued();
            }
            return Poll::Ready(Some(Ok(d)));
        }
        if let Some(r) = s.reset.or(gone) {
            return Poll::Ready(Some(Err(r)));
        }
        if s.rx_end {
            self.data_done = true;
            return Poll::Ready(None);
        }
        s.rx_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The whole body, if all of it came (END_STREAM, no trailers) and it is
    /// at most `max` bytes: taken at once, its window given back.
    pub fn take_whole(&mut self, max: usize) -> Option<Bytes> {
        let mut g = self.shared.lock();
        let g = &mut *g;
        let s = g.streams.get_mut(&self.id)?;
        if !s.rx_end || s.reset.is_some() || s.rx_trailers.is_some() {
            return None;
        }
        let len = s.rx.iter().map(Bytes::len).sum::<usize>() + s.rx_tail.len();
        if len > max || g.whole_held + len > g.conn_window as usize {
            return None;
        }
        s.whole = len;
        g.whole_held += len;
        let whole = match s.rx.pop_front() {
            None => s.rx_tail.split().freeze(),
            Some(only) if s.rx.is_empty() && s.rx_tail.is_empty() => only,
            Some(first) => {
                let mut b = BytesMut::with_capacity(len);
                b.extend_from_slice(&first);
                for c in s.rx.drain(..) {
                    b.extend_from_slice(&c);
                }
                b.extend_from_slice(&s.rx_tail.split());
                b.freeze()
            }
        };
        self.data_done = true;
        g.conn_release += len as u32;
        let before = g.out.len();
        g.give_back(self.id);
        if g.out.len() != before {
            g.queued();
        }
        Some(whole)
    }

    /// The trailers, once the data is over.
    pub fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<HeaderMap>, Reason>> {
        let mut g = self.shared.lock();
        let gone = g.gone;
        let Some(s) = g.streams.get_mut(&self.id) else {
            return Poll::Ready(gone.map_or(Ok(None), Err));
        };
        if let Some(t) = s.rx_trailers.take() {
            return Poll::Ready(Ok(Some(t)));
        }
        if s.rx_end {
            return Poll::Ready(Ok(None));
        }
        if let Some(r) = s.reset.or(gone) {
            return Poll::Ready(Err(r));
        }
        s.rx_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Whether nothing more will come.
    pub fn is_end_stream(&self) -> bool {
        let g = self.shared.lock();
        match g.streams.get(&self.id) {
            None => true,
            Some(s) => {
                s.rx_end && s.rx.is_empty() && s.rx_tail.is_empty() && s.rx_trailers.is_none()
            }
        }
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        let mut g = self.shared.lock();
        if let Some(s) = g.streams.get_mut(&self.id) {
            s.body = false;
            g.settle(self.id);
            let before = g.out.len();
            g.give_back(self.id);
            if g.out.len() != before {
                g.queued();
            }
        }
    }
}

/// A stream's sending side: its response head, data and trailers.
pub struct StreamHandle {
    pub(super) shared: Arc<Shared>,
    pub(super) id: u32,
}

impl StreamHandle {
    /// Ready with the reason once the stream is reset (by the client, or
    /// because the connection is gone).
    pub fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<Reason> {
        let mut g = self.shared.lock();
        let gone = g.gone;
        let Some(s) = g.streams.get_mut(&self.id) else {
            return Poll::Ready(gone.unwrap_or(Reason::CANCEL));
        };
        if let Some(r) = s.reset.or(gone) {
            return Poll::Ready(r);
        }
        s.tx_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    pub(super) fn open(g: &mut Inner, id: u32) -> Result<(), Reason> {
        Self::slot(&mut g.streams, g.gone, id).map(|_| ())
    }

    pub(super) fn slot(
        streams: &mut FxHashMap<u32, Slot>,
        gone: Option<Reason>,
        id: u32,
    ) -> Result<&mut Slot, Reason> {
        match streams.get_mut(&id) {
            None => Err(gone.unwrap_or(Reason::CANCEL)),
            Some(s) => match s.reset.or(gone) {
                Some(r) => Err(r),
                None if s.tx_end => Err(Reason::STREAM_CLOSED),
                None => Ok(s),
            },
        }
    }

    /// Sends the response head; `end`: it has no body.
    pub fn send_response(
        &mut self,
        status: StatusCode,
        headers: &HeaderMap,
        end: bool,
    ) -> Result<(), Reason> {
        let mut g = self.shared.lock();
        let g = &mut *g;
        Self::open(g, self.id)?;
        g.block.clear();
        hpack::encode_response(&mut g.block, status, headers);
        frame::header_block(&mut g.out, self.id, &g.block, end, g.max_send_frame);
        if end {
            g.sent_end(self.id);
        }
        g.queued();
        Ok(())
    }

    /// Sends the trailers, which end the stream.
    pub fn send_trailers(&mut self, trailers: &HeaderMap) -> Result<(), Reason> {
        let mut g = self.shared.lock();
        let g = &mut *g;
        Self::open(g, self.id)?;
        g.block.clear();
        hpack::encode_fields(&mut g.block, trailers);
        frame::header_block(&mut g.out, self.id, &g.block, true, g.max_send_frame);
        g.sent_end(self.id);
        g.queued();
        Ok(())
    }

    /// Sends `data` as the windows allow (taking what went out off its
    /// front); ready once all of it went, with END_STREAM if `end`.
    pub fn poll_send_data(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
        end: bool,
    ) -> Poll<Result<(), Reason>> {
        let mut g = self.shared.lock();
        let g = &mut *g;
        let id = self.id;
        loop {
            let s = match Self::slot(&mut g.streams, g.gone, id) {
                Ok(s) => s,
                Err(r) => return Poll::Ready(Err(r)),
            };
            if data.is_empty() {
                if end {
                    frame::head(&mut g.out, 0, frame::DATA, frame::END_STREAM, id);
                    g.sent_end(id);
                    g.queued();
                }
                return Poll::Ready(Ok(()));
            }
            if g.out.len() >= OUT_HIGH {
                g.out_waiters.push(cx.waker().clone());
                return Poll::Pending;
            }
            let n = (data.len() as i64)
                .min(s.tx_window)
                .min(g.conn_send)
                .min(g.max_send_frame as i64);
            if n <= 0 {
                s.tx_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let n = n as usize;
            s.tx_window -= n as i64;
            g.conn_send -= n as i64;
            let last = end && n == data.len();
            frame::head(
                &mut g.out,
                n,
                frame::DATA,
                if last { frame::END_STREAM } else { 0 },
                id,
            );
            g.out.extend_from_slice(&data[..n]);
            data.advance(n);
            g.queued();
            if last {
                g.sent_end(id);
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Resets the stream.
    pub fn send_reset(&mut self, reason: Reason) {
        let mut g = self.shared.lock();
        g.reset(self.id, reason);
        g.queued();
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        let mut g = self.shared.lock();
        let g = &mut *g;
        let Some(s) = g.streams.get_mut(&self.id) else {
            return;
        };
        s.handle = false;
        if !s.tx_end && s.reset.is_none() {
            // Dropped before its response ended (its request cancelled, or the
            // connection cut).
            g.reset(self.id, Reason::CANCEL);
            g.queued();
        }
        g.settle(self.id);
    }
}
