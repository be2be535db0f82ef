//! A client's request made ready to go upstream: the two forms it comes in
//! ([`ClientReq`]), its target, hop-by-hop headers, X-Forwarded-*, X-Request-Id,
//! Host or `:authority`: written as an HTTP/1.1 head with those edits
//! ([`encode_h1`], [`super::raw::encode_up`]), or, for hyper's client (an h2c
//! backend, a WebSocket handshake), made on the request's `HeaderMap`
//! ([`prepare`]); and the facts the handler asks of it (close, WebSocket,
//! length, session key).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::Body as _;
use hyper::header::{self, HeaderValue};
use hyper::http::request;
use hyper::{Request, Uri, Version};

use super::exchange::Exchange;
use super::headers;
use super::path;
use super::raw::{self, RawHead};
use super::request_body::{ReqBody, UpBody};
use super::state::ConnCtx;
use super::upstream;
use super::HttpSettings;
use crate::config::{AffinityKey, Xff};

/// A request as the client connection hands it over.
pub enum ClientReq {
    /// From hyper's server: HTTP/2, a body, an upgrade, ...
    Full(Request<ReqBody>),
    /// An HTTP/1.1 request from the server fast path, as read: bodiless, or
    /// with a body it read whole.
    Raw(RawHead),
}

impl ClientReq {
    pub(super) fn uri(&self) -> &Uri {
        match self {
            ClientReq::Full(r) => r.uri(),
            ClientReq::Raw(r) => &r.uri,
        }
    }

    pub(super) fn version(&self) -> Version {
        match self {
            ClientReq::Full(r) => r.version(),
            ClientReq::Raw(r) => r.version,
        }
    }

    /// Whether a `Connection` line lists `token`.
    pub(super) fn connection_lists(&self, token: &str) -> bool {
        match self {
            ClientReq::Full(r) => headers::any_lists(r.headers(), header::CONNECTION, token),
            ClientReq::Raw(r) => r.connection_lists(token.as_bytes()),
        }
    }
}

/// How a hyper request is made ready to go upstream.
pub(super) struct Prepare<'a> {
    pub version: upstream::Version,
    pub normalized: bool,
    pub websocket: bool,
    /// The route's prefix, to strip.
    pub strip_prefix: Option<&'a str>,
    pub stream_idle: Duration,
    pub affinity: Option<&'a AffinityKey>,
}

/// A hyper request as it goes upstream through hyper's client (h2c, the
/// WebSocket handshake): its target, hop-by-hop headers out,
/// X-Forwarded-* and X-Request-Id in, Host or `:authority` for the upstream
/// version; with its session key. `None`: a target that cannot be rebuilt.
pub(super) fn prepare(
    ex: &mut Exchange,
    req: Request<ReqBody>,
    how: &Prepare<'_>,
    http: &HttpSettings,
    ctx: &ConnCtx,
) -> Option<(Request<UpBody>, Option<u64>)> {
    let version = how.version;
    let (mut parts, body) = req.into_parts();
    // The authority as a header value: the client's Host as it came (shared,
    // not copied), or the target's.
    let from_target = parts.uri.authority().is_some();
    let authority = match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => parts.headers.get(header::HOST).cloned(),
    }
    .filter(|v| v.to_str().is_ok());
    // An origin-form target whose path stays as it is goes up as it came.
    let keep_target = version != upstream::Version::H2c
        && !from_target
        && !how.normalized
        && how.strip_prefix.is_none();
    let uri = if keep_target {
        None
    } else {
        let upstream_path = upstream_path(&ex.path, how.strip_prefix);
        let authority = authority.as_ref().and_then(|v| v.to_str().ok());
        Some(build_uri(
            version,
            authority,
            upstream_path,
            parts.uri.query(),
        )?)
    };
    headers::strip_hop_by_hop(&mut parts.headers, how.websocket);
    headers::forwarded(
        &mut parts.headers,
        http.xff,
        &ctx.peer_ip,
        authority.as_ref(),
    );
    ex.request_id = Some(headers::request_id(&mut parts.headers));
    match version {
        upstream::Version::Http1 | upstream::Version::Upgrade => {
            // An HTTP/2 client's :authority, or an absolute-form target's
            // authority, becomes Host (RFC 9112 §3.2.2: it wins over the Host
            // the client sent, and it is what the request was routed by).
            if from_target || !parts.headers.contains_key(header::HOST) {
                if let Some(v) = authority {
                    parts.headers.insert(header::HOST, v);
                }
            }
            parts.version = Version::HTTP_11;
        }
        upstream::Version::H2c => {
            parts.headers.remove(header::HOST);
            parts.version = Version::HTTP_2;
        }
    }
    if let Some(uri) = uri {
        parts.uri = uri;
    }
    let h = &parts.headers;
    let session = how.affinity.and_then(|key| {
        session_key(
            key,
            |n| h.get(n).map(|v| v.as_bytes()),
            h.get_all(header::COOKIE).iter().map(|v| v.as_bytes()),
        )
    });
    let body = UpBody::new(body, how.stream_idle, http.max_body_bytes, ex.up.clone());
    Some((Request::from_parts(parts, body), session))
}

