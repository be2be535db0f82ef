//! Byte streams through flowgate over real loopback sockets: integrity at volume, many
//! concurrent sessions, half-close, reset propagation, dead and unreachable backends,
//! idle timeout, max_connections and graceful stop.
//!
//! Every address is port 0 read back; readiness is awaited as a real event (a reply, a
//! refused connect, a counter) and never slept on. Timeouts here are liveness bounds
//! that turn a hang into a failure, never assertions about how fast something was.

mod common;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use flowgate::Flowgate;
use sha2::{Digest, Sha256};
use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long something that should happen "at once" may take before the test fails.
const LIVENESS: Duration = Duration::from_secs(10);

/// Awaits `f`, failing the test with `what` if it does not finish within `limit`.
async fn within<F: Future>(limit: Duration, what: &str, f: F) -> F::Output {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {limit:?}"))
}

/// splitmix64: cheap, deterministic, and nothing like all zeros.
struct Prng(u64);

impl Prng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `buf` (a multiple of 8 bytes long).
    fn fill(&mut self, buf: &mut [u8]) {
        for w in buf.chunks_exact_mut(8) {
            w.copy_from_slice(&self.next_u64().to_le_bytes());
        }
    }
}

/// A one-listener config like `common::config`, with the listener's connect_timeout
/// and the runtime's shutdown_timeout chosen by the test.
fn config_with(
    backends: &[SocketAddr],
    connect_timeout: &str,
    shutdown_timeout: &str,
    extra_listener: &str,
) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    format!(
        r#"
[runtime]
workers = 2
shutdown_timeout = "{shutdown_timeout}"

[[listeners]]
name = "l"
bind = "127.0.0.1:0"
pool = "p"
connect_timeout = "{connect_timeout}"
{extra_listener}

[[pools]]
name = "p"
algorithm = "round-robin"
backends = [ {} ]
"#,
        list.join(", ")
    )
}

/// A listener that never accepts and whose accept queue is full, so the kernel drops
/// further SYNs and a connect to it hangs. Returns the socket, the connections that
/// fill its queue, and its address. Fails if this kernel does not behave that way.
async fn black_hole() -> (Socket, Vec<TcpStream>, SocketAddr) {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..16 {
        // `timeout` polls the connect before its deadline, so a connect that completes
        // is never mistaken for a hanging one, however slow the machine.
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(c)) => fillers.push(c),
            Ok(Err(e)) => panic!("connect to a full accept queue failed ({e}) instead of hanging"),
            Err(_) => return (s, fillers, addr),
        }
    }
    panic!("the accept queue of a listener that never accepts did not fill up");
}

/// Accepts the first connection that carries data. Flowgate's startup reachability
/// check connects to every backend once and closes at once; that one is skipped.
async fn accept_session(l: &TcpListener) -> TcpStream {
    loop {
        let (s, _) = l.accept().await.unwrap();
        if s.peek(&mut [0u8; 1]).await.unwrap_or(0) > 0 {
            return s;
        }
    }
}

/// Reads until end of stream or error; returns the bytes read and how it ended.
async fn read_until_end(r: &mut (impl AsyncRead + Unpin)) -> (Vec<u8>, io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(e)),
        }
    }
}

/// Flowgate started on `toml`, and one client connected to its listener "l".
async fn client_through(toml: &str) -> (Flowgate, TcpStream) {
    let fg = start(toml);
    let c = TcpStream::connect(fg.local_addr("l").unwrap())
        .await
        .unwrap();
    (fg, c)
}

/// `common::config` for round-robin over `backends`, weight 1 each.
fn round_robin(backends: &[SocketAddr], extra_listener: &str) -> String {
    let list: Vec<_> = backends.iter().map(|&a| (a, 1)).collect();
    config("round-robin", &list, extra_listener, "")
}

/// Asserts `c` ends within `limit` (a FIN or a reset) with nothing received.
async fn assert_closed_unserved(c: &mut TcpStream, limit: Duration, what: &str) {
    let (got, end) = within(limit, what, read_until_end(c)).await;
    assert!(got.is_empty(), "{what}: got {got:?}");
    assert_fin_or_reset(end);
}

/// A stream that ended with an error ended in a reset.
fn assert_fin_or_reset(end: io::Result<()>) {
    if let Err(e) = end {
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    }
}

