//! h2c at the frame level: what flowgate's HTTP/2 layer answers to clients
//! that break the protocol (RFC 9113), spoken over a raw socket so that any
//! frame can be sent.

use super::*;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const FRAME_SIZE_ERROR: u32 = 0x6;
const CANCEL: u32 = 0x8;
const COMPRESSION_ERROR: u32 = 0x9;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A request head as HPACK literals (no Huffman coding, no table): GET on
/// `path`, with `extra` fields.
fn get_block(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    // :method GET (static 2), :scheme http (static 6).
    let mut b = vec![0x82, 0x86];
    let lit = |b: &mut Vec<u8>, s: &[u8]| {
        assert!(s.len() < 127);
        b.push(s.len() as u8);
        b.extend_from_slice(s);
    };
    // :path and :authority, literal without indexing, name indexed (4, 1).
    b.push(0x04);
    lit(&mut b, path.as_bytes());
    b.push(0x01);
    lit(&mut b, b"h2.test");
    for (n, v) in extra {
        b.push(0x00);
        lit(&mut b, n.as_bytes());
        lit(&mut b, v.as_bytes());
    }
    b
}

struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

/// A frame read: type, flags, stream, payload.
type Frame = (u8, u8, u32, Vec<u8>);

impl Raw {
    /// Connected, with the preface and an empty SETTINGS sent.
    async fn open(l: SocketAddr) -> Raw {
        let mut r = Raw::bare(l).await;
        r.send(&frame(SETTINGS, 0, 0, &[])).await;
        r
    }

    /// Connected, with only the preface sent.
    async fn bare(l: SocketAddr) -> Raw {
        let mut s = TcpStream::connect(l).await.unwrap();
        s.write_all(PREFACE).await.unwrap();
        Raw { s, buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        // The server may close first; what it said is read after.
        let _ = self.s.write_all(bytes).await;
    }

    /// The next frame; `None` once the server closed.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = (self.buf[0] as usize) << 16
                    | (self.buf[1] as usize) << 8
                    | self.buf[2] as usize;
                if self.buf.len() >= 9 + len {
                    let f: Vec<u8> = self.buf.drain(..9 + len).collect();
                    let stream = u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff;
                    return Some((f[3], f[4], stream, f[9..].to_vec()));
                }
            }
            let mut chunk = [0u8; 16384];
            let n = tokio::time::timeout(LIVENESS, self.s.read(&mut chunk))
                .await
                .expect("the server neither sent a frame nor closed")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads until a frame `want` matches; fails if the connection ends first.
    async fn until(&mut self, what: &str, want: impl Fn(&Frame) -> bool) -> Frame {
        let mut seen = Vec::new();
        while let Some(f) = self.next().await {
            if want(&f) {
                return f;
            }
            seen.push((f.0, f.1, f.2));
        }
        panic!("closed before {what}; frames (type, flags, stream): {seen:?}");
    }

    /// The GOAWAY's error code; the connection must close after it.
    async fn goaway(&mut self) -> u32 {
        let f = self.until("GOAWAY", |f| f.0 == GOAWAY).await;
        while let Some(more) = self.next().await {
            assert_ne!(more.0, HEADERS, "a response after GOAWAY for an error");
        }
        u32::from_be_bytes([f.3[4], f.3[5], f.3[6], f.3[7]])
    }
}

fn error_code(payload: &[u8]) -> u32 {
    u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
}

/// A fresh connection to `l` gets a GET answered.
async fn serves(l: SocketAddr) {
    let mut c = Raw::open(l).await;
    c.send(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &get_block("/after", &[]),
    ))
    .await;
    c.until("the response", |f| is_200(f, 1)).await;
}

/// A 200 response's HEADERS on `stream` (`:status 200` is static entry 8).
fn is_200(f: &Frame, stream: u32) -> bool {
    f.0 == HEADERS && f.2 == stream && f.3.first() == Some(&0x88)
}

