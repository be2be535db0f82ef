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
    let client = {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.set_recv_buffer_size(4 << 20).unwrap();
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        s.set_nonblocking(true).unwrap();
        UdpSocket::from_std(s.into()).unwrap()
    };
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
