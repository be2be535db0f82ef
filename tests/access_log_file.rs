//! The access log's destinations: its file (issue 10, item 19: created 0640, never
//! opened through a symlink) and syslog over UDP (issue 10, operator basics).

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use flowgate::{Config, Flowgate};

/// Listener "l" over one backend at `backend`, with `log` as the `[log]` table.
fn toml(log: &str, backend: impl std::fmt::Display) -> String {
    format!(
        "[log]\n{log}\n\n\
         [[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n\
         [[pools]]\nname = \"p\"\nbackends = [ {{ address = \"{backend}\" }} ]\n"
    )
}

fn text(log: &std::path::Path) -> String {
    toml(
        &format!("access_log = \"{}\"", log.display()),
        "127.0.0.1:9",
    )
}

#[tokio::test]
async fn the_access_log_is_created_0640_and_never_through_a_symlink() {
    let dir = tempdir::Dir::new();
    let log = dir.0.join("access.log");
    let fg = Flowgate::start(Config::parse(&text(&log), &dir.0.join("f.toml")).unwrap())
        .expect("starts");
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    // The umask may take bits away, never add them.
    assert_eq!(mode & !0o640, 0, "mode {mode:o}");
    fg.shutdown().await;

    let target = dir.0.join("elsewhere");
    std::fs::write(&target, "precious\n").unwrap();
    let link = dir.0.join("link.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let e = Flowgate::start(Config::parse(&text(&link), &dir.0.join("f.toml")).unwrap())
        .expect_err("a symlinked access log is refused")
        .to_string();
    assert!(e.contains("log.access_log: cannot open"), "{e}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
}

/// HAProxy tcplog's fields (issue 10, operator basics): start time, connect
/// retries, the backend's resolved address, and the listener's and backend's
/// concurrency when the connection started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_lines_carry_start_retries_backend_address_and_concurrency() {
    let live = TestBackend::start(Kind::Identity).await;
    let dead = dead_addr();
    let dir = tempdir::Dir::new();
    let log = dir.0.join("access.log");
    let text = format!(
        "[log]\naccess_log = \"{}\"\nformat = \"json\"\n\n\
         [[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n\
         [[pools]]\nname = \"p\"\nalgorithm = \"round-robin\"\nconnect_attempts = 2\n\
         backends = [ {{ address = \"{dead}\" }}, {{ address = \"{}\" }} ]\n",
        log.display(),
        live.addr
    );
    let fg = Flowgate::start(Config::parse(&text, &dir.0.join("f.toml")).unwrap()).unwrap();
    // Round-robin starts with the dead backend: one refused attempt, then the live one.
    let (c, name) = connect_identity(fg.local_addr("l").unwrap()).await;
    assert_eq!(name, live.name);
    drop(c);
    let line = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .next()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
    };
    assert!(wait_until(std::time::Duration::from_secs(10), || line().is_some()).await);
    let v = line().unwrap();
    assert_eq!(v["retries"], 1, "{v}");
    assert_eq!(v["backend_addr"], live.addr.to_string(), "{v}");
    assert_eq!(v["listener_conns"], 1, "{v}");
    assert_eq!(v["backend_conns"], 1, "{v}");
    assert!(
        v["start"].as_str().unwrap() <= v["time"].as_str().unwrap(),
        "{v}"
    );
    fg.shutdown().await;
}

/// One datagram from `rx`: the RFC 5424 header's seven fields and the MSG.
async fn datagram(rx: &tokio::net::UdpSocket) -> (Vec<String>, String) {
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv(&mut buf))
        .await
        .expect("a datagram in 10 s")
        .unwrap();
    assert!(n <= 2048, "{n} bytes");
    let d = std::str::from_utf8(&buf[..n]).expect("UTF-8").to_string();
    assert!(!d.contains('\n'), "{d:?}");
    let mut fields: Vec<String> = d.splitn(8, ' ').map(String::from).collect();
    assert_eq!(fields.len(), 8, "a header and a MSG: {d:?}");
    let msg = fields.pop().unwrap();
    assert!(!msg.starts_with('\u{feff}'), "no BOM: {d:?}");
    (fields, msg)
}

/// `access_log = "udp://HOST:PORT"`: each connection is one RFC 5424 datagram
/// (facility local0, severity informational), its MSG the line a file would get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_over_udp_sends_one_rfc5424_datagram_per_connection() {
    let backend = TestBackend::start(Kind::Identity).await;
    let rx = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let hostname = nix::unistd::gethostname().unwrap().into_string().unwrap();
    for format in ["text", "json"] {
        let fg = start(&toml(
            &format!(
                "access_log = \"udp://{}\"\nformat = \"{format}\"",
                rx.local_addr().unwrap()
            ),
            backend.addr,
        ));
        // Two connections, one after the other: the second datagram is the second
        // connection's, so the first was sent once.
        for _ in 0..2 {
            let (mut c, _) = connect_identity(fg.local_addr("l").unwrap()).await;
            echo(&mut c, b"hello\n").await.unwrap();
            let client = c.get_ref().local_addr().unwrap().to_string();
            drop(c);
            let (head, msg) = datagram(&rx).await;
            assert_eq!(head[0], "<134>1", "PRI local0.info, version 1");
            let ts = &head[1];
            assert!(
                ts.len() == 27 && ts.ends_with('Z') && humantime::parse_rfc3339(ts).is_ok(),
                "RFC 3339 UTC with microseconds: {ts}"
            );
            assert_eq!(head[2], hostname);
            assert_eq!(head[3], "flowgate");
            assert_eq!(head[4], std::process::id().to_string());
            assert_eq!(head[5], "tcp", "MSGID is the protocol");
            assert_eq!(head[6], "-", "no structured data");
            if format == "text" {
                assert!(msg.starts_with("time="), "{msg}");
                assert!(msg.contains(&format!(" client={client} ")), "{msg}");
                assert!(msg.contains(" to_backend=6 "), "{msg}");
                assert!(msg.contains(" reason="), "{msg}");
            } else {
                let v: serde_json::Value = serde_json::from_str(&msg).expect("a JSON MSG");
                assert_eq!(v["client"], client, "{v}");
                assert_eq!(v["proto"], "tcp", "{v}");
                assert!(v["reason"].is_string(), "{v}");
            }
        }
        fg.shutdown().await;
    }
}

/// A syslog receiver that is not there costs entries, counted as dropped, and never
/// the writer: once a receiver binds the port, entries arrive again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_send_errors_are_counted_as_dropped_and_the_writer_goes_on() {
    let backend = TestBackend::start(Kind::Identity).await;
    // A port nobody listens on: each datagram to it comes back as ICMP port
    // unreachable, which fails the next send on the connected socket.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let fg = start(&toml(
        &format!("access_log = \"udp://{port}\""),
        backend.addr,
    ));
    let listener = fg.local_addr("l").unwrap();
    let log = fg.access_log();
    let mut tries = 0;
    while log.dropped() == 0 {
        tries += 1;
        assert!(tries <= 50, "no send failed in 50 connections");
        let (c, _) = connect_identity(listener).await;
        drop(c);
        wait_until(std::time::Duration::from_millis(200), || log.dropped() > 0).await;
    }

    let rx = tokio::net::UdpSocket::bind(port).await.unwrap();
    let (c, _) = connect_identity(listener).await;
    let client = c.get_ref().local_addr().unwrap().to_string();
    drop(c);
    // Entries of the connections above may still arrive first.
    loop {
        let (_, msg) = datagram(&rx).await;
        if msg.contains(&format!(" client={client} ")) {
            break;
        }
    }
    fg.shutdown().await;
}
