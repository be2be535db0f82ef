//! TCP listening sockets and accept loops.
//!
//! Each worker gets its own socket for a listener (SO_REUSEPORT), so the kernel
//! spreads new connections over workers without a shared accept lock. An accept
//! loop never exits on an error: on EMFILE/ENFILE it pauses ~100 ms (as HAProxy
//! does) so it neither spins nor dies, and resumes by itself; see [`crate::fd`].

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::session;
use super::shared::{ListenerShared, Place};
use crate::fd;

/// Creates a non-blocking listening socket with SO_REUSEADDR and SO_REUSEPORT.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// Accepts until the listener's `stop_accept` fires; every session is spawned on
/// `tracker`.
pub async fn accept_loop(
    listener: std::net::TcpListener,
    shared: Arc<ListenerShared>,
    tracker: TaskTracker,
) {
    let stop = shared.stop_accept.clone();
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(listener = %shared.name, error = %e, "cannot register listening socket");
            return;
        }
    };
    loop {
        // While descriptors are exhausted, take one client per pause: the others wait
        // in the backlog rather than being accepted without a backend socket.
        if fd::is_exhausted() {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(fd::PAUSE) => {}
            }
        }
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                crate::proxy::busy::note_work();
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                let settings = shared.settings();
                if let Some(slot) = Place::take(&shared, settings.max_connections) {
                    if settings.http.is_some() {
                        tracker.spawn(crate::proxy::http::serve(stream, peer, slot, settings));
                    } else {
                        tracker.spawn(async move {
                            session::serve(stream, peer, &slot.0, settings).await
                        });
                    }
                } else {
                    shared
                        .rejected_max_connections
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(listener = %shared.name, client = %peer, "max_connections reached, closing client");
                    reject(stream);
                    session::log_rejected(&shared, &settings, peer, "rejected");
                }
            }
            Err(e) if fd::is_exhaustion(&e) => {
                fd::exhausted("accept", &e);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(fd::PAUSE) => {}
                }
            }
            // ECONNABORTED and friends concern one client only.
            Err(e) => debug!(listener = %shared.name, error = %e, "accept failed"),
        }
    }
    debug!(listener = %shared.name, "accept loop stopped");
}

/// Closes a client we will not serve.
fn reject(stream: TcpStream) {
    drop(stream);
}
