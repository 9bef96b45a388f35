//! A QMP client: greeting, capability negotiation, commands with replies, and events that
//! may arrive before the reply to the command that caused them.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tokio::net::UnixStream;

use crate::bounded::read_line_capped;

#[cfg(test)]
mod tests;

/// QMP messages are small; anything longer is a broken or hostile peer.
const MAX_QMP_LINE: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket i/o failed")]
    Io(#[from] std::io::Error),
    #[error("QMP sent something that is not a QMP message: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {desc}")]
    Command { command: String, desc: String },
    #[error("QMP closed the connection")]
    Closed,
    #[error("QMP did not answer {command} within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
}

/// A connected, negotiated QMP session (over QEMU's UNIX socket; tests use other streams).
#[derive(Debug)]
pub struct QmpClient<S = UnixStream> {
    reader: BufReader<ReadHalf<S>>,
    writer: WriteHalf<S>,
    /// Events seen while waiting for replies, oldest first.
    pub events: Vec<Value>,
    /// Every command carries a fresh id, so a late reply to a timed-out command is never
    /// taken for the reply to the next one.
    next_id: u64,
}

impl QmpClient<UnixStream> {
    /// Connects to `path`, reads the greeting and leaves capability negotiation mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        QmpClient::negotiate(UnixStream::connect(path).await?, timeout).await
    }
}

impl<S: AsyncRead + AsyncWrite> QmpClient<S> {
    /// Reads the greeting on `stream` and leaves capability negotiation mode.
    pub async fn negotiate(stream: S, timeout: Duration) -> Result<Self, QmpError> {
        let (r, w) = tokio::io::split(stream);
        let mut client = QmpClient {
            reader: BufReader::new(r),
            writer: w,
            events: Vec::new(),
            next_id: 1,
        };
        let greeting = tokio::time::timeout(timeout, client.read_message())
            .await
            .map_err(|_| QmpError::Timeout {
                command: "greeting".into(),
                timeout,
            })??;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected greeting, got {greeting}"
            )));
        }
        client.execute("qmp_capabilities", None, timeout).await?;
        Ok(client)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let line = read_line_capped(&mut self.reader, MAX_QMP_LINE)
            .await?
            .ok_or(QmpError::Closed)?;
        serde_json::from_slice(&line)
            .map_err(|e| QmpError::Protocol(format!("{e}: {}", String::from_utf8_lossy(&line))))
    }

    /// Runs `command` and returns its `return` value. Events read meanwhile are kept.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut bytes = serde_json::to_vec(&msg).expect("json");
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.read_message())
                .await
                .map_err(|_| QmpError::Timeout {
                    command: command.into(),
                    timeout,
                })??;
            if msg.get("event").is_some() {
                // Bounded: only the most recent events are of interest.
                if self.events.len() >= 256 {
                    self.events.remove(0);
                }
                self.events.push(msg);
            } else if msg.get("id").and_then(Value::as_u64) != Some(id) {
                // The reply to an earlier command that timed out: not ours.
                continue;
            } else if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            } else if let Some(err) = msg.get("error") {
                return Err(QmpError::Command {
                    command: command.into(),
                    desc: err["desc"].as_str().unwrap_or("unknown error").to_string(),
                });
            } else {
                return Err(QmpError::Protocol(msg.to_string()));
            }
        }
    }

    /// Asks QEMU to exit. The reply may be lost when QEMU exits first; that is fine.
    pub async fn quit(&mut self, timeout: Duration) -> Result<(), QmpError> {
        match self.execute("quit", None, timeout).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            Err(e) => Err(e),
        }
    }
}
