//! Guest CPU architectures: one table of facts per architecture (Debian name, QEMU binary,
//! machine, CPU, console, kernel package, virtio transport, limits, distributions, saved
//! states). Adding an architecture is adding an [`Arch`] variant, its row in [`TABLE`] and its
//! tests; nothing else matches on the architecture to build a VM.

use std::fmt;
use std::str::FromStr;

/// A guest architecture the engine can boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    Riscv64,
    Aarch64,
    X86_64,
    Armhf,
    Ppc64el,
    S390x,
    I386,
    Mips64el,
    Mipsel,
}

/// How virtio devices attach to the machine: PCI on most, channel I/O on s390x.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioBus {
    Pci,
    Ccw,
}

impl VirtioBus {
    /// The suffix of QEMU's virtio device names (`virtio-blk-pci`, `virtio-serial-ccw`).
    pub fn suffix(self) -> &'static str {
        match self {
            VirtioBus::Pci => "pci",
            VirtioBus::Ccw => "ccw",
        }
    }
}

/// Whether jobs resume from a saved VM state on an architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavedStates {
    /// Resumed VMs were checked to keep running.
    Yes,
    /// Only VMs with one vCPU: with more, the other CPUs of a resumed guest never run again.
    SingleCpu,
}

impl SavedStates {
    /// Whether a VM with `cpus` vCPUs may resume from a saved state.
    pub fn allow(self, cpus: u32) -> bool {
        match self {
            SavedStates::Yes => true,
            SavedStates::SingleCpu => cpus == 1,
        }
    }
}

/// How the kernel encodes ioctl numbers: the direction bits differ on POWER and MIPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoctlEncoding {
    /// `_IOC_NONE` is 0 (x86, arm, riscv, s390).
    Generic,
    /// `_IOC_NONE` is 1 at bit 29 (powerpc, mips).
    PowerMips,
}

/// Byte order of the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endian {
    Little,
    Big,
}

/// Everything the engine knows about one architecture.
#[derive(Debug)]
pub struct ArchInfo {
    pub arch: Arch,
    /// The name users type and reports show (`uname -m` style where it is unambiguous).
    pub name: &'static str,
    /// Debian's name (`dpkg --print-architecture`); accepted as input too.
    pub debian: &'static str,
    /// Other names accepted as input.
    pub aliases: &'static [&'static str],
    /// What `uname -m` prints in the guest.
    pub uname: &'static str,
    pub bits: u32,
    pub endian: Endian,
    /// The QEMU system emulator.
    pub qemu_binary: &'static str,
    /// qemu-user's name for the architecture (`qemu-NAME`, and the binfmt_misc entry
    /// `qemu-NAME` that user mode runs the image's programs through).
    pub qemu_user: &'static str,
    /// `-machine` value (with the options this machine needs under TCG).
    pub machine: &'static str,
    /// `-cpu` value under TCG (under KVM it is always `host`).
    pub cpu_tcg: &'static str,
    /// The kernel's name for the console QEMU's `-serial` becomes.
    pub console: &'static str,
    /// Extra kernel command-line words this machine needs.
    pub kernel_args: &'static str,
    /// Debian's package with the kernel QEMU boots.
    pub kernel_package: &'static str,
    pub bus: VirtioBus,
    /// vCPUs a job gets when it asks for no number: 2, or 1 where only 1-vCPU VMs resume
    /// (a cold boot costs far more than the second vCPU gives a short job).
    pub default_cpus: u32,
    /// Most vCPUs the machine/kernel pair boots with.
    pub max_cpus: u32,
    /// Most guest memory the machine/kernel pair uses.
    pub max_memory_mib: u32,
    /// Debian releases (codenames) that ship this architecture *with* a kernel QEMU can boot.
    pub distributions: &'static [&'static str],
    /// The built-in image used when none is named.
    pub default_image: &'static str,
    /// Whether jobs resume from a saved VM state (QEMU's migration works for this machine
    /// and the resumed guest was checked to keep running); otherwise they boot cold.
    pub saved_states: SavedStates,
    /// How `ioctl` request numbers are built in this guest's kernel.
    pub ioctl: IoctlEncoding,
    /// One line for `doctor`, `--help` and the README: what is special about this guest.
    pub note: &'static str,
}

/// The built-in image that carries each Debian release.
pub const DEBIAN_IMAGES: &[(&str, &str)] = &[("trixie", "debian-13"), ("bookworm", "debian-12")];

