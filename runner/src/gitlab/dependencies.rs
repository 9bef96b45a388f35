//! Artifacts of earlier jobs (`dependencies:`/`needs:` in `.gitlab-ci.yml`): each dependency
//! with an `artifacts_file` is downloaded as gitlab-runner does — `GET /jobs/:id/artifacts`
//! with that job's token in `JOB-TOKEN` — following redirects, retrying 5xx and transport
//! errors with [`Backoff`] a bounded number of times, at most `max_dependencies_size` bytes
//! in all, and unpacked ([`super::unzip`]) into the job's workspace on the host before it is
//! packed for the guest. 404 and 403 fail the job at once, naming the dependency.

use std::path::Path;

use reqwest::Url;

use super::client::{Client, ClientError};
use super::job::Dependency;
use super::unzip::{self, UnzipError};
use crate::backoff::Backoff;
use crate::serve::limits::size_text;

/// Download attempts through 5xx and transport errors (as for uploads).
pub const DOWNLOAD_ATTEMPTS: usize = 5;
/// Redirects followed for one download (GitLab sends one, to object storage, at most).
const MAX_REDIRECTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum DependencyError {
    #[error("the artifacts of dependency '{name}' (job {id}) are not found (404): they may have expired or been erased; run job '{name}' again, or keep its artifacts longer (artifacts:expire_in)")]
    NotFound { name: String, id: u64 },
    #[error("GitLab refused the artifacts of dependency '{name}' (job {id}) (403): this job's token may not read them")]
    Forbidden { name: String, id: u64 },
    #[error("downloading the artifacts of dependency '{name}' (job {id}) failed: GitLab answered {status}")]
    Refused { name: String, id: u64, status: u16 },
    #[error("downloading the artifacts of dependency '{name}' (job {id}) failed {DOWNLOAD_ATTEMPTS} times")]
    Unreachable {
        name: String,
        id: u64,
        #[source]
        source: ClientError,
    },
    #[error("downloading the artifacts of dependency '{name}' (job {id}) failed: {status} replies {DOWNLOAD_ATTEMPTS} times")]
    Unavailable { name: String, id: u64, status: u16 },
    #[error("downloading the artifacts of dependency '{name}' (job {id}) failed: {what}")]
    Redirect { name: String, id: u64, what: String },
    #[error("the artifacts of dependency '{name}' (job {id}) take the job's downloads over this runner's limit max_dependencies_size = {cap}; depend on fewer jobs (dependencies:) or smaller artifacts, or ask the runner's operator to raise the limit")]
    TooLarge { name: String, id: u64, cap: String },
    #[error("cannot keep the artifacts of dependency '{name}' on the host")]
    Save {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the artifacts of dependency '{name}' (job {id}) cannot be unpacked")]
    Unpack {
        name: String,
        id: u64,
        #[source]
        source: UnzipError,
    },
}

impl DependencyError {
    /// Whether the job's own input is at fault (GitLab's `script_failure`) rather than
    /// GitLab or this host (`runner_system_failure`).
    pub fn is_job_fault(&self) -> bool {
        !matches!(
            self,
            DependencyError::Unreachable { .. }
                | DependencyError::Unavailable { .. }
                | DependencyError::Redirect { .. }
                | DependencyError::Save { .. }
        ) && !matches!(
            self,
            DependencyError::Unpack {
                source: UnzipError::Write { .. },
                ..
            }
        )
    }
}

/// The caps of one job's restore.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// Downloaded bytes over all dependencies (`max_dependencies_size`).
    pub download: u64,
    /// Unpacked bytes per dependency (`max_workspace_size`: it all goes into the workspace).
    pub unpacked: u64,
}

/// Downloads and unpacks the artifacts of every dependency that has some into `root`, in
/// payload order (a later one overwrites an earlier one's files, as in gitlab-runner).
/// `scratch` holds the downloads meanwhile. `say` writes the job log.
pub async fn restore(
    client: &Client,
    deps: &[Dependency],
    root: &Path,
    scratch: &Path,
    caps: Caps,
    say: &(dyn Fn(&str) + Sync),
) -> Result<(), DependencyError> {
    let mut left = caps.download;
    for dep in deps {
        let Some(file) = &dep.artifacts_file else {
            continue;
        };
        let name = if dep.name.is_empty() {
            format!("job {}", dep.id)
        } else {
            dep.name.clone()
        };
        say(&format!(
            "Downloading artifacts for {name} ({}) from GitLab...\n",
            dep.id
        ));
        let path = scratch.join(format!("dependency-{}.zip", dep.id));
        let got = download(client, dep, &name, &path, left, caps.download).await?;
        left -= got;
        let unpack = {
            let (path, root) = (path.clone(), root.to_path_buf());
            tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&path).map_err(|source| UnzipError::Write {
                    path: path.clone(),
                    source,
                })?;
                unzip::unzip(std::io::BufReader::new(f), &root, caps.unpacked)
            })
        };
        let result = unpack.await.unwrap_or_else(|e| {
            Err(UnzipError::Write {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })
        });
        let _ = std::fs::remove_file(&path);
        let done = result.map_err(|source| DependencyError::Unpack {
            name: name.clone(),
            id: dep.id,
            source,
        })?;
        say(&format!(
            "Downloaded artifacts of {name}: {} file(s), {} unpacked ({} downloaded{})\n",
            done.files,
            size_text(done.bytes),
            size_text(got),
            if file.size > 0 && file.size != got {
                format!(", GitLab said {}", size_text(file.size))
            } else {
                String::new()
            }
        ));
        if done.skipped_links > 0 {
            say(&format!(
                "\x1b[33;1mWARNING: {} symbolic link(s) in the artifacts of {name} were not restored\x1b[0;m\n",
                done.skipped_links
            ));
        }
    }
    Ok(())
}

