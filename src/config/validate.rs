//! From `raw::File` to `Config`: deserializing with the key path kept, and the
//! checks of the small tables (`[runtime]`, `[log]`, `[admin]`). The per-listener and
//! per-pool checks live in `listeners.rs` and `pools.rs`. Every check fails with a
//! `ConfigError::Invalid` that points at the offending value.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::raw;
use super::resolve::{line_col, resolve};
use super::types::{DEFAULT_SYSLOG_FACILITY, SYSLOG_FACILITIES, SYSLOG_PORT};
use super::{
    AccessLogDest, AdminConfig, ConfigError, ListenerConfig, LogConfig, Protocol, RuntimeConfig,
    WorkerModel,
};

/// The text being parsed and the file it came from: what every error needs to say
/// where it is.
pub(super) struct Source<'a> {
    pub text: &'a str,
    pub file: &'a Path,
}

impl Source<'_> {
    /// An error at byte range `span` (only its start is shown) of key `path`.
    pub fn err(&self, span: Range<usize>, path: String, message: String) -> ConfigError {
        let (line, column) = line_col(self.text, span.start);
        ConfigError::Invalid {
            file: self.file.to_owned(),
            line,
            column,
            path,
            message,
        }
    }
}

/// A table's `name` (key path `key`): not empty, and not taken by an earlier table of
/// the same kind, `what` ("pool", "listener"), whose names are in `seen`.
pub(super) fn unique_name(
    src: &Source<'_>,
    name: &Spanned<String>,
    key: String,
    what: &str,
    seen: &mut HashSet<String>,
) -> Result<(), ConfigError> {
    if name.get_ref().is_empty() {
        return Err(src.err(name.span(), key, "must not be empty".into()));
    }
    if !seen.insert(name.get_ref().clone()) {
        return Err(src.err(
            name.span(),
            key,
            format!("duplicate {what} name {:?}", name.get_ref()),
        ));
    }
    Ok(())
}

/// Deserializes the file into the raw schema; type and unknown-key errors carry the
/// key path serde was at.
pub(super) fn deserialize(src: &Source<'_>) -> Result<raw::File, ConfigError> {
    let de = toml::Deserializer::new(src.text);
    serde_path_to_error::deserialize(de).map_err(|e| {
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
        src.err(span, path, inner.message().trim().to_string())
    })
}

/// Upper bound on `runtime.workers` (each worker is a thread and a socket per
/// listener).
pub(super) const MAX_WORKERS: usize = 1024;

/// `[runtime]`: `workers` at most [`MAX_WORKERS`]; `workers = 0` becomes the CPU
/// count.
pub(super) fn runtime(src: &Source<'_>, r: &raw::Runtime) -> Result<RuntimeConfig, ConfigError> {
    let workers = match *r.workers.get_ref() {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n if n > MAX_WORKERS => {
            return Err(src.err(
                r.workers.span(),
                "runtime.workers".into(),
                format!("{n} is out of range: expected 0 (one per CPU) to {MAX_WORKERS}"),
            ))
        }
        n => n,
    };
    let busy_poll = match &r.busy_poll {
        None => None,
        Some(b) if b.get_ref().0.is_zero() => None,
        Some(b) if b.get_ref().0 > MAX_BUSY_POLL => {
            return Err(src.err(
                b.span(),
                "runtime.busy_poll".into(),
                format!(
                    "{:?} is too long: at most {MAX_BUSY_POLL:?} (50us is typical; \"0s\" is off)",
                    b.get_ref().0
                ),
            ))
        }
        Some(b) if r.worker_model == WorkerModel::Shared => {
            return Err(src.err(
                b.span(),
                "runtime.busy_poll".into(),
                "needs worker_model = \"per-core\" (each worker spins on its own sockets)".into(),
            ))
        }
        Some(b) => Some(b.get_ref().0),
    };
    let upgrade_socket = match &r.upgrade_socket {
        None => None,
        Some(p) if p.get_ref().is_empty() || p.get_ref().contains('\0') => {
            return Err(src.err(
                p.span(),
                "runtime.upgrade_socket".into(),
                "expected a path for a unix socket, e.g. \"/run/flowgate/flowgate.sock\"".into(),
            ))
        }
        Some(p) => Some(std::path::PathBuf::from(p.get_ref())),
    };
    Ok(RuntimeConfig {
        workers,
        worker_model: r.worker_model,
        shutdown_timeout: r.shutdown_timeout.0,
        shutdown_delay: match &r.shutdown_delay {
            None => Duration::ZERO,
            Some(d) if d.get_ref().0 <= MAX_SHUTDOWN_DELAY => d.get_ref().0,
            Some(d) => {
                return Err(src.err(
                    d.span(),
                    "runtime.shutdown_delay".into(),
                    format!("{:?} is out of range: expected 0s..=300s", d.get_ref().0),
                ))
            }
        },
        splice: r.splice,
        busy_poll,
        upgrade_socket,
    })
}

