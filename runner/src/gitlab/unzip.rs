//! Unpacking a zip from GitLab (an earlier job's artifacts) into a job's workspace on the
//! host, as safely as `run::workspace::unpack` takes a tar from the guest: the whole archive
//! is checked before anything is written (no absolute names, no `..`, a bounded number of
//! entries), nothing is written through a symbolic link already in the workspace (the
//! repository's content is untrusted too), links in the archive are not recreated, modes are
//! 0644/0755 only, and the unpacked bytes are bounded whatever the archive claims.

use std::io::{Read, Seek};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

/// Most entries one archive may have (gitlab-runner has no cap; a zip of millions of empty
/// files would otherwise cost the host inodes and minutes).
pub const MAX_ENTRIES: usize = 100_000;

/// `S_IFMT` and `S_IFLNK` of a zip entry's unix mode.
const S_IFMT: u32 = 0o170000;
const S_IFLNK: u32 = 0o120000;

#[derive(Debug, thiserror::Error)]
pub enum UnzipError {
    #[error("not a readable zip archive")]
    Zip(#[source] zip::result::ZipError),
    #[error("entry '{0}' would land outside the workspace (an absolute name or '..'); the archive is refused")]
    Escape(String),
    #[error("entry '{0}' would be written through a symbolic link in the workspace; the archive is refused")]
    ThroughLink(String),
    #[error("entry '{0}' collides with a directory or file of another kind in the workspace")]
    Collision(String),
    #[error("it has {count} entries, more than the {limit} allowed")]
    TooManyEntries { count: usize, limit: usize },
    #[error("it unpacks to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What an unpack did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Unpacked {
    pub files: usize,
    pub bytes: u64,
    /// Symbolic links in the archive, not recreated.
    pub skipped_links: usize,
}

/// Unpacks `archive` into `dest` (created if missing), at most `max_bytes` uncompressed.
pub fn unzip(
    archive: impl Read + Seek,
    dest: &Path,
    max_bytes: u64,
) -> Result<Unpacked, UnzipError> {
    let mut zip = zip::ZipArchive::new(archive).map_err(UnzipError::Zip)?;
    if zip.len() > MAX_ENTRIES {
        return Err(UnzipError::TooManyEntries {
            count: zip.len(),
            limit: MAX_ENTRIES,
        });
    }
    // Every name first: a hostile archive writes nothing at all.
    let mut names = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let entry = zip.by_index_raw(i).map_err(UnzipError::Zip)?;
        names.push(relative(entry.name())?);
    }
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| UnzipError::Write { path, source }
    };
    std::fs::create_dir_all(dest).map_err(write_err(dest))?;
    let mut done = Unpacked::default();
    for (i, rel) in names.into_iter().enumerate() {
        let mut entry = zip.by_index(i).map_err(UnzipError::Zip)?;
        let mode = entry.unix_mode().unwrap_or(0o644);
        if mode & S_IFMT == S_IFLNK {
            done.skipped_links += 1;
            continue;
        }
        let Some(rel) = rel else { continue };
        let shown = rel.display().to_string();
        if entry.is_dir() {
            make_dirs(dest, &rel, &shown)?;
            continue;
        }
        let parent = match rel.parent() {
            Some(p) => make_dirs(dest, p, &shown)?,
            None => dest.to_path_buf(),
        };
        let target = parent.join(rel.file_name().expect("a relative name has a last part"));
        match std::fs::symlink_metadata(&target) {
            // A file or link of the checkout with the same name is replaced (the link
            // itself, never what it points to), as gitlab-runner overwrites.
            Ok(m) if !m.is_dir() => std::fs::remove_file(&target).map_err(write_err(&target))?,
            Ok(_) => return Err(UnzipError::Collision(shown)),
            Err(_) => {}
        }
        // O_EXCL: if anything appeared at `target` since, fail instead of following it.
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if mode & 0o111 != 0 { 0o755 } else { 0o644 })
            .open(&target)
            .map_err(write_err(&target))?;
        let budget = max_bytes - done.bytes;
        // One byte past the budget tells "exactly full" from "too large".
        let copied = std::io::copy(&mut (&mut entry).take(budget.saturating_add(1)), &mut out)
            .map_err(write_err(&target))?;
        if copied > budget {
            return Err(UnzipError::TooLarge { limit: max_bytes });
        }
        done.bytes += copied;
        done.files += 1;
    }
    Ok(done)
}

/// The entry's name as a path below the destination, `None` for the destination itself
/// (`./`), or why it is refused.
fn relative(name: &str) -> Result<Option<PathBuf>, UnzipError> {
    let mut rel = PathBuf::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(UnzipError::Escape(name.chars().take(200).collect()))
            }
        }
    }
    Ok((!rel.as_os_str().is_empty()).then_some(rel))
}

