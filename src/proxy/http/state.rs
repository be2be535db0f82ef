//! What one client connection's requests share with its socket wrapper.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::proxy::tcp::{ListenerShared, Place};

/// What a connection's requests and its socket wrapper share.
#[derive(Debug, Default)]
pub struct ConnState {
    /// Requests whose response has not ended.
    pub in_flight: AtomicU32,
    /// Request heads received so far.
    pub requests: AtomicU64,
    /// When the last response ended (microseconds, [`crate::proxy::now_us`]).
    pub idle_since: AtomicU64,
    /// The client speaks HTTP/2.
    pub h2: AtomicBool,
    /// The number (from 1) of the first head that carried both Content-Length
    /// and Transfer-Encoding, 0 if none (hyper drops the length and goes on;
    /// flowgate refuses that request). See [`super::scan`].
    pub bad_head: AtomicU64,
}

impl ConnState {
    /// A request head arrived.
    pub fn begin(&self) {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    /// A response ended (or was dropped).
    pub fn end(&self) {
        self.idle_since
            .store(crate::proxy::now_us(), Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Per-connection facts every request of it needs.
#[derive(Debug)]
pub struct ConnCtx {
    pub listener: Arc<ListenerShared>,
    pub peer: SocketAddr,
    pub state: Arc<ConnState>,
    /// The connection's place under `max_connections`: held until the last
    /// request (or a WebSocket tunnel after it) lets go.
    pub _place: Place,
}
