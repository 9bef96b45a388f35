//! A fake GitLab for the runner's GitLab intake: a real HTTP server (axum, on 127.0.0.1) with
//! the runner API's real status codes, headers and failure modes — 201/204 +
//! `X-GitLab-Last-Update` on job requests, 403 on a wrong token, 416 + `Range` on a wrong log
//! offset, 412 on a checksum mismatch (also injected: a log that lost a byte), 202 on a final
//! update while "persisting", `Job-Status: canceling|canceled`, 5xx bursts,
//! `X-GitLab-Trace-Update-Interval` — that records what the runner sends so tests can assert
//! on it. It also checks the protocol itself (Content-Range shape, patch size, tokens) and
//! records every violation in [`State::violations`]. Earlier jobs' artifacts
//! ([`State::dependency_artifacts`]) are served by `GET /jobs/:id/artifacts` with their own
//! failure modes: 404/403, 5xx bursts, a 307 to a storage URL.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State as AxState};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use axum::Router;
use serde_json::{json, Value};

/// Largest artifacts upload GitLab accepts by default (100 MB).
pub const MAX_ARTIFACTS: usize = 100 << 20;
/// Largest log patch GitLab accepts.
pub const MAX_PATCH: usize = 1 << 20;

/// One job as the fake sees it.
#[derive(Debug, Clone, Default)]
pub struct JobRecord {
    pub token: String,
    /// GitLab's copy of the log.
    pub trace: Vec<u8>,
    /// running, canceling, canceled, success, failed.
    pub status: String,
    /// Every PUT body, in order.
    pub updates: Vec<Value>,
    /// The accepted final PUT.
    pub final_update: Option<Value>,
    pub artifacts: Vec<ArtifactUpload>,
    pub patches: usize,
    /// Replies 412 sent to final updates.
    pub checksum_mismatches: usize,
    /// Log patches from offset 0 over a log GitLab already had: whole-log resends.
    pub log_resets: usize,
    /// When each PUT arrived (same order as `updates`), and what the fake answered.
    pub update_replies: Vec<(Instant, u16)>,
    pub picked_up: Option<Instant>,
    pub finished: Option<Instant>,
}

/// One artifact upload.
#[derive(Debug, Clone, Default)]
pub struct ArtifactUpload {
    pub query: HashMap<String, String>,
    /// Multipart text fields.
    pub fields: HashMap<String, String>,
    pub file_name: String,
    pub data: Vec<u8>,
}

/// The artifacts archive of an earlier job, and how the fake misbehaves serving it.
#[derive(Debug, Clone, Default)]
pub struct DependencyArtifact {
    /// The token a download must carry in `JOB-TOKEN`.
    pub token: String,
    pub zip: Vec<u8>,
    /// Answer this status instead (404 expired, 403 forbidden).
    pub status: Option<u16>,
    /// The next N downloads get 503 (with `Retry-After: 1`).
    pub unavailable: u32,
    /// Answer 307 to `/storage/:id` (object storage) instead of the archive.
    pub redirect: bool,
    /// The storage's base URL in that 307 (another origin, e.g. the fake's own port as
    /// `localhost`); relative to GitLab when None.
    pub storage_url: Option<String>,
}

/// One download request.
#[derive(Debug, Clone)]
pub struct Download {
    /// The job whose artifacts were asked for.
    pub id: u64,
    /// `/api/v4/jobs/:id/artifacts` or `/storage/:id`.
    pub path: String,
    pub job_token: Option<String>,
    pub status: u16,
}

/// A zip of (name, data, unix mode) entries, names written exactly as given (`../x` too).
pub fn zip_of(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
    use std::io::Write;
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data, mode) in entries {
        let opts = zip::write::SimpleFileOptions::default().unix_permissions(*mode);
        z.start_file(*name, opts).expect("zip entry");
        z.write_all(data).expect("zip data");
    }
    z.finish().expect("zip").into_inner()
}

