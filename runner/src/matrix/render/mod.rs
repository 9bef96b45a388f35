//! The four outputs of a matrix run, all written from the same [`RunResults`]: `junit.xml`,
//! `results.json`, `summary.md` and `index.html`. Each is written to a temporary file and
//! renamed, so a reader never sees half a report (a cancelled run still gets all four).

pub mod grid;
pub mod html;
pub mod junit;
pub mod markdown;

use std::path::{Path, PathBuf};

use super::results::RunResults;

#[derive(Debug, thiserror::Error)]
#[error("cannot write the report {path}")]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Writes all four reports into `out`.
pub fn write_all(out: &Path, results: &RunResults) -> Result<(), WriteError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WriteError { path, source }
    };
    std::fs::create_dir_all(out).map_err(err(out))?;
    let files: [(&str, String); 4] = [
        ("results.json", results.to_json()),
        ("junit.xml", junit::render(results)),
        ("summary.md", markdown::render(results)),
        ("index.html", html::render(results)),
    ];
    for (name, text) in files {
        write_atomically(&out.join(name), &text)?;
    }
    Ok(())
}

/// Writes `path` through a temporary file beside it and a rename (its directory exists).
pub fn write_atomically(path: &Path, text: &str) -> Result<(), WriteError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            WriteError {
                path: path.to_path_buf(),
                source,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::results::{
        CellResult, Change, RunInfo, Status, TestKind, TestResult, SCHEMA,
    };

    fn results() -> RunResults {
        let test = |name: &str, status, change, message: Option<&str>| TestResult {
            name: name.into(),
            kind: TestKind::Test,
            status,
            duration_s: 0.5,
            attempts: 1,
            message: message.map(String::from),
            log_tail: Some("<script>alert(1)</script> tail".into()),
            change,
        };
        let cell = |suite: &str, arch: &str, status, tests| CellResult {
            key: format!("{suite}/{arch}/debian-13"),
            suite: suite.into(),
            arch: arch.into(),
            image: "debian-13".into(),
            status,
            outcome: "failed (exit 1)".into(),
            message: (status == Status::Error).then(|| "the guest never booted".into()),
            duration_s: 12.0,
            total_s: 12.0,
            attempts: 1,
            accelerator: "tcg".into(),
            qemu_version: "10.0.2".into(),
            kernel_version: "6.12".into(),
            tests,
            slowdown: None,
            trend_s: vec![10.0, 11.0],
        };
        RunResults {
            schema: SCHEMA.into(),
            version: 1,
            run: RunInfo {
                id: "abc".into(),
                started_at: "2026-11-28T02:00:00Z".into(),
                finished_at: "2026-11-28T02:10:00Z".into(),
                duration_s: 600.0,
                complete: true,
                runner_version: "0.1.0".into(),
                jobs: 2,
                retries: 1,
                fail_on: "regression".into(),
            },
            cells: vec![
                cell(
                    "unit",
                    "riscv64",
                    Status::Failed,
                    vec![test(
                        "calc.<adds>",
                        Status::Failed,
                        Some(Change::NewFailure),
                        Some("expected 4 | got 5"),
                    )],
                ),
                cell("unit", "aarch64", Status::Error, vec![]),
                // No "smoke" cell on aarch64: the grid shows a dash there.
                cell("smoke", "riscv64", Status::Passed, vec![]),
            ],
            comparison: None,
        }
    }

    /// [`results`] with every part of the page in use: a previous run, removed tests, a
    /// slowdown, attempts, and a test in each kind of change.
    fn rich_results() -> RunResults {
        let mut r = results();
        let extra = |name: &str, status, change, attempts| TestResult {
            name: name.into(),
            kind: TestKind::Test,
            status,
            duration_s: 1.0,
            attempts,
            message: Some("first line\nsecond line".into()),
            log_tail: None,
            change,
        };
        r.cells[0].tests.extend([
            extra("flaky.one", Status::Flaky, Some(Change::Flaky), 2),
            extra("old.fail", Status::Failed, Some(Change::StillFailing), 1),
            extra("fixed.now", Status::Passed, Some(Change::Fixed), 1),
            extra("brand.new", Status::Passed, Some(Change::NewTest), 1),
        ]);
        r.cells[0].attempts = 2;
        r.cells[0].total_s = 30.0;
        r.cells[0].slowdown = Some(crate::matrix::results::Slowdown {
            previous_s: 5.0,
            current_s: 12.0,
        });
        r.cells[2].accelerator = String::new();
        r.comparison = Some(crate::matrix::results::Comparison {
            previous_run: Some("prev-1".into()),
            previous_started_at: Some("2026-11-27T02:00:00Z".into()),
            counts: Default::default(),
            removed: vec![crate::matrix::results::RemovedTest {
                cell: "unit/riscv64/debian-13".into(),
                test: "gone.<test>".into(),
            }],
        });
        r
    }

    #[test]
    fn html_matches_its_snapshot() {
        // The page byte for byte, so that restructuring the renderer cannot change it unseen.
        // After an intended change: RUNNER_UPDATE_SNAPSHOT=1 cargo test -p runner html_matches
        let html = html::render(&rich_results());
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/matrix/render/testdata/index.html");
        if std::env::var_os("RUNNER_UPDATE_SNAPSHOT").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &html).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap();
        assert!(html == want, "index.html differs from {}", path.display());
    }

    #[test]
    fn markdown_has_the_grid_and_what_changed() {
        let md = markdown::render(&results());
        assert!(md.contains("| suite | riscv64 | aarch64 |"), "{md}");
        assert!(md.contains("| **smoke** | ✅ passed"), "{md}");
        assert!(md.contains(" — |"), "missing cell: {md}");
        assert!(md.contains("Regressions (new failures): 1"), "{md}");
        // A pipe in a message must not break the table or the list.
        assert!(md.contains("expected 4 \\| got 5"), "{md}");
        assert!(md.contains("Infrastructure errors"), "{md}");
        assert!(md.contains("the guest never booted"), "{md}");
    }

    #[test]
    fn html_escapes_what_the_guest_wrote() {
        let html = html::render(&results());
        assert!(!html.contains("<script>"), "guest text is escaped");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt; tail"));
        assert!(html.contains("calc.&lt;adds&gt;"));
        assert!(html.contains("data-cell=\"unit/aarch64/debian-13\" data-status=\"error\""));
        assert!(html.contains("<svg class=\"trend\""), "trend drawn");
        assert!(
            !html.contains("src=") && !html.contains("href=\"http"),
            "no external asset"
        );
    }

    #[test]
    fn html_lists_are_capped_when_a_whole_suite_breaks() {
        let mut r = results();
        let many: Vec<TestResult> = (0..500)
            .map(|i| TestResult {
                name: format!("t{i}"),
                kind: TestKind::Test,
                status: Status::Failed,
                duration_s: 0.0,
                attempts: 1,
                message: None,
                log_tail: None,
                change: Some(Change::NewFailure),
            })
            .collect();
        r.cells[0].tests = many;
        let html = html::render(&r);
        // The regressions list and the cell's details each show 200 of 500.
        assert_eq!(html.matches("and 300 more").count(), 2, "{html}");
        assert!(html.contains("<code>t199</code>") && !html.contains("<code>t200</code>"));
    }

    #[test]
    fn junit_has_one_testsuite_per_cell_with_facts() {
        let xml = junit::render(&results());
        let report = quick_junit::Report::deserialize_from_str(&xml).unwrap();
        let names: Vec<_> = report
            .test_suites
            .iter()
            .map(|s| s.name.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "unit (riscv64, debian-13)",
                "unit (aarch64, debian-13)",
                "smoke (riscv64, debian-13)"
            ]
        );
        assert!(
            xml.contains("name=\"qemu_version\" value=\"10.0.2\""),
            "{xml}"
        );
        assert_eq!(report.failures, 1);
    }

    #[test]
    fn writes_all_four_files() {
        let dir = tempfile::tempdir().unwrap();
        write_all(&dir.path().join("out"), &results()).unwrap();
        for f in ["results.json", "junit.xml", "summary.md", "index.html"] {
            assert!(dir.path().join("out").join(f).is_file(), "{f}");
        }
        let back = std::fs::read_to_string(dir.path().join("out/results.json")).unwrap();
        assert_eq!(RunResults::from_json(&back).unwrap(), results());
    }
}