/// Creates `rel`'s directories below `dest` one by one, refusing to pass through a symbolic
/// link (it could point anywhere on the host); returns the full path.
fn make_dirs(dest: &Path, rel: &Path, shown: &str) -> Result<PathBuf, UnzipError> {
    let mut at = dest.to_path_buf();
    for part in rel.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(UnzipError::ThroughLink(shown.to_string()))
            }
            Ok(_) => return Err(UnzipError::Collision(shown.to_string())),
            Err(_) => std::fs::create_dir(&at).map_err(|source| UnzipError::Write {
                path: at.clone(),
                source,
            })?,
        }
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// (name, data, unix mode) of one entry.
    type Entry<'a> = (&'a str, &'a [u8], u32);

    /// A zip of `entries`; names are written as given.
    fn zip_of(entries: &[Entry]) -> Vec<u8> {
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, data, mode) in entries {
            let opts = zip::write::SimpleFileOptions::default().unix_permissions(*mode);
            if mode & S_IFMT == S_IFLNK {
                z.add_symlink(*name, std::str::from_utf8(data).unwrap(), opts)
                    .unwrap();
            } else if name.ends_with('/') {
                z.add_directory(*name, opts).unwrap();
            } else {
                z.start_file(*name, opts).unwrap();
                z.write_all(data).unwrap();
            }
        }
        z.finish().unwrap().into_inner()
    }

    fn unzip_bytes(z: &[u8], dest: &Path, max: u64) -> Result<Unpacked, UnzipError> {
        unzip(std::io::Cursor::new(z), dest, max)
    }

    #[test]
    fn files_directories_and_modes_are_restored() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let z = zip_of(&[
            ("bin/", b"", 0o755),
            ("bin/run.sh", b"#!/bin/sh\necho hi\n", 0o4777),
            ("./data/a.txt", b"aaa", 0o666),
        ]);
        let done = unzip_bytes(&z, dir.path(), 1 << 20).unwrap();
        assert_eq!((done.files, done.bytes), (2, 21));
        let mode = |p: &str| {
            std::fs::metadata(dir.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        // setuid and world-writable bits never come through.
        assert_eq!((mode("bin/run.sh"), mode("data/a.txt")), (0o755, 0o644));
    }

    #[test]
    fn hostile_archives_write_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("ws");
        // (entries, expected message part)
        let cases: [(&[Entry], &str); 3] = [
            (
                &[("ok.txt", b"x", 0o644), ("../escaped.txt", b"x", 0o644)],
                "'../escaped.txt' would land outside",
            ),
            (
                &[("/etc/evil", b"x", 0o644)],
                "'/etc/evil' would land outside",
            ),
            (&[("a/../../b", b"x", 0o644)], "outside the workspace"),
        ];
        for (entries, want) in cases {
            let e = unzip_bytes(&zip_of(entries), &dest, 1 << 20).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
            assert!(!dest.join("ok.txt").exists(), "written before refusing");
        }
        assert!(!root.path().join("escaped.txt").exists());
    }

    #[test]
    fn links_in_the_workspace_are_not_followed_and_links_in_archives_not_made() {
        let root = tempfile::tempdir().unwrap();
        let outside = root.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep.txt"), "original").unwrap();
        let dest = root.path().join("ws");
        std::fs::create_dir(&dest).unwrap();
        // A checkout with a directory link and a file link pointing out of it.
        std::os::unix::fs::symlink(&outside, dest.join("dir")).unwrap();
        std::os::unix::fs::symlink(outside.join("keep.txt"), dest.join("file")).unwrap();
        let e = unzip_bytes(
            &zip_of(&[("dir/keep.txt", b"pwned", 0o644)]),
            &dest,
            1 << 20,
        )
        .unwrap_err();
        assert!(matches!(e, UnzipError::ThroughLink(_)), "{e}");
        // A file over a link replaces the link, not its target.
        unzip_bytes(&zip_of(&[("file", b"new", 0o644)]), &dest, 1 << 20).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("file")).unwrap(), "new");
        assert_eq!(
            std::fs::read_to_string(outside.join("keep.txt")).unwrap(),
            "original"
        );
        // A link in the archive is counted, not created.
        let done = unzip_bytes(
            &zip_of(&[("link", b"/etc/passwd", S_IFLNK | 0o777)]),
            &dest,
            1 << 20,
        )
        .unwrap();
        assert_eq!(done.skipped_links, 1);
        assert!(std::fs::symlink_metadata(dest.join("link")).is_err());
    }

    #[test]
    fn the_size_bound_holds_whatever_the_archive_claims() {
        let dir = tempfile::tempdir().unwrap();
        // Compresses to almost nothing: a small download, a big unpack.
        let big = vec![0u8; 1 << 20];
        let z = zip_of(&[("a", &big, 0o644), ("b", &big, 0o644)]);
        assert!(z.len() < 10_000);
        let e = unzip_bytes(&z, dir.path(), (1 << 20) + 100).unwrap_err();
        assert!(matches!(e, UnzipError::TooLarge { .. }), "{e}");
        // Exactly at the bound is fine.
        let ok = tempfile::tempdir().unwrap();
        assert_eq!(unzip_bytes(&z, ok.path(), 2 << 20).unwrap().bytes, 2 << 20);
    }

    #[test]
    fn garbage_is_not_a_zip() {
        let dir = tempfile::tempdir().unwrap();
        let e = unzip_bytes(b"not a zip at all", dir.path(), 100).unwrap_err();
        assert!(matches!(e, UnzipError::Zip(_)), "{e}");
    }
}