/// A hyper request made ready for an HTTP/1.1 backend ([`prepare_h1`]).
pub(super) struct H1Up {
    /// Its head, as written.
    pub head: Bytes,
    pub head_req: bool,
    /// It may go again on a fresh connection (an idempotent method, no body).
    pub idempotent: bool,
    /// Its body and how the head frames it; `None`: bodiless, or written
    /// after the head (sent in full).
    pub body: Option<(UpBody, raw::Framing)>,
    /// The length of a body written after the head, in `head`.
    pub inline: u64,
    pub session: Option<u64>,
}

/// A hyper request (an h2c client's, one with a body, an absolute-form target)
/// as it goes to an HTTP/1.1 backend: its head written with [`encode_h1`], its
/// body's framing flowgate's (the length hyper checked, else chunked: the
/// client's Content-Length and Transfer-Encoding lines do not go up with a
/// body, so what the head says is what is sent), and its session key.
pub(super) fn prepare_h1(
    ex: &mut Exchange,
    req: Request<ReqBody>,
    how: &Prepare<'_>,
    http: &HttpSettings,
    ctx: &ConnCtx,
) -> H1Up {
    let (parts, body) = req.into_parts();
    // Origin form: the target's path and query as they came, unless normalizing
    // or the route changed the path (an authority in the target goes as Host);
    // an empty path with a query (`http://a?q`, an h2 `:path` of `?q`) is
    // rebuilt: `/?q`.
    let rebuilt;
    let target = match parts.uri.path_and_query().map(|p| p.as_str()) {
        Some(t) if !how.normalized && how.strip_prefix.is_none() && t.starts_with('/') => t,
        _ => {
            rebuilt = with_query(upstream_path(&ex.path, how.strip_prefix), parts.uri.query());
            &rebuilt
        }
    };
    let bodiless = body.is_end_stream();
    let framing = match body.size_hint().exact() {
        _ if bodiless => raw::Framing::None,
        Some(n) => raw::Framing::Length(n),
        None => raw::Framing::Chunked,
    };
    let mut w = BytesMut::new();
    let id = encode_h1(
        &mut w,
        &parts,
        target.as_bytes(),
        framing,
        http.xff,
        &ctx.peer_ip,
    );
    ex.request_id = Some(id);
    let h = &parts.headers;
    // (`host`: the authority the request was routed by, an HTTP/2 client's
    // `:authority` too.)
    let host = parts.uri.authority().map(|a| a.as_str().as_bytes());
    let session = how.affinity.and_then(|key| {
        session_key(
            key,
            |n| match host {
                Some(a) if n.eq_ignore_ascii_case("host") => Some(a),
                _ => h.get(n).map(|v| v.as_bytes()),
            },
            h.get_all(header::COOKIE).iter().map(|v| v.as_bytes()),
        )
    });
    // A body held whole (an h2c client's, all come with its head) goes in the
    // head's write, as the fast path's does.
    let whole = match &body {
        ReqBody::Buffered(b) if http.max_body_bytes.is_none_or(|m| b.len() as u64 <= m) => {
            Some(b.clone())
        }
        _ => None,
    };
    let mut inline = 0;
    let body = if bodiless {
        // All of it goes with the head (first_byte_timeout runs from here).
        ex.up.finish();
        None
    } else if let Some(b) = whole {
        w.extend_from_slice(&b);
        inline = b.len() as u64;
        ex.up.finish();
        None
    } else {
        let body = UpBody::new(body, how.stream_idle, http.max_body_bytes, ex.up.clone());
        Some((body, framing))
    };
    H1Up {
        inline,
        head: w.freeze(),
        head_req: parts.method == hyper::Method::HEAD,
        idempotent: bodiless && parts.method.is_idempotent(),
        body,
        session,
    }
}

