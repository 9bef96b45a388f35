//! The matrix file (e.g. `nightly.toml`): its format, parsing, and expansion into cells.
//!
//! A *cell* is one suite × architecture × image. The file names the axes; the cells are their
//! product, minus `exclude` entries, plus `include` entries — in the spirit of GitHub
//! Actions' `strategy.matrix`:
//!
//! ```toml
//! suites_file = "runner.toml"            # default: runner.toml next to this file
//! suites = ["smoke", "unit"]             # default: every suite of the suites file
//! arch = ["riscv64", "aarch64"]          # default: the suites file's [defaults] arch
//! image = ["debian-13"]                  # default: the suites file's [defaults] image
//! timeout = "20m"                        # per cell (default: each suite's own)
//! retries = 1                            # re-runs of a failing cell (default 1)
//! fail_on = "regression"                 # regression | failure | never
//! cpus = 2                               # per VM (default: the suites file's)
//! memory = "1G"
//!
//! [[exclude]]                            # drops every cell matching all keys given
//! suite = "unit"
//! arch = "riscv64"
//!
//! [[include]]                            # sets `timeout` on every cell matching all keys
//! suite = "smoke"                        # given, or, when none matches, adds the cell
//! arch = "x86_64"                        # (suite and arch are then required)
//! timeout = "40m"
//!
//! [history]
//! keep = 30                              # runs kept in --history DIR
//! slowdown_percent = 25                  # a cell this much slower than last time ...
//! slowdown_min = "10s"                   # ... and at least this much is a slowdown
//! ```
//!
//! Excludes apply to the product, then includes (as GitHub does), so an include can bring
//! back an excluded cell. Suites limited to some architectures in `runner.toml`
//! (`[[suite]] arch`) get no cells on the others. Like the suite file, parsing is two
//! stages: serde into `Raw*` (unknown keys are errors), then validation into typed values.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use engine::size::Memory;
use engine::Arch;
use serde::{Deserialize, Serialize};

use crate::suite::{self, SuiteFile};

/// Default number of re-runs of a failing cell: one, so that flaky tests are told apart
/// from broken ones without doubling the time of a matrix that is really red.
pub const DEFAULT_RETRIES: u32 = 1;
/// Most re-runs allowed (each costs a full cell).
pub const MAX_RETRIES: u32 = 10;
/// Runs kept in a history directory by default (a month of nightlies).
pub const DEFAULT_KEEP: usize = 30;
pub const DEFAULT_SLOWDOWN_PERCENT: u32 = 25;
pub const DEFAULT_SLOWDOWN_MIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    #[error("cannot read the matrix file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `at` is `:LINE:COLUMN` when toml knows where, else empty.
    #[error("{}{at}: {message}", path.display())]
    Parse {
        path: PathBuf,
        at: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error(transparent)]
    Suites(#[from] suite::SuiteError),
}

/// What makes a run fail (the exit status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FailOn {
    /// Only a new failure since the previous run (the default: a matrix already red does
    /// not page anyone again).
    #[default]
    Regression,
    /// Any cell that did not pass (flaky cells passed in the end and do not count).
    Failure,
    /// Never: the reports say what happened.
    Never,
}

