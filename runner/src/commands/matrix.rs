//! `runner matrix`: read the matrix (or every suite of runner.toml), plan its cells, run
//! them in parallel, compare with the history, write the four reports, and turn the result
//! into the exit status chosen by `--fail-on`. With `--shard K/N` only this host's part of
//! the cells runs and `shard.json` is left for `runner matrix merge`, which does the
//! comparing, the history and the exit status for the whole run.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use engine::image::{ImageName, InvalidImageName, RecipeLookup, RepositoryRecipes};
use engine::Arch;
use tokio::sync::watch;

use crate::capacity::HostResources;
use crate::cli::{MatrixArgs, MergeArgs};
use crate::exit;
use crate::matrix::classify;
use crate::matrix::fit::{self, Asked, CellNeed, Fit, Host};
use crate::matrix::history::History;
use crate::matrix::merge::{self, Assigned, ShardRecord, SHARD_FILE, SHARD_SCHEMA, SHARD_VERSION};
use crate::matrix::progress::Progress;
use crate::matrix::render;
use crate::matrix::results::{
    human_secs, Change, RunInfo, RunResults, Status as CellStatus, SCHEMA, VERSION,
};
use crate::matrix::run::{run_matrix, start_order, PlannedCell, Schedule};
use crate::matrix::shard::{self, Shard};
use crate::matrix::spec::{FailOn, HistorySettings, MatrixSpec, MAX_RETRIES};
use crate::report::console::Status;
use crate::run::execute::RunSettings;
use crate::run::plan::{self, Overrides};
use crate::suite::{self, SuiteFile};

/// A bad input found before anything ran: message and exit code.
struct Refusal(String, i32);

fn config(msg: impl Into<String>) -> Refusal {
    Refusal(msg.into(), exit::CONFIG)
}

/// The matrix spec with the command line's overrides applied.
fn spec(args: &MatrixArgs) -> Result<MatrixSpec, Refusal> {
    let mut spec = match &args.file {
        Some(f) if !f.is_file() => {
            return Err(config(format!(
                "no matrix file {}: give an existing file (see examples/shell-suite/nightly.toml) or none to run every suite of ./runner.toml",
                f.display()
            )))
        }
        Some(f) => MatrixSpec::load(f).map_err(|e| config(crate::outcome::chain(&e)))?,
        None => MatrixSpec::from_suites_file(PathBuf::from(suite::SUITE_FILE_NAME)),
    };
    if !args.arch.is_empty() {
        spec.arches = args
            .arch
            .iter()
            .map(|a| {
                a.trim()
                    .parse::<Arch>()
                    .map_err(|e| config(format!("--arch: {e}")))
            })
            .collect::<Result<_, _>>()?;
        // --arch replaces the arch axis; included cells on other arches go too.
        let keep = spec.arches.clone();
        spec.include
            .retain(|i| i.arch.is_none_or(|a| keep.contains(&a)));
    }
    if let Some(r) = args.retries {
        if r > MAX_RETRIES {
            return Err(Refusal(
                format!("--retries {r} is more than {MAX_RETRIES}"),
                exit::USAGE,
            ));
        }
        spec.retries = r;
    }
    if let Some(f) = args.fail_on {
        spec.fail_on = f;
    }
    if let Some(k) = args.keep {
        if k == 0 {
            return Err(Refusal("--keep must be at least 1".into(), exit::USAGE));
        }
        spec.history.keep = k;
    }
    if args.jobs == Some(0) {
        return Err(Refusal("--jobs must be at least 1".into(), exit::USAGE));
    }
    if let Some(c) = args.cpus {
        if !(1..=64).contains(&c) {
            return Err(Refusal(
                format!("--cpus {c}: give between 1 and 64"),
                exit::USAGE,
            ));
        }
        spec.cpus = Some(c);
    }
    Ok(spec)
}

/// `--shard K/N`, checked.
fn shard_arg(args: &MatrixArgs) -> Result<Option<Shard>, Refusal> {
    args.shard
        .as_deref()
        .map(|s| {
            s.parse()
                .map_err(|e: shard::InvalidShard| Refusal(e.to_string(), exit::USAGE))
        })
        .transpose()
}

