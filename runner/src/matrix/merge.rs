//! The shards of one matrix run put back together: each `runner matrix --shard K/N` writes
//! `shard.json` beside its own reports (its cells as they ran, before any comparison, and
//! the whole split), and `runner matrix merge` reads every shard's, checks that they are
//! the N parts of one matrix — the same fingerprint, the same split, each part exactly
//! once — and hands back the run as an unsharded run would have produced it: every cell in
//! the matrix's order, compared with the history only afterwards, on the merging host.
//!
//! # `shard.json`, schema `runner-matrix-shard` version 1
//!
//! ```text
//! { "schema": "runner-matrix-shard", "version": 1,
//!   "shard": { "index": K, "count": N }, "matrix": fingerprint (hex), "origin",
//!   "split": [ { "key", "shard" } ] (every cell of the matrix, in its order),
//!   "fail_on", "history": { "keep", "slowdown_percent", "slowdown_min_ms" },
//!   "interrupted", "run": (as in results.json), "cells": (as in results.json, this
//!   shard's, with no "change", "slowdown", "trend_s" or "comparison" yet) }
//! ```

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::results::{CellResult, RunInfo, RunResults, SCHEMA, VERSION};
use super::shard::Shard;
use super::spec::{FailOn, HistorySettings};

pub const SHARD_FILE: &str = "shard.json";
pub const SHARD_SCHEMA: &str = "runner-matrix-shard";
pub const SHARD_VERSION: u32 = 1;
/// Largest `shard.json` read (thousands of tests with their log tails fit many times).
pub const MAX_SHARD_FILE: u64 = 256 << 20;

/// One cell of the split: which shard runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    pub key: String,
    pub shard: u32,
}

/// The history settings a shard ran with, for the merge's comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    pub keep: usize,
    pub slowdown_percent: u32,
    pub slowdown_min_ms: u64,
}

impl From<HistorySettings> for HistoryRecord {
    fn from(h: HistorySettings) -> Self {
        HistoryRecord {
            keep: h.keep,
            slowdown_percent: h.slowdown_percent,
            slowdown_min_ms: h.slowdown_min.as_millis() as u64,
        }
    }
}

impl From<HistoryRecord> for HistorySettings {
    fn from(h: HistoryRecord) -> Self {
        HistorySettings {
            keep: h.keep.max(1),
            slowdown_percent: h.slowdown_percent,
            slowdown_min: Duration::from_millis(h.slowdown_min_ms),
        }
    }
}

/// What one shard leaves for the merge: exactly `shard.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub schema: String,
    pub version: u32,
    pub shard: Shard,
    /// The matrix's fingerprint ([`super::shard::fingerprint`]).
    pub matrix: String,
    /// Where the matrix came from, for people.
    pub origin: String,
    pub split: Vec<Assigned>,
    pub fail_on: FailOn,
    pub history: HistoryRecord,
    /// Cancelled by a signal: its cells that did not run are cancelled.
    pub interrupted: bool,
    pub run: RunInfo,
    pub cells: Vec<CellResult>,
}

impl ShardRecord {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a shard record serialises")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("{dir} is not a matrix shard: it has no {SHARD_FILE} (pass the --out directory of each `runner matrix --shard K/N` run)")]
    NotAShard { dir: String },
    #[error("cannot read the shard file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a usable shard file: {why}")]
    Malformed { path: String, why: String },
    #[error("{a} and {b} are shards of different matrices (another matrix or suites file, --arch, or setting): merge the shards of one run")]
    DifferentMatrices { a: String, b: String },
    #[error("{a} is shard {sa} and {b} is shard {sb}: shards of a split into another number of parts cannot be merged")]
    DifferentCounts {
        a: String,
        sa: Shard,
        b: String,
        sb: Shard,
    },
    #[error("{a} and {b} split the matrix differently (they saw different histories): run every shard with the same --history")]
    DifferentSplits { a: String, b: String },
    #[error("shard {shard} is given twice ({a} and {b}): pass each shard's directory once")]
    Twice { shard: Shard, a: String, b: String },
    #[error("shard {missing} is missing: pass the directories of all {count} shards")]
    Missing { missing: Shard, count: u32 },
    #[error("{path}: its cells do not match its part of the split (cell {key})")]
    Inconsistent { path: String, key: String },
}

