//! Follows the HTTP/1.1 request heads in a client's byte stream for the one
//! request-smuggling case hyper lets through: a head with both `Content-Length`
//! and `Transfer-Encoding` (hyper drops the length, treats the body as chunked
//! and closes after the response; RFC 9112 §6.1 lets a server refuse it, and
//! flowgate does, as HAProxy does).
//!
//! It only looks at line starts, a line at a time across reads, and skips a
//! `Content-Length` body to find the next pipelined head. After a chunked body it
//! is lost until the connection is quiet again ([`HeadScan::resync`]). Pure.

/// The scanner's place in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    Head,
    /// Inside a body of this many bytes still to come.
    Body(u64),
    /// Inside a chunked body (or after a head it could not read): waits for
    /// `resync`.
    Lost,
}

#[derive(Debug)]
pub struct HeadScan {
    at: At,
    /// The number (from 1) of the head being read.
    head: u64,
    /// The start of the current line, lower case (kept only for a line that
    /// starts with `c` or `t`: only those can be either header).
    line: [u8; 40],
    len: usize,
    /// Whether the current line is kept in `line`.
    keep: bool,
    cl: Option<u64>,
    cl_bad: bool,
    te: bool,
    /// A line of the current head (its request line) has been read: an empty
    /// line before that is one a server skips (RFC 9112 §2.2), as httparse
    /// does, not a head of its own.
    started: bool,
}

impl Default for HeadScan {
    fn default() -> Self {
        HeadScan::new()
    }
}

impl HeadScan {
    /// At the start of a connection: the next bytes are head 1.
    pub fn new() -> HeadScan {
        HeadScan {
            at: At::Head,
            head: 1,
            line: [0; 40],
            len: 0,
            keep: false,
            cl: None,
            cl_bad: false,
            te: false,
            started: false,
        }
    }

    /// Nothing is in flight and `next` heads will have come once these bytes are
    /// a request: if lost, start over there.
    pub fn resync(&mut self, next: u64) {
        if self.at == At::Lost {
            *self = HeadScan {
                head: next,
                ..HeadScan::new()
            };
        }
    }