/// This host's part of the matrix, and what `shard.json` needs to prove it.
struct ShardPlan {
    shard: Shard,
    fingerprint: String,
    split: Vec<Assigned>,
}

/// Keeps this shard's cells of `cells`; says which and how long they are expected to take.
fn take_shard(
    shard: Shard,
    spec: &MatrixSpec,
    cells: Vec<PlannedCell>,
    history: &History,
    status: &Status,
) -> Result<(Vec<PlannedCell>, ShardPlan), Refusal> {
    let suites_file = std::fs::read(&spec.suites_file).map_err(|e| {
        config(format!(
            "cannot read the suite file {}: {e}",
            spec.suites_file.display()
        ))
    })?;
    let all: Vec<_> = cells.iter().map(|c| c.cell.clone()).collect();
    let fingerprint = shard::fingerprint(spec, &all, &suites_file);
    let keys: Vec<String> = all.iter().map(|c| c.key()).collect();
    let estimates = shard::estimates(&keys, history);
    let shard_of = shard::split(&estimates, shard.count);
    let split: Vec<Assigned> = keys
        .iter()
        .cloned()
        .zip(&shard_of)
        .map(|(key, &shard)| Assigned { key, shard })
        .collect();
    let total_ms: u64 = estimates.iter().sum();
    let mine_ms: u64 = estimates
        .iter()
        .zip(&shard_of)
        .filter(|(_, &s)| s == shard.index)
        .map(|(e, _)| e)
        .sum();
    let all_count = cells.len();
    let mine: Vec<PlannedCell> = cells
        .into_iter()
        .zip(&shard_of)
        .filter(|(_, &s)| s == shard.index)
        .map(|(c, _)| c)
        .collect();
    let basis = if keys.iter().any(|k| !history.trend(k).is_empty()) {
        format!(
            "about {} of {} by the history",
            human_secs(mine_ms as f64 / 1000.0),
            human_secs(total_ms as f64 / 1000.0)
        )
    } else {
        "split by count (no history to go by)".to_string()
    };
    status.line(&format!(
        "runner matrix: shard {shard}: {} of {all_count} cells, {basis}",
        mine.len(),
    ));
    Ok((
        mine,
        ShardPlan {
            shard,
            fingerprint,
            split,
        },
    ))
}

/// The cells and their plans, and the vCPUs per cell the matrix or suite file fixes (if it
/// does not, [`fit_host`] picks them).
fn plan_cells(spec: &MatrixSpec, out: &Path) -> Result<(Vec<PlannedCell>, Option<u32>), Refusal> {
    if !spec.suites_file.is_file() {
        return Err(config(format!(
            "no suite file {}: runner matrix runs the suites of a runner.toml (set suites_file in the matrix file, or run it where runner.toml is)",
            spec.suites_file.display()
        )));
    }
    let file = SuiteFile::load(&spec.suites_file).map_err(|e| config(e.to_string()))?;
    let project_dir = spec
        .suites_file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    // The matrix runs on the user's own machine: the project's images/ count.
    let recipes = RecipeLookup {
        operator_dir: None,
        repository: RepositoryRecipes::Honoured(project_dir.clone()),
    };
    let image_check = |name: &str| {
        let name: ImageName = name.parse().map_err(|e: InvalidImageName| e.to_string())?;
        recipes
            .find(&name)
            .map(|_| ())
            .map_err(|e| engine::image::build::error_chain(&e))
    };
    let cells = spec
        .expand(&file, &image_check)
        .map_err(|e| config(e.to_string()))?;
    let declared_cpus = spec.cpus.or(file.defaults.cpus);
    let planned = cells
        .into_iter()
        .map(|cell| {
            let ov = Overrides {
                image: Some(
                    cell.image
                        .parse()
                        .map_err(|e: InvalidImageName| config(e.to_string()))?,
                ),
                repository_recipes: true,
                timeout: cell.timeout,
                cpus: spec.cpus,
                memory_mib: spec.memory_mib,
                out: Some(out.join("artifacts").join(&cell.image)),
                // Each suite's own `mode` (a matrix compares the two by listing both suites).
                mode: None,
                keep_failed: false,
                // A matrix runs suites without network; a networked suite is refused below.
                network: None,
            };
            let mut plans =
                plan::plan_suites(&file, std::slice::from_ref(&cell.suite), &[cell.arch], &ov)
                    .map_err(config)?;
            let plan = plans.pop().ok_or_else(|| {
                config(format!(
                    "{}: nothing to run for {}",
                    spec.origin,
                    cell.key()
                ))
            })?;
            crate::net::check(
                &format!("suite '{}'", plan.id.suite),
                plan.network.mode,
                crate::net::NetworkMode::None,
                "runner matrix's network",
                "run networked suites with `runner test --network`",
            )
            .map_err(|e| config(e.to_string()))?;
            Ok(PlannedCell { cell, plan })
        })
        .collect::<Result<_, _>>()?;
    Ok((planned, declared_cpus))
}

