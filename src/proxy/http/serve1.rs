//! The HTTP/1.1 server fast path: a bodiless request (GET, HEAD, DELETE, ... with
//! no `Content-Length` but `0`, no `Transfer-Encoding`, no `Upgrade`, no
//! `Expect`), or one whose body, framed by one `Content-Length` of plain digits,
//! came whole in the same reads as its head (a JSON POST to an inference
//! server), is read, handed to [`super::forward::handle`] and answered here,
//! without a hyper connection. Everything else (a chunked body, one not all
//! read yet, a WebSocket handshake, `Expect: 100-continue`, CONNECT, a head
//! httparse refuses or one over 8 KiB) goes to hyper's server with the bytes
//! read so far, as before: its answers (400, 431) and its defences stay as they
//! were. A body is never waited for here: when a little of it is missing, the
//! socket is read once more without waiting (a client that writes head and body
//! apart has usually sent both); what has still not arrived streams through
//! hyper.
//!
//! Why: per request, hyper's server (its dispatcher, head parser and encoder)
//! was about a third of flowgate's instructions on a kept-alive HTTP/1.1 client
//! (docs/performance.md). The head is parsed with httparse, as hyper does, into
//! uninitialized slots; names and values are slices of the read buffer.
//!
//! The response is written as hyper writes it: `HTTP/1.1`, the headers as they
//! are, `Date` when absent, `Content-Length` from the body when it knows its
//! length, else chunked (close-delimited for an HTTP/1.0 client), trailers only
//! to a client that sent `TE: trailers`, and no body for HEAD, 1xx, 204 and 304.
//! The head goes out with the body's first frame when that is ready at once (one
//! `writev`); each later frame is written as it comes (no coalescing: an SSE
//! event is not held back).

use std::future::poll_fn;
use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame};
use hyper::header;
use hyper::{Method, Response, StatusCode, Uri, Version};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use super::body::OutBody;
use super::forward::ClientReq;
use super::h1::RawFields;
use super::headers;
use super::raw::{Field, Kind, RawHead};
use super::state::ConnCtx;

/// The client's socket (conn.rs's `ClientIo`, with its deadlines).
pub(super) trait Client: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Client for T {}

/// Headers in a request head (hyper's limit too): more goes to hyper, which
/// answers 431.
const MAX_HEADERS: usize = 100;

/// A head not complete within this many bytes goes to hyper (which answers 431
/// past `max_header_bytes`).
const MAX_FAST_HEAD: usize = 8192;

/// A body that had not all come with its head is looked for once more, without
/// waiting, if this much or less is missing: what a client wrote right after
/// the head (httpx, the OpenAI SDK's client, writes head and body apart) is
/// often in the socket already.
const MAX_FAST_BODY: usize = 16 * 1024;

/// How to answer a request, from its head.
#[derive(Debug, Clone, Copy)]
struct Answer {
    /// A HEAD request: no body in the answer.
    head: bool,
    /// An HTTP/1.0 client: a body of unknown length is delimited by the close.
    http10: bool,
    /// The client accepts trailers (`TE: trailers`).
    trailers: bool,
}

/// What the read buffer holds. (Used at once, never stored: no box.)
#[allow(clippy::large_enum_variant)] // returned and taken apart at once
enum Head {
    /// Not a whole head yet.
    Partial,
    /// A request the fast path serves, bodiless or with its whole body read
    /// (see [`parse`]); its head and body were taken off the buffer.
    Simple(RawHead, Answer),
    /// A head the fast path would serve but for this many bytes of its body,
    /// not read yet (at most [`MAX_FAST_BODY`]); the buffer left as it was.
    Short(usize),
    /// Anything else: hyper serves it.
    Other,
}

