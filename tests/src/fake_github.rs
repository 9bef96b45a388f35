//! A fake GitHub REST API for the GitHub App tests: a real HTTP server (axum on 127.0.0.1)
//! that issues installation tokens and records check runs, and checks every request the way
//! GitHub would — and more strictly:
//!
//! - `POST /app/installations/{id}/access_tokens` wants `Authorization: Bearer JWT`, an RS256
//!   JWT signed with the App's key (verified with its public key), `iss` = the App id and a
//!   lifetime of at most 10 minutes;
//! - check-run calls want `Authorization: token TOKEN` with a token it issued (a JWT there is
//!   refused), GitHub's `Accept` and `X-GitHub-Api-Version` headers and a User-Agent;
//! - bodies: `name` and `head_sha` on create, valid `status`/`conclusion`, a conclusion when
//!   completed, `title` and `summary` with any `output`, summary and text ≤ 65,535 characters,
//!   at most 50 annotations per request, each with path, lines, level and message;
//! - status only moves forward: queued → in_progress → completed.
//!
//! Anything wrong is answered 422 and recorded in [`FakeGithub::violations`], which tests
//! assert empty. [`FakeGithub::inject`] makes the next matching requests fail with a 5xx or a
//! rate limit (with GitHub's headers) to exercise retries.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post};
use axum::Router;
use serde_json::{json, Value};

/// GitHub's limits.
pub const MAX_ANNOTATIONS_PER_REQUEST: usize = 50;
pub const MAX_OUTPUT_CHARS: usize = 65_535;

/// A failure to answer with instead of the real response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 502 Bad Gateway, no headers.
    ServerError,
    /// 403 with `Retry-After: SECS` (a secondary rate limit).
    RetryAfter(u64),
    /// 403 with `x-ratelimit-remaining: 0` and `x-ratelimit-reset` SECS from now.
    RateLimitReset(u64),
    /// 401 "Bad credentials", and the request's installation token is revoked: a caller that
    /// retries with it is a violation (as if it had expired early).
    Unauthorized,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub authorization: String,
    pub body: Value,
    /// What was answered.
    pub status: u16,
}

/// A check run as the fake knows it.
#[derive(Debug, Clone)]
pub struct CheckRun {
    pub id: u64,
    pub repo: String,
    pub name: String,
    pub head_sha: String,
    pub external_id: Option<String>,
    /// Every status it had, in order (repeats collapsed).
    pub statuses: Vec<String>,
    pub started_at: Option<String>,
    pub conclusion: Option<String>,
    pub completed_at: Option<String>,
    /// The latest output (title, summary, text).
    pub output: Value,
    /// All annotations received, over all requests.
    pub annotations: Vec<Value>,
    /// Annotations per request that carried any.
    pub annotation_batches: Vec<usize>,
}

impl CheckRun {
    pub fn status(&self) -> &str {
        self.statuses.last().map(String::as_str).unwrap_or("")
    }

