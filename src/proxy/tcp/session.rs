//! One TCP session, start to end: with `accept_proxy`, the peer's PROXY header
//! ([`super::proxy_header`]) -> the source rules -> with `sni_routes`, the
//! ClientHello and the pool its SNI picks ([`super::sni`]) -> pick a backend ->
//! connect (with retries on other backends), writing the `send_proxy` header and
//! the client's early bytes (the ClientHello) first -> move bytes both ways
//! ([`super::transfer`]) -> account -> close.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::net::TcpStream;
use tracing::debug;

use super::proxy_header::{self, Prefix};
use super::shared::{ListenerSettings, ListenerShared};
use super::sni::HelloError;
use super::sources::SourceGuard;
use super::transfer::{splice_both, Stops};
use crate::access_log::Entry;
use crate::backend::{ActiveGuard, Backend, ConnectError};
use crate::config::SendProxy;
use crate::pool::{NoSlot, Pool};
use crate::proxy::{now_us, passive_failure, Termination};

/// Serves one accepted client until both directions end, then accounts for it
/// (session histogram, rejection counters, access log).
///
/// `cut` ends the session early: the process's hard stop, or the listener's drain
/// deadline after a reload removed it.
pub async fn serve(
    mut client: TcpStream,
    mut peer: SocketAddr,
    listener: &Arc<ListenerShared>,
    settings: Arc<ListenerSettings>,
) -> Termination {
    // Times are microseconds on the process clock (8 bytes, not an `Instant`'s
    // 16): they live in every connection's task for its whole life.
    let start = now_us();
    // The listener's sessions now, this one included (for the access log).
    let at = At::new(listener.active.load(Ordering::Relaxed) as u32, 0);
    // With `accept_proxy` the client is who the peer's header says, from here on:
    // the pick (ip-hash), the access log, the backend's PROXY header. Nothing to do
    // (and no system call) when neither `accept_proxy` nor `send_proxy` is on.
    let send = settings
        .pool
        .as_ref()
        .map_or(SendProxy::Off, |p| p.send_proxy());
    // The client's bytes sent ahead with the prefix, for the byte counts (at most
    // 4 KiB behind a PROXY header, or a ClientHello of at most 17 KiB).
    let mut early = 0u16;
    // This connection's place under `max_connections_per_source` (when tracked).
    let mut _source = None;
    // With `sni_routes`: the client's server name and the route it picked.
    let mut sni: Option<Box<SniPick>> = None;
    // A block, so the prefix's storage ends with the connect phase and the
    // transfer phase does not carry it (`peer` is reassigned, not shadowed, for
    // the same reason).
    let connected = {
        let prefix = if settings.accept_proxy.is_none()
            && settings.sni.is_none()
            && send == SendProxy::Off
        {
            // The source rules, on the TCP peer: before any backend is contacted.
            // The guard lives as long as the session.
            if let Some(cfg) = &settings.sources {
                match listener.admit(cfg, peer.ip()) {
                    Ok(g) => _source = g,
                    Err(t) => {
                        finish(
                            listener,
                            &settings,
                            Client::new(peer, None),
                            start,
                            at,
                            None,
                            t,
                        );
                        return t;
                    }
                }
            }
            None
        } else {
            // Boxed, like the connect phase: a task is sized for its largest phase.
            let phase = Box::pin(start_phase(listener, &settings, &mut client, peer, start));
            match phase.await {
                Ok(s) => {
                    peer = s.client;
                    _source = s.source;
                    sni = s.sni;
                    early = s.prefix.as_ref().map_or(0, |p| p.client_bytes as u16);
                    s.prefix
                }
                Err((t, client, pick)) => {
                    finish(
                        listener,
                        &settings,
                        Client::new(client, pick.as_deref()),
                        start,
                        at,
                        None,
                        t,
                    );
                    return t;
                }
            }
        };
        let pool = session_pool(&settings, sni.as_deref());
        // TCP_NODELAY: accepted sockets inherit it from the listening socket
        // (listener::bind sets it), which saves a syscall per connection.
        tokio::select! {
            biased;
            _ = listener.cut.cancelled() => Err((cut_reason(listener), 0)),
            // Boxed: the connect phase is larger than the transfer phase, and a task is
            // sized for its largest phase.
            r = Box::pin(connect(listener, &settings, pool, peer, prefix)) => r,
        }
    };
    let (mut backend, guard, retries) = match connected {
        Ok(c) => c,
        Err((t, retries)) => {
            debug!(listener = %listener.name, client = %peer, reason = t.as_str(), "no backend connection");
            let rejected = match t {
                Termination::NoBackend => Some(&listener.rejected_no_backend),
                Termination::ConnectFailed => Some(&listener.rejected_connect_failed),
                Termination::BackendsFull => Some(&listener.rejected_backends_full),
                Termination::QueueTimeout => Some(&listener.rejected_queue_timeout),
                _ => None,
            };
            if let Some(r) = rejected {
                r.fetch_add(1, Ordering::Relaxed);
            }
            let at = at.with_retries(retries);
            finish(
                listener,
                &settings,
                Client::new(peer, sni.as_deref()),
                start,
                at,
                None,
                t,
            );
            return t;
        }
    };
    // Accept to connected, failed attempts on other backends included, so the
    // first-byte time below starts where the connect ended. (One u32 of state.)
    let connect_time = now_us().saturating_sub(start).min(u32::MAX as u64) as u32;
    let _ = backend.set_nodelay(true);
    crate::proxy::busy::set_socket((&backend).into(), listener.ctx.busy_poll_us);
    let at = at
        .with_retries(retries)
        .with_backend(guard.backend().active());
    let stops = Stops {
        listener: listener.clone(),
        epoch: guard.backend().drain_epoch(),
        guard,
    };
    let guard = &stops.guard;
    if early > 0 {
        let stats = &guard.backend().stats;
        stats
            .bytes_to
            .fetch_add(u64::from(early), Ordering::Relaxed);
    }
    let moved = splice_both(&mut client, &mut backend, &settings, &stops).await;
    let end = moved.end;
    // Passive outlier detection counts resets as failures, and only a session
    // that ended otherwise as a success (a backend that accepts and resets every
    // connection must still be ejected).
    if end == Termination::BackendReset {
        if let Some(pool) = session_pool(&settings, sni.as_deref()) {
            passive_failure(pool, guard.backend(), &listener.ctx.control);
        }
    } else {
        guard.backend().passive_success();
    }
    let first_byte = (moved.first_byte != 0).then(|| {
        Duration::from_micros(moved.first_byte.saturating_sub(start + connect_time as u64))
    });
    if let Some(fb) = first_byte {
        guard.backend().histograms.first_byte.record(fb);
    }
    finish(
        listener,
        &settings,
        Client::new(peer, sni.as_deref()),
        start,
        at,
        Some(Connected {
            backend: guard.backend(),
            connect: Duration::from_micros(connect_time as u64),
            first_byte,
            up: moved.up + u64::from(early),
            down: moved.down,
        }),
        end,
    );
    end
}

