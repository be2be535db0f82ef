//! The fast path's head parse, its chunk lines, and its byte edits held to the
//! `HeaderMap` ones.

use super::*;
use crate::proxy::http::prepare;
use crate::proxy::http::raw::Framing;
use hyper::header::HeaderValue;

#[test]
fn chunk_lines_are_hex() {
    let mut b = [0u8; 18];
    for (len, want) in [
        (0usize, "0\r\n"),
        (1, "1\r\n"),
        (15, "f\r\n"),
        (16, "10\r\n"),
        (0x1234, "1234\r\n"),
    ] {
        let n = chunk_line(&mut b, len);
        assert_eq!(&b[..n], want.as_bytes());
    }
}

#[test]
fn simple_and_other_heads() {
    let mut b = BytesMut::from(&b"GET /a?b HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\nGET"[..]);
    match parse(&mut b) {
        Head::Simple(r, a) => {
            assert_eq!(r.uri, "/a?b");
            assert_eq!(r.host(), Some(&b"x"[..]));
            assert!(a.trailers && !a.head && !a.http10);
        }
        _ => panic!("not simple"),
    }
    assert_eq!(&b[..], b"GET");
    assert!(matches!(parse(&mut b), Head::Partial));
    // A body that came whole with its head is the fast path's, taken off the
    // buffer with it; what follows stays.
    let mut b = BytesMut::from(&b"POST /c HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET"[..]);
    match parse(&mut b) {
        Head::Simple(r, _) => assert_eq!(&r.body[..], b"hello"),
        _ => panic!("not simple"),
    }
    assert_eq!(&b[..], b"GET");
    // Not all of the body read yet: a little is looked for once more (the
    // buffer as it was), more goes to hyper, which streams it.
    let short = b"POST / HTTP/1.1\r\nContent-Length: 6\r\n\r\nhello";
    let mut b = BytesMut::from(&short[..]);
    assert!(matches!(parse(&mut b), Head::Short(1)));
    assert_eq!(&b[..], short, "left as it was");
    for other in [
        &b"POST / HTTP/1.1\r\nContent-Length: 16390\r\n\r\nhello"[..],
        // A length written any other way than plain digits: hyper's to judge.
        b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nContent-Length: 1234567890123\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
        b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
        b"CONNECT a:1 HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nA : b\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
    ] {
        let mut b = BytesMut::from(other);
        assert!(
            matches!(parse(&mut b), Head::Other),
            "{:?}",
            String::from_utf8_lossy(other)
        );
        assert_eq!(&b[..], other, "left as it was");
    }
    // A whole head past 8 KiB is hyper's (its 431), left as it came.
    let big = format!(
        "GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(MAX_FAST_HEAD)
    );
    let mut b = BytesMut::from(big.as_bytes());
    assert!(matches!(parse(&mut b), Head::Other));
    assert_eq!(&b[..], big.as_bytes());
    let mut b = BytesMut::from(&b"HEAD / HTTP/1.0\r\nContent-Length: 0\r\n\r\n"[..]);
    assert!(matches!(
        parse(&mut b),
        Head::Simple(
            _,
            Answer {
                head: true,
                http10: true,
                ..
            }
        )
    ));
}

/// The fast path's edits on the head's bytes ([`RawHead::encode_up`]) leave
/// the fields the `HeaderMap` edits leave (hyper's path): the same names and
/// values, whatever the order.
#[test]
fn raw_edits_match_the_header_map_edits() {
    use crate::config::Xff;
    let ip = HeaderValue::from_static("10.0.0.9");
    let heads = [
        "GET /a HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, x-secret\r\nX-Secret: 1\r\nTE: gzip, trailers\r\nX-Forwarded-For: 1.2.3.4\r\nx-forwarded-for:  5.6.7.8 \r\nProxy-Authorization: y\r\nKeep-Alive: 5\r\nAccept: */*\r\n\r\n",
        "GET /b?q HTTP/1.1\r\nhost: Y.example:8080\r\nX-Request-Id: abc\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: h\r\nX-Forwarded-For:\r\n\r\n",
        "HEAD / HTTP/1.1\r\nConnection: close\r\nclose: 1\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 0\r\n\r\n",
        "GET / HTTP/1.0\r\nUser-Agent: t\r\n\r\n",
        "DELETE /c HTTP/1.1\r\nHost: z\r\nConnection: X-Request-Id\r\nX-Request-Id: gone\r\nTE: gzip\r\n\r\n",
        "GET /d HTTP/1.1\r\nHost: w\r\nConnection: host, te, x-forwarded-for\r\nTE: trailers\r\nX-Forwarded-For: 9.9.9.9\r\n\r\n",
    ];
    // `name: value` lines, names in lower case, the request's id as `<id>`.
    fn lines(fields: impl Iterator<Item = (String, String)>, id: &str) -> Vec<(String, String)> {
        let mut v: Vec<_> = fields
            .map(|(n, v)| {
                let n = n.to_ascii_lowercase();
                let v = if n == "x-request-id" && v == id {
                    "<id>".into()
                } else {
                    v
                };
                (n, v)
            })
            .collect();
        v.sort();
        v
    }
    for head in heads {
        for xff in [Xff::Off, Xff::Append, Xff::Replace] {
            let mut b = BytesMut::from(head.as_bytes());
            let Head::Simple(raw, _) = parse(&mut b) else {
                panic!("not simple: {head:?}");
            };
            // hyper's path, as forward::prepare does it.
            let req = raw.clone().into_request().expect("a hyper request");
            let mut h = req.headers().clone();
            let authority = h.get(header::HOST).cloned().filter(|v| v.to_str().is_ok());
            headers::strip_hop_by_hop(&mut h, false);
            headers::forwarded(&mut h, xff, &ip, authority.as_ref());
            let map_id = headers::request_id(&mut h);
            if !h.contains_key(header::HOST) {
                if let Some(v) = authority {
                    h.insert(header::HOST, v);
                }
            }
            let want = lines(
                h.iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap().to_string())),
                map_id.to_str().unwrap(),
            );
            // The bytes, from the fast path's fields and from the request's
            // `HeaderMap` (a request hyper read).
            let mut w = BytesMut::new();
            let id = raw.encode_up(&mut w, None, xff, &ip);
            let (parts, _) = req.into_parts();
            let target = raw.uri.to_string();
            let mut w2 = BytesMut::new();
            let id2 =
                prepare::encode_h1(&mut w2, &parts, target.as_bytes(), Framing::None, xff, &ip);
            for (w, id) in [(&w, &id), (&w2, &id2)] {
                let (line, got) = encoded(w, id);
                assert_eq!(line, format!("{} {target} HTTP/1.1", raw.method));
                assert_eq!(got, want, "{head:?} with {xff:?}:\n{w:?}");
                // A client's id is kept, else one is made (for the log too).
                assert_eq!(
                    *id == map_id,
                    head.contains("X-Request-Id: abc"),
                    "{head:?}: {id:?} {map_id:?}"
                );
            }
        }
    }
}

