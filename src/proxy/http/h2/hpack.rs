//! Header blocks (RFC 7541): decoded by `loona-hpack` into a request's parts,
//! with RFC 9113 §8.2–8.3's checks; a response's fields encoded here.
//!
//! The encoder is the plainest HPACK allows: a name in the static table by its
//! index, every value a literal without indexing and without Huffman coding.
//! A response head then costs a copy of its bytes, and the client's decoder
//! keeps no state for it. Loopback and data-centre links do not miss the 20 or
//! so bytes per response that a dynamic table would save.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::StatusCode;

/// The decoder's table size: SETTINGS_HEADER_TABLE_SIZE is left at its
/// default.
pub const TABLE_SIZE: usize = 4096;

pub type Decoder = loona_hpack::Decoder<'static>;

pub fn decoder() -> Decoder {
    let mut d = loona_hpack::Decoder::new();
    d.set_max_allowed_table_size(TABLE_SIZE);
    d
}

/// A decoded header block.
#[derive(Default)]
pub struct Block {
    pub method: Option<Bytes>,
    pub scheme: Option<Bytes>,
    pub authority: Option<Bytes>,
    pub path: Option<Bytes>,
    pub headers: HeaderMap,
    /// Why the block is not a valid request (or trailers): the stream is reset
    /// with PROTOCOL_ERROR (RFC 9113 §8.1.1).
    pub malformed: Option<&'static str>,
    /// The decoded list is larger than SETTINGS_MAX_HEADER_LIST_SIZE.
    pub oversize: bool,
}

/// Where a field's bytes are in the block's copy.
enum Field {
    Pseudo(u8, usize, usize),
    Regular(HeaderName, usize, usize),
}

/// Decodes a whole header block (HEADERS and its CONTINUATIONs). `Err` is a
/// connection error (COMPRESSION_ERROR): the decoder's table can no longer be
/// trusted.
pub fn decode(dec: &mut Decoder, block: &[u8], trailers: bool, limit: usize) -> Result<Block, ()> {
    let mut out = Block::default();
    // One copy of every value, sliced into the header values after.
    let mut bytes = BytesMut::with_capacity(block.len() * 2);
    let mut size = 0usize;
    let mut regular_seen = false;
    let mut fields: Vec<Field> = Vec::with_capacity(16);
    let r = dec.decode_with_cb(block, |name: Cow<'_, [u8]>, value: Cow<'_, [u8]>| {
        size = size.saturating_add(name.len() + value.len() + 32);
        if size > limit {
            out.oversize = true;
        }
        if out.oversize || out.malformed.is_some() {
            return;
        }
        let start = bytes.len();
        bytes.put_slice(&value);
        let end = bytes.len();
        if let Some(p) = name.strip_prefix(b":") {
            let which = match p {
                b"method" => 0,
                b"scheme" => 1,
                b"authority" => 2,
                b"path" => 3,
                _ => {
                    out.malformed = Some("unknown pseudo-header");
                    return;
                }
            };
            if regular_seen || trailers {
                out.malformed = Some("pseudo-header after a regular field or in trailers");
                return;
            }
            fields.push(Field::Pseudo(which, start, end));
            return;
        }
        regular_seen = true;
        if name.iter().any(u8::is_ascii_uppercase) {
            out.malformed = Some("uppercase field name");
            return;
        }
        let Ok(n) = HeaderName::from_bytes(&name) else {
            out.malformed = Some("invalid field name");
            return;
        };
        if n == header::CONNECTION
            || n == header::TRANSFER_ENCODING
            || n == header::UPGRADE
            || n == "keep-alive"
            || n == "proxy-connection"
            || (n == header::TE && &*value != b"trailers")
        {
            out.malformed = Some("connection-specific field");
            return;
        }
        fields.push(Field::Regular(n, start, end));
    });
    if r.is_err() {
        return Err(());
    }
    if out.oversize || out.malformed.is_some() {
        return Ok(out);
    }
    let bytes = bytes.freeze();
    out.headers.reserve(fields.len());
    for f in fields {
        match f {
            Field::Pseudo(which, s, e) => {
                let slot = match which {
                    0 => &mut out.method,
                    1 => &mut out.scheme,
                    2 => &mut out.authority,
                    _ => &mut out.path,
                };
                if slot.is_some() {
                    out.malformed = Some("duplicate pseudo-header");
                    return Ok(out);
                }
                *slot = Some(bytes.slice(s..e));
            }
            Field::Regular(n, s, e) => match HeaderValue::from_maybe_shared(bytes.slice(s..e)) {
                Ok(v) => {
                    out.headers.append(n, v);
                }
                Err(_) => {
                    out.malformed = Some("invalid field value");
                    return Ok(out);
                }
            },
        }
    }
    Ok(out)
}

