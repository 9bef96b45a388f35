//! Failure snapshots (`runner test --keep-failed`, `runner debug DIR`): the manifest that
//! says what a saved failed VM is and what it needs to run again.
//!
//! A snapshot directory holds an engine saved state (`ram.bin`, `disk.qcow2`, `meta.json`,
//! see `engine::vm::state`) and `snapshot.toml`, this module's manifest: the image by its
//! cache key (never a path: the disk is re-based onto the local copy of that image), the
//! QEMU version and machine the state fits, and the failed step's name, directory and
//! environment. A snapshot may come from another machine (a CI artifact), so the manifest
//! is untrusted input: read bounded, every field checked, errors one line.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use engine::image::ImageName;
use engine::qemu::spec::Accel;
use engine::Arch;
use serde::{Deserialize, Serialize};

/// The manifest's file name in a snapshot directory.
pub const MANIFEST: &str = "snapshot.toml";
/// Bumped when the manifest's fields change meaning.
pub const VERSION: u32 = 1;
/// The directory under a suite's output directory that holds its failure snapshot.
pub const DIR_NAME: &str = "failed-vm";

/// Largest manifest read (the environment dominates it).
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
const MAX_ENV_VARS: usize = 4096;
const MAX_TEXT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path} cannot be read ({cause}); is it a snapshot directory made by `runner test --keep-failed`?")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} is larger than {MAX_MANIFEST_BYTES} bytes; it is not a snapshot manifest")]
    TooLarge { path: PathBuf },
    #[error("{path} is not a valid snapshot manifest: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("{path} has manifest version {found}; this runner reads version {VERSION} (use the runner version that made the snapshot)")]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `snapshot.toml` as written and read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub arch: String,
    /// The image's recipe name (`debian-13`).
    pub image: String,
    /// The image's cache key (`runner images key`), its directory under `images/`.
    pub image_key: String,
    /// SHA-256 of the image's root disk: the overlay is only valid on exactly that disk.
    pub rootfs_sha256: String,
    pub qemu_version: String,
    pub accel: String,
    pub cpus: u32,
    pub memory_mib: u32,
    /// `engine::vm::state::FORMAT` of the saved state.
    pub state_format: u32,
    pub suite: String,
    pub step: String,
    /// The failed step's working directory in the guest.
    pub cwd: String,
    pub saved_at_unix: u64,
    /// The failed step's whole environment (masked variables included).
    pub env: BTreeMap<String, String>,
}

/// A manifest whose every field was checked, with the typed values.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub manifest: Manifest,
    pub arch: Arch,
    pub image: ImageName,
    pub accel: Accel,
}

impl Manifest {
    /// Writes the manifest into snapshot directory `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), ManifestError> {
        let path = dir.join(MANIFEST);
        let text = toml::to_string(self).map_err(|e| ManifestError::Write {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        // The environment may hold secrets: readable by us alone.
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
            .map_err(|source| ManifestError::Write { path, source })
    }
}

/// Reads and checks the manifest of snapshot directory `dir`.
pub fn load(dir: &Path) -> Result<Snapshot, ManifestError> {
    let path = dir.join(MANIFEST);
    let read = |cause| ManifestError::Read {
        path: path.clone(),
        cause,
    };
    let file = std::fs::File::open(&path).map_err(read)?;
    if !file.metadata().map_err(read)?.is_file() {
        return Err(read(std::io::Error::other("not a regular file")));
    }
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge { path });
    }
    let text = String::from_utf8(bytes).map_err(|_| ManifestError::Invalid {
        path: path.clone(),
        why: "not UTF-8".into(),
    })?;
    parse(&text).map_err(|e| match e {
        Problem::Version(found) => ManifestError::Version { path, found },
        Problem::Field(why) => ManifestError::Invalid { path, why },
    })
}

#[derive(Debug, PartialEq)]
enum Problem {
    Version(u32),
    Field(String),
}