/// What an SNI listener's session learnt from the ClientHello (boxed: a session
/// on a listener without `sni_routes` carries one word for it).
#[derive(Debug)]
struct SniPick {
    /// The client's server name, lower case, without a trailing dot.
    name: Option<Box<str>>,
    /// The `sni_routes` entry it matched; `None`: the listener's pool.
    route: Option<usize>,
}

/// The pool of a session: its SNI route's, else the listener's.
fn session_pool<'a>(
    settings: &'a ListenerSettings,
    sni: Option<&SniPick>,
) -> Option<&'a Arc<Pool>> {
    match (sni.and_then(|p| p.route), &settings.sni) {
        (Some(i), Some(router)) => Some(router.pool(i)),
        _ => settings.pool.as_ref(),
    }
}

/// What the start of a session with `accept_proxy`, `sni_routes` or `send_proxy`
/// settled.
struct Start {
    /// The client: the PROXY header's, else the TCP peer.
    client: SocketAddr,
    source: Option<SourceGuard>,
    sni: Option<Box<SniPick>>,
    prefix: Option<Prefix>,
}

/// The start of a session that reads or writes something before the client's
/// bytes: the PROXY header (`accept_proxy`), the source rules on the client it
/// names, the ClientHello and the route its SNI picks (`sni_routes`), then what
/// each backend connection gets first (the chosen pool's `send_proxy` header, then
/// the client's bytes read so far). `proxy_header_timeout` bounds the header and
/// the ClientHello together, from `start` (accept). A refusal is counted here; it
/// comes with the client and what SNI said, for the access log.
async fn start_phase(
    listener: &Arc<ListenerShared>,
    settings: &ListenerSettings,
    client: &mut TcpStream,
    peer: SocketAddr,
    start: u64,
) -> Result<Start, (Termination, SocketAddr, Option<Box<SniPick>>)> {
    let refused = |e: &dyn std::fmt::Display| {
        debug!(listener = %listener.name, peer = %peer, error = %e, "PROXY header refused, closing the connection");
        listener
            .rejected_proxy_header
            .fetch_add(1, Ordering::Relaxed);
        Termination::ProxyHeader
    };
    let mut inbound = match &settings.accept_proxy {
        None => None,
        Some(accept) => tokio::select! {
            biased;
            _ = listener.cut.cancelled() => return Err((cut_reason(listener), peer, None)),
            r = proxy_header::accept(client, peer, accept) => Some(r.map_err(|e| (refused(&e), peer, None))?),
        },
    };
    let client_addr = inbound.as_ref().map_or(peer, |h| h.client);
    let source = match &settings.sources {
        None => None,
        Some(cfg) => listener
            .admit(cfg, client_addr.ip())
            .map_err(|t| (t, client_addr, None))?,
    };
    // The client's bytes so far (behind its PROXY header), then its ClientHello.
    let mut early = inbound.as_mut().map_or_else(Vec::new, |i| i.take_rest());
    let mut sni = None;
    let mut pool = settings.pool.as_ref();
    if let Some(router) = &settings.sni {
        let spent = Duration::from_micros(now_us().saturating_sub(start));
        let left = router.timeout.saturating_sub(spent);
        let hello = tokio::select! {
            biased;
            _ = listener.cut.cancelled() => return Err((cut_reason(listener), client_addr, None)),
            r = tokio::time::timeout(left, super::sni::read_hello(client, &mut early)) => {
                r.unwrap_or(Err(HelloError::Timeout))
            }
        };
        let sni_refused = |e: HelloError, pick| {
            debug!(listener = %listener.name, client = %client_addr, error = %e, "closing the connection");
            listener.rejected_sni.fetch_add(1, Ordering::Relaxed);
            (Termination::Sni, client_addr, pick)
        };
        let name = hello.map_err(|e| sni_refused(e, None))?;
        let route = name.as_deref().and_then(|n| router.route(n));
        match route {
            Some(i) => pool = Some(router.take(i)),
            None if router.required || pool.is_none() => {
                let e = HelloError::Unrouted(
                    name.as_deref()
                        .map_or("(none)".into(), |n| format!("{n:?}")),
                );
                return Err(sni_refused(e, Some(Box::new(SniPick { name, route }))));
            }
            None => {}
        }
        sni = Some(Box::new(SniPick { name, route }));
    }
    let send = pool.map_or(SendProxy::Off, |p| p.send_proxy());
    let authority = sni.as_ref().and_then(|p| p.name.as_deref());
    // An error only from a socket gone bad, or a header past 64 KiB (ruled out).
    let prefix = proxy_header::prefix(
        client,
        settings.bind,
        client_addr,
        send,
        inbound,
        early,
        authority.map(str::as_bytes),
    );
    let prefix = match prefix {
        Ok(p) => p,
        Err(e) => return Err((refused(&e), client_addr, sni)),
    };
    Ok(Start {
        client: client_addr,
        source,
        sni,
        prefix,
    })
}

