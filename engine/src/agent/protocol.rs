//! Framing and commands of the qemu-guest-agent protocol (see the module header in mod.rs).

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::bounded::read_line_capped;

/// Longest reply line we accept. Our largest reply is a `guest-file-read` of
/// `FILE_CHUNK` bytes, base64-encoded; anything far beyond that is a misbehaving guest.
const MAX_REPLY_LINE: usize = 4 * 1024 * 1024;
/// Bytes we are willing to skip while looking for the sync delimiter: at least one whole
/// reply (a timed-out file read leaves one in flight).
const MAX_SYNC_GARBAGE: usize = 2 * MAX_REPLY_LINE;
/// How long one sync attempt waits before sending a fresh one (the agent may not be up yet).
pub const SYNC_ATTEMPT: Duration = Duration::from_secs(1);
/// Chunk size for guest-file-read/write.
pub const FILE_CHUNK: usize = 1024 * 1024;
/// The sync delimiter the agent sends before its reply to `guest-sync-delimited`.
const DELIMITER: u8 = 0xFF;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent connection i/o failed")]
    Io(#[from] std::io::Error),
    #[error("agent connection closed")]
    Closed,
    #[error("agent did not answer {command} within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("agent sent an invalid reply to {command}: {detail}")]
    Protocol { command: String, detail: String },
    #[error("agent command {command} failed: {desc}")]
    Command { command: String, desc: String },
}

/// A command to start in the guest with `guest-exec`.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub path: String,
    pub args: Vec<String>,
    /// The complete environment (qga replaces the guest's, it does not add to it).
    pub env: Vec<(String, String)>,
}

/// The answer of `guest-exec-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecStatus {
    Running,
    Exited(i32),
    /// Killed by a signal: a failure, never "exit 0".
    Signaled(i32),
}

/// A synchronised connection to the guest agent.
#[derive(Debug)]
pub struct AgentClient<S> {
    reader: BufReader<ReadHalf<S>>,
    writer: WriteHalf<S>,
    /// Set when a reply may still be in flight (client-side timeout); the next command
    /// re-synchronises first so that it cannot read someone else's reply.
    desynced: bool,
}

impl<S: AsyncRead + AsyncWrite> AgentClient<S> {
    /// Wraps a stream; call [`AgentClient::sync`] before any command.
    pub fn new(stream: S) -> Self {
        let (r, w) = tokio::io::split(stream);
        AgentClient {
            reader: BufReader::new(r),
            writer: w,
            desynced: true,
        }
    }

    /// Performs the `guest-sync-delimited` handshake, retrying with fresh ids until
    /// `deadline`. Stale replies (earlier ids, parse errors for the 0xFF byte) are skipped.
    pub async fn sync(&mut self, deadline: Instant) -> Result<(), AgentError> {
        loop {
            let id: u32 = rand::random::<u32>() | 1;
            let mut msg = vec![DELIMITER];
            msg.extend_from_slice(
                json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                    .to_string()
                    .as_bytes(),
            );
            msg.push(b'\n');
            self.writer.write_all(&msg).await?;
            self.writer.flush().await?;
            let attempt_end = (Instant::now() + SYNC_ATTEMPT).min(deadline);
            match tokio::time::timeout_at(attempt_end, self.await_sync_reply(id)).await {
                Ok(Ok(())) => {
                    self.desynced = false;
                    return Ok(());
                }
                Ok(Err(e)) => return Err(e),
                Err(_) if Instant::now() >= deadline => {
                    return Err(AgentError::Timeout {
                        command: "guest-sync-delimited".into(),
                        timeout: SYNC_ATTEMPT,
                    })
                }
                Err(_) => continue,
            }
        }
    }

