//! Header work on the way through: hop-by-hop headers out (RFC 9110 §7.6.1),
//! X-Forwarded-For/-Proto/-Host per `xff`, an X-Request-Id on every request, and
//! the request's host for routing.

use std::net::IpAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::Xff;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Which hop-by-hop names a head carries (one pass over its names; a bit each).
pub(super) const CONNECTION: u8 = 1;
pub(super) const TE: u8 = 2;
pub(super) const UPGRADE: u8 = 4;
pub(super) const TRANSFER_ENCODING: u8 = 8;
const KEEP_ALIVE: u8 = 16;
const HTTP2_SETTINGS: u8 = 32;
const PROXY: u8 = 64;

/// Which hop-by-hop header `k` is (a bit of those above), or 0.
pub(super) fn hop_by_hop(k: &HeaderName) -> u8 {
    hop_by_hop_name(k.as_str().as_bytes())
}

/// [`hop_by_hop`] for a name as it came (any case).
pub(super) fn hop_by_hop_name(n: &[u8]) -> u8 {
    let is = |s: &str| n.eq_ignore_ascii_case(s.as_bytes());
    match n.len() {
        2 if is("te") => TE,
        7 if is("upgrade") => UPGRADE,
        10 if is("connection") => CONNECTION,
        10 if is("keep-alive") => KEEP_ALIVE,
        14 if is("http2-settings") => HTTP2_SETTINGS,
        17 if is("transfer-encoding") => TRANSFER_ENCODING,
        l if l >= 6 && n[..6].eq_ignore_ascii_case(b"proxy-") => PROXY,
        _ => 0,
    }
}

/// Whether a comma-separated header value lists `token` (ASCII case-insensitive,
/// blanks around each element ignored).
pub(super) fn lists(value: &[u8], token: &str) -> bool {
    lists_token(value, token.as_bytes())
}

/// [`lists`] for a token as bytes.
pub(super) fn lists_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&c| c == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether any of `h`'s `name` lines lists `token`.
pub(super) fn any_lists(h: &HeaderMap, name: HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| lists(v.as_bytes(), token))
}

/// Removes hop-by-hop headers: `Connection` and those it names, `Keep-Alive`,
/// `Transfer-Encoding` (each leg frames its own body), `TE` (but `trailers`, which
/// gRPC needs), `Upgrade` unless `keep_upgrade`, `HTTP2-Settings` and `Proxy-*`.
/// A head with none of them (most requests) costs one pass over its names.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let present = h.keys().fold(0, |p, k| p | hop_by_hop(k));
    if present & CONNECTION != 0 {
        // `keep-alive` goes below anyway, and a `close` header is looked for
        // without making a name of it: the usual tokens allocate nothing.
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !t.eq_ignore_ascii_case("keep-alive")
                    && (!t.eq_ignore_ascii_case("close") || h.contains_key("close"))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|n| !(keep_upgrade && n == header::UPGRADE))
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    if present & TE != 0 {
        let te_trailers = any_lists(h, header::TE, "trailers");
        h.remove(header::TE);
        if te_trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        if present & CONNECTION != 0 {
            h.remove(header::CONNECTION);
        }
        if present & UPGRADE != 0 {
            h.remove(header::UPGRADE);
        }
    }
    if present & KEEP_ALIVE != 0 {
        h.remove("keep-alive");
    }
    if present & TRANSFER_ENCODING != 0 {
        h.remove(header::TRANSFER_ENCODING);
    }
    if present & HTTP2_SETTINGS != 0 {
        h.remove("http2-settings");
    }
    if present & PROXY != 0 {
        let proxy: Vec<HeaderName> = h
            .keys()
            .filter(|k| k.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for k in proxy {
            h.remove(k);
        }
    }
}

/// Sets X-Forwarded-For/-Proto/-Host for a request from the client whose address
/// is `ip` (as a header value, made once per connection) that named `host`.
pub fn forwarded(h: &mut HeaderMap, xff: Xff, ip: &HeaderValue, host: Option<&HeaderValue>) {
    use hyper::header::Entry;
    match xff {
        Xff::Off => {}
        Xff::Append => {
            // One lookup per name (entry), and room for the three made first: a
            // request with few headers would otherwise grow the map twice.
            // (A map at hyper's size limit just grows as it goes.)
            let _ = h.try_reserve(3);
            match h.entry(&X_FORWARDED_FOR) {
                Entry::Occupied(mut e) => {
                    // Several X-Forwarded-For lines are one list (RFC 9110
                    // §5.3): all of them as they came, in order, then the client.
                    let mut joined: Vec<u8> = Vec::new();
                    for prev in e.iter() {
                        let prev = prev.as_bytes().trim_ascii();
                        if !prev.is_empty() {
                            joined.extend_from_slice(prev);
                            joined.extend_from_slice(b", ");
                        }
                    }
                    let v = if joined.is_empty() {
                        Some(ip.clone())
                    } else {
                        joined.extend_from_slice(ip.as_bytes());
                        HeaderValue::from_bytes(&joined).ok()
                    };
                    if let Some(v) = v {
                        e.insert(v);
                    }
                }
                Entry::Vacant(e) => {
                    e.insert(ip.clone());
                }
            }
            if let Entry::Vacant(e) = h.entry(&X_FORWARDED_PROTO) {
                e.insert(HeaderValue::from_static("http"));
            }
            if let Some(v) = host {
                if let Entry::Vacant(e) = h.entry(&X_FORWARDED_HOST) {
                    e.insert(v.clone());
                }
            }
        }
        Xff::Replace => {
            h.insert(&X_FORWARDED_FOR, ip.clone());
            h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
            match host {
                Some(v) => {
                    h.insert(&X_FORWARDED_HOST, v.clone());
                }
                None => {
                    h.remove(&X_FORWARDED_HOST);
                }
            }
        }
    }
}

