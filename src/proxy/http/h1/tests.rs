//! The codec against raw bytes from a real loopback socket (what a backend
//! could send, byte for byte).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use hyper::{Method, Response, Version};

use super::*;

/// A connection whose backend reads the request head, then writes `reply`
/// (and closes if `close`); returns the connection and the head it read.
#[allow(clippy::disallowed_methods)] // the backend's task, in a test
async fn exchange(
    method: Method,
    reply: &'static [u8],
    close: bool,
) -> (Conn<TcpStream>, tokio::task::JoinHandle<Vec<u8>>) {
    exchange_as(method, reply, close, false).await
}

/// [`exchange`], the request sent as bytes with the response's fields kept as
/// bytes when `raw` (the server fast path's way).
#[allow(clippy::disallowed_methods)] // the backend's task, in a test
async fn exchange_as(
    method: Method,
    reply: &'static [u8],
    close: bool,
    raw: bool,
) -> (Conn<TcpStream>, tokio::task::JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let backend = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1024];
        while !head.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut b).await.unwrap();
            assert!(n > 0, "closed in the request head");
            head.extend_from_slice(&b[..n]);
        }
        // In small pieces: the codec must put them together.
        for piece in reply.chunks(7) {
            s.write_all(piece).await.unwrap();
            s.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        if !close {
            // Held open until the client is done.
            let _ = s.read(&mut b).await;
        }
        head
    });
    let mut c = Conn::new(TcpStream::connect(addr).await.unwrap());
    // Without `raw`, the response's fields go into a `HeaderMap` (for a client
    // hyper serves).
    let head = format!("{method} /p?q=1 HTTP/1.1\r\nhost: b\r\n\r\n");
    c.start_raw(Bytes::from(head), method == Method::HEAD, raw);
    (c, backend)
}

async fn head(c: &mut Conn<TcpStream>) -> Result<Response<()>, UpError> {
    std::future::poll_fn(|cx| c.poll_head(cx)).await
}

/// The body's data and trailers, or the error that ended it.
async fn body(c: &mut Conn<TcpStream>) -> Result<(Vec<u8>, Option<HeaderMap>), UpError> {
    let (mut data, mut trailers) = (Vec::new(), None);
    while let Some(f) = std::future::poll_fn(|cx| c.poll_frame(cx)).await {
        match f?.into_data() {
            Ok(d) => data.extend_from_slice(&d),
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    Ok((data, trailers))
}

#[tokio::test]
async fn a_length_body_comes_whole_and_the_connection_is_kept() {
    let (mut c, backend) = exchange(
        Method::GET,
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-A: 1\r\n\r\nhello world",
        false,
    )
    .await;
    let r = head(&mut c).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-a"], "1");
    assert_eq!(c.size_hint().exact(), Some(11));
    assert_eq!(body(&mut c).await.unwrap().0, b"hello world");
    assert!(c.reusable());
    drop(c);
    let sent = String::from_utf8(backend.await.unwrap()).unwrap();
    assert_eq!(sent, "GET /p?q=1 HTTP/1.1\r\nhost: b\r\n\r\n");
}

#[tokio::test]
async fn chunked_with_extensions_and_trailers() {
    let (mut c, _b) = exchange(
        Method::GET,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nGrpc-Status: 0\r\n\r\n",
        false,
    )
    .await;
    head(&mut c).await.unwrap();
    let (data, trailers) = body(&mut c).await.unwrap();
    assert_eq!(data, b"hello world");
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    assert!(c.reusable());
}

#[tokio::test]
async fn interim_responses_are_skipped() {
    let (mut c, _b) = exchange(
        Method::GET,
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        false,
    )
    .await;
    assert_eq!(head(&mut c).await.unwrap().status(), 204);
    assert!(c.body_done());
}

#[tokio::test]
async fn a_head_response_has_no_body() {
    let (mut c, _b) = exchange(
        Method::HEAD,
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
        false,
    )
    .await;
    let r = head(&mut c).await.unwrap();
    assert_eq!(r.headers()["content-length"], "100");
    assert!(c.body_done());
    assert!(c.reusable());
}

#[tokio::test]
async fn transfer_encoding_wins_over_content_length_and_the_connection_closes_after() {
    let (mut c, _b) = exchange(
        Method::GET,
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        false,
    )
    .await;
    let r = head(&mut c).await.unwrap();
    assert!(!r.headers().contains_key("content-length"));
    assert_eq!(body(&mut c).await.unwrap().0, b"hello");
    assert!(!c.reusable());
}

#[tokio::test]
async fn broken_framing_is_an_error() {
    for reply in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 3x\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n bad: fold\r\n\r\na",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
    ] {
        let (mut c, _b) = exchange(Method::GET, reply, false).await;
        let e = head(&mut c)
            .await
            .expect_err(&String::from_utf8_lossy(reply));
        assert!(matches!(e, UpError::Invalid(_)), "{e:?}");
        assert!(!c.reusable());
    }
    for reply in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n",
    ] {
        let (mut c, _b) = exchange(Method::GET, reply, true).await;
        head(&mut c).await.unwrap();
        let e = body(&mut c)
            .await
            .expect_err(&String::from_utf8_lossy(reply));
        assert!(matches!(e, UpError::Invalid(_)), "{e:?}");
        assert!(!c.reusable());
    }
}

