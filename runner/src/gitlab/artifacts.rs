//! Job artifacts for GitLab: JUnit reports as `junit.xml.gz` (one gzip member per report,
//! concatenated, GitLab's `gzip` format) and archive artifacts as one zip, uploaded with
//! `POST /jobs/:id/artifacts` — following a 307, retrying 5xx, and giving up on 403/413.
//! [`upload_results`] decides what goes up after a run (by the artifacts' `when`). A failed
//! job's snapshot (`RUNNER_KEEP_FAILED`) goes into the archive zip as `failed-vm.tar.gz`:
//! GitLab keeps one archive per job, and the job's own `when` would leave a failure's out.

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
    zip_with(root, files, None)
}

/// The name of a failure snapshot in the archive zip.
pub const SNAPSHOT_ARCHIVE: &str = crate::snapshot_archive::ARCHIVE_NAME;

/// [`zip_files`] plus `extra`, a (name, bytes) entry stored as it is (already compressed).
fn zip_with(
    root: &Path,
    files: &[PathBuf],
    extra: Option<(&str, &[u8])>,
) -> Result<Vec<u8>, ArtifactError> {
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
    if let Some((name, data)) = extra {
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(data.len() as u64 >= u32::MAX as u64)
            .unix_permissions(0o600);
        zip.start_file(name, stored)
            .map_err(|e| ArtifactError::Pack(e.to_string()))?;
        zip.write_all(data)
            .map_err(|e| ArtifactError::Pack(e.to_string()))?;
    }
    let cursor = zip
        .finish()
        .map_err(|e| ArtifactError::Pack(e.to_string()))?;
    Ok(cursor.into_inner())
}

/// The failure snapshot in `dir` packed (`snapshot_archive::pack`), at most `cap` bytes:
/// it is held in memory until it goes up with the job's archive.
pub fn pack_snapshot(dir: &Path, cap: u64) -> Result<Vec<u8>, ArtifactError> {
    let capped = crate::snapshot_archive::Capped::new(Vec::new(), cap, "max_artifacts_size");
    crate::snapshot_archive::pack(dir, capped)
        .map(|c| c.inner)
        .map_err(|e| ArtifactError::Pack(format!("failure snapshot: {e}")))
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
    // The caches' (and untracked) files came back in the same archive: only the artifacts'
    // own go up.
    let mut archive_files = if prepared.caches.is_empty() && prepared.plan.untracked.is_none() {
        found.artifacts.clone()
    } else {
        super::prepare::select(
            &found.artifacts,
            &prepared.plan.out_dir,
            &prepared.archive_globs,
        )
    };
    if prepared.archive.as_ref().is_some_and(|a| a.untracked) {
        if let Some(size) = super::workspace::untracked_left_out(prepared) {
            say(&format!(
                "\x1b[33;1mWARNING: artifacts: the untracked files came to {}, over this runner's max_artifacts_size = {}; they are not uploaded\x1b[0;m\n",
                crate::serve::limits::size_text(size),
                crate::serve::limits::size_text(prepared.plan.max_artifacts)
            ));
        } else if prepared.plan.untracked.is_some() {
            for f in super::prepare::untracked(
                &found.artifacts,
                &prepared.plan.out_dir,
                &prepared.tracked,
            ) {
                if !archive_files.contains(&f) {
                    archive_files.push(f);
                }
            }
        }
    }
    let snapshot = snapshot_archive(prepared, say).await;
    let declared = prepared
        .archive
        .as_ref()
        .filter(|a| fits(a.when) && !archive_files.is_empty());
    if declared.is_some() || snapshot.is_some() {
        let files = if declared.is_some() {
            archive_files
        } else {
            Vec::new()
        };
        say(&format!(
            "Uploading artifacts ({} file(s){})\n",
            files.len(),
            if snapshot.is_some() {
                ", and the failed VM"
            } else {
                ""
            }
        ));
        let extra = snapshot.as_deref().map(|s| (SNAPSHOT_ARCHIVE, s));
        let result = match zip_with(&prepared.plan.out_dir, &files, extra) {
            Ok(data) => {
                let name = match prepared.archive.as_ref().filter(|a| !a.name.is_empty()) {
                    Some(a) => format!("{}.zip", a.name),
                    None => "artifacts.zip".to_string(),
                };
                let expire_in = prepared
                    .archive
                    .as_ref()
                    .map(|a| a.expire_in.as_str())
                    .unwrap_or("");
                upload(
                    &ectx.client,
                    job.id,
                    &job.token,
                    Upload {
                        file_name: &name,
                        data,
                        artifact_type: "archive",
                        artifact_format: "zip",
                        expire_in,
                    },
                )
                .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                say("Artifacts uploaded\n");
                if snapshot.is_some() {
                    say(&reproduce_lines(ectx.client.url(), job, prepared));
                }
            }
            Err(e) => {
                tracing::warn!("{e}");
                say(&format!("\x1b[33;1mWARNING: {e}\x1b[0;m\n"));
            }
        }
    } else if let Some(a) = &prepared.archive {
        if fits(a.when) {
            say("WARNING: no files matched the artifact paths\n");
        }
    }
}