/// The checks of [`load`], on the text.
fn parse(text: &str) -> Result<Snapshot, Problem> {
    // The version first, so that a newer manifest is told as such, not as unknown fields.
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let one_line = |e: toml::de::Error| {
        let why = e.message().trim().replace('\n', " ");
        Problem::Field(if why.is_empty() {
            "invalid TOML".into()
        } else {
            why
        })
    };
    let v: Versioned = toml::from_str(text).map_err(one_line)?;
    if v.version != VERSION {
        return Err(Problem::Version(v.version));
    }
    let m: Manifest = toml::from_str(text).map_err(one_line)?;
    let bad = |what: &str, value: &str| {
        Problem::Field(format!("{what} '{}' is not valid", value.escape_default()))
    };
    let arch: Arch = m
        .arch
        .parse()
        .map_err(|_| Problem::Field(format!("unknown arch '{}'", m.arch.escape_default())))?;
    let image: ImageName = m
        .image
        .parse()
        .map_err(|e| Problem::Field(format!("image: {e}")))?;
    let hash = m
        .image_key
        .strip_prefix(&format!("{image}-{arch}-"))
        .ok_or_else(|| bad("image_key", &m.image_key))?;
    if hash.is_empty() || hash.len() > 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("image_key", &m.image_key));
    }
    if m.rootfs_sha256.len() != 64 || !m.rootfs_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("rootfs_sha256", &m.rootfs_sha256));
    }
    let version_chars = |c: char| c.is_ascii_alphanumeric() || "._+~-".contains(c);
    if m.qemu_version.is_empty()
        || m.qemu_version.len() > 64
        || !m.qemu_version.chars().all(version_chars)
    {
        return Err(bad("qemu_version", &m.qemu_version));
    }
    let accel = match m.accel.as_str() {
        "tcg" => Accel::Tcg,
        "kvm" => Accel::Kvm,
        other => return Err(bad("accel", other)),
    };
    if !(1..=64).contains(&m.cpus) {
        return Err(Problem::Field(format!("cpus {} is not 1..=64", m.cpus)));
    }
    if !(128..=64 * 1024).contains(&m.memory_mib) {
        return Err(Problem::Field(format!(
            "memory_mib {} is not 128..=65536",
            m.memory_mib
        )));
    }
    for (what, value) in [("suite", &m.suite), ("step", &m.step)] {
        if value.len() > MAX_TEXT || value.chars().any(char::is_control) {
            return Err(bad(what, value));
        }
    }
    if !m.cwd.starts_with('/') || m.cwd.len() > MAX_TEXT || m.cwd.contains('\0') {
        return Err(bad("cwd", &m.cwd));
    }
    if m.env.len() > MAX_ENV_VARS {
        return Err(Problem::Field(format!(
            "{} environment variables (at most {MAX_ENV_VARS})",
            m.env.len()
        )));
    }
    for (name, value) in &m.env {
        if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
            return Err(bad("env name", name));
        }
    }
    Ok(Snapshot {
        manifest: m,
        arch,
        image,
        accel,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            version: VERSION,
            arch: "riscv64".into(),
            image: "debian-13".into(),
            image_key: "debian-13-riscv64-0123456789abcdef".into(),
            rootfs_sha256: "ab".repeat(32),
            qemu_version: "10.0.2".into(),
            accel: "tcg".into(),
            cpus: 2,
            memory_mib: 1024,
            state_format: 5,
            suite: "unit".into(),
            step: "run tests".into(),
            cwd: "/workspace".into(),
            saved_at_unix: 1,
            env: [("FOO".into(), "bar baz\nqux".into())].into(),
        }
    }

    #[test]
    fn a_written_manifest_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        manifest().write(dir.path()).unwrap();
        let s = load(dir.path()).unwrap();
        assert_eq!(s.manifest, manifest());
        assert_eq!((s.arch, s.accel), (Arch::Riscv64, Accel::Tcg));
    }

    #[test]
    fn bad_manifests_are_refused_in_one_line() {
        let text = |edit: &dyn Fn(&mut Manifest)| {
            let mut m = manifest();
            edit(&mut m);
            toml::to_string(&m).unwrap()
        };
        // (case, manifest text, what the error says)
        let cases: Vec<(&str, String, &str)> = vec![
            ("not toml", "version = ".into(), "invalid"),
            (
                "unknown field",
                format!("extra = 1\n{}", text(&|_| {})),
                "unknown field",
            ),
            (
                "missing field",
                "version = 1\narch = \"riscv64\"\n".into(),
                "missing field",
            ),
            (
                "unknown arch",
                text(&|m| m.arch = "vax".into()),
                "unknown arch 'vax'",
            ),
            ("image a path", text(&|m| m.image = "../x".into()), "image:"),
            (
                "key of another image",
                text(&|m| m.image_key = "debian-12-riscv64-0123".into()),
                "image_key 'debian-12-riscv64-0123'",
            ),
            (
                "key with a path",
                text(&|m| m.image_key = "debian-13-riscv64-../../etc".into()),
                "image_key",
            ),
            (
                "short digest",
                text(&|m| m.rootfs_sha256 = "ab".into()),
                "rootfs_sha256",
            ),
            (
                "odd qemu",
                text(&|m| m.qemu_version = "10 0".into()),
                "qemu_version",
            ),
            ("accel", text(&|m| m.accel = "hvf".into()), "accel 'hvf'"),
            ("no cpus", text(&|m| m.cpus = 0), "cpus 0"),
            (
                "huge memory",
                text(&|m| m.memory_mib = 1 << 30),
                "memory_mib",
            ),
            (
                "relative cwd",
                text(&|m| m.cwd = "workspace".into()),
                "cwd 'workspace'",
            ),
            (
                "control in step",
                text(&|m| m.step = "a\u{1b}[2Jb".into()),
                "step 'a\\u{1b}[2Jb'",
            ),
            (
                "env name with =",
                text(&|m| {
                    m.env.insert("A=B".into(), "c".into());
                }),
                "env name 'A=B'",
            ),
        ];
        for (case, text, want) in cases {
            match parse(&text) {
                Err(Problem::Field(why)) => {
                    assert!(why.contains(want), "{case}: {why}");
                    assert!(!why.contains('\n'), "{case}: {why}");
                }
                other => panic!("{case}: {other:?}"),
            }
        }
    }

    #[test]
    fn another_version_is_named_as_such() {
        let text = toml::to_string(&Manifest {
            version: 2,
            ..manifest()
        })
        .unwrap();
        assert_eq!(parse(&text).unwrap_err(), Problem::Version(2));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MANIFEST), format!("new_field = 1\n{text}")).unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("manifest version 2; this runner reads version 1"),
            "{e}"
        );
    }

    #[test]
    fn a_huge_or_missing_manifest_is_refused_without_reading_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("snapshot.toml cannot be read"), "{e}");
        let f = std::fs::File::create(dir.path().join(MANIFEST)).unwrap();
        f.set_len(1 << 40).unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(ManifestError::TooLarge { .. })
        ));
    }
}
