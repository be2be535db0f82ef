//! The PROXY protocol (issue 13) on the real binary, with HAProxy 2.6 as the peer
//! on both sides: in front of flowgate (`send-proxy-v2`, `send-proxy`), and as the
//! backend (`accept-proxy`, logging the client it was told of). Clients bind their
//! own 127.0.0.x source addresses, so the address that reaches the access log, the
//! ip-hash pick and the backend's header is known.
//!
//! HAProxy listens on sockets the test binds (port 0) and hands over as inherited
//! descriptors (`bind fd@N`): no fixed port, and no wait for it to be ready (the
//! kernel queues connections until it accepts). It logs to a UDP socket of the test.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

const HAPROXY: &str = "/usr/sbin/haproxy";
const LIMIT: Duration = Duration::from_secs(10);
/// The top of a config whose metrics and JSON access log (`access.log` beside it)
/// a test reads.
const OBSERVED: &str = "[runtime]\nworkers = 2\n[admin]\nbind = \"127.0.0.1:0\"\n\
                        [log]\naccess_log = \"access.log\"\nformat = \"json\"\n";

/// HAProxy as a child process, killed on drop, logging to `log`.
struct Haproxy {
    child: Child,
    log: UdpSocket,
    dir: tempdir::Dir,
}

impl Haproxy {
    /// Starts HAProxy on `body` (frontends and backends; their `bind fd@N` name the
    /// descriptors of `sockets`, which it inherits).
    async fn start(body: &str, sockets: Vec<std::net::TcpListener>) -> Haproxy {
        let log = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let cfg = format!(
            "global\n    log {} format raw local0 info\n\
             defaults\n    mode tcp\n    log global\n    timeout connect 5s\n    \
             timeout client 30s\n    timeout server 30s\n{body}",
            log.local_addr().unwrap()
        );
        let dir = tempdir::Dir::new();
        let path = dir.file("haproxy.cfg", &cfg);
        let stderr = std::fs::File::create(dir.0.join("stderr")).unwrap();
        let inherit = |on: bool| {
            use nix::fcntl::{fcntl, FcntlArg, FdFlag};
            for s in &sockets {
                let flags = if on {
                    FdFlag::empty()
                } else {
                    FdFlag::FD_CLOEXEC
                };
                fcntl(s.as_raw_fd(), FcntlArg::F_SETFD(flags)).unwrap();
            }
        };
        inherit(true);
        let child = Command::new(HAPROXY)
            .args(["-db", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("run /usr/sbin/haproxy (apt-get install -y haproxy)");
        // spawn returns once the child has exec'd: it holds its copies now.
        inherit(false);
        drop(sockets);
        Haproxy { child, log, dir }
    }

    /// The next log line of a client connection within `LIMIT`; panics (with
    /// HAProxy's stderr) without one. Lines of flowgate's own connections (its
    /// startup probe, from 127.0.0.1) are skipped.
    async fn line(&self) -> String {
        let mut buf = [0u8; 2048];
        loop {
            match tokio::time::timeout(LIMIT, self.log.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    let line = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                    if !line.contains("client=127.0.0.1:") {
                        return line;
                    }
                }
                _ => panic!(
                    "no HAProxy log line; its stderr:\n{}",
                    std::fs::read_to_string(self.dir.0.join("stderr")).unwrap_or_default()
                ),
            }
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A listening socket on loopback, port 0, for HAProxy to inherit.
fn socket() -> (std::net::TcpListener, SocketAddr) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// A connection to `to` from source address `src` (any port).
async fn connect_from(src: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{src}:0").parse().unwrap()).unwrap();
    tokio::time::timeout(LIMIT, s.connect(to))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Connects from `src` to `to`, reads an identity backend's name; returns it and
/// the client's own address.
async fn identity_from(src: &str, to: SocketAddr) -> (String, SocketAddr) {
    let s = connect_from(src, to).await;
    let me = s.local_addr().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(LIMIT, r.read_line(&mut line))
        .await
        .expect("identity line in time")
        .expect("read identity");
    assert!(
        !line.is_empty(),
        "closed without a backend name ({src} -> {to})"
    );
    (line.trim().to_string(), me)
}

/// The access log's JSON lines (the binary's `access.log`, beside its config).
fn access_log(fg: &Proc) -> Vec<serde_json::Value> {
    std::fs::read_to_string(fg.dir.0.join("access.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits until the access log holds `n` lines of `listener`, and returns them.
async fn log_lines(fg: &Proc, listener: &str, n: usize) -> Vec<serde_json::Value> {
    let of = || -> Vec<serde_json::Value> {
        access_log(fg)
            .into_iter()
            .filter(|v| v["listener"] == listener)
            .collect()
    };
    let ok = wait_until(LIMIT, || of().len() >= n).await;
    assert!(ok, "{n} access-log lines of {listener}; have {:?}", of());
    of()
}

/// `flowgate_connections_rejected_total{listener,reason}` from `/metrics`.
async fn rejected(admin: SocketAddr, listener: &str, reason: &str) -> f64 {
    let text = curl(admin, "GET", "/metrics", None, None).await.text;
    let want = format!(
        "flowgate_connections_rejected_total{{listener=\"{listener}\",reason=\"{reason}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn backends_list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A v2 header from `src` to `dst` (TCP) with TLVs `(type, value)` as given.
fn v2_header(src: SocketAddr, dst: SocketAddr, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    let mut b =
        Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst));
    for (kind, value) in tlvs {
        b = b.write_tlv(*kind, value).unwrap();
    }
    b.build().unwrap()
}

/// HAProxy in front, with `send-proxy-v2` and with `send-proxy`: flowgate takes the
/// address in the header as the client's. The access log names each client's own
/// address and port, and ip-hash sends each source where a direct connection from
/// the same source goes (while sources spread over the backends: were the peer's
/// address hashed, every connection through HAProxy would land on one backend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_in_front_the_header_names_the_client() {
    let backends = start_backends::<3>(Kind::Identity).await;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let fg = Proc::spawn(
        &format!(
            r#"
{OBSERVED}
[[listeners]]
name = "v2"
bind = "127.0.0.1:0"
pool = "p"
accept_proxy = "v2"

[[listeners]]
name = "v1"
bind = "127.0.0.1:0"
pool = "p"
accept_proxy = "v1"
proxy_trusted = ["127.0.0.1"]

[[listeners]]
name = "direct"
bind = "127.0.0.1:0"
pool = "p"

[[pools]]
name = "p"
algorithm = "ip-hash"
backends = [ {} ]
"#,
            backends_list(&addrs)
        ),
        &[],
    );
    let (s2, fe2) = socket();
    let (s1, fe1) = socket();
    let hap = Haproxy::start(
        &format!(
            "frontend fe2\n    bind fd@{}\n    default_backend to_v2\n\
             frontend fe1\n    bind fd@{}\n    default_backend to_v1\n\
             backend to_v2\n    server fg {} send-proxy-v2\n\
             backend to_v1\n    server fg {} send-proxy\n",
            s2.as_raw_fd(),
            s1.as_raw_fd(),
            fg.addr("v2"),
            fg.addr("v1"),
        ),
        vec![s2, s1],
    )
    .await;

    let sources: Vec<String> = (2..18).map(|i| format!("127.0.0.{i}")).collect();
    let mut picks: BTreeMap<String, String> = BTreeMap::new();
    let mut want: HashMap<&str, BTreeSet<SocketAddr>> = HashMap::new();
    for src in &sources {
        let (direct, me) = identity_from(src, fg.addr("direct")).await;
        want.entry("direct").or_default().insert(me);
        for (listener, fe) in [("v2", fe2), ("v2", fe2), ("v1", fe1)] {
            let (via, me) = identity_from(src, fe).await;
            assert_eq!(
                via, direct,
                "{src} through HAProxy to {listener} reached {via}, directly {direct}"
            );
            want.entry(listener).or_default().insert(me);
        }
        picks.insert(src.clone(), direct);
    }
    let spread: BTreeSet<&String> = picks.values().collect();
    assert!(spread.len() >= 2, "16 sources on one backend: {picks:?}");

    for (listener, clients) in &want {
        let lines = log_lines(&fg, listener, clients.len()).await;
        let logged: BTreeSet<SocketAddr> = lines
            .iter()
            .map(|v| v["client"].as_str().unwrap().parse().unwrap())
            .collect();
        assert_eq!(&logged, clients, "{listener}: clients in the access log");
        for v in &lines {
            let ip = v["client"].as_str().unwrap().split(':').next().unwrap();
            assert_eq!(v["backend"], picks[ip].as_str(), "{v}");
        }
    }
    for l in ["v2", "v1"] {
        assert_eq!(rejected(fg.admin(), l, "proxy_header").await, 0.0, "{l}");
    }
    drop(hap);
}

/// flowgate's `send_proxy` to HAProxy listeners with `accept-proxy`, which log the
/// client and destination they were told of (`%ci:%cp`, `%fi:%fp`), the unique id
/// and the authority: v2 and v1 name the client's own address and port and the
/// listener it reached; v2 makes up a 16-byte unique id, or
/// passes on the one a header in front of flowgate sent, with its authority, and
/// the client's bytes that came in the same segment as that header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_proxy_to_haproxy_names_the_client() {
    let echo = TestBackend::start(Kind::Echo).await;
    let (s2, hv2) = socket();
    let (s1, hv1) = socket();
    let format =
        "log-format \"fe=%f client=%ci:%cp dst=%fi:%fp uid=%[fc_pp_unique_id,hex] auth=%[fc_pp_authority]\"";
    let hap = Haproxy::start(
        &format!(
            "frontend pp_v2\n    bind fd@{}  accept-proxy\n    {format}\n    default_backend echo\n\
             frontend pp_v1\n    bind fd@{}  accept-proxy\n    {format}\n    default_backend echo\n\
             backend echo\n    server e {}\n",
            s2.as_raw_fd(),
            s1.as_raw_fd(),
            echo.addr,
        ),
        vec![s2, s1],
    )
    .await;
    let fg = Proc::spawn(
        &format!(
            r#"
[runtime]
workers = 1

[[listeners]]
name = "s2"
bind = "127.0.0.1:0"
pool = "hv2"

[[listeners]]
name = "s1"
bind = "127.0.0.1:0"
pool = "hv1"

[[listeners]]
name = "chain"
bind = "127.0.0.1:0"
pool = "hv2"
accept_proxy = "v2"

[[pools]]
name = "hv2"
send_proxy = "v2"
backends = [ {{ address = "{hv2}" }} ]

[[pools]]
name = "hv1"
send_proxy = "v1"
backends = [ {{ address = "{hv1}" }} ]
"#
        ),
        &[],
    );
    /// Sends `first` (in one write), then expects `echo` back, then closes.
    async fn exchange(mut s: TcpStream, first: &[u8], echo: &[u8]) {
        s.write_all(first).await.unwrap();
        let mut back = vec![0u8; echo.len()];
        tokio::time::timeout(LIMIT, s.read_exact(&mut back))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(back, echo);
    }

    let s = connect_from("127.0.0.5", fg.addr("s2")).await;
    let me = s.local_addr().unwrap();
    exchange(s, b"hello", b"hello").await;
    let line = hap.line().await;
    assert!(
        line.starts_with(&format!("fe=pp_v2 client={me} dst={} uid=", fg.addr("s2"))),
        "{line}"
    );
    let uid = line
        .split("uid=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert_eq!(uid.len(), 32, "16 random bytes in hex: {line}");
    assert!(line.ends_with("auth=-"), "{line}");

    let s = connect_from("127.0.0.6", fg.addr("s1")).await;
    let me = s.local_addr().unwrap();
    exchange(s, b"hello", b"hello").await;
    let line = hap.line().await;
    assert_eq!(
        line,
        format!("fe=pp_v1 client={me} dst={} uid=- auth=-", fg.addr("s1"))
    );

    // Through the chain: the header's client, unique id and authority go on, and so
    // does "early", sent in the same write as the header.
    let header = v2_header(
        "198.51.100.7:51000".parse().unwrap(),
        "203.0.113.1:443".parse().unwrap(),
        &[
            (0x02, b"api.example.com"),
            (0x04, b"\0\0\0"),
            (0x05, b"front-id-42"),
        ],
    );
    let s = connect_from("127.0.0.7", fg.addr("chain")).await;
    exchange(s, &[header, b"early".to_vec()].concat(), b"early").await;
    let line = hap.line().await;
    let uid: String = b"front-id-42".iter().map(|b| format!("{b:02X}")).collect();
    assert_eq!(
        line,
        format!(
            "fe=pp_v2 client=198.51.100.7:51000 dst=203.0.113.1:443 uid={uid} auth=api.example.com"
        )
    );
}

/// A raw backend reads what `send_proxy = "v2"` writes after an inbound v2 header
/// with TLVs: the inbound TLVs as sent but NOOP, a recomputed CRC32C, the header's
/// addresses, then the client's bytes intact (those sent with the header first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_proxy_v2_carries_the_inbound_tlvs_to_the_backend() {
    let raw = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fg = Proc::spawn(
        &format!(
            r#"
[runtime]
workers = 1

[[listeners]]
name = "l"
bind = "127.0.0.1:0"
pool = "p"
accept_proxy = "any"

[[pools]]
name = "p"
send_proxy = "v2"
backends = [ {{ address = "{}" }} ]
"#,
            raw.local_addr().unwrap()
        ),
        &[],
    );
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
    let mut header = v2_header(
        "[2001:db8::7]:4242".parse().unwrap(),
        "[2001:db8::1]:443".parse().unwrap(),
        &[
            (0x01, b"h2"),
            (0x04, b"pad"),
            (0xE3, b"vendor-data"),
            (0x05, b"uid-7"),
            (0x03, b"\0\0\0\0"),
        ],
    );
    let at = header.len() - 4;
    let sum = crc.checksum(&header);
    header[at..].copy_from_slice(&sum.to_be_bytes());

    let mut c = TcpStream::connect(fg.addr("l")).await.unwrap();
    c.write_all(&[&header[..], b"first"].concat())
        .await
        .unwrap();
    c.write_all(b" then more").await.unwrap();
    c.shutdown().await.unwrap();
    // flowgate's startup probe of the backend says LOCAL (its own connection): skip it.
    let got = loop {
        let (mut b, _) = tokio::time::timeout(LIMIT, raw.accept())
            .await
            .expect("flowgate connects")
            .unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(LIMIT, b.read_to_end(&mut got))
            .await
            .expect("the client's FIN passed on")
            .unwrap();
        let h = ppp::v2::Header::try_from(&got[..]).expect("a v2 header first");
        if h.command == ppp::v2::Command::Proxy {
            break got;
        }
        assert_eq!(got.len(), 16, "LOCAL, nothing else: {got:?}");
    };

    let h = ppp::v2::Header::try_from(&got[..]).expect("a v2 header first");
    assert_eq!(
        h.addresses,
        ppp::v2::Addresses::from((
            "[2001:db8::7]:4242".parse::<SocketAddr>().unwrap(),
            "[2001:db8::1]:443".parse::<SocketAddr>().unwrap()
        ))
    );
    let tlvs: Vec<(u8, Vec<u8>)> = h
        .tlvs()
        .map(|t| t.map(|t| (t.kind, t.value.to_vec())).unwrap())
        .collect();
    assert_eq!(
        tlvs[..3],
        [
            (0x01, b"h2".to_vec()),
            (0xE3, b"vendor-data".to_vec()),
            (0x05, b"uid-7".to_vec())
        ],
        "{tlvs:?}"
    );
    assert_eq!(tlvs.len(), 4, "{tlvs:?}");
    assert_eq!(tlvs[3].0, 0x03, "{tlvs:?}");
    let mut zeroed = h.as_bytes().to_vec();
    let at = zeroed.len() - 4;
    zeroed[at..].copy_from_slice(&[0; 4]);
    assert_eq!(tlvs[3].1, crc.checksum(&zeroed).to_be_bytes(), "CRC32C");
    assert_eq!(&got[h.len()..], b"first then more");
}

/// Bad headers close the connection and are counted, and the backend never sees
/// those connections: malformed, a version the listener does not take, truncated
/// (the peer closes), too long, from an untrusted peer (even with a good header),
/// and one that never completes (closed at `proxy_header_timeout`, not before). The
/// bad headers go to a listener whose timeout (60s) is far beyond the test's wait,
/// so being closed at all shows they were refused for their bytes, with no clock;
/// the header that never completes goes to a second listener with a 3s timeout. A
/// header that trickles in one byte at a time is taken, and so are client bytes
/// sent in the same write as the header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_headers_are_closed_and_counted() {
    let echo = TestBackend::start(Kind::Echo).await;
    let fg = Proc::spawn(
        &format!(
            r#"
{OBSERVED}
[[listeners]]
name = "pp"
bind = "127.0.0.1:0"
pool = "p"
accept_proxy = "v2"
proxy_trusted = ["127.0.0.0/25"]
proxy_header_timeout = "60s"

[[listeners]]
name = "slow"
bind = "127.0.0.1:0"
pool = "p"
accept_proxy = "v2"
proxy_header_timeout = "3s"

[[pools]]
name = "p"
backends = [ {{ address = "{}" }} ]
"#,
            echo.addr
        ),
        &[],
    );
    let addr = fg.addr("pp");
    let good = v2_header(
        "198.51.100.7:51000".parse().unwrap(),
        "203.0.113.1:443".parse().unwrap(),
        &[],
    );
    let mut long = v2_header(
        "198.51.100.7:51000".parse().unwrap(),
        "203.0.113.1:443".parse().unwrap(),
        &[(0xE0, &[7u8; 5000][..])],
    );
    long.truncate(64); // its length field says 5 KiB: refused from the first 16 bytes

    /// Whether the connection is closed (EOF or reset) within `limit`.
    async fn closed(s: &mut TcpStream, limit: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(limit, s.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    // flowgate's startup probe of the backend (a pool without health checks).
    let seen = || echo.accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(wait_until(LIMIT, || seen() == 1).await, "the startup probe");

    let cases: Vec<(&str, &str, Vec<u8>, bool)> = vec![
        (
            "not a header",
            "127.0.0.2",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            false,
        ),
        (
            "v1, listener takes v2",
            "127.0.0.2",
            b"PROXY TCP4 198.51.100.7 203.0.113.1 1 2\r\n".to_vec(),
            false,
        ),
        (
            "bad signature",
            "127.0.0.2",
            b"\r\n\r\n\0\r\nQUIX\n!\x11\0\x0c".to_vec(),
            false,
        ),
        ("truncated", "127.0.0.2", good[..20].to_vec(), true),
        ("too long", "127.0.0.2", long, false),
        (
            "untrusted",
            "127.0.0.200",
            [&good[..], b"hello"].concat(),
            false,
        ),
    ];
    for (what, src, bytes, fin) in &cases {
        let mut s = connect_from(src, addr).await;
        s.write_all(bytes).await.unwrap();
        if *fin {
            s.shutdown().await.unwrap();
        }
        // Within LIMIT (10s), so not by the 60s timeout.
        assert!(closed(&mut s, LIMIT).await, "{what}: closed");
    }
    // Never completes: closed by proxy_header_timeout (3s), not before (a lower
    // bound only: a timer never fires early).
    let t0 = Instant::now();
    let mut s = connect_from("127.0.0.3", fg.addr("slow")).await;
    s.write_all(&good[..15]).await.unwrap();
    assert!(closed(&mut s, LIMIT).await, "slow header closed");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(2950), "closed after {took:?}");

    let admin = fg.admin();
    assert_eq!(rejected(admin, "pp", "proxy_header").await, 6.0);
    assert_eq!(rejected(admin, "slow", "proxy_header").await, 1.0);
    assert_eq!(seen(), 1, "the backend saw none of them");

    // One byte at a time (each its own segment, TCP_NODELAY), then data: taken.
    let mut s = connect_from("127.0.0.4", addr).await;
    s.set_nodelay(true).unwrap();
    for b in &good {
        s.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(LIMIT, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"ping");
    drop(s);
    // The header and the client's first bytes in one write: the bytes go on intact.
    let mut s = connect_from("127.0.0.4", addr).await;
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&[&good[..], &payload].concat()).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(LIMIT, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, payload);
    drop(s);

    assert_eq!(rejected(admin, "pp", "proxy_header").await, 6.0);
    let lines = log_lines(&fg, "pp", 8).await;
    let refused = lines
        .iter()
        .filter(|v| v["reason"] == "proxy_header")
        .count();
    assert_eq!(refused, 6, "{lines:?}");
    assert_eq!(log_lines(&fg, "slow", 1).await[0]["reason"], "proxy_header");
    let served: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["reason"] != "proxy_header")
        .collect();
    assert_eq!(served.len(), 2, "{lines:?}");
    for v in served {
        assert_eq!(v["client"], "198.51.100.7:51000", "{v}");
    }
    // to_backend counts the bytes that came with the header.
    assert!(lines.iter().any(|v| v["to_backend"] == 3000), "{lines:?}");
}

/// `accept_proxy` and `send_proxy` follow a reload (SIGHUP) like the other
/// listener and pool keys: new connections get the new settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_turns_the_proxy_protocol_on_and_off() {
    let raw = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let text = |listener: &str, pool: &str| {
        format!(
            "[runtime]\nworkers = 1\n\n\
             [[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n{listener}\n\n\
             [[pools]]\nname = \"p\"\n{pool}\nbackends = [ {{ address = \"{}\" }} ]\n",
            raw.local_addr().unwrap()
        )
    };
    let fg = Proc::spawn(&text("", ""), &[]);
    let cfg = fg.dir.0.join("flowgate.toml");
    let addr = fg.addr("l");

    /// Connects from 127.0.0.9, writes `first`, closes; returns what the backend
    /// read, or `None` if no connection with bytes reached it within `wait`
    /// (flowgate's startup probe, which sends none, is skipped). Cases that must
    /// get through wait `LIMIT`; the refused one waits 2 s, a window that can only
    /// make it pass, never fail, on a slow machine.
    async fn through(
        raw: &TcpListener,
        addr: SocketAddr,
        first: &[u8],
        wait: Duration,
    ) -> Option<Vec<u8>> {
        let mut c = connect_from("127.0.0.9", addr).await;
        c.write_all(first).await.unwrap();
        c.shutdown().await.unwrap();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let Ok(Ok((mut b, _))) = tokio::time::timeout_at(deadline, raw.accept()).await else {
                return None;
            };
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            if !got.is_empty() {
                return Some(got);
            }
        }
    }

    assert_eq!(
        through(&raw, addr, b"plain", LIMIT).await.unwrap(),
        b"plain"
    );
    std::fs::write(&cfg, text("accept_proxy = \"v1\"", "send_proxy = \"v1\"")).unwrap();
    fg.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        fg.logged("configuration reloaded", LIMIT).await,
        "{}",
        fg.log()
    );
    assert_eq!(
        through(&raw, addr, b"plain", Duration::from_secs(2)).await,
        None,
        "no header: refused"
    );
    let got = through(
        &raw,
        addr,
        b"PROXY TCP4 198.51.100.7 203.0.113.1 7 443\r\nx",
        LIMIT,
    )
    .await
    .unwrap();
    assert_eq!(got, b"PROXY TCP4 198.51.100.7 203.0.113.1 7 443\r\nx");

    std::fs::write(&cfg, text("", "")).unwrap();
    fg.signal(nix::sys::signal::Signal::SIGHUP);
    let reloads = || fg.log().matches("configuration reloaded").count();
    assert!(wait_until(LIMIT, || reloads() >= 2).await, "{}", fg.log());
    assert_eq!(
        through(&raw, addr, b"plain", LIMIT).await.unwrap(),
        b"plain"
    );
}

/// Health probes of a `send_proxy` pool start with a header that names no client
/// (v2 LOCAL, v1 UNKNOWN), as HAProxy's checks do, so a backend that requires one
/// (HAProxy `accept-proxy`, serving HTTP) is up; the same backend probed without
/// (no `send_proxy`) stays down; a probe of another `port` sends none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_of_a_send_proxy_pool_send_a_local_header() {
    let (s_pp, pp) = socket();
    let (s_plain, plain) = socket();
    let ok = "http-request return status 200 content-type text/plain string ok";
    let _hap = Haproxy::start(
        &format!(
            "frontend needs_header\n    mode http\n    bind fd@{} accept-proxy\n    {ok}\n\
             frontend plain\n    mode http\n    bind fd@{}\n    {ok}\n",
            s_pp.as_raw_fd(),
            s_plain.as_raw_fd(),
        ),
        vec![s_pp, s_plain],
    )
    .await;
    let pool = |name: &str, send: &str, port: &str| {
        format!(
            "[[pools]]\nname = \"{name}\"\nsend_proxy = \"{send}\"\n\
             backends = [ {{ address = \"{pp}\" }} ]\n\
             [pools.health_check]\nkind = \"http\"\ninterval = \"200ms\"\nrise = 1\nfall = 1\n{port}\n\n"
        )
    };
    let fg = Proc::spawn(
        &format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n\n\
             [[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"v2\"\n\n{}{}{}{}",
            pool("v2", "v2", ""),
            pool("v1", "v1", ""),
            pool("off", "off", ""),
            pool("other_port", "v2", &format!("port = {}", plain.port())),
        ),
        &[],
    );
    let admin = fg.admin();
    let state = |pools: &serde_json::Value, name: &str| {
        let b = &backends_of(pools, name)[0];
        (
            b["state"].as_str().unwrap().to_string(),
            b["last_check"]["ok"].as_bool(),
        )
    };
    let deadline = Instant::now() + LIMIT;
    loop {
        let pools = get_pools(admin).await;
        let up = ["v2", "v1", "other_port"].map(|p| state(&pools, p).0 == "up");
        let off = state(&pools, "off");
        if up.iter().all(|u| *u) && off.1 == Some(false) {
            assert_ne!(off.0, "up", "{pools:#}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "v2, v1 and other_port up, off failing: {pools:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The header goes out with the connect (sent before the handshake is reported
/// done): a backend that refuses is skipped and the next one gets the header
/// whole, and a backend whose accept queue is full (its SYNs dropped, so the
/// connect is still in progress when flowgate would send) gets it once the
/// handshake completes, followed by the client's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_reaches_a_backend_that_answers_late_and_skips_a_refusing_one() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
    // Backlog 0: one connection fills the accept queue; the next SYNs are dropped
    // until it is accepted (the client retransmits after its 1 s RTO).
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    full.listen(0).unwrap();
    let full_addr = full.local_addr().unwrap().as_socket().unwrap();
    let fg = Proc::spawn(
        &format!(
            r#"
[runtime]
workers = 1

[[listeners]]
name = "skip"
bind = "127.0.0.1:0"
pool = "skip"

[[listeners]]
name = "late"
bind = "127.0.0.1:0"
pool = "late"
connect_timeout = "30s"

[[pools]]
name = "skip"
send_proxy = "v1"
algorithm = "round-robin"
connect_attempts = 2
backends = [ {{ address = "{dead}" }}, {{ address = "{}" }} ]

[[pools]]
name = "late"
send_proxy = "v1"
backends = [ {{ address = "{full_addr}" }} ]
"#,
            live.local_addr().unwrap()
        ),
        &[],
    );
    /// The first connection to `l` whose header names `client`, read to its end.
    /// Every connection is accepted at once and read on its own, so the accept
    /// queue never fills again: flowgate's startup probe (which says UNKNOWN) and
    /// the connections of other clients are skipped.
    async fn from_client(l: &TcpListener, client: SocketAddr) -> String {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let want = format!("PROXY TCP4 {} ", client.ip());
        loop {
            tokio::select! {
                a = tokio::time::timeout(LIMIT, l.accept()) => {
                    let (mut b, _) = a.expect("flowgate connects").unwrap();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let mut got = Vec::new();
                        let _ = tokio::time::timeout(LIMIT, b.read_to_end(&mut got)).await;
                        let _ = tx.send(String::from_utf8_lossy(&got).into_owned());
                    });
                }
                Some(got) = rx.recv() => if got.starts_with(&want) {
                    return got;
                },
            }
        }
    }

    /// A v1 header from `client` to `to`, then `bytes`.
    fn v1_then(client: SocketAddr, to: SocketAddr, bytes: &str) -> String {
        let (c, t) = (client, to);
        format!(
            "PROXY TCP4 {} {} {} {}\r\n{bytes}",
            c.ip(),
            t.ip(),
            c.port(),
            t.port()
        )
    }

    // Round-robin from the dead backend or the live one: two clients, so one of
    // them is refused first whichever way the rotation starts.
    for i in 0..2 {
        let mut c = connect_from(&format!("127.0.0.{}", 20 + i), fg.addr("skip")).await;
        let me = c.local_addr().unwrap();
        c.write_all(b"payload").await.unwrap();
        c.shutdown().await.unwrap();
        let got = from_client(&live, me).await;
        assert_eq!(got, v1_then(me, fg.addr("skip"), "payload"));
    }

    // flowgate's startup connect fills the queue (it is never accepted): wait
    // for it, so that nothing but the client's connection retries after it.
    let queued = || {
        let out = std::process::Command::new("ss")
            .args(["-ltnH", &format!("sport = :{}", full_addr.port())])
            .output()
            .expect("ss (iproute2)");
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        out.split_whitespace()
            .nth(1)
            .and_then(|q| q.parse::<u32>().ok())
            == Some(1)
    };
    assert!(
        wait_until(LIMIT, queued).await,
        "flowgate's startup connect never reached the backend"
    );
    let mut c = connect_from("127.0.0.30", fg.addr("late")).await;
    let me = c.local_addr().unwrap();
    c.write_all(b"early bytes").await.unwrap();
    // flowgate's connect is in SYN_SENT now (its SYN dropped); free the queue.
    tokio::time::sleep(Duration::from_millis(300)).await;
    full.set_nonblocking(true).unwrap();
    let full = TcpListener::from_std(std::net::TcpListener::from(full)).unwrap();
    c.write_all(b", late bytes").await.unwrap();
    c.shutdown().await.unwrap();
    let got = from_client(&full, me).await;
    assert_eq!(got, v1_then(me, fg.addr("late"), "early bytes, late bytes"));
}
