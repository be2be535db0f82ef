//! Configuration: the public, validated types (`Config` and its tables) and the entry
//! points `Config::load` and `Config::parse`.
//!
//! The file is deserialized into the `raw` structs with `deny_unknown_fields`, so a
//! typo is an error instead of a silently ignored key. Values that need checking
//! (durations, weights, addresses) have their own types whose `Deserialize` impls
//! reject bad input, so the error carries the key path and the position of the value.
//! Cross-references (a listener's pool, duplicate names) are checked afterwards, using
//! the spans `toml::Spanned` keeps. Every error renders as
//! `FILE:LINE:COLUMN: KEY.PATH: what was expected`.
//!
//! # Layout
//! - `types.rs`: value types that validate themselves while deserializing.
//! - `raw.rs`: the file's schema as serde reads it, with its defaults.
//! - `validate.rs`: deserializing, and the `[runtime]`, `[log]`, `[admin]` checks;
//!   `listeners.rs` and `pools.rs`: the checks of those tables; `http.rs` an http
//!   listener's keys, `proxy.rs` the PROXY protocol keys.
//! - `resolve.rs`: address resolution and byte offset to line:column.
//! - `diff.rs`: `diff(old, new)`, the plan of what a reload changes (tests in
//!   `diff/tests.rs`).

mod diff;
mod env;
mod http;
mod listeners;
mod load;
mod overrides;
mod pools;
mod proxy;
mod raw;
pub mod resolve;
mod sni;
mod sources;
mod types;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use diff::{diff, Changes, PoolBackends, ReloadPlan, RestartKey};
pub use load::{
    preset_families, AffinityConfig, AffinityKey, Families, LoadReportConfig, LoadWeights,
    MAX_EXPOSITION_BYTES,
};
pub use overrides::{Overrides, PoolOverrides};
pub use sni::{SniConfig, SniRouteConfig};
pub use sources::{Rate, SourcesConfig};
pub use types::{
    AcceptProxy, AccessLogDest, Algorithm, DurationStr, HealthKind, LogFormat, Protocol, SendProxy,
    StatusRanges, UpstreamProtocol, Weight, WhenAllDown, WorkerModel, Xff, DEV_LOG,
};
pub use types::{LoadKind, Preset};

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
    /// The text it was parsed from, `${VAR}`s expanded (`GET /api/v1/config`).
    pub text: std::sync::Arc<str>,
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
    /// Relative paths are resolved against the config file's directory, a remote
    /// syslog host at load time; `syslog_facility` is folded into the syslog variants.
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
    /// On SIGTERM/SIGINT: keep accepting this long while /healthz answers 503, so
    /// keepalived or BIRD move the address away before new connections are refused.
    pub shutdown_delay: Duration,
    /// Use splice(2) for bulk transfers (Linux); `false` copies everything.
    pub splice: bool,
    /// Latency mode: how long an idle worker polls its sockets before it sleeps
    /// (`None`: off). Only with `worker_model = "per_core"`.
    pub busy_poll: Option<Duration>,
    /// `runtime.upgrade_socket` as written (`None`: the default,
    /// [`DEFAULT_UPGRADE_SOCKET`]). Read at start only.
    pub upgrade_socket: Option<std::path::PathBuf>,
}

/// Where `runtime.upgrade_socket` is when the file does not say.
pub const DEFAULT_UPGRADE_SOCKET: &str = "/run/flowgate/flowgate.sock";

impl RuntimeConfig {
    /// The upgrade socket's path, the default filled in.
    pub fn upgrade_socket_path(&self) -> std::path::PathBuf {
        self.upgrade_socket
            .clone()
            .unwrap_or_else(|| DEFAULT_UPGRADE_SOCKET.into())
    }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub protocol: Protocol,
    /// The pool (tcp, udp), or the pool of requests no route matches (http; none:
    /// those get 404).
    pub pool: Option<String>,
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
    /// UDP, with `responses = 0`: replies passed on per client datagram at most
    /// (an amplification guard); 0 (the default) for no limit.
    pub max_replies_per_request: u64,
    /// UDP: receive buffer of each session's upstream socket, in bytes (replies
    /// wait there until the session's task relays them).
    pub session_recv_buffer: usize,
    /// `protocol = "http"`: the L7 settings.
    pub http: Option<HttpConfig>,
    /// tcp, with `accept_proxy` set: the PROXY header its peers must send.
    pub accept_proxy: Option<AcceptProxyConfig>,
    /// tcp and http: `allow`, `deny` and the per-source limits; `None`: none set.
    pub sources: Option<SourcesConfig>,
    /// tcp, with `[[listeners.sni_routes]]`: TLS passthrough routed by SNI.
    pub sni: Option<SniConfig>,
}

/// A tcp listener's `accept_proxy`, `proxy_trusted` and `proxy_header_timeout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptProxyConfig {
    /// Which header versions are taken (never `Off` here).
    pub version: AcceptProxy,
    /// Peers allowed to send a header; `None`: every peer. A peer outside it is
    /// closed whether or not it sends one.
    pub trusted: Option<Vec<ipnet::IpNet>>,
    /// From accept to a complete header.
    pub header_timeout: Duration,
}

impl AcceptProxyConfig {
    /// Whether `peer` may send a header (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn trusts(&self, peer: std::net::IpAddr) -> bool {
        let ip = peer.to_canonical();
        self.trusted
            .as_ref()
            .is_none_or(|nets| nets.iter().any(|n| n.contains(&ip)))
    }
}

