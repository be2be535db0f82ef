//! System calls per operation, counted with strace on the running binary (issue
//! 12): per short TCP connection (connect, 64 B each way, close) and per UDP round
//! trip (64 B each way on one session). A count does not depend on how busy the
//! machine is, so each gets a ceiling: a change that adds system calls to the hot
//! path fails here. The counts are printed (`--nocapture`) for the record.
//!
//! flowgate runs as a process with one worker; strace attaches to all its threads
//! after a warm-up connection and datagram, and detaches once every counted
//! operation is over (its descriptors back to where they were).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Operations counted per figure.
const OPS: usize = 300;

/// Ceilings. Every system call but `epoll_wait` is made a nearly fixed number of
/// times per operation (21.0 .. 21.1 per short connection since the last direction's
/// FIN is passed on by the close, not a shutdown(2); `recvfrom` now and then finding
/// nothing yet; 4 per UDP round trip: 2 recvmmsg, 2 sendto), over the runs
/// when these were set: one more on the hot path fails the test. The debug binary's
/// counts include two `fcntl` per connection that release builds do not make (std's
/// check that a closed descriptor was open). Issue 12 aims at nginx's totals, 20.1
/// and 7.2.
///
/// How often a worker sleeps in `epoll_wait` is not fixed: it depends on whether the
/// next event is already queued when the worker looks, which is timing. Measured 5.1
/// .. 5.8 per short connection and 2.0 .. 3.55 per UDP round trip (the last on a
/// loaded CI machine). These ceilings are about three sleeps per readiness event the
/// operation needs (about 4 for a short connection, 2 for a UDP round trip): they do
/// not track the figure, they catch a wake-up loop, which would count in hundreds.
const MAX_PER_SHORT_CONNECTION: f64 = 21.6;
const MAX_EPOLL_WAIT_PER_SHORT_CONNECTION: f64 = 12.0;
const MAX_PER_UDP_ROUND_TRIP: f64 = 4.5;
const MAX_EPOLL_WAIT_PER_UDP_ROUND_TRIP: f64 = 6.0;

/// strace attached to every thread of `pid`, counting into `out`.
struct Trace {
    child: Child,
    out: std::path::PathBuf,
}

impl Trace {
    /// Attaches and waits until every thread of `pid` is traced.
    fn attach(pid: i32, out: &Path) -> Trace {
        let mut child = Command::new("strace")
            .args(["-f", "-c", "-qq", "-o"])
            .arg(out)
            .arg("-p")
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run strace (apt-get install -y strace)");
        let tracer = child.id().to_string();
        let all_traced = || {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                return false;
            };
            tasks.flatten().all(|t| {
                std::fs::read_to_string(t.path().join("status")).is_ok_and(|s| {
                    s.lines().any(|l| {
                        l.starts_with("TracerPid:") && l.split_whitespace().nth(1) == Some(&tracer)
                    })
                })
            })
        };
        for _ in 0..1000 {
            if all_traced() {
                return Trace {
                    child,
                    out: out.to_owned(),
                };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("strace did not attach to every thread of {pid} (ptrace not allowed?)");
    }

    /// Detaches and returns every system call's count, most frequent first.
    fn finish(mut self) -> Vec<(String, u64)> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.out).expect("strace summary");
        let mut calls = Vec::new();
        for line in text.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // % time, seconds, usecs/call, calls, [errors], syscall
            if cols.len() < 5 || cols[0].starts_with('-') || cols[0] == "%" {
                continue;
            }
            let name = *cols.last().unwrap();
            let Ok(n) = cols[3].parse::<u64>() else {
                continue;
            };
            if name != "total" {
                calls.push((name.to_string(), n));
            }
        }
        calls.sort_by_key(|c| std::cmp::Reverse(c.1));
        assert!(
            !calls.is_empty(),
            "no system calls in strace's summary:\n{text}"
        );
        calls
    }
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Waits until `pid` holds `n` descriptors again: every counted connection closed.
async fn settled(pid: i32, n: usize) {
    assert!(
        wait_until(Duration::from_secs(10), || open_fds(pid) == n).await,
        "flowgate still holds {} descriptors, {n} before",
        open_fds(pid)
    );
}

