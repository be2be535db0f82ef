//! Prometheus metrics and the access log, checked against the running binary:
//! `promtool` parses `/metrics`, the contract's names and types are all there, byte
//! and connection counters are exact (and move while a stream is still open), and the
//! access log's per-connection totals equal the metric deltas.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::{curl, dead_addr, wait_until, Kind, Proc, TestBackend};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The contract of issue 4: name and type of every metric.
const CONTRACT: &[(&str, &str)] = &[
    ("flowgate_build_info", "gauge"),
    ("flowgate_connections_total", "counter"),
    ("flowgate_connections_active", "gauge"),
    ("flowgate_connections_rejected_total", "counter"),
    ("flowgate_backend_up", "gauge"),
    ("flowgate_backend_connections_active", "gauge"),
    ("flowgate_backend_connections_total", "counter"),
    ("flowgate_backend_connect_errors_total", "counter"),
    ("flowgate_backend_bytes_total", "counter"),
    ("flowgate_backend_connect_duration_seconds", "histogram"),
    ("flowgate_backend_first_byte_duration_seconds", "histogram"),
    ("flowgate_session_duration_seconds", "histogram"),
    ("flowgate_health_checks_total", "counter"),
    ("flowgate_health_check_duration_seconds", "histogram"),
    ("flowgate_config_reloads_total", "counter"),
    ("flowgate_access_log_dropped_total", "counter"),
    ("process_resident_memory_bytes", "gauge"),
    ("process_open_fds", "gauge"),
    ("process_cpu_seconds_total", "counter"),
    ("process_start_time_seconds", "gauge"),
];

const MIB: usize = 1024 * 1024;

async fn scrape(admin: SocketAddr) -> String {
    let r = curl(admin, "GET", "/metrics", None, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    r.text
}

/// Series (name with labels, as rendered) -> value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The value of the series `name{labels}` (labels in any order, exactly these);
/// 0 if absent.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    samples(text)
        .into_iter()
        .filter(|(k, _)| {
            let (n, rest) = k.split_once('{').unwrap_or((k, "}"));
            let mut got: Vec<String> = rest
                .trim_end_matches('}')
                .split(',')
                .filter(|g| !g.is_empty())
                .map(String::from)
                .collect();
            got.sort();
            n == name && got == want
        })
        .map(|(_, v)| v)
        .sum()
}

