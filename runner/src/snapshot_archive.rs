//! A failure snapshot (`failed-vm/`, see `snapshot`) as one file to carry to another
//! machine, and the commands that resume it there. Shared by everything that hands a
//! snapshot out: GitLab's archive artifact (`gitlab::artifacts`), the GitHub App's snapshot
//! store (`github::snapshots`) and `runner debug DIR --pack` (the GitHub Actions template).
//!
//! The archive is a gzipped tar whose one top directory is `failed-vm/`; the RAM file is
//! mostly holes, stored as sparse entries and read as zeros, so fast gzip keeps it cheap.

use std::io::Write;
use std::path::Path;

use engine::Arch;

use crate::snapshot::DIR_NAME;

/// The usual name of a packed snapshot.
pub const ARCHIVE_NAME: &str = "failed-vm.tar.gz";

/// Packs snapshot directory `dir` into `out` as a gzipped tar of `failed-vm/`; gives `out`
/// back when done. A writer that refuses to grow (a size cap) ends the packing with its error.
pub fn pack<W: Write>(dir: &Path, out: W) -> std::io::Result<W> {
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    // A snapshot from a job holds no symlinks; one that did must not pull a host file in.
    tar.follow_symlinks(false);
    tar.append_dir_all(DIR_NAME, dir)?;
    tar.into_inner()?.finish()
}

/// A writer that refuses to grow past `cap` bytes: a packed snapshot has a bound wherever it
/// is kept (in memory for GitLab, on the App's disk). `what` names the bound in the error.
#[derive(Debug)]
pub struct Capped<W> {
    pub inner: W,
    pub written: u64,
    cap: u64,
    what: &'static str,
}

impl<W> Capped<W> {
    pub fn new(inner: W, cap: u64, what: &'static str) -> Self {
        Capped {
            inner,
            written: 0,
            cap,
            what,
        }
    }
}

impl<W: Write> Write for Capped<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.written + data.len() as u64 > self.cap {
            return Err(std::io::Error::other(format!(
                "larger than {} ({} MiB)",
                self.what,
                self.cap >> 20
            )));
        }
        let n = self.inner.write(data)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The commands that resume a packed snapshot on the reader's machine: `fetch` (what brings
/// `archive` into the current directory), then unpacking it — into directory `into` when
/// given, so that several snapshots do not land in one `failed-vm/` — the image it needs,
/// and `runner debug`.
pub fn resume_commands(
    fetch: &[String],
    archive: &str,
    into: Option<&str>,
    arch: Arch,
    image: &str,
) -> Vec<String> {
    let mut lines = fetch.to_vec();
    let dir = match into {
        Some(into) => {
            lines.push(format!("mkdir -p {into} && tar -xzf {archive} -C {into}"));
            format!("{into}/{DIR_NAME}")
        }
        None => {
            lines.push(format!("tar -xzf {archive}"));
            DIR_NAME.to_string()
        }
    };
    lines.push(format!("runner images build --arch {arch} {image}"));
    lines.push(format!("runner debug {dir}"));
    lines
}

/// The warning that goes with every published snapshot.
pub const HOLDS_SECRETS: &str =
    "the snapshot holds the job's memory, disk and environment, secrets included";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_packs_under_its_directory_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("snapshot.toml"), "version = 1\n").unwrap();
        // A RAM file of 64 MiB, nearly all hole (stored as a sparse entry).
        let ram = std::fs::File::create(dir.path().join("ram.bin")).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&ram, b"guest", 1 << 20).unwrap();
        ram.set_len(64 << 20).unwrap();
        let packed = pack(dir.path(), Vec::new()).unwrap();
        assert!(packed.len() < 1 << 20, "{} bytes", packed.len());
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&packed[..]));
        let mut names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["failed-vm/", "failed-vm/ram.bin", "failed-vm/snapshot.toml"]
        );
    }

    #[test]
    fn commands_unpack_where_runner_debug_looks() {
        let fetch = vec!["curl -fLo failed-vm.tar.gz https://x/y".to_string()];
        assert_eq!(
            resume_commands(&fetch, ARCHIVE_NAME, None, Arch::Riscv64, "debian-13"),
            [
                "curl -fLo failed-vm.tar.gz https://x/y",
                "tar -xzf failed-vm.tar.gz",
                "runner images build --arch riscv64 debian-13",
                "runner debug failed-vm",
            ]
        );
        let lines = resume_commands(
            &[],
            "unit-riscv64.tar.gz",
            Some("unit-riscv64"),
            Arch::Aarch64,
            "debian-12",
        );
        assert_eq!(
            lines,
            [
                "mkdir -p unit-riscv64 && tar -xzf unit-riscv64.tar.gz -C unit-riscv64",
                "runner images build --arch aarch64 debian-12",
                "runner debug unit-riscv64/failed-vm",
            ]
        );
    }
}
