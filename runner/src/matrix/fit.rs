//! How a matrix fills the host: how many cells run at once (`jobs`) and how many vCPUs each
//! gets, when the user did not say.
//!
//! Under TCG every vCPU is a host thread that keeps a core busy, and a guest's second vCPU
//! speeds a cell up far less than a second cell running beside it does (measured with
//! bench/matrix.sh on 2 cores, 4 short cells: 2 vCPUs one at a time 6.0 s, 1 vCPU two at a
//! time 4.3 s; two 2-vCPU VMs at once overcommit the cores and gain nothing). So:
//! - never more vCPU threads in flight than cores: `jobs × cpus ≤ cores`;
//! - among those pairs, the one whose predicted wall time is least. A cell's time with `k`
//!   vCPUs is its expected duration divided by Amdahl's speed-up with
//!   [`PARALLEL_FRACTION`]; the cells are packed longest first onto `jobs` slots (as
//!   [`super::run::start_order`] starts them). Many short cells come out as 1 vCPU each, one
//!   per core; a few long cells (or one long cell among short ones) as more vCPUs each.
//!
//! A cell's expected duration is its median in the history ([`super::shard::estimates`]);
//! without any history all cells count alike. An explicit `--jobs`, `--cpus` or `cpus` in
//! the matrix or suite file always wins; the other of the two is then filled in by the
//! first rule alone.

use std::fmt;

/// The share of a cell's work that a second vCPU can take (Amdahl). From the measurement
/// in the module header: 1 → 2 vCPUs made a cell about 1.17× faster, p ≈ 0.29.
pub const PARALLEL_FRACTION: f64 = 0.3;
/// Most vCPUs a cell gets without being asked (beyond that the model gains little, and a
/// bigger guest boots slower under TCG).
pub const AUTO_MAX_CPUS: u32 = 4;

/// What one cell needs from the schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CellNeed {
    /// Expected duration (any unit; only ratios matter).
    pub expected: f64,
    /// Most vCPUs this cell may get automatically (its machine's limit, 1 where only 1-vCPU
    /// VMs resume from a saved state).
    pub max_cpus: u32,
}

/// What the user fixed; `None` is "pick for me".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Asked {
    pub jobs: Option<usize>,
    pub cpus: Option<u32>,
}

/// The decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fit {
    /// Cells at once.
    pub jobs: usize,
    /// vCPUs per cell (each cell capped by its own [`CellNeed::max_cpus`] when picked here).
    pub cpus: u32,
    /// Why, for the status line.
    pub basis: Basis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// Both given.
    Asked,
    /// `--jobs` given; vCPUs fill the cores.
    JobsAsked,
    /// vCPUs given; cells fill the cores.
    CpusAsked,
    /// Both picked here, by the cells' history (`true`) or their count alone.
    Picked { history: bool },
}

/// The host's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    pub cores: u32,
    /// VMs that fit in memory at once (at least 1).
    pub max_vms: usize,
}

/// Picks `jobs` and vCPUs per cell for these cells on this host. `history` says whether
/// the cells' `expected` durations came from a history (only reported).
pub fn fit(host: Host, cells: &[CellNeed], asked: Asked, history: bool) -> Fit {
    let cores = host.cores.max(1);
    let most_jobs = cells.len().min(host.max_vms).max(1);
    // No cell can use more than the largest of the cells' limits.
    let usable = cells
        .iter()
        .map(|c| c.max_cpus)
        .max()
        .unwrap_or(1)
        .clamp(1, AUTO_MAX_CPUS);
    let fill_cpus = |jobs: usize| (cores / jobs.max(1) as u32).clamp(1, usable);
    match (asked.jobs, asked.cpus) {
        (Some(jobs), Some(cpus)) => Fit {
            jobs: jobs.clamp(1, cells.len().max(1)),
            cpus,
            basis: Basis::Asked,
        },
        (Some(jobs), None) => Fit {
            jobs: jobs.clamp(1, cells.len().max(1)),
            cpus: fill_cpus(jobs),
            basis: Basis::JobsAsked,
        },
        (None, Some(cpus)) => Fit {
            jobs: ((cores / cpus.max(1)) as usize).clamp(1, most_jobs),
            cpus,
            basis: Basis::CpusAsked,
        },
        (None, None) => {
            // Fewest jobs last, so a tie goes to more cells at once with fewer vCPUs.
            let best = (1..=most_jobs.min(cores as usize))
                .rev()
                .map(|jobs| (jobs, fill_cpus(jobs)))
                .map(|(jobs, cpus)| (predicted(cells, jobs, cpus), jobs, cpus))
                .fold(None, |best: Option<(f64, usize, u32)>, c| match best {
                    Some(b) if b.0 <= c.0 * (1.0 + 1e-9) => Some(b),
                    _ => Some(c),
                })
                .unwrap_or((0.0, 1, 1));
            Fit {
                jobs: best.1,
                cpus: best.2,
                basis: Basis::Picked { history },
            }
        }
    }
}

/// How many times faster a cell runs on `cpus` vCPUs than on one.
pub fn speedup(cpus: u32) -> f64 {
    1.0 / ((1.0 - PARALLEL_FRACTION) + PARALLEL_FRACTION / cpus.max(1) as f64)
}

/// Predicted wall time of the cells, `jobs` at a time, `cpus` vCPUs each (capped per
/// cell): longest first, each onto the slot that frees up first.
fn predicted(cells: &[CellNeed], jobs: usize, cpus: u32) -> f64 {
    let mut times: Vec<f64> = cells
        .iter()
        .map(|c| c.expected.max(0.0) / speedup(cpus.min(c.max_cpus)))
        .collect();
    times.sort_by(|a, b| b.total_cmp(a));
    let mut slots = vec![0.0f64; jobs.max(1)];
    for t in times {
        let least = slots
            .iter_mut()
            .min_by(|a, b| a.total_cmp(b))
            .expect("at least one slot");
        *least += t;
    }
    slots.into_iter().fold(0.0, f64::max)
}

