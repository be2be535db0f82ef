//! The admin API's accept loop: at most `admin.max_connections` connections (more
//! are closed at accept, so the admin plane never takes the data path's
//! descriptors), a deadline on reading a whole request and on writing a response
//! the client does not read, and an idle limit between requests. Each connection
//! runs on the runtime's control tasks, so shutdown stops and waits for it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{error, handle};
use crate::config::AdminConfig;
use crate::runtime::WeakRuntime;

/// Binds the admin socket without SO_REUSEPORT: a second process on the same
/// address fails to start instead of silently sharing the admin API.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

/// How long one admin connection may live, kept alive or not.
const MAX_AGE: Duration = Duration::from_secs(120);

/// How long a kept-alive connection may sit between requests.
const IDLE: Duration = Duration::from_secs(60);

/// Serves the admin API on `sock` until the balancer is gone or `stop` fires (a
/// binary upgrade: the new process accepts on the same socket; connections open
/// here finish). `cfg` is the `[admin]` the instance started with (its limits
/// only change on restart).
pub async fn run(
    sock: std::net::TcpListener,
    fg: WeakRuntime,
    cfg: AdminConfig,
    stop: CancellationToken,
) {
    let listener = match TcpListener::from_std(sock) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "admin API: cannot register socket");
            return;
        }
    };
    let places = Arc::new(Semaphore::new(cfg.max_connections));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "admin API: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            debug!(client = %peer, max = cfg.max_connections, "admin API: admin.max_connections reached, closing");
            drop(stream);
            continue;
        };
        let Some(control) = fg.upgrade().map(|rt| rt.control().clone()) else {
            return;
        };
        let fg = fg.clone();
        let timeout = cfg.request_timeout;
        let cfg = Arc::new(cfg.clone());
        // Tracked, not dropped at stop: the request in flight is answered first.
        let stopping = control.stop_token().clone();
        control.spawn(async move {
            let _place = place;
            let mut io = TimeoutStream::new(stream);
            // A response the client does not read; a kept-alive connection that
            // says nothing (a request's head has its own, shorter deadline below).
            io.set_write_timeout(Some(timeout));
            io.set_read_timeout(Some(IDLE.max(timeout)));
            let svc = hyper::service::service_fn(move |req| {
                let fg = fg.upgrade();
                let cfg = cfg.clone();
                async move {
                    Ok::<_, Infallible>(match fg {
                        Some(fg) => handle(req, &fg, &cfg).await,
                        None => error(hyper::StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
                    })
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(Box::pin(io)), svc);
            tokio::pin!(conn);
            // A connection gives its place back after MAX_AGE, however it is used:
            // kept-alive clients cannot hold every place (a scraper reconnects).
            // It finishes the request in flight, within `timeout`; so it does when
            // the instance stops (after a binary upgrade, the old process answers
            // what it accepted last, so /healthz never goes unanswered).
            let ended = tokio::select! {
                r = tokio::time::timeout(MAX_AGE, conn.as_mut()) => r.ok(),
                _ = stopping.cancelled() => None,
            };
            let r = match ended {
                Some(r) => r,
                None => {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(timeout, conn.as_mut()).await {
                        Ok(r) => r,
                        Err(_) => Ok(()),
                    }
                }
            };
            if let Err(e) = r {
                debug!(error = %e, "admin API connection");
            }
        });
    }
}