/// Parses the head at the start of `buf`.
fn parse(buf: &mut BytesMut) -> Head {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        // (A head past 8 KiB goes to hyper even when complete: its buffer answers
        // 431 there, as before.)
        Ok(httparse::Status::Complete(n)) if n <= MAX_FAST_HEAD => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_FAST_HEAD => return Head::Partial,
        _ => return Head::Other,
    };
    let version = match req.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Head::Other,
    };
    let Ok(method) = Method::from_bytes(req.method.unwrap_or("").as_bytes()) else {
        return Head::Other;
    };
    if method == Method::CONNECT {
        return Head::Other;
    }
    // A body that came whole with the head, by one `Content-Length` line of
    // plain digits (what a JSON POST to an inference server is), is served here
    // too: it goes upstream with the head, as it came. Anything else with a
    // body (chunked, not all read yet, a length written any other way), an
    // upgrade or `Expect` goes to hyper, the buffer left as it was.
    let mut answer = Answer {
        head: method == Method::HEAD,
        http10: version == Version::HTTP_10,
        trailers: false,
    };
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| {
        let from = s.as_ptr() as usize - base;
        from..from + s.len()
    };
    let mut length: Option<usize> = None;
    let mut hop = 0;
    let mut fields = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let kind = Kind::of(name);
        match kind {
            Kind::Hop(bit) => {
                if bit & (headers::TRANSFER_ENCODING | headers::UPGRADE) != 0 {
                    return Head::Other;
                }
                if bit == headers::TE {
                    answer.trailers |= headers::lists(h.value, "trailers");
                }
                hop |= bit;
            }
            Kind::ContentLength => {
                // Plain digits, at most 12 of them (no overflow, on any width).
                let n = match h.value {
                    v if length.is_some() || v.is_empty() || v.len() > 12 => return Head::Other,
                    v if !v.iter().all(u8::is_ascii_digit) => return Head::Other,
                    v => v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
                };
                let Ok(n) = usize::try_from(n) else {
                    return Head::Other;
                };
                length = Some(n);
            }
            Kind::Plain if name.eq_ignore_ascii_case(b"expect") => return Head::Other,
            _ => {}
        }
        fields.push(Field {
            name: at(name),
            value: at(h.value),
            kind,
        });
    }
    if let Some(n) = length.filter(|&n| n > buf.len() - len) {
        // Not all here yet: looked for once more if little is missing, else
        // hyper streams it.
        let missing = n - (buf.len() - len);
        return if missing <= MAX_FAST_BODY {
            Head::Short(missing)
        } else {
            Head::Other
        };
    }
    let target = at(req.path.unwrap_or("").as_bytes());
    let head = buf.split_to(len).freeze();
    let Ok(uri) = Uri::from_maybe_shared(head.slice(target.clone())) else {
        // What httparse let through but `http` refuses (rare): back to the
        // buffer, for hyper.
        let mut back = BytesMut::with_capacity(head.len() + buf.len());
        back.extend_from_slice(&head);
        back.extend_from_slice(buf);
        *buf = back;
        return Head::Other;
    };
    let body = match length {
        Some(n) if n > 0 => buf.split_to(n).freeze(),
        _ => Bytes::new(),
    };
    let raw = RawHead {
        bytes: head,
        method,
        version,
        uri,
        target,
        fields,
        hop,
        body,
    };
    Head::Simple(raw, answer)
}

/// What became of the bytes at the connection's read side.
pub(super) enum Fast {
    /// The client closed, failed or timed out (408 written) first.
    Closed,
    /// Requests were answered; whether the connection can take another (it was
    /// quiet for the park delay, or has bytes of the next request in `rbuf`).
    Served(bool),
    /// Not one for the fast path: hyper serves it, from the bytes in the buffer.
    Hyper,
}

