//! The access log's file (issue 10, item 19): created 0640, never opened through
//! a symlink.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use flowgate::{Config, Flowgate};

fn text(log: &std::path::Path) -> String {
    format!(
        "[log]\naccess_log = \"{}\"\n\n\
         [[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n\
         [[pools]]\nname = \"p\"\nbackends = [ {{ address = \"127.0.0.1:9\" }} ]\n",
        log.display()
    )
}

#[tokio::test]
async fn the_access_log_is_created_0640_and_never_through_a_symlink() {
    let dir = tempdir::Dir::new();
    let log = dir.0.join("access.log");
    let fg = Flowgate::start(Config::parse(&text(&log), &dir.0.join("f.toml")).unwrap())
        .expect("starts");
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    // The umask may take bits away, never add them.
    assert_eq!(mode & !0o640, 0, "mode {mode:o}");
    fg.shutdown().await;

    let target = dir.0.join("elsewhere");
    std::fs::write(&target, "precious\n").unwrap();
    let link = dir.0.join("link.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let e = Flowgate::start(Config::parse(&text(&link), &dir.0.join("f.toml")).unwrap())
        .expect_err("a symlinked access log is refused")
        .to_string();
    assert!(e.contains("log.access_log: cannot open"), "{e}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
}

/// HAProxy tcplog's fields (issue 10, operator basics): start time, connect
/// retries, the backend's resolved address, and the listener's and backend's
/// concurrency when the connection started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_lines_carry_start_retries_backend_address_and_concurrency() {
    let live = TestBackend::start(Kind::Identity).await;
    let dead = dead_addr();
    let dir = tempdir::Dir::new();
    let log = dir.0.join("access.log");
    let text = format!(
        "[log]\naccess_log = \"{}\"\nformat = \"json\"\n\n\
         [[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n\
         [[pools]]\nname = \"p\"\nalgorithm = \"round-robin\"\nconnect_attempts = 2\n\
         backends = [ {{ address = \"{dead}\" }}, {{ address = \"{}\" }} ]\n",
        log.display(),
        live.addr
    );
    let fg = Flowgate::start(Config::parse(&text, &dir.0.join("f.toml")).unwrap()).unwrap();
    // Round-robin starts with the dead backend: one refused attempt, then the live one.
    let (c, name) = connect_identity(fg.local_addr("l").unwrap()).await;
    assert_eq!(name, live.name);
    drop(c);
    let line = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .next()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
    };
    assert!(wait_until(std::time::Duration::from_secs(10), || line().is_some()).await);
    let v = line().unwrap();
    assert_eq!(v["retries"], 1, "{v}");
    assert_eq!(v["backend_addr"], live.addr.to_string(), "{v}");
    assert_eq!(v["listener_conns"], 1, "{v}");
    assert_eq!(v["backend_conns"], 1, "{v}");
    assert!(
        v["start"].as_str().unwrap() <= v["time"].as_str().unwrap(),
        "{v}"
    );
    fg.shutdown().await;
}
