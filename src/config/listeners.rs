//! `[[listeners]]` checks: names, protocol, addresses (resolved here), the pool each
//! one serves, and which limits apply to which protocol.

use std::collections::HashSet;

use toml::Spanned;

use super::raw;
use super::resolve::resolve;
use super::validate::{known_pool, unique_name, Source};
use super::{ConfigError, ListenerConfig, PoolConfig, Protocol};

/// Upper bound on `max_connections`, `max_sessions` and `max_sessions_per_source`.
const MAX_LIMIT: usize = 16 << 20;
/// Upper bound on `responses`.
const MAX_RESPONSES: u64 = 1 << 20;
/// `max_replies_per_request` when the file leaves it out: no limit, as nginx's
/// stream module (media and VPN traffic sends many datagrams per client datagram).
const DEFAULT_MAX_REPLIES: u64 = 0;
/// `session_recv_buffer`: default and range (bytes).
const DEFAULT_SESSION_BUFFER: usize = 1 << 20;
const MIN_SESSION_BUFFER: usize = 4 << 10;
const MAX_SESSION_BUFFER: usize = 64 << 20;
/// `idle_timeout` when the file leaves it out: tcp and udp sessions, and kept-alive
/// http clients between requests (nginx's keepalive_timeout is 75s, HAProxy's
/// `timeout http-keep-alive` is usually set to a minute).
const DEFAULT_IDLE: std::time::Duration = std::time::Duration::from_secs(350);
const DEFAULT_HTTP_IDLE: std::time::Duration = std::time::Duration::from_secs(60);
/// Upper bound on `backlog` (the kernel caps it at `net.core.somaxconn` anyway).
const MAX_BACKLOG: u32 = 1 << 20;

