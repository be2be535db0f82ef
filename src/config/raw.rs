//! The file's shape, one struct per table, as serde reads it: defaults and
//! `deny_unknown_fields` live here, cross-checks in `validate`. `Spanned` keeps the
//! position of each value a later check may need to point at.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::types::{
    AcceptProxy, Algorithm, DurationStr, HealthKind, LogFormat, Protocol, SendProxy, StatusRanges,
    UpstreamProtocol, Weight, WhenAllDown, WorkerModel, Xff,
};

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
    #[serde(default = "default_workers")]
    pub workers: Spanned<usize>,
    #[serde(default)]
    pub worker_model: WorkerModel,
    #[serde(default = "default_shutdown")]
    pub shutdown_timeout: DurationStr,
    /// On SIGTERM, keep accepting this long with /healthz at 503 (a VIP or a BGP
    /// route moves away first).
    #[serde(default)]
    pub shutdown_delay: Option<Spanned<DurationStr>>,
    #[serde(default = "default_true")]
    pub splice: bool,
    #[serde(default)]
    pub busy_poll: Option<Spanned<DurationStr>>,
    #[serde(default)]
    pub upgrade_socket: Option<Spanned<String>>,
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime {
            workers: default_workers(),
            worker_model: WorkerModel::default(),
            shutdown_timeout: default_shutdown(),
            shutdown_delay: None,
            splice: true,
            busy_poll: None,
            upgrade_socket: None,
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
fn default_workers() -> Spanned<usize> {
    Spanned::new(0..0, 0)
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
    /// Required but for `http` listeners, where unrouted requests get 404 without.
    pub pool: Option<Spanned<String>>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: DurationStr,
    /// Default 350s for tcp and udp, 60s for http (a kept-alive client between
    /// requests).
    pub idle_timeout: Option<DurationStr>,
    pub max_connections: Option<Spanned<usize>>,
    #[serde(default = "default_backlog")]
    pub backlog: u32,
    pub max_sessions: Option<Spanned<usize>>,
    pub max_sessions_per_source: Option<Spanned<usize>>,
    pub responses: Option<Spanned<u64>>,
    pub max_replies_per_request: Option<Spanned<u64>>,
    pub session_recv_buffer: Option<Spanned<usize>>,
    // PROXY protocol (tcp listeners)
    pub accept_proxy: Option<Spanned<AcceptProxy>>,
    pub proxy_trusted: Option<Spanned<Vec<Spanned<String>>>>,
    pub proxy_header_timeout: Option<Spanned<DurationStr>>,
    // Source rules (tcp and http listeners)
    pub allow: Option<Spanned<Vec<Spanned<String>>>>,
    pub deny: Option<Spanned<Vec<Spanned<String>>>>,
    pub max_connections_per_source: Option<Spanned<u64>>,
    pub max_rate_per_source: Option<Spanned<String>>,
    pub source_table_size: Option<Spanned<u64>>,
    // http listeners
    pub header_timeout: Option<Spanned<DurationStr>>,
    pub max_header_bytes: Option<Spanned<usize>>,
    pub max_body_bytes: Option<Spanned<u64>>,
    pub xff: Option<Spanned<Xff>>,
    pub max_streams_per_connection: Option<Spanned<u32>>,
    #[serde(default = "no_routes")]
    pub routes: Spanned<Vec<Route>>,
    // TLS passthrough by SNI (tcp listeners)
    #[serde(default = "no_sni_routes")]
    pub sni_routes: Spanned<Vec<SniRoute>>,
    pub sni_required: Option<Spanned<bool>>,
}

/// `[[listeners.sni_routes]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniRoute {
    pub server_names: Spanned<Vec<Spanned<String>>>,
    pub pool: Spanned<String>,
}

fn no_sni_routes() -> Spanned<Vec<SniRoute>> {
    Spanned::new(0..0, Vec::new())
}

