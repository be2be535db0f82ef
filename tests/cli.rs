//! The binary from the outside: `check` and `run` exit codes and error messages,
//! `--version`/`--help`, bind failures, graceful stop on SIGTERM/SIGINT, the shipped
//! example config, and running out of file descriptors.
//!
//! Exit codes (src/main.rs): 0 clean stop or valid config, 1 runtime failure,
//! 2 invalid configuration.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------
// `flowgate check`: one test per kind of mistake.
// ---------------------------------------------------------------------------

/// A valid config; each bad case edits one spot of it and marks the line the error
/// must point at with a `# HERE` comment.
const BASE: &str = r#"[runtime]
workers = 1
shutdown_timeout = "5s"

[[listeners]]
name = "front"
bind = "127.0.0.1:7000"
pool = "gpu"

[[pools]]
name = "gpu"
backends = [
  { address = "127.0.0.1:9001" },
  { address = "127.0.0.1:9002" },
]
"#;

/// `BASE` with the first `from` replaced by `to`.
fn edit(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "BASE has no {from:?}");
    BASE.replacen(from, to, 1)
}

/// `BASE` with more text appended.
fn append(more: &str) -> String {
    format!("{BASE}{more}")
}

fn flowgate(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run flowgate")
}

fn check(path: &Path) -> Output {
    flowgate(&["check", "--config", path.to_str().unwrap()])
}

/// Asserts `flowgate check` exited 0.
fn assert_valid(out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `flowgate check` on `toml` and asserts: exit code 2, and stderr reads
/// `error: FILE:LINE:COLUMN: PATH: MESSAGE` with LINE the one marked `# HERE`,
/// PATH = `path` (not checked when `None`) and MESSAGE containing `message`.
fn rejects(toml: &str, path: Option<&str>, message: &str) {
    let marked: Vec<usize> = toml
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("# HERE"))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(marked.len(), 1, "case must mark one line:\n{toml}");
    let line = marked[0];
    let dir = tempdir::Dir::new();
    let file = dir.file("bad.toml", toml);
    let out = check(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = format!("config:\n{}\nstderr: {stderr}", numbered(toml));
    assert_eq!(out.status.code(), Some(2), "exit code; {context}");
    let prefix = format!("error: {}:", file.display());
    let rest = stderr
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("stderr does not start with {prefix:?}; {context}"));
    let (pos, rest) = rest.split_once(": ").expect("LINE:COLUMN: after the file");
    let (got_line, column) = pos
        .split_once(':')
        .unwrap_or_else(|| panic!("no LINE:COLUMN in {pos:?}; {context}"));
    let got_line: usize = got_line.parse().expect("line number");
    let column: usize = column.parse().expect("column number");
    assert_eq!(got_line, line, "wrong line; {context}");
    let width = toml.lines().nth(line - 1).unwrap().len();
    assert!(
        (1..=width + 1).contains(&column),
        "column {column} is not on line {line}; {context}"
    );
    let msg = match path {
        Some(p) => rest
            .strip_prefix(&format!("{p}: "))
            .unwrap_or_else(|| panic!("expected key path {p:?}; {context}")),
        None => rest,
    };
    assert!(
        msg.contains(message),
        "expected message containing {message:?}; {context}"
    );
}

fn numbered(text: &str) -> String {
    text.lines()
        .enumerate()
        .map(|(i, l)| format!("{:>3} | {l}\n", i + 1))
        .collect()
}

#[test]
fn base_config_is_valid() {
    let dir = tempdir::Dir::new();
    let out = check(&dir.file("ok.toml", BASE));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_valid(&out);
    assert!(stdout.contains("ok (1 listeners, 1 pools)"), "{stdout}");
}

#[test]
fn unknown_key_at_top_level() {
    rejects(
        &edit("[runtime]", "colour = \"blue\" # HERE\n[runtime]"),
        Some("colour"),
        "unknown field `colour`",
    );
}

