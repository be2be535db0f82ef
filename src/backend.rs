//! Backend state shared by every connection and every pool snapshot: identity,
//! address, weight, state and the live connection count.
//!
//! A `Backend` is created once per configured address and kept behind an `Arc`, so
//! pool snapshots can be rebuilt (reload, weight change) without resetting counters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::config::BackendConfig;

/// Whether a backend takes new connections. Only `Up` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BackendState {
    Up = 0,
    Down = 1,
    Draining = 2,
    Disabled = 3,
}

impl BackendState {
    fn from_u8(v: u8) -> BackendState {
        match v {
            0 => BackendState::Up,
            1 => BackendState::Down,
            2 => BackendState::Draining,
            _ => BackendState::Disabled,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Up => "up",
            BackendState::Down => "down",
            BackendState::Draining => "draining",
            BackendState::Disabled => "disabled",
        }
    }
}

#[derive(Debug)]
pub struct Backend {
    /// The address as written in the config: identity for logs, hashing and the API.
    pub name: String,
    pub addr: SocketAddr,
    weight: AtomicU32,
    state: AtomicU8,
    /// Connections picked for this backend and not yet closed (including those still
    /// connecting), so least-connections sees a connect in progress.
    active: AtomicUsize,
}

impl Backend {
    pub fn new(cfg: &BackendConfig) -> Arc<Backend> {
        Arc::new(Backend {
            name: cfg.name.clone(),
            addr: cfg.addr,
            weight: AtomicU32::new(cfg.weight),
            state: AtomicU8::new(BackendState::Up as u8),
            active: AtomicUsize::new(0),
        })
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn state(&self) -> BackendState {
        BackendState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Sets the state; returns whether it changed, so a flip is logged once.
    pub fn set_state(&self, s: BackendState) -> bool {
        self.state.swap(s as u8, Ordering::AcqRel) != s as u8
    }

    pub fn is_usable(&self) -> bool {
        self.state() == BackendState::Up
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a connection against this backend until the guard drops.
    pub fn claim(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }
}

/// One counted connection on a backend.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Backend>);

impl ActiveGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}
