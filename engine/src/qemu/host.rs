//! What this host can do: which QEMU binaries exist and their versions, whether `-sandbox`
//! is compiled in, and whether KVM really runs a guest (a probe, not just `/dev/kvm`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::arch::Arch;
use crate::qemu::spec::Accel;

/// The oldest QEMU major version we support (features: mapped-ram, virtserialport names).
pub const MIN_QEMU_MAJOR: u32 = 10;
/// A working KVM runs the probe guest in well under a second; a broken one hangs.
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Exit status QEMU reports when the probe guest writes 0x2a to isa-debug-exit.
const KVM_PROBE_EXIT: i32 = (0x2a << 1) | 1;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{binary} not found on PATH; run scripts/setup-host to install QEMU {MIN_QEMU_MAJOR}")]
    QemuMissing { binary: String },
    #[error("{binary} is version {found}, but QEMU {MIN_QEMU_MAJOR} or newer is needed; run scripts/setup-host (installs it from bookworm-backports)")]
    QemuTooOld { binary: String, found: String },
    #[error("could not run {binary}")]
    Run {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM was requested but is not usable: {reason}; use --accel tcg or --accel auto")]
    KvmUnusable { reason: String },
}

/// A QEMU binary that exists and is new enough.
#[derive(Debug, Clone)]
pub struct QemuBinary {
    pub path: PathBuf,
    pub version: String,
    pub sandbox: bool,
}

/// Finds `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Parses "QEMU emulator version 10.0.2 (Debian ...)" into "10.0.2".
pub fn parse_version(output: &str) -> Option<String> {
    let rest = output.split("version ").nth(1)?;
    let v: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    (!v.is_empty()).then_some(v)
}

fn major(version: &str) -> u32 {
    version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

/// Locates and checks the QEMU system emulator for `arch`.
pub async fn qemu_for(arch: Arch) -> Result<QemuBinary, HostError> {
    qemu_for_cached(arch, None).await
}

/// [`qemu_for`], with what QEMU said about itself (version, `-sandbox`) remembered in the
/// directory `cache` for as long as the binary is the same file, unchanged: asking costs two
/// QEMU starts (~30 ms) on every job otherwise.
pub async fn qemu_for_cached(arch: Arch, cache: Option<&Path>) -> Result<QemuBinary, HostError> {
    let binary = arch.qemu_binary();
    let path = which(binary).ok_or_else(|| HostError::QemuMissing {
        binary: binary.into(),
    })?;
    let record = cache.map(|dir| dir.join(format!("{binary}.json")));
    let identity = binary_identity(&path);
    let remembered = match (&record, &identity) {
        (Some(record), Some(identity)) => recall(record, identity),
        _ => None,
    };
    let (version, sandbox) = match remembered {
        Some(known) => known,
        None => {
            let known = ask_qemu(binary, &path).await?;
            if let (Some(record), Some(identity)) = (&record, &identity) {
                remember(record, identity, &known);
            }
            known
        }
    };
    if major(&version) < MIN_QEMU_MAJOR {
        return Err(HostError::QemuTooOld {
            binary: binary.into(),
            found: version,
        });
    }
    Ok(QemuBinary {
        path,
        version,
        sandbox,
    })
}

/// What makes a file the same binary: where it is, which inode, its size and its change
/// time (any replacement or edit of the file moves ctime).
fn binary_identity(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let real = path.canonicalize().ok()?;
    let m = real.metadata().ok()?;
    Some(format!(
        "{} {}:{} {} {}.{} {}.{}",
        real.display(),
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    ))
}

fn recall(record: &Path, identity: &str) -> Option<(String, bool)> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(record).ok()?).ok()?;
    (v["binary"] == identity).then_some(())?;
    Some((v["version"].as_str()?.to_string(), v["sandbox"].as_bool()?))
}

/// Best effort: without the record QEMU is simply asked again next time. Written to a
/// temporary name first, so a concurrent reader never sees half a record.
fn remember(record: &Path, identity: &str, (version, sandbox): &(String, bool)) {
    let Some(dir) = record.parent() else { return };
    let _ = std::fs::create_dir_all(dir);
    let text = serde_json::json!({"binary": identity, "version": version, "sandbox": sandbox});
    if let Ok(mut tmp) = tempfile::NamedTempFile::new_in(dir) {
        use std::io::Write;
        if tmp.write_all(text.to_string().as_bytes()).is_ok() {
            let _ = tmp.persist(record);
        }
    }
}

