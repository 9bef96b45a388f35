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
use super::s3cache;
use crate::outcome::Outcome;
use crate::serve::limits::size_text;

/// Where an entry's caches go.
#[derive(Debug, Clone)]
pub enum CacheBackend {
    /// On this host (no `[runners.cache]`).
    Local(cache::CacheStore),
    /// In the S3-compatible store of `[runners.cache]`.
    Shared(std::sync::Arc<s3cache::S3Store>),
    /// `[runners.cache]` that passed the start-up check but cannot be used (the reason).
    Unavailable(String),
}

/// The entry's cache: its `[runners.cache]` store, or the local one.
pub fn cache_store(ectx: &EntryContext) -> CacheBackend {
    // Checked at the entry's start (RunnerEntry::check).
    let max = ectx.entry.cache_max_bytes().unwrap_or(u64::MAX);
    if let Some(config) = &ectx.entry.cache {
        return match s3cache::S3Store::new(config, &ectx.entry.token, max) {
            Ok(s) => CacheBackend::Shared(std::sync::Arc::new(s)),
            Err(e) => CacheBackend::Unavailable(e),
        };
    }
    let dir = ectx
        .serve
        .settings
        .store
        .root()
        .join("serve-cache")
        .join(sanitize(&ectx.entry.name));
    CacheBackend::Local(cache::CacheStore::new(dir, max))
}

fn warning(text: &str) -> String {
    format!("\x1b[33;1mWARNING: {text}\x1b[0;m\n")
}

/// Lists the files git tracks in the checkout at `root` (none without one) for the
/// untracked files of `cache:`/`artifacts:`, and hands the list to the guest. A list that
/// cannot be had drops the untracked files (a warning): caching tracked ones instead would
/// be wrong.
pub async fn list_tracked(
    ectx: &EntryContext,
    prepared: &mut Prepared,
    root: Option<&std::path::Path>,
    say: &(dyn Fn(&str) + Sync),
) {
    let list = match root {
        None => Ok(Vec::new()),
        Some(root) => {
            let timeout = std::time::Duration::from_secs(ectx.entry.clone_timeout.max(1));
            crate::sources::tracked_files(root, timeout, ectx.entry.limits.max_workspace).await
        }
    };
    match list {
        Ok(list) => {
            prepared.tracked = crate::gitlab::prepare::tracked_set(&list);
            prepared.plan.files.push(crate::run::plan::GuestFile {
                path: crate::gitlab::prepare::GUEST_TRACKED_LIST.into(),
                contents: crate::gitlab::prepare::tracked_patterns(&list),
            });
        }
        Err(e) => {
            prepared.plan.untracked = None;
            say(&format!(
                "\x1b[33;1mWARNING: untracked files are not cached or uploaded: {}\x1b[0;m\n",
                crate::outcome::chain(&e)
            ));
        }
    }
}

/// Restores the job's caches into its workspace `root` (a new directory under `work` when
/// the job has no checkout). Err: the job's failure_reason, the cause already in the log.
pub async fn restore_caches(
    store: &CacheBackend,
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
    let project = job.job_info.project_id;
    let fallback = job.var(cache::FALLBACK_VARIABLE).map(str::to_string);
    let max = entry.limits.max_workspace;
    match store {
        CacheBackend::Local(store) => {
            let (store, caches_of_job, log) = (store.clone(), job.cache.clone(), log.clone());
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
                say(&warning(&format!("restoring the cache failed: {e}")));
            }
        }
        CacheBackend::Shared(s3) => {
            for c in job.cache.iter().filter(|c| c.policy.pulls()) {
                restore_shared(s3, project, c, fallback.as_deref(), &root, work, max, log).await;
            }
        }
        CacheBackend::Unavailable(e) => {
            say(&warning(&format!("the shared cache cannot be used: {e}")));
        }
    }
    say(&format!(
        "section_end:{}:restore_cache\r\x1b[0K",
        unix_now()
    ));
    Ok(())
}