/// How many cells at once and how many vCPUs each (see [`fit`]); sets each cell's vCPUs
/// when they were picked here.
fn fit_host(
    cells: &mut [PlannedCell],
    jobs: Option<usize>,
    declared_cpus: Option<u32>,
    history: &History,
) -> Fit {
    let host = HostResources::detect();
    // The biggest VM of the matrix decides how many fit in memory.
    let memory = cells
        .iter()
        .map(|c| c.plan.memory_mib)
        .max()
        .unwrap_or(1024);
    let keys: Vec<String> = cells.iter().map(|c| c.cell.key()).collect();
    let expected = shard::estimates(&keys, history);
    let known = keys.iter().any(|k| !history.trend(k).is_empty());
    let needs: Vec<CellNeed> = cells
        .iter()
        .zip(&expected)
        .map(|(c, &ms)| CellNeed {
            expected: ms as f64,
            max_cpus: auto_max_cpus(c.plan.id.arch),
        })
        .collect();
    let fit = fit::fit(
        Host {
            cores: host.cores,
            max_vms: host.max_vms_by_memory(memory),
        },
        &needs,
        Asked {
            jobs,
            cpus: declared_cpus,
        },
        known,
    );
    if declared_cpus.is_none() {
        for (c, need) in cells.iter_mut().zip(&needs) {
            c.plan.cpus = fit.cpus.min(need.max_cpus);
        }
    }
    fit
}

/// Most vCPUs a cell of `arch` gets unasked: its machine's limit, but 1 where only 1-vCPU
/// VMs resume (a cold boot costs more than a second vCPU gives).
fn auto_max_cpus(arch: Arch) -> u32 {
    let info = arch.info();
    if info.saved_states.allow(2) {
        info.max_cpus
    } else {
        1
    }
}

fn cancel_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        super::interrupted().await;
        let _ = tx.send(true);
    });
    rx
}