/// Reads request heads into `rbuf` and answers those for the fast path, one
/// after the other while the client keeps sending: a busy client's requests
/// share this (boxed) state; one quiet for `park` gets [`Fast::Served`] back, and
/// its connection waits as a bare socket.
pub(super) async fn serve(
    io: &mut impl Client,
    rbuf: &mut BytesMut,
    ctx: &Arc<ConnCtx>,
    stop: &tokio_util::sync::CancellationToken,
    park: Duration,
) -> Fast {
    let mut between = Between::First;
    // Made once per busy spell, moved on lazily.
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    // The current head's body was looked for once more already.
    let mut looked = false;
    loop {
        if !rbuf.is_empty() {
            match parse(rbuf) {
                Head::Partial => {}
                Head::Other => return Fast::Hyper,
                Head::Short(_) if looked => return Fast::Hyper,
                Head::Short(missing) => {
                    // One read that does not wait: what is in the socket
                    // already. Whatever is still missing then, hyper streams.
                    looked = true;
                    rbuf.reserve(missing);
                    let read = poll_fn(|cx| {
                        Poll::Ready(tokio_util::io::poll_read_buf(
                            Pin::new(&mut *io),
                            cx,
                            &mut *rbuf,
                        ))
                    })
                    .await;
                    match read {
                        Poll::Ready(Ok(n)) if n > 0 => continue,
                        Poll::Ready(Err(_)) => return Fast::Closed,
                        // (The end of stream, or nothing yet: hyper sees to it.)
                        _ => return Fast::Hyper,
                    }
                }
                Head::Simple(req, answer) => {
                    looked = false;
                    let keep = exchange(io, rbuf, ctx, req, answer).await;
                    if !keep || ctx.state.close_after.load(Ordering::Relaxed) || stop.is_cancelled()
                    {
                        return Fast::Served(false);
                    }
                    between = match ctx.state.requests.load(Ordering::Relaxed) {
                        1 => Between::ParkNow,
                        _ => Between::ParkAt(Instant::now() + park),
                    };
                    continue;
                }
            }
        }
        room(rbuf);
        let read = poll_fn(|cx| {
            let r = tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, &mut *rbuf);
            if r.is_ready() || !rbuf.is_empty() {
                return r.map(Some);
            }
            // Between requests: quiet for `park` since the last answer, the
            // spell ends.
            let at = match between {
                Between::First => return Poll::Pending,
                Between::ParkNow => return Poll::Ready(None),
                Between::ParkAt(at) if at <= Instant::now() => return Poll::Ready(None),
                Between::ParkAt(at) => at,
            };
            let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if t.deadline() < at {
                t.as_mut().reset(at);
            }
            match t.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match read {
            None => return Fast::Served(true),
            Some(Ok(0) | Err(_)) => return Fast::Closed,
            Some(Ok(_)) => {}
        }
    }
}

/// Where a busy spell is between requests.
#[derive(Debug, Clone, Copy)]
enum Between {
    /// No answer yet: the first head is awaited (under ClientIo's deadlines).
    First,
    /// The connection's first request was answered: park as soon as nothing
    /// more is there (an SDK pool's connection typically waits long before its
    /// next), as conn.rs has it for hyper's.
    ParkNow,
    /// Park if nothing comes by then.
    ParkAt(Instant),
}

/// Room in the read buffer for the next read.
fn room(rbuf: &mut BytesMut) {
    if rbuf.capacity() - rbuf.len() < 256 {
        rbuf.reserve(1024);
    }
}

/// Answers one request (its body, if any, read): the handler's response, written as it comes.
/// While the handler waits, the client is watched: bytes it sends (a pipelined
/// request) are kept in `rbuf`, its end of stream leaves the answer to go (a
/// half-close), an error (a reset) drops the request. Whether the connection
/// can take another request.
async fn exchange(
    io: &mut impl Client,
    rbuf: &mut BytesMut,
    ctx: &Arc<ConnCtx>,
    req: RawHead,
    answer: Answer,
) -> bool {
    // (In the boxed state of [`serve`]: no allocation of its own.)
    let handled = super::forward::handle(ctx.clone(), ClientReq::Raw(req));
    tokio::pin!(handled);
    let mut watching = true;
    let resp = poll_fn(|cx| {
        if let Poll::Ready(r) = handled.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        while watching {
            if rbuf.len() >= MAX_FAST_HEAD {
                // Enough read ahead: the rest waits in the socket.
                watching = false;
                break;
            }
            room(rbuf);
            match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, &mut *rbuf) {
                Poll::Ready(Ok(0)) => watching = false,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(None),
                Poll::Pending => break,
            }
        }
        Poll::Pending
    })
    .await;
    match resp {
        Some(resp) => respond(io, ctx, resp, answer).await,
        None => false,
    }
}

/// How the response body is framed to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    /// Bytes still to write.
    Length(u64),
    Chunked,
    /// Until the close (an HTTP/1.0 client).
    Close,
}

