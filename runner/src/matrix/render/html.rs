//! `index.html`: one self-contained page — inline CSS, inline SVG, no script, no external
//! asset, no server. The coloured grid links each cell to its details below (failing tests
//! with message and log tail, opened by default when something failed); regressions and
//! fixes get their own highlighted lists; each cell draws its duration across the kept
//! history as a small line.

use std::fmt::Write;

use super::super::results::{human_secs, CellResult, Change, RunResults, Status, TestResult};
use super::grid::{headline, Grid};
use super::markdown::counts_text;

/// Runs drawn in a cell's duration trend (this one included).
const TREND_POINTS: usize = 20;
/// Most entries per list and failing tests per cell shown (a page that stays usable when
/// a whole suite breaks; results.json has them all).
const MAX_SHOWN: usize = 200;

/// "… and N more" when a list was cut at [`MAX_SHOWN`].
fn more(total: usize, tag: &str) -> String {
    if total > MAX_SHOWN {
        format!(
            "<{tag} class=\"more\">… and {} more (all of them are in results.json)</{tag}>",
            total - MAX_SHOWN
        )
    } else {
        String::new()
    }
}

/// Text made safe for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters the guest may print are not allowed in HTML text.
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

fn class(status: Status) -> &'static str {
    match status {
        Status::Passed => "passed",
        Status::Flaky => "flaky",
        Status::Failed => "failed",
        Status::TimedOut => "timed-out",
        Status::Error => "error",
        Status::Cancelled => "cancelled",
        Status::Skipped => "skipped",
    }
}

fn change_class(c: Change) -> &'static str {
    match c {
        Change::NewFailure => "new-failure",
        Change::Fixed => "fixed",
        Change::StillFailing => "still-failing",
        Change::Flaky => "flaky",
        Change::NewTest => "new-test",
        Change::Removed => "removed",
    }
}

/// An anchor id for a cell (keys contain '/').
fn anchor(cell: &CellResult) -> String {
    let safe: String = cell
        .key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("cell-{safe}")
}

/// The cell's status, with the last attempt's outcome when it says more ("failed (exit
/// 2)"), or what the last attempt did when the cell is flaky.
pub fn status_text(c: &CellResult) -> String {
    if c.status == Status::Flaky {
        format!("flaky (passed on attempt {})", c.attempts)
    } else if c.outcome != c.status.label() && c.status != Status::Error {
        c.outcome.clone()
    } else {
        c.status.label().to_string()
    }
}

/// A sparkline of `points` (seconds) as inline SVG; the last point is this run.
fn sparkline(points: &[f64]) -> String {
    if points.len() < 2 {
        return String::new();
    }
    let (w, h) = (120.0, 24.0);
    let max = points.iter().cloned().fold(f64::MIN, f64::max).max(0.001);
    let step = w / (points.len() - 1) as f64;
    let coords: Vec<String> = points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            format!(
                "{:.1},{:.1}",
                i as f64 * step,
                h - 2.0 - (p / max) * (h - 4.0)
            )
        })
        .collect();
    let last = coords.last().cloned().unwrap_or_default();
    let (lx, ly) = last.split_once(',').unwrap_or(("0", "0"));
    let title: Vec<String> = points.iter().map(|p| human_secs(*p)).collect();
    format!(
        "<svg class=\"trend\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\"><title>duration per run: {}</title><polyline fill=\"none\" stroke=\"currentColor\" stroke-width=\"1.5\" points=\"{}\"/><circle cx=\"{lx}\" cy=\"{ly}\" r=\"2.5\" fill=\"currentColor\"/></svg>",
        esc(&title.join(" → ")),
        coords.join(" ")
    )
}