/// Whether a new client at `addr` is refused: connect fails, or the connection is
/// closed without being served. `false` if an echo came back.
async fn refused(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return true;
    };
    if s.write_all(b"probe").await.is_err() {
        return true;
    }
    let mut buf = [0u8; 5];
    // Served: the probe comes back. Closed (EOF or reset): refused.
    within(LIVENESS, "probe answered or closed", s.read_exact(&mut buf))
        .await
        .is_err()
}

/// Waits until connecting to `addr` directly is refused.
async fn wait_refused(addr: SocketAddr) -> bool {
    let deadline = tokio::time::Instant::now() + LIVENESS;
    while tokio::time::Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Offset and bytes of the first difference, for messages that do not dump megabytes.
fn first_diff(a: &[u8], b: &[u8]) -> Option<String> {
    let i = a.iter().zip(b).position(|(x, y)| x != y);
    match i {
        Some(i) => Some(format!(
            "differ at byte {i}: sent {:02x?}, got {:02x?}",
            &a[i..(i + 16).min(a.len())],
            &b[i..(i + 16).min(b.len())]
        )),
        None if a.len() != b.len() => Some(format!("sent {} bytes, got {}", a.len(), b.len())),
        None => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_mib_each_way_arrive_intact() {
    const TOTAL: usize = 200 << 20;
    const CHUNK: usize = 256 << 10;
    let be = TestBackend::start(Kind::Echo).await;
    let (_fg, s) = client_through(&round_robin(&[be.addr], "")).await;
    let (mut rd, mut wr) = s.into_split();

    let writer = tokio::spawn(async move {
        let mut rng = Prng(0x5EED_F10C_6A7E);
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        for _ in 0..TOTAL / CHUNK {
            rng.fill(&mut buf);
            hash.update(&buf);
            wr.write_all(&buf).await?;
        }
        wr.shutdown().await?;
        io::Result::Ok(hash.finalize())
    });

    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0usize;
    loop {
        let n = within(LIVENESS, "echoed bytes keep coming", rd.read(&mut buf))
            .await
            .expect("read the echo");
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        got += n;
    }
    let sent = within(LIVENESS, "writer done", writer)
        .await
        .unwrap()
        .expect("write 200 MiB");
    assert_eq!(got, TOTAL, "bytes echoed back");
    assert_eq!(hash.finalize(), sent, "sha256 of sent and echoed data");
}

/// 8-byte records [stream id, record index], so a byte from another stream, a lost,
/// repeated or reordered record all show.
fn pattern(id: usize, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    for i in 0..len / 8 {
        v.extend_from_slice(&(id as u32).to_le_bytes());
        v.extend_from_slice(&(i as u32).to_le_bytes());
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_concurrent_streams_do_not_mix() {
    const N: usize = 300;
    let bs: [_; 2] = start_backends(Kind::Echo).await;
    let fg = start(&round_robin(&[bs[0].addr, bs[1].addr], ""));
    let addr = fg.local_addr("l").unwrap();
    let go = Arc::new(tokio::sync::Barrier::new(N + 1));
    let mut clients = Vec::new();
    for id in 0..N {
        let go = go.clone();
        clients.push(tokio::spawn(async move {
            let s = TcpStream::connect(addr).await.expect("connect to flowgate");
            go.wait().await;
            // 4 KiB to ~300 KiB, different for every stream.
            let data = pattern(id, 4096 + id * 1000);
            let (mut rd, mut wr) = s.into_split();
            let write = async {
                wr.write_all(&data).await?;
                wr.shutdown().await
            };
            let read = async {
                let mut v = Vec::new();
                rd.read_to_end(&mut v).await.map(|_| v)
            };
            let (w, r) = within(Duration::from_secs(30), "stream echoed to the end", async {
                tokio::join!(write, read)
            })
            .await;
            w.expect("write the pattern");
            let echoed = r.expect("read the echo");
            first_diff(&data, &echoed).map(|d| format!("stream {id}: {d}"))
        }));
    }
    // All N sessions are open in flowgate at once before any data moves.
    let shared = fg.listener("l").unwrap().shared.clone();
    assert!(
        wait_until(Duration::from_secs(20), || shared
            .active
            .load(Ordering::SeqCst)
            == N)
        .await,
        "{} of {N} sessions open",
        shared.active.load(Ordering::SeqCst)
    );
    go.wait().await;
    let mut bad = Vec::new();
    for c in clients {
        if let Some(d) = c.await.unwrap() {
            bad.push(d);
        }
    }
    assert!(bad.is_empty(), "{} streams corrupted: {bad:?}", bad.len());
}

#[tokio::test]
async fn client_half_close_lets_the_backend_still_reply() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = l.local_addr().unwrap();
    let reply: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let to_send = reply.clone();
    let backend = tokio::spawn(async move {
        let mut s = accept_session(&l).await;
        // Everything up to the client's FIN...
        let (got, end) = read_until_end(&mut s).await;
        end.expect("backend sees a clean EOF");
        // ...and only then the reply, then our own FIN.
        s.write_all(&to_send).await.expect("write after EOF");
        s.shutdown().await.unwrap();
        got
    });
    let (_fg, mut c) = client_through(&round_robin(&[baddr], "")).await;
    c.write_all(b"request, then FIN").await.unwrap();
    c.shutdown().await.unwrap();
    let (got, end) = within(LIVENESS, "reply and EOF", read_until_end(&mut c)).await;
    end.expect("client sees a clean EOF after the reply");
    assert_eq!(
        within(LIVENESS, "backend done", backend).await.unwrap(),
        b"request, then FIN"
    );
    assert_eq!(
        first_diff(&reply, &got),
        None,
        "reply after the client's FIN"
    );
}

#[tokio::test]
async fn backend_half_close_lets_the_client_still_send() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = l.local_addr().unwrap();
    let backend = tokio::spawn(async move {
        let mut s = accept_session(&l).await;
        let mut start = [0u8; 5];
        s.read_exact(&mut start).await.unwrap();
        assert_eq!(&start, b"start");
        s.write_all(b"goodbye\n").await.unwrap();
        s.shutdown().await.unwrap();
        let (got, end) = read_until_end(&mut s).await;
        end.expect("backend reads to a clean EOF after its own FIN");
        got
    });
    let (_fg, mut c) = client_through(&round_robin(&[baddr], "")).await;
    c.write_all(b"start").await.unwrap();
    let (got, end) = within(LIVENESS, "backend's bytes and FIN", read_until_end(&mut c)).await;
    end.expect("client sees the backend's FIN as a clean EOF");
    assert_eq!(got, b"goodbye\n");

    // The client's direction is still open: keep sending after the EOF.
    let mut sent = Vec::new();
    for i in 0..20 {
        let msg = format!("message {i} after the backend's FIN\n");
        c.write_all(msg.as_bytes()).await.expect("send after EOF");
        sent.extend_from_slice(msg.as_bytes());
    }
    let bulk = pattern(7, 1 << 20);
    c.write_all(&bulk).await.expect("send bulk after EOF");
    sent.extend_from_slice(&bulk);
    c.shutdown().await.unwrap();

    let received = within(LIVENESS, "backend got it all", backend)
        .await
        .unwrap();
    assert_eq!(
        first_diff(&sent, &received),
        None,
        "client -> backend after half-close"
    );
    let (more, end) = within(LIVENESS, "session closes", read_until_end(&mut c)).await;
    assert!(more.is_empty());
    end.expect("session ends cleanly");
}

#[tokio::test]
async fn client_reset_reaches_the_backend_as_a_reset() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = l.local_addr().unwrap();
    let (hello_tx, hello_rx) = tokio::sync::oneshot::channel();
    let backend = tokio::spawn(async move {
        let mut s = accept_session(&l).await;
        let mut hello = [0u8; 5];
        s.read_exact(&mut hello).await.unwrap();
        hello_tx.send(()).unwrap();
        let mut buf = [0u8; 64];
        s.read(&mut buf).await
    });
    let (_fg, mut c) = client_through(&round_robin(&[baddr], "")).await;
    c.write_all(b"hello").await.unwrap();
    within(LIVENESS, "backend got hello", hello_rx)
        .await
        .unwrap();
    SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
    drop(c); // RST

    let r = within(LIVENESS, "backend's read ends", backend)
        .await
        .unwrap();
    match r {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("backend read Ok({n}) (a clean EOF or data), not a reset"),
    }
}

#[tokio::test]
async fn backend_reset_reaches_the_client_as_a_reset() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = l.local_addr().unwrap();
    let backend = tokio::spawn(async move {
        let mut s = accept_session(&l).await;
        let mut hello = [0u8; 5];
        s.read_exact(&mut hello).await.unwrap();
        SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        drop(s); // RST
    });
    let (_fg, mut c) = client_through(&round_robin(&[baddr], "")).await;
    c.write_all(b"hello").await.unwrap();
    within(LIVENESS, "backend done", backend).await.unwrap();
    let mut buf = [0u8; 64];
    match within(LIVENESS, "client's read ends", c.read(&mut buf)).await {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("client read Ok({n}) (a clean EOF or data), not a reset"),
    }
}

#[tokio::test]
async fn backend_killed_mid_stream_ends_the_client_and_new_ones_go_elsewhere() {
    let bs: [_; 2] = start_backends(Kind::Identity).await;
    let fg = start(&round_robin(&[bs[0].addr, bs[1].addr], ""));
    let addr = fg.local_addr("l").unwrap();
    let (conn, name) = connect_identity(addr).await;
    let victim = bs.iter().position(|b| b.name == name).unwrap();
    let survivor = &bs[1 - victim];
    assert!(conn.buffer().is_empty());
    let (mut rd, mut wr) = conn.into_inner().into_split();
    let writer = tokio::spawn(async move {
        let chunk = pattern(1, 64 * 1024);
        loop {
            if let Err(e) = wr.write_all(&chunk).await {
                return e;
            }
        }
    });
    // Mid-stream: 4 MiB have made the round trip and more are on the way.
    let mut buf = vec![0u8; 64 * 1024];
    let mut echoed = 0;
    while echoed < 4 << 20 {
        let n = within(LIVENESS, "echo", rd.read(&mut buf)).await.unwrap();
        assert!(n > 0, "stream ended before the backend was killed");
        echoed += n;
    }

    bs[victim].kill();
    let (_, end) = within(
        LIVENESS,
        "client sees the stream end",
        read_until_end(&mut rd),
    )
    .await;
    assert_fin_or_reset(end);
    let e = within(LIVENESS, "client's writes fail", writer)
        .await
        .unwrap();
    assert!(
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ),
        "{e}"
    );

    assert!(
        wait_refused(bs[victim].addr).await,
        "killed backend stopped listening"
    );
    for _ in 0..4 {
        let (_c, name) = connect_identity(addr).await;
        assert_eq!(
            name, survivor.name,
            "new connection goes to the live backend"
        );
    }
}

