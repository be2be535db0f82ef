//! A pool's `source` (issue 13): backend connections come from the given address of
//! this host, for tcp sessions, http upstream connections and udp sessions. Each
//! backend here records the peer address of what reaches it; flowgate's own startup
//! probe and health checks use the host's default address, so the checks look at the
//! connections that carry the clients' bytes.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// What a recording backend saw: (peer address, first bytes) per connection.
type Seen = Arc<Mutex<Vec<(IpAddr, Vec<u8>)>>>;

/// A TCP backend that records (peer address, first bytes) of each connection and
/// answers `reply` once it has read something.
async fn recording_backend(
    reply: &'static [u8],
) -> (SocketAddr, Arc<Mutex<Vec<(IpAddr, Vec<u8>)>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Seen = Default::default();
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = l.accept().await {
            let seen = s2.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = match s.read(&mut buf).await {
                    Ok(n) if n > 0 => n,
                    _ => return,
                };
                seen.lock().unwrap().push((peer.ip(), buf[..n].to_vec()));
                let _ = s.write_all(reply).await;
                let mut rest = [0u8; 1024];
                while matches!(s.read(&mut rest).await, Ok(n) if n > 0) {}
            });
        }
    });
    (addr, seen)
}

fn pool(name: &str, backend: SocketAddr, source: &str) -> String {
    format!(
        "\n[[pools]]\nname = \"{name}\"\nsource = \"{source}\"\nbackends = [ {{ address = \"{backend}\" }} ]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connections_come_from_the_pools_source() {
    let (tcp_backend, tcp_seen) = recording_backend(b"pong").await;
    let (http_backend, http_seen) =
        recording_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let udp_backend = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let udp_addr = udp_backend.local_addr().unwrap();
    let udp_seen: Arc<Mutex<Vec<SocketAddr>>> = Default::default();
    let u2 = udp_seen.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp_backend.recv_from(&mut buf).await {
            u2.lock().unwrap().push(from);
            let _ = udp_backend.send_to(&buf[..n], from).await;
        }
    });
    let fg = Proc::spawn(
        &format!(
            r#"
[[listeners]]
name = "t"
bind = "127.0.0.1:0"
pool = "tcp"

[[listeners]]
name = "h"
bind = "127.0.0.1:0"
protocol = "http"
pool = "http"

[[listeners]]
name = "u"
bind = "127.0.0.1:0"
protocol = "udp"
pool = "udp"
{}{}{}"#,
            pool("tcp", tcp_backend, "127.0.0.2"),
            pool("http", http_backend, "127.0.0.3"),
            pool("udp", udp_addr, "127.0.0.4"),
        ),
        &[],
    );

    let mut c = TcpStream::connect(fg.addr("t")).await.unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut back))
        .await
        .expect("reply in time")
        .unwrap();
    assert_eq!(&back, b"pong");
    let carried: Vec<IpAddr> = tcp_seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, d)| d == b"ping")
        .map(|(ip, _)| *ip)
        .collect();
    assert_eq!(carried, ["127.0.0.2".parse::<IpAddr>().unwrap()]);

    let mut h = TcpStream::connect(fg.addr("h")).await.unwrap();
    h.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut resp = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), h.read(&mut resp))
        .await
        .expect("response in time")
        .unwrap();
    assert!(
        resp[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&resp[..n])
    );
    let carried: Vec<IpAddr> = http_seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, d)| d.starts_with(b"GET /x"))
        .map(|(ip, _)| *ip)
        .collect();
    assert_eq!(carried, ["127.0.0.3".parse::<IpAddr>().unwrap()]);

    let u = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    u.connect(fg.addr("u")).await.unwrap();
    u.send(b"dgram").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), u.recv(&mut buf))
        .await
        .expect("UDP reply in time")
        .unwrap();
    assert_eq!(&buf[..n], b"dgram");
    let from: Vec<IpAddr> = udp_seen.lock().unwrap().iter().map(|a| a.ip()).collect();
    assert_eq!(from, ["127.0.0.4".parse::<IpAddr>().unwrap()]);
}

#[test]
fn bad_sources_are_refused_by_check() {
    let dir = tempdir::Dir::new();
    for (source, want) in [
        ("not-an-ip", "is not an IP address"),
        ("::1", "cannot cross families"),
        ("0.0.0.0", "cannot be a source address"),
    ] {
        let cfg = dir.file(
            "f.toml",
            &format!(
                "[[listeners]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n{}",
                pool("p", "127.0.0.1:9".parse().unwrap(), source)
            ),
        );
        let out = std::process::Command::new(bin())
            .args(["check", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{source}: {err}");
        assert!(
            err.contains("source") && err.contains(want),
            "{source}: {err}"
        );
    }
}