const STYLE: &str = r#"
:root { font-family: system-ui, sans-serif; color: #1b1f23; background: #fafbfc; }
body { margin: 1.5rem auto; max-width: 75rem; padding: 0 1rem; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.meta { color: #586069; }
table.grid { border-collapse: separate; border-spacing: 4px; }
.grid th { text-align: left; padding: .3rem .5rem; }
.grid td { border-radius: 6px; padding: 0; min-width: 11rem; vertical-align: top; }
.grid td a { display: block; padding: .45rem .6rem; color: inherit; text-decoration: none; }
.grid td.none { background: #eee; color: #999; padding: .45rem .6rem; }
.status { font-weight: 600; text-transform: uppercase; font-size: .8rem; letter-spacing: .03em; }
.small { font-size: .8rem; }
.passed { background: #d4f5dc; } .flaky { background: #fff1b8; }
.failed { background: #ffd2d2; } .timed-out { background: #ffd9b3; }
.error { background: #e6ccff; } .cancelled, .skipped { background: #e1e4e8; }
.badge { display: inline-block; border-radius: 3px; padding: 0 .35rem; font-size: .75rem; font-weight: 600; margin-left: .3rem; }
.badge.new-failure { background: #d73a49; color: white; } .badge.fixed { background: #28a745; color: white; }
.badge.flaky { background: #f9c513; } .badge.still-failing { background: #959da5; color: white; }
.badge.new-test { background: #0366d6; color: white; } .badge.slow { background: #6f42c1; color: white; }
ul.changes li { margin: .2rem 0; }
section.changes-regressions { border-left: 4px solid #d73a49; padding-left: .8rem; }
section.changes-fixes { border-left: 4px solid #28a745; padding-left: .8rem; }
details.cell { margin: .6rem 0; border: 1px solid #d1d5da; border-radius: 6px; background: white; }
details.cell > summary { padding: .5rem .7rem; cursor: pointer; border-radius: 6px; }
details.cell .body { padding: .3rem .9rem .8rem; }
.test { margin: .6rem 0; }
.test .name { font-family: ui-monospace, monospace; font-weight: 600; }
.test .message { color: #b31d28; margin: .2rem 0; white-space: pre-wrap; }
pre.log { background: #24292e; color: #e1e4e8; padding: .6rem; border-radius: 4px; overflow-x: auto; max-height: 24rem; font-size: .78rem; }
svg.trend { vertical-align: middle; color: #586069; }
code { font-family: ui-monospace, monospace; }
"#;

/// The whole page: header, grid, what changed, then each cell's details.
pub fn render(results: &RunResults) -> String {
    let mut h = String::new();
    page_head(&mut h, results);
    grid(&mut h, results);
    changes(&mut h, results);
    removed(&mut h, results);
    h.push_str("<h2>Cells</h2>\n");
    for c in &results.cells {
        cell_details(&mut h, c);
    }
    h.push_str("</body></html>\n");
    h
}

/// The document head, the headline and the line about the run.
fn page_head(h: &mut String, results: &RunResults) {
    let title = format!("Nightly matrix: {}", headline(results));
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{}</title><style>{STYLE}</style></head><body>\n",
        esc(&title)
    );
    let _ = writeln!(h, "<h1 id=\"headline\">{}</h1>", esc(&title));
    let _ = writeln!(
        h,
        "<p class=\"meta\">Run <code>{}</code>, started {}, took {}, runner {}; {}.</p>",
        esc(&results.run.id),
        esc(&results.run.started_at),
        human_secs(results.run.duration_s),
        esc(&results.run.runner_version),
        match results
            .comparison
            .as_ref()
            .and_then(|c| c.previous_run.as_ref())
        {
            Some(p) => format!("compared with run <code>{}</code>", esc(p)),
            None => "no previous run to compare with".into(),
        }
    );
}

/// The suite × (arch, image) table; a dash where a suite does not run.
fn grid(h: &mut String, results: &RunResults) {
    let grid = Grid::of(results);
    h.push_str("<table class=\"grid\" id=\"grid\"><thead><tr><th>suite</th>");
    for col in &grid.columns {
        let _ = write!(h, "<th>{}</th>", esc(&grid.column_title(col)));
    }
    h.push_str("</tr></thead><tbody>\n");
    for suite in &grid.suites {
        let _ = write!(h, "<tr><th>{}</th>", esc(suite));
        for (arch, image) in &grid.columns {
            match results
                .cells
                .iter()
                .find(|c| &c.suite == suite && &c.arch == arch && &c.image == image)
            {
                Some(c) => grid_cell(h, c),
                None => h.push_str("<td class=\"none\">—</td>"),
            }
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</tbody></table>\n");
}

/// One grid cell: status, badges for changes, counts, duration and the trend line.
fn grid_cell(h: &mut String, c: &CellResult) {
    let count = |change| c.tests.iter().filter(|t| t.change == Some(change)).count();
    let (news, fixed) = (count(Change::NewFailure), count(Change::Fixed));
    let mut trend = c.trend_s.clone();
    if c.completed() {
        trend.push(c.duration_s);
    }
    let skip = trend.len().saturating_sub(TREND_POINTS);
    let _ = write!(
        h,
        "<td class=\"cell {cls}\" data-cell=\"{key}\" data-status=\"{cls}\"><a href=\"#{anchor}\"><span class=\"status\">{label}</span>{new}{fix}{slow}<br><span class=\"small\">{counts} · {dur}{att}</span><br>{spark}</a></td>",
        cls = class(c.status),
        key = esc(&c.key),
        anchor = anchor(c),
        label = c.status.label(),
        new = if news > 0 {
            format!("<span class=\"badge new-failure\">{news} new</span>")
        } else {
            String::new()
        },
        fix = if fixed > 0 {
            format!("<span class=\"badge fixed\">{fixed} fixed</span>")
        } else {
            String::new()
        },
        slow = if c.slowdown.is_some() {
            "<span class=\"badge slow\">slower</span>"
        } else {
            ""
        },
        counts = esc(&counts_text(c)),
        dur = human_secs(c.duration_s),
        att = if c.attempts > 1 {
            format!(" · {} attempts", c.attempts)
        } else {
            String::new()
        },
        spark = sparkline(&trend[skip..]),
    );
}

/// A section per kind of change that has any tests, each list capped at [`MAX_SHOWN`].
fn changes(h: &mut String, results: &RunResults) {
    for (change, section, title) in [
        (
            Change::NewFailure,
            "regressions",
            "Regressions (new failures)",
        ),
        (Change::Fixed, "fixes", "Fixed"),
        (
            Change::Flaky,
            "flaky",
            "Flaky (failed, then passed on a re-run)",
        ),
        (Change::StillFailing, "still-failing", "Still failing"),
        (Change::NewTest, "new-tests", "New tests"),
    ] {
        let list = results.changed(change);
        if list.is_empty() {
            continue;
        }
        let _ = writeln!(
            h,
            "<section class=\"changes-{section}\" id=\"{section}\"><h2>{title}: {}</h2><ul class=\"changes\">",
            list.len()
        );
        let total = list.len();
        for (cell, test) in list.into_iter().take(MAX_SHOWN) {
            let _ = writeln!(
                h,
                "<li><a href=\"#{}\"><code>{}</code></a> — <code>{}</code>{}</li>",
                anchor(cell),
                esc(&cell.key),
                esc(&test.name),
                test.message
                    .as_deref()
                    .and_then(|m| m.lines().next())
                    .map(|m| format!(": {}", esc(m)))
                    .unwrap_or_default()
            );
        }
        h.push_str(&more(total, "li"));
        h.push_str("</ul></section>\n");
    }
}

/// Tests the previous run had and this one does not, if any.
fn removed(h: &mut String, results: &RunResults) {
    let Some(c) = results
        .comparison
        .as_ref()
        .filter(|c| !c.removed.is_empty())
    else {
        return;
    };
    let _ = writeln!(
        h,
        "<section id=\"removed\"><h2>Removed tests: {}</h2><ul class=\"changes\">",
        c.removed.len()
    );
    for r in c.removed.iter().take(MAX_SHOWN) {
        let _ = writeln!(
            h,
            "<li><code>{}</code> — <code>{}</code></li>",
            esc(&r.cell),
            esc(&r.test)
        );
    }
    h.push_str(&more(c.removed.len(), "li"));
    h.push_str("</ul></section>\n");
}

/// A cell's collapsible details, open when something failed: its facts and failing tests.
fn cell_details(h: &mut String, c: &CellResult) {
    let failing: Vec<_> = c
        .tests
        .iter()
        .filter(|t| t.status.is_failing() || t.status == Status::Flaky)
        .collect();
    let open = if failing.is_empty() && c.message.is_none() {
        ""
    } else {
        " open"
    };
    let _ = write!(
        h,
        "<details class=\"cell\" id=\"{}\"{open}><summary class=\"{}\"><strong>{}</strong> — {} · {} · {}",
        anchor(c),
        class(c.status),
        esc(&c.key),
        esc(&status_text(c)),
        esc(&counts_text(c)),
        human_secs(c.duration_s),
    );
    if c.attempts > 1 {
        let _ = write!(
            h,
            " · {} attempts ({} in all)",
            c.attempts,
            human_secs(c.total_s)
        );
    }
    if let Some(s) = &c.slowdown {
        let _ = write!(
            h,
            " <span class=\"badge slow\">slower: {} → {}</span>",
            human_secs(s.previous_s),
            human_secs(s.current_s)
        );
    }
    h.push_str("</summary><div class=\"body\">");
    let _ = write!(
        h,
        "<p class=\"small meta\">{} · QEMU {} · kernel {}</p>",
        esc(if c.accelerator.is_empty() {
            "no VM"
        } else {
            &c.accelerator
        }),
        esc(&c.qemu_version),
        esc(&c.kernel_version)
    );
    if let Some(m) = &c.message {
        let _ = write!(h, "<pre class=\"log\">{}</pre>", esc(m));
    }
    if failing.is_empty() {
        h.push_str("<p>No failing tests.</p>");
    }
    let total = failing.len();
    for t in failing.into_iter().take(MAX_SHOWN) {
        failing_test(h, t);
    }
    h.push_str(&more(total, "p"));
    h.push_str("</div></details>\n");
}

/// One failing (or flaky) test in a cell's details: name, status, change, message, log tail.
fn failing_test(h: &mut String, t: &TestResult) {
    let _ = write!(
        h,
        "<div class=\"test {}\"><span class=\"name\">{}</span> <span class=\"status\">{}</span>{}{}",
        class(t.status),
        esc(&t.name),
        t.status.label(),
        t.change
            .map(|ch| format!(
                "<span class=\"badge {}\">{}</span>",
                change_class(ch),
                ch.label()
            ))
            .unwrap_or_default(),
        if t.attempts > 1 {
            format!(" <span class=\"small\">({} attempts)</span>", t.attempts)
        } else {
            String::new()
        }
    );
    if let Some(m) = &t.message {
        let _ = write!(h, "<div class=\"message\">{}</div>", esc(m));
    }
    if let Some(l) = &t.log_tail {
        let _ = write!(h, "<pre class=\"log\">{}</pre>", esc(l));
    }
    h.push_str("</div>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_guest_text() {
        assert_eq!(
            esc("<a href=\"x\">&'\u{1b}"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;\u{FFFD}"
        );
    }

    #[test]
    fn sparkline_needs_two_points() {
        assert!(sparkline(&[1.0]).is_empty());
        let s = sparkline(&[1.0, 2.0, 4.0]);
        assert!(s.starts_with("<svg") && s.contains("polyline"), "{s}");
    }
}