/// Everything the fake knows; tests read and tweak it through [`FakeGitlab::with`].
#[derive(Debug, Default)]
pub struct State {
    pub runner_token: String,
    pub queue: VecDeque<Value>,
    pub jobs: BTreeMap<u64, JobRecord>,
    /// Bodies of `POST /jobs/request`.
    pub requests: Vec<Value>,
    /// Bodies of `POST /runners/verify`.
    pub verifies: Vec<Value>,
    /// The next N requests to any endpoint get 502 (a GitLab outage).
    pub fail_next: u32,
    /// The next N final job updates get 503 with `Retry-After: 1`.
    pub fail_final_puts: u32,
    /// On the next log patch, lose half the log and answer 416 with what is left.
    pub lose_trace_once: bool,
    /// On the next final job update, GitLab's copy of the log has lost its last byte, so
    /// the checksum differs: 412, and the runner must send the whole log again.
    pub corrupt_trace_on_final: bool,
    /// The next N final job updates (with a matching checksum) get 202: GitLab is still
    /// persisting the log; the runner must ask again after the update interval.
    pub persisting_final_puts: u32,
    /// Seconds in `X-GitLab-Trace-Update-Interval`.
    pub trace_interval: u64,
    /// Protocol violations seen (tests assert this stays empty).
    pub violations: Vec<String>,
    /// Artifacts of earlier jobs, by job id, for `GET /jobs/:id/artifacts`.
    pub dependency_artifacts: BTreeMap<u64, DependencyArtifact>,
    /// Every `GET /jobs/:id/artifacts` and storage download, in order.
    pub downloads: Vec<Download>,
    last_update: u64,
}

