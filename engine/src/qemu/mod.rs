//! Everything about the QEMU process: the typed VM spec and its command line, the process
//! itself, QMP, host capability checks (binaries, versions, KVM).

pub mod host;
pub mod process;
pub mod qmp;
pub mod spec;