fn config(backends: &[&str], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ address = \"{b}\" }}"))
        .collect();
    format!(
        r#"
[admin]
bind = "127.0.0.1:0"
{extra}
[[listeners]]
name = "l"
bind = "127.0.0.1:0"
pool = "p"
[[pools]]
name = "p"
backends = [{}]
"#,
        list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_keep_the_contract() {
    let b = TestBackend::start(Kind::Echo).await;
    let toml =
        config(&[&b.name], "") + "[pools.health_check]\nkind = \"tcp\"\ninterval = \"100ms\"\n";
    let fg = Proc::spawn(&toml, &[]);
    let admin = fg.admin();
    // Backends start down until their first probe passes.
    let mut up = false;
    for _ in 0..200 {
        let pools = common::get_pools(admin).await;
        if common::backends_of(&pools, "p")[0]["state"] == "up" {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the backend came up");
    // One session and a few probes, so every histogram has samples.
    let mut c = TcpStream::connect(fg.addr("l")).await.unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).await.unwrap();
    drop(c);
    let b_name = b.name.clone();
    let mut text = String::new();
    let ready = async {
        loop {
            text = scrape(admin).await;
            let checks = value(
                &text,
                "flowgate_health_checks_total",
                &[("pool", "p"), ("backend", &b_name), ("result", "success")],
            );
            let sessions = value(
                &text,
                "flowgate_session_duration_seconds_count",
                &[("listener", "l")],
            );
            if checks >= 2.0 && sessions >= 1.0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), ready)
        .await
        .expect("probes and the session show up in /metrics");

    // A real parser: promtool from Debian's prometheus package.
    let mut p = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool (apt-get install -y prometheus)");
    use std::io::Write;
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let types: HashMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    for (name, kind) in CONTRACT {
        assert_eq!(
            types.get(name),
            Some(kind),
            "{name} should be a {kind}; /metrics:\n{text}"
        );
    }
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        value(&text, "flowgate_build_info", &[("version", version)]),
        1.0
    );
    let be = [("pool", "p"), ("backend", b_name.as_str())];
    assert_eq!(value(&text, "flowgate_backend_up", &be), 1.0);
    assert_eq!(
        value(&text, "flowgate_connections_total", &[("listener", "l")]),
        1.0
    );
    assert_eq!(value(&text, "flowgate_backend_connections_total", &be), 1.0);
    assert_eq!(
        value(
            &text,
            "flowgate_backend_first_byte_duration_seconds_count",
            &be
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "flowgate_backend_connect_duration_seconds_count",
            &be
        ),
        1.0
    );
    for dir in ["to_backend", "from_backend"] {
        let mut l = be.to_vec();
        l.push(("direction", dir));
        assert_eq!(
            value(&text, "flowgate_backend_bytes_total", &l),
            4.0,
            "{dir}"
        );
    }
    assert!(value(&text, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(value(&text, "process_open_fds", &[]) >= 5.0);
    // Label values come from the configuration only: no client address appears.
    let client = "127.0.0.1:";
    for l in text.lines().filter(|l| l.contains(client)) {
        assert!(l.contains(&b_name), "unexpected address label: {l}");
    }
}

/// A backend that reads exactly `up` bytes, then writes `down` bytes, then waits for
/// the client's FIN and closes.
async fn up_then_down(up: usize, down: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = 0;
                while got < up {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n,
                    }
                }
                let chunk = vec![7u8; 64 * 1024];
                let mut sent = 0;
                while sent < down {
                    let n = chunk.len().min(down - sent);
                    if s.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    sent += n;
                }
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_counters_are_exact_move_live_and_match_the_access_log() {
    let backend = up_then_down(10 * MIB, 5 * MIB).await;
    let name = backend.to_string();
    let fg = Proc::spawn(
        &config(&[&name], "[log]\naccess_log = \"access.log\"\n"),
        &[],
    );
    let admin = fg.admin();
    let be = [("pool", "p"), ("backend", name.as_str())];
    let to = [be[0], be[1], ("direction", "to_backend")];
    let from = [be[0], be[1], ("direction", "from_backend")];
    let before = scrape(admin).await;
    let (to0, from0) = (
        value(&before, "flowgate_backend_bytes_total", &to),
        value(&before, "flowgate_backend_bytes_total", &from),
    );
    let conns0 = value(&before, "flowgate_connections_total", &[("listener", "l")]);
    let bconns0 = value(&before, "flowgate_backend_connections_total", &be);

    let mut c = TcpStream::connect(fg.addr("l")).await.unwrap();
    let data = vec![1u8; 10 * MIB];
    c.write_all(&data).await.unwrap();
    // Counted as they move: the stream is still open, and the counter has it all.
    let mut now = String::new();
    for _ in 0..200 {
        now = scrape(admin).await;
        if value(&now, "flowgate_backend_bytes_total", &to) - to0 == (10 * MIB) as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        value(&now, "flowgate_backend_bytes_total", &to) - to0,
        (10 * MIB) as f64,
        "to_backend never reached 10 MiB while the stream was open"
    );
    assert_eq!(
        value(&now, "flowgate_connections_active", &[("listener", "l")]),
        1.0
    );
    assert_eq!(value(&now, "flowgate_backend_connections_active", &be), 1.0);
    let mut back = vec![0u8; 5 * MIB];
    c.read_exact(&mut back).await.unwrap();
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    drop(c);

    let log_path = fg.dir.0.join("access.log");
    let logged = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log_path).is_ok_and(|s| s.lines().count() == 1)
    })
    .await;
    assert!(logged, "one access-log line in {}", log_path.display());
    let line = std::fs::read_to_string(&log_path).unwrap();
    let after = scrape(admin).await;
    let d_to = value(&after, "flowgate_backend_bytes_total", &to) - to0;
    let d_from = value(&after, "flowgate_backend_bytes_total", &from) - from0;
    assert_eq!(d_to, (10 * MIB) as f64);
    assert_eq!(d_from, (5 * MIB) as f64);
    assert_eq!(field(&line, "to_backend").parse::<f64>().unwrap(), d_to);
    assert_eq!(field(&line, "from_backend").parse::<f64>().unwrap(), d_from);
    assert_eq!(field(&line, "listener"), "l");
    assert_eq!(field(&line, "pool"), "p");
    assert_eq!(field(&line, "backend"), name);
    assert_eq!(field(&line, "reason"), "client_closed");
    for k in ["connect_ms", "first_byte_ms", "duration_ms"] {
        let v: f64 = field(&line, k)
            .parse()
            .unwrap_or_else(|_| panic!("{k} in {line}"));
        assert!(v >= 0.0, "{k} in {line}");
    }
    assert_eq!(
        value(&after, "flowgate_connections_total", &[("listener", "l")]) - conns0,
        1.0
    );
    assert_eq!(
        value(&after, "flowgate_backend_connections_total", &be) - bconns0,
        1.0
    );
    assert_eq!(
        value(&after, "flowgate_connections_active", &[("listener", "l")]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_reloads_and_connect_errors_are_counted_by_reason() {
    let dead = dead_addr().to_string();
    let live = TestBackend::start(Kind::Echo).await;
    let toml = format!(
        r#"
[admin]
bind = "127.0.0.1:0"
[log]
access_log = "access.log"
[[listeners]]
name = "dead"
bind = "127.0.0.1:0"
pool = "d"
[[listeners]]
name = "live"
bind = "127.0.0.1:0"
pool = "p"
[[pools]]
name = "d"
backends = [{{ address = "{dead}" }}]
[[pools]]
name = "p"
backends = [{{ address = "{}" }}]
"#,
        live.name
    );
    let mut fg = Proc::spawn(&toml, &[]);
    let admin = fg.admin();
    // connect_failed: the only backend refuses.
    let mut c = TcpStream::connect(fg.addr("dead")).await.unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(c.read(&mut buf).await.unwrap_or(0), 0);
    // no_backend: the only backend is drained.
    let r = curl(
        admin,
        "POST",
        &format!("/api/v1/pools/p/backends/{}/drain", live.name),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let mut c = TcpStream::connect(fg.addr("live")).await.unwrap();
    assert_eq!(c.read(&mut buf).await.unwrap_or(0), 0);

    // One good reload, one bad.
    assert_eq!(
        curl(admin, "POST", "/api/v1/reload", None, None)
            .await
            .status,
        200
    );
    std::fs::write(fg.dir.0.join("flowgate.toml"), "not toml [").unwrap();
    assert_eq!(
        curl(admin, "POST", "/api/v1/reload", None, None)
            .await
            .status,
        400
    );

    let text = scrape(admin).await;
    let rej = |l: &str, r: &str| {
        value(
            &text,
            "flowgate_connections_rejected_total",
            &[("listener", l), ("reason", r)],
        )
    };
    assert_eq!(rej("dead", "connect_failed"), 1.0, "{text}");
    assert_eq!(rej("dead", "no_backend"), 0.0);
    assert_eq!(rej("live", "no_backend"), 1.0);
    assert_eq!(rej("live", "max_connections"), 0.0);
    assert_eq!(
        value(
            &text,
            "flowgate_backend_connect_errors_total",
            &[("pool", "d"), ("backend", &dead), ("reason", "refused")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "flowgate_backend_state",
            &[
                ("pool", "p"),
                ("backend", &live.name),
                ("state", "draining")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "flowgate_backend_up",
            &[("pool", "p"), ("backend", &live.name)]
        ),
        0.0
    );
    assert_eq!(
        value(
            &text,
            "flowgate_config_reloads_total",
            &[("result", "success")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "flowgate_config_reloads_total",
            &[("result", "failure")]
        ),
        1.0
    );

    // The access log names both reasons, with no backend bytes.
    let log_path = fg.dir.0.join("access.log");
    let ok = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log_path).is_ok_and(|s| s.lines().count() == 2)
    })
    .await;
    assert!(ok, "two access-log lines");
    let log = std::fs::read_to_string(&log_path).unwrap();
    let reasons: Vec<&str> = log.lines().map(|l| field(l, "reason")).collect();
    assert_eq!(reasons, ["connect_failed", "no_backend"], "{log}");
    fg.signal(Signal::SIGTERM);
    assert!(fg.exited(Duration::from_secs(10)).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_reopens_on_sigusr1() {
    let b = TestBackend::start(Kind::Echo).await;
    let fg = Proc::spawn(
        &config(
            &[&b.name],
            "[log]\nformat = \"json\"\naccess_log = \"access.log\"\n",
        ),
        &[],
    );
    let addr = fg.addr("l");
    let log_path = fg.dir.0.join("access.log");
    let rotated = fg.dir.0.join("access.log.1");
    let one = |n: usize| async move {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let msg = vec![b'x'; n];
        c.write_all(&msg).await.unwrap();
        let mut back = vec![0u8; n];
        c.read_exact(&mut back).await.unwrap();
    };
    one(3).await;
    let lines = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map(|s| s.lines().map(String::from).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert!(wait_until(Duration::from_secs(10), || lines(&log_path).len() == 1).await);
    // logrotate: move the file away, then tell flowgate.
    std::fs::rename(&log_path, &rotated).unwrap();
    fg.signal(Signal::SIGUSR1);
    assert!(
        fg.logged("access log reopened", Duration::from_secs(10))
            .await
    );
    one(5).await;
    assert!(wait_until(Duration::from_secs(10), || lines(&log_path).len() == 1).await);
    let old: serde_json::Value = serde_json::from_str(&lines(&rotated)[0]).unwrap();
    let new: serde_json::Value = serde_json::from_str(&lines(&log_path)[0]).unwrap();
    assert_eq!(
        lines(&rotated).len(),
        1,
        "nothing more went to the rotated file"
    );
    assert_eq!(old["to_backend"], 3);
    assert_eq!(new["to_backend"], 5);
    assert_eq!(new["from_backend"], 5);
    assert_eq!(new["listener"], "l");
    assert_eq!(new["backend"], b.name.as_str());
    assert_eq!(new["proto"], "tcp");
    assert!(new["connect_ms"].is_number() && new["duration_ms"].is_number());
    // flowgate's own log is JSON too.
    let own = fg.log();
    let started = own
        .lines()
        .find(|l| l.contains("flowgate started"))
        .expect("started line");
    let v: serde_json::Value = serde_json::from_str(started).expect("JSON log line");
    assert_eq!(v["level"], "INFO");
}
