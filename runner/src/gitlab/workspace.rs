//! The job's workspace beyond its sources, on the host: the caches restored and the earlier
//! jobs' artifacts downloaded into it before the script (gitlab-runner's order), and the
//! caches saved after it from what the guest gave back. Glue between a job (`run`) and the
//! mechanisms (`cache`, `dependencies`, `unzip`); the log says what happened, and a failure
//! comes back as the job's `failure_reason`.

use std::path::PathBuf;

use tokio::sync::{mpsc, watch};

use super::cache;
use super::dependencies;
use super::entry::EntryContext;
use super::job::{self, Job};
use super::prepare::Prepared;
use super::reporter::{sanitize, unix_now, Found};
use crate::outcome::Outcome;
use crate::serve::limits::size_text;

/// The entry's local cache.
pub fn cache_store(ectx: &EntryContext) -> cache::CacheStore {
    let dir = ectx
        .serve
        .settings
        .store
        .root()
        .join("serve-cache")
        .join(sanitize(&ectx.entry.name));
    // Checked at the entry's start (RunnerEntry::check).
    let max = ectx.entry.cache_max_bytes().unwrap_or(u64::MAX);
    cache::CacheStore::new(dir, max)
}

/// Restores the job's caches into its workspace `root` (a new directory under `work` when
/// the job has no checkout). Err: the job's failure_reason, the cause already in the log.
pub async fn restore_caches(
    store: &cache::CacheStore,
    ectx: &EntryContext,
    job: &Job,
    root: &mut Option<PathBuf>,
    work: &std::path::Path,
    log: &mpsc::UnboundedSender<Vec<u8>>,
) -> Result<(), &'static str> {
    if !job.cache.iter().any(|c| c.policy.pulls()) {
        return Ok(());
    }
    let say = |s: &str| {
        let _ = log.send(s.as_bytes().to_vec());
    };
    let entry = &ectx.entry;
    let root = root.get_or_insert_with(|| work.join("src")).clone();
    if let Err(e) = std::fs::create_dir_all(&root) {
        say(&format!(
            "\x1b[31;1mERROR: cannot create the workspace {}: {e}\x1b[0;m\n",
            root.display()
        ));
        return Err("runner_system_failure");
    }
    say(&format!(
        "section_start:{}:restore_cache\r\x1b[0K\x1b[36;1mRestoring cache\x1b[0;m\n",
        unix_now()
    ));
    let (store, project, caches_of_job, log) = (
        store.clone(),
        job.job_info.project_id,
        job.cache.clone(),
        log.clone(),
    );
    let fallback = job.var(cache::FALLBACK_VARIABLE).map(str::to_string);
    let max = entry.limits.max_workspace;
    // Blocking file work, off the runtime's workers.
    let restored = tokio::task::spawn_blocking(move || {
        let say = |s: &str| {
            let _ = log.send(s.as_bytes().to_vec());
        };
        cache::restore(
            &store,
            project,
            &caches_of_job,
            fallback.as_deref(),
            &root,
            max,
            &say,
        )
    })
    .await;
    if let Err(e) = restored {
        say(&format!(
            "\x1b[33;1mWARNING: restoring the cache failed: {e}\x1b[0;m\n"
        ));
    }
    say(&format!(
        "section_end:{}:restore_cache\r\x1b[0K",
        unix_now()
    ));
    Ok(())
}

