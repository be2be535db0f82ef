//! The PROXY protocol (HAProxy's proxy-protocol.txt: v1 text, v2 binary) on a TCP
//! session: reading the header that the balancer in front sends before the client's
//! bytes (`accept_proxy`), and building the header written to a backend before them
//! (`send_proxy`). Parsing and encoding are the `ppp` crate's; this module decides
//! what is accepted, who the client is, and which TLVs go on.
//!
//! A session calls in here only when its listener has `accept_proxy` or its pool
//! `send_proxy`: with both off there is no buffer, no timer and no system call.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

use ppp::v2::{self, Command, Type, TypeLengthValues, Version};
use ppp::PartialResult;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::{AcceptProxy, AcceptProxyConfig, SendProxy};

/// The longest header taken. v2 allows 64 KiB of TLVs; what a balancer in front
/// sends is a few dozen bytes, and HAProxy itself refuses more than its buffer.
pub(super) const MAX_HEADER: usize = 4096;

/// The longest v1 header, its CRLF included, and how each starts.
const V1_MAX: usize = 107;
const V1_START: &[u8] = b"PROXY ";

/// The fixed part of a v2 header: signature, version and command, family, length.
const V2_FIXED: usize = 16;

/// CRC-32C (Castagnoli), the checksum of the v2 `PP2_TYPE_CRC32C` TLV.
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

const TLV_AUTHORITY: u8 = Type::Authority as u8;
const TLV_CRC32C: u8 = Type::CRC32C as u8;
const TLV_NOOP: u8 = Type::NoOp as u8;
const TLV_UNIQUE_ID: u8 = Type::UniqueId as u8;
/// Bytes of `PP2_TYPE_UNIQUE_ID` made up for a connection whose peer sent none.
const UNIQUE_ID_LEN: usize = 16;

/// Why a peer's header was refused. Each closes the connection and is counted as
/// `flowgate_connections_rejected_total{reason="proxy_header"}`.
#[derive(Debug, thiserror::Error)]
pub(super) enum HeaderError {
    #[error("peer is not in proxy_trusted")]
    Untrusted,
    #[error("no complete PROXY header within proxy_header_timeout")]
    Timeout,
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("a {got} PROXY header, but accept_proxy = \"{want}\"")]
    Version {
        got: &'static str,
        want: &'static str,
    },
    #[error("not a PROXY header")]
    NotProxy,
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("the peer closed before its PROXY header was complete")]
    Closed,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
}

/// A peer's header, taken, and the client's bytes read past it.
#[derive(Debug)]
pub(super) struct Inbound {
    /// The client for everything downstream: the header's source, or the TCP peer
    /// for a v2 LOCAL, a v1 UNKNOWN or addresses that are not IP (AF_UNIX).
    pub(super) client: SocketAddr,
    /// The header's destination, when it named one.
    dest: Option<SocketAddr>,
    /// Everything read: the header, then the client's first bytes.
    buf: Vec<u8>,
    /// Where the v2 TLVs are in `buf` (empty for v1).
    tlvs: Range<usize>,
    /// The header's length: the client's bytes start here.
    len: usize,
}

impl Inbound {
    /// Takes out the bytes the client sent right after the header (the backend gets
    /// them first; SNI routing reads the rest of the ClientHello behind them); the
    /// header stays.
    pub(super) fn take_rest(&mut self) -> Vec<u8> {
        self.buf.split_off(self.len)
    }
}

/// Reads the header of a peer that must send one (`accept_proxy`): a peer outside
/// `proxy_trusted` is refused before a byte is read, and the whole header must be
/// in within `proxy_header_timeout` of this call.
pub(super) async fn accept(
    client: &mut TcpStream,
    peer: SocketAddr,
    cfg: &AcceptProxyConfig,
) -> Result<Inbound, HeaderError> {
    if !cfg.trusts(peer.ip()) {
        return Err(HeaderError::Untrusted);
    }
    match tokio::time::timeout(cfg.header_timeout, read(client, peer, cfg.version)).await {
        Ok(r) => r,
        Err(_) => Err(HeaderError::Timeout),
    }
}