/// One backend behind listener "l" (HTTP/1.1 upstream, `extra` in the
/// listener's table): the backend, flowgate and the listener's address.
async fn served(extra: &str) -> (Py, Flowgate, SocketAddr) {
    let py = Py::start(1).await;
    let fg = start(&one_pool(
        &py,
        extra,
        "upstream_protocol = \"http1\"",
        false,
    ));
    let l = fg.local_addr("l").unwrap();
    (py, fg, l)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_protocol_errors_end_the_connection_with_goaway() {
    let (_py, _fg, l) = served("").await;
    let settings = |id: u16, v: u32| {
        let mut p = id.to_be_bytes().to_vec();
        p.extend_from_slice(&v.to_be_bytes());
        frame(SETTINGS, 0, 0, &p)
    };
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "a frame past SETTINGS_MAX_FRAME_SIZE",
            frame(DATA, 0, 1, &vec![0; 20_000]),
            FRAME_SIZE_ERROR,
        ),
        (
            "an HPACK index past both tables",
            frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0xff, 0x7f]),
            COMPRESSION_ERROR,
        ),
        (
            "DATA on an idle stream",
            frame(DATA, 0, 1, b"x"),
            PROTOCOL_ERROR,
        ),
        (
            "a stream opened with an even number",
            frame(HEADERS, END_HEADERS | END_STREAM, 2, &get_block("/", &[])),
            PROTOCOL_ERROR,
        ),
        (
            "CONTINUATION without HEADERS",
            frame(CONTINUATION, END_HEADERS, 1, &get_block("/", &[])),
            PROTOCOL_ERROR,
        ),
        (
            "SETTINGS_INITIAL_WINDOW_SIZE past 2^31-1",
            settings(0x4, 1 << 31),
            FLOW_CONTROL_ERROR,
        ),
        (
            "SETTINGS_MAX_FRAME_SIZE below 16384",
            settings(0x5, 100),
            PROTOCOL_ERROR,
        ),
        (
            "a connection WINDOW_UPDATE of 0",
            frame(WINDOW_UPDATE, 0, 0, &0u32.to_be_bytes()),
            PROTOCOL_ERROR,
        ),
        (
            "PING of 7 bytes",
            frame(PING, 0, 0, &[0; 7]),
            FRAME_SIZE_ERROR,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut c = Raw::open(l).await;
        c.send(&bytes).await;
        assert_eq!(c.goaway().await, code, "{what}");
    }
    // A first frame other than SETTINGS.
    let mut c = Raw::bare(l).await;
    c.send(&frame(PING, 0, 0, &[0; 8])).await;
    assert_eq!(c.goaway().await, PROTOCOL_ERROR, "PING before SETTINGS");
    // The listener serves on.
    serves(l).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_h2c_request_resets_only_its_stream() {
    let (py, _fg, l) = served("max_header_bytes = 8192").await;
    let mut c = Raw::open(l).await;
    let malformed: [(&str, Vec<u8>); 6] = [
        (
            "an uppercase field name",
            get_block("/", &[("X-Upper", "1")]),
        ),
        (
            "a connection-specific field",
            get_block("/", &[("connection", "close")]),
        ),
        ("TE other than trailers", get_block("/", &[("te", "gzip")])),
        (
            "a Content-Length not all digits",
            get_block("/", &[("content-length", "0x0")]),
        ),
        (
            "differing Content-Lengths",
            get_block("/", &[("content-length", "0"), ("content-length", "5")]),
        ),
        // :method GET, :scheme http, :authority; no :path.
        ("no :path", vec![0x82, 0x86, 0x01, 0x01, b'h']),
    ];
    let mut id = 1;
    for (what, block) in &malformed {
        c.send(&frame(HEADERS, END_HEADERS | END_STREAM, id, block))
            .await;
        let f = c.until(what, |f| f.2 == id).await;
        assert_eq!(
            (f.0, error_code(&f.3)),
            (RST_STREAM, PROTOCOL_ERROR),
            "{what}"
        );
        id += 2;
    }
    // A head over max_header_bytes gets 431, its stream only.
    let big = "v".repeat(120);
    let names: Vec<String> = (0..100).map(|i| format!("f{i}")).collect();
    let fields: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), big.as_str())).collect();
    c.send(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        id,
        &get_block("/", &fields),
    ))
    .await;
    let f = c.until("the 431", |f| f.2 == id).await;
    assert_eq!(f.0, HEADERS);
    assert!(f.3.windows(3).any(|w| w == b"431"), "{:?}", f.3);
    id += 2;
    // PING is answered with its payload.
    c.send(&frame(PING, 0, 0, b"12345678")).await;
    let f = c.until("PING ack", |f| f.0 == PING).await;
    assert_eq!((f.1, f.3.as_slice()), (0x1, &b"12345678"[..]));
    // The connection serves a good request after all that.
    c.send(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        id,
        &get_block("/ok", &[]),
    ))
    .await;
    c.until("the response", |f| is_200(f, id)).await;
    let seen = py.seen(0).await;
    assert_eq!(
        seen,
        vec!["GET /ok".to_string()],
        "only the good request went up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_floods_and_rapid_resets_get_enhance_your_calm() {
    let (_py, _fg, l) = served("").await;
    // A header block that never ends (the CONTINUATION flood): cut off once
    // it is far past max_header_bytes, not read for ever.
    let mut c = Raw::open(l).await;
    let mut flood = frame(HEADERS, 0, 1, &get_block("/", &[]));
    for _ in 0..200 {
        flood.extend(frame(CONTINUATION, 0, 1, &[0x40; 16_000]));
    }
    c.send(&flood).await;
    assert_eq!(c.goaway().await, ENHANCE_YOUR_CALM, "CONTINUATION flood");
    // The same with empty CONTINUATION frames, which add no bytes.
    let mut c = Raw::open(l).await;
    let mut flood = frame(HEADERS, 0, 1, &get_block("/", &[]));
    for _ in 0..5000 {
        flood.extend(frame(CONTINUATION, 0, 1, &[]));
    }
    c.send(&flood).await;
    assert_eq!(
        c.goaway().await,
        ENHANCE_YOUR_CALM,
        "empty CONTINUATION flood"
    );
    // Streams opened and reset at once, thousands of them (CVE-2023-44487).
    let mut c = Raw::open(l).await;
    let mut batch = Vec::new();
    for i in 0..3000u32 {
        let id = 1 + 2 * i;
        batch.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            id,
            &get_block("/slow?do=sleep&ms=5000", &[]),
        ));
        batch.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
    }
    c.send(&batch).await;
    assert_eq!(c.goaway().await, ENHANCE_YOUR_CALM, "rapid reset");
    // Others are served.
    serves(l).await;
}

