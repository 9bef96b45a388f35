//! Moving files between the host and the guest: the project directory goes in as a tar
//! archive (packed here with excludes and a size cap), declared artifacts come back as one
//! (unpacked safely: nothing may land outside the output directory).
//!
//! The workspace is never held whole (it may be GiBs): before boot, [`measure`] walks it
//! with the packer's own rules and enforces the cap from file sizes alone; at copy-in,
//! [`stream`] packs it on a blocking thread into a bounded channel of [`CHUNK`]-byte chunks
//! that the guest writer drains, checking the cap again as it reads (files may grow in
//! between). Walking, packing and unpacking all block, so async callers use the blocking
//! pool: a large checkout handled on a runtime worker would stall every other job's
//! keep-alives, timers and cancellation on it until done.

use std::fs::Metadata;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use super::plan::WorkspacePlan;

/// Bytes per chunk the packer hands to the guest writer, and how many may wait in the
/// channel: at most `CHUNK * (CHUNKS_QUEUED + 1)` bytes of the archive are on their way
/// (the queue and the chunk being filled), whatever the workspace's size.
pub const CHUNK: usize = 64 << 10;
pub const CHUNKS_QUEUED: usize = 4;

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

/// The running total of a workspace's size against its cap: each entry counts its size
/// plus a 512-byte header.
struct Budget<'a> {
    root: &'a Path,
    used: u64,
    max: u64,
}

impl Budget<'_> {
    fn take(&mut self, bytes: u64) -> Result<(), WorkspaceError> {
        self.used = self.used.saturating_add(bytes.min(u64::MAX / 2));
        if self.used > self.max {
            return Err(WorkspaceError::TooLarge {
                path: self.root.into(),
                limit: self.max >> 20,
            });
        }
        Ok(())
    }
}

/// What a visit of [`walk`] is shown: the entry's path on the host and in the archive, and
/// its `lstat` (a directory, a regular file or a symbolic link; nothing else is visited).
struct Entry<'a> {
    path: &'a Path,
    rel: &'a Path,
    meta: &'a Metadata,
}

