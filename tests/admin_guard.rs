//! The admin API against an attacker (issue 10): slow bodies that used to pin
//! memory, connection floods, cross-site and DNS-rebinding requests from a browser,
//! and the small protocol courtesies (`WWW-Authenticate`, `Allow`). Also: a second
//! flowgate with the same config refuses to start instead of sharing the ports.
//!
//! Real sockets and the real binary; curl as the client where one is enough.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIVENESS: Duration = Duration::from_secs(20);

/// A 405 that says, in `Allow`, which method the path takes (`curl -i` output).
fn assert_not_allowed(r: &ApiReply, allow: &str) {
    assert_eq!(r.status, 405, "{r:?}");
    let header = format!("allow: {allow}");
    assert!(r.text.to_ascii_lowercase().contains(&header), "{}", r.text);
}

fn cfg(backend: SocketAddr, admin_extra: &str) -> String {
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n{admin_extra}\n\n\
         [[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n\
         [[pools]]\nname = \"p\"\nbackends = [ {{ address = \"{backend}\" }} ]\n"
    )
}

/// 50 clients announce a 64 KiB body and send it one byte per packet. Before, every
/// received byte pinned a read buffer (about 4 KiB each: 50 clients took 1 GB).
/// Now a GET with a body is refused at once, and a PUT's body is copied into one
/// buffer of at most 64 KiB: the process grows by a few MiB at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_do_not_grow_memory() {
    let be = TestBackend::start(Kind::Identity).await;
    let fg = Proc::spawn(&cfg(be.addr, "request_timeout = \"30s\""), &[]);
    let admin = fg.admin();
    let before = rss_kib(fg.pid());
    const CLIENTS: usize = 50;
    const BYTES: usize = 1500;
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(admin).await.unwrap();
            s.set_nodelay(true).unwrap();
            let head = if i % 2 == 0 {
                "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 65536\r\n\r\n"
                    .to_string()
            } else {
                "PUT /api/v1/pools/p/backends/x/weight HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                 Content-Type: application/json\r\nContent-Length: 65536\r\n\r\n"
                    .to_string()
            };
            s.write_all(head.as_bytes()).await.unwrap();
            for _ in 0..BYTES {
                if s.write_all(b" ").await.is_err() {
                    break; // refused and closed: that is the point for GETs
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            s
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        held.push(t.await.unwrap());
    }
    // Every byte has been sent; the PUTs' connections are still open.
    let peak = rss_kib(fg.pid());
    let growth = peak.saturating_sub(before);
    eprintln!("RSS {before} KiB -> {peak} KiB with {CLIENTS} slow bodies of {BYTES} bytes");
    assert!(
        growth < 16 * 1024,
        "RSS grew {growth} KiB (from {before} KiB) for {CLIENTS} clients dribbling {BYTES} bytes"
    );
    drop(held);
    // And the API still answers.
    assert_eq!(curl(admin, "GET", "/healthz", None, None).await.status, 200);
}

/// `admin.max_connections`: idle connections beyond it are closed at accept, the
/// ones within it are closed at `request_timeout` when they send no request, and the
/// API then answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_are_capped_and_idle_ones_time_out() {
    let be = TestBackend::start(Kind::Identity).await;
    let fg = start(&cfg(
        be.addr,
        "max_connections = 4\nrequest_timeout = \"500ms\"",
    ));
    let admin = fg.admin_addr().unwrap();
    let mut conns = Vec::new();
    for _ in 0..10 {
        conns.push(TcpStream::connect(admin).await.unwrap());
    }
    // Each connection ends (EOF or reset) without having sent anything: six at
    // accept, four at the request deadline.
    for (i, c) in conns.iter_mut().enumerate() {
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(LIVENESS, c.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "connection {i} was not closed: {r:?}"
        );
    }
    assert_eq!(curl(admin, "GET", "/healthz", None, None).await.status, 200);
}