/// A head `encode_up` wrote: its request line, and its `name: value` lines as
/// `lines` has them in the test above (the id `<id>`).
fn encoded(w: &[u8], id: &HeaderValue) -> (String, Vec<(String, String)>) {
    let text = std::str::from_utf8(w).unwrap();
    assert!(text.ends_with("\r\n\r\n"), "{text:?}");
    let mut it = text.split("\r\n");
    let line = it.next().unwrap().to_string();
    let mut v: Vec<(String, String)> = it
        .take_while(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(": ").unwrap_or((l, ""));
            let n = n.to_ascii_lowercase();
            let v = if n == "x-request-id" && v.as_bytes() == id.as_bytes() {
                "<id>"
            } else {
                v
            };
            (n, v.to_string())
        })
        .collect();
    v.sort();
    (line, v)
}

/// A request whose authority is in its target (absolute form; HTTP/2's
/// `:authority`) goes up with that authority as Host, in place of the
/// client's, and as X-Forwarded-Host; the body's framing is written when asked.
#[test]
fn an_authority_in_the_target_becomes_host() {
    use crate::config::Xff;
    let ip = HeaderValue::from_static("10.0.0.9");
    let mut req = hyper::Request::new(());
    *req.method_mut() = Method::POST;
    *req.uri_mut() = "http://api.example:8080/v1/x?q=1".parse().unwrap();
    *req.version_mut() = hyper::Version::HTTP_2;
    let h = req.headers_mut();
    h.insert(header::HOST, HeaderValue::from_static("other"));
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    h.insert("proxy-authorization", HeaderValue::from_static("s"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    let (parts, _) = req.into_parts();
    let mut w = BytesMut::new();
    let id = prepare::encode_h1(
        &mut w,
        &parts,
        b"/x?q=1",
        Framing::Chunked,
        Xff::Append,
        &ip,
    );
    let (line, got) = encoded(&w, &id);
    assert_eq!(line, "POST /x?q=1 HTTP/1.1");
    let want: Vec<(String, String)> = [
        ("content-type", "application/grpc"),
        ("host", "api.example:8080"),
        ("te", "trailers"),
        ("transfer-encoding", "chunked"),
        ("x-forwarded-for", "10.0.0.9"),
        ("x-forwarded-host", "api.example:8080"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "<id>"),
    ]
    .iter()
    .map(|(n, v)| (n.to_string(), v.to_string()))
    .collect();
    assert_eq!(got, want, "{w:?}");
}

/// A body's framing in the head is flowgate's: the client's Content-Length goes
/// only without a body (even when `Connection` names it, it cannot leave a body
/// unframed), `Content-Length: n` or `Transfer-Encoding: chunked` with one.
#[test]
fn a_body_is_framed_by_flowgate() {
    use crate::config::Xff;
    let ip = HeaderValue::from_static("10.0.0.9");
    let mut req = hyper::Request::new(());
    *req.method_mut() = Method::POST;
    *req.uri_mut() = "/up".parse().unwrap();
    let h = req.headers_mut();
    h.insert(header::HOST, HeaderValue::from_static("app"));
    h.insert(
        header::CONNECTION,
        HeaderValue::from_static("content-length"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("34"));
    let (parts, _) = req.into_parts();
    let framing = |w: &BytesMut| -> Vec<String> {
        let text = std::str::from_utf8(w).unwrap();
        text.split("\r\n")
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                l.starts_with("content-length:") || l.starts_with("transfer-encoding:")
            })
            .map(str::to_string)
            .collect()
    };
    for (body, want) in [
        (Framing::Length(34), vec!["content-length: 34"]),
        (Framing::Chunked, vec!["transfer-encoding: chunked"]),
        // No body: the client's line as `Connection` left it (named: gone).
        (Framing::None, vec![]),
    ] {
        let mut w = BytesMut::new();
        prepare::encode_h1(&mut w, &parts, b"/up", body, Xff::Off, &ip);
        assert_eq!(framing(&w), want, "{body:?}: {w:?}");
    }
}
