//! h2c: an HTTP/2 client connection (prior knowledge), served by flowgate's
//! own HTTP/2 layer ([`super::h2`]).
//!
//! The connection's streams run in its own task, polled through a
//! [`FuturesUnordered`] (only the woken ones): no task is spawned, no handler
//! future boxed and no pipe future made per stream, and what a stream sends
//! goes out in the same turn of the connection's task. That was about a fifth of
//! an h2c request's instructions through hyper (docs/performance.md); HAProxy
//! and nginx serve a connection's streams from one task the same way.
//!
//! What hyper's server did is kept: its flow-control windows,
//! the `Date` header, `Content-Length` from a body whose length is known, a
//! stream whose client resets it dropped (and with it the request), backpressure
//! on a response body through the stream's send capacity, trailers, GOAWAY when
//! the listener stops.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use h2::Reason;
use hyper::body::Body;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use super::body::OutBody;
use super::client_io::ClientIo;
use super::forward;
use super::h2::{Conn, ConnError, RecvBody, Settings, StreamHandle};
use super::prepare::content_length;
use super::request_body::{H2Body, ReqBody};
use super::state::ConnCtx;
use super::HttpSettings;

/// Flow-control windows as hyper's server sets them: 1 MiB per stream and per
/// connection (HTTP/2's default of 64 KiB would hold a large upload to one
/// window per round trip).
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONN_WINDOW: u32 = 1024 * 1024;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// A request body that has all come by the time its handler starts, up to
/// this size, is taken as one piece of bytes rather than streamed.
const MAX_WHOLE_BODY: usize = 64 * 1024;

/// Serves an h2c connection until it ends: GOAWAY when the listener stops
/// accepting (its streams finish), everything dropped when it is cut.
pub(super) async fn serve(
    io: Box<ClientIo>,
    ctx: &Arc<ConnCtx>,
    http: &HttpSettings,
    stop: &CancellationToken,
    cut: &CancellationToken,
) -> Result<(), ConnError> {
    let mut conn = Conn::new(
        io,
        Settings {
            max_streams: http.max_streams_per_connection,
            max_header_list: http.max_header_bytes,
            stream_window: STREAM_WINDOW,
            conn_window: CONN_WINDOW,
            max_error_resets: MAX_LOCAL_ERROR_RESETS,
        },
    );
    let mut cancelled = pin!(cut.cancelled());
    let mut stopped = pin!(stop.cancelled());
    let mut stopping = false;
    let mut streams = FuturesUnordered::new();
    std::future::poll_fn(|cx| {
        if cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        if !stopping && stopped.as_mut().poll(cx).is_ready() {
            stopping = true;
            conn.graceful_shutdown();
        }
        // What the streams queue while polled here goes out with this turn's
        // write: no wake-up needed for it.
        conn.enter();
        loop {
            // The streams first: what they send goes out as the connection is
            // polled next.
            while let Poll::Ready(Some(r)) = streams.poll_next_unpin(cx) {
                let r: Result<(), _> = r;
                if r.is_err() {
                    // (The panic hook has said where.) Its stream is reset as
                    // its future is dropped; the connection's others go on, as
                    // when each stream was a task of its own.
                    error!("an h2c stream's request panicked");
                }
            }
            match conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, reply)))) => {
                    let s = stream(ctx.clone(), req, reply);
                    streams.push(AssertUnwindSafe(s).catch_unwind())
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                // Closed (after GOAWAY, once the streams ended).
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

/// One stream: the request handled, its response sent, the body piped. Ends
/// (and drops the request) if the client resets the stream.
fn stream(
    ctx: Arc<ConnCtx>,
    req: Request<RecvBody>,
    reply: StreamHandle,
) -> Stream<impl Future<Output = Response<OutBody>>> {
    // A body that came whole with its head (a JSON POST, a unary gRPC call)
    // goes on as bytes: to an HTTP/1.1 backend, in the write that carries the
    // head.
    let (parts, mut recv) = req.into_parts();
    let body = match recv.take_whole(MAX_WHOLE_BODY) {
        Some(b) => ReqBody::Buffered(b),
        None => ReqBody::H2(H2Body::new(recv, content_length(&parts.headers))),
    };
    let req = Request::from_parts(parts, body);
    Stream {
        reply,
        state: State::Handling {
            handled: forward::handle(ctx, forward::ClientReq::Full(req)),
        },
    }
}

pin_project_lite::pin_project! {
    /// A stream's future, written out rather than an `async fn`: it holds the
    /// handler's future once (an `async fn` keeps its arguments and their moved
    /// copies beside it), and it is moved three times on its way into the
    /// connection's set of streams.
    struct Stream<F> {
        reply: StreamHandle,
        #[pin]
        state: State<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Handling { #[pin] handled: F },
        Piping { pipe: Pipe },
    }
}

impl<F: Future<Output = Response<OutBody>>> Future for Stream<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut me = self.project();
        loop {
            let next = match me.state.as_mut().project() {
                StateProj::Piping { pipe } => {
                    return pipe.poll(me.reply, cx).map(|r| {
                        if let Err(e) = r {
                            debug!(reason = ?e, "h2c response body ended early");
                        }
                    })
                }
                StateProj::Handling { handled } => {
                    let Poll::Ready(resp) = handled.poll(cx) else {
                        // A client's RST_STREAM cancels the request.
                        return match me.reply.poll_reset(cx) {
                            Poll::Ready(_) => {
                                debug!("h2c stream reset by the client");
                                Poll::Ready(())
                            }
                            Poll::Pending => Poll::Pending,
                        };
                    };
                    match respond(me.reply, resp) {
                        Some(pipe) => State::Piping { pipe },
                        None => return Poll::Ready(()),
                    }
                }
            };
            me.state.set(next);
        }
    }
}

