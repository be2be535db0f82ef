//! One request: route it, pick a backend with the pool's algorithm, send it on a
//! pooled or new upstream connection (moving to another backend while nothing was
//! sent), stream the response back, and account for it when it ends.
//!
//! Retries: a connect that fails or times out moves the request to the next
//! backend, up to the pool's `connect_attempts`. A pooled connection that turns
//! out dead before taking the request is replaced once by a fresh one (not counted
//! as an attempt). Once the request may have reached a backend, nothing is retried.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use tokio::time::Instant;
use tracing::debug;

use super::body::{OutBody, RespBody};
use super::exchange::Exchange;
use super::h1::UpError;
use super::headers;
use super::path;
pub use super::prepare::ClientReq;
use super::prepare::{
    content_length, is_websocket, prepare, prepare_h1, session_key, upstream_path, wants_close,
    with_query, Prepare,
};
use super::raw::Framing;
use super::request_body::{BodyError, UpBody, Upload};
use super::state::ConnCtx;
use super::upstream::{self, Sender, H1};
use crate::backend::{ActiveGuard, Backend, ConnectError};
use crate::config::UpstreamProtocol;
use crate::pool::NoSlot;
use crate::proxy::passive_failure;

/// Answers one request (never fails: errors are replies).
pub async fn handle(ctx: Arc<ConnCtx>, mut req: ClientReq) -> Response<OutBody> {
    ctx.state.begin();
    if wants_close(&req) {
        ctx.state.close_after.store(true, Ordering::Relaxed);
    }
    let settings = ctx.listener.settings();
    let mut ex = match &req {
        ClientReq::Full(r) => Exchange::start(
            ctx.clone(),
            r.method().clone(),
            r.version(),
            r.body().is_end_stream(),
        ),
        // (A fast-path body is all read from the client already: whatever the
        // answer, the connection can take the next request.)
        ClientReq::Raw(r) => Exchange::start(ctx.clone(), r.method.clone(), r.version, true),
    };
    let Some(http) = settings.http.clone() else {
        // A reload made this listener plain TCP: finish this connection.
        ex.path = req.uri().path().to_string();
        return ex.reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "listener_changed",
            "the listener no longer serves HTTP\n",
            true,
        );
    };
    ex.http = Some(http.clone());
    // Request smuggling defences hyper leaves to us (RFC 9112 §6.1).
    let number = ctx.state.requests.load(Ordering::Acquire);
    if !ctx.state.h2.load(Ordering::Relaxed) && ctx.state.bad_head.load(Ordering::Acquire) == number
    {
        ex.path = req.uri().path().to_string();
        return ex.reply(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "both Content-Length and Transfer-Encoding\n",
            true,
        );
    }
    // (The fast path takes no request with a Transfer-Encoding, nor CONNECT.)
    if let ClientReq::Full(r) = &req {
        if r.method() == Method::CONNECT {
            // A tunnel to an address the client names: what a forward proxy does,
            // not a balancer (nginx answers 405 too). Its data would otherwise go
            // upstream as a body.
            return ex.reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "bad_request",
                "CONNECT is not supported\n",
                true,
            );
        }
        let codings = r
            .headers()
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .count();
        let only_chunked = r
            .headers()
            .get(header::TRANSFER_ENCODING)
            .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        if codings > 1 || !only_chunked {
            ex.path = r.uri().path().to_string();
            return ex.reply(
                StatusCode::NOT_IMPLEMENTED,
                "bad_request",
                "transfer codings other than chunked are not supported\n",
                true,
            );
        }
    }

    // Route: host, then the normalized path (kept in the exchange, for the log).
    let host_header = match &req {
        ClientReq::Full(r) => r.headers().get(header::HOST).and_then(|v| v.to_str().ok()),
        ClientReq::Raw(r) => r.host().and_then(|v| std::str::from_utf8(v).ok()),
    };
    ex.host = headers::host(req.uri().authority().map(|a| a.as_str()), host_header);
    let raw_path = req.uri().path();
    let normalized = match path::normalize(raw_path) {
        Ok(Some(n)) => {
            ex.path = n;
            true
        }
        Ok(None) => {
            ex.path = raw_path.to_string();
            false
        }
        Err(_) => {
            ex.path = raw_path.to_string();
            return ex.reply(
                StatusCode::BAD_REQUEST,
                "bad_path",
                "bad request path\n",
                true,
            );
        }
    };
    let Some((rc, route)) = http
        .routes
        .find(ex.host.as_deref(), &ex.path)
        .or(http.default.as_ref())
    else {
        return ex.reply(
            StatusCode::NOT_FOUND,
            "no_route",
            "no route for this host and path\n",
            false,
        );
    };
    ex.route = Some(route.clone());
    // The client socket's write limit (`ClientIo`): this request's. An h2c
    // connection's streams share the socket, each watched on its own through
    // its window (serve2), so the socket's limit is the longest of their
    // routes'.
    let write_idle: u64 = rc
        .stream_idle_timeout
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX);
    if ctx.state.h2.load(Ordering::Relaxed) {
        ctx.state
            .write_idle_ms
            .fetch_max(write_idle, Ordering::Relaxed);
    } else {
        ctx.state.write_idle_ms.store(write_idle, Ordering::Relaxed);
    }
    let length = match &req {
        ClientReq::Full(r) => content_length(r.headers()),
        ClientReq::Raw(r) => Some(r.body.len() as u64).filter(|&n| n > 0),
    };
    if let (Some(max), Some(len)) = (http.max_body_bytes, length) {
        if len > max {
            return ex.reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "request body over max_body_bytes\n",
                true,
            );
        }
    }

    // The request as it goes upstream.
    let websocket = matches!(&req, ClientReq::Full(r) if is_websocket(r));
    let version = match (route.pool.config().upstream_protocol, req.version()) {
        _ if websocket => upstream::Version::Upgrade,
        (UpstreamProtocol::Http1, _) => upstream::Version::Http1,
        (UpstreamProtocol::H2c, _) => upstream::Version::H2c,
        (UpstreamProtocol::Auto, Version::HTTP_2) => upstream::Version::H2c,
        (UpstreamProtocol::Auto, _) => upstream::Version::Http1,
    };
    let pool_config = route.pool.config();
    let affinity = pool_config.affinity.as_ref().map(|a| &a.key);
    // The fast path's request: the response's fields come back as bytes too, for
    // serve1 to write as they are.
    let raw_fields = matches!(req, ClientReq::Raw(_));
    // (Assigned, not bound anew: a second binding would be a second place for a
    // request in this function's future, which is moved as it is set up.)
    req = match req {
        ClientReq::Raw(raw)
            if version != upstream::Version::Http1 || raw.uri.authority().is_some() =>
        {
            // An h2c backend, an absolute-form target: as a hyper request.
            match raw.into_request() {
                Some(r) => ClientReq::Full(r),
                None => {
                    return ex.reply(
                        StatusCode::BAD_REQUEST,
                        "bad_path",
                        "bad request target\n",
                        true,
                    )
                }
            }
        }
        req => req,
    };
    let how = Prepare {
        version,
        normalized,
        websocket,
        strip_prefix: rc.strip_prefix.then_some(rc.path_prefix.as_str()),
        stream_idle: rc.stream_idle_timeout,
        affinity,
    };
    // The length of a body written with the head (the fast path's, or an h2c
    // client's that came whole), counted as sent below.
    let mut raw_body = 0u64;
    let (request, session) = match req {
        // The fast path's origin-form request to an HTTP/1.1 backend: its bytes,
        // edited (no `HeaderMap`).
        ClientReq::Raw(raw) => {
            let target = (normalized || rc.strip_prefix)
                .then(|| with_query(upstream_path(&ex.path, how.strip_prefix), raw.uri.query()));
            let mut w = bytes::BytesMut::new();
            ex.request_id = Some(raw.encode_up(&mut w, target.as_deref(), http.xff, &ctx.peer_ip));
            let session = affinity
                .and_then(|key| session_key(key, |n| raw.named(n).next(), raw.named("cookie")));
            // The body, if any, was read whole: it goes right after the head,
            // in the same write, and so all of the request is handed upstream
            // here (first_byte_timeout runs from here, and the connection can
            // be reused after the response).
            w.extend_from_slice(&raw.body);
            raw_body = raw.body.len() as u64;
            ex.up.finish();
            let head_req = raw.method == Method::HEAD;
            // (As for hyper's requests: one with a body is not sent again.)
            let again = raw.method.is_idempotent() && raw.body.is_empty();
            let out = Outgoing::Raw(w.freeze(), head_req, again);
            (out, session)
        }
        // Any other request to an HTTP/1.1 backend: its head is written from
        // its `HeaderMap` with the same edits (no edited copy of the map).
        ClientReq::Full(r) if version == upstream::Version::Http1 => {
            let up = prepare_h1(&mut ex, r, &how, &http, &ctx);
            raw_body = up.inline;
            let out = match up.body {
                None => Outgoing::Raw(up.head, up.head_req, up.idempotent),
                Some((body, framing)) => Outgoing::Body(up.head, up.head_req, body, framing),
            };
            (out, up.session)
        }
        ClientReq::Full(r) => {
            let Some((r, session)) = prepare(&mut ex, r, &how, &http, &ctx) else {
                return ex.reply(
                    StatusCode::BAD_REQUEST,
                    "bad_path",
                    "bad request target\n",
                    true,
                );
            };
            (Outgoing::Req(Box::new(r)), session)
        }
    };
    let upload = ex.up.clone();
    // Every failure before sending leaves the request here (a refusing pooled
    // connection hands it back), so it can go to the next backend as it is.
    let mut request = Some(request);

    // Pick, connect, send.
    let pool = &route.pool;
    let timeout = settings.connect_timeout;
    let upstreams = ctx.listener.ctx.upstreams.clone();
    let mut tried: Vec<Arc<Backend>> = Vec::new();
    let mut sent_to: Option<Attempt> = None;
    let mut full = None;
    for _ in 0..pool.connect_attempts() {
        let guard = match pool.acquire(ctx.peer.ip(), session, &tried).await {
            Ok(g) => g,
            Err(NoSlot::NoBackend) => break,
            Err(why) => {
                full = Some(why);
                break;
            }
        };
        let b = guard.backend().clone();
        ex.ahead = b.active().saturating_sub(1);
        let mut fresh_tries = 0;
        let mut sender = upstreams.pooled(&b, version).await;
        let mut pooled = sender.is_some();
        loop {
            let s = match sender.take() {
                Some(s) => s,
                // Boxed: a new connection's state (connect, handshake) is large
                // and, with pooled connections, rare; it would size every request.
                None => {
                    match Box::pin(upstreams.connect(&b, pool.source(), version, timeout)).await {
                        Ok(s) => {
                            b.stats.connections.fetch_add(1, Ordering::Relaxed);
                            s
                        }
                        Err(e) => {
                            debug!(pool = %pool.name, backend = %b.name, error = %e, "connect failed");
                            b.stats.connect_error(ConnectError::classify(&e));
                            passive_failure(pool, &b, &ctx.listener.ctx.control);
                            break;
                        }
                    }
                }
            };
            let Some(r) = request.take() else { break };
            // A fast-path body counts as sent once a connection takes it.
            ex.up
                .bytes
                .fetch_add(std::mem::take(&mut raw_body), Ordering::Relaxed);
            // A kept-alive connection the backend closed just as this request went
            // out fails after taking it: a bodiless request of an idempotent
            // method (RFC 9110 §9.2.2, as nginx has it: the backend may have acted
            // on a POST before it hung up) goes again on a fresh connection, as
            // the bytes it went as.
            let resendable = pooled
                && fresh_tries == 0
                && match &r {
                    Outgoing::Req(r) => r.method().is_idempotent() && r.body().is_end_stream(),
                    Outgoing::Raw(_, _, again) => *again,
                    Outgoing::Body(..) => false,
                };
            ex.sent = Some(Instant::now());
            let (result, h1) = send(s, r, rc.first_byte_timeout, &upload, raw_fields).await;
            match result {
                Sent::Response(resp) => {
                    sent_to = Some((guard, Ok(resp), h1));
                    break;
                }
                Sent::TimedOut => {
                    if pool
                        .config()
                        .passive
                        .as_ref()
                        .is_some_and(|p| p.first_byte_timeout_ejects)
                    {
                        passive_failure(pool, &b, &ctx.listener.ctx.control);
                    }
                    return ex.reply(
                        StatusCode::GATEWAY_TIMEOUT,
                        "first_byte_timeout",
                        "the backend did not answer in time\n",
                        false,
                    );
                }
                Sent::Refused(back) if pooled && fresh_tries == 0 => {
                    // A dead kept-alive connection: once more on a fresh one.
                    fresh_tries += 1;
                    pooled = false;
                    request = Some(Outgoing::Req(back));
                }
                Sent::Refused(back) => {
                    request = Some(Outgoing::Req(back));
                    passive_failure(pool, &b, &ctx.listener.ctx.control);
                    break;
                }
                Sent::Closed(Some((head, head_req))) if resendable => {
                    debug!(backend = %b.name, "pooled connection closed under the request: once more on a fresh one");
                    fresh_tries += 1;
                    pooled = false;
                    request = Some(Outgoing::Raw(head, head_req, false));
                }
                Sent::Closed(_) => {
                    sent_to = Some((guard, Err(UpError::Closed), None));
                    break;
                }
                Sent::Failed(e) => {
                    sent_to = Some((guard, Err(e), None));
                    break;
                }
            }
        }
        if sent_to.is_some() {
            break;
        }
        tried.push(b);
    }
    let Some((guard, result, h1)) = sent_to else {
        return if full == Some(NoSlot::QueueTimeout) {
            ex.reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_timeout",
                "every backend is at its max_connections: waited queue_timeout for a slot\n",
                false,
            )
        } else if full.is_some() {
            ex.reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "backends_full",
                "every backend is at its max_connections\n",
                false,
            )
        } else if tried.is_empty() {
            ex.reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_backend",
                "no backend available\n",
                false,
            )
        } else {
            ex.reply(
                StatusCode::BAD_GATEWAY,
                "connect_failed",
                "could not connect to a backend\n",
                false,
            )
        };
    };
    ex.retries = tried.len() as u32;
    ex.claim(guard, route);
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            let (status, reason, text) = classify(&e);
            debug!(error = %e, reason, "upstream exchange failed");
            return ex.reply(status, reason, text, true);
        }
    };
    ex.head = ex.since_sent();
    if let (Some(m), Some(h)) = (&ex.backend_metrics, ex.head) {
        m.head.record(h);
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS && !websocket {
        // No upgrade was asked for upstream (only WebSocket's `Upgrade` goes
        // up): a 101 could not be relayed (HTTP/2 has none) or followed. An
        // invalid answer, not a backend that answered well.
        return ex.reply(StatusCode::BAD_GATEWAY, "backend_error", BAD_UPSTREAM, true);
    }
    ex.status = resp.status().as_u16();
    ex.backend_ok();

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // A WebSocket handshake (any other 101 got its 502 above). hyper hands
        // the upgraded socket over from the connection's driver task; the
        // connection's own task takes the client socket over once hyper has
        // written this response (see conn.rs).
        let upstream = hyper::upgrade::on(&mut resp);
        ctx.state.upgrade_to(upstream, rc.stream_idle_timeout);
        let (parts, _) = resp.into_parts();
        ex.complete_now("upgraded");
        return Response::from_parts(parts, OutBody::Full(None));
    }
    // The backend stopped reading the request body (it answered early and
    // closed), or answered before the client had sent all of it (nginx's
    // `return`, an early 413): the rest may never be read, so the client
    // connection closes after this response rather than have its body taken
    // for a request, and the response says so (`Connection: close`), so that
    // the client does not send its next request into a closing connection.
    let cut = h1.as_ref().is_some_and(|h| h.conn.upload_cut())
        || (!ctx.state.h2.load(Ordering::Relaxed) && !ex.up.body_read());
    if cut {
        ctx.state.close_after.store(true, Ordering::Relaxed);
    }
    if let Some(s) = h1 {
        let c = pool.config();
        ex.upstream = Some((s, c.max_idle_per_backend, c.keepalive_timeout));
    }
    let (mut parts, body) = resp.into_parts();
    if body.is_some() {
        // From hyper's client; the HTTP/1.1 client leaves hop-by-hop headers out
        // as it reads them.
        headers::strip_hop_by_hop(&mut parts.headers, false);
    }
    if (cut || ctx.listener.stop_accept.is_cancelled()) && !ctx.state.h2.load(Ordering::Relaxed) {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let idle = rc.stream_idle_timeout;
    let fields = ex
        .upstream
        .as_mut()
        .and_then(|(h, _, _)| h.conn.take_fields());
    Response::from_parts(
        parts,
        OutBody::Stream(RespBody::new(body, idle, ex, fields)),
    )
}

