//! Value types of the config file that validate themselves while deserializing, so
//! their errors carry the key path and position.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A duration written like "250ms", "3s" or "5m".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationStr(pub Duration);

/// The longest duration any key takes: timers past it would overflow the clock,
/// and nothing a balancer waits for needs longer.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

impl<'de> Deserialize<'de> for DurationStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationStr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string like \"250ms\", \"3s\" or \"5m\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<DurationStr, E> {
                let ok = s.starts_with(|c: char| c.is_ascii_digit())
                    && s.ends_with(|c: char| c.is_ascii_alphabetic());
                match humantime::parse_duration(s) {
                    Ok(d) if ok && d > MAX_DURATION => Err(E::custom(format!(
                        "duration {s:?} is too long: at most 365d"
                    ))),
                    Ok(d) if ok => Ok(DurationStr(d)),
                    _ => Err(E::custom(format!(
                        "invalid duration {s:?}: expected a number with a unit, like \"250ms\", \"3s\" or \"5m\""
                    ))),
                }
            }
        }
        d.deserialize_str(V)
    }
}

/// A backend weight, 1..=1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weight(pub u32);

impl Default for Weight {
    fn default() -> Self {
        Weight(1)
    }
}

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = i64::deserialize(d)?;
        if (1..=1000).contains(&w) {
            Ok(Weight(w as u32))
        } else {
            Err(de::Error::custom(format!(
                "weight {w} is out of range: expected 1..=1000"
            )))
        }
    }
}

/// Backend selection algorithm of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    LeastConnections,
    IpHash,
    Random,
    PowerOfTwo,
    /// Power-of-two choices on a load score (issue 14): backend-reported queues
    /// and cache, requests dispatched since, a learned speed.
    LeastLoad,
}

impl Algorithm {
    /// Every algorithm, in the order of the docs (for benches and tests that cover all).
    pub const ALL: [Algorithm; 7] = [
        Algorithm::RoundRobin,
        Algorithm::WeightedRoundRobin,
        Algorithm::LeastConnections,
        Algorithm::IpHash,
        Algorithm::Random,
        Algorithm::PowerOfTwo,
        Algorithm::LeastLoad,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round-robin",
            Algorithm::WeightedRoundRobin => "weighted-round-robin",
            Algorithm::LeastConnections => "least-connections",
            Algorithm::IpHash => "ip-hash",
            Algorithm::Random => "random",
            Algorithm::PowerOfTwo => "power-of-two",
            Algorithm::LeastLoad => "least-load",
        }
    }
}

/// `xff` of an http listener: what happens to X-Forwarded-For, -Proto and -Host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Xff {
    /// Append the client to X-Forwarded-For; set -Proto and -Host when absent.
    #[default]
    Append,
    /// Overwrite all three.
    Replace,
    /// Touch none.
    Off,
}

/// `upstream_protocol` of a pool that serves http listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// The version the client used: HTTP/1.1 upstream for HTTP/1.x clients, h2c
    /// for HTTP/2 clients.
    #[default]
    Auto,
    Http1,
    H2c,
}

impl UpstreamProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Auto => "auto",
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2c => "h2c",
        }
    }
}

/// Listener protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Http,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Http => "http",
        }
    }
}

/// `accept_proxy` of a tcp listener: the PROXY protocol header its peers must send
/// before the client's bytes (the peer in front: an NLB, HAProxy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceptProxy {
    /// No header is read: the TCP peer is the client.
    #[default]
    Off,
    /// The text header (`PROXY TCP4 ...`) only.
    V1,
    /// The binary header only.
    V2,
    /// Either.
    Any,
}

impl AcceptProxy {
    pub fn as_str(self) -> &'static str {
        match self {
            AcceptProxy::Off => "off",
            AcceptProxy::V1 => "v1",
            AcceptProxy::V2 => "v2",
            AcceptProxy::Any => "any",
        }
    }
}

/// `send_proxy` of a pool: the PROXY protocol header written to each backend
/// connection before the client's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxy {
    #[default]
    Off,
    V1,
    V2,
}