/// Upper bound on `runtime.shutdown_delay`.
const MAX_SHUTDOWN_DELAY: Duration = Duration::from_secs(300);

/// Upper bound on `runtime.busy_poll`: a worker that spins longer than this on
/// nothing is a misconfiguration, not a latency mode.
const MAX_BUSY_POLL: Duration = Duration::from_millis(10);

/// `[admin]`: the address, the token, and that the two together are safe.
/// `listeners` are the validated listeners, whose TCP addresses the admin API may
/// not take.
/// Upper bound on `admin.max_connections`.
const MAX_ADMIN_CONNECTIONS: usize = 1024;
/// Range of `admin.request_timeout`.
const ADMIN_TIMEOUT_MIN: std::time::Duration = std::time::Duration::from_millis(100);
const ADMIN_TIMEOUT_MAX: std::time::Duration = std::time::Duration::from_secs(300);

pub(super) fn admin(
    src: &Source<'_>,
    a: Option<&raw::Admin>,
    listeners: &[ListenerConfig],
) -> Result<Option<AdminConfig>, ConfigError> {
    let Some(a) = a else {
        return Ok(None);
    };
    let bind =
        resolve(a.bind.get_ref()).map_err(|m| src.err(a.bind.span(), "admin.bind".into(), m))?;
    let (token_file, token) = match &a.token_file {
        None => (None, None),
        Some(tf) => {
            let path = PathBuf::from(tf.get_ref());
            let token = read_token(&path, src.file)
                .map_err(|m| src.err(tf.span(), "admin.token_file".into(), m))?;
            (Some(path), Some(token))
        }
    };
    if !bind.ip().is_loopback() && token.is_none() {
        return Err(src.err(
            a.bind.span(),
            "admin.bind".into(),
            format!(
                "{bind} is not a loopback address, and without admin.token_file anyone who can reach it could drain backends or reload the config: set token_file or bind to 127.0.0.1"
            ),
        ));
    }
    // Port 0 asks for any free port, so it cannot clash.
    let taken = bind.port() != 0
        && listeners
            .iter()
            .any(|l| l.protocol == Protocol::Tcp && l.bind == bind);
    if taken {
        return Err(src.err(
            a.bind.span(),
            "admin.bind".into(),
            format!("address {bind} is already bound by a listener"),
        ));
    }
    let max_connections = *a.max_connections.get_ref();
    if !(1..=MAX_ADMIN_CONNECTIONS).contains(&max_connections) {
        return Err(src.err(
            a.max_connections.span(),
            "admin.max_connections".into(),
            format!("{max_connections} is out of range: expected 1..={MAX_ADMIN_CONNECTIONS}"),
        ));
    }
    let request_timeout = a.request_timeout.get_ref().0;
    if !(ADMIN_TIMEOUT_MIN..=ADMIN_TIMEOUT_MAX).contains(&request_timeout) {
        return Err(src.err(
            a.request_timeout.span(),
            "admin.request_timeout".into(),
            format!(
                "{} is out of range: expected 100ms to 5m",
                humantime::format_duration(request_timeout)
            ),
        ));
    }
    let mut allowed_hosts = Vec::new();
    for (i, h) in a.allowed_hosts.iter().enumerate() {
        let name = h.get_ref().trim().to_ascii_lowercase();
        if name.is_empty() || name.contains(['/', ':', ' ', '@']) {
            return Err(src.err(
                h.span(),
                format!("admin.allowed_hosts[{i}]"),
                format!("{:?} is not a host name (no port, no scheme)", h.get_ref()),
            ));
        }
        allowed_hosts.push(name);
    }
    Ok(Some(AdminConfig {
        bind,
        token_file,
        token,
        max_connections,
        request_timeout,
        protect_reads: a.protect_reads,
        allowed_hosts,
    }))
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

/// `[log]`: the level must be one tracing understands; a relative access-log path
/// is relative to the config file; a remote syslog host is resolved here, once.
pub(super) fn log(src: &Source<'_>, lg: Option<&raw::Log>) -> Result<LogConfig, ConfigError> {
    let Some(lg) = lg else {
        return Ok(LogConfig::default());
    };
    let level = match &lg.level {
        None => "info".to_string(),
        Some(l) => {
            let v = l.get_ref();
            // A bare word must be a level (a bare "loud" would parse as a target name
            // and silence everything); directives go through tracing's own parser.
            let bare = !v.contains(['=', ',']);
            let ok = if bare {
                ["off", "error", "warn", "info", "debug", "trace"]
                    .contains(&v.to_ascii_lowercase().as_str())
            } else {
                tracing_subscriber::EnvFilter::try_new(v).is_ok()
            };
            if !ok {
                return Err(src.err(
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
    let facility = match &lg.syslog_facility {
        None => DEFAULT_SYSLOG_FACILITY,
        Some(f) => syslog_facility(f.get_ref())
            .map_err(|m| src.err(f.span(), "log.syslog_facility".into(), m))?,
    };
    let access_log = match &lg.access_log {
        None => AccessLogDest::Off,
        Some(v) => access_log_dest(v.get_ref(), src.file, facility)
            .map_err(|m| src.err(v.span(), "log.access_log".into(), m))?,
    };
    if let Some(f) = &lg.syslog_facility {
        if !matches!(
            access_log,
            AccessLogDest::Syslog { .. } | AccessLogDest::SyslogUdp { .. }
        ) {
            return Err(src.err(
                f.span(),
                "log.syslog_facility".into(),
                "applies only to access_log = \"syslog\" or \"udp://HOST[:PORT]\"".into(),
            ));
        }
    }
    Ok(LogConfig {
        level,
        format: lg.format,
        access_log,
    })
}

/// `[log] syslog_facility`: a name from [`SYSLOG_FACILITIES`] to its code.
fn syslog_facility(name: &str) -> Result<u8, String> {
    SYSLOG_FACILITIES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, code)| code)
        .ok_or_else(|| {
            let names: Vec<&str> = SYSLOG_FACILITIES.iter().map(|(n, _)| *n).collect();
            format!(
                "unknown facility {name:?}: expected one of {}",
                names.join(", ")
            )
        })
}

/// `[log] access_log`: `"off"`, `"stdout"`, `"syslog"`, `"udp://HOST[:PORT]"` or a
/// file path (relative to the config file `file`).
fn access_log_dest(s: &str, file: &Path, facility: u8) -> Result<AccessLogDest, String> {
    match s {
        "off" => return Ok(AccessLogDest::Off),
        "stdout" => return Ok(AccessLogDest::Stdout),
        "syslog" => return Ok(AccessLogDest::Syslog { facility }),
        "" => {
            return Err(
                "expected \"off\", \"stdout\", \"syslog\", \"udp://HOST[:PORT]\" or a file path, found an empty string"
                    .into(),
            )
        }
        _ => {}
    }
    let Some((scheme, rest)) = s.split_once("://") else {
        let p = Path::new(s);
        return Ok(AccessLogDest::File(if p.is_relative() {
            file.parent().unwrap_or(Path::new(".")).join(p)
        } else {
            p.to_owned()
        }));
    };
    if scheme != "udp" {
        return Err(format!(
            "unsupported scheme in {s:?}: only udp:// is supported for remote syslog (\"udp://HOST[:PORT]\"); \"syslog\" is the local daemon"
        ));
    }
    let bad = |m: String| format!("invalid syslog URL {s:?}: {m}");
    if rest.is_empty() {
        return Err(bad("no host; expected \"udp://HOST[:PORT]\"".into()));
    }
    // A bare IP (IPv6 too, with or without brackets) or a name without a port
    // takes the syslog port.
    let bare = rest.trim_start_matches('[').trim_end_matches(']');
    let addr = if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        SocketAddr::new(ip, SYSLOG_PORT)
    } else if rest.contains(':') {
        resolve(rest).map_err(bad)?
    } else {
        resolve(&format!("{rest}:{SYSLOG_PORT}")).map_err(bad)?
    };
    if addr.port() == 0 {
        return Err(bad("port 0 is not a destination".into()));
    }
    Ok(AccessLogDest::SyslogUdp { addr, facility })
}

/// `pool` (at `path`) names one of `pools`.
pub(super) fn known_pool(
    src: &Source<'_>,
    pool: &Spanned<String>,
    path: &str,
    pools: &[super::PoolConfig],
) -> Result<(), ConfigError> {
    if pools.iter().any(|p| p.name == *pool.get_ref()) {
        return Ok(());
    }
    let known: Vec<_> = pools.iter().map(|p| p.name.as_str()).collect();
    Err(src.err(
        pool.span(),
        path.to_string(),
        format!(
            "no pool named {:?}; defined pools: {}",
            pool.get_ref(),
            if known.is_empty() {
                "(none)".to_string()
            } else {
                known.join(", ")
            }
        ),
    ))
}
