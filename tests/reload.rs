//! Reload on live traffic: backends removed and added, dozens of reloads under a
//! stream of new connections, invalid files, SIGHUP on the real binary, operator
//! state across reloads, and listeners removed and added.
//!
//! In-process tests load their config from a file (`Config::load`), rewrite it and
//! reload through the admin API (curl) or `Flowgate::reload`; the SIGHUP test runs the
//! binary. Backends are identity (or echo) servers on port 0. Timeouts are liveness
//! bounds, never assertions about speed.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use flowgate::Flowgate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long something that should happen "at once" may take before the test fails.
const LIVENESS: Duration = Duration::from_secs(10);

/// A config with listeners `listeners` (each on 127.0.0.1:0, all to pool "p"), pool
/// "p" over `backends` (address, weight) and the admin API on 127.0.0.1:0.
fn cfg(listeners: &[&str], algorithm: &str, backends: &[(&str, u32)], extra_pool: &str) -> String {
    let mut s = String::from(
        "[runtime]\nworkers = 2\nshutdown_timeout = \"5s\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n",
    );
    for l in listeners {
        s += &format!(
            "\n[[listeners]]\nname = \"{l}\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\nconnect_timeout = \"2s\"\n"
        );
    }
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    s += &format!(
        "\n[[pools]]\nname = \"p\"\nalgorithm = \"{algorithm}\"\nbackends = [ {} ]\n{extra_pool}\n",
        list.join(", ")
    );
    s
}

/// Reloads through the admin API, asserting 200.
async fn api_reload(admin: SocketAddr) {
    let r = curl(admin, "POST", "/api/v1/reload", None, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json["status"], "reloaded", "{r:?}");
}

