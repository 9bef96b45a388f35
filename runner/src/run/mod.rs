//! One run of one suite on one architecture, in the order its data flows:
//! `plan` (suite file / command → `SuitePlan`) → `platform` (QEMU, accelerator, base image)
//! → `workspace` (pack the host workspace) → `execute` (boot, steps, outcomes, events)
//! → `transfer` (files into and out of the guest). Every front end — `runner test`, the
//! matrix, GitLab jobs, GitHub check runs — hands a `SuitePlan` to `execute::run_suite`.

pub mod execute;
mod guest;
pub mod plan;
pub mod platform;
pub mod transfer;
pub mod workspace;
