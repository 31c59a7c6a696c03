//! Integration tests against a real Kafka broker and a real CQL database on loopback.
//!
//! One test binary; each module covers one area and shares `utils`. The servers come from
//! `scripts/stack up`; addresses can be changed with `INFERFLOW_TEST_KAFKA` and
//! `INFERFLOW_TEST_CQL`. A test whose server is unreachable fails with the command to fix it.

// Test helpers are `pub` for sibling modules only, and tests need no API docs.
#![allow(unreachable_pub, missing_docs)]

mod fake_openai;
mod harness;
mod number_cases;
mod utils;

mod exactly_once;
mod feature_ingest;
mod feature_store;
mod http;
mod models;
mod monitoring;
mod numbers;
mod pipelines;
mod process;
mod processor;
mod replay;
mod routing;
mod secure;
mod smoke;
mod sql_store;
mod traces;
