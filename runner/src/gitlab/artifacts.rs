//! Job artifacts for GitLab: JUnit reports as `junit.xml.gz` (one gzip member per report,
//! concatenated, GitLab's `gzip` format) and archive artifacts as one zip, uploaded with
//! `POST /jobs/:id/artifacts` — following a 307, retrying 5xx, and giving up on 403/413.
//! [`upload_results`] decides what goes up after a run (by the artifacts' `when`).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::client::Client;
use super::entry::EntryContext;
use super::job::{Job, When};
use super::prepare::Prepared;
use super::reporter::Found;
use crate::backoff::Backoff;
use crate::outcome::Outcome;

/// Upload attempts through 5xx/transport errors.
const UPLOAD_ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("cannot pack artifacts: {0}")]
    Pack(String),
    #[error("GitLab refused the {kind} artifact ({status}): {body}")]
    Refused {
        kind: String,
        status: u16,
        body: String,
    },
    #[error("uploading the {kind} artifact failed: {message}")]
    Upload { kind: String, message: String },
}

/// GitLab's gzip artifact format: each file its own gzip member, members concatenated.
pub fn gzip_members<'a>(
    files: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<u8>, ArtifactError> {
    let mut out = Vec::new();
    for f in files {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(f)
            .map_err(|e| ArtifactError::Pack(e.to_string()))?;
        out.extend(
            enc.finish()
                .map_err(|e| ArtifactError::Pack(e.to_string()))?,
        );
    }
    Ok(out)
}

/// A zip of `files`, named by their path relative to `root`.
pub fn zip_files(root: &Path, files: &[PathBuf]) -> Result<Vec<u8>, ArtifactError> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .unix_permissions(0o644);
    for f in files {
        let name = f
            .strip_prefix(root)
            .unwrap_or(f)
            .to_string_lossy()
            .into_owned();
        let data =
            std::fs::read(f).map_err(|e| ArtifactError::Pack(format!("{}: {e}", f.display())))?;
        zip.start_file(name, options)
            .map_err(|e| ArtifactError::Pack(e.to_string()))?;
        zip.write_all(&data)
            .map_err(|e| ArtifactError::Pack(e.to_string()))?;
    }
    let cursor = zip
        .finish()
        .map_err(|e| ArtifactError::Pack(e.to_string()))?;
    Ok(cursor.into_inner())
}

/// What to upload.
#[derive(Debug)]
pub struct Upload<'a> {
    pub file_name: &'a str,
    pub data: Vec<u8>,
    pub artifact_type: &'a str,
    pub artifact_format: &'a str,
    pub expire_in: &'a str,
}

/// Uploads one artifact for job `id`.
pub async fn upload(
    client: &Client,
    id: u64,
    token: &str,
    up: Upload<'_>,
) -> Result<(), ArtifactError> {
    let mut location: Option<String> = None;
    let mut backoff = Backoff::default();
    let kind = up.artifact_type.to_string();
    for attempt in 1..=UPLOAD_ATTEMPTS {
        let reply = client
            .upload_artifact(
                location.as_deref(),
                id,
                token,
                up.file_name,
                up.data.clone(),
                up.artifact_type,
                up.artifact_format,
                up.expire_in,
            )
            .await;
        match reply {
            Ok(r) if r.status.as_u16() == 201 || r.status.as_u16() == 200 => return Ok(()),
            Ok(r) if r.status.as_u16() == 307 => {
                location = r.header("location").map(str::to_string);
                continue;
            }
            Ok(r) if r.is_transient() && attempt < UPLOAD_ATTEMPTS => {
                tokio::time::sleep(backoff.next(r.retry_after())).await;
            }
            Ok(r) => {
                return Err(ArtifactError::Refused {
                    kind,
                    status: r.status.as_u16(),
                    body: String::from_utf8_lossy(&r.body[..r.body.len().min(300)]).into_owned(),
                })
            }
            Err(e) if attempt < UPLOAD_ATTEMPTS => {
                tracing::warn!("artifact upload failed, retrying: {e}");
                tokio::time::sleep(backoff.next(None)).await;
            }
            Err(e) => {
                return Err(ArtifactError::Upload {
                    kind,
                    message: e.to_string(),
                })
            }
        }
    }
    Err(ArtifactError::Upload {
        kind,
        message: format!("no success after {UPLOAD_ATTEMPTS} attempts"),
    })
}

