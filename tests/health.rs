//! Active health checks and passive ejection against real backend processes
//! (`tests/support/backend.py`): SIGKILL and restart, SIGSTOP/SIGCONT, tcp send/expect,
//! a probe port apart from the traffic port, HTTP status ranges, the starting state,
//! passive ejection, `when_all_down`, and one log line per flip.
//!
//! Waits are on events (a backend's state, the probes a backend has answered), never
//! fixed sleeps. Time bounds are liveness limits several times what the config
//! implies, so they fail a test only when something does not happen at all or takes
//! far longer than the config says.
//!
//! Pools that must show where a client went use `connect_attempts = 1`: a client sent
//! to a dead or stopped backend then fails (closed, or hangs) instead of being retried
//! elsewhere, so "every client was served by b" shows the pick avoided a.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use flowgate::backend::{Backend, BackendState};
use flowgate::Flowgate;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long something that should happen "at once" may take before the test fails.
const LIVENESS: Duration = Duration::from_secs(10);

/// How one backend process is started.
#[derive(Clone, Default)]
struct Opts {
    /// Traffic port (0: any); a restart passes the old one.
    port: u16,
    /// Health status while not flagged down (default 200).
    ok_status: Option<u16>,
    /// Reply to "PING" (default "PONG").
    ping_reply: Option<&'static str>,
    /// Traffic port only echoes: no HTTP, no PING there.
    plain: bool,
    /// Start with the health endpoint answering 503.
    down: bool,
}

/// `tests/support/backend.py` as a child process on 127.0.0.1: an identity+echo
/// traffic port and an HTTP health port, both read back from its "ready" line.
struct Py {
    child: Child,
    /// Held so the child sees EOF on stdin (and exits) whenever this test process ends.
    _stdin: ChildStdin,
    addr: SocketAddr,
    health_port: u16,
    /// Lines it printed after "ready": "health STATUS", "ping".
    events: Arc<Mutex<Vec<String>>>,
    /// Holds the down flag file.
    dir: tempdir::Dir,
}