/// A field name's index in the static table (RFC 7541 Appendix A), for the
/// names a response carries.
fn static_name(name: &str) -> Option<u8> {
    Some(match name {
        "accept-charset" => 15,
        "accept-encoding" => 16,
        "accept-language" => 17,
        "accept-ranges" => 18,
        "accept" => 19,
        "access-control-allow-origin" => 20,
        "age" => 21,
        "allow" => 22,
        "authorization" => 23,
        "cache-control" => 24,
        "content-disposition" => 25,
        "content-encoding" => 26,
        "content-language" => 27,
        "content-length" => 28,
        "content-location" => 29,
        "content-range" => 30,
        "content-type" => 31,
        "cookie" => 32,
        "date" => 33,
        "etag" => 34,
        "expect" => 35,
        "expires" => 36,
        "from" => 37,
        "host" => 38,
        "if-match" => 39,
        "if-modified-since" => 40,
        "if-none-match" => 41,
        "if-range" => 42,
        "if-unmodified-since" => 43,
        "last-modified" => 44,
        "link" => 45,
        "location" => 46,
        "max-forwards" => 47,
        "proxy-authenticate" => 48,
        "proxy-authorization" => 49,
        "range" => 50,
        "referer" => 51,
        "refresh" => 52,
        "retry-after" => 53,
        "server" => 54,
        "set-cookie" => 55,
        "strict-transport-security" => 56,
        "transfer-encoding" => 57,
        "user-agent" => 58,
        "vary" => 59,
        "via" => 60,
        "www-authenticate" => 61,
        _ => return None,
    })
}

