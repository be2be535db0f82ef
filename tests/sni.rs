//! TLS passthrough routed by SNI (issue 13) on the real binary: `openssl s_server`
//! backends, each with its own self-signed certificate, behind one flowgate port;
//! `openssl s_client -servername` through it, and the certificate subject it prints
//! says which backend answered. flowgate never decrypts: the client's ClientHello
//! reaches the backend byte for byte, which a recording backend checks for a
//! ClientHello sent two bytes at a time.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(10);
/// The top of a config whose metrics and JSON access log (`access.log` beside it)
/// a test reads.
const OBSERVED: &str = "[runtime]\nworkers = 2\n[admin]\nbind = \"127.0.0.1:0\"\n\
                        [log]\naccess_log = \"access.log\"\nformat = \"json\"\n";

/// `openssl s_server` with a self-signed certificate for `CN=<cn>`, killed on drop.
struct TlsBackend {
    child: Child,
    /// s_server ends at the end of its stdin: held open.
    _stdin: std::process::ChildStdin,
    addr: SocketAddr,
    _dir: tempdir::Dir,
}

impl TlsBackend {
    fn start(cn: &str) -> TlsBackend {
        let dir = tempdir::Dir::new();
        let (key, cert) = (dir.0.join("key.pem"), dir.0.join("cert.pem"));
        let ok = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .arg("-subj")
            .arg(format!("/CN={cn}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run openssl (apt-get install -y openssl)");
        assert!(ok.success(), "openssl req");
        // Port 0: s_server prints the address it bound ("ACCEPT 127.0.0.1:PORT").
        let mut child = Command::new("openssl")
            .args(["s_server", "-accept", "127.0.0.1:0", "-cert"])
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run openssl s_server");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(a) = line.strip_prefix("ACCEPT ") {
                    let _ = tx.send(a.trim().to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(LIMIT)
            .expect("s_server's ACCEPT line")
            .parse()
            .unwrap();
        TlsBackend {
            child,
            _stdin: stdin,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `openssl s_client` to `to` (with `-servername name`, or `-noservername`)
/// and returns the CN of the certificate it was shown, `None` when the handshake
/// never got that far (flowgate closed the connection).
async fn subject(to: SocketAddr, name: Option<&str>) -> Option<String> {
    let mut cmd = tokio::process::Command::new("openssl");
    cmd.args(["s_client", "-connect", &to.to_string()]);
    match name {
        Some(n) => cmd.args(["-servername", n]),
        None => cmd.arg("-noservername"),
    };
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(LIMIT, out)
        .await
        .expect("s_client in time")
        .expect("run openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("subject=CN = "))
        .map(|s| s.trim().to_string())
}

/// The access log's JSON lines of `listener`, once there are `n`.
async fn log_lines(fg: &Proc, listener: &str, n: usize) -> Vec<serde_json::Value> {
    let of = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(fg.dir.0.join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["listener"] == listener)
            .collect()
    };
    let ok = wait_until(LIMIT, || of().len() >= n).await;
    assert!(ok, "{n} access-log lines of {listener}; have {:?}", of());
    of()
}

/// The value of the `/metrics` line that starts with `series` (0 when absent).
async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let text = curl(admin, "GET", "/metrics", None, None).await.text;
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn rejected_sni(listener: &str) -> String {
    format!("flowgate_connections_rejected_total{{listener=\"{listener}\",reason=\"sni\"}}")
}

/// Three certificates behind one port: an exact name, a wildcard (listed first,
/// and still beaten by the exact name), and the listener's pool for no SNI, a
/// bare domain the wildcard does not cover, and other names. The access log names
/// the SNI of each client; `flowgate_sni_routed_total` counts the routed ones per
/// pool; the API lists the routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_name_reaches_the_backend_whose_certificate_it_gets() {
    let (api, wild, other) = (
        TlsBackend::start("api"),
        TlsBackend::start("wild"),
        TlsBackend::start("other"),
    );
    let fg = Proc::spawn(
        &format!(
            "{OBSERVED}\
             [[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\npool = \"other\"\n\
             [[listeners.sni_routes]]\nserver_names = [\"*.example.com\"]\npool = \"wild\"\n\
             [[listeners.sni_routes]]\nserver_names = [\"api.example.com\", \"api.example.org\"]\npool = \"api\"\n\
             [[pools]]\nname = \"api\"\nbackends = [{{ address = \"{}\" }}]\n\
             [[pools]]\nname = \"wild\"\nbackends = [{{ address = \"{}\" }}]\n\
             [[pools]]\nname = \"other\"\nbackends = [{{ address = \"{}\" }}]\n",
            api.addr, wild.addr, other.addr
        ),
        &[],
    );
    let edge = fg.addr("edge");
    let cases: [(Option<&str>, &str); 7] = [
        (Some("api.example.com"), "api"),
        (Some("API.Example.ORG"), "api"),
        (Some("web.example.com"), "wild"),
        (Some("a.b.example.com"), "wild"),
        (Some("example.com"), "other"),
        (Some("unknown.test"), "other"),
        (None, "other"),
    ];
    for (name, want) in cases {
        assert_eq!(
            subject(edge, name).await.as_deref(),
            Some(want),
            "{name:?}; log:\n{}",
            fg.log()
        );
    }
    let lines = log_lines(&fg, "edge", cases.len()).await;
    let mut seen: Vec<(String, String)> = lines
        .iter()
        .map(|v| {
            (
                v["sni"].as_str().unwrap_or("-").to_string(),
                v["pool"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    seen.sort();
    let mut want: Vec<(String, String)> = [
        ("-", "other"),
        ("a.b.example.com", "wild"),
        ("api.example.com", "api"),
        ("api.example.org", "api"),
        ("example.com", "other"),
        ("unknown.test", "other"),
        ("web.example.com", "wild"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    want.sort();
    assert_eq!(seen, want, "{lines:?}");
    assert!(lines.iter().all(|v| v["reason"] != "sni"), "{lines:?}");
    let admin = fg.admin();
    let routed =
        |pool: &str| format!("flowgate_sni_routed_total{{listener=\"edge\",pool=\"{pool}\"}}");
    assert_eq!(metric(admin, &routed("api")).await, 2.0);
    assert_eq!(metric(admin, &routed("wild")).await, 2.0);
    assert_eq!(metric(admin, &rejected_sni("edge")).await, 0.0);
    let pools = get_pools(admin).await;
    let l = &pools["listeners"][0];
    assert_eq!(
        l["sni_routes"][1]["server_names"][1], "api.example.org",
        "{l}"
    );
    assert_eq!(l["sni_routes"][1]["pool"], "api", "{l}");
    assert_eq!(l["rejected"]["sni"], 0, "{l}");
}

/// `sni_required`: a client without SNI, or with a name no route takes, is closed
/// (s_client sees no certificate) and counted as `sni`; a routed name still gets
/// through. Without a listener pool the same happens without `sni_required`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_clients_are_closed_when_sni_is_required_or_there_is_no_pool() {
    let (api, other) = (TlsBackend::start("api"), TlsBackend::start("other"));
    let fg = Proc::spawn(
        &format!(
            "{OBSERVED}\
             [[listeners]]\nname = \"strict\"\nbind = \"127.0.0.1:0\"\npool = \"other\"\nsni_required = true\n\
             [[listeners.sni_routes]]\nserver_names = [\"api.example.com\"]\npool = \"api\"\n\
             [[listeners]]\nname = \"nopool\"\nbind = \"127.0.0.1:0\"\n\
             [[listeners.sni_routes]]\nserver_names = [\"api.example.com\"]\npool = \"api\"\n\
             [[pools]]\nname = \"api\"\nbackends = [{{ address = \"{}\" }}]\n\
             [[pools]]\nname = \"other\"\nbackends = [{{ address = \"{}\" }}]\n",
            api.addr, other.addr
        ),
        &[],
    );
    for listener in ["strict", "nopool"] {
        let to = fg.addr(listener);
        assert_eq!(
            subject(to, Some("api.example.com")).await.as_deref(),
            Some("api")
        );
        assert_eq!(subject(to, None).await, None, "{listener}: no SNI");
        assert_eq!(
            subject(to, Some("www.example.com")).await,
            None,
            "{listener}"
        );
        let lines = log_lines(&fg, listener, 3).await;
        let refused: Vec<_> = lines.iter().filter(|v| v["reason"] == "sni").collect();
        assert_eq!(refused.len(), 2, "{lines:?}");
        assert!(
            refused.iter().any(|v| v["sni"] == "www.example.com"),
            "{lines:?}"
        );
        assert!(refused.iter().any(|v| v["sni"].is_null()), "{lines:?}");
        assert!(refused.iter().all(|v| v["backend"].is_null()), "{lines:?}");
        assert_eq!(metric(fg.admin(), &rejected_sni(listener)).await, 2.0);
    }
}

/// A listener that records every connection's bytes (until the client closes).
struct Recorder {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Recorder {
    async fn start() -> Recorder {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let got: Arc<Mutex<Vec<Vec<u8>>>> = Default::default();
        let g = got.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let g = g.clone();
                tokio::spawn(async move {
                    let i = {
                        let mut v = g.lock().unwrap();
                        v.push(Vec::new());
                        v.len() - 1
                    };
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        g.lock().unwrap()[i].extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Recorder { addr, got }
    }

    fn connections(&self) -> Vec<Vec<u8>> {
        self.got.lock().unwrap().clone()
    }
}

/// What `openssl s_client -servername name` sends first: its ClientHello.
async fn captured_hello(name: &str) -> Vec<u8> {
    let rec = Recorder::start().await;
    let mut client = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &rec.addr.to_string(),
            "-servername",
            name,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run openssl s_client");
    // The hello is one write; it is whole once its records are.
    let whole = |b: &[u8]| b.len() > 5 && b.len() >= 5 + u16::from_be_bytes([b[3], b[4]]) as usize;
    let ok = wait_until(LIMIT, || {
        rec.connections().first().is_some_and(|b| whole(b))
    })
    .await;
    assert!(ok, "no ClientHello from s_client");
    let _ = client.kill().await;
    let hello = rec.connections().remove(0);
    assert_eq!(hello[0], 0x16, "a handshake record");
    hello
}

/// A ClientHello sent two bytes at a time (so cut inside its record header and
/// everywhere else): flowgate waits for all of it, routes by its name, and the
/// backend gets exactly the bytes the client sent, behind a PROXY v2 header whose
/// PP2_TYPE_AUTHORITY is the SNI (the chosen pool's `send_proxy`). Bytes the
/// client sends after the hello follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_client_hello_reaches_the_backend_whole() {
    let hello = captured_hello("web.example.com").await;
    let (wild, other) = (Recorder::start().await, Recorder::start().await);
    let fg = Proc::spawn(
        &format!(
            "{OBSERVED}\
             [[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\npool = \"other\"\n\
             [[listeners.sni_routes]]\nserver_names = [\"*.example.com\"]\npool = \"wild\"\n\
             [[pools]]\nname = \"wild\"\nsend_proxy = \"v2\"\nbackends = [{{ address = \"{}\" }}]\n\
             [[pools]]\nname = \"other\"\nbackends = [{{ address = \"{}\" }}]\n",
            wild.addr, other.addr
        ),
        &[],
    );
    let mut c = TcpStream::connect(fg.addr("edge")).await.unwrap();
    c.set_nodelay(true).unwrap();
    for chunk in hello.chunks(2) {
        c.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    c.write_all(b"after").await.unwrap();
    let want_len = hello.len() + 5;
    let payload = |b: &[u8]| -> Option<Vec<u8>> {
        let h = ppp::v2::Header::try_from(b).ok()?;
        Some(b[h.len()..].to_vec())
    };
    let ok = wait_until(LIMIT, || {
        wild.connections()
            .first()
            .and_then(|b| payload(b))
            .is_some_and(|p| p.len() >= want_len)
    })
    .await;
    assert!(
        ok,
        "the backend got {:?}; log:\n{}",
        wild.connections(),
        fg.log()
    );
    let got = wild.connections().remove(0);
    let header = ppp::v2::Header::try_from(&got[..]).unwrap();
    let authority: Vec<Vec<u8>> = header
        .tlvs()
        .flatten()
        .filter(|t| t.kind == ppp::v2::Type::Authority as u8)
        .map(|t| t.value.to_vec())
        .collect();
    assert_eq!(authority, [b"web.example.com".to_vec()]);
    let mut want = hello.clone();
    want.extend_from_slice(b"after");
    assert_eq!(
        &got[header.len()..],
        &want[..],
        "the bytes behind the header"
    );
    // (The startup probe of the listener's pool may have connected, saying nothing.)
    assert!(other.connections().iter().all(|c| c.is_empty()));
    drop(c);
    let lines = log_lines(&fg, "edge", 1).await;
    assert_eq!(lines[0]["sni"], "web.example.com");
    assert_eq!(lines[0]["pool"], "wild");
    assert_eq!(lines[0]["to_backend"], want.len() as u64, "{lines:?}");
}

/// A listener with `sni_routes` closes plain HTTP at once, though it has a pool,
/// and a client that sends nothing once `proxy_header_timeout` has passed; both are
/// counted as `sni`, and no backend hears of either. "At once" is shown without a
/// clock: that listener's timeout (60s) is far beyond the test's wait, so only the
/// bytes can have closed it. The silent client goes to a second listener whose
/// timeout is 1s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_and_silence_are_closed_and_counted() {
    let backend = Recorder::start().await;
    let fg = Proc::spawn(
        &format!(
            "{OBSERVED}\
             [[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\
             proxy_header_timeout = \"60s\"\n\
             [[listeners.sni_routes]]\nserver_names = [\"api.example.com\"]\npool = \"p\"\n\
             [[listeners]]\nname = \"quiet\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\
             proxy_header_timeout = \"1s\"\n\
             [[listeners.sni_routes]]\nserver_names = [\"api.example.com\"]\npool = \"p\"\n\
             [[pools]]\nname = \"p\"\nbackends = [{{ address = \"{}\" }}]\n",
            backend.addr
        ),
        &[],
    );
    let edge = fg.addr("edge");

    let mut http = BufReader::new(TcpStream::connect(edge).await.unwrap());
    http.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut http, LIMIT).await,
        "plain HTTP left open (for the 60s timeout?)"
    );

    let mut silent = BufReader::new(TcpStream::connect(fg.addr("quiet")).await.unwrap());
    let t0 = Instant::now();
    assert!(
        closed_within(&mut silent, LIMIT).await,
        "silent client left open"
    );
    // A lower bound only: a timer never fires early.
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");

    for listener in ["edge", "quiet"] {
        let lines = log_lines(&fg, listener, 1).await;
        assert!(
            lines
                .iter()
                .all(|v| v["reason"] == "sni" && v["sni"].is_null()),
            "{lines:?}"
        );
    }
    let admin = fg.admin();
    assert_eq!(metric(admin, &rejected_sni("edge")).await, 1.0);
    assert_eq!(metric(admin, &rejected_sni("quiet")).await, 1.0);
    // The route's counter is there from the start, at 0.
    let text = curl(admin, "GET", "/metrics", None, None).await.text;
    assert!(
        text.contains("flowgate_sni_routed_total{listener=\"edge\",pool=\"p\"} 0"),
        "{text}"
    );
    // (The startup probe may have connected, saying nothing.)
    assert!(
        backend.connections().iter().all(|c| c.is_empty()),
        "the backend heard from a client"
    );
}

/// `sni_routes` follow a reload (SIGHUP) like the other listener keys: a name moves
/// to another pool for new connections, and the API shows the new routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_a_name_to_another_pool() {
    let (api, other) = (TlsBackend::start("api"), TlsBackend::start("other"));
    let text = |pool: &str| {
        format!(
            "{OBSERVED}\
             [[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\npool = \"other\"\n\
             [[listeners.sni_routes]]\nserver_names = [\"api.example.com\"]\npool = \"{pool}\"\n\
             [[pools]]\nname = \"api\"\nbackends = [{{ address = \"{}\" }}]\n\
             [[pools]]\nname = \"other\"\nbackends = [{{ address = \"{}\" }}]\n",
            api.addr, other.addr
        )
    };
    let fg = Proc::spawn(&text("api"), &[]);
    let edge = fg.addr("edge");
    assert_eq!(
        subject(edge, Some("api.example.com")).await.as_deref(),
        Some("api")
    );
    std::fs::write(fg.dir.0.join("flowgate.toml"), text("other")).unwrap();
    fg.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        fg.logged("configuration reloaded", LIMIT).await,
        "{}",
        fg.log()
    );
    assert_eq!(
        subject(edge, Some("api.example.com")).await.as_deref(),
        Some("other")
    );
    let pools = get_pools(fg.admin()).await;
    assert_eq!(
        pools["listeners"][0]["sni_routes"][0]["pool"], "other",
        "{pools}"
    );
}

/// Behind a balancer that sends a PROXY header: the ClientHello's first bytes come
/// in the header's segment, the rest later. The backend gets a v2 header naming the
/// client from the inbound header and the SNI as authority, then the hello whole;
/// the access log names that client and the SNI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_header_the_hello_and_the_client_both_come_through() {
    let hello = captured_hello("api.example.com").await;
    let api = Recorder::start().await;
    let fg = Proc::spawn(
        &format!(
            "{OBSERVED}\
             [[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\naccept_proxy = \"v1\"\n\
             [[listeners.sni_routes]]\nserver_names = [\"api.example.com\"]\npool = \"api\"\n\
             [[pools]]\nname = \"api\"\nsend_proxy = \"v2\"\nbackends = [{{ address = \"{}\" }}]\n",
            api.addr
        ),
        &[],
    );
    let mut c = TcpStream::connect(fg.addr("edge")).await.unwrap();
    c.set_nodelay(true).unwrap();
    let mut first = b"PROXY TCP4 198.51.100.7 203.0.113.1 51000 443\r\n".to_vec();
    first.extend_from_slice(&hello[..10]);
    c.write_all(&first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.write_all(&hello[10..]).await.unwrap();
    let payload_len = |b: &[u8]| -> Option<usize> {
        let h = ppp::v2::Header::try_from(b).ok()?;
        Some(b.len() - h.len())
    };
    let ok = wait_until(LIMIT, || {
        api.connections()
            .iter()
            .any(|b| payload_len(b).is_some_and(|n| n >= hello.len()))
    })
    .await;
    assert!(
        ok,
        "the backend got {:?}; log:\n{}",
        api.connections(),
        fg.log()
    );
    let got = api
        .connections()
        .into_iter()
        .find(|b| !b.is_empty())
        .unwrap();
    let header = ppp::v2::Header::try_from(&got[..]).unwrap();
    match header.addresses {
        ppp::v2::Addresses::IPv4(a) => {
            assert_eq!(a.source_address.to_string(), "198.51.100.7");
            assert_eq!(a.source_port, 51000);
        }
        other => panic!("{other:?}"),
    }
    let authority: Vec<Vec<u8>> = header
        .tlvs()
        .flatten()
        .filter(|t| t.kind == ppp::v2::Type::Authority as u8)
        .map(|t| t.value.to_vec())
        .collect();
    assert_eq!(authority, [b"api.example.com".to_vec()]);
    assert_eq!(&got[header.len()..], &hello[..]);
    drop(c);
    let lines = log_lines(&fg, "edge", 1).await;
    assert_eq!(lines[0]["client"], "198.51.100.7:51000", "{lines:?}");
    assert_eq!(lines[0]["sni"], "api.example.com", "{lines:?}");
}
