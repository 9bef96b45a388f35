//! A file streamed into the guest as it is produced (the job's workspace archive): opened
//! once with the agent, written request by request as chunks arrive on a bounded channel,
//! so the host never holds the whole file, whatever its size.

use std::time::Duration;

use tokio::sync::mpsc;

use super::{Vm, VmError, AGENT_TIMEOUT};

/// How long one `guest-file-write` of up to [`crate::agent::FILE_CHUNK`] bytes may take: a
/// loaded TCG guest decodes and writes a MiB well within this.
const STREAM_REQUEST_TIMEOUT: Duration = Duration::from_secs(3 * AGENT_TIMEOUT.as_secs());

impl Vm {
    /// Writes what arrives on `chunks` to `path` in the guest until the sender closes the
    /// channel; returns the bytes written. On an error (the VM died, its agent broke) the
    /// receiver is dropped first, so the producer's next send fails and it stops.
    pub async fn write_stream(
        &mut self,
        path: &str,
        chunks: mpsc::Receiver<Vec<u8>>,
    ) -> Result<u64, VmError> {
        match self
            .agent
            .write_stream(path, chunks, STREAM_REQUEST_TIMEOUT)
            .await
        {
            Ok(n) => Ok(n),
            Err(e) => Err(self.agent_or_died(e).await),
        }
    }
}