#[test]
fn unknown_key_in_runtime() {
    rejects(
        &edit("workers = 1", "wrkers = 1 # HERE"),
        Some("runtime.wrkers"),
        "unknown field `wrkers`",
    );
}

#[test]
fn unknown_key_in_listener() {
    rejects(
        &edit("pool = \"gpu\"", "pool = \"gpu\"\nbalance = \"yes\" # HERE"),
        Some("listeners[0].balance"),
        "unknown field `balance`",
    );
}

#[test]
fn unknown_key_in_pool() {
    rejects(
        &edit("name = \"gpu\"", "name = \"gpu\"\nalgo = \"random\" # HERE"),
        Some("pools[0].algo"),
        "unknown field `algo`",
    );
}

#[test]
fn unknown_key_in_backend() {
    rejects(
        &edit(
            "{ address = \"127.0.0.1:9002\" },",
            "{ address = \"127.0.0.1:9002\", wieght = 2 }, # HERE",
        ),
        Some("pools[0].backends[1].wieght"),
        "unknown field `wieght`",
    );
}

#[test]
fn duration_without_unit() {
    rejects(
        &edit(
            "pool = \"gpu\"",
            "pool = \"gpu\"\nconnect_timeout = \"3\" # HERE",
        ),
        Some("listeners[0].connect_timeout"),
        "invalid duration \"3\"",
    );
}

#[test]
fn nonsense_duration() {
    rejects(
        &edit(
            "shutdown_timeout = \"5s\"",
            "shutdown_timeout = \"3 parsecs\" # HERE",
        ),
        Some("runtime.shutdown_timeout"),
        "invalid duration \"3 parsecs\"",
    );
}

#[test]
fn duration_as_a_bare_number() {
    rejects(
        &edit("pool = \"gpu\"", "pool = \"gpu\"\nidle_timeout = 30 # HERE"),
        Some("listeners[0].idle_timeout"),
        "a duration string",
    );
}

#[test]
fn weight_zero() {
    rejects(
        &edit(
            "{ address = \"127.0.0.1:9002\" },",
            "{ address = \"127.0.0.1:9002\", weight = 0 }, # HERE",
        ),
        Some("pools[0].backends[1].weight"),
        "1..=1000",
    );
}

#[test]
fn weight_1001() {
    rejects(
        &edit(
            "{ address = \"127.0.0.1:9001\" },",
            "{ address = \"127.0.0.1:9001\", weight = 1001 }, # HERE",
        ),
        Some("pools[0].backends[0].weight"),
        "1..=1000",
    );
}

#[test]
fn weight_in_a_backend_table() {
    // The same mistake written with [[pools.backends]] tables instead of inline ones.
    let toml = r#"[[listeners]]
name = "front"
bind = "127.0.0.1:0"
pool = "gpu"

[[pools]]
name = "gpu"

[[pools.backends]]
address = "127.0.0.1:9001"

[[pools.backends]]
address = "127.0.0.1:9002"
weight = 0 # HERE
"#;
    rejects(toml, Some("pools[0].backends[1].weight"), "1..=1000");
}

#[test]
fn duplicate_listener_names() {
    rejects(
        &append(
            "\n[[listeners]]\nname = \"front\" # HERE\nbind = \"127.0.0.1:7001\"\npool = \"gpu\"\n",
        ),
        Some("listeners[1].name"),
        "duplicate listener name \"front\"",
    );
}

#[test]
fn duplicate_pool_names() {
    rejects(
        &append(
            "\n[[pools]]\nname = \"gpu\" # HERE\nbackends = [{ address = \"127.0.0.1:9003\" }]\n",
        ),
        Some("pools[1].name"),
        "duplicate pool name \"gpu\"",
    );
}

#[test]
fn listener_pool_does_not_exist() {
    rejects(
        &edit("pool = \"gpu\"", "pool = \"cpu\" # HERE"),
        Some("listeners[0].pool"),
        "no pool named \"cpu\"",
    );
}

