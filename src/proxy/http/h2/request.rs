//! A request from its decoded head (RFC 9113 §8.3).

use hyper::header::HeaderMap;
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Method, Request, Uri, Version};

use super::hpack;

/// A request's Content-Length; `Err` if a value is not all digits, or two
/// differ (RFC 9110 §8.6; the stream is reset).
pub(super) fn content_length(h: &HeaderMap) -> Result<Option<u64>, ()> {
    let mut n = None;
    for v in h.get_all(hyper::header::CONTENT_LENGTH) {
        let b = v.as_bytes();
        if b.is_empty() || b.len() > 18 || !b.iter().all(u8::is_ascii_digit) {
            return Err(());
        }
        let x = b.iter().fold(0u64, |a, d| a * 10 + (d - b'0') as u64);
        if n.is_some_and(|m| m != x) {
            return Err(());
        }
        n = Some(x);
    }
    Ok(n)
}

/// A request from a decoded block; `Err` if it is malformed.
pub(super) fn request(b: hpack::Block) -> Result<Request<()>, &'static str> {
    if let Some(m) = b.malformed {
        return Err(m);
    }
    let method = b.method.ok_or("no :method")?;
    let method = Method::from_bytes(&method).map_err(|_| "bad :method")?;
    let mut parts = hyper::http::uri::Parts::default();
    if method == Method::CONNECT {
        if b.scheme.is_some() || b.path.is_some() {
            return Err("CONNECT with :scheme or :path");
        }
        let a = b.authority.ok_or("CONNECT without :authority")?;
        parts.authority = Some(Authority::from_maybe_shared(a).map_err(|_| "bad :authority")?);
    } else {
        let scheme = b.scheme.ok_or("no :scheme")?;
        let path = b.path.ok_or("no :path")?;
        if path.is_empty() {
            return Err("empty :path");
        }
        let scheme = match &scheme[..] {
            b"http" => Scheme::HTTP,
            b"https" => Scheme::HTTPS,
            s => Scheme::try_from(s).map_err(|_| "bad :scheme")?,
        };
        // Without :authority (the Host field names the host) the scheme is
        // left out: a Uri has none without an authority.
        if let Some(a) = b.authority {
            parts.authority = Some(Authority::from_maybe_shared(a).map_err(|_| "bad :authority")?);
            parts.scheme = Some(scheme);
        }
        parts.path_and_query =
            Some(PathAndQuery::from_maybe_shared(path).map_err(|_| "bad :path")?);
    }
    let uri = Uri::from_parts(parts).map_err(|_| "bad request target")?;
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
    *req.headers_mut() = b.headers;
    Ok(req)
}