/// Why a session was cut from outside: its listener was removed by a reload
/// (`drained`) or the process stops.
fn cut_reason(listener: &ListenerShared) -> Termination {
    if listener.retired.load(Ordering::Relaxed) {
        Termination::Drained
    } else {
        Termination::Shutdown
    }
}

/// Who the client of an access-log line is: its address (the PROXY header's, when
/// there was one) and, on a listener with `sni_routes`, what its ClientHello said.
#[derive(Clone, Copy)]
struct Client<'a> {
    addr: SocketAddr,
    sni: Option<&'a SniPick>,
}

impl<'a> Client<'a> {
    fn new(addr: SocketAddr, sni: Option<&'a SniPick>) -> Client<'a> {
        Client { addr, sni }
    }
}

/// What a session that reached a backend adds to its access-log line.
struct Connected<'a> {
    backend: &'a Arc<Backend>,
    connect: Duration,
    first_byte: Option<Duration>,
    up: u64,
    down: u64,
}

/// What every TCP access-log line says about the session's start, packed in one
/// word (it lives in every connection's task): the listener's sessions (24 bits),
/// the backend's connections (24 bits, once connected) and failed connect
/// attempts (8 bits). Counts past 2^24 - 1 read as that.
#[derive(Clone, Copy)]
struct At(u64);