pub async fn run(args: MatrixArgs, settings: RunSettings, status: Status) -> i32 {
    let started = Instant::now();
    let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let (spec, shard, cells, declared_cpus) = match spec(&args).and_then(|s| {
        let shard = shard_arg(&args)?;
        let (cells, declared_cpus) = plan_cells(&s, &args.out)?;
        Ok((s, shard, cells, declared_cpus))
    }) {
        Ok(x) => x,
        Err(Refusal(msg, code)) => {
            status.error(&msg);
            return code;
        }
    };
    let history = match &args.history {
        Some(dir) => History::open(dir),
        None => History::none(),
    };
    for w in &history.warnings {
        status.line(&format!("runner: warning: {w}"));
    }
    let (cells, shard) = match shard {
        None => (cells, None),
        Some(s) => match take_shard(s, &spec, cells, &history, &status) {
            Ok((cells, plan)) => (cells, Some(plan)),
            Err(Refusal(msg, code)) => {
                status.error(&msg);
                return code;
            }
        },
    };
    let mut cells = cells;
    let fit = fit_host(&mut cells, args.jobs, declared_cpus, &history);
    let jobs = fit.jobs;
    if let Some(line) = super::swept_line(super::sweep_leftovers(&settings.store)) {
        status.line(&line);
    }
    status.line(&format!(
        "runner matrix: {} cells from {}, {fit}, retries per failing cell: {}",
        cells.len(),
        spec.origin,
        spec.retries
    ));
    let progress = Progress::new(status, cells.len());
    let schedule = Schedule {
        jobs,
        retries: spec.retries,
        fail_fast: args.fail_fast,
    };
    // Longest cells first, by their last duration in the history.
    let previous = history.previous();
    let expected: Vec<Option<f64>> = cells
        .iter()
        .map(|c| {
            previous
                .and_then(|p| p.cell(&c.cell.key()))
                .map(|pc| pc.duration_s)
        })
        .collect();
    let order = start_order(&expected);
    let ran = run_matrix(
        cells,
        Some(order),
        schedule,
        settings,
        progress,
        cancel_on_signals(),
    )
    .await;

    let results = RunResults {
        schema: SCHEMA.into(),
        version: VERSION,
        run: RunInfo {
            id: new_run_id(),
            started_at,
            finished_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            duration_s: started.elapsed().as_secs_f64(),
            // Cancelled by a signal, or cells stopped by --fail-fast: not a baseline.
            complete: !ran.cells.iter().any(|c| c.status == CellStatus::Cancelled),
            runner_version: env!("CARGO_PKG_VERSION").into(),
            jobs,
            retries: spec.retries,
            fail_on: spec.fail_on.name().into(),
        },
        cells: ran.cells,
        comparison: None,
    };
    match shard {
        Some(plan) => finish_shard(
            results,
            plan,
            &spec,
            &history,
            ran.interrupted,
            &args.out,
            &status,
        ),
        None => {
            let ending = Ending {
                fail_on: spec.fail_on,
                settings: spec.history,
                keep: args.history.is_some(),
                interrupted: ran.interrupted,
            };
            finish_run(results, history, ending, &args.out, &status)
        }
    }
}

fn new_run_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// How a whole run (unsharded, or merged) ends.
struct Ending {
    fail_on: FailOn,
    settings: HistorySettings,
    /// Keep the run in the history (`--history` given).
    keep: bool,
    /// Cancelled by a signal.
    interrupted: bool,
}

/// The trend of each cell and what changed since the previous run.
fn compare(results: &mut RunResults, history: &History, settings: &HistorySettings) {
    for c in &mut results.cells {
        c.trend_s = history.trend(&c.key);
    }
    classify::classify(results, history.previous(), settings);
}

/// Compares with the history, writes the four reports, keeps the run in the history, says
/// what happened; returns the exit status.
fn finish_run(
    mut results: RunResults,
    mut history: History,
    ending: Ending,
    out: &Path,
    status: &Status,
) -> i32 {
    compare(&mut results, &history, &ending.settings);
    // A whole run's directory is no shard (a shard.json left by an earlier run would be
    // taken for one by a merge).
    let _ = std::fs::remove_file(out.join(SHARD_FILE));
    if let Err(e) = render::write_all(out, &results) {
        status.error(&crate::outcome::chain(&e));
        return exit::IO;
    }
    // A cancelled run is not kept: its missing cells would read as removed tests next time.
    if ending.keep {
        if ending.interrupted {
            status.line("runner: the run was cancelled; it is not added to the history");
        } else if let Err(w) = history.save(&results, ending.settings.keep) {
            status.line(&format!("runner: warning: {}", crate::outcome::chain(&w)));
        }
    }
    summary(status, &results, out);
    if ending.interrupted {
        status.error("cancelled: every VM was stopped; the partial report is written");
        return exit::CANCELLED;
    }
    classify::exit_status(&results, ending.fail_on)
}

