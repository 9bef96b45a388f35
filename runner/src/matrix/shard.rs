//! Splitting a matrix across hosts: `--shard K/N` runs the K-th of N parts of the cells.
//!
//! Every shard computes the same split on its own, from the same inputs, with no host
//! talking to another: the matrix's cells in their stable order and each cell's estimated
//! duration from the history. The split is greedy longest-first (each cell, longest
//! estimate first, goes to the shard with the least estimated time so far; ties go to the
//! earlier cell and the lower shard), which keeps the slowest shard within one cell of
//! the ideal. Loads are whole milliseconds, so the sums are exact on every host.
//!
//! A cell's estimate is the median of its newest [`ESTIMATE_WINDOW`] completed durations
//! in the history (one slow night does not move it); a cell with none gets the median of
//! the cells that have one (a new cell is probably a typical one), or
//! [`DEFAULT_ESTIMATE`] when no cell has a history.
//!
//! Each shard also records a fingerprint of the matrix (cells, timeouts, settings and the
//! suites file's bytes), so `runner matrix merge` can refuse shards of different matrices.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::history::History;
use super::spec::{Cell, MatrixSpec};

/// Most shards a matrix may be split into (far more hosts than anyone runs a nightly on).
pub const MAX_SHARDS: u32 = 256;
/// The estimate of a cell when no cell of the matrix has a history: all cells alike.
pub const DEFAULT_ESTIMATE: Duration = Duration::from_secs(300);
/// How many of a cell's newest durations its estimate is the median of.
pub const ESTIMATE_WINDOW: usize = 5;

/// Which part of the matrix this run is: `index` of `count`, both counted from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Why a `--shard` value was refused (one line, with the value escaped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--shard {shown}: {why}")]
pub struct InvalidShard {
    shown: String,
    why: &'static str,
}

impl FromStr for Shard {
    type Err = InvalidShard;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| InvalidShard {
            shown: format!("'{}'", s.escape_default()),
            why,
        };
        let (k, n) = s
            .split_once('/')
            .ok_or_else(|| bad("expected K/N, e.g. --shard 1/2 for the first of two shards"))?;
        let number = |t: &str| -> Result<u32, InvalidShard> {
            // Digits only: u32::from_str would accept a leading '+'.
            if t.is_empty() || t.len() > 4 || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(
                    "K and N must be whole numbers, e.g. --shard 1/2 for the first of two shards",
                ));
            }
            Ok(t.parse().expect("at most 4 digits"))
        };
        let (index, count) = (number(k)?, number(n)?);
        if count == 0 || count > MAX_SHARDS {
            return Err(bad("N must be between 1 and 256"));
        }
        if index == 0 || index > count {
            return Err(bad("K must be between 1 and N (shards are counted from 1)"));
        }
        Ok(Shard { index, count })
    }
}

/// Estimated duration of each cell, in milliseconds, from the history (see the module
/// header for the rule).
pub fn estimates(keys: &[String], history: &History) -> Vec<u64> {
    let known: Vec<Option<u64>> = keys
        .iter()
        .map(|k| {
            let trend = history.trend(k);
            let newest = &trend[trend.len().saturating_sub(ESTIMATE_WINDOW)..];
            median(newest.iter().map(|s| secs_to_ms(*s)).collect())
        })
        .collect();
    let fallback = median(known.iter().flatten().copied().collect())
        .unwrap_or(DEFAULT_ESTIMATE.as_millis() as u64);
    known.into_iter().map(|e| e.unwrap_or(fallback)).collect()
}

fn secs_to_ms(s: f64) -> u64 {
    // Negative or NaN durations (a hand-edited history) count as nothing.
    if s.is_finite() && s > 0.0 {
        (s * 1000.0).round() as u64
    } else {
        0
    }
}

/// The median of `v` (the lower one of the middle two for an even count).
fn median(mut v: Vec<u64>) -> Option<u64> {
    v.sort_unstable();
    (!v.is_empty()).then(|| v[(v.len() - 1) / 2])
}

/// The shard (1-based) of each cell, for cells with these estimates split `count` ways.
pub fn split(estimates_ms: &[u64], count: u32) -> Vec<u32> {
    let count = count.max(1) as usize;
    let mut order: Vec<usize> = (0..estimates_ms.len()).collect();
    // Longest first; equal estimates keep the matrix's order (the sort is stable).
    order.sort_by(|&a, &b| estimates_ms[b].cmp(&estimates_ms[a]));
    let mut load = vec![0u64; count];
    let mut shard_of = vec![0u32; estimates_ms.len()];
    for i in order {
        let lightest = (0..count)
            .min_by_key(|&s| (load[s], s))
            .expect("at least one shard");
        load[lightest] = load[lightest].saturating_add(estimates_ms[i]);
        shard_of[i] = lightest as u32 + 1;
    }
    shard_of
}