/// Reads `DIR/shard.json` (bounded), checking its schema.
pub fn read_shard(dir: &Path) -> Result<ShardRecord, MergeError> {
    let path = dir.join(SHARD_FILE);
    let shown = path.display().to_string();
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(MergeError::NotAShard {
                dir: dir.display().to_string(),
            })
        }
        Err(source) => {
            return Err(MergeError::Read {
                path: shown,
                source,
            })
        }
    };
    let mut text = String::new();
    file.take(MAX_SHARD_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|source| MergeError::Read {
            path: shown.clone(),
            source,
        })?;
    let malformed = |why: String| MergeError::Malformed {
        path: shown.clone(),
        why,
    };
    if text.len() as u64 > MAX_SHARD_FILE {
        return Err(malformed(format!(
            "larger than {} MiB",
            MAX_SHARD_FILE >> 20
        )));
    }
    #[derive(Deserialize)]
    struct Head {
        schema: Option<String>,
        version: Option<u32>,
    }
    let head: Head =
        serde_json::from_str(&text).map_err(|e| malformed(format!("not JSON: {e}")))?;
    if head.schema.as_deref() != Some(SHARD_SCHEMA) {
        return Err(malformed(format!("not a {SHARD_SCHEMA} file")));
    }
    if head.version != Some(SHARD_VERSION) {
        return Err(malformed(format!(
            "schema version {} (this runner reads {SHARD_VERSION})",
            head.version.map_or("?".into(), |v| v.to_string())
        )));
    }
    serde_json::from_str(&text).map_err(|e| malformed(format!("malformed: {e}")))
}

/// The shards put together: the run as the unsharded run would report it, before the
/// comparison with the history.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    pub results: RunResults,
    pub origin: String,
    pub count: u32,
    pub fail_on: FailOn,
    pub history: HistorySettings,
    pub interrupted: bool,
}

