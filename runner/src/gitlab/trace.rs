//! The job log: everything bound for GitLab goes through [`JobLog`] (secrets masked, capped at
//! `output_limit`), and [`Uploader`] sends it with `PATCH /jobs/:id/trace` every update
//! interval, keeps the job alive with `PUT state=running` when it is quiet, reads
//! `Job-Status` from every reply (cancellation has no push channel), and finally delivers the
//! whole log and the final state — retrying through GitLab outages until a deadline.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::client::{Client, Reply};
use crate::backoff::Backoff;
use crate::mask::Masker;

/// Largest PATCH body (GitLab's limit).
pub const MAX_PATCH: usize = 1 << 20;
/// Trace interval until GitLab says otherwise (gitlab-runner's default).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(3);
/// A `PUT state=running` goes out when nothing was sent for this long (gitlab-runner's 30 s),
/// or for one trace update interval when that is shorter: replies are the only way GitLab can
/// tell a silent job that it was cancelled. GitLab sets the interval (it raises it when nobody
/// watches the log), so it also controls the load.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// Whole-log resends after a checksum mismatch (412) before giving up: a log that does not
/// match after this many will not match at all.
const MAX_LOG_RESENDS: u32 = 3;
/// How long the final log and state are retried through outages before giving up.
pub const FINAL_DEADLINE: Duration = Duration::from_secs(600);

/// Extra bytes taken beyond the log's room while a request is in flight: masking may turn a
/// long secret into the shorter `[MASKED]`, so a little more input can still fit.
const MASK_MARGIN: usize = 64 * 1024;

/// Output taken from the job while a request to GitLab is in flight, capped.
struct Pending {
    bytes: Vec<u8>,
    cap: usize,
    /// The job ended (its output channel closed) meanwhile.
    closed: bool,
    /// Output was dropped for lack of room.
    overflowed: bool,
}

impl Pending {
    fn new(cap: usize) -> Self {
        Pending {
            bytes: Vec::new(),
            cap,
            closed: false,
            overflowed: false,
        }
    }

    /// Awaits `request`, taking output from `rx` until it completes.
    async fn during<T>(
        &mut self,
        request: impl std::future::Future<Output = T>,
        rx: &mut mpsc::UnboundedReceiver<Vec<u8>>,
    ) -> T {
        tokio::pin!(request);
        loop {
            tokio::select! {
                r = &mut request => return r,
                msg = rx.recv(), if !self.closed => match msg {
                    Some(b) => {
                        let room = self.cap.saturating_sub(self.bytes.len());
                        self.overflowed |= b.len() > room;
                        self.bytes.extend_from_slice(&b[..b.len().min(room)]);
                    }
                    None => self.closed = true,
                },
            }
        }
    }
}

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

    /// Bytes the log can still take before it is cut (plus a margin for masking, which can
    /// only shorten what it is given by the secrets' length).
    fn room(&self) -> usize {
        if self.truncated {
            0
        } else {
            self.limit.saturating_sub(self.buf.len()) + MASK_MARGIN
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

    /// Ends the log here with the "exceeded limit" notice (output was dropped upstream).
    fn cut(&mut self) {
        if !self.truncated {
            self.truncate_notice();
        }
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
            self.truncate_notice();
        }
    }

    fn truncate_notice(&mut self) {
        self.truncated = true;
        self.buf.extend_from_slice(
            format!(
                "\n\x1b[31;1mJob's log exceeded limit of {} bytes.\nJob execution will continue but no more output will be collected.\x1b[0;m\n",
                self.limit
            )
            .as_bytes(),
        );
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

    pub(super) fn react(&self, reply: &Reply) {
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
                    // The guest keeps writing while a request waits on a slow GitLab: go on
                    // taking its output meanwhile (capped like the log), so that it never
                    // piles up in the channel.
                    let cap = self.log.room();
                    let mut pending = Pending::new(cap);
                    let ok = if self.log.bytes().len() > self.sent {
                        pending.during(self.patch_once(signals), &mut rx).await
                    } else if last_contact.elapsed() >= KEEPALIVE.min(self.interval) {
                        // A silent job still asks every interval: cancellation only ever
                        // arrives in a reply, and a cancelled job must stop within seconds.
                        pending.during(self.keepalive(signals), &mut rx).await
                    } else {
                        Some(true)
                    };
                    self.log.push(&pending.bytes);
                    if pending.overflowed {
                        self.log.cut();
                    }
                    if pending.closed {
                        return;
                    }
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
        let mut resends = 0;
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
                    // Refused or out of step (416): try again, but never in a tight loop.
                    Some(false) | None => tokio::time::sleep(backoff.next(None)).await,
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
                412 if !self.gone && resends < MAX_LOG_RESENDS => {
                    tracing::warn!("GitLab's copy of the log differs (412): sending it again");
                    resends += 1;
                    self.sent = 0;
                    tokio::time::sleep(backoff.next(None)).await;
                }
                412 => {
                    tracing::error!(
                        "GitLab's copy of the log still differs after {resends} resends: giving up"
                    );
                    return false;
                }
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

    #[tokio::test]
    async fn output_is_taken_and_capped_while_a_request_waits() {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let mut pending = Pending::new(1000);
        let producer = tokio::spawn(async move {
            // 64 MiB of output while GitLab "hangs": none of it may pile up in the channel.
            for _ in 0..1024 {
                tx.send(vec![b'y'; 64 * 1024]).unwrap();
                tokio::task::yield_now().await;
            }
            done_tx.send(()).unwrap();
            // Job ends while the request still waits.
        });
        let r = pending
            .during(
                async {
                    done_rx.await.unwrap();
                    7
                },
                &mut rx,
            )
            .await;
        producer.await.unwrap();
        assert_eq!(r, 7);
        assert_eq!(pending.bytes.len(), 1000);
        assert!(pending.overflowed);
        // The log records the cut.
        let mut log = JobLog::new(vec![], vec![], 500);
        log.push(&pending.bytes);
        assert!(String::from_utf8_lossy(log.bytes()).contains("exceeded limit"));
    }

    #[tokio::test]
    async fn a_closed_channel_does_not_spin() {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        tx.send(b"last".to_vec()).unwrap();
        drop(tx);
        let mut pending = Pending::new(100);
        // Counts how often `during` polls the request. Waiting properly, it is polled when
        // it starts, on the two channel wake-ups at most, and when the timer fires; a loop
        // that kept selecting on the closed channel would poll it thousands of times in 50 ms.
        let polls = std::cell::Cell::new(0u32);
        let sleep = tokio::time::sleep(Duration::from_millis(50));
        tokio::pin!(sleep);
        let request = std::future::poll_fn(|cx| {
            polls.set(polls.get() + 1);
            std::future::Future::poll(sleep.as_mut(), cx)
        });
        pending.during(request, &mut rx).await;
        assert!(
            polls.get() <= 5,
            "the request was polled {} times",
            polls.get()
        );
        assert!(pending.closed);
        assert_eq!(pending.bytes, b"last");
    }

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
