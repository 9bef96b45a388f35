//! The `[github]` section of the serve config: the App, its webhook endpoint, defaults.
//!
//! Two stages, like the suite file: serde reads the keys ([`GithubConfig`]), then
//! [`GithubConfig::credentials`] reads the files they name (the App key, the webhook secret)
//! so that `runner serve` refuses to start with a clear message instead of failing on the
//! first webhook.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::serve::config::de_arches;
use crate::serve::{Limits, LimitsConfig};

/// GitHub's own cap on a webhook payload.
pub const DEFAULT_MAX_BODY: &str = "25M";
/// Deadline for cloning a repository at the head SHA.
pub const DEFAULT_CLONE_TIMEOUT: &str = "10m";

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
    /// Largest webhook body accepted ("25M"); larger deliveries get 413.
    #[serde(default = "default_max_body")]
    pub max_body_size: String,
    /// Deadline for one clone of a repository ("10m").
    #[serde(default = "default_clone_timeout")]
    pub clone_timeout: String,
    /// Let a repository's `host_setup` commands run on this host. Off by default: anyone who
    /// can open a pull request could otherwise run commands here, outside any VM.
    #[serde(default)]
    pub allow_host_setup: bool,
    /// Transports git may fetch with (`GIT_ALLOW_PROTOCOL`); a local path counts as "file".
    #[serde(default = "default_protocols")]
    pub git_protocols: Vec<String>,
    /// Images a repository's runner.toml may name (built-in or in the serve config's
    /// `recipe_dir`); default: the built-in ones (`debian-13`, `debian-12`).
    #[serde(default = "default_images")]
    pub allowed_images: Vec<engine::image::ImageName>,
    /// The most network a repository's suite may ask for (`none`, `proxy`, `full`).
    #[serde(default, deserialize_with = "crate::net::de_network")]
    pub network: crate::net::NetworkMode,
    /// Hosts the proxy lets through (`host` or `host:port`); default: the image recipe's
    /// Debian mirror host.
    #[serde(default, deserialize_with = "crate::net::de_allowed_hosts")]
    pub allowed_hosts: Option<crate::net::Allowlist>,
    /// Caps on what a repository's runner.toml may ask for (`[github.limits]`).
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Keep failed VMs of suites with `keep_failed = true` and serve them for download
    /// (`github::snapshots`). Off unless set: a snapshot holds the job's memory.
    pub failure_snapshots: Option<SnapshotsConfig>,
}

/// `[github] failure_snapshots = { url = "https://runner.example.com", keep = "3d", max_total = "20G" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotsConfig {
    /// This server's address as the check run's readers reach it (the listen address is
    /// often not): download links are `URL/snapshots/ID.tar.gz`.
    pub url: String,
    /// How long a snapshot can be downloaded ("3d").
    #[serde(default = "default_keep")]
    pub keep: String,
    /// The most disk all kept snapshots may use ("20G"); the oldest go first.
    #[serde(default = "default_max_total")]
    pub max_total: String,
}

fn default_keep() -> String {
    "3d".into()
}
fn default_max_total() -> String {
    "20G".into()
}

/// [`SnapshotsConfig`], checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshots {
    /// Without a trailing `/`.
    pub url: String,
    pub keep: Duration,
    pub max_total: u64,
}

impl SnapshotsConfig {
    pub fn validate(&self) -> Result<Snapshots, String> {
        let url = reqwest::Url::parse(&self.url).map_err(|e| {
            format!(
                "[github] failure_snapshots.url '{}' is not a URL: {e}",
                self.url
            )
        })?;
        if !matches!(url.scheme(), "http" | "https")
            || url.query().is_some()
            || url.fragment().is_some()
            || url.host_str().is_none()
        {
            return Err(format!(
                "[github] failure_snapshots.url '{}' must be an http(s) URL without query, like \"https://runner.example.com\"",
                self.url
            ));
        }
        let keep = match humantime::parse_duration(&self.keep) {
            Ok(d) if d >= Duration::from_secs(60) => d,
            _ => {
                return Err(format!(
                    "[github] failure_snapshots.keep '{}' is not a duration of a minute or more, like \"3d\"",
                    self.keep
                ))
            }
        };
        let max_total = match engine::size::parse_size(&self.max_total) {
            Ok(b) if b >= 1 << 20 => b,
            _ => {
                return Err(format!(
                    "[github] failure_snapshots.max_total '{}' is not a size of 1M or more, like \"20G\"",
                    self.max_total
                ))
            }
        };
        Ok(Snapshots {
            url: url.as_str().trim_end_matches('/').to_string(),
            keep,
            max_total,
        })
    }
}