async fn short_connection(addr: SocketAddr) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&[7u8; 64]).await.unwrap();
    let mut back = [0u8; 64];
    s.read_exact(&mut back).await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
}

/// Prints the counts per operation; returns (all but epoll_wait, epoll_wait).
fn report(what: &str, calls: &[(String, u64)]) -> (f64, f64) {
    report_per(what, calls, OPS)
}

/// [`report`] over `ops` operations.
fn report_per(what: &str, calls: &[(String, u64)], ops: usize) -> (f64, f64) {
    let per = |n: u64| n as f64 / ops as f64;
    let epoll: u64 = calls
        .iter()
        .filter(|(n, _)| n == "epoll_wait")
        .map(|(_, c)| c)
        .sum();
    let rest: u64 = calls
        .iter()
        .filter(|(n, _)| n != "epoll_wait")
        .map(|(_, c)| c)
        .sum();
    let each: Vec<String> = calls
        .iter()
        .map(|(n, c)| format!("{n} {:.2}", per(*c)))
        .collect();
    eprintln!(
        "{what}: {:.2} system calls per operation, {:.2} of them epoll_wait ({})",
        per(epoll + rest),
        per(epoll),
        each.join(", ")
    );
    (per(rest), per(epoll))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_calls_per_short_connection_and_udp_round_trip() {
    let backend = TestBackend::start(Kind::Echo).await;
    let udp_backend = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let udp_addr = udp_backend.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp_backend.recv_from(&mut buf).await {
            let _ = udp_backend.send_to(&buf[..n], from).await;
        }
    });
    let toml = format!(
        r#"
[runtime]
workers = 1

[[listeners]]
name = "t"
bind = "127.0.0.1:0"
pool = "tcp"

[[listeners]]
name = "u"
bind = "127.0.0.1:0"
protocol = "udp"
pool = "udp"

[[pools]]
name = "tcp"
backends = [{{ address = "{}" }}]

[[pools]]
name = "udp"
backends = [{{ address = "{udp_addr}" }}]
"#,
        backend.addr
    );
    let fg = Proc::spawn(&toml, &[]);
    let pid = fg.pid();
    let t = fg.addr("t");
    let u = fg.addr("u");
    let dir = tempdir::Dir::new();

    // Warm-up: lazily made state (buffers, the UDP session's socket) is not counted.
    short_connection(t).await;
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(u).await.unwrap();
    let mut buf = [0u8; 64];
    client.send(&[1u8; 64]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
        .await
        .expect("UDP reply")
        .unwrap();
    let base = open_fds(pid);
    settled(pid, base).await;

    let trace = Trace::attach(pid, &dir.0.join("tcp.txt"));
    for _ in 0..OPS {
        short_connection(t).await;
    }
    settled(pid, base).await;
    let (tcp, tcp_epoll) = report("short connection", &trace.finish());

    let trace = Trace::attach(pid, &dir.0.join("udp.txt"));
    for i in 0..OPS {
        client.send(&[i as u8; 64]).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
            .await
            .expect("UDP reply")
            .unwrap();
        assert_eq!(n, 64);
        assert_eq!(buf[0], i as u8, "replies in order");
    }
    let (udp, udp_epoll) = report("UDP round trip", &trace.finish());

    assert!(
        tcp <= MAX_PER_SHORT_CONNECTION,
        "{tcp:.2} system calls (epoll_wait aside) per short connection, ceiling {MAX_PER_SHORT_CONNECTION}"
    );
    assert!(
        tcp_epoll <= MAX_EPOLL_WAIT_PER_SHORT_CONNECTION,
        "{tcp_epoll:.2} epoll_wait per short connection, ceiling {MAX_EPOLL_WAIT_PER_SHORT_CONNECTION}"
    );
    assert!(
        udp <= MAX_PER_UDP_ROUND_TRIP,
        "{udp:.2} system calls (epoll_wait aside) per UDP round trip, ceiling {MAX_PER_UDP_ROUND_TRIP}"
    );
    assert!(
        udp_epoll <= MAX_EPOLL_WAIT_PER_UDP_ROUND_TRIP,
        "{udp_epoll:.2} epoll_wait per UDP round trip, ceiling {MAX_EPOLL_WAIT_PER_UDP_ROUND_TRIP}"
    );
}