/// Reads until `parse` says the header is complete (however it is split across
/// reads) or can never be. Reads take what the socket has, up to `MAX_HEADER` bytes
/// in all, so client bytes behind the header may come along: they are kept.
async fn read(
    client: &mut TcpStream,
    peer: SocketAddr,
    want: AcceptProxy,
) -> Result<Inbound, HeaderError> {
    let mut buf = vec![0u8; MAX_HEADER];
    let mut filled = 0;
    loop {
        let n = client.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        filled += n;
        if let Some(h) = parse(&buf[..filled], peer, want)? {
            buf.truncate(filled);
            return Ok(Inbound {
                client: h.client,
                dest: h.dest,
                buf,
                tlvs: h.tlvs,
                len: h.len,
            });
        }
        if filled == MAX_HEADER {
            return Err(HeaderError::TooLong);
        }
    }
}

/// What a complete header says.
#[derive(Debug, PartialEq)]
struct Parsed {
    client: SocketAddr,
    dest: Option<SocketAddr>,
    tlvs: Range<usize>,
    len: usize,
}

/// Parses the start of `input`: `Ok(None)` while the header is incomplete (more
/// bytes may complete it), `Ok(Some)` once it is, an error when no bytes could.
/// The first byte tells the version (`P` for v1, `\r` for v2), so a version
/// `want` does not take is refused at once.
fn parse(input: &[u8], peer: SocketAddr, want: AcceptProxy) -> Result<Option<Parsed>, HeaderError> {
    let got = match input.first() {
        None => return Ok(None),
        Some(b'P') => AcceptProxy::V1,
        Some(b'\r') => AcceptProxy::V2,
        Some(_) => return Err(HeaderError::NotProxy),
    };
    if want != AcceptProxy::Any && want != got {
        return Err(HeaderError::Version {
            got: got.as_str(),
            want: want.as_str(),
        });
    }
    if got == AcceptProxy::V1 {
        parse_v1(input, peer)
    } else {
        parse_v2(input, peer)
    }
}

/// A v1 header is one line, at most 107 bytes with its CRLF. ppp's parser gets the
/// whole line: on some partial lines (`"PROXY TCP4 a b 51000 "`, cut after a space)
/// it answers "invalid" where more bytes would have made a header.
fn parse_v1(input: &[u8], peer: SocketAddr) -> Result<Option<Parsed>, HeaderError> {
    use ppp::v1::Addresses;
    let bad = |m: &str| Err(HeaderError::Malformed(m.into()));
    let end = match input
        .iter()
        .take(V1_MAX)
        .position(|&b| b == b'\r' || b == b'\n')
    {
        None if input.len() >= V1_MAX => return bad("no CRLF within 107 bytes"),
        None if V1_START.starts_with(&input[..input.len().min(V1_START.len())]) => return Ok(None),
        None => return bad("not a PROXY line"),
        Some(i) if input[i] == b'\r' && i + 1 < V1_MAX => match input.get(i + 1) {
            None => return Ok(None),
            Some(b'\n') => i + 1,
            Some(_) => return bad("the line does not end with CRLF"),
        },
        Some(_) => return bad("the line does not end with CRLF"),
    };
    let h = ppp::v1::Header::try_from(&input[..=end])
        .map_err(|e| HeaderError::Malformed(e.to_string()))?;
    let (client, dest) = match h.addresses {
        Addresses::Tcp4(a) => (
            SocketAddr::new(a.source_address.into(), a.source_port),
            Some(SocketAddr::new(
                a.destination_address.into(),
                a.destination_port,
            )),
        ),
        Addresses::Tcp6(a) => (
            SocketAddr::new(a.source_address.into(), a.source_port),
            Some(SocketAddr::new(
                a.destination_address.into(),
                a.destination_port,
            )),
        ),
        Addresses::Unknown => (peer, None),
    };
    Ok(Some(Parsed {
        client,
        dest,
        tlvs: 0..0,
        len: h.header.len(),
    }))
}

