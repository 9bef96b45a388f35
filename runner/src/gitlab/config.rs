//! A `[[runners]]` entry of the serve config: gitlab-runner's keys plus ours (arch, image).

use serde::Deserialize;

use crate::serve::config::de_arch;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunnerEntry {
    /// Shown in logs and sent to GitLab as the runner's name.
    pub name: String,
    /// GitLab's base URL, e.g. https://gitlab.example.com.
    pub url: String,
    /// A `glrt-` runner authentication token (verified at start) or a legacy runner token.
    pub token: String,
    /// Jobs this entry runs at once; 0 = no limit beyond `concurrent` (as gitlab-runner).
    #[serde(default)]
    pub limit: usize,
    /// Job requests in flight at once (gitlab-runner's default: 1).
    #[serde(default = "one")]
    pub request_concurrency: usize,
    /// Log size cap per job, in KiB (gitlab-runner's default: 4096).
    #[serde(default = "default_output_limit")]
    pub output_limit: u64,
    /// Guest architecture for this entry's jobs.
    #[serde(deserialize_with = "de_arch")]
    pub arch: engine::Arch,
    /// Base image (recipe name) for this entry's jobs.
    #[serde(default = "default_image")]
    pub image: String,
}

fn one() -> usize {
    1
}
fn default_output_limit() -> u64 {
    4096
}
fn default_image() -> String {
    crate::plan::DEFAULT_IMAGE.to_string()
}