/// GET /api/v1/pools until `done` holds for the body (200 tries, 20 ms apart); returns
/// the last body, whether or not it did.
async fn pools_when(
    admin: SocketAddr,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut pools = serde_json::Value::Null;
    for _ in 0..200 {
        pools = get_pools(admin).await;
        if done(&pools) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pools
}

/// `Flowgate::reload` off the async threads (it binds sockets and reads the file).
async fn lib_reload(fg: &Flowgate) -> Result<(), String> {
    let fg = fg.clone();
    tokio::task::spawn_blocking(move || fg.reload().map_err(|e| e.to_string()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_backend_drains_then_disappears_and_added_one_serves() {
    let [a, b, c] = start_backends(Kind::Identity).await;
    let dir = tempdir::Dir::new();
    let drain = "drain_timeout = \"60s\"";
    let v1 = cfg(&["l"], "round-robin", &[(&a.name, 1), (&b.name, 1)], drain);
    let (fg, path) = start_file(&dir, "flowgate.toml", &v1);
    let (lb, admin) = (fg.local_addr("l").unwrap(), fg.admin_addr().unwrap());
    let mut on_a = hold_on(lb, &a.name, 2).await;

    let v2 = cfg(&["l"], "round-robin", &[(&b.name, 1), (&c.name, 1)], drain);
    std::fs::write(&path, v2).unwrap();
    api_reload(admin).await;

    for (i, conn) in on_a.iter_mut().enumerate() {
        echo(conn, format!("after reload {i}").as_bytes())
            .await
            .expect("a connection to a removed backend keeps working");
    }
    let counts = spread(lb, 10).await;
    assert!(!counts.contains_key(&a.name), "{counts:?}");
    assert_eq!(counts.get(&b.name), Some(&5), "{counts:?}");
    assert_eq!(counts.get(&c.name), Some(&5), "{counts:?}");

    let pools = get_pools(admin).await;
    let gone = backend_entries(&pools, "p", &a.name);
    assert_eq!(gone.len(), 1, "{pools}");
    assert_eq!(gone[0]["state"], "draining", "{pools}");
    assert_eq!(gone[0]["removed"], true, "{pools}");
    assert_eq!(gone[0]["active_connections"], 2, "{pools}");
    for kept in [&b.name, &c.name] {
        let e = backend_entries(&pools, "p", kept);
        assert_eq!(e.len(), 1, "{pools}");
        assert_eq!(
            (&e[0]["state"], &e[0]["removed"]),
            (&"up".into(), &false.into())
        );
    }

    // One closes: still listed. The last closes: gone.
    on_a.pop();
    let pools = pools_when(admin, |pools| {
        backend_entries(pools, "p", &a.name)[0]["active_connections"] == 1
    })
    .await;
    let gone = backend_entries(&pools, "p", &a.name);
    assert_eq!(gone[0]["active_connections"], 1, "{pools}");
    echo(&mut on_a[0], b"last one").await.unwrap();
    drop(on_a);
    let pools = pools_when(admin, |pools| {
        backend_entries(pools, "p", &a.name).is_empty()
    })
    .await;
    assert!(
        backend_entries(&pools, "p", &a.name).is_empty(),
        "removed backend leaves the API once drained: {pools}"
    );
    assert_eq!(backends_of(&pools, "p").len(), 2, "{pools}");
}

/// What the load generator saw.
#[derive(Default)]
struct Load {
    ok: AtomicUsize,
    failed: AtomicUsize,
    errors: Mutex<Vec<String>>,
}

impl Load {
    /// Sessions that succeeded and failed so far.
    fn totals(&self) -> (usize, usize) {
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }

    /// Asserts no session failed, showing the first errors.
    fn assert_none_failed(&self) {
        let errors = self.errors.lock().unwrap();
        assert_eq!(
            self.failed.load(Ordering::SeqCst),
            0,
            "first errors: {:?}",
            &errors[..errors.len().min(10)]
        );
    }
}

/// `clients` tasks running short sessions against `lb` until `stop`, counting into
/// `load`; `seed` keeps their messages distinct from other tests'.
fn spawn_load(
    lb: SocketAddr,
    clients: u64,
    seed: u64,
    load: &Arc<Load>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|c| {
            let (load, stop) = (load.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = (c << 40) | (seed << 50);
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    match round_trip(lb, n).await {
                        Ok(()) => load.ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            load.errors.lock().unwrap().push(e);
                            load.failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect()
}

/// Reloads under load: `clients` load clients (`seed` as for `spawn_load`) run
/// sessions through listener "l" of `fg`; `reloads` times, once `per_config` more
/// sessions have ended, `variant(i)` (i from 1) is written to `path` and reloaded.
/// After the last reload it waits (without asserting) for `per_config` more
/// successful sessions, then stops the clients. Returns what they saw and the time
/// from the first client to the last one's end.
async fn reload_under_load(
    fg: &Flowgate,
    path: &Path,
    clients: u64,
    seed: u64,
    reloads: usize,
    per_config: usize,
    variant: impl Fn(usize) -> String,
) -> (Arc<Load>, Duration) {
    let load = Arc::new(Load::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = spawn_load(fg.local_addr("l").unwrap(), clients, seed, &load, &stop);
    let started = Instant::now();
    for i in 1..=reloads {
        let before = load.ok.load(Ordering::Relaxed) + load.failed.load(Ordering::Relaxed);
        let traffic = wait_until(LIVENESS, || {
            load.ok.load(Ordering::Relaxed) + load.failed.load(Ordering::Relaxed)
                >= before + per_config
        })
        .await;
        assert!(traffic, "sessions stalled before reload {i}");
        std::fs::write(path, variant(i)).unwrap();
        lib_reload(fg).await.expect("valid reload");
    }
    let last = load.ok.load(Ordering::Relaxed);
    wait_until(LIVENESS, || {
        load.ok.load(Ordering::Relaxed) >= last + per_config
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    (load, started.elapsed())
}

/// One short session: connect, send a unique message, read it back, close.
async fn round_trip(lb: SocketAddr, n: u64) -> Result<(), String> {
    let mut s = TcpStream::connect(lb)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let msg = format!("session {n:>12} says hello\n");
    s.write_all(msg.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    match tokio::time::timeout(LIVENESS, s.read_exact(&mut back)).await {
        Err(_) => return Err("no echo within 10s".into()),
        Ok(Err(e)) => return Err(format!("read: {e}")),
        Ok(Ok(_)) => {}
    }
    if back != msg.as_bytes() {
        return Err(format!(
            "echo mismatch: {:?}",
            String::from_utf8_lossy(&back)
        ));
    }
    s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    match tokio::time::timeout(LIVENESS, s.read(&mut [0u8; 1])).await {
        Ok(Ok(0)) => Ok(()),
        other => Err(format!("expected end of stream, got {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_reloads_under_load_drop_no_connection() {
    const RELOADS: usize = 40;
    const CLIENTS: usize = 4;
    /// New sessions completed between two reloads, so every config sees traffic.
    const PER_CONFIG: usize = 50;
    let be: [_; 4] = start_backends(Kind::Echo).await;
    let names: Vec<&str> = be.iter().map(|b| b.name.as_str()).collect();
    let set = |i: usize| -> (&str, Vec<(&str, u32)>) {
        match i % 4 {
            0 => ("round-robin", vec![(names[0], 1), (names[1], 1)]),
            1 => ("weighted-round-robin", vec![(names[1], 3), (names[2], 1)]),
            2 => ("least-connections", vec![(names[2], 1), (names[3], 2)]),
            _ => ("random", vec![(names[0], 2), (names[3], 1), (names[1], 5)]),
        }
    };
    let variant = |i: usize| -> String {
        let (algorithm, set) = set(i);
        let drain = format!("drain_timeout = \"{}s\"", 20 + i % 3);
        cfg(&["l"], algorithm, &set, &drain)
    };
    let dir = tempdir::Dir::new();
    let (fg, path) = start_file(&dir, "flowgate.toml", &variant(0));

    let (load, elapsed) =
        reload_under_load(&fg, &path, CLIENTS as u64, 0, RELOADS, PER_CONFIG, variant).await;
    let (ok, failed) = load.totals();
    eprintln!(
        "reload under load: {RELOADS} reloads, {ok} sessions ok, {failed} failed, {:.1}s, {:.0} sessions/s",
        elapsed.as_secs_f64(),
        ok as f64 / elapsed.as_secs_f64()
    );
    load.assert_none_failed();
    assert!(ok >= RELOADS * PER_CONFIG, "{ok} sessions");
    // The last file is the one in force.
    let p = fg.pool("p").unwrap();
    let now: Vec<_> = p.backends().iter().map(|b| b.name.to_string()).collect();
    let want: Vec<_> = set(RELOADS).1.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(now, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_keeps_the_running_config_and_says_where() {
    let [a, b] = start_backends(Kind::Identity).await;
    let dir = tempdir::Dir::new();
    let v1 = cfg(&["l"], "round-robin", &[(&a.name, 1)], "");
    let (fg, path) = start_file(&dir, "flowgate.toml", &v1);
    let (lb, admin) = (fg.local_addr("l").unwrap(), fg.admin_addr().unwrap());
    let (mut held, _) = connect_identity(lb).await;

    // A syntax error, then a value out of range, each on a known line.
    let syntax = format!(
        "{}\nthis is not toml\n",
        cfg(&["l"], "round-robin", &[(&b.name, 1)], "")
    );
    let range = cfg(
        &["l", "l2"],
        "round-robin",
        &[(&a.name, 1), (&b.name, 0)],
        "",
    );
    for (bad, marker) in [(&syntax, "this is not toml"), (&range, "weight = 0")] {
        let line = bad.lines().position(|l| l.contains(marker)).unwrap() + 1;
        let at = format!("{}:{line}:", path.display());
        std::fs::write(&path, bad).unwrap();
        let r = curl(admin, "POST", "/api/v1/reload", None, None).await;
        assert_eq!(r.status, 400, "{r:?}");
        assert!(r.error().contains(&at), "names {at}: {r:?}");
        let e = lib_reload(&fg).await.expect_err("invalid file refused");
        assert!(e.contains(&at), "{e}");

        echo(&mut held, b"old config still serving").await.unwrap();
        let counts = spread(lb, 3).await;
        assert_eq!(counts.get(&a.name), Some(&3), "old backend set: {counts:?}");
        let pools = get_pools(admin).await;
        let listed: Vec<_> = backends_of(&pools, "p")
            .iter()
            .map(|b| b["address"].clone())
            .collect();
        assert_eq!(listed, [a.name.as_str()], "{pools}");
        assert!(
            fg.local_addr("l2").is_none(),
            "nothing of the bad file applied"
        );
    }

    // Fixed: applied.
    let v2 = cfg(&["l"], "round-robin", &[(&a.name, 1), (&b.name, 1)], "");
    std::fs::write(&path, v2).unwrap();
    api_reload(admin).await;
    let counts = spread(lb, 4).await;
    assert_eq!(counts.get(&b.name), Some(&2), "{counts:?}");
    echo(&mut held, b"and after").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_the_changed_file_to_the_binary() {
    let [a, b] = start_backends(Kind::Identity).await;
    let v1 = cfg(&["l"], "round-robin", &[(&a.name, 1)], "");
    let mut p = Proc::spawn(&v1, &[]);
    assert!(p.logged("flowgate started", LIVENESS).await, "{}", p.log());
    let lb = p.addr("l");
    let (mut held, name) = connect_identity(lb).await;
    assert_eq!(name, a.name);

    let v2 = cfg(
        &["l", "l2"],
        "round-robin",
        &[(&a.name, 1), (&b.name, 1)],
        "",
    );
    p.dir.file("flowgate.toml", &v2);
    p.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        p.logged("configuration reloaded", LIVENESS).await,
        "{}",
        p.log()
    );
    let l2 = p.addr("l2");
    let (mut via_l2, _) = connect_identity(l2).await;
    echo(&mut via_l2, b"new listener").await.unwrap();
    let counts = spread(lb, 4).await;
    assert_eq!(
        counts.get(&b.name),
        Some(&2),
        "added backend serves: {counts:?}"
    );
    echo(&mut held, b"kept across SIGHUP").await.unwrap();

    // A broken file: logged, and nothing changes.
    let bad = format!("{v2}\n[[listeners]\n");
    p.dir.file("flowgate.toml", &bad);
    p.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        p.logged("reload failed; keeping the running configuration", LIVENESS)
            .await,
        "{}",
        p.log()
    );
    assert!(p.log().contains("flowgate.toml:"), "{}", p.log());
    echo(&mut via_l2, b"still here").await.unwrap();
    echo(&mut held, b"still here").await.unwrap();
    let counts = spread(l2, 2).await;
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(p.child.try_wait().unwrap().is_none(), "still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_drain_disable_and_weight_survive_reload() {
    let be: [_; 4] = start_backends(Kind::Identity).await;
    let [a, b, c, d] = [&be[0].name, &be[1].name, &be[2].name, &be[3].name];
    let dir = tempdir::Dir::new();
    let drain = "drain_timeout = \"60s\"";
    let v1 = cfg(
        &["l"],
        "weighted-round-robin",
        &[(a, 1), (b, 1), (c, 1)],
        drain,
    );
    let (fg, path) = start_file(&dir, "flowgate.toml", &v1);
    let (lb, admin) = (fg.local_addr("l").unwrap(), fg.admin_addr().unwrap());
    let mut on_a = hold_on(lb, a, 1).await.remove(0);

    assert_eq!(post_action(admin, a, "drain", false).await.status, 200);
    assert_eq!(post_action(admin, b, "disable", false).await.status, 200);
    let w = br#"{"weight": 5}"#;
    assert_eq!(put_weight(admin, c, w, false).await.status, 200);

    // The file changes every weight and adds D; the operator's choices stay.
    let v2 = cfg(
        &["l"],
        "weighted-round-robin",
        &[(a, 2), (b, 2), (c, 2), (d, 1)],
        drain,
    );
    std::fs::write(&path, v2).unwrap();
    api_reload(admin).await;
    // Twice: nothing resets on a second pass either.
    api_reload(admin).await;

    let pools = get_pools(admin).await;
    let one = |addr: &str| {
        let e = backend_entries(&pools, "p", addr);
        assert_eq!(e.len(), 1, "{pools}");
        e[0].clone()
    };
    assert_eq!(one(a)["state"], "draining", "{pools}");
    assert_eq!(one(a)["active_connections"], 1, "{pools}");
    assert_eq!(
        one(a)["weight"],
        2,
        "file weight applies without an override"
    );
    assert_eq!(one(b)["state"], "disabled", "{pools}");
    assert_eq!(
        one(c)["weight"],
        5,
        "API weight wins over the file: {pools}"
    );
    assert_eq!(one(c)["state"], "up", "{pools}");
    assert_eq!(
        (&one(d)["state"], &one(d)["weight"]),
        (&"up".into(), &1.into())
    );

    let counts = spread(lb, 12).await;
    assert!(
        !counts.contains_key(a) && !counts.contains_key(b),
        "{counts:?}"
    );
    assert!(
        counts.contains_key(c) && counts.contains_key(d),
        "{counts:?}"
    );
    echo(&mut on_a, b"drained, kept, open").await.unwrap();

    // The drained backend is still the same one: enable brings it back.
    assert_eq!(post_action(admin, a, "enable", false).await.status, 200);
    let counts = spread(lb, 12).await;
    assert!(counts.contains_key(a), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_listener_stops_accepting_and_added_one_starts() {
    let a = TestBackend::start(Kind::Identity).await;
    let dir = tempdir::Dir::new();
    let drain = "drain_timeout = \"60s\"";
    let v1 = cfg(&["l1", "l2"], "round-robin", &[(&a.name, 1)], drain);
    let (fg, path) = start_file(&dir, "flowgate.toml", &v1);
    let (l1, l2) = (fg.local_addr("l1").unwrap(), fg.local_addr("l2").unwrap());
    let (mut held, _) = connect_identity(l2).await;
    echo(&mut held, b"before").await.unwrap();

    let v2 = cfg(&["l1", "l3"], "round-robin", &[(&a.name, 1)], drain);
    std::fs::write(&path, v2).unwrap();
    lib_reload(&fg).await.expect("valid reload");

    assert!(fg.local_addr("l2").is_none());
    let refused = wait_until(LIVENESS, || std::net::TcpStream::connect(l2).is_err()).await;
    assert!(refused, "removed listener {l2} still accepts");
    echo(&mut held, b"open connection of a removed listener")
        .await
        .expect("keeps working");

    let l3 = fg.local_addr("l3").expect("added listener");
    let (mut new, _) = connect_identity(l3).await;
    echo(&mut new, b"added listener").await.unwrap();
    assert_eq!(
        fg.local_addr("l1"),
        Some(l1),
        "kept listener keeps its socket"
    );
    let (mut old, _) = connect_identity(l1).await;
    echo(&mut old, b"kept listener").await.unwrap();
    echo(&mut held, b"still").await.unwrap();
}

/// With health checks, backends added by a reload start down until their first probe
/// passes. A reload that replaces every backend must still refuse no client: the
/// retiring ones serve until their replacements are up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_backend_swap_with_health_checks_drops_no_connection() {
    const RELOADS: usize = 12;
    let be: [_; 4] = start_backends(Kind::Echo).await;
    let names: Vec<&str> = be.iter().map(|b| b.name.as_str()).collect();
    let hc = "drain_timeout = \"20s\"\n[pools.health_check]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"500ms\"";
    let variant = |i: usize| -> String {
        let set = if i.is_multiple_of(2) {
            vec![(names[0], 1), (names[1], 1)]
        } else {
            vec![(names[2], 1), (names[3], 1)]
        };
        cfg(&["l"], "round-robin", &set, hc)
    };
    let dir = tempdir::Dir::new();
    let (fg, path) = start_file(&dir, "flowgate.toml", &variant(0));
    let pool = fg.pool("p").unwrap();
    assert!(
        wait_until(LIVENESS, || pool.backends().iter().all(|b| b.is_usable())).await,
        "initial backends never came up"
    );

    let (load, _) = reload_under_load(&fg, &path, 4, 1, RELOADS, 30, variant).await;
    let (ok, failed) = load.totals();
    eprintln!("full swaps with health checks: {RELOADS} reloads, {ok} ok, {failed} failed");
    load.assert_none_failed();
    assert!(ok > 0);
}

/// A reload that fails part-way changes nothing: a new listener whose port is taken
/// (the last of several changes: a backend swapped, the algorithm, a new pool), or
/// an access-log file that cannot be opened (or a missing `/dev/log`). The old pool objects, backends,
/// listeners and settings stay, and traffic goes on as before; then a good reload
/// of the same changes applies them (so the checks can see a change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reload_changes_nothing() {
    let [a, b]: [_; 2] = start_backends(Kind::Identity).await;
    let dir = tempdir::Dir::new();
    let (fg, path) = start_file(
        &dir,
        "flowgate.toml",
        &cfg(&["l"], "round-robin", &[(&a.name, 1)], ""),
    );
    let lb = fg.local_addr("l").unwrap();
    let pool = fg.pool("p").unwrap();
    let before = pool.backends();
    let (mut held, name) = connect_identity(lb).await;
    assert_eq!(name, a.name);

    // Someone else's socket (no SO_REUSEPORT): flowgate cannot bind there.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let new_log = dir.0.join("new-access.log");
    let changes = |listener_bind: &str, log: &str| {
        cfg(&["l"], "least-connections", &[(&b.name, 1)], "")
            + &format!(
                "\n[[listeners]]\nname = \"m\"\nbind = \"{listener_bind}\"\npool = \"q\"\n\n\
             [[pools]]\nname = \"q\"\nbackends = [ {{ address = \"{}\" }} ]\n\n\
             [log]\naccess_log = \"{log}\"\n",
                a.name
            )
    };
    let mut cases = vec![
        (
            changes(
                &taken.local_addr().unwrap().to_string(),
                &new_log.display().to_string(),
            ),
            "cannot bind",
        ),
        (
            changes("127.0.0.1:0", "/nonexistent-flowgate-dir/access.log"),
            "log.access_log: cannot open",
        ),
    ];
    // Without a syslog daemon (CI's machines have none), so does a switch to it.
    if !std::path::Path::new("/dev/log").exists() {
        cases.push((
            changes("127.0.0.1:0", "syslog"),
            "log.access_log: cannot open syslog socket /dev/log",
        ));
    }
    for (text, why) in &cases {
        let new = flowgate::Config::parse(text, &path).expect("the new config is valid");
        let e = fg.apply(new).expect_err("the reload fails").to_string();
        assert!(e.contains(why), "{e}");

        let now = fg.pool("p").expect("pool p stays");
        assert!(Arc::ptr_eq(&now, &pool), "the same pool object");
        let after = now.backends();
        assert_eq!(after.len(), 1);
        assert!(
            Arc::ptr_eq(&after[0], &before[0]),
            "the same backend object"
        );
        assert!(now.retiring().is_empty(), "no backend drains");
        assert_eq!(
            now.config().algorithm,
            flowgate::config::Algorithm::RoundRobin
        );
        assert!(fg.pool("q").is_none(), "no new pool");
        assert!(fg.local_addr("m").is_none(), "no new listener");
        assert_eq!(fg.local_addr("l"), Some(lb), "the old listener stays");
        assert!(!new_log.exists(), "no access-log file created");
        let counts = spread(lb, 3).await;
        assert_eq!(counts.get(&a.name), Some(&3), "{counts:?}");
        assert_eq!(fg.listener("l").unwrap().shared.settings().pool_name(), "p");
    }
    // The held connection never noticed.
    assert!(!closed_within(&mut held, Duration::from_millis(200)).await);

    // The same changes with a free port and a writable log apply.
    drop(taken);
    let good = changes("127.0.0.1:0", &new_log.display().to_string());
    fg.apply(flowgate::Config::parse(&good, &path).unwrap())
        .expect("a good reload applies");
    assert!(fg.local_addr("m").is_some());
    assert!(fg.pool("q").is_some());
    assert_eq!(
        fg.pool("p").unwrap().backends()[0].name,
        b.name.as_str().into()
    );
    assert!(new_log.exists());
}

/// A backend a reload removed and the next reload adds back while it still drains
/// takes back its draining entry, connections included (issue 10, item 6): its
/// streams are not cut at the old deadline, and the API lists it once, up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_added_back_while_draining_keeps_its_connections() {
    let [a, b]: [_; 2] = start_backends(Kind::Identity).await;
    let dir = tempdir::Dir::new();
    let both = cfg(
        &["l"],
        "round-robin",
        &[(&a.name, 1), (&b.name, 1)],
        "drain_timeout = \"1s\"",
    );
    let (fg, path) = start_file(&dir, "flowgate.toml", &both);
    let (lb, admin) = (fg.local_addr("l").unwrap(), fg.admin_addr().unwrap());
    let mut on_b = hold_on(lb, &b.name, 3).await;

    std::fs::write(
        &path,
        cfg(
            &["l"],
            "round-robin",
            &[(&a.name, 1)],
            "drain_timeout = \"1s\"",
        ),
    )
    .unwrap();
    api_reload(admin).await;
    let pools = get_pools(admin).await;
    assert_eq!(
        backend_entries(&pools, "p", &b.name)[0]["state"],
        "draining",
        "{pools}"
    );
    std::fs::write(&path, &both).unwrap();
    api_reload(admin).await;

    // Past the old deadline: the streams on b are still there and b is up, once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (i, c) in on_b.iter_mut().enumerate() {
        echo(c, format!("still here {i}").as_bytes())
            .await
            .expect("a stream on the re-added backend survives its old drain deadline");
    }
    let pools = get_pools(admin).await;
    let entries = backend_entries(&pools, "p", &b.name);
    assert_eq!(entries.len(), 1, "{pools}");
    assert_eq!(entries[0]["state"], "up", "{pools}");
    assert_eq!(entries[0]["removed"], false, "{pools}");
    assert_eq!(entries[0]["active_connections"], 3, "{pools}");
    let counts = spread(lb, 4).await;
    assert_eq!(counts.get(&b.name), Some(&2), "{counts:?}");
}
