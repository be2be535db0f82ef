//! An HTTP/1.1 request as the server fast path ([`super::serve1`]) read it: the
//! head's bytes and where its fields are, and its body when that came whole
//! with the head (a `Content-Length` one). Its headers are looked up by a
//! scan of those few fields instead of through a `HeaderMap`, and for an HTTP/1.1
//! backend it goes up as those bytes with flowgate's edits
//! ([`RawHead::encode_up`]): hop-by-hop headers out, X-Forwarded-* and
//! X-Request-Id in, the client's other fields as they came, in their order.
//!
//! Why: a `HeaderMap` built from the head (each name hashed and inserted), read
//! for routing and the forwarded headers (hashed again) and encoded back to
//! bytes was about a sixth of the instructions of a proxied request
//! (callgrind, docs/performance.md). Anything else (an h2c backend, an
//! absolute-form target) takes the request as a hyper `Request`
//! ([`RawHead::into_request`]). [`encode_up`] also writes the head of a hyper
//! request bound for an HTTP/1.1 backend, from its `HeaderMap` as it is.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Uri, Version};

use super::headers::{self, lists, lists_token};
use super::request_body::ReqBody;
use crate::config::Xff;

/// What a field is to the edits (found once, as the head is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Plain,
    /// A hop-by-hop header (its bit in [`headers::hop_by_hop_name`]).
    Hop(u8),
    XForwardedFor,
    XForwardedProto,
    XForwardedHost,
    RequestId,
    Host,
    ContentLength,
}

impl Kind {
    pub(super) fn of(name: &[u8]) -> Kind {
        let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
        match name.len() {
            4 if is("host") => Kind::Host,
            12 if is("x-request-id") => Kind::RequestId,
            14 if is("content-length") => Kind::ContentLength,
            15 if is("x-forwarded-for") => Kind::XForwardedFor,
            16 if is("x-forwarded-host") => Kind::XForwardedHost,
            17 if is("x-forwarded-proto") => Kind::XForwardedProto,
            _ => match headers::hop_by_hop_name(name) {
                0 => Kind::Plain,
                bit => Kind::Hop(bit),
            },
        }
    }
}

/// One header line: where its name and value are in the head.
#[derive(Debug, Clone)]
pub(super) struct Field {
    pub name: Range<usize>,
    pub value: Range<usize>,
    pub kind: Kind,
}

/// An HTTP/1.1 (or 1.0) request head, as read, with its body when that was
/// read whole with it.
#[derive(Debug, Clone)]
pub struct RawHead {
    /// The whole head, request line to the empty line.
    pub(super) bytes: Bytes,
    pub(super) method: Method,
    pub(super) version: Version,
    /// The request target, parsed (path and query for routing).
    pub(super) uri: Uri,
    /// Where the target is in `bytes`.
    pub(super) target: Range<usize>,
    pub(super) fields: Vec<Field>,
    /// The hop-by-hop headers present (their bits, or'ed).
    pub(super) hop: u8,
    /// The body its `Content-Length` line announced (empty for none), all of
    /// it: it goes upstream right after the head, framed by flowgate's own
    /// `Content-Length` line.
    pub(super) body: Bytes,
}

impl RawHead {
    fn field(&self, f: &Field) -> (&[u8], &[u8]) {
        (&self.bytes[f.name.clone()], &self.bytes[f.value.clone()])
    }

