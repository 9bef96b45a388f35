//! GitLab's `cache:`, kept on this host: one zip per project and key under
//! `<cache>/serve-cache/<entry>/<project id>/`, restored into the job's workspace before the
//! script (the key, then `fallback_keys` in order, then `CACHE_FALLBACK_KEY`) and saved from
//! the files the guest gave back after it (`policy`, `when`). The entry's archives together
//! stay under `cache_max_size`: the least recently used go first. Keys come resolved from
//! GitLab (`key:files` hashed, `-protected`/`-non_protected` appended), so protected and
//! unprotected branches never share a cache; a `CACHE_FALLBACK_KEY` naming a protected cache
//! is ignored (gitlab-runner's rule). A key is stored by its SHA-256, so no key can name a
//! path. Cache trouble never fails a job: it is a warning, as in gitlab-runner.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::job::{Cache, When};
use super::unzip;
use crate::serve::limits::size_text;

/// The job variable gitlab-runner reads as the last fallback key.
pub const FALLBACK_VARIABLE: &str = "CACHE_FALLBACK_KEY";
/// GitLab's key when `cache:key` is not given.
const DEFAULT_KEY: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot write the cache {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path} for the cache")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot pack the cache")]
    Pack(#[source] zip::result::ZipError),
}

/// The archives of one `[[runners]]` entry.
#[derive(Debug, Clone)]
pub struct CacheStore {
    dir: PathBuf,
    max_size: u64,
}

/// What a save did.
#[derive(Debug, PartialEq, Eq)]
pub enum Saved {
    Stored {
        files: usize,
        size: u64,
        evicted: usize,
    },
    /// The archive alone is over `cache_max_size`: not kept.
    TooLarge { size: u64 },
}

impl CacheStore {
    pub fn new(dir: PathBuf, max_size: u64) -> CacheStore {
        CacheStore { dir, max_size }
    }

    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    fn archive(&self, project: u64, key: &str) -> PathBuf {
        let digest = hex::encode(Sha256::digest(key.as_bytes()));
        self.dir
            .join(project.to_string())
            .join(format!("{digest}.zip"))
    }

    /// The first of `keys` with an archive, and that archive (marked as just used).
    pub fn find(&self, project: u64, keys: &[String]) -> Option<(String, PathBuf)> {
        keys.iter().find_map(|k| {
            let path = self.archive(project, k);
            let f = std::fs::File::options().append(true).open(&path).ok()?;
            // Used now: the last to be evicted. (The mtime is the LRU clock: atime is often
            // not kept.)
            let _ = f.set_modified(std::time::SystemTime::now());
            Some((k.clone(), path))
        })
    }

    /// Stores `files` (below `root`, named relative to it) as `key`'s archive, replacing any
    /// earlier one atomically, then evicts the least recently used archives over the bound.
    pub fn save(
        &self,
        project: u64,
        key: &str,
        root: &Path,
        files: &[PathBuf],
    ) -> Result<Saved, CacheError> {
        let target = self.archive(project, key);
        let dir = target.parent().expect("an archive is in a directory");
        std::fs::create_dir_all(dir).map_err(|source| CacheError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let (tmp, size) = pack(root, files, dir)?;
        if size > self.max_size {
            return Ok(Saved::TooLarge { size });
        }
        tmp.persist(&target).map_err(|e| CacheError::Write {
            path: target.clone(),
            source: e.error,
        })?;
        let evicted = self.evict(&target)?;
        Ok(Saved::Stored {
            files: files.len(),
            size,
            evicted,
        })
    }

    /// Removes the least recently used archives of the entry, never `keep`, until the rest
    /// fit `max_size`; returns how many went.
    fn evict(&self, keep: &Path) -> Result<usize, CacheError> {
        let mut all: Vec<(std::time::SystemTime, u64, PathBuf)> = Vec::new();
        let read_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError::Read { path, source }
        };
        for project in std::fs::read_dir(&self.dir).map_err(read_err(&self.dir))? {
            let project = project.map_err(read_err(&self.dir))?.path();
            let Ok(entries) = std::fs::read_dir(&project) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                if path.extension().is_some_and(|x| x == "zip") {
                    if let Ok(m) = e.metadata() {
                        let used = m.modified().unwrap_or(std::time::UNIX_EPOCH);
                        all.push((used, m.len(), path));
                    }
                }
            }
        }
        let mut total: u64 = all.iter().map(|(_, size, _)| size).sum();
        all.sort();
        let mut evicted = 0;
        for (_, size, path) in all {
            if total <= self.max_size {
                break;
            }
            if path == keep {
                continue;
            }
            // Gone already (another job evicted it): counts as evicted all the same.
            let _ = std::fs::remove_file(&path);
            total -= size;
            evicted += 1;
        }
        Ok(evicted)
    }
}