fn default_images() -> Vec<engine::image::ImageName> {
    engine::image::recipe::BUILTIN_RECIPES
        .iter()
        .map(|(name, _)| name.parse().expect("a valid image name"))
        .collect()
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
fn default_max_body() -> String {
    DEFAULT_MAX_BODY.into()
}
fn default_protocols() -> Vec<String> {
    crate::sources::DEFAULT_PROTOCOLS.map(String::from).to_vec()
}
fn default_clone_timeout() -> String {
    DEFAULT_CLONE_TIMEOUT.into()
}

/// What the files named by the config contain, checked.
#[derive(Clone)]
pub struct Credentials {
    /// The App's RSA private key, as PEM text.
    pub private_key_pem: Vec<u8>,
    pub webhook_secret: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets, not even in debug output.
        f.write_str("Credentials(..)")
    }
}

impl GithubConfig {
    /// Checks what can be checked without touching the disk. Messages name the key.
    pub fn check(&self) -> Result<(), String> {
        match (&self.webhook_secret, &self.webhook_secret_file) {
            (Some(_), Some(_)) => {
                return Err(
                    "[github] has both webhook_secret and webhook_secret_file: keep one".into(),
                )
            }
            (None, None) => {
                return Err(
                    "[github] needs webhook_secret or webhook_secret_file (the secret set on the App's webhook)"
                        .into(),
                )
            }
            (Some(s), None) if s.is_empty() => {
                return Err("[github] webhook_secret is empty".into())
            }
            _ => {}
        }
        if !self.webhook_path.starts_with('/') {
            return Err(format!(
                "[github] webhook_path '{}' must start with '/'",
                self.webhook_path
            ));
        }
        if self.arch.is_empty() {
            return Err("[github] arch must name at least one architecture".into());
        }
        let url = reqwest::Url::parse(&self.api_url)
            .map_err(|e| format!("[github] api_url '{}' is not a URL: {e}", self.api_url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "[github] api_url '{}' must be http(s)",
                self.api_url
            ));
        }
        self.max_body()?;
        self.clone_timeout()?;
        self.limits()?;
        crate::sources::check_protocols("[github]", &self.git_protocols)?;
        self.snapshots()?;
        Ok(())
    }

    /// The validated `failure_snapshots`, if the operator set it.
    pub fn snapshots(&self) -> Result<Option<Snapshots>, String> {
        self.failure_snapshots
            .as_ref()
            .map(SnapshotsConfig::validate)
            .transpose()
    }

    /// The validated `[github.limits]`.
    pub fn limits(&self) -> Result<Limits, String> {
        let gitlab_only = self.limits.gitlab_only_keys();
        if !gitlab_only.is_empty() {
            return Err(format!(
                "[github.limits] {} apply only to [runners.limits] (GitLab jobs)",
                gitlab_only.join(", ")
            ));
        }
        let mut limits = self.limits.validate("[github.limits]")?;
        limits.network = self.network;
        limits.allowed_hosts = self.allowed_hosts.clone();
        Ok(limits)
    }

    /// The body cap in bytes.
    pub fn max_body(&self) -> Result<usize, String> {
        match engine::size::parse_size(&self.max_body_size) {
            Ok(b) if (1024..=(1 << 30)).contains(&b) => Ok(b as usize),
            _ => Err(format!(
                "[github] max_body_size '{}' must be a size between 1K and 1G, e.g. \"25M\"",
                self.max_body_size
            )),
        }
    }

    pub fn clone_timeout(&self) -> Result<Duration, String> {
        match humantime::parse_duration(&self.clone_timeout) {
            Ok(d) if d > Duration::ZERO => Ok(d),
            _ => Err(format!(
                "[github] clone_timeout '{}' is not a duration like \"10m\"",
                self.clone_timeout
            )),
        }
    }

    /// Reads the App key and the webhook secret, refusing what cannot work.
    pub fn credentials(&self) -> Result<Credentials, String> {
        self.check()?;
        let key = std::fs::read(&self.private_key_path).map_err(|e| {
            format!(
                "[github] cannot read private_key_path {}: {e}",
                self.private_key_path.display()
            )
        })?;
        // The same parser octocrab signs with: a key it cannot use is refused now.
        jsonwebtoken::EncodingKey::from_rsa_pem(&key).map_err(|e| {
            format!(
                "[github] private_key_path {} is not an RSA private key in PEM form ({e}); download one from the App's settings page",
                self.private_key_path.display()
            )
        })?;
        let secret = match (&self.webhook_secret, &self.webhook_secret_file) {
            (Some(s), _) => s.as_bytes().to_vec(),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    format!(
                        "[github] cannot read webhook_secret_file {}: {e}",
                        path.display()
                    )
                })?;
                // Files usually end with a newline the secret does not contain.
                let secret = text.trim_end_matches(['\r', '\n']).to_string();
                if secret.is_empty() {
                    return Err(format!(
                        "[github] webhook_secret_file {} is empty",
                        path.display()
                    ));
                }
                secret.into_bytes()
            }
            (None, None) => unreachable!("check() requires one"),
        };
        Ok(Credentials {
            private_key_pem: key,
            webhook_secret: secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> GithubConfig {
        toml::from_str(&format!(
            "listen = \"127.0.0.1:0\"\napp_id = 1\nprivate_key_path = \"/nonexistent\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn allowed_images_are_names() {
        assert_eq!(
            parse("").allowed_images,
            vec!["debian-13".parse().unwrap(), "debian-12".parse().unwrap()]
        );
        let c = parse("allowed_images = [\"debian-13\", \"ci-heavy\"]");
        assert_eq!(c.allowed_images.len(), 2);
        // A path is never an image name: refused when the config is read.
        let e = toml::from_str::<GithubConfig>(
            "listen = \"127.0.0.1:0\"\napp_id = 1\nprivate_key_path = \"/k\"\nallowed_images = [\"../x.toml\"]",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("is not an image name"), "{e}");
    }

    #[test]
    fn exactly_one_secret() {
        // (extra keys, expected error fragment or None)
        let cases = [
            ("", Some("needs webhook_secret")),
            (
                "webhook_secret = \"a\"\nwebhook_secret_file = \"/f\"",
                Some("both"),
            ),
            ("webhook_secret = \"\"", Some("empty")),
            ("webhook_secret = \"s\"", None),
            ("webhook_secret = \"s\"\nwebhook_path = \"x\"", Some("'/'")),
            (
                "webhook_secret = \"s\"\napi_url = \"ftp://x\"",
                Some("http"),
            ),
            (
                "webhook_secret = \"s\"\nmax_body_size = \"2\"",
                Some("max_body"),
            ),
            (
                "webhook_secret = \"s\"\nlimits = { max_memory = \"64T\" }",
                Some("[github.limits] max_memory must be"),
            ),
            (
                "webhook_secret = \"s\"\nlimits = { max_dependencies_size = \"1G\" }",
                Some("[github.limits] max_dependencies_size apply only to [runners.limits]"),
            ),
            (
                "webhook_secret = \"s\"\ngit_protocols = []",
                Some("[github] git_protocols is empty"),
            ),
        ];
        for (extra, want) in cases {
            let got = parse(extra).check();
            match want {
                None => assert!(got.is_ok(), "{extra}: {got:?}"),
                Some(frag) => {
                    let e = got.unwrap_err();
                    assert!(e.contains(frag), "{extra}: {e}");
                }
            }
        }
    }

    #[test]
    fn unreadable_key_is_named() {
        let e = parse("webhook_secret = \"s\"").credentials().unwrap_err();
        assert!(e.contains("private_key_path /nonexistent"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "not a key").unwrap();
        let mut c = parse("webhook_secret = \"s\"");
        c.private_key_path = key;
        let e = c.credentials().unwrap_err();
        assert!(e.contains("not an RSA private key"), "{e}");
    }

    #[test]
    fn network_is_a_ceiling_with_an_allowlist_and_none_by_default() {
        let l = parse("webhook_secret = \"s\"").limits().unwrap();
        assert_eq!(
            (l.network, l.allowed_hosts),
            (crate::net::NetworkMode::None, None)
        );
        let c =
            parse("webhook_secret = \"s\"\nnetwork = \"proxy\"\nallowed_hosts = [\"pypi.org\"]");
        let l = c.limits().unwrap();
        assert_eq!(l.network, crate::net::NetworkMode::Proxy);
        assert!(l.allowed_hosts.unwrap().allows("pypi.org", 443));
        // (config line, error fragment)
        let cases = [
            ("network = \"lan\"", "unknown network 'lan'"),
            (
                "allowed_hosts = [\"*.pypi.org\"]",
                "allowed host '*.pypi.org'",
            ),
        ];
        for (line, want) in cases {
            let e = toml::from_str::<GithubConfig>(&format!(
                "listen = \"127.0.0.1:0\"\napp_id = 1\nprivate_key_path = \"/k\"\n{line}"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn failure_snapshots_are_off_unless_set_and_checked() {
        assert_eq!(parse("webhook_secret = \"s\"").snapshots(), Ok(None));
        let c = parse(
            "webhook_secret = \"s\"\nfailure_snapshots = { url = \"https://runner.example.com/ci/\" }",
        );
        assert_eq!(
            c.snapshots().unwrap().unwrap(),
            Snapshots {
                url: "https://runner.example.com/ci".into(),
                keep: Duration::from_secs(3 * 24 * 3600),
                max_total: 20 << 30,
            }
        );
        // (failure_snapshots, error fragment)
        let cases = [
            ("{ url = \"runner.example.com\" }", "failure_snapshots.url"),
            ("{ url = \"ftp://x\" }", "must be an http(s) URL"),
            ("{ url = \"https://x/?a=b\" }", "without query"),
            (
                "{ url = \"https://x\", keep = \"soon\" }",
                "failure_snapshots.keep 'soon'",
            ),
            ("{ url = \"https://x\", keep = \"1s\" }", "a minute or more"),
            (
                "{ url = \"https://x\", max_total = \"1K\" }",
                "failure_snapshots.max_total '1K'",
            ),
        ];
        for (value, want) in cases {
            let e = parse(&format!(
                "webhook_secret = \"s\"\nfailure_snapshots = {value}"
            ))
            .check()
            .unwrap_err();
            assert!(e.contains(want), "{value}: {e}");
        }
        let e = toml::from_str::<GithubConfig>(
            "listen = \"127.0.0.1:0\"\napp_id = 1\nprivate_key_path = \"/k\"\nfailure_snapshots = { url = \"https://x\", path = \"/tmp\" }",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `path`"), "{e}");
    }

    #[test]
    fn defaults() {
        let c = parse("webhook_secret = \"s\"");
        assert_eq!(c.webhook_path, "/github/webhook");
        assert_eq!(c.api_url, "https://api.github.com");
        assert_eq!(c.max_body().unwrap(), 25 << 20);
        assert_eq!(c.clone_timeout().unwrap(), Duration::from_secs(600));
        assert!(!c.allow_host_setup);
        assert_eq!(c.limits().unwrap(), Limits::default());
        assert_eq!(c.git_protocols, ["https", "http", "ssh"]);
    }
}