    /// The values of the `kind` lines, in order.
    pub(super) fn values(&self, kind: Kind) -> impl Iterator<Item = &[u8]> + '_ {
        self.fields
            .iter()
            .filter(move |f| f.kind == kind)
            .map(|f| &self.bytes[f.value.clone()])
    }

    /// The values of the lines named `name` (any case), in order.
    pub(super) fn named<'a, 'n>(
        &'a self,
        name: &'n str,
    ) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
        self.fields
            .iter()
            .map(|f| self.field(f))
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// Whether a `Connection` line lists `token`.
    pub(super) fn connection_lists(&self, token: &[u8]) -> bool {
        self.hop & headers::CONNECTION != 0
            && self
                .values(Kind::Hop(headers::CONNECTION))
                .any(|v| lists_token(v, token))
    }

    /// The `Host` value as a header value, if it is one `to_str` takes (what
    /// X-Forwarded-Host is made from).
    pub(super) fn host(&self) -> Option<&[u8]> {
        self.values(Kind::Host)
            .next()
            .filter(|v| v.iter().all(|&c| c == b'\t' || (32..127).contains(&c)))
    }

    /// As a hyper request with a `HeaderMap`, for what takes one (an h2c
    /// backend). `None` if `http` refuses a name or value httparse let through.
    pub(super) fn into_request(self) -> Option<Request<ReqBody>> {
        // Room for the X-Forwarded-* and X-Request-Id headers that go up with it.
        let mut headers = HeaderMap::with_capacity(self.fields.len() + 4);
        for f in &self.fields {
            let name = HeaderName::from_bytes(&self.bytes[f.name.clone()]).ok()?;
            let value = HeaderValue::from_maybe_shared(self.bytes.slice(f.value.clone())).ok()?;
            headers.append(name, value);
        }
        let mut r = Request::new(ReqBody::Buffered(self.body));
        *r.method_mut() = self.method;
        *r.uri_mut() = self.uri;
        *r.version_mut() = self.version;
        *r.headers_mut() = headers;
        Some(r)
    }

    /// Writes the head as it goes to an HTTP/1.1 backend into `w` (see
    /// [`encode_up`]; `target` in place of the client's when given). Returns the
    /// request's id.
    pub(super) fn encode_up(
        &self,
        w: &mut BytesMut,
        target: Option<&str>,
        xff: Xff,
        ip: &HeaderValue,
    ) -> HeaderValue {
        let b = &self.bytes;
        let up = UpHead {
            method: &self.method,
            target: target.map_or(&b[self.target.clone()], str::as_bytes),
            authority: self.host(),
            host_from_target: false,
            xff,
            ip,
            // A body's framing is flowgate's, as for hyper's requests: a
            // `Content-Length` that `Connection` names must not go missing
            // from under it.
            body: match self.body.len() {
                0 => Framing::None,
                n => Framing::Length(n as u64),
            },
        };
        let fields = || {
            self.fields.iter().map(|f| {
                let (name, value) = self.field(f);
                (name, value, f.kind)
            })
        };
        match encode_up(w, &up, fields, self.hop) {
            Some(v) => HeaderValue::from_maybe_shared(b.slice_ref(v))
                .unwrap_or_else(|_| headers::new_request_id()),
            None => new_id(w),
        }
    }
}

/// How a request head goes to an HTTP/1.1 backend ([`encode_up`]).
pub(super) struct UpHead<'a> {
    pub method: &'a Method,
    /// The request target, as it goes.
    pub target: &'a [u8],
    /// The request's authority (X-Forwarded-Host is made from it): the client's
    /// Host, or the target's authority.
    pub authority: Option<&'a [u8]>,
    /// The authority came from the target (absolute form, HTTP/2's
    /// `:authority`): it goes as Host in place of the client's (RFC 9112 §3.2.2).
    pub host_from_target: bool,
    pub xff: Xff,
    /// The client's address, as a header value.
    pub ip: &'a HeaderValue,
    /// How the body goes, when there is one.
    pub body: Framing,
}

/// A request body's framing on its way to an HTTP/1.1 backend, which the head
/// says in flowgate's words, not the client's (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// No body: the client's Content-Length (`0`), if any, goes as it came.
    None,
    /// `Content-Length: n`, in place of the client's.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Writes a request head as it goes to an HTTP/1.1 backend into `w`, all but
