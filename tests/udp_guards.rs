//! UDP guards (issue 10, items 10 and 13): datagrams from flowgate's own addresses
//! are dropped (`reason="loop"`) instead of feeding a loop, and a client datagram
//! gets at most its `responses` (or `max_replies_per_request`) replies, counted per
//! reply rather than per receive batch.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::*;
use flowgate::Flowgate;
use tokio::net::UdpSocket;

fn config(backend: SocketAddr, extra: &str) -> String {
    format!(
        "[[listeners]]\nname = \"u\"\nbind = \"127.0.0.1:0\"\nprotocol = \"udp\"\npool = \"p\"\nidle_timeout = \"2s\"\n{extra}\n\n\
         [[pools]]\nname = \"p\"\nbackends = [ {{ address = \"{backend}\" }} ]\n"
    )
}

fn dropped(fg: &Flowgate) -> HashMap<&'static str, u64> {
    fg.udp_listeners()[0]
        .shared
        .totals()
        .dropped
        .into_iter()
        .collect()
}

/// A backend that answers every datagram with `n` replies.
async fn chatty_backend(n: usize) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((len, from)) = s.recv_from(&mut buf).await {
            for i in 0..n {
                let reply = format!("{}#{i}", String::from_utf8_lossy(&buf[..len]));
                let _ = s.send_to(reply.as_bytes(), from).await;
            }
        }
    });
    (addr, task)
}

/// Replies `c` gets within a short quiet period after the last one.
async fn replies(c: &UdpSocket) -> usize {
    let mut n = 0;
    let mut buf = [0u8; 2048];
    let mut wait = Duration::from_secs(5);
    while let Ok(Ok(_)) = tokio::time::timeout(wait, c.recv_from(&mut buf)).await {
        n += 1;
        wait = Duration::from_millis(300);
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_caps_replies_per_datagram() {
    let (backend, _task) = chatty_backend(16).await;
    for (extra, per_request) in [
        ("responses = 1", 1),
        ("max_replies_per_request = 4", 4),
        ("max_replies_per_request = 0", 16),
    ] {
        let fg = start(&config(backend, extra));
        let addr = fg.udp_local_addr("u").unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.send_to(b"q", addr).await.unwrap();
        assert_eq!(replies(&c).await, per_request, "{extra}");
        let d = dropped(&fg);
        if extra.starts_with("responses") {
            // The session ends at its first reply: replies read in the same batch
            // are dropped and counted, later ones never reach it.
            assert!(d["reply_limit"] <= 15, "{extra}: {d:?}");
        } else {
            assert_eq!(d["reply_limit"], 16 - per_request as u64, "{extra}: {d:?}");
        }
        fg.shutdown().await;
    }
}

/// Two balancers pointed at each other, or a backend that sends to the listener: a
/// datagram whose source is a backend of the pool starts no session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datagram_from_a_backend_address_is_dropped_as_a_loop() {
    let backend = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let fg = start(&config(backend.local_addr().unwrap(), ""));
    let addr = fg.udp_local_addr("u").unwrap();
    for _ in 0..3 {
        backend.send_to(b"ping", addr).await.unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(10), || dropped(&fg)["loop"] == 3).await,
        "{:?}",
        dropped(&fg)
    );
    let shared = fg.udp_listeners()[0].shared.clone();
    assert_eq!(shared.sessions.load(Relaxed), 0);
    // Nothing came back to the "backend" either.
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), backend.recv_from(&mut buf))
            .await
            .is_err()
    );
}

