//! Running a matrix: each (image, arch) base image is built or verified once, up front and
//! one at a time (never raced by cells), then cells run side by side up to `jobs` at a time,
//! each attempt in a fresh VM through the same `run_suite` as `runner test`. A failing cell
//! is re-run up to `retries` times and never stops the others (unless `fail_fast`); a
//! cancellation (Ctrl-C / SIGTERM) stops every running VM and ends the cells not yet run as
//! cancelled, so a partial report can still be written.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::attempt::{self, Attempt, Recorder};
use super::progress::Progress;
use super::results::CellResult;
use super::spec::Cell;
use crate::events::Reporters;
use crate::execute::{run_suite, RunSettings};
use crate::host;
use crate::outcome::Outcome;
use crate::plan::SuitePlan;

/// A cell and the plan that runs it.
#[derive(Debug, Clone)]
pub struct PlannedCell {
    pub cell: Cell,
    pub plan: SuitePlan,
}

#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub jobs: usize,
    pub retries: u32,
    pub fail_fast: bool,
}

/// How the run ended.
#[derive(Debug)]
pub struct Ran {
    /// In the order of the cells given.
    pub cells: Vec<CellResult>,
    /// Cancelled by a signal (the results are partial).
    pub interrupted: bool,
}

/// Builds or verifies each (image, arch) once. Returns the failures, by (image, arch):
/// those cells become error cells without booting anything.
async fn prepare_images(
    cells: &[PlannedCell],
    settings: &RunSettings,
    progress: &Progress,
    cancel: &mut watch::Receiver<bool>,
) -> HashMap<(String, engine::Arch), Outcome> {
    let mut seen: Vec<(String, engine::Arch, Option<PathBuf>)> = Vec::new();
    for c in cells {
        let k = (
            c.plan.image.clone(),
            c.plan.id.arch,
            c.plan.project_dir.clone(),
        );
        if !seen.iter().any(|s| s.0 == k.0 && s.1 == k.1) {
            seen.push(k);
        }
    }
    let mut failed = HashMap::new();
    for (image, arch, project_dir) in seen {
        if *cancel.borrow() {
            break;
        }
        progress.line(&format!(
            "preparing image {image} for {arch} (built once, shared by its cells)"
        ));
        let prepare = async {
            let platform = host::platform(arch, settings.accel, &settings.store).await?;
            let quiet = |_: &str| {};
            host::base_image(
                &settings.store,
                &image,
                project_dir.as_deref(),
                &platform,
                None,
                false,
                &quiet,
            )
            .await
            .map(|_| ())
        };
        let result = tokio::select! {
            r = prepare => r,
            _ = cancel.wait_for(|c| *c) => Err(Outcome::Cancelled),
        };
        if let Err(outcome) = result {
            if outcome != Outcome::Cancelled {
                progress.line(&format!(
                    "image {image} for {arch} is not usable: {outcome}"
                ));
            }
            failed.insert((image, arch), outcome);
        }
    }
    failed
}

/// Runs every cell; returns when all have ended (or were cancelled).
pub async fn run_matrix(
    cells: Vec<PlannedCell>,
    schedule: Schedule,
    settings: RunSettings,
    progress: Progress,
    mut cancel: watch::Receiver<bool>,
) -> Ran {
    let unusable = prepare_images(&cells, &settings, &progress, &mut cancel).await;
    // Cells stop on a signal, or on the first failure with fail-fast: one channel for both.
    let (stop_tx, stop) = watch::channel(*cancel.borrow());
    let stop_tx = Arc::new(stop_tx);
    {
        let stop_tx = stop_tx.clone();
        let mut cancel = cancel.clone();
        tokio::spawn(async move {
            if cancel.wait_for(|c| *c).await.is_ok() {
                let _ = stop_tx.send(true);
            }
        });
    }
    let slots = Arc::new(Semaphore::new(schedule.jobs.max(1)));
    let settings = Arc::new(settings);
    let mut tasks = JoinSet::new();
    for (index, planned) in cells.iter().cloned().enumerate() {
        let image_problem = unusable
            .get(&(planned.plan.image.clone(), planned.plan.id.arch))
            .cloned();
        let (slots, settings, progress, mut stop) = (
            slots.clone(),
            settings.clone(),
            progress.clone(),
            stop.clone(),
        );
        tasks.spawn(async move {
            let image = planned.plan.image.clone();
            if let Some(outcome) = image_problem {
                return (index, vec![Attempt::without_vm(outcome, &image)]);
            }
            // Wait for a free slot, unless the run is stopped meanwhile.
            let _slot = tokio::select! {
                s = slots.acquire_owned() => s.ok(),
                _ = stop.wait_for(|s| *s) => None,
            };
            let mut attempts = Vec::new();
            if _slot.is_some() {
                for n in 1..=schedule.retries + 1 {
                    if *stop.borrow() {
                        break;
                    }
                    let recorder = Recorder::new(&image);
                    let mut reporters = Reporters::default();
                    reporters.add(Box::new(recorder.clone()));
                    reporters.add(Box::new(progress.cell_started(&planned.cell.key(), n)));
                    let outcome =
                        run_suite(&planned.plan, &settings, &mut reporters, stop.clone()).await;
                    drop(reporters);
                    attempts.push(recorder.take());
                    if !attempt::worth_retrying(&outcome) {
                        break;
                    }
                }
            }
            if attempts.is_empty() {
                attempts.push(Attempt::without_vm(Outcome::Cancelled, &image));
            }
            (index, attempts)
        });
    }
    let mut results: Vec<Option<CellResult>> = vec![None; cells.len()];
    let mut done = 0;
    while let Some(joined) = tasks.join_next().await {
        let (index, attempts) = match joined {
            Ok(r) => r,
            // A panicking cell task is a bug; the others go on and it shows up as missing.
            Err(e) => {
                progress.line(&format!("runner: internal error in a cell: {e}"));
                continue;
            }
        };
        let result = attempt::merge(&cells[index].cell, &attempts);
        done += 1;
        progress.cell_finished(done, &result);
        if schedule.fail_fast && result.status.is_failing() {
            let _ = stop_tx.send(true);
        }
        results[index] = Some(result);
    }
    progress.finish();
    let interrupted = *cancel.borrow();
    let cells = results
        .into_iter()
        .zip(&cells)
        .map(|(r, c)| {
            r.unwrap_or_else(|| {
                attempt::merge(
                    &c.cell,
                    &[Attempt::without_vm(
                        Outcome::InfraError {
                            kind: crate::outcome::InfraKind::Host,
                            message: "the cell's task failed (a bug in runner)".into(),
                        },
                        &c.plan.image,
                    )],
                )
            })
        })
        .collect();
    Ran { cells, interrupted }
}