/// `[[listeners.routes]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub host: Option<Spanned<String>>,
    #[serde(default = "default_prefix")]
    pub path_prefix: Spanned<String>,
    pub pool: Spanned<String>,
    #[serde(default)]
    pub strip_prefix: bool,
    #[serde(default = "default_stream_timeout")]
    pub first_byte_timeout: DurationStr,
    #[serde(default = "default_stream_timeout")]
    pub stream_idle_timeout: DurationStr,
}

fn no_routes() -> Spanned<Vec<Route>> {
    Spanned::new(0..0, Vec::new())
}
fn default_prefix() -> Spanned<String> {
    Spanned::new(0..0, "/".into())
}
fn default_stream_timeout() -> DurationStr {
    DurationStr(Duration::from_secs(300))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    pub level: Option<Spanned<String>>,
    #[serde(default)]
    pub format: LogFormat,
    pub access_log: Option<Spanned<String>>,
    pub syslog_facility: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub bind: Spanned<String>,
    pub token_file: Option<Spanned<String>>,
    #[serde(default = "default_admin_connections")]
    pub max_connections: Spanned<usize>,
    #[serde(default = "default_admin_timeout")]
    pub request_timeout: Spanned<DurationStr>,
    #[serde(default)]
    pub protect_reads: bool,
    #[serde(default)]
    pub allowed_hosts: Vec<Spanned<String>>,
}

fn default_admin_connections() -> Spanned<usize> {
    Spanned::new(0..0, 64)
}
fn default_admin_timeout() -> Spanned<DurationStr> {
    Spanned::new(0..0, DurationStr(Duration::from_secs(10)))
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
    /// HTTP pools (used by an http listener's routes or default).
    #[serde(default)]
    pub upstream_protocol: UpstreamProtocol,
    pub max_idle_per_backend: Option<Spanned<usize>>,
    /// HTTP pools: how long an idle pooled upstream connection is kept.
    pub keepalive_timeout: Option<Spanned<DurationStr>>,
    /// A PROXY header on each backend connection (pools of tcp listeners).
    #[serde(default)]
    pub send_proxy: SendProxy,
    /// The local address backend connections come from.
    pub source: Option<Spanned<String>>,
    /// Wait for a slot when every usable backend is at its `max_connections`.
    pub queue_timeout: Option<Spanned<DurationStr>>,
    pub max_queue: Option<Spanned<usize>>,
    /// How often backends given by hostname are resolved again.
    pub resolve_interval: Option<Spanned<DurationStr>>,
    /// `least-load`: where backends report their load.
    pub load_report: Option<RawLoadReport>,
    /// HTTP: send a session's requests to one backend.
    pub affinity: Option<Spanned<RawAffinity>>,
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
    /// HTTP: a `first_byte_timeout` counts as a failure too.
    #[serde(default)]
    pub first_byte_timeout_ejects: bool,
    /// HTTP: a backend whose time-to-first-byte p90 stays over this × the pool's
    /// median for `slow_for` loses weight.
    pub slow_factor: Option<Spanned<f64>>,
    pub slow_for: Option<Spanned<DurationStr>>,
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
    pub max_connections: Option<Spanned<usize>>,
}

/// `[pools.load_report]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLoadReport {
    pub kind: super::types::LoadKind,
    pub preset: Option<Spanned<super::types::Preset>>,
    pub path: Option<Spanned<String>>,
    pub port: Option<Spanned<u32>>,
    pub interval: Option<Spanned<DurationStr>>,
    pub stale_after: Option<Spanned<DurationStr>>,
    pub timeout: Option<Spanned<DurationStr>>,
    /// `custom`: metric names.
    pub queue: Option<Spanned<String>>,
    pub running: Option<Spanned<String>>,
    pub cache: Option<Spanned<String>>,
    pub queue_weight: Option<Spanned<f64>>,
    pub running_weight: Option<Spanned<f64>>,
    pub cache_weight: Option<Spanned<f64>>,
}

/// `[pools.affinity]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAffinity {
    pub header: Option<Spanned<String>>,
    pub cookie: Option<Spanned<String>>,
    pub max_load_factor: Option<Spanned<f64>>,
}