    pub fn title(&self) -> String {
        self.output["title"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub fn summary(&self) -> String {
        self.output["summary"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

#[derive(Debug, Default)]
struct Inner {
    requests: Vec<Request>,
    violations: Vec<String>,
    check_runs: Vec<CheckRun>,
    tokens: Vec<String>,
    /// Tokens answered with a 401 ([`Failure::Unauthorized`]): no longer accepted.
    revoked: Vec<String>,
    /// (method, path prefix) → failures to answer with, in order.
    injected: Vec<(String, String, VecDeque<Failure>)>,
    next_id: u64,
}

struct Config {
    app_id: u64,
    public_key: jsonwebtoken::DecodingKey,
}

#[derive(Clone)]
struct Fake {
    config: Arc<Config>,
    inner: Arc<Mutex<Inner>>,
}

/// The running fake; stops when dropped.
pub struct FakeGithub {
    /// The API root, e.g. `http://127.0.0.1:PORT`.
    pub url: String,
    inner: Arc<Mutex<Inner>>,
    _runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for FakeGithub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FakeGithub({})", self.url)
    }
}

impl FakeGithub {
    /// Starts the fake for App `app_id`, whose JWTs must verify with `public_key_pem`.
    pub fn start(app_id: u64, public_key_pem: &[u8]) -> FakeGithub {
        let public_key =
            jsonwebtoken::DecodingKey::from_rsa_pem(public_key_pem).expect("public key");
        let fake = Fake {
            config: Arc::new(Config { app_id, public_key }),
            inner: Arc::new(Mutex::new(Inner {
                next_id: 1000,
                ..Default::default()
            })),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new()
            .route("/app/installations/{id}/access_tokens", post(access_token))
            .route("/repos/{owner}/{repo}/check-runs", post(create_check_run))
            .route(
                "/repos/{owner}/{repo}/check-runs/{id}",
                patch(update_check_run),
            )
            .fallback(unknown)
            .with_state(fake.clone());
        runtime.spawn(async move {
            axum::serve(listener, app).await.expect("fake GitHub");
        });
        FakeGithub {
            url: format!("http://{addr}"),
            inner: fake.inner,
            _runtime: runtime,
        }
    }

    /// The next requests with `method` whose path starts with `path_prefix` fail as given.
    pub fn inject(&self, method: &str, path_prefix: &str, failures: &[Failure]) {
        self.inner.lock().unwrap().injected.push((
            method.to_string(),
            path_prefix.to_string(),
            failures.iter().copied().collect(),
        ));
    }

    pub fn requests(&self) -> Vec<Request> {
        self.inner.lock().unwrap().requests.clone()
    }

    pub fn violations(&self) -> Vec<String> {
        self.inner.lock().unwrap().violations.clone()
    }

    pub fn check_runs(&self) -> Vec<CheckRun> {
        self.inner.lock().unwrap().check_runs.clone()
    }

    /// Polls until `done(check runs)` holds or `timeout` passes; returns the check runs and
    /// whether it held.
    pub fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&[CheckRun]) -> bool,
    ) -> (Vec<CheckRun>, bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let runs = self.check_runs();
            if done(&runs) {
                return (runs, true);
            }
            if Instant::now() >= deadline {
                return (runs, false);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "message": message }))).into_response()
}

impl Fake {
    /// Records the request and returns an injected failure for it, if any.
    fn intake(
        &self,
        method: &str,
        path: &str,
        headers: &HeaderMap,
        body: &Value,
    ) -> Option<Response> {
        let mut inner = self.inner.lock().unwrap();
        inner.requests.push(Request {
            method: method.into(),
            path: path.into(),
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            body: body.clone(),
            status: 0,
        });
        let failure = inner
            .injected
            .iter_mut()
            .find(|(m, p, q)| m == method && path.starts_with(p.as_str()) && !q.is_empty())
            .and_then(|(_, _, q)| q.pop_front())?;
        let mut response = match failure {
            Failure::ServerError => error(StatusCode::BAD_GATEWAY, "Server Error"),
            Failure::Unauthorized => {
                let used = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|a| a.strip_prefix("token "))
                    .unwrap_or_default()
                    .to_string();
                inner.revoked.push(used);
                error(StatusCode::UNAUTHORIZED, "Bad credentials")
            }
            Failure::RetryAfter(s) => {
                let mut r = error(
                    StatusCode::FORBIDDEN,
                    "You have exceeded a secondary rate limit",
                );
                r.headers_mut().insert("retry-after", HeaderValue::from(s));
                r
            }
            Failure::RateLimitReset(s) => {
                let mut r = error(StatusCode::FORBIDDEN, "API rate limit exceeded");
                let h = r.headers_mut();
                h.insert("x-ratelimit-remaining", HeaderValue::from(0));
                h.insert("x-ratelimit-reset", HeaderValue::from(now() + s));
                r
            }
        };
        response
            .headers_mut()
            .insert("x-injected", HeaderValue::from_static("1"));
        Some(response)
    }

    /// Records `problems` as violations and answers 422 if there are any.
    fn judge(&self, what: &str, problems: Vec<String>) -> Option<Response> {
        if problems.is_empty() {
            return None;
        }
        let mut inner = self.inner.lock().unwrap();
        for p in &problems {
            inner.violations.push(format!("{what}: {p}"));
        }
        Some(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &problems.join("; "),
        ))
    }

    fn set_status(&self, status: u16) {
        if let Some(r) = self.inner.lock().unwrap().requests.last_mut() {
            r.status = status;
        }
    }
}

