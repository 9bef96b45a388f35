//! The Checks API's wire types: what a check run's create and update requests carry, GitHub's
//! limits on them, and the small pure helpers (timestamps, annotation batches) over them. A
//! leaf: no other module of `github` is used here.

use std::time::SystemTime;

use serde::Serialize;

/// GitHub's limit on annotations in one create or update request.
pub const MAX_ANNOTATIONS_PER_REQUEST: usize = 50;
/// GitHub's limit on `output.summary` and `output.text`, in characters.
pub const MAX_OUTPUT_CHARS: usize = 65_535;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    InProgress,
    Completed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Conclusion {
    Success,
    Failure,
    Neutral,
    Cancelled,
    TimedOut,
    Skipped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Notice,
    Warning,
    Failure,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Annotation {
    pub path: String,
    pub start_line: u32,
    pub end_line: u32,
    pub annotation_level: Level,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_details: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Output {
    pub title: String,
    pub summary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub annotations: Vec<Annotation>,
}

/// The body of `POST /repos/{owner}/{repo}/check-runs`.
#[derive(Debug, Clone, Serialize)]
pub struct NewCheckRun {
    pub name: String,
    pub head_sha: String,
    pub status: Status,
    pub external_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conclusion: Option<Conclusion>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Output>,
}

/// The body of `PATCH /repos/{owner}/{repo}/check-runs/{id}`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckRunUpdate {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conclusion: Option<Conclusion>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Output>,
}

/// How a check run ends.
#[derive(Debug, Clone)]
pub struct Completion {
    pub conclusion: Conclusion,
    /// Annotations go out in batches; `output.annotations` is ignored.
    pub output: Output,
    pub annotations: Vec<Annotation>,
}

/// The repository a check run belongs to, and the installation that may write to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repo {
    pub installation: u64,
    pub owner: String,
    pub name: String,
}

/// ISO 8601 UTC timestamp with seconds, as the Checks API wants it.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Splits annotations into request-sized batches (none when there are none).
pub fn batches(annotations: &[Annotation]) -> impl Iterator<Item = &[Annotation]> {
    annotations.chunks(MAX_ANNOTATIONS_PER_REQUEST)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotation(i: usize) -> Annotation {
        Annotation {
            path: "runner.toml".into(),
            start_line: 1,
            end_line: 1,
            annotation_level: Level::Failure,
            message: format!("test {i} failed"),
            title: None,
            raw_details: None,
        }
    }

    #[test]
    fn annotations_go_in_batches_of_fifty() {
        // (annotations, expected batch sizes)
        let cases: [(usize, &[usize]); 5] = [
            (0, &[]),
            (1, &[1]),
            (50, &[50]),
            (51, &[50, 1]),
            (130, &[50, 50, 30]),
        ];
        for (n, want) in cases {
            let all: Vec<_> = (0..n).map(annotation).collect();
            let sizes: Vec<_> = batches(&all).map(|b| b.len()).collect();
            assert_eq!(sizes, want, "{n} annotations");
            // Nothing lost, nothing repeated, order kept.
            let rejoined: Vec<_> = batches(&all).flatten().cloned().collect();
            assert_eq!(rejoined, all);
        }
    }

    #[test]
    fn wire_format() {
        let update = CheckRunUpdate {
            status: Some(Status::InProgress),
            started_at: Some(timestamp(SystemTime::UNIX_EPOCH)),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&update).unwrap(),
            serde_json::json!({"status": "in_progress", "started_at": "1970-01-01T00:00:00Z"})
        );
        let c = serde_json::to_value(Conclusion::TimedOut).unwrap();
        assert_eq!(c, "timed_out");
    }
}