/// `runtime.busy_poll` (latency mode): between the hops of a ping-pong, a worker
/// polls its sockets (`epoll_wait` with no timeout) instead of sleeping, and with no
/// traffic it stops: the spinning is bounded by the budget after each wake-up, so
/// an idle process makes few calls. Counted: the idle second is compared with the
/// rate of calls while spinning (a spinner that never stops makes calls at that
/// rate; a working one spins 10 ms after each of the four ticks, about 4% of it),
/// so how fast strace lets the calls go cancels out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_poll_spins_between_hops_and_stops_when_idle() {
    let backend = TestBackend::start(Kind::Echo).await;
    let toml = format!(
        r#"
[runtime]
workers = 1
busy_poll = "10ms"

[[listeners]]
name = "t"
bind = "127.0.0.1:0"
pool = "tcp"

[[pools]]
name = "tcp"
backends = [{{ address = "{}" }}]
"#,
        backend.addr
    );
    let fg = Proc::spawn(&toml, &[]);
    let pid = fg.pid();
    let t = fg.addr("t");
    let dir = tempdir::Dir::new();
    let mut s = std::net::TcpStream::connect(t).unwrap();
    s.set_nodelay(true).unwrap();
    let round_trip = |s: &mut std::net::TcpStream, i: usize| {
        use std::io::{Read, Write};
        s.write_all(&[i as u8; 64]).unwrap();
        let mut back = [0u8; 64];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, [i as u8; 64]);
    };
    round_trip(&mut s, 0);

    // Ping-pongs 300 µs apart: well within the 10 ms budget (even when the client's
    // sleep overshoots on a loaded machine), so the worker never sleeps.
    let trace = Trace::attach(pid, &dir.0.join("busy.txt"));
    let started = std::time::Instant::now();
    let mut s = tokio::task::spawn_blocking(move || {
        for i in 0..OPS {
            round_trip(&mut s, i);
            std::thread::sleep(Duration::from_micros(300));
        }
        s
    })
    .await
    .unwrap();
    let calls = trace.finish();
    let spun_for = started.elapsed().as_secs_f64();
    let total = calls
        .iter()
        .find(|(n, _)| n == "epoll_wait")
        .map_or(0, |c| c.1) as f64;
    let epoll = calls
        .iter()
        .find(|(n, _)| n == "epoll_wait")
        .map_or(0, |c| c.1) as f64
        / OPS as f64;
    eprintln!("busy_poll: {epoll:.1} epoll_wait per ping-pong 300 us apart");

    // Idle: one wake-up every 250 ms (the tick), then at most 10 ms of spinning each.
    let trace = Trace::attach(pid, &dir.0.join("idle.txt"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle: u64 = trace
        .finish()
        .iter()
        .filter(|(n, _)| n == "epoll_wait")
        .map(|c| c.1)
        .sum();
    eprintln!("busy_poll: {idle} epoll_wait in 1 s idle");
    round_trip(&mut s, 1);

    // Without the latency mode a ping-pong sleeps about twice (tests above: 2.0).
    assert!(
        epoll >= 4.0,
        "{epoll:.1} epoll_wait per ping-pong: the worker slept instead of polling"
    );
    let spinning_rate = total / spun_for;
    assert!(
        (idle as f64) < spinning_rate * 0.25,
        "{idle} epoll_wait in 1 s with no traffic, against {spinning_rate:.0}/s while \
         spinning: the worker does not stop spinning"
    );
}

/// flowgate with two per-core workers and one http listener `h` in front of
/// `backend`, spoken to in `upstream` (`upstream_protocol`).
fn two_workers_http(backend: SocketAddr, upstream: &str) -> Proc {
    Proc::spawn(
        &format!(
            r#"
[runtime]
workers = 2

[[listeners]]
name = "h"
bind = "127.0.0.1:0"
protocol = "http"
pool = "p"

[[pools]]
name = "p"
upstream_protocol = "{upstream}"
backends = [{{ address = "{backend}" }}]
"#
        ),
        &[],
    )
}

/// How many `name` system calls `calls` holds per operation, over `ops`.
fn per_op(calls: &[(String, u64)], name: &str, ops: usize) -> f64 {
    calls
        .iter()
        .filter(|(n, _)| n == name)
        .map(|c| c.1)
        .sum::<u64>() as f64
        / ops as f64
}

/// A tiny HTTP/1.1 backend: answers every request on a kept-alive connection with
/// 2 bytes of body. Returns its address and the number of requests it answered.
async fn http_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let n = answered.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let n = n.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        n.fetch_add(1, Ordering::SeqCst);
                        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(r).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
            });
        }
    });
    (addr, answered)
}

