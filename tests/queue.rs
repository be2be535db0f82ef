//! A backend's `max_connections` and the pool's wait line (`queue_timeout`, issue
//! 13), through the binary with real connections: clients over the cap wait first
//! in first out and are served as slots free; one that waits `queue_timeout` is
//! closed and counted; without a queue, or with a full one, the client is refused
//! at once. A waiting client never reaches the backend (its accept count says so).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn spawn(backend: SocketAddr, pool_extra: &str) -> Proc {
    Proc::spawn(
        &listener_and_pool(
            "",
            &format!("{{ address = \"{backend}\", max_connections = 2 }}"),
            pool_extra,
        ),
        &[],
    )
}

/// Starts flowgate over an echo backend with `max_connections = 2` and fills both
/// slots with served clients "c1" and "c2".
async fn two_served(pool_extra: &str) -> (TestBackend, Proc, [TcpStream; 2]) {
    let backend = TestBackend::start(Kind::Echo).await;
    let fg = spawn(backend.addr, pool_extra);
    settled(&backend).await;
    let t = fg.addr("t");
    let mut c1 = client(t, "c1").await;
    served(&mut c1, "c1").await;
    let mut c2 = client(t, "c2").await;
    served(&mut c2, "c2").await;
    (backend, fg, [c1, c2])
}

/// A client that has sent `tag` (it waits in flowgate's buffer while queued).
async fn client(t: SocketAddr, tag: &str) -> TcpStream {
    let mut s = TcpStream::connect(t).await.expect("connect to flowgate");
    s.write_all(tag.as_bytes()).await.unwrap();
    s
}

/// Reads `tag` echoed back: the client reached the backend.
async fn served(s: &mut TcpStream, tag: &str) {
    let mut buf = vec![0u8; tag.len()];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{tag} was not served"))
        .unwrap_or_else(|e| panic!("{tag}: {e}"));
    assert_eq!(buf, tag.as_bytes());
}

async fn pool_json(admin: SocketAddr) -> serde_json::Value {
    get_pools(admin).await["pools"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "p").cloned())
        .expect("pool p in the API")
}

async fn queue_length(admin: SocketAddr) -> u64 {
    pool_json(admin).await["queue_length"].as_u64().unwrap()
}

