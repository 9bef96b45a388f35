//! Guest CPU architectures: the one place that maps an architecture to its Debian name,
//! QEMU binary, machine model and serial console.

use std::fmt;
use std::str::FromStr;

/// A guest architecture the engine can boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    Riscv64,
    Aarch64,
    X86_64,
}

/// The input named an architecture we do not support.
#[derive(Debug, thiserror::Error)]
#[error("unknown architecture '{0}' (supported: riscv64, aarch64, x86_64)")]
pub struct UnknownArch(pub String);

impl Arch {
    pub const ALL: [Arch; 3] = [Arch::Riscv64, Arch::Aarch64, Arch::X86_64];

    /// The name users type and reports show.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Riscv64 => "riscv64",
            Arch::Aarch64 => "aarch64",
            Arch::X86_64 => "x86_64",
        }
    }

    /// Debian's name for the architecture (`dpkg --print-architecture`).
    pub fn debian(self) -> &'static str {
        match self {
            Arch::Riscv64 => "riscv64",
            Arch::Aarch64 => "arm64",
            Arch::X86_64 => "amd64",
        }
    }

    /// The QEMU system emulator for this guest.
    pub fn qemu_binary(self) -> &'static str {
        match self {
            Arch::Riscv64 => "qemu-system-riscv64",
            Arch::Aarch64 => "qemu-system-aarch64",
            Arch::X86_64 => "qemu-system-x86_64",
        }
    }

    /// Debian's package that carries the kernel for this architecture.
    pub fn kernel_package(self) -> &'static str {
        match self {
            Arch::Riscv64 => "linux-image-riscv64",
            Arch::Aarch64 => "linux-image-arm64",
            Arch::X86_64 => "linux-image-amd64",
        }
    }

    /// The kernel's name for the first serial port of our machine model.
    pub fn console_device(self) -> &'static str {
        match self {
            Arch::Riscv64 | Arch::X86_64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
        }
    }

    /// The architecture of the machine this process runs on, if we support it as a guest.
    pub fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "riscv64" => Some(Arch::Riscv64),
            "aarch64" => Some(Arch::Aarch64),
            "x86_64" => Some(Arch::X86_64),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = UnknownArch;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Debian's names are accepted too, since users coming from Debian type them.
        match s {
            "riscv64" => Ok(Arch::Riscv64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            other => Err(UnknownArch(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_our_and_debian_names() {
        // (input, expected) — Debian's names map to ours.
        let cases = [
            ("riscv64", Arch::Riscv64),
            ("aarch64", Arch::Aarch64),
            ("arm64", Arch::Aarch64),
            ("x86_64", Arch::X86_64),
            ("amd64", Arch::X86_64),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Arch>().unwrap(), want, "{input}");
        }
    }

    #[test]
    fn unknown_arch_names_the_choices() {
        let err = "mips".parse::<Arch>().unwrap_err().to_string();
        assert!(err.contains("mips") && err.contains("riscv64"), "{err}");
    }

    #[test]
    fn names_round_trip() {
        for arch in Arch::ALL {
            assert_eq!(arch.name().parse::<Arch>().unwrap(), arch);
            assert_eq!(arch.debian().parse::<Arch>().unwrap(), arch);
        }
    }
}
