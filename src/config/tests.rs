use super::*;

fn parse(s: &str) -> Result<Config, ConfigError> {
    Config::parse(s, Path::new("t.toml"))
}

const GOOD: &str = r#"
[runtime]
workers = 2
shutdown_timeout = "30s"

[[listeners]]
name = "inference"
bind = "127.0.0.1:7000"
protocol = "tcp"
pool = "gpu"
connect_timeout = "3s"
idle_timeout = "350s"
max_connections = 10000

[[pools]]
name = "gpu"
algorithm = "round-robin"
connect_attempts = 3
backends = [
  { address = "127.0.0.1:9001", weight = 2 },
  { address = "127.0.0.1:9002" },
]
"#;

#[test]
fn good_config_parses() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.runtime.workers, 2);
    assert_eq!(c.listeners[0].idle_timeout, Duration::from_secs(350));
    assert_eq!(c.pools[0].backends[0].weight, 2);
    assert_eq!(c.pools[0].backends[1].weight, 1);
    assert_eq!(c.listeners[0].max_connections, Some(10000));
}

#[test]
fn error_has_line_column_and_path() {
    let bad = GOOD.replace("weight = 2", "weight = 0");
    let e = parse(&bad).unwrap_err().to_string();
    assert!(e.starts_with("t.toml:20:"), "{e}");
    assert!(e.contains("pools[0].backends[0].weight"), "{e}");
    assert!(e.contains("1..=1000"), "{e}");
}

#[test]
fn line_col_counts_from_one() {
    assert_eq!(line_col("ab\ncd", 0), (1, 1));
    assert_eq!(line_col("ab\ncd", 4), (2, 2));
}

/// Any mangling of a valid file gives Ok or a positioned error, never a panic.
#[test]
fn mangled_input_never_panics() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let bytes = GOOD.as_bytes();
    for _ in 0..3000 {
        let mut b = bytes.to_vec();
        for _ in 0..rng.gen_range(1..6) {
            let i = rng.gen_range(0..b.len());
            match rng.gen_range(0..3) {
                0 => b[i] = rng.gen(),
                1 => {
                    b.remove(i);
                }
                _ => b.truncate(i),
            }
            if b.is_empty() {
                break;
            }
        }
        let text = String::from_utf8_lossy(&b);
        if let Err(ConfigError::Invalid { line, column, .. }) = parse(&text) {
            assert!(line >= 1 && column >= 1);
        }
    }
}

/// What `check` accepts, `run` can start with (issue 10, items 14, 15 and 20).
#[test]
fn values_that_would_crash_run_are_refused_with_their_place() {
    let cases = [
        (
            GOOD.replace("workers = 2", "workers = 100000000000"),
            "runtime.workers",
            "out of range",
        ),
        (
            GOOD.replace(
                "idle_timeout = \"350s\"",
                "idle_timeout = \"580000000000y\"",
            ),
            "listeners[0].idle_timeout",
            "at most 365d",
        ),
        (
            GOOD.replace("max_connections = 10000", "max_connections = 99999999999"),
            "listeners[0].max_connections",
            "out of range",
        ),
        (
            GOOD.replace("bind = \"127.0.0.1:7000\"", "bind = \"127.0.0.1:9001\""),
            "listeners[0].bind",
            "connect to itself",
        ),
        (
            GOOD.replace("127.0.0.1:9002", "127.0.0:9002"),
            "pools[0].backends[1].address",
            "four numbers",
        ),
        (
            GOOD.replace("bind = \"127.0.0.1:7000\"", "bind = \"10.1:7000\""),
            "listeners[0].bind",
            "four numbers",
        ),
    ];
    for (text, path, says) in cases {
        let e = parse(&text).expect_err(path).to_string();
        assert!(e.starts_with("t.toml:"), "{e}");
        assert!(e.contains(path), "{path}: {e}");
        assert!(e.contains(says), "{says}: {e}");
    }
    // The bounds themselves are accepted.
    let c = parse(
        &GOOD
            .replace("workers = 2", "workers = 1024")
            .replace("idle_timeout = \"350s\"", "idle_timeout = \"365d\""),
    )
    .unwrap();
    assert_eq!(c.runtime.workers, 1024);
    assert_eq!(
        c.listeners[0].idle_timeout,
        Duration::from_secs(365 * 24 * 3600)
    );
}

