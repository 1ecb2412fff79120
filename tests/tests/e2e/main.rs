//! End-to-end tests: real processes on free ports (Redis, mock provider, origin, Viceroy).
//! One binary, a module per feature. Run with `just test` (which builds the edge wasm first).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is a failed test"
)]

mod apis_client;
mod config;
mod cross_replica;
mod dashboard;
mod distance;
mod dual_write;
mod echo;
mod edge;
mod edge_input;
mod faults;
mod isolation;
mod log_lines;
mod openai_client;
mod regions;
mod replicas;
mod seal;
mod semantic;
mod shared_state;
mod streaming;
mod tenant_policy;
mod tenant_purge;
mod trace;
mod ttl_cap;
mod usage;
mod walk;
