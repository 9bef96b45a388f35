//! Operator caps on what untrusted input may ask of this host: a repository's runner.toml
//! (GitHub) or a GitLab job payload. `[github.limits]` and `[runners.limits]` in the serve
//! config ([`LimitsConfig`], human-readable sizes and durations) become [`Limits`]; a plan
//! over a cap is refused before anything starts, with a [`OverLimit`] that names the cap, its
//! value and what was asked, so the user sees why in their check run or job log.

use std::time::Duration;

use serde::Deserialize;

use crate::run::plan::SuitePlan;
use engine::size::parse_size;

/// The defaults, documented in the README's serve configuration section.
pub const DEFAULT_MAX_CPUS: u32 = 4;
pub const DEFAULT_MAX_MEMORY: &str = "4G";
pub const DEFAULT_MAX_TIMEOUT: &str = "3h";
pub const DEFAULT_MAX_RUNS: usize = 20;
pub const DEFAULT_MAX_WORKSPACE_SIZE: &str = "1G";
pub const DEFAULT_MAX_ARTIFACTS_SIZE: &str = "256M";
pub const DEFAULT_IMAGE_BUILD_TIMEOUT: &str = "1h";
pub const DEFAULT_MAX_DEPENDENCIES_SIZE: &str = "512M";

/// The `limits` table as written. Every key is optional; unknown keys are errors.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most vCPUs one VM may have.
    pub max_cpus: Option<u32>,
    /// Most guest memory one VM may have ("4G").
    pub max_memory: Option<String>,
    /// Longest suite or job timeout ("3h"); also bounds every step and cleanup step.
    pub max_timeout: Option<String>,
    /// Most suite × architecture runs (check runs, VMs) one GitHub event may start.
    pub max_runs: Option<usize>,
    /// Largest workspace (GitHub: runner.toml's `max_size`; GitLab: the sources) ("1G").
    pub max_workspace_size: Option<String>,
    /// Largest artifacts archive taken back from a guest ("256M").
    pub max_artifacts_size: Option<String>,
    /// Longest a base image build may take before it is stopped ("1h").
    pub image_build_timeout: Option<String>,
    /// GitLab only: most bytes of earlier jobs' artifacts one job may download ("512M").
    pub max_dependencies_size: Option<String>,
}

/// Validated caps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_cpus: u32,
    pub max_memory_mib: u32,
    pub max_timeout: Duration,
    pub max_runs: usize,
    pub max_workspace: u64,
    pub max_artifacts: u64,
    pub image_build_timeout: Duration,
    pub max_dependencies: u64,
    /// The most network a job may get: `network` of the `[[runners]]` entry or `[github]`
    /// (not in the limits table: it is a grant, not a size). `none` unless set.
    pub network: crate::net::NetworkMode,
    /// The proxy's allowlist (`allowed_hosts` next to `network`); `None`: the image
    /// recipe's mirror host.
    pub allowed_hosts: Option<crate::net::Allowlist>,
}

impl Default for Limits {
    fn default() -> Self {
        LimitsConfig::default()
            .validate("limits")
            .expect("the defaults are valid")
    }
}

impl LimitsConfig {
    /// Checks every value; `section` names the table in messages (`[github.limits]`).
    pub fn validate(&self, section: &str) -> Result<Limits, String> {
        let size = |key: &str, value: &Option<String>, default: &str| {
            let text = value.as_deref().unwrap_or(default);
            match parse_size(text) {
                Ok(b) if b > 0 => Ok(b),
                _ => Err(format!(
                    "{section} {key} '{text}' is not a size like \"1G\" or \"512M\""
                )),
            }
        };
        let duration = |key: &str, value: &Option<String>, default: &str| {
            let text = value.as_deref().unwrap_or(default);
            match humantime::parse_duration(text) {
                Ok(d) if !d.is_zero() && d <= crate::suite::MAX_DURATION => Ok(d),
                _ => Err(format!(
                    "{section} {key} '{text}' is not a duration between 1s and 7 days, like \"3h\""
                )),
            }
        };
        let max_cpus = self.max_cpus.unwrap_or(DEFAULT_MAX_CPUS);
        if !(1..=64).contains(&max_cpus) {
            return Err(format!("{section} max_cpus is {max_cpus}; give 1 to 64"));
        }
        let memory = size("max_memory", &self.max_memory, DEFAULT_MAX_MEMORY)?;
        if !(128 << 20..=1 << 40).contains(&memory) {
            return Err(format!("{section} max_memory must be between 128M and 1T"));
        }
        let max_runs = self.max_runs.unwrap_or(DEFAULT_MAX_RUNS);
        if max_runs == 0 {
            return Err(format!("{section} max_runs must be at least 1"));
        }
        Ok(Limits {
            max_cpus,
            max_memory_mib: (memory >> 20) as u32,
            max_timeout: duration("max_timeout", &self.max_timeout, DEFAULT_MAX_TIMEOUT)?,
            max_runs,
            max_workspace: size(
                "max_workspace_size",
                &self.max_workspace_size,
                DEFAULT_MAX_WORKSPACE_SIZE,
            )?,
            max_artifacts: size(
                "max_artifacts_size",
                &self.max_artifacts_size,
                DEFAULT_MAX_ARTIFACTS_SIZE,
            )?,
            image_build_timeout: duration(
                "image_build_timeout",
                &self.image_build_timeout,
                DEFAULT_IMAGE_BUILD_TIMEOUT,
            )?,
            max_dependencies: size(
                "max_dependencies_size",
                &self.max_dependencies_size,
                DEFAULT_MAX_DEPENDENCIES_SIZE,
            )?,
            network: crate::net::NetworkMode::None,
            allowed_hosts: None,
        })
    }

