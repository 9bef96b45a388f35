//! The `runner serve` config file. Key names follow gitlab-runner's `config.toml` where one
//! exists, with the same meaning (`concurrent`, `check_interval`, `shutdown_timeout`,
//! `[[runners]]` with `name`, `url`, `token`, `limit`, …); our own keys sit beside them.
//! Unknown keys are errors: a misspelt key silently ignored is worse than a refusal.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::github::GithubConfig;
use crate::gitlab::RunnerEntry;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// VMs running at once, over all services (gitlab-runner: jobs at once).
    #[serde(default = "default_concurrent")]
    pub concurrent: usize,
    /// Seconds between job requests when there was none (gitlab-runner's default: 3).
    #[serde(default = "default_check_interval")]
    pub check_interval: u64,
    /// Seconds to wait for running jobs to be reported after SIGTERM/SIGINT before exiting.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: u64,
    /// Log format: "text" (default) or "json".
    #[serde(default)]
    pub log_format: LogFormat,
    /// GitLab runner entries.
    #[serde(default)]
    pub runners: Vec<RunnerEntry>,
    /// The GitHub App, if this service is one.
    pub github: Option<GithubConfig>,
    /// The operator's own image recipes (`NAME.toml`), beside the built-in ones. Trusted:
    /// only the operator writes here. A repository's `images/` is never used by the service.
    pub recipe_dir: Option<PathBuf>,
    /// Which isolation layers around QEMU the service refuses to run without.
    #[serde(default)]
    pub sandbox: SandboxConfig,
}

/// `[sandbox]`: `require = ["uid", "namespace", "cgroup", "seccomp"]` lists the layers
/// `runner serve` must have (it exits at start, naming the missing one, otherwise). Without
/// the key: uid (when root), namespace and seccomp — see `engine::sandbox::default_required`.
/// `require = []` serves without any, for hosts that isolate the runner some other way.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    #[serde(default, deserialize_with = "de_layers")]
    pub require: Option<Vec<engine::sandbox::Layer>>,
}

impl SandboxConfig {
    /// The layers required, on a host where the runner is root or not.
    pub fn required(&self, root: bool) -> Vec<engine::sandbox::Layer> {
        self.require
            .clone()
            .unwrap_or_else(|| engine::sandbox::default_required(root))
    }
}

fn de_layers<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<engine::sandbox::Layer>>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    names
        .iter()
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

fn default_concurrent() -> usize {
    1
}
fn default_check_interval() -> u64 {
    3
}
fn default_shutdown_timeout() -> u64 {
    30
}

impl ServeConfig {
    pub fn check_interval(&self) -> Duration {
        Duration::from_secs(self.check_interval.max(1))
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout)
    }
}

/// Why the config cannot be used; always one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl ServeConfig {
    pub fn load(path: &Path) -> Result<ServeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let config = ServeConfig::parse(path, &text)?;
        if let Some(dir) = &config.recipe_dir {
            if !dir.is_dir() {
                return Err(ConfigError::Invalid {
                    path: path.into(),
                    message: format!(
                        "recipe_dir {} is not a directory; create it or remove the key",
                        dir.display()
                    ),
                });
            }
        }
        // The files the [github] section names must be usable now, not at the first webhook.
        if let Some(gh) = &config.github {
            gh.credentials().map_err(|message| ConfigError::Invalid {
                path: path.into(),
                message,
            })?;
        }
        Ok(config)
    }

    /// Parses `text` (the contents of `path`, which names it in messages).
    pub fn parse(path: &Path, text: &str) -> Result<ServeConfig, ConfigError> {
        let mut config: ServeConfig =
            toml::from_str(text).map_err(|e| match crate::suite::toml_error(text, &e) {
                (Some((line, column)), message) => ConfigError::Syntax {
                    path: path.into(),
                    line,
                    column,
                    message,
                },
                (None, message) => ConfigError::Invalid {
                    path: path.into(),
                    message,
                },
            })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.into(),
            message,
        };
        if config.runners.is_empty() && config.github.is_none() {
            return Err(invalid(
                "nothing to serve: add a [[runners]] entry (GitLab) or a [github] section".into(),
            ));
        }
        if config.recipe_dir.as_ref().is_some_and(|d| !d.is_absolute()) {
            return Err(invalid(
                "recipe_dir must be an absolute path (the service's working directory is not the operator's)"
                    .into(),
            ));
        }
        if config.concurrent == 0 {
            return Err(invalid("concurrent must be at least 1".into()));
        }
        if let Some(gh) = &config.github {
            gh.check().map_err(invalid)?;
        }
        let check_interval = config.check_interval();
        for r in &mut config.runners {
            r.check_interval = check_interval;
            r.check().map_err(invalid)?;
        }
        let mut names = std::collections::HashSet::new();
        for r in &config.runners {
            if !names.insert(r.name.as_str()) {
                return Err(invalid(format!(
                    "two [[runners]] entries are named '{}': names must be unique (they label logs)",
                    r.name
                )));
            }
        }
        Ok(config)
    }
}