/// An HPACK integer with an `n`-bit prefix; `first` holds the bits above it.
fn integer(out: &mut BytesMut, first: u8, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.put_u8(first | v as u8);
        return;
    }
    out.put_u8(first | max as u8);
    v -= max;
    while v >= 128 {
        out.put_u8((v & 0x7f) as u8 | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

fn string(out: &mut BytesMut, s: &[u8]) {
    integer(out, 0, 7, s.len());
    out.put_slice(s);
}

/// Whether a field is HTTP/1.1's alone, never sent on HTTP/2 (RFC 9113
/// §8.2.2).
fn connection_specific(n: &HeaderName) -> bool {
    *n == header::CONNECTION
        || *n == header::TRANSFER_ENCODING
        || *n == header::UPGRADE
        || *n == header::TE
        || *n == "keep-alive"
        || *n == "proxy-connection"
}

/// Encodes fields (a response's, or trailers) into `out`.
pub fn encode_fields(out: &mut BytesMut, headers: &HeaderMap) {
    for (name, value) in headers {
        if connection_specific(name) {
            continue;
        }
        // Literal without indexing (0000), or never indexed (0001) for a
        // value marked sensitive.
        let first = if value.is_sensitive() { 0x10 } else { 0x00 };
        match static_name(name.as_str()) {
            Some(i) => integer(out, first, 4, i as usize),
            None => {
                out.put_u8(first);
                string(out, name.as_str().as_bytes());
            }
        }
        string(out, value.as_bytes());
    }
}

/// Encodes a response head: `:status`, then its fields.
pub fn encode_response(out: &mut BytesMut, status: StatusCode, headers: &HeaderMap) {
    let indexed = match status.as_u16() {
        200 => Some(8),
        204 => Some(9),
        206 => Some(10),
        304 => Some(11),
        400 => Some(12),
        404 => Some(13),
        500 => Some(14),
        _ => None,
    };
    match indexed {
        Some(i) => out.put_u8(0x80 | i),
        None => {
            integer(out, 0x00, 4, 8);
            string(out, status.as_str().as_bytes());
        }
    }
    encode_fields(out, headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(block: &[u8]) -> Vec<(String, String)> {
        let mut d = decoder();
        d.decode(block)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    #[test]
    fn a_response_head_decodes_as_it_was() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(
            header::DATE,
            HeaderValue::from_static("Thu, 03 Dec 2026 15:00:00 GMT"),
        );
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        let long = "v".repeat(300);
        h.insert("x-long", HeaderValue::from_str(&long).unwrap());
        let mut sens = HeaderValue::from_static("secret");
        sens.set_sensitive(true);
        h.insert(header::SET_COOKIE, sens);
        for (code, s) in [(200, "200"), (404, "404"), (201, "201"), (503, "503")] {
            let mut out = BytesMut::new();
            encode_response(&mut out, StatusCode::from_u16(code).unwrap(), &h);
            let got = decoded(&out);
            assert_eq!(got[0], (":status".into(), s.into()));
            let rest: Vec<_> = got[1..]
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            assert_eq!(
                rest,
                vec![
                    ("content-type", "text/event-stream"),
                    ("date", "Thu, 03 Dec 2026 15:00:00 GMT"),
                    ("x-request-id", "abc"),
                    ("x-long", long.as_str()),
                    ("set-cookie", "secret"),
                ]
            );
        }
    }

    #[test]
    fn every_static_name_has_its_index() {
        // The decoder's own static table says what each index is.
        for i in 15u8..=61 {
            let mut b = BytesMut::new();
            integer(&mut b, 0, 4, i as usize);
            string(&mut b, b"x");
            let (n, _) = decoded(&b).remove(0);
            assert_eq!(static_name(&n), Some(i), "{n}");
        }
    }

    fn request(fields: &[(&str, &str)], trailers: bool, limit: usize) -> Block {
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
        decode(&mut decoder(), &block, trailers, limit).unwrap()
    }

    #[test]
    fn a_request_block_gives_its_parts() {
        let b = request(
            &[
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", "api.example.com"),
                (":path", "/v1/chat?x=1"),
                ("content-type", "application/json"),
                ("te", "trailers"),
                ("x-a", "1"),
                ("x-a", "2"),
            ],
            false,
            65536,
        );
        assert_eq!(b.malformed, None);
        assert_eq!(b.method.as_deref(), Some(&b"POST"[..]));
        assert_eq!(b.scheme.as_deref(), Some(&b"http"[..]));
        assert_eq!(b.authority.as_deref(), Some(&b"api.example.com"[..]));
        assert_eq!(b.path.as_deref(), Some(&b"/v1/chat?x=1"[..]));
        assert_eq!(b.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(b.headers["content-type"], "application/json");
    }

    #[test]
    fn malformed_blocks_are_told() {
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[(":method", "GET"), ("x", "1"), (":path", "/")], false),
            (&[(":method", "GET"), (":bogus", "1")], false),
            (&[(":method", "GET"), (":method", "GET")], false),
            (&[(":method", "GET"), ("X-Upper", "1")], false),
            (&[(":method", "GET"), ("connection", "close")], false),
            (
                &[(":method", "GET"), ("transfer-encoding", "chunked")],
                false,
            ),
            (&[(":method", "GET"), ("te", "gzip")], false),
            (&[(":method", "GET"), ("x", "a\rb")], false),
            (&[(":method", "GET"), ("x", "a\0b")], false),
            (&[("grpc-status", "0"), (":path", "/")], true),
        ];
        for (fields, trailers) in cases {
            let b = request(fields, *trailers, 65536);
            assert!(b.malformed.is_some(), "{fields:?}");
        }
        let b = request(&[("grpc-status", "0")], true, 65536);
        assert_eq!(b.malformed, None);
        assert_eq!(b.headers["grpc-status"], "0");
    }

    #[test]
    fn a_list_over_the_limit_is_oversize() {
        let v = "x".repeat(100);
        let b = request(&[(":method", "GET"), ("a", &v), ("b", &v)], false, 200);
        assert!(b.oversize);
        let b = request(&[(":method", "GET"), ("a", &v)], false, 200);
        assert!(!b.oversize);
    }

    #[test]
    fn a_broken_block_is_a_connection_error() {
        // An index past both tables.
        assert!(decode(&mut decoder(), &[0xff, 0x7f], false, 65536).is_err());
        // A string longer than the block.
        assert!(decode(&mut decoder(), &[0x00, 0x05, b'a'], false, 65536).is_err());
    }
}