#[tokio::test]
async fn backend_that_never_answers_the_handshake_is_skipped_after_connect_timeout() {
    let (_hole, _fillers, hole) = black_hole().await;
    let healthy = TestBackend::start(Kind::Identity).await;
    // Round-robin over [hole, healthy], each pick advancing the counter: every
    // client's first pick is the hole.
    let fg = start(&config_with(&[hole, healthy.addr], "300ms", "5s", ""));
    let addr = fg.local_addr("l").unwrap();
    for _ in 0..3 {
        let (mut c, name) = connect_identity(addr).await;
        assert_eq!(name, healthy.name);
        c.write_all(b"served\n").await.unwrap();
        let mut line = String::new();
        tokio::io::AsyncBufReadExt::read_line(&mut c, &mut line)
            .await
            .unwrap();
        assert_eq!(line, "served\n");
    }
}

#[tokio::test]
async fn all_backends_down_closes_the_client_and_recovers() {
    let dead = [dead_addr(), dead_addr()];
    let fg = start(&round_robin(&dead, ""));
    let addr = fg.local_addr("l").unwrap();
    for _ in 0..3 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert_closed_unserved(
            &mut c,
            Duration::from_secs(5),
            "client closed with no backend up",
        )
        .await;
    }
    let be = TestBackend::start_on(dead[1], Kind::Identity).await;
    for _ in 0..2 {
        let (_c, name) = connect_identity(addr).await;
        assert_eq!(name, be.name, "served once a backend is up");
    }
}