/// Uploads the JUnit report and the archive artifacts whose `when` fits the outcome.
pub async fn upload_results(
    ectx: &EntryContext,
    job: &Job,
    prepared: &Prepared,
    outcome: &Outcome,
    found: &Found,
    step_junit: &std::path::Path,
    say: &(dyn Fn(&str) + Sync),
) {
    let success = outcome.is_success();
    let fits = |w: When| match w {
        When::OnSuccess => success,
        When::OnFailure => !success,
        When::Always => true,
    };
    // JUnit: the guest's reports, or the runner's step report (which already merges them).
    let junit_when = prepared
        .junit
        .as_ref()
        .map(|a| a.when)
        .unwrap_or(When::Always);
    let mut xmls: Vec<Vec<u8>> = Vec::new();
    if prepared.step_junit {
        if let Ok(x) = std::fs::read(step_junit) {
            xmls.push(x);
        }
    } else {
        xmls.extend(found.reports.iter().map(|r| r.xml.clone().into_bytes()));
    }
    if !xmls.is_empty() && fits(junit_when) {
        say(&format!(
            "Uploading JUnit report ({} file(s))\n",
            xmls.len()
        ));
        let expire = prepared
            .junit
            .as_ref()
            .map(|a| a.expire_in.as_str())
            .unwrap_or("");
        let result = match gzip_members(xmls.iter().map(|x| x.as_slice())) {
            Ok(data) => {
                upload(
                    &ectx.client,
                    job.id,
                    &job.token,
                    Upload {
                        file_name: "junit.xml.gz",
                        data,
                        artifact_type: "junit",
                        artifact_format: "gzip",
                        expire_in: expire,
                    },
                )
                .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => say("JUnit report uploaded\n"),
            Err(e) => {
                tracing::warn!("{e}");
                say(&format!("\x1b[33;1mWARNING: {e}\x1b[0;m\n"));
            }
        }
    }
    // The caches' files came back in the same archive: only the artifacts' own go up.
    let archive_files = if prepared.caches.is_empty() {
        found.artifacts.clone()
    } else {
        super::prepare::select(
            &found.artifacts,
            &prepared.plan.out_dir,
            &prepared.archive_globs,
        )
    };
    if let Some(a) = &prepared.archive {
        if !archive_files.is_empty() && fits(a.when) {
            say(&format!(
                "Uploading artifacts ({} file(s))\n",
                archive_files.len()
            ));
            let result = match zip_files(&prepared.plan.out_dir, &archive_files) {
                Ok(data) => {
                    let name = if a.name.is_empty() {
                        "artifacts.zip".to_string()
                    } else {
                        format!("{}.zip", a.name)
                    };
                    upload(
                        &ectx.client,
                        job.id,
                        &job.token,
                        Upload {
                            file_name: &name,
                            data,
                            artifact_type: "archive",
                            artifact_format: "zip",
                            expire_in: &a.expire_in,
                        },
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => say("Artifacts uploaded\n"),
                Err(e) => {
                    tracing::warn!("{e}");
                    say(&format!("\x1b[33;1mWARNING: {e}\x1b[0;m\n"));
                }
            }
        } else if archive_files.is_empty() && fits(a.when) {
            say("WARNING: no files matched the artifact paths\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn gzip_members_concatenate() {
        let gz = gzip_members([&b"<a/>"[..], &b"<b/>"[..]]).unwrap();
        let mut out = String::new();
        flate2::read::MultiGzDecoder::new(&gz[..])
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "<a/><b/>");
    }

    #[test]
    fn zip_names_are_relative() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("logs/a.txt");
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, "hello").unwrap();
        let z = zip_files(dir.path(), &[f]).unwrap();
        let mut ar = zip::ZipArchive::new(std::io::Cursor::new(z)).unwrap();
        let mut s = String::new();
        ar.by_name("logs/a.txt")
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "hello");
    }
}
