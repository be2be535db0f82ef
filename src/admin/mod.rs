//! The admin API: JSON over HTTP/1.1 (hyper) on `admin.bind`, on the control runtime.
//!
//! | method | path | |
//! |---|---|---|
//! | GET | / | the status page (one self-contained HTML file, `status.html`) |
//! | GET | /metrics | Prometheus text format (see `crate::metrics`, docs/metrics.md) |
//! | GET | /healthz | 200 while it can serve; 503 shutting down or a pool that would refuse clients |
//! | GET | /api/v1/status | pid, start time, `upgraded_from` (the pid a binary upgrade replaced), version |
//! | GET | /api/v1/pools | pools, algorithms, backends with state and last check |
//! | GET | /api/v1/pools/{pool}, /api/v1/pools/{pool}/backends/{address} | one of them |
//! | POST | /api/v1/pools/{pool}/backends/{address}/drain, /enable, /disable | |
//! | PUT | /api/v1/pools/{pool}/backends/{address}/weight | body `{"weight": N}` |
//! | POST | /api/v1/pools/{pool}/backends | add one: body `{"address": "IP:PORT", "weight": N}` |
//! | DELETE | /api/v1/pools/{pool}/backends/{address} | remove one: it drains |
//! | GET | /api/v1/config | the running config as TOML, runtime changes marked |
//! | POST | /api/v1/reload | re-read the config file |
//! | GET | /api/v1/openapi.json | this API as an OpenAPI 3 document (`openapi.json`) |
//!
//! `{address}` is the backend's address as written in the config, raw or
//! percent-encoded. Errors are `{"error": "..."}` with 400, 401 (with
//! `WWW-Authenticate`), 403, 404, 405 (with `Allow`), 408, 409, 413, 415 or 421.
//! With `admin.token_file`, every POST, PUT and DELETE needs `Authorization: Bearer TOKEN`
//! (compared in constant time), and with `admin.protect_reads` every GET but
//! `/healthz` too. Before that, [`guard`] refuses a foreign `Host` (DNS rebinding)
//! or `Origin` (cross-site requests), a body that is not JSON or that the method
//! does not take; [`server`] bounds connections and time.

mod config_view;
mod guard;
mod server;

use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, LOCATION, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde_json::{json, Value};
use tracing::warn;

use crate::runtime::{OpError, Runtime};

pub use server::{bind, run};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

type Reply = Response<Full<Bytes>>;

/// The OpenAPI 3 description of this API (validated in tests/admin_guard.rs).
const OPENAPI: &str = include_str!("openapi.json");

/// The status page; it polls `GET /api/v1/pools` and draws everything itself.
const STATUS_PAGE: &str = include_str!("status.html");

fn reply(status: StatusCode, body: Value) -> Reply {
    typed(status, "application/json", body.to_string() + "\n")
}

