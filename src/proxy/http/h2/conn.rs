//! The server side of an HTTP/2 connection: frames read and checked, streams
//! opened and closed, both flow-control windows kept, and what the streams
//! send written out in one write per turn.
//!
//! [`Conn`] is driven by the connection's task. The state the streams share
//! with it (their received data, their windows, the bytes waiting to be
//! written) is behind one mutex: a request body may be read from another task
//! (hyper's, for an h2c backend), and the lock is uncontended otherwise.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use h2::Reason;
use hyper::Request;
use rustc_hash::FxHashMap;
use tokio::io::{AsyncRead, AsyncWrite};

use super::frame::{self, Head};
use super::hpack;
use super::request::{content_length, request};
use super::stream::{Inner, RecvBody, Shared, Slot, StreamHandle, OUT_HIGH};

/// What a connection advertises.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub max_streams: u32,
    pub max_header_list: usize,
    /// Each stream's receive window (SETTINGS_INITIAL_WINDOW_SIZE).
    pub stream_window: u32,
    /// The connection's receive window.
    pub conn_window: u32,
    /// Streams this connection may reset for the client's errors before it
    /// is closed with ENHANCE_YOUR_CALM.
    pub max_error_resets: usize,
}

/// The largest frame read (SETTINGS_MAX_FRAME_SIZE is left at its default).
const MAX_FRAME: usize = frame::MIN_MAX_FRAME as usize;
/// DATA chunks smaller than this (or padded) are copied rather than kept as
/// slices of the read buffer.
const SMALL_DATA: usize = 4096;
/// The PING payload of a graceful shutdown's first GOAWAY.
const DRAIN_PING: [u8; 8] = *b"fg-drain";
/// Client resets of streams in one second above which the connection is
/// closed (the "rapid reset" attack, CVE-2023-44487).
const MAX_RESETS_PER_SECOND: u32 = 1000;

/// A connection error: GOAWAY with this reason, then the close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnError(pub Reason, pub &'static str);

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP/2 connection error {:?}: {}", self.0, self.1)
    }
}

impl std::error::Error for ConnError {}

/// A header block being received (HEADERS, then CONTINUATIONs).
struct Pending {
    stream: u32,
    end_stream: bool,
    bytes: BytesMut,
    /// CONTINUATION frames so far.
    frames: usize,
}

/// An HTTP/2 server connection over `io`.
pub struct Conn<T> {
    io: T,
    shared: Arc<Shared>,
    settings: Settings,
    rbuf: BytesMut,
    dec: hpack::Decoder,
    /// The client's preface has been read.
    preface: bool,
    /// A frame other than SETTINGS came first: PROTOCOL_ERROR.
    got_settings: bool,
    block: Option<Pending>,
    /// The highest stream the client opened (and this side processes).
    last: u32,
    /// The highest stream the client started, processed or not: those above
    /// are idle.
    seen: u32,
    /// The first GOAWAY of a graceful shutdown sent, with a PING: streams are
    /// still taken until its ack.
    draining: bool,
    /// The final GOAWAY sent: no stream is opened past `last`.
    going_away: bool,
    /// The client sent GOAWAY.
    peer_away: bool,
    eof: bool,
    resets: (Instant, u32),
    /// Requests read and not yet handed out: all the frames a read brought are
    /// handled first, so that a request's body that came with its head is
    /// there when its handler starts.
    ready: VecDeque<Accepted>,
}

/// What [`Conn::poll_accept`] gives.
pub type Accepted = (Request<RecvBody>, StreamHandle);

