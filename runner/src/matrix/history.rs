//! The history directory (`--history DIR`): the `results.json` of the last N runs, so each
//! run can be compared with the one before and durations can be drawn as a trend.
//!
//! Layout: `DIR/HISTORY` (a marker naming the format) and one `run-<UTC time>-<id>.json`
//! per run. A history that cannot be used never stops the matrix: a missing directory is
//! created, a foreign one (files but no marker) or one of another version gets a warning
//! and a new history beside what is there (only our own files are ever read, pruned or
//! written), an unreadable run file is skipped with a warning, and a directory that cannot
//! be read or written means this run is not kept (with a warning).

use std::path::{Path, PathBuf};

use super::results::RunResults;

/// Why a run could not be kept (the run itself is never affected).
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("no usable history directory; this run is not kept")]
    Unusable,
    #[error("cannot keep this run in {dir}")]
    Write {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

const MARKER: &str = "HISTORY";
const MARKER_TEXT: &str = "runner matrix history, format 1\n";
const RUN_PREFIX: &str = "run-";

/// The history as found at the start of a run.
#[derive(Debug)]
pub struct History {
    /// Where this run will be kept; `None` when the directory cannot be used.
    dir: Option<PathBuf>,
    /// Earlier runs, oldest first, with their file names.
    runs: Vec<(String, RunResults)>,
    /// Problems found while opening, for the user (one line each).
    pub warnings: Vec<String>,
}

impl History {
    /// No history at all (no `--history`).
    pub fn none() -> Self {
        History {
            dir: None,
            runs: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// Opens (or starts) the history in `dir`. Never fails: problems become warnings.
    pub fn open(dir: &Path) -> Self {
        let mut h = History::none();
        let shown = dir.display();
        if dir.exists() && !dir.is_dir() {
            h.warnings.push(format!(
                "history {shown} is not a directory; this run is not kept (pass a directory to --history)"
            ));
            return h;
        }
        if let Err(e) = std::fs::create_dir_all(dir) {
            h.warnings.push(format!(
                "cannot create the history directory {shown}: {e}; this run is not kept"
            ));
            return h;
        }
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e.flatten().map(|e| e.file_name()).collect::<Vec<_>>(),
            Err(e) => {
                h.warnings.push(format!(
                    "cannot read the history directory {shown}: {e}; starting without history, this run is not kept"
                ));
                return h;
            }
        };
        let marker = dir.join(MARKER);
        match std::fs::read_to_string(&marker) {
            Ok(text) if text == MARKER_TEXT => {}
            Ok(_) => h.warnings.push(format!(
                "{} is of another format; starting a new history (other files are left alone)",
                marker.display()
            )),
            Err(_) if !entries.is_empty() => h.warnings.push(format!(
                "{shown} is not a runner matrix history (no {MARKER} file); starting a new history there (other files are left alone)"
            )),
            Err(_) => {}
        }
        if let Err(e) = std::fs::write(&marker, MARKER_TEXT) {
            h.warnings.push(format!(
                "cannot write {}: {e}; this run is not kept",
                marker.display()
            ));
            return h;
        }
        let mut names: Vec<String> = entries
            .iter()
            .filter_map(|n| n.to_str())
            .filter(|n| n.starts_with(RUN_PREFIX) && n.ends_with(".json"))
            .map(String::from)
            .collect();
        // The names start with the UTC time, so they sort by age.
        names.sort();
        for name in names {
            let path = dir.join(&name);
            match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|t| RunResults::from_json(&t))
            {
                Ok(r) => h.runs.push((name, r)),
                Err(why) => h
                    .warnings
                    .push(format!("skipping history file {}: {why}", path.display())),
            }
        }
        h.dir = Some(dir.to_path_buf());
        h
    }

    /// The run to compare with: the newest complete one (a run cut short by a signal or
    /// by --fail-fast says little about the tests it did not run).
    pub fn previous(&self) -> Option<&RunResults> {
        self.runs
            .iter()
            .rev()
            .map(|(_, r)| r)
            .find(|r| r.run.complete)
    }

    /// Durations of `cell` in the kept runs, oldest first (runs where it did not run end to
    /// end are left out).
    pub fn trend(&self, cell: &str) -> Vec<f64> {
        self.runs
            .iter()
            .filter_map(|(_, r)| r.cell(cell))
            .filter(|c| c.completed())
            .map(|c| c.duration_s)
            .collect()
    }

    /// Keeps `results` and prunes to the newest `keep` runs. Returns the file written, or
    /// the reason it could not be. Only files this history read successfully are pruned.
    pub fn save(&mut self, results: &RunResults, keep: usize) -> Result<PathBuf, HistoryError> {
        let Some(dir) = &self.dir else {
            return Err(HistoryError::Unusable);
        };
        let stamp: String = results
            .run
            .started_at
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        let name = format!("{RUN_PREFIX}{stamp}-{}.json", results.run.id);
        let path = dir.join(&name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, results.to_json())
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|source| {
                let _ = std::fs::remove_file(&tmp);
                HistoryError::Write {
                    dir: dir.clone(),
                    source,
                }
            })?;
        self.runs.push((name, results.clone()));
        while self.runs.len() > keep {
            let (old, _) = self.runs.remove(0);
            let _ = std::fs::remove_file(dir.join(old));
        }
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::results::{RunInfo, SCHEMA};

    fn run(id: &str, started: &str, complete: bool) -> RunResults {
        RunResults {
            schema: SCHEMA.into(),
            version: 1,
            run: RunInfo {
                id: id.into(),
                started_at: started.into(),
                finished_at: started.into(),
                duration_s: 1.0,
                complete,
                runner_version: "0".into(),
                jobs: 1,
                retries: 0,
                fail_on: "regression".into(),
            },
            cells: Vec::new(),
            comparison: None,
        }
    }

    #[test]
    fn keeps_the_last_n_and_compares_with_the_newest_complete_run() {
        let dir = tempfile::tempdir().unwrap();
        let hdir = dir.path().join("h");
        let mut h = History::open(&hdir);
        assert!(h.warnings.is_empty(), "{:?}", h.warnings);
        assert!(h.previous().is_none());
        for (i, complete) in [(1, true), (2, true), (3, false), (4, true)] {
            h.save(
                &run(
                    &format!("r{i}"),
                    &format!("2026-11-0{i}T01:00:00Z"),
                    complete,
                ),
                3,
            )
            .unwrap();
        }
        let h = History::open(&hdir);
        assert!(h.warnings.is_empty(), "{:?}", h.warnings);
        let ids: Vec<_> = h.runs.iter().map(|(_, r)| r.run.id.as_str()).collect();
        assert_eq!(ids, ["r2", "r3", "r4"]);
        assert_eq!(h.previous().unwrap().run.id, "r4");
    }

    #[test]
    fn a_foreign_or_broken_history_warns_and_never_fails() {
        let dir = tempfile::tempdir().unwrap();
        // Someone else's directory: their files stay, we start our own history beside them.
        std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        std::fs::write(dir.path().join("run-0-x.json"), "{ not json").unwrap();
        let mut h = History::open(dir.path());
        assert!(
            h.warnings
                .iter()
                .any(|w| w.contains("not a runner matrix history")),
            "{:?}",
            h.warnings
        );
        assert!(h
            .warnings
            .iter()
            .any(|w| w.contains("skipping history file")));
        assert!(h.previous().is_none());
        h.save(&run("a", "2026-11-01T00:00:00Z", true), 1).unwrap();
        h.save(&run("b", "2026-11-02T00:00:00Z", true), 1).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("notes.txt")).unwrap(),
            "mine"
        );
        assert!(
            dir.path().join("run-0-x.json").exists(),
            "not ours to prune"
        );
        // A file instead of a directory: a warning, and nothing is kept.
        let file = dir.path().join("notes.txt");
        let mut h = History::open(&file);
        assert!(
            h.warnings[0].contains("not a directory"),
            "{:?}",
            h.warnings
        );
        assert!(h.save(&run("c", "x", true), 3).is_err());
    }
}
