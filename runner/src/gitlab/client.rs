//! GitLab's runner REST API (`/api/v4`) over HTTP: one method per endpoint, each returning the
//! status and the headers that matter (`Retry-After` for [`crate::backoff`]). Policy (what to retry, for how long) stays with the callers: a poll simply
//! waits for its next turn, a final job update retries until its deadline.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Client-side timeout of a job request: GitLab's Workhorse long-polls up to ~50 s.
const REQUEST_JOB_TIMEOUT: Duration = Duration::from_secs(70);
/// Timeout of any other call (artifact uploads get more, by size).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest reply body read from GitLab.
const MAX_REPLY: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("'{0}' is not an http(s) URL")]
    BadUrl(String),
    #[error("cannot reach GitLab at {url}: {message}")]
    Transport { url: String, message: String },
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
    #[error("GitLab at {url} sent a reply larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("cannot save what GitLab at {url} sent: {message}")]
    Sink { url: String, message: String },
}

/// What came back from one call.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `Job-Status` (running, canceling, canceled, failed, success).
    pub fn job_status(&self) -> Option<&str> {
        self.header("job-status")
    }

    /// The end of `Range: 0-N` (how much of the log GitLab has).
    pub fn range_end(&self) -> Option<usize> {
        self.header("range")?.split_once('-')?.1.trim().parse().ok()
    }

    /// `X-GitLab-Trace-Update-Interval`, clamped to something sane.
    pub fn update_interval(&self) -> Option<Duration> {
        let s: u64 = self
            .header("x-gitlab-trace-update-interval")?
            .parse()
            .ok()?;
        Some(Duration::from_secs(s.clamp(1, 60)))
    }

    /// How long the server asked us to wait (`Retry-After` or `RateLimit-ResetTime` in
    /// seconds).
    pub fn retry_after(&self) -> Option<Duration> {
        ["retry-after", "ratelimit-resettime"]
            .iter()
            .find_map(|h| self.header(h)?.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(300)))
    }

    /// Worth trying again later: 5xx and 429.
    pub fn is_transient(&self) -> bool {
        self.status.is_server_error() || self.status == StatusCode::TOO_MANY_REQUESTS
    }
}

/// One GitLab instance, as one runner entry talks to it.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    api: String,
    url: String,
}

/// The runner's self-description sent with every request and update.
pub fn runner_info(name: &str, arch: &str) -> Value {
    json!({
        "name": name,
        "version": env!("CARGO_PKG_VERSION"),
        "revision": "runner",
        "platform": "linux",
        "architecture": arch,
        "executor": "custom",
        "shell": "bash",
        "features": features(),
    })
}

/// The features we implement, and no others: GitLab hands a job only to a runner that
/// advertises what the job needs.
pub fn features() -> Value {
    json!({
        "variables": true,
        // `image:` picks the VM (see `prepare::parse_image`); `services:` are refused.
        "image": true,
        "services": false,
        "artifacts": true,
        // `key`, `paths`, `untracked`, `policy`, `when`, `fallback_keys`: on this host
        // (gitlab::cache) or in an S3 store an entry's [runners.cache] names (gitlab::s3cache).
        // ("shared" below is what gitlab-runner's shell/custom executors set for builds that
        // share a host, not the shared cache.)
        "cache": true,
        "fallback_cache_keys": true,
        "shared": false,
        "upload_multiple_artifacts": true,
        "upload_raw_artifacts": false,
        "session": false,
        "terminal": false,
        "refspecs": true,
        "masking": true,
        "proxy": false,
        "raw_variables": true,
        "artifacts_exclude": false,
        "multi_build_steps": true,
        "trace_reset": true,
        "trace_checksum": true,
        "trace_size": true,
        "vault_secrets": false,
        "cancelable": true,
        "return_exit_code": true,
        "service_variables": false,
        "cancel_gracefully": true,
        "two_phase_job_commit": false,
    })
}

