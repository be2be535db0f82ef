//! What starting, reloading and operating on a running balancer can fail with.
//!
//! Each error says its cause in its own text and does not also hand it out as a
//! `source()`, so a printed chain does not repeat it.

use std::io;
use std::net::SocketAddr;

use crate::config::ConfigError;

/// A listening socket that could not be bound (at start or on reload).
#[derive(Debug, thiserror::Error)]
#[error("listener {listener:?}: cannot bind {addr}: {error}")]
pub struct BindError {
    pub listener: String,
    pub addr: SocketAddr,
    pub error: io::Error,
}

/// The access log's file could not be opened, or its syslog socket connected.
#[derive(Debug, thiserror::Error)]
#[error("log.access_log: cannot open {path}: {error}")]
pub struct AccessLogError {
    /// The file's path, or the syslog socket or URL.
    pub path: String,
    pub error: io::Error,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    AccessLog(#[from] AccessLogError),
    #[error("cannot start worker threads: {0}")]
    Workers(io::Error),
    #[error(transparent)]
    Transparent(#[from] crate::proxy::TransparentError),
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    AccessLog(#[from] AccessLogError),
    #[error(transparent)]
    Transparent(#[from] crate::proxy::TransparentError),
    #[error("no configuration file to reload from (started from an in-memory config)")]
    NoSource,
    #[error("shutting down")]
    ShuttingDown,
    #[error("admin.token_file removed while the admin API listens on {0}, which is not loopback (admin.bind changes on restart): keep the token until then")]
    AdminUnprotected(std::net::SocketAddr),
}

/// What an operator action on one backend can fail with.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("no pool named {0:?}")]
    NoPool(String),
    #[error("pool {pool:?} has no backend {backend:?}")]
    NoBackend { pool: String, backend: String },
    #[error("weight {0} is out of range: expected 1..=1000")]
    BadWeight(u32),
    /// A backend to add is not usable (bad address, the listener itself).
    #[error("{0}")]
    BadBackend(String),
    /// The change conflicts with what runs (already there, the pool's last one).
    #[error("{0}")]
    Conflict(String),
    /// Shutting down: nothing changes any more.
    #[error("shutting down")]
    ShuttingDown,
}
