//! systemd integration (issue 15, item 5): the `Type=notify` protocol spoken by the
//! real binary to a notify socket the test binds (READY=1 only once the listener
//! accepts, WATCHDOG=1 every half `WatchdogSec`, RELOADING=1 with MONOTONIC_USEC then
//! READY=1 around a SIGHUP reload, STOPPING=1 at SIGTERM), and the shipped unit
//! checked by `systemd-analyze verify` where that tool is installed.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The next notification, or `None` after `limit`.
fn next(sock: &UnixDatagram, limit: Duration) -> Option<String> {
    sock.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Notifications until one contains `want`; panics after `limit`.
fn wait_for(sock: &UnixDatagram, want: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match next(sock, left) {
            Some(m) if m.lines().any(|l| l == want) => return m,
            Some(m) => seen.push(m),
            None => break,
        }
    }
    panic!("no {want:?} within {limit:?}; got {seen:?}");
}

#[test]
fn notify_protocol_ready_watchdog_reload_stopping() {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempdir::Dir::new();
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listen.local_addr().unwrap().port();
    drop(listen);
    let cfg = dir.file(
        "flowgate.toml",
        &format!(
            "[runtime]\nshutdown_timeout = \"1s\"\nupgrade_socket = \"{}\"\n\n[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:{port}\"\npool = \"p\"\n\n\
             [[pools]]\nname = \"p\"\nbackends = [ {{ address = \"{}\" }} ]\n",
            dir.0.join("flowgate.sock").display(),
            backend.local_addr().unwrap()
        ),
    );
    let path = dir.0.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);

    let ready = wait_for(&sock, "READY=1", Duration::from_secs(20));
    assert!(ready.contains("STATUS=serving"), "{ready:?}");
    // READY=1 means serving: the listener takes a connection at once.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("listener bound by READY=1");

    // A 0.4 s watchdog: pings every 0.2 s.
    for _ in 0..3 {
        wait_for(&sock, "WATCHDOG=1", Duration::from_secs(10));
    }

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let reloading = wait_for(&sock, "RELOADING=1", Duration::from_secs(10));
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "systemd 253+ needs MONOTONIC_USEC with RELOADING=1: {reloading:?}"
    );
    wait_for(&sock, "READY=1", Duration::from_secs(10));

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_for(&sock, "STOPPING=1", Duration::from_secs(10));
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_shipped_unit_verifies() {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/systemd/flowgate.service"),
    )
    .unwrap();
    for line in [
        "Type=notify",
        "ExecStart=/usr/local/bin/flowgate run --config /etc/flowgate/flowgate.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=10s",
        "LimitNOFILE=1048576",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "MemoryDenyWriteExecute=yes",
        "RuntimeDirectory=flowgate",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line:?}");
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed: the unit's syntax is not verified");
        return;
    }
    // verify wants ExecStart's binary to exist: point it at this build.
    let dir = tempdir::Dir::new();
    let local = unit.replace("/usr/local/bin/flowgate", bin().to_str().unwrap());
    let path = dir.file("flowgate.service", &local);
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // An unknown or misspelt key is only a warning (exit 0): none is allowed.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {:?}\n{stderr}",
        out.status
    );
}
