//! `[[pools]]` checks: names, attempts, backends (resolved once, here), drain bounds,
//! and the `health_check` and `passive` sub-tables.

use std::collections::HashSet;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::raw;
use super::resolve::{lookup, resolve_all, Lookup};
use super::validate::{unique_name, Source};
use super::{
    BackendConfig, ConfigError, HealthCheckConfig, HealthKind, PassiveConfig, PoolConfig,
    PoolSource,
};

/// Upper bound on `connect_attempts`; more than this only delays the client's error.
const MAX_CONNECT_ATTEMPTS: usize = 32;
/// Idle upstream HTTP connections kept per backend, by default and at most.
const DEFAULT_IDLE_PER_BACKEND: usize = 256;
const MAX_IDLE_PER_BACKEND: usize = 10_000;
/// How long an idle pooled upstream HTTP connection is kept, by default (nginx's
/// upstream `keepalive_timeout`) and at most.
const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(86_400);
/// Upper bound on `drain_timeout` (NLB's deregistration delay has the same range).
const MAX_DRAIN: Duration = Duration::from_secs(3600);
/// Upper bound on a backend's `max_connections` (the listener's bound).
const MAX_BACKEND_CONNECTIONS: usize = 10_000_000;
/// `max_queue` by default, and its upper bound.
const DEFAULT_MAX_QUEUE: usize = 1024;
const MAX_QUEUE: usize = 1_000_000;
/// Upper bound on `queue_timeout` (a client waits at most this long for a slot).
const MAX_QUEUE_TIMEOUT: Duration = Duration::from_secs(3600);
/// `resolve_interval` by default, and its bounds.
const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
const MIN_RESOLVE_INTERVAL: Duration = Duration::from_millis(100);
const MAX_RESOLVE_INTERVAL: Duration = Duration::from_secs(86_400);

/// Validates every pool, in file order; names must be unique.
pub(super) fn pools(src: &Source<'_>, raw: &[raw::Pool]) -> Result<Vec<PoolConfig>, ConfigError> {
    let mut pools = Vec::with_capacity(raw.len());
    let mut names = HashSet::new();
    for (i, p) in raw.iter().enumerate() {
        let at = |key: &str| format!("pools[{i}].{key}");
        unique_name(src, &p.name, at("name"), "pool", &mut names)?;
        let attempts = *p.connect_attempts.get_ref();
        if !(1..=MAX_CONNECT_ATTEMPTS).contains(&attempts) {
            return Err(src.err(
                p.connect_attempts.span(),
                at("connect_attempts"),
                format!("expected 1..={MAX_CONNECT_ATTEMPTS}, found {attempts}"),
            ));
        }
        let backends = backends(src, i, p)?;
        let source = source(src, p, &backends, &at("source"))?;
        let drain = p.drain_timeout.get_ref().0;
        if drain > MAX_DRAIN {
            return Err(src.err(
                p.drain_timeout.span(),
                at("drain_timeout"),
                format!("{drain:?} is out of range: expected 0s..=3600s"),
            ));
        }
        let health_check = match &p.health_check {
            None => None,
            Some(h) => Some(health_check(h, &|span, key: &str, m| {
                src.err(span, at(&format!("health_check.{key}")), m)
            })?),
        };
        let (queue_timeout, max_queue) = queue(src, p, &backends, &at)?;
        let load_report = match &p.load_report {
            None => None,
            Some(_) if p.algorithm != super::Algorithm::LeastLoad => {
                return Err(src.err(
                    p.name.span(),
                    at("load_report"),
                    format!(
                    "load_report is read by algorithm = \"least-load\" only; pool {:?} uses {:?}",
                    p.name.get_ref(),
                    p.algorithm.as_str()
                ),
                ))
            }
            Some(r) => Some(super::load::load_report(src, r, &at)?),
        };
        let resolve_interval = match &p.resolve_interval {
            None => DEFAULT_RESOLVE_INTERVAL,
            Some(r) if (MIN_RESOLVE_INTERVAL..=MAX_RESOLVE_INTERVAL).contains(&r.get_ref().0) => {
                r.get_ref().0
            }
            Some(r) => {
                return Err(src.err(
                    r.span(),
                    at("resolve_interval"),
                    format!("{:?} is out of range: expected 100ms..=24h", r.get_ref().0),
                ))
            }
        };
        let passive = match &p.passive {
            None => None,
            Some(pv) => Some(passive(src, pv, &at("passive.consecutive_failures"))?),
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
            upstream_protocol: p.upstream_protocol,
            send_proxy: p.send_proxy,
            source,
            queue_timeout,
            max_queue,
            resolve_interval,
            load_report,
            affinity: match &p.affinity {
                None => None,
                Some(a) => Some(super::load::affinity(src, a, &at)?),
            },
            max_idle_per_backend: match &p.max_idle_per_backend {
                None => DEFAULT_IDLE_PER_BACKEND,
                Some(m) if *m.get_ref() <= MAX_IDLE_PER_BACKEND => *m.get_ref(),
                Some(m) => {
                    return Err(src.err(
                        m.span(),
                        at("max_idle_per_backend"),
                        format!(
                            "{} is out of range: expected 0 to {MAX_IDLE_PER_BACKEND}",
                            m.get_ref()
                        ),
                    ))
                }
            },
            keepalive_timeout: match &p.keepalive_timeout {
                None => DEFAULT_KEEPALIVE_TIMEOUT,
                Some(t) => {
                    let d = t.get_ref().0;
                    if d.is_zero() || d > MAX_KEEPALIVE_TIMEOUT {
                        return Err(src.err(
                            t.span(),
                            at("keepalive_timeout"),
                            format!("{d:?} is out of range: expected more than 0s, at most 86400s (max_idle_per_backend = 0 keeps no idle connection)"),
                        ));
                    }
                    d
                }
            },
        });
    }
    Ok(pools)
}

