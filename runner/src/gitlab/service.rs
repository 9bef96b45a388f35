//! One `[[runners]]` entry as a service: check the entry, verify a `glrt-` token, then poll
//! `POST /jobs/request` with `request_concurrency` workers — each asking only once it holds
//! room for one more VM in the entry (`limit`) and the host (the shared scheduler's queue:
//! `concurrent` and memory) — and run every job handed over. Drain stops the polling but never abandons a
//! request in flight: a job GitLab already assigned is run (or, when aborting, reported).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::image::{ImageName, RecipeError, RecipeLookup, RepositoryRecipes};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::client::{runner_info, Client};
use super::config::RunnerEntry;
use super::entry::EntryContext;
use super::run::run_job;
use crate::backoff::Backoff;
use crate::serve::{Scheduler, ServeContext, Shutdown, Slot};

/// Longest wait between attempts when GitLab keeps refusing or is unreachable.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(60);

/// Serves one runner entry until the context's shutdown says to stop and its jobs are done.
pub async fn serve(entry: RunnerEntry, ctx: ServeContext) {
    let span = tracing::info_span!("runner", runner = %entry.name);
    serve_entry(entry, ctx).instrument(span).await
}

async fn serve_entry(entry: RunnerEntry, ctx: ServeContext) {
    // A bad entry stops only itself; the other entries keep serving.
    // Only the operator's recipes and the built-in ones: never a job repository's.
    let recipes = RecipeLookup {
        operator_dir: ctx.settings.recipe_dir.clone(),
        repository: RepositoryRecipes::Refused,
    };
    for image in entry.images() {
        let found = image
            .parse::<ImageName>()
            .map_err(RecipeError::from)
            .and_then(|name| recipes.find(&name));
        if let Err(e) = found {
            tracing::error!(
                "runner '{}': image '{image}' cannot be used ({e}); fix `image`/`allowed_images` — this entry takes no jobs",
                entry.name
            );
            return;
        }
    }
    let client = match Client::new(&entry.url) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(
                "runner '{}': {e}; fix `url` — this entry takes no jobs",
                entry.name
            );
            return;
        }
    };
    let memory_mib = match entry.memory_mib() {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("{e}");
            return;
        }
    };
    let system_id = system_id(ctx.settings.store.root());
    let info = runner_info(&entry.name, entry.arch.name());
    if entry.token.starts_with("glrt-") && !verify(&client, &entry, &system_id, &info, &ctx).await {
        return;
    }
    tracing::info!(url = %client.url(), system_id = %system_id, arches = ?entry.arches().iter().map(|a| a.name()).collect::<Vec<_>>(), "polling for jobs");
    let limit = if entry.limit == 0 {
        ctx.scheduler.concurrent()
    } else {
        entry.limit
    };
    let ectx = Arc::new(EntryContext {
        entry,
        client,
        info,
        serve: ctx.clone(),
        fetch_dirs: Default::default(),
    });
    let places = Arc::new(Semaphore::new(limit));
    let last_update = Arc::new(Mutex::new(None::<String>));
    let (job_tx, mut job_rx) = mpsc::channel::<(bytes::Bytes, Slot, OwnedSemaphorePermit)>(4);
    let mut workers = JoinSet::new();
    for _ in 0..ectx.entry.request_concurrency.max(1) {
        workers.spawn(
            poll(
                ectx.clone(),
                places.clone(),
                last_update.clone(),
                system_id.clone(),
                memory_mib,
                job_tx.clone(),
            )
            .in_current_span(),
        );
    }
    drop(job_tx);
    let mut jobs = JoinSet::new();
    loop {
        tokio::select! {
            Some((body, slot, permit)) = job_rx.recv() => {
                jobs.spawn(run_job(ectx.clone(), body, slot, permit).in_current_span());
            }
            Some(done) = jobs.join_next(), if !jobs.is_empty() => {
                if let Err(e) = done {
                    tracing::error!("a job task failed: {e}");
                }
            }
            else => break,
        }
    }
    while workers.join_next().await.is_some() {}
    tracing::info!("stopped");
}

