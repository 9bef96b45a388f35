//! Whether the host kernel runs this architecture's programs: natively (the host's own
//! architecture, and i386 on x86_64), or through a binfmt_misc entry for qemu-user. The
//! entry must have the `F` flag ("fix binary": the kernel opens the interpreter when the
//! entry is registered), because inside the sandbox the host's `/usr/bin/qemu-*` is not
//! in view — only the image's files are.

use std::path::Path;

use super::UserError;
use crate::arch::Arch;

/// Where the kernel shows binfmt_misc entries.
pub const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";

/// How the host runs an architecture's programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emulation {
    /// The host's CPU runs them.
    Native,
    /// qemu-user, through binfmt_misc entry `entry` with this interpreter.
    Qemu { entry: String, interpreter: String },
}

/// The parts of a binfmt_misc entry we check.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    enabled: bool,
    interpreter: String,
    flags: String,
}

/// Parses an entry's file (`enabled`, `interpreter /usr/libexec/…`, `flags: POCF`, …).
fn parse_entry(text: &str) -> Entry {
    let mut e = Entry {
        enabled: false,
        interpreter: String::new(),
        flags: String::new(),
    };
    for line in text.lines() {
        if line.trim() == "enabled" {
            e.enabled = true;
        } else if let Some(rest) = line.strip_prefix("interpreter ") {
            e.interpreter = rest.trim().to_string();
        } else if let Some(rest) = line.strip_prefix("flags:") {
            e.flags = rest.trim().to_string();
        }
    }
    e
}

/// Whether `arch`'s programs run on the host's CPU as they are.
pub fn native(arch: Arch, host: Option<Arch>) -> bool {
    host == Some(arch) || (arch == Arch::I386 && host == Some(Arch::X86_64))
}

/// How this host runs `arch`'s programs, or why it cannot.
pub fn check(arch: Arch) -> Result<Emulation, UserError> {
    check_in(Path::new(BINFMT_DIR), arch, Arch::host())
}

fn check_in(dir: &Path, arch: Arch, host: Option<Arch>) -> Result<Emulation, UserError> {
    if native(arch, host) {
        return Ok(Emulation::Native);
    }
    let entry = format!("qemu-{}", arch.info().qemu_user);
    let fail = |why: String| UserError::Binfmt {
        arch: arch.name(),
        entry: entry.clone(),
        why,
    };
    let text = match std::fs::read_to_string(dir.join(&entry)) {
        Ok(t) => t,
        Err(_) if !dir.join("register").exists() => {
            return Err(fail(format!(
                "binfmt_misc is not mounted at {}",
                dir.display()
            )))
        }
        Err(_) => return Err(fail("it is not registered".into())),
    };
    let e = parse_entry(&text);
    if !e.enabled {
        return Err(fail("it is disabled".into()));
    }
    if !e.flags.contains('F') {
        return Err(fail(format!(
            "its flags are '{}' (without F the sandbox cannot reach {})",
            e.flags, e.interpreter
        )));
    }
    Ok(Emulation::Qemu {
        entry,
        interpreter: e.interpreter,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RISCV64: &str = "enabled\ninterpreter /usr/libexec/qemu-binfmt/riscv64-binfmt-P\nflags: POF\noffset 0\nmagic 7f454c46\nmask ffffffff\n";

    fn dir_with(entries: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("register"), "").unwrap();
        for (name, text) in entries {
            std::fs::write(d.path().join(name), text).unwrap();
        }
        d
    }

    #[test]
    fn an_enabled_entry_with_the_fix_binary_flag_is_used() {
        let d = dir_with(&[("qemu-riscv64", RISCV64)]);
        let e = check_in(d.path(), Arch::Riscv64, Some(Arch::X86_64)).unwrap();
        assert_eq!(
            e,
            Emulation::Qemu {
                entry: "qemu-riscv64".into(),
                interpreter: "/usr/libexec/qemu-binfmt/riscv64-binfmt-P".into()
            }
        );
    }

    #[test]
    fn the_hosts_own_architecture_and_i386_on_x86_64_run_natively() {
        let d = dir_with(&[]);
        for arch in [Arch::X86_64, Arch::I386] {
            assert_eq!(
                check_in(d.path(), arch, Some(Arch::X86_64)).unwrap(),
                Emulation::Native
            );
        }
        // ... but not on another host.
        assert!(check_in(d.path(), Arch::X86_64, Some(Arch::Aarch64)).is_err());
    }

    #[test]
    fn missing_disabled_or_unfixed_entries_say_what_is_wrong() {
        let cases = [
            (dir_with(&[]), "it is not registered"),
            (
                dir_with(&[("qemu-riscv64", &RISCV64.replace("enabled", "disabled"))]),
                "it is disabled",
            ),
            (
                dir_with(&[("qemu-riscv64", &RISCV64.replace("POF", "PO"))]),
                "its flags are 'PO'",
            ),
        ];
        for (d, want) in cases {
            let e = check_in(d.path(), Arch::Riscv64, Some(Arch::X86_64))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
            assert!(
                e.contains("qemu-riscv64") && e.contains("scripts/setup-host"),
                "{e}"
            );
        }
        let unmounted = tempfile::tempdir().unwrap();
        let e = check_in(unmounted.path(), Arch::Armhf, Some(Arch::X86_64))
            .unwrap_err()
            .to_string();
        assert!(e.contains("qemu-arm") && e.contains("not mounted"), "{e}");
    }
}