    /// The keys set here that only a `[[runners]]` entry uses (a GitHub run has no earlier
    /// jobs to take artifacts from).
    pub fn gitlab_only_keys(&self) -> Vec<&'static str> {
        [(
            "max_dependencies_size",
            self.max_dependencies_size.is_some(),
        )]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect()
    }

    /// The keys set here that a `[[runners]]` entry cannot use: its VM size is the entry's
    /// own `cpus`/`memory`, and a GitLab job is one run.
    pub fn github_only_keys(&self) -> Vec<&'static str> {
        [
            ("max_cpus", self.max_cpus.is_some()),
            ("max_memory", self.max_memory.is_some()),
            ("max_runs", self.max_runs.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect()
    }
}

/// A request over a cap: which cap, its value, and what was asked. One line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} = {asked} is over this runner's limit {key} = {cap}; {fix}")]
pub struct OverLimit {
    /// What was asked for ("suite 'unit' memory").
    pub what: String,
    pub asked: String,
    /// The config key of the cap.
    pub key: &'static str,
    pub cap: String,
    /// What the user can do.
    pub fix: &'static str,
}

const ASK_LESS: &str = "ask for less, or ask the runner's operator to raise the limit";

fn mib(n: u32) -> String {
    size_text(u64::from(n) << 20)
}

