//! Reading a response: its head (with the framing it says) and its body.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::body::{Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Response, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Conn, Down, UpError, MAX_CHUNK_LINE, MAX_HEAD, MAX_HEADERS, MAX_READ, READ_SIZE};

/// A failed response body, as [`Conn::poll_frame`] returns it.
type Failed = Poll<Option<Result<Frame<Bytes>, UpError>>>;

/// What a response head says about its framing, noted as its headers are read.
#[derive(Debug, Default)]
struct Seen {
    /// `Connection` names `close`.
    close: bool,
    /// `Transfer-Encoding` is there: whether its last coding is `chunked`.
    chunked: Option<bool>,
    /// `Content-Length` lines.
    lengths: usize,
    /// Whether a `Content-Length` value is a list (`5, 5`).
    length_list: bool,
    /// A `Connection` line names a header (anything but `keep-alive`): those
    /// are taken out too.
    names: bool,
}

/// What a `Content-Length` line does on the way to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Length {
    Keep,
    /// Dropped (a chunked body's).
    Drop,
    /// One line of this value in place of the ones that came (`5, 5`, or two
    /// lines of it).
    Set(u64),
}

/// A response's header lines as they go to the client (the server fast path
/// writes them as they are): hop-by-hop ones out, `Content-Length` as framed.
#[derive(Debug)]
pub struct RawFields {
    /// `name: value` CRLF each.
    pub lines: Bytes,
    /// The `Content-Length` among them, when the body is framed by it.
    pub length: Option<u64>,
    /// A `Date` is among them.
    pub date: bool,
}

impl Seen {
    /// Notes what `name: value` says about framing; false for a hop-by-hop
    /// header (RFC 9110 §7.6.1), which does not go on to the client.
    fn note(&mut self, name: &[u8], value: &[u8]) -> bool {
        let tokens = || value.split(|&c| c == b',').map(<[u8]>::trim_ascii);
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        match name.len() {
            14 if is("content-length") => {
                self.lengths += 1;
                self.length_list |= value.contains(&b',');
            }
            17 if is("transfer-encoding") => {
                // The last line's last coding decides.
                self.chunked = Some(
                    tokens()
                        .next_back()
                        .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")),
                );
            }
            10 if is("connection") => {
                for t in tokens().filter(|t| !t.is_empty()) {
                    self.close |= t.eq_ignore_ascii_case(b"close");
                    self.names |= !t.eq_ignore_ascii_case(b"keep-alive");
                }
            }
            _ => {}
        }
        super::super::headers::hop_by_hop_name(name) == 0
    }
}

