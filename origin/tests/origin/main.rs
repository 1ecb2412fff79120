//! The origin's integration tests: one binary, a module per feature, each test starting its own
//! `redis-server`, mock providers and origin on free ports.

mod apis;
mod bad_input;
mod cache;
mod cluster;
mod coalescing;
mod failover;
mod fanout;
mod harness;
mod operations;
mod ops_files;
mod policy;
mod purge;
mod redis_outage;
mod replicas;
mod replication;
mod seal;
mod shutdown;
mod stream_usage;
mod streaming;
mod usage_ingest;