impl Py {
    fn spawn(o: Opts) -> Py {
        let dir = tempdir::Dir::new();
        let flag = dir.0.join("down");
        if o.down {
            std::fs::write(&flag, "").unwrap();
        }
        let mut cmd = Command::new("python3");
        cmd.arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/backend.py"
        ))
        .arg("--port")
        .arg(o.port.to_string())
        .arg("--down-flag")
        .arg(&flag)
        .arg("--ok-status")
        .arg(o.ok_status.unwrap_or(200).to_string())
        .arg("--ping-reply")
        .arg(o.ping_reply.unwrap_or("PONG"));
        if o.plain {
            cmd.arg("--plain");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python3 tests/support/backend.py");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let ev = events.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match tx.take() {
                    Some(tx) => {
                        let _ = tx.send(line);
                    }
                    None => ev.lock().unwrap().push(line),
                }
            }
        });
        let ready = rx
            .recv_timeout(LIVENESS)
            .expect("backend.py printed its ports");
        let ports: Vec<u16> = ready
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("unexpected first line from backend.py: {ready:?}"))
            .split(' ')
            .map(|p| p.parse().unwrap())
            .collect();
        Py {
            child,
            _stdin: stdin,
            addr: SocketAddr::from(([127, 0, 0, 1], ports[0])),
            health_port: ports[1],
            events,
            dir,
        }
    }

    /// The backend's name in flowgate, and what its traffic port says it is.
    fn name(&self) -> String {
        self.addr.to_string()
    }

    fn signal(&self, sig: Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Health requests answer 503 while `down`.
    fn set_down(&self, down: bool) {
        let flag = self.dir.0.join("down");
        if down {
            std::fs::write(flag, "").unwrap();
        } else {
            std::fs::remove_file(flag).unwrap();
        }
    }

    /// Events that start with `prefix` so far.
    fn count(&self, prefix: &str) -> usize {
        let ev = self.events.lock().unwrap();
        ev.iter().filter(|l| l.starts_with(prefix)).count()
    }

    /// Waits until it has printed `n` events starting with `prefix`.
    async fn await_count(&self, prefix: &str, n: usize) {
        assert!(
            wait_until(LIVENESS, || self.count(prefix) >= n).await,
            "{}: {} of {n} {prefix:?} events in {LIVENESS:?}",
            self.name(),
            self.count(prefix)
        );
    }

    /// Waits until it has printed `more` events starting with `prefix` beyond those so far.
    async fn await_more(&self, prefix: &str, more: usize) {
        let n = self.count(prefix);
        self.await_count(prefix, n + more).await;
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        // SIGKILL also ends a stopped process.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pool keys (`pool`) and a `[pools.health_check]` table (`check`, empty for none) for
/// `common::config`'s `extra_pool`.
fn pool_extra(pool: &str, check: &str) -> String {
    if check.is_empty() {
        pool.to_string()
    } else {
        format!("{pool}\n[pools.health_check]\n{check}\n")
    }
}

/// Flowgate in-process over `backends`, round-robin, weight 1 each.
fn start_over(backends: &[SocketAddr], pool: &str, check: &str) -> Flowgate {
    let list: Vec<_> = backends.iter().map(|&a| (a, 1)).collect();
    start(&config("round-robin", &list, "", &pool_extra(pool, check)))
}

/// An HTTP probe of /health every 200 ms with a 300 ms timeout, up after `rise`
/// passes in a row and down after `fall` failures.
fn http_check(rise: u32, fall: u32) -> String {
    format!(
        r#"kind = "http"
path = "/health"
interval = "200ms"
timeout = "300ms"
rise = {rise}
fall = {fall}"#
    )
}

/// Two backend processes started alike, behind flowgate (`start_over`).
struct Two {
    a: Py,
    b: Py,
    /// Kept running for as long as the fixture lives.
    _fg: Flowgate,
    /// Flowgate's listener "l".
    addr: SocketAddr,
    pool: Arc<flowgate::pool::Pool>,
    /// `a` and `b` as flowgate's backends.
    ba: Arc<Backend>,
    bb: Arc<Backend>,
}

impl Two {
    /// Waits until both backends are in `state`.
    async fn wait_both(&self, state: BackendState, limit: Duration) {
        wait_state(&self.ba, state, limit).await;
        wait_state(&self.bb, state, limit).await;
    }
}

/// Starts two backends with `opts` and flowgate over them (pool keys `pool`, health
/// check `check`).
fn two_behind(opts: Opts, pool: &str, check: &str) -> Two {
    let a = Py::spawn(opts.clone());
    let b = Py::spawn(opts);
    let fg = start_over(&[a.addr, b.addr], pool, check);
    let addr = fg.local_addr("l").unwrap();
    let pool = fg.pool("p").unwrap();
    let (ba, bb) = (backend(&fg, &a.name()), backend(&fg, &b.name()));
    Two {
        a,
        b,
        _fg: fg,
        addr,
        pool,
        ba,
        bb,
    }
}

/// Two backends flagged down from the start (health answers 503, the traffic ports
/// serve) behind flowgate with pool keys `pool` and `http_check(1, 1)`; returns once
/// each has failed its first probe.
async fn two_flagged_down(pool: &str) -> Two {
    let opts = Opts {
        down: true,
        ..Opts::default()
    };
    let t = two_behind(opts, pool, &http_check(1, 1));
    assert_eq!(first_check(&t.ba).await, "bad status 503");
    assert_eq!(first_check(&t.bb).await, "bad status 503");
    t
}

/// Asserts the pool counts as all down.
fn assert_never_passed(pool: &flowgate::pool::Pool) {
    assert!(
        pool.all_down(),
        "pool.all_down() must be true: no backend has passed a health check"
    );
}

/// Backend `name` of pool "p".
fn backend(fg: &Flowgate, name: &str) -> Arc<Backend> {
    fg.pool("p")
        .unwrap()
        .find(name)
        .unwrap_or_else(|| panic!("no backend {name} in pool p"))
}

fn detail(b: &Backend) -> String {
    b.last_check()
        .map_or_else(|| "<never checked>".into(), |c| c.detail)
}

/// Waits until `b` is in `state`; fails with the last check's detail.
async fn wait_state(b: &Backend, state: BackendState, limit: Duration) {
    assert!(
        wait_until(limit, || b.state() == state).await,
        "{} still {} after {limit:?} (waiting for {}); last check: {}",
        b.name,
        b.state().as_str(),
        state.as_str(),
        detail(b)
    );
}

/// Waits until `b` has been probed at least once and says what the last probe found.
async fn first_check(b: &Backend) -> String {
    assert!(
        wait_until(LIVENESS, || b.last_check().is_some()).await,
        "{} never probed",
        b.name
    );
    detail(b)
}

/// What became of one client.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// A backend answered with its name and echoed the client's line.
    Served(String),
    /// Connect failed, or the connection ended (EOF or reset) with no byte received.
    Closed,
    /// Nothing came back within `LIVENESS` (a stopped backend).
    Hung,
}

/// One client through flowgate: sends "hello\n", expects "NAME\nhello\n".
async fn attempt(addr: SocketAddr) -> Outcome {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return Outcome::Closed;
    };
    let _ = s.write_all(b"hello\n").await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(LIVENESS, async {
        let mut buf = [0u8; 256];
        while got.iter().filter(|&&c| c == b'\n').count() < 2 {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got).into_owned();
    match (read, text.split_once('\n')) {
        (_, Some((name, "hello\n"))) => Outcome::Served(name.to_string()),
        (Err(_), _) if got.is_empty() => Outcome::Hung,
        (Ok(()), _) if got.is_empty() => Outcome::Closed,
        _ => panic!("garbled reply through flowgate: {text:?}"),
    }
}

/// `n` clients one after another; each must be served. Returns who served them.
async fn serve_n(addr: SocketAddr, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for i in 0..n {
        match attempt(addr).await {
            Outcome::Served(name) => names.push(name),
            o => panic!("client {i}: {o:?}; served so far: {names:?}"),
        }
    }
    names
}

/// Asserts every one of `n` clients is served by `who`.
async fn all_served_by(addr: SocketAddr, n: usize, who: &str) {
    let names = serve_n(addr, n).await;
    assert!(
        names.iter().all(|s| s == who),
        "expected every client on {who}, got {names:?}"
    );
}

/// Serves `n` clients and asserts `who` served at least one.
async fn some_served_by(addr: SocketAddr, n: usize, who: &str) {
    let names = serve_n(addr, n).await;
    assert!(
        names.iter().any(|s| s == who),
        "expected {who} back in rotation, got {names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_backend_goes_down_and_is_back_after_restart_on_its_port() {
    let t = two_behind(
        Opts::default(),
        "connect_attempts = 1",
        r#"kind = "tcp"
interval = "200ms"
timeout = "300ms"
rise = 2
fall = 3"#,
    );
    t.wait_both(BackendState::Up, LIVENESS).await;
    some_served_by(t.addr, 4, &t.a.name()).await;

    let (port, name) = (t.a.addr.port(), t.a.name());
    t.a.signal(Signal::SIGKILL);
    drop(t.a);
    // interval × fall + timeout is 0.9 s (interval jitter: +10%); allow 3× plus slack.
    wait_state(&t.ba, BackendState::Down, Duration::from_secs(5)).await;
    assert_eq!(detail(&t.ba), "refused");
    assert!(!t.ba.is_healthy());
    assert_eq!(t.bb.state(), BackendState::Up, "b: {}", detail(&t.bb));
    all_served_by(t.addr, 10, &t.b.name()).await;

    let a = Py::spawn(Opts {
        port,
        ..Opts::default()
    });
    assert_eq!(a.name(), name, "restarted on the same port");
    // rise × interval is 0.4 s.
    wait_state(&t.ba, BackendState::Up, Duration::from_secs(5)).await;
    assert!(t.ba.is_healthy());
    some_served_by(t.addr, 10, &name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstopped_backend_fails_the_http_probe_and_recovers_after_sigcont() {
    let t = two_behind(Opts::default(), "connect_attempts = 1", &http_check(2, 2));
    t.wait_both(BackendState::Up, LIVENESS).await;

    // Stopped, its kernel still completes handshakes: only the HTTP answer is missing.
    t.a.signal(Signal::SIGSTOP);
    wait_state(&t.ba, BackendState::Down, Duration::from_secs(5)).await;
    assert_eq!(detail(&t.ba), "timeout");
    // A client sent to a would hang (and fail as Hung).
    all_served_by(t.addr, 6, &t.b.name()).await;

    t.a.signal(Signal::SIGCONT);
    wait_state(&t.ba, BackendState::Up, Duration::from_secs(5)).await;
    assert_eq!(detail(&t.ba), "ok");
    some_served_by(t.addr, 10, &t.a.name()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_probe_sends_and_expects_a_reply() {
    let wrong = Py::spawn(Opts {
        ping_reply: Some("WRONG"),
        ..Opts::default()
    });
    let pong = Py::spawn(Opts::default());
    let fg = start_over(
        &[wrong.addr, pong.addr],
        "connect_attempts = 1",
        r#"kind = "tcp"
send = "PING\r\n"
expect = "PONG"
interval = "200ms"
timeout = "500ms"
rise = 1
fall = 1"#,
    );
    let addr = fg.local_addr("l").unwrap();
    let (bw, bp) = (backend(&fg, &wrong.name()), backend(&fg, &pong.name()));
    wait_state(&bp, BackendState::Up, LIVENESS).await;
    assert_eq!(detail(&bp), "ok");
    // Several probes answered, every one of them wrongly.
    wrong.await_count("ping", 3).await;
    assert_eq!(detail(&bw), "unexpected reply");
    assert_eq!(bw.state(), BackendState::Down);
    assert!(!bw.is_healthy());
    all_served_by(addr, 6, &pong.name()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_port_decides_health_while_traffic_goes_to_the_traffic_port() {
    // Its traffic port only echoes: an HTTP probe sent there would fail, and a client
    // sent to the health port would get an HTTP response instead of the echo.
    let a = Py::spawn(Opts {
        plain: true,
        ..Opts::default()
    });
    let fg = start_over(
        &[a.addr],
        "connect_attempts = 1",
        &format!("{}\nport = {}", http_check(1, 1), a.health_port),
    );
    let addr = fg.local_addr("l").unwrap();
    let ba = backend(&fg, &a.name());
    wait_state(&ba, BackendState::Up, LIVENESS).await;
    assert!(a.count("health 200") >= 1, "the health port was probed");
    all_served_by(addr, 3, &a.name()).await;

    a.set_down(true);
    wait_state(&ba, BackendState::Down, LIVENESS).await;
    assert_eq!(detail(&ba), "bad status 503");
    assert_eq!(attempt(addr).await, Outcome::Closed, "no backend is up");

    a.set_down(false);
    wait_state(&ba, BackendState::Up, LIVENESS).await;
    all_served_by(addr, 3, &a.name()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_status_outside_expect_status_is_down() {
    let ok = Py::spawn(Opts::default());
    let flagged = Py::spawn(Opts::default());
    // 302 is inside the default 200-399, outside the configured 200-299.
    let redirect = Py::spawn(Opts {
        ok_status: Some(302),
        ..Opts::default()
    });
    let fg = start_over(
        &[ok.addr, flagged.addr, redirect.addr],
        "connect_attempts = 1",
        &format!("{}\nexpect_status = \"200-299\"", http_check(1, 2)),
    );
    let addr = fg.local_addr("l").unwrap();
    let (bo, bf, br) = (
        backend(&fg, &ok.name()),
        backend(&fg, &flagged.name()),
        backend(&fg, &redirect.name()),
    );
    wait_state(&bo, BackendState::Up, LIVENESS).await;
    wait_state(&bf, BackendState::Up, LIVENESS).await;
    redirect.await_count("health 302", 3).await;
    assert_eq!(detail(&br), "bad status 302");
    assert_eq!(br.state(), BackendState::Down);

    flagged.set_down(true);
    wait_state(&bf, BackendState::Down, LIVENESS).await;
    assert_eq!(detail(&bf), "bad status 503");
    assert!(!bf.is_healthy());
    all_served_by(addr, 6, &ok.name()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_start_down_and_are_used_after_their_first_success() {
    // Stopped before flowgate starts: its kernel accepts connections, nothing answers,
    // so a client sent there hangs.
    let silent = Py::spawn(Opts::default());
    silent.signal(Signal::SIGSTOP);
    let healthy = Py::spawn(Opts::default());
    // A long interval and rise = 3: up within half an interval means the first probe
    // ran at once, and after one answered probe, not three.
    let fg = start_over(
        &[silent.addr, healthy.addr],
        "connect_attempts = 1",
        r#"kind = "http"
path = "/health"
interval = "10s"
timeout = "500ms"
rise = 3
fall = 3"#,
    );
    let addr = fg.local_addr("l").unwrap();
    let (bs, bh) = (backend(&fg, &silent.name()), backend(&fg, &healthy.name()));
    // The very first client: served by the healthy one if its probe has passed
    // already, refused if not; never sent to the silent one.
    match attempt(addr).await {
        Outcome::Closed => {}
        Outcome::Served(n) if n == healthy.name() => {}
        o => panic!("first client, before any verdict: {o:?}"),
    }
    wait_state(&bh, BackendState::Up, Duration::from_secs(5)).await;
    healthy.await_count("health 200", 1).await;
    assert_eq!(healthy.count("health"), 1, "up after its first success");

    assert_eq!(first_check(&bs).await, "timeout");
    assert_eq!(bs.state(), BackendState::Down);
    assert!(!bs.is_healthy());
    all_served_by(addr, 10, &healthy.name()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_after_consecutive_connect_failures() {
    let dead = dead_addr();
    let live = TestBackend::start(Kind::Identity).await;
    let fg = start_over(
        &[dead, live.addr],
        "[pools.passive]\nconsecutive_failures = 3\neject_for = \"1s\"",
        "",
    );
    let addr = fg.local_addr("l").unwrap();
    let bd = backend(&fg, &dead.to_string());
    assert_eq!(
        bd.state(),
        BackendState::Up,
        "no active checks: up at start"
    );

    // Each client tries the dead backend at most once, then is retried on the live one.
    let mut clients = 0;
    while bd.state() == BackendState::Up {
        assert!(clients < 30, "not ejected after {clients} clients");
        assert_eq!(attempt(addr).await, Outcome::Served(live.name.clone()));
        clients += 1;
    }
    assert!(
        clients >= 3,
        "ejected after {clients} clients: fewer than 3 connect failures"
    );
    assert_eq!(bd.state(), BackendState::Down);
    assert!(!bd.is_healthy());

    // Its port now serves: a client picked for it would be served there. While it stays
    // ejected, every client must still go to the live one.
    let revived = TestBackend::start_on(dead, Kind::Identity).await;
    let mut while_ejected = 0;
    while while_ejected < 10 {
        let o = attempt(addr).await;
        if bd.state() != BackendState::Down {
            break;
        }
        assert_eq!(o, Outcome::Served(live.name.clone()), "while ejected");
        while_ejected += 1;
    }
    assert!(
        while_ejected > 0,
        "ejection ended before any client was sent"
    );

    wait_state(&bd, BackendState::Up, LIVENESS).await;
    assert!(bd.is_healthy());
    some_served_by(addr, 10, &revived.name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_all_down_reject_closes_new_clients() {
    let t = two_behind(
        Opts::default(),
        "when_all_down = \"reject\"",
        &http_check(1, 1),
    );
    t.wait_both(BackendState::Up, LIVENESS).await;
    assert!(!t.pool.all_down());

    t.a.set_down(true);
    t.b.set_down(true);
    t.wait_both(BackendState::Down, LIVENESS).await;
    assert!(
        wait_until(LIVENESS, || t.pool.all_down()).await,
        "pool.all_down() with every backend down"
    );
    for i in 0..3 {
        assert_eq!(attempt(t.addr).await, Outcome::Closed, "client {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_all_down_fail_open_forwards_to_unhealthy_backends() {
    // Health says 503 from the start; the traffic ports serve.
    let t = two_flagged_down("when_all_down = \"fail-open\"").await;
    assert_eq!(t.ba.state(), BackendState::Down);
    assert_eq!(t.bb.state(), BackendState::Down);

    let names = serve_n(t.addr, 6).await;
    assert!(
        names.contains(&t.a.name()) && names.contains(&t.b.name()),
        "fail-open balances over both: {names:?}"
    );
    assert_never_passed(&t.pool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_never_came_up_is_all_down() {
    let t = two_flagged_down("when_all_down = \"reject\"").await;
    t.a.await_count("health 503", 3).await;
    t.b.await_count("health 503", 3).await;
    assert_eq!(attempt(t.addr).await, Outcome::Closed, "no backend is up");
    assert_never_passed(&t.pool);
}

/// Lines of `log` that are about backend `name` and contain `what`.
fn lines_about(log: &str, what: &str, name: &str) -> usize {
    let who = format!("backend={name}");
    log.lines()
        .filter(|l| l.contains(what) && l.split_whitespace().any(|w| w == who))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_flip_is_logged_once_with_its_reason() {
    let a = Py::spawn(Opts::default());
    let cfg = config(
        "round-robin",
        &[(a.addr, 1)],
        "",
        &pool_extra(
            "",
            r#"kind = "http"
path = "/health"
interval = "100ms"
timeout = "300ms"
rise = 2
fall = 2"#,
        ),
    );
    let p = Proc::spawn(&cfg, &[]);
    let name = a.name();
    assert!(p.logged("backend up", LIVENESS).await, "log:\n{}", p.log());
    // Several more probes, all passing.
    a.await_more("health 200", 5).await;

    a.set_down(true);
    assert!(
        p.logged("backend down", LIVENESS).await,
        "log:\n{}",
        p.log()
    );
    // Several more probes, all failing: still one line.
    a.await_more("health 503", 5).await;

    a.set_down(false);
    a.await_more("health 200", 5).await;

    let log = p.log();
    assert_eq!(lines_about(&log, "backend up", &name), 2, "log:\n{log}");
    assert_eq!(lines_about(&log, "backend down", &name), 1, "log:\n{log}");
    let down = log.lines().find(|l| l.contains("backend down")).unwrap();
    assert!(down.contains("reason=bad status 503"), "{down}");
    assert_eq!(
        log.matches("every backend of the pool is down").count(),
        1,
        "log:\n{log}"
    );
}