/// Walks `root` in archive order (each directory's entries sorted by name, a directory
/// before its contents), skipping paths that match `exclude` (a pattern matches a path or
/// any of its parent directories), charging each entry to the budget before `visit` sees
/// it. Symbolic links are not followed; sockets, fifos and devices are counted but not
/// visited (not copied). The one walk behind both [`measure`] and [`stream`], so the size
/// checked before boot is the size of what is sent.
fn walk(
    root: &Path,
    exclude: &[String],
    budget: &mut Budget,
    visit: &mut dyn FnMut(Entry, &mut Budget) -> Result<(), WorkspaceError>,
) -> Result<(), WorkspaceError> {
    let patterns = exclude
        .iter()
        .map(|p| {
            glob::Pattern::new(p.trim_end_matches('/')).map_err(|e| WorkspaceError::Pattern {
                pattern: p.clone(),
                message: e.msg.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let read_err = |source| read_error(root, source);
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
            let path = entry.path();
            let meta = path.symlink_metadata().map_err(read_err)?;
            budget.take(meta.len() + 512)?;
            let kind = meta.file_type();
            if kind.is_dir() || kind.is_file() || kind.is_symlink() {
                visit(
                    Entry {
                        path: &path,
                        rel: &rel_path,
                        meta: &meta,
                    },
                    budget,
                )?;
            }
            if kind.is_dir() {
                stack.push(rel_path);
            }
        }
    }
    Ok(())
}

fn read_error(root: &Path, source: std::io::Error) -> WorkspaceError {
    WorkspaceError::Read {
        path: root.into(),
        source,
    }
}

/// The size [`stream`] would send of `root` (entries and their headers, as the cap counts
/// them), or the error it would stop with — without reading a file.
pub fn measure(root: &Path, exclude: &[String], max_size: u64) -> Result<u64, WorkspaceError> {
    let mut budget = Budget {
        root,
        used: 0,
        max: max_size,
    };
    walk(root, exclude, &mut budget, &mut |_, _| Ok(()))?;
    Ok(budget.used)
}

/// [`measure`] of a suite's workspace, on a blocking thread (a checkout can have many files).
pub async fn measure_off_runtime(ws: &WorkspacePlan) -> Result<u64, WorkspaceError> {
    let (root, exclude, max_size) = (ws.root.clone(), ws.exclude.clone(), ws.max_size);
    let at = root.clone();
    tokio::task::spawn_blocking(move || measure(&root, &exclude, max_size))
        .await
        .unwrap_or_else(|e| Err(task_failed(at, e)))
}

/// Packs `root` as a tar archive into `out` (see [`walk`] for what goes in), refusing more
/// than `max_size` bytes; returns `out`. A regular file is read through one descriptor, opened
/// without following links: its header says the size that descriptor shows, exactly that
/// many bytes follow (a file that grows is cut there, one that shrinks is padded with zeros,
/// as GNU tar does), and growth since the walk's `lstat` counts against the cap.
pub fn pack_into<W: Write>(
    root: &Path,
    exclude: &[String],
    max_size: u64,
    out: W,
) -> Result<W, WorkspaceError> {
    let mut builder = tar::Builder::new(Gate {
        inner: out,
        open: true,
    });
    builder.follow_symlinks(false);
    let mut budget = Budget {
        root,
        used: 0,
        max: max_size,
    };
    let read_err = |source| read_error(root, source);
    let walked = walk(root, exclude, &mut budget, &mut |entry, budget| {
        let kind = entry.meta.file_type();
        if kind.is_dir() {
            builder.append_dir(entry.rel, entry.path).map_err(read_err)
        } else if kind.is_symlink() {
            builder
                .append_path_with_name(entry.path, entry.rel)
                .map_err(read_err)
        } else {
            let file = open_regular(entry.path).map_err(read_err)?;
            let meta = file.metadata().map_err(read_err)?;
            budget.take(meta.len().saturating_sub(entry.meta.len()))?;
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            let len = meta.len();
            let body = file.take(len).chain(std::io::repeat(0)).take(len);
            builder
                .append_data(&mut header, entry.rel, body)
                .map_err(read_err)
        }
    });
    if let Err(e) = walked {
        // The builder ends the archive when dropped: not this one, which is not whole.
        builder.get_mut().open = false;
        return Err(e);
    }
    Ok(builder.into_inner().map_err(read_err)?.inner)
}

/// A writer that refuses everything once closed.
struct Gate<W> {
    inner: W,
    open: bool,
}

impl<W: Write> Write for Gate<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if !self.open {
            return Err(std::io::Error::other("packing stopped"));
        }
        self.inner.write(data)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Opens `path` for reading if it is (still) a regular file: not through a link, and
/// without blocking should a fifo have taken its place since the walk looked.
fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other(format!(
            "{} changed into something other than a file while it was packed",
            path.display()
        )));
    }
    Ok(file)
}

/// Packs `root` into a tar archive in memory (tests: what [`stream`] sends, whole).
#[cfg(test)]
pub fn pack(root: &Path, exclude: &[String], max_size: u64) -> Result<Vec<u8>, WorkspaceError> {
    pack_into(root, exclude, max_size, Vec::new())
}

/// The writer [`stream`]'s packer writes into: fills a chunk of [`CHUNK`] bytes, then sends
/// it, waiting while [`CHUNKS_QUEUED`] chunks are already queued. A send fails once the
/// receiver is gone (the guest writer gave up, the VM died, the run was dropped): the write
/// fails with it and the packer stops there.
struct ChunkWriter {
    tx: mpsc::Sender<Vec<u8>>,
    chunk: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        let full = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK));
        self.tx.blocking_send(full).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the guest stopped taking the workspace",
            )
        })
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.chunk.len());
        self.chunk.extend_from_slice(&data[..n]);
        if self.chunk.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        self.send()
    }
}

/// The packer of a [`stream`], running on the blocking pool.
#[derive(Debug)]
pub struct Packer {
    root: PathBuf,
    task: tokio::task::JoinHandle<Result<u64, WorkspaceError>>,
}

impl Packer {
    /// Waits for the packer: the archive's size when all of it was sent, else why not. Only
    /// an `Ok` means the receiver saw a whole archive (the channel also closes when the
    /// packer stops half-way).
    pub async fn finish(self) -> Result<u64, WorkspaceError> {
        self.task
            .await
            .unwrap_or_else(|e| Err(task_failed(self.root, e)))
    }
}

