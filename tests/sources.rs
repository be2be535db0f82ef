//! A listener's source rules (issue 13): `allow`/`deny`, the per-source connection
//! cap and rate, and the bounded source table, driven with real connections from
//! distinct 127.0.0.x addresses through the binary. A refused client is closed
//! before any backend is contacted (the backend's accept count says so), and the
//! refusal is counted by reason in the API and the metrics.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

/// A connection to `to` from source address `from` (port chosen by the kernel).
async fn from(from: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    s.connect(to).await.expect("connect to flowgate")
}

/// Whether an echo through `s` comes back (the session reached the backend).
async fn echoes(s: &mut TcpStream) -> bool {
    if s.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"ping"
    )
}

/// Whether flowgate closed `s` (EOF or reset) without passing anything on.
async fn refused(s: TcpStream) -> bool {
    let mut r = BufReader::new(s);
    closed_within(&mut r, Duration::from_secs(10)).await
}

fn listener_json(api: &serde_json::Value) -> &serde_json::Value {
    &api["listeners"][0]
}

async fn rejected(admin: SocketAddr, reason: &str) -> u64 {
    let pools = get_pools(admin).await;
    listener_json(&pools)["rejected"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("no rejected.{reason} in {pools}"))
}

fn spawn(backend: SocketAddr, rules: &str) -> Proc {
    Proc::spawn(
        &listener_and_pool(rules, &format!("{{ address = \"{backend}\" }}"), ""),
        &[],
    )
}

#[tokio::test]
async fn allow_and_deny_refuse_before_any_backend_is_contacted() {
    let backend = TestBackend::start(Kind::Echo).await;
    let fg = spawn(
        backend.addr,
        r#"allow = ["127.0.0.0/24", "127.0.1.7"]
deny = ["127.0.0.3"]"#,
    );
    let (t, admin) = (fg.addr("t"), fg.admin());
    settled(&backend).await;
    let before = backend.accepted.load(Ordering::SeqCst);

    for denied in ["127.0.0.3", "127.0.2.1", "127.0.1.8"] {
        assert!(refused(from(denied, t).await).await, "{denied} was served");
    }
    assert_eq!(
        backend.accepted.load(Ordering::SeqCst),
        before,
        "a refused client reached the backend"
    );
    for allowed in ["127.0.0.2", "127.0.0.200", "127.0.1.7"] {
        assert!(
            echoes(&mut from(allowed, t).await).await,
            "{allowed} refused"
        );
    }
    assert_eq!(rejected(admin, "acl").await, 3);
    let metrics = curl(admin, "GET", "/metrics", None, None).await;
    assert!(
        metrics
            .text
            .contains(r#"flowgate_connections_rejected_total{listener="t",reason="acl"} 3"#),
        "{}",
        metrics.text
    );
}

#[tokio::test]
async fn per_source_cap_and_rate() {
    let backend = TestBackend::start(Kind::Echo).await;
    let fg = spawn(backend.addr, "max_connections_per_source = 2");
    let (t, admin) = (fg.addr("t"), fg.admin());
    settled(&backend).await;
    let mut a1 = from("127.0.0.2", t).await;
    let mut a2 = from("127.0.0.2", t).await;
    assert!(echoes(&mut a1).await && echoes(&mut a2).await);
    let before = backend.accepted.load(Ordering::SeqCst);
    assert!(
        refused(from("127.0.0.2", t).await).await,
        "a third connection from .2 was served"
    );
    assert_eq!(backend.accepted.load(Ordering::SeqCst), before);
    // Another source is not affected, and a freed place is taken again.
    let mut b = from("127.0.0.4", t).await;
    assert!(echoes(&mut b).await);
    drop(a1);
    let mut again = None;
    for _ in 0..100 {
        let mut c = from("127.0.0.2", t).await;
        if echoes(&mut c).await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        again.is_some(),
        "the place freed by a closed connection was not given back"
    );
    assert!(echoes(&mut a2).await, "the held connection still works");
    assert!(rejected(admin, "source_limit").await >= 1);
    drop(fg);

    // 1/m: a bucket of one connection, refilled once a minute (no refill during
    // the test).
    let fg = spawn(
        backend.addr,
        "max_connections_per_source = 5\nmax_rate_per_source = \"1/m\"",
    );
    let (t, admin) = (fg.addr("t"), fg.admin());
    assert!(echoes(&mut from("127.0.0.2", t).await).await);
    // Closed at once, so the cap is not what refuses the next ones: the rate is.
    for _ in 0..3 {
        assert!(
            refused(from("127.0.0.2", t).await).await,
            "over the rate, served"
        );
    }
    assert!(
        echoes(&mut from("127.0.0.5", t).await).await,
        "another source refused"
    );
    assert_eq!(rejected(admin, "source_rate").await, 3);
    assert_eq!(rejected(admin, "source_limit").await, 0);
}

/// 2,000 sources against a table of 100: the table never holds more than 100, the
/// process's memory does not grow with the sources, and limits still hold for a
/// source with open connections (never evicted).
#[tokio::test]
async fn the_source_table_is_bounded() {
    let backend = TestBackend::start(Kind::Echo).await;
    let fg = spawn(
        backend.addr,
        "max_connections_per_source = 1\nsource_table_size = 100",
    );
    let (t, admin) = (fg.addr("t"), fg.admin());
    let mut held = from("127.0.0.2", t).await;
    assert!(echoes(&mut held).await);
    let rss_before = rss_kib(fg.pid());
    for i in 0..2000u32 {
        let ip = format!("127.1.{}.{}", i / 250, i % 250 + 1);
        let mut c = from(&ip, t).await;
        assert!(echoes(&mut c).await, "{ip} refused");
    }
    let tracked = listener_json(&get_pools(admin).await)["sources_tracked"]
        .as_u64()
        .unwrap();
    assert!(tracked <= 100, "{tracked} sources tracked, cap 100");
    // The busy source kept its entry: its second connection is still refused.
    assert!(
        refused(from("127.0.0.2", t).await).await,
        "evicted a source with an open connection"
    );
    assert!(echoes(&mut held).await);
    let grown = rss_kib(fg.pid()).saturating_sub(rss_before);
    assert!(grown < 4096, "RSS grew {grown} KiB over 2,000 sources");
}

#[tokio::test]
async fn http_listeners_apply_the_rules_too() {
    let backend = TestBackend::start(Kind::Echo).await;
    let fg = Proc::spawn(
        &format!(
            r#"
[admin]
bind = "127.0.0.1:0"

[[listeners]]
name = "h"
bind = "127.0.0.1:0"
protocol = "http"
pool = "p"
deny = ["127.0.0.9"]

[[pools]]
name = "p"
backends = [{{ address = "{}" }}]
"#,
            backend.addr
        ),
        &[],
    );
    let h = fg.addr("h");
    let mut s = from("127.0.0.9", h).await;
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(refused(s).await, "a denied client was served over HTTP");
    assert_eq!(rejected(fg.admin(), "acl").await, 1);
}
