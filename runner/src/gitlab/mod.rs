//! GitLab intake: `runner serve` acting as a GitLab runner. Each `[[runners]]` entry polls
//! its GitLab for jobs, runs each in a fresh VM and reports log, state and artifacts back.
//!
//! - `config` — the `[[runners]]` entry (gitlab-runner's keys plus ours)
//! - `service` — verify, the poll loop, limits, `system_id`
//! - `run` — one job: payload → plan → sources → VM → artifacts → final state
//! - `prepare` — a job payload becomes a `SuitePlan` (arch/image, variables, steps)
//! - `reporter` — run events as job log text
//! - `job` — payload types and variable expansion
//! - `entry` — what every job of one entry shares (client, info, scheduler, fetch dirs)
//! - `script` — step lines as a bash script, echoed like gitlab-runner's shell executor
//! - `trace` — the job log (masking, `output_limit`, crc32) and its uploader
//! - `artifacts` — JUnit (gzip) and archive (zip) uploads
//! - `dependencies` — earlier jobs' artifacts, downloaded into the workspace
//! - `cache` — `cache:` archives kept on this host, restored and saved per job
//! - `unzip` — a zip from GitLab unpacked safely into a workspace
//! - `workspace` — caches and earlier jobs' artifacts in, caches out, around the script
//! - `client` — the REST API and the retry backoff

pub mod artifacts;
pub mod cache;
pub mod client;
pub mod config;
pub mod dependencies;
pub mod entry;
pub mod job;
pub mod prepare;
pub mod reporter;
pub mod run;
pub mod s3cache;
pub mod script;
pub mod service;
pub mod trace;
pub mod unzip;
pub mod workspace;

pub use config::RunnerEntry;
pub use service::serve;