/// A graceful shutdown's GOAWAY comes in two (RFC 9113 §6.8): the first
/// names no last stream, and a request the client sends before it answers the
/// PING that goes with it is still served; the final one names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_as_the_shutdown_began_is_still_served() {
    let (py, fg, l) = served("").await;
    let mut c = Raw::open(l).await;
    c.send(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &get_block("/first?do=sleep&ms=500", &[]),
    ))
    .await;
    let mut reached = false;
    for _ in 0..500 {
        if py.seen(0).await.iter().any(|s| s.contains("/first")) {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(reached, "the first request reached the backend");
    let shutdown = tokio::spawn(fg.clone().shutdown());
    let f = c.until("the first GOAWAY", |f| f.0 == GOAWAY).await;
    let last = |p: &[u8]| u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff;
    assert_eq!(
        last(&f.3),
        0x7fff_ffff,
        "the first GOAWAY names no last stream"
    );
    let ping = c.until("the PING", |f| f.0 == PING && f.1 == 0).await;
    // A request the client sent before it saw the GOAWAY.
    c.send(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        3,
        &get_block("/second", &[]),
    ))
    .await;
    c.send(&frame(PING, 0x1, 0, &ping.3)).await;
    let mut statuses = Vec::new();
    let mut final_last = None;
    while let Some(f) = c.next().await {
        if f.0 == GOAWAY {
            final_last = Some(last(&f.3));
        }
        if f.0 == HEADERS {
            statuses.push((f.2, is_200(&f, f.2)));
        }
    }
    assert_eq!(final_last, Some(3), "the final GOAWAY names stream 3");
    statuses.sort();
    assert_eq!(
        statuses,
        vec![(1, true), (3, true)],
        "both streams answered"
    );
    let all_finished = tokio::time::timeout(LIVENESS, shutdown)
        .await
        .expect("shutdown ends")
        .unwrap();
    assert!(
        all_finished,
        "every session finished within shutdown_timeout"
    );
}

/// The backend's JSON answers (method, target, body length and sha256, the
/// fields it got) on each stream, read until every stream in `streams` ended.
async fn answers(c: &mut Raw, streams: &[u32]) -> Vec<(u32, serde_json::Value)> {
    let mut bodies: std::collections::HashMap<u32, Vec<u8>> = Default::default();
    let mut ended = Vec::new();
    while ended.len() < streams.len() {
        let f = c.next().await.expect("the connection stays open");
        match f.0 {
            HEADERS => assert!(is_200(&f, f.2), "stream {} not 200: {:?}", f.2, f.3),
            DATA => bodies.entry(f.2).or_default().extend_from_slice(&f.3),
            RST_STREAM | GOAWAY => panic!("{f:?}"),
            _ => {}
        }
        if (f.0 == DATA || f.0 == HEADERS) && f.1 & END_STREAM != 0 {
            ended.push(f.2);
        }
    }
    let mut v: Vec<(u32, serde_json::Value)> = bodies
        .into_iter()
        .map(|(id, b)| (id, serde_json::from_slice(&b).expect("the backend's JSON")))
        .collect();
    v.sort_by_key(|(id, _)| *id);
    v
}