/// Sends a response's head; the body to pipe, if it has one.
fn respond(reply: &mut StreamHandle, resp: Response<OutBody>) -> Option<Pipe> {
    let (mut parts, body) = resp.into_parts();
    if !parts.headers.contains_key(header::DATE) {
        let date = super::headers::with_date(HeaderValue::from_bytes);
        if let Ok(d) = date {
            parts.headers.insert(header::DATE, d);
        }
    }
    let end = body.is_end_stream();
    if !end && !parts.headers.contains_key(header::CONTENT_LENGTH) {
        if let Some(n) = body.size_hint().exact() {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
    match reply.send_response(parts.status, &parts.headers, end) {
        Ok(()) => (!end).then_some(Pipe { body, held: None }),
        Err(reason) => {
            debug!(?reason, "h2c response not sent");
            None
        }
    }
}

/// The reason a failed response body resets the client's stream with: an h2c
/// backend's own reset reason (a cancelled gRPC call stays CANCEL), else
/// INTERNAL_ERROR.
fn reset_reason(e: &(dyn std::error::Error + 'static)) -> Reason {
    let mut src = Some(e);
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<h2::Error>().and_then(h2::Error::reason) {
            return r;
        }
        src = s.source();
    }
    Reason::INTERNAL_ERROR
}

/// A response body on its way into a stream, frame by frame, as the stream's
/// flow-control windows allow.
struct Pipe {
    body: OutBody,
    /// A chunk taken from the body that is still (partly) to be sent, and
    /// whether the body ended with it.
    held: Option<(Bytes, bool)>,
}

impl Pipe {
    fn poll(&mut self, send: &mut StreamHandle, cx: &mut Context<'_>) -> Poll<Result<(), Reason>> {
        loop {
            if let Some((mut data, end)) = self.held.take() {
                match send.poll_send_data(cx, &mut data, end) {
                    Poll::Ready(Ok(())) if end => return Poll::Ready(Ok(())),
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(r)) => return Poll::Ready(Err(r)),
                    Poll::Pending => {
                        self.held = Some((data, end));
                        // A client that stops taking the body (no
                        // WINDOW_UPDATE) holds the backend's response: cut
                        // after stream_idle_timeout, as a stalled backend is.
                        if self.body.client_stalled(cx) {
                            send.send_reset(Reason::CANCEL);
                            return Poll::Ready(Err(Reason::CANCEL));
                        }
                        return Poll::Pending;
                    }
                }
            }
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                // (A reset from the client wakes the stream through its
                // handle, and the next send fails.)
                Poll::Pending => return pending(send, cx),
                Poll::Ready(None) => {
                    self.held = Some((Bytes::new(), true));
                    continue;
                }
                Poll::Ready(Some(Err(e))) => {
                    debug!(error = %e, "response body failed: h2c stream reset");
                    send.send_reset(reset_reason(&*e));
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Some(Ok(f))) => f,
            };
            match frame.into_data() {
                Ok(data) => {
                    let end = self.body.is_end_stream();
                    if data.is_empty() && !end {
                        continue;
                    }
                    self.held = Some((data, end));
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        send.send_trailers(&trailers)?;
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }
}

/// Waiting for the body: a reset from the client ends the stream.
fn pending(send: &mut StreamHandle, cx: &mut Context<'_>) -> Poll<Result<(), Reason>> {
    match send.poll_reset(cx) {
        Poll::Ready(r) => Poll::Ready(Err(r)),
        Poll::Pending => Poll::Pending,
    }
}
