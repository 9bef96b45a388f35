//! `runner serve`: the long-running service. GitLab pollers and the GitHub webhook server
//! turn outside jobs into suite plans; one scheduler decides when each may start a VM; one
//! shutdown signal tells every service to drain or abort.

pub mod config;
pub mod http;
pub mod limits;
pub mod scheduler;
pub mod shutdown;

use std::sync::Arc;

use crate::run::execute::RunSettings;

pub use config::{ConfigError, ServeConfig};
pub use limits::{Limits, LimitsConfig, OverLimit};
pub use scheduler::{Scheduler, Slot};
pub use shutdown::{Shutdown, ShutdownController};

/// What every service shares: how to run a VM, when it may, and when to stop.
#[derive(Debug, Clone)]
pub struct ServeContext {
    pub settings: RunSettings,
    pub scheduler: Arc<Scheduler>,
    pub shutdown: Shutdown,
}