/// serde helper: an architecture name, refused with the list of known ones.
pub(crate) fn de_arch<'de, D: serde::Deserializer<'de>>(d: D) -> Result<engine::Arch, D::Error> {
    let s = String::deserialize(d)?;
    s.parse()
        .map_err(|e: engine::arch::UnknownArch| serde::de::Error::custom(e.to_string()))
}

/// serde helper: a list of architecture names.
pub(crate) fn de_arches<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<engine::Arch>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    names
        .iter()
        .map(|s| {
            s.parse()
                .map_err(|e: engine::arch::UnknownArch| serde::de::Error::custom(e.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServeConfig, ConfigError> {
        ServeConfig::parse(Path::new("serve.toml"), text)
    }

    #[test]
    fn sandbox_requirements_default_by_privilege_and_are_checked() {
        use engine::sandbox::Layer;
        let base =
            "[[runners]]\nname = \"a\"\nurl = \"https://g\"\ntoken = \"t\"\narch = \"riscv64\"\n";
        let c = parse(base).unwrap();
        assert_eq!(
            c.sandbox.required(true),
            vec![Layer::User, Layer::Namespace, Layer::Seccomp]
        );
        assert_eq!(
            c.sandbox.required(false),
            vec![Layer::Namespace, Layer::Seccomp]
        );
        let c = parse(&format!("{base}[sandbox]\nrequire = [\"cgroup\"]\n")).unwrap();
        assert_eq!(c.sandbox.required(true), vec![Layer::Cgroup]);
        let c = parse(&format!("{base}[sandbox]\nrequire = []\n")).unwrap();
        assert!(c.sandbox.required(true).is_empty());
        let err = parse(&format!("{base}[sandbox]\nrequire = [\"selinux\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown sandbox layer 'selinux'"), "{err}");
    }

    #[test]
    fn issue_example_parses() {
        let c = parse(
            r#"
concurrent = 2
check_interval = 3
[[runners]]
name = "riscv64-emu"
url = "https://gitlab.example.com"
token = "glrt-abc"
arch = "riscv64"
image = "debian-13"
limit = 2
"#,
        )
        .unwrap();
        assert_eq!(c.concurrent, 2);
        assert_eq!(c.runners.len(), 1);
        assert_eq!(c.runners[0].arch, engine::Arch::Riscv64);
        assert_eq!(c.shutdown_timeout, 30);
    }

    #[test]
    fn errors_have_line_and_column() {
        let e = parse("concurrent = 2\n[[runners]]\nname = \"x\"\nurl = \"u\"\ntoken = \"t\"\narch = \"mips\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("serve.toml:6:8: "), "{e}");
        assert!(e.contains("mips"), "{e}");
        let e = parse("concurent = 2\n").unwrap_err().to_string();
        assert!(
            e.starts_with("serve.toml:1:1: ") && e.contains("concurent"),
            "{e}"
        );
    }

    #[test]
    fn recipe_dir_is_an_absolute_directory() {
        let entry = "[[runners]]\nname = \"r\"\nurl = \"u\"\ntoken = \"t\"\narch = \"riscv64\"\n";
        let e = parse(&format!("recipe_dir = \"images\"\n{entry}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("recipe_dir must be an absolute path"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let c = parse(&format!(
            "recipe_dir = \"{}\"\n{entry}",
            dir.path().display()
        ))
        .unwrap();
        assert_eq!(c.recipe_dir.as_deref(), Some(dir.path()));
        // A directory that does not exist is refused when the file is loaded.
        let file = dir.path().join("serve.toml");
        std::fs::write(
            &file,
            format!("recipe_dir = \"/nonexistent/recipes\"\n{entry}"),
        )
        .unwrap();
        let e = ServeConfig::load(&file).unwrap_err().to_string();
        assert!(
            e.contains("recipe_dir /nonexistent/recipes is not a directory"),
            "{e}"
        );
    }

    #[test]
    fn limits_are_checked_at_start() {
        let entry = "[[runners]]\nname = \"r\"\nurl = \"u\"\ntoken = \"t\"\narch = \"riscv64\"\n";
        let c = parse(&format!("{entry}[runners.limits]\nmax_timeout = \"1h\"\n")).unwrap();
        assert_eq!(c.runners[0].limits.max_timeout, Duration::from_secs(3600));
        assert_eq!(
            parse(entry).unwrap().runners[0].limits,
            crate::serve::Limits::default()
        );
        // (limits table, part of the message)
        let cases = [
            (
                "max_timeout = \"100y\"",
                "runner 'r' limits max_timeout '100y'",
            ),
            (
                "max_memory = \"8G\"",
                "max_memory apply only to [github.limits]",
            ),
            ("max_tiemout = \"1h\"", "unknown field `max_tiemout`"),
        ];
        for (limits, want) in cases {
            let e = parse(&format!("{entry}[runners.limits]\n{limits}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{limits}: {e}");
        }
    }

    #[test]
    fn empty_config_is_refused() {
        let e = parse("concurrent = 1\n").unwrap_err().to_string();
        assert!(e.contains("nothing to serve"), "{e}");
    }
}