impl Client {
    pub fn new(url: &str) -> Result<Client, ClientError> {
        let url = url.trim_end_matches('/').to_string();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ClientError::BadUrl(url));
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("runner/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            // Redirects are followed by hand where GitLab uses them (artifact uploads).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ClientError::Build(e.to_string()))?;
        Ok(Client {
            api: format!("{url}/api/v4"),
            url,
            http,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Reply, ClientError> {
        let request_id = format!("{:016x}", rand::random::<u64>());
        let resp = req
            .header("X-Request-Id", request_id)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        self.read_reply(resp).await
    }

    /// Status, headers and the body (at most [`MAX_REPLY`]) of a reply.
    async fn read_reply(&self, resp: reqwest::Response) -> Result<Reply, ClientError> {
        let status = resp.status();
        let headers = resp.headers().clone();
        // Replies are JSON documents (a job payload is the largest): read at most
        // MAX_REPLY, chunk by chunk, whatever the server claims or sends.
        let mut resp = resp;
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport(e))? {
            if body.len() + chunk.len() > MAX_REPLY {
                return Err(ClientError::TooLarge {
                    url: self.url.clone(),
                    limit: MAX_REPLY,
                });
            }
            body.extend_from_slice(&chunk);
        }
        let body = bytes::Bytes::from(body);
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    fn transport(&self, e: reqwest::Error) -> ClientError {
        // reqwest's message names the URL without credentials; keep only its kind of failure.
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message = format!("{message}: {s}");
            source = s.source();
        }
        ClientError::Transport {
            url: self.url.clone(),
            message,
        }
    }

    /// `POST /runners/verify` (glrt- tokens).
    pub async fn verify(
        &self,
        token: &str,
        system_id: &str,
        info: &Value,
    ) -> Result<Reply, ClientError> {
        let body = json!({"token": token, "system_id": system_id, "info": info});
        self.send(
            self.http
                .post(format!("{}/runners/verify", self.api))
                .timeout(CALL_TIMEOUT)
                .json(&body),
        )
        .await
    }

    /// `POST /jobs/request`.
    pub async fn request_job(
        &self,
        token: &str,
        system_id: &str,
        info: &Value,
        last_update: Option<&str>,
    ) -> Result<Reply, ClientError> {
        let mut body = json!({"token": token, "system_id": system_id, "info": info});
        if let Some(lu) = last_update {
            body["last_update"] = json!(lu);
        }
        self.send(
            self.http
                .post(format!("{}/jobs/request", self.api))
                .header("RUNNER-TOKEN", token)
                .timeout(REQUEST_JOB_TIMEOUT)
                .json(&body),
        )
        .await
    }

    /// `PUT /jobs/:id` with `body` (state, failure_reason, exit_code, output, ...).
    pub async fn update_job(
        &self,
        id: u64,
        job_token: &str,
        body: &Value,
    ) -> Result<Reply, ClientError> {
        self.send(
            self.http
                .put(format!("{}/jobs/{id}", self.api))
                .header("JOB-TOKEN", job_token)
                .timeout(CALL_TIMEOUT)
                .json(body),
        )
        .await
    }

    /// `PATCH /jobs/:id/trace` with the log bytes from `offset`.
    pub async fn patch_trace(
        &self,
        id: u64,
        job_token: &str,
        offset: usize,
        chunk: &[u8],
    ) -> Result<Reply, ClientError> {
        let end = offset + chunk.len().max(1) - 1;
        self.send(
            self.http
                .patch(format!("{}/jobs/{id}/trace", self.api))
                .header("JOB-TOKEN", job_token)
                .header("Content-Type", "text/plain")
                .header("Content-Range", format!("{offset}-{end}"))
                .timeout(CALL_TIMEOUT)
                .body(chunk.to_vec()),
        )
        .await
    }

    /// `GET /jobs/:id/artifacts` with `JOB-TOKEN` (gitlab-runner's download of a dependency's
    /// artifacts), or `url` (a redirect's `Location`; the token only goes along when
    /// `send_token`). A 200's body is streamed into `sink`, at most `limit` bytes
    /// ([`ClientError::TooLarge`] past that), and the returned reply's body is empty; any
    /// other reply comes back as it is (bounded like every reply).
    pub async fn download_artifacts(
        &self,
        url: Option<&str>,
        id: u64,
        job_token: &str,
        send_token: bool,
        sink: &mut (dyn std::io::Write + Send),
        limit: u64,
    ) -> Result<Reply, ClientError> {
        let url = url
            .map(str::to_string)
            .unwrap_or_else(|| format!("{}/jobs/{id}/artifacts", self.api));
        let timeout = CALL_TIMEOUT + Duration::from_secs(limit / (1 << 20));
        let mut req = self.http.get(&url).timeout(timeout);
        if send_token {
            req = req.header("JOB-TOKEN", job_token);
        }
        let request_id = format!("{:016x}", rand::random::<u64>());
        let mut resp = req
            .header("X-Request-Id", request_id)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        if resp.status() != StatusCode::OK {
            return self.read_reply(resp).await;
        }
        let status = resp.status();
        let headers = resp.headers().clone();
        let mut written = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport(e))? {
            written += chunk.len() as u64;
            if written > limit {
                return Err(ClientError::TooLarge {
                    url: self.url.clone(),
                    limit: usize::try_from(limit).unwrap_or(usize::MAX),
                });
            }
            sink.write_all(&chunk).map_err(|e| ClientError::Sink {
                url: self.url.clone(),
                message: e.to_string(),
            })?;
        }
        Ok(Reply {
            status,
            headers,
            body: bytes::Bytes::new(),
        })
    }

    /// `POST /jobs/:id/artifacts` (multipart field `file`; type and format both as query
    /// parameters and as multipart fields, since servers read one or the other). `url`
    /// overrides the endpoint (a 307's `Location`).
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_artifact(
        &self,
        url: Option<&str>,
        id: u64,
        job_token: &str,
        file_name: &str,
        data: Vec<u8>,
        artifact_type: &str,
        artifact_format: &str,
        expire_in: &str,
    ) -> Result<Reply, ClientError> {
        let url = url
            .map(str::to_string)
            .unwrap_or_else(|| format!("{}/jobs/{id}/artifacts", self.api));
        let mut query = vec![
            ("artifact_type", artifact_type.to_string()),
            ("artifact_format", artifact_format.to_string()),
        ];
        if !expire_in.is_empty() {
            query.push(("expire_in", expire_in.to_string()));
        }
        let timeout = CALL_TIMEOUT + Duration::from_secs(data.len() as u64 / (1 << 20));
        let part = reqwest::multipart::Part::bytes(data)
            .file_name(file_name.to_string())
            .mime_str("application/octet-stream")
            .map_err(|e| self.transport(e))?;
        let mut form = reqwest::multipart::Form::new()
            .text("artifact_type", artifact_type.to_string())
            .text("artifact_format", artifact_format.to_string());
        if !expire_in.is_empty() {
            form = form.text("expire_in", expire_in.to_string());
        }
        let form = form.part("file", part);
        self.send(
            self.http
                .post(url)
                .header("JOB-TOKEN", job_token)
                .query(&query)
                .timeout(timeout)
                .multipart(form),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_features_are_what_we_implement() {
        let f = features();
        for on in [
            "upload_multiple_artifacts",
            "refspecs",
            "variables",
            "artifacts",
            "masking",
            "raw_variables",
            "trace_reset",
            "trace_checksum",
            "trace_size",
            "cancelable",
            "cancel_gracefully",
            "return_exit_code",
            "multi_build_steps",
            "image",
            "cache",
            "fallback_cache_keys",
        ] {
            assert_eq!(f[on], true, "{on}");
        }
        for off in [
            "two_phase_job_commit",
            "services",
            "shared",
            "artifacts_exclude",
        ] {
            assert_eq!(f[off], false, "{off}");
        }
    }
}
