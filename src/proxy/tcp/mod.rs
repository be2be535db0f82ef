//! TCP: listening sockets, accept loops and one session per client.
//!
//! Where a byte flows: [`accept_loop`] (a place under `max_connections`) ->
//! [`serve`]: with `accept_proxy`, the peer's PROXY header ([`proxy_header`]) ->
//! with `sni_routes`, the client's ClientHello and the pool its SNI picks ([`sni`]) ->
//! the listener's source rules ([`sources`]) ->
//! pick a backend and connect, with retries, writing a `send_proxy` header first
//! ([`session`]) -> pump both
//! directions ([`transfer`], with [`pump`]: splice(2) on Linux for bulk, a
//! per-thread buffer for small messages) -> account (backend counters as bytes
//! move; histograms and the access log at the end) -> close.
//!
//! [`ListenerShared`] is what a listener's sessions share: its settings (swapped
//! whole by a reload), its counters, and the tokens that stop it.

#[doc(hidden)]
pub mod bench_api;
mod listener;
#[cfg(target_os = "linux")]
mod pipe;
mod proxy_header;
mod pump;
mod session;
mod shared;
pub mod sni;
pub mod sources;
mod transfer;

pub use listener::{accept_loop, bind};
pub use proxy_header::probe_header;
pub(crate) use session::log_rejected;
pub use session::serve;
pub(crate) use shared::Place;
pub use shared::{ListenerSettings, ListenerShared, Pools};

#[cfg(test)]
mod tests;