#[test]
fn empty_backend_list() {
    rejects(
        &edit(
            "backends = [\n  { address = \"127.0.0.1:9001\" },\n  { address = \"127.0.0.1:9002\" },\n]",
            "backends = [] # HERE",
        ),
        Some("pools[0].backends"),
        "at least one backend",
    );
}

#[test]
fn unparseable_address() {
    rejects(
        &edit(
            "{ address = \"127.0.0.1:9002\" },",
            "{ address = \"not an address\" }, # HERE",
        ),
        Some("pools[0].backends[1].address"),
        "\"not an address\"",
    );
}

#[test]
fn port_out_of_range() {
    rejects(
        &edit(
            "{ address = \"127.0.0.1:9002\" },",
            "{ address = \"127.0.0.1:70000\" }, # HERE",
        ),
        Some("pools[0].backends[1].address"),
        "out of range",
    );
}

#[test]
fn listener_port_out_of_range() {
    rejects(
        &edit(
            "bind = \"127.0.0.1:7000\"",
            "bind = \"127.0.0.1:70000\" # HERE",
        ),
        Some("listeners[0].bind"),
        "out of range",
    );
}

#[test]
fn unresolvable_hostname() {
    rejects(
        &edit(
            "{ address = \"127.0.0.1:9001\" },",
            "{ address = \"nonexistent.invalid:80\" }, # HERE",
        ),
        Some("pools[0].backends[0].address"),
        "cannot resolve \"nonexistent.invalid\"",
    );
}

#[test]
fn unknown_algorithm() {
    rejects(
        &edit(
            "name = \"gpu\"",
            "name = \"gpu\"\nalgorithm = \"fastest\" # HERE",
        ),
        Some("pools[0].algorithm"),
        "unknown variant `fastest`",
    );
}

#[test]
fn http_only_key_on_a_tcp_listener() {
    rejects(
        &edit(
            "pool = \"gpu\"",
            "pool = \"gpu\"\nheader_timeout = \"5s\" # HERE",
        ),
        Some("listeners[0].header_timeout"),
        "header_timeout applies to http listeners; this one is tcp",
    );
}

#[test]
fn accept_proxy_on_a_udp_listener() {
    rejects(
        &edit(
            "pool = \"gpu\"",
            "pool = \"gpu\"\nprotocol = \"udp\"\naccept_proxy = \"v2\" # HERE",
        ),
        Some("listeners[0].accept_proxy"),
        "accept_proxy applies to tcp listeners; this one is udp",
    );
}

#[test]
fn proxy_trusted_that_is_not_a_network() {
    rejects(
        &edit(
            "pool = \"gpu\"",
            "pool = \"gpu\"\naccept_proxy = \"any\"\nproxy_trusted = [\"10.0.0.0/33\"] # HERE",
        ),
        Some("listeners[0].proxy_trusted[0]"),
        "\"10.0.0.0/33\" is not a network: expected a CIDR such as \"10.0.0.0/8\"",
    );
}

#[test]
fn send_proxy_pool_behind_an_http_listener() {
    rejects(
        &edit(
            "pool = \"gpu\"",
            "pool = \"gpu\" # HERE\nprotocol = \"http\"",
        )
        .replacen(
            "name = \"gpu\"\n",
            "name = \"gpu\"\nsend_proxy = \"v2\"\n",
            1,
        ),
        Some("listeners[0].pool"),
        "pool \"gpu\" has send_proxy = \"v2\", which only tcp listeners send; this one is http",
    );
}

#[test]
fn unknown_protocol_sctp() {
    rejects(
        &edit(
            "pool = \"gpu\"",
            "pool = \"gpu\"\nprotocol = \"sctp\" # HERE",
        ),
        Some("listeners[0].protocol"),
        "unknown variant `sctp`",
    );
}

