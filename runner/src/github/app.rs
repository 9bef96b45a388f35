//! Authenticating as the App: octocrab signs a JWT with the App's key (RS256, `iss` = App
//! id) and exchanges it for an installation token (`POST /app/installations/{id}/access_tokens`).
//! Tokens live an hour; each is cached per installation until [`REFRESH_MARGIN`] before it
//! expires, so a long test run never reports with a token that dies mid-request.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use octocrab::models::{AppId, InstallationToken};
use octocrab::service::middleware::retry::RetryConfig;
use octocrab::Octocrab;
use tokio::sync::Mutex;

use super::retry::{self, Verdict};

/// A cached token is replaced this long before it expires.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// Assumed lifetime when GitHub does not say (it does: one hour).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(60 * 60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// An installation token; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot use the App's private key")]
    Key(#[source] jsonwebtoken::errors::Error),
    #[error("cannot set up the GitHub client for {api_url}")]
    Client {
        api_url: String,
        #[source]
        source: octocrab::Error,
    },
    #[error("requesting a token for installation {installation} failed")]
    Request {
        installation: u64,
        #[source]
        source: octocrab::Error,
    },
    #[error("GitHub refused a token for installation {installation}: HTTP {status}: {body}")]
    Refused {
        installation: u64,
        status: u16,
        body: String,
    },
    #[error("GitHub's token response for installation {installation} is not JSON we understand")]
    Parse {
        installation: u64,
        #[source]
        source: serde_json::Error,
    },
}

struct Cached {
    token: Token,
    /// When to fetch a new one (expiry minus the margin).
    refresh_at: SystemTime,
}

/// The App's identity and its installation tokens.
pub struct App {
    crab: Octocrab,
    /// Per installation: its lock (one fetch at a time) and its cached token. The outer lock
    /// is held only to find the entry, so one installation's slow fetch (GitHub asking us to
    /// wait) never delays another's.
    tokens: std::sync::Mutex<HashMap<u64, Arc<Mutex<Option<Cached>>>>>,
    policy: retry::Policy,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("App(..)")
    }
}

impl App {
    /// `key_pem`: the App's RSA private key; `api_url`: GitHub's REST root.
    pub fn new(
        app_id: u64,
        key_pem: &[u8],
        api_url: &str,
        policy: retry::Policy,
    ) -> Result<App, AppError> {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(key_pem).map_err(AppError::Key)?;
        let client = |source| AppError::Client {
            api_url: api_url.to_string(),
            source,
        };
        let crab = Octocrab::builder()
            .base_uri(api_url)
            .map_err(client)?
            // Our own retry loop honours GitHub's rate-limit headers; octocrab's would retry
            // at once, and retrying twice over multiplies attempts.
            .add_retry_config(RetryConfig::None)
            .set_connect_timeout(Some(CONNECT_TIMEOUT))
            .set_read_timeout(Some(READ_TIMEOUT))
            .app(AppId(app_id), key)
            .build()
            .map_err(client)?;
        Ok(App {
            crab,
            tokens: std::sync::Mutex::new(HashMap::new()),
            policy,
        })
    }

    /// A token for `installation`, from the cache while it has more than
    /// [`REFRESH_MARGIN`] to live.
    pub async fn token(&self, installation: u64) -> Result<Token, AppError> {
        let entry = self.entry(installation);
        // Held over the fetch: concurrent jobs of one installation need one token, not one
        // each.
        let mut cached = entry.lock().await;
        if let Some(c) = cached.as_ref() {
            if SystemTime::now() < c.refresh_at {
                return Ok(c.token.clone());
            }
        }
        let (token, expires_at) = self.fetch(installation).await?;
        let refresh_at = expires_at
            .checked_sub(REFRESH_MARGIN)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        *cached = Some(Cached {
            token: token.clone(),
            refresh_at,
        });
        Ok(token)
    }

    fn entry(&self, installation: u64) -> Arc<Mutex<Option<Cached>>> {
        self.tokens
            .lock()
            .expect("token map lock")
            .entry(installation)
            .or_default()
            .clone()
    }

    /// Drops a token GitHub no longer accepts (revoked, or the installation's permissions
    /// changed), so that the next call fetches a new one.
    pub async fn forget(&self, installation: u64, token: &Token) {
        let entry = self.entry(installation);
        let mut cached = entry.lock().await;
        if cached.as_ref().is_some_and(|c| &c.token == token) {
            *cached = None;
        }
    }

    async fn fetch(&self, installation: u64) -> Result<(Token, SystemTime), AppError> {
        let route = format!("/app/installations/{installation}/access_tokens");
        let mut attempt = 0;
        loop {
            // The raw call: the typed one drops the headers that say how long to wait.
            let response = self
                .crab
                ._post(route.as_str(), None::<&()>)
                .await
                .map_err(|source| AppError::Request {
                    installation,
                    source,
                });
            let response = match response {
                Ok(r) => r,
                Err(e) if attempt + 1 < self.policy.attempts => {
                    let wait = self.policy.backoff(attempt);
                    tracing::warn!(installation, error = %super::chain(&e), ?wait, "token request failed; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let status = response.status();
            let headers = response.headers().clone();
            let body = self.crab.body_to_string(response).await.unwrap_or_default();
            match self.policy.verdict(status, &headers, attempt) {
                Verdict::Done => {
                    let t: InstallationToken =
                        serde_json::from_str(&body).map_err(|source| AppError::Parse {
                            installation,
                            source,
                        })?;
                    let expires_at = t
                        .expires_at
                        .as_deref()
                        .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
                        .unwrap_or_else(|| SystemTime::now() + DEFAULT_LIFETIME);
                    tracing::debug!(installation, "new installation token");
                    return Ok((Token(t.token), expires_at));
                }
                Verdict::Retry(wait) => {
                    tracing::warn!(
                        installation,
                        status = status.as_u16(),
                        ?wait,
                        "token request refused for now; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Verdict::Fail => {
                    return Err(AppError::Refused {
                        installation,
                        status: status.as_u16(),
                        body: crate::text::truncate(&body, 300).to_string(),
                    })
                }
            }
        }
    }
}