/// Packs `files` (below `root`, named relative to it) into a new zip in `dir`; returns it
/// (removed when dropped) and its size.
pub fn pack(
    root: &Path,
    files: &[PathBuf],
    dir: &Path,
) -> Result<(tempfile::NamedTempFile, u64), CacheError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CacheError::Write { path, source }
    };
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(write_err(dir))?;
    let target = tmp.path().to_path_buf();
    let mut zip = zip::ZipWriter::new(tmp);
    for f in files {
        use std::os::unix::fs::PermissionsExt;
        let rel = f
            .strip_prefix(root)
            .unwrap_or(f)
            .to_string_lossy()
            .into_owned();
        let read_err = |source| CacheError::Read {
            path: f.clone(),
            source,
        };
        let mode = std::fs::metadata(f).map_err(read_err)?.permissions().mode();
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .large_file(true)
            .unix_permissions(if mode & 0o111 != 0 { 0o755 } else { 0o644 });
        zip.start_file(rel, options).map_err(CacheError::Pack)?;
        let mut input = std::fs::File::open(f).map_err(read_err)?;
        std::io::copy(&mut input, &mut zip).map_err(write_err(&target))?;
    }
    let mut tmp = zip.finish().map_err(CacheError::Pack)?;
    tmp.flush().map_err(write_err(&target))?;
    let size = tmp.as_file().metadata().map_err(write_err(&target))?.len();
    Ok((tmp, size))
}

/// Unpacks the archive `path` into `root` (at most `max_bytes`) and says so in the log.
pub fn extract(path: &Path, found: &str, root: &Path, max_bytes: u64, say: &(dyn Fn(&str) + Sync)) {
    let result = std::fs::File::open(path)
        .map_err(|source| unzip::UnzipError::Write {
            path: path.to_path_buf(),
            source,
        })
        .and_then(|f| unzip::unzip(std::io::BufReader::new(f), root, max_bytes));
    match result {
        Ok(done) => say(&format!(
            "Successfully extracted cache {found} ({} file(s), {})\n",
            done.files,
            size_text(done.bytes)
        )),
        Err(e) => say(&format!(
            "\x1b[33;1mWARNING: cannot extract cache {found}: {}\x1b[0;m\n",
            crate::outcome::chain(&e)
        )),
    }
}

/// The keys a cache is restored from, in order: its key, its `fallback_keys`, then the
/// `CACHE_FALLBACK_KEY` variable unless it names a protected cache. Also returns a warning
/// for the log when that variable was ignored.
pub fn restore_keys(
    cache: &Cache,
    fallback_variable: Option<&str>,
) -> (Vec<String>, Option<String>) {
    let mut keys = vec![key(cache)];
    keys.extend(
        cache
            .fallback_keys
            .iter()
            .filter(|k| !k.is_empty())
            .cloned(),
    );
    let mut warning = None;
    match fallback_variable.filter(|v| !v.is_empty()) {
        Some(v) if v.trim_end().ends_with("-protected") => {
            warning = Some(format!(
                "{FALLBACK_VARIABLE} '{v}' names a protected cache, which an unprotected job may not read; it is ignored"
            ));
        }
        Some(v) => keys.push(v.to_string()),
        None => {}
    }
    let mut seen = std::collections::HashSet::new();
    keys.retain(|k| seen.insert(k.clone()));
    (keys, warning)
}

/// The cache's key (GitLab's default when empty).
pub fn key(cache: &Cache) -> String {
    if cache.key.is_empty() {
        DEFAULT_KEY.to_string()
    } else {
        cache.key.clone()
    }
}

/// Whether a cache is saved after a run that `succeeded` or not.
pub fn saves_after(cache: &Cache, succeeded: bool) -> bool {
    cache.policy.pushes()
        && match cache.when {
            When::OnSuccess => succeeded,
            When::OnFailure => !succeeded,
            When::Always => true,
        }
}