    /// Feeds the next bytes of the stream; returns the number of the first head
    /// in them that had both headers.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Option<u64> {
        let mut found = None;
        while !bytes.is_empty() {
            match self.at {
                At::Lost => return found,
                At::Body(n) => {
                    let skip = (n as usize).min(bytes.len());
                    bytes = &bytes[skip..];
                    let left = n - skip as u64;
                    self.at = if left == 0 { At::Head } else { At::Body(left) };
                }
                At::Head => {
                    // A line (or the part of it in these bytes) at a time.
                    let nl = memchr::memchr(b'\n', bytes);
                    let (mut part, rest) = match nl {
                        Some(i) => (&bytes[..i], &bytes[i + 1..]),
                        None => (bytes, &[][..]),
                    };
                    bytes = rest;
                    if self.len == 0 {
                        // CRs before anything else on a line are not counted:
                        // a CR LF line (or a bare LF) ends the head.
                        while let [b'\r', more @ ..] = part {
                            part = more;
                        }
                    }
                    if self.len == 0 {
                        if let Some(b) = part.first() {
                            self.keep = matches!(b.to_ascii_lowercase(), b'c' | b't');
                        }
                    }
                    // Only the first bytes of a line are kept (lower case).
                    if self.keep {
                        let from = self.len.min(self.line.len());
                        for (d, b) in self.line[from..].iter_mut().zip(part) {
                            *d = b.to_ascii_lowercase();
                        }
                    }
                    self.len += part.len();
                    if nl.is_some() {
                        if self.len > 0 {
                            self.end_of_line();
                        } else if self.started {
                            if let Some(n) = self.end_of_head() {
                                found = found.or(Some(n));
                            }
                        }
                    }
                }
            }
        }
        found
    }

    fn end_of_line(&mut self) {
        self.started = true;
        if !std::mem::take(&mut self.keep) {
            self.len = 0;
            return;
        }
        let line = &self.line[..self.len.min(self.line.len())];
        if let Some(v) = line.strip_prefix(b"content-length:") {
            let v = std::str::from_utf8(v).unwrap_or("").trim();
            match v.parse::<u64>() {
                Ok(n) if self.len <= self.line.len() => self.cl = Some(n),
                _ => self.cl_bad = true,
            }
        }
        self.te |= line.starts_with(b"transfer-encoding:");
        self.len = 0;
    }

    fn end_of_head(&mut self) -> Option<u64> {
        let verdict = (self.cl.is_some() || self.cl_bad) && self.te;
        let n = self.head;
        self.at = if self.te || self.cl_bad {
            At::Lost
        } else {
            match self.cl {
                Some(len) if len > 0 => At::Body(len),
                _ => At::Head,
            }
        };
        self.head += 1;
        self.cl = None;
        self.cl_bad = false;
        self.te = false;
        self.started = false;
        verdict.then_some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::HeadScan;

    fn scan(parts: &[&[u8]]) -> Option<u64> {
        let mut s = HeadScan::new();
        parts.iter().find_map(|p| s.feed(p))
    }

    #[test]
    fn both_lengths_are_seen_across_reads() {
        assert_eq!(
            scan(&[
                b"POST / HTTP/1.1\r\nContent-Len",
                b"gth: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ]),
            Some(1)
        );
        assert_eq!(
            scan(&[b"POST / HTTP/1.1\nTRANSFER-ENCODING: chunked\ncontent-length: 1\n\n"]),
            Some(1)
        );
        assert_eq!(
            scan(&[b"GET / HTTP/1.1\r\nX-Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"]),
            None
        );
    }

    #[test]
    fn empty_lines_before_a_request_line_are_not_a_head() {
        // httparse (the fast path's and hyper's parser) skips them, so the
        // head with both lengths is request 1, and after a body, request 2.
        assert_eq!(
            scan(&[b"\r\nPOST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"]),
            Some(1)
        );
        assert_eq!(
            scan(&[
                b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nok\r\n\n",
                b"\r\nPOST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ]),
            Some(2)
        );
    }

    #[test]
    fn a_body_is_not_a_head() {
        assert_eq!(
            scan(&[b"POST / HTTP/1.1\r\nContent-Length: 44\r\n\r\ntransfer-encoding: x\r\ncontent-length: 1\r\n\r\n"]),
            None
        );
    }

    #[test]
    fn pipelined_heads_are_followed() {
        // A bodiless head, a Content-Length body, then the smuggling head (3rd).
        let stream: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPOST /c HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(scan(&[stream]), Some(3));
        // Byte by byte, the same.
        let mut s = HeadScan::new();
        let found: Vec<u64> = stream.iter().filter_map(|b| s.feed(&[*b])).collect();
        assert_eq!(found, [3]);
    }

    #[test]
    fn any_split_of_the_stream_gives_the_same_verdicts() {
        let streams: [&[u8]; 4] = [
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcPOST /c HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"\r\r\nGET / HTTP/1.1\r\nX-A-Very-Long-Header-Name-Beyond-Forty-Bytes: 1\r\n\r\nPOST / HTTP/1.1\nCONTENT-LENGTH: 2\ntransfer-encoding: chunked\n\n",
            b"POST / HTTP/1.1\r\nContent-Length: 12345678901234567890123\r\nTransfer-Encoding: x\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\ncontent-length:1\r\n\r\nxGET / HTTP/1.1\r\ncontent-length: 0\r\ntransfer-encoding: chunked\r\n\r\n",
        ];
        // (The second stream's leading empty line is skipped, not a head.)
        let verdicts: [&[u64]; 4] = [&[3], &[2], &[1], &[4]];
        let mut seed = 7u64;
        for (stream, verdict) in streams.into_iter().zip(verdicts) {
            let whole: Vec<u64> = {
                let mut s = HeadScan::new();
                stream.iter().filter_map(|b| s.feed(&[*b])).collect()
            };
            assert_eq!(whole, verdict, "{:?}", String::from_utf8_lossy(stream));
            assert_eq!(HeadScan::new().feed(stream), whole.first().copied());
            for _ in 0..200 {
                let mut s = HeadScan::new();
                let mut found = Vec::new();
                let mut rest = stream;
                while !rest.is_empty() {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let n = 1 + (seed >> 33) as usize % rest.len();
                    found.extend(s.feed(&rest[..n]));
                    rest = &rest[n..];
                }
                assert_eq!(found, whole, "{:?}", String::from_utf8_lossy(stream));
            }
        }
    }

    #[test]
    fn lost_after_a_chunked_body_until_resync() {
        let mut s = HeadScan::new();
        assert_eq!(
            s.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            None
        );
        // Still lost: this is not read as a head.
        assert_eq!(
            s.feed(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            None
        );
        s.resync(3);
        assert_eq!(
            s.feed(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(3)
        );
    }
}
