//! A client for qemu-guest-agent over its virtio-serial port: the `guest-sync-delimited`
//! handshake (0xFF resync), typed commands (`guest-exec`, `guest-exec-status`, `guest-file-*`)
//! and bounded reads of the untrusted replies. Generic over the stream so tests drive it with
//! a scripted fake over `tokio::io::duplex`.

mod protocol;

pub use protocol::{AgentClient, AgentError, ExecRequest, ExecStatus, FILE_CHUNK, SYNC_ATTEMPT};

#[cfg(test)]
mod tests;
