//! How many VMs this host can run at once. One rule, used by `runner serve` (GitLab and
//! GitHub jobs) and `runner matrix`: a VM counts its guest RAM plus QEMU's own overhead
//! against the memory the host has available, after a reserve for the host itself. (How
//! the matrix divides the cores is `matrix::fit`.)

/// Memory QEMU itself needs beside the guest's RAM (measured: 210–290 MiB RSS for a 1 GiB
/// guest, most of it guest pages; the rest is QEMU's code, TCG buffers and I/O).
pub const QEMU_OVERHEAD_MIB: u64 = 256;
/// Memory left to the host (the runner, git clones, the page cache for images).
pub const HOST_RESERVE_MIB: u64 = 1024;

/// The host's resources as read once at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostResources {
    pub cores: u32,
    pub available_mib: u64,
}

impl HostResources {
    /// Reads the core count and `MemAvailable` from /proc/meminfo (falls back to 1 core and
    /// 2 GiB when they cannot be read, so a strange host runs one VM rather than none).
    pub fn detect() -> Self {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let available_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| parse_mem_available_kib(&m))
            .map(|kib| kib / 1024)
            .unwrap_or(2048);
        HostResources {
            cores,
            available_mib,
        }
    }

    /// The memory budget for VMs, in MiB.
    pub fn vm_budget_mib(&self) -> u64 {
        self.available_mib.saturating_sub(HOST_RESERVE_MIB)
    }

    /// How many VMs of `memory_mib` each fit in memory (at least 1: a job that does not fit
    /// at all still gets to try, alone).
    pub fn max_vms_by_memory(&self, memory_mib: u32) -> usize {
        let per_vm = memory_mib as u64 + QEMU_OVERHEAD_MIB;
        ((self.vm_budget_mib() / per_vm) as usize).max(1)
    }
}

fn parse_mem_available_kib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available() {
        let m = "MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   20971520 kB\n";
        assert_eq!(parse_mem_available_kib(m), Some(20971520));
        assert_eq!(parse_mem_available_kib("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn memory_caps_vms() {
        let h = HostResources {
            cores: 64,
            available_mib: 1024 + 3 * (1024 + 256) + 100,
        };
        assert_eq!(h.max_vms_by_memory(1024), 3);
        let tiny = HostResources {
            cores: 2,
            available_mib: 512,
        };
        assert_eq!(tiny.max_vms_by_memory(1024), 1);
    }
}