/// A browser page on another site, or a DNS name rebound to 127.0.0.1, cannot use
/// the admin API: foreign `Host` and `Origin` are refused, and so is a body that is
/// not JSON. The backend stays up through all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_and_rebinding_requests_are_refused() {
    let be = TestBackend::start(Kind::Identity).await;
    let fg = start(&cfg(be.addr, "allowed_hosts = [\"lb.internal\"]"));
    let admin = fg.admin_addr().unwrap();
    let drain = action(&be.addr.to_string(), "drain", false);

    let r = curl_with(
        admin,
        "GET",
        "/api/v1/pools",
        None,
        None,
        &["-H", "Host: attacker.example"],
    )
    .await;
    assert_eq!(r.status, 421, "{r:?}");
    assert!(r.error().contains("allowed_hosts"), "{r:?}");
    for host in ["lb.internal", "LB.Internal.", "localhost"] {
        let header = format!("Host: {host}:{}", admin.port());
        let r = curl_with(admin, "GET", "/healthz", None, None, &["-H", &header]).await;
        assert_eq!(r.status, 200, "{host}: {r:?}");
    }

    let r = curl_with(
        admin,
        "POST",
        &drain,
        None,
        None,
        &[
            "-H",
            "Origin: http://evil.example",
            "-H",
            "Content-Type: text/plain",
            "--data-binary",
            "x",
        ],
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    let r = curl_with(
        admin,
        "POST",
        "/api/v1/reload",
        None,
        None,
        &[
            "-H",
            "Content-Type: application/x-www-form-urlencoded",
            "--data-binary",
            "a=b",
        ],
    )
    .await;
    assert_eq!(r.status, 415, "{r:?}");
    let r = curl_with(
        admin,
        "GET",
        "/healthz",
        None,
        None,
        &[
            "-H",
            "Content-Length: 5",
            "--data-binary",
            "hello",
            "-X",
            "GET",
        ],
    )
    .await;
    assert_eq!(r.status, 400, "a GET with a body: {r:?}");

    let pools = get_pools(admin).await;
    assert_eq!(backends_of(&pools, "p")[0]["state"], "up", "{pools}");

    // The same origin (the status page's own requests) is fine.
    let r = curl_with(
        admin,
        "POST",
        &drain,
        None,
        None,
        &["-H", &format!("Origin: http://{admin}")],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
}

/// 401 says how to authenticate, 405 says what is allowed, the scheme is read in
/// any case, and `protect_reads` puts reads (but `/healthz`) behind the token too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_courtesies_and_protected_reads() {
    let be = TestBackend::start(Kind::Identity).await;
    let dir = tempdir::Dir::new();
    let token = dir.file("token", "s3cret\n");
    let fg = start(&cfg(
        be.addr,
        &format!("token_file = \"{}\"\nprotect_reads = true", token.display()),
    ));
    let admin = fg.admin_addr().unwrap();

    let r = curl_with(admin, "GET", "/api/v1/pools", None, None, &["-i"]).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert!(
        r.text
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{}",
        r.text
    );
    assert_eq!(curl(admin, "GET", "/healthz", None, None).await.status, 200);
    assert_eq!(
        curl(admin, "GET", "/api/v1/pools", None, Some("s3cret"))
            .await
            .status,
        200
    );
    let r = curl_with(
        admin,
        "GET",
        "/api/v1/pools",
        None,
        None,
        &["-H", "Authorization: bearer s3cret"],
    )
    .await;
    assert_eq!(r.status, 200, "lower-case scheme: {r:?}");

    let r = curl_with(
        admin,
        "DELETE",
        "/api/v1/reload",
        None,
        Some("s3cret"),
        &["-i"],
    )
    .await;
    assert_not_allowed(&r, "post");
}

/// A second flowgate with the same config (fixed ports) refuses to start, naming
/// the address, instead of sharing the listener and the admin API with the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_on_the_same_ports_refuses_to_start() {
    let be = TestBackend::start(Kind::Identity).await;
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (lb, admin) = (free(), free());
    let text = |with_admin: bool| {
        let admin = if with_admin {
            format!("[admin]\nbind = \"{admin}\"\n\n")
        } else {
            String::new()
        };
        format!(
            "{admin}[[listeners]]\nname = \"l\"\nbind = \"{lb}\"\npool = \"p\"\n\n\
             [[pools]]\nname = \"p\"\nbackends = [ {{ address = \"{}\" }} ]\n",
            be.addr
        )
    };
    let first = Proc::spawn(&text(true), &[]);
    assert_eq!(first.admin(), admin);
    for with_admin in [true, false] {
        let mut second = Proc::spawn(&text(with_admin), &[]);
        let status = second
            .exited(LIVENESS)
            .await
            .expect("the second instance exits");
        assert_eq!(status.code(), Some(1), "{}", second.log());
        let log = second.log();
        assert!(
            log.contains(&lb.to_string()) || log.contains(&admin.to_string()),
            "{log}"
        );
        assert!(log.contains("Address already in use"), "{log}");
        assert!(
            log.contains(&format!("pid {} (flowgate) holds it", first.pid())),
            "names the process: {log}"
        );
        let line = log
            .lines()
            .find(|l| l.contains("cannot bind"))
            .expect("the error line");
        assert_eq!(
            line.matches("Address already in use").count(),
            1,
            "the cause is said once: {line}"
        );
    }
    // The first one still has its listener to itself.
    let (_, name) = connect_identity(first.addr("l")).await;
    assert_eq!(name, be.name);
}

