//! UDP load balancing through real sockets: distribution, session stickiness,
//! isolation between clients, idle expiry, `responses`, per-source limits, re-pick
//! after a backend dies, a real DNS server (dnsmasq) queried with dig and dnsperf,
//! and hostile input (empty and maximum-size datagrams, a burst of source ports).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{wait_until, Proc};
use flowgate::Flowgate;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// A UDP echo backend: replies `NAME:payload` (or the payload alone when `raw`).
struct UdpBackend {
    name: String,
    task: JoinHandle<()>,
    /// Kept after `kill`, so that its port is not handed to another test's socket
    /// (the tests run in parallel; one that bound it would take the datagrams
    /// meant to meet ICMP port unreachable).
    socket: std::sync::Arc<UdpSocket>,
}

impl UdpBackend {
    async fn start(raw: bool) -> UdpBackend {
        Self::start_on(UdpSocket::bind("127.0.0.1:0").await.unwrap(), raw)
    }

    /// A backend whose port is also free for TCP, where its health probe connects.
    async fn with_probe_port() -> (UdpBackend, tokio::net::TcpListener) {
        loop {
            let t = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            if let Ok(u) = UdpSocket::bind(t.local_addr().unwrap()).await {
                return (Self::start_on(u, false), t);
            }
        }
    }

    fn start_on(s: UdpSocket, raw: bool) -> UdpBackend {
        let name = s.local_addr().unwrap().to_string();
        let prefix = format!("{name}:").into_bytes();
        let s = std::sync::Arc::new(s);
        let socket = s.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = s.recv_from(&mut buf).await else {
                    continue;
                };
                let reply = if raw {
                    buf[..n].to_vec()
                } else {
                    [&prefix[..], &buf[..n]].concat()
                };
                let _ = s.send_to(&reply, from).await;
            }
        });
        UdpBackend { name, task, socket }
    }

    /// Datagrams to the backend now get ICMP port unreachable: its socket stops
    /// being read and is connected to another peer (the discard port), so the
    /// kernel delivers nothing from anyone else to it, while its port stays taken.
    async fn kill(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
        self.socket.connect("127.0.0.1:9").await.unwrap();
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Two echo backends that reply `NAME:payload`.
async fn two_backends() -> (UdpBackend, UdpBackend) {
    (
        UdpBackend::start(false).await,
        UdpBackend::start(false).await,
    )
}

fn config(backends: &[(&str, u32)], algorithm: &str, extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(b, w)| format!("{{ address = \"{b}\", weight = {w} }}"))
        .collect();
    format!(
        r#"
[[listeners]]
name = "u"
bind = "127.0.0.1:0"
protocol = "udp"
pool = "p"
{extra}
[[pools]]
name = "p"
algorithm = "{algorithm}"
backends = [{}]
"#,
        list.join(", ")
    )
}

fn start(toml: &str) -> (Flowgate, SocketAddr) {
    let fg = common::start(toml);
    let addr = fg.udp_local_addr("u").expect("udp listener u");
    (fg, addr)
}

async fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

/// Sends `msg` and waits up to `limit` for one reply.
async fn ask(c: &UdpSocket, to: SocketAddr, msg: &[u8], limit: Duration) -> Option<Vec<u8>> {
    c.send_to(msg, to).await.unwrap();
    let mut buf = vec![0u8; 65536];
    match tokio::time::timeout(limit, c.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => {
            assert_eq!(from, to, "replies come from the listener's address");
            Some(buf[..n].to_vec())
        }
        _ => None,
    }
}

/// The backend name in a `NAME:payload` reply.
fn who(reply: &[u8]) -> String {
    let s = String::from_utf8_lossy(reply);
    let (host, rest) = s.split_once(':').unwrap();
    let port = rest.split(':').next().unwrap();
    format!("{host}:{port}")
}

const SEC: Duration = Duration::from_secs(1);

