//! The four outputs of a matrix run, all written from the same [`RunResults`]: `junit.xml`,
//! `results.json`, `summary.md` and `index.html`. Each is written to a temporary file and
//! renamed, so a reader never sees half a report (a cancelled run still gets all four).

pub mod grid;
pub mod html;
pub mod junit;
pub mod markdown;

use std::path::{Path, PathBuf};

use super::history::History;
use super::results::RunResults;

#[derive(Debug, thiserror::Error)]
#[error("cannot write the report {path}: {source}")]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Writes all four reports into `out`.
pub fn write_all(out: &Path, results: &RunResults, history: &History) -> Result<(), WriteError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WriteError { path, source }
    };
    std::fs::create_dir_all(out).map_err(err(out))?;
    let files: [(&str, String); 4] = [
        ("results.json", results.to_json()),
        ("junit.xml", junit::render(results)),
        ("summary.md", markdown::render(results)),
        ("index.html", html::render(results, history)),
    ];
    for (name, text) in files {
        let path = out.join(name);
        let tmp = out.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(err(&path))?;
    }
    Ok(())
}