/// A shard's end: its own four reports (compared with the history, for a look at this part
/// alone) and `shard.json` for the merge. The verdict is the merge's: a shard that ran
/// exits 0 whatever its cells did, and is never kept in the history.
fn finish_shard(
    mut results: RunResults,
    plan: ShardPlan,
    spec: &MatrixSpec,
    history: &History,
    interrupted: bool,
    out: &Path,
    status: &Status,
) -> i32 {
    let record = ShardRecord {
        schema: SHARD_SCHEMA.into(),
        version: SHARD_VERSION,
        shard: plan.shard,
        matrix: plan.fingerprint,
        origin: spec.origin.clone(),
        split: plan.split,
        fail_on: spec.fail_on,
        history: spec.history.into(),
        interrupted,
        run: results.run.clone(),
        // As they ran: the merge compares the whole run with the history itself.
        cells: results.cells.clone(),
    };
    compare(&mut results, history, &spec.history);
    let written = render::write_all(out, &results)
        .and_then(|()| render::write_atomically(&out.join(SHARD_FILE), &record.to_json()));
    if let Err(e) = written {
        status.error(&crate::outcome::chain(&e));
        return exit::IO;
    }
    summary(status, &results, out);
    status.line(&format!(
        "runner matrix: shard {} written to {}; `runner matrix merge` puts the shards together (and keeps the run in the history)",
        plan.shard,
        out.join(SHARD_FILE).display()
    ));
    if interrupted {
        status.error("cancelled: every VM was stopped; the partial shard is written");
        return exit::CANCELLED;
    }
    exit::SUCCESS
}

/// `runner matrix merge`: the shards' `shard.json`, checked and put together, then ended
/// as the unsharded run would have been.
pub fn merge(args: MergeArgs, status: Status) -> i32 {
    let mut shards = Vec::new();
    for dir in &args.shards {
        match merge::read_shard(dir) {
            Ok(record) => shards.push((dir.clone(), record)),
            Err(e) => {
                status.error(&crate::outcome::chain(&e));
                return exit::CONFIG;
            }
        }
    }
    let merged = match merge::merge(shards, new_run_id()) {
        Ok(m) => m,
        Err(e) => {
            status.error(&crate::outcome::chain(&e));
            return exit::CONFIG;
        }
    };
    let history = match &args.history {
        Some(dir) => History::open(dir),
        None => History::none(),
    };
    for w in &history.warnings {
        status.line(&format!("runner: warning: {w}"));
    }
    status.line(&format!(
        "runner matrix merge: {} shards of {}, {} cells",
        merged.count,
        merged.origin,
        merged.results.cells.len()
    ));
    let ending = Ending {
        fail_on: merged.fail_on,
        settings: merged.history,
        keep: args.history.is_some(),
        interrupted: merged.interrupted,
    };
    finish_run(merged.results, history, ending, &args.out, &status)
}

/// The end of the run on the terminal: each cell, what changed, where the reports are.
fn summary(status: &Status, results: &RunResults, out: &Path) {
    status.line("=== matrix summary");
    for c in &results.cells {
        let mut line = format!(
            "{:<10} {} in {}",
            c.status.label().to_uppercase(),
            c.key,
            human_secs(c.duration_s)
        );
        if c.attempts > 1 {
            line.push_str(&format!(" ({} attempts)", c.attempts));
        }
        if let Some(m) = c.message.as_deref().and_then(|m| m.lines().next()) {
            line.push_str(&format!(": {m}"));
        }
        status.line(&line);
    }
    for change in [
        Change::NewFailure,
        Change::Fixed,
        Change::Flaky,
        Change::StillFailing,
    ] {
        for (cell, test) in results.changed(change) {
            status.line(&format!(
                "{:<14} {} {}",
                change.label(),
                cell.key,
                test.name
            ));
        }
    }
    for c in results.cells.iter().filter(|c| c.slowdown.is_some()) {
        let s = c.slowdown.as_ref().expect("filtered");
        status.line(&format!(
            "slowdown       {}: {} -> {}",
            c.key,
            human_secs(s.previous_s),
            human_secs(s.current_s)
        ));
    }
    status.line(&format!(
        "{} · reports in {}/ (index.html, summary.md, junit.xml, results.json)",
        crate::matrix::render::grid::headline(results),
        out.display()
    ));
}
