//! The admin API from the outside, with curl as the client: the pools listing, drain,
//! enable, disable and weight on live traffic, the drain deadline, backend addresses
//! that need percent-encoding (IPv6 included), error replies, the bearer token,
//! /healthz through a graceful shutdown, and the refusal of an unprotected
//! non-loopback admin address.
//!
//! Flowgate runs in-process on port 0 with its admin API on 127.0.0.1:0; backends are
//! identity servers, so each connection says which backend it reached. Timeouts are
//! liveness bounds, never assertions about speed.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

/// How long something that should happen "at once" may take before the test fails.
const LIVENESS: Duration = Duration::from_secs(10);

const ADMIN: &str = "\n[admin]\nbind = \"127.0.0.1:0\"\n";

/// Starts flowgate on `config(...) + [admin]` and returns it with the API's address.
fn start_with_admin(
    algorithm: &str,
    backends: &[(SocketAddr, u32)],
    extra_pool: &str,
) -> (flowgate::Flowgate, SocketAddr) {
    let fg = start(&(config(algorithm, backends, "", extra_pool) + ADMIN));
    let admin = fg.admin_addr().expect("admin API bound");
    (fg, admin)
}

/// Three identity backends, round-robin behind flowgate with the admin API and
/// `extra_pool`; returns them with flowgate, the API's address and listener "l"'s.
async fn three_behind(
    extra_pool: &str,
) -> ([TestBackend; 3], flowgate::Flowgate, SocketAddr, SocketAddr) {
    let bs: [_; 3] = start_backends(Kind::Identity).await;
    let list: Vec<_> = bs.iter().map(|b| (b.addr, 1)).collect();
    let (fg, admin) = start_with_admin("round-robin", &list, extra_pool);
    let lb = fg.local_addr("l").unwrap();
    (bs, fg, admin, lb)
}

/// Asserts a successful action reply, which describes the backend.
fn assert_ok(r: &ApiReply, address: &str, state: &str) {
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["address"], address, "{r:?}");
    assert_eq!(r.json["state"], state, "{r:?}");
}

/// The one entry for `address` in pool "p".
async fn backend(admin: SocketAddr, address: &str) -> serde_json::Value {
    let pools = get_pools(admin).await;
    let mut e = backend_entries(&pools, "p", address);
    assert_eq!(e.len(), 1, "one entry for {address} in {pools}");
    e.remove(0)
}

