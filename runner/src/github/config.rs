//! The `[github]` section of the serve config: the App, its webhook endpoint, defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::serve::config::de_arches;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubConfig {
    /// Address the webhook server listens on, e.g. "0.0.0.0:8080".
    pub listen: SocketAddr,
    #[serde(default = "default_webhook_path")]
    pub webhook_path: String,
    pub app_id: u64,
    /// The App's private key (PEM).
    pub private_key_path: PathBuf,
    pub webhook_secret: Option<String>,
    pub webhook_secret_file: Option<PathBuf>,
    #[serde(default = "default_api_url")]
    pub api_url: String,
    /// Architectures for repositories whose runner.toml names none.
    #[serde(default = "default_arches", deserialize_with = "de_arches")]
    pub arch: Vec<engine::Arch>,
}

fn default_webhook_path() -> String {
    "/github/webhook".into()
}
fn default_api_url() -> String {
    "https://api.github.com".into()
}
fn default_arches() -> Vec<engine::Arch> {
    vec![engine::Arch::Riscv64]
}