impl fmt::Display for Fit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vcpus = if self.cpus == 1 { "vCPU" } else { "vCPUs" };
        write!(f, "{} at a time, {} {vcpus} each", self.jobs, self.cpus)?;
        match self.basis {
            Basis::Asked => Ok(()),
            Basis::JobsAsked => write!(f, " (vCPUs fill the cores)"),
            Basis::CpusAsked => write!(f, " (cells fill the cores)"),
            Basis::Picked { history: true } => {
                write!(f, " (picked for the cores by the cells' history)")
            }
            Basis::Picked { history: false } => {
                write!(f, " (picked for the cores; no history: cells count alike)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alike(n: usize) -> Vec<CellNeed> {
        vec![
            CellNeed {
                expected: 300.0,
                max_cpus: 8
            };
            n
        ]
    }

    fn host(cores: u32) -> Host {
        Host { cores, max_vms: 64 }
    }

    fn picked(cores: u32, cells: &[CellNeed]) -> (usize, u32) {
        let f = fit(host(cores), cells, Asked::default(), false);
        (f.jobs, f.cpus)
    }

    #[test]
    fn many_short_cells_get_one_vcpu_per_core() {
        // The shipped 4-cell matrix on this 2-core host: what bench/matrix.sh found best.
        assert_eq!(picked(2, &alike(4)), (2, 1));
        assert_eq!(picked(2, &alike(3)), (2, 1));
        assert_eq!(picked(8, &alike(40)), (8, 1));
        assert_eq!(picked(1, &alike(4)), (1, 1));
    }

    #[test]
    fn few_cells_share_the_spare_cores() {
        assert_eq!(picked(4, &alike(1)), (1, 4));
        assert_eq!(picked(4, &alike(2)), (2, 2));
        assert_eq!(picked(16, &alike(2)), (2, AUTO_MAX_CPUS));
        assert_eq!(picked(2, &alike(1)), (1, 2));
    }

    #[test]
    fn one_long_cell_among_short_ones_gets_more_vcpus() {
        let mut cells = alike(10);
        for c in &mut cells {
            c.expected = 1.0;
        }
        cells.push(CellNeed {
            expected: 60.0,
            max_cpus: 8,
        });
        // 4 at a time with 1 vCPU would wait 60 for the long cell; 2 vCPUs each beat it.
        let f = fit(host(4), &cells, Asked::default(), true);
        assert_eq!((f.jobs, f.cpus), (2, 2));
        assert!(f.to_string().contains("history"), "{f}");
        // The same cells without their history count alike: one per core.
        assert_eq!(picked(4, &alike(11)), (4, 1));
    }

    #[test]
    fn never_more_vcpus_in_flight_than_cores() {
        for cores in 1..=12 {
            for n in 1..=20 {
                let f = fit(host(cores), &alike(n), Asked::default(), false);
                assert!(
                    f.jobs as u32 * f.cpus <= cores,
                    "{cores} cores, {n} cells: {f:?}"
                );
                assert!(f.jobs <= n);
            }
        }
    }

    #[test]
    fn single_cpu_cells_do_not_take_cores_they_cannot_use() {
        // Cells that may only have 1 vCPU (ppc64el resumes only those): more of them at once.
        let cells = vec![
            CellNeed {
                expected: 300.0,
                max_cpus: 1
            };
            2
        ];
        assert_eq!(picked(4, &cells), (2, 1));
    }

    #[test]
    fn memory_caps_the_cells_at_once() {
        let h = Host {
            cores: 8,
            max_vms: 2,
        };
        let f = fit(h, &alike(8), Asked::default(), false);
        assert_eq!((f.jobs, f.cpus), (2, 4));
    }

    #[test]
    fn what_the_user_asked_wins() {
        let both = Asked {
            jobs: Some(3),
            cpus: Some(2),
        };
        let f = fit(host(2), &alike(4), both, false);
        assert_eq!((f.jobs, f.cpus, f.basis), (3, 2, Basis::Asked));
        let jobs = Asked {
            jobs: Some(2),
            cpus: None,
        };
        let f = fit(host(2), &alike(4), jobs, false);
        assert_eq!((f.jobs, f.cpus, f.basis), (2, 1, Basis::JobsAsked));
        let f = fit(
            host(2),
            &alike(4),
            Asked {
                jobs: Some(1),
                ..jobs
            },
            false,
        );
        assert_eq!((f.jobs, f.cpus), (1, 2));
        let cpus = Asked {
            jobs: None,
            cpus: Some(2),
        };
        let f = fit(host(2), &alike(4), cpus, false);
        assert_eq!((f.jobs, f.cpus, f.basis), (1, 2, Basis::CpusAsked));
        let f = fit(host(8), &alike(4), cpus, false);
        assert_eq!((f.jobs, f.cpus), (4, 2));
        // More jobs than cells is no more cells at once.
        let f = fit(
            host(2),
            &alike(2),
            Asked {
                jobs: Some(9),
                ..jobs
            },
            false,
        );
        assert_eq!(f.jobs, 2);
    }

    #[test]
    fn states_the_decision() {
        let f = fit(host(2), &alike(4), Asked::default(), false);
        assert_eq!(
            f.to_string(),
            "2 at a time, 1 vCPU each (picked for the cores; no history: cells count alike)"
        );
    }
}
