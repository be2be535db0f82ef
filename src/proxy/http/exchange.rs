//! One request from start to end, accounted for when it is dropped: metrics, the
//! access log, the connection's in-flight count, and the upstream connection
//! handed back to the pool after a clean end.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode, Version};
use tokio::time::Instant;
use tracing::debug;

use super::headers;
use super::request_body::Upload;
use super::state::ConnCtx;
use super::upstream::{Upstreams, H1};
use super::{BackendMetrics, HttpSettings, Route};
use crate::access_log::{Entry, HttpFields};
use crate::backend::ActiveGuard;

/// The route an exchange took (its names and metrics): one reference count.
pub(super) type RouteRef = Arc<Route>;

/// One request from start to end; accounts for it when dropped (the client got
/// the whole response, went away, or an error was answered).
pub struct Exchange(Box<Inner>);

pub struct Inner {
    pub(super) ctx: Arc<ConnCtx>,
    pub(super) http: Option<Arc<HttpSettings>>,
    pub(super) route: Option<RouteRef>,
    pub(super) guard: Option<ActiveGuard>,
    /// flowgate's other requests in flight on the backend when it was picked for
    /// this one (`least-load` learns the first-token time from those that found a
    /// free slot).
    pub(super) ahead: usize,
    /// When the first body byte came ([`crate::load::now_us`]): the request holds
    /// a slot on the backend from then until it is dropped.
    pub(super) in_service: Option<u64>,
    pub(super) backend_metrics: Option<Arc<BackendMetrics>>,
    /// The HTTP/1.1 connection the response comes on: polled with the response
    /// body ([`super::body::RespBody`]), handed back once the response ended
    /// cleanly (with the pool's `max_idle_per_backend` and `keepalive_timeout`).
    pub(super) upstream: Option<(Box<H1>, usize, std::time::Duration)>,
    pub(super) method: Method,
    pub(super) version: Version,
    pub(super) host: Option<String>,
    pub(super) path: String,
    pub(super) request_id: Option<HeaderValue>,
    pub(super) status: u16,
    pub(super) start: Instant,
    pub(super) sent: Option<Instant>,
    pub(super) head: Option<Duration>,
    pub(super) first_body: Option<Duration>,
    /// The request body's progress upstream (counted by [`UpBody`]).
    pub(super) up: Arc<Upload>,
    pub(super) down: u64,
    pub(super) reason: &'static str,
    pub(super) ended: bool,
    /// Backends that failed before the one that took the request.
    pub(super) retries: u32,
}

impl std::ops::Deref for Exchange {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl std::ops::DerefMut for Exchange {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.0
    }
}

impl Exchange {
    pub(super) fn start(
        ctx: Arc<ConnCtx>,
        method: Method,
        version: Version,
        bodiless: bool,
    ) -> Exchange {
        Exchange(Box::new(Inner {
            ctx,
            http: None,
            route: None,
            guard: None,
            ahead: 0,
            in_service: None,
            backend_metrics: None,
            upstream: None,
            method,
            version,
            host: None,
            // Set by the handler (normalized, or as it came).
            path: String::new(),
            request_id: None,
            status: 0,
            start: Instant::now(),
            sent: None,
            head: None,
            first_body: None,
            up: Upload::for_body(bodiless),
            down: 0,
            reason: "client_aborted",
            ended: false,
            retries: 0,
        }))
    }

    /// The request is on `guard`'s backend (counted in flight from now on).
    pub(super) fn claim(&mut self, guard: ActiveGuard, route: &Route) {
        let st = &guard.backend().stats;
        st.http_requests.fetch_add(1, Ordering::Relaxed);
        st.http_in_flight.fetch_add(1, Ordering::Relaxed);
        self.backend_metrics = route.backends.get(&guard.backend().id).cloned();
        self.guard = Some(guard);
    }

    pub(super) fn backend_ok(&self) {
        if let Some(g) = &self.guard {
            g.backend().passive_success();
        }
    }

