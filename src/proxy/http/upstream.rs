//! Upstream HTTP connections, pooled per backend and reused.
//!
//! A backend object belongs to one pool, so keying by backend keeps pools from
//! ever sharing a connection. HTTP/1.1 connections wait idle in a LIFO list (at
//! most the pool's `max_idle_per_backend`) and go back to it only once their
//! response ended cleanly; one HTTP/2 connection per backend carries every h2c
//! request. A connection's driver task runs on the worker that opened it, until
//! the connection closes or the instance stops. Built on `hyper::client::conn`
//! rather than hyper-util's pooled client: a request must move to another backend
//! when a connect fails, and hyper-util's client consumes the request then.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::request_body::UpBody;
use crate::backend::Backend;

/// Which HTTP version a request goes upstream in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http1,
    H2c,
}

/// A connection ready for one request.
#[derive(Debug)]
pub enum Sender {
    Http1(http1::SendRequest<UpBody>),
    H2(http2::SendRequest<UpBody>),
}

/// Every backend's pooled connections, for one instance.
pub struct Upstreams {
    backends: Mutex<HashMap<u64, Arc<BackendConns>>>,
    /// Where connection drivers run, and what ends them all at stop.
    drivers: TaskTracker,
    stop: CancellationToken,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct BackendConns {
    idle: Mutex<Vec<http1::SendRequest<UpBody>>>,
    h2: Mutex<Option<http2::SendRequest<UpBody>>>,
}

impl Upstreams {
    pub fn new() -> Arc<Upstreams> {
        Arc::new(Upstreams {
            backends: Mutex::new(HashMap::new()),
            drivers: TaskTracker::new(),
            stop: CancellationToken::new(),
        })
    }

    fn conns(&self, b: &Backend) -> Arc<BackendConns> {
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(b.id).or_default().clone()
    }

    /// A pooled connection to `b` that is ready for a request, if one is.
    pub async fn pooled(&self, b: &Backend, v: Version) -> Option<Sender> {
        let conns = self.conns(b);
        match v {
            Version::Http1 => loop {
                let next = conns.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let mut s = next?;
                if s.is_closed() {
                    continue;
                }
                // Ready at once unless it is still finishing its last exchange.
                if s.ready().await.is_ok() {
                    return Some(Sender::Http1(s));
                }
            },
            Version::H2c => {
                let mut h2 = conns.h2.lock().unwrap_or_else(|e| e.into_inner());
                match h2.as_ref() {
                    Some(s) if !s.is_closed() => Some(Sender::H2(s.clone())),
                    _ => {
                        *h2 = None;
                        None
                    }
                }
            }
        }
    }

    /// Opens a connection to `b` within `timeout`, from `source` when its pool sets one.
    pub async fn connect(
        &self,
        b: &Backend,
        source: Option<std::net::IpAddr>,
        v: Version,
        timeout: Duration,
    ) -> io::Result<Sender> {
        let tcp = connect_tcp(b.addr, source, timeout).await?;
        let io = TokioIo::new(tcp);
        let stop = self.stop.clone();
        let name = b.name.clone();
        match v {
            Version::Http1 => {
                let (sender, conn) = http1::Builder::new()
                    .handshake::<_, UpBody>(io)
                    .await
                    .map_err(io::Error::other)?;
                self.drivers.spawn(async move {
                    tokio::select! {
                        r = conn.with_upgrades() => if let Err(e) = r {
                            debug!(backend = %name, error = %e, "upstream connection ended");
                        },
                        _ = stop.cancelled() => {}
                    }
                });
                Ok(Sender::Http1(sender))
            }
            Version::H2c => {
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .handshake::<_, UpBody>(io)
                    .await
                    .map_err(io::Error::other)?;
                self.drivers.spawn(async move {
                    tokio::select! {
                        r = conn => if let Err(e) = r {
                            debug!(backend = %name, error = %e, "upstream h2 connection ended");
                        },
                        _ = stop.cancelled() => {}
                    }
                });
                let conns = self.conns(b);
                *conns.h2.lock().unwrap_or_else(|e| e.into_inner()) = Some(sender.clone());
                Ok(Sender::H2(sender))
            }
        }
    }

    /// Takes back an HTTP/1.1 connection whose exchange ended cleanly, unless the
    /// backend no longer takes requests or `max_idle` are waiting already.
    pub fn put_back(&self, b: &Backend, s: http1::SendRequest<UpBody>, max_idle: usize) {
        if s.is_closed() || !b.is_admin_usable() {
            return;
        }
        let conns = self.conns(b);
        let mut idle = conns.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < max_idle {
            idle.push(s);
        }
    }

    /// Closes the idle connections of backends not in `live` (ids), and those of
    /// backends that take no new requests (draining, disabled): a drained backend's
    /// pooled connections close.
    pub fn retain(&self, live: &[Arc<Backend>]) {
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|id, _| live.iter().any(|b| b.id == *id && b.is_admin_usable()));
    }

    /// Closes `b`'s idle connections (it drains, or was disabled).
    pub fn forget(&self, b: &Backend) {
        self.backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&b.id);
    }

    /// Closes every upstream connection (the instance stops).
    pub fn close(&self) {
        self.stop.cancel();
        self.backends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// A TCP connection to `addr` (from `source`, if set) with TCP_NODELAY, within
/// `timeout`.
async fn connect_tcp(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let s = match tokio::time::timeout(timeout, crate::proxy::connect_tcp(addr, source)).await {
        Ok(r) => r?,
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    };
    s.set_nodelay(true)?;
    Ok(s)
}