impl FailOn {
    pub fn name(self) -> &'static str {
        match self {
            FailOn::Regression => "regression",
            FailOn::Failure => "failure",
            FailOn::Never => "never",
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMatrix {
    suites_file: Option<PathBuf>,
    suites: Option<Vec<String>>,
    arch: Option<Vec<String>>,
    image: Option<Vec<String>>,
    timeout: Option<String>,
    retries: Option<u32>,
    fail_on: Option<FailOn>,
    cpus: Option<u32>,
    memory: Option<String>,
    #[serde(default)]
    include: Vec<RawEntry>,
    #[serde(default)]
    exclude: Vec<RawEntry>,
    history: Option<RawHistory>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    suite: Option<String>,
    arch: Option<String>,
    image: Option<String>,
    timeout: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHistory {
    keep: Option<usize>,
    slowdown_percent: Option<u32>,
    slowdown_min: Option<String>,
}

/// Settings of the history comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistorySettings {
    pub keep: usize,
    pub slowdown_percent: u32,
    pub slowdown_min: Duration,
}

impl Default for HistorySettings {
    fn default() -> Self {
        HistorySettings {
            keep: DEFAULT_KEEP,
            slowdown_percent: DEFAULT_SLOWDOWN_PERCENT,
            slowdown_min: DEFAULT_SLOWDOWN_MIN,
        }
    }
}

/// A selector from `include` / `exclude`: each key given must match.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    pub suite: Option<String>,
    pub arch: Option<Arch>,
    pub image: Option<String>,
    pub timeout: Option<Duration>,
}

impl Selector {
    fn matches(&self, cell: &Cell) -> bool {
        self.suite.as_ref().is_none_or(|s| *s == cell.suite)
            && self.arch.is_none_or(|a| a == cell.arch)
            && self.image.as_ref().is_none_or(|i| *i == cell.image)
    }
}

/// A validated matrix file (axes not yet expanded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatrixSpec {
    /// Where the matrix came from (for messages): the file, or "the command line".
    pub origin: String,
    pub suites_file: PathBuf,
    /// Empty: every suite of the suites file.
    pub suites: Vec<String>,
    /// Empty: the suites file's default architectures.
    pub arches: Vec<Arch>,
    /// Empty: the suites file's default image.
    pub images: Vec<String>,
    pub timeout: Option<Duration>,
    pub retries: u32,
    pub fail_on: FailOn,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub include: Vec<Selector>,
    pub exclude: Vec<Selector>,
    pub history: HistorySettings,
}

impl MatrixSpec {
    /// The matrix used without a file: every suite of `suites_file`.
    pub fn from_suites_file(suites_file: PathBuf) -> Self {
        MatrixSpec {
            origin: "the command line".into(),
            suites_file,
            suites: Vec::new(),
            arches: Vec::new(),
            images: Vec::new(),
            timeout: None,
            retries: DEFAULT_RETRIES,
            fail_on: FailOn::default(),
            cpus: None,
            memory_mib: None,
            include: Vec::new(),
            exclude: Vec::new(),
            history: HistorySettings::default(),
        }
    }

