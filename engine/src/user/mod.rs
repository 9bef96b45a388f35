//! User mode: a suite's steps run under qemu-user on the host's own kernel, with the image's
//! root filesystem as their root — no kernel, no boot, no guest agent. The host kernel's
//! binfmt_misc hands every foreign program to qemu-user (registered with the `F` flag, so
//! the interpreter is found even inside the sandbox); on the host's own architecture the
//! programs simply run.
//!
//! What it cannot do, by construction: anything of the guest's kernel (modules, sysctls,
//! `/proc` and `/sys` are the host's, `uname -r` is the host's kernel), a root filesystem
//! that changes (it is shared by every job and read-only; `/workspace`, `/tmp` and `/root`
//! are the job's own), background processes that outlive their step (each step is a fresh
//! sandbox whose PID namespace ends with it), and qemu-user's own gaps (no `ptrace`, so no
//! gdb or strace; some ioctls and `/proc/self` details differ; threads and signals are
//! emulated). It is an opt-in for suites that only need the architecture's userland.
//!
//! The sandbox is the same defence in depth as a VM's (see [`crate::sandbox`]): bubblewrap
//! with fresh PID, IPC, network, UTS and cgroup namespaces and only the image's files and the
//! job's directories in view, the unprivileged VM user when the runner is root, a cgroup with
//! memory and task limits. qemu-user is no security boundary at all: this sandbox is the
//! only one.

pub mod binfmt;
pub mod machine;
pub mod sysroot;

use std::path::PathBuf;

pub use machine::{UserConfig, UserMachine};

/// Why user mode cannot run here, or failed.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user mode for {arch} needs qemu-user's binfmt_misc entry {entry} (with the F flag): {why}; run scripts/setup-host as root")]
    Binfmt {
        arch: &'static str,
        entry: String,
        why: String,
    },
    #[error("user mode needs bubblewrap (its sandbox is the only boundary around qemu-user); run scripts/setup-host")]
    NoSandbox,
    #[error("cannot unpack the image's root filesystem into {dir}: {why}")]
    Sysroot { dir: PathBuf, why: String },
    #[error("another runner has been unpacking {dir} for too long (lock {lock})")]
    Locked { dir: PathBuf, lock: PathBuf },
    #[error("user mode i/o on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} in the user-mode sandbox failed: {desc}")]
    Command { command: String, desc: String },
    #[error("cannot contain the job")]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

impl UserError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> UserError {
        UserError::Io {
            path: path.into(),
            source,
        }
    }
}