/// One spoofed datagram whose source is the listener's own address used to make
/// flowgate forward to the backend, whose reply went to the listener, which
/// forwarded it again: 70k sessions in 5 s. Now it is dropped at once. (Needs a raw
/// socket, so root, as CI runs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datagram_from_the_listeners_own_address_is_dropped() {
    let (backend, _task) = chatty_backend(1).await;
    let fg = start(&config(backend, ""));
    let addr = fg.udp_local_addr("u").unwrap();
    let SocketAddr::V4(v4) = addr else {
        unreachable!()
    };
    let raw = match socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(255)), // IPPROTO_RAW: we write the IP header
    ) {
        Ok(s) => s,
        Err(e) => panic!("this test needs a raw socket (root): {e}"),
    };
    // IPv4 header + UDP header + payload, source = destination = the listener.
    let payload = b"loop";
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ]);
    p.extend_from_slice(&v4.ip().octets());
    p.extend_from_slice(&v4.ip().octets());
    p.extend_from_slice(&v4.port().to_be_bytes());
    p.extend_from_slice(&v4.port().to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
    p.extend_from_slice(payload);
    raw.send_to(&p, &SocketAddr::V4(v4).into()).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || dropped(&fg)["loop"] == 1).await,
        "{:?}",
        dropped(&fg)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let shared = fg.udp_listeners()[0].shared.clone();
    assert_eq!(shared.sessions.load(Relaxed), 0, "no session, no loop");
    assert_eq!(dropped(&fg)["loop"], 1);
}

/// ICMP port unreachable ends the session at once (issue 10, item 11): its socket
/// and place are given back and it is logged as `backend_unreachable` right away,
/// not at `idle_timeout`; the client's next datagram goes to another backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_backend_ends_the_session_at_once() {
    let dead = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let (live, _task) = chatty_backend(1).await;
    let text = format!(
        "[[listeners]]\nname = \"u\"\nbind = \"127.0.0.1:0\"\nprotocol = \"udp\"\npool = \"p\"\nidle_timeout = \"120s\"\n\n\
         [[pools]]\nname = \"p\"\nalgorithm = \"round-robin\"\nbackends = [ {{ address = \"{dead}\" }}, {{ address = \"{live}\" }} ]\n"
    );
    let fg = start(&text);
    let addr = fg.udp_local_addr("u").unwrap();
    let shared = fg.udp_listeners()[0].shared.clone();
    // Round-robin: the first client's session goes to `dead`.
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.send_to(b"one", addr).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || shared.sessions.load(Relaxed)
            == 1
            && shared.active.load(Relaxed) == 0)
        .await,
        "the failed session ended long before its 120 s idle timeout: active {}",
        shared.active.load(Relaxed)
    );
    // The same client's next datagram avoids the dead backend.
    c.send_to(b"two", addr).await.unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), c.recv_from(&mut buf))
        .await
        .expect("an answer from the live backend")
        .unwrap();
    assert_eq!(&buf[..n], b"two#0");
}

/// A client socket that is not where replies are lost: a 4 MiB receive buffer (as
/// far as the kernel allows).
fn roomy_client() -> UdpSocket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    s.set_recv_buffer_size(4 << 20).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.set_nonblocking(true).unwrap();
    UdpSocket::from_std(s.into()).unwrap()
}

/// A burst of 16 replies of 65507 bytes to one request (issue 10, item 12): the
/// session's socket holds them (`session_recv_buffer`, 1 MiB by default) until its
/// task relays them; with the default socket buffer (~208 KiB) most were lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_large_replies_fits_the_session_buffer() {
    const BIG: usize = 65_507;
    let backend = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let baddr = backend.local_addr().unwrap();
    let fg = start(&config(baddr, "max_replies_per_request = 16"));
    let addr = fg.udp_local_addr("u").unwrap();
    let client = roomy_client();
    client.send_to(b"burst please", addr).await.unwrap();
    let mut buf = vec![0u8; BIG];
    let (_, session) = backend.recv_from(&mut buf).await.unwrap();
    // All 16 at once, before flowgate's session task gets to read any.
    let reply = vec![b'x'; BIG];
    for _ in 0..16 {
        backend.send_to(&reply, session).await.unwrap();
    }
    let mut got = 0;
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_secs(3), client.recv_from(&mut buf)).await
    {
        assert_eq!(n, BIG);
        got += 1;
        if got == 16 {
            break;
        }
    }
    assert_eq!(got, 16, "replies lost: dropped {:?}", dropped(&fg));
}

