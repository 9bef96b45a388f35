//! What every job of one `[[runners]]` entry shares. A leaf below `service` (which builds it),
//! `run` and `artifacts` (which use it), so that neither of those imports the other for it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;

use serde_json::Value;

use super::client::Client;
use super::config::RunnerEntry;
use crate::serve::ServeContext;

#[derive(Debug)]
pub struct EntryContext {
    pub entry: RunnerEntry,
    pub client: Client,
    /// The runner's `info` object, sent with every request.
    pub info: Value,
    pub serve: ServeContext,
    /// `GIT_STRATEGY: fetch` directories in use by a running job (see `run::checkout_dir`).
    pub fetch_dirs: Mutex<HashSet<PathBuf>>,
}
