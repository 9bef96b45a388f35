//! A `[[runners]]` entry of the serve config: gitlab-runner's keys (`name`, `url`, `token`,
//! `limit`, `request_concurrency`, `output_limit`) with their meaning, plus ours: which
//! architectures and images this entry runs, and the VM size.

use std::time::Duration;

use serde::Deserialize;

use crate::serve::config::{de_arch, de_arches};
use crate::serve::{Limits, LimitsConfig};

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
    /// Default guest architecture for this entry's jobs.
    #[serde(deserialize_with = "de_arch")]
    pub arch: engine::Arch,
    /// Default base image (recipe name) for this entry's jobs; unset: each architecture's
    /// own default (debian-13, or debian-12 where trixie lacks the architecture).
    #[serde(default)]
    pub image: Option<String>,
    /// Architectures a job may pick with the `RUNNER_ARCH` variable (default: only `arch`).
    #[serde(default, deserialize_with = "de_arches")]
    pub allowed_arches: Vec<engine::Arch>,
    /// Images a job may pick with the `RUNNER_IMAGE` variable (default: only `image`).
    #[serde(default)]
    pub allowed_images: Vec<String>,
    /// vCPUs per job VM.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Guest memory per job VM, e.g. "1G" or "512M" (counts against the host's VM budget).
    #[serde(default = "default_memory")]
    pub memory: String,
    /// Seconds a git checkout on the host may take.
    #[serde(default = "default_clone_timeout")]
    pub clone_timeout: u64,
    /// Add the runner's own step-level JUnit report to every job's uploads (a job can also
    /// ask for it with `RUNNER_STEP_JUNIT=true`).
    #[serde(default)]
    pub step_junit: bool,
    /// Transports git may fetch with (`GIT_ALLOW_PROTOCOL`); a local path counts as "file".
    #[serde(default = "default_protocols")]
    pub git_protocols: Vec<String>,
    /// Disk for this entry's `cache:` archives (all projects), e.g. "2G"; the least recently
    /// used go first.
    #[serde(default = "default_cache_max_size")]
    pub cache_max_size: String,
    /// `[runners.cache]`: the shared cache in an S3-compatible store (gitlab-runner's keys);
    /// without it, caches stay on this host.
    #[serde(default)]
    pub cache: Option<super::s3cache::CacheConfig>,
    /// The most network a job may ask for with `RUNNER_NETWORK` (`none`, `proxy`, `full`).
    #[serde(default, deserialize_with = "crate::net::de_network")]
    pub network: crate::net::NetworkMode,
    /// Hosts the proxy lets through (`host` or `host:port`); default: the image recipe's
    /// Debian mirror host.
    #[serde(default, deserialize_with = "crate::net::de_allowed_hosts")]
    pub allowed_hosts: Option<crate::net::Allowlist>,
    /// Caps on what a job may ask for (`[runners.limits]`), as written.
    #[serde(default, rename = "limits")]
    pub limits_config: LimitsConfig,
    /// The validated caps (set by [`RunnerEntry::check`]).
    #[serde(skip)]
    pub limits: Limits,
    /// Set from the top-level `check_interval`: seconds between job requests when idle.
    #[serde(skip, default = "default_check_interval")]
    pub check_interval: Duration,
}

impl RunnerEntry {
    /// Architectures jobs of this entry may run on (the default one first).
    pub fn arches(&self) -> Vec<engine::Arch> {
        let mut v = vec![self.arch];
        v.extend(self.allowed_arches.iter().filter(|a| **a != self.arch));
        v
    }

    /// The image a job on `arch` gets when it names none.
    pub fn default_image(&self, arch: engine::Arch) -> String {
        self.image
            .clone()
            .unwrap_or_else(|| arch.default_image().to_string())
    }

    /// Images jobs of this entry may use on `arch` (its default one first).
    pub fn images_for(&self, arch: engine::Arch) -> Vec<String> {
        let default = self.default_image(arch);
        let mut v = vec![default.clone()];
        v.extend(
            self.allowed_images
                .iter()
                .filter(|i| **i != default)
                .cloned(),
        );
        v
    }

    /// Every image a job of this entry may use, on any of its architectures.
    pub fn images(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for arch in self.arches() {
            for image in self.images_for(arch) {
                if !v.contains(&image) {
                    v.push(image);
                }
            }
        }
        v
    }

