//! flowgate's HTTP/1.1 client side: one upstream connection, written and read in
//! the task of the request that uses it.
//!
//! hyper's client connection (`hyper::client::conn::http1`) hands a request to a
//! dispatcher through a channel, parses the response into a message it sends back
//! through another, and feeds the body through a third: about a third of the
//! instructions of a proxied request (callgrind, docs/performance.md). Here the
//! request head is encoded into one buffer and written with the first body bytes,
//! the response head is parsed with `httparse` (what hyper uses) straight into the
//! `HeaderMap` the client gets, and the body's frames are slices of the read buffer.
//! The WebSocket handshake still goes through hyper (its upgrade hand-over), on a
//! connection of its own ([`super::upstream`]).
//!
//! Framing follows RFC 9112 §6.3 for responses: none after HEAD, 1xx, 204 and 304;
//! `Transfer-Encoding` ending in `chunked` (a `Content-Length` beside it is dropped,
//! and the connection closes after); a `Content-Length` (all copies equal); else
//! until the backend closes. Interim 1xx responses are read past. A request body
//! goes up as it came: with its `Content-Length`, else chunked (its trailers too).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::Body;
use hyper::header::HeaderMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::raw::Framing;
use super::request_body::{BoxError, UpBody};

mod read;

pub use read::RawFields;

/// The largest response head (status line, headers) or trailer section taken
/// (hyper's default).
const MAX_HEAD: usize = 8192 + 4096 * 100;
/// Headers in one response head, at most (hyper's default).
const MAX_HEADERS: usize = 100;
/// Room made in the read buffer before a read, at first and at least.
const READ_SIZE: usize = 8192;
/// ... and at most.
const MAX_READ: usize = 256 * 1024;
/// The longest chunk-size line (with extensions) taken.
const MAX_CHUNK_LINE: usize = 4096;

/// Why an exchange on a connection failed.
#[derive(Debug)]
pub enum UpError {
    /// The backend closed (or reset) the connection before any byte of a
    /// response: a kept-alive connection it closed as the request went out. A
    /// bodiless request may go again on a fresh connection.
    Closed,
    Io(io::Error),
    /// The backend's response broke HTTP/1.1.
    Invalid(&'static str),
    /// The request body failed (the client's, `max_body_bytes`, idle).
    Body(BoxError),
    /// From hyper's client (h2c and the WebSocket handshake).
    Hyper(hyper::Error),
}

impl std::fmt::Display for UpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpError::Closed => f.write_str("connection closed before the response"),
            UpError::Io(e) => write!(f, "upstream i/o: {e}"),
            UpError::Invalid(why) => write!(f, "invalid upstream response: {why}"),
            UpError::Body(e) => write!(f, "request body: {e}"),
            UpError::Hyper(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for UpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpError::Io(e) => Some(e),
            UpError::Body(e) => Some(&**e),
            UpError::Hyper(e) => Some(e),
            _ => None,
        }
    }
}

/// Header (or trailer) lines: `name: value` CRLF each.
pub(super) fn put_fields(w: &mut BytesMut, h: &HeaderMap) {
    for (k, v) in h {
        w.extend_from_slice(k.as_str().as_bytes());
        w.extend_from_slice(b": ");
        w.extend_from_slice(v.as_bytes());
        w.extend_from_slice(b"\r\n");
    }
}

/// The request body's framing on its way up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Up {
    /// Bytes the head announced still to send.
    Length(u64),
    Chunked,
}

/// The response body's framing, and where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Down {
    /// Bytes still to come.
    Length(u64),
    /// Until the backend closes.
    Close,
    ChunkSize,
    /// Bytes of the current chunk still to come.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    Trailers,
    Done,
}

