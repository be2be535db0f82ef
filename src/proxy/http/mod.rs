//! The L7 mode: `protocol = "http"` listeners. HTTP/1.1 and h2c clients on one
//! port, each request routed by host and path and balanced on its own, upstream
//! connections pooled per backend, bodies streamed frame by frame.
//!
//! - `routes`, `path`: the route table and path normalization (pure).
//! - `conn`: one client connection (HTTP/1.1 or h2c, told apart by the first
//!   bytes; an idle HTTP/1.1 one parked as a bare socket), its head and idle
//!   deadlines, GOAWAY / `Connection: close` when the listener stops;
//!   `client_io`: its socket, with the head and idle deadlines.
//! - `serve1`: the HTTP/1.1 fast path: bodiless requests read and answered
//!   without hyper; anything else goes to hyper's http1 server.
//! - `serve2`: h2c clients, on the `h2` crate directly: a connection's streams
//!   run in its own task.
//! - `forward`: one request: route, pick, connect with retries, send, stream the
//!   response back, account for it (metrics, access log).
//! - `prepare`: the request as it goes upstream (target, headers, session key).
//! - `headers`: hop-by-hop headers, X-Forwarded-*, X-Request-Id.
//! - `raw`: the fast path's request head as read, sent up to an HTTP/1.1
//!   backend as its bytes with those edits (no `HeaderMap`).
//! - `tunnel`: a WebSocket connection after its `101`.
//! - `exchange`: one request's accounting, done when it is dropped.
//! - `body`, `request_body`: the streaming bodies, their idle and size limits.
//! - `state`: what a connection's requests share with its socket wrapper;
//!   `scan`: the Content-Length + Transfer-Encoding check hyper leaves out.
//! - `upstream`: pooled upstream connections per backend.
//!
//! It runs in the TCP listener's accept loops and workers: an http listener is a
//! TCP listener whose settings carry [`HttpSettings`].

mod body;
mod client_io;
mod conn;
mod exchange;
mod forward;
mod h1;
mod h2;
mod headers;
pub mod path;
mod prepare;
mod raw;
mod request_body;
pub mod routes;
mod scan;
mod serve1;
mod serve2;
mod state;
mod tunnel;
mod upstream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Histogram};

use crate::config::{HttpConfig, ListenerConfig, RouteConfig, Xff};
use crate::metrics::names;
use crate::pool::Pool;

pub(crate) use conn::serve;
pub use routes::RouteTable;
pub use upstream::Upstreams;

/// An http listener's settings as of the last (re)load, with the metric handles
/// of its routes and their backends (created here, in the instance's recorder
/// scope).
#[derive(Debug)]
pub struct HttpSettings {
    pub header_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_body_bytes: Option<u64>,
    pub xff: Xff,
    pub max_streams_per_connection: u32,
    pub routes: RouteTable<Arc<Route>>,
    /// Requests no route matches: the listener's pool, or 404.
    pub default: Option<(RouteConfig, Arc<Route>)>,
    /// `flowgate_http_requests_total` of requests that matched no route.
    pub unrouted: Codes,
}

/// Where a route leads, with its metrics.
#[derive(Debug)]
pub struct Route {
    pub pool: Arc<Pool>,
    pub label: Arc<str>,
    /// `flowgate_http_request_duration_seconds{listener,route}`.
    pub duration: Histogram,
    /// `flowgate_http_requests_total` of requests that reached no backend.
    pub no_backend: Codes,
    /// Per backend id (ours, sequential: a plain multiply hashes them).
    pub backends: rustc_hash::FxHashMap<u64, Arc<BackendMetrics>>,
}

/// One counter per status class: 1xx..5xx.
#[derive(Debug, Clone)]
pub struct Codes([Counter; 5]);

impl Codes {
    fn new(listener: &str, route: &str, pool: &str, backend: &str) -> Codes {
        Codes(std::array::from_fn(|i| {
            metrics::counter!(names::HTTP_REQUESTS,
                "listener" => listener.to_string(),
                "route" => route.to_string(),
                "pool" => pool.to_string(),
                "backend" => backend.to_string(),
                "code" => format!("{}xx", i + 1))
        }))
    }

    pub fn count(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.0[class].increment(1);
    }
}

/// Per route and backend.
#[derive(Debug)]
pub struct BackendMetrics {
    pub codes: Codes,
    /// Request sent -> first response body byte (time to first token).
    pub first_byte: Histogram,
    /// Request sent -> response head.
    pub head: Histogram,
}

impl Route {
    fn new(listener: &str, label: &str, pool: Arc<Pool>) -> Route {
        let backends = pool
            .backends()
            .iter()
            .map(|b| {
                let labels = [
                    ("pool", pool.name.to_string()),
                    ("backend", b.name.to_string()),
                ];
                let m = BackendMetrics {
                    codes: Codes::new(listener, label, &pool.name, &b.name),
                    first_byte: metrics::histogram!(names::HTTP_FIRST_BYTE, &labels),
                    head: metrics::histogram!(names::HTTP_HEAD, &labels),
                };
                (b.id, Arc::new(m))
            })
            .collect();
        Route {
            label: label.into(),
            duration: metrics::histogram!(names::HTTP_DURATION,
                "listener" => listener.to_string(), "route" => label.to_string()),
            no_backend: Codes::new(listener, label, &pool.name, ""),
            backends,
            pool,
        }
    }
}

impl HttpSettings {
    /// `pools` are the running pools by name (a route's pool always exists: config
    /// checked it).
    pub fn new(
        l: &ListenerConfig,
        h: &HttpConfig,
        pools: &HashMap<String, Arc<Pool>>,
    ) -> HttpSettings {
        let routes = h
            .routes
            .iter()
            .filter_map(|r| {
                let pool = pools.get(&r.pool)?.clone();
                let label = r.label();
                Some((r.clone(), Arc::new(Route::new(&l.name, &label, pool))))
            })
            .collect();
        let default = l.pool.as_ref().and_then(|p| pools.get(p)).map(|pool| {
            let cfg = RouteConfig {
                host: None,
                path_prefix: "/".into(),
                pool: pool.name.to_string(),
                strip_prefix: false,
                first_byte_timeout: DEFAULT_STREAM_TIMEOUT,
                stream_idle_timeout: DEFAULT_STREAM_TIMEOUT,
            };
            let route = Arc::new(Route::new(&l.name, "default", pool.clone()));
            (cfg, route)
        });
        HttpSettings {
            header_timeout: h.header_timeout,
            max_header_bytes: h.max_header_bytes,
            max_body_bytes: h.max_body_bytes,
            xff: h.xff,
            max_streams_per_connection: h.max_streams_per_connection,
            routes: RouteTable::new(routes),
            default,
            unrouted: Codes::new(&l.name, "", "", ""),
        }
    }

    /// Every pool this listener sends requests to.
    pub fn pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.routes
            .iter()
            .map(|(_, r)| &r.pool)
            .chain(self.default.iter().map(|(_, r)| &r.pool))
    }
}

/// A route's `first_byte_timeout` and `stream_idle_timeout` when not set, and
/// those of the listener's default pool.
const DEFAULT_STREAM_TIMEOUT: Duration = Duration::from_secs(300);
