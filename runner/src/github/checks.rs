//! The Checks API client: create a check run, update it, and complete it with its output and
//! annotations — at most [`super::wire::MAX_ANNOTATIONS_PER_REQUEST`] per request, the rest in further
//! PATCHes. Every call retries as [`retry`] says, with a fresh installation token after a
//! 401.
//!
//! Why reqwest and not octocrab's check-run builders: we need the response headers to honour
//! `Retry-After` and `x-ratelimit-reset` (the typed calls drop them), and the builders cannot
//! send every field we use (`started_at`, annotations spread over several PATCHes).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::{Method, StatusCode};
use serde::Serialize;

use super::app::{App, AppError, Token};
use super::retry::{self, Verdict};
use super::wire::{
    batches, timestamp, Annotation, CheckRunUpdate, Completion, NewCheckRun, Output, Repo, Status,
};

const API_VERSION: &str = "2022-11-28";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ChecksError {
    #[error("no installation token")]
    Token(#[source] AppError),
    #[error("{what}: HTTP {status}: {body}")]
    Refused {
        what: String,
        status: u16,
        body: String,
    },
    #[error("{what}: no answer after {attempts} attempts")]
    Unreachable {
        what: String,
        attempts: u32,
        #[source]
        source: reqwest::Error,
    },
    #[error("{what}: unexpected answer")]
    Parse {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Talks to the Checks API of one GitHub (github.com or an Enterprise Server).
#[derive(Debug, Clone)]
pub struct Checks {
    http: reqwest::Client,
    api_url: String,
    app: Arc<App>,
    policy: retry::Policy,
}

impl Checks {
    pub fn new(api_url: &str, app: Arc<App>, policy: retry::Policy) -> Checks {
        let http = reqwest::Client::builder()
            .user_agent(concat!("runner/", env!("CARGO_PKG_VERSION")))
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("a client with these settings always builds");
        Checks {
            http,
            api_url: api_url.trim_end_matches('/').to_string(),
            app,
            policy,
        }
    }

    /// Creates a check run; returns its id.
    pub async fn create(&self, repo: &Repo, run: &NewCheckRun) -> Result<u64, ChecksError> {
        let url = format!(
            "{}/repos/{}/{}/check-runs",
            self.api_url, repo.owner, repo.name
        );
        let what = format!("creating check run '{}'", run.name);
        let body = self.send(repo, Method::POST, &url, run, &what).await?;
        #[derive(serde::Deserialize)]
        struct Created {
            id: u64,
        }
        let created: Created =
            serde_json::from_str(&body).map_err(|source| ChecksError::Parse { what, source })?;
        Ok(created.id)
    }

    pub async fn update(
        &self,
        repo: &Repo,
        id: u64,
        update: &CheckRunUpdate,
    ) -> Result<(), ChecksError> {
        let url = format!(
            "{}/repos/{}/{}/check-runs/{id}",
            self.api_url, repo.owner, repo.name
        );
        let what = format!("updating check run {id}");
        self.send(repo, Method::PATCH, &url, update, &what).await?;
        Ok(())
    }

    /// Completes check run `id`. All but the last batch of annotations go first, each with
    /// the output's title and summary (GitHub requires them with any output); the last
    /// request carries the conclusion, the whole output and the last batch, so the check run
    /// reads "completed" only once everything is there.
    pub async fn complete(
        &self,
        repo: &Repo,
        id: u64,
        completion: Completion,
    ) -> Result<(), ChecksError> {
        let chunks: Vec<&[Annotation]> = batches(&completion.annotations).collect();
        let (last, earlier) = match chunks.split_last() {
            Some((last, earlier)) => (last.to_vec(), earlier),
            None => (Vec::new(), &[][..]),
        };
        for chunk in earlier {
            let update = CheckRunUpdate {
                output: Some(Output {
                    title: completion.output.title.clone(),
                    summary: completion.output.summary.clone(),
                    text: None,
                    annotations: chunk.to_vec(),
                }),
                ..Default::default()
            };
            self.update(repo, id, &update).await?;
        }
        let update = CheckRunUpdate {
            status: Some(Status::Completed),
            conclusion: Some(completion.conclusion),
            completed_at: Some(timestamp(SystemTime::now())),
            output: Some(Output {
                annotations: last,
                ..completion.output
            }),
            ..Default::default()
        };
        self.update(repo, id, &update).await
    }

    /// One call, retried per the policy; returns the response body.
    async fn send(
        &self,
        repo: &Repo,
        method: Method,
        url: &str,
        body: &impl Serialize,
        what: &str,
    ) -> Result<String, ChecksError> {
        let mut attempt = 0;
        let mut renewed_token = false;
        loop {
            let token: Token = self
                .app
                .token(repo.installation)
                .await
                .map_err(ChecksError::Token)?;
            let result = self
                .http
                .request(method.clone(), url)
                .header("accept", "application/vnd.github+json")
                .header("x-github-api-version", API_VERSION)
                .header("authorization", format!("token {}", token.0))
                .json(body)
                .send()
                .await;
            let response = match result {
                Ok(r) => r,
                Err(source) => {
                    if attempt + 1 >= self.policy.attempts {
                        return Err(ChecksError::Unreachable {
                            what: what.to_string(),
                            attempts: attempt + 1,
                            source,
                        });
                    }
                    let wait = self.policy.backoff(attempt);
                    tracing::warn!(error = %super::chain(&source), ?wait, "{what}: no answer; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                    continue;
                }
            };
            let status = response.status();
            let headers = response.headers().clone();
            let text = response.text().await.unwrap_or_default();
            if status == StatusCode::UNAUTHORIZED && !renewed_token {
                // The token was revoked or expired early: one more try with a new one.
                tracing::warn!("{what}: token refused; fetching a new one");
                self.app.forget(repo.installation, &token).await;
                renewed_token = true;
                continue;
            }
            match self.policy.verdict(status, &headers, attempt) {
                Verdict::Done => return Ok(text),
                Verdict::Retry(wait) => {
                    tracing::warn!(
                        status = status.as_u16(),
                        ?wait,
                        attempt = attempt + 1,
                        "{what}: GitHub asks to wait; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Verdict::Fail => {
                    return Err(ChecksError::Refused {
                        what: what.to_string(),
                        status: status.as_u16(),
                        body: crate::text::truncate(&text, 500).to_string(),
                    })
                }
            }
        }
    }
}