    async fn await_sync_reply(&mut self, id: u32) -> Result<(), AgentError> {
        loop {
            self.skip_to_delimiter().await?;
            let line = read_line_capped(&mut self.reader, MAX_REPLY_LINE)
                .await?
                .ok_or(AgentError::Closed)?;
            // Anything that is not our id is a stale reply; keep looking.
            if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                if v.get("return").and_then(Value::as_u64) == Some(u64::from(id)) {
                    return Ok(());
                }
            }
        }
    }

    async fn skip_to_delimiter(&mut self) -> Result<(), AgentError> {
        let mut skipped = 0usize;
        loop {
            let buf = self.reader.fill_buf().await?;
            if buf.is_empty() {
                return Err(AgentError::Closed);
            }
            if let Some(i) = buf.iter().position(|&b| b == DELIMITER) {
                self.reader.consume(i + 1);
                return Ok(());
            }
            let n = buf.len();
            self.reader.consume(n);
            skipped += n;
            if skipped > MAX_SYNC_GARBAGE {
                return Err(AgentError::Protocol {
                    command: "guest-sync-delimited".into(),
                    detail: format!("more than {MAX_SYNC_GARBAGE} bytes before the delimiter"),
                });
            }
        }
    }

    /// Sends one command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let deadline = Instant::now() + timeout;
        if self.desynced {
            self.sync(deadline).await?;
        }
        let mut msg =
            serde_json::to_vec(&json!({"execute": command, "arguments": arguments})).expect("json");
        msg.push(b'\n');
        // From the first byte written until the reply is read, a timeout leaves the
        // exchange half-done: the next command must resync.
        self.desynced = true;
        let timed_out = || AgentError::Timeout {
            command: command.into(),
            timeout,
        };
        tokio::time::timeout_at(deadline, async {
            self.writer.write_all(&msg).await?;
            self.writer.flush().await
        })
        .await
        .map_err(|_| timed_out())??;
        let reply = tokio::time::timeout_at(deadline, self.read_reply(command))
            .await
            .map_err(|_| AgentError::Timeout {
                command: command.into(),
                timeout,
            })??;
        self.desynced = false;
        reply
    }

    async fn read_reply(&mut self, command: &str) -> Result<Result<Value, AgentError>, AgentError> {
        loop {
            let line = read_line_capped(&mut self.reader, MAX_REPLY_LINE)
                .await
                .map_err(|e| AgentError::Protocol {
                    command: command.into(),
                    detail: e.to_string(),
                })?
                .ok_or(AgentError::Closed)?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let v: Value = serde_json::from_slice(&line).map_err(|e| AgentError::Protocol {
                command: command.into(),
                detail: e.to_string(),
            })?;
            if let Some(ret) = v.get("return") {
                return Ok(Ok(ret.clone()));
            }
            if let Some(err) = v.get("error") {
                return Ok(Err(AgentError::Command {
                    command: command.into(),
                    desc: err["desc"].as_str().unwrap_or("unknown error").to_string(),
                }));
            }
            return Err(AgentError::Protocol {
                command: command.into(),
                detail: "neither return nor error".into(),
            });
        }
    }

    fn decode<T: for<'de> Deserialize<'de>>(command: &str, v: Value) -> Result<T, AgentError> {
        serde_json::from_value(v).map_err(|e| AgentError::Protocol {
            command: command.into(),
            detail: e.to_string(),
        })
    }

    /// `guest-info`: the agent's version string.
    pub async fn version(&mut self, timeout: Duration) -> Result<String, AgentError> {
        #[derive(Deserialize)]
        struct Info {
            version: String,
        }
        let v = self.execute("guest-info", json!({}), timeout).await?;
        Ok(Self::decode::<Info>("guest-info", v)?.version)
    }

    /// `guest-exec` without output capture (output travels over the live-output port).
    pub async fn exec(&mut self, req: &ExecRequest, timeout: Duration) -> Result<i64, AgentError> {
        #[derive(Deserialize)]
        struct Pid {
            pid: i64,
        }
        let env: Vec<String> = req.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let args = json!({
            "path": req.path,
            "arg": req.args,
            "env": env,
            "capture-output": false,
        });
        let v = self.execute("guest-exec", args, timeout).await?;
        Ok(Self::decode::<Pid>("guest-exec", v)?.pid)
    }

    /// `guest-exec-status`. The reply that reports an exit also deletes the record in the
    /// agent, so callers must give this a generous timeout and never drop it half-way.
    pub async fn exec_status(
        &mut self,
        pid: i64,
        timeout: Duration,
    ) -> Result<ExecStatus, AgentError> {
        #[derive(Deserialize)]
        struct Status {
            exited: bool,
            exitcode: Option<i32>,
            signal: Option<i32>,
        }
        let v = self
            .execute("guest-exec-status", json!({"pid": pid}), timeout)
            .await?;
        let s: Status = Self::decode("guest-exec-status", v)?;
        Ok(match (s.exited, s.exitcode, s.signal) {
            (false, _, _) => ExecStatus::Running,
            (true, _, Some(sig)) => ExecStatus::Signaled(sig),
            (true, Some(code), None) => ExecStatus::Exited(code),
            (true, None, None) => {
                return Err(AgentError::Protocol {
                    command: "guest-exec-status".into(),
                    detail: "exited without exit code or signal".into(),
                })
            }
        })
    }

    /// Polls `guest-exec-status` for `pid` (quickly at first, then every `max_poll`) until it
    /// exits or `deadline` passes (then `Running` is returned).
    pub async fn wait_exit(
        &mut self,
        pid: i64,
        deadline: Instant,
        max_poll: Duration,
    ) -> Result<ExecStatus, AgentError> {
        let mut poll = Duration::from_millis(5);
        loop {
            // Never cut this read short: the reply that reports the exit reaps the record.
            let status = self.exec_status(pid, Duration::from_secs(30)).await?;
            if status != ExecStatus::Running || Instant::now() >= deadline {
                return Ok(status);
            }
            tokio::time::sleep(poll.min(deadline.saturating_duration_since(Instant::now()))).await;
            poll = (poll * 2).min(max_poll);
        }
    }

    async fn file_open(
        &mut self,
        path: &str,
        mode: &str,
        timeout: Duration,
    ) -> Result<i64, AgentError> {
        let v = self
            .execute(
                "guest-file-open",
                json!({"path": path, "mode": mode}),
                timeout,
            )
            .await?;
        Self::decode("guest-file-open", v)
    }

    async fn file_close(&mut self, handle: i64, timeout: Duration) -> Result<(), AgentError> {
        self.execute("guest-file-close", json!({"handle": handle}), timeout)
            .await
            .map(drop)
    }

    /// Writes `data` to a new guest file at `path` (truncating), in chunks.
    pub async fn write_file(
        &mut self,
        path: &str,
        data: &[u8],
        timeout: Duration,
    ) -> Result<(), AgentError> {
        self.write_opened(path, "w", data, timeout).await
    }

    async fn write_opened(
        &mut self,
        path: &str,
        mode: &str,
        data: &[u8],
        timeout: Duration,
    ) -> Result<(), AgentError> {
        let handle = self.file_open(path, mode, timeout).await?;
        let result = async {
            for chunk in data.chunks(FILE_CHUNK) {
                self.file_write(handle, chunk, timeout).await?;
            }
            Ok(())
        }
        .await;
        let closed = self.file_close(handle, timeout).await;
        result.and(closed)
    }

    /// One `guest-file-write` of `chunk` (at most [`FILE_CHUNK`] bytes), all of it or an error.
    async fn file_write(
        &mut self,
        handle: i64,
        chunk: &[u8],
        timeout: Duration,
    ) -> Result<(), AgentError> {
        let v = self
            .execute(
                "guest-file-write",
                json!({"handle": handle, "buf-b64": B64.encode(chunk)}),
                timeout,
            )
            .await?;
        let written = v["count"].as_u64().unwrap_or(0) as usize;
        if written != chunk.len() {
            return Err(AgentError::Protocol {
                command: "guest-file-write".into(),
                detail: format!("short write: {written} of {} bytes", chunk.len()),
            });
        }
        Ok(())
    }

    /// Writes what arrives on `chunks` to a new guest file at `path` (truncating) until the
    /// sender closes the channel; returns the bytes written. The file is opened once and
    /// written in requests of up to [`FILE_CHUNK`] bytes (chunks are gathered up to that: one
    /// round trip per small chunk would be slow under TCG), so what is held here is one
    /// request whatever the file's size. `timeout` is per request. On an error `chunks` is
    /// dropped before the file is closed, so a sender blocked on a full channel stops at once.
    pub async fn write_stream(
        &mut self,
        path: &str,
        chunks: mpsc::Receiver<Vec<u8>>,
        timeout: Duration,
    ) -> Result<u64, AgentError> {
        let handle = self.file_open(path, "w", timeout).await?;
        let result = self.write_chunks(handle, chunks, timeout).await;
        let closed = self.file_close(handle, timeout).await;
        match (result, closed) {
            (Ok(n), Ok(())) => Ok(n),
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        }
    }

    /// The body of [`AgentClient::write_stream`]; `chunks` goes when this returns.
    async fn write_chunks(
        &mut self,
        handle: i64,
        mut chunks: mpsc::Receiver<Vec<u8>>,
        timeout: Duration,
    ) -> Result<u64, AgentError> {
        let mut pending: Vec<u8> = Vec::new();
        let mut written = 0u64;
        while let Some(chunk) = chunks.recv().await {
            let mut chunk = &chunk[..];
            while !chunk.is_empty() {
                let take = chunk.len().min(FILE_CHUNK - pending.len());
                pending.extend_from_slice(&chunk[..take]);
                chunk = &chunk[take..];
                if pending.len() == FILE_CHUNK {
                    self.file_write(handle, &pending, timeout).await?;
                    written += pending.len() as u64;
                    pending.clear();
                }
            }
        }
        if !pending.is_empty() {
            self.file_write(handle, &pending, timeout).await?;
            written += pending.len() as u64;
        }
        Ok(written)
    }

    /// Reads the guest file at `path`, failing if it is larger than `max_bytes`.
    pub async fn read_file(
        &mut self,
        path: &str,
        max_bytes: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, AgentError> {
        #[derive(Deserialize)]
        struct Read {
            count: usize,
            #[serde(rename = "buf-b64")]
            buf: String,
            eof: bool,
        }
        let handle = self.file_open(path, "r", timeout).await?;
        let result = async {
            let mut data = Vec::new();
            loop {
                let v = self
                    .execute(
                        "guest-file-read",
                        json!({"handle": handle, "count": FILE_CHUNK}),
                        timeout,
                    )
                    .await?;
                let r: Read = Self::decode("guest-file-read", v)?;
                let bytes = B64
                    .decode(r.buf.as_bytes())
                    .map_err(|e| AgentError::Protocol {
                        command: "guest-file-read".into(),
                        detail: e.to_string(),
                    })?;
                if bytes.len() != r.count || bytes.len() > FILE_CHUNK {
                    return Err(AgentError::Protocol {
                        command: "guest-file-read".into(),
                        detail: "count does not match data".into(),
                    });
                }
                if data.len() + bytes.len() > max_bytes {
                    return Err(AgentError::Protocol {
                        command: "guest-file-read".into(),
                        detail: format!("{path} is larger than the {max_bytes}-byte limit"),
                    });
                }
                data.extend_from_slice(&bytes);
                if r.eof || bytes.is_empty() {
                    return Ok(data);
                }
            }
        }
        .await;
        let closed = self.file_close(handle, timeout).await;
        match (result, closed) {
            (Ok(data), Ok(())) => Ok(data),
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        }
    }
}