/// Merges the shards (each with the directory it came from, for messages) into one run
/// with this `id`.
pub fn merge(shards: Vec<(PathBuf, ShardRecord)>, id: String) -> Result<Merged, MergeError> {
    let name = |p: &Path| p.display().to_string();
    let Some((first_dir, first)) = shards.first() else {
        return Err(MergeError::Missing {
            missing: Shard { index: 1, count: 1 },
            count: 1,
        });
    };
    let mut by_index: BTreeMap<u32, (&Path, &ShardRecord)> = BTreeMap::new();
    for (dir, s) in &shards {
        if s.matrix != first.matrix {
            return Err(MergeError::DifferentMatrices {
                a: name(first_dir),
                b: name(dir),
            });
        }
        if s.shard.count != first.shard.count {
            return Err(MergeError::DifferentCounts {
                a: name(first_dir),
                sa: first.shard,
                b: name(dir),
                sb: s.shard,
            });
        }
        if s.split != first.split {
            return Err(MergeError::DifferentSplits {
                a: name(first_dir),
                b: name(dir),
            });
        }
        if let Some((other, _)) = by_index.insert(s.shard.index, (dir, s)) {
            return Err(MergeError::Twice {
                shard: s.shard,
                a: name(other),
                b: name(dir),
            });
        }
    }
    let count = first.shard.count;
    if let Some(missing) = (1..=count).find(|k| !by_index.contains_key(k)) {
        return Err(MergeError::Missing {
            missing: Shard {
                index: missing,
                count,
            },
            count,
        });
    }
    // Each shard must hold exactly its part of the split, each cell once.
    let mut cells: BTreeMap<&str, &CellResult> = BTreeMap::new();
    for (dir, s) in by_index.values() {
        let inconsistent = |key: &str| MergeError::Inconsistent {
            path: dir.join(SHARD_FILE).display().to_string(),
            key: key.to_string(),
        };
        for c in &s.cells {
            let assigned = first.split.iter().find(|a| a.key == c.key);
            if assigned.is_none_or(|a| a.shard != s.shard.index)
                || cells.insert(&c.key, c).is_some()
            {
                return Err(inconsistent(&c.key));
            }
        }
        if let Some(a) = first
            .split
            .iter()
            .find(|a| a.shard == s.shard.index && !s.cells.iter().any(|c| c.key == a.key))
        {
            return Err(inconsistent(&a.key));
        }
    }
    let runs: Vec<&RunInfo> = by_index.values().map(|(_, s)| &s.run).collect();
    // RFC 3339 UTC times of one format: their text sorts by time.
    let started_at = runs.iter().map(|r| &r.started_at).min().expect("a shard");
    let finished_at = runs.iter().map(|r| &r.finished_at).max().expect("a shard");
    let span = humantime::parse_rfc3339(started_at)
        .ok()
        .zip(humantime::parse_rfc3339(finished_at).ok())
        .and_then(|(s, f)| f.duration_since(s).ok())
        .map(|d| d.as_secs_f64());
    let longest = runs.iter().map(|r| r.duration_s).fold(0.0, f64::max);
    let interrupted = by_index.values().any(|(_, s)| s.interrupted);
    let results = RunResults {
        schema: SCHEMA.into(),
        version: VERSION,
        run: RunInfo {
            id,
            started_at: started_at.clone(),
            finished_at: finished_at.clone(),
            // The whole run's wall time: from the first shard's start to the last one's
            // end (whole seconds), at least the longest shard's.
            duration_s: span.unwrap_or(0.0).max(longest),
            complete: !interrupted && runs.iter().all(|r| r.complete),
            runner_version: first.run.runner_version.clone(),
            // Cells that ran at once, over all hosts.
            jobs: runs.iter().map(|r| r.jobs).sum(),
            retries: first.run.retries,
            fail_on: first.fail_on.name().into(),
        },
        cells: first
            .split
            .iter()
            .map(|a| cells[a.key.as_str()].clone())
            .collect(),
        comparison: None,
    };
    Ok(Merged {
        results,
        origin: first.origin.clone(),
        count,
        fail_on: first.fail_on,
        history: first.history.into(),
        interrupted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::results::Status;

    fn cell(key: &str) -> CellResult {
        CellResult {
            key: key.into(),
            suite: key.into(),
            arch: "riscv64".into(),
            image: "debian-13".into(),
            status: Status::Passed,
            outcome: "passed".into(),
            message: None,
            duration_s: 1.0,
            total_s: 1.0,
            attempts: 1,
            accelerator: "tcg".into(),
            qemu_version: String::new(),
            kernel_version: String::new(),
            tests: Vec::new(),
            slowdown: None,
            trend_s: Vec::new(),
        }
    }

    /// Shard `index` of a 4-cell matrix split a, b → 1 and c, d → 2.
    fn shard(index: u32, started: &str, finished: &str) -> (PathBuf, ShardRecord) {
        let split: Vec<Assigned> = [("a", 1), ("c", 2), ("b", 1), ("d", 2)]
            .iter()
            .map(|(k, s)| Assigned {
                key: k.to_string(),
                shard: *s,
            })
            .collect();
        let cells = split
            .iter()
            .filter(|a| a.shard == index)
            .map(|a| cell(&a.key))
            .collect();
        let record = ShardRecord {
            schema: SHARD_SCHEMA.into(),
            version: SHARD_VERSION,
            shard: Shard { index, count: 2 },
            matrix: "f00d".into(),
            origin: "nightly.toml".into(),
            split,
            fail_on: FailOn::Failure,
            history: HistorySettings::default().into(),
            interrupted: false,
            run: RunInfo {
                id: format!("s{index}"),
                started_at: started.into(),
                finished_at: finished.into(),
                duration_s: 60.0,
                complete: true,
                runner_version: "0.1.0".into(),
                jobs: 2,
                retries: 1,
                fail_on: "failure".into(),
            },
            cells,
        };
        (PathBuf::from(format!("shard-{index}")), record)
    }

    #[test]
    fn shards_merge_into_the_matrix_order_with_the_whole_runs_times() {
        let m = merge(
            vec![
                shard(2, "2026-12-01T02:00:30Z", "2026-12-01T02:05:00Z"),
                shard(1, "2026-12-01T02:00:00Z", "2026-12-01T02:03:00Z"),
            ],
            "merged".into(),
        )
        .unwrap();
        let keys: Vec<_> = m.results.cells.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["a", "c", "b", "d"], "the split's (matrix) order");
        assert_eq!(m.results.run.id, "merged");
        assert_eq!(m.results.run.started_at, "2026-12-01T02:00:00Z");
        assert_eq!(m.results.run.finished_at, "2026-12-01T02:05:00Z");
        assert_eq!(m.results.run.duration_s, 300.0);
        assert_eq!(m.results.run.jobs, 4);
        assert!(m.results.run.complete);
        assert_eq!(m.fail_on, FailOn::Failure);
        assert_eq!(m.count, 2);
        // Written and read back through shard.json: the same record.
        let dir = tempfile::tempdir().unwrap();
        let (_, s) = shard(1, "2026-12-01T02:00:00Z", "2026-12-01T02:03:00Z");
        std::fs::write(dir.path().join(SHARD_FILE), s.to_json()).unwrap();
        assert_eq!(read_shard(dir.path()).unwrap(), s);
    }

    #[test]
    fn shards_that_are_not_the_parts_of_one_run_are_refused() {
        let t = ("2026-12-01T02:00:00Z", "2026-12-01T02:03:00Z");
        let s = |i| shard(i, t.0, t.1);
        let other_matrix = {
            let mut x = s(2);
            x.1.matrix = "beef".into();
            x
        };
        let three_parts = {
            let mut x = s(2);
            x.1.shard.count = 3;
            x
        };
        let other_split = {
            let mut x = s(2);
            x.1.split[0].shard = 2;
            x
        };
        let extra_cell = {
            let mut x = s(2);
            x.1.cells.push(cell("a"));
            x
        };
        let lost_cell = {
            let mut x = s(2);
            x.1.cells.pop();
            x
        };
        let interrupted = {
            let mut x = s(2);
            x.1.interrupted = true;
            x
        };
        // (shards, what the one-line message says)
        let cases: Vec<(Vec<(PathBuf, ShardRecord)>, &str)> = vec![
            (
                vec![s(1), other_matrix],
                "shard-1 and shard-2 are shards of different matrices",
            ),
            (
                vec![s(1), three_parts],
                "shard-1 is shard 1/2 and shard-2 is shard 2/3",
            ),
            (vec![s(1), other_split], "split the matrix differently"),
            (
                vec![s(1), s(1)],
                "shard 1/2 is given twice (shard-1 and shard-1)",
            ),
            (vec![s(1)], "shard 2/2 is missing"),
            (vec![s(2)], "shard 1/2 is missing"),
            (
                vec![s(1), extra_cell],
                "do not match its part of the split (cell a)",
            ),
            (
                vec![s(1), lost_cell],
                "do not match its part of the split (cell d)",
            ),
        ];
        for (shards, want) in cases {
            let msg = merge(shards, "x".into()).unwrap_err().to_string();
            assert!(msg.contains(want) && !msg.contains('\n'), "{want}: {msg}");
        }
        // An interrupted shard merges, but the run is not complete (not a baseline).
        let m = merge(vec![s(1), interrupted], "x".into()).unwrap();
        assert!(m.interrupted && !m.results.run.complete);
    }

    #[test]
    fn a_directory_that_is_not_a_shard_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let msg = read_shard(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("is not a matrix shard"), "{msg}");
        // A results.json where shard.json should be: another schema.
        std::fs::write(
            dir.path().join(SHARD_FILE),
            r#"{"schema": "runner-matrix-results", "version": 1}"#,
        )
        .unwrap();
        let msg = read_shard(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("not a runner-matrix-shard file"), "{msg}");
        std::fs::write(dir.path().join(SHARD_FILE), "{").unwrap();
        let msg = read_shard(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("not JSON"), "{msg}");
    }
}