/// `${NAME}` from the environment (issue 10: operator basics), with an unset one
/// named at its place.
#[test]
fn environment_variables_in_strings() {
    std::env::set_var("FLOWGATE_TEST_BACKEND_PORT", "9011");
    let c =
        parse(&GOOD.replace("127.0.0.1:9002", "127.0.0.1:${FLOWGATE_TEST_BACKEND_PORT}")).unwrap();
    assert_eq!(c.pools[0].backends[1].addr.port(), 9011);
    let e = parse(&GOOD.replace("127.0.0.1:9002", "${FLOWGATE_TEST_UNSET_VARIABLE}"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("t.toml:21:16: "), "{e}");
    assert!(e.contains("FLOWGATE_TEST_UNSET_VARIABLE is not set"), "{e}");
}

/// `access_log` to syslog (issue 10, operator basics): the local daemon, or a
/// remote one over UDP whose host is resolved here, port 514 when none is given.
#[test]
fn access_log_to_syslog() {
    let dest = |log: &str| parse(&format!("{GOOD}\n[log]\n{log}\n")).map(|c| c.log.access_log);
    let udp = |addr: &str, facility| AccessLogDest::SyslogUdp {
        addr: addr.parse().unwrap(),
        facility,
    };
    for (log, want) in [
        (
            "access_log = \"syslog\"",
            AccessLogDest::Syslog { facility: 16 },
        ),
        (
            "access_log = \"syslog\"\nsyslog_facility = \"daemon\"",
            AccessLogDest::Syslog { facility: 3 },
        ),
        (
            "access_log = \"udp://127.0.0.1:5514\"",
            udp("127.0.0.1:5514", 16),
        ),
        ("access_log = \"udp://127.0.0.1\"", udp("127.0.0.1:514", 16)),
        ("access_log = \"udp://[::1]\"", udp("[::1]:514", 16)),
        (
            "access_log = \"udp://[::1]:601\"\nsyslog_facility = \"local3\"",
            udp("[::1]:601", 19),
        ),
    ] {
        assert_eq!(dest(log).unwrap(), want, "{log}");
    }
    assert!(matches!(
        dest("access_log = \"udp://localhost\"").unwrap(),
        AccessLogDest::SyslogUdp { addr, .. } if addr.ip().is_loopback() && addr.port() == 514
    ));

    // Each error points at its value, on the lines after `[log]`.
    let line = GOOD.lines().count() + 3;
    for (log, key, says) in [
        (
            "access_log = \"tcp://127.0.0.1:514\"",
            "log.access_log",
            "only udp:// is supported",
        ),
        (
            "access_log = \"udp://\"",
            "log.access_log",
            "invalid syslog URL \"udp://\"",
        ),
        (
            "access_log = \"udp://127.0.0.1:99999\"",
            "log.access_log",
            "out of range",
        ),
        (
            "access_log = \"udp://127.0.0.1:x\"",
            "log.access_log",
            "invalid port",
        ),
        (
            "access_log = \"udp://10.1\"",
            "log.access_log",
            "four numbers",
        ),
        (
            "access_log = \"udp://127.0.0.1:0\"",
            "log.access_log",
            "port 0",
        ),
        (
            "access_log = \"udp://host/path\"",
            "log.access_log",
            "not a valid address",
        ),
        (
            "access_log = \"syslog\"\nsyslog_facility = \"local9\"",
            "log.syslog_facility",
            "unknown facility \"local9\": expected one of kern, user,",
        ),
        (
            "access_log = \"stdout\"\nsyslog_facility = \"local1\"",
            "log.syslog_facility",
            "applies only to access_log = \"syslog\"",
        ),
    ] {
        let e = dest(log).expect_err(log).to_string();
        let at = if key == "log.access_log" {
            line
        } else {
            line + 1
        };
        assert!(e.starts_with(&format!("t.toml:{at}:")), "{log}: {e}");
        assert!(e.contains(&format!(": {key}: ")), "{log}: {e}");
        assert!(e.contains(says), "{log}: {says}: {e}");
    }
}

const HTTP: &str = r#"
[[listeners]]
name = "api"
bind = "127.0.0.1:8080"
protocol = "http"

  [[listeners.routes]]
  host = "API.Example.com"
  path_prefix = "/v1/chat"
  pool = "chat"
  strip_prefix = true

  [[listeners.routes]]
  host = "*.example.com"
  pool = "chat"

[[pools]]
name = "chat"
upstream_protocol = "h2c"
backends = [{ address = "127.0.0.1:9001" }]
"#;

#[test]
fn http_listener_with_routes() {
    let c = parse(HTTP).unwrap();
    let l = &c.listeners[0];
    assert_eq!(l.pool, None, "an http listener may leave pool out");
    assert_eq!(
        l.idle_timeout,
        Duration::from_secs(60),
        "http's own default"
    );
    let h = l.http.as_ref().unwrap();
    assert_eq!(h.header_timeout, Duration::from_secs(10));
    assert_eq!(h.max_header_bytes, 65536);
    assert_eq!(h.routes[0].host.as_deref(), Some("api.example.com"));
    assert!(h.routes[0].strip_prefix);
    assert_eq!(h.routes[1].path_prefix, "/");
    assert_eq!(c.pools[0].upstream_protocol, UpstreamProtocol::H2c);
    assert_eq!(c.pools[0].max_idle_per_backend, 256);
    assert_eq!(c.pools[0].keepalive_timeout, Duration::from_secs(60));
}

#[test]
fn http_mistakes_are_named() {
    let cases: &[(&str, &str, &str)] = &[
        (
            r#"path_prefix = "/v1/chat""#,
            r#"path_prefix = "v1""#,
            "listeners[0].routes[0].path_prefix: \"v1\" is not a path prefix",
        ),
        (
            r#"host = "API.Example.com""#,
            r#"host = "a:80""#,
            "listeners[0].routes[0].host: \"a:80\" is not a host",
        ),
        (
            r#"  pool = "chat"
  strip_prefix"#,
            r#"  pool = "nope"
  strip_prefix"#,
            "listeners[0].routes[0].pool: no pool named \"nope\"",
        ),
        (
            r#"protocol = "http""#,
            "protocol = \"tcp\"\npool = \"chat\"",
            "listeners[0].routes: routes applies to http listeners; this one is tcp",
        ),
        (
            r#"protocol = "http""#,
            "protocol = \"http\"\nmax_header_bytes = 100",
            "listeners[0].max_header_bytes: 100 is out of range",
        ),
        (
            r#"protocol = "http""#,
            "protocol = \"http\"\nheader_timeout = \"0s\"",
            "listeners[0].header_timeout: 0s would refuse",
        ),
        (
            r#"upstream_protocol = "h2c""#,
            r#"upstream_protocol = "h3""#,
            "pools[0].upstream_protocol",
        ),
        (
            r#"upstream_protocol = "h2c""#,
            "upstream_protocol = \"h2c\"\nkeepalive_timeout = \"0s\"",
            "pools[0].keepalive_timeout: 0ns is out of range",
        ),
    ];
    for (from, to, want) in cases {
        assert!(HTTP.contains(from), "{from}");
        let text = HTTP.replacen(from, to, 1);
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains(want), "{to}: {e}");
    }
    // The duplicate: same host and prefix twice.
    let dup = HTTP.replacen(
        r#"host = "*.example.com""#,
        r#"host = "api.example.com"
  path_prefix = "/v1/chat""#,
        1,
    );
    let e = parse(&dup).unwrap_err().to_string();
    assert!(
        e.contains("routes[0] already routes host \"api.example.com\""),
        "{e}"
    );
    // A tcp listener still needs its pool.
    let e = parse(&GOOD.replace("pool = \"gpu\"\nconnect", "connect"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("listeners[0].pool: missing"), "{e}");
}

#[test]
fn busy_poll_is_bounded_and_per_core_only() {
    let with = |extra: &str| GOOD.replace("shutdown_timeout = \"30s\"", extra);
    assert_eq!(parse(GOOD).unwrap().runtime.busy_poll, None);
    let c = parse(&with("busy_poll = \"50us\"")).unwrap();
    assert_eq!(c.runtime.busy_poll, Some(Duration::from_micros(50)));
    assert_eq!(
        parse(&with("busy_poll = \"0s\""))
            .unwrap()
            .runtime
            .busy_poll,
        None
    );
    let e = parse(&with("busy_poll = \"1s\"")).unwrap_err().to_string();
    assert!(
        e.contains("runtime.busy_poll") && e.contains("too long"),
        "{e}"
    );
    let e = parse(&with("busy_poll = \"50us\"\nworker_model = \"shared\""))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("runtime.busy_poll") && e.contains("per-core"),
        "{e}"
    );
}

