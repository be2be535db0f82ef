//! The L7 mode (issue 11) end to end: `protocol = "http"` listeners in front of real
//! HTTP/1.1, h2c, WebSocket and gRPC servers on loopback, driven by real clients
//! (hyper's client, raw sockets, Python's http.client, h2load, nghttp, grpcio,
//! websockets).
//!
//! Backends are Python processes: tests/support/http_backend.py (several
//! ThreadingHTTPServers in one process, each recording the requests that reach it),
//! tests/support/ws_echo.py and tests/support/grpc_peer.py. Outcomes are asserted on
//! both sides: what the client got and what each backend saw. Timeouts are liveness
//! bounds, never assertions about speed (the only other clock checks are lower
//! bounds: a deadline did not fire early). SSE is checked in lockstep: the backend
//! writes each event only once the client has acknowledged the one before, so an
//! event held back stalls the stream.

mod common;
#[path = "http/h2_frames.rs"]
mod h2_frames;

use std::net::SocketAddr;
use std::pin::Pin;
use std::process::Stdio;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use flowgate::Flowgate;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Frame, SizeHint};
use hyper::client::conn::http1;
use hyper::Request;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// How long something that should happen "at once" may take before the test fails.
const LIVENESS: Duration = Duration::from_secs(10);

/// A file under tests/support.
fn support(file: &str) -> String {
    format!("{}/tests/support/{file}", env!("CARGO_MANIFEST_DIR"))
}

// ---- Backends ----

/// `n` HTTP/1.1 servers in one Python process (tests/support/http_backend.py).
/// Dropping it ends the process.
struct Py {
    _child: Child,
    addrs: Vec<SocketAddr>,
}

impl Py {
    async fn start(n: usize) -> Py {
        Py::start_with(n, &[]).await
    }

    /// `start` with more of http_backend.py's arguments.
    async fn start_with(n: usize, args: &[&str]) -> Py {
        let (child, words) = spawn_ready(
            Command::new("python3")
                .arg(support("http_backend.py"))
                .args(["--servers", &n.to_string()])
                .args(args),
            "python3 (apt-get install -y python3)",
        )
        .await;
        let addrs = words
            .iter()
            .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
            .collect::<Vec<SocketAddr>>();
        assert_eq!(addrs.len(), n);
        Py {
            _child: child,
            addrs,
        }
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.addrs[i]
    }

    /// Server `i`'s name in flowgate (and in its X-Backend header).
    fn name(&self, i: usize) -> String {
        self.addrs[i].to_string()
    }

    /// The requests ("METHOD TARGET") that reached server `i`, asked directly.
    async fn seen(&self, i: usize) -> Vec<String> {
        let r = get(self.addr(i), "/__seen", &[]).await;
        assert_eq!(r.status, 200, "{r:?}");
        serde_json::from_slice(&r.body).expect("a JSON list")
    }
}

/// Spawns `cmd` (stdin kept open: the child exits when it closes) and waits for its
/// "ready ..." line; returns the child and the words after "ready". `what` names the
/// tool to install when it cannot run.
async fn spawn_ready(cmd: &mut Command, what: &str) -> (Child, Vec<String>) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(LIVENESS * 3, out.read_line(&mut line))
        .await
        .unwrap_or_else(|_| panic!("{what}: no \"ready\" line in time"))
        .unwrap();
    let words = line
        .trim()
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("{what} did not start (see its stderr above): {line:?}"))
        .split(' ')
        .map(String::from)
        .collect();
    // Keep reading its stdout so that it never blocks on a full pipe.
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink).await;
    });
    (child, words)
}

// ---- Config ----

/// The top of every config; `[admin]` on port 0 when `admin` is set.
fn head(admin: bool) -> String {
    let mut s = String::from("[runtime]\nworkers = 2\nshutdown_timeout = \"5s\"\n");
    if admin {
        s += "\n[admin]\nbind = \"127.0.0.1:0\"\n";
    }
    s
}

/// An http listener `name` on port 0 with `extra` keys (its pool, timeouts...).
fn listener(name: &str, extra: &str) -> String {
    format!(
        "\n[[listeners]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\nconnect_timeout = \"2s\"\n{extra}\n"
    )
}

/// A `[[listeners.routes]]` of the listener above it.
fn route(host: Option<&str>, prefix: &str, pool: &str, extra: &str) -> String {
    let host = host.map_or(String::new(), |h| format!("host = \"{h}\"\n"));
    format!(
        "\n  [[listeners.routes]]\n{host}path_prefix = \"{prefix}\"\npool = \"{pool}\"\n{extra}\n"
    )
}

/// Pool `name`, round-robin over `addrs`, with `extra` keys.
fn pool(name: &str, addrs: &[String], extra: &str) -> String {
    let list: Vec<String> = addrs
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    format!(
        "\n[[pools]]\nname = \"{name}\"\nalgorithm = \"round-robin\"\nbackends = [ {} ]\n{extra}\n",
        list.join(", ")
    )
}

// ---- Clients ----

type Body = BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// An HTTP/1.1 client connection (hyper) to `addr`.
async fn client(addr: SocketAddr) -> http1::SendRequest<Body> {
    let s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).unwrap();
    let (send, conn) = http1::handshake(TokioIo::new(s)).await.expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// A request; `Host: test` unless `headers` has a Host.
fn request(method: &str, target: &str, headers: &[(&str, &str)], body: Body) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(target);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        b = b.header("host", "test");
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(body).unwrap()
}

/// A complete response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: hyper::HeaderMap,
    body: Bytes,
}

impl Reply {
    /// The body as http_backend.py's JSON.
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {self:?}"))
    }

    /// The X-Backend header ("" without one).
    fn backend(&self) -> String {
        self.header("x-backend")
    }

    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map_or(String::new(), |v| v.to_str().unwrap().to_string())
    }

    /// The request target the backend received.
    fn target(&self) -> String {
        self.json()["target"].as_str().unwrap().to_string()
    }

    /// The values of request header `name` as the backend received it.
    fn sent(&self, name: &str) -> Vec<String> {
        sent(&self.json(), name)
    }
}

/// The values of request header `name` in a backend's JSON answer.
fn sent(v: &serde_json::Value, name: &str) -> Vec<String> {
    v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|kv| kv[0].as_str().unwrap().eq_ignore_ascii_case(name))
        .map(|kv| kv[1].as_str().unwrap().to_string())
        .collect()
}

