pub mod backend;
pub mod balance;
pub mod config;
