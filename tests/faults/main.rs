//! The fault suite: servers stopped and restarted under load (`broker_outage`, `store_outage`),
//! and `inferflow run` processes killed, stopped and restarted during work and rebalances
//! (`kills`, which leaves the servers alone), against the real broker and
//! database from `scripts/stack`. These tests stop and start the shared servers, so they run in
//! a binary of their own, one test at a time (`scripts/test` runs
//! `cargo test --test faults -- --test-threads=1` after everything else).

// Test helpers are `pub` for sibling modules only, and tests need no API docs.
#![allow(unreachable_pub, missing_docs, dead_code)]

#[path = "../integration/utils.rs"]
mod utils;

#[path = "../integration/harness.rs"]
mod harness;

#[path = "../integration/fake_openai.rs"]
mod fake_openai;

mod broker_outage;
mod kills;
mod pipeline_store_outage;
mod processes;
mod provider_outage;
mod replay_after_crash;
mod servers;
mod store_outage;
