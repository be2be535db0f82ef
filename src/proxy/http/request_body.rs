//! A client's request body on its way upstream: bytes counted, `max_body_bytes`
//! and the route's `stream_idle_timeout` enforced, errors told apart.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How far a request's body has gone upstream, shared by its [`UpBody`] and the
/// exchange.
#[derive(Debug, Default)]
pub struct Upload {
    /// Body bytes passed upstream so far.
    pub bytes: AtomicU64,
    /// When the whole request was handed upstream ([`crate::proxy::now_us`]);
    /// 0 until then.
    done_us: AtomicU64,
    done: tokio::sync::Notify,
    /// The request has no body.
    empty: bool,
}

impl Upload {
    /// A request's progress (`empty`: it has no body).
    pub fn for_body(empty: bool) -> Arc<Upload> {
        Arc::new(Upload {
            empty,
            ..Upload::default()
        })
    }

    /// The request's body was read to its end (or it had none).
    pub fn body_read(&self) -> bool {
        self.empty || self.done_at().is_some()
    }

    /// The whole request was handed upstream (its body's end, or a bodiless
    /// request about to go).
    pub(super) fn finish(&self) {
        if self.done_us.load(Ordering::Relaxed) == 0 {
            self.done_us
                .store(crate::proxy::now_us().max(1), Ordering::Release);
            self.done.notify_waiters();
        }
    }

    /// When the request was fully sent (microseconds on the process clock).
    pub fn done_at(&self) -> Option<u64> {
        match self.done_us.load(Ordering::Acquire) {
            0 => None,
            t => Some(t),
        }
    }

    /// Resolves once the whole request was handed upstream.
    pub async fn finished(&self) {
        crate::tasks::wait_for(&self.done, || self.done_at().is_some()).await
    }
}

/// Why a body stopped early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("no body byte for {0:?} (stream_idle_timeout)")]
    Idle(Duration),
    #[error("request body over max_body_bytes ({0})")]
    TooLarge(u64),
    /// The client's body was malformed (a bad chunk) or cut short (or, h2c,
    /// reset).
    #[error("client body: {0}")]
    Client(BoxError),
}

/// An idle deadline pushed back by every frame. The timer itself is made (and
/// registered) only when the body has to wait: a response that streams straight
/// through never touches the timer wheel.
#[derive(Debug)]
pub(super) struct IdleTimer {
    pub(super) after: Duration,
    /// The last frame (or the start).
    last: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleTimer {
    pub(super) fn new(after: Duration) -> IdleTimer {
        IdleTimer {
            after,
            last: Instant::now(),
            sleep: None,
        }
    }

    pub(super) fn touch(&mut self) {
        self.last = Instant::now();
    }

    /// Whether `after` passed since the last frame; otherwise wakes `cx` then.
    pub(super) fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = self.last + self.after;
        let sleep = match &mut self.sleep {
            Some(s) => {
                if s.deadline() != deadline {
                    s.as_mut().reset(deadline);
                }
                s
            }
            None => self
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        sleep.as_mut().poll(cx).is_ready()
    }
}

/// A client's request body as it came: hyper's (HTTP/1.1), the `h2` crate's
/// (h2c, [`super::serve2`]), or one the HTTP/1.1 fast path ([`super::serve1`])
/// read whole (empty: none).
#[derive(Debug)]
pub enum ReqBody {
    Hyper(Incoming),
    H2(H2Body),
    /// A body the HTTP/1.1 fast path found whole in its read buffer with the
    /// head (taken once; empty after), or none.
    Buffered(Bytes),
}

/// An h2c request's body: its DATA frames (each one's flow-control window given
/// back as it is taken), then its trailers.
#[derive(Debug)]
pub struct H2Body {
    recv: super::h2::RecvBody,
    data_done: bool,
    /// What the request's Content-Length says is left (h2 holds the stream to
    /// it).
    remaining: Option<u64>,
}

impl H2Body {
    pub fn new(recv: super::h2::RecvBody, content_length: Option<u64>) -> H2Body {
        H2Body {
            recv,
            data_done: false,
            remaining: content_length,
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // RFC 9113 §8.1: a reset with NO_ERROR after the response ends the body
        // early without failing it.
        let early_end = |r: h2::Reason| match r {
            h2::Reason::NO_ERROR => None,
            r => Some(Err(h2::Error::from(r).into())),
        };
        if !self.data_done {
            match std::task::ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    if let Some(r) = self.remaining.as_mut() {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(early_end(e)),
                None => self.data_done = true,
            }
        }
        match std::task::ready!(self.recv.poll_trailers(cx)) {
            Ok(t) => Poll::Ready(t.map(|t| Ok(Frame::trailers(t)))),
            Err(e) => Poll::Ready(early_end(e)),
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ReqBody::H2(b) => b.poll_frame(cx),
            ReqBody::Buffered(b) if b.is_empty() => Poll::Ready(None),
            ReqBody::Buffered(b) => Poll::Ready(Some(Ok(Frame::data(std::mem::take(b))))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Hyper(b) => b.is_end_stream(),
            ReqBody::H2(b) => b.recv.is_end_stream(),
            ReqBody::Buffered(b) => b.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Hyper(b) => b.size_hint(),
            ReqBody::H2(b) => b
                .remaining
                .map_or_else(SizeHint::default, SizeHint::with_exact),
            ReqBody::Buffered(b) => SizeHint::with_exact(b.len() as u64),
        }
    }
}

/// A client's request body on its way upstream.
#[derive(Debug)]
pub struct UpBody {
    inner: Option<ReqBody>,
    idle: Option<IdleTimer>,
    limit: Option<u64>,
    /// Progress, shared with the exchange (first_byte_timeout starts at its end).
    upload: Arc<Upload>,
}

impl UpBody {
    pub fn new(inner: ReqBody, idle: Duration, limit: Option<u64>, upload: Arc<Upload>) -> UpBody {
        let empty = inner.is_end_stream();
        if empty {
            upload.finish();
        }
        UpBody {
            inner: (!empty).then_some(inner),
            // A timer only for a body that will move.
            idle: (!empty).then(|| IdleTimer::new(idle)),
            limit,
            upload,
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = this.idle.as_mut() {
                    t.touch();
                }
                if let Some(d) = frame.data_ref() {
                    let total = this
                        .upload
                        .bytes
                        .fetch_add(d.len() as u64, Ordering::Relaxed)
                        + d.len() as u64;
                    if this.limit.is_some_and(|l| total > l) {
                        this.inner = None;
                        return Poll::Ready(Some(Err(BodyError::TooLarge(
                            this.limit.unwrap_or(0),
                        )
                        .into())));
                    }
                }
                // hyper stops polling a body whose length it knows once it has it
                // all: the end is seen here, not as `None`.
                if this.inner.as_ref().is_some_and(|b| b.is_end_stream()) {
                    this.upload.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.inner = None;
                Poll::Ready(Some(Err(BodyError::Client(e).into())))
            }
            Poll::Ready(None) => {
                this.inner = None;
                this.idle = None;
                this.upload.finish();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let expired = match this.idle.as_mut() {
                    Some(t) => t.expired(cx).then_some(t.after),
                    None => None,
                };
                match expired {
                    Some(after) => {
                        this.inner = None;
                        Poll::Ready(Some(Err(BodyError::Idle(after).into())))
                    }
                    None => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(b) => b.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}
