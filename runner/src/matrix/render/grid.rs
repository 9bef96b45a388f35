//! The grid every human-facing report draws: suites down, architectures (and images, when
//! there are several) across, and a one-line headline of the whole run.

use super::super::results::{Change, RunResults, Status};

/// Rows and columns of the grid, in the order cells were listed.
#[derive(Debug)]
pub struct Grid {
    pub suites: Vec<String>,
    /// (arch, image)
    pub columns: Vec<(String, String)>,
    /// Whether more than one image is in the matrix (then columns name it).
    pub many_images: bool,
}

impl Grid {
    pub fn of(results: &RunResults) -> Grid {
        let mut suites: Vec<String> = Vec::new();
        let mut columns: Vec<(String, String)> = Vec::new();
        for c in &results.cells {
            if !suites.contains(&c.suite) {
                suites.push(c.suite.clone());
            }
            let col = (c.arch.clone(), c.image.clone());
            if !columns.contains(&col) {
                columns.push(col);
            }
        }
        let first = columns.first().map(|c| c.1.clone());
        let many_images = columns.iter().any(|c| Some(&c.1) != first.as_ref());
        Grid {
            suites,
            columns,
            many_images,
        }
    }

    pub fn column_title(&self, col: &(String, String)) -> String {
        if self.many_images {
            format!("{} · {}", col.0, col.1)
        } else {
            col.0.clone()
        }
    }
}

/// "3 passed, 1 failed, 1 flaky · 1 new failure, 2 fixed" — the run in one line.
pub fn headline(results: &RunResults) -> String {
    let mut parts = Vec::new();
    for s in [
        Status::Passed,
        Status::Flaky,
        Status::Failed,
        Status::TimedOut,
        Status::Error,
        Status::Cancelled,
        Status::Skipped,
    ] {
        let n = results.cells.iter().filter(|c| c.status == s).count();
        if n > 0 {
            parts.push(format!("{n} {}", s.label()));
        }
    }
    let mut line = format!("{} cells: {}", results.cells.len(), parts.join(", "));
    let changes: Vec<String> = [Change::NewFailure, Change::Fixed]
        .into_iter()
        .map(|c| (c, results.count(c)))
        .filter(|(_, n)| *n > 0)
        .map(|(c, n)| c.count_text(n))
        .collect();
    if !changes.is_empty() {
        line.push_str(&format!(" · {}", changes.join(", ")));
    }
    if !results.run.complete {
        line.push_str(" · CANCELLED, partial results");
    }
    line
}
