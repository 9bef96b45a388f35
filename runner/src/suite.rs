//! The suite file (`runner.toml`): its format, parsing and validation.
//!
//! This module owns everything between the text of `runner.toml` and the typed [`SuiteFile`]
//! the rest of the runner uses. Only [`SuiteFile::load`] touches the disk, so the rest is
//! tested on strings. It works in two stages, like ripgrep's LowArgs → HiArgs: serde reads the
//! text into `Raw*` structs that mirror the file (unknown fields are errors, so typos do not
//! pass silently), then `validate` turns them into typed structs with every default resolved
//! and no strings left that stand for an architecture, a duration or a size.
//!
//! # Format
//!
//! ```toml
//! # runner.toml — all sections optional except at least one [[suite]]
//! [defaults]
//! arch = ["riscv64", "aarch64"]   # arches used when the CLI gives no --arch (default: none)
//! image = "debian-13"             # base image name (default: the arch's, debian-13 or debian-12)
//! timeout = "20m"                 # default per-suite timeout (default 30m)
//! step_timeout = "10m"            # default per-step timeout (default: the suite timeout)
//! cpus = 2                        # vCPUs (default 2, 1..=64)
//! memory = "1G"                   # K/M/G suffix (binary) or plain MiB; default 1024, 128M..=64G
//!
//! [workspace]
//! path = "."                      # copied into the guest at /workspace; relative to this file
//! exclude = ["target", ".git"]    # globs relative to the workspace root, not copied
//! max_size = "512M"               # refuse to copy more than this (default 1G)
//!
//! [[suite]]
//! name = "unit"                   # required, [A-Za-z0-9_.-]{1,64}, unique in the file
//! description = "..."             # optional
//! arch = ["riscv64"]              # optional: only run on these arches (default: any)
//! timeout = "10m"                 # optional, overrides defaults.timeout
//! env = { KEY = "value" }         # optional, exported to every step
//! host_setup = ["make ARCH=$RUNNER_ARCH"]  # run on the host in the workspace before boot
//! junit = ["build/junit/*.xml"]   # guest globs relative to /workspace: JUnit files to merge
//! artifacts = ["build/logs/*"]    # guest globs relative to /workspace: copied back to the host
//! mode = "system"                 # optional: "system" (a VM, the default) or "user" (qemu-user)
//! keep_failed = false             # optional: save the VM of a failed step for `runner debug`
//!                                 # (its memory holds every variable of the job: off by default)
//! network = "proxy"               # "none" (default: no NIC), "proxy" (HTTP(S) through the
//!                                 # runner's allowlisting proxy) or "full"; within the
//!                                 # operator's `network` (`--network` for `runner test`)
//!
//!   [[suite.step]]
//!   name = "build"                # required, non-empty, unique in the suite, <= 128 chars
//!   run = "make -j2\nmake check"  # required: a script for `/bin/sh -e` in /workspace
//!   timeout = "5m"                # optional, overrides defaults.step_timeout
//!   env = { CFLAGS = "-O2" }      # optional, overrides the suite's env
//!   allow_failure = false         # optional: a failure is reported but passes the suite
//! ```
//!
//! Durations use humantime ("90s", "5m", "1h 30m") and must be between 1s and 7 days. Guest paths must be
//! relative and must not contain `..`.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use engine::image::ImageName;
use engine::size::{parse_size, Memory};
use engine::Arch;
use serde::Deserialize;
use toml::Spanned;

/// The name the CLI looks for when not told which suite file to use.
pub const SUITE_FILE_NAME: &str = "runner.toml";

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Longest duration a suite file may give. Larger ones are mistakes (or attacks: "100y"
/// overflowed deadline arithmetic); `runner serve` caps lower still (`max_timeout`).
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 60 * 60);
const DEFAULT_EXCLUDE: [&str; 2] = ["target", ".git"];
const MIB: u64 = 1 << 20;

/// A validated `runner.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuiteFile {
    pub path: PathBuf,
    pub defaults: Defaults,
    pub workspace: WorkspaceSpec,
    /// In file order.
    pub suites: Vec<Suite>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// Used when the CLI gives no `--arch`; empty means the CLI must give one.
    pub arch: Vec<Arch>,
    /// `None`: each architecture's default image (`Arch::default_image`).
    pub image: Option<ImageName>,
    pub timeout: Duration,
    pub step_timeout: Option<Duration>,
    /// `None`: the architecture's default (2; 1 on ppc64el and mips).
    pub cpus: Option<u32>,
    pub memory_mib: u32,
}

