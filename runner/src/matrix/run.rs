//! Running a matrix: each (image, arch) base image is built or verified once, up front and
//! one at a time (never raced by cells), then cells run side by side up to `jobs` at a time,
//! each attempt in a fresh VM through the same `run_suite` as `runner test`. A failing cell
//! is re-run up to `retries` times and never stops the others (unless `fail_fast`); a
//! cancellation (Ctrl-C / SIGTERM) stops every running VM and ends the cells not yet run as
//! cancelled, so a partial report can still be written.

use std::collections::HashMap;

use engine::image::{ImageName, RecipeLookup, RepositoryRecipes};
use std::sync::Arc;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::attempt::{self, Attempt, Recorder};
use super::progress::Progress;
use super::results::CellResult;
use super::spec::Cell;
use crate::events::Reporters;
use crate::outcome::Outcome;
use crate::run::execute::{run_suite, RunSettings};
use crate::run::plan::SuitePlan;
use crate::run::platform;

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
    let mut seen: Vec<(String, engine::Arch, ImageName, RepositoryRecipes)> = Vec::new();
    for c in cells {
        let k = (
            c.plan.image.to_string(),
            c.plan.id.arch,
            c.plan.image.clone(),
            c.plan.repository_recipes.clone(),
        );
        if !seen.iter().any(|s| s.0 == k.0 && s.1 == k.1) {
            seen.push(k);
        }
    }
    let mut failed = HashMap::new();
    for (image, arch, name, repository) in seen {
        if *cancel.borrow() {
            break;
        }
        progress.line(&format!(
            "preparing image {image} for {arch} (built once, shared by its cells)"
        ));
        let prepare = async {
            let platform = platform::resolve(arch, settings.accel, &settings.store).await?;
            let quiet = |_: &str| {};
            platform::base_image(
                &settings.store,
                &name,
                &RecipeLookup {
                    operator_dir: settings.recipe_dir.clone(),
                    repository,
                },
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
            if let Outcome::InfraError { message, .. } = &outcome {
                let first = message.lines().next().unwrap_or_default();
                progress.line(&format!(
                    "image {image} for {arch} cannot be used, its cells are error cells: {first}"
                ));
            }
            failed.insert((image, arch), outcome);
        }
    }
    failed
}

/// Runs one cell: attempts in fresh VMs until one needs no retry or the retries are used.
async fn run_cell(
    planned: &PlannedCell,
    retries: u32,
    settings: &RunSettings,
    progress: &Progress,
    stop: watch::Receiver<bool>,
) -> Vec<Attempt> {
    let image = &planned.plan.image;
    let mut attempts = Vec::new();
    for n in 1..=retries + 1 {
        if *stop.borrow() {
            break;
        }
        let recorder = Recorder::new(image);
        let mut reporters = Reporters::default();
        reporters.add(Box::new(recorder.clone()));
        reporters.add(Box::new(progress.cell_started(&planned.cell.key(), n)));
        let outcome = run_suite(&planned.plan, settings, &mut reporters, stop.clone()).await;
        drop(reporters);
        attempts.push(recorder.take());
        if !attempt::worth_retrying(&outcome) {
            break;
        }
    }
    if attempts.is_empty() {
        attempts.push(Attempt::without_vm(Outcome::Cancelled, image));
    }
    attempts
}

/// The order cells start in: by `expected` duration, longest first (so the long cells do
/// not end up last, alone on an otherwise idle host); cells without one first of all (they
/// may be long), then in the order given.
pub fn start_order(expected: &[Option<f64>]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..expected.len()).collect();
    order.sort_by(|&a, &b| {
        let key = |i: usize| expected[i].unwrap_or(f64::INFINITY);
        key(b).total_cmp(&key(a))
    });
    order
}

fn schedule_order(cells: &[PlannedCell], order: Option<Vec<usize>>) -> Option<Vec<usize>> {
    order.filter(|o| {
        let mut sorted = o.clone();
        sorted.sort_unstable();
        sorted == (0..cells.len()).collect::<Vec<_>>()
    })
}

fn order_or_default(order: Option<Vec<usize>>, n: usize) -> Vec<usize> {
    order.unwrap_or_else(|| (0..n).collect())
}

/// Runs every cell, starting them in `order` (indexes into `cells`; default: as given);
/// returns when all have ended (or were cancelled).
pub async fn run_matrix(
    cells: Vec<PlannedCell>,
    order: Option<Vec<usize>>,
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
    let mut results: Vec<Option<CellResult>> = vec![None; cells.len()];
    // Cells start in `order` (longest first, when the caller knows durations): the slot is
    // taken here, before the cell's task exists, so the order is exactly this one.
    let mut waiting = order_or_default(schedule_order(&cells, order), cells.len()).into_iter();
    let mut next = waiting.next();
    // Each task hands its slot back with its result, so the slot is free only once the
    // result has been handled (a fail-fast stop is sent before another cell can start).
    let mut tasks: JoinSet<(usize, Vec<Attempt>, OwnedSemaphorePermit)> = JoinSet::new();
    let mut done = 0;
    let mut stop_seen = stop.clone();
    loop {
        let stopped = *stop_seen.borrow();
        if stopped {
            // Everything not started yet ends as cancelled (or as its image's error).
            for index in next.take().into_iter().chain(waiting.by_ref()) {
                let outcome = unusable
                    .get(&(
                        cells[index].plan.image.to_string(),
                        cells[index].plan.id.arch,
                    ))
                    .cloned()
                    .unwrap_or(Outcome::Cancelled);
                results[index] = Some(attempt::merge(
                    &cells[index].cell,
                    &[Attempt::without_vm(outcome, &cells[index].plan.image)],
                ));
            }
        }
        if next.is_none() && tasks.is_empty() {
            break;
        }
        // Finished cells and a stop are handled before another cell starts, so that a
        // fail-fast failure or a signal never lets one more cell slip in.
        tokio::select! {
            biased;
            Some(joined) = tasks.join_next() => {
                let (index, attempts, slot) = match joined {
                    Ok(r) => r,
                    // A panicking cell task is a bug; the others go on, it ends as an error.
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
                drop(slot);
            }
            _ = stop_seen.changed(), if !stopped => {}
            slot = slots.clone().acquire_owned(), if next.is_some() => {
                let index = next.take().expect("guarded");
                next = waiting.next();
                let planned = cells[index].clone();
                let image_problem = unusable
                    .get(&(planned.plan.image.to_string(), planned.plan.id.arch))
                    .cloned();
                let (settings, progress, stop) =
                    (settings.clone(), progress.clone(), stop.clone());
                let slot = slot.expect("the semaphore is never closed");
                tasks.spawn(async move {
                    let attempts = match image_problem {
                        Some(outcome) => {
                            vec![Attempt::without_vm(outcome, &planned.plan.image)]
                        }
                        None => {
                            run_cell(&planned, schedule.retries, &settings, &progress, stop)
                                .await
                        }
                    };
                    (index, attempts, slot)
                });
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_cells_start_first_and_unknown_ones_before_them() {
        // (expected durations, start order)
        let cases: [(&[Option<f64>], &[usize]); 3] = [
            (&[Some(1.0), Some(5.0), Some(3.0)], &[1, 2, 0]),
            (&[Some(1.0), None, Some(3.0)], &[1, 2, 0]),
            // Ties and unknowns keep the given order.
            (&[None, None, Some(2.0), Some(2.0)], &[0, 1, 2, 3]),
        ];
        for (expected, want) in cases {
            assert_eq!(start_order(expected), want, "{expected:?}");
        }
    }
}