/// A pool's `source`: an address of this host that backend connections come from,
/// of the family of every backend, or `"client"`: the client's own address
/// (transparent mode, issue 13; which listeners may use it is checked with them).
fn source(
    src: &Source<'_>,
    p: &raw::Pool,
    backends: &[BackendConfig],
    key: &str,
) -> Result<Option<PoolSource>, ConfigError> {
    let Some(s) = &p.source else {
        return Ok(None);
    };
    let text = s.get_ref().trim();
    if text == "client" {
        return Ok(Some(PoolSource::Client));
    }
    let ip: std::net::IpAddr = text.parse().map_err(|_| {
        src.err(
            s.span(),
            key.into(),
            format!("{text:?} is not an IP address: expected one address of this host, e.g. \"10.0.0.5\" or \"2001:db8::5\""),
        )
    })?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(src.err(
            s.span(),
            key.into(),
            format!("{ip} cannot be a source address"),
        ));
    }
    if let Some(b) = backends.iter().find(|b| b.addr.is_ipv4() != ip.is_ipv4()) {
        return Err(src.err(
            s.span(),
            key.into(),
            format!(
                "{ip} is {}, but backend {} is {}: a connection cannot cross families",
                if ip.is_ipv4() { "IPv4" } else { "IPv6" },
                b.name,
                if b.addr.is_ipv4() { "IPv4" } else { "IPv6" }
            ),
        ));
    }
    Ok(Some(PoolSource::Address(ip)))
}

/// `queue_timeout` and `max_queue`. A queue waits for a backend's `max_connections`
/// slot, so a pool with a queue and no capped backend is a mistake worth naming.
fn queue(
    src: &Source<'_>,
    p: &raw::Pool,
    backends: &[BackendConfig],
    at: &dyn Fn(&str) -> String,
) -> Result<(Option<Duration>, usize), ConfigError> {
    let max_queue = match &p.max_queue {
        None => DEFAULT_MAX_QUEUE,
        Some(m) if (1..=MAX_QUEUE).contains(m.get_ref()) => *m.get_ref(),
        Some(m) => {
            return Err(src.err(
                m.span(),
                at("max_queue"),
                format!("{} is out of range: expected 1..={MAX_QUEUE}", m.get_ref()),
            ))
        }
    };
    let Some(t) = &p.queue_timeout else {
        if let Some(m) = &p.max_queue {
            return Err(src.err(
                m.span(),
                at("max_queue"),
                "max_queue without queue_timeout: set queue_timeout to queue clients".into(),
            ));
        }
        return Ok((None, max_queue));
    };
    let d = t.get_ref().0;
    if d.is_zero() || d > MAX_QUEUE_TIMEOUT {
        return Err(src.err(
            t.span(),
            at("queue_timeout"),
            format!("{d:?} is out of range: expected more than 0s, at most 3600s (leave it out for no queue)"),
        ));
    }
    if backends.iter().all(|b| b.max_connections.is_none()) {
        return Err(src.err(
            t.span(),
            at("queue_timeout"),
            "no backend of the pool has max_connections, so nothing would ever wait: \
             set max_connections on the backends (e.g. { address = \"10.0.0.1:80\", max_connections = 200 })"
                .into(),
        ));
    }
    Ok((Some(d), max_queue))
}

