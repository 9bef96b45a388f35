//! `runner doctor`: what this host can run, and why not where it cannot.

use engine::image::ImageStore;
use engine::qemu::host as qhost;
use engine::sandbox::{Containment, Layer, VM_USER};
use engine::Arch;

use crate::exit;

/// Prints a line. A closed stdout (`runner doctor | head`) ends doctor quietly instead of
/// panicking: nothing of its own runs between its lines, so there is nothing to clean up.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(exit::SUCCESS);
            }
        }
    }};
}

/// `runner doctor --json`: the architecture table, one object per arch, for scripts (the
/// benchmark's bare-QEMU floor builds its command line from it).
pub fn arch_table_json() -> i32 {
    let rows: Vec<serde_json::Value> = Arch::ALL
        .iter()
        .map(|&arch| {
            let i = arch.info();
            serde_json::json!({
                "name": i.name,
                "debian": i.debian,
                "uname": i.uname,
                "bits": i.bits,
                "big_endian": i.endian == engine::arch::Endian::Big,
                "qemu_binary": i.qemu_binary,
                "machine": i.machine,
                "cpu_tcg": i.cpu_tcg,
                "console": i.console,
                "kernel_cmdline": engine::qemu::spec::kernel_cmdline(arch),
                "virtio_bus": i.bus.suffix(),
                "default_cpus": i.default_cpus,
                "max_cpus": i.max_cpus,
                "max_memory_mib": i.max_memory_mib,
                "default_image": i.default_image,
                "images": arch.images(),
                "saved_states": match i.saved_states {
                    engine::arch::SavedStates::Yes => "yes",
                    engine::arch::SavedStates::SingleCpu => "single-cpu",
                },
                "note": i.note,
            })
        })
        .collect();
    say!("{}", serde_json::Value::Array(rows));
    exit::SUCCESS
}

pub async fn run(store: &ImageStore) -> i32 {
    let mut ok = true;
    say!(
        "host: {} ({} cores)",
        std::env::consts::ARCH,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let mut seccomp_missing = Vec::new();
    for arch in Arch::ALL {
        let i = arch.info();
        // The QEMU found for the architecture, then what the architecture is.
        match qhost::qemu_for(arch).await {
            Ok(q) => {
                if !q.sandbox {
                    seccomp_missing.push(arch.name());
                }
                say!(
                    "{:<8} {} {} (sandbox: {})",
                    arch.name(),
                    q.path.display(),
                    q.version,
                    if q.sandbox { "yes" } else { "no" }
                );
            }
            Err(e) => {
                ok = false;
                say!("{:<8} MISSING: {e}", arch.name());
            }
        }
        say!(
            "{:<8} debian {} ({}-bit, {}-endian), -M {} -cpu {}, virtio-{}, up to {} vCPUs, image {}, saved states {}",
            "",
            i.debian,
            i.bits,
            match i.endian {
                engine::arch::Endian::Little => "little",
                engine::arch::Endian::Big => "big",
            },
            i.machine.split(',').next().unwrap_or(i.machine),
            i.cpu_tcg,
            i.bus.suffix(),
            i.max_cpus,
            i.default_image,
            match i.saved_states {
                engine::arch::SavedStates::Yes => "yes",
                engine::arch::SavedStates::SingleCpu => "only with 1 vCPU",
            },
        );
        // User mode is optional: its absence is a note, not a failed check.
        say!(
            "{:<8} user mode: {}",
            "",
            match engine::user::binfmt::check(arch) {
                Ok(engine::user::binfmt::Emulation::Native) => "native".to_string(),
                Ok(engine::user::binfmt::Emulation::Qemu { entry, .. }) =>
                    format!("qemu-user (binfmt_misc {entry})"),
                Err(e) => format!("unavailable ({e})"),
            }
        );
    }
    for tool in [
        "qemu-img",
        "mmdebstrap",
        "depmod",
        "mkfs.ext4",
        "debugfs",
        "fakeroot",
        "cpio",
        "xz",
    ] {
        match qhost::which(tool) {
            Some(p) => say!("tool     {tool}: {}", p.display()),
            None => {
                ok = false;
                say!("tool     {tool}: MISSING (run scripts/setup-host)");
            }
        }
    }
    // A fresh probe (not the cached verdict): doctor is where users look when KVM changed.
    let host = Arch::host()
        .map(|a| a.name())
        .unwrap_or(std::env::consts::ARCH);
    match qhost::probe_kvm().await {
        Ok(()) => say!("kvm      usable: {host} guests run under KVM"),
        Err(why) => say!("kvm      not usable: {why}; every guest runs under TCG"),
    }
    sandbox_layers(&seccomp_missing).await;
    let images = store.list();
    say!(
        "cache    {} ({} images)",
        store.root().display(),
        images.len()
    );
    for (dir, state) in images {
        match state {
            Ok(m) => say!("image    {} {} ok", m.recipe, m.arch),
            Err(e) => say!("image    {} CORRUPT: {e}", dir.display()),
        }
    }
    if ok {
        exit::SUCCESS
    } else {
        exit::HOST
    }
}

/// Each isolation layer around QEMU: on, or off and why.
async fn sandbox_layers(seccomp_missing: &[&str]) {
    let c = Containment::detect().await;
    for layer in Layer::ALL {
        let state = match layer {
            Layer::User => match c.user {
                Some(u) => format!("on (QEMU runs as {VM_USER}, uid {})", u.uid),
                None => off(&c, layer),
            },
            Layer::Namespace => match &c.bwrap {
                Some(b) => format!(
                    "on ({}: only the VM's own files visible, no network)",
                    b.display()
                ),
                None => off(&c, layer),
            },
            Layer::Cgroup => match &c.cgroups {
                Some(h) => format!("on ({})", h.describe()),
                None => off(&c, layer),
            },
            Layer::Seccomp if seccomp_missing.is_empty() => {
                "on (QEMU's -sandbox, every installed QEMU has it)".into()
            }
            Layer::Seccomp => format!(
                "off (QEMU for {} built without -sandbox)",
                seccomp_missing.join(", ")
            ),
        };
        say!("sandbox  {:<9} {state}", layer.name());
    }
    say!(
        "sandbox  rlimits   on (no core dumps, at most {} open files)",
        engine::sandbox::MAX_OPEN_FILES
    );
}

fn off(c: &Containment, layer: Layer) -> String {
    format!("off ({})", c.why_off(layer).unwrap_or("not available"))
}