    pub fn load(path: &Path) -> Result<Self, MatrixError> {
        let text = std::fs::read_to_string(path).map_err(|source| MatrixError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, MatrixError> {
        let raw: RawMatrix = toml::from_str(text).map_err(|e| {
            let (at, message) = suite::toml_error(text, &e);
            MatrixError::Parse {
                path: path.into(),
                at: at
                    .map(|(line, column)| format!(":{line}:{column}"))
                    .unwrap_or_default(),
                message,
            }
        })?;
        let origin = path.display().to_string();
        let invalid = |message: String| MatrixError::Invalid {
            path: origin.clone(),
            message,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let suites_file = dir.join(
            raw.suites_file
                .unwrap_or_else(|| PathBuf::from(suite::SUITE_FILE_NAME)),
        );
        let arches = raw
            .arch
            .unwrap_or_default()
            .iter()
            .map(|a| parse_arch(a).map_err(&invalid))
            .collect::<Result<Vec<_>, _>>()?;
        let timeout = raw
            .timeout
            .as_deref()
            .map(|t| parse_duration("timeout", t).map_err(&invalid))
            .transpose()?;
        let retries = raw.retries.unwrap_or(DEFAULT_RETRIES);
        if retries > MAX_RETRIES {
            return Err(invalid(format!(
                "retries = {retries} is more than {MAX_RETRIES}"
            )));
        }
        if let Some(c) = raw.cpus {
            if !(1..=64).contains(&c) {
                return Err(invalid(format!("cpus = {c} must be between 1 and 64")));
            }
        }
        let memory_mib = raw
            .memory
            .as_deref()
            .map(|m| match Memory::parse(m) {
                Ok(m) => Ok(m.mib()),
                Err(e) => Err(invalid(format!("memory = '{m}': {e}"))),
            })
            .transpose()?;
        let selector = |e: &RawEntry, what: &str| -> Result<Selector, MatrixError> {
            if e.suite.is_none() && e.arch.is_none() && e.image.is_none() {
                return Err(invalid(format!(
                    "an [[{what}]] entry names no suite, arch or image"
                )));
            }
            Ok(Selector {
                suite: e.suite.clone(),
                arch: e
                    .arch
                    .as_deref()
                    .map(|a| parse_arch(a).map_err(&invalid))
                    .transpose()?,
                image: e.image.clone(),
                timeout: e
                    .timeout
                    .as_deref()
                    .map(|t| parse_duration("timeout", t).map_err(&invalid))
                    .transpose()?,
            })
        };
        let exclude = raw
            .exclude
            .iter()
            .map(|e| {
                if e.timeout.is_some() {
                    return Err(invalid("an [[exclude]] entry cannot set a timeout".into()));
                }
                selector(e, "exclude")
            })
            .collect::<Result<Vec<_>, _>>()?;
        let include = raw
            .include
            .iter()
            .map(|e| selector(e, "include"))
            .collect::<Result<Vec<_>, _>>()?;
        let h = raw.history.unwrap_or_default();
        let history = HistorySettings {
            keep: h.keep.unwrap_or(DEFAULT_KEEP),
            slowdown_percent: h.slowdown_percent.unwrap_or(DEFAULT_SLOWDOWN_PERCENT),
            slowdown_min: h
                .slowdown_min
                .as_deref()
                .map(|t| parse_duration("history.slowdown_min", t).map_err(&invalid))
                .transpose()?
                .unwrap_or(DEFAULT_SLOWDOWN_MIN),
        };
        if history.keep == 0 {
            return Err(invalid("history.keep must be at least 1".into()));
        }
        Ok(MatrixSpec {
            origin,
            suites_file,
            suites: raw.suites.unwrap_or_default(),
            arches,
            images: raw.image.unwrap_or_default(),
            timeout,
            retries,
            fail_on: raw.fail_on.unwrap_or_default(),
            cpus: raw.cpus,
            memory_mib,
            include,
            exclude,
            history,
        })
    }

    /// The cells of this matrix for `file` (the suites file it names), in a stable order
    /// (suite, then arch, then image, as listed). Checks every suite, image and axis.
    pub fn expand(
        &self,
        file: &SuiteFile,
        // Ok when the image can be used, else the one-line reason.
        image_check: &dyn Fn(&str) -> Result<(), String>,
    ) -> Result<Vec<Cell>, MatrixError> {
        let invalid = |message: String| MatrixError::Invalid {
            path: self.origin.clone(),
            message,
        };
        let known: Vec<&str> = file.suites.iter().map(|s| s.name.as_str()).collect();
        let check_suite = |name: &str| {
            if known.contains(&name) {
                Ok(())
            } else {
                Err(invalid(format!(
                    "no suite named '{name}' in {} (suites: {})",
                    file.path.display(),
                    known.join(", ")
                )))
            }
        };
        let suites: Vec<String> = if self.suites.is_empty() {
            known.iter().map(|s| s.to_string()).collect()
        } else {
            for s in &self.suites {
                check_suite(s)?;
            }
            self.suites.clone()
        };
        let arches = if self.arches.is_empty() {
            file.defaults.arch.clone()
        } else {
            self.arches.clone()
        };
        if arches.is_empty() {
            return Err(invalid(format!(
                "no architecture: set `arch` in the matrix file, pass --arch, or set [defaults] arch in {}",
                file.path.display()
            )));
        }
        // Images named by the matrix or the suites file; otherwise each arch's default.
        let named_images: Option<Vec<String>> = if self.images.is_empty() {
            file.defaults.image.as_ref().map(|i| vec![i.to_string()])
        } else {
            Some(self.images.clone())
        };
        let images_for = |arch: Arch| {
            named_images
                .clone()
                .unwrap_or_else(|| vec![arch.default_image().to_string()])
        };
        for sel in self.include.iter().chain(&self.exclude) {
            if let Some(s) = &sel.suite {
                check_suite(s)?;
            }
        }
        let mut all_images: BTreeSet<String> = arches.iter().flat_map(|&a| images_for(a)).collect();
        all_images.extend(self.include.iter().filter_map(|s| s.image.clone()));
        for image in &all_images {
            image_check(image).map_err(invalid)?;
        }

        let runs_on = |suite: &str, arch: Arch| file.suite(suite).is_some_and(|s| s.runs_on(arch));
        let mut cells = Vec::new();
        for suite in &suites {
            for &arch in &arches {
                for image in &images_for(arch) {
                    let cell = Cell {
                        suite: suite.clone(),
                        arch,
                        image: image.clone(),
                        timeout: self.timeout,
                    };
                    if runs_on(suite, arch) && !self.exclude.iter().any(|x| x.matches(&cell)) {
                        cells.push(cell);
                    }
                }
            }
        }
        for inc in &self.include {
            let mut matched = false;
            for cell in cells.iter_mut().filter(|c| inc.matches(c)) {
                matched = true;
                if inc.timeout.is_some() {
                    cell.timeout = inc.timeout;
                }
            }
            if matched {
                continue;
            }
            let (Some(suite), Some(arch)) = (&inc.suite, inc.arch) else {
                return Err(invalid(format!(
                    "an [[include]] entry ({}) matches no cell, and needs both suite and arch to add one",
                    inc.describe()
                )));
            };
            if !runs_on(suite, arch) {
                return Err(invalid(format!(
                    "an [[include]] entry adds suite '{suite}' on {arch}, but {} limits that suite to other architectures",
                    file.path.display()
                )));
            }
            cells.push(Cell {
                suite: suite.clone(),
                arch,
                image: inc
                    .image
                    .clone()
                    .unwrap_or_else(|| images_for(arch)[0].clone()),
                timeout: inc.timeout.or(self.timeout),
            });
        }
        if cells.is_empty() {
            return Err(invalid(
                "the matrix is empty: no cell is left after exclude/include and the suites' own arch limits; check [[exclude]] and the suites' arch lists".into(),
            ));
        }
        Ok(cells)
    }
}

impl Selector {
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = &self.suite {
            parts.push(format!("suite {s}"));
        }
        if let Some(a) = self.arch {
            parts.push(format!("arch {a}"));
        }
        if let Some(i) = &self.image {
            parts.push(format!("image {i}"));
        }
        parts.join(", ")
    }
}

/// One suite × architecture × image to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    pub suite: String,
    pub arch: Arch,
    pub image: String,
    /// Overrides the suite's timeout.
    pub timeout: Option<Duration>,
}

impl Cell {
    /// The stable identity of a cell across runs: `suite/arch/image`.
    pub fn key(&self) -> String {
        cell_key(&self.suite, self.arch.name(), &self.image)
    }
}

pub fn cell_key(suite: &str, arch: &str, image: &str) -> String {
    format!("{suite}/{arch}/{image}")
}

fn parse_arch(a: &str) -> Result<Arch, String> {
    a.trim().parse::<Arch>().map_err(|e| e.to_string())
}

fn parse_duration(what: &str, t: &str) -> Result<Duration, String> {
    match humantime::parse_duration(t) {
        Ok(d) if d > Duration::ZERO => Ok(d),
        _ => Err(format!("{what} = '{t}' is not a duration like 90s or 10m")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_file_names_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let e = MatrixSpec::load(&dir.path().join("nope.toml")).unwrap_err();
        let line = crate::outcome::chain(&e);
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert_eq!(line.matches(&cause).count(), 1, "{line}");
    }

    const SUITES: &str = r#"
[defaults]
arch = ["riscv64"]

[[suite]]
name = "smoke"
  [[suite.step]]
  name = "a"
  run = "true"

[[suite]]
name = "unit"
  [[suite.step]]
  name = "a"
  run = "true"

[[suite]]
name = "x86only"
arch = ["x86_64"]
  [[suite.step]]
  name = "a"
  run = "true"
"#;

    fn suites() -> SuiteFile {
        SuiteFile::parse(Path::new("/p/runner.toml"), SUITES).unwrap()
    }

    fn expand(matrix: &str) -> Result<Vec<String>, String> {
        let spec =
            MatrixSpec::parse(Path::new("/p/nightly.toml"), matrix).map_err(|e| e.to_string())?;
        let known = |i: &str| match i {
            "debian-13" | "custom" => Ok(()),
            _ => Err(format!("unknown image '{i}'")),
        };
        spec.expand(&suites(), &known)
            .map(|cells| cells.iter().map(Cell::key).collect())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn expansion_include_exclude() {
        // (matrix file, expected cells or an error fragment)
        let cases: &[(&str, Result<&[&str], &str>)] = &[
            // Defaults: every suite that runs on the suites file's default arch and image.
            ("", Ok(&["smoke/riscv64/debian-13", "unit/riscv64/debian-13"])),
            // The product of the axes, in order; suites limited to other arches drop out.
            (
                "arch = ['riscv64', 'x86_64']",
                Ok(&[
                    "smoke/riscv64/debian-13",
                    "smoke/x86_64/debian-13",
                    "unit/riscv64/debian-13",
                    "unit/x86_64/debian-13",
                    "x86only/x86_64/debian-13",
                ]),
            ),
            // Exclude with a partial key drops every matching cell.
            (
                "suites = ['smoke', 'unit']\narch = ['riscv64', 'aarch64']\n[[exclude]]\narch = 'aarch64'\nsuite = 'unit'",
                Ok(&[
                    "smoke/riscv64/debian-13",
                    "smoke/aarch64/debian-13",
                    "unit/riscv64/debian-13",
                ]),
            ),
            // Include adds a cell no axis produced (here: another image) ...
            (
                "suites = ['smoke']\n[[include]]\nsuite = 'smoke'\narch = 'aarch64'\nimage = 'custom'",
                Ok(&["smoke/riscv64/debian-13", "smoke/aarch64/custom"]),
            ),
            // ... and brings back an excluded one (includes come after excludes).
            (
                "suites = ['smoke']\n[[exclude]]\nsuite = 'smoke'\n[[include]]\nsuite = 'smoke'\narch = 'riscv64'",
                Ok(&["smoke/riscv64/debian-13"]),
            ),
            // An include matching existing cells only sets their timeout: no new cell.
            (
                "[[include]]\nsuite = 'unit'\ntimeout = '5m'",
                Ok(&["smoke/riscv64/debian-13", "unit/riscv64/debian-13"]),
            ),
            // Everything excluded: an error, not an empty success.
            ("[[exclude]]\narch = 'riscv64'", Err("the matrix is empty")),
            // Bad input names the culprit.
            ("arch = ['mips']", Err("mips")),
            ("suites = ['nope']", Err("no suite named 'nope'")),
            ("[[exclude]]\nsuite = 'nope'", Err("no suite named 'nope'")),
            ("image = ['debian-99']", Err("unknown image 'debian-99'")),
            ("colour = 'red'", Err("nightly.toml:1:1: unknown field `colour`")),
            ("[[include]]\nimage = 'custom'", Err("needs both suite and arch")),
            (
                "[[include]]\nsuite = 'x86only'\narch = 'riscv64'",
                Err("limits that suite"),
            ),
            ("[[exclude]]\ntimeout = '1m'", Err("cannot set a timeout")),
            ("retries = 99", Err("retries = 99")),
        ];
        for (matrix, want) in cases {
            let got = expand(matrix);
            match want {
                Ok(cells) => assert_eq!(
                    got,
                    Ok(cells.iter().map(|c| c.to_string()).collect()),
                    "{matrix}"
                ),
                Err(fragment) => {
                    let err = got.expect_err(matrix);
                    assert!(err.contains(fragment), "{matrix}: {err}");
                }
            }
        }
    }

    #[test]
    fn include_sets_the_timeout_of_matching_cells() {
        let spec = MatrixSpec::parse(
            Path::new("/p/nightly.toml"),
            "timeout = '10m'\n[[include]]\nsuite = 'unit'\ntimeout = '5m'",
        )
        .unwrap();
        let cells = spec.expand(&suites(), &|_| Ok(())).unwrap();
        let timeouts: Vec<_> = cells.iter().map(|c| c.timeout).collect();
        assert_eq!(
            timeouts,
            [
                Some(Duration::from_secs(600)),
                Some(Duration::from_secs(300))
            ]
        );
    }

    #[test]
    fn settings_and_defaults() {
        let spec = MatrixSpec::parse(
            Path::new("/p/nightly.toml"),
            "fail_on = 'never'\nretries = 2\n[history]\nkeep = 5\nslowdown_min = '1m'",
        )
        .unwrap();
        assert_eq!(spec.fail_on, FailOn::Never);
        assert_eq!(spec.retries, 2);
        assert_eq!(spec.history.keep, 5);
        assert_eq!(spec.history.slowdown_min, Duration::from_secs(60));
        assert_eq!(spec.history.slowdown_percent, 25);
        assert_eq!(spec.suites_file, Path::new("/p/runner.toml"));
        let d = MatrixSpec::parse(Path::new("/p/n.toml"), "").unwrap();
        assert_eq!(d.retries, DEFAULT_RETRIES);
        assert_eq!(d.fail_on, FailOn::Regression);
    }
}
