//! An http listener's keys and its `[[listeners.routes]]`: ranges, route hosts and
//! prefixes, the pools they name, and keys that belong to http listeners only.

use std::collections::HashMap;
use std::time::Duration;

use toml::Spanned;

use super::raw;
use super::validate::{known_pool, Source};
use super::{ConfigError, HttpConfig, PoolConfig, Protocol, RouteConfig};

const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_HEADER_BYTES: usize = 64 << 10;
/// hyper's smallest read buffer is 8 KiB; a head must fit in it.
const MIN_HEADER_BYTES: usize = 8 << 10;
const MAX_HEADER_BYTES: usize = 1 << 20;
const DEFAULT_MAX_STREAMS: u32 = 100;
const MAX_STREAMS: u32 = 10_000;

/// The http settings of listener `l` (`None` unless it is an http listener, whose
/// http-only keys are refused elsewhere).
pub(super) fn listener(
    src: &Source<'_>,
    l: &raw::Listener,
    at: &dyn Fn(&str) -> String,
    pools: &[PoolConfig],
) -> Result<Option<HttpConfig>, ConfigError> {
    let protocol = *l.protocol.get_ref();
    if protocol != Protocol::Http {
        let only_http = |span: std::ops::Range<usize>, key: &str| {
            Err(src.err(
                span,
                at(key),
                format!(
                    "{key} applies to http listeners; this one is {}",
                    protocol.as_str()
                ),
            ))
        };
        if let Some(v) = &l.header_timeout {
            return only_http(v.span(), "header_timeout");
        }
        if let Some(v) = &l.max_header_bytes {
            return only_http(v.span(), "max_header_bytes");
        }
        if let Some(v) = &l.max_body_bytes {
            return only_http(v.span(), "max_body_bytes");
        }
        if let Some(v) = &l.xff {
            return only_http(v.span(), "xff");
        }
        if let Some(v) = &l.max_streams_per_connection {
            return only_http(v.span(), "max_streams_per_connection");
        }
        if !l.routes.get_ref().is_empty() {
            return only_http(l.routes.span(), "routes");
        }
        return Ok(None);
    }
    let max_header_bytes = in_range(
        src,
        &l.max_header_bytes,
        &at("max_header_bytes"),
        MIN_HEADER_BYTES..=MAX_HEADER_BYTES,
        DEFAULT_MAX_HEADER_BYTES,
    )?;
    let max_streams_per_connection = in_range(
        src,
        &l.max_streams_per_connection,
        &at("max_streams_per_connection"),
        1..=MAX_STREAMS,
        DEFAULT_MAX_STREAMS,
    )?;
    let max_body_bytes = match &l.max_body_bytes {
        Some(m) if *m.get_ref() == 0 => return Err(src.err(
            m.span(),
            at("max_body_bytes"),
            "0 is out of range: expected a positive number of bytes (leave it out for no limit)"
                .into(),
        )),
        m => m.as_ref().map(|m| *m.get_ref()),
    };
    let header_timeout = match &l.header_timeout {
        Some(t) if t.get_ref().0.is_zero() => {
            return Err(src.err(
                t.span(),
                at("header_timeout"),
                "0s would refuse every request: expected a positive duration".into(),
            ))
        }
        t => t.as_ref().map_or(DEFAULT_HEADER_TIMEOUT, |t| t.get_ref().0),
    };
    let mut routes = Vec::with_capacity(l.routes.get_ref().len());
    let mut seen: HashMap<(Option<String>, String), usize> = HashMap::new();
    for (j, r) in l.routes.get_ref().iter().enumerate() {
        let at = |key: &str| at(&format!("routes[{j}].{key}"));
        known_pool(src, &r.pool, &at("pool"), pools)?;
        let host = match &r.host {
            None => None,
            Some(h) => Some(host(h.get_ref()).map_err(|m| src.err(h.span(), at("host"), m))?),
        };
        let prefix = r.path_prefix.get_ref();
        if !prefix.starts_with('/') || prefix.contains(['?', '#', ' ']) {
            return Err(src.err(
                r.path_prefix.span(),
                at("path_prefix"),
                format!("{prefix:?} is not a path prefix: expected one starting with \"/\", without \"?\", \"#\" or spaces"),
            ));
        }
        for (key, d) in [
            ("first_byte_timeout", r.first_byte_timeout.0),
            ("stream_idle_timeout", r.stream_idle_timeout.0),
        ] {
            if d.is_zero() {
                return Err(src.err(
                    r.pool.span(),
                    at(key),
                    "0s would fail every request: expected a positive duration".into(),
                ));
            }
        }
        if let Some(first) = seen.insert((host.clone(), prefix.clone()), j) {
            return Err(src.err(
                r.path_prefix.span(),
                at("path_prefix"),
                format!(
                    "routes[{first}] already routes host {} and prefix {prefix:?}: the second would never match",
                    host.as_deref().map_or("(any)".to_string(), |h| format!("{h:?}"))
                ),
            ));
        }
        routes.push(RouteConfig {
            host,
            path_prefix: prefix.clone(),
            pool: r.pool.get_ref().clone(),
            strip_prefix: r.strip_prefix,
            first_byte_timeout: r.first_byte_timeout.0,
            stream_idle_timeout: r.stream_idle_timeout.0,
        });
    }
    Ok(Some(HttpConfig {
        header_timeout,
        max_header_bytes,
        max_body_bytes,
        xff: l.xff.as_ref().map_or(Default::default(), |x| *x.get_ref()),
        max_streams_per_connection,
        routes,
    }))
}

/// A route's `host`: a name (or IP literal) without port, or `*.` and a name.
/// Returned in lower case without a trailing dot.
pub(super) fn host(h: &str) -> Result<String, String> {
    let lower = h.trim().to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    let bare = name.strip_prefix("*.").unwrap_or(name);
    let ipv6 = bare.starts_with('[') && bare.ends_with(']');
    let valid = !bare.is_empty()
        && (ipv6
            || bare.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            }));
    if !valid {
        return Err(format!(
            "{h:?} is not a host: expected a name such as \"api.example.com\", a wildcard \"*.example.com\" or an IP address, without a port"
        ));
    }
    Ok(name.to_string())
}

/// `value` within `range`, or `default` when left out.
fn in_range<T>(
    src: &Source<'_>,
    value: &Option<Spanned<T>>,
    path: &str,
    range: std::ops::RangeInclusive<T>,
    default: T,
) -> Result<T, ConfigError>
where
    T: PartialOrd + std::fmt::Display + Copy,
{
    match value {
        None => Ok(default),
        Some(v) if range.contains(v.get_ref()) => Ok(*v.get_ref()),
        Some(v) => Err(src.err(
            v.span(),
            path.to_string(),
            format!(
                "{} is out of range: expected {} to {}",
                v.get_ref(),
                range.start(),
                range.end()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::host;

    #[test]
    fn hosts() {
        assert_eq!(host("API.Example.com.").unwrap(), "api.example.com");
        assert_eq!(host("*.example.com").unwrap(), "*.example.com");
        assert_eq!(host("10.0.0.1").unwrap(), "10.0.0.1");
        assert_eq!(host("[::1]").unwrap(), "[::1]");
        for bad in ["", "a:80", "*", "a.*.b", "a..b", "a b", "*.", "x/y"] {
            assert!(host(bad).is_err(), "{bad:?}");
        }
    }
}
