//! End-to-end tests: real service processes (and in-process services for direct
//! protocol tests) on ephemeral loopback ports.

mod atomic;
mod cli;
mod dashboard;
mod delta;
mod expiry;
mod faults;
mod health;
mod helpers;
mod hostile;
mod incremental;
mod instances;
mod mirror;
mod monitor;
mod observability;
mod outcomes;
#[path = "../common/postgres.rs"]
mod postgres;
mod protocol;
mod safety;
mod security;
mod service;
mod triggers;
mod wan;