/// With two per-core workers, one pooled upstream connection serves requests that
/// arrive on either worker (each on a new client connection, which the kernel
/// hands to one worker's listening socket or the other's). The worker that takes
/// the idle connection moves its socket to its own reactor: otherwise the
/// response's readiness reaches the other worker, which wakes the request's task
/// across threads (an eventfd `write`) for every such request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_connection_taken_by_another_worker_wakes_no_other_thread() {
    const REQUESTS: usize = 200;
    let (backend, answered) = http_backend().await;
    let fg = two_workers_http(backend, "http1");
    let pid = fg.pid();
    let h = fg.addr("h");
    let dir = tempdir::Dir::new();
    let request = |h: SocketAddr| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(h).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        let text = String::from_utf8_lossy(&back).into_owned();
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("ok"),
            "{text}"
        );
    };
    request(h);
    let trace = Trace::attach(pid, &dir.0.join("http.txt"));
    let t0 = std::time::Instant::now();
    tokio::task::spawn_blocking(move || (0..REQUESTS).for_each(|_| request(h)))
        .await
        .unwrap();
    let traced = t0.elapsed().as_secs_f64();
    let calls = trace.finish();
    report_per(
        "HTTP/1.1 request on a new client connection",
        &calls,
        REQUESTS,
    );
    let per = |name: &str| per_op(&calls, name, REQUESTS);
    assert_eq!(answered.load(Ordering::SeqCst), REQUESTS + 1);
    // Wake-ups across threads: none expected per request; room for the tick
    // timers, which wake the workers by the second (the upstream sweep, once a
    // second on each of the 2), so a slow machine's longer run gets more of
    // them. One wake per request (a connection handed across threads) would be
    // 200 writes.
    let wakes = per("write") * REQUESTS as f64;
    let room = 0.05 * REQUESTS as f64 + 2.0 * traced.ceil();
    assert!(
        wakes <= room,
        "{wakes} write(2) (cross-thread wake-ups) for {REQUESTS} requests in {traced:.1} s (room {room})"
    );
    // About half the requests land on the worker that did not open the connection.
    // A move is two epoll_ctl (out of one reactor, into the other); each client
    // connection makes two of its own (registered, then deregistered at close).
    let moved = (per("epoll_ctl") - 2.0) / 2.0;
    assert!(
        moved >= 0.1,
        "{moved:.2} moves per request: were all requests on one worker?"
    );
}

/// A chunked HTTP/1.1 backend: answers every request with its head and a first
/// chunk in one write, then, 2 ms later, a last chunk and the end of the body in
/// another (as an SSE server ends a stream).
async fn chunked_backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let head =
                            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n";
                        if s.write_all(head).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        if s.write_all(b"4\r\ndone\r\n0\r\n\r\n").await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
            });
        }
    });
    addr
}