/// `GOOD` with `listener` added to its tcp listener and `pool` to its pool.
fn with_proxy(listener: &str, pool: &str) -> String {
    GOOD.replacen(
        "max_connections = 10000",
        &format!("max_connections = 10000\n{listener}"),
        1,
    )
    .replacen(
        "connect_attempts = 3",
        &format!("connect_attempts = 3\n{pool}"),
        1,
    )
}

#[test]
fn proxy_protocol_keys_and_defaults() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.listeners[0].accept_proxy, None, "off by default");
    assert_eq!(c.pools[0].send_proxy, SendProxy::Off);

    let c = parse(&with_proxy("accept_proxy = \"v2\"", "send_proxy = \"v1\"")).unwrap();
    let a = c.listeners[0].accept_proxy.as_ref().unwrap();
    assert_eq!(a.version, AcceptProxy::V2);
    assert_eq!(a.trusted, None, "every peer by default");
    assert_eq!(a.header_timeout, Duration::from_secs(3));
    assert!(a.trusts("203.0.113.9".parse().unwrap()));
    assert_eq!(c.pools[0].send_proxy, SendProxy::V1);
    // `source`: an address, or the client's (transparent mode).
    let c = parse(&with_proxy("", "source = \"client\"")).unwrap();
    assert_eq!(c.pools[0].source, Some(super::PoolSource::Client));

    let c = parse(&with_proxy(
        "accept_proxy = \"any\"\nproxy_trusted = [\"10.0.0.0/8\", \"2001:db8::/32\", \"192.0.2.7\"]\nproxy_header_timeout = \"250ms\"",
        "",
    ))
    .unwrap();
    let a = c.listeners[0].accept_proxy.as_ref().unwrap();
    assert_eq!(a.header_timeout, Duration::from_millis(250));
    for (ip, trusted) in [
        ("10.1.2.3", true),
        ("::ffff:10.1.2.3", true),
        ("2001:db8::5", true),
        ("192.0.2.7", true),
        ("192.0.2.8", false),
        ("11.0.0.1", false),
    ] {
        assert_eq!(a.trusts(ip.parse().unwrap()), trusted, "{ip}");
    }
}