/// A socket's drops as the kernel counts them (the `drops` column of
/// /proc/net/udp), found by its local and remote ports.
#[cfg(target_os = "linux")]
fn kernel_drops(local: u16, remote: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/udp").unwrap();
    let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| port(f[1]) == local && (remote == 0 || port(f[2]) == remote))
        .map(|f| f[12].parse().unwrap())
        .unwrap_or_else(|| panic!("no socket on port {local} in /proc/net/udp"))
}

/// `flowgate_udp_dropped_total{listener="u",reason}` as GET /metrics says it.
#[cfg(target_os = "linux")]
async fn exported_drops(admin: SocketAddr, reason: &str) -> u64 {
    let r = curl(admin, "GET", "/metrics", None, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let want = format!("reason=\"{reason}\"");
    r.text
        .lines()
        .find(|l| {
            l.starts_with("flowgate_udp_dropped_total{")
                && l.contains("listener=\"u\"")
                && l.contains(&want)
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {reason} drops in /metrics:\n{}", r.text))
}

/// What the kernel drops on a session's socket is counted (issue 10, item 12): a
/// backend answers one request with 64 replies of 8000 bytes into a session socket
/// that holds one or two (`session_recv_buffer` at its minimum), in eight sends of
/// eight (UDP GSO: the kernel queues each send's eight at once, so they overflow
/// however fast flowgate reads). The kernel tells a socket's drops with its later
/// datagrams, so the backend then sends small ones until the count in /metrics
/// stops short of the kernel's own count (in /proc/net/udp); it must never pass it.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_the_session_socket_drops_are_counted() {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrIn};
    use std::os::fd::AsRawFd;
    const BIG: usize = 8000;
    const PER_SEND: usize = 8;
    const BURST: u64 = 64;
    let backend = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let baddr = backend.local_addr().unwrap();
    let fg = start(&format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n{}",
        config(baddr, "session_recv_buffer = 4096")
    ));
    let (addr, admin) = (fg.udp_local_addr("u").unwrap(), fg.admin_addr().unwrap());
    let client = roomy_client();
    client.send_to(b"burst please", addr).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    let (_, session) = backend.recv_from(&mut buf).await.unwrap();
    let SocketAddr::V4(to) = session else {
        unreachable!("an IPv4 session")
    };
    let replies = vec![b'x'; BIG * PER_SEND];
    let seg = BIG as u16;
    for _ in 0..BURST as usize / PER_SEND {
        let sent = sendmsg(
            backend.as_raw_fd(),
            &[std::io::IoSlice::new(&replies)],
            &[ControlMessage::UdpGsoSegments(&seg)],
            MsgFlags::empty(),
            Some(&SockaddrIn::from(to)),
        )
        .expect("a GSO send");
        assert_eq!(sent, replies.len());
    }
    let (mut bigs, mut ends_sent, mut ends) = (0u64, 0u64, 0u64);
    let (mut counted, mut kernel) = (0, 0);
    while ends_sent < 50 {
        backend.send_to(b"end", session).await.unwrap();
        ends_sent += 1;
        // What the client gets, until an end or 300 ms of nothing.
        while let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buf)).await
        {
            if n != BIG {
                ends += 1;
                break;
            }
            bigs += 1;
        }
        counted = exported_drops(admin, "session_recv_buffer").await;
        kernel = kernel_drops(session.port(), baddr.port());
        assert!(
            counted <= kernel,
            "counted {counted}, the kernel dropped {kernel}"
        );
        if ends > 0 && counted == kernel {
            break;
        }
    }
    eprintln!("{bigs} of {BURST} relayed, {counted} dropped and counted ({kernel} by the kernel's count), after {ends_sent} small replies");
    assert!(kernel > 0, "the burst overflowed the session's socket");
    assert_eq!(counted, kernel, "after {ends_sent} small replies");
    // And every large reply is accounted for: relayed, or dropped and counted (on
    // the session's socket, on the way to the client, or at the client's socket).
    let lost_later = exported_drops(admin, "reply_failed").await
        + kernel_drops(client.local_addr().unwrap().port(), 0);
    assert!(
        bigs + counted + lost_later >= BURST,
        "{bigs} relayed, {counted} + {lost_later} dropped, of {BURST}"
    );
    assert!(bigs + ends + counted <= BURST + ends_sent);
}