/// Validates every listener, in file order, against the already validated `pools`.
/// At least one listener is required.
pub(super) fn listeners(
    src: &Source<'_>,
    raw: &[raw::Listener],
    pools: &[PoolConfig],
) -> Result<Vec<ListenerConfig>, ConfigError> {
    let mut listeners = Vec::with_capacity(raw.len());
    let mut names = HashSet::new();
    let mut binds = HashSet::new();
    for (i, l) in raw.iter().enumerate() {
        let at = |key: &str| format!("listeners[{i}].{key}");
        unique_name(src, &l.name, at("name"), "listener", &mut names)?;
        let bind = resolve(l.bind.get_ref()).map_err(|m| src.err(l.bind.span(), at("bind"), m))?;
        if bind.port() != 0 && !binds.insert((*l.protocol.get_ref(), bind)) {
            return Err(src.err(
                l.bind.span(),
                at("bind"),
                format!(
                    "{} address {bind} is already bound by another listener",
                    l.protocol.get_ref().as_str()
                ),
            ));
        }
        let protocol = *l.protocol.get_ref();
        match &l.pool {
            Some(pool) => known_pool(src, pool, &at("pool"), pools)?,
            None if protocol == Protocol::Http => {}
            // Clients no SNI route takes are closed then.
            None if protocol == Protocol::Tcp && !l.sni_routes.get_ref().is_empty() => {}
            None => {
                return Err(src.err(
                    l.name.span(),
                    at("pool"),
                    format!(
                        "missing: a {} listener needs the pool it sends clients to",
                        protocol.as_str()
                    ),
                ))
            }
        }
        let http = super::http::listener(src, l, &at, pools)?;
        let accept_proxy = super::proxy::accept(src, l, &at)?;
        let sources = super::sources::sources(src, l, &at)?;
        let sni = super::sni::sni(src, l, &at, pools)?;
        if let Some(pool) = &l.pool {
            super::proxy::send_allowed(src, protocol, pool, at("pool"), pools)?;
        }
        for (j, r) in l.routes.get_ref().iter().enumerate() {
            let path = at(&format!("routes[{j}].pool"));
            super::proxy::send_allowed(src, protocol, &r.pool, path, pools)?;
        }
        for (key, v) in [
            ("max_connections", &l.max_connections),
            ("max_sessions", &l.max_sessions),
            ("max_sessions_per_source", &l.max_sessions_per_source),
        ] {
            if let Some(m) = v {
                if *m.get_ref() == 0 || *m.get_ref() > MAX_LIMIT {
                    return Err(src.err(
                        m.span(),
                        at(key),
                        format!(
                            "{} is out of range: expected a positive number up to {MAX_LIMIT} (leave it out for no limit)",
                            m.get_ref()
                        ),
                    ));
                }
                let udp_only = key != "max_connections";
                if udp_only != (protocol == Protocol::Udp) {
                    return Err(src.err(
                        m.span(),
                        at(key),
                        format!(
                            "{key} applies to {} listeners; this one is {}",
                            if udp_only { "udp" } else { "tcp and http" },
                            protocol.as_str()
                        ),
                    ));
                }
            }
        }
        if let Some(r) = &l.responses {
            if *r.get_ref() > MAX_RESPONSES {
                return Err(src.err(
                    r.span(),
                    at("responses"),
                    format!(
                        "{} is out of range: expected 0 (any number) to {MAX_RESPONSES}",
                        r.get_ref()
                    ),
                ));
            }
            if protocol != Protocol::Udp {
                return Err(src.err(
                    r.span(),
                    at("responses"),
                    format!(
                        "responses applies to udp listeners; this one is {}",
                        protocol.as_str()
                    ),
                ));
            }
        }
        udp_only_in_range(
            src,
            &at("max_replies_per_request"),
            &l.max_replies_per_request,
            protocol,
            0..=MAX_RESPONSES,
            " (0: no limit)",
        )?;
        udp_only_in_range(
            src,
            &at("session_recv_buffer"),
            &l.session_recv_buffer,
            protocol,
            MIN_SESSION_BUFFER..=MAX_SESSION_BUFFER,
            " bytes",
        )?;
        if l.backlog > MAX_BACKLOG {
            return Err(src.err(
                l.name.span(),
                at("backlog"),
                format!("{} is out of range: expected 0 to {MAX_BACKLOG}", l.backlog),
            ));
        }
        // A backend that is this very listener: every connection would connect to
        // itself until the descriptors run out.
        let served = l.pool.iter().map(|p| p.get_ref().as_str());
        let routed = http
            .iter()
            .flat_map(|h| h.routes.iter().map(|r| r.pool.as_str()));
        let sni_routed = sni
            .iter()
            .flat_map(|s| s.routes.iter().map(|r| r.pool.as_str()));
        for p in served
            .chain(routed)
            .chain(sni_routed)
            .filter_map(|name| pools.iter().find(|p| p.name == name))
        {
            if let Some(b) = p.backends.iter().find(|b| b.addr == bind) {
                return Err(src.err(
                    l.bind.span(),
                    at("bind"),
                    format!(
                        "pool {:?} has backend {} at this listener's own address: it would connect to itself",
                        p.name, b.name
                    ),
                ));
            }
        }
        listeners.push(ListenerConfig {
            name: l.name.get_ref().clone(),
            bind,
            protocol,
            pool: l.pool.as_ref().map(|p| p.get_ref().clone()),
            connect_timeout: l.connect_timeout.0,
            idle_timeout: l.idle_timeout.map_or(
                if protocol == Protocol::Http {
                    DEFAULT_HTTP_IDLE
                } else {
                    DEFAULT_IDLE
                },
                |d| d.0,
            ),
            max_connections: l.max_connections.as_ref().map(|m| *m.get_ref()),
            backlog: l.backlog,
            max_sessions: l.max_sessions.as_ref().map(|m| *m.get_ref()),
            max_sessions_per_source: l.max_sessions_per_source.as_ref().map(|m| *m.get_ref()),
            responses: l.responses.as_ref().map_or(0, |r| *r.get_ref()),
            session_recv_buffer: l
                .session_recv_buffer
                .as_ref()
                .map_or(DEFAULT_SESSION_BUFFER, |b| *b.get_ref()),
            max_replies_per_request: l
                .max_replies_per_request
                .as_ref()
                .map_or(DEFAULT_MAX_REPLIES, |m| *m.get_ref()),
            http,
            accept_proxy,
            sources,
            sni,
        });
    }
    if listeners.is_empty() {
        return Err(src.err(
            0..0,
            "listeners".into(),
            "expected at least one [[listeners]] table; a balancer with none would serve nothing"
                .into(),
        ));
    }
    Ok(listeners)
}

/// A key that applies to UDP listeners only, within `range` when set.
fn udp_only_in_range<T>(
    src: &Source<'_>,
    path: &str,
    value: &Option<Spanned<T>>,
    protocol: Protocol,
    range: std::ops::RangeInclusive<T>,
    unit: &str,
) -> Result<(), ConfigError>
where
    T: PartialOrd + std::fmt::Display,
{
    let Some(v) = value else {
        return Ok(());
    };
    let key = path.rsplit('.').next().unwrap_or(path);
    let message = if protocol != Protocol::Udp {
        format!(
            "{key} applies to udp listeners; this one is {}",
            protocol.as_str()
        )
    } else if !range.contains(v.get_ref()) {
        format!(
            "{} is out of range: expected {} to {}{unit}",
            v.get_ref(),
            range.start(),
            range.end()
        )
    } else {
        return Ok(());
    };
    Err(src.err(v.span(), path.to_string(), message))
}
