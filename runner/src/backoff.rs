//! The one retry backoff of the services (GitLab polls, log and artifact uploads, GitHub API
//! calls): exponential with jitter, so that many jobs failing at once do not retry in step.
//! Each wait is drawn from [step/2, step]; the step starts at the floor it was built with,
//! doubles per retry up to a cap, and returns to that floor on success. A server's
//! `Retry-After` replaces a shorter draw.

use std::time::Duration;

/// gitlab-runner's defaults: 100 ms → 60 s.
pub const DEFAULT_MIN: Duration = Duration::from_millis(100);
pub const DEFAULT_MAX: Duration = Duration::from_secs(60);

/// A retry loop's backoff state.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(DEFAULT_MIN, DEFAULT_MAX)
    }
}

impl Backoff {
    /// Steps from `min` up to `max` (a `max` below `min` is taken as `min`).
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            step: min,
        }
    }

    /// The next wait (at least `retry_after` when the server gave one).
    pub fn next(&mut self, retry_after: Option<Duration>) -> Duration {
        let wait = jittered(self.step);
        self.step = self.step.saturating_mul(2).min(self.max);
        retry_after.map_or(wait, |r| r.max(wait))
    }

    /// After a success: back to the floor this backoff was built with.
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

/// The wait before retry `attempt` (0-based) of a loop that counts its attempts rather than
/// keeping a [`Backoff`]: the same draw as the `attempt`-th [`Backoff::next`].
pub fn nth(min: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(30)).unwrap_or(u32::MAX);
    jittered(min.saturating_mul(factor).min(max.max(min)))
}

/// A draw from [step/2, step].
fn jittered(step: Duration) -> Duration {
    let half = step / 2;
    half + half.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Every wait lies in [step/2, step] for the step expected at that point.
    fn assert_within(wait: Duration, step: Duration, what: &str) {
        assert!(
            wait >= step / 2 && wait <= step,
            "{what}: {wait:?} not in [{:?}, {step:?}]",
            step / 2
        );
    }

    #[test]
    fn grows_doubling_within_jitter_bounds_up_to_the_cap() {
        // Many runs, so that the jitter's extremes are exercised.
        for _ in 0..200 {
            let mut b = Backoff::new(300 * MS, 2000 * MS);
            // (expected step) for each successive retry
            let steps = [300, 600, 1200, 2000, 2000, 2000];
            for (i, step) in steps.into_iter().enumerate() {
                assert_within(b.next(None), step * MS, &format!("retry {i}"));
            }
        }
    }

    #[test]
    fn reset_returns_to_the_floor_it_was_built_with() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..5 {
            b.next(None);
        }
        b.reset();
        // Not the global 100 ms default: this backoff's own 1 s.
        for _ in 0..50 {
            let mut again = b.clone();
            assert_within(again.next(None), Duration::from_secs(1), "after reset");
        }
    }

    #[test]
    fn retry_after_wins_over_a_shorter_draw_only() {
        let mut b = Backoff::new(100 * MS, Duration::from_secs(1));
        assert_eq!(b.next(Some(Duration::from_secs(5))), Duration::from_secs(5));
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        assert!(b.next(Some(MS)) >= Duration::from_secs(5));
    }

    #[test]
    fn nth_matches_the_stateful_backoff_and_caps() {
        // (attempt, expected step) with floor 1 s and cap 60 s
        let cases = [(0, 1), (1, 2), (5, 32), (6, 60), (40, 60)];
        for (attempt, step) in cases {
            let wait = nth(Duration::from_secs(1), Duration::from_secs(60), attempt);
            assert_within(
                wait,
                Duration::from_secs(step),
                &format!("attempt {attempt}"),
            );
        }
    }
}
