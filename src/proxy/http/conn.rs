//! One client connection of an http listener: HTTP/1.1 and h2c (prior knowledge)
//! on one port through hyper-util's `auto` server, with the head and idle
//! deadlines kept by the socket wrapper ([`ClientIo`]), since hyper closes a slow
//! head without a word and has no keep-alive idle limit.
//!
//! `header_timeout` runs from accept for the first request and from the first byte
//! of each later one; an HTTP/1.1 client whose head is incomplete then gets a
//! written 408 before the close. `idle_timeout` closes a connection with no request
//! in flight. When the listener stops accepting (shutdown, or a reload removed it),
//! HTTP/2 clients get GOAWAY and HTTP/1.1 clients `Connection: close` on their
//! next response; the listener's cut ends what is left.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tracing::debug;

use super::body::OutBody;
use super::forward;
use super::scan::HeadScan;
use super::state::{ConnCtx, ConnState};
use crate::proxy::tcp::{ListenerSettings, Place};

/// Serves one accepted client of an http listener until it closes.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    place: Place,
    settings: Arc<ListenerSettings>,
) {
    let listener = &place.0.clone();
    let Some(http) = settings.http.clone() else {
        return;
    };
    let state = Arc::new(ConnState::default());
    state
        .idle_since
        .store(crate::proxy::now_us(), Ordering::Relaxed);
    let io = ClientIo::new(
        stream,
        state.clone(),
        http.header_timeout,
        settings.idle_timeout,
    );
    let ctx = Arc::new(ConnCtx {
        listener: listener.clone(),
        peer,
        state,
        _place: place,
    });
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ctx = ctx.clone();
        async move { Ok::<Response<OutBody>, std::convert::Infallible>(forward::handle(ctx, req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(http.max_header_bytes.max(8192))
        // A client that sent its request and shut down its side still gets the
        // response (as from nginx and HAProxy).
        .half_close(true)
        .keep_alive(true);
    builder
        .http2()
        .max_concurrent_streams(http.max_streams_per_connection)
        .max_header_list_size(http.max_header_bytes.min(u32::MAX as usize) as u32);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let stop = listener.stop_accept.clone();
    let cut = listener.cut.clone();
    let r = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = stop.cancelled() => None,
        _ = cut.cancelled() => return,
    };
    let r = match r {
        Some(r) => r,
        None => {
            // GOAWAY for HTTP/2; HTTP/1.1 closes once the response in flight ends.
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                _ = cut.cancelled() => return,
            }
        }
    };
    if let Err(e) = r {
        debug!(listener = %listener.name, client = %peer, error = %e, "http connection ended");
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
    first_read: bool,
    scan: HeadScan,
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
            first_read: true,
            scan: HeadScan::new(),
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
        let ago = Duration::from_micros(crate::proxy::now_us().saturating_sub(idle_us));
        let since = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now);
        Some((since + self.idle_timeout, Deadline::Idle))
    }

    /// Bytes arrived: with nothing in flight, an HTTP/1.1 head starts.
    fn arrived(&mut self, bytes: &[u8]) {
        if self.first_read {
            self.first_read = false;
            if bytes.starts_with(b"PRI ") {
                self.state.h2.store(true, Ordering::Relaxed);
            }
        }
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
            self.scan.resync(requests + 1);
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let filled = &buf.filled()[before..];
                    let mut first = [0u8; 4];
                    let n = filled.len().min(4);
                    first[..n].copy_from_slice(&filled[..n]);
                    this.arrived(&first[..n]);
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
        let Some((when, kind)) = this.deadline() else {
            return Poll::Pending;
        };
        if this.armed != Some(when) {
            this.sleep.as_mut().reset(when);
            this.armed = Some(when);
        }
        if !poll_sleep(&mut this.sleep, cx) {
            return Poll::Pending;
        }
        if kind == Deadline::Head && !this.state.h2.load(Ordering::Relaxed) {
            // Best effort: a client that reads nothing just gets the close.
            let _ = this.stream.try_write(TIMEOUT_408);
        }
        // End of stream: hyper closes the connection.
        Poll::Ready(Ok(()))
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
