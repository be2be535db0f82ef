//! Several instances behind one address (issue 15, item 1): two flowgate processes
//! with the same backends and weights, listed in different orders, send every client
//! to the same backend under `ip-hash`, so a client that ECMP or a VRRP failover
//! moves to the other instance keeps its backend. 10,000 client addresses reach
//! each instance through PROXY v1 headers (the client is the header's address, as it
//! is for ip-hash), and the picks are compared one by one, before and after both
//! instances remove the same backend through the admin API.

mod common;

use std::net::{Ipv4Addr, SocketAddr};

use common::*;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const CLIENTS: u32 = 10_000;
/// Connections in flight at once per instance.
const PARALLEL: u32 = 16;

fn instance(backends: &[&TestBackend]) -> Proc {
    let list: Vec<String> = backends
        .iter()
        .map(|b| {
            // Weights follow the backend, not the position in the list.
            let w = 1 + (b.addr.port() % 3);
            format!("{{ address = \"{}\", weight = {w} }}", b.addr)
        })
        .collect();
    Proc::spawn(
        &format!(
            r#"
[admin]
bind = "127.0.0.1:0"

[[listeners]]
name = "vip"
bind = "127.0.0.1:0"
pool = "p"
accept_proxy = "v1"

[[pools]]
name = "p"
algorithm = "ip-hash"
backends = [{}]
"#,
            list.join(", ")
        ),
        &[],
    )
}

fn client(i: u32) -> Ipv4Addr {
    // Spread over 10.0.0.0/8 (not sequential: hashing must not be helped by order).
    Ipv4Addr::from(0x0a00_0000 | (i.wrapping_mul(2_654_435_761) & 0x00ff_ffff))
}

/// The backend each of the clients reaches through `vip`.
async fn picks(vip: SocketAddr) -> Vec<String> {
    let mut tasks = Vec::new();
    for lane in 0..PARALLEL {
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut i = lane;
            while i < CLIENTS {
                let c = client(i);
                let mut s = TcpStream::connect(vip).await.expect("connect");
                let header = format!(
                    "PROXY TCP4 {c} {} {} {}\r\n",
                    vip.ip(),
                    40_000 + (i % 20_000),
                    vip.port()
                );
                s.write_all(header.as_bytes()).await.unwrap();
                let name = read_identity(&mut BufReader::new(s)).await;
                out.push((i, name));
                i += PARALLEL;
            }
            out
        }));
    }
    let mut all = vec![String::new(); CLIENTS as usize];
    for t in tasks {
        for (i, name) in t.await.unwrap() {
            all[i as usize] = name;
        }
    }
    all
}

fn compare(a: &[String], b: &[String], what: &str) {
    let differ: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    assert!(
        differ.is_empty(),
        "{what}: {} of {CLIENTS} clients reach different backends, e.g. {} -> {:?} / {:?}",
        differ.len(),
        client(differ[0] as u32),
        a[differ[0]],
        b[differ[0]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_send_every_client_to_the_same_backend() {
    let backends = start_backends::<4>(Kind::Identity).await;
    let [a, b, c, d] = &backends;
    let one = instance(&[a, b, c, d]);
    let two = instance(&[c, a, d, b]);
    let (p1, p2) = (picks(one.addr("vip")).await, picks(two.addr("vip")).await);
    compare(&p1, &p2, "same backends in another order");
    // Every backend has clients: the comparison is not trivially about one backend.
    for bk in &backends {
        assert!(p1.contains(&bk.name), "{} got no client", bk.name);
    }

    // Both remove the same backend (as their operators would, or a reload would).
    let gone = &b.name;
    for fg in [&one, &two] {
        let r = curl(
            fg.admin(),
            "DELETE",
            &format!("/api/v1/pools/p/backends/{gone}"),
            None,
            None,
        )
        .await;
        assert!(r.status < 300, "DELETE {gone}: {} {}", r.status, r.text);
    }
    let (q1, q2) = (picks(one.addr("vip")).await, picks(two.addr("vip")).await);
    compare(&q1, &q2, "after both removed one backend");
    assert!(
        !q1.iter().any(|n| n == gone),
        "a client still reached {gone}"
    );
    // Consistent hashing: the clients of the other backends mostly stay put.
    let moved = (0..CLIENTS as usize)
        .filter(|&i| p1[i] != *gone && p1[i] != q1[i])
        .count();
    assert!(
        moved * 20 < CLIENTS as usize,
        "{moved} clients of the remaining backends moved"
    );
}