impl SendProxy {
    pub fn as_str(self) -> &'static str {
        match self {
            SendProxy::Off => "off",
            SendProxy::V1 => "v1",
            SendProxy::V2 => "v2",
        }
    }
}

/// How connections are spread over worker threads (see docs/architecture.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkerModel {
    /// One single-threaded runtime per worker, each with its own SO_REUSEPORT socket.
    #[default]
    PerCore,
    /// One multi-threaded, work-stealing runtime shared by all workers.
    Shared,
}

/// What a pool does when none of its backends is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenAllDown {
    /// Close new clients at once.
    #[default]
    Reject,
    /// Balance across every backend that is not draining or disabled, ignoring health
    /// (what AWS NLB does).
    FailOpen,
}

impl WhenAllDown {
    pub fn as_str(self) -> &'static str {
        match self {
            WhenAllDown::Reject => "reject",
            WhenAllDown::FailOpen => "fail-open",
        }
    }
}

/// Active health probe kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    Tcp,
    Http,
}

/// Accepted HTTP status codes: "200", "200-399" or a comma-separated list of those.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRanges(pub Vec<(u16, u16)>);

impl<'de> Deserialize<'de> for StatusRanges {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bad = || {
            de::Error::custom(format!(
                "invalid status list {s:?}: expected codes or ranges like \"200\", \"200-399\" or \"200,204\""
            ))
        };
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim) {
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
            let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
            if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
                return Err(bad());
            }
            out.push((lo, hi));
        }
        Ok(StatusRanges(out))
    }
}

/// Format of log lines (both the access log and flowgate's own log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable; the access log is logfmt (`key=value`).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Where access-log lines go: `"off"`, `"stdout"`, a file path, `"syslog"` (the local
/// daemon) or `"udp://HOST[:PORT]"` (a remote one). Read from its text by
/// `validate::log`, which resolves a remote host once, at load time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessLogDest {
    #[default]
    Off,
    Stdout,
    File(std::path::PathBuf),
    /// RFC 5424 datagrams to the local syslog daemon's socket ([`DEV_LOG`]).
    Syslog {
        /// The facility code (RFC 5424 table 1), from `[log] syslog_facility`.
        facility: u8,
    },
    /// RFC 5424 datagrams over UDP (RFC 5426) to a remote receiver.
    SyslogUdp {
        addr: SocketAddr,
        facility: u8,
    },
}

/// The local syslog daemon's datagram socket.
pub const DEV_LOG: &str = "/dev/log";

/// Port of `udp://HOST` without one (RFC 5426).
pub const SYSLOG_PORT: u16 = 514;

/// `[log] syslog_facility` when not set: local0.
pub const DEFAULT_SYSLOG_FACILITY: u8 = 16;

/// The facilities `[log] syslog_facility` takes, by name, with their codes (RFC 5424
/// table 1, less 12 to 15, which have no name syslog daemons agree on).
pub const SYSLOG_FACILITIES: [(&str, u8); 20] = [
    ("kern", 0),
    ("user", 1),
    ("mail", 2),
    ("daemon", 3),
    ("auth", 4),
    ("syslog", 5),
    ("lpr", 6),
    ("news", 7),
    ("uucp", 8),
    ("cron", 9),
    ("authpriv", 10),
    ("ftp", 11),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

/// What an error about the destination calls it: a path, or the socket or URL.
impl fmt::Display for AccessLogDest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessLogDest::Off => f.write_str("off"),
            AccessLogDest::Stdout => f.write_str("stdout"),
            AccessLogDest::File(p) => write!(f, "{}", p.display()),
            AccessLogDest::Syslog { .. } => write!(f, "syslog socket {DEV_LOG}"),
            AccessLogDest::SyslogUdp { addr, .. } => write!(f, "udp://{addr}"),
        }
    }
}

/// How a backend reports its load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadKind {
    /// Scrape a Prometheus text exposition (`GET path` on `port`).
    Prometheus,
    /// A TCP line `load=<0..1> [weight=<n>]`, like HAProxy's agent-check.
    Agent,
}

/// Which gauges a preset reads, each under its current and former names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    Vllm,
    Sglang,
    Tgi,
    Triton,
    Custom,
}