/// Sends `req` on `s` and reads the whole response.
async fn exchange(s: &mut http1::SendRequest<Body>, req: Request<Body>) -> Reply {
    tokio::time::timeout(LIVENESS, s.ready())
        .await
        .expect("connection ready in time")
        .expect("connection usable");
    let resp = tokio::time::timeout(LIVENESS * 3, s.send_request(req))
        .await
        .expect("response in time")
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(LIVENESS * 3, body.collect())
        .await
        .expect("body in time")
        .expect("complete body")
        .to_bytes();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// GET `target` on a new connection.
async fn get(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Reply {
    let mut s = client(addr).await;
    exchange(&mut s, request("GET", target, headers, empty())).await
}

/// Writes `bytes` on a new connection and reads until the server closes it (or
/// LIVENESS passes); returns what was read and whether it was closed.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // The server may answer and close before reading all of it.
    let _ = s.write_all(bytes).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(LIVENESS, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

/// The status code of a raw HTTP/1.1 response (0 when there is none).
fn status_of(resp: &str) -> u16 {
    resp.strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

// ---- 1. Routing ----

/// Backends and pools of the routing tests, by index.
const EXACT: usize = 0;
const WILD: usize = 1;
const V1: usize = 2;
const V1CHAT: usize = 3;
const STRIP: usize = 4;
const FALLBACK: usize = 5;
const ROUTING_POOLS: [&str; 6] = ["exact", "wild", "v1", "v1chat", "strip", "fallback"];

/// Six single-backend pools; listener "l" routes to them with "fallback" as its
/// pool, listener "n" has the same routes and no pool.
async fn routing() -> (Py, Flowgate) {
    let py = Py::start(6).await;
    let routes = [
        route(Some("api.example.com"), "/", "exact", ""),
        route(Some("*.example.com"), "/", "wild", ""),
        route(None, "/v1", "v1", ""),
        route(None, "/v1/chat", "v1chat", ""),
        route(None, "/p", "strip", "strip_prefix = true"),
    ]
    .concat();
    let mut cfg = head(false);
    cfg += &listener("l", "pool = \"fallback\"");
    cfg += &routes;
    cfg += &listener("n", "");
    cfg += &routes;
    for (i, name) in ROUTING_POOLS.iter().enumerate() {
        // The Python backends speak HTTP/1.1 only, also to h2c clients.
        cfg += &pool(name, &[py.name(i)], "upstream_protocol = \"http1\"");
    }
    (py, start(&cfg))
}

/// Sends GET `target` with `Host: host` and checks that backend `want` answered
/// 200 and received `want_target`.
async fn routed(
    py: &Py,
    addr: SocketAddr,
    host: &str,
    target: &str,
    want: usize,
    want_target: &str,
) {
    let r = get(addr, target, &[("host", host)]).await;
    assert_eq!(r.status, 200, "Host {host} {target}: {r:?}");
    assert_eq!(
        r.backend(),
        py.name(want),
        "Host {host} {target} should reach pool {}",
        ROUTING_POOLS[want]
    );
    assert_eq!(
        r.target(),
        want_target,
        "Host {host} {target}: target upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_exact_and_wildcard_host_then_longest_segment_prefix() {
    let (py, fg) = routing().await;
    let l = fg.local_addr("l").unwrap();
    for (host, target, want) in [
        ("api.example.com", "/x", EXACT),
        ("API.Example.COM:8080", "/v1", EXACT),
        ("a.example.com", "/v1/chat", WILD),
        ("a.b.example.com", "/", WILD),
        // A wildcard never matches the bare domain: the routes without a host.
        ("example.com", "/v1", V1),
        ("other", "/v1", V1),
        ("other", "/v1/models", V1),
        ("other", "/v1?x=1", V1),
        ("other", "/v1/chatty", V1),
        ("other", "/v1/chat", V1CHAT),
        ("other", "/v1/chat/completions", V1CHAT),
        // Segment-aware: /v1 does not match /v10.
        ("other", "/v10", FALLBACK),
        ("example.com", "/", FALLBACK),
    ] {
        routed(&py, l, host, target, want, target).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_prefix_rewrites_the_upstream_path_and_keeps_the_query() {
    let (py, fg) = routing().await;
    let l = fg.local_addr("l").unwrap();
    for (target, upstream) in [
        ("/p/x", "/x"),
        ("/p", "/"),
        ("/p?q=1", "/?q=1"),
        ("/p/a/b?q", "/a/b?q"),
        ("/p/", "/"),
    ] {
        routed(&py, l, "other", target, STRIP, upstream).await;
    }
    routed(&py, l, "other", "/px", FALLBACK, "/px").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_requests_go_to_the_listener_pool_or_get_404() {
    let (py, fg) = routing().await;
    let (l, n) = (fg.local_addr("l").unwrap(), fg.local_addr("n").unwrap());
    routed(&py, l, "other", "/nothing", FALLBACK, "/nothing").await;
    routed(&py, n, "a.example.com", "/x", WILD, "/x").await;
    for (host, target) in [
        ("other", "/nowhere"),
        ("other", "/v10/nowhere"),
        ("example.com", "/"),
    ] {
        let r = get(n, target, &[("host", host)]).await;
        assert_eq!(
            r.status, 404,
            "Host {host} {target} on a listener without pool: {r:?}"
        );
        assert_eq!(r.backend(), "", "a generated reply: {r:?}");
    }
    // A POST whose body came with its head, answered 404: the body was read,
    // so the kept-alive connection serves the next request.
    let (resp, _) = raw(
        n,
        b"POST /nowhere HTTP/1.1\r\nHost: other\r\nContent-Length: 4\r\n\r\n{}\r\n\
          GET /v1/x HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    )
    .await;
    let statuses: Vec<u16> = resp
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|r| status_of(&format!("HTTP/1.1 {r}")))
        .collect();
    assert_eq!(statuses, [404, 200], "{resp}");
    for (i, name) in ROUTING_POOLS.iter().enumerate() {
        let seen = py.seen(i).await;
        assert!(
            !seen
                .iter()
                .any(|s| s.contains("/nowhere") || s.as_str() == "GET /"),
            "a 404 request reached {name}: {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalized_before_routing_and_climbing_above_root_is_400() {
    let (py, fg) = routing().await;
    let l = fg.local_addr("l").unwrap();
    for (target, want, upstream) in [
        ("/a/../v1/chat", V1CHAT, "/v1/chat"),
        ("/v1/%63hat/x", V1CHAT, "/v1/chat/x"),
        ("//v1//chat", V1CHAT, "/v1/chat"),
        ("/v1/./chat?a=%2E", V1CHAT, "/v1/chat?a=%2E"),
        ("/x/%7Eu", FALLBACK, "/x/~u"),
        ("/a%2Fb", FALLBACK, "/a%2Fb"),
        ("/p/./x", STRIP, "/x"),
    ] {
        routed(&py, l, "other", target, want, upstream).await;
    }
    for target in ["/../x", "/%2e%2e/x", "/a/../../x"] {
        let req = format!("GET {target} HTTP/1.1\r\nHost: other\r\n\r\n");
        let (resp, closed) = raw(l, req.as_bytes()).await;
        assert_eq!(status_of(&resp), 400, "{target}: {resp}");
        assert!(closed, "{target}: the connection closes after a 400");
    }
}

// ---- 2. Per-request round-robin ----

/// One listener "l" over pool "p" (round-robin over `py`'s servers, `pool_extra`
/// keys), with `listener_extra` keys and an admin API when `admin` is set.
fn one_pool(py: &Py, listener_extra: &str, pool_extra: &str, admin: bool) -> String {
    let names: Vec<String> = (0..py.addrs.len()).map(|i| py.name(i)).collect();
    head(admin)
        + &listener("l", &format!("pool = \"p\"\n{listener_extra}"))
        + &pool("p", &names, pool_extra)
}

/// How many requests for exactly `target` each of `py`'s servers saw.
async fn seen_counts(py: &Py, method_target: &str) -> Vec<usize> {
    let mut v = Vec::new();
    for i in 0..py.addrs.len() {
        v.push(
            py.seen(i)
                .await
                .iter()
                .filter(|s| *s == method_target)
                .count(),
        );
    }
    v
}

/// Python's http.client: N GETs of /rr on one kept-alive connection; prints the
/// count per X-Backend, the local ports used and whether any response said close.
const KEEPALIVE_CLIENT: &str = r#"
import http.client, json, sys
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=30)
counts, ports, closes = {}, set(), 0
for i in range(int(sys.argv[3])):
    c.request("GET", "/rr")
    r = c.getresponse()
    r.read()
    if r.status != 200:
        sys.exit("request %d: status %d" % (i, r.status))
    if r.will_close:
        closes += 1
    else:
        ports.add(c.sock.getsockname()[1])
    b = r.getheader("X-Backend")
    counts[b] = counts.get(b, 0) + 1
print(json.dumps({"counts": counts, "ports": len(ports), "closes": closes}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keepalive_connection_balances_each_request() {
    let py = Py::start(2).await;
    let fg = start(&one_pool(&py, "", "", false));
    let l = fg.local_addr("l").unwrap();
    let out = Command::new("python3")
        .args([
            "-c",
            KEEPALIVE_CLIENT,
            "127.0.0.1",
            &l.port().to_string(),
            "100",
        ])
        .output()
        .await
        .expect("python3 (apt-get install -y python3)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["closes"], 0, "the connection stays open: {v}");
    assert_eq!(v["ports"], 1, "one client connection: {v}");
    for i in 0..2 {
        assert_eq!(v["counts"][py.name(i)], 50, "{v}");
    }
    assert_eq!(seen_counts(&py, "GET /rr").await, [50, 50]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_connection_balances_each_stream() {
    let py = Py::start(2).await;
    // The Python backends speak HTTP/1.1 only.
    let fg = start(&one_pool(&py, "", "upstream_protocol = \"http1\"", false));
    let l = fg.local_addr("l").unwrap();
    let out = Command::new("h2load")
        .args(["-n", "100", "-c", "1", "-m", "4"])
        .arg(format!("http://{l}/h2rr"))
        .output()
        .await
        .expect("h2load (apt-get install -y nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("100 succeeded") && text.contains("status codes: 100 2xx"),
        "{text}"
    );
    assert!(text.contains("Application protocol: h2c"), "{text}");
    assert_eq!(seen_counts(&py, "GET /h2rr").await, [50, 50], "{text}");
}

// ---- 3. Request smuggling (desync) defences ----

/// Sends each of `heads` (a request and maybe its body), followed by a smuggled
/// `GET /smuggled`, on a new connection: each gets one response with a status in
/// `want` and the close; no backend ever sees /smuggled, and the listener still
/// serves.
async fn refused(want: &[u16], heads: &[&str]) {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "", false));
    let l = fg.local_addr("l").unwrap();
    for h in heads {
        let req = format!("{h}GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n");
        let (resp, closed) = raw(l, req.as_bytes()).await;
        assert!(
            want.contains(&status_of(&resp)),
            "{h:?}: expected {want:?}, got: {resp:?}"
        );
        assert_eq!(
            resp.matches("HTTP/1.1 ").count(),
            1,
            "{h:?}: one response: {resp:?}"
        );
        assert!(closed, "{h:?}: the connection is closed after the {want:?}");
    }
    let r = get(l, "/after", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    // A smuggled request would reach the backend right behind the first one; give
    // it time to show up (this only guards against missing it).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = py.seen(0).await;
    assert!(
        !seen.iter().any(|s| s.contains("/smuggled")),
        "the backend saw a smuggled request: {seen:?}"
    );
    assert!(seen.iter().any(|s| s == "GET /after"), "{seen:?}");
}

/// A Content-Length that `Connection` names is not dropped from under its body:
/// the body goes up framed as it is sent (flowgate writes the framing), so its
/// bytes never reach the backend as a request of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_named_content_length_still_frames_the_body() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "", false));
    let l = fg.local_addr("l").unwrap();
    let smuggled = "GET /admin HTTP/1.1\r\nHost: app\r\n\r\n";
    let req = format!(
        "POST /upload HTTP/1.1\r\nHost: app\r\nConnection: content-length, close\r\n\
         Content-Length: {}\r\n\r\n{smuggled}",
        smuggled.len()
    );
    let (resp, _) = raw(l, req.as_bytes()).await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    let json = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(json).expect("the backend's JSON");
    assert_eq!(v["body_len"], smuggled.len(), "{v}");
    let lengths = sent(&v, "content-length");
    assert_eq!(lengths, ["34"], "{v}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = py.seen(0).await;
    assert!(
        !seen.iter().any(|s| s.contains("/admin")),
        "the backend saw the body as a request: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desync_content_length_and_transfer_encoding_is_400() {
    refused(
        &[400],
        &[
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 48\r\n\r\n0\r\n\r\n",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desync_differing_duplicate_content_length_is_400() {
    refused(
        &[400],
        &[
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 41\r\n\r\n",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0, 41\r\n\r\n",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desync_obs_fold_is_400() {
    refused(
        &[400],
        &[
            "GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desync_bare_cr_is_400() {
    refused(
        &[400],
        &[
            "GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
            "GET /a HTTP/1.1\rHost: x\r\n\r\n",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\rTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desync_space_before_colon_is_400() {
    refused(
        &[400],
        &[
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length : 0\r\n\r\n",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desync_bad_chunk_size_is_400() {
    refused(
        &[400],
        &[
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desync_transfer_coding_before_chunked_is_501() {
    refused(
        &[501],
        &["POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desync_transfer_encoding_not_ending_in_chunked_is_refused() {
    // 400 or 501 (issue 11), then close.
    refused(
        &[400, 501],
        &[
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_line_endings_are_accepted() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "", false));
    let l = fg.local_addr("l").unwrap();
    let (resp, closed) = raw(l, b"GET /lf HTTP/1.1\nHost: x\nConnection: close\n\n").await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    assert!(closed);
    let (resp, _) = raw(
        l,
        b"POST /lf2 HTTP/1.1\nHost: x\nContent-Length: 5\nConnection: close\n\nhello",
    )
    .await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    assert!(resp.contains("\"body_len\": 5"), "{resp}");
    assert_eq!(py.seen(0).await, ["GET /lf", "POST /lf2"]);
}

// ---- 4. header_timeout ----

/// Reads from `s` until it is closed (or `limit` passes); returns what was read
/// and whether it was closed.
async fn read_to_close(s: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

/// Reads one response with a Content-Length body from `s`.
async fn read_response(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().unwrap())
                })
                .expect("a Content-Length");
            if got.len() >= end + 4 + len {
                return text;
            }
        }
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => panic!("closed mid-response: {text:?}"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_head_gets_a_written_408_then_close() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "header_timeout = \"1s\"", "", false));
    let l = fg.local_addr("l").unwrap();

    // The first request's head, half sent.
    let t = Instant::now();
    let mut s = TcpStream::connect(l).await.unwrap();
    s.write_all(b"GET /half HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (resp, closed) = read_to_close(&mut s, LIVENESS).await;
    assert_eq!(status_of(&resp), 408, "{resp:?}");
    assert!(closed, "closed after the 408");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "not before header_timeout: {:?}",
        t.elapsed()
    );

    // A later request on a kept-alive connection: half a head after a full one.
    let mut s = TcpStream::connect(l).await.unwrap();
    s.write_all(b"GET /full HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let first = tokio::time::timeout(LIVENESS, read_response(&mut s))
        .await
        .expect("first response in time");
    assert_eq!(status_of(&first), 200, "{first}");
    s.write_all(b"GET /half2 HTTP/1.1\r\nHo").await.unwrap();
    let (resp, closed) = read_to_close(&mut s, LIVENESS).await;
    assert!(resp.starts_with("HTTP/1.1 408 "), "{resp:?}");
    assert!(closed, "closed after the 408");

    // A client that sends nothing is closed too.
    let mut s = TcpStream::connect(l).await.unwrap();
    let (_, closed) = read_to_close(&mut s, LIVENESS).await;
    assert!(closed, "a silent connection is closed after header_timeout");
    assert_eq!(py.seen(0).await, ["GET /full"]);
}

/// A slowloris client: sends a head that never ends, one byte every 200 ms, until
/// the server answers or closes; returns what it got.
async fn slowloris(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "GET /slow HTTP/1.1\r\nHost: x\r\nX-Pad: {}",
        "a".repeat(4000)
    );
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let mut i = 0;
    let deadline = tokio::time::Instant::now() + LIVENESS * 3;
    loop {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            },
            _ = tick.tick(), if got.is_empty() => {
                if s.write_all(&head.as_bytes()[i..=i]).await.is_err() {
                    // Closed: read what was sent before.
                    let (rest, _) = read_to_close(&mut s, LIVENESS).await;
                    got.extend_from_slice(rest.as_bytes());
                    break;
                }
                i += 1;
            }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_get_408_while_normal_clients_are_served() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "header_timeout = \"2s\"", "", false));
    let l = fg.local_addr("l").unwrap();
    let slow: Vec<_> = (0..200).map(|_| tokio::spawn(slowloris(l))).collect();
    let t = Instant::now();
    let mut served = 0;
    while t.elapsed() < Duration::from_secs(2) || served < 10 {
        let r = get(l, "/normal", &[]).await;
        assert_eq!(r.status, 200, "a normal client during the slowloris: {r:?}");
        served += 1;
    }
    let mut statuses = std::collections::BTreeMap::new();
    for h in slow {
        let resp = h.await.unwrap();
        *statuses.entry(status_of(&resp)).or_insert(0) += 1;
    }
    assert_eq!(
        statuses,
        [(408, 200)].into(),
        "every slowloris connection gets a 408 (0 = no response)"
    );
    assert!(
        !py.seen(0).await.iter().any(|s| s.contains("/slow")),
        "no slow head reached the backend"
    );
}

// ---- 5. Streaming: bodies are never collected ----

/// http_backend.py's download bytes: 64 KiB blocks, block K starting with K as a
/// big-endian u64, then the base pattern.
fn block(k: u64, len: usize) -> Bytes {
    let mut v: Vec<u8> = (0..65536usize)
        .map(|i| ((i * 7 + i / 251) % 256) as u8)
        .collect();
    v[..8].copy_from_slice(&k.to_be_bytes());
    v.truncate(len);
    Bytes::from(v)
}

/// A request body of `left` bytes of `block`s, made as it is sent.
struct Generated {
    k: u64,
    left: u64,
}

impl hyper::body::Body for Generated {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let b = block(this.k, this.left.min(65536) as usize);
        this.k += 1;
        this.left -= b.len() as u64;
        Poll::Ready(Some(Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// The sha256 of `total` bytes of `block`s.
fn generated_sha256(total: u64) -> String {
    let mut h = Sha256::new();
    let (mut k, mut left) = (0, total);
    while left > 0 {
        let b = block(k, left.min(65536) as usize);
        h.update(&b);
        left -= b.len() as u64;
        k += 1;
    }
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const BIG: u64 = 200 << 20;

/// How much more than `baseline` KiB of resident memory process `pid` reached
/// while `work` ran (sampled every 20 ms).
async fn rss_growth<T>(pid: i32, work: impl std::future::Future<Output = T>) -> (T, u64) {
    let baseline = rss_kib(pid);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        while !s2.load(std::sync::atomic::Ordering::SeqCst) {
            peak = peak.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak.max(rss_kib(pid))
    });
    let out = work.await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let peak = sampler.await.unwrap();
    (out, peak.saturating_sub(baseline))
}

/// An idle kept-alive client (one request done, the connection held, as an SDK's
/// pool holds it) costs flowgate a few KiB: its first request over, the
/// connection is parked as the bare socket and a small task at once, so hyper's
/// two 8 KiB buffers are gone before the next client's request. (Parked after
/// 100 ms quiet instead, as a later request's connection is, 1,000 clients cost
/// about 4.4 KiB each, most of it the allocator keeping what those buffers
/// freed.) Resident memory, in bytes: a count, not a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_kept_alive_client_costs_a_few_kib() {
    const CLIENTS: usize = 1000;
    let (_py, p, l) = streaming_proc().await;
    let mut warm = Vec::new();
    for _ in 0..50 {
        warm.push(kept_alive_client(l).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(p.pid());
    let mut held = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        held.push(kept_alive_client(l).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per = (rss_kib(p.pid()).saturating_sub(before)) as f64 / CLIENTS as f64;
    eprintln!("{per:.2} KiB per idle kept-alive client");
    assert!(
        per < 3.0,
        "{per:.2} KiB of flowgate's memory per idle kept-alive client"
    );
    // They are still served.
    for s in held.iter_mut().take(5) {
        s.write_all(b"GET /again HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        assert!(read_response(s).await.starts_with("HTTP/1.1 200"));
    }
}

/// A client connection that has done one keep-alive request.
async fn kept_alive_client(l: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(l).await.unwrap();
    s.write_all(b"GET /idle HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    s
}

/// The binary (its RSS is its own) over one backend, warmed up with a request.
async fn streaming_proc() -> (Py, Proc, SocketAddr) {
    let py = Py::start(1).await;
    let p = Proc::spawn(&one_pool(&py, "", "", false), &[]);
    let l = p.addr("l");
    let r = get(l, "/warm", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    (py, p, l)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_of_200_mib_streams_through_with_equal_sha256() {
    let (_py, p, l) = streaming_proc().await;
    let (r, growth) = rss_growth(p.pid(), async {
        let mut s = client(l).await;
        let body = Generated { k: 0, left: BIG }.boxed();
        exchange(&mut s, request("POST", "/up", &[], body)).await
    })
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["body_len"], BIG, "{v}");
    assert_eq!(v["sha256"], generated_sha256(BIG), "{v}");
    eprintln!("flowgate RSS growth: {growth} KiB");
    assert!(
        growth < 32 << 10,
        "flowgate's RSS grew by {growth} KiB while 200 MiB went through"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_of_200_mib_streams_through_with_equal_sha256() {
    let (_py, p, l) = streaming_proc().await;
    let ((len, sha), growth) = rss_growth(p.pid(), async {
        let mut s = client(l).await;
        let req = request(
            "GET",
            &format!("/down?do=download&bytes={BIG}"),
            &[],
            empty(),
        );
        let resp = s.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let (mut len, mut h) = (0u64, Sha256::new());
        while let Some(f) = tokio::time::timeout(LIVENESS, body.frame())
            .await
            .expect("body moves")
        {
            if let Ok(d) = f.expect("body frame").into_data() {
                len += d.len() as u64;
                h.update(&d);
            }
        }
        (len, hex(&h.finalize()))
    })
    .await;
    assert_eq!(len, BIG);
    assert_eq!(sha, generated_sha256(BIG));
    eprintln!("flowgate RSS growth: {growth} KiB");
    assert!(
        growth < 32 << 10,
        "flowgate's RSS grew by {growth} KiB while 200 MiB went through"
    );
}

// ---- 6. SSE: each event as it is written ----

/// Tells backend `py` (straight, not through flowgate) that event `i` of stream
/// `key` arrived: only then does it write the next one (do=sse&ack=KEY). An event
/// flowgate held back would stall the stream, so no clock is needed to see it.
async fn ack(py: &Py, key: &str, i: usize) {
    let r = get(py.addrs[0], &format!("/__ack?key={key}&i={i}"), &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_arrive_as_they_are_written() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "", false));
    let l = fg.local_addr("l").unwrap();
    let mut s = client(l).await;
    let req = request("GET", "/events?do=sse&n=20&ack=h1", &[], empty());
    let resp = tokio::time::timeout(LIVENESS, s.send_request(req))
        .await
        .expect("head in time")
        .expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    let mut body = resp.into_body();
    let mut buf = String::new();
    let mut events = 0;
    while let Some(f) = tokio::time::timeout(LIVENESS, body.frame())
        .await
        .expect("each event comes while the backend waits for its ack")
    {
        let Ok(d) = f.expect("body frame").into_data() else {
            continue;
        };
        buf.push_str(std::str::from_utf8(&d).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let ev: String = buf.drain(..end + 2).collect();
            assert!(
                ev.starts_with(&format!("id: {events}\n")),
                "events in order: {ev:?}"
            );
            ack(&py, "h1", events).await;
            events += 1;
        }
    }
    assert_eq!(
        events, 20,
        "every event arrived before the next was written"
    );
}

// ---- 7. Errors and retries ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_is_skipped() {
    let py = Py::start(1).await;
    let dead = dead_addr().to_string();
    let cfg = head(false)
        + &listener("l", "pool = \"p\"")
        + &pool("p", &[dead, py.name(0)], "connect_attempts = 2");
    let fg = start(&cfg);
    let l = fg.local_addr("l").unwrap();
    let mut kept = client(l).await;
    for i in 0..10 {
        let r = get(l, "/fresh", &[]).await;
        assert_eq!(r.status, 200, "request {i} on a new connection: {r:?}");
        let r = exchange(&mut kept, request("GET", "/kept", &[], empty())).await;
        assert_eq!(
            r.status, 200,
            "request {i} on a kept-alive connection: {r:?}"
        );
    }
    assert_eq!(seen_counts(&py, "GET /fresh").await, [10]);
    assert_eq!(seen_counts(&py, "GET /kept").await, [10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_refusing_is_502() {
    let dead = [dead_addr().to_string(), dead_addr().to_string()];
    let cfg = head(false) + &listener("l", "pool = \"p\"") + &pool("p", &dead, "");
    let fg = start(&cfg);
    let l = fg.local_addr("l").unwrap();
    let mut kept = client(l).await;
    for _ in 0..3 {
        let r = exchange(&mut kept, request("GET", "/", &[], empty())).await;
        assert_eq!(r.status, 502, "{r:?}");
        assert!(r.header("content-type").starts_with("text/plain"), "{r:?}");
        assert!(!r.body.is_empty(), "a short plain-text body: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_usable_backend_is_503() {
    // Disabled through the admin API.
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "", true));
    let (l, admin) = (fg.local_addr("l").unwrap(), fg.admin_addr().unwrap());
    assert_eq!(get(l, "/", &[]).await.status, 200);
    let r = post_action(admin, &py.name(0), "disable", false).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = get(l, "/while-disabled", &[]).await;
    assert_eq!(r.status, 503, "{r:?}");
    let r = post_action(admin, &py.name(0), "enable", false).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(get(l, "/", &[]).await.status, 200);

    // Down by its health check (it answers 200; the check wants 500).
    let check = "[pools.health_check]\nkind = \"http\"\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 1\nexpect_status = \"500\"";
    let fg = start(&one_pool(&py, "", check, true));
    let (l, admin) = (fg.local_addr("l").unwrap(), fg.admin_addr().unwrap());
    let mut state = serde_json::Value::Null;
    for _ in 0..500 {
        state = backends_of(&get_pools(admin).await, "p")[0]["state"].clone();
        if state == "down" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state, "down");
    let r = get(l, "/while-down", &[]).await;
    assert_eq!(r.status, 503, "{r:?}");
    let seen = py.seen(0).await;
    assert!(
        !seen.iter().any(|s| s.contains("/while-")),
        "no request reached an unusable backend: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_byte_timeout_is_504() {
    let py = Py::start(1).await;
    let cfg = head(false)
        + &listener("l", "")
        + &route(None, "/", "p", "first_byte_timeout = \"1s\"")
        + &pool("p", &[py.name(0)], "");
    let fg = start(&cfg);
    let l = fg.local_addr("l").unwrap();
    assert_eq!(get(l, "/quick?do=sleep&ms=10", &[]).await.status, 200);
    let t = Instant::now();
    let r = get(l, "/slow?do=sleep&ms=5000", &[]).await;
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "not before first_byte_timeout: {:?}",
        t.elapsed()
    );
    assert_eq!(seen_counts(&py, "GET /slow?do=sleep&ms=5000").await, [1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_whose_backend_dies_mid_response_is_not_retried() {
    let py = Py::start(2).await;
    let fg = start(&one_pool(&py, "", "", false));
    let l = fg.local_addr("l").unwrap();
    let mut s = client(l).await;
    let req = request("POST", "/die?do=die", &[], full("hello"));
    let resp = tokio::time::timeout(LIVENESS, s.send_request(req))
        .await
        .expect("an answer in time, never a hang");
    let outcome = match resp {
        Err(e) => format!("error before the body: {e}"),
        Ok(resp) => {
            let status = resp.status();
            match tokio::time::timeout(LIVENESS, resp.into_body().collect())
                .await
                .expect("the body ends in time, never a hang")
            {
                Ok(b) => panic!(
                    "a complete response ({status}, {} bytes) from a backend that died",
                    b.to_bytes().len()
                ),
                Err(e) => format!("{status}, then a body error: {e}"),
            }
        }
    };
    eprintln!("client saw: {outcome}");
    let total: usize = seen_counts(&py, "POST /die?do=die").await.iter().sum();
    assert_eq!(total, 1, "the POST went to exactly one backend, once");
    // Both backends still serve.
    for _ in 0..2 {
        assert_eq!(get(l, "/after", &[]).await.status, 200);
    }
}

// ---- 8. WebSocket ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_l7_listener() {
    let (_ws, words) = spawn_ready(
        Command::new("python3").args([&support("ws_echo.py"), "server"]),
        "the WebSocket echo server (python3 -m pip install websockets)",
    )
    .await;
    let cfg = head(false)
        + &listener("l", "")
        + &route(None, "/ws", "w", "")
        + &pool("w", &[format!("127.0.0.1:{}", words[0])], "");
    let fg = start(&cfg);
    let l = fg.local_addr("l").unwrap();
    let out = tokio::time::timeout(
        LIVENESS * 3,
        Command::new("python3")
            .args([
                &support("ws_echo.py"),
                "client",
                &format!("ws://{l}/ws/echo"),
            ])
            .output(),
    )
    .await
    .expect("the WebSocket client finishes")
    .expect("python3 (and python3 -m pip install websockets)");
    assert!(
        out.status.success() && out.stdout == b"ok\n",
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- 9. Forwarded headers, X-Request-Id, hop-by-hop headers ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_headers_append_replace_or_off() {
    let py = Py::start(1).await;
    let cfg = head(false)
        + &listener("append", "pool = \"p\"\nxff = \"append\"")
        + &listener("replace", "pool = \"p\"\nxff = \"replace\"")
        + &listener("off", "pool = \"p\"\nxff = \"off\"")
        + &listener("default", "pool = \"p\"")
        + &pool("p", &[py.name(0)], "");
    let fg = start(&cfg);
    let at = |n: &str| fg.local_addr(n).unwrap();
    let given = [
        ("host", "h.example:8080"),
        ("x-forwarded-for", "1.2.3.4"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "orig.example"),
    ];
    let fields = |r: &Reply| {
        [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "host",
        ]
        .map(|h| r.sent(h).join(" | "))
    };
    for (l, want) in [
        (
            "append",
            [
                "1.2.3.4, 127.0.0.1",
                "https",
                "orig.example",
                "h.example:8080",
            ],
        ),
        (
            "default",
            [
                "1.2.3.4, 127.0.0.1",
                "https",
                "orig.example",
                "h.example:8080",
            ],
        ),
        (
            "replace",
            ["127.0.0.1", "http", "h.example:8080", "h.example:8080"],
        ),
        (
            "off",
            ["1.2.3.4", "https", "orig.example", "h.example:8080"],
        ),
    ] {
        let r = get(at(l), "/", &given).await;
        assert_eq!(fields(&r), want, "xff = {l}, headers given");
    }
    for (l, want) in [
        ("append", ["127.0.0.1", "http", "h.example", "h.example"]),
        ("replace", ["127.0.0.1", "http", "h.example", "h.example"]),
        ("off", ["", "", "", "h.example"]),
    ] {
        let r = get(at(l), "/", &[("host", "h.example")]).await;
        assert_eq!(fields(&r), want, "xff = {l}, none given");
    }
    // Two X-Forwarded-For lines are one list: both kept, in order.
    let two = [
        ("host", "h.example"),
        ("x-forwarded-for", "1.2.3.4"),
        ("x-forwarded-for", "5.6.7.8, 9.9.9.9"),
    ];
    let r = get(at("append"), "/", &two).await;
    assert_eq!(
        r.sent("x-forwarded-for"),
        ["1.2.3.4, 5.6.7.8, 9.9.9.9, 127.0.0.1"],
        "xff = append, two lines given"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_request_id_is_generated_when_absent_and_kept_when_present() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "", false));
    let l = fg.local_addr("l").unwrap();
    let a = get(l, "/", &[]).await.sent("x-request-id");
    let b = get(l, "/", &[]).await.sent("x-request-id");
    for id in [&a, &b] {
        assert_eq!(id.len(), 1, "one generated X-Request-Id: {id:?}");
        assert!(
            id[0].len() >= 16 && id[0].bytes().all(|c| c.is_ascii_hexdigit()),
            "{id:?}"
        );
    }
    assert_ne!(a, b, "a new id per request");
    let kept = get(l, "/", &[("x-request-id", "client-chose-this")]).await;
    assert_eq!(kept.sent("x-request-id"), ["client-chose-this"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "", false));
    let l = fg.local_addr("l").unwrap();
    let r = get(
        l,
        "/",
        &[
            ("connection", "x-foo, keep-alive"),
            ("x-foo", "secret"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic eDp5"),
            ("te", "trailers, deflate"),
            ("x-keep", "1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    for gone in ["x-foo", "keep-alive", "proxy-authorization"] {
        assert_eq!(
            r.sent(gone),
            Vec::<String>::new(),
            "{gone} forwarded: {r:?}"
        );
    }
    assert!(
        !r.sent("connection").iter().any(|v| v.contains("x-foo")),
        "{r:?}"
    );
    assert_eq!(r.sent("te"), ["trailers"]);
    assert_eq!(r.sent("x-keep"), ["1"]);

    // And on the way back.
    let r = get(l, "/?do=hop", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-bar"), "", "{r:?}");
    assert_eq!(r.header("keep-alive"), "", "{r:?}");
    assert_eq!(r.header("x-kept"), "1", "{r:?}");
}

// ---- 10. Reload that changes routes under load ----

/// Routes /x and /y to pools "a" (server 0) and "b" (server 1), swapped when
/// `swap` is set; no listener pool.
fn swapping_routes(py: &Py, swap: bool) -> String {
    let (x, y) = if swap { ("b", "a") } else { ("a", "b") };
    head(true)
        + &listener("l", "")
        + &route(None, "/x", x, "")
        + &route(None, "/y", y, "")
        + &pool("a", &[py.name(0)], "")
        + &pool("b", &[py.name(1)], "")
}

/// Like `exchange`, but a failure is an `Err` to count, not a panic.
async fn try_exchange(s: &mut http1::SendRequest<Body>, target: &str) -> Result<Reply, String> {
    let go = async {
        s.ready().await.map_err(|e| e.to_string())?;
        let resp = s
            .send_request(request("GET", target, &[], empty()))
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<Reply, String>(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    };
    match tokio::time::timeout(LIVENESS, go).await {
        Ok(Ok(r)) if r.status == 200 => Ok(r),
        Ok(Ok(r)) => Err(format!("{target}: status {}", r.status)),
        Ok(Err(e)) => Err(format!("{target}: {e}")),
        Err(_) => Err(format!("{target}: no response in {LIVENESS:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changing_routes_under_load_fails_no_request() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let py = Py::start(2).await;
    let p = Proc::spawn(&swapping_routes(&py, false), &[]);
    let (l, admin) = (p.addr("l"), p.admin());
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for kept_alive in [true, true, false, false] {
        let (stop, done, failures) = (stop.clone(), done.clone(), failures.clone());
        load.push(tokio::spawn(async move {
            let mut s = client(l).await;
            while !stop.load(Ordering::SeqCst) {
                if !kept_alive {
                    s = client(l).await;
                }
                for target in ["/x", "/y"] {
                    match try_exchange(&mut s, target).await {
                        Ok(_) => done.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            failures.lock().unwrap().push(e);
                            s = client(l).await;
                            0
                        }
                    };
                }
            }
        }));
    }
    // A kept-alive connection opened before any reload.
    let mut old = client(l).await;
    let reloads = || p.log().matches("configuration reloaded").count();
    for i in 1..=6 {
        let swap = i % 2 == 1;
        p.dir.file("flowgate.toml", &swapping_routes(&py, swap));
        if i % 2 == 1 {
            p.signal(nix::sys::signal::Signal::SIGHUP);
            assert!(
                wait_until(LIVENESS, || reloads() == i).await,
                "reload {i} by SIGHUP: {}",
                p.log()
            );
        } else {
            let r = curl(admin, "POST", "/api/v1/reload", None, None).await;
            assert_eq!(r.status, 200, "reload {i} by the API: {r:?}");
        }
        let (x, y) = if swap { (1, 0) } else { (0, 1) };
        let r = get(l, "/x", &[]).await;
        assert_eq!(
            r.backend(),
            py.name(x),
            "reload {i}: /x on a new connection"
        );
        let r = exchange(&mut old, request("GET", "/y", &[], empty())).await;
        assert_eq!(
            r.backend(),
            py.name(y),
            "reload {i}: /y on an old connection"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for h in load {
        h.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert_eq!(
        failures,
        Vec::<String>::new(),
        "failed requests across reloads"
    );
    let done = done.load(Ordering::SeqCst);
    eprintln!("{done} requests across 6 reloads");
    assert!(done >= 100, "the load kept going: {done} requests");
    assert_eq!(reloads(), 6, "{}", p.log());
}

// ---- 11. Graceful shutdown ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_client_gets_goaway_on_shutdown_and_its_stream_completes() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "upstream_protocol = \"http1\"", false));
    let l = fg.local_addr("l").unwrap();
    let nghttp = Command::new("nghttp")
        .args(["-v", "-n"])
        .arg(format!("http://{l}/inflight?do=sleep&ms=1500"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("nghttp (apt-get install -y nghttp2-client)");
    // The stream is in flight once the backend has it.
    let mut reached = false;
    for _ in 0..500 {
        if py.seen(0).await.iter().any(|s| s.contains("/inflight")) {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(reached, "the request reached the backend");
    let shutdown = tokio::spawn(fg.clone().shutdown());
    let out = tokio::time::timeout(LIVENESS, nghttp.wait_with_output())
        .await
        .expect("nghttp finishes")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("recv GOAWAY frame"), "a GOAWAY: {text}");
    assert!(
        text.contains(":status: 200"),
        "the stream completed: {text}"
    );
    let goaway = text.find("recv GOAWAY frame").unwrap();
    let status = text.find(":status: 200").unwrap();
    assert!(
        goaway < status,
        "GOAWAY came while the stream was in flight: {text}"
    );
    let all_finished = tokio::time::timeout(LIVENESS, shutdown)
        .await
        .expect("shutdown ends")
        .unwrap();
    assert!(
        all_finished,
        "every session finished within shutdown_timeout"
    );
    assert!(
        TcpStream::connect(l).await.is_err(),
        "the listener is closed"
    );
}

// ---- 12. gRPC ----

/// Runs tests/support/grpc_peer.py's client against `target`.
async fn grpc_client(target: SocketAddr, unary: usize, stream: usize) -> serde_json::Value {
    let out = tokio::time::timeout(
        LIVENESS * 6,
        Command::new("python3")
            .args([&support("grpc_peer.py"), "client", &target.to_string()])
            .args([unary.to_string(), stream.to_string()])
            .output(),
    )
    .await
    .expect("the gRPC client finishes")
    .expect("python3 (and python3 -m pip install grpcio)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Two gRPC servers; listener "g" (http) over both, listener "t" (tcp) over the
/// first.
async fn grpc_setup() -> (Child, Vec<String>, Flowgate) {
    let (child, ports) = spawn_ready(
        Command::new("python3").args([&support("grpc_peer.py"), "server", "2"]),
        "the gRPC server (python3 -m pip install grpcio)",
    )
    .await;
    let names: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let cfg = head(false)
        + &listener("g", "pool = \"grpc\"")
        + "\n[[listeners]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\npool = \"grpc-l4\"\n"
        + &pool("grpc", &names, "upstream_protocol = \"auto\"")
        + &pool("grpc-l4", &names[..1], "");
    (child, names, start(&cfg))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_calls_balance_per_call_and_a_server_stream_completes() {
    let (_peers, names, fg) = grpc_setup().await;
    let v = grpc_client(fg.local_addr("g").unwrap(), 100, 1000).await;
    for n in &names {
        assert_eq!(v["counts"][n], 50, "100 calls on one channel: {v}");
    }
    assert_eq!(v["stream_len"], 1000, "{v}");
    assert_eq!(v["stream_ok"], true, "{v}");
    assert_eq!(v["code"], "OK", "the status from the trailers: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_through_an_l4_listener() {
    let (_peers, names, fg) = grpc_setup().await;
    let v = grpc_client(fg.local_addr("t").unwrap(), 3, 10).await;
    assert_eq!(v["counts"][&names[0]], 3, "{v}");
    assert_eq!(v["code"], "OK", "{v}");
}

// ---- More of issue 11's contract: stream timeouts, drain, limits, pooling ----

/// GETs `target` and reads the body frame by frame until it ends or fails;
/// returns the status, the data received and the body error, if any.
async fn get_streamed(
    addr: SocketAddr,
    target: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<u8>, Option<String>, Option<hyper::HeaderMap>) {
    let mut s = client(addr).await;
    let resp = tokio::time::timeout(
        LIVENESS,
        s.send_request(request("GET", target, headers, empty())),
    )
    .await
    .expect("head in time")
    .expect("response head");
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let (mut data, mut trailers) = (Vec::new(), None);
    loop {
        match tokio::time::timeout(LIVENESS, body.frame())
            .await
            .expect("the body moves or ends in time")
        {
            None => return (status, data, None, trailers),
            Some(Err(e)) => return (status, data, Some(e.to_string()), trailers),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            },
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_idle_timeout_ends_a_stalled_response_but_not_a_slow_one() {
    let py = Py::start(1).await;
    let cfg = head(false)
        + &listener("l", "")
        + &route(None, "/", "p", "stream_idle_timeout = \"1s\"")
        + &pool("p", &[py.name(0)], "");
    let fg = start(&cfg);
    let l = fg.local_addr("l").unwrap();
    // Events 300 ms apart for 2.4 s: never idle for 1 s.
    let (status, data, err, _) = get_streamed(l, "/ok?do=sse&n=9&ms=300", &[]).await;
    assert_eq!((status, err), (200, None));
    assert_eq!(String::from_utf8_lossy(&data).matches("data: ").count(), 9);
    // An 8 s gap after the first event: cut, without the final chunk.
    let t = Instant::now();
    let (status, data, err, _) = get_streamed(l, "/stall?do=sse&n=2&ms=8000", &[]).await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&data);
    assert!(text.starts_with("id: 0\n"), "{text:?}");
    assert!(!text.contains("id: 1"), "{text:?}");
    assert!(
        err.is_some(),
        "the response must end in an error, not look complete"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(900) && t.elapsed() < Duration::from_secs(7),
        "cut by stream_idle_timeout, not by the backend: {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_idle_timeout_ends_a_stalled_request_body() {
    let py = Py::start(1).await;
    let cfg = head(false)
        + &listener("l", "")
        + &route(None, "/", "p", "stream_idle_timeout = \"1s\"")
        + &pool("p", &[py.name(0)], "");
    let fg = start(&cfg);
    let l = fg.local_addr("l").unwrap();
    let mut s = TcpStream::connect(l).await.unwrap();
    s.write_all(b"POST /stalled HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        .await
        .unwrap();
    let (resp, closed) = read_to_close(&mut s, LIVENESS).await;
    assert!(closed, "a stalled upload is ended: {resp:?}");
    assert_eq!(status_of(&resp), 408, "{resp:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backend_finishes_its_request_in_flight_and_gets_no_new_ones() {
    let py = Py::start(2).await;
    let fg = start(&one_pool(&py, "", "", true));
    let (l, admin) = (fg.local_addr("l").unwrap(), fg.admin_addr().unwrap());
    let slow = tokio::spawn(get(l, "/inflight?do=sleep&ms=1500", &[]));
    let mut on = None;
    for _ in 0..500 {
        for i in 0..2 {
            if py.seen(i).await.iter().any(|s| s.contains("/inflight")) {
                on = Some(i);
            }
        }
        if on.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let on = on.expect("the slow request reached a backend");
    let r = post_action(admin, &py.name(on), "drain", false).await;
    assert_eq!(r.status, 200, "{r:?}");
    let mut kept = client(l).await;
    for i in 0..6 {
        let r = exchange(&mut kept, request("GET", "/new", &[], empty())).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            r.backend(),
            py.name(1 - on),
            "new request {i} avoids the drained backend"
        );
    }
    let r = tokio::time::timeout(LIVENESS, slow).await.unwrap().unwrap();
    assert_eq!(r.status, 200, "the request in flight finished: {r:?}");
    assert_eq!(r.backend(), py.name(on));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_client_gets_connection_close_on_shutdown() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "", false));
    let l = fg.local_addr("l").unwrap();
    let mut s = TcpStream::connect(l).await.unwrap();
    s.write_all(b"GET /inflight?do=sleep&ms=1000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut reached = false;
    for _ in 0..500 {
        if py.seen(0).await.iter().any(|s| s.contains("/inflight")) {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(reached);
    let shutdown = tokio::spawn(fg.clone().shutdown());
    let (resp, closed) = read_to_close(&mut s, LIVENESS).await;
    assert_eq!(status_of(&resp), 200, "{resp:?}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{resp:?}"
    );
    assert!(closed, "closed after the response");
    assert!(tokio::time::timeout(LIVENESS, shutdown)
        .await
        .unwrap()
        .unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_backend_closed_is_replaced_without_an_error() {
    // The backend closes kept-alive connections idle for 300 ms, without a word.
    let py = Py::start_with(1, &["--idle-close-ms", "300"]).await;
    let fg = start(&one_pool(&py, "", "", false));
    let l = fg.local_addr("l").unwrap();
    let mut kept = client(l).await;
    for i in 0..3 {
        let r = exchange(&mut kept, request("GET", "/get", &[], empty())).await;
        assert_eq!(r.status, 200, "GET {i}: {r:?}");
        tokio::time::sleep(Duration::from_millis(700)).await;
        let r = exchange(&mut kept, request("POST", "/post", &[], full("body"))).await;
        assert_eq!(r.status, 200, "POST {i}: {r:?}");
        assert_eq!(r.json()["body_len"], 4);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert_eq!(seen_counts(&py, "POST /post").await, [3], "each POST once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_counts_requests_in_flight() {
    let py = Py::start(2).await;
    let cfg = head(false)
        + &listener("l", "pool = \"p\"")
        + &pool("p", &[py.name(0), py.name(1)], "").replace("round-robin", "least-connections");
    let fg = start(&cfg);
    let l = fg.local_addr("l").unwrap();
    // Warm both backends' pooled connections.
    for _ in 0..4 {
        assert_eq!(get(l, "/warm", &[]).await.status, 200);
    }
    let slow = tokio::spawn(get(l, "/inflight?do=sleep&ms=2000", &[]));
    let mut on = None;
    for _ in 0..500 {
        for i in 0..2 {
            if py.seen(i).await.iter().any(|s| s.contains("/inflight")) {
                on = Some(i);
            }
        }
        if on.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let on = on.expect("the slow request reached a backend");
    let mut kept = client(l).await;
    for i in 0..6 {
        let r = exchange(&mut kept, request("GET", "/quick", &[], empty())).await;
        assert_eq!(
            r.backend(),
            py.name(1 - on),
            "quick request {i} goes to the backend with no request in flight"
        );
    }
    assert_eq!(slow.await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_trailers_are_forwarded() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "", false));
    let l = fg.local_addr("l").unwrap();
    let (status, data, err, trailers) =
        get_streamed(l, "/t?do=trailers", &[("te", "trailers")]).await;
    assert_eq!((status, err), (200, None));
    assert_eq!(data, b"hello");
    let trailers = trailers.expect("a trailers frame");
    assert_eq!(trailers["x-checksum"], "42", "{trailers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_requests_keep_kept_alive_connections_in_step() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "", false));
    let l = fg.local_addr("l").unwrap();
    let mut kept = client(l).await;
    for i in 0..3 {
        let r = exchange(
            &mut kept,
            request("HEAD", "/h?do=download&bytes=1000", &[], empty()),
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("content-length"), "1000", "{r:?}");
        assert!(r.body.is_empty(), "{r:?}");
        let target = format!("/after-head-{i}");
        let r = exchange(&mut kept, request("GET", &target, &[], empty())).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.target(), target);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_head_is_431_and_oversized_body_413() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(
        &py,
        "max_header_bytes = 8192\nmax_body_bytes = 1000",
        "",
        false,
    ));
    let l = fg.local_addr("l").unwrap();
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(10_000)
    );
    let (resp, closed) = raw(l, big.as_bytes()).await;
    assert_eq!(status_of(&resp), 431, "{resp:?}");
    assert!(closed);
    let ok = format!(
        "GET /fits HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(6_000)
    );
    let (resp, _) = raw(l, ok.as_bytes()).await;
    assert_eq!(status_of(&resp), 200, "a head under the limit: {resp:?}");

    let body = "b".repeat(2000);
    let cl = format!("POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n{body}");
    let (resp, closed) = raw(l, cl.as_bytes()).await;
    assert_eq!(status_of(&resp), 413, "{resp:?}");
    assert!(closed);
    let chunked = format!(
        "POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n{body}\r\n0\r\n\r\n"
    );
    let (resp, closed) = raw(l, chunked.as_bytes()).await;
    assert_eq!(status_of(&resp), 413, "{resp:?}");
    assert!(closed);
    let seen = py.seen(0).await;
    assert!(
        !seen.iter().any(|s| s.contains("/big") || s.contains("/cl")),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_a_quiet_connection_but_not_one_waiting_for_a_response() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(
        &py,
        "idle_timeout = \"1s\"\nheader_timeout = \"5s\"",
        "",
        false,
    ));
    let l = fg.local_addr("l").unwrap();
    let mut kept = client(l).await;
    let r = exchange(
        &mut kept,
        request("GET", "/slow?do=sleep&ms=2500", &[], empty()),
    )
    .await;
    assert_eq!(r.status, 200, "a response slower than idle_timeout: {r:?}");
    let (status, data, err, _) = get_streamed(l, "/sse?do=sse&n=6&ms=500", &[]).await;
    assert_eq!((status, err), (200, None), "a 2.5 s stream");
    assert_eq!(String::from_utf8_lossy(&data).matches("data: ").count(), 6);

    let mut s = TcpStream::connect(l).await.unwrap();
    s.write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let first = tokio::time::timeout(LIVENESS, read_response(&mut s))
        .await
        .unwrap();
    assert_eq!(status_of(&first), 200);
    let t = Instant::now();
    let (rest, closed) = read_to_close(&mut s, LIVENESS).await;
    assert!(
        closed && rest.is_empty(),
        "closed quietly when idle: {rest:?}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_timeout_spares_slow_bodies_and_the_wait_between_requests() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(
        &py,
        "header_timeout = \"1s\"\nidle_timeout = \"30s\"",
        "",
        false,
    ));
    let l = fg.local_addr("l").unwrap();
    let mut s = TcpStream::connect(l).await.unwrap();
    // A body that takes 2.5 s to arrive, after a head that took none.
    s.write_all(b"POST /slow-body HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        .await
        .unwrap();
    for b in b"hello" {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.write_all(&[*b]).await.unwrap();
    }
    let r = tokio::time::timeout(LIVENESS, read_response(&mut s))
        .await
        .unwrap();
    assert_eq!(status_of(&r), 200, "{r:?}");
    assert!(r.contains("\"body_len\": 5"), "{r:?}");
    // 2 s between requests on the kept-alive connection.
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.write_all(b"GET /later HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let r = tokio::time::timeout(LIVENESS, read_response(&mut s))
        .await
        .unwrap();
    assert_eq!(status_of(&r), 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_streams_per_connection_is_advertised_to_h2c_clients() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(
        &py,
        "max_streams_per_connection = 7",
        "upstream_protocol = \"http1\"",
        false,
    ));
    let l = fg.local_addr("l").unwrap();
    let out = Command::new("nghttp")
        .args(["-v", "-n"])
        .arg(format!("http://{l}/"))
        .output()
        .await
        .expect("nghttp (apt-get install -y nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("[SETTINGS_MAX_CONCURRENT_STREAMS(0x03):7]"),
        "{text}"
    );
    assert!(text.contains(":status: 200"), "{text}");
}

// ---- Edge cases of the request line and pipelining ----

/// Splits raw HTTP/1.1 responses with Content-Length bodies; returns their statuses.
fn statuses(mut raw: &str) -> Vec<u16> {
    let mut v = Vec::new();
    while let Some(end) = raw.find("\r\n\r\n") {
        v.push(status_of(raw));
        let len: usize = raw[..end]
            .lines()
            .find_map(|l| {
                let (k, val) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| val.trim().parse().unwrap())
            })
            .unwrap_or(0);
        raw = raw.get(end + 4 + len..).unwrap_or("");
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desync_content_length_and_transfer_encoding_in_a_pipelined_request_is_400() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "", false));
    let l = fg.local_addr("l").unwrap();
    let smuggler = "POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    // In one write behind a first request.
    let req = format!("GET /first HTTP/1.1\r\nHost: x\r\n\r\n{smuggler}");
    let (resp, closed) = raw(l, req.as_bytes()).await;
    let one_write = (statuses(&resp), closed);
    // Written while a first request is in flight.
    let mut s = TcpStream::connect(l).await.unwrap();
    s.write_all(b"GET /inflight?do=sleep&ms=1000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut reached = false;
    for _ in 0..500 {
        if py.seen(0).await.iter().any(|s| s.contains("/inflight")) {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(reached);
    let _ = s.write_all(smuggler.as_bytes()).await;
    let (resp, closed) = read_to_close(&mut s, LIVENESS).await;
    let in_flight = (statuses(&resp), closed);
    assert_eq!(
        [one_write, in_flight],
        [(vec![200, 400], true), (vec![200, 400], true)],
        "[in one write, while in flight]: (statuses, closed)"
    );
    let seen = py.seen(0).await;
    assert!(
        !seen
            .iter()
            .any(|s| s.contains("/second") || s.contains("/smuggled")),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_byte_timeout_runs_from_the_end_of_the_request_body() {
    let py = Py::start(1).await;
    let cfg = head(false)
        + &listener("l", "")
        + &route(None, "/", "p", "first_byte_timeout = \"1s\"")
        + &pool("p", &[py.name(0)], "");
    let fg = start(&cfg);
    let l = fg.local_addr("l").unwrap();
    let mut s = TcpStream::connect(l).await.unwrap();
    // A 2.5 s upload; the backend answers as soon as it has all of it.
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        .await
        .unwrap();
    for b in b"hello" {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
    }
    let (resp, _) = read_to_close(&mut s, Duration::from_secs(2)).await;
    assert_eq!(status_of(&resp), 200, "{resp:?}");
    assert!(resp.contains("\"body_len\": 5"), "{resp:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_target_routes_by_its_authority_and_sets_host_from_it() {
    let (py, fg) = routing().await;
    let l = fg.local_addr("l").unwrap();
    let (resp, _) = raw(
        l,
        b"GET http://api.example.com/x HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 200, "{resp:?}");
    let body = &resp[resp.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["backend"], py.name(EXACT), "routed by the authority: {v}");
    assert_eq!(v["target"], "/x", "origin-form upstream: {v}");
    let hosts = sent(&v, "host");
    // RFC 9112 §3.2.2: a proxy replaces Host with the target's authority.
    assert_eq!(hosts, ["api.example.com"], "{v}");
    // An empty path with a query goes up as `/?query`.
    let (resp, _) = raw(
        l,
        b"GET http://api.example.com?q=1 HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 200, "{resp:?}");
    let body = &resp[resp.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["target"], "/?q=1", "origin-form upstream: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_authority_routes_and_becomes_host_upstream() {
    let (py, fg) = routing().await;
    let l = fg.local_addr("l").unwrap();
    let out = Command::new("nghttp")
        .args(["-H", ":authority: api.example.com:8443"])
        .arg(format!("http://{l}/h2/x?q=1"))
        .output()
        .await
        .expect("nghttp (apt-get install -y nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect("the backend's JSON");
    assert_eq!(v["backend"], py.name(EXACT), "{v}");
    assert_eq!(v["target"], "/h2/x?q=1", "{v}");
    let host = sent(&v, "host");
    assert_eq!(host, ["api.example.com:8443"], "{v}");
}

// ---- h2c clients: streaming both ways, SSE; curl's Expect: 100-continue ----

/// Writes `total` bytes of `block`s to a file in `dir`.
fn generated_file(dir: &tempdir::Dir, total: u64) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.0.join("body.bin");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let (mut k, mut left) = (0, total);
    while left > 0 {
        let b = block(k, left.min(65536) as usize);
        f.write_all(&b).unwrap();
        left -= b.len() as u64;
        k += 1;
    }
    f.flush().unwrap();
    path
}

/// curl with `args`; returns its stdout, asserting it succeeded.
async fn curl_out(args: &[&str]) -> Vec<u8> {
    let out = tokio::time::timeout(
        LIVENESS * 6,
        Command::new("curl")
            .args(["-sS", "--noproxy", "*", "--max-time", "60"])
            .args(args)
            .output(),
    )
    .await
    .expect("curl finishes")
    .expect("curl (apt-get install -y curl)");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_client_uploads_and_downloads_64_mib_with_equal_sha256() {
    const SIZE: u64 = 64 << 20;
    let py = Py::start(1).await;
    let p = Proc::spawn(
        &one_pool(&py, "", "upstream_protocol = \"http1\"", false),
        &[],
    );
    let l = p.addr("l");
    let file = generated_file(&p.dir, SIZE);
    let upload = format!("@{}", file.display());
    let url = format!("http://{l}/up");
    let ((up, down), growth) = rss_growth(p.pid(), async {
        let up = curl_out(&["--http2-prior-knowledge", "--data-binary", &upload, &url]).await;
        let url = format!("http://{l}/down?do=download&bytes={SIZE}");
        let down = curl_out(&["--http2-prior-knowledge", &url]).await;
        (up, down)
    })
    .await;
    let v: serde_json::Value = serde_json::from_slice(&up).expect("the backend's JSON");
    let want = generated_sha256(SIZE);
    assert_eq!(v["body_len"], SIZE, "{v}");
    assert_eq!(v["sha256"], want, "{v}");
    assert_eq!(down.len() as u64, SIZE);
    assert_eq!(hex(&Sha256::digest(&down)), want);
    eprintln!("flowgate RSS growth: {growth} KiB");
    assert!(growth < 32 << 10, "flowgate's RSS grew by {growth} KiB");
}

/// An h2c request with a body of unknown length (no content-length) goes to an
/// HTTP/1.1 backend chunked, its `:authority` as Host and in X-Forwarded-Host,
/// with the forwarded headers, and its body arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upload_without_a_length_goes_chunked_to_an_http1_backend() {
    use tokio::io::AsyncWriteExt;
    const SIZE: u64 = 1 << 20;
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "upstream_protocol = \"http1\"", false));
    let l = fg.local_addr("l").unwrap();
    let mut curl = Command::new("curl")
        .args([
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "60",
            "--http2-prior-knowledge",
        ])
        .args(["-X", "POST", "-T", "-", "-H", "X-Forwarded-For: 192.0.2.7"])
        .arg(format!("http://api.example:{}/up?x=1", l.port()))
        .args(["--connect-to", &format!("api.example:{}:{l}", l.port())])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("curl (apt-get install -y curl)");
    let mut stdin = curl.stdin.take().unwrap();
    for k in 0..(SIZE / 65536) {
        stdin.write_all(&block(k, 65536)).await.unwrap();
    }
    drop(stdin);
    let out = tokio::time::timeout(LIVENESS * 6, curl.wait_with_output())
        .await
        .expect("curl finishes")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the backend's JSON");
    assert_eq!(v["method"], "POST", "{v}");
    assert_eq!(v["target"], "/up?x=1", "{v}");
    assert_eq!(v["body_len"], SIZE, "{v}");
    assert_eq!(v["sha256"], generated_sha256(SIZE), "{v}");
    let get = |n: &str| sent(&v, n);
    let authority = format!("api.example:{}", l.port());
    assert_eq!(get("host"), [authority.as_str()], "{v}");
    assert_eq!(get("transfer-encoding"), ["chunked"], "{v}");
    assert!(get("content-length").is_empty(), "{v}");
    assert_eq!(get("x-forwarded-for"), ["192.0.2.7, 127.0.0.1"], "{v}");
    assert_eq!(get("x-forwarded-proto"), ["http"], "{v}");
    assert_eq!(get("x-forwarded-host"), [authority.as_str()], "{v}");
    assert_eq!(get("x-request-id").len(), 1, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_upload_with_expect_100_continue() {
    const SIZE: u64 = 8 << 20;
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "", false));
    let l = fg.local_addr("l").unwrap();
    let dir = tempdir::Dir::new();
    let upload = format!("@{}", generated_file(&dir, SIZE).display());
    let t = Instant::now();
    let up = curl_out(&[
        "-H",
        "Expect: 100-continue",
        "--expect100-timeout",
        "30",
        "--data-binary",
        &upload,
        &format!("http://{l}/up"),
    ])
    .await;
    let v: serde_json::Value = serde_json::from_slice(&up).expect("the backend's JSON");
    assert_eq!(v["body_len"], SIZE, "{v}");
    assert_eq!(v["sha256"], generated_sha256(SIZE), "{v}");
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "curl waited out its Expect timeout: no 100 Continue came ({:?})",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_to_an_h2c_client_arrives_as_written() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "upstream_protocol = \"http1\"", false));
    let l = fg.local_addr("l").unwrap();
    let mut child = Command::new("curl")
        .args(["-sS", "-N", "--noproxy", "*", "--http2-prior-knowledge"])
        .arg(format!("http://{l}/events?do=sse&n=20&ack=h2"))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("curl (apt-get install -y curl)");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut events = 0;
    let mut line = String::new();
    loop {
        line.clear();
        let n = tokio::time::timeout(LIVENESS, out.read_line(&mut line))
            .await
            .expect("each event comes while the backend waits for its ack")
            .unwrap();
        if n == 0 {
            break;
        }
        if line.starts_with("data: ") {
            ack(&py, "h2", events).await;
            events += 1;
        }
    }
    assert!(child.wait().await.unwrap().success());
    assert_eq!(
        events, 20,
        "every event arrived before the next was written"
    );
}

// ---- Accounting: requests in flight after clients give up ----

/// The sum of metric `name`'s samples whose labels contain all of `labels`.
async fn metric(admin: SocketAddr, name: &str, labels: &[&str]) -> f64 {
    let r = curl(admin, "GET", "/metrics", None, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    r.text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// HTTP/1.1 upstream connections are driven by the requests that use them (no
/// task of their own) and go back to the pool between them: one kept-alive client's
/// requests, whatever their bodies, all go on one upstream connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_one_upstream_connection() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "", true));
    let (l, admin) = (fg.local_addr("l").unwrap(), fg.admin_addr().unwrap());
    let mut kept = client(l).await;
    for i in 0..10 {
        let r = exchange(&mut kept, request("GET", "/get", &[], empty())).await;
        assert_eq!(r.status, 200, "GET {i}: {r:?}");
        let r = exchange(&mut kept, request("POST", "/post", &[], full("body"))).await;
        assert_eq!(r.status, 200, "POST {i}: {r:?}");
        assert_eq!(r.json()["body_len"], 4);
        // A chunked response, ended by its last chunk rather than a length.
        let r = exchange(
            &mut kept,
            request("GET", "/s?do=sse&n=2&ms=1", &[], empty()),
        )
        .await;
        assert_eq!(r.status, 200, "SSE {i}: {r:?}");
        let r = exchange(&mut kept, request("HEAD", "/get", &[], empty())).await;
        assert_eq!(r.status, 200, "HEAD {i}: {r:?}");
    }
    let opened = metric(admin, "flowgate_backend_connections_total", &[]).await;
    assert_eq!(opened, 1.0, "40 requests, one upstream connection");
    assert_eq!(py.open_conns(0).await, 1);
}

/// An h2c connection to `l` with the `h2` crate's client (its default windows),
/// and the task that drives it.
async fn h2c_connect(
    l: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(l).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    (h2, tokio::spawn(conn))
}

/// A GET of `target` on `l`, for an h2c client.
fn h2c_get(l: SocketAddr, target: &str) -> Request<()> {
    Request::get(format!("http://{l}{target}"))
        .body(())
        .unwrap()
}

/// Waits until pool "p"'s first backend has `want` requests in flight; returns
/// the last count.
async fn in_flight_until(admin: SocketAddr, want: u64) -> u64 {
    let mut n = u64::MAX;
    for _ in 0..300 {
        n = backends_of(&get_pools(admin).await, "p")[0]["active_connections"]
            .as_u64()
            .unwrap();
        if n == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    n
}

/// One backend behind a route whose `stream_idle_timeout` is 1 s: the
/// listener's and the admin API's addresses.
async fn stream_idle_of_a_second() -> (Py, Flowgate, SocketAddr, SocketAddr) {
    let py = Py::start(1).await;
    let cfg = head(true)
        + &listener("l", "")
        + &route(None, "/", "p", "stream_idle_timeout = \"1s\"")
        + &pool("p", &[py.name(0)], "upstream_protocol = \"http1\"");
    let fg = start(&cfg);
    let (l, admin) = (fg.local_addr("l").unwrap(), fg.admin_addr().unwrap());
    (py, fg, l, admin)
}

/// The one download in flight on pool `p` ends, not sooner than its route's
/// `stream_idle_timeout` of 1 s.
async fn cut_after_a_second(admin: SocketAddr, what: &str) {
    let t = Instant::now();
    assert_eq!(in_flight_until(admin, 1).await, 1, "{what}: in flight");
    assert_eq!(
        in_flight_until(admin, 0).await,
        0,
        "{what}: the stalled download ended"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{what}: ended by stream_idle_timeout (1 s), not before: {:?}",
        t.elapsed()
    );
}

/// An h2c client that stops taking a response (no WINDOW_UPDATE: a slow-read
/// client) holds the backend's response only for `stream_idle_timeout`: then its
/// stream is reset and the request ends, while its connection serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_client_that_stops_reading_is_cut_after_stream_idle_timeout() {
    let (_py, _fg, l, admin) = stream_idle_of_a_second().await;
    // h2's default windows (64 KiB), never given back: the client reads nothing.
    let (mut h2, driver) = h2c_connect(l).await;
    let get = |target: &str| h2c_get(l, target);
    let (resp, _) = h2
        .send_request(get("/big?do=download&bytes=50000000"), true)
        .unwrap();
    let resp = tokio::time::timeout(LIVENESS, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    cut_after_a_second(admin, "h2c").await;
    // The client finds its stream reset once it looks.
    let mut body = resp.into_body();
    let mut failed = false;
    while let Some(d) = tokio::time::timeout(LIVENESS, body.data()).await.unwrap() {
        match d {
            Ok(d) => {
                let _ = body.flow_control().release_capacity(d.len());
            }
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(
        failed,
        "the cut stream ends in a reset, not as a complete body"
    );
    let (resp, _) = h2.send_request(get("/after"), true).unwrap();
    let resp = tokio::time::timeout(LIVENESS, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!driver.is_finished(), "the h2c connection is still open");
}

/// CONNECT asks for a tunnel, which a balancer does not give (nginx answers 405
/// too): 405, from HTTP/1.1 and h2c clients alike, and nothing goes upstream as a
/// body. A backend that answers 101 to a request that asked for no upgrade gets
/// the client a 502 (HTTP/2 has no 101 to relay), not a reset stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_gets_405_and_an_unasked_101_gets_502() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "upstream_protocol = \"http1\"", false));
    let l = fg.local_addr("l").unwrap();
    let (resp, closed) = raw(
        l,
        b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 405, "{resp}");
    assert!(closed, "the connection closes after a refused CONNECT");
    assert_eq!(get(l, "/x?do=status&code=101", &[]).await.status, 502);

    let (mut h2, _driver) = h2c_connect(l).await;
    let connect = Request::builder()
        .method("CONNECT")
        .uri("example.com:443")
        .body(())
        .unwrap();
    let (resp, _body) = h2.send_request(connect, false).unwrap();
    let resp = tokio::time::timeout(LIVENESS, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 405);
    let (resp, _) = h2
        .send_request(h2c_get(l, "/x?do=status&code=101"), true)
        .unwrap();
    let resp = tokio::time::timeout(LIVENESS, resp).await.unwrap();
    assert_eq!(resp.expect("a response, not a reset").status(), 502);
    // The connection serves on.
    let (resp, _) = h2
        .send_request(
            Request::get(format!("http://{l}/ok")).body(()).unwrap(),
            true,
        )
        .unwrap();
    let resp = tokio::time::timeout(LIVENESS, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
}

/// An h2c client that resets a stream (RST_STREAM, as a gRPC or browser client
/// does when it cancels) ends that request, mid-response or before its head,
/// while its connection stays open and goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_stream_reset_by_its_client_ends_its_request() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "upstream_protocol = \"http1\"", true));
    let (l, admin) = (fg.local_addr("l").unwrap(), fg.admin_addr().unwrap());
    let (mut h2, driver) = h2c_connect(l).await;
    let get = |target: &str| h2c_get(l, target);
    // One stream mid-response (an event read), one waiting for its head.
    let (resp, mut sse) = h2
        .send_request(get("/sse?do=sse&n=100&ms=100"), true)
        .unwrap();
    let resp = tokio::time::timeout(LIVENESS, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let mut events = resp.into_body();
    let first = tokio::time::timeout(LIVENESS, events.data()).await.unwrap();
    assert!(first.is_some_and(|d| d.is_ok()), "the first event arrives");
    let (_slow_resp, mut slow) = h2
        .send_request(get("/slow?do=sleep&ms=30000"), true)
        .unwrap();
    assert_eq!(
        in_flight_until(admin, 2).await,
        2,
        "both requests in flight"
    );
    sse.send_reset(h2::Reason::CANCEL);
    slow.send_reset(h2::Reason::CANCEL);
    assert_eq!(
        in_flight_until(admin, 0).await,
        0,
        "requests in flight once their streams were reset"
    );
    // The event stream's backend connection is closed, not pooled mid-body (the
    // sleeping one only notices when it writes).
    assert_eq!(py.conns_until(0, |n| n <= 1).await, 1);
    // The connection itself serves on, on a fresh upstream connection.
    let (resp, _) = h2.send_request(get("/after"), true).unwrap();
    let resp = tokio::time::timeout(LIVENESS, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(LIVENESS, resp.into_body().data())
        .await
        .unwrap();
    assert!(body.is_some_and(|d| d.is_ok()));
    assert!(!driver.is_finished(), "the h2c connection is still open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_return_to_zero_when_clients_give_up() {
    let py = Py::start(2).await;
    let fg = start(&one_pool(&py, "", "", true));
    let (l, admin) = (fg.local_addr("l").unwrap(), fg.admin_addr().unwrap());
    let mut tasks = Vec::new();
    // HTTP/1.1 clients that leave mid-stream and before the response head.
    for target in ["/sse?do=sse&n=100&ms=100", "/slow?do=sleep&ms=1500"] {
        for _ in 0..4 {
            tasks.push(tokio::spawn(async move {
                let mut s = client(l).await;
                let req = request("GET", target, &[], empty());
                let _ = tokio::time::timeout(Duration::from_millis(300), async {
                    let resp = s.send_request(req).await.unwrap();
                    let mut b = resp.into_body();
                    while let Some(Ok(_)) = b.frame().await {}
                })
                .await;
            }));
        }
    }
    // h2c clients that leave mid-stream.
    for _ in 0..2 {
        tasks.push(tokio::spawn(async move {
            let _ = Command::new("curl")
                .args(["-sS", "-N", "--noproxy", "*", "--http2-prior-knowledge"])
                .args(["--max-time", "0.5", "-o", "/dev/null"])
                .arg(format!("http://{l}/sse2?do=sse&n=100&ms=100"))
                .status()
                .await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let in_flight_now = |pools: &serde_json::Value| -> Vec<u64> {
        backends_of(pools, "p")
            .iter()
            .map(|b| b["active_connections"].as_u64().unwrap())
            .collect()
    };
    let mut active = Vec::new();
    for _ in 0..300 {
        active = in_flight_now(&get_pools(admin).await);
        if active == [0, 0] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        active,
        [0, 0],
        "requests in flight per backend, once every client left"
    );
    let gauge = metric(admin, "flowgate_http_requests_in_flight", &[]).await;
    assert_eq!(gauge, 0.0, "flowgate_http_requests_in_flight");
    // Counted requests: one normal request now shows up as a 2xx.
    assert_eq!(get(l, "/counted", &[]).await.status, 200);
    let ok = metric(
        admin,
        "flowgate_http_requests_total",
        &["code=\"2xx\"", "listener=\"l\""],
    )
    .await;
    assert!(ok >= 1.0, "flowgate_http_requests_total 2xx: {ok}");
    // The time metrics are Prometheus histograms (buckets that add up over
    // instances), not the exporter's default summaries.
    let text = curl(admin, "GET", "/metrics", None, None).await.text;
    for name in [
        "flowgate_http_request_duration_seconds",
        "flowgate_http_response_head_seconds",
        "flowgate_http_response_first_byte_seconds",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} histogram\n")),
            "{name} should be a histogram:\n{text}"
        );
    }
    let mut counted = 0.0;
    for _ in 0..100 {
        counted = metric(
            admin,
            "flowgate_http_request_duration_seconds_bucket",
            &["le=\"+Inf\"", "listener=\"l\""],
        )
        .await;
        if counted >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(counted >= 1.0, "requests in the +Inf bucket: {counted}");
}

// ---- Upstream connection pool ----

impl Py {
    /// How many connections server `i` has open, not counting the one asking.
    async fn open_conns(&self, i: usize) -> u64 {
        let r = get(self.addr(i), "/__conns", &[]).await;
        serde_json::from_slice::<u64>(&r.body).unwrap() - 1
    }

    /// Waits until server `i` has `cond` open connections; returns the last count.
    async fn conns_until(&self, i: usize, cond: impl Fn(u64) -> bool) -> u64 {
        let mut n = 0;
        for _ in 0..300 {
            n = self.open_conns(i).await;
            if cond(n) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_are_kept_up_to_max_idle_per_backend() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "max_idle_per_backend = 2", false));
    let l = fg.local_addr("l").unwrap();
    let slow: Vec<_> = (0..10)
        .map(|_| tokio::spawn(get(l, "/slow?do=sleep&ms=500", &[])))
        .collect();
    let busy = py.conns_until(0, |n| n == 10).await;
    assert_eq!(busy, 10, "ten requests in flight, ten upstream connections");
    for s in slow {
        assert_eq!(s.await.unwrap().status, 200);
    }
    let idle = py.conns_until(0, |n| n <= 2).await;
    assert!(
        idle <= 2,
        "{idle} idle upstream connections kept, max_idle_per_backend = 2"
    );
    // The ones kept are reused: sequential requests open no new connection.
    for _ in 0..5 {
        assert_eq!(get(l, "/again", &[]).await.status, 200);
    }
    assert!(py.open_conns(0).await <= 2);
}

/// Idle pooled connections are closed once unused for the pool's
/// `keepalive_timeout`: a burst's extra connections do not stay open for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_close_after_keepalive_timeout() {
    let py = Py::start(1).await;
    // Long enough that a slow machine still sees them idle before the sweep.
    let fg = start(&one_pool(&py, "", "keepalive_timeout = \"3s\"", false));
    let l = fg.local_addr("l").unwrap();
    let slow: Vec<_> = (0..4)
        .map(|_| tokio::spawn(get(l, "/slow?do=sleep&ms=300", &[])))
        .collect();
    let busy = py.conns_until(0, |n| n == 4).await;
    assert_eq!(
        busy, 4,
        "four requests in flight, four upstream connections"
    );
    for s in slow {
        assert_eq!(s.await.unwrap().status, 200);
    }
    assert_eq!(py.open_conns(0).await, 4, "kept idle right after");
    let left = py.conns_until(0, |n| n == 0).await;
    assert_eq!(left, 0, "idle upstream connections after keepalive_timeout");
    // The pool opens a new one for the next request.
    assert_eq!(get(l, "/after", &[]).await.status, 200);
    assert_eq!(py.open_conns(0).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_backend_closes_its_idle_upstream_connections() {
    let py = Py::start(2).await;
    let fg = start(&one_pool(&py, "", "", true));
    let (l, admin) = (fg.local_addr("l").unwrap(), fg.admin_addr().unwrap());
    let warm: Vec<_> = (0..6)
        .map(|_| tokio::spawn(get(l, "/warm?do=sleep&ms=200", &[])))
        .collect();
    for w in warm {
        assert_eq!(w.await.unwrap().status, 200);
    }
    assert!(
        py.open_conns(0).await >= 1,
        "pooled idle connections to backend 0"
    );
    let r = post_action(admin, &py.name(0), "drain", false).await;
    assert_eq!(r.status, 200, "{r:?}");
    let left = py.conns_until(0, |n| n == 0).await;
    assert_eq!(
        left, 0,
        "idle upstream connections to a drained backend close"
    );
    assert!(py.open_conns(1).await >= 1, "the other backend's stay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_removed_by_reload_has_its_idle_upstream_connections_closed() {
    let py = Py::start(2).await;
    let dir = tempdir::Dir::new();
    let (fg, path) = start_file(&dir, "flowgate.toml", &one_pool(&py, "", "", true));
    let (l, admin) = (fg.local_addr("l").unwrap(), fg.admin_addr().unwrap());
    let warm: Vec<_> = (0..6)
        .map(|_| tokio::spawn(get(l, "/warm?do=sleep&ms=200", &[])))
        .collect();
    for w in warm {
        assert_eq!(w.await.unwrap().status, 200);
    }
    assert!(
        py.open_conns(0).await >= 1,
        "pooled idle connections to backend 0"
    );
    let v2 = head(true) + &listener("l", "pool = \"p\"") + &pool("p", &[py.name(1)], "");
    std::fs::write(&path, v2).unwrap();
    let r = curl(admin, "POST", "/api/v1/reload", None, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let left = py.conns_until(0, |n| n == 0).await;
    assert_eq!(
        left, 0,
        "idle upstream connections to a removed backend close"
    );
    for _ in 0..4 {
        assert_eq!(get(l, "/after", &[]).await.backend(), py.name(1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_client_gets_goaway_when_a_reload_removes_its_listener() {
    let py = Py::start(1).await;
    let dir = tempdir::Dir::new();
    let both = head(true)
        + &listener("keep", "pool = \"p\"")
        + &listener("gone", "pool = \"p\"")
        + &pool("p", &[py.name(0)], "upstream_protocol = \"http1\"");
    let (fg, path) = start_file(&dir, "flowgate.toml", &both);
    let (gone, admin) = (fg.local_addr("gone").unwrap(), fg.admin_addr().unwrap());
    let nghttp = Command::new("nghttp")
        .args(["-v", "-n"])
        .arg(format!("http://{gone}/inflight?do=sleep&ms=1500"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("nghttp (apt-get install -y nghttp2-client)");
    let mut reached = false;
    for _ in 0..500 {
        if py.seen(0).await.iter().any(|s| s.contains("/inflight")) {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(reached, "the request reached the backend");
    let one = head(true)
        + &listener("keep", "pool = \"p\"")
        + &pool("p", &[py.name(0)], "upstream_protocol = \"http1\"");
    std::fs::write(&path, one).unwrap();
    let r = curl(admin, "POST", "/api/v1/reload", None, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let out = tokio::time::timeout(LIVENESS, nghttp.wait_with_output())
        .await
        .expect("nghttp finishes")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let goaway = text.find("recv GOAWAY frame").expect("a GOAWAY");
    let status = text.find(":status: 200").expect("the stream completed");
    assert!(
        goaway < status,
        "GOAWAY came while the stream was in flight: {text}"
    );
    assert!(
        TcpStream::connect(gone).await.is_err(),
        "the removed listener is closed"
    );
}

/// A kept-alive upstream connection the backend closes while the next request is
/// on its way (the backend read it and hung up without a word): a bodiless
/// request goes again, once, on a fresh connection, and the client never knows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cut_off_by_a_closing_pooled_connection_is_sent_again() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = backend.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = backend.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for n in 0.. {
                    // One request head (these requests have no body).
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end);
                    let line = head.lines().next().unwrap_or("").to_string();
                    log.lock().unwrap().push(line);
                    if n == 1 {
                        // The second request on a connection: hang up on it.
                        return;
                    }
                    let body = "ok\n";
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let cfg = head(false) + &listener("l", "pool = \"p\"") + &pool("p", &[addr.to_string()], "");
    let fg = start(&cfg);
    let l = fg.local_addr("l").unwrap();
    for path in ["/first", "/second", "/third"] {
        let r = get(l, path, &[]).await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
    }
    // A POST cut off the same way is not sent again (the backend may have acted
    // on it): the client gets the error.
    let mut s = client(l).await;
    let r = exchange(&mut s, request("POST", "/fourth", &[], empty())).await;
    assert_eq!(r.status, 502, "{r:?}");
    let seen = seen.lock().unwrap().clone();
    let count = |p: &str| seen.iter().filter(|l| l.contains(p)).count();
    assert_eq!(count("/first"), 1, "{seen:?}");
    // The second went out on the pooled connection, was cut off, and went again.
    assert_eq!(count("/second"), 2, "{seen:?}");
    assert_eq!(count("/fourth"), 1, "{seen:?}");
    drop(fg);
}

/// A backend that answers an upload early (413) and closes: the client gets that
/// answer, not a 502, though the rest of its body can no longer be written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_to_an_upload_reaches_the_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut chunk = [0u8; 4096];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large")
                    .await;
                // Closed with the upload unread: the kernel resets the connection.
            });
        }
    });
    let cfg = head(false) + &listener("l", "pool = \"p\"") + &pool("p", &[addr.to_string()], "");
    let fg = start(&cfg);
    let l = fg.local_addr("l").unwrap();
    let mut c = TcpStream::connect(l).await.unwrap();
    let size = 64 << 20;
    c.write_all(
        format!("POST /up HTTP/1.1\r\nhost: t\r\ncontent-length: {size}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let (mut rd, mut wr) = c.into_split();
    let upload = tokio::spawn(async move {
        let chunk = vec![b'x'; 1 << 16];
        for _ in 0..(size / chunk.len()) {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let _ = tokio::time::timeout(LIVENESS * 3, async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("too large") {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(text.starts_with("HTTP/1.1 413"), "{text:?}");
    assert!(text.ends_with("too large"), "{text:?}");
    upload.abort();
    drop(fg);
}

/// A request answered before its body was read (here: no route, 404): the body's
/// bytes must never be read as a next request, even when they look like one. The
/// connection closes after the answer, and the backend never sees the "request"
/// inside the body. A body that came whole with its head (the fast path reads it
/// with the head) is read: that connection goes on, and its next request is the
/// one after the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_body_is_never_taken_for_a_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = backend.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    log.lock().unwrap().push(text);
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    let cfg = head(false)
        + &listener("l", "")
        + &route(None, "/api", "p", "")
        + &pool("p", &[addr.to_string()], "");
    let fg = start(&cfg);
    let l = fg.local_addr("l").unwrap();
    let inner = "GET /api/smuggled HTTP/1.1\r\nhost: t\r\n\r\n";
    for wait in [false, true] {
        let mut c = TcpStream::connect(l).await.unwrap();
        let head = format!(
            "POST /nowhere HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n",
            inner.len()
        );
        if wait {
            // The body after the answer (a later read, after a park).
            c.write_all(head.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = c.write_all(inner.as_bytes()).await;
        } else {
            c.write_all((head + inner).as_bytes()).await.unwrap();
        }
        if !wait {
            // Read whole with its head: answered, and the connection serves on.
            c.write_all(b"GET /api/next HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
        }
        let mut got = Vec::new();
        let closed = tokio::time::timeout(LIVENESS, c.read_to_end(&mut got)).await;
        let text = String::from_utf8_lossy(&got).into_owned();
        assert!(text.starts_with("HTTP/1.1 404"), "{text:?}");
        assert_eq!(
            text.matches("HTTP/1.1").count(),
            if wait { 1 } else { 2 },
            "one answer each: {text:?}"
        );
        assert!(closed.is_ok(), "the connection closed after the answer");
    }
    let seen = seen.lock().unwrap().clone();
    assert!(
        !seen.iter().any(|r| r.contains("smuggled")),
        "the body went upstream as a request: {seen:?}"
    );
    assert!(
        seen.iter().any(|r| r.starts_with("GET /api/next ")),
        "the request after a read body went up: {seen:?}"
    );
    drop(fg);
}

/// A chunked request body with trailers goes up chunked, its data whole and its
/// trailers after the last chunk; a Content-Length body goes up as it came, with
/// its length. What the backend reads is checked byte for byte (a raw backend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_go_up_framed_as_they_came() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = backend.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                // One request per connection: until its end (the last chunk's
                // blank line, or the length), then the answer.
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let text = String::from_utf8_lossy(&got).into_owned();
                    let done = match text.find("\r\n\r\n") {
                        Some(end) if text[..end].contains("transfer-encoding: chunked") => {
                            text[end..].contains("\r\n0\r\n") && text.ends_with("\r\n\r\n")
                        }
                        Some(end) => {
                            let len: usize = text[..end]
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length: "))
                                .map_or(0, |v| v.trim().parse().unwrap());
                            got.len() >= end + 4 + len
                        }
                        None => false,
                    };
                    if done {
                        break;
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&got).into_owned());
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    let cfg = head(false)
        + &listener("l", "pool = \"p\"\nxff = \"off\"")
        + &pool("p", &[addr.to_string()], "");
    let fg = start(&cfg);
    let l = fg.local_addr("l").unwrap();

    let chunked = "POST /c HTTP/1.1\r\nhost: t\r\nconnection: close\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n";
    let (resp, _) = raw(l, chunked.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let up = rx.recv().await.unwrap();
    let (head, body) = up.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("POST /c HTTP/1.1\r\n"), "{up:?}");
    assert!(head.contains("\r\ntransfer-encoding: chunked"), "{up:?}");
    // Data as chunks (however the frames fell), then the trailer.
    let mut data = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size, 16).unwrap();
        if n == 0 {
            assert_eq!(after, "x-sum: 42\r\n\r\n", "{up:?}");
            break;
        }
        data.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap();
    }
    assert_eq!(data, "hello world");

    let sized =
        "POST /s HTTP/1.1\r\nhost: t\r\nconnection: close\r\ncontent-length: 11\r\n\r\nhello world";
    let (resp, _) = raw(l, sized.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let up = rx.recv().await.unwrap();
    assert!(up.contains("\r\ncontent-length: 11\r\n"), "{up:?}");
    assert!(!up.contains("transfer-encoding"), "{up:?}");
    assert!(up.ends_with("\r\n\r\nhello world"), "{up:?}");
    drop(fg);
}

/// Bodiless requests are answered by flowgate's own HTTP/1.1 server path
/// (serve1.rs). Pipelined in one write: a GET, a HEAD (no body in its answer), a
/// chunked response with a trailer to a client that sent `TE: trailers` (the
/// trailer goes on), the same without it (it does not), and an HTTP/1.0 GET
/// (answered as HTTP/1.1, as nginx does, then the close). Then a request with a
/// body (hyper's path) and bodiless ones before and after it on one connection.
/// Every answer comes, in order, and the backend sees each request once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_requests_are_answered_as_hyper_would() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "", false));
    let l = fg.local_addr("l").unwrap();
    let req = concat!(
        "GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
        "HEAD /b HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /d?do=trailers HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n",
        "GET /e?do=trailers HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /f HTTP/1.0\r\nHost: x\r\n\r\n",
    );
    let (resp, closed) = raw(l, req.as_bytes()).await;
    let answers: Vec<&str> = resp.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 5, "five answers: {resp:?}");
    assert!(
        answers.iter().all(|a| a.starts_with("200 OK\r\n")),
        "{resp:?}"
    );
    assert!(
        answers[0].contains("\"target\": \"/a\""),
        "{:?}",
        answers[0]
    );
    assert!(
        // (The backend's names go on in the case it wrote them, as nginx has
        // it.)
        answers[1].ends_with("\r\n\r\n")
            && answers[1].to_ascii_lowercase().contains("content-length: "),
        "HEAD: a head with the length and no body: {:?}",
        answers[1]
    );
    assert!(
        answers[2].contains("transfer-encoding: chunked")
            && answers[2].ends_with("5\r\nhello\r\n0\r\nx-checksum: 42\r\n\r\n"),
        "chunked, with the trailer: {:?}",
        answers[2]
    );
    assert!(
        answers[3].ends_with("5\r\nhello\r\n0\r\n\r\n"),
        "chunked, no trailer without TE: trailers: {:?}",
        answers[3]
    );
    assert!(
        answers[4].contains("connection: close") && answers[4].contains("\"target\": \"/f\""),
        "{:?}",
        answers[4]
    );
    assert!(closed, "closed after the HTTP/1.0 answer");

    // A body between bodiless requests on one connection.
    let mut s = TcpStream::connect(l).await.unwrap();
    s.write_all(b"GET /g HTTP/1.1\r\nHost: x\r\n\r\nPOST /h HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /i HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // (Read as they come: two may arrive in one read.)
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let text = tokio::time::timeout(LIVENESS, async {
        loop {
            let text = String::from_utf8_lossy(&got).into_owned();
            if statuses(&text).len() == 3 && text.ends_with('}') {
                return text;
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => panic!("closed mid-response: {text:?}"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("three answers");
    assert_eq!(statuses(&text), [200, 200, 200], "{text:?}");
    let g = text.find("\"target\": \"/g\"");
    let h = text.find("\"body_len\": 3");
    let i = text.find("\"target\": \"/i\"");
    assert!(g.is_some() && g < h && h < i, "in order: {text:?}");
    // Quiet long enough for hyper's connection to be parked: the next one is
    // the fast path's again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(b"GET /j HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s).await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("\"target\": \"/j\""),
        "{r:?}"
    );
    assert_eq!(
        py.seen(0).await,
        [
            "GET /a",
            "HEAD /b",
            "GET /d?do=trailers",
            "GET /e?do=trailers",
            "GET /f",
            "GET /g",
            "POST /h",
            "GET /i",
            "GET /j",
        ]
    );
}

/// An HTTP/1.1 client that stops reading its response holds the backend's
/// response only for `stream_idle_timeout` once the socket buffers are full:
/// then the write fails and the connection closes, the response cut short. Both
/// the fast path (a GET) and hyper's server (a POST with a body) are held to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_that_stops_reading_is_cut_after_stream_idle_timeout() {
    let (_py, _fg, l, admin) = stream_idle_of_a_second().await;
    const TOTAL: usize = 100_000_000;
    for req in [
        format!("GET /big?do=download&bytes={TOTAL} HTTP/1.1\r\nhost: x\r\n\r\n"),
        format!(
            "POST /big?do=download&bytes={TOTAL} HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello"
        ),
    ] {
        let mut s = TcpStream::connect(l).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut first = [0u8; 12];
        tokio::time::timeout(LIVENESS, s.read_exact(&mut first))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&first, b"HTTP/1.1 200", "{req}");
        // Now the client reads nothing.
        cut_after_a_second(admin, &req).await;
        // What the kernel buffered arrives, then the close: well short of it all.
        let mut got = first.len();
        let mut buf = vec![0u8; 1 << 16];
        let closed = tokio::time::timeout(LIVENESS, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got += n,
                }
            }
        })
        .await
        .is_ok();
        assert!(closed, "{req}: the connection closes");
        assert!(got < TOTAL / 2, "{req}: cut short, got {got} bytes");
    }
    // The listener serves on.
    assert_eq!(get(l, "/after", &[]).await.status, 200);
}

/// POSTs whose bodies come whole with their heads (a JSON request to an
/// inference server, pipelined here in one write with a GET after them) each
/// reach the backend with all of their body, framed by flowgate's own
/// Content-Length, one request each: none of a body is read as a request, and
/// the bytes after each body start the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_whose_bodies_came_with_their_heads_go_up_whole() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "upstream_protocol = \"http1\"", false));
    let l = fg.local_addr("l").unwrap();
    let json = br#"{"model":"m","messages":[{"role":"user","content":"GET /smuggled HTTP/1.1"}]}"#;
    let empty: &[u8] = b"";
    let mut req = Vec::new();
    for (target, body) in [
        ("/chat/1", &json[..]),
        ("/chat/2", empty),
        ("/chat/3", json),
    ] {
        req.extend_from_slice(
            format!(
                "POST {target} HTTP/1.1\r\nHost: app\r\ncontent-type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        req.extend_from_slice(body);
    }
    req.extend_from_slice(b"GET /after HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n");
    let (resp, closed) = raw(l, &req).await;
    assert!(closed, "closed after the last request");
    let answers: Vec<serde_json::Value> = resp
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|r| {
            assert!(r.starts_with("200 "), "{r}");
            serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).expect("the backend's JSON")
        })
        .collect();
    assert_eq!(answers.len(), 4, "{resp}");
    let want = [
        ("POST", "/chat/1", json.len()),
        ("POST", "/chat/2", 0),
        ("POST", "/chat/3", json.len()),
        ("GET", "/after", 0),
    ];
    for (v, (method, target, len)) in answers.iter().zip(want) {
        assert_eq!(v["method"], method, "{v}");
        assert_eq!(v["target"], target, "{v}");
        assert_eq!(v["body_len"], len, "{v}");
        if len > 0 {
            assert_eq!(v["sha256"], hex(&Sha256::digest(json)), "{v}");
            assert_eq!(sent(v, "content-length"), [len.to_string()], "{v}");
        }
    }
    let seen = py.seen(0).await;
    assert!(
        !seen.iter().any(|s| s.contains("/smuggled")),
        "the backend saw a body as a request: {seen:?}"
    );
    assert_eq!(seen.len(), 4, "{seen:?}");
}

/// A POST whose body is written apart from its head (as httpx writes them), at
/// once or after a pause: either way the backend gets all of it, once, on the
/// same kept-alive connection, and the request after it is its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_written_apart_from_its_head_goes_up_whole() {
    let py = Py::start(1).await;
    let fg = start(&one_pool(&py, "", "upstream_protocol = \"http1\"", false));
    let l = fg.local_addr("l").unwrap();
    let body = br#"{"model":"m","prompt":"GET /smuggled HTTP/1.1"}"#;
    let mut s = TcpStream::connect(l).await.unwrap();
    for (i, pause) in [0u64, 0, 200, 0].into_iter().enumerate() {
        let head = format!(
            "POST /apart/{i} HTTP/1.1\r\nHost: app\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(pause)).await;
        s.write_all(body).await.unwrap();
        let resp = read_response(&mut s).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        let v: serde_json::Value =
            serde_json::from_str(resp.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(v["target"], format!("/apart/{i}"), "{v}");
        assert_eq!(v["body_len"], body.len(), "{v}");
        assert_eq!(v["sha256"], hex(&Sha256::digest(body)), "{v}");
    }
    let seen = py.seen(0).await;
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(!seen.iter().any(|s| s.contains("/smuggled")), "{seen:?}");
}

/// A backend that answers before the client has sent all of the request body
/// (nginx's `return`, an early 413): the client connection cannot be kept (the
/// rest of the body may never be read), and the response says so with
/// `Connection: close` rather than the connection closing under the client's
/// next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_whole_body_says_connection_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                // Answers the head at once, reads (and drops) whatever follows.
                if matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    let cfg = head(false) + &listener("l", "pool = \"p\"") + &pool("p", &[addr.to_string()], "");
    let fg = start(&cfg);
    let l = fg.local_addr("l").unwrap();
    let mut c = TcpStream::connect(l).await.unwrap();
    c.write_all(b"POST /early HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\n")
        .await
        .unwrap();
    let resp = tokio::time::timeout(LIVENESS, read_response(&mut c))
        .await
        .unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "the answer says the connection closes: {resp}"
    );
    let _ = c.write_all(b"0123456789").await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(LIVENESS, c.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "and it closes");
}
