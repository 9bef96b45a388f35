//! The job log: everything bound for GitLab goes through [`JobLog`] (secrets masked, capped at
//! `output_limit`), and [`Uploader`] sends it with `PATCH /jobs/:id/trace` every update
//! interval, keeps the job alive with `PUT state=running` when it is quiet, reads
//! `Job-Status` from every reply (cancellation has no push channel), and finally delivers the
//! whole log and the final state — retrying through GitLab outages until a deadline.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::client::{Backoff, Client, Reply};
use super::mask::Masker;

/// Largest PATCH body (GitLab's limit).
pub const MAX_PATCH: usize = 1 << 20;
/// Trace interval until GitLab says otherwise (gitlab-runner's default).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(3);
/// A `PUT state=running` goes out when nothing was sent for this long (gitlab-runner's 30 s),
/// or for one trace update interval when that is shorter: replies are the only way GitLab can
/// tell a silent job that it was cancelled. GitLab sets the interval (it raises it when nobody
/// watches the log), so it also controls the load.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// How long the final log and state are retried through outages before giving up.
pub const FINAL_DEADLINE: Duration = Duration::from_secs(600);

/// The log as GitLab will see it.
#[derive(Debug)]
pub struct JobLog {
    masker: Masker,
    buf: Vec<u8>,
    limit: usize,
    truncated: bool,
}

impl JobLog {
    pub fn new(secrets: Vec<String>, token_prefixes: Vec<String>, limit: usize) -> Self {
        JobLog {
            masker: Masker::new(secrets).with_prefixes(token_prefixes),
            buf: Vec::new(),
            limit,
            truncated: false,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        let safe = self.masker.feed(bytes);
        self.append(&safe);
    }

    /// Ends the log: releases what the masker held back.
    pub fn finish(&mut self) {
        let rest = self.masker.flush();
        self.append(&rest);
    }

    fn append(&mut self, bytes: &[u8]) {
        if self.truncated {
            return;
        }
        let room = self.limit.saturating_sub(self.buf.len());
        if bytes.len() <= room {
            self.buf.extend_from_slice(bytes);
        } else {
            self.buf.extend_from_slice(&bytes[..room]);
            self.truncated = true;
            self.buf.extend_from_slice(
                format!(
                    "\n\x1b[31;1mJob's log exceeded limit of {} bytes.\nJob execution will continue but no more output will be collected.\x1b[0;m\n",
                    self.limit
                )
                .as_bytes(),
            );
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// `crc32:%08x` over the whole log (IEEE), as GitLab checks it.
    pub fn checksum(&self) -> String {
        format!("crc32:{:08x}", crc32fast::hash(&self.buf))
    }
}

/// What GitLab told us to do about the job while it ran.
#[derive(Debug, Clone)]
pub struct Signals {
    /// Abort now (`Job-Status: canceled|failed`, or 403/404 on a job call).
    pub cancel: watch::Sender<bool>,
    /// Stop the script gracefully, still run after_script (`Job-Status: canceling`).
    pub interrupt: watch::Sender<bool>,
}

impl Signals {
    pub fn new() -> Self {
        Signals {
            cancel: watch::channel(false).0,
            interrupt: watch::channel(false).0,
        }
    }

    fn react(&self, reply: &Reply) {
        match reply.job_status() {
            Some("canceling") => {
                if !*self.interrupt.borrow() {
                    tracing::info!("GitLab asks to cancel the job gracefully");
                }
                self.interrupt.send_replace(true);
            }
            Some("canceled") | Some("failed") => {
                if !*self.cancel.borrow() {
                    tracing::info!(
                        status = reply.job_status(),
                        "GitLab ended the job: aborting it"
                    );
                }
                self.cancel.send_replace(true);
            }
            _ => {}
        }
    }
}

impl Default for Signals {
    fn default() -> Self {
        Signals::new()
    }
}

/// Sends one job's log and state.
#[derive(Debug)]
pub struct Uploader {
    pub client: Client,
    pub job_id: u64,
    pub token: String,
    pub info: Value,
    pub log: JobLog,
    /// How much of the log GitLab has.
    sent: usize,
    interval: Duration,
    /// The job is gone on GitLab's side (403/404): nothing more is sent.
    gone: bool,
}

impl Uploader {
    pub fn new(client: Client, job_id: u64, token: String, info: Value, log: JobLog) -> Self {
        Uploader {
            client,
            job_id,
            token,
            info,
            log,
            sent: 0,
            interval: DEFAULT_INTERVAL,
            gone: false,
        }
    }

    /// While the job runs: takes log bytes from `rx` and sends them every interval, until
    /// `rx` closes (the job ended). Never fails: a missed update is sent with the next one.
    pub async fn live(&mut self, mut rx: mpsc::UnboundedReceiver<Vec<u8>>, signals: &Signals) {
        let mut next = Instant::now() + self.interval;
        let mut last_contact = Instant::now();
        let mut backoff = Backoff::default();
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(bytes) => self.log.push(&bytes),
                    None => return,
                },
                _ = tokio::time::sleep_until(next) => {
                    if self.gone {
                        next = Instant::now() + KEEPALIVE;
                        continue;
                    }
                    let ok = if self.log.bytes().len() > self.sent {
                        self.patch_once(signals).await
                    } else if last_contact.elapsed() >= KEEPALIVE.min(self.interval) {
                        // A silent job still asks every interval: cancellation only ever
                        // arrives in a reply, and a cancelled job must stop within seconds.
                        self.keepalive(signals).await
                    } else {
                        Some(true)
                    };
                    // A backlog (more than one patch's worth) goes out without waiting.
                    let backlog = self.log.bytes().len() > self.sent;
                    next = Instant::now() + match ok {
                        Some(true) if backlog => { last_contact = Instant::now(); backoff.reset(); Duration::ZERO }
                        Some(true) => { last_contact = Instant::now(); backoff.reset(); self.interval }
                        Some(false) => self.interval,
                        // Transient failure: try again sooner than the interval only if the
                        // backoff says so; never hammer.
                        None => backoff.next(None).max(Duration::from_millis(500)),
                    };
                }
            }
        }
    }