/// One HTTP/1.1 connection to a backend, over `T`.
#[derive(Debug)]
pub struct Conn<T> {
    io: T,
    rbuf: BytesMut,
    /// Head and body bytes not written yet, in order.
    out: VecDeque<Bytes>,
    /// Where a response head's names and values are, while it is cut off the
    /// read buffer (kept: no allocation per response).
    at: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
    /// The request body still going up, and how.
    body: Option<(UpBody, Up)>,
    /// A request's bytes as written (and whether it was HEAD), until
    /// its response head comes: what goes again on a fresh connection if the
    /// backend closes this one under it ([`Conn::take_resend`]).
    resend: Option<(Bytes, bool)>,
    down: Down,
    /// The request was HEAD: its response has no body.
    head_req: bool,
    /// The response head's fields are kept as bytes ([`Conn::take_fields`]),
    /// not parsed into the response's `HeaderMap`.
    raw_fields: bool,
    fields: Option<RawFields>,
    /// Any byte of the response came.
    got: bool,
    /// Room made for the next read (see [`Conn::poll_fill`]).
    read_size: usize,
    /// The request could not all be sent ([`Conn::upload_cut`]).
    cut: bool,
    keep_alive: bool,
    broken: bool,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Conn<T> {
    pub fn new(io: T) -> Conn<T> {
        Conn {
            io,
            rbuf: BytesMut::new(),
            out: VecDeque::with_capacity(4),
            at: Vec::new(),
            body: None,
            resend: None,
            down: Down::Done,
            head_req: false,
            raw_fields: false,
            fields: None,
            got: false,
            read_size: READ_SIZE,
            cut: false,
            keep_alive: true,
            broken: false,
        }
    }

    pub fn io(&self) -> &T {
        &self.io
    }

    /// Whether the connection can take another request: its last exchange ended
    /// cleanly, and nothing came while it idled (a close, stray bytes). One read
    /// attempt, a system call only if the reactor saw the socket readable.
    pub fn poll_usable(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.reusable() {
            return false;
        }
        let mut probe = [0u8; 1];
        let mut rb = ReadBuf::new(&mut probe);
        match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
            Poll::Pending => true,
            _ => {
                self.broken = true;
                false
            }
        }
    }

    /// The last exchange ended cleanly and the backend keeps the connection.
    pub fn reusable(&self) -> bool {
        self.keep_alive
            && !self.broken
            && self.down == Down::Done
            && self.body.is_none()
            && self.out.is_empty()
            && self.rbuf.is_empty()
    }

    /// Goes idle (into a pool): a read buffer grown by a bulk body is let go.
    pub fn idle(&mut self) {
        if self.rbuf.capacity() > READ_SIZE {
            self.rbuf = BytesMut::new();
        }
        self.read_size = READ_SIZE;
    }

    /// Queues a request with a body: its head (as the handler encoded it, with
    /// `framing` in it), then the body, as it comes.
    pub(super) fn start_body(
        &mut self,
        head: Bytes,
        head_req: bool,
        body: UpBody,
        framing: Framing,
    ) {
        self.head_req = head_req;
        self.raw_fields = false;
        self.got = false;
        self.down = Down::Done;
        let up = match framing {
            Framing::Length(n) => Up::Length(n),
            // (`None`: a body the head does not frame is never started.)
            Framing::Chunked | Framing::None => Up::Chunked,
        };
        self.body = Some((body, up));
        self.resend = None;
        self.out.push_back(head);
    }

    /// Queues a request's bytes: a bodiless request's head (as
    /// [`Conn::take_resend`] gave it), or what the server fast path encoded (a
    /// head, and a body read whole with it); with `raw_fields`, the response's
    /// fields are kept as bytes for [`Conn::take_fields`].
    pub fn start_raw(&mut self, head: Bytes, head_req: bool, raw_fields: bool) {
        self.head_req = head_req;
        self.raw_fields = raw_fields;
        self.got = false;
        self.down = Down::Done;
        self.body = None;
        self.resend = Some((head.clone(), head_req));
        self.out.push_back(head);
    }

    /// The response head's fields, as bytes (after [`Conn::start_raw`] asked
    /// for them).
    pub fn take_fields(&mut self) -> Option<RawFields> {
        self.fields.take()
    }

    /// The bytes of the request this connection failed under, to go again on
    /// another if it is bodiless.
    pub fn take_resend(&mut self) -> Option<(Bytes, bool)> {
        self.resend.take()
    }

