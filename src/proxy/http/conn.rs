//! One client connection of an http listener: HTTP/1.1, or h2c with prior
//! knowledge (told apart by the first bytes). Bodiless HTTP/1.1 requests are
//! served by the fast path ([`super::serve1`]), the rest by hyper.
//!
//! **An idle HTTP/1.1 connection holds only the socket.** Requests run on a
//! hyper connection that is taken apart ([`http1::Connection::into_parts`]) once
//! the client has been quiet for 100 ms (at once after the connection's first
//! request: see [`PARK_AFTER`]); the next request's first byte builds a
//! new one from the socket and any bytes hyper had read ahead. hyper keeps its read and
//! write buffers for a connection's whole life, so a kept-alive client that waits
//! between requests (an SDK's pool) would hold them all the while; this way it
//! holds a socket and a small future.
//!
//! The head and idle deadlines are the socket wrapper's ([`ClientIo`]), since
//! hyper closes a slow head without a word and has no keep-alive idle limit:
//! `header_timeout` runs from accept for the first request and from the first byte
//! of each later one, and an HTTP/1.1 client whose head is incomplete then gets a
//! written 408 before the close; `idle_timeout` closes a connection with nothing in
//! flight. When the listener stops accepting (shutdown, or a reload removed it),
//! HTTP/2 clients get GOAWAY and HTTP/1.1 clients `Connection: close` on their
//! next response (an idle one is closed); the listener's cut ends what is left.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::body::OutBody;
use super::forward;
use super::request_body::ReqBody;
use super::scan::HeadScan;
use super::serve1;
use super::state::{ConnCtx, ConnState};
use super::HttpSettings;
use crate::proxy::tcp::{ListenerSettings, Place};

/// Serves one accepted client of an http listener until it closes.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    place: Place,
    settings: Arc<ListenerSettings>,
) {
    let listener = place.0.clone();
    let Some(http) = settings.http.clone() else {
        return;
    };
    // The source rules, before anything is read.
    let source = match &settings.sources {
        None => None,
        Some(cfg) => match listener.admit(cfg, peer.ip()) {
            Ok(g) => g,
            Err(t) => {
                crate::proxy::tcp::log_rejected(&listener, &settings, peer, t.as_str());
                return;
            }
        },
    };
    let state = Arc::new(ConnState::default());
    state
        .idle_since
        .store(crate::proxy::now_us(), Ordering::Relaxed);
    // Boxed: it moves from this function's state into the serving function's,
    // and a future keeps room for both.
    let mut io = Box::new(ClientIo::new(
        stream,
        state.clone(),
        http.header_timeout,
        settings.idle_timeout,
    ));
    let ctx = Arc::new(ConnCtx {
        listener: listener.clone(),
        peer,
        peer_ip: super::headers::ip_value(peer.ip()),
        state,
        _place: place,
        _source: source,
    });
    let stop = listener.stop_accept.clone();
    let cut = listener.cut.clone();
    let h2 = tokio::select! {
        h2 = io.sniff() => h2,
        _ = stop.cancelled() => None,
        _ = cut.cancelled() => None,
    };
    let r = match h2 {
        // Closed, timed out (408 written) or stopped before a request.
        None => Ok(()),
        Some(true) => {
            ctx.state.h2.store(true, Ordering::Relaxed);
            // Boxed: an h2 connection's state is large, and rarer than HTTP/1.1.
            Box::pin(serve_h2(io, &ctx, &http, &stop, &cut)).await
        }
        Some(false) => serve_h1(io, &ctx, &http, &stop, &cut).await,
    };
    if let Err(e) = r {
        debug!(listener = %listener.name, client = %peer, error = %e, "http connection ended");
    }
}

/// How long an HTTP/1.1 connection stays idle with its hyper connection (and
/// buffers) before it is parked as a bare socket: long enough that a busy client's
/// back-to-back requests do not pay for a new one each, short against an SDK
/// pool's idle minutes. Not after a connection's first request, which parks at
/// once (a busy client pays for one more hyper connection, once).
const PARK_AFTER: Duration = Duration::from_millis(100);

