//! Every algorithm's distribution, measured through real connections.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use flowgate::Flowgate;

/// Two identity backends with `weights`, and flowgate balancing over them with
/// `algorithm`.
async fn two_behind(algorithm: &str, weights: [u32; 2]) -> ([TestBackend; 2], Flowgate) {
    let bs: [_; 2] = start_backends(Kind::Identity).await;
    let fg = start(&config(
        algorithm,
        &[(bs[0].addr, weights[0]), (bs[1].addr, weights[1])],
        "",
        "",
    ));
    (bs, fg)
}

/// The backend that a client from `ip` reaches through `addr`.
async fn identity_from(ip: std::net::Ipv4Addr, addr: std::net::SocketAddr) -> String {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind((ip, 0).into()).unwrap();
    let s = sock.connect(addr).await.unwrap();
    let mut r = tokio::io::BufReader::new(s);
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut r, &mut line)
        .await
        .unwrap();
    line.trim().to_string()
}

async fn count(addr: std::net::SocketAddr, n: usize) -> (Vec<String>, HashMap<String, usize>) {
    let mut order = Vec::new();
    let mut counts = HashMap::new();
    for _ in 0..n {
        let (_s, name) = connect_identity(addr).await;
        *counts.entry(name.clone()).or_insert(0) += 1;
        order.push(name);
    }
    (order, counts)
}

#[tokio::test]
async fn round_robin_30_over_2_is_15_15() {
    let (bs, fg) = two_behind("round-robin", [1, 1]).await;
    let (_, counts) = count(fg.local_addr("l").unwrap(), 30).await;
    assert_eq!(counts[&bs[0].name], 15);
    assert_eq!(counts[&bs[1].name], 15);
}

#[tokio::test]
async fn weighted_round_robin_is_exact_and_smooth() {
    let (bs, fg) = two_behind("weighted-round-robin", [1, 2]).await;
    let (order, counts) = count(fg.local_addr("l").unwrap(), 30).await;
    assert_eq!(counts[&bs[0].name], 10);
    assert_eq!(counts[&bs[1].name], 20);
    assert!(
        !order.windows(3).any(|w| w.iter().all(|n| *n == bs[1].name)),
        "heavier backend picked 3 times in a row: {order:?}"
    );
}

#[tokio::test]
async fn least_connections_fills_the_emptier_backend() {
    let (bs, fg) = two_behind("least-connections", [1, 1]).await;
    let addr = fg.local_addr("l").unwrap();
    let mut held = connect_n(addr, 10).await;
    let on_a = held.iter().filter(|(_, n)| *n == bs[0].name).count();
    assert_eq!(on_a, 5, "10 held connections split 5/5");
    held.retain(|(_, n)| *n != bs[0].name);
    let pool = fg.pool("p").unwrap().clone();
    let a = pool
        .backends()
        .into_iter()
        .find(|b| *b.name == *bs[0].name)
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || a.active() == 0).await,
        "A's sessions closed"
    );
    for _ in 0..4 {
        let (s, name) = connect_identity(addr).await;
        assert_eq!(name, bs[0].name, "after closing A's 5, the next 4 go to A");
        held.push((s, name));
    }
}

#[tokio::test]
async fn ip_hash_is_sticky_and_weighted() {
    let bs: [_; 3] = start_backends(Kind::Identity).await;
    let toml = config(
        "ip-hash",
        &[(bs[0].addr, 1), (bs[1].addr, 1), (bs[2].addr, 2)],
        "",
        "",
    );
    let fg = start(&toml);
    let addr = fg.local_addr("l").unwrap();
    // Many client IPs: bind to 127.0.0.x.
    let mut first = HashMap::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for x in 1..=200u8 {
        let ip = std::net::Ipv4Addr::new(127, 0, x / 100 + 1, x % 100 + 1);
        for _ in 0..2 {
            let name = identity_from(ip, addr).await;
            match first.get(&ip) {
                None => {
                    first.insert(ip, name.clone());
                    *counts.entry(name).or_insert(0) += 1;
                }
                Some(prev) => assert_eq!(prev, &name, "client {ip} moved"),
            }
        }
    }
    // Weight 2 backend holds about half the clients.
    let heavy = counts[&bs[2].name] as f64 / 200.0;
    assert!(
        (0.35..0.65).contains(&heavy),
        "weighted share {heavy} ({counts:?})"
    );
    // A second instance with the same config agrees (several instances, one address).
    drop(fg);
    let fg2 = start(&toml);
    let addr2 = fg2.local_addr("l").unwrap();
    for (ip, name) in first.iter().take(50) {
        assert_eq!(
            &identity_from(*ip, addr2).await,
            name,
            "restarted instance disagrees for {ip}"
        );
    }
}

#[tokio::test]
async fn random_follows_weights() {
    let (bs, fg) = two_behind("random", [1, 3]).await;
    let (_, counts) = count(fg.local_addr("l").unwrap(), 400).await;
    let heavy = counts[&bs[1].name] as f64 / 400.0;
    // Binomial(400, 0.75): sd ~ 0.022; 0.62..0.88 is ~6 sd.
    assert!((0.62..0.88).contains(&heavy), "{counts:?}");
}

#[tokio::test]
async fn power_of_two_avoids_the_loaded_backend() {
    let (bs, fg) = two_behind("power-of-two", [1, 1]).await;
    let addr = fg.local_addr("l").unwrap();
    let held = connect_n(addr, 20).await;
    // Two candidates are always distinct with 2 backends, so p2c is least-connections
    // here: the split of held connections stays within one.
    let on_a = held.iter().filter(|(_, n)| *n == bs[0].name).count() as i64;
    assert!((on_a - 10).abs() <= 1, "{on_a} of 20 on A");
}