/// Generated replies, as the client gets them.
trait Reply {
    fn reply(
        self,
        status: StatusCode,
        reason: &'static str,
        text: &'static str,
        close: bool,
    ) -> Response<OutBody>;
}

impl Reply for Exchange {
    fn reply(
        self,
        status: StatusCode,
        reason: &'static str,
        text: &'static str,
        close: bool,
    ) -> Response<OutBody> {
        self.answer(status, reason, text, close).map(OutBody::text)
    }
}

/// The backend a request went to, how that went, and (HTTP/1.1) the connection.
type Attempt = (
    ActiveGuard,
    Result<Response<Upstream>, UpError>,
    Option<Box<H1>>,
);

/// A response's body: hyper's (h2c, the WebSocket handshake), or `None` when it
/// is read from the HTTP/1.1 connection the response came on.
type Upstream = Option<Incoming>;

/// The 502's text for a backend's invalid answer (or none).
const BAD_UPSTREAM: &str = "invalid or no response from the backend\n";

/// What a failed exchange is answered with.
fn classify(e: &UpError) -> (StatusCode, &'static str, &'static str) {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(b) = s.downcast_ref::<BodyError>() {
            return match b {
                BodyError::TooLarge(_) => (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "request body over max_body_bytes\n",
                ),
                BodyError::Idle(_) => (
                    StatusCode::REQUEST_TIMEOUT,
                    "stream_idle_timeout",
                    "request body stalled\n",
                ),
                BodyError::Client(_) => (
                    StatusCode::BAD_REQUEST,
                    "bad_request_body",
                    "malformed request body\n",
                ),
            };
        }
        src = s.source();
    }
    (StatusCode::BAD_GATEWAY, "backend_error", BAD_UPSTREAM)
}

