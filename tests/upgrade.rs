//! Zero-drop binary upgrade (issue 15): real processes handing their sockets over
//! on `runtime.upgrade_socket` (`flowgate run --upgrade-from PATH`), under load;
//! the refusals (broken config, a second upgrade in flight, nobody answering); the
//! single-instance lock; UDP sessions staying with the old process.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// Generous: the machine is shared and noisy.
const LONG: Duration = Duration::from_secs(60);

/// A config with one TCP listener over `backend`, the admin API, and `sock` as
/// the upgrade socket. `extra` is appended (a UDP listener, say).
fn config(backend: SocketAddr, sock: &Path, extra: &str) -> String {
    format!(
        r#"
[runtime]
workers = 2
shutdown_timeout = "120s"
upgrade_socket = "{}"

[admin]
bind = "127.0.0.1:0"

[[listeners]]
name = "l"
bind = "127.0.0.1:0"
pool = "p"

[[pools]]
name = "p"
backends = [ {{ address = "{backend}" }} ]
{extra}
"#,
        sock.display()
    )
}

/// `flowgate run --upgrade-from sock` on `toml`.
fn upgrade(toml: &str, sock: &Path) -> Proc {
    Proc::spawn_with(toml, &[], &["--upgrade-from", sock.to_str().unwrap()])
}

/// GET `path` on the admin API with a plain HTTP/1.1 request: (status, body).
async fn get(admin: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(admin).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((status, body))
}