/// `POST /runners/verify` until GitLab accepts the token; false when draining started first.
async fn verify(
    client: &Client,
    entry: &RunnerEntry,
    system_id: &str,
    info: &serde_json::Value,
    ctx: &ServeContext,
) -> bool {
    let mut backoff = Backoff::new(Duration::from_secs(1), MAX_RETRY_WAIT);
    loop {
        let wait = match client.verify(&entry.token, system_id, info).await {
            Ok(r) if r.status.is_success() => {
                tracing::info!("runner token verified");
                return true;
            }
            Ok(r) if r.status.as_u16() == 403 => {
                tracing::error!(
                    "GitLab at {} rejects the token of runner '{}' (403: invalid, expired or revoked); create a runner in GitLab and paste its glrt- token into `token`. Retrying",
                    client.url(),
                    entry.name
                );
                backoff.next(None)
            }
            Ok(r) if r.status.as_u16() == 422 => {
                tracing::error!(
                    "GitLab says runner '{}' is orphaned (422); register it again. Retrying",
                    entry.name
                );
                backoff.next(None)
            }
            Ok(r) => {
                tracing::warn!(status = %r.status, "verifying the runner token failed; retrying");
                backoff.next(r.retry_after())
            }
            Err(e) => {
                tracing::warn!("{e}; retrying");
                backoff.next(None)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ctx.shutdown.draining() => return false,
        }
    }
}

/// One request worker: waits for room, asks for a job, hands it over, repeats.
async fn poll(
    ectx: Arc<EntryContext>,
    places: Arc<Semaphore>,
    last_update: Arc<Mutex<Option<String>>>,
    system_id: String,
    memory_mib: u32,
    jobs: mpsc::Sender<(bytes::Bytes, Slot, OwnedSemaphorePermit)>,
) {
    let ctx = &ectx.serve;
    let entry = &ectx.entry;
    let mut backoff = Backoff::new(Duration::from_secs(1), MAX_RETRY_WAIT);
    loop {
        if ctx.shutdown.is_draining() {
            return;
        }
        let Some((permit, slot)) = room(&places, &ctx.scheduler, &ctx.shutdown, memory_mib).await
        else {
            return;
        };
        let lu = last_update.lock().expect("not poisoned").clone();
        // Not raced against drain: GitLab may assign a job to this very request.
        let reply = ectx
            .client
            .request_job(&entry.token, &system_id, &ectx.info, lu.as_deref())
            .await;
        let wait = match reply {
            Ok(r) if r.status.as_u16() == 201 => {
                backoff.reset();
                if jobs.send((r.body, slot, permit)).await.is_err() {
                    tracing::error!("job dropped: the service is gone");
                }
                continue;
            }
            Ok(r) if r.status.as_u16() == 204 => {
                backoff.reset();
                if let Some(v) = r.header("x-gitlab-last-update") {
                    *last_update.lock().expect("not poisoned") = Some(v.to_string());
                }
                entry.check_interval
            }
            Ok(r) if r.status.as_u16() == 403 => {
                tracing::error!("GitLab rejects the runner token (403: invalid, expired or revoked); check `token` of this entry. Retrying");
                backoff.next(None).max(entry.check_interval)
            }
            Ok(r) if r.status.as_u16() == 422 => {
                tracing::error!(
                    "GitLab says this runner is orphaned (422); register it again. Retrying"
                );
                backoff.next(None).max(entry.check_interval)
            }
            Ok(r) if r.status.as_u16() == 409 => entry.check_interval,
            Ok(r) => {
                tracing::warn!(status = %r.status, "job request refused; retrying");
                backoff.next(r.retry_after()).max(entry.check_interval)
            }
            Err(e) => {
                tracing::warn!("{e}; retrying");
                backoff.next(None).max(entry.check_interval)
            }
        };
        drop((slot, permit));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ctx.shutdown.draining() => return,
        }
    }
}

