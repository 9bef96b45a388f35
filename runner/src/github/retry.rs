//! When to try a GitHub API call again, and after how long. GitHub says how long to wait in
//! its headers (`Retry-After`; `x-ratelimit-remaining: 0` with `x-ratelimit-reset`), and we
//! honour them; without them server errors back off exponentially. Client errors other than
//! rate limits are final: sending the same request again would get the same answer.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::HeaderMap;
use reqwest::StatusCode;

/// How hard to try.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Attempts in all, the first one included.
    pub attempts: u32,
    /// First backoff; doubles per attempt.
    pub base: Duration,
    /// Longest backoff without a header saying otherwise.
    pub max_backoff: Duration,
    /// Longest wait any header may ask for (a primary rate limit resets within the hour).
    pub max_wait: Duration,
}

/// Final results must survive a GitHub hiccup of several minutes: 10 attempts span about
/// 6 minutes of backoff, more when GitHub asks for it.
pub const DEFAULT: Policy = Policy {
    attempts: 10,
    base: Duration::from_secs(1),
    max_backoff: Duration::from_secs(60),
    max_wait: Duration::from_secs(65 * 60),
};

/// What to do after a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Done,
    /// Try again after this long.
    Retry(Duration),
    /// Give up: retrying cannot help.
    Fail,
}

impl Policy {
    /// Backoff before attempt `attempt + 1` when nothing says how long to wait (jittered,
    /// see [`crate::backoff::nth`]).
    pub fn backoff(&self, attempt: u32) -> Duration {
        crate::backoff::nth(self.base, self.max_backoff, attempt)
    }

    /// Classifies a response to attempt number `attempt` (0-based).
    pub fn verdict(&self, status: StatusCode, headers: &HeaderMap, attempt: u32) -> Verdict {
        if status.is_success() {
            return Verdict::Done;
        }
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        let retry_after = header("retry-after")
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs);
        let exhausted = header("x-ratelimit-remaining") == Some("0");
        let reset_in = header("x-ratelimit-reset")
            .and_then(|v| v.parse::<u64>().ok())
            .map(|reset| {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                // One second more: the reset instant is rounded down.
                Duration::from_secs(reset.saturating_sub(now) + 1)
            });
        let rate_limited = status == StatusCode::TOO_MANY_REQUESTS
            || (status == StatusCode::FORBIDDEN && (exhausted || retry_after.is_some()));
        let retryable =
            rate_limited || status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT;
        if !retryable || attempt + 1 >= self.attempts {
            return Verdict::Fail;
        }
        let wait = match (retry_after, exhausted, reset_in) {
            (Some(d), _, _) => d,
            (None, true, Some(d)) => d,
            _ => self.backoff(attempt),
        };
        Verdict::Retry(wait.min(self.max_wait))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn verdicts() {
        let p = DEFAULT;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        // (status, headers, attempt, expected)
        let cases = [
            (201, vec![], 0, Verdict::Done),
            // Validation errors are final.
            (422, vec![], 0, Verdict::Fail),
            (404, vec![], 0, Verdict::Fail),
            // A plain 403 (missing permission) is final...
            (403, vec![], 0, Verdict::Fail),
            // ...a primary rate limit waits until the reset...
            (
                403,
                vec![
                    ("x-ratelimit-remaining", "0".to_string()),
                    ("x-ratelimit-reset", (now + 9).to_string()),
                ],
                0,
                Verdict::Retry(Duration::from_secs(10)),
            ),
            // ...a secondary one as long as Retry-After says.
            (
                403,
                vec![("retry-after", "3".to_string())],
                0,
                Verdict::Retry(Duration::from_secs(3)),
            ),
            (
                429,
                vec![("retry-after", "2".to_string())],
                4,
                Verdict::Retry(Duration::from_secs(2)),
            ),
            (503, vec![], 12, Verdict::Fail),
            // A reset far away is capped.
            (
                403,
                vec![
                    ("x-ratelimit-remaining", "0".to_string()),
                    ("x-ratelimit-reset", (now + 100_000).to_string()),
                ],
                0,
                Verdict::Retry(p.max_wait),
            ),
        ];
        for (status, hs, attempt, want) in cases {
            let got = p.verdict(
                StatusCode::from_u16(status).unwrap(),
                &headers(&hs),
                attempt,
            );
            assert_eq!(got, want, "{status} {hs:?} attempt {attempt}");
        }
    }

    #[test]
    fn server_errors_back_off_exponentially_with_jitter() {
        // (status, attempt, step: the wait is drawn from [step/2, step])
        let cases = [(502, 0, 1), (500, 3, 8), (503, 8, 60)];
        for (status, attempt, step) in cases {
            let step = Duration::from_secs(step);
            let got = DEFAULT.verdict(
                StatusCode::from_u16(status).unwrap(),
                &HeaderMap::new(),
                attempt,
            );
            assert!(
                matches!(got, Verdict::Retry(d) if d >= step / 2 && d <= step),
                "{status} attempt {attempt}: {got:?}"
            );
        }
    }
}
