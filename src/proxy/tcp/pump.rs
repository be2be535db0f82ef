//! One direction of a session as a poll-driven state machine: read from `src`, write
//! to `dst`, until end of stream or an error, with no user-space buffer held while
//! the direction is idle.
//!
//! Small reads go through a per-thread buffer: read, then write at once; only bytes
//! the destination cannot take right now are copied to a heap buffer owned by the
//! direction, which is freed once flushed. When a read fills the whole buffer the
//! stream is moving bulk data, and (on Linux) the direction switches to splice(2)
//! through a pooled pipe; a splice that moves less than `SPLICE_MIN` switches back.
//! This is HAProxy's "splice-auto" idea; the thresholds are in docs/performance.md.
//!
//! Reads and writes go through tokio's `poll_read`/`poll_write` on the borrowed
//! halves: a short read or write clears the socket's readiness without another
//! syscall (edge-triggered epoll), and readiness waits use the socket's own reader
//! and writer waker slots, so the state kept per direction is a few words.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};

use crate::proxy::Activity;

/// Size of the per-thread copy buffer; a read that fills it switches to splice.
const COPY_BUF: usize = 16 * 1024;
/// Bytes asked of one splice into the pipe (the default pipe holds 64 KiB).
#[cfg(target_os = "linux")]
const SPLICE_CHUNK: usize = 64 * 1024;
/// A splice that moves less than this switches back to copying.
#[cfg(target_os = "linux")]
const SPLICE_MIN: usize = 4 * 1024;

thread_local! {
    static BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; COPY_BUF].into_boxed_slice());
}

#[derive(Debug)]
pub(crate) enum PumpEnd {
    /// `src` sent FIN and everything read was written.
    Eof,
    /// Reading `src` failed (typically a reset).
    ReadError(io::Error),
    /// Writing `dst` failed (typically a reset or broken pipe).
    WriteError(io::Error),
}

/// The state of one direction.
#[derive(Default)]
pub(crate) struct Pump {
    /// Bytes read but not yet written (copy path); empty and unallocated when idle.
    /// Boxed so an idle direction spends one word on it, not three: this state lives
    /// in every connection's task, and the extra allocation happens only when the
    /// destination pushes back.
    #[allow(clippy::box_collection)]
    pending: Option<Box<Vec<u8>>>,
    /// A pipe holding spliced bytes not yet written; `None` when idle.
    #[cfg(target_os = "linux")]
    pipe: Option<super::pipe::Pipe>,
    #[cfg(target_os = "linux")]
    use_splice: bool,
    /// Bytes written to `dst` so far.
    pub moved: u64,
    /// Reached end of stream (and passed the FIN on).
    pub done: bool,
}