/// "4G", "512M", "1536M", "100K", "12345 bytes".
pub fn size_text(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

fn duration_text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl Limits {
    /// Checks a job's timeout (GitLab's `runner_info.timeout`, or an after_script timeout).
    pub fn check_timeout(&self, what: &str, asked: Duration) -> Result<(), OverLimit> {
        if asked <= self.max_timeout {
            return Ok(());
        }
        Err(OverLimit {
            what: what.to_string(),
            asked: duration_text(asked),
            key: "max_timeout",
            cap: duration_text(self.max_timeout),
            fix: "shorten the timeout, or ask the runner's operator to raise the limit",
        })
    }

    /// Checks how many runs one event asks for.
    pub fn check_runs(&self, runs: usize) -> Result<(), OverLimit> {
        if runs <= self.max_runs {
            return Ok(());
        }
        Err(OverLimit {
            what: "suite × architecture runs for this commit".into(),
            asked: runs.to_string(),
            key: "max_runs",
            cap: self.max_runs.to_string(),
            fix: "run fewer suites or architectures per commit (split runner.toml's suites, or narrow their arch lists)",
        })
    }

    /// Checks one plan from a repository's runner.toml: VM size, timeouts, workspace cap.
    pub fn check_plan(&self, plan: &SuitePlan) -> Result<(), OverLimit> {
        let what = |thing: &str| format!("suite '{}' {thing}", plan.id.suite);
        if plan.cpus > self.max_cpus {
            return Err(OverLimit {
                what: what("cpus"),
                asked: plan.cpus.to_string(),
                key: "max_cpus",
                cap: self.max_cpus.to_string(),
                fix: ASK_LESS,
            });
        }
        if plan.memory_mib > self.max_memory_mib {
            return Err(OverLimit {
                what: what("memory"),
                asked: mib(plan.memory_mib),
                key: "max_memory",
                cap: mib(self.max_memory_mib),
                fix: ASK_LESS,
            });
        }
        self.check_timeout(&what("timeout"), plan.timeout)?;
        for step in &plan.steps {
            self.check_timeout(&format!("step '{}' timeout", step.name), step.timeout)?;
        }
        if let Some(ws) = &plan.workspace {
            self.check_workspace(ws.max_size)?;
        }
        self.check_network(&what("network"), plan.network.mode)
    }

    /// Checks the network a job asks for against this runner's `network`.
    pub fn check_network(
        &self,
        what: &str,
        asked: crate::net::NetworkMode,
    ) -> Result<(), OverLimit> {
        if asked <= self.network {
            return Ok(());
        }
        Err(OverLimit {
            what: what.to_string(),
            asked: format!("\"{asked}\""),
            key: "network",
            cap: format!("\"{}\"", self.network),
            fix: "run without network (vendor what the job fetches), or ask the runner's operator to allow it",
        })
    }

    /// Checks a workspace size limit asked for (runner.toml's `[workspace] max_size`).
    pub fn check_workspace(&self, max_size: u64) -> Result<(), OverLimit> {
        if max_size <= self.max_workspace {
            return Ok(());
        }
        Err(OverLimit {
            what: "[workspace] max_size".into(),
            asked: size_text(max_size),
            key: "max_workspace_size",
            cap: size_text(self.max_workspace),
            fix: "lower max_size (and exclude what the tests do not need), or ask the runner's operator to raise the limit",
        })
    }

    /// What every plan of a service gets from its caps: the artifacts bound and the image
    /// build deadline.
    pub fn apply(&self, plan: &mut SuitePlan) {
        plan.max_artifacts = self.max_artifacts;
        plan.image_build_timeout = Some(self.image_build_timeout);
        plan.network.allow = self.allowed_hosts.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::plan::{plan_command, Overrides};

    fn limits(toml_text: &str) -> Result<Limits, String> {
        toml::from_str::<LimitsConfig>(toml_text)
            .map_err(|e| e.to_string())?
            .validate("[github.limits]")
    }

    #[test]
    fn defaults_and_refused_values() {
        let d = limits("").unwrap();
        assert_eq!(d, Limits::default());
        assert_eq!(
            (d.max_cpus, d.max_memory_mib, d.max_runs),
            (4, 4096, DEFAULT_MAX_RUNS)
        );
        assert_eq!(d.max_timeout, Duration::from_secs(3 * 3600));
        assert_eq!((d.max_workspace, d.max_artifacts), (1 << 30, 256 << 20));
        assert_eq!(d.max_dependencies, 512 << 20);
        // (config text, part of the message)
        let cases = [
            ("max_cpus = 0", "max_cpus is 0"),
            ("max_cpus = 65", "max_cpus is 65"),
            ("max_memory = \"64M\"", "max_memory must be"),
            ("max_memory = \"lots\"", "max_memory 'lots' is not a size"),
            (
                "max_timeout = \"100y\"",
                "max_timeout '100y' is not a duration between",
            ),
            ("max_timeout = \"0s\"", "max_timeout"),
            ("max_runs = 0", "max_runs must be at least 1"),
            ("max_workspace_size = \"0\"", "max_workspace_size"),
            ("max_dependencies_size = \"x\"", "max_dependencies_size 'x'"),
            (
                "image_build_timeout = \"soon\"",
                "image_build_timeout 'soon'",
            ),
        ];
        for (text, want) in cases {
            let e = limits(text).unwrap_err();
            assert!(
                e.contains(want) && e.starts_with("[github.limits] "),
                "{text}: {e}"
            );
        }
        assert!(limits("max_cpu = 4").unwrap_err().contains("unknown field"));
    }

    #[test]
    fn plans_over_a_cap_are_refused_naming_it() {
        let l = limits("max_cpus = 4\nmax_memory = \"2G\"\nmax_timeout = \"1h\"").unwrap();
        let base = plan_command(
            vec!["true".into()],
            engine::Arch::Riscv64,
            Some("/w".into()),
            &Overrides {
                timeout: Some(Duration::from_secs(600)),
                ..Default::default()
            },
        );
        assert_eq!(l.check_plan(&base), Ok(()));
        // (change to the plan, the message it gets)
        #[allow(clippy::type_complexity)]
        let cases: Vec<(fn(&mut SuitePlan), &str)> = vec![
            (
                |p| p.cpus = 64,
                "suite 'command' cpus = 64 is over this runner's limit max_cpus = 4; ask for less",
            ),
            (
                |p| p.memory_mib = 64 << 10,
                "suite 'command' memory = 64G is over this runner's limit max_memory = 2G",
            ),
            (
                |p| p.timeout = Duration::from_secs(100 * 31_557_600),
                "suite 'command' timeout = 100years is over this runner's limit max_timeout = 1h",
            ),
            (
                |p| p.steps[0].timeout = Duration::from_secs(7200),
                "step 'true' timeout = 2h is over this runner's limit max_timeout = 1h",
            ),
            (
                |p| p.workspace.as_mut().unwrap().max_size = 2 << 30,
                "[workspace] max_size = 2G is over this runner's limit max_workspace_size = 1G",
            ),
            (
                // The default network ceiling is none.
                |p| p.network.mode = crate::net::NetworkMode::Proxy,
                "suite 'command' network = \"proxy\" is over this runner's limit network = \"none\"",
            ),
        ];
        for (change, want) in cases {
            let mut p = base.clone();
            change(&mut p);
            let e = l.check_plan(&p).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
            assert!(!e.contains('\n'));
        }
        let e = l.check_runs(10_000).unwrap_err().to_string();
        let want = "suite × architecture runs for this commit = 10000 is over this runner's limit max_runs = 20; run fewer";
        assert!(e.starts_with(want), "{e}");
        assert_eq!(l.check_runs(20), Ok(()));
    }

    #[test]
    fn sizes_print_in_the_largest_whole_unit() {
        // (bytes, text)
        let cases = [
            (4 << 30, "4G"),
            (1536 << 20, "1536M"),
            (100 << 10, "100K"),
            (1 << 40, "1T"),
            (12345, "12345 bytes"),
        ];
        for (bytes, want) in cases {
            assert_eq!(size_text(bytes), want);
        }
    }
}