impl At {
    const MAX: u64 = (1 << 24) - 1;

    fn new(listener_conns: u32, retries: u8) -> At {
        At((u64::from(listener_conns).min(At::MAX) << 32) | u64::from(retries))
    }

    fn with_retries(self, retries: u8) -> At {
        At(self.0 | u64::from(retries))
    }

    fn with_backend(self, backend_conns: usize) -> At {
        At(self.0 | ((backend_conns as u64).min(At::MAX) << 8))
    }

    fn listener_conns(self) -> u32 {
        (self.0 >> 32) as u32
    }

    fn backend_conns(self) -> u32 {
        ((self.0 >> 8) & At::MAX) as u32
    }

    fn retries(self) -> u32 {
        (self.0 & 0xff) as u32
    }
}

/// Records the end of a session: the duration histogram and the access-log line.
fn finish(
    listener: &ListenerShared,
    settings: &ListenerSettings,
    client: Client<'_>,
    start: u64,
    at: At,
    c: Option<Connected<'_>>,
    end: Termination,
) {
    let duration = Duration::from_micros(now_us().saturating_sub(start));
    listener.session_duration.record(duration);
    if let Some(c) = &c {
        debug!(
            listener = %listener.name,
            client = %client.addr,
            backend = %c.backend.name,
            to_backend = c.up,
            from_backend = c.down,
            reason = end.as_str(),
            "session closed"
        );
    }
    if !listener.ctx.access_log.enabled() {
        return;
    }
    listener.ctx.access_log.log(entry(
        listener,
        settings,
        client,
        at,
        c.as_ref(),
        duration,
        end.as_str(),
    ));
}

/// The access-log line of a client closed at once: `max_connections`
/// (`"rejected"`), or an http listener's source rules (`"acl"`, ...).
pub(crate) fn log_rejected(
    listener: &ListenerShared,
    settings: &ListenerSettings,
    peer: SocketAddr,
    reason: &'static str,
) {
    if listener.ctx.access_log.enabled() {
        let listener_conns = listener.active.load(Ordering::Relaxed) as u32;
        listener.ctx.access_log.log(entry(
            listener,
            settings,
            Client::new(peer, None),
            At::new(listener_conns, 0),
            None,
            Duration::ZERO,
            reason,
        ));
    }
}

/// A TCP access-log entry; `c` when a backend was connected.
fn entry(
    listener: &ListenerShared,
    settings: &ListenerSettings,
    client: Client<'_>,
    at: At,
    c: Option<&Connected<'_>>,
    duration: Duration,
    reason: &'static str,
) -> Entry {
    let sni = client.sni;
    let pool = match (sni.and_then(|p| p.route), &settings.sni) {
        (Some(i), Some(router)) => router.pool(i).name.clone(),
        _ => settings.pool_name().into(),
    };
    Entry {
        time: SystemTime::now(),
        protocol: "tcp",
        listener: listener.name.clone(),
        client: client.addr,
        pool,
        backend: c.map(|c| c.backend.name.clone()),
        backend_addr: c.map(|c| c.backend.addr),
        retries: at.retries(),
        listener_conns: at.listener_conns(),
        backend_conns: if c.is_some() { at.backend_conns() } else { 0 },
        to_backend: c.map_or(0, |c| c.up),
        from_backend: c.map_or(0, |c| c.down),
        connect: c.map(|c| c.connect),
        first_byte: c.and_then(|c| c.first_byte),
        duration,
        reason,
        sni: sni.and_then(|p| p.name.clone()),
        http: None,
    }
}

