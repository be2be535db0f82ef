//! Configuration: the TOML schema, parsing, validation and address resolution.
//!
//! The file is deserialized into the `raw` structs with `deny_unknown_fields`, so a
//! typo is an error instead of a silently ignored key. Values that need checking
//! (durations, weights, addresses) have their own types whose `Deserialize` impls
//! reject bad input, so the error carries the key path and the position of the value.
//! Cross-references (a listener's pool, duplicate names) are checked afterwards, using
//! the spans `toml::Spanned` keeps. Every error renders as
//! `FILE:LINE:COLUMN: KEY.PATH: what was expected`.

mod diff;
mod types;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

pub use diff::{diff, Changes, ReloadPlan, RestartKey};
pub use types::{
    AccessLogDest, Algorithm, DurationStr, HealthKind, LogFormat, Protocol, StatusRanges, Weight,
    WhenAllDown, WorkerModel,
};

/// A configuration error, written for the human who has to fix the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {path}: {message}")]
    Invalid {
        file: PathBuf,
        line: usize,
        column: usize,
        /// Dotted key path, e.g. `pools[0].backends[1].weight`.
        path: String,
        message: String,
    },
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from (reload re-reads it).
    pub source: Option<PathBuf>,
    pub runtime: RuntimeConfig,
    pub admin: Option<AdminConfig>,
    pub log: LogConfig,
    pub listeners: Vec<ListenerConfig>,
    pub pools: Vec<PoolConfig>,
}

/// `[log]`: flowgate's own log and the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A tracing filter ("info", "debug", "flowgate=debug,info"); `RUST_LOG` wins.
    pub level: String,
    pub format: LogFormat,
    /// Relative paths are resolved against the config file's directory.
    pub access_log: AccessLogDest,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
            access_log: AccessLogDest::Off,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Number of worker threads; already resolved from `0` to the CPU count.
    pub workers: usize,
    pub worker_model: WorkerModel,
    pub shutdown_timeout: Duration,
    /// Use splice(2) for bulk transfers (Linux); `false` copies everything.
    pub splice: bool,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub protocol: Protocol,
    pub pool: String,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: Option<usize>,
    pub backlog: u32,
    /// UDP: at most this many sessions at once on the listener.
    pub max_sessions: Option<usize>,
    /// UDP: at most this many sessions per client IP address.
    pub max_sessions_per_source: Option<usize>,
    /// UDP: a session ends after this many reply datagrams (0: never).
    pub responses: u64,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    pub algorithm: Algorithm,
    pub connect_attempts: usize,
    pub backends: Vec<BackendConfig>,
    /// How long connections of a draining (or removed) backend may stay open.
    pub drain_timeout: Duration,
    /// Ramp a recovered backend's weight from ~0 to full over this time.
    pub slow_start: Duration,
    pub when_all_down: WhenAllDown,
    pub health_check: Option<HealthCheckConfig>,
    pub passive: Option<PassiveConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub kind: HealthKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Probe this port instead of the traffic port.
    pub port: Option<u16>,
    /// http: request path.
    pub path: String,
    /// http: accepted status codes (inclusive ranges).
    pub expect_status: Vec<(u16, u16)>,
    /// http: Host header; default the backend's address as written.
    pub host: Option<String>,
    /// tcp: bytes to send after connecting.
    pub send: Option<String>,
    /// tcp: bytes the reply must contain.
    pub expect: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassiveConfig {
    pub consecutive_failures: u32,
    pub eject_for: Duration,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    pub token_file: Option<PathBuf>,
    /// The token read from `token_file` at load time.
    pub token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// The address as written in the file: the backend's identity in logs, the API,
    /// metrics labels and the consistent hash, so it stays stable across restarts.
    pub name: String,
    /// The resolved address connections go to.
    pub addr: SocketAddr,
    pub weight: u32,
}