/// What is copied into the guest at `/workspace`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceSpec {
    /// Absolute: the suite file's directory joined with `[workspace] path`.
    pub root: PathBuf,
    /// Glob patterns relative to `root`.
    pub exclude: Vec<String>,
    /// In bytes.
    pub max_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suite {
    pub name: String,
    pub description: Option<String>,
    /// Empty means any architecture.
    pub arch: Vec<Arch>,
    pub timeout: Duration,
    /// Sorted by key.
    pub env: Vec<(String, String)>,
    pub host_setup: Vec<String>,
    /// Globs relative to `/workspace` in the guest.
    pub junit: Vec<String>,
    /// Globs relative to `/workspace` in the guest.
    pub artifacts: Vec<String>,
    /// What network the suite asks for; granted only within the operator's ceiling.
    pub network: engine::net::NetworkMode,
    pub steps: Vec<Step>,
    pub mode: Mode,
    /// Save the VM when a step fails, into `failed-vm/` of the output (see `snapshot`).
    pub keep_failed: bool,
}

/// How a suite's steps run (README, "User mode").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// In a VM: the image's kernel boots under QEMU's system emulation.
    #[default]
    System,
    /// Under qemu-user on the host's kernel, the image's files as the root: no boot, but no
    /// guest kernel either.
    User,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::System => "system",
            Mode::User => "user",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    /// A script for `/bin/sh -e`.
    pub run: String,
    /// The step's own, else `defaults.step_timeout`, else the suite's timeout.
    pub timeout: Duration,
    /// The suite's env overridden by the step's, sorted by key.
    pub env: Vec<(String, String)>,
    pub allow_failure: bool,
}

/// Why a suite file cannot be used. Each variant displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The problem has a place in the file: TOML syntax, serde errors and most validation.
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// The problem has no single place in the file (e.g. there are no suites).
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl SuiteFile {
    /// Reads and parses the suite file at `path`.
    pub fn load(path: &Path) -> Result<SuiteFile, SuiteError> {
        match std::fs::read_to_string(path) {
            Ok(text) => SuiteFile::parse(path, &text),
            Err(source) => Err(SuiteError::Read {
                path: path.into(),
                source,
            }),
        }
    }

    /// Parses `text` as the file at `path`, which names it in messages and locates the
    /// workspace.
    pub fn parse(path: &Path, text: &str) -> Result<SuiteFile, SuiteError> {
        let problem = match toml::from_str::<RawFile>(text) {
            // message(), not Display: Display quotes the source over several lines.
            Err(e) => Problem {
                span: e.span(),
                message: e.message().to_string(),
            },
            Ok(raw) => match validate(path, raw) {
                Ok(file) => return Ok(file),
                Err(problem) => problem,
            },
        };
        let path = path.to_path_buf();
        // One line, always: CI logs and editors match `path:line:column: message`.
        let message = problem.message.trim().replace('\n', " ");
        let Some(span) = problem.span else {
            return Err(SuiteError::Invalid { path, message });
        };
        let (line, column) = line_column(text, span.start);
        Err(SuiteError::Syntax {
            path,
            line,
            column,
            message,
        })
    }

    pub fn suite(&self, name: &str) -> Option<&Suite> {
        self.suites.iter().find(|s| s.name == name)
    }
}

impl Suite {
    /// Whether this suite should run on `arch`.
    pub fn runs_on(&self, arch: Arch) -> bool {
        self.arch.is_empty() || self.arch.contains(&arch)
    }
}

// Stage 1: what serde reads. Values that validation can reject keep their span so that the
// error can point at them; optional lists are `Option`s to need no `#[serde(default)]`.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    defaults: Option<RawDefaults>,
    workspace: Option<RawWorkspace>,
    suite: Option<Vec<RawSuite>>,
}

