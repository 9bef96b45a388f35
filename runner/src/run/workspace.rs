//! Moving files between the host and the guest: the project directory goes in as a tar
//! archive (packed here with excludes and a size cap), declared artifacts come back as one
//! (unpacked safely: nothing may land outside the output directory). Both read or write
//! up to the workspace's size limit in one go, so async callers use the `_off_runtime`
//! forms: a large checkout packed on a runtime worker would stall every other job's
//! keep-alives, timers and cancellation on it until done.

use std::path::{Path, PathBuf};

use super::plan::WorkspacePlan;

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("cannot read the workspace {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the workspace {path} is larger than {limit} MiB; add excludes under [workspace] in runner.toml or raise max_size")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("bad exclude pattern '{pattern}' in runner.toml: {message}")]
    Pattern { pattern: String, message: String },
    #[error("cannot unpack artifacts into {path}")]
    Unpack {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Packs `root` into a tar archive in memory, skipping paths that match `exclude` (a pattern
/// matches a path or any of its parent directories), refusing more than `max_size` bytes.
pub fn pack(root: &Path, exclude: &[String], max_size: u64) -> Result<Vec<u8>, WorkspaceError> {
    let patterns = exclude
        .iter()
        .map(|p| {
            glob::Pattern::new(p.trim_end_matches('/')).map_err(|e| WorkspaceError::Pattern {
                pattern: p.clone(),
                message: e.msg.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let read_err = |source| WorkspaceError::Read {
        path: root.into(),
        source,
    };
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    let mut total = 0u64;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(read_err)?
            .collect::<Result<_, _>>()
            .map_err(read_err)?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let rel_path = rel.join(entry.file_name());
            if patterns.iter().any(|p| p.matches_path(&rel_path)) {
                continue;
            }
            let meta = entry.path().symlink_metadata().map_err(read_err)?;
            total += meta.len().min(u64::MAX / 2) + 512;
            if total > max_size {
                return Err(WorkspaceError::TooLarge {
                    path: root.into(),
                    limit: max_size >> 20,
                });
            }
            if meta.is_dir() {
                builder
                    .append_dir(&rel_path, entry.path())
                    .map_err(read_err)?;
                stack.push(rel_path);
            } else if meta.is_file() || meta.file_type().is_symlink() {
                builder
                    .append_path_with_name(entry.path(), &rel_path)
                    .map_err(read_err)?;
            }
            // Sockets, fifos and devices are not copied.
        }
    }
    builder.into_inner().map_err(read_err)
}

/// [`pack`] of a suite's workspace, on a blocking thread.
pub async fn pack_off_runtime(ws: &WorkspacePlan) -> Result<Vec<u8>, WorkspaceError> {
    let (root, exclude, max_size) = (ws.root.clone(), ws.exclude.clone(), ws.max_size);
    let at = root.clone();
    tokio::task::spawn_blocking(move || pack(&root, &exclude, max_size))
        .await
        .unwrap_or_else(|e| Err(task_failed(at, e)))
}

/// [`unpack`] on a blocking thread.
pub async fn unpack_off_runtime(
    archive: Vec<u8>,
    dest: PathBuf,
) -> Result<Vec<PathBuf>, WorkspaceError> {
    let at = dest.clone();
    tokio::task::spawn_blocking(move || unpack(&archive, &dest))
        .await
        .unwrap_or_else(|e| {
            Err(WorkspaceError::Unpack {
                path: at,
                source: std::io::Error::other(e.to_string()),
            })
        })
}

/// A blocking task that panicked or was dropped with its runtime.
fn task_failed(path: PathBuf, e: tokio::task::JoinError) -> WorkspaceError {
    WorkspaceError::Read {
        path,
        source: std::io::Error::other(e.to_string()),
    }
}

/// Unpacks an artifacts archive from the guest into `dest`. Entries that would escape
/// `dest` (absolute paths, `..`, links) are refused by the tar crate's `unpack_in`.
pub fn unpack(archive: &[u8], dest: &Path) -> Result<Vec<PathBuf>, WorkspaceError> {
    let err = |source| WorkspaceError::Unpack {
        path: dest.into(),
        source,
    };
    std::fs::create_dir_all(dest).map_err(err)?;
    let mut ar = tar::Archive::new(archive);
    ar.set_preserve_permissions(false);
    // The guest picks the modes in the archive: never world-writable files on the host.
    ar.set_mask(0o022);
    ar.set_overwrite(true);
    let mut written = Vec::new();
    for entry in ar.entries().map_err(err)? {
        let mut entry = entry.map_err(err)?;
        // Only regular files come back; links could point anywhere, and directory entries
        // could carry modes that lock us out (parents are created with default modes).
        let kind = entry.header().entry_type();
        if !kind.is_file() {
            continue;
        }
        let rel = entry.path().map_err(err)?.into_owned();
        if entry.unpack_in(dest).map_err(err)? {
            written.push(dest.join(rel));
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(archive: &[u8]) -> Vec<String> {
        let mut ar = tar::Archive::new(archive);
        let mut v: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn excludes_match_paths_and_their_children() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "src/main.c",
            "target/debug/x",
            ".git/HEAD",
            "docs/a.log",
            "keep.txt",
        ] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "x").unwrap();
        }
        let ar = pack(
            dir.path(),
            &["target".into(), ".git".into(), "**/*.log".into()],
            1 << 20,
        )
        .unwrap();
        assert_eq!(names(&ar), ["docs", "keep.txt", "src", "src/main.c"]);
    }

    #[test]
    fn size_cap_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big"), vec![0u8; 10_000]).unwrap();
        let err = pack(dir.path(), &[], 4096).unwrap_err().to_string();
        assert!(
            err.contains("larger than") && err.contains("max_size"),
            "{err}"
        );
    }

    #[test]
    fn hostile_archives_cannot_escape() {
        // Build an archive by hand with a `..` path and a symlink.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // set_path refuses "..", so write the raw name field.
        let name = b"../escaped.txt";
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        b.append(&h, &b"bad"[..]).unwrap();
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        b.append_link(&mut link, "link", "/etc/passwd").unwrap();
        let mut ok = tar::Header::new_gnu();
        ok.set_size(2);
        ok.set_mode(0o644);
        b.append_data(&mut ok, "out/result.txt", &b"ok"[..])
            .unwrap();
        let archive = b.into_inner().unwrap();

        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("dest");
        let result = unpack(&archive, &dest);
        assert!(!root.path().join("escaped.txt").exists());
        assert!(!dest.join("link").exists());
        // Either the bad entry is refused with an error, or skipped; never written outside.
        if let Ok(files) = result {
            assert_eq!(files, [dest.join("out/result.txt")]);
        }
    }
}

#[cfg(test)]
mod off_runtime {
    use std::future::Future;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use super::*;

    /// How often the watching timer asks to run.
    const TICK: Duration = Duration::from_millis(2);

    /// Runs `work` on a single-threaded runtime beside a timer ticking every [`TICK`];
    /// returns how long `work` took and the longest the timer went without running.
    fn longest_stall<F: Future>(work: F) -> (Duration, Duration, F::Output) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let ticks = Arc::new(Mutex::new(Vec::new()));
            let seen = ticks.clone();
            let ticker = tokio::spawn(async move {
                let mut every = tokio::time::interval(TICK);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    seen.lock().unwrap().push(Instant::now());
                }
            });
            // Let the timer start before the work does.
            while ticks.lock().unwrap().is_empty() {
                tokio::task::yield_now().await;
            }
            let start = Instant::now();
            let out = work.await;
            let end = Instant::now();
            // The timer's next turn, so a stall up to the end shows as one gap.
            tokio::time::sleep(TICK).await;
            ticker.abort();
            let ticks = ticks.lock().unwrap();
            let mut times: Vec<Instant> = vec![start];
            times.extend(ticks.iter().filter(|t| **t > start));
            let stall = times
                .windows(2)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or(end - start);
            (end - start, stall, out)
        })
    }

    /// A workspace of 128 MiB of real (non-zero, unsparse) content.
    fn large_workspace() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let block: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        for f in 0..32 {
            std::fs::write(dir.path().join(format!("blob-{f}")), &block).unwrap();
        }
        dir
    }

    #[test]
    fn packing_a_large_workspace_leaves_the_runtime_free() {
        let ws = large_workspace();
        let plan = WorkspacePlan {
            root: ws.path().to_path_buf(),
            exclude: Vec::new(),
            max_size: u64::MAX,
        };
        let (took, stall, archive) = longest_stall(pack_off_runtime(&plan));
        assert!(archive.unwrap().len() > 128 << 20);
        assert!(
            stall < took / 2,
            "a timer on the runtime waited {stall:?} of the {took:?} the packing took"
        );
        // The same measure sees the stall of packing on the runtime itself.
        let (took, stall, archive) = longest_stall(async { pack(ws.path(), &[], u64::MAX) });
        assert!(archive.unwrap().len() > 128 << 20);
        assert!(stall >= took, "{stall:?} < {took:?}");
    }

    #[test]
    fn unpacking_leaves_the_runtime_free() {
        let ws = large_workspace();
        let archive = pack(ws.path(), &[], u64::MAX).unwrap();
        let out = tempfile::tempdir().unwrap();
        let (took, stall, paths) =
            longest_stall(unpack_off_runtime(archive, out.path().to_path_buf()));
        assert_eq!(paths.unwrap().len(), 32);
        assert!(
            stall < took / 2,
            "a timer on the runtime waited {stall:?} of the {took:?} the unpacking took"
        );
    }
}