async fn status(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = get(admin, "/api/v1/status").await.unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// One short connection: 64 bytes there and back.
async fn short(addr: SocketAddr, n: usize) -> Result<(), String> {
    let work = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let msg = [n as u8; 64];
        s.write_all(&msg).await.map_err(|e| e.to_string())?;
        let mut back = [0u8; 64];
        s.read_exact(&mut back).await.map_err(|e| e.to_string())?;
        if back != msg {
            return Err("wrong bytes".into());
        }
        Ok(())
    };
    tokio::time::timeout(LONG, work)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// A long stream: 4 KiB every 50 ms until `stop`, then half-close; returns
/// (bytes sent, bytes echoed back).
async fn long_stream(addr: SocketAddr, stop: Arc<AtomicBool>) -> Result<(usize, usize), String> {
    let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut r, mut w) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0usize;
        loop {
            match tokio::time::timeout(LONG, r.read(&mut buf)).await {
                Ok(Ok(0)) => return Ok(got),
                Ok(Ok(n)) => {
                    if buf[..n].iter().any(|&b| b != 0x5a) {
                        return Err("wrong bytes".to_string());
                    }
                    got += n;
                }
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("read timed out".into()),
            }
        }
    });
    let chunk = vec![0x5au8; 4096];
    let mut sent = 0;
    while !stop.load(Ordering::SeqCst) {
        w.write_all(&chunk).await.map_err(|e| e.to_string())?;
        sent += chunk.len();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.shutdown().await.map_err(|e| e.to_string())?;
    let got = reader.await.map_err(|e| e.to_string())??;
    Ok((sent, got))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_upgrades_under_load_drop_nothing() {
    let backend = TestBackend::start(Kind::Echo).await;
    let dir = tempdir::Dir::new();
    let sock = dir.0.join("run/flowgate.sock");
    let toml = config(backend.addr, &sock, "");
    let first = Proc::spawn(&toml, &[]);
    let addr = first.addr("l");
    let admin = first.admin();
    assert!(
        std::fs::metadata(&sock).is_ok(),
        "the parent directory is created: {}",
        first.log()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let stop = Arc::new(AtomicBool::new(false));
    let longs: Vec<_> = (0..20)
        .map(|_| tokio::spawn(long_stream(addr, stop.clone())))
        .collect();
    // 50 short connections a second, and /healthz polled throughout.
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let load = {
        let (stop, ok, failed, errors) = (stop.clone(), ok.clone(), failed.clone(), errors.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut conns = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                n += 1;
                let (ok, failed, errors) = (ok.clone(), failed.clone(), errors.clone());
                conns.push(tokio::spawn(async move {
                    match short(addr, n).await {
                        Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            errors.lock().unwrap().push(e);
                            failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                }));
            }
            for c in conns {
                c.await.unwrap();
            }
        })
    };
    // Beside the steady rate, 8 clients back to back: connections are queued on
    // the sockets at the moment a process stops accepting, which would be lost
    // if a socket were closed instead of handed over.
    let hammers: Vec<_> = (0..8)
        .map(|h| {
            let (stop, ok, failed, errors) =
                (stop.clone(), ok.clone(), failed.clone(), errors.clone());
            tokio::spawn(async move {
                let mut n = h;
                while !stop.load(Ordering::SeqCst) {
                    n += 8;
                    match short(addr, n).await {
                        Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            errors.lock().unwrap().push(e);
                            failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                }
            })
        })
        .collect();
    let unhealthy = Arc::new(std::sync::Mutex::new(Vec::new()));
    let health = {
        let (stop, unhealthy) = (stop.clone(), unhealthy.clone());
        tokio::spawn(async move {
            let mut polls = 0;
            while !stop.load(Ordering::SeqCst) {
                match get(admin, "/healthz").await {
                    Ok((200, _)) => {}
                    other => unhealthy.lock().unwrap().push(format!("{other:?}")),
                }
                polls += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            polls
        })
    };

    let mut procs = vec![first];
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let old_pid = procs.last().unwrap().pid();
        let new = upgrade(&toml, &sock);
        assert!(
            new.logged("upgrade complete", LONG).await,
            "upgrade {i}: {}",
            new.log()
        );
        assert!(
            new.log().contains(&format!("old_pid={old_pid}")),
            "{}",
            new.log()
        );
        assert_eq!(new.addr("l"), addr, "the same listening socket");
        assert_eq!(new.admin(), admin);
        // The old process stopped accepting: the admin socket answers from the new.
        let st = status(admin).await;
        assert_eq!(st["pid"], new.pid(), "{st}");
        assert_eq!(st["upgraded_from"], old_pid, "{st}");
        assert!(st["started"].as_u64().unwrap() > 0, "{st}");
        procs.push(new);
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    for h in hammers {
        h.await.unwrap();
    }
    let polls = health.await.unwrap();
    for (i, l) in longs.into_iter().enumerate() {
        let (sent, got) = l
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("long stream {i}: {e}"));
        assert!(sent > 0);
        assert_eq!(sent, got, "long stream {i}: every byte back");
    }
    let failed = failed.load(Ordering::SeqCst);
    assert_eq!(
        failed,
        0,
        "failed short connections: {:?}",
        errors.lock().unwrap()
    );
    let ok = ok.load(Ordering::SeqCst);
    eprintln!("10 upgrades: {ok} short connections, 0 failed; 20 long streams whole; {polls} /healthz polls, all 200");
    assert!(ok > 0);
    assert!(polls > 0);
    assert!(
        unhealthy.lock().unwrap().is_empty(),
        "/healthz: {:?}",
        unhealthy.lock().unwrap()
    );

    // Every old process drained and exited 0; the last one serves until SIGTERM.
    let last = procs.pop().unwrap();
    for (i, mut p) in procs.into_iter().enumerate() {
        let st = p.exited(LONG).await;
        assert!(
            st.is_some_and(|s| s.success()),
            "process {i}: {st:?}\n{}",
            p.log()
        );
        assert!(p.log().contains("handed every socket over"), "{}", p.log());
    }
    let mut last = last;
    short(addr, 1).await.unwrap();
    last.signal(nix::sys::signal::Signal::SIGTERM);
    let st = last.exited(LONG).await;
    assert!(st.is_some_and(|s| s.success()), "{st:?}\n{}", last.log());
    assert!(!sock.exists(), "a plain stop removes the upgrade socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_exits_2_and_the_old_keeps_every_connection() {
    let backend = TestBackend::start(Kind::Echo).await;
    let dir = tempdir::Dir::new();
    let sock = dir.0.join("flowgate.sock");
    let old = Proc::spawn(&config(backend.addr, &sock, ""), &[]);
    let addr = old.addr("l");
    let mut open = TcpStream::connect(addr).await.unwrap();
    open.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.unwrap();

    let mut new = upgrade("[runtime]\nworkers = \"many\"\n", &sock);
    let st = new.exited(LONG).await;
    assert_eq!(st.and_then(|s| s.code()), Some(2), "{}", new.log());
    assert!(new.log().contains("invalid configuration"), "{}", new.log());
    assert!(
        !old.log().contains("upgrade requested"),
        "the old never noticed: {}",
        old.log()
    );

    open.write_all(b"after!").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after!");
    short(addr, 2).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_upgrade_in_flight_is_refused() {
    let backend = TestBackend::start(Kind::Echo).await;
    let dir = tempdir::Dir::new();
    let sock = dir.0.join("flowgate.sock");
    let toml = config(backend.addr, &sock, "");
    let old = Proc::spawn(&toml, &[]);
    let addr = old.addr("l");

    // An upgrade that takes the sockets and never says it serves.
    let mut first = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    use std::io::{BufRead, Write};
    first
        .write_all(b"{\"hello\":\"upgrade\",\"pid\":1}\n")
        .unwrap();
    let mut offer = String::new();
    std::io::BufReader::new(first.try_clone().unwrap())
        .read_line(&mut offer)
        .unwrap();
    assert!(offer.contains("\"sockets\""), "{offer}");

    let mut second = upgrade(&toml, &sock);
    let st = second.exited(LONG).await;
    assert_eq!(st.and_then(|s| s.code()), Some(1), "{}", second.log());
    assert!(
        second
            .log()
            .contains("another upgrade is already in flight"),
        "{}",
        second.log()
    );
    short(addr, 3).await.unwrap();

    // The first one gives up: the old process serves on, and takes the next upgrade.
    drop(first);
    assert!(
        old.logged("upgrade failed; still serving", LONG).await,
        "{}",
        old.log()
    );
    short(addr, 4).await.unwrap();
    let new = upgrade(&toml, &sock);
    assert!(new.logged("upgrade complete", LONG).await, "{}", new.log());
    short(addr, 5).await.unwrap();
}

#[test]
fn upgrade_from_a_socket_nobody_answers_on_exits_1() {
    let dir = tempdir::Dir::new();
    let toml = config(dead_addr(), &dir.0.join("mine.sock"), "");
    let file = dir.file("f.toml", &toml);
    let nobody: PathBuf = dir.0.join("nobody.sock");
    let out = std::process::Command::new(bin())
        .args(["run", "--config"])
        .arg(&file)
        .arg("--upgrade-from")
        .arg(&nobody)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no flowgate answers on"), "{stderr}");
    assert!(
        !dir.0.join("mine.sock").exists(),
        "nothing was started: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_socket_is_a_single_instance_lock() {
    let backend = TestBackend::start(Kind::Echo).await;
    let dir = tempdir::Dir::new();
    let sock = dir.0.join("flowgate.sock");
    // A stale socket file (nobody listens on it) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let toml = config(backend.addr, &sock, "");
    let first = Proc::spawn(&toml, &[]);
    assert!(
        first.log().contains("replacing a stale upgrade socket"),
        "{}",
        first.log()
    );
    let addr = first.addr("l");

    let mut second = Proc::spawn(&toml, &[]);
    let st = second.exited(LONG).await;
    assert_eq!(st.and_then(|s| s.code()), Some(1), "{}", second.log());
    assert!(
        second.log().contains("another flowgate is running"),
        "{}",
        second.log()
    );
    assert!(second.log().contains("--upgrade-from"), "{}", second.log());
    short(addr, 6).await.unwrap();
}

/// A UDP backend: echoes at once, or after `delay` when the datagram starts with
/// "slow".
async fn udp_backend(delay: Duration) -> SocketAddr {
    let s = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        loop {
            let Ok((n, from)) = s.recv_from(&mut buf).await else {
                continue;
            };
            let (s, msg) = (s.clone(), buf[..n].to_vec());
            tokio::spawn(async move {
                if msg.starts_with(b"slow") {
                    tokio::time::sleep(delay).await;
                }
                let _ = s.send_to(&msg, from).await;
            });
        }
    });
    addr
}

async fn udp_ask(s: &UdpSocket, msg: &[u8]) -> Vec<u8> {
    s.send(msg).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(LONG, s.recv(&mut buf))
        .await
        .expect("a reply in time")
        .unwrap();
    buf.truncate(n);
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_sessions_stay_with_the_old_process_until_idle() {
    let tcp = TestBackend::start(Kind::Echo).await;
    let udp = udp_backend(Duration::from_secs(2)).await;
    let dir = tempdir::Dir::new();
    let sock = dir.0.join("flowgate.sock");
    let extra = format!(
        r#"
[[listeners]]
name = "u"
bind = "127.0.0.1:0"
protocol = "udp"
pool = "up"
idle_timeout = "3s"

[[pools]]
name = "up"
backends = [ {{ address = "{udp}" }} ]
"#
    );
    let toml = config(tcp.addr, &sock, &extra);
    let mut old = Proc::spawn(&toml, &[]);
    let uaddr = old.addr("u");
    let admin = old.admin();

    let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    a.connect(uaddr).await.unwrap();
    assert_eq!(udp_ask(&a, b"hello").await, b"hello");
    // The backend answers this one after the upgrade: through the old process's
    // session, which outlives its receive loop.
    a.send(b"slow-1").await.unwrap();

    let new = upgrade(&toml, &sock);
    assert!(new.logged("upgrade complete", LONG).await, "{}", new.log());
    assert_eq!(new.addr("u"), uaddr);
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(LONG, a.recv(&mut buf))
        .await
        .expect("the old session's reply")
        .unwrap();
    assert_eq!(&buf[..n], b"slow-1");

    // A new client's session starts in the new process.
    let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    b.connect(uaddr).await.unwrap();
    assert_eq!(udp_ask(&b, b"new client").await, b"new client");
    let (code, metrics) = get(admin, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    let sessions = metrics
        .lines()
        .find(|l| l.starts_with("flowgate_udp_sessions_total") && l.contains("listener=\"u\""))
        .unwrap_or_else(|| panic!("no udp session count in:\n{metrics}"));
    assert!(
        sessions.ends_with(" 1"),
        "the new process's sessions: {sessions}"
    );

    // The old process ends once its session is idle, long before shutdown_timeout.
    let st = old.exited(LONG).await;
    assert!(st.is_some_and(|s| s.success()), "{st:?}\n{}", old.log());
    assert!(old.log().contains("graceful=true"), "{}", old.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_counts_and_listeners_may_differ() {
    let backend = TestBackend::start(Kind::Echo).await;
    let dir = tempdir::Dir::new();
    let sock = dir.0.join("flowgate.sock");
    let with = |workers: usize, extra: &str| {
        config(backend.addr, &sock, extra).replace("workers = 2", &format!("workers = {workers}"))
    };
    let m = "\n[[listeners]]\nname = \"m\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n";
    let first = Proc::spawn(&with(1, ""), &[]);
    let addr = first.addr("l");

    // More workers, and a listener the old process did not have: bound fresh.
    let second = upgrade(&with(3, m), &sock);
    assert!(
        second.logged("upgrade complete", LONG).await,
        "{}",
        second.log()
    );
    assert!(
        second.log().contains("listener=l given=1 sockets=3"),
        "{}",
        second.log()
    );
    let m_addr = second.addr("m");
    for n in 0..30 {
        short(addr, n).await.unwrap();
        short(m_addr, n).await.unwrap();
    }

    // Fewer workers, and "m" dropped: every socket of "l" is still served, "m"
    // is not taken and closes with the process that had it.
    let mut second = second;
    let third = upgrade(&with(2, ""), &sock);
    assert!(
        third.logged("upgrade complete", LONG).await,
        "{}",
        third.log()
    );
    assert!(
        third.log().contains("listener=l given=3 sockets=3"),
        "{}",
        third.log()
    );
    for n in 0..30 {
        short(addr, n).await.unwrap();
    }
    let st = second.exited(LONG).await;
    assert!(st.is_some_and(|s| s.success()), "{st:?}\n{}", second.log());
    let refused = TcpStream::connect(m_addr).await;
    assert!(refused.is_err(), "m is closed once its last holder exits");
}

/// An unprivileged user without `runtime.upgrade_socket`: the default under /run
/// cannot be made, and flowgate starts anyway, saying upgrades are off. (Runs
/// where the tests run as root and `setpriv` is installed; skipped otherwise.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprivileged_default_only_warns() {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let setpriv = std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !root || !setpriv {
        eprintln!("skipped: needs root and setpriv to run the binary as nobody");
        return;
    }
    let backend = TestBackend::start(Kind::Echo).await;
    // The comment names the key, so the harness adds no upgrade_socket of its own.
    let toml = format!(
        "# no upgrade_socket: the default\n[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n\
         [[pools]]\nname = \"p\"\nbackends = [ {{ address = \"{}\" }} ]\n",
        backend.addr
    );
    let pre = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    let p = Proc::spawn(&toml, &pre);
    assert!(p.log().contains("flowgate started"), "{}", p.log());
    assert!(
        p.log()
            .contains("binary upgrades and the single-instance lock are off"),
        "{}",
        p.log()
    );
    short(p.addr("l"), 7).await.unwrap();
}