/// Asserts the state and weight the listing shows for `address` in pool "p".
async fn assert_listed(admin: SocketAddr, address: &str, state: &str, weight: u64) {
    let entry = backend(admin, address).await;
    assert_eq!(
        (&entry["state"], &entry["weight"]),
        (&state.into(), &weight.into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_listing_shows_every_backend_with_its_state() {
    let a = TestBackend::start(Kind::Identity).await;
    let b = TestBackend::start(Kind::Identity).await;
    let c = TestBackend::start(Kind::Identity).await;
    let toml = format!(
        r#"
[runtime]
workers = 2
[admin]
bind = "127.0.0.1:0"
[[listeners]]
name = "l"
bind = "127.0.0.1:0"
pool = "p"
[[pools]]
name = "p"
algorithm = "weighted-round-robin"
backends = [ {{ address = "{}", weight = 2 }}, {{ address = "{}", weight = 3 }} ]
[[pools]]
name = "q"
algorithm = "least-connections"
backends = [ {{ address = "{}" }} ]
[pools.health_check]
kind = "tcp"
interval = "100ms"
rise = 1
"#,
        a.name, b.name, c.name
    );
    let fg = start(&toml);
    let admin = fg.admin_addr().unwrap();
    let (_held, reached) = connect_identity(fg.local_addr("l").unwrap()).await;

    let body = get_pools(admin).await;
    let pools = body["pools"].as_array().expect("pools array");
    let names: Vec<_> = pools.iter().map(|p| p["name"].clone()).collect();
    assert_eq!(names, ["p", "q"], "{body}");
    assert_eq!(pools[0]["algorithm"], "weighted-round-robin", "{body}");
    assert_eq!(pools[1]["algorithm"], "least-connections", "{body}");
    let p = backends_of(&body, "p");
    assert_eq!(p.len(), 2, "{body}");
    for (entry, (name, weight)) in p.iter().zip([(&a.name, 2), (&b.name, 3)]) {
        assert_eq!(entry["address"], name.as_str(), "{entry}");
        assert_eq!(entry["weight"], weight, "{entry}");
        assert_eq!(entry["state"], "up", "{entry}");
        let open = if *name == reached { 1 } else { 0 };
        assert_eq!(entry["active_connections"], open, "{entry}");
        assert!(entry.get("last_check").is_some(), "{entry}");
    }
    assert!(
        p.iter().all(|e| e["last_check"].is_null()),
        "no health check, no result: {body}"
    );

    // The health-checked pool reports its last check once one has run.
    let mut entry = serde_json::Value::Null;
    for _ in 0..100 {
        entry = backends_of(&get_pools(admin).await, "q")[0].clone();
        if entry["last_check"].is_object() && entry["state"] == "up" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(entry["state"], "up", "{entry}");
    assert_eq!(entry["last_check"]["ok"], true, "{entry}");
    let at = entry["last_check"]["at"].as_str().expect("check time");
    assert!(
        at.len() >= 20 && at.contains('T'),
        "RFC 3339 time, got {at:?}"
    );

    let listeners = body["listeners"].as_array().expect("listeners array");
    assert_eq!(listeners.len(), 1, "{body}");
    assert_eq!(
        listeners[0]["address"],
        fg.local_addr("l").unwrap().to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_keeps_open_connections_and_sends_new_ones_elsewhere_until_enable() {
    let (bs, _fg, admin, lb) = three_behind("drain_timeout = \"60s\"").await;
    let a = &bs[0].name;
    let mut held = hold_on(lb, a, 3).await;

    let r = post_action(admin, a, "drain", false).await;
    assert_ok(&r, a, "draining");
    let entry = backend(admin, a).await;
    assert_eq!(entry["state"], "draining", "{entry}");
    assert_eq!(entry["active_connections"], 3, "{entry}");

    let counts = spread(lb, 12).await;
    assert!(
        !counts.contains_key(a),
        "new connections reached {a}: {counts:?}"
    );
    assert_eq!(counts.len(), 2, "both others serve: {counts:?}");
    for (i, c) in held.iter_mut().enumerate() {
        echo(c, format!("still here {i}").as_bytes())
            .await
            .expect("a connection open on a draining backend keeps working");
    }
    // Draining twice is not an error and changes nothing.
    let r = post_action(admin, a, "drain", false).await;
    assert_ok(&r, a, "draining");

    let r = post_action(admin, a, "enable", false).await;
    assert_ok(&r, a, "up");
    let counts = spread(lb, 6).await;
    assert_eq!(counts.get(a), Some(&2), "enable restores {a}: {counts:?}");
    for c in &mut held {
        echo(c, b"after enable").await.expect("still open");
    }
    assert_eq!(backend(admin, a).await["active_connections"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_closes_nothing_even_past_the_drain_deadline() {
    let (bs, _fg, admin, lb) = three_behind("drain_timeout = \"300ms\"").await;
    let (a, b, c) = (&bs[0].name, &bs[1].name, &bs[2].name);
    let mut on_a = hold_on(lb, a, 1).await.remove(0);
    let mut on_b = hold_on(lb, b, 1).await.remove(0);

    let r = post_action(admin, a, "disable", false).await;
    assert_ok(&r, a, "disabled");
    let r = post_action(admin, b, "drain", false).await;
    assert_ok(&r, b, "draining");
    let counts = spread(lb, 6).await;
    assert_eq!(
        counts.get(c),
        Some(&6),
        "only {c} takes new ones: {counts:?}"
    );

    // The drained neighbour's connection is cut at its deadline: that much time has
    // passed, and the disabled backend's connection is still served.
    assert!(
        closed_within(&mut on_b, LIVENESS).await,
        "drain deadline cuts {b}"
    );
    echo(&mut on_a, b"disabled, not closed")
        .await
        .expect("disable closes nothing");
    let entry = backend(admin, a).await;
    assert_eq!(entry["state"], "disabled", "{entry}");
    assert_eq!(entry["active_connections"], 1, "{entry}");

    let r = post_action(admin, a, "enable", false).await;
    assert_ok(&r, a, "up");
    // Round-robin over A and C (B still draining) gives A one pick in three.
    let counts = spread(lb, 6).await;
    assert_eq!(counts.get(a), Some(&2), "{a} is back: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_put_changes_the_split_and_shows_in_the_listing() {
    let a = TestBackend::start(Kind::Identity).await;
    let b = TestBackend::start(Kind::Identity).await;
    let (fg, admin) = start_with_admin("weighted-round-robin", &[(a.addr, 1), (b.addr, 1)], "");
    let lb = fg.local_addr("l").unwrap();

    let counts = spread(lb, 8).await;
    assert_eq!(counts.get(&a.name), Some(&4), "1:1 before: {counts:?}");

    let r = put_weight(admin, &a.name, br#"{"weight": 3}"#, false).await;
    assert_ok(&r, &a.name, "up");
    assert_eq!(r.json["weight"], 3, "{r:?}");
    assert_eq!(backend(admin, &a.name).await["weight"], 3);
    assert_eq!(backend(admin, &b.name).await["weight"], 1);

    let counts = spread(lb, 8).await;
    assert_eq!(counts.get(&a.name), Some(&6), "3:1 after: {counts:?}");
    assert_eq!(counts.get(&b.name), Some(&2), "3:1 after: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_closes_connections_still_open() {
    let a = TestBackend::start(Kind::Identity).await;
    let b = TestBackend::start(Kind::Identity).await;
    let (fg, admin) = start_with_admin(
        "round-robin",
        &[(a.addr, 1), (b.addr, 1)],
        "drain_timeout = \"500ms\"",
    );
    let lb = fg.local_addr("l").unwrap();
    let mut on_a = hold_on(lb, &a.name, 1).await.remove(0);
    let mut on_b = hold_on(lb, &b.name, 1).await.remove(0);

    let r = post_action(admin, &a.name, "drain", false).await;
    assert_ok(&r, &a.name, "draining");
    echo(&mut on_a, b"before the deadline")
        .await
        .expect("draining does not close at once");
    assert!(
        closed_within(&mut on_a, LIVENESS).await,
        "the connection still open at drain_timeout is closed"
    );
    let mut entry = serde_json::Value::Null;
    for _ in 0..100 {
        entry = backend(admin, &a.name).await;
        if entry["active_connections"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(entry["active_connections"], 0, "{entry}");
    assert_eq!(
        entry["state"], "draining",
        "stays drained until enable: {entry}"
    );
    echo(&mut on_b, b"other backend")
        .await
        .expect("other backends are not touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_work_raw_percent_encoded_and_ipv6() {
    let v4 = TestBackend::start(Kind::Identity).await;
    let v6 = match tokio::net::TcpListener::bind("[::1]:0").await {
        Ok(probe) => {
            drop(probe);
            Some(TestBackend::start_on("[::1]:0".parse().unwrap(), Kind::Identity).await)
        }
        Err(e) => {
            eprintln!("NOTE: IPv6 loopback unavailable ({e}); skipping the [::1] backend");
            None
        }
    };
    let mut list = vec![(v4.addr, 1)];
    list.extend(v6.iter().map(|b| (b.addr, 1)));
    let (fg, admin) = start_with_admin("round-robin", &list, "");
    let lb = fg.local_addr("l").unwrap();

    let r = post_action(admin, &v4.name, "drain", true).await;
    assert_ok(&r, &v4.name, "draining");
    let r = post_action(admin, &v4.name, "enable", false).await;
    assert_ok(&r, &v4.name, "up");
    let r = put_weight(admin, &v4.name, br#"{"weight":7}"#, true).await;
    assert_eq!((r.status, &r.json["weight"]), (200, &7.into()), "{r:?}");

    let Some(v6) = v6 else { return };
    assert!(v6.name.starts_with("[::1]:"), "{}", v6.name);
    assert_eq!(backend(admin, &v6.name).await["state"], "up");
    let counts = spread(lb, 4).await;
    assert_eq!(
        counts.get(&v6.name),
        Some(&2),
        "traffic reaches ::1: {counts:?}"
    );

    let r = post_action(admin, &v6.name, "drain", true).await;
    assert_ok(&r, &v6.name, "draining");
    let counts = spread(lb, 4).await;
    assert_eq!(counts.get(&v4.name), Some(&4), "{counts:?}");
    let r = post_action(admin, &v6.name, "enable", true).await;
    assert_ok(&r, &v6.name, "up");
    let r = post_action(admin, &v6.name, "disable", true).await;
    assert_ok(&r, &v6.name, "disabled");
    let r = put_weight(admin, &v6.name, br#"{"weight":2}"#, true).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_listed(admin, &v6.name, "disabled", 2).await;
}

/// A request and what it must get: method, path, body, status, error text.
type Case<'a> = (&'a str, String, Option<&'a [u8]>, u16, &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors_with_the_right_status() {
    let a = TestBackend::start(Kind::Identity).await;
    let (_fg, admin) = start_with_admin("weighted-round-robin", &[(a.addr, 1)], "");
    let weight = action(&a.name, "weight", false);

    let j = |s: &'static str| Some(s.as_bytes());
    let cases: Vec<Case<'_>> = vec![
        (
            "PUT",
            weight.clone(),
            j("{\"weight\": "),
            400,
            "malformed JSON",
        ),
        ("PUT", weight.clone(), j("weight=3"), 400, "malformed JSON"),
        (
            "PUT",
            weight.clone(),
            j("{\"weight\": \"3\"}"),
            400,
            "malformed JSON",
        ),
        (
            "PUT",
            weight.clone(),
            j("{\"weight\": 2.5}"),
            400,
            "malformed JSON",
        ),
        (
            "PUT",
            weight.clone(),
            j("{\"weight\": 3, \"x\": 1}"),
            400,
            "malformed JSON",
        ),
        ("PUT", weight.clone(), j(""), 400, "malformed JSON"),
        (
            "PUT",
            weight.clone(),
            j("{\"weight\": 0}"),
            400,
            "out of range",
        ),
        (
            "PUT",
            weight.clone(),
            j("{\"weight\": 1001}"),
            400,
            "out of range",
        ),
        (
            "PUT",
            weight.clone(),
            j("{\"weight\": -1}"),
            400,
            "out of range",
        ),
        (
            "POST",
            "/api/v1/pools/nope/backends/127.0.0.1:1/drain".into(),
            None,
            404,
            "nope",
        ),
        (
            "PUT",
            "/api/v1/pools/nope/backends/127.0.0.1:1/weight".into(),
            j("{\"weight\": 2}"),
            404,
            "nope",
        ),
        (
            "POST",
            action("127.0.0.1:1", "drain", false),
            None,
            404,
            "127.0.0.1:1",
        ),
        (
            "POST",
            action("127.0.0.1:1", "enable", true),
            None,
            404,
            "127.0.0.1:1",
        ),
        (
            "PUT",
            action("127.0.0.1:1", "weight", false),
            j("{\"weight\": 2}"),
            404,
            "127.0.0.1:1",
        ),
        (
            "POST",
            action(&a.name, "explode", false),
            None,
            404,
            "no such endpoint",
        ),
        (
            "GET",
            "/api/v1/nothing".into(),
            None,
            404,
            "no such endpoint",
        ),
        ("GET", "/index.html".into(), None, 404, "no such endpoint"),
        (
            "GET",
            action(&a.name, "drain", false),
            None,
            405,
            "not allowed",
        ),
        ("DELETE", "/api/v1/pools".into(), None, 405, "not allowed"),
    ];
    for (method, path, body, status, message) in cases {
        let r = curl(admin, method, &path, body, None).await;
        assert_eq!(r.status, status, "{method} {path} {body:?}: {r:?}");
        assert!(r.error().contains(message), "{method} {path}: {r:?}");
    }
    // Nothing above changed the backend.
    assert_listed(admin, &a.name, "up", 1).await;

    // A body over 64 KiB, announced by Content-Length or streamed in chunks.
    let big = format!("{{\"weight\": 2, \"pad\": \"{}\"}}", "x".repeat(70 * 1024));
    let r = curl(admin, "PUT", &weight, Some(big.as_bytes()), None).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert!(r.error().contains("65536"), "{r:?}");
    let chunked = ["-H", "Transfer-Encoding: chunked"];
    let r = curl_with(admin, "PUT", &weight, Some(big.as_bytes()), None, &chunked).await;
    assert_eq!(r.status, 413, "{r:?}");
    // Exactly 64 KiB is still read (and then judged as JSON).
    let edge = format!("{{\"weight\": 2}}{}", " ".repeat(64 * 1024 - 13));
    assert_eq!(edge.len(), 64 * 1024);
    let r = curl(admin, "PUT", &weight, Some(edge.as_bytes()), None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["weight"], 2, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guards_post_and_put_but_not_get() {
    let a = TestBackend::start(Kind::Identity).await;
    let dir = tempdir::Dir::new();
    dir.file("token", "s3cret-token\n");
    let toml = config("round-robin", &[(a.addr, 1)], "", "")
        + "\n[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"token\"\n";
    let (fg, _path) = start_file(&dir, "flowgate.toml", &toml);
    let admin = fg.admin_addr().unwrap();
    let drain = action(&a.name, "drain", false);
    let weight = action(&a.name, "weight", false);
    let w = Some(&br#"{"weight": 4}"#[..]);

    for (method, path, body, token) in [
        ("POST", &drain, None, None),
        ("POST", &drain, None, Some("wrong")),
        ("POST", &drain, None, Some("s3cret-token-and-more")),
        ("POST", &drain, None, Some("")),
        ("PUT", &weight, w, None),
        ("PUT", &weight, w, Some("s3cret")),
        ("POST", &"/api/v1/reload".to_string(), None, None),
    ] {
        let r = curl(admin, method, path, body, token).await;
        assert_eq!(r.status, 401, "{method} {path} token {token:?}: {r:?}");
        assert!(!r.error().is_empty());
    }
    // Not "Bearer": refused too.
    let basic = ["-H", "Authorization: Basic czNjcmV0LXRva2Vu"];
    let r = curl_with(admin, "POST", &drain, None, None, &basic).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_listed(admin, &a.name, "up", 1).await;

    let r = curl(admin, "GET", "/api/v1/pools", None, None).await;
    assert_eq!(r.status, 200, "GET needs no token: {r:?}");
    let r = curl(admin, "GET", "/healthz", None, None).await;
    assert_eq!(r.status, 200, "{r:?}");

    let r = curl(admin, "POST", &drain, None, Some("s3cret-token")).await;
    assert_ok(&r, &a.name, "draining");
    let r = curl(admin, "PUT", &weight, w, Some("s3cret-token")).await;
    assert_eq!((r.status, &r.json["weight"]), (200, &4.into()), "{r:?}");
    let r = curl(admin, "POST", "/api/v1/reload", None, Some("s3cret-token")).await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_200_while_serving_and_503_while_shutting_down() {
    let a = TestBackend::start(Kind::Identity).await;
    let (fg, admin) = start_with_admin("round-robin", &[(a.addr, 1)], "");
    let lb = fg.local_addr("l").unwrap();
    let r = curl(admin, "GET", "/healthz", None, None).await;
    assert_eq!(r.status, 200, "{r:?}");

    // An open connection keeps the graceful shutdown waiting.
    let (mut held, _) = connect_identity(lb).await;
    let stopping = tokio::spawn(fg.clone().shutdown());
    let mut r = curl(admin, "GET", "/healthz", None, None).await;
    for _ in 0..200 {
        if r.status != 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        r = curl(admin, "GET", "/healthz", None, None).await;
    }
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        !stopping.is_finished(),
        "shutdown waits for the open connection"
    );
    echo(&mut held, b"still served while stopping")
        .await
        .expect("open connection served during graceful stop");
    let refused = wait_until(LIVENESS, || std::net::TcpStream::connect(lb).is_err()).await;
    assert!(refused, "stopped accepting");
    drop(held);
    let graceful = tokio::time::timeout(LIVENESS, stopping)
        .await
        .expect("shutdown ends once the connection closes")
        .unwrap();
    assert!(graceful);
}

#[test]
fn non_loopback_admin_bind_needs_a_token_file() {
    let dir = tempdir::Dir::new();
    let base = config(
        "round-robin",
        &[("127.0.0.1:9".parse().unwrap(), 1)],
        "",
        "",
    );
    let check = |toml: &str| {
        let path = dir.file("check.toml", toml);
        std::process::Command::new(bin())
            .args(["check", "--config"])
            .arg(path)
            .output()
            .expect("run flowgate check")
    };
    for bind in ["0.0.0.0:9900", "[::]:9900"] {
        let out = check(&format!("{base}\n[admin]\nbind = \"{bind}\"\n"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bind}: {stderr}");
        assert!(stderr.contains("admin.bind"), "{bind}: {stderr}");
        assert!(
            stderr.contains("token_file"),
            "says how to fix it: {stderr}"
        );
    }
    dir.file("token", "t0ken\n");
    let out = check(&format!(
        "{base}\n[admin]\nbind = \"0.0.0.0:9900\"\ntoken_file = \"token\"\n"
    ));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = check(&format!("{base}\n[admin]\nbind = \"127.0.0.1:9900\"\n"));
    assert_eq!(out.status.code(), Some(0), "loopback needs no token");
}

/// `/healthz` says whether this instance can serve (issue 15: keepalived and BGP
/// announcers withdraw the address on it): 503, with the pool named, while a
/// `reject` pool has no usable backend; a `fail-open` pool still serves, so it does
/// not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_503_while_a_pool_cannot_serve() {
    let a = TestBackend::start(Kind::Identity).await;
    let (fg, admin) = start_with_admin("round-robin", &[(a.addr, 1)], "");
    let r = curl(admin, "GET", "/healthz", None, None).await;
    assert_eq!(r.status, 200, "{r:?}");

    let r = post_action(admin, &a.name, "disable", true).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = curl(admin, "GET", "/healthz", None, None).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json["reason"], "no usable backend in pool p", "{r:?}");

    let r = post_action(admin, &a.name, "enable", true).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = curl(admin, "GET", "/healthz", None, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    fg.shutdown().await;

    // A backend down by its health check: a `reject` pool cannot serve, a
    // `fail-open` one still can, until its last backend is drained too.
    let dead = dead_addr();
    for (policy, want) in [("reject", 503), ("fail-open", 200)] {
        let pool = format!(
            "when_all_down = \"{policy}\"\n[pools.health_check]\nkind = \"tcp\"\ninterval = \"100ms\"\n"
        );
        let (fg, admin) = start_with_admin("round-robin", &[(dead, 1)], &pool);
        let mut state = String::new();
        for _ in 0..500 {
            state = backends_of(&get_pools(admin).await, "p")[0]["state"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if state == "down" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(state, "down", "the dead backend never failed its check");
        let r = curl(admin, "GET", "/healthz", None, None).await;
        assert_eq!(r.status, want, "{policy}: {r:?}");
        if policy == "fail-open" {
            let r = post_action(admin, &dead.to_string(), "drain", true).await;
            assert_eq!(r.status, 200, "{r:?}");
            let r = curl(admin, "GET", "/healthz", None, None).await;
            assert_eq!(
                r.status, 503,
                "fail-open with its only backend drained: {r:?}"
            );
        }
        fg.shutdown().await;
    }
}