#[test]
fn connect_attempts_zero() {
    rejects(
        &edit(
            "name = \"gpu\"",
            "name = \"gpu\"\nconnect_attempts = 0 # HERE",
        ),
        Some("pools[0].connect_attempts"),
        "found 0",
    );
}

#[test]
fn listener_without_bind() {
    // A missing key has no position of its own: the error points at its table.
    rejects(
        &edit(
            "[[listeners]]\nname = \"front\"\nbind = \"127.0.0.1:7000\"\n",
            "[[listeners]] # HERE\nname = \"front\"\n",
        ),
        Some("listeners[0]"),
        "missing field `bind`",
    );
}

#[test]
fn toml_syntax_error() {
    // An unterminated string: no key path to name, but the line must be right.
    rejects(
        &edit("pool = \"gpu\"", "pool = \"gpu # HERE"),
        None,
        "string",
    );
}

#[test]
fn duplicate_bind_address() {
    rejects(
        &append(
            "\n[[listeners]]\nname = \"back\"\nbind = \"127.0.0.1:7000\" # HERE\npool = \"gpu\"\n",
        ),
        Some("listeners[1].bind"),
        "already bound by another listener",
    );
}

#[test]
fn max_connections_zero() {
    rejects(
        &edit(
            "pool = \"gpu\"",
            "pool = \"gpu\"\nmax_connections = 0 # HERE",
        ),
        Some("listeners[0].max_connections"),
        "positive",
    );
}

#[test]
fn duplicate_backend_in_pool() {
    rejects(
        &edit(
            "{ address = \"127.0.0.1:9002\" },",
            "{ address = \"127.0.0.1:9001\" }, # HERE",
        ),
        Some("pools[0].backends[1].address"),
        "duplicate backend \"127.0.0.1:9001\"",
    );
}

#[test]
fn wrong_type_for_workers() {
    rejects(
        &edit("workers = 1", "workers = \"two\" # HERE"),
        Some("runtime.workers"),
        "invalid type: string \"two\"",
    );
}

#[test]
fn check_missing_file() {
    let dir = tempdir::Dir::new();
    let path = dir.0.join("does-not-exist.toml");
    let out = check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!("{}: cannot read", path.display())),
        "{stderr}"
    );
    assert!(stderr.contains("No such file or directory"), "{stderr}");
}

#[tokio::test]
async fn run_with_invalid_config_exits_2() {
    let toml = edit(
        "{ address = \"127.0.0.1:9002\" },",
        "{ address = \"127.0.0.1:9002\", weight = 0 },",
    );
    let mut fg = Proc::spawn(&toml, &[]);
    let log = exits_with(&mut fg, Duration::from_secs(10), 2, "does not exit").await;
    let file = fg.dir.0.join("flowgate.toml");
    let line = 1 + toml.lines().position(|l| l.contains("weight = 0")).unwrap();
    let want = format!("invalid configuration: {}:{line}:", file.display());
    assert!(log.contains(&want), "want {want:?} in log:\n{log}");
    assert!(log.contains("pools[0].backends[1].weight"), "{log}");
    assert!(!log.contains("flowgate started"), "{log}");
}

// ---------------------------------------------------------------------------
// Version, help, the shipped config.
// ---------------------------------------------------------------------------