type Text = Spanned<String>;
type RawEnv = Option<Spanned<BTreeMap<String, String>>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    arch: Option<Vec<Text>>,
    image: Option<Text>,
    timeout: Option<Text>,
    step_timeout: Option<Text>,
    cpus: Option<Spanned<u32>>,
    /// A size string or an integer number of MiB.
    memory: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWorkspace {
    path: Option<String>,
    exclude: Option<Vec<Text>>,
    /// A size string or an integer number of bytes.
    max_size: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSuite {
    name: Text,
    description: Option<String>,
    arch: Option<Vec<Text>>,
    timeout: Option<Text>,
    env: RawEnv,
    host_setup: Option<Vec<Text>>,
    junit: Option<Vec<Text>>,
    artifacts: Option<Vec<Text>>,
    keep_failed: Option<bool>,
    network: Option<Text>,
    step: Option<Vec<RawStep>>,
    mode: Option<Mode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: Text,
    run: Text,
    timeout: Option<Text>,
    env: RawEnv,
    allow_failure: Option<bool>,
}

// Stage 2: validation.

/// A parse or validation failure, with the byte range it is about when there is one.
struct Problem {
    span: Option<Range<usize>>,
    message: String,
}

/// Returns a [`Problem`] located at the span of `$value` (a `Spanned`).
macro_rules! bail {
    ($value:expr => $($message:tt)+) => {
        return Err(Problem { span: Some($value.span()), message: format!($($message)+) })
    };
}

/// Where a TOML parse error of `text` is (1-based line and column, when toml knows) and its
/// message on one line. toml's Display quotes the source over several lines; every file this
/// project reads reports `path:line:column: message` instead.
pub(crate) fn toml_error(text: &str, e: &toml::de::Error) -> (Option<(usize, usize)>, String) {
    let at = e.span().map(|span| line_column(text, span.start));
    (at, e.message().trim().replace('\n', " "))
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (before.matches('\n').count() + 1, column)
}

fn validate(path: &Path, raw: RawFile) -> Result<SuiteFile, Problem> {
    let defaults = defaults(raw.defaults.unwrap_or_default())?;
    let workspace = workspace(path, raw.workspace.unwrap_or_default())?;
    let raw_suites = raw.suite.unwrap_or_default();
    if raw_suites.is_empty() {
        let message = "defines no suites; add a [[suite]] with a name and a [[suite.step]]";
        return Err(Problem {
            span: None,
            message: message.into(),
        });
    }
    let mut names = HashSet::new();
    let mut suites = Vec::new();
    for (i, raw) in raw_suites.into_iter().enumerate() {
        // Point at the second one: the first is the one the user probably meant to keep.
        if !names.insert(raw.name.get_ref().clone()) {
            let name = raw.name.get_ref();
            bail!(raw.name => "suite {} '{name}' has the same name as an earlier suite", i + 1);
        }
        suites.push(suite(i, raw, &defaults)?);
    }
    Ok(SuiteFile {
        path: path.to_path_buf(),
        defaults,
        workspace,
        suites,
    })
}

fn defaults(raw: RawDefaults) -> Result<Defaults, Problem> {
    if let Some(image) = raw.image.as_ref().filter(|i| i.get_ref().trim().is_empty()) {
        bail!(image => "defaults.image is empty; name a base image such as \"debian-13\"");
    }
    // A name, never a path: it is looked up only where the caller's RecipeLookup allows.
    let image = match &raw.image {
        None => None,
        Some(image) => match image.get_ref().parse::<ImageName>() {
            Ok(name) => Some(name),
            Err(e) => bail!(image => "defaults.image: {e}"),
        },
    };
    let cpus = match raw.cpus.as_ref().map(|c| (c, *c.get_ref())) {
        None => None,
        Some((_, n @ 1..=64)) => Some(n),
        Some((cpus, n)) => bail!(cpus => "defaults.cpus is {n}; give between 1 and 64"),
    };
    let memory_mib = match &raw.memory {
        None => 1024,
        Some(memory) => match Memory::from_bytes(size(memory, "defaults.memory", MIB)?) {
            Ok(m) => m.mib(),
            Err(e) => bail!(memory => "defaults.memory {e}"),
        },
    };
    Ok(Defaults {
        arch: arches(&raw.arch, "defaults.arch")?,
        image,
        timeout: duration(&raw.timeout, "defaults.timeout")?.unwrap_or(DEFAULT_TIMEOUT),
        step_timeout: duration(&raw.step_timeout, "defaults.step_timeout")?,
        cpus,
        memory_mib,
    })
}

fn workspace(file: &Path, raw: RawWorkspace) -> Result<WorkspaceSpec, Problem> {
    let dir = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let root = dir.join(raw.path.as_deref().unwrap_or("."));
    // Absolute, so that host_setup's working directory does not change what it means. This
    // fails only without a current directory, and then the relative path is the best we have.
    let root = std::path::absolute(&root).unwrap_or(root);
    let exclude = match &raw.exclude {
        // An explicit empty list means "copy everything", so it is not the default.
        Some(_) => globs(&raw.exclude, "workspace.exclude")?,
        None => DEFAULT_EXCLUDE.map(String::from).to_vec(),
    };
    let max_size = match &raw.max_size {
        None => 1 << 30,
        Some(value) => match size(value, "workspace.max_size", 1)? {
            0 => bail!(value => "workspace.max_size is zero; give a size such as \"512M\""),
            bytes => bytes,
        },
    };
    Ok(WorkspaceSpec {
        root,
        exclude,
        max_size,
    })
}

fn suite(index: usize, raw: RawSuite, defaults: &Defaults) -> Result<Suite, Problem> {
    let name = raw.name.get_ref();
    let name_chars = |c: char| c.is_ascii_alphanumeric() || "_.-".contains(c);
    if name.is_empty() || name.len() > 64 || !name.chars().all(name_chars) {
        let n = index + 1;
        bail!(raw.name => "suite {n} has an invalid name '{name}'; use 1-64 of [A-Za-z0-9_.-]");
    }
    let what = format!("suite '{name}'");
    let raw_steps = raw.step.unwrap_or_default();
    if raw_steps.is_empty() {
        bail!(raw.name => "{what} has no steps; add a [[suite.step]] with a name and a 'run'");
    }
    let timeout = duration(&raw.timeout, &format!("{what} timeout"))?.unwrap_or(defaults.timeout);
    let env = env(&raw.env, &what)?;
    let host_setup = raw.host_setup.unwrap_or_default();
    if let Some(empty) = host_setup.iter().find(|c| c.get_ref().trim().is_empty()) {
        bail!(empty => "{what} has an empty host_setup command; remove it");
    }

    let mut step_names = HashSet::new();
    let mut steps = Vec::new();
    for (i, step) in raw_steps.into_iter().enumerate() {
        let step_name = step.name.get_ref().trim();
        let label = format!("{what} step {}", i + 1);
        if step_name.is_empty() || step_name.chars().count() > 128 {
            bail!(step.name => "{label} needs a name of 1 to 128 characters");
        }
        if !step_names.insert(step_name.to_string()) {
            bail!(step.name => "{label} has the same name as an earlier step; rename it");
        }
        if step.run.get_ref().trim().is_empty() {
            bail!(step.run => "{label} has an empty 'run'; give it the shell commands to run");
        }
        let label = format!("{what} step '{step_name}'");
        let mut step_env = env.clone();
        step_env.extend(self::env(&step.env, &label)?);
        let step_timeout = duration(&step.timeout, &format!("{label} timeout"))?;
        steps.push(Step {
            name: step_name.to_string(),
            run: step.run.into_inner(),
            timeout: step_timeout.or(defaults.step_timeout).unwrap_or(timeout),
            env: step_env.into_iter().collect(),
            allow_failure: step.allow_failure.unwrap_or(false),
        });
    }

    Ok(Suite {
        name: name.clone(),
        description: raw.description,
        arch: arches(&raw.arch, &format!("{what} arch"))?,
        timeout,
        env: env.into_iter().collect(),
        host_setup: host_setup.into_iter().map(Spanned::into_inner).collect(),
        junit: globs(&raw.junit, &format!("{what} junit"))?,
        artifacts: globs(&raw.artifacts, &format!("{what} artifacts"))?,
        network: match &raw.network {
            None => engine::net::NetworkMode::None,
            Some(value) => match value.get_ref().parse() {
                Ok(mode) => mode,
                Err(e) => bail!(value => "{what} network: {e}"),
            },
        },
        steps,
        mode: raw.mode.unwrap_or_default(),
        keep_failed: raw.keep_failed.unwrap_or(false),
    })
}

fn duration(value: &Option<Text>, what: &str) -> Result<Option<Duration>, Problem> {
    let Some(value) = value else { return Ok(None) };
    match humantime::parse_duration(value.get_ref().trim()) {
        Ok(d) if d.is_zero() => bail!(value => "{what} is zero; give e.g. \"90s\" or \"10m\""),
        Ok(d) if d > MAX_DURATION => {
            bail!(value => "{what} '{}' is longer than 7 days, the most a suite file may give", value.get_ref().trim())
        }
        Ok(d) => Ok(Some(d)),
        Err(e) => bail!(value => "{what} is not a duration ({e}); use e.g. \"90s\" or \"1h 30m\""),
    }
}

fn arches(values: &Option<Vec<Text>>, what: &str) -> Result<Vec<Arch>, Problem> {
    let mut arches = Vec::new();
    for value in values.iter().flatten() {
        let arch: Arch = match value.get_ref().parse() {
            Ok(arch) => arch,
            Err(e) => bail!(value => "{what}: {e}"),
        };
        // "arm64" and "aarch64" in one list must not run a suite twice.
        if !arches.contains(&arch) {
            arches.push(arch);
        }
    }
    Ok(arches)
}

/// A size: a string for [`parse_size`], or a plain number (as integer or digits) of `unit`s.
fn size(value: &Spanned<toml::Value>, what: &str, unit: u64) -> Result<u64, Problem> {
    let plain = match value.get_ref() {
        toml::Value::Integer(n) => u64::try_from(*n).ok(),
        toml::Value::String(s) => match s.trim().parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => match parse_size(s) {
                Ok(bytes) => return Ok(bytes),
                Err(e) => bail!(value => "{what}: {e}"),
            },
        },
        _ => None,
    };
    match plain.and_then(|n| n.checked_mul(unit)) {
        Some(bytes) => Ok(bytes),
        None => bail!(value => "{what} must be a size such as \"512M\" or \"1G\""),
    }
}