/// Headers every REST call must carry.
fn common_headers(headers: &HeaderMap) -> Vec<String> {
    let mut p = Vec::new();
    let get = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("");
    if get("accept") != "application/vnd.github+json" {
        p.push(format!("Accept is '{}'", get("accept")));
    }
    if get("x-github-api-version") != "2022-11-28" {
        p.push(format!(
            "X-GitHub-Api-Version is '{}'",
            get("x-github-api-version")
        ));
    }
    if get("user-agent").is_empty() {
        p.push("no User-Agent (GitHub refuses such requests)".into());
    }
    p
}

async fn access_token(
    State(fake): State<Fake>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/app/installations/{id}/access_tokens");
    if let Some(r) = fake.intake("POST", &path, &headers, &Value::Null) {
        return r;
    }
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mut problems = Vec::new();
    match auth.strip_prefix("Bearer ") {
        None => problems.push(format!(
            "token endpoint needs 'Bearer JWT', got '{}'",
            auth.split(' ').next().unwrap_or("")
        )),
        Some(jwt) => {
            #[derive(serde::Deserialize)]
            struct Claims {
                iss: Value,
                iat: u64,
                exp: u64,
            }
            let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
            // iss is checked below: GitHub wants the App id as a number, which this crate's
            // own issuer check (strings only) would call missing.
            v.required_spec_claims = ["exp".to_string()].into_iter().collect();
            match jsonwebtoken::decode::<Claims>(jwt, &fake.config.public_key, &v) {
                Err(e) => problems.push(format!("JWT does not verify with the App's key: {e}")),
                Ok(t) => {
                    let iss = t
                        .claims
                        .iss
                        .as_u64()
                        .or_else(|| t.claims.iss.as_str().and_then(|s| s.parse().ok()));
                    if iss != Some(fake.config.app_id) {
                        problems.push(format!(
                            "JWT iss is {} (App id {})",
                            t.claims.iss, fake.config.app_id
                        ));
                    }
                    if t.claims.exp.saturating_sub(t.claims.iat) > 11 * 60 {
                        problems.push("JWT lives longer than 10 minutes".into());
                    }
                }
            }
        }
    }
    if let Some(r) = fake.judge("access token", problems) {
        fake.set_status(422);
        return r;
    }
    let token = {
        let mut inner = fake.inner.lock().unwrap();
        let t = format!("ghs_fake{}x{}", id, inner.tokens.len() + 1);
        inner.tokens.push(t.clone());
        t
    };
    fake.set_status(201);
    let expires = humantime_rfc3339(SystemTime::now() + Duration::from_secs(3600));
    (
        StatusCode::CREATED,
        axum::Json(json!({"token": token, "expires_at": expires, "permissions": {"checks": "write", "contents": "read"}, "repository_selection": "all"})),
    )
        .into_response()
}

/// RFC 3339 UTC without a crate: days from the civil calendar.
fn humantime_rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Checks the installation token of a check-run call.
fn installation_auth(fake: &Fake, headers: &HeaderMap) -> Vec<String> {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    match auth.strip_prefix("token ") {
        None => vec![format!(
            "check-run calls need 'token TOKEN', got '{}'",
            auth.split(' ').next().unwrap_or("")
        )],
        Some(t) if !fake.inner.lock().unwrap().tokens.iter().any(|k| k == t) => {
            vec!["token was never issued by this fake (a JWT or a made-up token?)".into()]
        }
        Some(t) if fake.inner.lock().unwrap().revoked.iter().any(|k| k == t) => {
            vec!["token was refused with a 401 before and used again".into()]
        }
        Some(_) => Vec::new(),
    }
}

const STATUSES: [&str; 3] = ["queued", "in_progress", "completed"];
const CONCLUSIONS: [&str; 7] = [
    "success",
    "failure",
    "neutral",
    "cancelled",
    "skipped",
    "timed_out",
    "action_required",
];

fn non_empty(v: Option<&Value>) -> bool {
    v.and_then(Value::as_str).is_some_and(|s| !s.is_empty())
}

