//! HTTP/2 frames (RFC 9113 §4, §6): the 9-byte header, the frame types and
//! flags a server reads and writes, and the writers for the frames it sends.

use bytes::{BufMut, BytesMut};
use h2::Reason;

pub const HEADER_LEN: usize = 9;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// The largest flow-control window (2^31 - 1).
pub const MAX_WINDOW: i64 = (1 << 31) - 1;
/// Every window's size before SETTINGS say otherwise.
pub const DEFAULT_WINDOW: i64 = 65_535;
/// The smallest and largest SETTINGS_MAX_FRAME_SIZE.
pub const MIN_MAX_FRAME: u32 = 16_384;
pub const MAX_MAX_FRAME: u32 = (1 << 24) - 1;

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A frame's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    /// The header at the start of `b` (which holds at least [`HEADER_LEN`]
    /// bytes); the stream identifier's reserved bit is ignored.
    pub fn parse(b: &[u8]) -> Head {
        Head {
            len: (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize,
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

/// Writes a frame header.
pub fn head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    debug_assert!(len <= MAX_MAX_FRAME as usize);
    out.reserve(HEADER_LEN + len);
    out.put_u8((len >> 16) as u8);
    out.put_u16(len as u16);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

pub fn settings(out: &mut BytesMut, values: &[(u16, u32)]) {
    head(out, values.len() * 6, SETTINGS, 0, 0);
    for &(id, v) in values {
        out.put_u16(id);
        out.put_u32(v);
    }
}

pub fn settings_ack(out: &mut BytesMut) {
    head(out, 0, SETTINGS, ACK, 0);
}

pub fn ping_ack(out: &mut BytesMut, payload: &[u8]) {
    head(out, 8, PING, ACK, 0);
    out.put_slice(payload);
}

pub fn window_update(out: &mut BytesMut, stream: u32, n: u32) {
    head(out, 4, WINDOW_UPDATE, 0, stream);
    out.put_u32(n);
}

pub fn rst_stream(out: &mut BytesMut, stream: u32, reason: Reason) {
    head(out, 4, RST_STREAM, 0, stream);
    out.put_u32(reason.into());
}

pub fn goaway(out: &mut BytesMut, last: u32, reason: Reason) {
    head(out, 8, GOAWAY, 0, 0);
    out.put_u32(last);
    out.put_u32(reason.into());
}

/// A header block as HEADERS and, past `max_frame` bytes, CONTINUATION frames.
pub fn header_block(out: &mut BytesMut, stream: u32, block: &[u8], end_stream: bool, max: usize) {
    let flags = if end_stream { END_STREAM } else { 0 };
    let mut rest = block;
    let first = rest.len().min(max);
    let mut kind = HEADERS;
    let mut f = flags;
    let mut n = first;
    loop {
        let last = n == rest.len();
        head(out, n, kind, f | if last { END_HEADERS } else { 0 }, stream);
        out.put_slice(&rest[..n]);
        rest = &rest[n..];
        if last {
            return;
        }
        kind = CONTINUATION;
        f = 0;
        n = rest.len().min(max);
    }
}

/// The payload of a DATA or HEADERS frame without its padding (and for
/// HEADERS, without its priority fields); `None` if the padding is longer
/// than the frame (a connection error, PROTOCOL_ERROR).
pub fn unpad(flags: u8, kind: u8, payload: &[u8]) -> Option<&[u8]> {
    let mut p = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        pad = *p.first()? as usize;
        p = &p[1..];
    }
    if kind == HEADERS && flags & PRIORITY_FLAG != 0 {
        p = p.get(5..)?;
    }
    p.get(..p.len().checked_sub(pad)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_round_trips() {
        let mut b = BytesMut::new();
        head(
            &mut b,
            0x01_02_03,
            HEADERS,
            END_HEADERS | END_STREAM,
            0x7fff_fffe,
        );
        assert_eq!(
            Head::parse(&b),
            Head {
                len: 0x01_02_03,
                kind: HEADERS,
                flags: END_HEADERS | END_STREAM,
                stream: 0x7fff_fffe,
            }
        );
        // The reserved bit is ignored.
        b[5] |= 0x80;
        assert_eq!(Head::parse(&b).stream, 0x7fff_fffe);
    }

    #[test]
    fn padding_and_priority_come_off() {
        assert_eq!(
            unpad(PADDED, DATA, &[2, b'a', b'b', 0, 0]),
            Some(&b"ab"[..])
        );
        assert_eq!(unpad(PADDED, DATA, &[5, b'a']), None);
        assert_eq!(unpad(PADDED, DATA, &[]), None);
        assert_eq!(
            unpad(
                PRIORITY_FLAG | PADDED,
                HEADERS,
                &[1, 0, 0, 0, 1, 16, b'x', 0]
            ),
            Some(&b"x"[..])
        );
        assert_eq!(unpad(PRIORITY_FLAG, HEADERS, &[0, 0, 0]), None);
        // PRIORITY_FLAG means nothing on DATA.
        assert_eq!(unpad(PRIORITY_FLAG, DATA, &[1, 2]), Some(&[1u8, 2][..]));
    }

    #[test]
    fn a_long_block_goes_on_in_continuation_frames() {
        let block: Vec<u8> = (0..40u8).collect();
        let mut b = BytesMut::new();
        header_block(&mut b, 3, &block, true, 16);
        let mut frames = Vec::new();
        let mut rest = &b[..];
        while !rest.is_empty() {
            let h = Head::parse(rest);
            frames.push((h.kind, h.flags, h.len));
            rest = &rest[HEADER_LEN + h.len..];
        }
        assert_eq!(
            frames,
            vec![
                (HEADERS, END_STREAM, 16),
                (CONTINUATION, 0, 16),
                (CONTINUATION, END_HEADERS, 8)
            ]
        );
    }
}