fn parse_v2(input: &[u8], peer: SocketAddr) -> Result<Option<Parsed>, HeaderError> {
    use ppp::v2::Addresses;
    let h = match v2::Header::try_from(input) {
        Ok(h) => h,
        // The fixed part says how long the rest is: too long is known at once.
        Err(v2::ParseError::Partial(_, rest)) if V2_FIXED + rest > MAX_HEADER => {
            return Err(HeaderError::TooLong)
        }
        Err(e) if e.is_incomplete() => return Ok(None),
        Err(e) => return Err(HeaderError::Malformed(e.to_string())),
    };
    let len = h.len();
    let tlvs = len - h.tlv_bytes().len()..len;
    // Every TLV must be whole (they are passed on), and a CRC32C must match.
    let mut at = tlvs.start;
    for tlv in h.tlvs() {
        let tlv = tlv.map_err(|e| HeaderError::Malformed(e.to_string()))?;
        if tlv.kind == TLV_CRC32C {
            let sent = <[u8; 4]>::try_from(tlv.value.as_ref())
                .map_err(|_| HeaderError::Malformed("CRC32C TLV is not 4 bytes".into()))?;
            if u32::from_be_bytes(sent) != crc32c(h.as_bytes(), at + 3) {
                return Err(HeaderError::Malformed("CRC32C does not match".into()));
            }
        }
        at += 3 + tlv.value.len();
    }
    let (client, dest) = match (h.command, h.addresses) {
        (Command::Proxy, Addresses::IPv4(a)) => (
            SocketAddr::new(a.source_address.into(), a.source_port),
            Some(SocketAddr::new(
                a.destination_address.into(),
                a.destination_port,
            )),
        ),
        (Command::Proxy, Addresses::IPv6(a)) => (
            SocketAddr::new(a.source_address.into(), a.source_port),
            Some(SocketAddr::new(
                a.destination_address.into(),
                a.destination_port,
            )),
        ),
        // LOCAL (the front balancer's own health check), UNSPEC or AF_UNIX.
        _ => (peer, None),
    };
    Ok(Some(Parsed {
        client,
        dest,
        tlvs,
        len,
    }))
}

/// The CRC-32C of a v2 `header` whose CRC32C value (4 bytes) starts at `at`,
/// computed as if that value were zero.
fn crc32c(header: &[u8], at: usize) -> u32 {
    let mut d = CRC32C.digest();
    d.update(&header[..at]);
    d.update(&[0; 4]);
    d.update(&header[at + 4..]);
    d.finalize()
}

/// What a backend connection gets before the client's own bytes.
#[derive(Debug)]
pub(super) struct Prefix {
    /// The `send_proxy` header, then the client's bytes read behind its header.
    pub(super) bytes: Vec<u8>,
    /// How many of `bytes` are the client's (counted as sent to the backend).
    pub(super) client_bytes: usize,
}

/// The prefix of every backend connection of a session: the `send` header (none
/// when off) for `client`, then `early`: the client's bytes read so far (behind
/// its own header, and with `sni_routes` its ClientHello). `None` when that is
/// nothing at all. `authority`, the client's SNI, replaces the inbound
/// PP2_TYPE_AUTHORITY in a v2 header.
///
/// The header's destination is the inbound header's, else the address the client
/// reached: the listener's `bind` when that names one address and port, else what
/// `socket` says (one getsockname, only with `send_proxy`).
pub(super) fn prefix(
    socket: &TcpStream,
    bind: SocketAddr,
    client: SocketAddr,
    send: SendProxy,
    inbound: Option<Inbound>,
    early: Vec<u8>,
    authority: Option<&[u8]>,
) -> io::Result<Option<Prefix>> {
    let client_bytes = early.len();
    if send == SendProxy::Off {
        return Ok((client_bytes > 0).then_some(Prefix {
            bytes: early,
            client_bytes,
        }));
    }
    let dest = match inbound.as_ref().and_then(|i| i.dest) {
        Some(d) => d,
        None if !bind.ip().is_unspecified() && bind.port() != 0 => bind,
        None => socket.local_addr()?,
    };
    let mut bytes = outbound(send, client, dest, inbound.as_ref(), authority)?;
    bytes.extend_from_slice(&early);
    Ok(Some(Prefix {
        bytes,
        client_bytes,
    }))
}