/// Polls the API until the queue is `n` long.
async fn queue_reaches(admin: SocketAddr, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let len = queue_length(admin).await;
        if len == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the queue stayed at {len}, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn rejected(admin: SocketAddr, reason: &str) -> u64 {
    let pools = get_pools(admin).await;
    pools["listeners"][0]["rejected"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("no rejected.{reason} in {pools}"))
}

async fn metrics(admin: SocketAddr) -> String {
    curl(admin, "GET", "/metrics", None, None).await.text
}

/// max_connections 2 on the only backend, five clients: two are served, three
/// wait, and each freed slot goes to the longest waiter.
#[tokio::test]
async fn clients_over_the_cap_wait_and_are_served_in_order() {
    let (backend, fg, [c1, c2]) = two_served(r#"queue_timeout = "120s""#).await;
    let (t, admin) = (fg.addr("t"), fg.admin());
    // The startup connect, c1 and c2.
    let base = backend.accepted.load(Ordering::SeqCst) - 2;
    let mut waiting = Vec::new();
    for (i, tag) in ["c3", "c4", "c5"].into_iter().enumerate() {
        waiting.push((client(t, tag).await, tag));
        // One at a time, so the arrival order is the order of the tags.
        queue_reaches(admin, i as u64 + 1).await;
    }
    assert_eq!(
        backend.accepted.load(Ordering::SeqCst),
        base + 2,
        "a waiting client reached the backend"
    );
    let p = pool_json(admin).await;
    assert_eq!(p["backends"][0]["max_connections"], 2, "{p}");
    assert_eq!(p["backends"][0]["active_connections"], 2, "{p}");
    let text = metrics(admin).await;
    assert!(
        text.contains(r#"flowgate_pool_queue_length{pool="p"} 3"#),
        "{text}"
    );

    // Each close frees one slot: the longest waiter (and only it) takes it.
    let mut open = vec![c1, c2];
    let mut expected_queue = 3;
    for (mut s, tag) in waiting {
        drop(open.remove(0));
        served(&mut s, tag).await;
        expected_queue -= 1;
        queue_reaches(admin, expected_queue).await;
        open.push(s);
    }
    assert_eq!(backend.accepted.load(Ordering::SeqCst), base + 5);
    assert_eq!(rejected(admin, "queue_timeout").await, 0);
    // Never more than the cap at once.
    assert_eq!(
        pool_json(admin).await["backends"][0]["active_connections"],
        2
    );
}

/// A client that waits `queue_timeout` without a slot is closed, counted, and
/// never reaches the backend; the queue is empty again.
#[tokio::test]
async fn a_client_that_waits_queue_timeout_is_closed_and_counted() {
    let (backend, fg, [mut c1, mut c2]) = two_served(r#"queue_timeout = "400ms""#).await;
    let (t, admin) = (fg.addr("t"), fg.admin());
    let accepted = backend.accepted.load(Ordering::SeqCst);

    let started = Instant::now();
    let c3 = client(t, "c3").await;
    let mut r = BufReader::new(c3);
    assert!(
        closed_within(&mut r, Duration::from_secs(30)).await,
        "the waiting client was never closed"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "closed after {waited:?}, before queue_timeout"
    );
    assert_eq!(backend.accepted.load(Ordering::SeqCst), accepted);
    assert_eq!(rejected(admin, "queue_timeout").await, 1);
    assert_eq!(queue_length(admin).await, 0);
    let text = metrics(admin).await;
    assert!(
        text.contains(r#"flowgate_pool_queue_timeouts_total{pool="p"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"flowgate_connections_rejected_total{listener="t",reason="queue_timeout"} 1"#
        ),
        "{text}"
    );
    // The two served clients were not disturbed.
    for (s, tag) in [(&mut c1, "again1"), (&mut c2, "again2")] {
        s.write_all(tag.as_bytes()).await.unwrap();
        served(s, tag).await;
    }
}

/// Without `queue_timeout` a client over the cap is refused at once; with a full
/// queue (`max_queue`) too. Both are counted as `backends_full`.
#[tokio::test]
async fn no_queue_or_a_full_queue_refuses_at_once() {
    let (_backend, fg, _served) = two_served("").await;
    let (t, admin) = (fg.addr("t"), fg.admin());
    let mut r = BufReader::new(client(t, "c3").await);
    assert!(closed_within(&mut r, Duration::from_secs(30)).await);
    assert_eq!(rejected(admin, "backends_full").await, 1);
    drop(fg);

    let (_backend, fg, [c1, _c2]) = two_served("queue_timeout = \"120s\"\nmax_queue = 1").await;
    let (t, admin) = (fg.addr("t"), fg.admin());
    let mut c3 = client(t, "c3").await;
    queue_reaches(admin, 1).await;
    let mut r = BufReader::new(client(t, "c4").await);
    assert!(
        closed_within(&mut r, Duration::from_secs(30)).await,
        "a client beyond max_queue was kept"
    );
    assert_eq!(rejected(admin, "backends_full").await, 1);
    drop(c1);
    served(&mut c3, "c3").await;
}

/// The checks name the key and the way out.
#[test]
fn check_refuses_a_queue_nothing_would_fill_and_a_zero_cap() {
    let dir = tempdir::Dir::new();
    for (pool, needle) in [
        (
            "backends = [{ address = \"127.0.0.1:9\" }]\nqueue_timeout = \"1s\"",
            "no backend of the pool has max_connections",
        ),
        (
            "backends = [{ address = \"127.0.0.1:9\", max_connections = 0 }]",
            "pools[0].backends[0].max_connections",
        ),
        (
            "backends = [{ address = \"127.0.0.1:9\", max_connections = 5 }]\nmax_queue = 3",
            "max_queue without queue_timeout",
        ),
    ] {
        let file = dir.file(
            "f.toml",
            &format!(
                "[[listeners]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\
                 [[pools]]\nname = \"p\"\n{pool}\n"
            ),
        );
        let out = std::process::Command::new(bin())
            .args(["check", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{pool}: {err}");
        assert!(err.contains(needle), "{pool}: {err}");
    }
}
