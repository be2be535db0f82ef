//! Text to positions and addresses: `resolve` turns a `host:port` value into a
//! socket address, `line_col` turns a byte offset into the line and column an error
//! message shows.

use std::net::SocketAddr;

/// Resolves `host:port` or `[v6]:port`. Hostnames go through the system resolver,
/// once, at load time.
pub(super) fn resolve(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
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
    let mut addrs = (host, port as u16)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{host:?} resolved to no address"))
}

/// 1-based line and column of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}