impl<T: AsyncRead + AsyncWrite + Unpin> Conn<T> {
    /// A connection whose preface is still to be read; its SETTINGS (and the
    /// connection window's raise) go out with the first write.
    pub fn new(io: T, settings: Settings) -> Conn<T> {
        let mut out = BytesMut::with_capacity(16 * 1024);
        frame::settings(
            &mut out,
            &[
                (frame::SETTINGS_ENABLE_PUSH, 0),
                (frame::SETTINGS_MAX_CONCURRENT_STREAMS, settings.max_streams),
                (frame::SETTINGS_INITIAL_WINDOW_SIZE, settings.stream_window),
                (
                    frame::SETTINGS_MAX_HEADER_LIST_SIZE,
                    settings.max_header_list.min(u32::MAX as usize) as u32,
                ),
            ],
        );
        let raise = settings.conn_window as i64 - frame::DEFAULT_WINDOW;
        if raise > 0 {
            frame::window_update(&mut out, 0, raise as u32);
        }
        let inner = Inner {
            streams: FxHashMap::default(),
            active: 0,
            out,
            block: BytesMut::new(),
            conn_send: frame::DEFAULT_WINDOW,
            init_send: frame::DEFAULT_WINDOW,
            max_send_frame: frame::MIN_MAX_FRAME as usize,
            conn_release: 0,
            conn_recv: settings.conn_window.max(frame::DEFAULT_WINDOW as u32) as i64,
            stream_window: settings.stream_window,
            conn_window: settings.conn_window.max(frame::DEFAULT_WINDOW as u32),
            driver: None,
            polling: false,
            out_waiters: Vec::new(),
            gone: None,
            error_resets: 0,
            whole_held: 0,
        };
        Conn {
            io,
            shared: Arc::new(Shared(Mutex::new(inner))),
            settings,
            rbuf: BytesMut::with_capacity(MAX_FRAME + frame::HEADER_LEN),
            dec: hpack::decoder(),
            preface: false,
            got_settings: false,
            block: None,
            last: 0,
            seen: 0,
            draining: false,
            going_away: false,
            peer_away: false,
            eof: false,
            resets: (Instant::now(), 0),
            ready: VecDeque::new(),
        }
    }

    /// Marks the streams as polled by the connection's own task: a frame they
    /// queue needs no wake-up, as it goes out before the task waits (which
    /// [`Conn::poll_accept`] marks when it returns `Pending`).
    pub fn enter(&self) {
        self.shared.lock().polling = true;
    }

    /// A graceful shutdown, as RFC 9113 §6.8 advises: GOAWAY with the largest
    /// stream id and a PING; once the PING comes back (the client has seen the
    /// GOAWAY), the final GOAWAY names the last stream taken, so a request the
    /// client sent meanwhile is served rather than lost. The streams taken
    /// finish.
    pub fn graceful_shutdown(&mut self) {
        if self.draining || self.going_away {
            return;
        }
        self.draining = true;
        let mut g = self.shared.lock();
        frame::goaway(&mut g.out, 0x7fff_ffff, Reason::NO_ERROR);
        frame::head(&mut g.out, 8, frame::PING, 0, 0);
        g.out.extend_from_slice(&DRAIN_PING);
    }

