//! `runner matrix`: many suites × architectures × images in parallel, compared with the
//! previous run, reported as JUnit, JSON, Markdown and one HTML page.
//!
//! The pieces, in the order data flows through them:
//! - [`spec`]: the matrix file and its expansion into cells (include / exclude);
//! - [`shard`]: with `--shard K/N`, the part of the cells this host runs (split by their
//!   durations in the history);
//! - [`fit`]: how many cells at once and how many vCPUs each, when the user did not say;
//! - [`run`]: images prepared once, cells scheduled up to `--jobs`, retries, cancellation;
//!   [`attempt`] records each attempt from the run's events and merges attempts (flaky);
//!   [`progress`] draws it live;
//! - [`results`]: the run as data — exactly `results.json`;
//! - [`merge`]: the shards' `shard.json` put back together into the run an unsharded
//!   matrix would have had;
//! - [`history`] and [`classify`]: earlier runs, what changed, the exit status;
//! - [`report`]: junit.xml, results.json, summary.md, index.html.

pub mod attempt;
pub mod classify;
pub mod fit;
pub mod history;
pub mod merge;
pub mod progress;
pub mod render;
pub mod results;
pub mod run;
pub mod shard;
pub mod spec;