#[test]
fn version_flag() {
    let out = flowgate(&["--version"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        stdout.trim(),
        format!("flowgate {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_lists_subcommands() {
    let out = flowgate(&["--help"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let commands: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(commands.contains(&"run"), "{stdout}");
    assert!(commands.contains(&"check"), "{stdout}");
}

#[test]
fn shipped_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/flowgate.toml");
    assert!(path.exists(), "{} is missing", path.display());
    assert_valid(&check(&path));
}

// ---------------------------------------------------------------------------
// `flowgate run`: bind failure, signals.
// ---------------------------------------------------------------------------

/// Waits up to `limit` for the binary to exit (failing with `still_running` and its log
/// if it does not), asserts its exit code is `code`, and returns its log.
async fn exits_with(fg: &mut Proc, limit: Duration, code: i32, still_running: &str) -> String {
    let st = fg
        .exited(limit)
        .await
        .unwrap_or_else(|| panic!("{still_running}:\n{}", fg.log()));
    let log = fg.log();
    assert_eq!(st.code(), Some(code), "log:\n{log}");
    log
}

/// One listener "l" on `bind` over one backend.
fn run_config(bind: &str, backend: SocketAddr, shutdown_timeout: &str, workers: usize) -> String {
    format!(
        r#"
[runtime]
workers = {workers}
shutdown_timeout = "{shutdown_timeout}"

[[listeners]]
name = "l"
bind = "{bind}"
pool = "p"
connect_timeout = "2s"

[[pools]]
name = "p"
backends = [{{ address = "{backend}" }}]
"#
    )
}

#[tokio::test]
async fn bind_conflict_exits_1_naming_address_and_error() {
    // A plain listener without SO_REUSEPORT: flowgate's REUSEPORT socket cannot share it.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap();
    let backend: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut fg = Proc::spawn(&run_config(&taken.to_string(), backend, "5s", 1), &[]);
    let log = exits_with(&mut fg, Duration::from_secs(10), 1, "does not exit").await;
    assert!(log.contains(&format!("cannot bind {taken}")), "{log}");
    assert!(log.contains("Address already in use"), "{log}");
    assert!(!log.contains("flowgate started"), "{log}");
}

/// One echo round trip on `s`.
async fn echo_once(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(buf, msg);
}

/// An echo backend and the binary on 127.0.0.1:0 in front of it (2 workers, the given
/// shutdown_timeout), with one session open through it that has echoed `first`.
/// Returns them with the listener's address.
async fn running_with_session(
    shutdown_timeout: &str,
    first: &[u8],
) -> (TestBackend, Proc, SocketAddr, TcpStream) {
    let backend = TestBackend::start(Kind::Echo).await;
    let fg = Proc::spawn(
        &run_config("127.0.0.1:0", backend.addr, shutdown_timeout, 2),
        &[],
    );
    let addr = fg.addr("l");
    let mut s = TcpStream::connect(addr).await.unwrap();
    echo_once(&mut s, first).await;
    (backend, fg, addr, s)
}

/// A new connection to `addr` is refused, or closed without being served.
async fn assert_not_served(addr: SocketAddr) {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return;
    };
    let _ = s.write_all(b"anyone?").await;
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("a connection after the stop is closed, not left hanging");
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "a connection after the stop was served: {r:?}"
    );
}

#[tokio::test]
async fn sigterm_lets_the_stream_in_flight_finish() {
    let (_backend, mut fg, addr, s) = running_with_session("30s", b"first chunk").await;

    fg.signal(Signal::SIGTERM);
    // Logged once every listening socket is closed, with our session still open.
    assert!(
        fg.logged("stopped accepting", Duration::from_secs(10))
            .await,
        "log:\n{}",
        fg.log()
    );
    assert_not_served(addr).await;

    // The stream in flight goes on: 1 MiB more, then a half-close; all of it echoed.
    let payload: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(16 * 1024) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut got))
        .await
        .expect("echo finishes in time")
        .expect("read echo");
    writer.await.unwrap();
    assert_eq!(got.len(), payload.len(), "echoed bytes after SIGTERM");
    assert!(got == payload, "echoed bytes differ");

    let log = exits_with(
        &mut fg,
        Duration::from_secs(20),
        0,
        "still running after the stream ended",
    )
    .await;
    assert!(log.contains("graceful=true"), "{log}");
}

#[tokio::test]
async fn sigint_with_nothing_open_exits_0_at_once() {
    // A 30 s grace period: exiting within 10 s means it did not wait for it.
    let (_backend, mut fg, _, mut s) = running_with_session("30s", b"ping").await;
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    drop(s);

    fg.signal(Signal::SIGINT);
    let log = exits_with(
        &mut fg,
        Duration::from_secs(10),
        0,
        "still running 10 s after SIGINT",
    )
    .await;
    assert!(log.contains("signal=\"SIGINT\""), "{log}");
    assert!(log.contains("graceful=true"), "{log}");
}