/// One dependency's archive into `path`, at most `left` bytes; returns its size.
async fn download(
    client: &Client,
    dep: &Dependency,
    name: &str,
    path: &Path,
    left: u64,
    cap: u64,
) -> Result<u64, DependencyError> {
    let save_err = |source| DependencyError::Save {
        name: name.to_string(),
        source,
    };
    let redirect_err = |what: String| DependencyError::Redirect {
        name: name.to_string(),
        id: dep.id,
        what,
    };
    let gitlab = Url::parse(client.url()).map_err(|e| redirect_err(e.to_string()))?;
    let mut backoff = Backoff::default();
    let mut location: Option<Url> = None;
    let mut redirects = 0;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut sink = std::fs::File::create(path).map_err(save_err)?;
        // The token goes only to GitLab itself, not to the storage a redirect may name.
        let send_token = location
            .as_ref()
            .is_none_or(|u| u.origin() == gitlab.origin());
        let reply = client
            .download_artifacts(
                location.as_ref().map(Url::as_str),
                dep.id,
                &dep.token,
                send_token,
                &mut sink,
                left,
            )
            .await;
        let status = match &reply {
            Ok(r) => r.status.as_u16(),
            Err(_) => 0,
        };
        match reply {
            Ok(_) if status == 200 => {
                drop(sink);
                return std::fs::metadata(path).map(|m| m.len()).map_err(save_err);
            }
            Ok(r) if matches!(status, 301 | 302 | 303 | 307 | 308) => {
                redirects += 1;
                if redirects > MAX_REDIRECTS {
                    return Err(redirect_err(format!("more than {MAX_REDIRECTS} redirects")));
                }
                let to = r
                    .header("location")
                    .ok_or_else(|| redirect_err(format!("a {status} without Location")))?;
                let base = location.as_ref().unwrap_or(&gitlab);
                let next = base
                    .join(to)
                    .map_err(|e| redirect_err(format!("a {status} to '{to}': {e}")))?;
                if !matches!(next.scheme(), "http" | "https") {
                    return Err(redirect_err(format!(
                        "a {status} to a {} URL",
                        next.scheme()
                    )));
                }
                location = Some(next);
                // A redirect is not a failed attempt.
                attempt -= 1;
            }
            Ok(_) if status == 404 => {
                return Err(DependencyError::NotFound {
                    name: name.to_string(),
                    id: dep.id,
                })
            }
            Ok(_) if status == 403 => {
                return Err(DependencyError::Forbidden {
                    name: name.to_string(),
                    id: dep.id,
                })
            }
            Ok(r) if r.is_transient() => {
                if attempt >= DOWNLOAD_ATTEMPTS {
                    return Err(DependencyError::Unavailable {
                        name: name.to_string(),
                        id: dep.id,
                        status,
                    });
                }
                tracing::warn!(dependency = dep.id, status, "artifact download: retrying");
                tokio::time::sleep(backoff.next(r.retry_after())).await;
            }
            Ok(_) => {
                return Err(DependencyError::Refused {
                    name: name.to_string(),
                    id: dep.id,
                    status,
                })
            }
            Err(ClientError::TooLarge { .. }) => {
                return Err(DependencyError::TooLarge {
                    name: name.to_string(),
                    id: dep.id,
                    cap: size_text(cap),
                })
            }
            Err(e @ ClientError::Sink { .. }) => {
                return Err(save_err(std::io::Error::other(e.to_string())))
            }
            Err(source) => {
                if attempt >= DOWNLOAD_ATTEMPTS {
                    return Err(DependencyError::Unreachable {
                        name: name.to_string(),
                        id: dep.id,
                        source,
                    });
                }
                tracing::warn!(dependency = dep.id, "artifact download: retrying: {source}");
                tokio::time::sleep(backoff.next(None)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_unsafe_artifacts_are_the_jobs_fault_outages_are_not() {
        let (name, id) = ("build".to_string(), 7);
        let io = || std::io::Error::other("disk full");
        // (error, the job's fault)
        let cases = [
            (
                DependencyError::NotFound {
                    name: name.clone(),
                    id,
                },
                true,
            ),
            (
                DependencyError::Forbidden {
                    name: name.clone(),
                    id,
                },
                true,
            ),
            (
                DependencyError::Unpack {
                    name: name.clone(),
                    id,
                    source: UnzipError::Escape("../x".into()),
                },
                true,
            ),
            (
                DependencyError::TooLarge {
                    name: name.clone(),
                    id,
                    cap: "1M".into(),
                },
                true,
            ),
            (
                DependencyError::Unavailable {
                    name: name.clone(),
                    id,
                    status: 503,
                },
                false,
            ),
            (
                DependencyError::Unpack {
                    name: name.clone(),
                    id,
                    source: UnzipError::Write {
                        path: "/w".into(),
                        source: io(),
                    },
                },
                false,
            ),
            (
                DependencyError::Save {
                    name: name.clone(),
                    source: io(),
                },
                false,
            ),
        ];
        for (e, fault) in cases {
            assert_eq!(e.is_job_fault(), fault, "{e}");
            // One line, naming the dependency.
            let line = crate::outcome::chain(&e);
            assert!(line.contains("'build'") && !line.contains('\n'), "{line}");
        }
    }
}