    /// Guest memory in MiB, or why `memory` is not a size.
    pub fn memory_mib(&self) -> Result<u32, String> {
        engine::size::Memory::parse(&self.memory)
            .map(|m| m.mib())
            .map_err(|e| format!("runner '{}': memory '{}': {e}", self.name, self.memory))
    }

    /// Checks what serde could not and fills in [`RunnerEntry::limits`].
    pub fn check(&mut self) -> Result<(), String> {
        self.memory_mib()?;
        self.cache_max_bytes()?;
        if let Some(c) = &self.cache {
            c.check(&self.name)?;
        }
        let section = format!("runner '{}' limits", self.name);
        let github_only = self.limits_config.github_only_keys();
        if !github_only.is_empty() {
            return Err(format!(
                "{section}: {} apply only to [github.limits]; a GitLab job's VM has this entry's cpus and memory",
                github_only.join(", ")
            ));
        }
        self.limits = self.limits_config.validate(&section)?;
        self.limits.network = self.network;
        self.limits.allowed_hosts = self.allowed_hosts.clone();
        crate::sources::check_protocols(&format!("runner '{}'", self.name), &self.git_protocols)
    }

    /// `cache_max_size` in bytes, or why it is not a size.
    pub fn cache_max_bytes(&self) -> Result<u64, String> {
        match engine::size::parse_size(&self.cache_max_size) {
            Ok(b) if b > 0 => Ok(b),
            _ => Err(format!(
                "runner '{}': cache_max_size '{}' is not a size like \"2G\" or \"512M\"",
                self.name, self.cache_max_size
            )),
        }
    }

    /// The log cap in bytes.
    pub fn output_limit_bytes(&self) -> usize {
        (self.output_limit.max(1) as usize).saturating_mul(1024)
    }
}

fn one() -> usize {
    1
}
fn default_output_limit() -> u64 {
    4096
}
fn default_cache_max_size() -> String {
    "2G".into()
}
fn default_cpus() -> u32 {
    crate::run::plan::DEFAULT_CPUS
}
fn default_memory() -> String {
    "1G".into()
}
fn default_clone_timeout() -> u64 {
    600
}
fn default_protocols() -> Vec<String> {
    crate::sources::DEFAULT_PROTOCOLS.map(String::from).to_vec()
}
fn default_check_interval() -> Duration {
    Duration::from_secs(3)
}

#[cfg(test)]
mod tests {
    fn parse(extra: &str) -> Result<crate::serve::ServeConfig, String> {
        crate::serve::ServeConfig::parse(
            std::path::Path::new("serve.toml"),
            &format!("[[runners]]\nname = \"r\"\nurl = \"http://x\"\ntoken = \"t\"\narch = \"riscv64\"\n{extra}"),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn cache_max_size_is_a_size() {
        let c = parse("").unwrap();
        assert_eq!(c.runners[0].cache_max_bytes(), Ok(2 << 30));
        let c = parse("cache_max_size = \"100K\"").unwrap();
        assert_eq!(c.runners[0].cache_max_bytes(), Ok(100 << 10));
        // Not a size, or nothing.
        for bad in ["\"lots\"", "\"0\""] {
            let e = parse(&format!("cache_max_size = {bad}")).unwrap_err();
            assert!(e.contains("runner 'r': cache_max_size"), "{bad}: {e}");
        }
    }

    #[test]
    fn runners_cache_is_gitlab_runners_section() {
        let c = parse(
            "[runners.cache]\nType = \"s3\"\nShared = true\n[runners.cache.s3]\n\
             ServerAddress = \"127.0.0.1:9000\"\nBucketName = \"b\"\nAccessKey = \"a\"\n\
             SecretKey = \"s\"\nInsecure = true\n",
        )
        .unwrap();
        let cache = c.runners[0].cache.as_ref().unwrap();
        assert!(cache.shared && cache.s3.as_ref().unwrap().insecure);
        // Checked at load, naming the key.
        let e =
            parse("[runners.cache]\nType = \"s3\"\n[runners.cache.s3]\nServerAddress = \"h\"\n")
                .unwrap_err();
        assert!(
            e.contains("[runners.cache.s3] BucketName is missing"),
            "{e}"
        );
        let e = parse("[runners.cache]\nType = \"s3\"\nBucket = \"b\"\n").unwrap_err();
        assert!(e.contains("Bucket"), "{e}");
    }
}