#[tokio::test]
async fn sigterm_closes_idle_connection_after_shutdown_timeout() {
    let (_backend, mut fg, _, mut s) = running_with_session("1s", b"hold me").await;

    fg.signal(Signal::SIGTERM);
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("idle connection not closed:\n{}", fg.log()));
    assert!(matches!(r, Ok(0) | Err(_)), "unexpected data: {r:?}");
    let log = exits_with(&mut fg, Duration::from_secs(15), 0, "still running").await;
    assert!(log.contains("shutdown_timeout expired"), "{log}");
    assert!(log.contains("graceful=false"), "{log}");
}

// ---------------------------------------------------------------------------
// Out of file descriptors.
// ---------------------------------------------------------------------------

/// utime + stime of process `pid`, in seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after "(comm)": state is field 3, utime 14, stime 15.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / clock_ticks()
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

// Each session holds two descriptors (client and backend), so whether the last free
// descriptor goes to an accept (EMFILE there) or to a backend connect (EMFILE after a
// successful accept) depends on the parity of the limit minus what the process already
// holds. Two limits one apart cover both cases whatever that baseline is.

#[tokio::test]
async fn out_of_fds_with_limit_64_pauses_then_recovers() {
    fd_exhaustion(64).await;
}

#[tokio::test]
async fn out_of_fds_with_limit_65_pauses_then_recovers() {
    fd_exhaustion(65).await;
}

/// Floods flowgate running under `RLIMIT_NOFILE = limit`: it must stay up, warn once
/// per episode, not spin, and serve again once the flood is gone.
async fn fd_exhaustion(limit: u32) {
    let prlimit = Command::new("prlimit").arg("--version").output();
    assert!(
        prlimit.is_ok_and(|o| o.status.success()),
        "this test needs prlimit (util-linux)"
    );
    let backend = TestBackend::start(Kind::Echo).await;
    let mut fg = Proc::spawn(
        &run_config("127.0.0.1:0", backend.addr, "5s", 2),
        &["prlimit", &format!("--nofile={limit}:{limit}"), "--"],
    );
    let addr = fg.addr("l");
    let pid = fg.pid();

    // 200 clients that stay: far more than `limit` descriptors allow.
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(
            TcpStream::connect(addr)
                .await
                .expect("kernel backlog takes it"),
        );
    }
    let warning = "out of file descriptors";
    assert!(
        fg.logged(warning, Duration::from_secs(10)).await,
        "no fd exhaustion warning; log:\n{}",
        fg.log()
    );

    // Still flooded and exhausted: the accept loop must pause, not spin.
    let before = cpu_seconds(pid);
    let window = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu = cpu_seconds(pid) - before;
    let wall = window.elapsed().as_secs_f64();
    assert!(
        fg.child.try_wait().unwrap().is_none(),
        "flowgate died; log:\n{}",
        fg.log()
    );
    assert!(
        cpu < 0.5 * wall,
        "limit {limit}: flowgate used {cpu:.2} s of CPU in {wall:.2} s while out of descriptors"
    );
    let log = fg.log();
    let warnings = log.matches(warning).count();
    assert!(
        (1..=5).contains(&warnings),
        "limit {limit}: {warnings} fd exhaustion warnings and {} \"accepting again\" in ~1 s \
         while the flood stood still: once per episode expected; log starts:\n{}",
        log.matches("accepting again").count(),
        log.lines().take(12).collect::<Vec<_>>().join("\n")
    );

    // Let go of the flood: a fresh client is served again.
    drop(flood);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut attempts = 0;
    loop {
        attempts += 1;
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(5), try_echo(addr)).await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not served again after {attempts} attempts; log:\n{}",
            fg.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        fg.logged("accepting again", Duration::from_secs(5)).await,
        "log:\n{}",
        fg.log()
    );
}