/// Room for one more job: this entry's permit (`limit`), then a host slot — waiting in the
/// scheduler's one queue, in turn with GitHub jobs (see `serve::scheduler` for why a poller
/// takes its slot before asking GitLab). `None` when draining starts first.
async fn room(
    places: &Arc<Semaphore>,
    scheduler: &Scheduler,
    shutdown: &Shutdown,
    memory_mib: u32,
) -> Option<(OwnedSemaphorePermit, Slot)> {
    let permit = tokio::select! {
        p = places.clone().acquire_owned() => p.expect("never closed"),
        _ = shutdown.draining() => return None,
    };
    let slot = tokio::select! {
        s = scheduler.acquire(memory_mib) => s,
        _ = shutdown.draining() => return None,
    };
    Some((permit, slot))
}

/// The runner's `system_id`, stable per host: `s_` + 12 hex digits of HMAC-SHA256 keyed with
/// the machine id (over our own name, so that a gitlab-runner on the same host differs), or,
/// without a machine id, `r_` + 12 random characters kept in the cache dir.
pub fn system_id(cache: &std::path::Path) -> String {
    use hmac::Mac;
    if let Ok(id) = std::fs::read_to_string("/etc/machine-id") {
        let id = id.trim();
        if !id.is_empty() {
            let mut mac =
                hmac::Hmac::<sha2::Sha256>::new_from_slice(id.as_bytes()).expect("any key length");
            mac.update(b"runner-serve");
            return format!("s_{}", &hex::encode(mac.finalize().into_bytes())[..12]);
        }
    }
    let path = cache.join("gitlab-system-id");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim();
        if s.starts_with("r_") && s.len() == 14 {
            return s.to_string();
        }
    }
    use rand::Rng;
    let id: String = rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(12)
        .map(char::from)
        .collect();
    let id = format!("r_{id}");
    let _ = std::fs::create_dir_all(cache);
    let _ = std::fs::write(&path, &id);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One VM slot, taken; then GitHub jobs and GitLab pollers ask for it in turn. Each freed
    /// slot must go to whoever asked first, whichever side that is.
    #[tokio::test(start_paused = true)]
    async fn slots_go_to_gitlab_pollers_and_github_jobs_in_arrival_order() {
        use crate::capacity::HostResources;
        use crate::serve::ShutdownController;
        let (_controller, shutdown) = ShutdownController::new();
        let host = HostResources {
            cores: 2,
            available_mib: 64 * 1024,
        };
        let scheduler = Arc::new(Scheduler::new(1, host));
        let held = scheduler.acquire(1024).await;
        let (order_tx, mut order_rx) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        // (who, arrives after ms) — GitHub and GitLab alternate.
        let arrivals = [
            ("github-1", 10),
            ("gitlab-1", 20),
            ("github-2", 30),
            ("gitlab-2", 40),
        ];
        for (who, after) in arrivals {
            let (scheduler, shutdown) = (scheduler.clone(), shutdown.clone());
            let order_tx = order_tx.clone();
            let places = Arc::new(Semaphore::new(1));
            tasks.spawn(async move {
                tokio::time::sleep(Duration::from_millis(after)).await;
                let slot = if who.starts_with("gitlab") {
                    let room = room(&places, &scheduler, &shutdown, 1024);
                    room.await.unwrap().1
                } else {
                    scheduler.acquire(1024).await
                };
                order_tx.send(who).unwrap();
                // Each holds its VM a while, then frees it.
                tokio::time::sleep(Duration::from_secs(10)).await;
                drop(slot);
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(held);
        while tasks.join_next().await.is_some() {}
        drop(order_tx);
        let mut order = Vec::new();
        while let Some(who) = order_rx.recv().await {
            order.push(who);
        }
        assert_eq!(order, ["github-1", "gitlab-1", "github-2", "gitlab-2"]);
    }

    #[test]
    fn system_id_is_stable_and_well_formed() {
        let dir = tempfile::tempdir().unwrap();
        let a = system_id(dir.path());
        assert_eq!(a, system_id(dir.path()));
        assert_eq!(a.len(), 14, "{a}");
        assert!(a.starts_with("s_") || a.starts_with("r_"), "{a}");
    }
}