/// A streamed (chunked) response whose last chunk and end come in one read from
/// the backend goes to the client in one write with them, not two: the response
/// costs the client two writes (the head with the first chunk, then the last
/// chunk with the end) and the backend one (the request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_ends_in_the_write_of_its_last_chunk() {
    const REQUESTS: usize = 100;
    let backend = chunked_backend().await;
    let fg = two_workers_http(backend, "http1");
    let pid = fg.pid();
    let h = fg.addr("h");
    let dir = tempdir::Dir::new();
    let mut s = tokio::net::TcpStream::connect(h).await.unwrap();
    s.set_nodelay(true).unwrap();
    // One response: its body de-chunked is "okdone", and it ends with the last chunk.
    let one = async |s: &mut tokio::net::TcpStream| {
        s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        let mut back = Vec::new();
        let mut b = [0u8; 4096];
        while !back.ends_with(b"0\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
                .await
                .expect("the response in time")
                .unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&back));
            back.extend_from_slice(&b[..n]);
        }
        let text = String::from_utf8_lossy(&back).into_owned();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.contains("\r\n2\r\nok\r\n4\r\ndone\r\n0\r\n\r\n"),
            "{text}"
        );
    };
    one(&mut s).await;
    let trace = Trace::attach(pid, &dir.0.join("chunked.txt"));
    for _ in 0..REQUESTS {
        one(&mut s).await;
    }
    let calls = trace.finish();
    report_per("streamed HTTP/1.1 response (2 chunks)", &calls, REQUESTS);
    let writes = ["writev", "write", "sendto", "sendmsg"]
        .iter()
        .map(|n| per_op(&calls, n, REQUESTS))
        .sum::<f64>();
    // 3 per request, and room for the tick timers' wake-ups (a `write` each,
    // four a second per worker).
    assert!(
        writes <= 3.2,
        "{writes:.2} writes per streamed response (3: the request up, the head with \
         the first chunk, the last chunk with the end)"
    );
}

/// A tiny h2c backend (hyper): answers every stream with 2 bytes. Returns its
/// address and the number of streams it answered.
async fn h2c_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    use hyper::server::conn::http2;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let n = answered.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let n = n.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    n.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                        ))
                    }
                });
                let _ = http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, answered)
}

/// `n` requests over h2c from `clients` connections, one stream at a time each.
fn h2load(url: &str, clients: usize, n: usize) {
    let out = Command::new("h2load")
        .args([
            "-c",
            &clients.to_string(),
            "-n",
            &n.to_string(),
            "-m",
            "1",
            url,
        ])
        .output()
        .expect("run h2load");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains(&format!("{n} succeeded")),
        "h2load through flowgate:\n{text}"
    );
}

/// h2c upstream with two per-core workers: each worker has its own connection to
/// the backend, so a stream's request task, the connection's driver task and the
/// socket's readiness stay on one thread. With one connection per backend for all
/// workers, every stream from the other worker crossed threads twice (its request
/// to the driver, the response back), an eventfd `write` each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upstream_streams_wake_no_other_thread() {
    const CLIENTS: usize = 20;
    const EACH: usize = 20;
    if !has_tool("h2load") {
        panic!("h2load is needed (apt-get install -y nghttp2-client)");
    }
    let (backend, answered) = h2c_backend().await;
    let fg = two_workers_http(backend, "h2c");
    let pid = fg.pid();
    let url = format!("http://{}/", fg.addr("h"));
    // Warm-up: both workers open their connection to the backend.
    let u = url.clone();
    tokio::task::spawn_blocking(move || h2load(&u, CLIENTS, CLIENTS * 4))
        .await
        .unwrap();
    let before = answered.load(Ordering::SeqCst);
    let dir = tempdir::Dir::new();
    let trace = Trace::attach(pid, &dir.0.join("h2c.txt"));
    tokio::task::spawn_blocking(move || h2load(&url, CLIENTS, CLIENTS * EACH))
        .await
        .unwrap();
    let calls = trace.finish();
    let requests = CLIENTS * EACH;
    report_per("h2c stream to an h2c backend", &calls, requests);
    assert_eq!(answered.load(Ordering::SeqCst) - before, requests);
    let wakes = per_op(&calls, "write", requests);
    assert!(
        wakes <= 0.05,
        "{wakes:.2} write(2) (cross-thread wake-ups) per h2c stream"
    );
}