/// QEMU's version and whether it has `-sandbox`, from the binary itself.
async fn ask_qemu(binary: &'static str, path: &Path) -> Result<(String, bool), HostError> {
    // QEMU's stdout for one informational flag.
    let ask = |flag: &'static str| {
        let path = path.to_path_buf();
        async move {
            let out = Command::new(&path)
                .arg(flag)
                .stdin(Stdio::null())
                .output()
                .await
                .map_err(|source| HostError::Run {
                    binary: binary.into(),
                    source,
                })?;
            Ok::<_, HostError>(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    };
    let (version, help) = tokio::try_join!(ask("--version"), ask("-help"))?;
    let version = parse_version(&version).unwrap_or_else(|| "unknown".into());
    Ok((version, help.contains("-sandbox")))
}

/// What the user asked for with `--accel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

/// The accelerator a VM will use, and why (shown to the user when KVM was passed over).
#[derive(Debug, Clone)]
pub struct AccelDecision {
    pub accel: Accel,
    pub note: Option<String>,
}

/// Decides the accelerator for a guest of `arch`. KVM is used only for a guest of the host's
/// architecture and only when a probe guest really runs under it. With `probe_cache`, the
/// probe's verdict is remembered there until the host reboots (a failing probe costs its
/// full timeout, on every run otherwise).
pub async fn choose_accel(
    arch: Arch,
    choice: AccelChoice,
    probe_cache: Option<&Path>,
) -> Result<AccelDecision, HostError> {
    if choice == AccelChoice::Tcg {
        return Ok(AccelDecision {
            accel: Accel::Tcg,
            note: None,
        });
    }
    let verdict = if Arch::host() != Some(arch) {
        Err(format!(
            "the guest is {arch} but this host is {}",
            std::env::consts::ARCH
        ))
    } else {
        match probe_cache {
            Some(path) => probe_kvm_cached(path).await,
            None => probe_kvm().await,
        }
    };
    match (verdict, choice) {
        (Ok(()), _) => Ok(AccelDecision {
            accel: Accel::Kvm,
            note: None,
        }),
        (Err(reason), AccelChoice::Kvm) => Err(HostError::KvmUnusable { reason }),
        (Err(reason), _) => {
            // Cross-architecture guests always use TCG; that needs no explanation.
            let note = (Arch::host() == Some(arch))
                .then(|| format!("KVM not usable ({reason}); using TCG, which is much slower"));
            Ok(AccelDecision {
                accel: Accel::Tcg,
                note,
            })
        }
    }
}

/// Which probe a recorded verdict came from: a verdict of an older probe is probed again (the
/// first one passed hosts whose KVM then failed every real guest).
const KVM_PROBE_VERSION: u64 = 2;

/// The probe's verdict, from `path` when it was recorded since the host last booted.
async fn probe_kvm_cached(path: &Path) -> Result<(), String> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let boot_id = boot_id.trim();
    if let Some(verdict) = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| recorded_verdict(&text, boot_id))
    {
        return verdict;
    }
    let verdict = probe_kvm().await;
    let record = serde_json::json!({
        "boot_id": boot_id,
        "probe": KVM_PROBE_VERSION,
        "unusable_because": verdict.as_ref().err(),
    });
    // Best effort: without the record we simply probe again next time.
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::write(path, record.to_string());
    verdict
}

/// A verdict recorded in `text` by this probe since the boot `boot_id`, if there is one.
fn recorded_verdict(text: &str, boot_id: &str) -> Option<Result<(), String>> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    if boot_id.is_empty() || v["boot_id"] != boot_id || v["probe"] != KVM_PROBE_VERSION {
        return None;
    }
    Some(match v["unusable_because"].as_str() {
        None => Ok(()),
        Some(reason) => Err(reason.to_string()),
    })
}

/// Whether `/proc/cpuinfo`'s text shows hardware virtualisation (Intel VMX or AMD SVM).
fn cpu_has_virtualisation(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Whether KVM runs a guest on this host, or why not. `/dev/kvm` answering is not enough:
/// nested setups without VMX open it fine and then fail or hang. So the CPU must show VMX
/// or SVM (one such host ran the tiny probe guest below yet stopped every Linux guest with
/// "KVM internal error … emulation failure"), and a tiny guest must actually run and exit
/// through isa-debug-exit before the deadline.
pub async fn probe_kvm() -> Result<(), String> {
    if Arch::host() != Some(Arch::X86_64) {
        return Err("the KVM probe is only implemented for x86_64 hosts".into());
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !cpu_has_virtualisation(&cpuinfo) {
        return Err("the CPU shows no VMX or SVM flag (nested virtualisation without it?)".into());
    }
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return Err("/dev/kvm does not exist".into());
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        return Err(format!("cannot open /dev/kvm: {e}"));
    }
    let binary = which("qemu-system-x86_64").ok_or("qemu-system-x86_64 is not installed")?;
    let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temp dir: {e}"))?;
    let disk = dir.path().join("probe.img");
    std::fs::write(&disk, probe_boot_sector()).map_err(|e| e.to_string())?;
    let mut child = Command::new(binary)
        .args([
            "-accel", "kvm", "-cpu", "host", "-machine", "pc", "-m", "16",
        ])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-drive"])
        .arg(format!("file={},format=raw,if=ide", disk.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run qemu-system-x86_64: {e}"))?;
    let stderr = child.stderr.take();
    match tokio::time::timeout(KVM_PROBE_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) if status.code() == Some(KVM_PROBE_EXIT) => Ok(()),
        Ok(Ok(status)) => {
            let mut msg = String::new();
            if let Some(mut e) = stderr {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 4096];
                let n = e.read(&mut buf).await.unwrap_or(0);
                msg = String::from_utf8_lossy(&buf[..n])
                    .trim()
                    .replace('\n', "; ");
            }
            Err(format!("a probe guest failed under KVM ({status}): {msg}"))
        }
        Ok(Err(e)) => Err(format!("waiting for the probe guest failed: {e}")),
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            Err(format!(
                "a probe guest did not finish within {KVM_PROBE_TIMEOUT:?} under KVM (nested virtualisation without VMX?)"
            ))
        }
    }
}