#[tokio::test]
async fn repeated_lengths_go_on_as_one_and_http_1_0_has_no_codings() {
    let (mut c, _b) = exchange(
        Method::GET,
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\nhello",
        false,
    )
    .await;
    let r = head(&mut c).await.unwrap();
    let lengths: Vec<_> = r.headers().get_all("content-length").iter().collect();
    assert_eq!(lengths, ["5"]);
    assert_eq!(body(&mut c).await.unwrap().0, b"hello");
    let (mut c, _b) = exchange(
        Method::GET,
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        false,
    )
    .await;
    assert!(matches!(head(&mut c).await, Err(UpError::Invalid(_))));
    // A chunk-size line longer than the limit, whole or not.
    static LONG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let long = LONG.get_or_init(|| {
        let mut v = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;".to_vec();
        v.extend(std::iter::repeat_n(b'x', MAX_CHUNK_LINE + 10));
        v.extend_from_slice(b"\r\na\r\n0\r\n\r\n");
        v
    });
    let (mut c, _b) = exchange(Method::GET, long, true).await;
    head(&mut c).await.unwrap();
    assert!(matches!(body(&mut c).await, Err(UpError::Invalid(_))));
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_and_one_until_close_is_not() {
    let (mut c, _b) = exchange(
        Method::GET,
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        true,
    )
    .await;
    head(&mut c).await.unwrap();
    assert!(body(&mut c).await.is_err());
    let (mut c, _b) = exchange(Method::GET, b"HTTP/1.1 200 OK\r\n\r\nuntil close", true).await;
    head(&mut c).await.unwrap();
    assert_eq!(body(&mut c).await.unwrap().0, b"until close");
    assert!(!c.reusable());
}

#[tokio::test]
async fn closed_before_any_byte_is_closed_and_connection_close_is_not_reused() {
    let (mut c, _b) = exchange(Method::GET, b"", true).await;
    assert!(matches!(head(&mut c).await, Err(UpError::Closed)));
    let (mut c, _b) = exchange(Method::GET, b"HTTP/1.1 200", true).await;
    assert!(matches!(head(&mut c).await, Err(UpError::Invalid(_))));
    let (mut c, _b) = exchange(
        Method::GET,
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n",
        false,
    )
    .await;
    head(&mut c).await.unwrap();
    assert!(c.body_done() && !c.reusable());
    let (mut c, _b) = exchange(
        Method::GET,
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        false,
    )
    .await;
    assert_eq!(head(&mut c).await.unwrap().version(), Version::HTTP_10);
    assert!(!c.reusable());
}

#[tokio::test]
async fn a_kept_connection_the_backend_closed_is_not_usable() {
    let (mut c, backend) = exchange(
        Method::GET,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        true,
    )
    .await;
    head(&mut c).await.unwrap();
    backend.await.unwrap();
    // The FIN has come (loopback): the probe read sees it.
    let mut usable = true;
    for _ in 0..100 {
        usable = std::future::poll_fn(|cx| Poll::Ready(c.poll_usable(cx))).await;
        if !usable {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(!usable);
}

/// The response's fields kept as bytes (the server fast path) are the fields the
/// `HeaderMap` gets: hop-by-hop ones and those `Connection` names out,
/// `Content-Length` as framed; with the framed length and whether a `Date` came.
#[tokio::test]
async fn raw_fields_match_the_header_map() {
    let cases: [(Method, &'static [u8], Option<u64>, bool); 6] = [
        // nginx's: the kept lines are one run (a slice of the head).
        (
            Method::GET,
            b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: d\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n",
            Some(3),
            true,
        ),
        (
            Method::GET,
            b"HTTP/1.1 200 OK\r\nServer: x\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\nKeep-Alive: t=5\r\nContent-Length: 3\r\n\r\nabc",
            Some(3),
            false,
        ),
        (
            Method::GET,
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nDate: d\r\ncontent-length: 3, 3\r\n\r\nabc",
            Some(3),
            true,
        ),
        (
            Method::GET,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\nX-A: 1\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            None,
            false,
        ),
        (
            Method::HEAD,
            b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\nX-B: 2\r\n\r\n",
            None,
            false,
        ),
        (
            Method::GET,
            b"HTTP/1.1 204 No Content\r\nX-C: 3\r\nProxy-Thing: y\r\n\r\n",
            None,
            false,
        ),
    ];
    fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
        v.sort();
        v
    }
    for (method, reply, length, date) in cases {
        let what = String::from_utf8_lossy(reply);
        let (mut c, _b) = exchange_as(method.clone(), reply, true, false).await;
        let r = head(&mut c).await.unwrap();
        let want = sorted(
            r.headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
                .collect(),
        );
        let want_body = body(&mut c).await.unwrap().0;
        let (mut c, _b) = exchange_as(method, reply, true, true).await;
        let r = head(&mut c).await.unwrap();
        assert!(r.headers().is_empty(), "{what}: {:?}", r.headers());
        let f = c.take_fields().expect("fields as bytes");
        let lines = std::str::from_utf8(&f.lines).unwrap();
        let got = sorted(
            lines
                .split_terminator("\r\n")
                .map(|l| {
                    let (n, v) = l.split_once(": ").unwrap();
                    (n.to_ascii_lowercase(), v.to_string())
                })
                .collect(),
        );
        assert_eq!(got, want, "{what}");
        assert_eq!((f.length, f.date), (length, date), "{what}");
        assert_eq!(body(&mut c).await.unwrap().0, want_body, "{what}");
    }
}
