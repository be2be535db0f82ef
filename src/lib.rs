//! flowgate: a Layer 4 TCP/UDP load balancer.
//!
//! # Layout
//! The layers point down; no module imports one above it (`scripts/modcycles.py`
//! fails CI on an import cycle).
//!
//! 1. **config**: [`config`]: the TOML schema, one validation per table, errors
//!    with line and column, and the reload plan ([`config::diff`]).
//! 2. **model**: [`backend`] (state, counters, the drain lifecycle), [`pool`] (a
//!    pool's backends and selector as one lock-free snapshot), [`balance`] (the
//!    selection algorithms, one file each, behind one trait). Beside them, leaves
//!    every layer may use: [`metrics::names`], [`fd`] (the process's "out of file
//!    descriptors" episode), [`tasks`] (tracked background work), [`ids`] (ids for exported objects), [`access_log`]
//!    (one line per finished session, written off the data path to a file, stdout
//!    or syslog).
//! 3. **data path**: [`proxy`]: [`proxy::tcp`] (accept -> pick -> connect ->
//!    splice -> account -> close) and [`proxy::udp`] (receive batch -> session ->
//!    GSO send -> replies -> end).
//! 4. **control**: [`health`] (active probes, rise/fall), [`metrics`] (the
//!    exporter, reading an inventory it is handed), [`runtime`] (threads, startup,
//!    reload as plan-then-execute, drains, operator actions, shutdown), [`admin`]
//!    (the JSON API, /metrics, the status page).
//! 5. **instance**: [`Flowgate`]: a runtime and its admin API; the binary
//!    (`main.rs`) parses the CLI, sets up logging and signals, and runs one.
//!    Beside it, [`upgrade`]: the upgrade socket (single-instance lock, and the
//!    handover of every listening socket to a new binary).

// clippy.toml lists them: no blocking sleep, no untracked spawn in the library.
#![deny(clippy::disallowed_methods)]

pub mod access_log;
pub mod admin;
pub mod backend;
pub mod balance;
pub mod config;
pub mod fd;
pub mod health;
pub mod ids;
mod instance;
pub mod load;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod queue;
pub mod runtime;
pub mod tasks;
pub mod upgrade;

pub use config::Config;
pub use instance::Flowgate;
pub use runtime::{OpError, ReloadError, Runtime, StartError};