/// One pool, and one backend, by name (issue 10, item 4): the same JSON as their
/// entries in GET /api/v1/pools; 404 for an unknown one, 405 for another method.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_pool_and_backend_gets() {
    let be = TestBackend::start(Kind::Identity).await;
    let fg = start(&cfg(be.addr, ""));
    let admin = fg.admin_addr().unwrap();
    let all = get_pools(admin).await;
    let r = curl(admin, "GET", "/api/v1/pools/p", None, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["name"], "p");
    assert_eq!(r.json["backends"], all["pools"][0]["backends"]);
    let path = format!(
        "/api/v1/pools/p/backends/{}",
        be.addr.to_string().replace(':', "%3A")
    );
    let r = curl(admin, "GET", &path, None, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["address"], be.addr.to_string());
    assert_eq!(
        curl(admin, "GET", "/api/v1/pools/nope", None, None)
            .await
            .status,
        404
    );
    assert_eq!(
        curl(
            admin,
            "GET",
            "/api/v1/pools/p/backends/127.0.0.1:1",
            None,
            None
        )
        .await
        .status,
        404
    );
    let r = curl_with(admin, "POST", "/api/v1/pools/p", None, None, &["-i"]).await;
    assert_not_allowed(&r, "get");
}

/// GET /api/v1/openapi.json is a valid OpenAPI 3 document (checked by
/// openapi-spec-validator from PyPI, which .ci/run installs), and every path it
/// describes answers (not 404) on a running instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_valid_and_matches_the_routes() {
    let be = TestBackend::start(Kind::Identity).await;
    let fg = start(&cfg(be.addr, ""));
    let admin = fg.admin_addr().unwrap();
    let r = curl(admin, "GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let dir = tempdir::Dir::new();
    let file = dir.file("openapi.json", &r.text);
    let out = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .expect("run python3 -m openapi_spec_validator (pip install openapi-spec-validator)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let paths = r.json["paths"].as_object().expect("paths");
    assert!(paths.len() >= 10, "{paths:?}");
    for (path, ops) in paths {
        let concrete = path
            .replace("{pool}", "p")
            .replace("{address}", &be.addr.to_string());
        for method in ops
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "parameters")
        {
            let m = method.to_uppercase();
            let body = (m == "PUT").then_some(&br#"{"weight": 2}"#[..]);
            let r = curl(admin, &m, &concrete, body, None).await;
            assert!(r.status != 404 && r.status != 405, "{m} {concrete}: {r:?}");
        }
    }
}

/// Review mends: a reload cannot strip the token from an admin API that still
/// listens on a non-loopback address (admin.bind changes on restart); an HTTP/1.0
/// health check without `Host` is answered; and overlapping listeners of one config
/// (127.0.0.1:P beside 0.0.0.0:P) do not trip the one-instance check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_a_non_loopback_admin_protected() {
    let be = TestBackend::start(Kind::Identity).await;
    let dir = tempdir::Dir::new();
    let token = dir.file("token", "s3cret");
    let text = |bind: &str, token: Option<&std::path::Path>| {
        let t = token.map_or(String::new(), |t| {
            format!("token_file = \"{}\"\n", t.display())
        });
        format!(
            "[admin]\nbind = \"{bind}\"\n{t}\n\
             [[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n\
             [[pools]]\nname = \"p\"\nbackends = [ {{ address = \"{}\" }} ]\n",
            be.addr
        )
    };
    let (fg, path) = start_file(&dir, "flowgate.toml", &text("0.0.0.0:0", Some(&token)));
    let admin: SocketAddr = format!("127.0.0.1:{}", fg.admin_addr().unwrap().port())
        .parse()
        .unwrap();
    std::fs::write(&path, text("127.0.0.1:0", None)).unwrap();
    let fg2 = fg.clone();
    let e = tokio::task::spawn_blocking(move || fg2.reload())
        .await
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("not loopback"), "{e}");
    let drain = action(&be.addr.to_string(), "drain", false);
    assert_eq!(curl(admin, "POST", &drain, None, None).await.status, 401);

    // HTTP/1.0, no Host: HAProxy's `option httpchk` default.
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").await.unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.0 200"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_listeners_of_one_config_start() {
    let be = TestBackend::start(Kind::Identity).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let fg = start(&format!(
        "[[listeners]]\nname = \"local\"\nbind = \"127.0.0.1:{port}\"\npool = \"p\"\n\n\
         [[listeners]]\nname = \"any\"\nbind = \"0.0.0.0:{port}\"\npool = \"p\"\n\n\
         [[pools]]\nname = \"p\"\nbackends = [ {{ address = \"{}\" }} ]\n",
        be.addr
    ));
    assert!(fg.local_addr("local").is_some() && fg.local_addr("any").is_some());
}