fn udp(fg: &Flowgate) -> std::sync::Arc<flowgate::proxy::udp::UdpListenerShared> {
    fg.udp_listeners()[0].shared.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_one_to_two_give_three_and_six_sessions() {
    let (a, b) = two_backends().await;
    let (fg, addr) = start(&config(
        &[(&a.name, 1), (&b.name, 2)],
        "weighted-round-robin",
        "",
    ));
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut clients = Vec::new();
    for i in 0..9 {
        let c = client().await;
        let r = ask(&c, addr, format!("q{i}").as_bytes(), 5 * SEC)
            .await
            .expect("reply");
        *counts.entry(who(&r)).or_default() += 1;
        clients.push(c);
    }
    assert_eq!(counts.get(&a.name), Some(&3), "{counts:?}");
    assert_eq!(counts.get(&b.name), Some(&6), "{counts:?}");
    let shared = udp(&fg);
    assert_eq!(shared.sessions.load(Relaxed), 9);
    assert_eq!(shared.active.load(Relaxed), 9);
    let pool = fg.pool("p").unwrap();
    let per_backend: Vec<u64> = pool
        .backends()
        .iter()
        .map(|b| b.stats.udp_sessions.load(Relaxed))
        .collect();
    assert_eq!(per_backend, [3, 6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_sticks_to_one_backend_and_clients_get_only_their_replies() {
    let bs = [
        UdpBackend::start(false).await,
        UdpBackend::start(false).await,
        UdpBackend::start(false).await,
    ];
    let names: Vec<(&str, u32)> = bs.iter().map(|b| (b.name.as_str(), 1)).collect();
    let (fg, addr) = start(&config(&names, "round-robin", ""));
    let c = client().await;
    let mut seen = std::collections::HashSet::new();
    for i in 0..20 {
        let r = ask(&c, addr, format!("m{i}").as_bytes(), 5 * SEC)
            .await
            .expect("reply");
        assert!(r.ends_with(format!(":m{i}").as_bytes()));
        seen.insert(who(&r));
    }
    assert_eq!(seen.len(), 1, "one backend answered every time: {seen:?}");
    assert_eq!(udp(&fg).sessions.load(Relaxed), 1);

    // Two clients, interleaved: each gets exactly its own replies back.
    let (x, y) = (client().await, client().await);
    for i in 0..10 {
        x.send_to(format!("x{i}").as_bytes(), addr).await.unwrap();
        y.send_to(format!("y{i}").as_bytes(), addr).await.unwrap();
    }
    for (c, tag) in [(&x, 'x'), (&y, 'y')] {
        let mut buf = [0u8; 256];
        for i in 0..10 {
            let (n, _) = tokio::time::timeout(5 * SEC, c.recv_from(&mut buf))
                .await
                .expect("reply in time")
                .unwrap();
            let r = String::from_utf8_lossy(&buf[..n]).to_string();
            assert!(r.ends_with(&format!(":{tag}{i}")), "{tag} got {r}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_expire_after_idle_timeout_and_responses_end_them() {
    let a = UdpBackend::start(false).await;
    let (fg, addr) = start(&config(
        &[(&a.name, 1)],
        "round-robin",
        "idle_timeout = \"300ms\"",
    ));
    let shared = udp(&fg);
    let mut cs = Vec::new();
    for _ in 0..5 {
        let c = client().await;
        ask(&c, addr, b"hi", 5 * SEC).await.expect("reply");
        cs.push(c);
    }
    assert_eq!(shared.active.load(Relaxed), 5);
    assert!(
        wait_until(10 * SEC, || shared.active.load(Relaxed) == 0).await,
        "sessions expired"
    );
    let b = &fg.pool("p").unwrap().backends()[0];
    assert_eq!(b.stats.udp_active.load(Relaxed), 0);
    assert_eq!(b.active(), 0);

    // responses = 1: a session ends with its first reply, so each query is one.
    let (fg, addr) = start(&config(
        &[(&a.name, 1)],
        "round-robin",
        "idle_timeout = \"30s\"\nresponses = 1",
    ));
    let shared = udp(&fg);
    let c = client().await;
    for i in 0..3 {
        ask(&c, addr, b"query", 5 * SEC).await.expect("reply");
        assert!(
            wait_until(5 * SEC, || shared.active.load(Relaxed) == 0).await,
            "session {i} ended after its reply"
        );
    }
    assert_eq!(shared.sessions.load(Relaxed), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_per_source_drops_and_counts_the_excess() {
    let a = UdpBackend::start(false).await;
    let (fg, addr) = start(&config(
        &[(&a.name, 1)],
        "round-robin",
        "max_sessions_per_source = 3",
    ));
    let mut answered = 0;
    let mut cs = Vec::new();
    for _ in 0..5 {
        let c = client().await;
        if ask(&c, addr, b"x", 2 * SEC).await.is_some() {
            answered += 1;
        }
        cs.push(c);
    }
    assert_eq!(answered, 3);
    let t = udp(&fg).totals();
    let dropped: HashMap<_, _> = t.dropped.into_iter().collect();
    assert_eq!(dropped["max_sessions_per_source"], 2, "{dropped:?}");
    // Another source address is not affected.
    let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    assert!(ask(&other, addr, b"x", 5 * SEC).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backends_session_repicks() {
    let (mut a, mut b) = two_backends().await;
    // One session per source: the re-pick must give back the old session's place
    // before it takes a new one.
    let (fg, addr) = start(&config(
        &[(&a.name, 1), (&b.name, 1)],
        "ip-hash",
        "max_sessions_per_source = 1",
    ));
    let c = client().await;
    let first = who(&ask(&c, addr, b"1", 5 * SEC).await.expect("reply"));
    let (dead, live) = if first == a.name {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    dead.kill().await;
    // The next datagram meets ICMP port unreachable and is lost; the one after it
    // re-picks and the live backend answers, every time after that. Each try is
    // numbered and its reply names it, so a reply slower than the 2 s a try waits
    // (a stalled machine) is still credited to its own try, not counted as lost.
    let mut moved = None;
    for i in 0..5 {
        if let Some(r) = ask(&c, addr, format!("2-{i}").as_bytes(), 2 * SEC).await {
            let s = String::from_utf8_lossy(&r).into_owned();
            let tag = s.rsplit_once("2-").expect("a numbered reply").1;
            moved = Some((tag.parse::<u32>().expect("a try number"), who(&r)));
            break;
        }
    }
    let (tries, to) = moved.expect("a reply after the backend died");
    assert_eq!(to, live.name);
    assert!(tries <= 1, "re-picked after {tries} lost datagrams");
    for _ in 0..5 {
        let r = ask(&c, addr, b"3", 5 * SEC).await.expect("reply");
        assert_eq!(who(&r), live.name);
    }
    let shared = udp(&fg);
    assert_eq!(shared.sessions.load(Relaxed), 2);
    let t = shared.totals();
    assert!(t.dropped.iter().all(|(_, n)| *n == 0), "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_largest_datagrams_pass_and_a_port_burst_stays_bounded() {
    let a = UdpBackend::start(true).await;
    let (fg, addr) = start(&config(
        &[(&a.name, 1)],
        "round-robin",
        "idle_timeout = \"1s\"\nmax_sessions = 1000",
    ));
    let c = client().await;
    assert_eq!(ask(&c, addr, b"", 5 * SEC).await.expect("empty reply"), b"");
    let big: Vec<u8> = (0..65507u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(ask(&c, addr, &big, 5 * SEC).await.expect("big reply"), big);

    // 3000 new source ports at once: at most max_sessions sessions, the rest
    // dropped and counted, and all of them expire.
    let shared = udp(&fg);
    let before = shared.sessions.load(Relaxed);
    let mut burst = Vec::new();
    for _ in 0..3000 {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.send_to(b"flood", addr).unwrap();
        burst.push(s);
        assert!(shared.active.load(Relaxed) <= 1000);
    }
    let counted = wait_until(10 * SEC, || {
        let t = shared.totals();
        let dropped: u64 = t.dropped.iter().map(|(_, n)| n).sum();
        shared.sessions.load(Relaxed) - before + dropped == 3000
    })
    .await;
    let t = shared.totals();
    assert!(counted, "every datagram forwarded or counted: {t:?}");
    let dropped: HashMap<_, _> = t.dropped.into_iter().collect();
    assert!(dropped["max_sessions"] >= 1000, "{dropped:?}");
    assert!(shared.active.load(Relaxed) <= 1000);
    drop(burst);
    assert!(
        wait_until(15 * SEC, || shared.active.load(Relaxed) == 0).await,
        "burst sessions expired"
    );
    // Still serving.
    assert_eq!(
        ask(&c, addr, b"after", 5 * SEC).await.expect("reply"),
        b"after"
    );
}

/// dnsmasq with static records behind flowgate; dig checks every answer, dnsperf
/// runs a bounded load and must lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnsmasq_behind_flowgate_answers_every_query() {
    // A port free for both UDP and TCP: dnsmasq binds both.
    let port = loop {
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = t.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            break port;
        }
    };
    let dnsmasq = std::process::Command::new("dnsmasq")
        .args([
            "--no-daemon",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--user=root",
            "--pid-file",
            &format!("--port={port}"),
            "--host-record=alpha.test,10.0.0.1",
            "--host-record=beta.test,10.0.0.2",
            "--host-record=gamma.test,10.0.0.3",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run dnsmasq (apt-get install -y dnsmasq-base)");
    // Killed however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _dnsmasq = Kill(dnsmasq);
    let backend = format!("127.0.0.1:{port}");
    let fg = Proc::spawn(
        &config(
            &[(&backend, 1)],
            "round-robin",
            "idle_timeout = \"5s\"\nresponses = 1",
        ),
        &[],
    );
    let addr = fg.addr("u");
    // dnsmasq binds a moment after it starts.
    let dig = |name: &str| {
        std::process::Command::new("dig")
            .args([
                &format!("@{}", addr.ip()),
                "-p",
                &addr.port().to_string(),
                name,
                "A",
                "+short",
                "+tries=1",
                "+time=2",
            ])
            .output()
            .expect("run dig (apt-get install -y bind9-dnsutils)")
    };
    assert!(
        wait_until(10 * SEC, || String::from_utf8_lossy(
            &dig("alpha.test").stdout
        )
        .trim()
            == "10.0.0.1")
        .await,
        "dnsmasq answers through flowgate"
    );
    for round in 0..10 {
        for (name, ip) in [
            ("alpha.test", "10.0.0.1"),
            ("beta.test", "10.0.0.2"),
            ("gamma.test", "10.0.0.3"),
        ] {
            let out = dig(name);
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                ip,
                "round {round}: {name}"
            );
        }
    }

    let queries = fg.dir.file(
        "queries.txt",
        "alpha.test A\nbeta.test A\ngamma.test A\nmissing.test A\n",
    );
    let out = std::process::Command::new("dnsperf")
        .args(["-s", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .arg("-d")
        .arg(&queries)
        .args(["-n", "500", "-c", "4", "-q", "20", "-t", "5"])
        .output()
        .expect("run dnsperf (apt-get install -y dnsperf)");
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "dnsperf failed: {report}");
    let line = |key: &str| {
        report
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("no {key:?} in dnsperf output:\n{report}"))
            .to_string()
    };
    let sent: u64 = line("Queries sent:")
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(sent, 2000, "{report}");
    let lost: u64 = line("Queries lost:")
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(lost, 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_reload_apply_to_udp_sessions() {
    let (a, b) = two_backends().await;
    let extra = "idle_timeout = \"30s\"";
    let pool_extra = "drain_timeout = \"300ms\"\n";
    let toml = config(&[(&a.name, 1), (&b.name, 1)], "round-robin", extra)
        .replace("algorithm =", &format!("{pool_extra}algorithm ="));
    let (fg, addr) = start(&toml);
    let c1 = client().await;
    let first = who(&ask(&c1, addr, b"1", 5 * SEC).await.expect("reply"));
    let (x, y) = if first == a.name { (&a, &b) } else { (&b, &a) };

    // Drain x: new sessions avoid it, c1's session on it carries on.
    fg.drain("p", &x.name).unwrap();
    for _ in 0..4 {
        let c = client().await;
        assert_eq!(who(&ask(&c, addr, b"n", 5 * SEC).await.unwrap()), y.name);
    }
    assert_eq!(who(&ask(&c1, addr, b"2", 5 * SEC).await.unwrap()), x.name);
    fg.enable("p", &x.name).unwrap();

    // Reload without x: the listener keeps its socket; x drains, and after
    // drain_timeout c1's next datagram goes to y.
    let new = config(&[(&y.name, 1)], "round-robin", extra)
        .replace("algorithm =", &format!("{pool_extra}algorithm ="));
    fg.apply(flowgate::Config::parse(&new, std::path::Path::new("t.toml")).unwrap())
        .unwrap();
    assert_eq!(
        fg.udp_local_addr("u"),
        Some(addr),
        "same socket after reload"
    );
    let moved = async {
        loop {
            let r = ask(&c1, addr, b"3", 5 * SEC).await.expect("reply");
            if who(&r) == y.name {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(10 * SEC, moved)
        .await
        .expect("c1 moved to the remaining backend after drain_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_a_udp_backend_out_and_sessions_repick() {
    // Each UDP backend also listens on TCP on its port number, for the probe.
    let (a, ta) = UdpBackend::with_probe_port().await;
    let (b, tb) = UdpBackend::with_probe_port().await;
    let accept = |l: tokio::net::TcpListener| {
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        })
    };
    let (pa, pb) = (accept(ta), accept(tb));
    let toml = config(&[(&a.name, 1), (&b.name, 1)], "ip-hash", "")
        + "[pools.health_check]\nkind = \"tcp\"\ninterval = \"100ms\"\nfall = 1\nrise = 1\n";
    let (fg, addr) = start(&toml);
    let p = fg.pool("p").unwrap();
    assert!(
        wait_until(10 * SEC, || p.backends().iter().all(|b| b.is_usable())).await,
        "both up"
    );
    let c = client().await;
    let first = who(&ask(&c, addr, b"1", 5 * SEC).await.expect("reply"));
    let (down, other, probe) = if first == a.name {
        (&a, &b, &pa)
    } else {
        (&b, &a, &pb)
    };
    // Only the probe port goes away: the UDP server still answers, but health
    // says down, so the session moves.
    probe.abort();
    let d = p.find(&down.name).unwrap();
    assert!(
        wait_until(10 * SEC, || !d.is_usable()).await,
        "health check marked {} down",
        down.name
    );
    let r = ask(&c, addr, b"2", 5 * SEC).await.expect("reply");
    assert_eq!(who(&r), other.name);
    let _ = (pa, pb);
}

/// A client that sends without waiting: consecutive datagrams go out to the backend
/// as one run (one GSO send on Linux), and must arrive as the same datagrams, in
/// order, with every byte counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_one_client_arrives_datagram_by_datagram() {
    let a = UdpBackend::start(true).await;
    let (fg, addr) = start(&config(&[(&a.name, 1)], "round-robin", ""));
    let c = client().await;
    // Runs of equal sizes, a shorter one ending a run, a longer one starting the
    // next, an empty one in between.
    let sizes = [1000, 1000, 1000, 700, 1200, 1200, 0, 1200, 64, 64, 64, 64];
    let mut sent = Vec::new();
    for i in 0..100usize {
        let n = sizes[i % sizes.len()];
        let mut d = vec![(i % 251) as u8; n];
        if n >= 2 {
            d[..2].copy_from_slice(&(i as u16).to_be_bytes());
        }
        c.send_to(&d, addr).await.unwrap();
        sent.push(d);
    }
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while got.len() < sent.len() {
        match tokio::time::timeout(5 * SEC, c.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => got.push(buf[..n].to_vec()),
            _ => break,
        }
    }
    assert_eq!(got.len(), sent.len(), "every datagram came back");
    assert!(got == sent, "the same datagrams, in order");
    let bytes: u64 = sent.iter().map(|d| d.len() as u64).sum();
    // A reply is counted just after it is sent, so the client may be a moment ahead.
    let shared = udp(&fg);
    wait_until(5 * SEC, || shared.totals().datagrams_from == 100).await;
    let t = shared.totals();
    assert_eq!((t.datagrams_to, t.bytes_to), (100, bytes));
    assert_eq!((t.datagrams_from, t.bytes_from), (100, bytes));
}

/// A reload that points a UDP listener at another pool moves its live sessions:
/// the client's next datagram goes to the new pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_another_pool_moves_live_sessions() {
    let (a, b) = two_backends().await;
    let two_pools = |target: &str| {
        format!(
            r#"
[[listeners]]
name = "u"
bind = "127.0.0.1:0"
protocol = "udp"
pool = "{target}"
[[pools]]
name = "p"
backends = [{{ address = "{}" }}]
[[pools]]
name = "q"
backends = [{{ address = "{}" }}]
"#,
            a.name, b.name
        )
    };
    let (fg, addr) = start(&two_pools("p"));
    let c = client().await;
    assert_eq!(who(&ask(&c, addr, b"1", 5 * SEC).await.unwrap()), a.name);
    fg.apply(flowgate::Config::parse(&two_pools("q"), std::path::Path::new("t.toml")).unwrap())
        .unwrap();
    assert_eq!(fg.udp_local_addr("u"), Some(addr));
    assert_eq!(who(&ask(&c, addr, b"2", 5 * SEC).await.unwrap()), b.name);
    assert_eq!(udp(&fg).sessions.load(Relaxed), 2);
}

/// SIGTERM with UDP sessions open: flowgate stops at once (UDP has nothing to drain)
/// and logs each session's end as `shutdown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_udp_sessions_and_exits() {
    let a = UdpBackend::start(false).await;
    let mut fg = Proc::spawn(
        &config(&[(&a.name, 1)], "round-robin", "idle_timeout = \"300s\"").replace(
            "[[listeners]]",
            "[log]\naccess_log = \"access.log\"\n[[listeners]]",
        ),
        &[],
    );
    let addr = fg.addr("u");
    let mut cs = Vec::new();
    for _ in 0..3 {
        let c = client().await;
        ask(&c, addr, b"hi", 5 * SEC).await.expect("reply");
        cs.push(c);
    }
    fg.signal(nix::sys::signal::Signal::SIGTERM);
    let st = fg.exited(10 * SEC).await.expect("exited");
    assert!(st.success(), "{st:?}\n{}", fg.log());
    let log = std::fs::read_to_string(fg.dir.0.join("access.log")).unwrap_or_default();
    let ends: Vec<&str> = log.lines().filter(|l| l.contains("proto=udp")).collect();
    assert_eq!(ends.len(), 3, "{log}");
    assert!(ends.iter().all(|l| l.ends_with("reason=shutdown")), "{log}");
}