/// A request on its way upstream: hyper's type, or, sent again on a fresh
/// connection after a pooled one closed under it, the bytes it went as.
#[allow(clippy::large_enum_variant)] // on one function's stack; `Raw` is rare
enum Outgoing {
    /// Through hyper's client (an h2c backend, a WebSocket handshake). Boxed,
    /// as in [`Sent::Refused`]: a `Request` is twice the size of the other
    /// variants, and every request's future has room for a few of these.
    Req(Box<Request<UpBody>>),
    /// A request's bytes (its head, and a body the fast path read whole with
    /// it), whether it is HEAD, and whether it may go again on a fresh
    /// connection if a pooled one closes under it (a bodiless request of an
    /// idempotent method).
    Raw(bytes::Bytes, bool, bool),
    /// A request with a body, to an HTTP/1.1 backend: its head, whether it is
    /// HEAD, the body, and how the head frames it.
    Body(bytes::Bytes, bool, UpBody, Framing),
}

/// How sending a request went.
enum Sent {
    Response(Response<Upstream>),
    /// The connection refused it before any of it was written: it can go elsewhere.
    Refused(Box<Request<UpBody>>),
    /// It may have reached the backend.
    Failed(UpError),
    /// The HTTP/1.1 connection closed before any byte of the response (with the
    /// bytes of a bodiless request, to send again).
    Closed(Option<(bytes::Bytes, bool)>),
    /// No response head within `first_byte_timeout`.
    TimedOut,
}