/// Restores the job's caches into `root`, each from the first of its keys that has an
/// archive; at most `max_bytes` unpacked per cache. Writes what happened to the log.
pub fn restore(
    store: &CacheStore,
    project: u64,
    caches: &[Cache],
    fallback_variable: Option<&str>,
    root: &Path,
    max_bytes: u64,
    say: &(dyn Fn(&str) + Sync),
) {
    for cache in caches.iter().filter(|c| c.policy.pulls()) {
        let (keys, warning) = restore_keys(cache, fallback_variable);
        if let Some(w) = warning {
            say(&format!("\x1b[33;1mWARNING: {w}\x1b[0;m\n"));
        }
        say(&format!("Checking cache for {}...\n", keys[0]));
        let Some((found, path)) = store.find(project, &keys) else {
            say(&format!(
                "\x1b[33;1mWARNING: no cache for {} (nor for its {} fallback key(s))\x1b[0;m\n",
                keys[0],
                keys.len() - 1
            ));
            continue;
        };
        extract(&path, &found, root, max_bytes, say);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gitlab::job::CachePolicy;

    fn cache(key: &str, policy: CachePolicy, when: When, fallback: &[&str]) -> Cache {
        Cache {
            key: key.into(),
            untracked: false,
            policy,
            paths: vec!["vendor/".into()],
            when,
            fallback_keys: fallback.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn keys_are_tried_in_gitlab_runners_order() {
        let c = cache(
            "deps-non_protected",
            CachePolicy::PullPush,
            When::OnSuccess,
            &["main-non_protected", "deps-non_protected", ""],
        );
        // (CACHE_FALLBACK_KEY, keys, warned)
        let cases = [
            (
                None,
                vec!["deps-non_protected", "main-non_protected"],
                false,
            ),
            (
                Some("any-non_protected"),
                vec![
                    "deps-non_protected",
                    "main-non_protected",
                    "any-non_protected",
                ],
                false,
            ),
            // A protected cache is never a fallback of the variable's.
            (
                Some("main-protected"),
                vec!["deps-non_protected", "main-non_protected"],
                true,
            ),
        ];
        for (var, want, warned) in cases {
            let (keys, warning) = restore_keys(&c, var);
            assert_eq!(keys, want, "{var:?}");
            assert_eq!(warning.is_some(), warned, "{var:?}");
        }
        let unnamed = cache("", CachePolicy::PullPush, When::OnSuccess, &[]);
        assert_eq!(restore_keys(&unnamed, None).0, ["default"]);
    }

    #[test]
    fn policy_and_when_decide_the_save() {
        use CachePolicy::*;
        // (policy, when, succeeded, saved)
        let cases = [
            (PullPush, When::OnSuccess, true, true),
            (PullPush, When::OnSuccess, false, false),
            (Push, When::OnFailure, false, true),
            (Push, When::OnFailure, true, false),
            (PullPush, When::Always, false, true),
            (Pull, When::Always, true, false),
        ];
        for (policy, when, ok, want) in cases {
            let c = cache("k", policy, when, &[]);
            assert_eq!(saves_after(&c, ok), want, "{policy:?} {when:?} {ok}");
        }
    }

    fn files(root: &Path, entries: &[(&str, usize)]) -> Vec<PathBuf> {
        entries
            .iter()
            .map(|(name, size)| {
                let p = root.join(name);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                // Incompressible, so archive sizes follow the file sizes.
                let data: Vec<u8> = (0..*size).map(|_| rand::random::<u8>()).collect();
                std::fs::write(&p, data).unwrap();
                p
            })
            .collect()
    }

    #[test]
    fn saved_caches_come_back_by_key_and_the_bound_evicts_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let store = CacheStore::new(dir.path().join("store"), 50_000);
        let a = files(&out, &[("vendor/a.bin", 20_000)]);
        let b = files(&out, &[("vendor/b.bin", 20_000)]);
        let c = files(&out, &[("vendor/c.bin", 20_000)]);
        let saved = |key: &str, f: &[PathBuf]| store.save(7, key, &out, f).unwrap();
        assert!(matches!(saved("a", &a), Saved::Stored { evicted: 0, .. }));
        assert!(matches!(saved("b", &b), Saved::Stored { evicted: 0, .. }));
        // Using "a" makes "b" the least recently used.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (k, _) = store.find(7, &["nope".into(), "a".into()]).unwrap();
        assert_eq!(k, "a");
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(matches!(saved("c", &c), Saved::Stored { evicted: 1, .. }));
        assert!(store.find(7, &["b".into()]).is_none());
        assert!(store.find(7, &["a".into()]).is_some());
        // Another project does not see project 7's caches.
        assert!(store.find(8, &["a".into()]).is_none());
        // Restored into a workspace with the file's name and content.
        let ws = dir.path().join("ws");
        let c7 = cache("c", CachePolicy::Pull, When::OnSuccess, &[]);
        let log = std::sync::Mutex::new(String::new());
        let say = |s: &str| log.lock().unwrap().push_str(s);
        restore(&store, 7, &[c7], None, &ws, 1 << 20, &say);
        assert_eq!(
            std::fs::read(ws.join("vendor/c.bin")).unwrap(),
            std::fs::read(&c[0]).unwrap()
        );
        assert!(log
            .lock()
            .unwrap()
            .contains("Successfully extracted cache c"));
        // An archive over the bound on its own is not kept.
        let big = files(&out, &[("vendor/big.bin", 60_000)]);
        assert!(matches!(saved("big", &big), Saved::TooLarge { .. }));
        assert!(store.find(7, &["big".into()]).is_none());
    }

    #[test]
    fn keys_cannot_name_paths() {
        let store = CacheStore::new(PathBuf::from("/store"), 1);
        let p = store.archive(1, "../../etc/passwd");
        assert!(p.starts_with("/store/1/"), "{}", p.display());
        assert_eq!(p.components().count(), 4);
    }
}
