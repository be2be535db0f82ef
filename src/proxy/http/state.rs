//! What one client connection's requests share with its socket wrapper.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;

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
    /// An HTTP/1.1 response asked for the close (or the client did).
    pub close_after: AtomicBool,
    /// Bytes of a new head have started to arrive (its number), so the
    /// connection is not idle although nothing is in flight.
    pub reading: AtomicU64,
    /// How long a write to the client may wait for it to take bytes, in
    /// milliseconds: the `stream_idle_timeout` of the connection's latest routed
    /// request (HTTP/2: the longest of its requests' so far); 0 before one (the
    /// listener's `idle_timeout` then).
    pub write_idle_ms: AtomicU64,
    /// A write to the client waited past that: the response being written ends
    /// as `stream_idle_timeout`, not as the client's abort.
    pub write_stalled: AtomicBool,
    /// A WebSocket handshake succeeded: the upstream side of the tunnel, and its
    /// idle limit.
    upgrade: Mutex<Option<(OnUpgrade, Duration)>>,
}

impl ConnState {
    /// A request head arrived.
    pub fn begin(&self) {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    /// After this response, the client socket becomes a tunnel to `upstream`.
    pub fn upgrade_to(&self, upstream: OnUpgrade, idle: Duration) {
        *self.upgrade.lock().unwrap_or_else(|e| e.into_inner()) = Some((upstream, idle));
    }

    pub fn take_upgrade(&self) -> Option<(OnUpgrade, Duration)> {
        self.upgrade
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Every request since `before` was counted has been answered, and no new
    /// head has started.
    pub fn idle_since_request(&self, before: u64) -> bool {
        let requests = self.requests.load(Ordering::Acquire);
        requests > before
            && self.in_flight.load(Ordering::Acquire) == 0
            && self.reading.load(Ordering::Acquire) <= requests
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
    /// The client's address as an X-Forwarded-For value.
    pub peer_ip: hyper::header::HeaderValue,
    pub state: Arc<ConnState>,
    /// The connection's place under `max_connections`: held until the last
    /// request (or a WebSocket tunnel after it) lets go.
    pub _place: Place,
    /// Its place under `max_connections_per_source`, when counted.
    pub _source: Option<crate::proxy::tcp::sources::SourceGuard>,
}