    /// The next request, once read; `None` when the connection is done (the
    /// client closed, or it went away and its streams ended). Writes what is
    /// waiting before it waits.
    pub fn poll_accept(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Accepted, ConnError>>> {
        match self.poll_inner(cx) {
            Poll::Ready(Some(Err(e))) => {
                // Requests read but not handed out were not processed: the
                // GOAWAY names the last one that was, so the client may retry
                // the others.
                let last = self
                    .ready
                    .front()
                    .map_or(self.last, |(_, h)| h.id.saturating_sub(2));
                self.ready.clear();
                // Best effort: the GOAWAY goes with what was queued.
                let mut g = self.shared.lock();
                frame::goaway(&mut g.out, last, e.0);
                let out = g.out.split();
                drop(g);
                let _ = std::pin::Pin::new(&mut self.io).poll_write(cx, &out);
                Poll::Ready(Some(Err(e)))
            }
            other => other,
        }
    }

    /// The next request read, less those the client reset meanwhile (a
    /// HEADERS and its RST_STREAM in one read start no work).
    fn pop_ready(&mut self) -> Option<Accepted> {
        while let Some(a) = self.ready.pop_front() {
            let reset = {
                let g = self.shared.lock();
                g.streams.get(&a.1.id).is_none_or(|s| s.reset.is_some())
            };
            if !reset {
                return Some(a);
            }
        }
        None
    }

    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Accepted, ConnError>>> {
        if let Some(a) = self.pop_ready() {
            return Poll::Ready(Some(Ok(a)));
        }
        loop {
            // Frames already read first.
            let room = self.room();
            if room {
                match self.next_frame() {
                    Err(e) => return Poll::Ready(Some(Err(e))),
                    Ok(Some(Some(accepted))) => {
                        self.ready.push_back(accepted);
                        continue;
                    }
                    Ok(Some(None)) => continue,
                    Ok(None) => {}
                }
                if let Some(a) = self.pop_ready() {
                    return Poll::Ready(Some(Ok(a)));
                }
            }
            // Then out what is waiting.
            let blocked = match self.poll_flush(cx) {
                Err(e) => return Poll::Ready(Some(Err(e))),
                Ok(blocked) => blocked,
            };
            if self.done() {
                return Poll::Ready(None);
            }
            if !self.room() {
                // The client is not reading: wait for the socket to take more
                // (its write is pending, so the task is woken when it can).
                self.shared.lock().polling = false;
                return Poll::Pending;
            }
            if !room {
                // There was no room for the frames already read; there is now.
                continue;
            }
            if self.eof {
                return Poll::Ready(None);
            }
            if self.rbuf.capacity() - self.rbuf.len() < 4096 {
                self.rbuf.reserve(MAX_FRAME + frame::HEADER_LEN);
            }
            match tokio_util::io::poll_read_buf(
                std::pin::Pin::new(&mut self.io),
                cx,
                &mut self.rbuf,
            ) {
                Poll::Ready(Ok(0)) => {
                    self.eof = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(None),
                Poll::Pending => {
                    let mut g = self.shared.lock();
                    match &g.driver {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => g.driver = Some(cx.waker().clone()),
                    }
                    // A handle may have queued since the flush.
                    if !g.out.is_empty() && !blocked {
                        drop(g);
                        continue;
                    }
                    // Under the same lock as the check above: a handle in
                    // another task that queues from here on wakes the task.
                    g.polling = false;
                    return Poll::Pending;
                }
            }
        }
    }

    /// Whether there is room in the write buffer to read more frames.
    fn room(&self) -> bool {
        self.shared.lock().out.len() < OUT_HIGH
    }

    /// Nothing more will come: the connection went away (either side) and its
    /// streams are over, and everything is written.
    fn done(&self) -> bool {
        let g = self.shared.lock();
        (self.going_away || self.peer_away) && g.active == 0 && g.out.is_empty()
    }

    /// Writes what is queued, as far as the socket takes it; whether the
    /// socket is full.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Result<bool, ConnError> {
        let mut g = self.shared.lock();
        let mut blocked = false;
        while !g.out.is_empty() {
            match std::pin::Pin::new(&mut self.io).poll_write(cx, &g.out) {
                Poll::Ready(Ok(0)) => return Err(ConnError(Reason::INTERNAL_ERROR, "write zero")),
                Poll::Ready(Ok(n)) => {
                    g.out.advance(n);
                }
                Poll::Ready(Err(_)) => {
                    return Err(ConnError(Reason::INTERNAL_ERROR, "client socket failed"))
                }
                Poll::Pending => {
                    blocked = true;
                    break;
                }
            }
        }
        if g.out.len() < OUT_HIGH / 2 && !g.out_waiters.is_empty() {
            for w in g.out_waiters.drain(..) {
                w.wake();
            }
        }
        if g.out.is_empty() && g.out.capacity() > 64 * 1024 {
            // Let go of a large buffer once a big response went out.
            g.out = BytesMut::with_capacity(16 * 1024);
        }
        Ok(blocked)
    }

    /// The next complete frame in the read buffer, handled: `Ok(None)` if
    /// there is none, `Ok(Some(Some(_)))` for a request.
    fn next_frame(&mut self) -> Result<Option<Option<Accepted>>, ConnError> {
        if !self.preface {
            if self.rbuf.len() < frame::PREFACE.len() {
                if !frame::PREFACE.starts_with(&self.rbuf) {
                    return Err(ConnError(Reason::PROTOCOL_ERROR, "bad connection preface"));
                }
                return Ok(None);
            }
            if &self.rbuf[..frame::PREFACE.len()] != frame::PREFACE {
                return Err(ConnError(Reason::PROTOCOL_ERROR, "bad connection preface"));
            }
            self.rbuf.advance(frame::PREFACE.len());
            self.preface = true;
        }
        if self.rbuf.len() < frame::HEADER_LEN {
            return Ok(None);
        }
        let h = Head::parse(&self.rbuf);
        if h.len > MAX_FRAME {
            return Err(ConnError(
                Reason::FRAME_SIZE_ERROR,
                "frame larger than SETTINGS_MAX_FRAME_SIZE",
            ));
        }
        if self.rbuf.len() < frame::HEADER_LEN + h.len {
            self.rbuf
                .reserve(frame::HEADER_LEN + h.len - self.rbuf.len());
            return Ok(None);
        }
        self.rbuf.advance(frame::HEADER_LEN);
        let payload = self.rbuf.split_to(h.len).freeze();
        if !self.got_settings {
            if h.kind != frame::SETTINGS || h.flags & frame::ACK != 0 {
                return Err(ConnError(
                    Reason::PROTOCOL_ERROR,
                    "the first frame is not SETTINGS",
                ));
            }
            self.got_settings = true;
        }
        if let Some(p) = &self.block {
            if h.kind != frame::CONTINUATION || h.stream != p.stream {
                return Err(ConnError(
                    Reason::PROTOCOL_ERROR,
                    "a header block interrupted",
                ));
            }
        }
        Ok(Some(match h.kind {
            frame::DATA => {
                self.on_data(h, payload)?;
                None
            }
            frame::HEADERS => self.on_headers(h, payload)?,
            frame::CONTINUATION => self.on_continuation(h, payload)?,
            frame::PRIORITY => {
                if h.stream == 0 {
                    return Err(ConnError(Reason::PROTOCOL_ERROR, "PRIORITY on stream 0"));
                }
                if h.len != 5 {
                    self.shared.lock().reset(h.stream, Reason::FRAME_SIZE_ERROR);
                }
                None
            }
            frame::RST_STREAM => {
                self.on_rst(h, &payload)?;
                None
            }
            frame::SETTINGS => {
                self.on_settings(h, &payload)?;
                None
            }
            frame::PUSH_PROMISE => {
                return Err(ConnError(
                    Reason::PROTOCOL_ERROR,
                    "PUSH_PROMISE from a client",
                ))
            }
            frame::PING => {
                if h.stream != 0 {
                    return Err(ConnError(Reason::PROTOCOL_ERROR, "PING on a stream"));
                }
                if h.len != 8 {
                    return Err(ConnError(Reason::FRAME_SIZE_ERROR, "PING not 8 bytes"));
                }
                if h.flags & frame::ACK == 0 {
                    frame::ping_ack(&mut self.shared.lock().out, &payload);
                } else if self.draining && !self.going_away && payload[..] == DRAIN_PING {
                    self.going_away = true;
                    frame::goaway(&mut self.shared.lock().out, self.last, Reason::NO_ERROR);
                }
                None
            }
            frame::GOAWAY => {
                if h.stream != 0 {
                    return Err(ConnError(Reason::PROTOCOL_ERROR, "GOAWAY on a stream"));
                }
                if h.len < 8 {
                    return Err(ConnError(Reason::FRAME_SIZE_ERROR, "GOAWAY too short"));
                }
                self.peer_away = true;
                None
            }
            frame::WINDOW_UPDATE => {
                self.on_window_update(h, &payload)?;
                None
            }
            // Unknown types are ignored (RFC 9113 §5.5).
            _ => None,
        }))
    }

    fn on_data(&mut self, h: Head, payload: Bytes) -> Result<(), ConnError> {
        if h.stream == 0 {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        if h.stream > self.seen {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "DATA on an idle stream"));
        }
        let data = frame::unpad(h.flags, h.kind, &payload).ok_or(ConnError(
            Reason::PROTOCOL_ERROR,
            "padding longer than the frame",
        ))?;
        let data = payload.slice_ref(data);
        let pad = h.len - data.len();
        let end = h.flags & frame::END_STREAM != 0;
        let mut g = self.shared.lock();
        let g = &mut *g;
        g.conn_recv -= h.len as i64;
        if g.conn_recv < 0 {
            return Err(ConnError(
                Reason::FLOW_CONTROL_ERROR,
                "DATA past the connection window",
            ));
        }
        // What the connection window gets back at once: padding, and data no
        // body will take.
        let mut release = pad;
        let mut stream_error = None;
        match g.streams.get_mut(&h.stream) {
            None => release += data.len(),
            Some(s) if s.reset.is_some() => release += data.len(),
            Some(s) if s.rx_end => {
                release += data.len();
                stream_error = Some(Reason::STREAM_CLOSED);
            }
            Some(s) => {
                s.rx_window -= h.len as i64;
                let over = match s.rx_left.as_mut() {
                    Some(left) if data.len() as u64 > *left => true,
                    Some(left) => {
                        *left -= data.len() as u64;
                        end && *left != 0
                    }
                    None => false,
                };
                if s.rx_window < 0 {
                    release += data.len();
                    stream_error = Some(Reason::FLOW_CONTROL_ERROR);
                } else if over {
                    release += data.len();
                    stream_error = Some(Reason::PROTOCOL_ERROR);
                } else {
                    s.rx_release += pad as u32;
                    if s.body {
                        if pad > 0 || data.len() < SMALL_DATA {
                            s.rx_tail.extend_from_slice(&data);
                        } else {
                            if !s.rx_tail.is_empty() {
                                let tail = s.rx_tail.split().freeze();
                                s.rx.push_back(tail);
                            }
                            s.rx.push_back(data);
                        }
                    } else {
                        release += data.len();
                    }
                    if end {
                        s.rx_end = true;
                    }
                    if let Some(w) = s.rx_waker.take() {
                        w.wake();
                    }
                }
            }
        }
        g.conn_release += release as u32;
        if let Some(r) = stream_error {
            g.error_resets += 1;
            g.reset(h.stream, r);
            if g.error_resets > self.settings.max_error_resets {
                return Err(ConnError(
                    Reason::ENHANCE_YOUR_CALM,
                    "too many stream errors",
                ));
            }
        } else if end {
            g.settle(h.stream);
        }
        g.give_back(h.stream);
        Ok(())
    }

