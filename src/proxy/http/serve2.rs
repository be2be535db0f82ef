//! h2c: an HTTP/2 client connection (prior knowledge), served on the `h2` crate
//! directly rather than through hyper's server.
//!
//! The connection's streams run in its own task, polled through a
//! [`FuturesUnordered`] (only the woken ones): no task is spawned, no handler
//! future boxed and no pipe future made per stream, and what a stream sends
//! goes out in the same turn of the connection's task. That was about a fifth of
//! an h2c request's instructions through hyper (docs/performance.md); HAProxy
//! and nginx serve a connection's streams from one task the same way.
//!
//! What hyper's server did is kept: its flow-control windows and buffer sizes,
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
use h2::server::SendResponse;
use h2::{Reason, SendStream};
use hyper::body::Body;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use super::body::OutBody;
use super::client_io::ClientIo;
use super::forward;
use super::prepare::content_length;
use super::request_body::{H2Body, ReqBody};
use super::state::ConnCtx;
use super::HttpSettings;

/// Flow-control windows and buffers as hyper's server sets them: a 1 MiB
/// window per stream and per connection (h2's default of 64 KiB would hold a
/// large upload to one window per round trip), 16 KiB frames, and up to
/// 400 KiB of a stream's response buffered for sending.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONN_WINDOW: u32 = 1024 * 1024;
const MAX_FRAME: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Serves an h2c connection until it ends: GOAWAY when the listener stops
/// accepting (its streams finish), everything dropped when it is cut.
pub(super) async fn serve(
    io: Box<ClientIo>,
    ctx: &Arc<ConnCtx>,
    http: &HttpSettings,
    stop: &CancellationToken,
    cut: &CancellationToken,
) -> Result<(), h2::Error> {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .max_concurrent_streams(http.max_streams_per_connection)
        .max_header_list_size(http.max_header_bytes.min(u32::MAX as usize) as u32);
    let mut cancelled = pin!(cut.cancelled());
    let mut conn = tokio::select! {
        c = builder.handshake::<_, Bytes>(io) => c?,
        _ = &mut cancelled => return Ok(()),
    };
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
    req: Request<h2::RecvStream>,
    reply: SendResponse<Bytes>,
) -> Stream<impl Future<Output = Response<OutBody>>> {
    // (h2 holds the stream's DATA to the first value.)
    let length = content_length(req.headers());
    let req = req.map(|recv| ReqBody::H2(H2Body::new(recv, length)));
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
        reply: SendResponse<Bytes>,
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
                    return pipe.poll(cx).map(|r| {
                        if let Err(e) = r {
                            debug!(error = %e, "h2c response body ended early");
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
fn respond(reply: &mut SendResponse<Bytes>, resp: Response<OutBody>) -> Option<Pipe> {
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
    match reply.send_response(Response::from_parts(parts, ()), end) {
        Ok(send) => (!end).then_some(Pipe {
            send,
            body,
            held: None,
        }),
        Err(e) => {
            debug!(error = %e, "h2c response not sent");
            reply.send_reset(Reason::INTERNAL_ERROR);
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
/// send capacity allows.
struct Pipe {
    send: SendStream<Bytes>,
    body: OutBody,
    /// A chunk taken from the body that waits for send capacity, and whether
    /// the body ended with it.
    held: Option<(Bytes, bool)>,
}

impl Pipe {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), h2::Error>> {
        loop {
            if let Some((data, end)) = self.held.take() {
                while self.send.capacity() == 0 {
                    match self.send.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(0))) => {}
                        Poll::Ready(Some(Ok(_))) => break,
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                        // Reset, or closed under it.
                        Poll::Ready(None) => return Poll::Ready(Err(Reason::CANCEL.into())),
                        Poll::Pending => {
                            self.held = Some((data, end));
                            // A client that stops taking the body (no
                            // WINDOW_UPDATE) holds the backend's response:
                            // cut after stream_idle_timeout, as a stalled
                            // backend is.
                            if self.body.client_stalled(cx) {
                                self.send.send_reset(Reason::CANCEL);
                                return Poll::Ready(Err(Reason::CANCEL.into()));
                            }
                            return self.pending(cx);
                        }
                    }
                }
                self.send.send_data(data, end)?;
                if end {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return self.pending(cx),
                Poll::Ready(None) => return Poll::Ready(self.send.send_data(Bytes::new(), true)),
                Poll::Ready(Some(Err(e))) => {
                    debug!(error = %e, "response body failed: h2c stream reset");
                    self.send.send_reset(reset_reason(&*e));
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Some(Ok(f))) => f,
            };
            match frame.into_data() {
                Ok(data) => {
                    let end = self.body.is_end_stream();
                    if end || data.is_empty() {
                        // The last chunk (or an empty one) is as much as the
                        // stream will ever hold: no capacity to wait for first.
                        self.send.send_data(data, end)?;
                        if end {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    // A claim on the window only once a chunk is in hand (not
                    // speculatively, which could pin window another stream
                    // needs); h2 raises it to the chunk's length as it sends.
                    self.send.reserve_capacity(1);
                    self.held = Some((data, false));
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        self.send.reserve_capacity(0);
                        self.send.send_trailers(trailers)?;
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }

    /// Waiting (for the body, or for capacity): a reset from the client wakes
    /// the stream too, and ends it.
    fn pending(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), h2::Error>> {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => Poll::Ready(Err(reason.into())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}
