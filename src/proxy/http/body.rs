//! Response bodies, forwarded frame by frame and never collected.
//!
//! [`UpBody`] carries a client's request body upstream: it counts bytes, enforces
//! `max_body_bytes` and the route's `stream_idle_timeout`. [`RespBody`] carries the
//! backend's response to the client: it counts bytes, notes the first body byte
//! (time to first token), enforces `stream_idle_timeout`, drives the HTTP/1.1
//! upstream connection the body comes on (it has no task of its own, see
//! [`super::upstream`]) and hands it back to the pool once the response ended
//! cleanly, and accounts for
//! the exchange when it is dropped ([`super::forward::Exchange`]). [`OutBody`] is
//! what the client gets: that, or a short generated reply.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use tracing::debug;

use super::exchange::Exchange;
use super::h1::RawFields;
use super::request_body::{BodyError, BoxError, IdleTimer};

/// A backend's response body on its way to the client.
pub struct RespBody {
    /// hyper's body (h2c, the WebSocket handshake); `None`: the body is read from
    /// the exchange's HTTP/1.1 connection.
    inner: Option<Incoming>,
    idle: IdleTimer,
    /// Accounts for the exchange on drop; told when the body ended cleanly.
    exchange: Exchange,
    /// The response head's fields as bytes, in place of the response's
    /// `HeaderMap` (for the server fast path: [`RespBody::take_fields`]).
    fields: Option<RawFields>,
}

impl RespBody {
    pub fn new(
        inner: Option<Incoming>,
        idle: Duration,
        mut exchange: Exchange,
        fields: Option<RawFields>,
    ) -> RespBody {
        if source_done(&inner, &exchange) {
            // No body at all (204, 304, Content-Length: 0): done already.
            exchange.complete();
        }
        RespBody {
            inner,
            idle: IdleTimer::new(idle),
            exchange,
            fields,
        }
    }

    /// The client has taken nothing of the body for `stream_idle_timeout` (a
    /// chunk waits to be sent; nothing more is read from the backend meanwhile):
    /// true once that passed, the exchange failed with that reason; else `cx`
    /// is woken when it will have.
    pub fn client_stalled(&mut self, cx: &mut Context<'_>) -> bool {
        if self.exchange.ended() || !self.idle.expired(cx) {
            return false;
        }
        self.exchange.failed("stream_idle_timeout");
        true
    }

    /// The response head's fields as the backend sent them (less hop-by-hop
    /// ones), when they were kept as bytes: written to the client with the
    /// response's `HeaderMap` (which then holds only what flowgate added).
    pub fn take_fields(&mut self) -> Option<RawFields> {
        self.fields.take()
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.exchange.ended() {
            return Poll::Ready(None);
        }
        // From hyper's body, or read from the HTTP/1.1 connection here.
        let r: Poll<Option<Result<Frame<Bytes>, BoxError>>> =
            match (&mut this.inner, &mut this.exchange.upstream) {
                (Some(b), _) => Pin::new(b).poll_frame(cx).map_err(Into::into),
                (None, Some((h, _, _))) => h.conn.poll_frame(cx).map_err(Into::into),
                (None, None) => Poll::Ready(None),
            };
        match r {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle.touch();
                if let Some(d) = frame.data_ref() {
                    this.exchange.body_bytes(d.len());
                }
                // hyper stops polling a body whose length it knows once it has
                // it all: the end is seen here, not as `None`.
                if source_done(&this.inner, &this.exchange) {
                    this.exchange.complete();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                debug!(error = %e, "upstream response body failed");
                this.exchange.failed("backend_error");
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.exchange.complete();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.idle.expired(cx) {
                    this.exchange.failed("stream_idle_timeout");
                    return Poll::Ready(Some(Err(BodyError::Idle(this.idle.after).into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.exchange.ended() || source_done(&self.inner, &self.exchange)
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, &self.exchange.upstream) {
            (Some(b), _) => b.size_hint(),
            (None, Some((h, _, _))) => h.conn.size_hint(),
            (None, None) => SizeHint::with_exact(0),
        }
    }
}

/// Whether all of the response body was read (`inner`, or the exchange's
/// HTTP/1.1 connection).
fn source_done(inner: &Option<Incoming>, exchange: &Exchange) -> bool {
    match (inner, &exchange.upstream) {
        (Some(b), _) => b.is_end_stream(),
        (None, Some((h, _, _))) => h.conn.body_done(),
        (None, None) => true,
    }
}

/// What the client gets.
pub enum OutBody {
    /// A generated reply (an error, mostly), or nothing.
    Full(Option<Bytes>),
    Stream(RespBody),
}

impl OutBody {
    pub fn text(s: &'static str) -> OutBody {
        OutBody::Full(Some(Bytes::from_static(s.as_bytes())))
    }

    /// [`RespBody::client_stalled`]; a generated reply never stalls.
    pub fn client_stalled(&mut self, cx: &mut Context<'_>) -> bool {
        match self {
            OutBody::Full(_) => false,
            OutBody::Stream(s) => s.client_stalled(cx),
        }
    }
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            OutBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            OutBody::Stream(s) => {
                let r = ready!(Pin::new(s).poll_frame(cx));
                Poll::Ready(r)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutBody::Full(b) => b.is_none(),
            OutBody::Stream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            OutBody::Full(None) => SizeHint::with_exact(0),
            OutBody::Stream(s) => s.size_hint(),
        }
    }
}
