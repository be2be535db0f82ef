//! Who may connect to a listener: `allow` and `deny` (CIDR lists; deny wins),
//! `max_connections_per_source`, `max_rate_per_source` and `source_table_size`.
//! They apply to tcp and http listeners; a udp listener has its own
//! `max_sessions_per_source`.

use std::net::IpAddr;

use ipnet::IpNet;
use toml::Spanned;

use super::raw;
use super::validate::Source;
use super::{ConfigError, Protocol};

/// `source_table_size` when the file leaves it out.
const DEFAULT_TABLE_SIZE: usize = 100_000;
/// Bounds of `source_table_size`: a table of 10 million entries is about 1 GiB.
const MAX_TABLE_SIZE: usize = 10_000_000;

/// A listener's source rules; `None` from [`sources`] when it has none.
#[derive(Debug, Clone, PartialEq)]
pub struct SourcesConfig {
    /// Only these networks may connect; `None`: every address.
    pub allow: Option<Vec<IpNet>>,
    /// These may not, whatever `allow` says.
    pub deny: Vec<IpNet>,
    /// Concurrent connections per client IP (per /64 for IPv6).
    pub max_per_source: Option<u32>,
    /// New connections per second per client IP (token bucket, one second's burst).
    pub rate: Option<Rate>,
    /// Sources tracked at most (for the two limits above).
    pub table_size: usize,
}

/// `max_rate_per_source`: `"50/s"` or `"120/m"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_sec: f64,
    /// The bucket's size: one second's worth, at least one connection.
    pub burst: f64,
}

impl SourcesConfig {
    /// Whether `ip` passes `allow` and `deny` (IPv4-mapped IPv6 counts as IPv4).
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        !self.deny.iter().any(|n| n.contains(&ip))
            && self
                .allow
                .as_ref()
                .is_none_or(|a| a.iter().any(|n| n.contains(&ip)))
    }

    /// Whether connections are counted per source (a limit is set).
    pub fn tracks(&self) -> bool {
        self.max_per_source.is_some() || self.rate.is_some()
    }
}

/// The source rules of listener `l`, or the error of a key that does not apply or
/// does not parse.
pub(super) fn sources(
    src: &Source<'_>,
    l: &raw::Listener,
    at: &dyn Fn(&str) -> String,
) -> Result<Option<SourcesConfig>, ConfigError> {
    let keys = [
        ("allow", l.allow.as_ref().map(|s| s.span())),
        ("deny", l.deny.as_ref().map(|s| s.span())),
        (
            "max_connections_per_source",
            l.max_connections_per_source.as_ref().map(|s| s.span()),
        ),
        (
            "max_rate_per_source",
            l.max_rate_per_source.as_ref().map(|s| s.span()),
        ),
        (
            "source_table_size",
            l.source_table_size.as_ref().map(|s| s.span()),
        ),
    ];
    let Some((first, span)) = keys.iter().find_map(|(k, s)| s.clone().map(|s| (*k, s))) else {
        return Ok(None);
    };
    let protocol = *l.protocol.get_ref();
    if protocol == Protocol::Udp {
        return Err(src.err(
            span,
            at(first),
            format!("{first} applies to tcp and http listeners; a udp listener limits sources with max_sessions_per_source"),
        ));
    }
    let list = |v: &Option<Spanned<Vec<Spanned<String>>>>, key: &str| {
        v.as_ref()
            .map(|list| {
                list.get_ref()
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        super::proxy::cidr(n.get_ref())
                            .map_err(|m| src.err(n.span(), at(&format!("{key}[{i}]")), m))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()
    };
    let allow = list(&l.allow, "allow")?;
    if let (Some(a), Some(s)) = (&allow, &l.allow) {
        if a.is_empty() {
            return Err(src.err(
                s.span(),
                at("allow"),
                "an empty allow list admits no client: list networks, or leave it out to allow every address".into(),
            ));
        }
    }
    let deny = list(&l.deny, "deny")?.unwrap_or_default();
    let max_per_source = match &l.max_connections_per_source {
        None => None,
        Some(m) if *m.get_ref() == 0 || *m.get_ref() > u64::from(u32::MAX) => {
            return Err(src.err(
                m.span(),
                at("max_connections_per_source"),
                format!(
                    "{} is out of range: expected 1 to {}",
                    m.get_ref(),
                    u32::MAX
                ),
            ))
        }
        Some(m) => Some(*m.get_ref() as u32),
    };
    let rate = l
        .max_rate_per_source
        .as_ref()
        .map(|r| {
            parse_rate(r.get_ref()).map_err(|m| src.err(r.span(), at("max_rate_per_source"), m))
        })
        .transpose()?;
    let table_size = match &l.source_table_size {
        None => DEFAULT_TABLE_SIZE,
        Some(t) if *t.get_ref() == 0 || *t.get_ref() > MAX_TABLE_SIZE as u64 => {
            return Err(src.err(
                t.span(),
                at("source_table_size"),
                format!(
                    "{} is out of range: expected 1 to {MAX_TABLE_SIZE}",
                    t.get_ref()
                ),
            ))
        }
        Some(t) => *t.get_ref() as usize,
    };
    Ok(Some(SourcesConfig {
        allow,
        deny,
        max_per_source,
        rate,
        table_size,
    }))
}

/// `"50/s"`, `"120/m"` (spaces allowed around the parts).
fn parse_rate(s: &str) -> Result<Rate, String> {
    let expected = "expected connections per second or minute, such as \"50/s\" or \"120/m\"";
    let Some((n, unit)) = s.split_once('/') else {
        return Err(format!("{s:?}: {expected}"));
    };
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: {:?} is not a whole number; {expected}", n.trim()))?;
    if n == 0 {
        return Err(format!("{s:?} admits no connection; {expected}"));
    }
    let per_sec = match unit.trim() {
        "s" => f64::from(n),
        "m" => f64::from(n) / 60.0,
        u => return Err(format!("{s:?}: unit {u:?} is neither s nor m; {expected}")),
    };
    Ok(Rate {
        per_sec,
        burst: per_sec.max(1.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(
            parse_rate("50/s").unwrap(),
            Rate {
                per_sec: 50.0,
                burst: 50.0
            }
        );
        let r = parse_rate(" 120 / m ").unwrap();
        assert_eq!((r.per_sec, r.burst), (2.0, 2.0));
        let r = parse_rate("30/m").unwrap();
        assert_eq!((r.per_sec, r.burst), (0.5, 1.0));
        for bad in ["50", "0/s", "x/s", "5/h", "-1/s", "1.5/s"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn deny_wins_over_allow() {
        let c = SourcesConfig {
            allow: Some(vec!["127.0.0.0/8".parse().unwrap()]),
            deny: vec!["127.0.0.3/32".parse().unwrap()],
            max_per_source: None,
            rate: None,
            table_size: 10,
        };
        assert!(c.admits("127.0.0.2".parse().unwrap()));
        assert!(c.admits("::ffff:127.0.0.2".parse().unwrap()));
        assert!(!c.admits("127.0.0.3".parse().unwrap()));
        assert!(!c.admits("10.0.0.1".parse().unwrap()));
        assert!(!c.tracks());
    }
}