/// A BIOS boot sector that writes 0x2a to port 0xf4 (isa-debug-exit), then halts.
fn probe_boot_sector() -> Vec<u8> {
    // mov al, 0x2a ; out 0xf4, al ; hlt ; jmp $-1
    let mut sector = vec![0xb0, 0x2a, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd];
    sector.resize(510, 0);
    sector.extend_from_slice(&[0x55, 0xaa]);
    sector
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_version_lines() {
        // (output of --version, expected)
        let cases = [
            (
                "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n",
                Some("10.0.2"),
            ),
            ("QEMU emulator version 7.2.15\n", Some("7.2.15")),
            ("something else", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_version(text).as_deref(), want, "{text}");
        }
        assert_eq!(major("10.0.2"), 10);
        assert_eq!(major("garbage"), 0);
    }

    #[test]
    fn kvm_needs_a_cpu_with_vmx_or_svm() {
        let with = |flags: &str| format!("processor\t: 0\nflags\t\t: fpu {flags} sse2\n\n");
        assert!(cpu_has_virtualisation(&with("vme vmx ept")));
        assert!(cpu_has_virtualisation(&with("svm npt")));
        // A nested guest without VMX (this project's CI host): KVM may open, guests fail.
        assert!(!cpu_has_virtualisation(&with("hypervisor rdrand")));
        assert!(!cpu_has_virtualisation(&with("vmxx")));
        assert!(!cpu_has_virtualisation(""));
    }

    #[test]
    fn only_this_probe_s_verdicts_since_this_boot_are_reused() {
        let record = |boot: &str, probe: Option<u64>, why: Option<&str>| {
            serde_json::json!({"boot_id": boot, "probe": probe, "unusable_because": why})
                .to_string()
        };
        let v = KVM_PROBE_VERSION;
        assert_eq!(
            recorded_verdict(&record("b1", Some(v), None), "b1"),
            Some(Ok(()))
        );
        assert_eq!(
            recorded_verdict(&record("b1", Some(v), Some("no")), "b1"),
            Some(Err("no".into()))
        );
        // Another boot, an older probe (its "usable" was wrong on a host without VMX).
        assert_eq!(recorded_verdict(&record("b0", Some(v), None), "b1"), None);
        assert_eq!(recorded_verdict(&record("b1", None, None), "b1"), None);
        assert_eq!(recorded_verdict(&record("b1", Some(1), None), "b1"), None);
        assert_eq!(recorded_verdict("not json", "b1"), None);
        assert_eq!(recorded_verdict(&record("", Some(v), None), ""), None);
    }

    #[test]
    fn boot_sector_is_bootable() {
        let s = probe_boot_sector();
        assert_eq!(s.len(), 512);
        assert_eq!(&s[510..], &[0x55, 0xaa]);
    }

    #[tokio::test]
    async fn tcg_choice_never_probes() {
        // The host's own arch (a foreign one never probes anyway), and a recorded verdict
        // for this boot that says KVM works: consulting it would choose KVM at once.
        let Some(arch) = Arch::host() else { return };
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("kvm-probe.json");
        let record = serde_json::json!({
            "boot_id": boot_id.trim(),
            "probe": KVM_PROBE_VERSION,
            "unusable_because": null,
        });
        std::fs::write(&cache, record.to_string()).unwrap();
        let d = choose_accel(arch, AccelChoice::Tcg, Some(&cache))
            .await
            .unwrap();
        assert_eq!(d.accel, Accel::Tcg);
        assert!(d.note.is_none());
    }

    #[tokio::test]
    async fn kvm_for_a_foreign_guest_is_a_clear_error() {
        let foreign = if Arch::host() == Some(Arch::Riscv64) {
            Arch::X86_64
        } else {
            Arch::Riscv64
        };
        let err = choose_accel(foreign, AccelChoice::Kvm, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("KVM") && err.contains("--accel tcg"), "{err}");
    }

    #[test]
    fn what_qemu_said_is_remembered_only_for_the_same_unchanged_binary() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("qemu-system-test");
        std::fs::write(&bin, b"one").unwrap();
        let record = dir.path().join("cache/qemu-system-test.json");
        let before = binary_identity(&bin).unwrap();
        remember(&record, &before, &("10.0.2".into(), true));
        assert_eq!(recall(&record, &before), Some(("10.0.2".into(), true)));
        // Replaced (an upgrade): another inode or size or change time, so asked again.
        std::fs::remove_file(&bin).unwrap();
        std::fs::write(&bin, b"other").unwrap();
        let after = binary_identity(&bin).unwrap();
        assert_ne!(before, after);
        assert_eq!(recall(&record, &after), None);
    }
}