#[test]
fn proxy_protocol_mistakes_are_named() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "accept_proxy = \"v3\"",
            "",
            "listeners[0].accept_proxy: unknown variant `v3`, expected one of `off`, `v1`, `v2`, `any`",
        ),
        (
            "",
            "send_proxy = \"any\"",
            "pools[0].send_proxy: unknown variant `any`, expected one of `off`, `v1`, `v2`",
        ),
        (
            "proxy_trusted = [\"10.0.0.0/8\"]",
            "",
            "listeners[0].proxy_trusted: proxy_trusted applies with accept_proxy (v1, v2 or any); this listener reads no PROXY header",
        ),
        (
            "accept_proxy = \"off\"\nproxy_header_timeout = \"3s\"",
            "",
            "listeners[0].proxy_header_timeout: proxy_header_timeout applies with accept_proxy",
        ),
        (
            "accept_proxy = \"v1\"\nproxy_trusted = []",
            "",
            "listeners[0].proxy_trusted: an empty list trusts no peer",
        ),
        (
            "accept_proxy = \"v1\"\nproxy_trusted = [\"10.0.0.0/8\", \"10.0.0/8\"]",
            "",
            "listeners[0].proxy_trusted[1]: \"10.0.0/8\" is not a network",
        ),
        (
            "accept_proxy = \"v1\"\nproxy_trusted = [\"10.1.0.0/8\"]",
            "",
            "listeners[0].proxy_trusted[0]: \"10.1.0.0/8\" has bits set past its /8 prefix: did you mean \"10.0.0.0/8\"?",
        ),
        (
            "accept_proxy = \"v2\"\nproxy_header_timeout = \"0s\"",
            "",
            "listeners[0].proxy_header_timeout: 0s would close every client",
        ),
        (
            "accept_proxy = \"v2\"\nproxy_header_timeout = \"3\"",
            "",
            "listeners[0].proxy_header_timeout: invalid duration \"3\"",
        ),
    ];
    for (listener, pool, want) in cases {
        let e = parse(&with_proxy(listener, pool)).unwrap_err().to_string();
        assert!(e.contains(want), "{listener} / {pool}: {e}");
        assert!(e.starts_with("t.toml:"), "{e}");
    }
}

