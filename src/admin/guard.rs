//! What a request must show before the admin API acts on it: a `Host` that is the
//! admin address (DNS rebinding), no foreign `Origin` (cross-site requests from a
//! browser), the bearer token where one is needed, `application/json` on a body,
//! and no body where the method takes none. Bodies are read into one bounded
//! buffer within the request deadline.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap};
use hyper::{Method, Request, StatusCode};

use super::{error, Reply, MAX_BODY};
use crate::config::AdminConfig;

/// The refusal of a request whose `Host` is not an IP address, `localhost` or one
/// of `admin.allowed_hosts`, or whose `Origin` is another site than the one it was
/// sent to; `None` when it may go on.
pub(super) fn refuse_site(headers: &HeaderMap, cfg: &AdminConfig) -> Option<Reply> {
    // No Host at all (HTTP/1.0, as HAProxy's `option httpchk` sends by default) is
    // no browser: a rebinding attack always carries one.
    let host = match headers.get(header::HOST) {
        None => return None,
        Some(h) => h.to_str().unwrap_or(""),
    };
    if !host_allowed(host, cfg) {
        return Some(error(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "Host {host:?} is not this admin API's address; add the name to admin.allowed_hosts"
            ),
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let same = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://"))
            .is_some_and(|o| o.eq_ignore_ascii_case(host));
        if !same {
            return Some(error(
                StatusCode::FORBIDDEN,
                "cross-origin requests are refused",
            ));
        }
    }
    None
}

/// Whether `host` (a `Host` header: a name or address, and maybe a port) is one
/// the admin API answers to.
fn host_allowed(host: &str, cfg: &AdminConfig) -> bool {
    let name = match host.strip_prefix('[') {
        // [v6]:port or [v6]
        Some(rest) => match rest.split_once(']') {
            Some((v6, _)) => return v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    };
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost" || cfg.allowed_hosts.contains(&name)
}

/// Whether the request must carry the token: every change, and with
/// `admin.protect_reads` every read but `/healthz` too.
pub(super) fn needs_token(method: &Method, path: &str, cfg: &AdminConfig) -> bool {
    let read = method == Method::GET || method == Method::HEAD;
    !read || (cfg.protect_reads && path != "/healthz")
}

/// `Authorization: Bearer TOKEN` (the scheme in any case), compared in constant
/// time.
pub(super) fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let v = v.as_bytes();
    let Some((scheme, given)) = v.split_at_checked(7) else {
        return false;
    };
    scheme.eq_ignore_ascii_case(b"bearer ")
        && constant_time_eq::constant_time_eq(given, token.as_bytes())
}

/// Whether the request announces a body.
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// Reads the body of a method that takes one into one buffer of at most
/// [`MAX_BODY`] bytes (each frame is copied and let go at once, so a client that
/// dribbles bytes pins no read buffers); refuses a body on a method that takes
/// none, and one that is not JSON.
pub(super) async fn read_body(req: Request<Incoming>) -> Result<Bytes, Reply> {
    let takes_body = req.method() == Method::PUT || req.method() == Method::POST;
    let headers = req.headers();
    if !has_body(headers) {
        return Ok(Bytes::new());
    }
    if !takes_body {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("{} takes no body", req.method()),
        ));
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a request body must be Content-Type: application/json",
        ));
    }
    let too_big = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body over {MAX_BODY} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return Err(too_big());
    }
    let mut body = req.into_body();
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(MAX_BODY));
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| error(StatusCode::BAD_REQUEST, format!("cannot read body: {e}")))?;
        if let Some(data) = frame.data_ref() {
            if buf.len() + data.len() > MAX_BODY {
                return Err(too_big());
            }
            buf.extend_from_slice(data);
        }
    }
    Ok(buf.freeze())
}