/// Restores one cache from the shared store: its key, then its fallbacks; a key that
/// cannot be downloaded is a warning and the next one is tried.
#[allow(clippy::too_many_arguments)]
async fn restore_shared(
    s3: &std::sync::Arc<s3cache::S3Store>,
    project: u64,
    c: &job::Cache,
    fallback: Option<&str>,
    root: &std::path::Path,
    work: &std::path::Path,
    max: u64,
    log: &mpsc::UnboundedSender<Vec<u8>>,
) {
    let say = |s: &str| {
        let _ = log.send(s.as_bytes().to_vec());
    };
    let (keys, warned) = cache::restore_keys(c, fallback);
    if let Some(w) = warned {
        say(&warning(&w));
    }
    say(&format!("Checking cache for {}...\n", keys[0]));
    for k in &keys {
        let tmp = match tempfile::NamedTempFile::new_in(work) {
            Ok(t) => t.into_temp_path(),
            Err(e) => {
                say(&warning(&format!("cannot download the cache: {e}")));
                return;
            }
        };
        match s3.get(project, k, &tmp).await {
            Ok(Some(size)) => {
                say(&format!(
                    "Downloaded cache {k} from the shared cache ({})\n",
                    size_text(size)
                ));
                let (k, root, log, path) = (k.clone(), root.to_path_buf(), log.clone(), tmp);
                let _ = tokio::task::spawn_blocking(move || {
                    let say = |s: &str| {
                        let _ = log.send(s.as_bytes().to_vec());
                    };
                    cache::extract(&path, &k, &root, max, &say);
                })
                .await;
                return;
            }
            Ok(None) => {}
            Err(e) => say(&warning(&format!(
                "cannot download cache {k}: {}",
                crate::outcome::chain(&e)
            ))),
        }
    }
    say(&warning(&format!(
        "no cache for {} (nor for its {} fallback key(s))",
        keys[0],
        keys.len() - 1
    )));
}

/// The files of `found` that cache `c` takes: those its paths match, and with
/// `untracked: true` those git does not track.
pub fn files_of(
    c: &job::Cache,
    globs: &[String],
    prepared: &Prepared,
    found: &Found,
) -> Vec<PathBuf> {
    let root = &prepared.plan.out_dir;
    let mut files = crate::gitlab::prepare::select(&found.artifacts, root, globs);
    if c.untracked && prepared.plan.untracked.is_some() {
        let more = crate::gitlab::prepare::untracked(&found.artifacts, root, &prepared.tracked);
        for f in more {
            if !files.contains(&f) {
                files.push(f);
            }
        }
    }
    files
}

/// The size noted when the untracked files were left out of what came back, if they were.
pub fn untracked_left_out(prepared: &Prepared) -> Option<u64> {
    prepared.plan.untracked.as_ref()?;
    let note = crate::run::transfer::untracked_note(&prepared.plan.out_dir);
    std::fs::read_to_string(note).ok()?.trim().parse().ok()
}

