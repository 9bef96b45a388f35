//! The one classification of how a step, suite or run ended. It alone decides the JUnit
//! failure-vs-error split, the exit code GitLab's failure_reason and GitHub's
//! conclusion. Nothing the guest prints can turn into an infrastructure error.
//! The helpers at the end turn engine errors into outcomes, for every front end alike.

use std::fmt;

use engine::vm::VmError;

use crate::exit;

/// Which part of the infrastructure failed (for the exit code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InfraKind {
    Config,
    Host,
    Image,
    Boot,
    Agent,
    Io,
}

/// How something ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    /// The test itself failed: a non-zero exit or death by signal inside the guest.
    Failed {
        exit_code: Option<i32>,
        signal: Option<i32>,
    },
    TimedOut,
    /// Not the test's fault: boot failed, the agent broke, the host could not do its part.
    InfraError {
        kind: InfraKind,
        message: String,
    },
    Cancelled,
    /// Not run because an earlier step made it impossible (VM gone) or the run was cancelled.
    Skipped,
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Passed | Outcome::Skipped)
    }

    /// Severity for combining outcomes: the worst one describes the whole.
    fn rank(&self) -> u8 {
        match self {
            Outcome::Passed => 0,
            Outcome::Skipped => 1,
            Outcome::Failed { .. } => 2,
            Outcome::TimedOut => 3,
            Outcome::InfraError { .. } => 4,
            Outcome::Cancelled => 5,
        }
    }

    /// The outcome of a whole made of `parts`.
    pub fn combine<'a>(parts: impl IntoIterator<Item = &'a Outcome>) -> Outcome {
        parts
            .into_iter()
            .max_by_key(|o| o.rank())
            .cloned()
            .unwrap_or(Outcome::Passed)
    }

    /// The process exit code for a run that ended like this.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Passed | Outcome::Skipped => exit::SUCCESS,
            Outcome::Failed { .. } => exit::TEST_FAILED,
            Outcome::TimedOut => exit::TIMED_OUT,
            Outcome::Cancelled => exit::CANCELLED,
            Outcome::InfraError { kind, .. } => kind.exit_code(),
        }
    }

    /// Short label for summaries.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Failed { .. } => "failed",
            Outcome::TimedOut => "timed out",
            Outcome::InfraError { .. } => "error",
            Outcome::Cancelled => "cancelled",
            Outcome::Skipped => "skipped",
        }
    }
}

impl InfraKind {
    pub fn exit_code(self) -> i32 {
        match self {
            InfraKind::Config => exit::CONFIG,
            InfraKind::Host => exit::HOST,
            InfraKind::Image => exit::IMAGE,
            InfraKind::Boot => exit::BOOT,
            InfraKind::Agent => exit::AGENT,
            InfraKind::Io => exit::IO,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Failed {
                exit_code: Some(c), ..
            } => write!(f, "failed (exit {c})"),
            Outcome::Failed {
                signal: Some(s), ..
            } => write!(f, "failed (killed by signal {s})"),
            Outcome::InfraError { message, .. } => write!(f, "error: {message}"),
            other => f.write_str(other.label()),
        }
    }
}

/// An infrastructure outcome of `kind` with `message`.
pub fn infra(kind: InfraKind, message: impl Into<String>) -> Outcome {
    Outcome::InfraError {
        kind,
        message: message.into(),
    }
}

/// The whole error chain of `e` on one line (each cause once).
pub fn chain(e: &dyn std::error::Error) -> String {
    engine::image::build::error_chain(e)
}

/// Classifies a VM failure. Boot problems are `Boot`; anything after boot is `Agent`.
pub fn vm_error(e: &VmError, booted: bool) -> Outcome {
    let kind = match e {
        VmError::Dir { .. } => InfraKind::Io,
        VmError::Spawn { .. } | VmError::Overlay(_) => InfraKind::Host,
        _ if !booted => InfraKind::Boot,
        _ => InfraKind::Agent,
    };
    infra(kind, chain(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_per_outcome() {
        // (outcome, exit code)
        let cases = [
            (Outcome::Passed, 0),
            (
                Outcome::Failed {
                    exit_code: Some(3),
                    signal: None,
                },
                1,
            ),
            (Outcome::TimedOut, 124),
            (Outcome::Cancelled, 130),
            (
                Outcome::InfraError {
                    kind: InfraKind::Boot,
                    message: "x".into(),
                },
                70,
            ),
            (
                Outcome::InfraError {
                    kind: InfraKind::Image,
                    message: "x".into(),
                },
                65,
            ),
        ];
        for (o, code) in cases {
            assert_eq!(o.exit_code(), code, "{o}");
        }
    }

    #[test]
    fn the_worst_part_describes_the_whole() {
        let failed = Outcome::Failed {
            exit_code: Some(1),
            signal: None,
        };
        assert_eq!(
            Outcome::combine(&[Outcome::Passed, failed.clone(), Outcome::Skipped]),
            failed
        );
        assert_eq!(
            Outcome::combine(&[failed, Outcome::TimedOut]),
            Outcome::TimedOut
        );
        assert_eq!(Outcome::combine(&[]), Outcome::Passed);
    }

    #[test]
    fn signals_are_failures_not_passes() {
        let o = Outcome::Failed {
            exit_code: None,
            signal: Some(9),
        };
        assert!(!o.is_success());
        assert_eq!(o.to_string(), "failed (killed by signal 9)");
    }
}