/// the X-Request-Id a client without one gets (which [`new_id`] writes, then the
/// empty line): the request line, the client's `fields` (name, value, kind; as
/// often as asked for) in
/// their order less the hop-by-hop ones (`Connection` and those it names,
/// `Keep-Alive`, `TE` but `trailers`, `Upgrade`, `Proxy-*`, ...; `hop` says which
/// are present), then the body's framing per `up.body` (a client's
/// `Content-Length` goes as it came only without a body), then
/// X-Forwarded-For/-Proto/-Host per `xff`. Returns the client's X-Request-Id, if
/// it sent one: with it, the head is complete.
///
/// The same edits as `headers::strip_hop_by_hop`, `headers::forwarded` and
/// `headers::request_id` make on a `HeaderMap` (tests hold them to it), for the
/// fast path's bytes ([`RawHead::encode_up`]) and for a hyper request alike.
pub(super) fn encode_up<'f, I>(
    w: &mut BytesMut,
    up: &UpHead<'_>,
    fields: impl Fn() -> I,
    hop: u8,
) -> Option<&'f [u8]>
where
    I: Iterator<Item = (&'f [u8], &'f [u8], Kind)>,
{
    w.reserve(up.target.len() + 400);
    w.extend_from_slice(up.method.as_str().as_bytes());
    w.extend_from_slice(b" ");
    w.extend_from_slice(up.target);
    w.extend_from_slice(b" HTTP/1.1\r\n");
    if let (true, Some(a)) = (up.host_from_target, up.authority) {
        put(w, b"host", a);
    }
    // The names `Connection` lines list, sorted (ignoring case) and deduplicated:
    // a field is looked up in them, not in every line again (a head of many
    // fields and a long `Connection` costs their sum, not their product).
    let mut listed: Vec<&[u8]> = Vec::new();
    if hop & headers::CONNECTION != 0 {
        for (_, v, kind) in fields() {
            if kind == Kind::Hop(headers::CONNECTION) {
                listed.extend(v.split(|&c| c == b',').map(<[u8]>::trim_ascii));
            }
        }
        listed.sort_unstable_by(|a, b| cmp_ignore_case(a, b));
        listed.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
    }
    let named = |name: &[u8]| {
        !listed.is_empty()
            && listed
                .binary_search_by(|t| cmp_ignore_case(t, name))
                .is_ok()
    };
    let mut te_trailers = false;
    let (mut proto, mut fhost) = (false, false);
    let mut id = None;
    // The client's X-Forwarded-For lines, joined (with `xff = "append"`).
    let mut joined: Option<Vec<u8>> = None;
    for (name, value, kind) in fields() {
        // (Host stays even if `Connection` names it: the `HeaderMap` path
        // puts the client's back.)
        if !matches!(kind, Kind::Hop(headers::CONNECTION) | Kind::Host) && named(name) {
            continue;
        }
        match (kind, up.xff) {
            (Kind::Hop(headers::TE), _) => {
                te_trailers |= lists(value, "trailers");
                continue;
            }
            (Kind::Hop(_), _) => continue,
            (Kind::Host, _) if up.host_from_target => continue,
            // A body's framing is flowgate's (below).
            (Kind::ContentLength, _) if up.body != Framing::None => continue,
            (Kind::XForwardedFor, Xff::Append) => {
                // Several lines are one list (RFC 9110 §5.3): all of them as
                // they came, in order, then the client.
                let j = joined.get_or_insert_with(Vec::new);
                let prev = value.trim_ascii();
                if !prev.is_empty() {
                    j.extend_from_slice(prev);
                    j.extend_from_slice(b", ");
                }
                continue;
            }
            (Kind::XForwardedFor | Kind::XForwardedProto | Kind::XForwardedHost, Xff::Replace) => {
                continue
            }
            (Kind::XForwardedProto, _) => proto = true,
            (Kind::XForwardedHost, _) => fhost = true,
            (Kind::RequestId, _) => {
                id.get_or_insert(value);
            }
            _ => {}
        }
        put(w, name, value);
    }
    if te_trailers {
        w.extend_from_slice(b"te: trailers\r\n");
    }
    match up.body {
        Framing::None => {}
        Framing::Length(n) => put(
            w,
            b"content-length",
            itoa::Buffer::new().format(n).as_bytes(),
        ),
        Framing::Chunked => w.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    match up.xff {
        Xff::Off => {}
        Xff::Append | Xff::Replace => {
            w.extend_from_slice(b"x-forwarded-for: ");
            if let Some(j) = &joined {
                w.extend_from_slice(j);
            }
            w.extend_from_slice(up.ip.as_bytes());
            w.extend_from_slice(b"\r\n");
            if !proto {
                w.extend_from_slice(b"x-forwarded-proto: http\r\n");
            }
            if let (Some(h), false) = (up.authority, fhost) {
                put(w, b"x-forwarded-host", h);
            }
        }
    }
    if id.is_some() {
        w.extend_from_slice(b"\r\n");
    }
    id
}

/// Ends a head [`encode_up`] wrote for a request without an X-Request-Id: a new
/// one, then the empty line. Returns it.
pub(super) fn new_id(w: &mut BytesMut) -> HeaderValue {
    let v = headers::new_request_id();
    put(w, b"x-request-id", v.as_bytes());
    w.extend_from_slice(b"\r\n");
    v
}

/// Orders names as ASCII lower case.
fn cmp_ignore_case(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    a.iter()
        .map(u8::to_ascii_lowercase)
        .cmp(b.iter().map(u8::to_ascii_lowercase))
}

/// `name: value` CRLF.
fn put(w: &mut BytesMut, name: &[u8], value: &[u8]) {
    w.extend_from_slice(name);
    w.extend_from_slice(b": ");
    w.extend_from_slice(value);
    w.extend_from_slice(b"\r\n");
}