mod raw {
    //! The file's shape, one struct per table, before cross-checks.
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        #[serde(default)]
        pub runtime: Runtime,
        pub admin: Option<Admin>,
        pub log: Option<Log>,
        #[serde(default)]
        pub listeners: Vec<Listener>,
        #[serde(default)]
        pub pools: Vec<Pool>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Runtime {
        #[serde(default)]
        pub workers: usize,
        #[serde(default)]
        pub worker_model: WorkerModel,
        #[serde(default = "default_shutdown")]
        pub shutdown_timeout: DurationStr,
        #[serde(default = "default_true")]
        pub splice: bool,
    }

    impl Default for Runtime {
        fn default() -> Self {
            Runtime {
                workers: 0,
                worker_model: WorkerModel::default(),
                shutdown_timeout: default_shutdown(),
                splice: true,
            }
        }
    }

    fn default_true() -> bool {
        true
    }
    fn default_shutdown() -> DurationStr {
        DurationStr(Duration::from_secs(30))
    }
    fn default_connect_timeout() -> DurationStr {
        DurationStr(Duration::from_secs(3))
    }
    fn default_idle_timeout() -> DurationStr {
        DurationStr(Duration::from_secs(350))
    }
    fn default_attempts() -> Spanned<usize> {
        Spanned::new(0..0, 3)
    }
    fn default_protocol() -> Spanned<Protocol> {
        Spanned::new(0..0, Protocol::Tcp)
    }
    fn default_backlog() -> u32 {
        1024
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Listener {
        pub name: Spanned<String>,
        pub bind: Spanned<String>,
        #[serde(default = "default_protocol")]
        pub protocol: Spanned<Protocol>,
        pub pool: Spanned<String>,
        #[serde(default = "default_connect_timeout")]
        pub connect_timeout: DurationStr,
        #[serde(default = "default_idle_timeout")]
        pub idle_timeout: DurationStr,
        pub max_connections: Option<Spanned<usize>>,
        #[serde(default = "default_backlog")]
        pub backlog: u32,
        pub max_sessions: Option<Spanned<usize>>,
        pub max_sessions_per_source: Option<Spanned<usize>>,
        pub responses: Option<Spanned<u64>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Log {
        pub level: Option<Spanned<String>>,
        #[serde(default)]
        pub format: LogFormat,
        #[serde(default)]
        pub access_log: AccessLogDest,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Admin {
        pub bind: Spanned<String>,
        pub token_file: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Pool {
        pub name: Spanned<String>,
        #[serde(default)]
        pub algorithm: Algorithm,
        #[serde(default = "default_attempts")]
        pub connect_attempts: Spanned<usize>,
        pub backends: Spanned<Vec<Backend>>,
        #[serde(default = "default_drain")]
        pub drain_timeout: Spanned<DurationStr>,
        #[serde(default = "default_zero")]
        pub slow_start: DurationStr,
        #[serde(default)]
        pub when_all_down: WhenAllDown,
        pub health_check: Option<Spanned<HealthCheck>>,
        pub passive: Option<Passive>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct HealthCheck {
        pub kind: HealthKind,
        #[serde(default = "default_interval")]
        pub interval: DurationStr,
        #[serde(default = "default_check_timeout")]
        pub timeout: DurationStr,
        #[serde(default = "default_rise")]
        pub rise: Spanned<u32>,
        #[serde(default = "default_fall")]
        pub fall: Spanned<u32>,
        pub port: Option<Spanned<u32>>,
        pub path: Option<Spanned<String>>,
        pub expect_status: Option<Spanned<StatusRanges>>,
        pub host: Option<Spanned<String>>,
        pub send: Option<Spanned<String>>,
        pub expect: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Passive {
        #[serde(default = "default_failures")]
        pub consecutive_failures: Spanned<u32>,
        #[serde(default = "default_eject")]
        pub eject_for: DurationStr,
    }

    fn default_drain() -> Spanned<DurationStr> {
        Spanned::new(0..0, DurationStr(Duration::from_secs(300)))
    }
    fn default_zero() -> DurationStr {
        DurationStr(Duration::ZERO)
    }
    fn default_interval() -> DurationStr {
        DurationStr(Duration::from_secs(2))
    }
    fn default_check_timeout() -> DurationStr {
        DurationStr(Duration::from_secs(1))
    }
    fn default_rise() -> Spanned<u32> {
        Spanned::new(0..0, 2)
    }
    fn default_fall() -> Spanned<u32> {
        Spanned::new(0..0, 3)
    }
    fn default_failures() -> Spanned<u32> {
        Spanned::new(0..0, 5)
    }
    fn default_eject() -> DurationStr {
        DurationStr(Duration::from_secs(30))
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Backend {
        pub address: Spanned<String>,
        #[serde(default)]
        pub weight: Weight,
    }
}

/// Upper bound on `connect_attempts`; more than this only delays the client's error.
const MAX_CONNECT_ATTEMPTS: usize = 32;
/// Upper bound on `drain_timeout` (NLB's deregistration delay has the same range).
const MAX_DRAIN: Duration = Duration::from_secs(3600);

/// Validates one `[pools.health_check]` table.
fn health_check(
    h: &Spanned<raw::HealthCheck>,
    err: &dyn Fn(Range<usize>, &str, String) -> ConfigError,
) -> Result<HealthCheckConfig, ConfigError> {
    let span = h.span();
    let h = h.get_ref();
    for (v, key) in [(&h.rise, "rise"), (&h.fall, "fall")] {
        if *v.get_ref() == 0 || *v.get_ref() > 100 {
            return Err(err(
                v.span(),
                key,
                format!("expected 1..=100, found {}", v.get_ref()),
            ));
        }
    }
    if h.interval.0.is_zero() {
        return Err(err(span.clone(), "interval", "must be more than 0s".into()));
    }
    if h.timeout.0.is_zero() {
        return Err(err(span.clone(), "timeout", "must be more than 0s".into()));
    }
    let port = match &h.port {
        None => None,
        Some(p) if (1..=65535).contains(p.get_ref()) => Some(*p.get_ref() as u16),
        Some(p) => {
            return Err(err(
                p.span(),
                "port",
                format!("port {} is out of range (1..=65535)", p.get_ref()),
            ))
        }
    };
    let only = |present: Option<Range<usize>>, key: &str, kind: &str| match present {
        Some(sp) => Err(err(sp, key, format!("only applies to kind = \"{kind}\""))),
        None => Ok(()),
    };
    match h.kind {
        HealthKind::Tcp => {
            only(h.path.as_ref().map(|v| v.span()), "path", "http")?;
            only(
                h.expect_status.as_ref().map(|v| v.span()),
                "expect_status",
                "http",
            )?;
            only(h.host.as_ref().map(|v| v.span()), "host", "http")?;
        }
        HealthKind::Http => {
            only(h.send.as_ref().map(|v| v.span()), "send", "tcp")?;
            only(h.expect.as_ref().map(|v| v.span()), "expect", "tcp")?;
            if let Some(p) = &h.path {
                if !p.get_ref().starts_with('/') {
                    return Err(err(
                        p.span(),
                        "path",
                        format!("{:?} must start with '/'", p.get_ref()),
                    ));
                }
            }
        }
    }
    Ok(HealthCheckConfig {
        kind: h.kind,
        interval: h.interval.0,
        timeout: h.timeout.0,
        rise: *h.rise.get_ref(),
        fall: *h.fall.get_ref(),
        port,
        path: h
            .path
            .as_ref()
            .map_or_else(|| "/".to_string(), |p| p.get_ref().clone()),
        expect_status: h
            .expect_status
            .as_ref()
            .map_or_else(|| vec![(200, 399)], |r| r.get_ref().0.clone()),
        host: h.host.as_ref().map(|v| v.get_ref().clone()),
        send: h.send.as_ref().map(|v| v.get_ref().clone()),
        expect: h.expect.as_ref().map(|v| v.get_ref().clone()),
    })
}

/// Reads the admin token; a relative path is relative to the config file.
fn read_token(path: &Path, config_file: &Path) -> Result<String, String> {
    let full = if path.is_relative() {
        config_file.parent().unwrap_or(Path::new(".")).join(path)
    } else {
        path.to_owned()
    };
    let text = std::fs::read_to_string(&full)
        .map_err(|e| format!("cannot read {}: {e}", full.display()))?;
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(format!("{} is empty", full.display()));
    }
    Ok(token)
}

impl Config {
    /// Reads, parses, validates and resolves the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_owned(),
            source,
        })?;
        let mut c = Config::parse(&text, path)?;
        c.source = Some(path.to_owned());
        Ok(c)
    }

    /// Parses `text`; `file` is only used in error messages.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let err = |span: Range<usize>, path: String, message: String| {
            let (line, column) = line_col(text, span.start);
            ConfigError::Invalid {
                file: file.to_owned(),
                line,
                column,
                path,
                message,
            }
        };

        let de = toml::Deserializer::new(text);
        let raw: raw::File = serde_path_to_error::deserialize(de).map_err(|e| {
            // Spanned<T> shows up in the path as a private field; hide it.
            let path = e
                .path()
                .to_string()
                .replace(".$__serde_spanned_private_value", "");
            let inner = e.into_inner();
            let span = inner.span().unwrap_or(0..0);
            let path = if path == "." {
                "(top level)".into()
            } else {
                path
            };
            err(span, path, inner.message().trim().to_string())
        })?;

        let workers = match raw.runtime.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };

        let mut pools = Vec::with_capacity(raw.pools.len());
        let mut pool_names = HashSet::new();
        for (i, p) in raw.pools.iter().enumerate() {
            let at = |key: &str| format!("pools[{i}].{key}");
            if p.name.get_ref().is_empty() {
                return Err(err(p.name.span(), at("name"), "must not be empty".into()));
            }
            if !pool_names.insert(p.name.get_ref().clone()) {
                return Err(err(
                    p.name.span(),
                    at("name"),
                    format!("duplicate pool name {:?}", p.name.get_ref()),
                ));
            }
            let attempts = *p.connect_attempts.get_ref();
            if !(1..=MAX_CONNECT_ATTEMPTS).contains(&attempts) {
                return Err(err(
                    p.connect_attempts.span(),
                    at("connect_attempts"),
                    format!("expected 1..={MAX_CONNECT_ATTEMPTS}, found {attempts}"),
                ));
            }
            if p.backends.get_ref().is_empty() {
                return Err(err(
                    p.backends.span(),
                    at("backends"),
                    "expected at least one backend, found an empty list".into(),
                ));
            }
            let mut backends = Vec::with_capacity(p.backends.get_ref().len());
            let mut seen = HashSet::new();
            for (j, b) in p.backends.get_ref().iter().enumerate() {
                let key = format!("pools[{i}].backends[{j}].address");
                let name = b.address.get_ref().trim().to_string();
                let addr = resolve(&name).map_err(|m| err(b.address.span(), key.clone(), m))?;
                if addr.port() == 0 {
                    return Err(err(
                        b.address.span(),
                        key,
                        format!("{name:?}: port 0 is not a valid backend port"),
                    ));
                }
                if !seen.insert(name.clone()) {
                    return Err(err(
                        b.address.span(),
                        key,
                        format!("duplicate backend {name:?} in pool {:?}", p.name.get_ref()),
                    ));
                }
                backends.push(BackendConfig {
                    name,
                    addr,
                    weight: b.weight.0,
                });
            }
            let drain = p.drain_timeout.get_ref().0;
            if drain > MAX_DRAIN {
                return Err(err(
                    p.drain_timeout.span(),
                    at("drain_timeout"),
                    format!("{drain:?} is out of range: expected 0s..=3600s"),
                ));
            }
            let health_check = match &p.health_check {
                None => None,
                Some(h) => Some(health_check(h, &|span, key: &str, m| {
                    err(span, at(&format!("health_check.{key}")), m)
                })?),
            };
            let passive = match &p.passive {
                None => None,
                Some(pv) => {
                    if *pv.consecutive_failures.get_ref() == 0 {
                        return Err(err(
                            pv.consecutive_failures.span(),
                            at("passive.consecutive_failures"),
                            "expected a positive number".into(),
                        ));
                    }
                    Some(PassiveConfig {
                        consecutive_failures: *pv.consecutive_failures.get_ref(),
                        eject_for: pv.eject_for.0,
                    })
                }
            };
            pools.push(PoolConfig {
                name: p.name.get_ref().clone(),
                algorithm: p.algorithm,
                connect_attempts: attempts,
                backends,
                drain_timeout: drain,
                slow_start: p.slow_start.0,
                when_all_down: p.when_all_down,
                health_check,
                passive,
            });
        }

        let mut listeners = Vec::with_capacity(raw.listeners.len());
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        for (i, l) in raw.listeners.iter().enumerate() {
            let at = |key: &str| format!("listeners[{i}].{key}");
            if l.name.get_ref().is_empty() {
                return Err(err(l.name.span(), at("name"), "must not be empty".into()));
            }
            if !names.insert(l.name.get_ref().clone()) {
                return Err(err(
                    l.name.span(),
                    at("name"),
                    format!("duplicate listener name {:?}", l.name.get_ref()),
                ));
            }
            if *l.protocol.get_ref() == Protocol::Http {
                return Err(err(
                    l.protocol.span(),
                    at("protocol"),
                    format!(
                        "protocol {:?} is not supported yet; expected \"tcp\" or \"udp\"",
                        l.protocol.get_ref().as_str()
                    ),
                ));
            }
            let bind = resolve(l.bind.get_ref()).map_err(|m| err(l.bind.span(), at("bind"), m))?;
            if bind.port() != 0 && !binds.insert((*l.protocol.get_ref(), bind)) {
                return Err(err(
                    l.bind.span(),
                    at("bind"),
                    format!(
                        "{} address {bind} is already bound by another listener",
                        l.protocol.get_ref().as_str()
                    ),
                ));
            }
            if !pool_names.contains(l.pool.get_ref()) {
                let known: Vec<_> = raw
                    .pools
                    .iter()
                    .map(|p| p.name.get_ref().as_str())
                    .collect();
                return Err(err(
                    l.pool.span(),
                    at("pool"),
                    format!(
                        "no pool named {:?}; defined pools: {}",
                        l.pool.get_ref(),
                        if known.is_empty() {
                            "(none)".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
            let protocol = *l.protocol.get_ref();
            for (key, v) in [
                ("max_connections", &l.max_connections),
                ("max_sessions", &l.max_sessions),
                ("max_sessions_per_source", &l.max_sessions_per_source),
            ] {
                if let Some(m) = v {
                    if *m.get_ref() == 0 {
                        return Err(err(
                            m.span(),
                            at(key),
                            "expected a positive number (leave it out for no limit)".into(),
                        ));
                    }
                    let udp_only = key != "max_connections";
                    if udp_only != (protocol == Protocol::Udp) {
                        return Err(err(
                            m.span(),
                            at(key),
                            format!(
                                "{key} applies to {} listeners; this one is {}",
                                if udp_only { "udp" } else { "tcp" },
                                protocol.as_str()
                            ),
                        ));
                    }
                }
            }
            if let Some(r) = &l.responses {
                if protocol != Protocol::Udp {
                    return Err(err(
                        r.span(),
                        at("responses"),
                        format!(
                            "responses applies to udp listeners; this one is {}",
                            protocol.as_str()
                        ),
                    ));
                }
            }
            listeners.push(ListenerConfig {
                name: l.name.get_ref().clone(),
                bind,
                protocol: *l.protocol.get_ref(),
                pool: l.pool.get_ref().clone(),
                connect_timeout: l.connect_timeout.0,
                idle_timeout: l.idle_timeout.0,
                max_connections: l.max_connections.as_ref().map(|m| *m.get_ref()),
                backlog: l.backlog,
                max_sessions: l.max_sessions.as_ref().map(|m| *m.get_ref()),
                max_sessions_per_source: l.max_sessions_per_source.as_ref().map(|m| *m.get_ref()),
                responses: l.responses.as_ref().map_or(0, |r| *r.get_ref()),
            });
        }

        if listeners.is_empty() {
            return Err(err(
                0..0,
                "listeners".into(),
                "expected at least one [[listeners]] table; a balancer with none would serve nothing".into(),
            ));
        }

        let admin = match &raw.admin {
            None => None,
            Some(a) => {
                let bind = resolve(a.bind.get_ref())
                    .map_err(|m| err(a.bind.span(), "admin.bind".into(), m))?;
                let (token_file, token) = match &a.token_file {
                    None => (None, None),
                    Some(tf) => {
                        let path = PathBuf::from(tf.get_ref());
                        let token = read_token(&path, file)
                            .map_err(|m| err(tf.span(), "admin.token_file".into(), m))?;
                        (Some(path), Some(token))
                    }
                };
                if !bind.ip().is_loopback() && token.is_none() {
                    return Err(err(
                        a.bind.span(),
                        "admin.bind".into(),
                        format!(
                            "{bind} is not a loopback address, and without admin.token_file anyone who can reach it could drain backends or reload the config: set token_file or bind to 127.0.0.1"
                        ),
                    ));
                }
                if binds.contains(&(Protocol::Tcp, bind)) {
                    return Err(err(
                        a.bind.span(),
                        "admin.bind".into(),
                        format!("address {bind} is already bound by a listener"),
                    ));
                }
                Some(AdminConfig {
                    bind,
                    token_file,
                    token,
                })
            }
        };

        let log = match &raw.log {
            None => LogConfig::default(),
            Some(lg) => {
                let level = match &lg.level {
                    None => "info".to_string(),
                    Some(l) => {
                        let v = l.get_ref();
                        // A bare word must be a level (a bare "loud" would parse as a
                        // target name and silence everything); directives go through
                        // tracing's own parser.
                        let bare = !v.contains(['=', ',']);
                        let ok = if bare {
                            ["off", "error", "warn", "info", "debug", "trace"]
                                .contains(&v.to_ascii_lowercase().as_str())
                        } else {
                            tracing_subscriber::EnvFilter::try_new(v).is_ok()
                        };
                        if !ok {
                            return Err(err(
                                l.span(),
                                "log.level".into(),
                                format!(
                                    "invalid level {v:?}: expected off, error, warn, info, debug or trace, or tracing directives like \"flowgate=debug,info\""
                                ),
                            ));
                        }
                        v.clone()
                    }
                };
                let access_log = match &lg.access_log {
                    AccessLogDest::File(p) if p.is_relative() => {
                        AccessLogDest::File(file.parent().unwrap_or(Path::new(".")).join(p))
                    }
                    d => d.clone(),
                };
                LogConfig {
                    level,
                    format: lg.format,
                    access_log,
                }
            }
        };

        Ok(Config {
            source: None,
            admin,
            log,
            runtime: RuntimeConfig {
                workers,
                worker_model: raw.runtime.worker_model,
                shutdown_timeout: raw.runtime.shutdown_timeout.0,
                splice: raw.runtime.splice,
            },
            listeners,
            pools,
        })
    }

    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }
}

/// Resolves `host:port` or `[v6]:port`. Hostnames go through the system resolver,
/// once, at load time.
fn resolve(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let expected = "expected \"HOST:PORT\", \"IPv4:PORT\" or \"[IPv6]:PORT\"";
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("{s:?} has no port; {expected}"));
    };
    let port: u32 = port
        .parse()
        .map_err(|_| format!("{s:?} has an invalid port {port:?}; {expected}"))?;
    if port > 65535 {
        return Err(format!("port {port} in {s:?} is out of range (0..=65535)"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let malformed = host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/');
    if malformed || (host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_err()) {
        return Err(format!("{s:?} is not a valid address; {expected}"));
    }
    let mut addrs = (host, port as u16)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{host:?} resolved to no address"))
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests;