/// Sends `req` on `s`; for HTTP/1.1 hands the connection back with the response
/// (its body is read by polling it on).
async fn send(
    s: Sender,
    req: Outgoing,
    first_byte: Duration,
    upload: &Upload,
    raw_fields: bool,
) -> (Sent, Option<Box<H1>>) {
    // first_byte_timeout runs from the request being fully sent: a slow upload is
    // stream_idle_timeout's business.
    let deadline = async {
        upload.finished().await;
        tokio::time::sleep(first_byte).await;
    };
    match s {
        Sender::Http1(mut h) => {
            // The request goes out and its response head comes back in this task.
            match req {
                // (Never: every request to an HTTP/1.1 backend is encoded.)
                Outgoing::Req(_) => return (Sent::Closed(None), None),
                Outgoing::Raw(head, head_req, _) => h.conn.start_raw(head, head_req, raw_fields),
                Outgoing::Body(head, head_req, body, framing) => {
                    h.conn.start_body(head, head_req, body, framing)
                }
            }
            let exchange = std::future::poll_fn(|cx| h.conn.poll_head(cx));
            let r = tokio::select! {
                r = exchange => r,
                _ = deadline => return (Sent::TimedOut, None),
            };
            match r {
                Ok(r) => (Sent::Response(r.map(|()| None)), Some(h)),
                Err(UpError::Closed) => (Sent::Closed(h.conn.take_resend()), None),
                Err(e) => (Sent::Failed(e), None),
            }
        }
        // (Only an HTTP/1.1 connection is ever given its bytes again.)
        _ if !matches!(req, Outgoing::Req(..)) => (Sent::Closed(None), None),
        // Boxed: these exchanges' states are larger than HTTP/1.1's, and would
        // size every request's future (HTTP/1.1 ones too).
        Sender::Upgrade(s) => (
            Box::pin(send_hyper(Hyper::H1(s), req, first_byte, deadline)).await,
            None,
        ),
        Sender::H2(s) => (
            Box::pin(send_hyper(Hyper::H2(s), req, first_byte, deadline)).await,
            None,
        ),
    }
}