fn env(raw: &RawEnv, what: &str) -> Result<BTreeMap<String, String>, Problem> {
    let Some(raw) = raw else {
        return Ok(BTreeMap::new());
    };
    let valid = |k: &String| {
        k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    if let Some(bad) = raw.get_ref().keys().find(|k| !valid(k)) {
        bail!(raw => "{what} env key '{bad}' is not a variable name ([A-Za-z_][A-Za-z0-9_]*)");
    }
    Ok(raw.get_ref().clone())
}

/// Glob patterns relative to a root: the guest's /workspace, or the workspace on the host.
fn globs(patterns: &Option<Vec<Text>>, what: &str) -> Result<Vec<String>, Problem> {
    let mut valid = Vec::new();
    for value in patterns.iter().flatten() {
        let pattern = value.get_ref();
        let path = Path::new(pattern);
        if pattern.trim().is_empty() || path.has_root() {
            bail!(value => "{what} path '{pattern}' is empty or absolute; give a relative path");
        }
        if path.components().any(|c| c == Component::ParentDir) {
            bail!(value => "{what} path '{pattern}' contains '..'; stay inside the workspace");
        }
        if let Err(e) = glob::Pattern::new(pattern) {
            bail!(value => "{what} pattern '{pattern}' is not a valid glob: {e}");
        }
        valid.push(pattern.clone());
    }
    Ok(valid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);
    /// A valid step, to append to suites in tests that are about something else.
    const STEP: &str = "[[suite.step]]\nname = \"a\"\nrun = \"true\"\n";

    fn parse(text: &str) -> Result<SuiteFile, SuiteError> {
        SuiteFile::parse(Path::new("/proj/runner.toml"), text)
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_suite_picks_its_mode_and_a_wrong_one_is_named_with_its_line() {
        let f = parse(&format!(
            "[[suite]]\nname = \"u\"\nmode = \"user\"\n{STEP}[[suite]]\nname = \"s\"\n{STEP}"
        ))
        .unwrap();
        let modes: Vec<Mode> = f.suites.iter().map(|s| s.mode).collect();
        assert_eq!(modes, [Mode::User, Mode::System]);
        let e = parse(&format!(
            "[[suite]]\nname = \"u\"\nmode = \"kernel\"\n{STEP}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("/proj/runner.toml:3:") && e.contains("system") && e.contains("user"),
            "{e}"
        );
    }

    #[test]
    fn full_example_resolves_everything() {
        let text = r#"
[defaults]
arch = ["riscv64", "arm64", "aarch64"]
image = "debian-12"
timeout = "20m"
step_timeout = "10m"
cpus = 4
memory = "2G"
[workspace]
path = "src/.."
exclude = ["build/*.o"]
max_size = "512M"
[[suite]]
name = "unit"
description = "unit tests"
arch = ["riscv64"]
timeout = "15m"
env = { B = "suite", A = "suite" }
host_setup = ["make cross ARCH=$RUNNER_ARCH"]
junit = ["build/junit/*.xml"]
artifacts = ["build/logs/*"]
keep_failed = true
  [[suite.step]]
  name = "build"
  run = "make -j2\nmake check"
  timeout = "5m"
  env = { A = "step", C = "step" }
  allow_failure = true
  [[suite.step]]
  name = "check"
  run = "true"
[[suite]]
name = "other"
step = [{ name = "only", run = "true" }]
"#;
        let file = parse(text).unwrap();
        let d = &file.defaults;
        // Debian's "arm64" and our "aarch64" are the same arch, so it is listed once.
        assert_eq!(d.arch, [Arch::Riscv64, Arch::Aarch64]);
        assert_eq!(
            (d.image.as_deref(), d.cpus, d.memory_mib),
            (Some("debian-12"), Some(4), 2048)
        );
        assert_eq!((d.timeout, d.step_timeout), (20 * MIN, Some(10 * MIN)));
        let ws = &file.workspace;
        assert_eq!(ws.root, Path::new("/proj/src/.."));
        assert_eq!(ws.max_size, 512 << 20);
        assert_eq!(ws.exclude, ["build/*.o"]);

        let unit = file.suite("unit").unwrap();
        assert_eq!(unit.description.as_deref(), Some("unit tests"));
        assert!(unit.runs_on(Arch::Riscv64) && !unit.runs_on(Arch::X86_64));
        assert_eq!(unit.timeout, 15 * MIN);
        assert_eq!(unit.env, env(&[("A", "suite"), ("B", "suite")]));
        assert_eq!(unit.host_setup, ["make cross ARCH=$RUNNER_ARCH"]);
        assert_eq!(unit.junit, ["build/junit/*.xml"]);
        assert_eq!(unit.artifacts, ["build/logs/*"]);
        assert!(unit.keep_failed);
        let [build, check] = &unit.steps[..] else {
            panic!("{:?}", unit.steps)
        };
        assert_eq!(build.name, "build");
        assert_eq!(build.run, "make -j2\nmake check");
        assert!(build.allow_failure && !check.allow_failure);
        // Step timeouts: the step's own, else defaults.step_timeout.
        assert_eq!((build.timeout, check.timeout), (5 * MIN, 10 * MIN));
        // The step's A wins over the suite's, and the result stays sorted.
        let want = env(&[("A", "step"), ("B", "suite"), ("C", "step")]);
        assert_eq!((&build.env, &check.env), (&want, &unit.env));

        let other = file.suite("other").unwrap();
        // The suite timeout comes from defaults.timeout; no arch list means any arch.
        assert_eq!(other.timeout, 20 * MIN);
        assert_eq!(other.steps[0].timeout, 10 * MIN);
        assert!(other.runs_on(Arch::X86_64));
        assert!(
            !other.keep_failed,
            "a failure snapshot holds secrets: never by default"
        );
        assert!(file.suite("missing").is_none());
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let text = format!("[[suite]]\nname = \"s\"\n{STEP}");
        let file = SuiteFile::parse(Path::new("runner.toml"), &text).unwrap();
        let d = &file.defaults;
        assert!(d.arch.is_empty());
        assert_eq!(
            (d.image.as_deref(), d.cpus, d.memory_mib),
            (None, None, 1024)
        );
        assert_eq!((d.timeout, d.step_timeout), (30 * MIN, None));
        // A bare file name resolves against the current directory, and comes out absolute.
        assert_eq!(file.workspace.root, std::path::absolute(".").unwrap());
        assert_eq!(file.workspace.exclude, ["target", ".git"]);
        assert_eq!(file.workspace.max_size, 1 << 30);
        let suite = &file.suites[0];
        // Without any step_timeout, a step gets its suite's timeout.
        assert_eq!(suite.timeout, 30 * MIN);
        assert_eq!(suite.steps[0].timeout, 30 * MIN);
        assert!(suite.env.is_empty() && suite.junit.is_empty() && suite.description.is_none());
    }

    #[test]
    fn memory_forms() {
        // (value as written in TOML, MiB): suffixed strings, or plain numbers of MiB.
        #[rustfmt::skip]
        let cases = [("\"1G\"", 1024), ("\"512M\"", 512), ("2048", 2048), ("\"2048\"", 2048), ("\"131072K\"", 128), ("\"64G\"", 65536)];
        for (value, want) in cases {
            let text = format!("[defaults]\nmemory = {value}\n[[suite]]\nname = \"s\"\n{STEP}");
            assert_eq!(parse(&text).unwrap().defaults.memory_mib, want, "{value}");
        }
    }

    #[test]
    fn validation_errors() {
        let suite = |extra: &str| format!("[[suite]]\nname = \"u\"\n{extra}\n{STEP}");
        let defaults = |extra: &str| format!("[defaults]\n{extra}\n{}", suite(""));
        // (what is wrong, file text, part of the message, line it is reported at or None for
        // an `Invalid` error, which has no line)
        #[rustfmt::skip]
        let cases: Vec<(&str, String, &str, Option<usize>)> = vec![
            ("no suites at all", "[defaults]\ncpus = 2\n".into(), "defines no suites", None),
            ("duplicate suite name", format!("{}{}", suite(""), suite("")), "suite 2 'u' has the same name as an earlier", Some(8)),
            ("bad name chars", "[[suite]]\nname = \"a b\"\n".into(), "suite 1 has an invalid name 'a b'", Some(2)),
            ("name too long", format!("[[suite]]\nname = \"{}\"\n{STEP}", "x".repeat(65)), "invalid name", Some(2)),
            ("no steps", "[[suite]]\nname = \"u\"\n".into(), "suite 'u' has no steps", Some(2)),
            ("empty run", suite("[[suite.step]]\nname = \"b\"\nrun = \" \""), "suite 'u' step 1 has an empty 'run'; give it the shell commands", Some(5)),
            ("empty step name", suite("[[suite.step]]\nname = \"\"\nrun = \"true\""), "step 1 needs a name", Some(4)),
            ("duplicate step name", suite(STEP), "step 2 has the same name as an earlier step", Some(8)),
            ("zero suite timeout", suite("timeout = \"0s\""), "suite 'u' timeout is zero", Some(3)),
            ("bad step timeout", format!("{}timeout = \"5 parsecs\"", suite("")), "step 'a' timeout is not a duration", Some(7)),
            ("bad default timeout", defaults("timeout = \"soon\""), "defaults.timeout is not a duration", Some(2)),
            // Once overflowed `Instant + Duration` and panicked the run.
            ("absurd suite timeout", suite("timeout = \"100y\""), "suite 'u' timeout '100y' is longer than 7 days", Some(3)),
            ("absurd step timeout", format!("{}timeout = \"8days\"", suite("")), "step 'a' timeout '8days' is longer than 7 days", Some(7)),
            ("absurd default step_timeout", defaults("step_timeout = \"1000000000000000h\""), "defaults.step_timeout", Some(2)),
            ("'..' in a junit path", suite("junit = [\"ok.xml\", \"a/../../x.xml\"]"), "junit path 'a/../../x.xml' contains '..'", Some(3)),
            ("absolute artifact path", suite("artifacts = [\"/etc/passwd\"]"), "artifacts path '/etc/passwd' is empty or absolute", Some(3)),
            ("empty artifact path", suite("artifacts = [\"\"]"), "is empty or absolute", Some(3)),
            ("invalid glob", suite("junit = [\"a[\"]"), "not a valid glob", Some(3)),
            ("'..' in an exclude", format!("[workspace]\nexclude = [\"../x\"]\n{}", suite("")), "workspace.exclude path", Some(2)),
            ("unknown arch", suite("arch = [\"mips\"]"), "unknown architecture 'mips' (supported: riscv64, aarch64, x86_64, armhf, ppc64el, s390x, i386, mips64el, mipsel)", Some(3)),
            ("memory too small", defaults("memory = \"64M\""), "defaults.memory must be a whole number of MiB in 128M..=64G", Some(2)),
            ("memory too large", defaults("memory = 65537"), "defaults.memory must be", Some(2)),
            ("memory not whole MiB", defaults("memory = \"1048577K\""), "defaults.memory must be", Some(2)),
            ("memory not a size", defaults("memory = \"lots\""), "invalid size 'lots'", Some(2)),
            ("memory of wrong type", defaults("memory = true"), "must be a size", Some(2)),
            ("too many cpus", defaults("cpus = 65"), "defaults.cpus is 65", Some(2)),
            ("empty image", defaults("image = \"\""), "defaults.image is empty", Some(2)),
            // Images are names, never paths: runner.toml comes from the repository.
            ("image is a path", defaults("image = \"../x\""), "defaults.image: '../x' is not an image name", Some(2)),
            ("image is a recipe file", defaults("image = \"/etc/x.toml\""), "'/etc/x.toml' is not an image name", Some(2)),
            ("zero max_size", format!("[workspace]\nmax_size = \"0M\"\n{}", suite("")), "max_size is zero", Some(2)),
            ("bad env key", suite("env = { 1X = \"v\" }"), "env key '1X'", Some(3)),
            ("empty host_setup command", suite("host_setup = [\"make\", \"\"]"), "empty host_setup command", Some(3)),
            ("wrong type: a serde error", suite("host_setup = \"make\""), "invalid type", Some(3)),
            ("missing run: a serde error", "[[suite]]\nname = \"u\"\n[[suite.step]]\nname = \"a\"\n".into(), "missing field `run`", Some(3)),
        ];
        for (what, text, want, line) in cases {
            let err = parse(&text).expect_err(what);
            let shown = err.to_string();
            assert!(shown.contains(want), "{what}: {shown}");
            assert!(!shown.contains('\n'), "{what}: not one line: {shown}");
            match (&err, line) {
                (SuiteError::Syntax { line: got, .. }, Some(want)) => {
                    assert_eq!(*got, want, "{what}")
                }
                (SuiteError::Invalid { .. }, None) => {}
                _ => panic!("{what}: wrong kind: {err:?}"),
            }
        }
    }

    #[test]
    fn unknown_field_points_at_it() {
        let text = format!("[[suite]]\nname = \"u\"\n{STEP}  tmeout = \"5m\"\n");
        let err = parse(&text).unwrap_err();
        assert!(
            matches!(
                err,
                SuiteError::Syntax {
                    line: 6,
                    column: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        let want = "/proj/runner.toml:6:3: unknown field `tmeout`, expected one of";
        assert!(err.to_string().starts_with(want), "{err}");
    }

    #[test]
    fn toml_syntax_error_has_line() {
        let err = parse("[[suite]]\nname = \"u\"\n\nrun = \"unterminated\n").unwrap_err();
        assert!(matches!(err, SuiteError::Syntax { line: 4, .. }), "{err:?}");
        assert!(!err.to_string().contains('\n'), "{err}");
    }

    #[test]
    fn line_column_counts_characters() {
        // (text, byte offset, 1-based line and column); "é" is two bytes but one column.
        #[rustfmt::skip]
        let cases = [("abc", 0, (1, 1)), ("abc", 2, (1, 3)), ("a\nbc", 3, (2, 2)), ("é\né=", 5, (2, 2)), ("a\n", 2, (2, 1))];
        for (text, offset, want) in cases {
            assert_eq!(line_column(text, offset), want, "{text:?}@{offset}");
        }
    }

    #[test]
    fn a_suite_asks_for_network_by_name_and_none_is_the_default() {
        let f = parse(&format!(
            "[[suite]]\nname = \"a\"\n{STEP}[[suite]]\nname = \"b\"\nnetwork = \"proxy\"\n{STEP}"
        ))
        .unwrap();
        assert_eq!(f.suites[0].network, engine::net::NetworkMode::None);
        assert_eq!(f.suites[1].network, engine::net::NetworkMode::Proxy);
        let e = parse(&format!(
            "[[suite]]\nname = \"b\"\nnetwork = \"open\"\n{STEP}"
        ))
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "/proj/runner.toml:3:11: suite 'b' network: unknown network 'open'; give none, proxy or full"
        );
    }
}