/// An http listener's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Time to receive a complete request head (from accept for the first request,
    /// from its first byte for later ones); then 408.
    pub header_timeout: Duration,
    /// Request line and header lines (HTTP/1.1), or the decoded header list
    /// (HTTP/2), at most; more is 431.
    pub max_header_bytes: usize,
    /// A request body larger than this gets 413 (none: no limit).
    pub max_body_bytes: Option<u64>,
    pub xff: Xff,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS.
    pub max_streams_per_connection: u32,
    /// In file order.
    pub routes: Vec<RouteConfig>,
}

/// One `[[listeners.routes]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Lower case, no port, no trailing dot; `*.example.com` is a wildcard.
    pub host: Option<String>,
    /// Starts with `/`.
    pub path_prefix: String,
    pub pool: String,
    pub strip_prefix: bool,
    pub first_byte_timeout: Duration,
    pub stream_idle_timeout: Duration,
}

impl RouteConfig {
    /// The `route` label of metrics and the access log: host and prefix.
    pub fn label(&self) -> String {
        format!("{}{}", self.host.as_deref().unwrap_or(""), self.path_prefix)
    }
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
    /// HTTP requests sent to this pool: the upstream HTTP version.
    pub upstream_protocol: UpstreamProtocol,
    /// HTTP: idle upstream connections kept per backend.
    pub max_idle_per_backend: usize,
    /// HTTP: an idle pooled upstream connection unused this long is closed.
    pub keepalive_timeout: Duration,
    /// A PROXY header written to each backend connection (tcp listeners only).
    pub send_proxy: SendProxy,
    /// `source`: where backend connections (and UDP sessions' sockets) come from;
    /// `None`: the kernel's choice.
    pub source: Option<PoolSource>,
    /// `queue_timeout`: how long a client whose pick found every usable backend at
    /// its `max_connections` waits for a slot. `None`: no queue, refused at once.
    pub queue_timeout: Option<Duration>,
    /// `max_queue`: clients waiting at once; more are refused at once.
    pub max_queue: usize,
    /// How often backends given by hostname are resolved again.
    pub resolve_interval: Duration,
    /// `least-load`: where backends report their load (none: in-flight counts and
    /// learned speed alone).
    pub load_report: Option<LoadReportConfig>,
    /// HTTP requests of one session (a header's or cookie's value) go to one
    /// backend, with bounded load.
    pub affinity: Option<AffinityConfig>,
}

/// A pool's `source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSource {
    /// One address of this host.
    Address(std::net::IpAddr),
    /// `"client"`: the client's own address (IP_TRANSPARENT; tcp and udp listeners).
    Client,
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

#[derive(Debug, Clone, PartialEq)]
pub struct PassiveConfig {
    pub consecutive_failures: u32,
    pub eject_for: Duration,
    /// HTTP: a `first_byte_timeout` (no response head in time) counts as a failure.
    pub first_byte_timeout_ejects: bool,
    /// HTTP: `(slow_factor, slow_for)`: a backend whose time-to-first-byte p90 stays
    /// over `slow_factor` × the pool's median for `slow_for` loses weight.
    pub slow: Option<(f64, Duration)>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    pub token_file: Option<PathBuf>,
    /// The token read from `token_file` at load time.
    pub token: Option<String>,
    /// Admin connections open at once; more are closed at accept, so the admin
    /// plane never takes the data path's descriptors.
    pub max_connections: usize,
    /// Limit on reading a whole request (head and body) and on writing a response
    /// the client does not read.
    pub request_timeout: Duration,
    /// The token is needed for reads too (every path but `/healthz`).
    pub protect_reads: bool,
    /// Host names accepted in `Host` besides IP addresses and `localhost` (lower
    /// case): a defence against DNS rebinding.
    pub allowed_hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// The address as written in the file: the backend's identity in logs, the API,
    /// metrics labels and the consistent hash, so it stays stable across restarts.
    pub name: String,
    /// The resolved address connections go to.
    pub addr: SocketAddr,
    pub weight: u32,
    /// `max_connections`: counted connections (HTTP: requests in flight) at once.
    pub max_connections: Option<usize>,
    /// The entry as written (`HOST:PORT`) when it named a host: this backend is one
    /// of its addresses, and follows its records (`resolve_interval`).
    pub hostname: Option<String>,
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

    /// Parses `text`; `file` is only used in error messages (and to find a relative
    /// `admin.token_file` or `log.access_log`).
    ///
    /// The tables are checked in a fixed order (pools, listeners, admin, log), so the
    /// first error reported for a file with several is always the same one.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let expanded = env::expand(text, |name| std::env::var(name).ok()).map_err(|e| {
            validate::Source { text, file }.err(
                e.offset..e.offset,
                format!("${{{}}}", e.name),
                e.message,
            )
        })?;
        let text = &*expanded;
        let src = validate::Source { text, file };
        let raw = validate::deserialize(&src)?;
        let runtime = validate::runtime(&src, &raw.runtime)?;
        let pools = pools::pools(&src, &raw.pools)?;
        let listeners = listeners::listeners(&src, &raw.listeners, &pools)?;
        let admin = validate::admin(&src, raw.admin.as_ref(), &listeners)?;
        let log = validate::log(&src, raw.log.as_ref())?;
        Ok(Config {
            source: None,
            text: text.into(),
            runtime,
            admin,
            log,
            listeners,
            pools,
        })
    }

    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }
}

/// Resolves a backend address written as in the file (`HOST:PORT`, `IPv4:PORT`,
/// `[IPv6]:PORT`), as `check` does; hostnames go through the system resolver.
pub fn resolve_address(s: &str) -> Result<SocketAddr, String> {
    resolve::resolve(s)
}

#[cfg(test)]
use resolve::line_col;

#[cfg(test)]
mod tests;