/// Connects to a backend of `pool`, moving on to the next distinct one on failure, up to the
/// pool's `connect_attempts`; says how many attempts failed. A `prefix` is written
/// to the backend as part of the attempt, so a backend that fails to take it is
/// a failed attempt, and the next one gets it whole.
pub(super) async fn connect(
    listener: &ListenerShared,
    settings: &ListenerSettings,
    pool: Option<&Arc<Pool>>,
    peer: SocketAddr,
    prefix: Option<Prefix>,
) -> Result<(TcpStream, ActiveGuard, u8), (Termination, u8)> {
    let prefix = prefix.as_ref().map_or(&[][..], |p| &p.bytes[..]);
    let Some(pool) = pool else {
        return Err((Termination::NoBackend, 0));
    };
    let attempts = pool.connect_attempts();
    let mut tried: Vec<Arc<Backend>> = Vec::new();
    for _ in 0..attempts {
        let guard = match pool.acquire(peer.ip(), None, &tried).await {
            Ok(g) => g,
            Err(NoSlot::NoBackend) => break,
            Err(NoSlot::Full) => return Err((Termination::BackendsFull, tried.len() as u8)),
            Err(NoSlot::QueueTimeout) => {
                return Err((Termination::QueueTimeout, tried.len() as u8))
            }
        };
        let b = guard.backend();
        let from = match Origin::of(pool, peer.ip(), b.addr) {
            Some(from) => from,
            None => {
                // Not the backend's fault: no passive failure, the next pick.
                debug!(pool = %pool.name, backend = %b.name, client = %peer, "source = \"client\": the client's IP family is not the backend's");
                tried.push(b.clone());
                continue;
            }
        };
        let t0 = Instant::now();
        match connect_one(b.addr, from, settings.connect_timeout, prefix).await {
            Ok(stream) => {
                let took = t0.elapsed();
                b.stats.connections.fetch_add(1, Ordering::Relaxed);
                b.histograms.connect.record(took);
                return Ok((stream, guard, tried.len() as u8));
            }
            Err(e) => {
                debug!(pool = %pool.name, backend = %b.name, error = %e, "connect failed");
                b.stats.connect_error(ConnectError::classify(&e));
            }
        }
        passive_failure(pool, b, &listener.ctx.control);
        tried.push(b.clone());
    }
    let retries = tried.len() as u8;
    Err((
        if tried.is_empty() {
            Termination::NoBackend
        } else {
            Termination::ConnectFailed
        },
        retries,
    ))
}

/// Where a backend connection comes from: the pool's `source`.
#[derive(Clone, Copy)]
enum Origin {
    /// An address of this host (`None`: the kernel's choice).
    Host(Option<std::net::IpAddr>),
    /// `source = "client"`: the client's address (the PROXY header's, with
    /// `accept_proxy`), any port.
    Client(std::net::IpAddr),
}

impl Origin {
    /// The source for a connection from `client` to `backend` in `pool`; `None`
    /// when the pool connects from the client but the families differ (no route
    /// could bring the backend's reply back to an address of the other family).
    fn of(pool: &Pool, client: std::net::IpAddr, backend: SocketAddr) -> Option<Origin> {
        if !pool.transparent() {
            return Some(Origin::Host(pool.source()));
        }
        // A v4 address written as ::ffff:a.b.c.d (a PROXY header may) is v4.
        let client = client.to_canonical();
        (client.is_ipv4() == backend.is_ipv4()).then_some(Origin::Client(client))
    }
}

/// One connect attempt within `timeout`, `prefix` written once connected (a fresh
/// socket takes a few KiB at once). Running out of descriptors is our problem, not
/// the backend's: it pauses and tries the same backend again, within the same
/// timeout.
async fn connect_one(
    addr: SocketAddr,
    from: Origin,
    timeout: Duration,
    prefix: &[u8],
) -> io::Result<TcpStream> {
    let attempt = async {
        loop {
            let r = match (from, prefix.is_empty()) {
                (Origin::Host(source), true) => crate::proxy::connect_tcp(addr, source).await,
                (Origin::Client(ip), true) => crate::proxy::connect_from(addr, ip, true).await,
                (Origin::Host(source), false) => {
                    crate::proxy::connect_with(addr, source.map(|ip| (ip, false)), prefix).await
                }
                (Origin::Client(ip), false) => {
                    crate::proxy::connect_with(addr, Some((ip, true)), prefix).await
                }
            };
            match r {
                Ok(s) => {
                    crate::fd::available();
                    return Ok(s);
                }
                Err(e) if crate::fd::is_exhaustion(&e) => {
                    crate::fd::exhausted("backend connect", &e);
                    tokio::time::sleep(crate::fd::PAUSE).await;
                }
                Err(e) => return Err(e),
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}