    /// Moves the request up as far as it goes without waiting: what the body has
    /// ready is taken first (a few frames), so that it goes out with the head in
    /// one `writev`. `Err` if writing or the body failed.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Result<(), UpError> {
        loop {
            while self.out.len() < 4 {
                let Some((body, up)) = self.body.as_mut() else {
                    break;
                };
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        let frame = match frame.into_data() {
                            Ok(d) => {
                                self.queue_data(d)?;
                                continue;
                            }
                            Err(frame) => frame,
                        };
                        if let (Ok(t), Up::Chunked) = (frame.into_trailers(), *up) {
                            let mut w = BytesMut::from(&b"0\r\n"[..]);
                            put_fields(&mut w, &t);
                            w.extend_from_slice(b"\r\n");
                            self.out.push_back(w.freeze());
                            self.body = None;
                        }
                    }
                    Poll::Ready(Some(Err(e))) => {
                        self.stop_upload();
                        return Err(UpError::Body(e));
                    }
                    Poll::Ready(None) => {
                        match *up {
                            Up::Chunked => self.out.push_back(Bytes::from_static(b"0\r\n\r\n")),
                            Up::Length(0) => {}
                            Up::Length(_) => {
                                self.stop_upload();
                                return Err(UpError::Invalid(
                                    "request body shorter than its Content-Length",
                                ));
                            }
                        }
                        self.body = None;
                    }
                    Poll::Pending => break,
                }
            }
            if self.out.is_empty() {
                return Ok(());
            }
            let mut slices = [IoSlice::new(&[]); 4];
            let n = self.out.len().min(slices.len());
            for (s, b) in slices.iter_mut().zip(self.out.iter()) {
                *s = IoSlice::new(b);
            }
            match Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n]) {
                Poll::Ready(Ok(0)) => {
                    self.stop_upload();
                    return Err(UpError::Io(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(mut k)) => {
                    while k > 0 {
                        let Some(front) = self.out.front_mut() else {
                            break;
                        };
                        if k >= front.len() {
                            k -= front.len();
                            self.out.pop_front();
                        } else {
                            front.advance(k);
                            k = 0;
                        }
                    }
                }
                Poll::Ready(Err(e)) => {
                    self.stop_upload();
                    return Err(self.closed_or(e));
                }
                Poll::Pending => return Ok(()),
            }
        }
    }

    /// Queues a data frame of the request body, framed.
    fn queue_data(&mut self, d: Bytes) -> Result<(), UpError> {
        let Some((_, up)) = self.body.as_mut() else {
            return Ok(());
        };
        if d.is_empty() {
            return Ok(());
        }
        match up {
            Up::Chunked => {
                self.out
                    .push_back(Bytes::from(format!("{:x}\r\n", d.len())));
                self.out.push_back(d);
                self.out.push_back(Bytes::from_static(b"\r\n"));
            }
            // Counted: never more than the head announced (hyper's server and
            // h2 hold a client to its length; this holds flowgate to it).
            Up::Length(left) => match left.checked_sub(d.len() as u64) {
                Some(rest) => {
                    *left = rest;
                    self.out.push_back(d);
                }
                None => {
                    self.stop_upload();
                    return Err(UpError::Invalid(
                        "request body longer than its Content-Length",
                    ));
                }
            },
        }
        Ok(())
    }

    /// The request cannot go on (writing failed, or its body did): nothing more
    /// is sent, and the connection is not reused. A response the backend already
    /// sent (an early answer, then a close) can still be read.
    fn stop_upload(&mut self) {
        self.cut |= self.body.is_some() || !self.out.is_empty();
        self.body = None;
        self.out.clear();
        self.broken = true;
    }

    /// The request was not all sent (writing failed, or its body did).
    pub fn upload_cut(&self) -> bool {
        self.cut
    }

    /// A write or read error: `Closed` if no byte of the response came and the
    /// backend reset or closed the connection.
    fn closed_or(&self, e: io::Error) -> UpError {
        use io::ErrorKind::*;
        match e.kind() {
            ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof if !self.got => {
                UpError::Closed
            }
            _ => UpError::Io(e),
        }
    }
}

#[cfg(test)]
mod tests;
