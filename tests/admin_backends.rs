//! Backends added and removed at runtime through the admin API, with curl as the
//! client: traffic reaches an added backend, a removed one drains without cutting
//! its open stream, both survive a reload of an unchanged file and give way to a
//! file that lists them, `GET /api/v1/config` shows them marked and parses back,
//! and every refusal has its status.
//!
//! Flowgate runs in-process from a file (so reload re-reads it) with its admin API
//! on 127.0.0.1:0; backends are identity servers. Nothing here is timed.

mod common;

use std::net::SocketAddr;

use common::*;
use flowgate::config::Config;

fn file(backends: &[SocketAddr]) -> String {
    let list: Vec<_> = backends.iter().map(|b| (*b, 1)).collect();
    config("round-robin", &list, "", "drain_timeout = \"60s\"")
        + "\n[admin]\nbind = \"127.0.0.1:0\"\n"
}

async fn add(admin: SocketAddr, body: &str) -> ApiReply {
    curl(
        admin,
        "POST",
        "/api/v1/pools/p/backends",
        Some(body.as_bytes()),
        None,
    )
    .await
}

fn addresses(pools: &serde_json::Value) -> Vec<(String, bool)> {
    backends_of(pools, "p")
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_string(),
                b["removed"] == true,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_added_and_removed_at_runtime() {
    let [a, b, c]: [TestBackend; 3] = start_backends(Kind::Identity).await;
    let (a, b, c) = (a.addr.to_string(), b.addr.to_string(), c.addr.to_string());
    let dir = tempdir::Dir::new();
    let (fg, path) = start_file(
        &dir,
        "fg.toml",
        &file(&[a.parse().unwrap(), b.parse().unwrap()]),
    );
    let admin = fg.admin_addr().unwrap();
    let lb = fg.local_addr("l").unwrap();

    // Add c: 201, a Location, the new backend; traffic reaches it.
    let body = format!("{{\"address\": \"{c}\", \"weight\": 2}}");
    let r = curl_with(
        admin,
        "POST",
        "/api/v1/pools/p/backends",
        Some(body.as_bytes()),
        None,
        &["-i"],
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    let lower = r.text.to_ascii_lowercase();
    assert!(
        lower.contains(&format!("location: /api/v1/pools/p/backends/{c}\r\n")),
        "{r:?}"
    );
    let (_, json) = r
        .text
        .split_once("\r\n\r\n")
        .expect("headers, then the body");
    let json: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(json["address"], c.as_str(), "{r:?}");
    assert_eq!(json["weight"], 2, "{r:?}");
    let r = curl(
        admin,
        "GET",
        &format!("/api/v1/pools/p/backends/{c}"),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "the Location is the backend: {r:?}");
    let counts = spread(lb, 8).await;
    assert!(
        counts.get(&c).copied().unwrap_or(0) >= 2,
        "about a third of 8 in round-robin: {counts:?}"
    );

    // A stream on a, then remove a: it drains, the stream keeps working, and no new
    // connection goes there.
    let mut held = hold_on(lb, &a, 1).await;
    let r = curl(
        admin,
        "DELETE",
        &format!("/api/v1/pools/p/backends/{a}"),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["removed"], true, "{r:?}");
    assert_eq!(r.json["active_connections"], 1, "{r:?}");
    echo(&mut held[0], b"still here")
        .await
        .expect("the draining stream works");
    let after = spread(lb, 6).await;
    assert!(
        !after.contains_key(&a),
        "a removed backend takes no new connection: {after:?}"
    );

    // The running config shows both changes and parses back to the running backends.
    let r = curl(admin, "GET", "/api/v1/config", None, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.text.contains("# runtime: added through the admin API"),
        "{}",
        r.text
    );
    assert!(
        r.text.contains(&format!("backend {a} removed")),
        "{}",
        r.text
    );
    let back = Config::parse(&r.text, std::path::Path::new("running.toml"))
        .unwrap_or_else(|e| panic!("{e}\n{}", r.text));
    let names: Vec<_> = back.pools[0]
        .backends
        .iter()
        .map(|b| b.name.clone())
        .collect();
    assert_eq!(names, [b.clone(), c.clone()], "{}", r.text);

    // A reload of the unchanged file keeps both changes.
    let r = curl(admin, "POST", "/api/v1/reload", None, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let listed = addresses(&get_pools(admin).await);
    assert!(listed.contains(&(c.clone(), false)), "{listed:?}");
    assert!(!listed.contains(&(a.clone(), false)), "{listed:?}");
    echo(&mut held[0], b"after reload")
        .await
        .expect("still draining, not cut");

    // A file that lists c itself wins over the override (and a is still removed).
    std::fs::write(
        &path,
        file(&[a.parse().unwrap(), b.parse().unwrap(), c.parse().unwrap()]),
    )
    .unwrap();
    let r = curl(admin, "POST", "/api/v1/reload", None, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = curl(admin, "GET", "/api/v1/config", None, None).await;
    assert!(
        !r.text.contains("added through the admin API"),
        "{}",
        r.text
    );
    let c_entry = backend_entries(&get_pools(admin).await, "p", &c);
    assert_eq!(c_entry.len(), 1);
    assert_eq!(
        c_entry[0]["weight"], 1,
        "the file's weight now: {c_entry:?}"
    );

    // Re-adding a while it drains takes its connection back.
    let r = add(admin, &format!("{{\"address\": \"{a}\"}}")).await;
    assert_eq!(r.status, 201, "{r:?}");
    let entries = backend_entries(&get_pools(admin).await, "p", &a);
    assert_eq!(entries.len(), 1, "listed once: {entries:?}");
    assert_eq!(entries[0]["active_connections"], 1, "{entries:?}");
    assert_eq!(entries[0]["removed"], false, "{entries:?}");
    echo(&mut held[0], b"back")
        .await
        .expect("the stream was never cut");
    drop(fg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_backend_changes_refused() {
    let [a, b]: [TestBackend; 2] = start_backends(Kind::Identity).await;
    let dir = tempdir::Dir::new();
    let (fg, _) = start_file(&dir, "fg.toml", &file(&[a.addr]));
    let admin = fg.admin_addr().unwrap();
    let lb = fg.local_addr("l").unwrap();
    let cases: Vec<(String, u16, &str)> = vec![
        (
            format!("{{\"address\": \"{}\"}}", a.addr),
            409,
            "already has backend",
        ),
        (
            "{\"address\": \"127.0.0:80\"}".into(),
            400,
            "not a valid IPv4 address",
        ),
        ("{\"address\": \"127.0.0.1\"}".into(), 400, "has no port"),
        (
            format!("{{\"address\": \"{lb}\"}}"),
            400,
            "connect to itself",
        ),
        (
            format!("{{\"address\": \"{}\", \"weight\": 0}}", b.addr),
            400,
            "out of range",
        ),
        (
            format!("{{\"address\": \"{}\", \"color\": 1}}", b.addr),
            400,
            "unknown field",
        ),
        ("not json".into(), 400, "malformed JSON"),
    ];
    for (body, status, msg) in cases {
        let r = add(admin, &body).await;
        assert_eq!(r.status, status, "{body}: {r:?}");
        assert!(r.error().contains(msg), "{body}: {r:?}");
    }
    let r = curl(
        admin,
        "POST",
        "/api/v1/pools/nope/backends",
        Some(b"{\"address\": \"127.0.0.1:1\"}"),
        None,
    )
    .await;
    assert_eq!(r.status, 404, "{r:?}");
    let r = curl_with(
        admin,
        "POST",
        "/api/v1/pools/p/backends",
        None,
        None,
        &["-H", "Content-Type: text/plain", "--data", "{}"],
    )
    .await;
    assert_eq!(r.status, 415, "{r:?}");
    let last = format!("/api/v1/pools/p/backends/{}", a.addr);
    let r = curl(admin, "DELETE", &last, None, None).await;
    assert_eq!(r.status, 409, "{r:?}");
    assert!(r.error().contains("last backend"), "{r:?}");
    let r = curl(
        admin,
        "DELETE",
        "/api/v1/pools/p/backends/127.0.0.1:1",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 404, "{r:?}");
    let r = curl(admin, "PUT", "/api/v1/pools/p/backends", None, None).await;
    assert_eq!(r.status, 405, "{r:?}");
    let r = curl_with(admin, "PATCH", &last, None, None, &["-i"]).await;
    assert_eq!(r.status, 405, "{r:?}");
    assert!(
        r.text.to_ascii_lowercase().contains("allow: get, delete"),
        "{r:?}"
    );
    let r = curl(admin, "POST", "/api/v1/config", None, None).await;
    assert_eq!(r.status, 405, "{r:?}");
    // Nothing above changed the pool.
    assert_eq!(
        addresses(&get_pools(admin).await),
        [(a.addr.to_string(), false)]
    );
    drop(fg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_changes_need_the_token() {
    let [a, b]: [TestBackend; 2] = start_backends(Kind::Identity).await;
    let dir = tempdir::Dir::new();
    let token = dir.file("token", "s3cret\n");
    let toml = file(&[a.addr, b.addr]) + &format!("token_file = \"{}\"\n", token.display());
    let (fg, _) = start_file(&dir, "fg.toml", &toml);
    let admin = fg.admin_addr().unwrap();
    let del = format!("/api/v1/pools/p/backends/{}", b.addr);
    assert_eq!(curl(admin, "DELETE", &del, None, None).await.status, 401);
    let body = b"{\"address\": \"127.0.0.1:9\"}";
    assert_eq!(
        curl(admin, "POST", "/api/v1/pools/p/backends", Some(body), None)
            .await
            .status,
        401
    );
    assert_eq!(
        curl(admin, "DELETE", &del, None, Some("s3cret"))
            .await
            .status,
        200
    );
    drop(fg);
}
