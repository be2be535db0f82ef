//! Header blocks (RFC 7541): a request's decoded into its parts, with RFC 9113
//! §8.2–8.3's checks (Huffman codes by `httlib-huffman`), a response's
//! encoded.
//!
//! The encoder is the plainest HPACK allows: a name in the static table by its
//! index, every value a literal without indexing and without Huffman coding.
//! A response head then costs a copy of its bytes, and the client's decoder
//! keeps no state for it. Loopback and data-centre links do not miss the 20 or
//! so bytes per response that a dynamic table would save.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::StatusCode;

/// The decoder's table size: SETTINGS_HEADER_TABLE_SIZE is left at its
/// default.
pub const TABLE_SIZE: usize = 4096;

/// The static table (RFC 7541 Appendix A).
const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// An HPACK decoder: the dynamic table the client's encoder keeps in step
/// with (RFC 7541 §2.3).
pub struct Decoder {
    /// Newest first.
    table: VecDeque<(Bytes, Bytes)>,
    size: usize,
    max: usize,
}

pub fn decoder() -> Decoder {
    Decoder {
        table: VecDeque::new(),
        size: 0,
        max: TABLE_SIZE,
    }
}

/// An integer with an `n`-bit prefix (RFC 7541 §5.1): its value and the
/// bytes it took. Values past 2^28 are refused.
fn read_integer(b: &[u8], n: u8) -> Result<(usize, usize), ()> {
    let max = (1usize << n) - 1;
    let first = *b.first().ok_or(())? as usize & max;
    if first < max {
        return Ok((first, 1));
    }
    let mut v = max;
    for (i, &byte) in b[1..].iter().enumerate().take(4) {
        v += ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((v, i + 2));
        }
    }
    Err(())
}

impl Decoder {
    /// Entry `i` (1-based: the static table, then the dynamic one).
    fn get(&self, i: usize) -> Result<(&[u8], &[u8]), ()> {
        if i == 0 {
            return Err(());
        }
        if let Some((n, v)) = STATIC.get(i - 1) {
            return Ok((n, v));
        }
        let (n, v) = self.table.get(i - 1 - STATIC.len()).ok_or(())?;
        Ok((n, v))
    }

    fn evict_to(&mut self, max: usize) {
        while self.size > max {
            let Some((n, v)) = self.table.pop_back() else {
                break;
            };
            self.size -= n.len() + v.len() + 32;
        }
    }

    fn insert(&mut self, n: Bytes, v: Bytes) {
        let size = n.len() + v.len() + 32;
        // An entry larger than the table empties it (RFC 7541 §4.4).
        self.evict_to(self.max.saturating_sub(size));
        if size <= self.max {
            self.size += size;
            self.table.push_front((n, v));
        }
    }

    /// A string literal (RFC 7541 §5.2) at the start of `b`, Huffman codes
    /// decoded into `scratch`: the bytes and the length it took.
    fn string<'a>(b: &'a [u8], scratch: &'a mut Vec<u8>) -> Result<(&'a [u8], usize), ()> {
        let huffman = *b.first().ok_or(())? & 0x80 != 0;
        let (len, at) = read_integer(b, 7)?;
        let raw = b.get(at..at.checked_add(len).ok_or(())?).ok_or(())?;
        if !huffman {
            return Ok((raw, at + len));
        }
        scratch.clear();
        httlib_huffman::decode(raw, scratch, httlib_huffman::DecoderSpeed::FourBits)
            .map_err(|_| ())?;
        // The padding must be fewer than 8 bits, all ones (the start of EOS);
        // the decoder lets zeros through.
        let bits: usize = scratch
            .iter()
            .map(|&c| httlib_huffman::encoder::table::ENCODE_TABLE[c as usize].0 as usize)
            .sum();
        let pad = (raw.len() * 8).checked_sub(bits).ok_or(())?;
        if pad >= 8 {
            return Err(());
        }
        let mask = (1u8 << pad).wrapping_sub(1);
        if pad > 0 && raw[raw.len() - 1] & mask != mask {
            return Err(());
        }
        Ok((scratch, at + len))
    }

    /// Decodes a whole block, calling `f` with each field; `Err` if it is not
    /// valid HPACK.
    fn decode(&mut self, mut b: &[u8], mut f: impl FnMut(&[u8], &[u8])) -> Result<(), ()> {
        let mut first = true;
        let (mut sn, mut sv) = (Vec::new(), Vec::new());
        while let Some(&byte) = b.first() {
            if byte & 0x80 != 0 {
                // Indexed.
                let (i, used) = read_integer(b, 7)?;
                let (n, v) = self.get(i)?;
                f(n, v);
                b = &b[used..];
            } else if byte & 0xe0 == 0x20 {
                // A table size update: only at the start of a block.
                if !first {
                    return Err(());
                }
                let (max, used) = read_integer(b, 5)?;
                if max > TABLE_SIZE {
                    return Err(());
                }
                self.max = max;
                self.evict_to(max);
                b = &b[used..];
                continue;
            } else {
                // A literal: with incremental indexing (01), else without or
                // never indexed (0000, 0001).
                let index = byte & 0xc0 == 0x40;
                let (i, mut used) = read_integer(b, if index { 6 } else { 4 })?;
                let name: &[u8] = if i == 0 {
                    let (n, l) = Self::string(&b[used..], &mut sn)?;
                    used += l;
                    n
                } else {
                    let (n, _) = self.get(i)?;
                    sn.clear();
                    sn.extend_from_slice(n);
                    &sn
                };
                let (value, l) = Self::string(&b[used..], &mut sv)?;
                used += l;
                f(name, value);
                if index {
                    let (n, v) = (Bytes::copy_from_slice(name), Bytes::copy_from_slice(value));
                    self.insert(n, v);
                }
                b = &b[used..];
            }
            first = false;
        }
        Ok(())
    }
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
    // (Indexed fields decode to many times their size.)
    let mut bytes = BytesMut::with_capacity(block.len() * 4 + 192);
    let mut size = 0usize;
    let mut regular_seen = false;
    let mut fields: Vec<Field> = Vec::with_capacity(16);
    let r = dec.decode(block, |name: &[u8], value: &[u8]| {
        size = size.saturating_add(name.len() + value.len() + 32);
        if size > limit {
            out.oversize = true;
        }
        if out.oversize || out.malformed.is_some() {
            return;
        }
        let start = bytes.len();
        bytes.put_slice(value);
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
        let Ok(n) = HeaderName::from_bytes(name) else {
            out.malformed = Some("invalid field name");
            return;
        };
        if n == header::CONNECTION
            || n == header::TRANSFER_ENCODING
            || n == header::UPGRADE
            || n == "keep-alive"
            || n == "proxy-connection"
            || (n == header::TE && value != b"trailers")
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
mod tests;