fn typed(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Reply {
    reply(status, json!({ "error": msg.to_string() }))
}

/// 405, with the method the path takes in `Allow`.
fn not_allowed(method: &Method, allow: &'static str) -> Reply {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed here"),
    );
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

/// `cfg` is the `[admin]` the server started with: its checks hold until restart,
/// whatever a reload does (the token alone is re-read).
async fn handle(req: Request<Incoming>, fg: &Runtime, cfg: &crate::config::AdminConfig) -> Reply {
    let timeout = cfg.request_timeout;
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();

    {
        if let Some(r) = guard::refuse_site(req.headers(), cfg) {
            return r;
        }
        if guard::needs_token(&method, &path, cfg) {
            if let Some(token) = fg.admin_token() {
                if !guard::authorized(req.headers(), &token) {
                    let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
                    r.headers_mut().insert(
                        WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer realm=\"flowgate admin\""),
                    );
                    return r;
                }
            }
        }
    }
    let body = match tokio::time::timeout(timeout, guard::read_body(req)).await {
        Ok(Ok(b)) => b,
        Ok(Err(r)) => return r,
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "the request body took too long",
            )
        }
    };

    match (method.clone(), segs.as_slice()) {
        (Method::GET, ["healthz"]) => match unhealthy(fg) {
            Some(reason) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "status": "unavailable", "reason": reason }),
            ),
            None => reply(StatusCode::OK, json!({ "status": "ok" })),
        },
        (Method::GET, ["api", "v1", "status"]) => reply(StatusCode::OK, status_json(fg)),
        (Method::GET, ["api", "v1", "pools"]) => reply(StatusCode::OK, pools_json(fg)),
        (Method::GET, ["api", "v1", "openapi.json"]) => {
            typed(StatusCode::OK, "application/json", OPENAPI)
        }
        (Method::GET, ["api", "v1", "pools", pool]) => match decode(pool) {
            Some(name) => match fg.pool(&name) {
                Some(p) => reply(StatusCode::OK, one_pool(&p)),
                None => error(StatusCode::NOT_FOUND, OpError::NoPool(name)),
            },
            None => error(
                StatusCode::BAD_REQUEST,
                "path is not valid percent-encoded UTF-8",
            ),
        },
        (Method::GET, ["api", "v1", "pools", pool, "backends", addr]) => {
            let (Some(pool), Some(addr)) = (decode(pool), decode(addr)) else {
                return bad_path();
            };
            match fg.pool(&pool) {
                None => error(StatusCode::NOT_FOUND, OpError::NoPool(pool)),
                Some(p) => match p.find(&addr) {
                    Some(b) => reply(StatusCode::OK, one_backend(&b, false)),
                    // A removed backend still draining is listed too.
                    None => match p.retiring().iter().find(|b| *b.name == *addr) {
                        Some(b) => reply(StatusCode::OK, one_backend(b, true)),
                        None => error(
                            StatusCode::NOT_FOUND,
                            OpError::NoBackend {
                                pool,
                                backend: addr,
                            },
                        ),
                    },
                },
            }
        }
        (Method::GET, [""]) => typed(StatusCode::OK, "text/html; charset=utf-8", STATUS_PAGE),
        (Method::GET, ["metrics"]) => match fg.render_metrics() {
            Some(text) => typed(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                text,
            ),
            None => error(StatusCode::SERVICE_UNAVAILABLE, "metrics are not enabled"),
        },
        (Method::GET, ["api", "v1", "config"]) => {
            let (cfg, overrides) = fg.running_config();
            let weight = |pool: &str, b: &str| fg.pool(pool)?.find(b)?.override_weight();
            match config_view::render(&cfg, &overrides, weight) {
                Ok(text) => typed(StatusCode::OK, "application/toml; charset=utf-8", text),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        (Method::POST, ["api", "v1", "pools", pool, "backends"]) => {
            let Some(pool) = decode(pool) else {
                return bad_path();
            };
            let (address, weight) = match parse_new_backend(&body) {
                Ok(b) => b,
                Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
            };
            let r = {
                let (fg, pool, address) = (fg.clone(), pool.clone(), address.clone());
                // A hostname is resolved, and a large weighted pool rebuilt: off the
                // control thread.
                tokio::task::spawn_blocking(move || fg.add_backend(&pool, &address, weight)).await
            };
            match r {
                Ok(Ok(())) => {
                    let body =
                        backend_json(fg, &pool, &address).unwrap_or(json!({ "status": "added" }));
                    let mut r = reply(StatusCode::CREATED, body);
                    let at = format!(
                        "/api/v1/pools/{}/backends/{}",
                        encode(&pool),
                        encode(&address)
                    );
                    if let Ok(v) = HeaderValue::from_str(&at) {
                        r.headers_mut().insert(LOCATION, v);
                    }
                    r
                }
                Ok(Err(e)) => op_error(e),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        (Method::DELETE, ["api", "v1", "pools", pool, "backends", addr]) => {
            let (Some(pool), Some(addr)) = (decode(pool), decode(addr)) else {
                return bad_path();
            };
            let r = {
                let (fg, pool, addr) = (fg.clone(), pool.clone(), addr.clone());
                tokio::task::spawn_blocking(move || fg.remove_backend(&pool, &addr)).await
            };
            match r {
                Ok(Ok(())) => {
                    let retiring = fg
                        .pool(&pool)
                        .and_then(|p| p.retiring().into_iter().find(|b| *b.name == *addr));
                    match retiring {
                        Some(b) => reply(StatusCode::OK, one_backend(&b, true)),
                        None => reply(StatusCode::OK, json!({ "status": "removed" })),
                    }
                }
                Ok(Err(e)) => op_error(e),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        (Method::POST, ["api", "v1", "reload"]) => {
            let fg2 = fg.clone();
            // Reload binds sockets and reads files: keep it off the async thread.
            match tokio::task::spawn_blocking(move || fg2.reload()).await {
                Ok(Ok(())) => reply(StatusCode::OK, json!({ "status": "reloaded" })),
                Ok(Err(e)) => {
                    warn!(error = %e, "reload failed; keeping the running configuration");
                    error(StatusCode::BAD_REQUEST, e)
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        (m, ["api", "v1", "pools", pool, "backends", addr, action]) => {
            let (Some(pool), Some(addr)) = (decode(pool), decode(addr)) else {
                return bad_path();
            };
            let result = match (m, *action) {
                (Method::POST, "drain") => fg.drain(&pool, &addr),
                (Method::POST, "enable") => fg.enable(&pool, &addr),
                (Method::POST, "disable") => fg.disable(&pool, &addr),
                (Method::PUT, "weight") => match parse_weight(&body) {
                    // Rebuilding a large weighted pool's selector takes a while:
                    // off the control thread, so /healthz and probes never wait.
                    Ok(w) => {
                        let (fg, pool, addr) = (fg.clone(), pool.clone(), addr.clone());
                        match tokio::task::spawn_blocking(move || fg.set_weight(&pool, &addr, w))
                            .await
                        {
                            Ok(r) => r,
                            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
                        }
                    }
                    Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
                },
                (_, "weight") => return not_allowed(&method, "PUT"),
                (_, "drain" | "enable" | "disable") => return not_allowed(&method, "POST"),
                _ => return error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
            };
            match result {
                Ok(()) => match backend_json(fg, &pool, &addr) {
                    Some(b) => reply(StatusCode::OK, b),
                    None => reply(StatusCode::OK, json!({ "status": "ok" })),
                },
                Err(e) => op_error(e),
            }
        }
        (_, ["api", "v1", "reload"]) => not_allowed(&method, "POST"),
        (_, ["api", "v1", "pools", _, "backends"]) => not_allowed(&method, "POST"),
        (_, ["api", "v1", "pools", _, "backends", _]) => not_allowed(&method, "GET, DELETE"),
        (_, ["api", "v1", "pools", _]) => not_allowed(&method, "GET"),
        (
            _,
            ["healthz"]
            | ["api", "v1", "pools"]
            | ["api", "v1", "status"]
            | ["api", "v1", "openapi.json"]
            | ["api", "v1", "config"]
            | ["metrics"]
            | [""],
        ) => not_allowed(&method, "GET"),
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

fn bad_path() -> Reply {
    error(
        StatusCode::BAD_REQUEST,
        "path is not valid percent-encoded UTF-8",
    )
}

/// The status an operator action's error is answered with.
fn op_error(e: OpError) -> Reply {
    let status = match e {
        OpError::NoPool(_) | OpError::NoBackend { .. } => StatusCode::NOT_FOUND,
        OpError::BadWeight(_) | OpError::BadBackend(_) => StatusCode::BAD_REQUEST,
        OpError::Conflict(_) => StatusCode::CONFLICT,
        OpError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, e)
}

/// A path segment with what would end it or be decoded escaped (`:` and `.` of
/// an address stay readable).
fn encode(seg: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
        .add(b' ')
        .add(b'"')
        .add(b'#')
        .add(b'%')
        .add(b'/')
        .add(b'?')
        .add(b'[')
        .add(b']');
    percent_encoding::utf8_percent_encode(seg, SEGMENT).to_string()
}

fn decode(seg: &str) -> Option<String> {
    percent_decode_str(seg)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// The body of `POST /api/v1/pools/{pool}/backends`: an address and an optional
/// weight (default 1, as in the file).
fn parse_new_backend(body: &[u8]) -> Result<(String, u32), String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct B {
        address: String,
        weight: Option<i64>,
    }
    let b: B = serde_json::from_slice(body).map_err(|e| {
        format!("malformed JSON: {e}; expected {{\"address\": \"IP:PORT\", \"weight\": N}}")
    })?;
    let weight = b.weight.unwrap_or(1);
    if !(1..=1000).contains(&weight) {
        return Err(format!(
            "weight {weight} is out of range: expected 1..=1000"
        ));
    }
    Ok((b.address.trim().to_string(), weight as u32))
}

fn parse_weight(body: &[u8]) -> Result<u32, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct W {
        weight: i64,
    }
    let w: W = serde_json::from_slice(body)
        .map_err(|e| format!("malformed JSON: {e}; expected {{\"weight\": N}}"))?;
    if !(1..=1000).contains(&w.weight) {
        return Err(format!(
            "weight {} is out of range: expected 1..=1000",
            w.weight
        ));
    }
    Ok(w.weight as u32)
}

fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn one_backend(b: &crate::backend::Backend, retiring: bool) -> Value {
    use crate::backend::ConnectError;
    use std::sync::atomic::Ordering::Relaxed;
    let st = &b.stats;
    let check = b
        .last_check()
        .map(|c| json!({ "ok": c.ok, "at": time(c.at), "detail": c.detail }));
    json!({
        "address": &*b.name,
        "resolved": b.addr.to_string(),
        "hostname": b.hostname.as_deref(),
        "weight": b.base_weight(),
        "effective_weight": b.weight(),
        "state": b.state().as_str(),
        "healthy": b.is_healthy(),
        "active_connections": b.active(),
        "max_connections": b.max_connections(),
        "last_check": check,
        "removed": retiring,
        "connections_total": st.connections.load(Relaxed),
        "connect_errors_total": ConnectError::ALL.iter().map(|e| st.connect_errors[*e as usize].load(Relaxed)).sum::<u64>(),
        "bytes_to_backend": st.bytes_to.load(Relaxed),
        "bytes_from_backend": st.bytes_from.load(Relaxed),
        "checks_ok": st.checks_ok.load(Relaxed),
        "checks_failed": st.checks_failed.load(Relaxed),
        "udp_sessions_active": st.udp_active.load(Relaxed),
        "udp_sessions_total": st.udp_sessions.load(Relaxed),
        "http_requests_total": st.http_requests.load(Relaxed),
        "http_requests_in_flight": st.http_in_flight.load(Relaxed),
    })
}

fn backend_json(fg: &Runtime, pool: &str, addr: &str) -> Option<Value> {
    let b = fg.pool(pool)?.find(addr)?;
    Some(one_backend(&b, false))
}

/// One pool as GET /api/v1/pools lists it (and GET /api/v1/pools/{pool} returns it).
fn one_pool(p: &crate::pool::Pool) -> Value {
    let cfg = p.config();
    let mut backends: Vec<Value> = p
        .backends()
        .iter()
        .map(|b| {
            let mut v = one_backend(b, false);
            if let Some(l) = p.load_view(b) {
                v["load"] = json!({
                    "score": l.score,
                    "in_flight": l.in_flight,
                    "waiting": l.report.map(|r| r.waiting),
                    "running": l.report.map(|r| r.running),
                    "cache": l.report.map(|r| r.cache),
                    "report_age_seconds": l.report_age,
                    "slowness": l.slowness,
                    "first_token_seconds": l.first_token,
                    "slot_time_seconds": l.slot_time,
                    "concurrency": l.concurrency,
                });
            }
            v
        })
        .collect();
    backends.extend(p.retiring().iter().map(|b| one_backend(b, true)));
    json!({
        "name": &*p.name,
        "algorithm": cfg.algorithm.as_str(),
        "when_all_down": cfg.when_all_down.as_str(),
        "all_down": p.all_down(),
        "queue_timeout_ms": cfg.queue_timeout.map(|t| t.as_millis() as u64),
        "queue_length": p.queue.len(),
        "health_check": cfg.health_check.as_ref().map(|h| json!({
            "kind": match h.kind { crate::config::HealthKind::Tcp => "tcp", crate::config::HealthKind::Http => "http" },
            "interval_ms": h.interval.as_millis() as u64,
            "rise": h.rise,
            "fall": h.fall,
        })),
        "backends": backends,
    })
}

/// Why this instance cannot serve now, for `/healthz` (a keepalived `track_script`
/// or a BGP announcer withdraws the address on it): shutting down, or a pool that
/// would refuse a new client (no usable backend; with `when_all_down = "fail-open"`,
/// health aside, none that is not drained or disabled). `None`: it can serve.
/// Listeners are bound before the admin API starts, and stay bound until shutdown.
fn unhealthy(fg: &Runtime) -> Option<String> {
    // After a binary upgrade the new process serves (and holds the admin socket).
    if fg.is_shutting_down() && !fg.handed_over() {
        return Some("shutting down".into());
    }
    let down: Vec<String> = fg
        .pools()
        .iter()
        .filter(|p| !p.can_serve())
        .map(|p| p.name.to_string())
        .collect();
    (!down.is_empty()).then(|| format!("no usable backend in pool {}", down.join(", ")))
}

/// The body of GET /api/v1/status: which process answers, since when, and the
/// one it replaced by a binary upgrade (`null` if none).
fn status_json(fg: &Runtime) -> Value {
    let started = fg
        .started()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    json!({
        "pid": std::process::id(),
        "started": started,
        "upgraded_from": fg.upgraded_from(),
        "version": env!("CARGO_PKG_VERSION"),
        "shutting_down": fg.is_shutting_down(),
        "handed_over": fg.handed_over(),
    })
}

/// The body of GET /api/v1/pools.
pub fn pools_json(fg: &Runtime) -> Value {
    let pools: Vec<Value> = fg.pools().iter().map(|p| one_pool(p)).collect();
    let listeners: Vec<Value> = fg
        .listeners()
        .iter()
        .map(|l| {
            let s = &l.shared;
            let rejected: serde_json::Map<String, Value> = s
                .rejected()
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            let settings = s.settings();
            let routes: Vec<Value> = settings
                .http
                .iter()
                .flat_map(|h| {
                    h.routes.iter().map(|(r, to)| {
                        json!({
                            "host": r.host,
                            "path_prefix": r.path_prefix,
                            "pool": &*to.pool.name,
                            "strip_prefix": r.strip_prefix,
                        })
                    })
                })
                .collect();
            let sni_routes: Vec<Value> = settings
                .sni
                .iter()
                .flat_map(|s| s.routes())
                .map(|r| json!({ "server_names": r.server_names, "pool": &*r.pool.name }))
                .collect();
            json!({
                "name": &*s.name,
                "protocol": if settings.http.is_some() { "http" } else { "tcp" },
                "address": l.local_addr.to_string(),
                "pool": settings.pool_name(),
                "routes": routes,
                "sni_routes": sni_routes,
                "sni_required": settings.sni.as_ref().is_some_and(|s| s.required),
                "active_connections": s.active.load(std::sync::atomic::Ordering::Relaxed),
                "connections_total": s.accepted.load(std::sync::atomic::Ordering::Relaxed),
                "rejected": rejected,
                "sources_tracked": s.sources.len(),
            })
        })
        .collect();
    let udp = fg.udp_listeners().into_iter().map(|l| {
        let s = &l.shared;
        let t = s.totals();
        let dropped: serde_json::Map<String, Value> = t
            .dropped
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let active = s.active.load(std::sync::atomic::Ordering::Relaxed);
        json!({
            "name": &*s.name,
            "protocol": "udp",
            "address": l.local_addr.to_string(),
            "pool": &*s.settings().pool.name,
            "active_connections": active,
            "sessions_active": active,
            "sessions_total": s.sessions.load(std::sync::atomic::Ordering::Relaxed),
            "datagrams_to_backend": t.datagrams_to,
            "datagrams_from_backend": t.datagrams_from,
            "bytes_to_backend": t.bytes_to,
            "bytes_from_backend": t.bytes_from,
            "dropped": dropped,
        })
    });
    let listeners: Vec<Value> = listeners.into_iter().chain(udp).collect();
    json!({ "pools": pools, "listeners": listeners })
}

#[cfg(test)]
mod tests;