/// The running fake.
#[derive(Debug)]
pub struct FakeGitlab {
    pub url: String,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeGitlab {
    /// Starts the server on a free port; `runner_token` is the only token it accepts.
    pub fn start(runner_token: &str) -> FakeGitlab {
        let state = Arc::new(Mutex::new(State {
            runner_token: runner_token.into(),
            trace_interval: 1,
            ..Default::default()
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new()
            .route("/api/v4/runners/verify", post(verify))
            .route("/api/v4/jobs/request", post(request_job))
            .route("/api/v4/jobs/{id}", put(update_job))
            .route("/api/v4/jobs/{id}/trace", patch(patch_trace))
            .route(
                "/api/v4/jobs/{id}/artifacts",
                post(upload_artifact)
                    .get(download_artifact)
                    // GitLab's default maximum artifacts size; axum's own default is 2 MB.
                    .layer(axum::extract::DefaultBodyLimit::max(MAX_ARTIFACTS)),
            )
            .route("/storage/{id}", get(download_from_storage))
            .with_state(state.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        FakeGitlab {
            url,
            state,
            stop: Some(stop),
        }
    }

    /// Reads or changes the state.
    pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().expect("fake state"))
    }

    /// Queues a job for the next request.
    pub fn enqueue(&self, job: Value) {
        self.with(|s| s.queue.push_back(job));
    }

    pub fn job(&self, id: u64) -> JobRecord {
        self.with(|s| s.jobs.get(&id).cloned().unwrap_or_default())
    }

    /// Sets the `Job-Status` the next replies about job `id` carry (e.g. "canceling").
    pub fn set_status(&self, id: u64, status: &str) {
        self.with(|s| {
            if let Some(j) = s.jobs.get_mut(&id) {
                j.status = status.into();
            }
        });
    }

    /// Polls until `cond` holds for job `id`, or panics with the job's state after `timeout`.
    pub fn wait_job(
        &self,
        id: u64,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&JobRecord) -> bool,
    ) -> JobRecord {
        let deadline = Instant::now() + timeout;
        loop {
            let j = self.job(id);
            if cond(&j) {
                return j;
            }
            if Instant::now() >= deadline {
                panic!(
                    "job {id}: {what} did not happen within {timeout:?}; status {}, updates {:?}, log:\n{}",
                    j.status,
                    j.updates,
                    String::from_utf8_lossy(&j.trace)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the final update of job `id`.
    pub fn wait_final(&self, id: u64, timeout: Duration) -> JobRecord {
        self.wait_job(id, timeout, "the final update", |j| {
            j.final_update.is_some()
        })
    }

    pub fn violations(&self) -> Vec<String> {
        self.with(|s| s.violations.clone())
    }
}

impl Drop for FakeGitlab {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

type Shared = AxState<Arc<Mutex<State>>>;

fn outage(s: &mut State) -> Option<Response> {
    if s.fail_next > 0 {
        s.fail_next -= 1;
        return Some((StatusCode::BAD_GATEWAY, "502 Bad Gateway").into_response());
    }
    None
}

async fn verify(AxState(state): Shared, body: Bytes) -> Response {
    let mut s = state.lock().expect("state");
    if let Some(r) = outage(&mut s) {
        return r;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    s.verifies.push(body.clone());
    if body["token"] != json!(s.runner_token) {
        return (StatusCode::FORBIDDEN, Json403).into_response();
    }
    if body["system_id"].as_str().map(|id| id.len()) != Some(14) {
        s.violations
            .push(format!("verify without a valid system_id: {body}"));
    }
    axum::Json(json!({"id": 1, "token": s.runner_token, "token_expires_at": null})).into_response()
}

/// GitLab's 403 body.
struct Json403;
impl IntoResponse for Json403 {
    fn into_response(self) -> Response {
        axum::Json(json!({"message": "403 Forbidden"})).into_response()
    }
}

async fn request_job(AxState(state): Shared, headers: HeaderMap, body: Bytes) -> Response {
    let mut s = state.lock().expect("state");
    if let Some(r) = outage(&mut s) {
        return r;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    s.requests.push(body.clone());
    if body["token"] != json!(s.runner_token) {
        return (StatusCode::FORBIDDEN, Json403).into_response();
    }
    if headers.get("runner-token").and_then(|v| v.to_str().ok()) != Some(s.runner_token.as_str()) {
        s.violations
            .push("job request without RUNNER-TOKEN header".into());
    }
    for f in [
        "name",
        "version",
        "platform",
        "architecture",
        "executor",
        "features",
    ] {
        if body["info"][f].is_null() {
            s.violations.push(format!("job request without info.{f}"));
        }
    }
    match s.queue.pop_front() {
        Some(job) => {
            let id = job["id"].as_u64().unwrap_or(0);
            s.jobs.insert(
                id,
                JobRecord {
                    token: job["token"].as_str().unwrap_or("").into(),
                    status: "running".into(),
                    picked_up: Some(Instant::now()),
                    ..Default::default()
                },
            );
            (StatusCode::CREATED, axum::Json(job)).into_response()
        }
        None => {
            s.last_update += 1;
            let mut h = HeaderMap::new();
            h.insert(
                "X-GitLab-Last-Update",
                HeaderValue::from_str(&format!("lu-{}", s.last_update)).expect("header"),
            );
            (StatusCode::NO_CONTENT, h).into_response()
        }
    }
}

/// The refusal to send when the call does not carry job `id`'s token (None: it does).
fn job_token_refusal(s: &mut State, id: u64, headers: &HeaderMap) -> Option<Response> {
    let Some(job) = s.jobs.get(&id) else {
        return Some((StatusCode::NOT_FOUND, "404 Not found").into_response());
    };
    let sent = headers.get("job-token").and_then(|v| v.to_str().ok());
    if sent != Some(job.token.as_str()) {
        s.violations
            .push(format!("job {id}: call without the right JOB-TOKEN"));
        return Some((StatusCode::FORBIDDEN, Json403).into_response());
    }
    None
}

fn status_headers(s: &State, status: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Job-Status", HeaderValue::from_str(status).expect("header"));
    h.insert(
        "X-GitLab-Trace-Update-Interval",
        HeaderValue::from_str(&s.trace_interval.to_string()).expect("header"),
    );
    h
}

async fn update_job(
    AxState(state): Shared,
    Path(id): Path<u64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut s = state.lock().expect("state");
    if let Some(r) = outage(&mut s) {
        return r;
    }
    if let Some(r) = job_token_refusal(&mut s, id, &headers) {
        return r;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let final_state = body["state"].as_str().unwrap_or("").to_string();
    let failing_puts = s.fail_final_puts;
    let final_put = matches!(final_state.as_str(), "success" | "failed");
    let corrupt = final_put && std::mem::take(&mut s.corrupt_trace_on_final);
    let persisting = s.persisting_final_puts;
    let job = s.jobs.get_mut(&id).expect("checked");
    job.updates.push(body.clone());
    if corrupt {
        job.trace.pop();
    }
    let reply = update_reply(&mut s, id, body, final_state, failing_puts, persisting);
    let job = s.jobs.get_mut(&id).expect("checked");
    job.update_replies
        .push((Instant::now(), reply.status().as_u16()));
    reply
}

/// The reply to one `PUT /jobs/:id` (already recorded in the job's `updates`).
fn update_reply(
    s: &mut State,
    id: u64,
    body: Value,
    final_state: String,
    failing_puts: u32,
    persisting: u32,
) -> Response {
    let interval = s.trace_interval;
    let job = s.jobs.get_mut(&id).expect("checked");
    if body["token"] != json!(job.token) {
        let v = format!("job {id}: PUT without the job token in the body");
        s.violations.push(v);
        return (StatusCode::FORBIDDEN, Json403).into_response();
    }
    match final_state.as_str() {
        "running" => {
            let status = job.status.clone();
            let h = status_headers(s, &status);
            (StatusCode::OK, h).into_response()
        }
        "success" | "failed" if job.status == "canceled" || job.final_update.is_some() => {
            // GitLab: the job is no longer running.
            (StatusCode::FORBIDDEN, Json403).into_response()
        }
        "success" | "failed" => {
            if failing_puts > 0 {
                s.fail_final_puts -= 1;
                let mut h = HeaderMap::new();
                h.insert("Retry-After", HeaderValue::from_static("1"));
                return (StatusCode::SERVICE_UNAVAILABLE, h).into_response();
            }
            let want = format!("crc32:{:08x}", crc32fast::hash(&job.trace));
            let size_ok = body["output"]["bytesize"].as_u64() == Some(job.trace.len() as u64);
            if body["output"]["checksum"] != json!(want) || !size_ok {
                job.checksum_mismatches += 1;
                return StatusCode::PRECONDITION_FAILED.into_response();
            }
            if persisting > 0 {
                s.persisting_final_puts -= 1;
                let mut h = HeaderMap::new();
                h.insert(
                    "X-GitLab-Trace-Update-Interval",
                    HeaderValue::from_str(&interval.to_string()).expect("header"),
                );
                return (StatusCode::ACCEPTED, h).into_response();
            }
            if job.final_update.is_none() {
                job.final_update = Some(body);
                job.finished = Some(Instant::now());
                if job.status == "running" || job.status == "canceling" {
                    job.status = if job.status == "canceling" {
                        "canceled".into()
                    } else {
                        final_state
                    };
                }
            }
            StatusCode::OK.into_response()
        }
        other => {
            s.violations
                .push(format!("job {id}: PUT with state '{other}'"));
            StatusCode::BAD_REQUEST.into_response()
        }
    }
}

async fn patch_trace(
    AxState(state): Shared,
    Path(id): Path<u64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut s = state.lock().expect("state");
    if let Some(r) = outage(&mut s) {
        return r;
    }
    if let Some(r) = job_token_refusal(&mut s, id, &headers) {
        return r;
    }
    let range = headers
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .and_then(|r| {
            let (a, b) = r.split_once('-')?;
            Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?))
        });
    let Some((start, end)) = range else {
        s.violations
            .push(format!("job {id}: PATCH without a START-END Content-Range"));
        return StatusCode::BAD_REQUEST.into_response();
    };
    if body.len() > MAX_PATCH || end + 1 != start + body.len() {
        s.violations.push(format!(
            "job {id}: PATCH {start}-{end} with {} bytes (max {MAX_PATCH})",
            body.len()
        ));
        return StatusCode::BAD_REQUEST.into_response();
    }
    let lose = std::mem::take(&mut s.lose_trace_once);
    let job = s.jobs.get_mut(&id).expect("checked");
    if !(job.status == "running" || job.status == "canceling") {
        return (StatusCode::FORBIDDEN, Json403).into_response();
    }
    job.patches += 1;
    if lose {
        let keep = job.trace.len() / 2;
        job.trace.truncate(keep);
    }
    if start != job.trace.len() && start != 0 {
        let mut h = HeaderMap::new();
        h.insert(
            "Range",
            HeaderValue::from_str(&format!("0-{}", job.trace.len())).expect("header"),
        );
        return (StatusCode::RANGE_NOT_SATISFIABLE, h).into_response();
    }
    if start == 0 {
        // trace_reset: a patch from 0 replaces the log.
        if !job.trace.is_empty() {
            job.log_resets += 1;
        }
        job.trace.clear();
    }
    job.trace.extend_from_slice(&body);
    let len = job.trace.len();
    let status = job.status.clone();
    let mut h = status_headers(&s, &status);
    h.insert(
        "Range",
        HeaderValue::from_str(&format!("0-{len}")).expect("header"),
    );
    (StatusCode::ACCEPTED, h).into_response()
}

async fn upload_artifact(
    AxState(state): Shared,
    Path(id): Path<u64>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut s = state.lock().expect("state");
    if let Some(r) = outage(&mut s) {
        return r;
    }
    if let Some(r) = job_token_refusal(&mut s, id, &headers) {
        return r;
    }
    let ctype = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(boundary) = ctype.split("boundary=").nth(1) else {
        s.violations
            .push(format!("job {id}: artifact upload is not multipart"));
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut upload = ArtifactUpload {
        query,
        ..Default::default()
    };
    for part in multipart_parts(&body, boundary.trim_matches('"')) {
        let (name, file_name, data) = part;
        if name == "file" {
            upload.file_name = file_name.unwrap_or_default();
            upload.data = data;
        } else {
            upload
                .fields
                .insert(name, String::from_utf8_lossy(&data).into_owned());
        }
    }
    if upload.file_name.is_empty() {
        s.violations
            .push(format!("job {id}: artifact upload without a `file` part"));
        return StatusCode::BAD_REQUEST.into_response();
    }
    s.jobs.get_mut(&id).expect("checked").artifacts.push(upload);
    (StatusCode::CREATED, axum::Json(json!({}))).into_response()
}

async fn download_artifact(
    AxState(state): Shared,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Response {
    let mut s = state.lock().expect("state");
    if let Some(r) = outage(&mut s) {
        return r;
    }
    let sent = headers
        .get("job-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let reply = match s.dependency_artifacts.get_mut(&id) {
        None => (StatusCode::NOT_FOUND, "404 Not found").into_response(),
        Some(dep) if sent.as_deref() != Some(dep.token.as_str()) => {
            let v = format!("artifacts of job {id}: download without its JOB-TOKEN");
            s.violations.push(v);
            (StatusCode::FORBIDDEN, Json403).into_response()
        }
        Some(dep) => match dep.status {
            Some(code) => StatusCode::from_u16(code)
                .expect("a status code")
                .into_response(),
            None if dep.unavailable > 0 => {
                dep.unavailable -= 1;
                let mut h = HeaderMap::new();
                h.insert("Retry-After", HeaderValue::from_static("1"));
                (StatusCode::SERVICE_UNAVAILABLE, h).into_response()
            }
            None if dep.redirect => {
                let mut h = HeaderMap::new();
                // Relative, as a proxy may send it.
                let base = dep.storage_url.clone().unwrap_or_default();
                h.insert(
                    "Location",
                    HeaderValue::from_str(&format!("{base}/storage/{id}")).expect("header"),
                );
                (StatusCode::TEMPORARY_REDIRECT, h).into_response()
            }
            None => (StatusCode::OK, dep.zip.clone()).into_response(),
        },
    };
    s.downloads.push(Download {
        id,
        path: format!("/api/v4/jobs/{id}/artifacts"),
        job_token: sent,
        status: reply.status().as_u16(),
    });
    reply
}

async fn download_from_storage(
    AxState(state): Shared,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Response {
    let mut s = state.lock().expect("state");
    let reply = match s.dependency_artifacts.get(&id) {
        Some(dep) => (StatusCode::OK, dep.zip.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    };
    let job_token = headers
        .get("job-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    s.downloads.push(Download {
        id,
        path: format!("/storage/{id}"),
        job_token,
        status: reply.status().as_u16(),
    });
    reply
}

/// Splits a multipart/form-data body: (field name, file name, data) per part.
fn multipart_parts(body: &[u8], boundary: &str) -> Vec<(String, Option<String>, Vec<u8>)> {
    let delim = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut pieces = split(body, delim.as_bytes());
    pieces.remove(0); // preamble
    for piece in pieces {
        if piece.starts_with(b"--") {
            break; // closing delimiter
        }
        let piece = piece.strip_prefix(b"\r\n").unwrap_or(piece);
        let Some(head_end) = find(piece, b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&piece[..head_end]).into_owned();
        let mut data = piece[head_end + 4..].to_vec();
        if data.ends_with(b"\r\n") {
            data.truncate(data.len() - 2);
        }
        let attr = |key: &str| {
            let pat = format!("{key}=\"");
            let i = head.find(&pat)? + pat.len();
            let j = head[i..].find('"')?;
            Some(head[i..i + j].to_string())
        };
        if let Some(name) = attr("name") {
            parts.push((name, attr("filename"), data));
        }
    }
    parts
}

fn split<'a>(hay: &'a [u8], needle: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = hay;
    while let Some(i) = find(rest, needle) {
        out.push(&rest[..i]);
        rest = &rest[i + needle.len()..];
    }
    out.push(rest);
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A job payload like GitLab's, with `script` and `after_script` lines and `variables` as
/// (key, value, masked) triples. Tests add fields (artifacts, git_info) as they need.
pub fn job_payload(
    id: u64,
    script: &[&str],
    after_script: &[&str],
    variables: &[(&str, &str, bool)],
    timeout_s: u64,
) -> Value {
    let mut vars = vec![
        json!({"key": "CI_JOB_ID", "value": id.to_string(), "public": true, "masked": false}),
        json!({"key": "CI_JOB_TOKEN", "value": format!("jobtoken-{id}-secret"), "public": false, "masked": true}),
    ];
    for (k, v, masked) in variables {
        vars.push(json!({"key": k, "value": v, "public": !masked, "masked": masked, "file": false, "raw": false}));
    }
    json!({
        "id": id,
        "token": format!("jobtoken-{id}-secret"),
        "allow_git_fetch": false,
        "job_info": {"id": id, "name": format!("job-{id}"), "stage": "test", "project_id": 42, "project_name": "demo", "time_in_queue_seconds": 1},
        "git_info": {"repo_type": "git", "repo_url": format!("http://gitlab-ci-token:jobtoken-{id}-secret@127.0.0.1:9/demo.git"),
                     "ref": "main", "sha": "0123456789abcdef0123456789abcdef01234567", "before_sha": "0000000000000000000000000000000000000000",
                     "ref_type": "branch", "refspecs": ["+refs/heads/main:refs/remotes/origin/main"], "depth": 20},
        "runner_info": {"timeout": timeout_s, "runner_session_url": null},
        "variables": vars,
        "steps": [
            {"name": "script", "script": script, "timeout": timeout_s, "when": "on_success", "allow_failure": false},
            {"name": "after_script", "script": after_script, "timeout": timeout_s, "when": "always", "allow_failure": false},
        ],
        "image": null,
        "services": null,
        "artifacts": null,
        "cache": [],
        "credentials": [],
        "dependencies": [],
        "features": {"trace_sections": true, "failure_reasons": ["unknown_failure", "script_failure", "api_failure", "stuck_or_timeout_failure", "runner_system_failure", "job_execution_timeout"]},
    })
}
