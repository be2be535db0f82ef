//! Test harness: real backends on loopback (in-process tokio tasks or the flowgate
//! binary as a child process), all on port 0, with readiness read back, never slept on.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flowgate::{Config, Flowgate};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What a test backend does with each connection.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// Writes back everything it reads; closes after the client's FIN.
    Echo,
    /// Writes its own name and a newline first, then echoes.
    Identity,
    /// Reads and discards; closes after the client's FIN.
    Sink,
}

/// A backend server running as tasks in the test's runtime.
pub struct TestBackend {
    pub addr: SocketAddr,
    pub name: String,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
    conns: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
}

impl TestBackend {
    pub async fn start(kind: Kind) -> TestBackend {
        Self::start_on("127.0.0.1:0".parse().unwrap(), kind).await
    }

    pub async fn start_on(addr: SocketAddr, kind: Kind) -> TestBackend {
        let listener = TcpListener::bind(addr).await.expect("bind test backend");
        let addr = listener.local_addr().unwrap();
        let name = addr.to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let conns: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Default::default();
        let (acc, cs, nm) = (accepted.clone(), conns.clone(), name.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                let nm = nm.clone();
                let h = tokio::spawn(async move {
                    let _ = s.set_nodelay(true);
                    if let Kind::Identity = kind {
                        if s.write_all(format!("{nm}\n").as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if !matches!(kind, Kind::Sink)
                                    && s.write_all(&buf[..n]).await.is_err()
                                {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = s.shutdown().await;
                });
                cs.lock().unwrap().push(h);
            }
        });
        TestBackend {
            addr,
            name,
            accepted,
            task,
            conns,
        }
    }

    /// Stops listening and cuts every open connection (the process "dies").
    pub fn kill(&self) {
        self.task.abort();
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `N` backends of `kind`, one after another.
pub async fn start_backends<const N: usize>(kind: Kind) -> [TestBackend; N] {
    let mut v = Vec::with_capacity(N);
    for _ in 0..N {
        v.push(TestBackend::start(kind).await);
    }
    match v.try_into() {
        Ok(bs) => bs,
        Err(_) => unreachable!("started exactly N backends"),
    }
}

/// An address on loopback with nothing listening on it.
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Starts flowgate in-process from TOML text.
pub fn start(toml: &str) -> Flowgate {
    let cfg = Config::parse(toml, std::path::Path::new("test.toml")).expect("valid test config");
    Flowgate::start(cfg).expect("flowgate starts")
}

/// A one-listener, one-pool config: listener "l" on port 0 over `backends`
/// (address, weight). `extra_listener` and `extra_pool` are appended to the tables.
pub fn config(
    algorithm: &str,
    backends: &[(SocketAddr, u32)],
    extra_listener: &str,
    extra_pool: &str,
) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    format!(
        r#"
[runtime]
workers = 2
shutdown_timeout = "5s"

[[listeners]]
name = "l"
bind = "127.0.0.1:0"
pool = "p"
connect_timeout = "1s"
{extra_listener}

[[pools]]
name = "p"
algorithm = "{algorithm}"
backends = [ {} ]
{extra_pool}
"#,
        list.join(", ")
    )
}

/// Connects through flowgate to an identity backend and returns (stream, backend name).
pub async fn connect_identity(addr: SocketAddr) -> (BufReader<TcpStream>, String) {
    let s = TcpStream::connect(addr).await.expect("connect to flowgate");
    let mut r = BufReader::new(s);
    let name = read_identity(&mut r).await;
    (r, name)
}

/// The name line an identity backend sends first, through `r`.
pub async fn read_identity(r: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
        .await
        .expect("identity line in time")
        .expect("read identity");
    line.trim().to_string()
}

/// Polls `cond` every 10 ms until it holds or `limit` passes; returns whether it held.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits for flowgate's one-time startup connect to a backend without health checks,
/// so that later accepts are the clients' own.
pub async fn settled(backend: &TestBackend) {
    let accepted = backend.accepted.clone();
    assert!(
        wait_until(Duration::from_secs(10), || accepted.load(Ordering::SeqCst)
            >= 1)
        .await,
        "flowgate never made its startup connect to the backend"
    );
}

/// An admin API on a free port, tcp listener "t" on a free port with
/// `listener_extra` keys, and its pool "p" with `backends` (the TOML list's
/// inside) and `pool_extra` keys.
pub fn listener_and_pool(listener_extra: &str, backends: &str, pool_extra: &str) -> String {
    format!(
        r#"
[admin]
bind = "127.0.0.1:0"

[[listeners]]
name = "t"
bind = "127.0.0.1:0"
pool = "p"
{listener_extra}

[[pools]]
name = "p"
backends = [{backends}]
{pool_extra}
"#
    )
}

/// Whether the tests run as root (network and mount namespaces need it).
pub fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Whether `tool` is on PATH.
pub fn has_tool(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The flowgate binary cargo built for these tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flowgate"))
}

/// The binary running `run --config` on a file with `toml`; stderr is read for the
/// listening addresses and kept for assertions.
pub struct Proc {
    pub child: Child,
    pub dir: tempdir::Dir,
    pub log: Arc<std::sync::Mutex<String>>,
    /// Set when stderr reached its end (the process closed it).
    pub log_done: Arc<std::sync::atomic::AtomicBool>,
}

pub mod tempdir {
    //! A unique scratch directory under the target dir, removed on drop.
    use std::path::PathBuf;
    pub struct Dir(pub PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "flowgate-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        pub fn file(&self, name: &str, contents: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, contents).unwrap();
            p
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `toml` with `runtime.upgrade_socket` in `dir`, unless it sets one: every binary
/// a test starts holds its own single-instance lock, instead of all of them
/// contending for the default `/run/flowgate/flowgate.sock`. The key goes right
/// after an existing `[runtime]` header (lines below it move down by one), or in
/// a `[runtime]` table put first (two lines); an invalid config is not touched.
pub fn with_upgrade_socket(toml: &str, dir: &std::path::Path) -> String {
    // An invalid config exits 2 before it takes any socket: left as it is, so the
    // lines its error names stay where the test wrote them.
    let invalid = Config::parse(toml, &dir.join("flowgate.toml")).is_err();
    if invalid || toml.contains("upgrade_socket") {
        return toml.to_string();
    }
    let key = format!(
        "upgrade_socket = \"{}\"\n",
        dir.join("flowgate.sock").display()
    );
    match toml.find("[runtime]\n") {
        Some(i) => {
            let at = i + "[runtime]\n".len();
            format!("{}{key}{}", &toml[..at], &toml[at..])
        }
        None => format!("[runtime]\n{key}{toml}"),
    }
}

impl Proc {
    /// Spawns the binary (optionally under `prlimit`-style wrapper `pre`) and waits
    /// until it logs "flowgate started" (or exits).
    pub fn spawn(toml: &str, pre: &[&str]) -> Proc {
        Proc::spawn_with(toml, pre, &[])
    }

    /// [`Proc::spawn`] with `args` after `run --config FILE` (e.g. `--upgrade-from`).
    pub fn spawn_with(toml: &str, pre: &[&str], args: &[&str]) -> Proc {
        let dir = tempdir::Dir::new();
        let cfg = dir.file("flowgate.toml", &with_upgrade_socket(toml, &dir.0));
        let mut cmd = if pre.is_empty() {
            Command::new(bin())
        } else {
            let mut c = Command::new(pre[0]);
            c.args(&pre[1..]).arg(bin());
            c
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn flowgate");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l2 = log.clone();
        let log_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = log_done.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let started = line.contains("flowgate started");
                l2.lock().unwrap().push_str(&line);
                l2.lock().unwrap().push('\n');
                if started {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let _ = rx.recv_timeout(Duration::from_secs(20));
        Proc {
            child,
            dir,
            log,
            log_done,
        }
    }

    /// The address the binary logged for listener `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        if let Some(a) = self.json_field("listening", Some(name)) {
            return a.parse().unwrap();
        }
        let log = self.log.lock().unwrap();
        let needle = format!("listener={name} addr=");
        let line = log
            .lines()
            .find(|l| l.contains(&needle))
            .unwrap_or_else(|| panic!("no listening line for {name} in log:\n{log}"));
        let rest = &line[line.find(&needle).unwrap() + needle.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// With `[log] format = "json"`: the `addr` field of the line with `message`
    /// (and `listener`, when given).
    fn json_field(&self, message: &str, listener: Option<&str>) -> Option<String> {
        let log = self.log.lock().unwrap();
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| {
                v["fields"]["message"] == message
                    && listener.is_none_or(|n| v["fields"]["listener"] == n)
            })
            .and_then(|v| v["fields"]["addr"].as_str().map(String::from))
    }

    /// The admin API address the binary logged.
    pub fn admin(&self) -> SocketAddr {
        if let Some(a) = self.json_field("admin API listening", None) {
            let a = a.trim_start_matches("Some(").trim_end_matches(')');
            return a.parse().unwrap();
        }
        let log = self.log.lock().unwrap();
        let needle = "admin API listening addr=";
        let line = log
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no admin listening line in log:\n{log}"));
        let rest = &line[line.find(needle).unwrap() + needle.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Waits for the process to exit; `None` if it is still running after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                while !self.log_done.load(Ordering::SeqCst) && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return Some(st);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// The child's process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Async `wait_exit`: lets test backends in this runtime keep serving while the
    /// binary shuts down. Once it has exited, also waits (briefly) until its stderr
    /// has been read to the end, so the log holds its last lines.
    pub async fn exited(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let eof = self.log_done.clone();
                wait_until(Duration::from_secs(5), || eof.load(Ordering::SeqCst)).await;
                return Some(st);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the binary's log contains `needle`; returns whether it did in time.
    pub async fn logged(&self, needle: &str, limit: Duration) -> bool {
        wait_until(limit, || self.log.lock().unwrap().contains(needle)).await
    }
}

// ---- Admin API and reload (tests/admin.rs, tests/reload.rs) ----

/// A reply from the admin API.
#[derive(Debug)]
pub struct ApiReply {
    pub status: u16,
    /// The body parsed as JSON (`Null` when it is not JSON).
    pub json: serde_json::Value,
    pub text: String,
}

impl ApiReply {
    /// The `error` string of an error reply; panics (with the reply) if there is none.
    pub fn error(&self) -> &str {
        self.json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no \"error\" string in {self:?}"))
    }
}

/// Calls the admin API at `admin` with curl, the client operators use: `method` on
/// `path` (sent as written: percent-encoding is the caller's), with `body` as
/// `application/json` and `token` as a bearer token when given.
pub async fn curl(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    token: Option<&str>,
) -> ApiReply {
    curl_with(admin, method, path, body, token, &[]).await
}

/// `curl` with extra command-line arguments (headers, for instance).
pub async fn curl_with(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    token: Option<&str>,
    extra: &[&str],
) -> ApiReply {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-s", "-S", "-g", "--noproxy", "*", "--max-time", "20"])
        .args(["-o", "-", "-w", "\n%{http_code}", "-X", method])
        .args(extra);
    if let Some(t) = token {
        cmd.arg("-H").arg(format!("Authorization: Bearer {t}"));
    }
    if body.is_some() {
        cmd.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
        ]);
    }
    cmd.arg(format!("http://{admin}{path}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("run curl (apt-get install -y curl)");
    let mut stdin = child.stdin.take().unwrap();
    if let Some(b) = body {
        // curl may stop reading early once the server has answered (413).
        let _ = stdin.write_all(b).await;
    }
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("curl finished")
        .expect("curl output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (text, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let status: u16 = code.trim().parse().unwrap_or(0);
    assert!(
        out.status.success() && status != 0,
        "curl -X {method} {path} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        stdout
    );
    ApiReply {
        status,
        json: serde_json::from_str(text).unwrap_or(serde_json::Value::Null),
        text: text.to_string(),
    }
}

/// The path of an action on backend `address` of pool "p", the address
/// percent-encoded when `encode` is set and raw otherwise.
pub fn action(address: &str, what: &str, encode: bool) -> String {
    let addr = if encode {
        percent_encoding::utf8_percent_encode(address, percent_encoding::NON_ALPHANUMERIC)
            .to_string()
    } else {
        address.to_string()
    };
    format!("/api/v1/pools/p/backends/{addr}/{what}")
}

/// POSTs action `what` (drain, enable, disable) on backend `address` of pool "p",
/// with no token.
pub async fn post_action(admin: SocketAddr, address: &str, what: &str, encode: bool) -> ApiReply {
    curl(admin, "POST", &action(address, what, encode), None, None).await
}

/// PUTs `body` as the weight of backend `address` of pool "p", with no token.
pub async fn put_weight(admin: SocketAddr, address: &str, body: &[u8], encode: bool) -> ApiReply {
    curl(
        admin,
        "PUT",
        &action(address, "weight", encode),
        Some(body),
        None,
    )
    .await
}

/// GET /api/v1/pools, asserting 200; returns the body.
pub async fn get_pools(admin: SocketAddr) -> serde_json::Value {
    let r = curl(admin, "GET", "/api/v1/pools", None, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    r.json
}

/// The backends of `pool` in a GET /api/v1/pools body.
pub fn backends_of(pools: &serde_json::Value, pool: &str) -> Vec<serde_json::Value> {
    pools["pools"]
        .as_array()
        .expect("\"pools\" is an array")
        .iter()
        .find(|p| p["name"] == pool)
        .unwrap_or_else(|| panic!("no pool {pool:?} in {pools}"))["backends"]
        .as_array()
        .expect("\"backends\" is an array")
        .clone()
}

/// The entries for backend `address` in pool `pool` (a backend removed by reload and
/// draining can appear next to a re-added one).
pub fn backend_entries(
    pools: &serde_json::Value,
    pool: &str,
    address: &str,
) -> Vec<serde_json::Value> {
    backends_of(pools, pool)
        .into_iter()
        .filter(|b| b["address"] == address)
        .collect()
}

/// Starts flowgate in-process from `toml` written to `name` in `dir`, loaded with
/// `Config::load` so reload re-reads that file. Returns the handle and the path.
pub fn start_file(dir: &tempdir::Dir, name: &str, toml: &str) -> (Flowgate, PathBuf) {
    let path = dir.file(name, toml);
    let cfg = Config::load(&path).expect("valid test config");
    (Flowgate::start(cfg).expect("flowgate starts"), path)
}

/// Sends `msg` on a connection from `connect_identity` and reads it back.
pub async fn echo(conn: &mut BufReader<TcpStream>, msg: &[u8]) -> std::io::Result<()> {
    conn.get_mut().write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo in 10s"))??;
    if back != msg {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("sent {msg:?}, got {back:?}"),
        ));
    }
    Ok(())
}

/// Opens `n` connections through `addr` to identity backends, one after another;
/// returns them with the backend each reached.
pub async fn connect_n(addr: SocketAddr, n: usize) -> Vec<(BufReader<TcpStream>, String)> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(connect_identity(addr).await);
    }
    v
}

/// Whether the connection has ended (EOF or error) within `limit`; bytes that
/// arrive first are skipped.
pub async fn closed_within(conn: &mut BufReader<TcpStream>, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let ended = async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, ended).await.is_ok()
}

/// Opens `n` new connections and counts them per backend, closing each.
pub async fn spread(addr: SocketAddr, n: usize) -> std::collections::HashMap<String, usize> {
    let mut counts = std::collections::HashMap::new();
    for (_, name) in connect_n(addr, n).await {
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// Opens connections until `want` of them reached `backend`; returns those and
/// closes the others.
pub async fn hold_on(addr: SocketAddr, backend: &str, want: usize) -> Vec<BufReader<TcpStream>> {
    let mut held = Vec::new();
    for _ in 0..want * 20 {
        let (c, name) = connect_identity(addr).await;
        if name == backend {
            held.push(c);
            if held.len() == want {
                return held;
            }
        }
    }
    panic!("{want} connections never reached {backend}");
}

/// The resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}