impl Pump {
    /// Moves bytes until `src` or `dst` would block (Pending) or the direction ends.
    pub(crate) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut ReadHalf<'_>,
        dst: &mut WriteHalf<'_>,
        activity: &Activity,
        // Whether bulk transfers may switch to splice(2) (`runtime.splice`).
        splice: bool,
    ) -> Poll<PumpEnd> {
        loop {
            // Flush what is held before reading more: this is the backpressure.
            #[cfg(target_os = "linux")]
            if let Some(p) = self.pipe.as_mut() {
                while p.len > 0 {
                    let d = dst.as_ref();
                    if let Err(e) = ready!(d.poll_write_ready(cx)) {
                        return Poll::Ready(PumpEnd::WriteError(e));
                    }
                    match d.try_io(tokio::io::Interest::WRITABLE, || p.drain(d)) {
                        Ok(n) => {
                            self.moved += n as u64;
                            activity.touch();
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(PumpEnd::WriteError(e)),
                    }
                }
                if let Some(p) = self.pipe.take() {
                    p.put();
                }
            }
            if let Some(pending) = self.pending.as_mut() {
                while !pending.is_empty() {
                    match ready!(Pin::new(&mut *dst).poll_write(cx, pending)) {
                        Ok(n) => {
                            pending.drain(..n);
                            self.moved += n as u64;
                            activity.touch();
                        }
                        Err(e) => return Poll::Ready(PumpEnd::WriteError(e)),
                    }
                }
                self.pending = None;
            }

            #[cfg(target_os = "linux")]
            if self.use_splice {
                // Out of descriptors for a pipe: copy instead, the connection lives on.
                if let Ok(p) = super::pipe::Pipe::get() {
                    match ready!(self.splice_once(cx, p, src, dst)) {
                        Ok(0) => return Poll::Ready(PumpEnd::Eof),
                        Ok(n) => {
                            activity.touch();
                            if n < SPLICE_MIN {
                                self.use_splice = false;
                            }
                        }
                        Err(end) => return Poll::Ready(end),
                    }
                    continue;
                }
                self.use_splice = false;
            }

            match ready!(self.copy_once(cx, src, dst)) {
                Ok(0) => return Poll::Ready(PumpEnd::Eof),
                Ok(n) => {
                    activity.touch();
                    #[cfg(target_os = "linux")]
                    if n == COPY_BUF && splice {
                        self.use_splice = true;
                    }
                    #[cfg(not(target_os = "linux"))]
                    let _ = n;
                }
                Err(end) => return Poll::Ready(end),
            }
        }
    }

    /// Reads once into the thread's buffer and writes as much as `dst` takes now; the
    /// rest goes to `pending`. Returns the bytes read (0: end of stream).
    fn copy_once(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut ReadHalf<'_>,
        dst: &mut WriteHalf<'_>,
    ) -> Poll<Result<usize, PumpEnd>> {
        BUF.with_borrow_mut(|buf| {
            let mut rb = ReadBuf::new(buf);
            if let Err(e) = ready!(Pin::new(&mut *src).poll_read(cx, &mut rb)) {
                return Poll::Ready(Err(PumpEnd::ReadError(e)));
            }
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            let written = match Pin::new(&mut *dst).poll_write(cx, &buf[..n]) {
                Poll::Ready(Ok(w)) => w,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpEnd::WriteError(e))),
                Poll::Pending => 0,
            };
            self.moved += written as u64;
            if written < n {
                self.pending = Some(Box::new(buf[written..n].to_vec()));
            }
            Poll::Ready(Ok(n))
        })
    }

    /// Splices once from `src` into the (empty) pipe `p` and on into `dst` as far as
    /// it goes now; a pipe that still holds bytes is kept for the flush. Returns the
    /// bytes read (0: end of stream).
    #[cfg(target_os = "linux")]
    fn splice_once(
        &mut self,
        cx: &mut Context<'_>,
        mut p: super::pipe::Pipe,
        src: &mut ReadHalf<'_>,
        dst: &mut WriteHalf<'_>,
    ) -> Poll<Result<usize, PumpEnd>> {
        use tokio::io::Interest;
        let s = src.as_ref();
        loop {
            match s.poll_read_ready(cx) {
                Poll::Pending => {
                    p.put();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    p.put();
                    return Poll::Ready(Err(PumpEnd::ReadError(e)));
                }
                Poll::Ready(Ok(())) => {}
            }
            match s.try_io(Interest::READABLE, || p.fill(s, SPLICE_CHUNK)) {
                Ok(0) => {
                    p.put();
                    return Poll::Ready(Ok(0));
                }
                Ok(n) => {
                    let d = dst.as_ref();
                    match d.try_io(Interest::WRITABLE, || p.drain(d)) {
                        Ok(w) => self.moved += w as u64,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(PumpEnd::WriteError(e))),
                    }
                    if p.len > 0 {
                        self.pipe = Some(p);
                    } else {
                        p.put();
                    }
                    return Poll::Ready(Ok(n));
                }
                // Readiness was stale: cleared by try_io; poll again to register.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    p.put();
                    return Poll::Ready(Err(PumpEnd::ReadError(e)));
                }
            }
        }
    }
}