/// Whether one of the `Connection` values in `head` at `at` names `name` (but
/// `keep-alive`, hop-by-hop anyway).
fn listed(head: &[u8], at: &Fields, name: &[u8]) -> bool {
    at.iter()
        .filter(|(n, _)| head[n.clone()].eq_ignore_ascii_case(b"connection"))
        .flat_map(|(_, v)| head[v.clone()].split(|&c| c == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(name))
}

/// The lines of the fields in `keep` (a bit per field of `at`) as one slice of
/// `head`, if they are one run of whole lines, each ending in CRLF; else `None`
/// (they are copied then).
fn contiguous(head: &Bytes, at: &Fields, keep: u128) -> Option<Bytes> {
    if keep == 0 {
        return Some(Bytes::new());
    }
    let first = keep.trailing_zeros() as usize;
    let run = keep >> first;
    if run & (run + 1) != 0 {
        return None;
    }
    let last = first + run.count_ones() as usize - 1;
    for i in first..=last {
        // From the end of this value to the next name, or past the line's end.
        let to = at.get(i + 1).map_or(at[i].1.end + 2, |n| n.0.start);
        let gap = head.get(at[i].1.end..to)?;
        let line_ends = gap.iter().filter(|&&c| c == b'\r' || c == b'\n').count();
        if !gap.ends_with(b"\r\n") || line_ends != 2 {
            return None;
        }
    }
    let end = at[last].1.end + 2;
    Some(head.slice(at[first].0.start..end))
}

/// Where a head's names and values are.
type Fields = Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>;

impl<T: AsyncRead + AsyncWrite + Unpin> Conn<T> {
    /// Reads more into the read buffer: the number of bytes (0: end of stream).
    pub(super) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < self.read_size / 2 {
            self.rbuf.reserve(self.read_size);
        }
        let room = self.rbuf.capacity() - self.rbuf.len();
        let n = std::task::ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.rbuf
        ))?;
        self.got |= n > 0;
        // Adaptive, as hyper's read strategy: a read that filled its room asks
        // for more next time (a bulk body: fewer, larger reads), a short one
        // for less.
        self.read_size = if n >= room {
            (self.read_size * 2).min(MAX_READ)
        } else if n < self.read_size / 4 {
            (self.read_size / 2).max(READ_SIZE)
        } else {
            self.read_size
        };
        Poll::Ready(Ok(n))
    }

    /// Sends the request queued by [`Conn::start`] and reads the response head;
    /// the body is read with [`Conn::poll_frame`].
    pub fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<()>, UpError>> {
        loop {
            // What came is read first: a backend that answered early and closed
            // (a 413 to an upload) fails the next write, and its answer still
            // goes to the client.
            match self.parse_head() {
                Ok(Some(r)) => {
                    // Let go, so that the head's buffer is reused.
                    self.resend = None;
                    return Poll::Ready(Ok(r));
                }
                Ok(None) => {}
                Err(e) => {
                    self.broken = true;
                    return Poll::Ready(Err(e));
                }
            }
            // (An i/o error stops the upload; the answer, if one comes, is read.)
            if let Err(e @ (UpError::Body(_) | UpError::Invalid(_))) = self.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if self.rbuf.len() >= MAX_HEAD {
                self.broken = true;
                return Poll::Ready(Err(UpError::Invalid("response head too large")));
            }
            match self.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    self.broken = true;
                    return Poll::Ready(Err(if self.got {
                        UpError::Invalid("closed in the response head")
                    } else {
                        UpError::Closed
                    }));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    self.broken = true;
                    return Poll::Ready(Err(self.closed_or(e)));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// A complete response head from the read buffer, if there is one (interim
    /// 1xx responses are taken off and skipped).
    fn parse_head(&mut self) -> Result<Option<Response<()>>, UpError> {
        loop {
            if self.rbuf.is_empty() {
                return Ok(None);
            }
            // Left uninitialized: httparse fills what it uses (3 KiB of slots
            // zeroed per response otherwise).
            let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut []);
            let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut parsed,
                &self.rbuf,
                &mut slots,
            ) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(UpError::Invalid("too many response headers"))
                }
                Err(_) => return Err(UpError::Invalid("malformed response head")),
            };
            let code = parsed.code.unwrap_or(0);
            let version = match parsed.version {
                Some(1) => Version::HTTP_11,
                _ => Version::HTTP_10,
            };
            if (100..200).contains(&code) && code != 101 {
                self.rbuf.advance(len);
                continue;
            }
            if code == 101 {
                return Err(UpError::Invalid(
                    "101 to a request that asked for no upgrade",
                ));
            }
            let status =
                StatusCode::from_u16(code).map_err(|_| UpError::Invalid("bad status code"))?;
            // Where each name and value is in the head, which is then cut off
            // the buffer: the values are slices of it, not copies. (A list kept
            // with the connection: no allocation per response.)
            let base = self.rbuf.as_ptr() as usize;
            self.at.clear();
            self.at.extend(parsed.headers.iter().map(|h| {
                let name = h.name.as_ptr() as usize - base;
                let value = h.value.as_ptr() as usize - base;
                (name..name + h.name.len(), value..value + h.value.len())
            }));
            let head = self.rbuf.split_to(len).freeze();
            let mut seen = Seen::default();
            let mut keep = 0u128;
            for (i, (name, value)) in self.at.iter().enumerate() {
                if seen.note(&head[name.clone()], &head[value.clone()]) {
                    keep |= 1 << i;
                }
            }
            if seen.names {
                for (i, (name, _)) in self.at.iter().enumerate() {
                    if keep & (1 << i) != 0 && listed(&head, &self.at, &head[name.clone()]) {
                        keep &= !(1 << i);
                    }
                }
            }
            let (down, length) = self.framing(status, version, &seen, &head)?;
            let fields = keep.count_ones() as usize;
            self.down = down;
            let mut r = Response::new(());
            *r.status_mut() = status;
            *r.version_mut() = version;
            if self.raw_fields && length == Length::Keep {
                if let Some(lines) = contiguous(&head, &self.at, keep) {
                    // The kept lines are one run of the head as it came (nginx's
                    // only hop-by-hop line, `Connection: keep-alive`, is its
                    // last): a slice of it, no copy.
                    let date = self.at.iter().enumerate().any(|(i, (n, _))| {
                        keep & (1 << i) != 0 && head[n.clone()].eq_ignore_ascii_case(b"date")
                    });
                    self.at.clear();
                    self.fields = Some(self.raw(status, length, &seen, lines, date));
                    return Ok(Some(r));
                }
            }
            let kept = self
                .at
                .drain(..)
                .enumerate()
                .filter(|(i, _)| keep & (1 << i) != 0)
                .map(|(_, f)| f);
            if self.raw_fields {
                // The lines as they came, for the server fast path to write.
                let mut w = bytes::BytesMut::with_capacity(len);
                let mut date = false;
                for (name, value) in kept {
                    let n = &head[name];
                    if n.eq_ignore_ascii_case(b"content-length") && length != Length::Keep {
                        continue;
                    }
                    date |= n.eq_ignore_ascii_case(b"date");
                    w.extend_from_slice(n);
                    w.extend_from_slice(b": ");
                    w.extend_from_slice(&head[value]);
                    w.extend_from_slice(b"\r\n");
                }
                if let Length::Set(n) = length {
                    w.extend_from_slice(b"content-length: ");
                    w.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                    w.extend_from_slice(b"\r\n");
                }
                self.fields = Some(self.raw(status, length, &seen, w.freeze(), date));
                return Ok(Some(r));
            }
            let mut headers = HeaderMap::with_capacity(fields);
            for (name, value) in kept {
                let name = HeaderName::from_bytes(&head[name])
                    .map_err(|_| UpError::Invalid("bad header name"))?;
                let value = HeaderValue::from_maybe_shared(head.slice(value))
                    .map_err(|_| UpError::Invalid("bad header value"))?;
                headers.append(name, value);
            }
            match length {
                Length::Keep => {}
                Length::Drop => {
                    headers.remove(header::CONTENT_LENGTH);
                }
                Length::Set(n) => {
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
                }
            }
            *r.headers_mut() = headers;
            return Ok(Some(r));
        }
    }

    /// The response's fields as bytes (`lines`), with the length the client's
    /// answer is framed by.
    fn raw(
        &self,
        status: StatusCode,
        length: Length,
        seen: &Seen,
        lines: Bytes,
        date: bool,
    ) -> RawFields {
        let framed = match (length, self.down) {
            (Length::Set(n), _) => Some(n),
            (Length::Keep, Down::Length(n)) => Some(n),
            (Length::Keep, Down::Done) if seen.lengths > 0 => Some(0),
            _ => None,
        };
        // (A HEAD, 204 or 304 response's length is not the framing's: its line
        // goes as it came, and the client's answer has no body.)
        let bodiless =
            self.head_req || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        RawFields {
            lines,
            length: framed.filter(|_| !bodiless),
            date,
        }
    }

    /// The response body's framing (RFC 9112 §6.3), what becomes of its
    /// `Content-Length` lines, and whether the connection stays open after it.
    fn framing(
        &mut self,
        status: StatusCode,
        version: Version,
        seen: &Seen,
        head: &[u8],
    ) -> Result<(Down, Length), UpError> {
        self.keep_alive = version == Version::HTTP_11 && !seen.close;
        if self.head_req || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            return Ok((Down::Done, Length::Keep));
        }
        if let Some(chunked) = seen.chunked {
            if version == Version::HTTP_10 {
                // Not for an HTTP/1.0 message (RFC 9112 §6.1), as hyper has it.
                return Err(UpError::Invalid(
                    "Transfer-Encoding in an HTTP/1.0 response",
                ));
            }
            let mut length = Length::Keep;
            if seen.lengths > 0 {
                // Both: the coding wins (RFC 9112 §6.3), and the connection is
                // not trusted after it.
                length = Length::Drop;
                self.keep_alive = false;
            }
            if chunked {
                return Ok((Down::ChunkSize, length));
            }
            self.keep_alive = false;
            return Ok((Down::Close, length));
        }
        if seen.lengths == 0 {
            self.keep_alive = false;
            return Ok((Down::Close, Length::Keep));
        }
        let mut len = None;
        let values = self
            .at
            .iter()
            .filter(|(n, _)| head[n.clone()].eq_ignore_ascii_case(b"content-length"))
            .map(|(_, v)| &head[v.clone()]);
        for v in values {
            for t in v.split(|&c| c == b',') {
                let t = t.trim_ascii();
                let n = std::str::from_utf8(t)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or(UpError::Invalid("bad Content-Length"))?;
                if len.is_some_and(|l| l != n) {
                    return Err(UpError::Invalid("differing Content-Length values"));
                }
                len = Some(n);
            }
        }
        let n = len.ok_or(UpError::Invalid("bad Content-Length"))?;
        // One value goes on (`5, 5` or two lines of it: the same length).
        let length = if seen.lengths > 1 || seen.length_list {
            Length::Set(n)
        } else {
            Length::Keep
        };
        Ok((if n == 0 { Down::Done } else { Down::Length(n) }, length))
    }

    /// The whole response body has been read.
    pub fn body_done(&self) -> bool {
        self.down == Down::Done
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.down {
            Down::Length(n) => SizeHint::with_exact(n),
            Down::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    /// The next frame of the response body (the request body keeps going up
    /// meanwhile, if the backend answered before it ended).
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpError>>> {
        // The rest of an upload the backend no longer reads (it answered and
        // closed) stops; its answer is read on.
        if let Err(e @ (UpError::Body(_) | UpError::Invalid(_))) = self.poll_send(cx) {
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            match self.down {
                Down::Done => return Poll::Ready(None),
                Down::Length(n) if !self.rbuf.is_empty() => {
                    let (d, left) = self.take(n);
                    self.down = match left {
                        0 => Down::Done,
                        left => Down::Length(left),
                    };
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Down::Close if !self.rbuf.is_empty() => {
                    let d = self.rbuf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Down::ChunkData(n) if !self.rbuf.is_empty() => {
                    let (d, left) = self.take(n);
                    self.down = match left {
                        0 => Down::ChunkEnd,
                        left => Down::ChunkData(left),
                    };
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Down::ChunkSize => match self.chunk_size() {
                    Ok(Some(size)) => {
                        self.down = if size == 0 {
                            Down::Trailers
                        } else {
                            Down::ChunkData(size)
                        };
                        continue;
                    }
                    Ok(None) => {}
                    Err(failed) => return failed,
                },
                Down::ChunkEnd if self.rbuf.len() >= 2 => {
                    if &self.rbuf[..2] != b"\r\n" {
                        return self.fail("bad chunk end");
                    }
                    self.rbuf.advance(2);
                    self.down = Down::ChunkSize;
                    continue;
                }
                Down::Trailers => match self.trailers() {
                    Ok(Some(t)) => {
                        self.down = Down::Done;
                        if !t.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::trailers(t))));
                        }
                        return Poll::Ready(None);
                    }
                    Ok(None) => {}
                    Err(failed) => return failed,
                },
                _ => {}
            }
            // More bytes needed.
            match std::task::ready!(self.poll_fill(cx)) {
                Ok(0) if self.down == Down::Close => {
                    self.down = Down::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return self.fail("response body cut short"),
                Ok(_) => {}
                Err(e) => {
                    self.broken = true;
                    return Poll::Ready(Some(Err(UpError::Io(e))));
                }
            }
        }
    }

    /// Up to `n` bytes from the read buffer, and how many of `n` are left.
    fn take(&mut self, n: u64) -> (Bytes, u64) {
        let k = (self.rbuf.len() as u64).min(n);
        (self.rbuf.split_to(k as usize).freeze(), n - k)
    }

    fn fail(&mut self, why: &'static str) -> Failed {
        self.broken = true;
        self.down = Down::Done;
        Poll::Ready(Some(Err(UpError::Invalid(why))))
    }

    /// A chunk-size line from the read buffer (`chunk-size [; ext] CRLF`), if a
    /// whole one is there.
    fn chunk_size(&mut self) -> Result<Option<u64>, Failed> {
        let nl = memchr::memchr(b'\n', &self.rbuf[..self.rbuf.len().min(MAX_CHUNK_LINE + 1)]);
        let Some(nl) = nl else {
            if self.rbuf.len() > MAX_CHUNK_LINE {
                return Err(self.fail("chunk size line too long"));
            }
            return Ok(None);
        };
        let line = &self.rbuf[..nl];
        let Some(line) = line.strip_suffix(b"\r") else {
            return Err(self.fail("bad chunk size line"));
        };
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let rest = &line[digits..];
        let rest_ok = rest
            .iter()
            .position(|&b| b == b';')
            .map_or(rest, |i| &rest[..i])
            .iter()
            .all(|&b| b == b' ' || b == b'\t');
        if digits == 0 || digits > 16 || !rest_ok {
            return Err(self.fail("bad chunk size"));
        }
        let size = line[..digits].iter().fold(0u64, |n, &b| {
            (n << 4) | u64::from((b as char).to_digit(16).unwrap_or(0))
        });
        self.rbuf.advance(nl + 1);
        Ok(Some(size))
    }

    /// The trailer section after the last chunk, if all of it is there.
    fn trailers(&mut self) -> Result<Option<HeaderMap>, Failed> {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let (len, fields) = match httparse::parse_headers(&self.rbuf, &mut slots) {
            Ok(httparse::Status::Complete((n, fields))) => (n, fields),
            Ok(httparse::Status::Partial) if self.rbuf.len() < MAX_HEAD => return Ok(None),
            _ => return Err(self.fail("bad trailers")),
        };
        let mut t = HeaderMap::new();
        let mut bad = false;
        for f in fields.iter() {
            match (
                HeaderName::from_bytes(f.name.as_bytes()),
                HeaderValue::from_bytes(f.value),
            ) {
                (Ok(k), Ok(v)) => {
                    t.append(k, v);
                }
                _ => {
                    bad = true;
                    break;
                }
            }
        }
        if bad {
            return Err(self.fail("bad trailer"));
        }
        self.rbuf.advance(len);
        Ok(Some(t))
    }
}