    /// A generated reply (the text becomes the body); `close` asks HTTP/1.1
    /// clients to close the connection.
    pub(super) fn answer(
        mut self,
        status: StatusCode,
        reason: &'static str,
        text: &'static str,
        close: bool,
    ) -> Response<&'static str> {
        self.status = status.as_u16();
        self.reason = reason;
        self.ended = true;
        let mut r = Response::new(text);
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if close && !self.ctx.state.h2.load(Ordering::Relaxed) {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            self.ctx.state.close_after.store(true, Ordering::Relaxed);
        }
        if let Some(id) = &self.request_id {
            r.headers_mut().insert(&headers::X_REQUEST_ID, id.clone());
        }
        drop(self);
        r
    }

    pub(super) fn complete_now(&mut self, reason: &'static str) {
        self.reason = reason;
        self.ended = true;
    }

    /// Time since the request was fully handed upstream (or, if the response came
    /// before the body was all sent, since sending started).
    pub(super) fn since_sent(&self) -> Option<Duration> {
        match self.up.done_at() {
            Some(t) => Some(Duration::from_micros(
                crate::proxy::now_us().saturating_sub(t),
            )),
            None => self.sent.map(|s| s.elapsed()),
        }
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Response body bytes passed to the client.
    pub fn body_bytes(&mut self, n: usize) {
        if self.first_body.is_none() {
            let fb = self.since_sent();
            if let (Some(m), Some(fb)) = (&self.backend_metrics, fb) {
                m.first_byte.record(fb);
            }
            if let (Some(g), Some(fb)) = (&self.guard, fb) {
                g.backend().load.record_ttfb(fb);
                g.backend().load.record_first_token(self.ahead, fb);
                let at = crate::load::now_us();
                g.backend().load.service_start(at);
                self.in_service = Some(at);
            }
            self.first_body = fb;
        }
        self.down += n as u64;
        if let Some(g) = &self.guard {
            g.backend()
                .stats
                .bytes_from
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// The response ended cleanly: its HTTP/1.1 connection can serve another,
    /// unless the request body is still going up (the backend answered early):
    /// that connection is closed rather than left unpolled mid-upload.
    pub fn complete(&mut self) {
        self.complete_now("complete");
        if let (Some(g), Some(fb), Some(end)) = (&self.guard, self.first_body, self.since_sent()) {
            g.backend().load.record_rest(end.saturating_sub(fb));
        }
        let up = self.0.upstream.take();
        if let (Some((s, max, keepalive)), Some(g)) = (up, &self.0.guard) {
            if self.0.up.done_at().is_some() {
                Upstreams::put_back(g.backend(), s, max, keepalive);
            }
        }
    }

    pub fn failed(&mut self, reason: &'static str) {
        self.reason = reason;
        self.ended = true;
        self.0.upstream = None;
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let i = &mut *self.0;
        let up = i.up.bytes.load(Ordering::Relaxed);
        let duration = i.start.elapsed();
        if let Some(g) = &i.guard {
            if let Some(at) = i.in_service {
                g.backend().load.service_end(at);
            }
            let st = &g.backend().stats;
            st.bytes_to.fetch_add(up, Ordering::Relaxed);
            st.http_in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        if !i.ended && i.ctx.state.write_stalled.load(Ordering::Relaxed) {
            // Not gone: it stopped taking the response (see `ClientIo`).
            i.reason = "stream_idle_timeout";
        }
        // A client gone before the end: what it got is what it got.
        let status = if i.status == 0 { 499 } else { i.status };
        match (&i.route, &i.backend_metrics) {
            (Some(r), Some(m)) => {
                m.codes.count(status);
                r.duration.record(duration);
            }
            (Some(r), None) => {
                r.no_backend.count(status);
                r.duration.record(duration);
            }
            (None, _) => {
                if let Some(h) = &i.http {
                    h.unrouted.count(status);
                }
            }
        }
        debug!(
            listener = %i.ctx.listener.name,
            client = %i.ctx.peer,
            method = %i.method,
            version = ?i.version,
            path = %i.path,
            status,
            route = i.route.as_ref().map_or("", |r| &*r.label),
            pool = i.route.as_ref().map_or("", |r| &*r.pool.name),
            backend = i.guard.as_ref().map_or("", |g| &*g.backend().name),
            reason = i.reason,
            "http request"
        );
        let log = &i.ctx.listener.ctx.access_log;
        if log.enabled() {
            log.log(entry(i, status, up, duration));
        }
        if !i.up.body_read() && !i.ctx.state.h2.load(Ordering::Relaxed) {
            // The request's body was not all read (an error answered before it,
            // a backend that answered early and stopped reading): what is left of
            // it on the connection must never be read as a next request, so the
            // connection closes after this response.
            i.ctx.state.close_after.store(true, Ordering::Relaxed);
        }
        i.ctx.state.end();
    }
}

/// The access-log line of a finished request.
fn entry(i: &Inner, status: u16, up: u64, duration: Duration) -> Entry {
    let backend = i.guard.as_ref().map(|g| g.backend());
    Entry {
        time: SystemTime::now(),
        protocol: "http",
        listener: i.ctx.listener.name.clone(),
        client: i.ctx.peer,
        pool: i
            .route
            .as_ref()
            .map_or_else(|| "-".into(), |r| r.pool.name.clone()),
        backend: backend.map(|b| b.name.clone()),
        backend_addr: backend.map(|b| b.addr),
        retries: i.retries,
        listener_conns: i.ctx.listener.active.load(Ordering::Relaxed) as u32,
        backend_conns: backend.map_or(0, |b| b.active() as u32),
        to_backend: up,
        from_backend: i.down,
        connect: None,
        first_byte: i.first_body,
        duration,
        reason: i.reason,
        sni: None,
        http: Some(Box::new(HttpFields {
            method: i.method.to_string(),
            host: i.host.clone().unwrap_or_else(|| "-".into()),
            path: i.path.clone(),
            version: match i.version {
                Version::HTTP_09 => "HTTP/0.9",
                Version::HTTP_10 => "HTTP/1.0",
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_3 => "HTTP/3",
                _ => "HTTP/1.1",
            },
            status,
            route: i
                .route
                .as_ref()
                .map_or_else(|| "-".into(), |r| r.label.to_string()),
            request_id: i
                .request_id
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string(),
            head: i.head,
        })),
    }
}