    /// One PATCH of the next chunk. `Some(true)`: accepted; `Some(false)`: refused for good
    /// or adjusted (416); `None`: transient, try again.
    async fn patch_once(&mut self, signals: &Signals) -> Option<bool> {
        let end = self.log.bytes().len().min(self.sent + MAX_PATCH);
        let chunk = self.log.bytes()[self.sent..end].to_vec();
        let reply = match self
            .client
            .patch_trace(self.job_id, &self.token, self.sent, &chunk)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("sending the job log failed: {e}");
                return None;
            }
        };
        signals.react(&reply);
        if let Some(i) = reply.update_interval() {
            self.interval = i;
        }
        match reply.status.as_u16() {
            202 | 200 => {
                self.sent = reply.range_end().unwrap_or(end).min(self.log.bytes().len());
                Some(true)
            }
            416 => {
                // GitLab has a different amount of log than we thought: continue from there.
                let have = reply.range_end().unwrap_or(0).min(self.log.bytes().len());
                tracing::info!(
                    ours = self.sent,
                    gitlab = have,
                    "log offset mismatch (416): resuming from GitLab's"
                );
                self.sent = have;
                Some(false)
            }
            403 | 404 => {
                tracing::warn!(status = %reply.status, "GitLab no longer accepts this job's log: aborting the job");
                self.gone = true;
                signals.cancel.send_replace(true);
                Some(false)
            }
            _ if reply.is_transient() => {
                tracing::warn!(status = %reply.status, "GitLab refused the log for now");
                None
            }
            _ => {
                tracing::warn!(status = %reply.status, "unexpected reply to a log update");
                None
            }
        }
    }

    async fn keepalive(&mut self, signals: &Signals) -> Option<bool> {
        let body = json!({"token": self.token, "state": "running", "info": self.info});
        match self
            .client
            .update_job(self.job_id, &self.token, &body)
            .await
        {
            Ok(reply) => {
                signals.react(&reply);
                match reply.status.as_u16() {
                    200..=299 => Some(true),
                    403 | 404 => {
                        self.gone = true;
                        signals.cancel.send_replace(true);
                        Some(false)
                    }
                    _ => None,
                }
            }
            Err(e) => {
                tracing::warn!("keep-alive failed: {e}");
                None
            }
        }
    }

    /// After the job: the whole log, then the final state with its checksum; 202 and 5xx
    /// are retried, 412 resends the log from the start. Returns whether GitLab took it.
    pub async fn finish(&mut self, mut state: Value) -> bool {
        self.log.finish();
        let deadline = Instant::now() + FINAL_DEADLINE;
        let signals = Signals::new();
        let mut backoff = Backoff::default();
        state["token"] = json!(self.token);
        state["info"] = self.info.clone();
        loop {
            if Instant::now() >= deadline {
                tracing::error!("gave up reporting the job to GitLab after {FINAL_DEADLINE:?}");
                return false;
            }
            // 1. The rest of the log (unless GitLab refuses it: the state still goes out).
            if !self.gone && self.sent < self.log.bytes().len() {
                match self.patch_once(&signals).await {
                    Some(true) => backoff.reset(),
                    Some(false) => {}
                    None => tokio::time::sleep(backoff.next(None)).await,
                }
                continue;
            }
            // 2. The final state.
            state["output"] = json!({
                "checksum": self.log.checksum(),
                "bytesize": self.log.bytes().len(),
            });
            let reply = match self
                .client
                .update_job(self.job_id, &self.token, &state)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("final job update failed, retrying: {e}");
                    tokio::time::sleep(backoff.next(None)).await;
                    continue;
                }
            };
            match reply.status.as_u16() {
                200 => return true,
                202 => {
                    // GitLab is still persisting the log: ask again after its interval.
                    let wait = reply.update_interval().unwrap_or(self.interval);
                    tokio::time::sleep(wait).await;
                }
                412 if !self.gone => {
                    tracing::warn!("GitLab's copy of the log differs (412): sending it again");
                    self.sent = 0;
                }
                412 => return false,
                403 | 404 => {
                    tracing::warn!(status = %reply.status, "GitLab no longer accepts updates for this job");
                    return false;
                }
                _ if reply.is_transient() => {
                    tracing::warn!(status = %reply.status, "final job update refused for now, retrying");
                    tokio::time::sleep(backoff.next(reply.retry_after())).await;
                }
                _ => {
                    tracing::error!(status = %reply.status, body = %String::from_utf8_lossy(&reply.body), "final job update refused");
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_masks_caps_and_checksums() {
        let mut log = JobLog::new(vec!["topsecret".into()], vec![], 64);
        log.push(b"a topsec");
        log.push(b"ret b\n");
        log.finish();
        assert_eq!(log.bytes(), b"a [MASKED] b\n");
        assert_eq!(
            log.checksum(),
            format!("crc32:{:08x}", crc32fast::hash(b"a [MASKED] b\n"))
        );
        let mut big = JobLog::new(vec![], vec![], 10);
        big.push(&[b'x'; 25]);
        big.push(b"LATER");
        let text = String::from_utf8_lossy(big.bytes()).into_owned();
        assert!(text.starts_with("xxxxxxxxxx\n"), "{text}");
        assert!(text.contains("exceeded limit of 10 bytes"), "{text}");
        assert!(!text.contains("LATER"));
    }
}
