//! One client connection of an http listener: HTTP/1.1, or h2c with prior
//! knowledge (told apart by the first bytes). Bodiless HTTP/1.1 requests, and
//! those whose `Content-Length` body came whole with the head, are served by
//! the fast path ([`super::serve1`]), the rest by hyper; h2c by
//! [`super::serve2`] on the `h2` crate.
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
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::body::OutBody;
use super::client_io::ClientIo;
use super::forward;
use super::request_body::ReqBody;
use super::serve1;
use super::serve2;
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
    let r: Result<(), Box<dyn std::error::Error + Send + Sync>> = match h2 {
        // Closed, timed out (408 written) or stopped before a request.
        None => Ok(()),
        Some(true) => {
            ctx.state.h2.store(true, Ordering::Relaxed);
            // Boxed: an h2 connection's state is large, and rarer than HTTP/1.1.
            Box::pin(serve2::serve(io, &ctx, &http, &stop, &cut))
                .await
                .map_err(Into::into)
        }
        Some(false) => serve_h1(io, &ctx, &http, &stop, &cut)
            .await
            .map_err(Into::into),
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

/// The request handler hyper calls (HTTP/1.1), one per connection.
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
        // A bodiless request, or one whose body came whole with its head, is
        // served here (serve1.rs); anything else by a
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
