//! Prometheus metrics, served as `GET /metrics` by the admin API.
//!
//! - [`names`]: the metric names (the user contract), a leaf every layer may use.
//! - [`export`]: one instance's recorder and the scrape, which reads an
//!   [`Inventory`] of listeners, pools and counters that the runtime hands it.
//!
//! The data path only bumps atomics in the objects it owns; nothing below the
//! control plane imports the exporter.

mod export;
pub mod names;

pub use export::{Exporter, Inventory, ReloadStats, UPKEEP_EVERY};