#[tokio::test]
async fn idle_connection_is_closed_after_idle_timeout() {
    let be = TestBackend::start(Kind::Echo).await;
    let (_fg, mut c) = client_through(&round_robin(&[be.addr], "idle_timeout = \"500ms\"")).await;
    c.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    within(LIVENESS, "echo", c.read_exact(&mut one))
        .await
        .unwrap();
    let (got, end) = within(LIVENESS, "idle connection closed", read_until_end(&mut c)).await;
    assert!(got.is_empty());
    end.expect("idle timeout closes with a FIN");
}

#[tokio::test]
async fn busy_connection_outlives_idle_timeout() {
    let be = TestBackend::start(Kind::Echo).await;
    let (_fg, mut c) = client_through(&round_robin(&[be.addr], "idle_timeout = \"500ms\"")).await;
    // ~1.5 s of small messages, three idle timeouts' worth, each echoed.
    for i in 0..15 {
        let msg = format!("tick {i:02}");
        c.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        within(LIVENESS, "echo", c.read_exact(&mut back))
            .await
            .unwrap_or_else(|e| panic!("busy connection closed at tick {i}: {e}"));
        assert_eq!(back, msg.as_bytes());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Once quiet, the same connection does idle out.
    let (got, end) = within(LIVENESS, "closed once idle", read_until_end(&mut c)).await;
    assert!(got.is_empty());
    end.unwrap();
}

#[tokio::test]
async fn max_connections_rejects_the_extra_client_and_frees_its_slot() {
    let be = TestBackend::start(Kind::Identity).await;
    let fg = start(&round_robin(&[be.addr], "max_connections = 3"));
    let addr = fg.local_addr("l").unwrap();
    let shared = fg.listener("l").unwrap().shared.clone();
    let mut held = Vec::new();
    for _ in 0..3 {
        let (c, name) = connect_identity(addr).await;
        assert_eq!(name, be.name);
        held.push(c);
    }

    let mut extra = TcpStream::connect(addr).await.unwrap();
    assert_closed_unserved(&mut extra, LIVENESS, "4th client closed").await;
    assert!(
        wait_until(LIVENESS, || shared
            .rejected_max_connections
            .load(Ordering::SeqCst)
            == 1)
        .await
    );
    assert_eq!(shared.accepted.load(Ordering::SeqCst), 4);

    drop(held.pop());
    assert!(wait_until(LIVENESS, || shared.active.load(Ordering::SeqCst) == 2).await);
    let (_c, name) = connect_identity(addr).await;
    assert_eq!(name, be.name, "a freed slot serves a new client");
    assert_eq!(shared.rejected_max_connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_refuses_new_clients_and_finishes_the_open_stream() {
    const BEFORE: usize = 4 << 20;
    const AFTER: usize = 16 << 20;
    let be = TestBackend::start(Kind::Echo).await;
    let fg = start(&config_with(&[be.addr], "1s", "30s", ""));
    let addr = fg.local_addr("l").unwrap();
    let mut data = vec![0u8; BEFORE + AFTER];
    Prng(42).fill(&mut data);

    let c = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = c.into_split();
    wr.write_all(&data[..BEFORE]).await.unwrap();
    let mut echoed = vec![0u8; BEFORE];
    within(LIVENESS, "first part echoed", rd.read_exact(&mut echoed))
        .await
        .unwrap();

    let shutdown = tokio::spawn(fg.shutdown());
    let deadline = tokio::time::Instant::now() + LIVENESS;
    while !refused(addr).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new clients still served after shutdown began"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // New clients are refused; the open stream carries on to its end.
    let rest = data[BEFORE..].to_vec();
    let write = tokio::spawn(async move {
        wr.write_all(&rest).await?;
        wr.shutdown().await
    });
    let (tail, end) = within(LIVENESS, "rest echoed", read_until_end(&mut rd)).await;
    end.expect("open stream ends cleanly");
    write.await.unwrap().expect("write the rest");
    echoed.extend_from_slice(&tail);
    assert_eq!(first_diff(&data, &echoed), None, "stream across shutdown");

    let graceful = within(Duration::from_secs(20), "shutdown returns", shutdown)
        .await
        .unwrap();
    assert!(graceful, "every session finished within the grace period");
    assert!(refused(addr).await, "still refused after shutdown");
}

#[tokio::test]
async fn shutdown_cuts_a_connection_still_open_after_the_grace_period() {
    let be = TestBackend::start(Kind::Echo).await;
    let (fg, mut c) = client_through(&config_with(&[be.addr], "1s", "500ms", "")).await;
    c.write_all(b"held").await.unwrap();
    let mut back = [0u8; 4];
    within(LIVENESS, "echo", c.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(&back, b"held");

    let shutdown = tokio::spawn(fg.shutdown());
    assert_closed_unserved(&mut c, LIVENESS, "held connection cut").await;
    let graceful = within(LIVENESS, "shutdown returns", shutdown)
        .await
        .unwrap();
    assert!(!graceful, "shutdown reports the session it had to cut");
}