const TRIXIE: &[&str] = &["trixie"];
const BOTH: &[&str] = &["trixie", "bookworm"];
const BOOKWORM: &[&str] = &["bookworm"];

/// The architecture facts. Order = the order of [`Arch::ALL`], `doctor` and the README.
pub static TABLE: [ArchInfo; 9] = [
    ArchInfo {
        arch: Arch::Riscv64,
        name: "riscv64",
        debian: "riscv64",
        aliases: &[],
        uname: "riscv64",
        bits: 64,
        endian: Endian::Little,
        qemu_binary: "qemu-system-riscv64",
        qemu_user: "riscv64",
        machine: "virt",
        // Trixie's userland targets RVA20-ish rv64gc; the default model has it. Without Sstc
        // the kernel uses the SBI timer (see vm::state for what saved states do to timers).
        cpu_tcg: "rv64,sstc=off",
        console: "ttyS0",
        kernel_args: "",
        kernel_package: "linux-image-riscv64",
        bus: VirtioBus::Pci,
        default_cpus: 2,
        max_cpus: 64,
        max_memory_mib: 65536,
        distributions: TRIXIE,
        default_image: "debian-13",
        saved_states: SavedStates::Yes,
        ioctl: IoctlEncoding::Generic,
        note: "virt + OpenSBI; saved states are checked for live timers after every resume",
    },
    ArchInfo {
        arch: Arch::Aarch64,
        name: "aarch64",
        debian: "arm64",
        aliases: &[],
        uname: "aarch64",
        bits: 64,
        endian: Endian::Little,
        qemu_binary: "qemu-system-aarch64",
        qemu_user: "aarch64",
        machine: "virt",
        // `max` alone emulates the QARMA5 pointer-authentication cipher, very slow under TCG;
        // the implementation-defined algorithm is cheap and just as correct.
        cpu_tcg: "max,pauth-impdef=on",
        console: "ttyAMA0",
        kernel_args: "",
        kernel_package: "linux-image-arm64",
        bus: VirtioBus::Pci,
        default_cpus: 2,
        max_cpus: 64,
        max_memory_mib: 65536,
        distributions: BOTH,
        default_image: "debian-13",
        saved_states: SavedStates::Yes,
        ioctl: IoctlEncoding::Generic,
        note: "virt",
    },
    ArchInfo {
        arch: Arch::X86_64,
        name: "x86_64",
        debian: "amd64",
        aliases: &[],
        uname: "x86_64",
        bits: 64,
        endian: Endian::Little,
        qemu_binary: "qemu-system-x86_64",
        qemu_user: "x86_64",
        // q35 gives PCIe like the others; SeaBIOS loads the kernel through fw_cfg.
        machine: "q35",
        cpu_tcg: "max",
        console: "ttyS0",
        kernel_args: "",
        kernel_package: "linux-image-amd64",
        bus: VirtioBus::Pci,
        default_cpus: 2,
        max_cpus: 64,
        max_memory_mib: 65536,
        distributions: BOTH,
        default_image: "debian-13",
        saved_states: SavedStates::Yes,
        ioctl: IoctlEncoding::Generic,
        note: "q35; KVM when the host is x86_64 and KVM really runs a guest",
    },
    ArchInfo {
        arch: Arch::Armhf,
        name: "armhf",
        debian: "armhf",
        aliases: &["armv7", "armv7l", "arm"],
        uname: "armv7l",
        bits: 32,
        endian: Endian::Little,
        qemu_binary: "qemu-system-arm",
        qemu_user: "arm",
        machine: "virt",
        cpu_tcg: "cortex-a15",
        console: "ttyAMA0",
        kernel_args: "",
        // LPAE: the virt machine's PCI windows and RAM sit above 4 GiB otherwise unreachable.
        kernel_package: "linux-image-armmp-lpae",
        bus: VirtioBus::Pci,
        default_cpus: 2,
        max_cpus: 8,
        max_memory_mib: 3072,
        distributions: BOTH,
        default_image: "debian-13",
        saved_states: SavedStates::Yes,
        ioctl: IoctlEncoding::Generic,
        note: "32-bit ARMv7 (hard-float) on virt + cortex-a15, LPAE kernel",
    },
    ArchInfo {
        arch: Arch::Ppc64el,
        name: "ppc64el",
        debian: "ppc64el",
        aliases: &["ppc64le"],
        uname: "ppc64le",
        bits: 64,
        endian: Endian::Little,
        qemu_binary: "qemu-system-ppc64",
        qemu_user: "ppc64le",
        // The spectre/meltdown capabilities default to "workaround", which TCG cannot provide
        // (it warns on every boot); TCG is not affected, so they are declared broken.
        machine: "pseries,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off",
        cpu_tcg: "power9",
        console: "hvc0",
        kernel_args: "",
        kernel_package: "linux-image-powerpc64le",
        bus: VirtioBus::Pci,
        default_cpus: 1,
        max_cpus: 64,
        max_memory_mib: 65536,
        distributions: BOTH,
        // Debian 12 by default: the package mirror reachable from our CI hosts serves
        // trixie's current point release for this architecture only partly (404s on libc6,
        // the kernel…), bookworm completely. `--image debian-13` works where the mirror does.
        default_image: "debian-12",
        // With two vCPUs a resumed pseries guest reports a hard lockup of CPU 1 and never
        // answers its agent (QEMU 10.0.2, TCG, measured 2026-12-02); one vCPU resumes fine.
        saved_states: SavedStates::SingleCpu,
        ioctl: IoctlEncoding::PowerMips,
        note: "POWER9 on pseries (SLOF), console hvc0; only 1-vCPU VMs resume from saved states",
    },
    ArchInfo {
        arch: Arch::S390x,
        name: "s390x",
        debian: "s390x",
        aliases: &[],
        uname: "s390x",
        bits: 64,
        endian: Endian::Big,
        qemu_binary: "qemu-system-s390x",
        qemu_user: "s390x",
        machine: "s390-ccw-virtio",
        cpu_tcg: "max",
        console: "ttysclp0",
        kernel_args: "",
        kernel_package: "linux-image-s390x",
        bus: VirtioBus::Ccw,
        default_cpus: 2,
        max_cpus: 64,
        max_memory_mib: 65536,
        distributions: BOTH,
        // Debian 12 by default: the package mirror reachable from our CI hosts serves
        // trixie's current point release for this architecture only partly (404s on libc6,
        // the kernel…), bookworm completely. `--image debian-13` works where the mirror does.
        default_image: "debian-12",
        saved_states: SavedStates::Yes,
        ioctl: IoctlEncoding::Generic,
        note: "big-endian; virtio over channel I/O (-ccw devices), SCLP console",
    },
    ArchInfo {
        arch: Arch::I386,
        name: "i386",
        debian: "i386",
        aliases: &["i686", "x86"],
        uname: "i686",
        bits: 32,
        endian: Endian::Little,
        qemu_binary: "qemu-system-i386",
        qemu_user: "i386",
        machine: "q35",
        cpu_tcg: "max",
        console: "ttyS0",
        kernel_args: "",
        // Trixie ships i386 userland but no i386 kernel: the image is bookworm's, kernel and
        // userland alike, so the job sees a plain 32-bit system (uname -m i686, LONG_BIT 32).
        kernel_package: "linux-image-686-pae",
        bus: VirtioBus::Pci,
        default_cpus: 2,
        max_cpus: 8,
        max_memory_mib: 3072,
        distributions: BOOKWORM,
        default_image: "debian-12",
        saved_states: SavedStates::Yes,
        ioctl: IoctlEncoding::Generic,
        note: "32-bit x86 on q35; Debian 12 (trixie has no i386 kernel)",
    },
    ArchInfo {
        arch: Arch::Mips64el,
        name: "mips64el",
        debian: "mips64el",
        aliases: &[],
        uname: "mips64",
        bits: 64,
        endian: Endian::Little,
        qemu_binary: "qemu-system-mips64el",
        qemu_user: "mips64el",
        machine: "malta",
        cpu_tcg: "5KEc",
        console: "ttyS0",
        kernel_args: "nokaslr",
        kernel_package: "linux-image-5kc-malta",
        bus: VirtioBus::Pci,
        default_cpus: 1,
        max_cpus: 1,
        max_memory_mib: 2048,
        distributions: BOOKWORM,
        default_image: "debian-12",
        saved_states: SavedStates::Yes,
        ioctl: IoctlEncoding::PowerMips,
        note: "malta, 1 vCPU; Debian 12 (trixie dropped mips)",
    },
    ArchInfo {
        arch: Arch::Mipsel,
        name: "mipsel",
        debian: "mipsel",
        aliases: &[],
        uname: "mips",
        bits: 32,
        endian: Endian::Little,
        qemu_binary: "qemu-system-mipsel",
        qemu_user: "mipsel",
        machine: "malta",
        cpu_tcg: "24Kf",
        console: "ttyS0",
        kernel_args: "nokaslr",
        kernel_package: "linux-image-4kc-malta",
        bus: VirtioBus::Pci,
        default_cpus: 1,
        max_cpus: 1,
        // The 4kc-malta kernel has no highmem: it uses the first 256 MiB whatever QEMU gives.
        max_memory_mib: 256,
        distributions: BOOKWORM,
        default_image: "debian-12",
        saved_states: SavedStates::Yes,
        ioctl: IoctlEncoding::PowerMips,
        note: "32-bit MIPS on malta, 1 vCPU; Debian 12 (trixie dropped mips)",
    },
];

