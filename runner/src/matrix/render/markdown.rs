//! `summary.md`: the grid with pass/fail/flaky counts and durations, then what changed —
//! regressions first. Plain GitHub-flavoured Markdown, fit for `$GITHUB_STEP_SUMMARY` or a
//! GitLab merge-request comment (both render tables and `<details>`).

use std::fmt::Write;

use super::super::results::{human_secs, CellResult, Change, RunResults, Status};
use super::grid::{headline, Grid};

/// Most tests listed per change section (the HTML and results.json have them all).
const MAX_LISTED: usize = 50;

pub fn icon(status: Status) -> &'static str {
    match status {
        Status::Passed => "✅",
        Status::Flaky => "⚠️",
        Status::Failed => "❌",
        Status::TimedOut => "⏱️",
        Status::Error => "💥",
        Status::Cancelled => "⏹️",
        Status::Skipped => "⏭️",
    }
}

/// "4/5 passed, 1 failed" style counts of a cell's tests.
pub fn counts_text(cell: &CellResult) -> String {
    let counts = cell.counts();
    let total: usize = counts.values().sum();
    let ok = counts.get(&Status::Passed).copied().unwrap_or(0);
    let mut text = format!("{ok}/{total} passed");
    for s in [
        Status::Flaky,
        Status::Failed,
        Status::TimedOut,
        Status::Error,
    ] {
        if let Some(n) = counts.get(&s) {
            let _ = write!(text, ", {n} {}", s.label());
        }
    }
    text
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

pub fn render(results: &RunResults) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## Nightly matrix: {}\n", headline(results));
    let _ = writeln!(
        md,
        "Run `{}` started {}, took {}; {}.\n",
        results.run.id,
        results.run.started_at,
        human_secs(results.run.duration_s),
        match results
            .comparison
            .as_ref()
            .and_then(|c| c.previous_run.as_ref())
        {
            Some(p) => format!("compared with run `{p}`"),
            None => "no previous run to compare with".into(),
        }
    );
    let grid = Grid::of(results);
    md.push_str("| suite |");
    for col in &grid.columns {
        let _ = write!(md, " {} |", grid.column_title(col));
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(grid.columns.len()));
    md.push('\n');
    for suite in &grid.suites {
        let _ = write!(md, "| **{}** |", md_escape(suite));
        for (arch, image) in &grid.columns {
            match results
                .cells
                .iter()
                .find(|c| &c.suite == suite && &c.arch == arch && &c.image == image)
            {
                Some(c) => {
                    let _ = write!(
                        md,
                        " {} {} · {} · {}{}{} |",
                        icon(c.status),
                        c.status.label(),
                        counts_text(c),
                        human_secs(c.duration_s),
                        if c.attempts > 1 {
                            format!(" · {} attempts", c.attempts)
                        } else {
                            String::new()
                        },
                        if c.slowdown.is_some() {
                            " · 🐢 slower"
                        } else {
                            ""
                        }
                    );
                }
                None => md.push_str(" — |"),
            }
        }
        md.push('\n');
    }
    md.push('\n');

    for (change, title) in [
        (Change::NewFailure, "🔴 Regressions (new failures)"),
        (Change::Fixed, "🟢 Fixed"),
        (Change::Flaky, "🟡 Flaky (failed, then passed on a re-run)"),
        (Change::StillFailing, "Still failing"),
        (Change::NewTest, "New tests"),
    ] {
        let list = results.changed(change);
        if list.is_empty() {
            continue;
        }
        let _ = writeln!(md, "### {title}: {}\n", list.len());
        for (cell, test) in list.iter().take(MAX_LISTED) {
            let _ = write!(md, "- `{}` — `{}`", cell.key, md_escape(&test.name));
            if let Some(m) = &test.message {
                let first = m.lines().next().unwrap_or_default();
                let _ = write!(md, ": {}", md_escape(first));
            }
            md.push('\n');
        }
        if list.len() > MAX_LISTED {
            let _ = writeln!(md, "- … and {} more", list.len() - MAX_LISTED);
        }
        md.push('\n');
    }
    if let Some(c) = &results.comparison {
        if !c.removed.is_empty() {
            let _ = writeln!(md, "### Removed tests: {}\n", c.removed.len());
            for r in c.removed.iter().take(MAX_LISTED) {
                let _ = writeln!(md, "- `{}` — `{}`", r.cell, md_escape(&r.test));
            }
            md.push('\n');
        }
    }
    let slow: Vec<&CellResult> = results
        .cells
        .iter()
        .filter(|c| c.slowdown.is_some())
        .collect();
    if !slow.is_empty() {
        let _ = writeln!(md, "### 🐢 Slowdowns: {}\n", slow.len());
        for c in slow {
            let s = c.slowdown.as_ref().expect("filtered");
            let _ = writeln!(
                md,
                "- `{}`: {} → {} (+{:.0}%)",
                c.key,
                human_secs(s.previous_s),
                human_secs(s.current_s),
                (s.current_s / s.previous_s.max(0.001) - 1.0) * 100.0
            );
        }
        md.push('\n');
    }
    let errors: Vec<&CellResult> = results
        .cells
        .iter()
        .filter(|c| c.status == Status::Error)
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(md, "### 💥 Infrastructure errors\n");
        for c in errors {
            let first = c.message.as_deref().unwrap_or(&c.outcome);
            let _ = writeln!(
                md,
                "- `{}`: {}",
                c.key,
                md_escape(first.lines().next().unwrap_or_default())
            );
        }
        md.push('\n');
    }
    md
}
