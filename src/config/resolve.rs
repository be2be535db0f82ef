//! Text to positions and addresses: `resolve` turns a `host:port` value into a
//! socket address, `line_col` turns a byte offset into the line and column an error
//! message shows.

use std::net::SocketAddr;

/// Resolves `host:port` or `[v6]:port`. Hostnames go through the system resolver,
/// once, at load time; the first address is taken.
pub(super) fn resolve(s: &str) -> Result<SocketAddr, String> {
    match lookup(s)? {
        Lookup::Literal(a) => Ok(a),
        // The resolver's own order (RFC 6724 preferences), not resolve_all's.
        Lookup::Host(host, port) => {
            use std::net::ToSocketAddrs;
            (host.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
                .next()
                .ok_or_else(|| format!("{host:?} resolved to no address"))
        }
    }
}

/// What an address value is: an IP literal, or a hostname (and port) to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Literal(SocketAddr),
    Host(String, u16),
}

/// Checks the form of `host:port` or `[v6]:port` without resolving anything.
pub fn lookup(s: &str) -> Result<Lookup, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(Lookup::Literal(addr));
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
    // Digits and dots are an IPv4 address, and only the four-part form is one: the
    // resolver would take "127.0.0" or "10.1" as the C library's shorthands.
    let dotted = !host.is_empty() && host.chars().all(|c| c.is_ascii_digit() || c == '.');
    if dotted && host.parse::<std::net::Ipv4Addr>().is_err() {
        return Err(format!(
            "{s:?} is not a valid IPv4 address (four numbers: a.b.c.d); {expected}"
        ));
    }
    let malformed = host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/');
    if malformed || (host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_err()) {
        return Err(format!("{s:?} is not a valid address; {expected}"));
    }
    Ok(Lookup::Host(host.to_string(), port as u16))
}

/// Every address `host` resolves to through the system resolver (blocking:
/// `getaddrinfo`), in ascending order without repeats, so that two instances see
/// the same list whatever order the resolver answers in.
pub fn resolve_all(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    use std::net::ToSocketAddrs;
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?;
    let mut v: Vec<SocketAddr> = addrs.collect();
    v.sort();
    v.dedup();
    if v.is_empty() {
        return Err(format!("{host:?} resolved to no address"));
    }
    Ok(v)
}

/// 1-based line and column of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}
