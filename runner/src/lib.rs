//! The runner library: CLI-independent parts of the runner (suite files, planning, reporting).

pub mod capacity;
pub mod cli;
pub mod commands;
pub mod events;
pub mod execute;
pub mod exit;
pub mod github;
pub mod gitlab;
pub mod host;
pub mod matrix;
pub mod outcome;
pub mod plan;
pub mod report;
pub mod serve;
pub mod sources;
pub mod suite;
pub mod transfer;
pub mod workspace;
