//! The engine: boots QEMU guests from cached base images and runs commands in them over
//! qemu-guest-agent. It knows nothing of GitLab, GitHub or JUnit; it returns typed results
//! and errors, and the runner turns them into events for its reporters.

pub mod agent;
pub mod arch;
pub mod bounded;
pub mod child;
pub mod image;
pub mod lockfile;
pub mod net;
pub mod qemu;
pub mod sandbox;
pub mod shell;
pub mod size;
pub mod user;
pub mod vm;

pub use arch::Arch;
