//! flowgate: a Layer 4 TCP load balancer.
//!
//! # Layout
//! Where a byte flows: accept ([`listener`]) -> pick a backend ([`pool`], [`balance`])
//! -> connect and move bytes ([`proxy`]) -> account in [`backend`] -> close.
//!
//! - [`config`]: the TOML schema, parsing, validation, errors with line and column.
//! - [`runtime`]: worker threads, startup, graceful shutdown.
//! - [`listener`]: listening sockets (SO_REUSEPORT per worker), accept loops.
//! - [`fd`]: the process-wide "out of file descriptors" episode.
//! - [`pool`]: a pool's backends and selector as one lock-free snapshot.
//! - [`balance`]: the selection algorithms, one file each, behind one trait.
//! - [`backend`]: per-backend state (up/down/draining/disabled) and counters.
//! - [`health`]: active probes (tcp, http) and the rise/fall verdict.
//! - [`admin`]: the JSON admin API (hyper), /healthz, /metrics and the status page.
//! - [`metrics`]: Prometheus metrics: exact atomics on the data path, exported at
//!   scrape time.
//! - [`access_log`]: one line per finished connection, written off the data path.
//! - [`proxy`]: one session: connect with retries, splice/copy both ways, half-close,
//!   reset propagation, idle timeout.

pub mod access_log;
pub mod admin;
pub mod backend;
pub mod balance;
pub mod config;
pub mod fd;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod runtime;

pub use config::Config;
pub use runtime::{Flowgate, OpError, ReloadError, StartError};