/// The `send` header (v1 or v2) naming `client` and `dest`.
///
/// v2 carries the inbound header's TLVs as they came, except NOOP and CRC32C
/// (a new CRC32C is computed when the inbound header had one), `authority` in place
/// of the inbound PP2_TYPE_AUTHORITY when known, and a PP2_TYPE_UNIQUE_ID: the
/// inbound one, else 16 random bytes. An error only past v2's 64 KiB, which the
/// 4 KiB inbound limit rules out.
fn outbound(
    send: SendProxy,
    client: SocketAddr,
    dest: SocketAddr,
    inbound: Option<&Inbound>,
    authority: Option<&[u8]>,
) -> io::Result<Vec<u8>> {
    let (src, dst) = same_family(client, dest);
    if send == SendProxy::V1 {
        return Ok(ppp::v1::Addresses::from((src, dst))
            .to_string()
            .into_bytes());
    }
    let mut tlvs: Vec<u8> = Vec::with_capacity(64);
    let mut push = |kind: u8, value: &[u8]| {
        tlvs.push(kind);
        tlvs.extend_from_slice(&(value.len() as u16).to_be_bytes());
        tlvs.extend_from_slice(value);
    };
    let (mut had_authority, mut had_id, mut had_crc) = (false, false, false);
    if let Some(i) = inbound {
        // Validated when read: every TLV is whole.
        for tlv in TypeLengthValues::from(&i.buf[i.tlvs.clone()]).flatten() {
            match tlv.kind {
                TLV_NOOP => continue,
                TLV_CRC32C => {
                    had_crc = true;
                    continue;
                }
                TLV_AUTHORITY => {
                    had_authority = true;
                    if let Some(a) = authority {
                        push(TLV_AUTHORITY, a);
                        continue;
                    }
                }
                TLV_UNIQUE_ID => had_id = true,
                _ => {}
            }
            push(tlv.kind, &tlv.value);
        }
    }
    if let (false, Some(a)) = (had_authority, authority) {
        push(TLV_AUTHORITY, a);
    }
    if !had_id {
        push(TLV_UNIQUE_ID, &rand::random::<[u8; UNIQUE_ID_LEN]>());
    }
    if had_crc {
        push(TLV_CRC32C, &[0; 4]);
    }
    let mut header = v2::Builder::with_addresses(
        Version::Two | Command::Proxy,
        v2::Protocol::Stream,
        (src, dst),
    )
    .write_payload(tlvs.as_slice())?
    .build()?;
    if had_crc {
        let at = header.len() - 4;
        let sum = crc32c(&header, at);
        header[at..].copy_from_slice(&sum.to_be_bytes());
    }
    Ok(header)
}

/// The header a probe of a `send` pool's backend starts with, as HAProxy's health
/// checks do: v1 `PROXY UNKNOWN`, v2 LOCAL, both meaning "this connection is the
/// balancer's own, take its address". `None` when `send` is off.
pub fn probe_header(send: SendProxy) -> Option<Vec<u8>> {
    match send {
        SendProxy::Off => None,
        SendProxy::V1 => Some(ppp::v1::Addresses::Unknown.to_string().into_bytes()),
        SendProxy::V2 => v2::Builder::new(
            Version::Two | Command::Local,
            v2::AddressFamily::Unspecified | v2::Protocol::Unspecified,
        )
        .build()
        .ok(),
    }
}

/// Both addresses in one family (a header names one): an IPv4 one beside an IPv6
/// one becomes IPv4-mapped.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let mapped = |s: SocketAddr| match s.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), s.port()),
        IpAddr::V6(_) => s,
    };
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        (mapped(a), mapped(b))
    }
}

#[cfg(test)]
mod tests;
