//! The PROXY protocol keys: a listener's `accept_proxy`, `proxy_trusted` and
//! `proxy_header_timeout`, and which listeners may send clients to a pool with
//! `send_proxy` (or `source = "client"`). Both are TCP-listener features: an http
//! listener neither reads a header (hyper owns its socket) nor sends one (its
//! upstream connections are pooled and shared by clients, so none can come from one
//! client's address either: the one refusal of `source = "client"`), and a udp
//! listener has no stream to put one on.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use super::raw;
use super::validate::Source;
use super::{
    AcceptProxy, AcceptProxyConfig, ConfigError, PoolConfig, PoolSource, Protocol, SendProxy,
};

/// `proxy_header_timeout` when the file leaves it out (the example; HAProxy
/// bounds the header with `timeout client`, nginx with `proxy_protocol_timeout`, 30s).
const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// The `accept_proxy` settings of listener `l` (`None` when it is off), or the
/// error of a key that does not apply.
pub(super) fn accept(
    src: &Source<'_>,
    l: &raw::Listener,
    at: &dyn Fn(&str) -> String,
) -> Result<Option<AcceptProxyConfig>, ConfigError> {
    let protocol = *l.protocol.get_ref();
    let version = l
        .accept_proxy
        .as_ref()
        .map_or(AcceptProxy::Off, |v| *v.get_ref());
    if version == AcceptProxy::Off {
        let off = |span: std::ops::Range<usize>, key: &str| {
            Err(src.err(
                span,
                at(key),
                format!("{key} applies with accept_proxy (v1, v2 or any); this listener reads no PROXY header"),
            ))
        };
        if let Some(t) = &l.proxy_trusted {
            return off(t.span(), "proxy_trusted");
        }
        // With `sni_routes` the same budget bounds the ClientHello.
        if let (Some(t), true) = (&l.proxy_header_timeout, l.sni_routes.get_ref().is_empty()) {
            return off(t.span(), "proxy_header_timeout");
        }
        return Ok(None);
    }
    if protocol != Protocol::Tcp {
        let span = l.accept_proxy.as_ref().map_or(0..0, |v| v.span());
        return Err(src.err(
            span,
            at("accept_proxy"),
            format!(
                "accept_proxy applies to tcp listeners; this one is {}",
                protocol.as_str()
            ),
        ));
    }
    let trusted = match &l.proxy_trusted {
        None => None,
        Some(list) if list.get_ref().is_empty() => {
            return Err(src.err(
                list.span(),
                at("proxy_trusted"),
                "an empty list trusts no peer, so every client would be closed: list the balancers in front, or leave it out to trust every peer".into(),
            ))
        }
        Some(list) => Some(
            list.get_ref()
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    cidr(n.get_ref())
                        .map_err(|m| src.err(n.span(), at(&format!("proxy_trusted[{i}]")), m))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let header_timeout = header_timeout(src, l, at)?;
    Ok(Some(AcceptProxyConfig {
        version,
        trusted,
        header_timeout,
    }))
}

/// `proxy_header_timeout`: from accept to a complete PROXY header and, with
/// `sni_routes`, a complete ClientHello (one budget for both).
pub(super) fn header_timeout(
    src: &Source<'_>,
    l: &raw::Listener,
    at: &dyn Fn(&str) -> String,
) -> Result<Duration, ConfigError> {
    match &l.proxy_header_timeout {
        Some(t) if t.get_ref().0.is_zero() => Err(src.err(
            t.span(),
            at("proxy_header_timeout"),
            "0s would close every client: expected a positive duration".into(),
        )),
        t => Ok(t.as_ref().map_or(DEFAULT_HEADER_TIMEOUT, |t| t.get_ref().0)),
    }
}

/// One `proxy_trusted` (or `allow`, `deny`) entry: `"10.0.0.0/8"`, `"2001:db8::/32"`, or one address
/// (`"10.1.2.3"`, the same as `/32`). Host bits past the prefix are refused rather
/// than dropped: `10.1.2.3/8` is more likely a typo than a wish to trust 10/8.
pub(super) fn cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let net = match s.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match s.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => {
                return Err(format!(
                    "{s:?} is not a network: expected a CIDR such as \"10.0.0.0/8\" or \"2001:db8::/32\", or one address"
                ))
            }
        },
    };
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has bits set past its /{} prefix: did you mean \"{}\"?",
            net.prefix_len(),
            net.trunc()
        ));
    }
    Ok(net)
}

/// Refuses a udp or http listener whose `pool` (at `path`, value `pool`) has
/// `send_proxy` (only a tcp session writes the header), and an http listener whose
/// pool has `source = "client"`.
pub(super) fn send_allowed(
    src: &Source<'_>,
    protocol: Protocol,
    pool: &Spanned<String>,
    path: String,
    pools: &[PoolConfig],
) -> Result<(), ConfigError> {
    let Some(p) = pools.iter().find(|p| &p.name == pool.get_ref()) else {
        return Ok(());
    };
    if protocol == Protocol::Tcp {
        return Ok(());
    }
    // A udp listener takes `source = "client"`, never `send_proxy`.
    let what = if p.send_proxy != SendProxy::Off {
        format!(
            "send_proxy = \"{}\", which only tcp listeners send",
            p.send_proxy.as_str()
        )
    } else if p.source == Some(PoolSource::Client) && protocol == Protocol::Http {
        "source = \"client\", which http listeners cannot use (their upstream connections are shared by clients)".into()
    } else {
        return Ok(());
    };
    Err(src.err(
        pool.span(),
        path,
        format!(
            "pool {:?} has {what}; this one is {} (give it a pool without it)",
            p.name,
            protocol.as_str()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::cidr;

    #[test]
    fn trusted_networks() {
        assert_eq!(cidr("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(cidr(" 10.1.2.3 ").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(cidr("2001:db8::/32").unwrap().to_string(), "2001:db8::/32");
        assert_eq!(cidr("::1").unwrap().to_string(), "::1/128");
        let e = cidr("10.1.2.3/8").unwrap_err();
        assert!(e.contains("did you mean \"10.0.0.0/8\""), "{e}");
        for bad in ["", "10.0.0.0/33", "10.0.0/8", "example.com", "10.0.0.0/"] {
            assert!(cidr(bad).is_err(), "{bad:?}");
        }
    }
}