/// Checks a create or update body the way GitHub validates it.
fn body_problems(body: &Value, create: bool) -> Vec<String> {
    let mut p = Vec::new();
    let Some(obj) = body.as_object() else {
        return vec!["body is not a JSON object".into()];
    };
    if create {
        for k in ["name", "head_sha"] {
            if !non_empty(obj.get(k)) {
                p.push(format!("'{k}' is required on create"));
            }
        }
    }
    let status = obj.get("status").and_then(Value::as_str);
    if let Some(s) = status {
        if !STATUSES.contains(&s) {
            p.push(format!("status '{s}' is not one of {STATUSES:?}"));
        }
    }
    let conclusion = obj.get("conclusion").and_then(Value::as_str);
    if let Some(c) = conclusion {
        if !CONCLUSIONS.contains(&c) {
            p.push(format!("conclusion '{c}' is not valid"));
        }
    }
    if status == Some("completed") && conclusion.is_none() {
        p.push("status completed requires a conclusion".into());
    }
    if let Some(out) = obj.get("output") {
        for k in ["title", "summary"] {
            if !non_empty(out.get(k)) {
                p.push(format!("output.{k} is required with output"));
            }
        }
        for k in ["summary", "text"] {
            if let Some(s) = out.get(k).and_then(Value::as_str) {
                let n = s.chars().count();
                if n > MAX_OUTPUT_CHARS {
                    p.push(format!(
                        "output.{k} has {n} characters (max {MAX_OUTPUT_CHARS})"
                    ));
                }
            }
        }
        if let Some(anns) = out.get("annotations") {
            let anns = anns.as_array().cloned().unwrap_or_default();
            if anns.len() > MAX_ANNOTATIONS_PER_REQUEST {
                p.push(format!(
                    "{} annotations in one request (max {MAX_ANNOTATIONS_PER_REQUEST})",
                    anns.len()
                ));
            }
            for a in &anns {
                let has_str = |k: &str| {
                    a.get(k)
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty())
                };
                let line = |k: &str| a.get(k).and_then(Value::as_u64).filter(|l| *l >= 1);
                if !has_str("path") || !has_str("message") {
                    p.push(format!("annotation lacks path or message: {a}"));
                }
                match (line("start_line"), line("end_line")) {
                    (Some(s), Some(e)) if s <= e => {}
                    _ => p.push(format!("annotation lines invalid: {a}")),
                }
                let level = a.get("annotation_level").and_then(Value::as_str);
                if !matches!(level, Some("notice" | "warning" | "failure")) {
                    p.push(format!("annotation_level invalid: {a}"));
                }
            }
        }
    }
    p
}

fn parse_body(body: &Bytes) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

async fn create_check_run(
    State(fake): State<Fake>,
    Path((owner, repo)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/repos/{owner}/{repo}/check-runs");
    let json = parse_body(&body);
    if let Some(r) = fake.intake("POST", &path, &headers, &json) {
        return r;
    }
    let mut problems = common_headers(&headers);
    problems.extend(installation_auth(&fake, &headers));
    problems.extend(body_problems(&json, true));
    if let Some(r) = fake.judge(&format!("POST {path}"), problems) {
        fake.set_status(422);
        return r;
    }
    let mut inner = fake.inner.lock().unwrap();
    inner.next_id += 1;
    let id = inner.next_id;
    let status = json["status"].as_str().unwrap_or("queued").to_string();
    let anns = json["output"]["annotations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    inner.check_runs.push(CheckRun {
        id,
        repo: format!("{owner}/{repo}"),
        name: json["name"].as_str().unwrap_or_default().into(),
        head_sha: json["head_sha"].as_str().unwrap_or_default().into(),
        external_id: json["external_id"].as_str().map(String::from),
        statuses: vec![status],
        started_at: json["started_at"].as_str().map(String::from),
        conclusion: json["conclusion"].as_str().map(String::from),
        completed_at: json["completed_at"].as_str().map(String::from),
        output: json.get("output").cloned().unwrap_or(Value::Null),
        annotation_batches: if anns.is_empty() {
            vec![]
        } else {
            vec![anns.len()]
        },
        annotations: anns,
    });
    if let Some(r) = inner.requests.last_mut() {
        r.status = 201;
    }
    (
        StatusCode::CREATED,
        axum::Json(json!({"id": id, "name": json["name"]})),
    )
        .into_response()
}

