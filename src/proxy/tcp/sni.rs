//! TLS passthrough routed by SNI (`[[listeners.sni_routes]]`): reading the client's
//! ClientHello without consuming it (the bytes are kept and replayed to the backend
//! whole), finding its server_name, and the route that name picks. TLS records and
//! the handshake message are parsed by `tls-parser`; nothing is decrypted.
//!
//! A session calls in here only when its listener has `sni_routes`: a listener
//! without them has no buffer, no timer and no system call from this module.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tls_parser::{
    parse_tls_extension_sni_content, parse_tls_message_handshake, parse_tls_raw_record, SNIType,
    TlsExtension, TlsMessage, TlsMessageHandshake, TlsRecordType,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::SniConfig;
use crate::pool::Pool;

/// The most bytes buffered for a ClientHello: a handshake message of 16 KiB plus the
/// headers of the records it is cut into (a real one is 200 to 2,000 bytes; one
/// with a post-quantum key share about 1,800).
pub(super) const MAX_HELLO: usize = 16 * 1024 + 1024;

/// Why a client was closed before a backend was picked. Each is counted as
/// `flowgate_connections_rejected_total{reason="sni"}`.
#[derive(Debug, thiserror::Error)]
pub(super) enum HelloError {
    #[error("no complete ClientHello within proxy_header_timeout")]
    Timeout,
    #[error("ClientHello longer than {MAX_HELLO} bytes")]
    TooLong,
    #[error("not a TLS ClientHello: {0}")]
    NotTls(&'static str),
    #[error("the client closed before its ClientHello was complete")]
    Closed,
    #[error("reading the ClientHello: {0}")]
    Io(#[from] io::Error),
    #[error("no SNI route for server name {0} (sni_required, or no listener pool)")]
    Unrouted(String),
}

/// One route: its names (as configured) and pool, and its count of clients.
#[derive(Debug)]
pub struct SniRoute {
    pub server_names: Vec<String>,
    pub pool: Arc<Pool>,
    /// `flowgate_sni_routed_total{listener,pool}`.
    routed: metrics::Counter,
}

/// A listener's SNI routes, ready to match: exact names in a map, wildcards in
/// file order.
#[derive(Debug)]
pub struct SniRouter {
    routes: Vec<SniRoute>,
    exact: HashMap<String, usize>,
    /// `(".x", route)` for each `*.x`, in file order.
    wildcard: Vec<(String, usize)>,
    pub required: bool,
    pub timeout: Duration,
}

impl SniRouter {
    /// The routes of listener `listener` over the running `pools` (run in the
    /// instance's metrics scope: the counters are made here). Validation made sure
    /// each pool exists; a route to a missing one is left out.
    pub fn new(listener: &str, cfg: &SniConfig, pools: &HashMap<String, Arc<Pool>>) -> SniRouter {
        let mut r = SniRouter {
            routes: Vec::with_capacity(cfg.routes.len()),
            exact: HashMap::new(),
            wildcard: Vec::new(),
            required: cfg.required,
            timeout: cfg.timeout,
        };
        for route in &cfg.routes {
            let Some(pool) = pools.get(&route.pool) else {
                continue;
            };
            let i = r.routes.len();
            for name in &route.server_names {
                match name.strip_prefix('*') {
                    Some(suffix) => r.wildcard.push((suffix.to_string(), i)),
                    None => {
                        r.exact.insert(name.clone(), i);
                    }
                }
            }
            r.routes.push(SniRoute {
                server_names: route.server_names.clone(),
                pool: pool.clone(),
                routed: metrics::counter!(
                    crate::metrics::names::SNI_ROUTED,
                    "listener" => listener.to_string(),
                    "pool" => route.pool.clone()
                ),
            });
        }
        r
    }

    pub fn routes(&self) -> &[SniRoute] {
        &self.routes
    }

    /// The route for `name` (lower case, no trailing dot): an exact name first,
    /// then the first wildcard in file order. `*.x` matches `a.x` and `a.b.x`,
    /// never `x`.
    pub fn route(&self, name: &str) -> Option<usize> {
        if let Some(&i) = self.exact.get(name) {
            return Some(i);
        }
        self.wildcard
            .iter()
            .find(|(suffix, _)| name.len() > suffix.len() && name.ends_with(suffix.as_str()))
            .map(|&(_, i)| i)
    }

    /// The pool of route `i`, counted as one client routed there.
    pub(super) fn take(&self, i: usize) -> &Arc<Pool> {
        let r = &self.routes[i];
        r.routed.increment(1);
        &r.pool
    }

    pub(super) fn pool(&self, i: usize) -> &Arc<Pool> {
        &self.routes[i].pool
    }
}

/// Reads until `buf` (which may already hold bytes read behind a PROXY header)
/// holds a complete ClientHello, and returns its server_name (lower case, without
/// a trailing dot; `None` when it sent none). Every byte read stays in `buf`, for
/// the backend. The caller bounds the time.
pub(super) async fn read_hello(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Option<Box<str>>, HelloError> {
    loop {
        if let Some(name) = parse(buf)? {
            return Ok(name);
        }
        let filled = buf.len();
        if filled >= MAX_HELLO {
            return Err(HelloError::TooLong);
        }
        // Into the spare capacity, not zero-filled first; 4 KiB takes a whole
        // ClientHello nearly always, and the loop grows it up to MAX_HELLO.
        buf.reserve(4096.min(MAX_HELLO - filled));
        let n = client
            .read_buf(&mut bytes::BufMut::limit(&mut *buf, MAX_HELLO - filled))
            .await?;
        if n == 0 {
            return Err(HelloError::Closed);
        }
    }
}

/// Parses the start of `input`: `Ok(None)` while the ClientHello is incomplete,
/// `Ok(Some(name))` once it is (`name` its SNI, if any), an error when no more
/// bytes could make one. The handshake message may span several records.
fn parse(input: &[u8]) -> Result<Option<Option<Box<str>>>, HelloError> {
    let not_tls = |m| Err(HelloError::NotTls(m));
    match input.first() {
        None => return Ok(None),
        Some(&b) if b != u8::from(TlsRecordType::Handshake) => {
            return not_tls("the first byte is not a handshake record's")
        }
        Some(_) => {}
    }
    // The handshake message, gathered from the records' fragments (copied only
    // when it spans records; a ClientHello is nearly always in one).
    let mut message: Vec<u8> = Vec::new();
    let mut rest = input;
    if let Ok((_, record)) = parse_tls_raw_record(rest) {
        if record.hdr.record_type == TlsRecordType::Handshake {
            if let [kind, a, b, c, ..] = record.data[..] {
                let len = 4 + u32::from_be_bytes([0, a, b, c]) as usize;
                if kind == u8::from(tls_parser::TlsHandshakeType::ClientHello)
                    && record.data.len() >= len
                {
                    return client_hello(&record.data[..len]);
                }
            }
        }
    }
    loop {
        let record = match parse_tls_raw_record(rest) {
            Ok((r, record)) => {
                rest = r;
                record
            }
            Err(tls_parser::Err::Incomplete(_)) => return Ok(None),
            Err(_) => return not_tls("malformed record header"),
        };
        if record.hdr.record_type != TlsRecordType::Handshake {
            return not_tls("a record that is not a handshake before the ClientHello ended");
        }
        message.extend_from_slice(record.data);
        // The message's own length (type, then 24 bits): parse once it is all in.
        let [kind, a, b, c, ..] = message[..] else {
            continue;
        };
        if kind != u8::from(tls_parser::TlsHandshakeType::ClientHello) {
            return not_tls("the first handshake message is not a ClientHello");
        }
        let len = 4 + u32::from_be_bytes([0, a, b, c]) as usize;
        if len > MAX_HELLO {
            return Err(HelloError::TooLong);
        }
        if message.len() < len {
            if rest.is_empty() {
                return Ok(None);
            }
            continue;
        }
        return client_hello(&message[..len]);
    }
}

/// The server name of a complete ClientHello handshake message.
fn client_hello(message: &[u8]) -> Result<Option<Option<Box<str>>>, HelloError> {
    match parse_tls_message_handshake(message) {
        Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) => {
            server_name(hello.ext).map(Some)
        }
        _ => Err(HelloError::NotTls("malformed ClientHello")),
    }
}

/// The host_name of a ClientHello's server_name extension, lower case and without
/// a trailing dot. The extension list is walked by its headers; only server_name
/// is parsed (by tls-parser), the others are skipped unparsed.
fn server_name(ext: Option<&[u8]>) -> Result<Option<Box<str>>, HelloError> {
    let Some(mut ext) = ext else {
        return Ok(None);
    };
    let malformed = || HelloError::NotTls("malformed extensions");
    while !ext.is_empty() {
        let [t0, t1, l0, l1, rest @ ..] = ext else {
            return Err(malformed());
        };
        let len = usize::from(u16::from_be_bytes([*l0, *l1]));
        if rest.len() < len {
            return Err(malformed());
        }
        let (data, next) = rest.split_at(len);
        ext = next;
        if [*t0, *t1] != [0, 0] {
            continue;
        }
        let Ok((_, TlsExtension::SNI(names))) = parse_tls_extension_sni_content(data) else {
            return Err(HelloError::NotTls("malformed server_name extension"));
        };
        let Some((_, name)) = names.iter().find(|(t, _)| *t == SNIType::HostName) else {
            return Ok(None);
        };
        let Ok(name) = std::str::from_utf8(name) else {
            return Err(HelloError::NotTls("server_name is not text"));
        };
        let name = name.to_ascii_lowercase();
        let name = name.strip_suffix('.').unwrap_or(&name);
        return Ok((!name.is_empty()).then(|| name.into()));
    }
    Ok(None)
}

#[cfg(test)]
mod tests;