/// Writes `resp` to the client; whether the connection can take another request
/// (false: it must close, having written all it could).
async fn respond(
    io: &mut impl Client,
    ctx: &Arc<ConnCtx>,
    resp: Response<OutBody>,
    answer: Answer,
) -> bool {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    // The backend's fields as bytes (an HTTP/1.1 backend's); then `h` holds only
    // what flowgate added.
    let raw = match &mut body {
        OutBody::Stream(b) => b.take_fields(),
        OutBody::Full(_) => None,
    };
    let h = &parts.headers;
    let mut close = ctx.state.close_after.load(Ordering::Relaxed)
        || super::headers::any_lists(h, header::CONNECTION, "close");
    let mut w = BytesMut::with_capacity(256);
    w.extend_from_slice(b"HTTP/1.1 ");
    w.extend_from_slice(status.as_str().as_bytes());
    w.extend_from_slice(b" ");
    w.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
    w.extend_from_slice(b"\r\n");
    if let Some(raw) = &raw {
        w.extend_from_slice(&raw.lines);
    }
    super::h1::put_fields(&mut w, h);
    // The length the head gives: `Some(None)` for one that is no number.
    let length = match &raw {
        Some(RawFields {
            length: Some(n), ..
        }) => Some(Some(*n)),
        _ => h.get(header::CONTENT_LENGTH).map(|v| {
            std::str::from_utf8(v.as_bytes())
                .ok()
                .and_then(|s| s.trim().parse().ok())
        }),
    };
    let bodiless = answer.head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut framing = if bodiless {
        Framing::None
    } else if let Some(n) = length {
        match n {
            Some(n) => Framing::Length(n),
            // (Not from the upstream clients, which check it.) The body as it
            // comes, then the close.
            None => {
                close = true;
                Framing::Close
            }
        }
    } else if let Some(n) = body.size_hint().exact() {
        w.extend_from_slice(b"content-length: ");
        w.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        w.extend_from_slice(b"\r\n");
        Framing::Length(n)
    } else if answer.http10 {
        close = true;
        Framing::Close
    } else {
        w.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    if !raw.as_ref().is_some_and(|r| r.date) && !h.contains_key(header::DATE) {
        w.extend_from_slice(b"date: ");
        date(&mut w);
        w.extend_from_slice(b"\r\n");
    }
    if close && !h.contains_key(header::CONNECTION) {
        w.extend_from_slice(b"connection: close\r\n");
    } else if answer.http10 && !close {
        w.extend_from_slice(b"connection: keep-alive\r\n");
    }
    w.extend_from_slice(b"\r\n");
    let mut head = Some(w.freeze());
    if framing == Framing::None {
        drop(body);
        let ok = write_all(io, &mut [&head.unwrap_or_default()])
            .await
            .is_ok();
        return ok && !close;
    }
    // A frame the body had ready at once after the last one (see below).
    let mut ready = None;
    loop {
        // The head goes with the first frame if that is ready at once.
        let frame = match ready.take() {
            Some(f) => f,
            None => match &head {
                Some(hd) => {
                    match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                        Poll::Ready(f) => f,
                        Poll::Pending => {
                            if write_all(io, &mut [hd]).await.is_err() {
                                return false;
                            }
                            head = None;
                            poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
                        }
                    }
                }
                None => poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await,
            },
        };
        let hd = head.take().unwrap_or_default();
        let r = match frame {
            Some(Ok(f)) => {
                // A chunk: if the body ended in the same read upstream (an SSE
                // stream's last event and its end), the last chunk goes in the
                // same write as it; no write of its own. Only what is there at
                // once: nothing waits.
                let next = if framing == Framing::Chunked && f.is_data() {
                    match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                        Poll::Ready(n) => Some(n),
                        Poll::Pending => None,
                    }
                } else {
                    None
                };
                if let Some(None) = next {
                    let d = f.into_data().unwrap_or_default();
                    let mut size = [0u8; 18];
                    let n = if d.is_empty() {
                        0
                    } else {
                        chunk_line(&mut size, d.len())
                    };
                    let crlf: &[u8] = if d.is_empty() { b"" } else { b"\r\n" };
                    write_all(io, &mut [&hd, &size[..n], &d, crlf, b"0\r\n\r\n"]).await
                } else {
                    ready = next;
                    match write_frame(io, &hd, f, &mut framing, answer).await {
                        Ok(true) => continue,
                        Ok(false) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
            }
            // The end: a length not reached is a cut response.
            None => match framing {
                Framing::Chunked => write_all(io, &mut [&hd, b"0\r\n\r\n"]).await,
                Framing::Length(0) | Framing::Close => write_all(io, &mut [&hd]).await,
                _ => Err(io::ErrorKind::UnexpectedEof.into()),
            },
            // The backend's body failed: the client sees the response cut off.
            Some(Err(_)) => {
                let _ = write_all(io, &mut [&hd]).await;
                Err(io::ErrorKind::UnexpectedEof.into())
            }
        };
        drop(body);
        return r.is_ok() && !close && framing != Framing::Close;
    }
}

/// Writes one frame (with `head` before it, if not yet written); Ok(false) once
/// the body is complete.
async fn write_frame(
    io: &mut impl Client,
    head: &[u8],
    f: Frame<Bytes>,
    framing: &mut Framing,
    answer: Answer,
) -> io::Result<bool> {
    let f = match f.into_data() {
        Ok(d) => {
            match framing {
                Framing::Length(left) => {
                    if d.len() as u64 > *left {
                        return Err(io::ErrorKind::InvalidData.into());
                    }
                    *left -= d.len() as u64;
                    write_all(io, &mut [head, &d]).await?;
                    // (The end is the body's `None`, or its last frame.)
                }
                Framing::Chunked if d.is_empty() => write_all(io, &mut [head]).await?,
                Framing::Chunked => {
                    let mut size = [0u8; 18];
                    let n = chunk_line(&mut size, d.len());
                    write_all(io, &mut [head, &size[..n], &d, b"\r\n"]).await?;
                }
                Framing::Close => write_all(io, &mut [head, &d]).await?,
                Framing::None => {}
            }
            return Ok(true);
        }
        Err(f) => f,
    };
    let Ok(trailers) = f.into_trailers() else {
        return Ok(true);
    };
    if *framing == Framing::Chunked {
        let mut w = BytesMut::with_capacity(64);
        w.extend_from_slice(b"0\r\n");
        if answer.trailers {
            super::h1::put_fields(&mut w, &trailers);
        }
        w.extend_from_slice(b"\r\n");
        write_all(io, &mut [head, &w]).await?;
        *framing = Framing::None;
        return Ok(false);
    }
    write_all(io, &mut [head]).await?;
    Ok(true)
}

/// `{len:x}\r\n` into `out`; its length.
fn chunk_line(out: &mut [u8; 18], len: usize) -> usize {
    let digits = ((usize::BITS - len.leading_zeros()).div_ceil(4)).max(1) as usize;
    for (i, d) in out[..digits].iter_mut().enumerate() {
        let shift = 4 * (digits - 1 - i);
        *d = b"0123456789abcdef"[(len >> shift) & 0xf];
    }
    out[digits] = b'\r';
    out[digits + 1] = b'\n';
    digits + 2
}

/// Writes all of `parts`, in as few `writev`s as the socket takes.
async fn write_all(io: &mut impl Client, parts: &mut [&[u8]]) -> io::Result<()> {
    let mut first = 0;
    loop {
        while first < parts.len() && parts[first].is_empty() {
            first += 1;
        }
        if first == parts.len() {
            return Ok(());
        }
        let mut slices = [IoSlice::new(&[]); 6];
        let k = (parts.len() - first).min(slices.len());
        for (s, p) in slices.iter_mut().zip(&parts[first..first + k]) {
            *s = IoSlice::new(p);
        }
        let mut n = poll_fn(|cx| Pin::new(&mut *io).poll_write_vectored(cx, &slices[..k])).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let take = n.min(parts[first].len());
            parts[first] = &parts[first][take..];
            n -= take;
            if parts[first].is_empty() {
                first += 1;
            }
        }
    }
}

/// The `Date` value, written.
fn date(w: &mut BytesMut) {
    super::headers::with_date(|d| w.extend_from_slice(d));
}

#[cfg(test)]
mod tests;