/// A hyper request's head as it goes to an HTTP/1.1 backend, written into `w`
/// with the edits [`prepare`] makes on its `HeaderMap` (see [`raw::encode_up`]),
/// without making them: `target` as the request target, the target's authority
/// (absolute form, HTTP/2's `:authority`) as Host, `body` as the framing.
/// Returns the request's id.
pub(super) fn encode_h1(
    w: &mut BytesMut,
    parts: &request::Parts,
    target: &[u8],
    body: raw::Framing,
    xff: Xff,
    ip: &HeaderValue,
) -> HeaderValue {
    let h = &parts.headers;
    let from_target = parts.uri.authority();
    let authority = match from_target {
        Some(a) => Some(a.as_str().as_bytes()),
        None => h
            .get(header::HOST)
            .filter(|v| v.to_str().is_ok())
            .map(HeaderValue::as_bytes),
    };
    let up = raw::UpHead {
        method: &parts.method,
        target,
        authority,
        host_from_target: from_target.is_some(),
        xff,
        ip,
        body,
    };
    let fields = || {
        h.iter().map(|(k, v)| {
            let name = k.as_str().as_bytes();
            (name, v.as_bytes(), raw::Kind::of(name))
        })
    };
    let hop = h.keys().fold(0, |p, k| p | headers::hop_by_hop(k));
    match raw::encode_up(w, &up, fields, hop) {
        Some(v) => HeaderValue::from_bytes(v).unwrap_or_else(|_| headers::new_request_id()),
        None => raw::new_id(w),
    }
}

/// The normalized `path` as it goes upstream: with the route's prefix stripped
/// when it has `strip_prefix`.
pub(super) fn upstream_path<'a>(path: &'a str, strip_prefix: Option<&str>) -> &'a str {
    match strip_prefix {
        Some(prefix) => path::strip(path, prefix),
        None => path,
    }
}

/// `path?query`, or `path`.
pub(super) fn with_query(path: &str, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    }
}

/// The session key of a request under `[pools.affinity]`: the header's value
/// (`header` looks the first up by its lower-case name), or the cookie's (the
/// first with that name among the `cookies` lines). None when absent or empty:
/// the pool's algorithm then picks.
pub(super) fn session_key<'a>(
    key: &AffinityKey,
    header: impl Fn(&str) -> Option<&'a [u8]>,
    mut cookies: impl Iterator<Item = &'a [u8]>,
) -> Option<u64> {
    let value: &[u8] = match key {
        AffinityKey::Header(name) => header(name.as_str())?,
        AffinityKey::Cookie(name) => cookies
            .by_ref()
            .flat_map(|v| v.split(|&c| c == b';'))
            .find_map(|pair| {
                let pair = pair.trim_ascii();
                let (k, v) = pair.split_at(pair.iter().position(|&c| c == b'=')?);
                (k == name.as_bytes()).then(|| &v[1..])
            })?,
    };
    (!value.is_empty()).then(|| crate::balance::affinity::key(value))
}

/// The upstream URI: origin-form for HTTP/1.1, absolute for HTTP/2 (`:authority`).
fn build_uri(
    v: upstream::Version,
    authority: Option<&str>,
    path: &str,
    query: Option<&str>,
) -> Option<Uri> {
    let pq = with_query(path, query);
    match v {
        upstream::Version::Http1 | upstream::Version::Upgrade => pq.parse().ok(),
        upstream::Version::H2c => Uri::builder()
            .scheme("http")
            .authority(authority.unwrap_or("localhost"))
            .path_and_query(pq)
            .build()
            .ok(),
    }
}

/// The request's Content-Length, if it has a valid one.
pub(super) fn content_length(h: &header::HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The client asks to close after this request (`Connection: close`, or HTTP/1.0
/// without `Connection: keep-alive`).
pub(super) fn wants_close(req: &ClientReq) -> bool {
    match req.version() {
        Version::HTTP_10 | Version::HTTP_09 => !req.connection_lists("keep-alive"),
        Version::HTTP_11 => req.connection_lists("close"),
        _ => false,
    }
}

/// An HTTP/1.1 WebSocket handshake.
pub(super) fn is_websocket<B>(req: &Request<B>) -> bool {
    let has = |name, token| headers::any_lists(req.headers(), name, token);
    req.version() == Version::HTTP_11
        && has(header::UPGRADE, "websocket")
        && has(header::CONNECTION, "upgrade")
}