/// The identity of a matrix, the same for every shard of one run: its cells (with their
/// timeouts), the settings that decide the result, and the suites file's bytes (shards
/// checked out at different commits are different matrices).
pub fn fingerprint(spec: &MatrixSpec, cells: &[Cell], suites_file: &[u8]) -> String {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        // Length-prefixed, so that no two different inputs hash the same bytes.
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((value.len() as u64).to_le_bytes());
        h.update(value);
    };
    field("format", b"runner-matrix-fingerprint-1");
    for c in cells {
        field("cell", c.key().as_bytes());
        let timeout = c.timeout.map_or(0, |t| t.as_millis() as u64);
        field("timeout_ms", &timeout.to_le_bytes());
    }
    field("retries", &spec.retries.to_le_bytes());
    field("fail_on", spec.fail_on.name().as_bytes());
    field("cpus", &spec.cpus.unwrap_or(0).to_le_bytes());
    field("memory_mib", &spec.memory_mib.unwrap_or(0).to_le_bytes());
    field("keep", &(spec.history.keep as u64).to_le_bytes());
    field(
        "slowdown_percent",
        &spec.history.slowdown_percent.to_le_bytes(),
    );
    field(
        "slowdown_min_ms",
        &(spec.history.slowdown_min.as_millis() as u64).to_le_bytes(),
    );
    field("suites_file_sha256", &Sha256::digest(suites_file));
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::results::{CellResult, RunInfo, RunResults, Status, SCHEMA};

    #[test]
    fn shard_values_parse_or_are_refused_with_the_reason() {
        // (input, Ok((K, N)) or a part of the message)
        type Want = Result<(u32, u32), &'static str>;
        let cases: [(&str, Want); 11] = [
            ("1/2", Ok((1, 2))),
            ("2/2", Ok((2, 2))),
            ("1/1", Ok((1, 1))),
            ("256/256", Ok((256, 256))),
            ("0/2", Err("K must be between 1 and N")),
            ("3/2", Err("K must be between 1 and N")),
            ("1/0", Err("N must be between 1 and 256")),
            ("1/257", Err("N must be between 1 and 256")),
            ("2", Err("expected K/N")),
            ("+1/2", Err("whole numbers")),
            // Control characters are escaped: the message stays one line.
            ("1/\n2", Err("'1/\\n2'")),
        ];
        for (input, want) in cases {
            match (input.parse::<Shard>(), want) {
                (Ok(s), Ok((k, n))) => assert_eq!((s.index, s.count), (k, n), "{input}"),
                (Err(e), Err(part)) => {
                    let msg = e.to_string();
                    assert!(msg.contains(part) && !msg.contains('\n'), "{input}: {msg}")
                }
                (got, _) => panic!("{input}: {got:?}"),
            }
        }
    }

    /// Each shard's total estimate.
    fn loads(estimates: &[u64], shard_of: &[u32], count: u32) -> Vec<u64> {
        let mut l = vec![0; count as usize];
        for (e, s) in estimates.iter().zip(shard_of) {
            l[*s as usize - 1] += e;
        }
        l
    }

    #[test]
    fn every_cell_is_in_exactly_one_shard_and_the_split_is_deterministic() {
        // A spread of sizes, including more shards than cells (some shards run nothing).
        let estimates: Vec<u64> = (0..37).map(|i| (i * 7919 % 101) * 1000).collect();
        for count in [1, 2, 3, 5, 37, 50] {
            let a = split(&estimates, count);
            assert_eq!(a.len(), estimates.len());
            assert!(a.iter().all(|&s| (1..=count).contains(&s)), "{a:?}");
            // The same inputs give the same split (as on another host).
            assert_eq!(a, split(&estimates.clone(), count));
            // Each shard's cells, all shards together: every cell exactly once.
            let a_ref = &a;
            let mut seen: Vec<usize> = (1..=count)
                .flat_map(|k| (0..a_ref.len()).filter(move |&i| a_ref[i] == k))
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..estimates.len()).collect::<Vec<_>>());
            // Greedy longest-first: no shard is over the ideal by more than one cell.
            let l = loads(&estimates, &a, count);
            let ideal = estimates.iter().sum::<u64>() / u64::from(count);
            let biggest = *estimates.iter().max().unwrap();
            assert!(*l.iter().max().unwrap() <= ideal + biggest, "{l:?}");
        }
    }

    #[test]
    fn the_split_is_balanced_by_duration_not_by_count() {
        // (estimates in seconds, shards, the shard of each cell)
        let cases: [(&[u64], u32, &[u32]); 4] = [
            // One long cell alone; the five short ones together on the other host.
            (&[60, 600, 60, 60, 60, 60], 2, &[2, 1, 2, 2, 2, 2]),
            // All alike (no history): round-robin in the matrix's order.
            (&[300, 300, 300, 300], 2, &[1, 2, 1, 2]),
            (&[300, 300, 300], 3, &[1, 2, 3]),
            // 8+2 against 5+4+1: 10 and 10.
            (&[5, 8, 4, 2, 1], 2, &[2, 1, 2, 1, 2]),
        ];
        for (secs, count, want) in cases {
            let ms: Vec<u64> = secs.iter().map(|s| s * 1000).collect();
            assert_eq!(split(&ms, count), want, "{secs:?} / {count}");
        }
    }

    fn kept_run(id: &str, started: &str, cells: &[(&str, f64, Status)]) -> RunResults {
        let cell = |(key, duration_s, status): &(&str, f64, Status)| CellResult {
            key: key.to_string(),
            suite: "s".into(),
            arch: "riscv64".into(),
            image: "debian-13".into(),
            status: *status,
            outcome: String::new(),
            message: None,
            duration_s: *duration_s,
            total_s: *duration_s,
            attempts: 1,
            accelerator: String::new(),
            qemu_version: String::new(),
            kernel_version: String::new(),
            tests: Vec::new(),
            slowdown: None,
            trend_s: Vec::new(),
        };
        RunResults {
            schema: SCHEMA.into(),
            version: 1,
            run: RunInfo {
                id: id.into(),
                started_at: started.into(),
                finished_at: started.into(),
                duration_s: 1.0,
                complete: true,
                runner_version: "0".into(),
                jobs: 1,
                retries: 0,
                fail_on: "regression".into(),
            },
            cells: cells.iter().map(cell).collect(),
            comparison: None,
        }
    }

    #[test]
    fn estimates_come_from_the_history_and_unknown_cells_get_the_median() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = History::open(dir.path());
        // "a" is usually 100 s, one slow night of 900 s does not move it; "b" ran once, 20 s
        // (its cancelled run does not count); "c" took 50 s.
        let nights: [&[(&str, f64, Status)]; 3] = [
            &[("a", 100.0, Status::Passed), ("b", 20.0, Status::Failed)],
            &[("a", 900.0, Status::Passed), ("c", 50.0, Status::Passed)],
            &[("a", 110.0, Status::Flaky), ("b", 999.0, Status::Cancelled)],
        ];
        for (i, cells) in nights.iter().enumerate() {
            h.save(
                &kept_run(
                    &format!("r{i}"),
                    &format!("2026-11-0{}T00:00:00Z", i + 1),
                    cells,
                ),
                10,
            )
            .unwrap();
        }
        let h = History::open(dir.path());
        let keys: Vec<String> = ["a", "b", "c", "new"].map(String::from).to_vec();
        // New: the median of 110, 20 and 50.
        assert_eq!(estimates(&keys, &h), [110_000, 20_000, 50_000, 50_000]);
        // No history at all: every cell gets the default.
        assert_eq!(estimates(&keys[..2], &History::none()), [300_000, 300_000]);
    }

    #[test]
    fn the_fingerprint_changes_with_the_cells_settings_and_suites_file() {
        let spec = MatrixSpec::from_suites_file("runner.toml".into());
        let cell = |suite: &str| Cell {
            suite: suite.into(),
            arch: engine::Arch::Riscv64,
            image: "debian-13".into(),
            timeout: None,
        };
        let cells = [cell("a"), cell("b")];
        let base = fingerprint(&spec, &cells, b"x");
        assert_eq!(base, fingerprint(&spec, &cells, b"x"), "deterministic");
        assert_ne!(base, fingerprint(&spec, &cells[..1], b"x"), "fewer cells");
        assert_ne!(
            base,
            fingerprint(&spec, &cells, b"y"),
            "another suites file"
        );
        let mut longer = cells.clone();
        longer[0].timeout = Some(Duration::from_secs(60));
        assert_ne!(base, fingerprint(&spec, &longer, b"x"), "a timeout");
        let mut other = spec.clone();
        other.retries += 1;
        assert_ne!(base, fingerprint(&other, &cells, b"x"), "retries");
    }
}