/// Request bodies go up whole and framed by their length, however their DATA
/// came: with the head in one write (taken as one piece), after it (streamed),
/// or in padded and tiny frames mixed with a large one (copied together in
/// order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_request_bodies_go_up_whole_however_their_frames_came() {
    let (_py, _fg, l) = served("").await;
    let post = |path: &str, len: usize| {
        let n = len.to_string();
        let mut b = get_block(path, &[("content-length", &n)]);
        b[0] = 0x83; // :method POST
        b
    };
    let json = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let mut c = Raw::open(l).await;
    // Stream 1: head and body in one write.
    let mut w = frame(HEADERS, END_HEADERS, 1, &post("/whole", json.len()));
    w.extend(frame(DATA, END_STREAM, 1, json));
    c.send(&w).await;
    let got = answers(&mut c, &[1]).await;
    // Stream 3: the body after a pause.
    c.send(&frame(HEADERS, END_HEADERS, 3, &post("/later", json.len())))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.send(&frame(DATA, END_STREAM, 3, json)).await;
    let got3 = answers(&mut c, &[3]).await;
    // Stream 5: a padded frame, a tiny one, a large one, a tiny last one.
    let big: Vec<u8> = (0..6000u32).map(|i| (i % 251) as u8).collect();
    let mut body = Vec::new();
    let mut w = Vec::new();
    let mut padded = vec![3u8];
    padded.extend_from_slice(b"pad");
    padded.extend_from_slice(&[0, 0, 0]);
    body.extend_from_slice(b"pad");
    w.extend(frame(DATA, 0x8, 5, &padded));
    body.extend_from_slice(b"t");
    w.extend(frame(DATA, 0, 5, b"t"));
    body.extend_from_slice(&big);
    w.extend(frame(DATA, 0, 5, &big));
    body.extend_from_slice(b"end");
    w.extend(frame(DATA, END_STREAM, 5, b"end"));
    let mut all = frame(HEADERS, END_HEADERS, 5, &post("/mixed", body.len()));
    all.extend(w);
    c.send(&all).await;
    let got5 = answers(&mut c, &[5]).await;
    for ((_, v), (target, b)) in got.iter().chain(&got3).chain(&got5).zip([
        ("/whole", &json[..]),
        ("/later", json),
        ("/mixed", &body),
    ]) {
        assert_eq!(v["method"], "POST", "{v}");
        assert_eq!(v["target"], target, "{v}");
        assert_eq!(v["body_len"], b.len(), "{v}");
        assert_eq!(v["sha256"], hex(&Sha256::digest(b)), "{v}");
        assert_eq!(sent(v, "content-length"), [b.len().to_string()], "{v}");
    }
}

/// A stream the client resets in the same read that opened it starts no work
/// (its request never reaches a backend), and streams opened after the
/// client's GOAWAY are refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_at_once_or_past_goaway_streams_reach_no_backend() {
    let (py, _fg, l) = served("").await;
    let mut c = Raw::open(l).await;
    let mut w = frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &get_block("/reset", &[]),
    );
    w.extend(frame(RST_STREAM, 0, 1, &CANCEL.to_be_bytes()));
    c.send(&w).await;
    c.send(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        3,
        &get_block("/after", &[]),
    ))
    .await;
    c.until("the response", |f| is_200(f, 3)).await;
    assert_eq!(py.seen(0).await, vec!["GET /after".to_string()]);
    // The client goes away while a stream is in flight; a stream it opens
    // after that is refused, and the one in flight completes.
    c.send(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        5,
        &get_block("/slow?do=sleep&ms=700", &[]),
    ))
    .await;
    c.send(&frame(GOAWAY, 0, 0, &[0, 0, 0, 5, 0, 0, 0, 0]))
        .await;
    c.send(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        7,
        &get_block("/late", &[]),
    ))
    .await;
    let f = c.until("the refusal", |f| f.2 == 7).await;
    assert_eq!((f.0, error_code(&f.3)), (RST_STREAM, 0x7), "REFUSED_STREAM");
    c.until("the slow response", |f| is_200(f, 5)).await;
    let seen = py.seen(0).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        !seen
            .iter()
            .any(|s| s.contains("/reset") || s.contains("/late")),
        "{seen:?}"
    );
}