#[test]
fn proxy_protocol_is_for_tcp_listeners() {
    let udp = GOOD
        .replace("protocol = \"tcp\"", "protocol = \"udp\"")
        .replace("max_connections = 10000", "accept_proxy = \"v2\"");
    let e = parse(&udp).unwrap_err().to_string();
    assert!(
        e.contains(
            "listeners[0].accept_proxy: accept_proxy applies to tcp listeners; this one is udp"
        ),
        "{e}"
    );
    let http = HTTP.replacen(
        "protocol = \"http\"",
        "protocol = \"http\"\naccept_proxy = \"any\"",
        1,
    );
    let e = parse(&http).unwrap_err().to_string();
    assert!(e.contains("this one is http"), "{e}");
    // A pool with send_proxy behind a udp listener, or an http route.
    let udp = GOOD
        .replace("protocol = \"tcp\"", "protocol = \"udp\"")
        .replace("max_connections = 10000", "")
        .replace("connect_attempts = 3", "send_proxy = \"v2\"");
    let e = parse(&udp).unwrap_err().to_string();
    assert!(
        e.contains("listeners[0].pool: pool \"gpu\" has send_proxy = \"v2\", which only tcp listeners send; this one is udp"),
        "{e}"
    );
    let http = HTTP.replacen(
        "upstream_protocol = \"h2c\"",
        "upstream_protocol = \"h2c\"\nsend_proxy = \"v1\"",
        1,
    );
    let e = parse(&http).unwrap_err().to_string();
    assert!(
        e.contains(".pool: pool \"chat\" has send_proxy = \"v1\""),
        "{e}"
    );
    assert!(e.contains("this one is http"), "{e}");
}

#[test]
fn source_rules_parse_and_their_mistakes_are_named() {
    let with = |keys: &str| {
        GOOD.replace(
            "max_connections = 10000",
            &format!("max_connections = 10000\n{keys}"),
        )
    };
    assert_eq!(parse(GOOD).unwrap().listeners[0].sources, None);
    let c = parse(&with(
        "allow = [\"10.0.0.0/8\"]\ndeny = [\"10.1.0.0/16\"]\nmax_connections_per_source = 100\nmax_rate_per_source = \"50/s\"",
    ))
    .unwrap();
    let s = c.listeners[0].sources.clone().unwrap();
    assert!(s.admits("10.2.0.1".parse().unwrap()));
    assert!(!s.admits("10.1.0.1".parse().unwrap()));
    assert_eq!(s.max_per_source, Some(100));
    assert_eq!(s.rate.map(|r| r.per_sec), Some(50.0));
    assert_eq!(s.table_size, 100_000);
    for (keys, want) in [
        ("allow = []", "admits no client"),
        ("deny = [\"10.1.2.3/8\"]", "did you mean"),
        ("max_connections_per_source = 0", "out of range"),
        ("max_rate_per_source = \"5/h\"", "neither s nor m"),
        ("source_table_size = 0", "out of range"),
    ] {
        let e = parse(&with(keys)).unwrap_err().to_string();
        assert!(e.contains(want), "{keys}: {e}");
    }
    let udp = GOOD
        .replace("protocol = \"tcp\"", "protocol = \"udp\"")
        .replace("max_connections = 10000", "deny = [\"10.0.0.0/8\"]");
    let e = parse(&udp).unwrap_err().to_string();
    assert!(e.contains("deny applies to tcp and http listeners"), "{e}");
}

/// A hostname backend is one backend per address it resolves to, named by the
/// address, each with the entry's weight and cap and the entry as `hostname`; with
/// a `source`, only that family's addresses. A literal names itself.
#[test]
fn a_hostname_is_one_backend_per_address() {
    let text = GOOD.replace(
        "{ address = \"127.0.0.1:9002\" }",
        "{ address = \"localhost:9002\", weight = 3, max_connections = 7 }",
    );
    let c = parse(&text).unwrap();
    let b = &c.pools[0].backends;
    assert!(b.len() >= 2, "{b:?}");
    assert_eq!(b[0].hostname, None);
    for r in &b[1..] {
        assert_eq!(r.hostname.as_deref(), Some("localhost:9002"));
        assert_eq!(r.name, r.addr.to_string());
        assert!(r.addr.ip().is_loopback() && r.addr.port() == 9002, "{r:?}");
        assert_eq!((r.weight, r.max_connections), (3, Some(7)));
    }
    let v4 = parse(&format!("{text}source = \"127.0.0.1\"\n")).unwrap();
    assert!(v4.pools[0].backends.iter().all(|b| b.addr.is_ipv4()));
    let e = parse(&text.replace("localhost:9002", "127.0.0.1:9001"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("duplicate backend"), "{e}");
    let e = parse(&format!("{text}resolve_interval = \"10ms\"\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("pools[0].resolve_interval"), "{e}");
}
