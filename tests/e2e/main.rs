//! End-to-end tests: real service processes (and in-process services for direct
//! protocol tests) on ephemeral loopback ports.

mod dashboard;
mod expiry;
mod faults;
mod helpers;
mod hostile;
mod incremental;
mod instances;
mod mirror;
mod monitor;
mod observability;
mod protocol;
mod security;
mod triggers;