/// What a request handler returns.
type Handled = Pin<Box<dyn Future<Output = Result<Response<OutBody>, Infallible>> + Send>>;

/// The request handler hyper calls, one per connection (h2: per stream).
fn service(
    ctx: &Arc<ConnCtx>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<OutBody>,
    Error = Infallible,
    Future = Handled,
> + Clone {
    let ctx = ctx.clone();
    hyper::service::service_fn(move |req: Request<Incoming>| {
        let ctx = ctx.clone();
        // Boxed: hyper's connection is taken apart between requests, which needs
        // an `Unpin` handler future.
        Box::pin(async move {
            Ok(forward::handle(ctx, forward::ClientReq::Full(req.map(ReqBody::Hyper))).await)
        }) as Handled
    })
}

/// HTTP/1.1: one hyper connection per busy spell, the socket alone in between.
async fn serve_h1(
    mut io: Box<ClientIo>,
    ctx: &Arc<ConnCtx>,
    http: &HttpSettings,
    stop: &CancellationToken,
    cut: &CancellationToken,
) -> hyper::Result<()> {
    // The fast path's read buffer: made for a request and let go after it, so
    // that an idle connection holds none.
    let mut rbuf = BytesMut::new();
    // Made (and registered with their tokens) once for the connection, not per
    // request: each registration takes the token's lock.
    let stopped = stop.cancelled();
    let cancelled = cut.cancelled();
    tokio::pin!(stopped, cancelled);
    loop {
        if io.leftover.is_empty() && rbuf.is_empty() {
            let more = tokio::select! {
                biased;
                more = std::future::poll_fn(|cx| io.poll_request(cx)) => more,
                // Nothing in flight: a stopping listener just closes.
                _ = &mut stopped => false,
                _ = &mut cancelled => false,
            };
            if !more {
                return Ok(());
            }
        }
        // A bodiless request is served here (serve1.rs); anything else by a
        // hyper connection, with the bytes read so far. Boxed: a request's
        // state lives only while it is served; the task that waits between
        // requests stays small.
        let fast = tokio::select! {
            biased;
            f = Box::pin(serve1::serve(&mut io, &mut rbuf, ctx, stop, PARK_AFTER)) => f,
            _ = &mut cancelled => return Ok(()),
        };
        match fast {
            // Closed, failed, or timed out (408 written).
            serve1::Fast::Closed => return Ok(()),
            serve1::Fast::Served(keep) => {
                if !keep {
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut io.stream).await;
                    return Ok(());
                }
                if rbuf.is_empty() {
                    rbuf = BytesMut::new();
                }
                continue;
            }
            serve1::Fast::Hyper => {
                if !io.leftover.is_empty() {
                    rbuf.extend_from_slice(&io.leftover);
                }
                io.leftover = std::mem::take(&mut rbuf).freeze();
            }
        }
        let before = ctx.state.requests.load(Ordering::Acquire);
        // Boxed: the hyper connection is large and lives only while busy; the
        // task that waits between requests stays small.
        let mut conn = Box::new(
            http1::Builder::new()
                .max_buf_size(http.max_header_bytes.max(8192))
                // A client that sent its request and shut down its side still gets
                // the response (as from nginx and HAProxy).
                .half_close(true)
                .keep_alive(true)
                .serve_connection(TokioIo::new(io), service(ctx)),
        );
        let mut shut = false;
        let mut idle_from: Option<Instant> = None;
        // Made when first needed, and gone with the busy spell: a parked
        // connection holds no timer for it.
        let mut park_timer: Option<Pin<Box<Sleep>>> = None;
        let done = std::future::poll_fn(|cx| loop {
            let r = conn.poll_without_shutdown(cx);
            if r.is_ready() || shut {
                return r;
            }
            // Idle for PARK_AFTER (or the listener stops): hyper finishes and
            // hands the socket back instead of waiting for the next request. A
            // busy connection keeps its hyper connection from one request to
            // the next.
            let idle = ctx.state.idle_since_request(before);
            let park = match (idle, idle_from) {
                (false, _) => {
                    idle_from = None;
                    false
                }
                // The connection's first request done and nothing more coming
                // yet: parked at once. An SDK's pooled connection waits long
                // between requests, and a busy client pays for one more hyper
                // connection, once (its requests after that wait PARK_AFTER).
                (true, None) if before == 0 && ctx.state.requests.load(Ordering::Acquire) == 1 => {
                    true
                }
                (true, None) => {
                    let at = Instant::now() + PARK_AFTER;
                    idle_from = Some(at);
                    let t =
                        park_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                    t.as_mut().reset(at);
                    t.as_mut().poll(cx).is_ready()
                }
                (true, Some(_)) => park_timer
                    .as_mut()
                    .is_some_and(|t| t.as_mut().poll(cx).is_ready()),
            };
            // (The stop token takes a lock: looked at only when idle.)
            if park || (idle && stop.is_cancelled()) {
                shut = true;
                Pin::new(&mut *conn).graceful_shutdown();
                continue;
            }
            return r;
        });
        let r = tokio::select! {
            r = done => r,
            _ = &mut cancelled => return Ok(()),
        };
        r?;
        let parts = (*conn).into_parts();
        io = parts.io.into_inner();
        // Read ahead by hyper (a pipelined request): copied, so that hyper's
        // read buffer goes with the connection.
        io.leftover = match parts.read_buf.is_empty() {
            true => Bytes::new(),
            false => Bytes::copy_from_slice(&parts.read_buf),
        };
        if let Some((upstream, idle)) = ctx.state.take_upgrade() {
            let early = std::mem::take(&mut io.leftover);
            // Boxed: a WebSocket tunnel is rare, and its state would otherwise
            // size every connection's task.
            Box::pin(super::tunnel::run(io.stream, early, upstream, idle, cut)).await;
            return Ok(());
        }
        let served = ctx.state.requests.load(Ordering::Acquire) > before;
        if !served || ctx.state.close_after.load(Ordering::Relaxed) || stop.is_cancelled() {
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut io.stream).await;
            return Ok(());
        }
    }
}