async fn try_echo(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"are you back?").await?;
    let mut buf = [0u8; 13];
    s.read_exact(&mut buf).await?;
    if &buf == b"are you back?" {
        Ok(())
    } else {
        Err(std::io::Error::other("wrong echo"))
    }
}

#[test]
fn udp_keys_on_a_tcp_listener() {
    for (key, v) in [
        ("max_sessions", "10"),
        ("max_sessions_per_source", "10"),
        ("responses", "1"),
    ] {
        rejects(
            &edit(
                "pool = \"gpu\"",
                &format!("pool = \"gpu\"\n{key} = {v} # HERE"),
            ),
            Some(&format!("listeners[0].{key}")),
            "applies to udp listeners; this one is tcp",
        );
    }
}

#[test]
fn max_connections_on_a_udp_listener() {
    rejects(
        &edit(
            "pool = \"gpu\"",
            "pool = \"gpu\"\nprotocol = \"udp\"\nmax_connections = 5 # HERE",
        ),
        Some("listeners[0].max_connections"),
        "applies to tcp and http listeners; this one is udp",
    );
}

#[test]
fn zero_max_sessions() {
    rejects(
        &edit(
            "pool = \"gpu\"",
            "pool = \"gpu\"\nprotocol = \"udp\"\nmax_sessions = 0 # HERE",
        ),
        Some("listeners[0].max_sessions"),
        "expected a positive number",
    );
}

#[test]
fn udp_and_tcp_may_share_a_bind_but_not_two_udp() {
    let both = append(
        "[[listeners]]\nname = \"u\"\nbind = \"127.0.0.1:7000\"\nprotocol = \"udp\"\npool = \"gpu\"\n",
    );
    let dir = tempdir::Dir::new();
    assert_valid(&check(&dir.file("ok.toml", &both)));
    rejects(
        &format!(
            "{both}[[listeners]]\nname = \"u2\"\nbind = \"127.0.0.1:7000\" # HERE\nprotocol = \"udp\"\npool = \"gpu\"\n"
        ),
        Some("listeners[2].bind"),
        "udp address 127.0.0.1:7000 is already bound",
    );
}

#[test]
fn bad_log_section() {
    rejects(
        &append("[log]\nlevel = \"loud\" # HERE\n"),
        Some("log.level"),
        "invalid level \"loud\"",
    );
    rejects(
        &append("[log]\nformat = \"xml\" # HERE\n"),
        Some("log.format"),
        "unknown variant `xml`",
    );
    rejects(
        &append("[log]\naccess_log = \"\" # HERE\n"),
        Some("log.access_log"),
        "expected \"off\", \"stdout\", \"syslog\", \"udp://HOST[:PORT]\" or a file path",
    );
    rejects(
        &append("[log]\naccess_log = \"tcp://127.0.0.1:514\" # HERE\n"),
        Some("log.access_log"),
        "only udp:// is supported",
    );
}

#[test]
fn access_log_that_cannot_be_opened_fails_startup() {
    let mut cases = vec![(
        "/nonexistent-dir/access.log",
        "log.access_log: cannot open /nonexistent-dir/access.log",
    )];
    // Without a syslog daemon (CI's machines have none), "syslog" fails the same way.
    if !std::path::Path::new("/dev/log").exists() {
        cases.push((
            "syslog",
            "log.access_log: cannot open syslog socket /dev/log: No such file",
        ));
    }
    for (dest, says) in cases {
        let dir = tempdir::Dir::new();
        let file = dir.file(
            "f.toml",
            &with_upgrade_socket(
                &append(&format!("[log]\naccess_log = \"{dest}\"\n")),
                &dir.0,
            ),
        );
        let out = Command::new(bin())
            .args(["run", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(says), "{says}: {stderr}");
    }
}