/// Saves the caches whose `policy` and `when` fit the outcome, from the files the guest gave
/// back; trouble is a warning in the log, never the job's failure.
pub async fn save_caches(
    store: &cache::CacheStore,
    job: &Job,
    prepared: &Prepared,
    outcome: &Outcome,
    found: &Found,
    log: &mpsc::UnboundedSender<Vec<u8>>,
) {
    let succeeded = outcome.is_success();
    let due: Vec<(job::Cache, Vec<PathBuf>)> = prepared
        .caches
        .iter()
        .filter(|(c, _)| cache::saves_after(c, succeeded))
        .map(|(c, globs)| {
            let files =
                crate::gitlab::prepare::select(&found.artifacts, &prepared.plan.out_dir, globs);
            (c.clone(), files)
        })
        .collect();
    if due.is_empty() {
        return;
    }
    let (store, project, root, log) = (
        store.clone(),
        job.job_info.project_id,
        prepared.plan.out_dir.clone(),
        log.clone(),
    );
    let saved = tokio::task::spawn_blocking(move || {
        let say = |s: &str| {
            let _ = log.send(s.as_bytes().to_vec());
        };
        say(&format!(
            "section_start:{}:archive_cache\r\x1b[0K\x1b[36;1mSaving cache\x1b[0;m\n",
            unix_now()
        ));
        for (c, files) in due {
            let key = cache::key(&c);
            if c.untracked {
                say(&format!("\x1b[33;1mWARNING: cache {key}: untracked files are not cached by this runner; list them in cache:paths\x1b[0;m\n"));
            }
            if files.is_empty() {
                say(&format!(
                    "\x1b[33;1mWARNING: cache {key}: no files matched its paths; not saved\x1b[0;m\n"
                ));
                continue;
            }
            match store.save(project, &key, &root, &files) {
                Ok(cache::Saved::Stored {
                    files,
                    size,
                    evicted,
                }) => say(&format!(
                    "Created cache {key} ({files} file(s), {}{})\n",
                    size_text(size),
                    if evicted > 0 {
                        format!("; {evicted} least recently used cache(s) removed")
                    } else {
                        String::new()
                    }
                )),
                Ok(cache::Saved::TooLarge { size }) => say(&format!(
                    "\x1b[33;1mWARNING: cache {key} is {} packed, over this runner's cache_max_size = {}; not saved\x1b[0;m\n",
                    size_text(size),
                    size_text(store.max_size())
                )),
                Err(e) => say(&format!(
                    "\x1b[33;1mWARNING: cache {key} not saved: {}\x1b[0;m\n",
                    crate::outcome::chain(&e)
                )),
            }
        }
        say(&format!("section_end:{}:archive_cache\r\x1b[0K", unix_now()));
    })
    .await;
    if let Err(e) = saved {
        tracing::warn!("saving the cache failed: {e}");
    }
}

/// Downloads the artifacts of the job's dependencies into its workspace `root` (a new
/// directory under `work` when the job has no checkout). Err: the job's failure_reason,
/// the cause already in the log.
pub async fn restore_dependencies(
    ectx: &EntryContext,
    job: &Job,
    root: &mut Option<PathBuf>,
    work: &std::path::Path,
    cancel: &watch::Receiver<bool>,
    say: &(dyn Fn(&str) + Sync),
) -> Result<(), &'static str> {
    if !job.dependencies.iter().any(|d| d.artifacts_file.is_some()) {
        return Ok(());
    }
    let entry = &ectx.entry;
    let root = root.get_or_insert_with(|| work.join("src"));
    if let Err(e) = std::fs::create_dir_all(&*root) {
        say(&format!(
            "\x1b[31;1mERROR: cannot create the workspace {}: {e}\x1b[0;m\n",
            root.display()
        ));
        return Err("runner_system_failure");
    }
    say(&format!(
        "section_start:{}:download_artifacts\r\x1b[0K\x1b[36;1mDownloading artifacts\x1b[0;m\n",
        unix_now()
    ));
    let caps = dependencies::Caps {
        download: entry.limits.max_dependencies,
        unpacked: entry.limits.max_workspace,
    };
    let restore = dependencies::restore(&ectx.client, &job.dependencies, root, work, caps, say);
    let mut cancelled = cancel.clone();
    let result = tokio::select! {
        r = restore => r,
        _ = cancelled.wait_for(|c| *c) => {
            say("\x1b[31;1mERROR: cancelled while downloading artifacts\x1b[0;m\n");
            return Err("runner_system_failure");
        }
    };
    if let Err(e) = result {
        let msg = crate::outcome::chain(&e);
        tracing::warn!("job refused: {msg}");
        say(&format!("\x1b[31;1mERROR: {msg}\x1b[0;m\n"));
        let reason = if e.is_job_fault() {
            "script_failure"
        } else {
            "runner_system_failure"
        };
        return Err(reason);
    }
    say(&format!(
        "section_end:{}:download_artifacts\r\x1b[0K",
        unix_now()
    ));
    Ok(())
}