/// Starts packing a suite's workspace on a blocking thread: the archive arrives on the
/// returned receiver in chunks of at most [`CHUNK`] bytes, at most [`CHUNKS_QUEUED`] of
/// them waiting. Dropping the receiver stops the packer at its next chunk.
pub fn stream(ws: &WorkspacePlan) -> (mpsc::Receiver<Vec<u8>>, Packer) {
    let (tx, rx) = mpsc::channel(CHUNKS_QUEUED);
    let (root, exclude, max_size) = (ws.root.clone(), ws.exclude.clone(), ws.max_size);
    let at = root.clone();
    let task = tokio::task::spawn_blocking(move || {
        let out = ChunkWriter {
            tx,
            chunk: Vec::with_capacity(CHUNK),
        };
        let mut out = pack_into(&root, &exclude, max_size, CountingWriter(out, 0))?;
        out.flush().map_err(|e| read_error(&root, e))?;
        Ok(out.1)
    });
    (rx, Packer { root: at, task })
}

/// A writer that counts what goes through it.
struct CountingWriter<W>(W, u64);

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(data)?;
        self.1 += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
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

    /// Everything a stream of `ws` sends, whole (small workspaces only).
    fn streamed(ws: &WorkspacePlan) -> Result<Vec<u8>, WorkspaceError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut rx, packer) = stream(ws);
            let mut all = Vec::new();
            while let Some(chunk) = rx.recv().await {
                all.extend_from_slice(&chunk);
            }
            let size = packer.finish().await?;
            assert_eq!(size, all.len() as u64);
            Ok(all)
        })
    }

    #[test]
    fn the_measure_before_boot_counts_what_the_stream_sends() {
        let dir = tempfile::tempdir().unwrap();
        for (f, len) in [
            ("src/main.c", 700),
            ("src/deep/er/x.h", 1),
            ("target/debug/big", 100_000),
            ("docs/a.log", 50_000),
            ("docs/a.md", 3),
            ("keep.txt", 0),
        ] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, vec![b'x'; len]).unwrap();
        }
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        nix::unistd::mkfifo(&dir.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let exclude: Vec<String> = vec!["target".into(), "**/*.log".into()];
        let total = measure(dir.path(), &exclude, u64::MAX).unwrap();
        let plan = |max_size| WorkspacePlan {
            root: dir.path().to_path_buf(),
            exclude: exclude.clone(),
            max_size,
        };
        let archive = streamed(&plan(total)).unwrap();
        // The link stays a link; the fifo is counted but not sent; excluded paths are neither.
        assert_eq!(
            names(&archive),
            [
                "docs",
                "docs/a.md",
                "keep.txt",
                "link",
                "src",
                "src/deep",
                "src/deep/er",
                "src/deep/er/x.h",
                "src/main.c"
            ]
        );
        assert_eq!(archive, pack(dir.path(), &exclude, total).unwrap());
        // What was sent, and the fifo (counted, not sent): each entry's lstat size + 512.
        let counted: u64 = [
            "docs",
            "docs/a.md",
            "keep.txt",
            "link",
            "src",
            "src/deep",
            "src/deep/er",
            "src/deep/er/x.h",
            "src/main.c",
            "fifo",
        ]
        .iter()
        .map(|p| dir.path().join(p).symlink_metadata().unwrap().len() + 512)
        .sum();
        assert_eq!(total, counted);
        // One byte less, and both refuse it, with the same error.
        let before = measure(dir.path(), &exclude, total - 1).unwrap_err();
        let during = streamed(&plan(total - 1)).unwrap_err();
        assert!(
            matches!(before, WorkspaceError::TooLarge { .. }),
            "{before}"
        );
        assert_eq!(before.to_string(), during.to_string());
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

    /// The whole of `root`, nothing excluded, no size cap.
    fn unbounded(root: &Path) -> WorkspacePlan {
        WorkspacePlan {
            root: root.to_path_buf(),
            exclude: Vec::new(),
            max_size: u64::MAX,
        }
    }

    /// A single-threaded runtime with timers, as the tests of streaming need.
    fn timed_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    /// How often the watching timer asks to run.
    const TICK: Duration = Duration::from_millis(2);

    /// Runs `work` on a single-threaded runtime beside a timer ticking every [`TICK`];
    /// returns how long `work` took and the longest the timer went without running.
    fn longest_stall<F: Future>(work: F) -> (Duration, Duration, F::Output) {
        let rt = timed_runtime();
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
    fn streaming_a_large_workspace_leaves_the_runtime_free() {
        let ws = large_workspace();
        let plan = unbounded(ws.path());
        // The pre-pass, then the stream drained by the runtime, as a guest writer does.
        let (took, stall, size) = longest_stall(async {
            measure_off_runtime(&plan).await.unwrap();
            let (mut rx, packer) = stream(&plan);
            let mut received = 0u64;
            while let Some(chunk) = rx.recv().await {
                received += chunk.len() as u64;
            }
            assert_eq!(packer.finish().await.unwrap(), received);
            received
        });
        assert!(size > 128 << 20);
        assert!(
            stall < took / 2,
            "a timer on the runtime waited {stall:?} of the {took:?} the streaming took"
        );
        // The same measure sees the stall of packing on the runtime itself.
        let (took, stall, archive) = longest_stall(async { pack(ws.path(), &[], u64::MAX) });
        assert!(archive.unwrap().len() > 128 << 20);
        assert!(stall >= took, "{stall:?} < {took:?}");
    }

    /// A writer that hashes what goes through it.
    struct Hashing(sha2::Sha256);

    impl Write for Hashing {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            sha2::Digest::update(&mut self.0, data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stream_holds_a_few_chunks_whatever_the_workspace_size() {
        use sha2::Digest;
        // 64 MiB in 256 files of 256 KiB, all different.
        let dir = tempfile::tempdir().unwrap();
        for f in 0..256u32 {
            let body: Vec<u8> = (0..256u32 << 10)
                .map(|i| (i.wrapping_mul(f + 3) % 251) as u8)
                .collect();
            let sub = dir.path().join(format!("d{}", f % 8));
            std::fs::create_dir_all(&sub).unwrap();
            std::fs::write(sub.join(format!("f{f}")), body).unwrap();
        }
        let plan = unbounded(dir.path());
        let rt = timed_runtime();
        let (received, queued, largest, digest) = rt.block_on(async {
            let (mut rx, packer) = stream(&plan);
            let (mut received, mut queued, mut largest) = (0u64, 0usize, 0usize);
            let mut hash = sha2::Sha256::new();
            let mut n = 0u32;
            loop {
                // A slow guest now and then: the packer runs ahead until the queue is full.
                if n.is_multiple_of(64) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                n += 1;
                queued = queued.max(rx.len());
                let Some(chunk) = rx.recv().await else { break };
                largest = largest.max(chunk.len());
                received += chunk.len() as u64;
                hash.update(&chunk);
            }
            assert_eq!(packer.finish().await.unwrap(), received);
            (received, queued, largest, hash.finalize())
        });
        assert!(received > 64 << 20, "{received}");
        // What was sent is the whole archive, byte for byte.
        let whole = pack_into(dir.path(), &[], u64::MAX, Hashing(sha2::Sha256::new())).unwrap();
        assert_eq!(digest, whole.0.finalize());
        // Never more than the bound waiting: the packer was held back by it, not by its speed.
        let in_flight = queued * largest;
        assert_eq!(queued, CHUNKS_QUEUED, "the queue never filled");
        assert!(largest <= CHUNK, "{largest}");
        assert!(
            in_flight <= 256 << 10,
            "{in_flight} bytes waited in the channel"
        );
    }

    #[test]
    fn a_packer_stops_when_the_guest_stops_taking() {
        let ws = large_workspace();
        let plan = unbounded(ws.path());
        let rt = timed_runtime();
        rt.block_on(async {
            let (mut rx, packer) = stream(&plan);
            // Two chunks in, then the VM dies: its writer drops the receiver.
            rx.recv().await.unwrap();
            rx.recv().await.unwrap();
            drop(rx);
            let stopped = tokio::time::timeout(Duration::from_secs(5), packer.finish())
                .await
                .expect("the packer went on packing");
            match stopped {
                Err(WorkspaceError::Read { source, .. }) => {
                    assert_eq!(source.kind(), std::io::ErrorKind::BrokenPipe, "{source}")
                }
                other => panic!("{other:?}"),
            }
        });
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