/// Saves the caches whose `policy` and `when` fit the outcome, from the files the guest gave
/// back; trouble is a warning in the log, never the job's failure.
pub async fn save_caches(
    store: &CacheBackend,
    job: &Job,
    prepared: &Prepared,
    outcome: &Outcome,
    found: &Found,
    log: &mpsc::UnboundedSender<Vec<u8>>,
) {
    let say = |s: &str| {
        let _ = log.send(s.as_bytes().to_vec());
    };
    let succeeded = outcome.is_success();
    let due: Vec<(job::Cache, Vec<PathBuf>)> = prepared
        .caches
        .iter()
        .filter(|(c, _)| cache::saves_after(c, succeeded))
        .map(|(c, globs)| (c.clone(), files_of(c, globs, prepared, found)))
        .collect();
    if due.is_empty() {
        return;
    }
    say(&format!(
        "section_start:{}:archive_cache\r\x1b[0K\x1b[36;1mSaving cache\x1b[0;m\n",
        unix_now()
    ));
    let project = job.job_info.project_id;
    let root = prepared.plan.out_dir.clone();
    let left_out = untracked_left_out(prepared);
    for (c, files) in due {
        let key = cache::key(&c);
        if c.untracked {
            if let Some(size) = left_out {
                say(&warning(&format!(
                    "cache {key}: the untracked files came to {} with the artifacts, over this runner's max_artifacts_size = {}; not saved",
                    size_text(size),
                    size_text(prepared.plan.max_artifacts)
                )));
                continue;
            }
            if prepared.plan.untracked.is_none() {
                say(&warning(&format!(
                    "cache {key}: the untracked files could not be listed; not saved"
                )));
                continue;
            }
        }
        if files.is_empty() {
            say(&warning(&format!(
                "cache {key}: no files matched its paths; not saved"
            )));
            continue;
        }
        match store {
            CacheBackend::Local(store) => save_local(store, project, &key, &root, files, log).await,
            CacheBackend::Shared(s3) => save_shared(s3, project, &key, &root, files, &say).await,
            CacheBackend::Unavailable(e) => say(&warning(&format!(
                "cache {key} not saved: the shared cache cannot be used: {e}"
            ))),
        }
    }
    say(&format!(
        "section_end:{}:archive_cache\r\x1b[0K",
        unix_now()
    ));
}

async fn save_local(
    store: &cache::CacheStore,
    project: u64,
    key: &str,
    root: &std::path::Path,
    files: Vec<PathBuf>,
    log: &mpsc::UnboundedSender<Vec<u8>>,
) {
    let (store, key, root, log) = (
        store.clone(),
        key.to_string(),
        root.to_path_buf(),
        log.clone(),
    );
    // Blocking file work, off the runtime's workers.
    let saved = tokio::task::spawn_blocking(move || {
        let say = |s: &str| {
            let _ = log.send(s.as_bytes().to_vec());
        };
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
            Ok(cache::Saved::TooLarge { size }) => say(&too_large(&key, size, store.max_size())),
            Err(e) => say(&warning(&format!(
                "cache {key} not saved: {}",
                crate::outcome::chain(&e)
            ))),
        }
    })
    .await;
    if let Err(e) = saved {
        tracing::warn!("saving the cache failed: {e}");
    }
}

fn too_large(key: &str, size: u64, max: u64) -> String {
    warning(&format!(
        "cache {key} is {} packed, over this runner's cache_max_size = {}; not saved",
        size_text(size),
        size_text(max)
    ))
}

/// Packs the cache next to the job's output directory and uploads it.
async fn save_shared(
    s3: &std::sync::Arc<s3cache::S3Store>,
    project: u64,
    key: &str,
    root: &std::path::Path,
    files: Vec<PathBuf>,
    say: &(dyn Fn(&str) + Sync),
) {
    let count = files.len();
    let dir = root.parent().unwrap_or(root).to_path_buf();
    let root_owned = root.to_path_buf();
    let packed = tokio::task::spawn_blocking(move || cache::pack(&root_owned, &files, &dir)).await;
    let (tmp, size) = match packed {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            return say(&warning(&format!(
                "cache {key} not saved: {}",
                crate::outcome::chain(&e)
            )))
        }
        Err(e) => return say(&warning(&format!("cache {key} not saved: {e}"))),
    };
    if size > s3.max_size() {
        return say(&too_large(key, size, s3.max_size()));
    }
    match s3.put(project, key, tmp.path()).await {
        Ok(()) => say(&format!(
            "Created cache {key} ({count} file(s), {}) in the shared cache\n",
            size_text(size)
        )),
        Err(e) => say(&warning(&format!(
            "cache {key} not uploaded: {}",
            crate::outcome::chain(&e)
        ))),
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