/// A hyper client connection.
enum Hyper {
    H1(hyper::client::conn::http1::SendRequest<UpBody>),
    H2(hyper::client::conn::http2::SendRequest<UpBody>),
}

/// [`send`] through hyper: on an h2c connection, or a WebSocket handshake.
async fn send_hyper(
    mut s: Hyper,
    req: Outgoing,
    first_byte: Duration,
    deadline: impl Future<Output = ()>,
) -> Sent {
    // Waiting for a stream slot (the backend's concurrency limit) is bounded by
    // first_byte_timeout too.
    let ready = async {
        match &mut s {
            Hyper::H1(s) => s.ready().await,
            Hyper::H2(s) => s.ready().await,
        }
    };
    let Outgoing::Req(req) = req else {
        return Sent::Closed(None);
    };
    match tokio::time::timeout(first_byte, ready).await {
        Err(_) => return Sent::TimedOut,
        Ok(Err(_)) => return Sent::Refused(req),
        Ok(Ok(())) => {}
    }
    let exchange = async move {
        let r = match &mut s {
            Hyper::H1(s) => s.try_send_request(*req).await,
            Hyper::H2(s) => s.try_send_request(*req).await,
        };
        match r {
            Ok(r) => Sent::Response(r.map(Some)),
            Err(mut e) => match e.take_message() {
                Some(back) => Sent::Refused(Box::new(back)),
                None => Sent::Failed(UpError::Hyper(e.into_error())),
            },
        }
    };
    tokio::select! {
        sent = exchange => sent,
        _ = deadline => Sent::TimedOut,
    }
}