/// The job's failure snapshot, packed, when it has one (`RUNNER_KEEP_FAILED` and a failed
/// step); a snapshot that cannot be packed is a warning in the log.
async fn snapshot_archive(prepared: &Prepared, say: &(dyn Fn(&str) + Sync)) -> Option<Vec<u8>> {
    let dir = prepared.plan.out_dir.join(crate::snapshot::DIR_NAME);
    if !prepared.plan.keep_failed || !dir.join(crate::snapshot::MANIFEST).is_file() {
        return None;
    }
    let cap = prepared.plan.max_artifacts;
    let started = std::time::Instant::now();
    let packed = tokio::task::spawn_blocking(move || pack_snapshot(&dir, cap))
        .await
        .unwrap_or_else(|e| Err(ArtifactError::Pack(e.to_string())));
    match packed {
        Ok(data) => {
            say(&format!(
                "Packed the failed VM: {:.1} MiB compressed in {:.1} s\n",
                data.len() as f64 / f64::from(1 << 20),
                started.elapsed().as_secs_f64()
            ));
            Some(data)
        }
        Err(e) => {
            tracing::warn!("{e}");
            say(&format!("\x1b[33;1mWARNING: {e}\x1b[0;m\n"));
            None
        }
    }
}

/// The end of a failed job's log when its VM was uploaded: the commands that resume it on
/// the reader's machine.
fn reproduce_lines(url: &str, job: &Job, prepared: &Prepared) -> String {
    let url = url.trim_end_matches('/');
    let fetch = [
        format!(
            "curl -fLo artifacts.zip -H \"PRIVATE-TOKEN: $GITLAB_TOKEN\" {url}/api/v4/projects/{}/jobs/{}/artifacts",
            job.job_info.project_id, job.id
        ),
        format!("unzip -o artifacts.zip {SNAPSHOT_ARCHIVE}"),
    ];
    let commands = crate::snapshot_archive::resume_commands(
        &fetch,
        SNAPSHOT_ARCHIVE,
        None,
        prepared.plan.id.arch,
        prepared.plan.image.as_str(),
    );
    let mut out = format!(
        "\x1b[36;1mReproduce this failure locally ({}, masked variables included):\x1b[0;m\n",
        crate::snapshot_archive::HOLDS_SECRETS
    );
    for line in commands {
        out.push_str(&format!("  {line}\n"));
    }
    out
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
    fn a_snapshot_packs_within_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("snapshot.toml"), "version = 1\n").unwrap();
        // A RAM file of 64 MiB, nearly all hole (stored as a sparse entry).
        let ram = std::fs::File::create(dir.path().join("ram.bin")).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&ram, b"guest", 1 << 20).unwrap();
        ram.set_len(64 << 20).unwrap();
        let packed = pack_snapshot(dir.path(), 16 << 20).unwrap();
        assert!(packed.len() < 1 << 20, "{} bytes", packed.len());
        // Past the cap: refused, not held in memory.
        let e = pack_snapshot(dir.path(), 64).unwrap_err().to_string();
        assert!(e.contains("larger than max_artifacts_size"), "{e}");
        // In the zip, next to the job's own artifacts.
        let z = zip_with(dir.path(), &[], Some((SNAPSHOT_ARCHIVE, &packed))).unwrap();
        let mut ar = zip::ZipArchive::new(std::io::Cursor::new(z)).unwrap();
        assert_eq!(
            ar.by_name(SNAPSHOT_ARCHIVE).unwrap().size(),
            packed.len() as u64
        );
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