/// The request's X-Request-Id, set to a new random one when absent.
pub fn request_id(h: &mut HeaderMap) -> HeaderValue {
    use hyper::header::Entry;
    match h.entry(&X_REQUEST_ID) {
        Entry::Occupied(e) => e.get().clone(),
        Entry::Vacant(e) => {
            let v = new_request_id();
            e.insert(v.clone());
            v
        }
    }
}

/// 128 random bits in hex. From a per-thread xoshiro generator seeded from the
/// OS (`SmallRng`): an id only has to be unique, and ChaCha (`thread_rng`) cost
/// about 250 instructions per id.
pub(super) fn new_request_id() -> HeaderValue {
    use rand::{Rng, SeedableRng};
    thread_local! {
        static RNG: std::cell::RefCell<rand::rngs::SmallRng> =
            std::cell::RefCell::new(rand::rngs::SmallRng::from_entropy());
    }
    let id: u128 = RNG.with(|r| r.borrow_mut().gen());
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0u8; 32];
    for (pair, b) in hex.chunks_exact_mut(2).zip(id.to_be_bytes()) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
    // One allocation, shared by the request and the exchange (a plain copy
    // would be copied again on its first clone).
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(hex))
        .unwrap_or(HeaderValue::from_static("-"))
}

/// A client address as a header value (X-Forwarded-For), made once per
/// connection; clones share it.
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(ip.to_string()))
        .unwrap_or(HeaderValue::from_static("-"))
}

/// The host a request is for, lower case and without the port (an IPv6 literal
/// keeps its brackets): from `authority` (HTTP/2, absolute-form) or `Host`.
pub fn host(authority: Option<&str>, host: Option<&str>) -> Option<String> {
    let raw = authority.or(host)?;
    let raw = raw.trim();
    let name = if raw.starts_with('[') {
        match raw.find(']') {
            Some(end) => &raw[..=end],
            None => raw,
        }
    } else {
        match raw.rsplit_once(':') {
            Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => raw,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    (!name.is_empty()).then(|| name.to_ascii_lowercase())
}

/// Calls `f` with the `Date` value (RFC 9110 §6.6.1), formatted once a second
/// per thread.
pub(super) fn with_date<R>(f: impl FnOnce(&[u8]) -> R) -> R {
    use std::cell::RefCell;
    use std::time::SystemTime;
    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let s = httpdate::fmt_http_date(now);
            if s.len() != 29 {
                return f(s.as_bytes());
            }
            c.1.copy_from_slice(s.as_bytes());
            c.0 = secs;
        }
        f(&c.1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "gzip, trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "x"),
            ("upgrade", "h2c"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let left: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        assert_eq!(left, ["te", "x-kept"], "{h:?}");
        assert_eq!(h["te"], "trailers");
        // None of them: untouched.
        let mut h = map(&[("host", "x"), ("x-a", "1"), ("proxyish", "2")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 3, "{h:?}");
        // `close` names a header only if there is one.
        let mut h = map(&[("connection", "close"), ("close", "1"), ("x-b", "2")]);
        strip_hop_by_hop(&mut h, false);
        let left: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        assert_eq!(left, ["x-b"], "{h:?}");
    }

    #[test]
    fn websocket_keeps_its_upgrade() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn forwarded_headers() {
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
        ]);
        let v = |s: &'static str| HeaderValue::from_static(s);
        let iv = ip_value(ip);
        assert_eq!(iv, "10.0.0.9");
        forwarded(&mut h, Xff::Append, &iv, Some(&v("a.example")));
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "a.example");
        forwarded(&mut h, Xff::Replace, &iv, Some(&v("b.example")));
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "b.example");
        let mut h = map(&[]);
        forwarded(&mut h, Xff::Off, &iv, Some(&v("x")));
        assert!(h.is_empty());
        // Several lines are one list, kept as they came (obs-text too), in order.
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", v("1.2.3.4"));
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"h\xe9te").unwrap(),
        );
        h.append("x-forwarded-for", v(" 5.6.7.8 "));
        forwarded(&mut h, Xff::Append, &iv, None);
        let all: Vec<&[u8]> = h
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        assert_eq!(all, [&b"1.2.3.4, h\xe9te, 5.6.7.8, 10.0.0.9"[..]]);
    }

    #[test]
    fn generated_request_ids_are_32_hex_digits() {
        let mut h = map(&[]);
        let id = request_id(&mut h);
        assert_eq!(h["x-request-id"], id);
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 32);
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(request_id(&mut map(&[])), id);
        let kept = request_id(&mut map(&[("x-request-id", "abc")]));
        assert_eq!(kept, "abc");
    }

    #[test]
    fn hosts_without_ports() {
        let h = Some("API.example.com:8080");
        assert_eq!(host(None, h).as_deref(), Some("api.example.com"));
        assert_eq!(host(Some("[::1]:80"), h).as_deref(), Some("[::1]"));
        assert_eq!(host(None, Some("x.")).as_deref(), Some("x"));
        assert_eq!(host(None, None), None);
    }

    #[test]
    fn request_ids() {
        let mut h = map(&[("x-request-id", "abc")]);
        assert_eq!(request_id(&mut h), "abc");
        let mut h = map(&[]);
        let id = request_id(&mut h);
        assert_eq!(id.len(), 32);
        assert_eq!(h["x-request-id"], id);
    }
}
