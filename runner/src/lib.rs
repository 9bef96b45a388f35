//! The runner library: CLI-independent parts of the runner (suite files, planning, reporting).

pub mod backoff;
pub mod capacity;
pub mod cli;
pub mod commands;
pub mod events;
pub mod exit;
pub mod github;
pub mod gitlab;
pub mod mask;
pub mod matrix;
pub mod net;
pub mod outcome;
pub mod report;
pub mod run;
pub mod serve;
pub mod snapshot;
pub mod snapshot_archive;
pub mod sources;
pub mod suite;
pub mod terminal;
pub mod text;
