//! An http listener's client socket, with the head and idle deadlines hyper
//! lacks: `header_timeout` from accept for the first request and from the first
//! byte of each later one (an HTTP/1.1 client whose head is incomplete then gets
//! a written 408 before the close), `idle_timeout` while nothing is in flight,
//! and a write deadline: a client that takes no byte of what is written to it
//! for the latest request's `stream_idle_timeout` gets a write error (hyper's
//! HTTP/1.1 server, the fast path and `h2` alike then end the connection).
//! It also tells HTTP/2's preface apart ([`ClientIo::sniff`]) and scans
//! HTTP/1.1 heads for what hyper lets through ([`super::scan`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::request_body::IdleTimer;
use super::scan::HeadScan;
use super::state::ConnState;

/// Future adapter so `Pin<Box<Sleep>>` polls in place.
fn poll_sleep(s: &mut Pin<Box<Sleep>>, cx: &mut Context<'_>) -> bool {
    s.as_mut().poll(cx).is_ready()
}

/// The client socket, with the head and idle deadlines.
pub struct ClientIo {
    pub(super) stream: TcpStream,
    state: Arc<ConnState>,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// Since when a head has been arriving, and the request count then; `None`
    /// while no head is pending.
    head: Option<(Instant, u64)>,
    sleep: Pin<Box<Sleep>>,
    /// The deadline `sleep` is set to.
    armed: Option<Instant>,
    scan: HeadScan,
    /// Bytes read but not yet handed to hyper (read ahead by the last hyper
    /// connection, or by [`ClientIo::sniff`]); served before the socket.
    pub(super) leftover: Bytes,
    /// Runs from the first write the client's socket could not take; `None`
    /// while writes go through (made when first needed).
    write_wait: Option<IdleTimer>,
    waiting: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Deadline {
    Head,
    Idle,
}

/// Written to an HTTP/1.1 client whose head did not arrive in time.
const TIMEOUT_408: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 50\r\nconnection: close\r\n\r\nrequest head not received within header_timeout\r\n";

impl ClientIo {
    pub(super) fn new(
        stream: TcpStream,
        state: Arc<ConnState>,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> ClientIo {
        let now = Instant::now();
        ClientIo {
            stream,
            state,
            header_timeout,
            idle_timeout,
            // The first head's deadline runs from accept.
            head: Some((now, 0)),
            sleep: Box::pin(tokio::time::sleep_until(now + header_timeout)),
            armed: Some(now + header_timeout),
            scan: HeadScan::new(),
            leftover: Bytes::new(),
            write_wait: None,
            waiting: false,
        }
    }

    /// A write's outcome, the write deadline applied: a socket that has taken
    /// no byte for the write limit fails the write.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if r.is_ready() {
            self.waiting = false;
            return r;
        }
        let ms = self.state.write_idle_ms.load(Ordering::Relaxed);
        let after = match ms {
            0 => self.idle_timeout,
            ms => Duration::from_millis(ms),
        };
        let timer = self.write_wait.get_or_insert_with(|| IdleTimer::new(after));
        timer.after = after;
        if !self.waiting {
            self.waiting = true;
            timer.touch();
        }
        if !timer.expired(cx) {
            return Poll::Pending;
        }
        self.state.write_stalled.store(true, Ordering::Relaxed);
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took no bytes within stream_idle_timeout",
        )))
    }

    /// The deadline that applies now, if any.
    fn deadline(&mut self) -> Option<(Instant, Deadline)> {
        let requests = self.state.requests.load(Ordering::Acquire);
        if let Some((since, at)) = self.head {
            if requests == at {
                return Some((since + self.header_timeout, Deadline::Head));
            }
            self.head = None;
        }
        if self.state.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let idle_us = self.state.idle_since.load(Ordering::Relaxed);
        let since = Instant::from_std(crate::proxy::instant_of_us(idle_us));
        Some((since + self.idle_timeout, Deadline::Idle))
    }

    /// Bytes arrived: with nothing in flight, an HTTP/1.1 head starts.
    fn arrived(&mut self) {
        let requests = self.state.requests.load(Ordering::Acquire);
        if self.head.is_some_and(|(_, at)| at != requests) {
            // That head became a request; these bytes may start the next one.
            self.head = None;
        }
        if self.head.is_none()
            && !self.state.h2.load(Ordering::Relaxed)
            && self.state.in_flight.load(Ordering::Acquire) == 0
        {
            self.head = Some((Instant::now(), requests));
            self.state.reading.store(requests + 1, Ordering::Release);
            self.scan.resync(requests + 1);
        }
    }

    /// Reads the first bytes: `Some(true)` for HTTP/2's preface (`PRI `),
    /// `Some(false)` for anything else, `None` if the client closed or timed out
    /// first. The bytes read stay for hyper.
    pub(super) async fn sniff(&mut self) -> Option<bool> {
        const PREFACE: &[u8] = b"PRI ";
        // One read takes what the client sent (a whole head, usually); hyper gets
        // it from `leftover`.
        let mut got = vec![0u8; 4096];
        let mut n = 0;
        while n < PREFACE.len() && got[..n] == PREFACE[..n] {
            let mut rb = ReadBuf::new(&mut got[n..]);
            std::future::poll_fn(|cx| Pin::new(&mut *self).poll_read(cx, &mut rb))
                .await
                .ok()?;
            let k = rb.filled().len();
            if k == 0 {
                return None;
            }
            n += k;
        }
        got.truncate(n);
        let h2 = got.starts_with(PREFACE);
        self.leftover = Bytes::from(got);
        Some(h2)
    }

    /// Between HTTP/1.1 requests: ready when the client sends (or closes), false
    /// once a deadline passed (a 408 written for a head that started).
    pub(super) fn poll_request(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        match self.stream.poll_read_ready(cx) {
            Poll::Ready(r) => return Poll::Ready(r.is_ok()),
            Poll::Pending => {}
        }
        match self.poll_deadline(cx) {
            Poll::Ready(()) => Poll::Ready(false),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Ready once the deadline that applies now passed (a 408 written if it was
    /// a head's).
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some((when, kind)) = self.deadline() else {
            return Poll::Pending;
        };
        // Armed lazily: a timer set for an earlier time is left as it is (each
        // request moves the idle deadline later; resetting the timer for each
        // would cost a timer-wheel move per request), and when it fires, the
        // deadline that applies then is looked at again.
        if self.armed.is_none_or(|a| a > when) {
            self.sleep.as_mut().reset(when);
            self.armed = Some(when);
        }
        if !poll_sleep(&mut self.sleep, cx) {
            return Poll::Pending;
        }
        if self.armed != Some(when) {
            // Fired for an earlier deadline that has since moved.
            self.sleep.as_mut().reset(when);
            self.armed = Some(when);
            if !poll_sleep(&mut self.sleep, cx) {
                return Poll::Pending;
            }
        }
        if kind == Deadline::Head && !self.state.h2.load(Ordering::Relaxed) {
            // Best effort: a client that reads nothing just gets the close.
            let _ = self.stream.try_write(TIMEOUT_408);
        }
        Poll::Ready(())
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        crate::proxy::busy::note_work();
        let this = self.get_mut();
        if !this.leftover.is_empty() {
            // Already seen (and scanned) when first read.
            let n = this.leftover.len().min(buf.remaining());
            buf.put_slice(&this.leftover[..n]);
            this.leftover.advance(n);
            if this.leftover.is_empty() {
                // Let go of the buffer it was a part of.
                this.leftover = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.arrived();
                    if !this.state.h2.load(Ordering::Relaxed) {
                        if let Some(n) = this.scan.feed(&buf.filled()[before..]) {
                            // The first such head: the connection closes there.
                            let _ = this.state.bad_head.compare_exchange(
                                0,
                                n,
                                Ordering::AcqRel,
                                Ordering::Relaxed,
                            );
                        }
                    }
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        match this.poll_deadline(cx) {
            // End of stream: hyper ends the connection.
            Poll::Ready(()) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.wrote(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.wrote(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