async fn update_check_run(
    State(fake): State<Fake>,
    Path((owner, repo, id)): Path<(String, String, u64)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/repos/{owner}/{repo}/check-runs/{id}");
    let json = parse_body(&body);
    if let Some(r) = fake.intake("PATCH", &path, &headers, &json) {
        return r;
    }
    let mut problems = common_headers(&headers);
    problems.extend(installation_auth(&fake, &headers));
    problems.extend(body_problems(&json, false));
    let known = fake
        .inner
        .lock()
        .unwrap()
        .check_runs
        .iter()
        .find(|c| c.id == id)
        .map(|c| (c.status().to_string(), c.repo.clone()));
    match &known {
        None => {
            fake.set_status(404);
            return error(StatusCode::NOT_FOUND, "Not Found");
        }
        Some((current, r)) => {
            if r != &format!("{owner}/{repo}") {
                problems.push(format!("check run {id} belongs to {r}"));
            }
            if let Some(new) = json["status"].as_str() {
                let rank = |s: &str| STATUSES.iter().position(|x| *x == s);
                if rank(new) < rank(current) || (current == "completed" && new != "completed") {
                    problems.push(format!("status went back from {current} to {new}"));
                }
                if current == "completed" && new == "completed" {
                    problems.push("completed twice".into());
                }
            }
        }
    }
    if let Some(r) = fake.judge(&format!("PATCH {path}"), problems) {
        fake.set_status(422);
        return r;
    }
    let mut inner = fake.inner.lock().unwrap();
    let run = inner
        .check_runs
        .iter_mut()
        .find(|c| c.id == id)
        .expect("checked above");
    if let Some(s) = json["status"].as_str() {
        if run.status() != s {
            run.statuses.push(s.to_string());
        }
    }
    if let Some(s) = json["started_at"].as_str() {
        run.started_at = Some(s.into());
    }
    if let Some(s) = json["conclusion"].as_str() {
        run.conclusion = Some(s.into());
    }
    if let Some(s) = json["completed_at"].as_str() {
        run.completed_at = Some(s.into());
    }
    if let Some(out) = json.get("output") {
        let anns = out["annotations"].as_array().cloned().unwrap_or_default();
        if !anns.is_empty() {
            run.annotation_batches.push(anns.len());
        }
        run.annotations.extend(anns);
        run.output = out.clone();
    }
    let name = run.name.clone();
    if let Some(r) = inner.requests.last_mut() {
        r.status = 200;
    }
    (StatusCode::OK, axum::Json(json!({"id": id, "name": name}))).into_response()
}

async fn unknown(
    State(fake): State<Fake>,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> Response {
    fake.inner
        .lock()
        .unwrap()
        .violations
        .push(format!("unexpected request {method} {uri}"));
    error(StatusCode::NOT_FOUND, "Not Found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(humantime_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            humantime_rfc3339(UNIX_EPOCH + Duration::from_secs(1_709_251_199)),
            "2024-02-29T23:59:59Z"
        );
    }

    #[test]
    fn bodies_are_judged_like_github() {
        let anns: Vec<Value> = (0..51)
            .map(|_| json!({"path": "a", "start_line": 1, "end_line": 1, "annotation_level": "failure", "message": "m"}))
            .collect();
        // (body, create, expected problem fragment or None)
        let cases = [
            (
                json!({"name": "n", "head_sha": "s", "status": "queued"}),
                true,
                None,
            ),
            (json!({"name": "n"}), true, Some("head_sha")),
            (
                json!({"status": "completed"}),
                false,
                Some("requires a conclusion"),
            ),
            (json!({"conclusion": "great"}), false, Some("not valid")),
            (
                json!({"output": {"title": "t"}}),
                false,
                Some("output.summary"),
            ),
            (
                json!({"output": {"title": "t", "summary": "x".repeat(65_536)}}),
                false,
                Some("65536 characters"),
            ),
            (
                json!({"output": {"title": "t", "summary": "s", "annotations": anns}}),
                false,
                Some("51 annotations"),
            ),
            (
                json!({"output": {"title": "t", "summary": "s", "annotations": [{"path": "a", "start_line": 0, "end_line": 1, "annotation_level": "failure", "message": "m"}]}}),
                false,
                Some("lines invalid"),
            ),
        ];
        for (body, create, want) in cases {
            let p = body_problems(&body, create);
            match want {
                None => assert!(p.is_empty(), "{body}: {p:?}"),
                Some(frag) => assert!(p.iter().any(|x| x.contains(frag)), "{frag}: {p:?}"),
            }
        }
    }
}