/// The backends of pool number `i`: at least one, each resolved to a usable address,
/// no address twice. A hostname becomes one backend per address it resolves to
/// (of the family of the pool's `source`, when it has one), named by the address,
/// with the entry's weight and cap; the entry as written is its `hostname`.
fn backends(src: &Source<'_>, i: usize, p: &raw::Pool) -> Result<Vec<BackendConfig>, ConfigError> {
    if p.backends.get_ref().is_empty() {
        return Err(src.err(
            p.backends.span(),
            format!("pools[{i}].backends"),
            "expected at least one backend, found an empty list".into(),
        ));
    }
    let family = p
        .source
        .as_ref()
        .and_then(|s| s.get_ref().trim().parse::<std::net::IpAddr>().ok());
    let mut backends = Vec::with_capacity(p.backends.get_ref().len());
    let mut seen = HashSet::new();
    for (j, b) in p.backends.get_ref().iter().enumerate() {
        let key = format!("pools[{i}].backends[{j}].address");
        let written = b.address.get_ref().trim().to_string();
        let err = |m: String| src.err(b.address.span(), key.clone(), m);
        let records = match lookup(&written).map_err(err)? {
            Lookup::Literal(a) => vec![(written.clone(), a, None)],
            Lookup::Host(host, port) => {
                let all = resolve_all(&host, port).map_err(err)?;
                let v: Vec<_> = all
                    .into_iter()
                    .filter(|a| family.is_none_or(|f| f.is_ipv4() == a.is_ipv4()))
                    .map(|a| (a.to_string(), a, Some(written.clone())))
                    .collect();
                if v.is_empty() {
                    return Err(err(format!(
                        "{host:?} has no address of the family of the pool's source"
                    )));
                }
                v
            }
        };
        if records[0].1.port() == 0 {
            return Err(err(format!(
                "{written:?}: port 0 is not a valid backend port"
            )));
        }
        let max_connections = match &b.max_connections {
            None => None,
            Some(m) if (1..=MAX_BACKEND_CONNECTIONS).contains(m.get_ref()) => Some(*m.get_ref()),
            Some(m) => {
                return Err(src.err(
                    m.span(),
                    format!("pools[{i}].backends[{j}].max_connections"),
                    format!(
                        "{} is out of range: expected 1..={MAX_BACKEND_CONNECTIONS}",
                        m.get_ref()
                    ),
                ))
            }
        };
        for (name, addr, hostname) in records {
            if !seen.insert(name.clone()) {
                return Err(err(format!(
                    "duplicate backend {name:?} in pool {:?}{}",
                    p.name.get_ref(),
                    if hostname.is_some() {
                        format!(" ({written:?} resolves to it)")
                    } else {
                        String::new()
                    }
                )));
            }
            backends.push(BackendConfig {
                name,
                addr,
                weight: b.weight.0,
                max_connections,
                hostname,
            });
        }
    }
    Ok(backends)
}

/// Validates one `[pools.passive]` table; `key` is the path of its
/// `consecutive_failures`, the one value that can be wrong.
fn passive(src: &Source<'_>, pv: &raw::Passive, key: &str) -> Result<PassiveConfig, ConfigError> {
    if *pv.consecutive_failures.get_ref() == 0 {
        return Err(src.err(
            pv.consecutive_failures.span(),
            key.to_string(),
            "expected a positive number".into(),
        ));
    }
    let slow = match (&pv.slow_factor, &pv.slow_for) {
        (None, None) => None,
        (Some(f), for_) => {
            let factor = *f.get_ref();
            if !(1.0..=100.0).contains(&factor) {
                return Err(src.err(
                    f.span(),
                    key.replace("consecutive_failures", "slow_factor"),
                    format!(
                        "{factor} is out of range: expected 1.0..=100 (times the pool's median)"
                    ),
                ));
            }
            let d = for_
                .as_ref()
                .map_or(Duration::from_secs(30), |d| d.get_ref().0);
            if d > Duration::from_secs(3600) {
                return Err(src.err(
                    for_.as_ref().map_or(0..0, |d| d.span()),
                    key.replace("consecutive_failures", "slow_for"),
                    format!("{d:?} is out of range: expected 0s..=3600s"),
                ));
            }
            Some((factor, d))
        }
        (None, Some(d)) => {
            return Err(src.err(
                d.span(),
                key.replace("consecutive_failures", "slow_for"),
                "slow_for without slow_factor: set slow_factor (e.g. 3.0)".into(),
            ))
        }
    };
    Ok(PassiveConfig {
        consecutive_failures: *pv.consecutive_failures.get_ref(),
        eject_for: pv.eject_for.0,
        first_byte_timeout_ejects: pv.first_byte_timeout_ejects,
        slow,
    })
}

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