/// h2c: one hyper connection for the connection's life; GOAWAY when the listener
/// stops.
async fn serve_h2(
    io: Box<ClientIo>,
    ctx: &Arc<ConnCtx>,
    http: &HttpSettings,
    stop: &CancellationToken,
    cut: &CancellationToken,
) -> hyper::Result<()> {
    let conn = http2::Builder::new(TokioExecutor::new())
        .max_concurrent_streams(http.max_streams_per_connection)
        .max_header_list_size(http.max_header_bytes.min(u32::MAX as usize) as u32)
        .serve_connection(TokioIo::new(io), service(ctx));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = stop.cancelled() => {}
        _ = cut.cancelled() => return Ok(()),
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        r = conn.as_mut() => r,
        _ = cut.cancelled() => Ok(()),
    }
}

/// Future adapter so `Pin<Box<Sleep>>` polls in place.
fn poll_sleep(s: &mut Pin<Box<Sleep>>, cx: &mut Context<'_>) -> bool {
    s.as_mut().poll(cx).is_ready()
}

/// The client socket, with the head and idle deadlines.
pub struct ClientIo {
    stream: TcpStream,
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
    leftover: Bytes,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Deadline {
    Head,
    Idle,
}

/// Written to an HTTP/1.1 client whose head did not arrive in time.
const TIMEOUT_408: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 50\r\nconnection: close\r\n\r\nrequest head not received within header_timeout\r\n";

impl ClientIo {
    fn new(
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
        }
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
    async fn sniff(&mut self) -> Option<bool> {
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
    fn poll_request(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
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
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
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