/// The input named an architecture we do not support.
#[derive(Debug, thiserror::Error)]
#[error("unknown architecture '{0}' (supported: {list})", list = Arch::names().join(", "))]
pub struct UnknownArch(pub String);

impl Arch {
    pub const ALL: [Arch; 9] = [
        Arch::Riscv64,
        Arch::Aarch64,
        Arch::X86_64,
        Arch::Armhf,
        Arch::Ppc64el,
        Arch::S390x,
        Arch::I386,
        Arch::Mips64el,
        Arch::Mipsel,
    ];

    /// This architecture's row of facts.
    pub fn info(self) -> &'static ArchInfo {
        &TABLE[self as usize]
    }

    /// Our names of every architecture, in table order.
    pub fn names() -> Vec<&'static str> {
        TABLE.iter().map(|i| i.name).collect()
    }

    /// The name users type and reports show.
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// Debian's name for the architecture (`dpkg --print-architecture`).
    pub fn debian(self) -> &'static str {
        self.info().debian
    }

    /// The QEMU system emulator for this guest.
    pub fn qemu_binary(self) -> &'static str {
        self.info().qemu_binary
    }

    /// Debian's package that carries the kernel for this architecture.
    pub fn kernel_package(self) -> &'static str {
        self.info().kernel_package
    }

    /// The kernel's name for the console of our machine model.
    pub fn console_device(self) -> &'static str {
        self.info().console
    }

    /// The built-in image used when a job names none.
    pub fn default_image(self) -> &'static str {
        self.info().default_image
    }

    /// Whether Debian release `codename` ships this architecture with a bootable kernel.
    /// `None` for a release this table does not know (an operator's own recipe may name any).
    pub fn in_distribution(self, codename: &str) -> Option<bool> {
        let known = TABLE.iter().any(|i| i.distributions.contains(&codename));
        known.then(|| self.info().distributions.contains(&codename))
    }

    /// The number of `clock_settime` in this guest's kernel, for the architectures whose
    /// number is checked here by a test on a real guest (a wrong one would set no clock, and
    /// every resume would boot cold); elsewhere the agent sets the clock (see `vm::resume`).
    pub fn clock_settime_nr(self) -> Option<u32> {
        match self {
            // The generic system call table.
            Arch::Riscv64 | Arch::Aarch64 => Some(112),
            Arch::X86_64 => Some(227),
            _ => None,
        }
    }

    /// The request number of an argument-less ioctl `_IO(kind, nr)` in this guest's kernel.
    pub fn ioctl_io(self, kind: u8, nr: u8) -> u32 {
        let base = (u32::from(kind) << 8) | u32::from(nr);
        match self.info().ioctl {
            IoctlEncoding::Generic => base,
            IoctlEncoding::PowerMips => base | (1 << 29),
        }
    }

    /// The built-in images that carry this architecture.
    pub fn images(self) -> Vec<&'static str> {
        DEBIAN_IMAGES
            .iter()
            .filter(|(codename, _)| self.info().distributions.contains(codename))
            .map(|(_, image)| *image)
            .collect()
    }

    /// The architecture of the machine this process runs on, if we support it as a guest.
    pub fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "riscv64" => Some(Arch::Riscv64),
            "aarch64" => Some(Arch::Aarch64),
            "x86_64" => Some(Arch::X86_64),
            "powerpc64" if cfg!(target_endian = "little") => Some(Arch::Ppc64el),
            "s390x" => Some(Arch::S390x),
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

    /// Our names, Debian's names (users coming from Debian type them) and the aliases.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TABLE
            .iter()
            .find(|i| i.name == s || i.debian == s || i.aliases.contains(&s))
            .map(|i| i.arch)
            .ok_or_else(|| UnknownArch(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_match_their_variant() {
        // `info()` indexes the table by discriminant: each row must sit at its variant's place.
        for (i, arch) in Arch::ALL.iter().enumerate() {
            assert_eq!(TABLE[i].arch, *arch, "row {i}");
            assert_eq!(arch.info().arch, *arch);
        }
    }

    #[test]
    fn parses_our_debian_and_alias_names() {
        // (input, expected) — Debian's names and aliases map to ours.
        let cases = [
            ("riscv64", Arch::Riscv64),
            ("aarch64", Arch::Aarch64),
            ("arm64", Arch::Aarch64),
            ("x86_64", Arch::X86_64),
            ("amd64", Arch::X86_64),
            ("armhf", Arch::Armhf),
            ("armv7", Arch::Armhf),
            ("ppc64el", Arch::Ppc64el),
            ("ppc64le", Arch::Ppc64el),
            ("s390x", Arch::S390x),
            ("i386", Arch::I386),
            ("i686", Arch::I386),
            ("mips64el", Arch::Mips64el),
            ("mipsel", Arch::Mipsel),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Arch>().unwrap(), want, "{input}");
        }
    }

    #[test]
    fn unknown_arch_names_the_choices() {
        let err = "sparc64".parse::<Arch>().unwrap_err().to_string();
        assert!(err.contains("sparc64"), "{err}");
        for name in Arch::names() {
            assert!(err.contains(name), "{err} lacks {name}");
        }
    }

    #[test]
    fn every_name_parses_to_its_own_row() {
        // A name shared by two rows would parse to the first one and fail here for the second.
        for arch in Arch::ALL {
            let i = arch.info();
            for n in [i.name, i.debian].iter().chain(i.aliases) {
                assert_eq!(n.parse::<Arch>().unwrap(), arch, "{n}");
            }
        }
    }

    #[test]
    fn every_arch_has_a_default_image_that_carries_it() {
        for arch in Arch::ALL {
            assert!(
                arch.images().contains(&arch.default_image()),
                "{arch}: default {} not in {:?}",
                arch.default_image(),
                arch.images()
            );
        }
    }

    #[test]
    fn distributions_know_what_they_lack() {
        assert_eq!(Arch::Mipsel.in_distribution("trixie"), Some(false));
        assert_eq!(Arch::I386.in_distribution("trixie"), Some(false));
        assert_eq!(Arch::Riscv64.in_distribution("bookworm"), Some(false));
        assert_eq!(Arch::S390x.in_distribution("bookworm"), Some(true));
        assert_eq!(Arch::Riscv64.in_distribution("sid"), None);
        assert_eq!(Arch::I386.images(), ["debian-12"]);
    }

    #[test]
    fn ioctl_numbers_follow_the_guest_kernel() {
        // RNDRESEEDCRNG = _IO('R', 0x07), as <linux/random.h> gives it per architecture.
        assert_eq!(Arch::X86_64.ioctl_io(b'R', 7), 0x5207);
        assert_eq!(Arch::S390x.ioctl_io(b'R', 7), 0x5207);
        assert_eq!(Arch::Ppc64el.ioctl_io(b'R', 7), 0x2000_5207);
        assert_eq!(Arch::Mipsel.ioctl_io(b'R', 7), 0x2000_5207);
    }

    #[test]
    fn single_cpu_states_resume_only_single_cpu_vms() {
        assert!(SavedStates::SingleCpu.allow(1) && !SavedStates::SingleCpu.allow(2));
        assert!(SavedStates::Yes.allow(4));
    }

    #[test]
    fn limits_are_sane() {
        for arch in Arch::ALL {
            let i = arch.info();
            assert!(i.max_cpus >= 1 && i.max_memory_mib >= 256, "{arch}");
            assert!((1..=i.max_cpus).contains(&i.default_cpus), "{arch}");
            // The default VM resumes wherever the arch resumes at all.
            assert!(i.saved_states.allow(i.default_cpus), "{arch}");
            assert!(i.bits == 32 || i.bits == 64, "{arch}");
        }
    }
}