    fn on_headers(&mut self, h: Head, payload: Bytes) -> Result<Option<Accepted>, ConnError> {
        if h.stream == 0 {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "HEADERS on stream 0"));
        }
        let block = frame::unpad(h.flags, h.kind, &payload).ok_or(ConnError(
            Reason::PROTOCOL_ERROR,
            "padding longer than the frame",
        ))?;
        let end_stream = h.flags & frame::END_STREAM != 0;
        if h.flags & frame::END_HEADERS == 0 {
            self.block = Some(Pending {
                stream: h.stream,
                end_stream,
                bytes: BytesMut::from(block),
                frames: 0,
            });
            return Ok(None);
        }
        self.on_block(h.stream, end_stream, block)
    }

    fn on_continuation(&mut self, h: Head, payload: Bytes) -> Result<Option<Accepted>, ConnError> {
        let Some(mut p) = self.block.take() else {
            return Err(ConnError(
                Reason::PROTOCOL_ERROR,
                "CONTINUATION without HEADERS",
            ));
        };
        p.bytes.extend_from_slice(&payload);
        p.frames += 1;
        // Nor empty CONTINUATIONs without end: a client fills its frames.
        if p.frames > self.settings.max_header_list / 1024 + 16 {
            return Err(ConnError(
                Reason::ENHANCE_YOUR_CALM,
                "too many CONTINUATION frames",
            ));
        }
        // A block this much larger than the list it may decode to is not a
        // request anyone sends (the CONTINUATION flood).
        if p.bytes.len() > self.settings.max_header_list.saturating_mul(2) + 16 * 1024 {
            return Err(ConnError(
                Reason::ENHANCE_YOUR_CALM,
                "header block too large",
            ));
        }
        if h.flags & frame::END_HEADERS == 0 {
            self.block = Some(p);
            return Ok(None);
        }
        let bytes = p.bytes.freeze();
        self.on_block(p.stream, p.end_stream, &bytes)
    }

    /// A whole header block: a request, or a stream's trailers.
    fn on_block(
        &mut self,
        id: u32,
        end_stream: bool,
        block: &[u8],
    ) -> Result<Option<Accepted>, ConnError> {
        // Decoded whatever becomes of it: the table must follow the client's.
        let b = hpack::decode(
            &mut self.dec,
            block,
            id <= self.seen,
            self.settings.max_header_list,
        )
        .map_err(|()| ConnError(Reason::COMPRESSION_ERROR, "undecodable header block"))?;
        let mut g = self.shared.lock();
        let g = &mut *g;
        if id <= self.seen {
            // Trailers, on a stream still receiving.
            let Some(s) = g.streams.get_mut(&id) else {
                return Ok(None);
            };
            if s.reset.is_some() {
                return Ok(None);
            }
            let error = if s.rx_end {
                Some(Reason::STREAM_CLOSED)
            } else if !end_stream
                || b.malformed.is_some()
                || b.oversize
                || s.rx_left.is_some_and(|l| l != 0)
            {
                Some(Reason::PROTOCOL_ERROR)
            } else {
                None
            };
            if let Some(r) = error {
                g.error_resets += 1;
                g.reset(id, r);
                return self.calm(g.error_resets);
            }
            s.rx_trailers = Some(b.headers);
            s.rx_end = true;
            if let Some(w) = s.rx_waker.take() {
                w.wake();
            }
            g.settle(id);
            return Ok(None);
        }
        if id.is_multiple_of(2) {
            return Err(ConnError(
                Reason::PROTOCOL_ERROR,
                "a client opened an even stream",
            ));
        }
        self.seen = id;
        if self.going_away || self.peer_away {
            // Past a GOAWAY (either side's): not processed, and said so at
            // once (the client may retry it elsewhere).
            frame::rst_stream(&mut g.out, id, Reason::REFUSED_STREAM);
            return Ok(None);
        }
        self.last = id;
        if g.active >= self.settings.max_streams {
            frame::rst_stream(&mut g.out, id, Reason::REFUSED_STREAM);
            return Ok(None);
        }
        if b.oversize {
            // RFC 9113 §8.2.3's answer: 431, then the stream is done.
            frame::header_block(
                &mut g.out,
                id,
                &[0x08, 0x03, b'4', b'3', b'1'],
                true,
                g.max_send_frame,
            );
            if !end_stream {
                frame::rst_stream(&mut g.out, id, Reason::NO_ERROR);
            }
            return Ok(None);
        }
        let req = match request(b) {
            Ok(r) => r,
            Err(_) => {
                frame::rst_stream(&mut g.out, id, Reason::PROTOCOL_ERROR);
                g.error_resets += 1;
                return self.calm(g.error_resets);
            }
        };
        let Ok(rx_left) = content_length(req.headers()) else {
            frame::rst_stream(&mut g.out, id, Reason::PROTOCOL_ERROR);
            g.error_resets += 1;
            return self.calm(g.error_resets);
        };
        if end_stream && rx_left.is_some_and(|l| l != 0) {
            frame::rst_stream(&mut g.out, id, Reason::PROTOCOL_ERROR);
            g.error_resets += 1;
            return self.calm(g.error_resets);
        }
        g.streams.insert(
            id,
            Slot {
                rx_end: end_stream,
                rx_window: self.settings.stream_window as i64,
                rx_left,
                body: true,
                tx_window: g.init_send,
                handle: true,
                counted: true,
                ..Slot::default()
            },
        );
        g.active += 1;
        let body = RecvBody {
            shared: self.shared.clone(),
            id,
            data_done: false,
        };
        let handle = StreamHandle {
            shared: self.shared.clone(),
            id,
        };
        Ok(Some((req.map(|()| body), handle)))
    }

    fn calm(&self, error_resets: usize) -> Result<Option<Accepted>, ConnError> {
        if error_resets > self.settings.max_error_resets {
            return Err(ConnError(
                Reason::ENHANCE_YOUR_CALM,
                "too many stream errors",
            ));
        }
        Ok(None)
    }

    fn on_rst(&mut self, h: Head, payload: &[u8]) -> Result<(), ConnError> {
        if h.stream == 0 {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "RST_STREAM on stream 0"));
        }
        if h.len != 4 {
            return Err(ConnError(
                Reason::FRAME_SIZE_ERROR,
                "RST_STREAM not 4 bytes",
            ));
        }
        if h.stream > self.seen {
            return Err(ConnError(
                Reason::PROTOCOL_ERROR,
                "RST_STREAM on an idle stream",
            ));
        }
        let reason = Reason::from(be32(payload));
        let mut g = self.shared.lock();
        let Some(s) = g.streams.get_mut(&h.stream) else {
            return Ok(());
        };
        if s.reset.is_some() {
            return Ok(());
        }
        let cut_short = !s.tx_end;
        s.reset = Some(reason);
        s.wake();
        g.settle(h.stream);
        drop(g);
        if cut_short {
            let now = Instant::now();
            if now.duration_since(self.resets.0) > Duration::from_secs(1) {
                self.resets = (now, 0);
            }
            self.resets.1 += 1;
            if self.resets.1 > MAX_RESETS_PER_SECOND {
                return Err(ConnError(
                    Reason::ENHANCE_YOUR_CALM,
                    "too many streams reset",
                ));
            }
        }
        Ok(())
    }

    fn on_settings(&mut self, h: Head, payload: &[u8]) -> Result<(), ConnError> {
        if h.stream != 0 {
            return Err(ConnError(Reason::PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if h.flags & frame::ACK != 0 {
            if h.len != 0 {
                return Err(ConnError(
                    Reason::FRAME_SIZE_ERROR,
                    "SETTINGS ack with a payload",
                ));
            }
            return Ok(());
        }
        if !h.len.is_multiple_of(6) {
            return Err(ConnError(
                Reason::FRAME_SIZE_ERROR,
                "SETTINGS not a multiple of 6 bytes",
            ));
        }
        let mut g = self.shared.lock();
        for s in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([s[0], s[1]]);
            let v = be32(&s[2..]);
            match id {
                frame::SETTINGS_ENABLE_PUSH if v > 1 => {
                    return Err(ConnError(
                        Reason::PROTOCOL_ERROR,
                        "SETTINGS_ENABLE_PUSH not 0 or 1",
                    ))
                }
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    if v as i64 > frame::MAX_WINDOW {
                        return Err(ConnError(
                            Reason::FLOW_CONTROL_ERROR,
                            "SETTINGS_INITIAL_WINDOW_SIZE too large",
                        ));
                    }
                    let delta = v as i64 - g.init_send;
                    g.init_send = v as i64;
                    for s in g.streams.values_mut() {
                        s.tx_window += delta;
                        if s.tx_window > frame::MAX_WINDOW {
                            return Err(ConnError(
                                Reason::FLOW_CONTROL_ERROR,
                                "a stream window past 2^31-1",
                            ));
                        }
                    }
                    g.wake_senders();
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    if !(frame::MIN_MAX_FRAME..=frame::MAX_MAX_FRAME).contains(&v) {
                        return Err(ConnError(
                            Reason::PROTOCOL_ERROR,
                            "SETTINGS_MAX_FRAME_SIZE out of range",
                        ));
                    }
                    g.max_send_frame = v as usize;
                }
                // The encoder uses no dynamic table; the rest are for clients.
                _ => {}
            }
        }
        frame::settings_ack(&mut g.out);
        Ok(())
    }

    fn on_window_update(&mut self, h: Head, payload: &[u8]) -> Result<(), ConnError> {
        if h.len != 4 {
            return Err(ConnError(
                Reason::FRAME_SIZE_ERROR,
                "WINDOW_UPDATE not 4 bytes",
            ));
        }
        let inc = (be32(payload) & 0x7fff_ffff) as i64;
        let mut g = self.shared.lock();
        if h.stream == 0 {
            if inc == 0 {
                return Err(ConnError(Reason::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
            }
            g.conn_send += inc;
            if g.conn_send > frame::MAX_WINDOW {
                return Err(ConnError(
                    Reason::FLOW_CONTROL_ERROR,
                    "connection window past 2^31-1",
                ));
            }
            g.wake_senders();
            return Ok(());
        }
        if h.stream > self.seen {
            return Err(ConnError(
                Reason::PROTOCOL_ERROR,
                "WINDOW_UPDATE on an idle stream",
            ));
        }
        let Some(s) = g.streams.get_mut(&h.stream) else {
            return Ok(());
        };
        if s.closed() {
            return Ok(());
        }
        if inc == 0 {
            g.reset(h.stream, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        s.tx_window += inc;
        if s.tx_window > frame::MAX_WINDOW {
            g.reset(h.stream, Reason::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        if let Some(w) = s.tx_waker.take() {
            w.wake();
        }
        Ok(())
    }
}

impl<T> Drop for Conn<T> {
    fn drop(&mut self) {
        // Handles left (a body read by another task) fail from now on.
        let mut g = self.shared.lock();
        g.gone = Some(Reason::CANCEL);
        for s in g.streams.values_mut() {
            s.wake();
        }
        for w in g.out_waiters.drain(..) {
            w.wake();
        }
    }
}

/// The 32-bit big-endian number a frame's payload starts with (its length was
/// checked).
fn be32(p: &[u8]) -> u32 {
    u32::from_be_bytes([p[0], p[1], p[2], p[3]])
}
