//! A GitLab job becomes a `SuitePlan`: architecture and image (the entry's, or the job's
//! `image:` and `RUNNER_ARCH`/`RUNNER_IMAGE` within what the entry allows; `services:`
//! refused), variables (expanded
//! unless raw; file variables as guest files), steps (bash scripts with GitLab's `when` and
//! timeouts), JUnit and archive artifact paths, and the host-side checkout. Everything wrong
//! with a job is found here, before any VM starts, as one line for its log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use engine::vm::GuestCommand;

use super::config::RunnerEntry;
use super::job::{self, Artifact, Job, When};
use super::script;
use crate::events::RunId;
use crate::run::plan::{GuestFile, StepPlan, StepWhen, SuitePlan, GUEST_WORKSPACE};
use crate::serve::limits::Limits;
use crate::sources::{self, Checkout, GitStrategy};

/// The job variable that picks another architecture among the entry's `allowed_arches`.
pub const ARCH_VARIABLE: &str = "RUNNER_ARCH";
/// The job variable that picks another image among the entry's `allowed_images`.
pub const IMAGE_VARIABLE: &str = "RUNNER_IMAGE";
/// The job variable that adds the runner's step-level JUnit report (`true`/`1`).
pub const STEP_JUNIT_VARIABLE: &str = "RUNNER_STEP_JUNIT";
/// The job variable that saves the VM of a failed job (memory, devices, disk) and uploads
/// it with the job's artifacts, for `runner debug` (`true`/`1`). Off by default: the
/// snapshot holds whatever the job had, masked variables included.
pub const KEEP_FAILED_VARIABLE: &str = "RUNNER_KEEP_FAILED";
/// The job variable that asks for guest network (`none`, `proxy`, `full`) within the entry's
/// `network`.
pub const NETWORK_VARIABLE: &str = "RUNNER_NETWORK";
/// The job variable for after_script's timeout (e.g. `10m`); GitLab's default is 5 minutes.
pub const AFTER_SCRIPT_TIMEOUT_VARIABLE: &str = "RUNNER_AFTER_SCRIPT_TIMEOUT";
pub const AFTER_SCRIPT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Where `file: true` variables are written in the guest (the variable holds the path).
const GUEST_FILE_VARIABLES: &str = "/tmp/runner-job/variables";
/// Where the tracked paths are written in the guest when a cache or the artifacts ask for
/// `untracked: true` (see `SuitePlan::untracked`).
pub const GUEST_TRACKED_LIST: &str = "/tmp/runner-job/tracked";

/// A job turned into a plan, plus what happens around it.
#[derive(Debug)]
pub struct Prepared {
    pub plan: SuitePlan,
    pub checkout: Option<Checkout>,
    pub step_junit: bool,
    pub junit: Option<Artifact>,
    pub archive: Option<Artifact>,
    /// The guest globs of the archive artifact (the plan's `artifacts` also bring back the
    /// caches' files; [`select`] tells them apart).
    pub archive_globs: Vec<String>,
    /// The job's `cache:` entries and the guest globs of each.
    pub caches: Vec<(job::Cache, Vec<String>)>,
    /// The files git tracks in the checkout (relative paths), filled in once it is done
    /// when `plan.untracked` asks for the others.
    pub tracked: std::collections::HashSet<PathBuf>,
}

/// Validates the job against the entry and builds its plan. Errors are the job's fault
/// (one line for its log).
pub fn prepare(entry: &RunnerEntry, job: &Job, work: &std::path::Path) -> Result<Prepared, String> {
    let (arch, image) = choose_vm(entry, job)?;
    let limits = &entry.limits;
    let timeout = Duration::from_secs(job.runner_info.timeout.max(1));
    limits
        .check_timeout("the job's timeout", timeout)
        .map_err(|e| e.to_string())?;
    let (env, files) = environment(job, arch, &image);
    let steps = steps(job, &env, timeout, limits)?;
    let artifacts = ArtifactPaths::of(job)?;
    let caches = cache_globs(job)?;
    let checkout = checkout(entry, job, work)?;
    let network = match job.var(NETWORK_VARIABLE) {
        None => crate::net::NetworkMode::None,
        Some(v) => v
            .trim()
            .parse()
            .map_err(|e| format!("{NETWORK_VARIABLE}: {e}"))?,
    };
    limits
        .check_network(&format!("the job's {NETWORK_VARIABLE}"), network)
        .map_err(|e| e.to_string())?;
    let step_junit = entry.step_junit || truthy(job.var(STEP_JUNIT_VARIABLE));
    let mut plan = SuitePlan {
        id: RunId {
            suite: job.job_info.name.clone(),
            arch,
        },
        // Checked at the entry's start (service.rs); a job only picks among them.
        image: image
            .parse::<engine::image::ImageName>()
            .map_err(|e| format!("runner '{}': {e}", entry.name))?,
        // The job's repository never supplies a recipe: it would be built on this host.
        repository_recipes: engine::image::RepositoryRecipes::Refused,
        workspace: None,
        host_setup: Vec::new(),
        steps,
        timeout,
        junit: artifacts.junit_paths,
        // Both come back in one archive, bounded by max_artifacts_size.
        artifacts: artifacts
            .archive_paths
            .iter()
            .chain(caches.iter().flat_map(|(_, g)| g))
            .cloned()
            .collect(),
        untracked: wants_untracked(job).then(|| GUEST_TRACKED_LIST.to_string()),
        cpus: entry.cpus,
        memory_mib: entry.memory_mib()?,
        out_dir: work.join("artifacts"),
        files,
        max_artifacts: 0,
        image_build_timeout: None,
        // A VM always: user mode runs the job's code on the host's kernel (see README).
        mode: crate::suite::Mode::System,
        keep_failed: truthy(job.var(KEEP_FAILED_VARIABLE)),
        network: crate::net::NetworkPlan {
            mode: network,
            allow: None,
        },
    };
    limits.apply(&mut plan);
    Ok(Prepared {
        plan,
        checkout,
        step_junit,
        junit: artifacts.junit,
        archive: artifacts.archive,
        archive_globs: artifacts.archive_paths,
        caches,
        tracked: Default::default(),
    })
}

/// Whether a saving cache or the archive artifact asks for the untracked files.
fn wants_untracked(job: &Job) -> bool {
    job.cache.iter().any(|c| c.untracked && c.policy.pushes())
        || job
            .artifacts
            .iter()
            .any(|a| a.artifact_type == "archive" && a.untracked)
}

/// The files of `files` (below `root`) that git does not track: not in `tracked`, not
/// under `.git/`.
pub fn untracked(
    files: &[PathBuf],
    root: &Path,
    tracked: &std::collections::HashSet<PathBuf>,
) -> Vec<PathBuf> {
    files
        .iter()
        .filter(|f| {
            let rel = f.strip_prefix(root).unwrap_or(f);
            !tracked.contains(rel) && !rel.starts_with(".git")
        })
        .cloned()
        .collect()
}

/// Git's NUL-separated path list (`git ls-files -z`) as a set of relative paths.
pub fn tracked_set(list: &[u8]) -> std::collections::HashSet<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    list.split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(p)))
        .collect()
}

/// The guest's pattern file for the tracked paths: one a line (a name with a newline in it
/// cannot be one; [`untracked`] leaves such a file out on the host).
pub fn tracked_patterns(list: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(list.len());
    for p in list
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty() && !p.contains(&b'\n'))
    {
        out.extend_from_slice(p);
        out.push(b'\n');
    }
    out
}

/// Whether a job variable says yes (`true`, `1`, `yes`, any case).
fn truthy(value: Option<&str>) -> bool {
    matches!(
        value.map(|v| v.to_ascii_lowercase()),
        Some(ref v) if v == "true" || v == "1" || v == "yes"
    )
}

/// What a job's `image:` names: an architecture, an image, or both (`ARCH/IMAGE`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageChoice {
    pub arch: Option<engine::Arch>,
    pub image: Option<engine::image::ImageName>,
}

/// Parses `image:` — `riscv64`, `debian-13` or `riscv64/debian-13` (an architecture name
/// wins over an image of the same name). Architecture names are the engine's, so new guest
/// architectures work here as soon as the engine knows them.
pub fn parse_image(name: &str) -> Result<ImageChoice, String> {
    let name = name.trim();
    let malformed = || {
        format!(
            "image '{}' is not ARCH, IMAGE or ARCH/IMAGE (e.g. riscv64/debian-13): this runner starts VMs of its own images, not container images",
            name.chars().take(200).collect::<String>()
        )
    };
    let image = |s: &str| {
        s.parse::<engine::image::ImageName>()
            .map_err(|_| malformed())
    };
    match name.split('/').collect::<Vec<_>>()[..] {
        [""] => Ok(ImageChoice::default()),
        [one] => Ok(match one.parse::<engine::Arch>() {
            Ok(arch) => ImageChoice {
                arch: Some(arch),
                image: None,
            },
            Err(_) => ImageChoice {
                arch: None,
                image: Some(image(one)?),
            },
        }),
        [arch, img] => Ok(ImageChoice {
            arch: Some(
                arch.parse()
                    .map_err(|e: engine::arch::UnknownArch| format!("image '{name}': {e}"))?,
            ),
            image: Some(image(img)?),
        }),
        _ => Err(malformed()),
    }
}

/// The job's VM: the entry's default architecture and image, replaced by what `image:` names,
/// each part replaced again by `RUNNER_ARCH`/`RUNNER_IMAGE` when set (a pipeline variable can
/// re-target a job without editing it); whatever is picked must be allowed by the entry.
fn choose_vm(entry: &RunnerEntry, job: &Job) -> Result<(engine::Arch, String), String> {
    if let Some(names) = services(job) {
        return Err(format!(
            "services: ({names}) are not supported by this runner: each job runs alone in one VM; remove `services:` from the job (or from `default:`) and start what the tests need in the script"
        ));
    }
    let image_name = job.image.as_ref().map(|i| i.name.trim()).unwrap_or("");
    let from_image = parse_image(image_name)?;
    let var = |key: &str| job.var(key).filter(|v| !v.is_empty());
    let (arch, arch_source) = match var(ARCH_VARIABLE) {
        Some(v) => (
            v.parse::<engine::Arch>()
                .map_err(|e: engine::arch::UnknownArch| e.to_string())?,
            format!("{ARCH_VARIABLE}={v}"),
        ),
        None => match from_image.arch {
            Some(a) => (a, format!("image '{image_name}' (architecture {a})")),
            None => (entry.arch, String::new()),
        },
    };
    let (image, image_source) = match var(IMAGE_VARIABLE) {
        Some(v) => (v.to_string(), format!("{IMAGE_VARIABLE}={v}")),
        None => match &from_image.image {
            Some(i) => (i.to_string(), format!("image '{image_name}'")),
            None => (entry.default_image(arch), String::new()),
        },
    };
    let allowed = entry.arches();
    if !allowed.contains(&arch) {
        return Err(format!(
            "{arch_source} is not allowed on runner '{}' (allowed: {}); pick one of those or add it to allowed_arches",
            entry.name,
            allowed.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
        ));
    }
    let allowed = entry.images_for(arch);
    if !allowed.contains(&image) {
        return Err(format!(
            "{image_source} is not allowed on runner '{}' (allowed images: {}); pick one of those or add it to allowed_images",
            entry.name,
            allowed.join(", ")
        ));
    }
    Ok((arch, image))
}

/// The names of the job's services, if it has any.
fn services(job: &Job) -> Option<String> {
    let names: Vec<&str> = job
        .services
        .iter()
        .map(|s| {
            if s.name.is_empty() {
                "?"
            } else {
                s.name.as_str()
            }
        })
        .collect();
    (!names.is_empty()).then(|| names.join(", "))
}

/// The steps' environment: the job's variables (expanded unless raw; file variables become
/// guest files whose path is the value), then what gitlab-runner itself adds, and the VM's
/// `RUNNER_ARCH`/`RUNNER_IMAGE` (canonical names, after the job's own).
fn environment(
    job: &Job,
    arch: engine::Arch,
    image: &str,
) -> (Vec<(String, String)>, Vec<GuestFile>) {
    let raw: HashMap<String, String> = job
        .variables
        .iter()
        .map(|v| (v.key.clone(), v.value.clone()))
        .collect();
    let mut env: Vec<(String, String)> = Vec::new();
    let mut files = Vec::new();
    for v in job.variables.iter().filter(|v| valid_name(&v.key)) {
        if v.file {
            let path = format!("{GUEST_FILE_VARIABLES}/{}", v.key);
            files.push(GuestFile {
                path: path.clone(),
                contents: v.value.clone().into_bytes(),
            });
            env.push((v.key.clone(), path));
        } else if v.raw {
            env.push((v.key.clone(), v.value.clone()));
        } else {
            env.push((v.key.clone(), job::expand(&v.value, &raw)));
        }
    }
    for (k, val) in [
        ("CI_PROJECT_DIR", GUEST_WORKSPACE),
        ("CI_BUILDS_DIR", "/"),
        ("CI_SERVER", "yes"),
        ("GITLAB_CI", "true"),
        ("CI", "true"),
        ("CI_RUNNER_EXECUTABLE_ARCH", arch.name()),
        // The VM the job got, however it was picked (as `runner test` sets them).
        (ARCH_VARIABLE, arch.name()),
        (IMAGE_VARIABLE, image),
    ] {
        env.push((k.to_string(), val.to_string()));
    }
    (env, files)
}

/// The job's steps as bash scripts with GitLab's `when`, `allow_failure` and timeouts.
fn steps(
    job: &Job,
    env: &[(String, String)],
    timeout: Duration,
    limits: &Limits,
) -> Result<Vec<StepPlan>, String> {
    let after_timeout = match job.var(AFTER_SCRIPT_TIMEOUT_VARIABLE) {
        Some(t) => humantime::parse_duration(t).map_err(|_| {
            format!("{AFTER_SCRIPT_TIMEOUT_VARIABLE}='{t}' is not a duration like 90s or 10m")
        })?,
        None => AFTER_SCRIPT_TIMEOUT,
    };
    limits
        .check_timeout(AFTER_SCRIPT_TIMEOUT_VARIABLE, after_timeout)
        .map_err(|e| e.to_string())?;
    if job.steps.is_empty() {
        return Err("the job has no steps (script) to run".into());
    }
    let plan = |s: &job::Step| {
        let after = s.name == "after_script";
        StepPlan {
            name: s.name.clone(),
            // bash like gitlab-runner's shell executor (Debian images always have it).
            command: GuestCommand::Argv(vec![
                "/bin/bash".into(),
                "-c".into(),
                script::step_script(&s.script),
            ]),
            timeout: if after {
                after_timeout
            } else if s.timeout > 0 {
                Duration::from_secs(s.timeout).min(timeout)
            } else {
                timeout
            },
            env: env.to_vec(),
            // after_script never changes the job's result (GitLab).
            allow_failure: after || s.allow_failure,
            when: match s.when {
                When::OnSuccess => StepWhen::OnSuccess,
                When::OnFailure => StepWhen::OnFailure,
                When::Always => StepWhen::Always,
            },
        }
    };
    Ok(job.steps.iter().map(plan).collect())
}

/// The first JUnit and the first archive artifact, and the guest paths they collect.
struct ArtifactPaths {
    junit: Option<Artifact>,
    archive: Option<Artifact>,
    junit_paths: Vec<String>,
    archive_paths: Vec<String>,
}

impl ArtifactPaths {
    fn of(job: &Job) -> Result<ArtifactPaths, String> {
        let first = |kind: &str| {
            job.artifacts
                .iter()
                .find(|a| a.artifact_type == kind)
                .cloned()
        };
        let (junit, archive) = (first("junit"), first("archive"));
        let junit_paths = junit.as_ref().map(|a| a.paths.clone()).unwrap_or_default();
        let archive_paths: Vec<String> = archive
            .as_ref()
            .map(|a| a.paths.iter().flat_map(|p| file_globs(p)).collect())
            .unwrap_or_default();
        for p in junit_paths.iter().chain(&archive_paths) {
            if !relative_path(p) {
                return Err(format!(
                    "artifact path '{p}' must be relative to the project directory, without '..'"
                ));
            }
        }
        Ok(ArtifactPaths {
            junit,
            archive,
            junit_paths,
            archive_paths,
        })
    }
}

/// Each `cache:` entry that saves (`push`/`pull-push`) with the guest globs of its `paths`
/// (a cache that only pulls brings nothing back).
fn cache_globs(job: &Job) -> Result<Vec<(job::Cache, Vec<String>)>, String> {
    let mut out = Vec::new();
    for c in &job.cache {
        let globs: Vec<String> = if c.policy.pushes() {
            c.paths.iter().flat_map(|p| file_globs(p)).collect()
        } else {
            Vec::new()
        };
        if let Some(p) = c.paths.iter().find(|p| !relative_path(p)) {
            return Err(format!(
                "cache path '{p}' must be relative to the project directory, without '..'"
            ));
        }
        out.push((c.clone(), globs));
    }
    Ok(out)
}

fn relative_path(p: &str) -> bool {
    !(p.starts_with('/') || p.split('/').any(|c| c == ".."))
}

/// The files of `files` (below `root`) that one of the guest `globs` matches, with the
/// guest's sh semantics: `*` and `?` match neither `/` nor a leading `.`.
pub fn select(files: &[PathBuf], root: &Path, globs: &[String]) -> Vec<PathBuf> {
    let options = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: true,
    };
    let patterns: Vec<glob::Pattern> = globs
        .iter()
        .filter_map(|g| glob::Pattern::new(g).ok())
        .collect();
    files
        .iter()
        .filter(|f| {
            let rel = f.strip_prefix(root).unwrap_or(f);
            patterns.iter().any(|p| p.matches_path_with(rel, options))
        })
        .cloned()
        .collect()
}

/// The host-side checkout (`GIT_STRATEGY`, `GIT_DEPTH`), or none for `GIT_STRATEGY: none`.
fn checkout(
    entry: &RunnerEntry,
    job: &Job,
    work: &std::path::Path,
) -> Result<Option<Checkout>, String> {
    let strategy = match job.var("GIT_STRATEGY") {
        Some(s) => s.parse::<GitStrategy>()?,
        None if job.allow_git_fetch => GitStrategy::Fetch,
        None => GitStrategy::Clone,
    };
    let depth = match job.var("GIT_DEPTH").filter(|d| !d.is_empty()) {
        Some(d) => Some(
            d.parse::<u32>()
                .map_err(|_| format!("GIT_DEPTH '{d}' is not a number"))?,
        ),
        None => Some(job.git_info.depth),
    }
    .filter(|d| *d > 0);
    if strategy == GitStrategy::None {
        return Ok(None);
    }
    if !sources::is_sha(&job.git_info.sha) {
        return Err(format!(
            "git_info.sha '{}' is not a commit SHA (40 or 64 hex digits)",
            job.git_info.sha.chars().take(80).collect::<String>()
        ));
    }
    Ok(Some(Checkout {
        url: job.git_info.repo_url.clone(),
        sha: job.git_info.sha.clone(),
        refspecs: job.git_info.refspecs.clone(),
        depth,
        strategy,
        auth: None,
        dest: work.join("src"),
        timeout: Duration::from_secs(entry.clone_timeout.max(1)),
        protocols: entry.git_protocols.clone(),
    }))
}

/// Guest globs for an archive path: the path itself, and, in case it names a directory, the
/// files up to three levels below it (the guest-side lister matches files only).
fn file_globs(p: &str) -> Vec<String> {
    let p = p.trim_end_matches('/');
    if p.contains(['*', '?', '[']) {
        return vec![p.to_string()];
    }
    vec![
        p.to_string(),
        format!("{p}/*"),
        format!("{p}/*/*"),
        format!("{p}/*/*/*"),
    ]
}

fn valid_name(k: &str) -> bool {
    let mut c = k.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> RunnerEntry {
        let cfg = crate::serve::ServeConfig::parse(
            std::path::Path::new("t.toml"),
            "[[runners]]\nname='r'\nurl='http://x'\ntoken='t'\narch='riscv64'\nallowed_arches=['aarch64']\n",
        )
        .unwrap();
        cfg.runners[0].clone()
    }

    fn job(vars: &str) -> Job {
        Job::parse(format!(r#"{{"id":1,"token":"jt","job_info":{{"name":"unit","project_id":5}},
            "git_info":{{"repo_url":"https://gitlab-ci-token:jt@h/p.git","sha":"0123456789012345678901234567890123456789","depth":20}},
            "runner_info":{{"timeout":600}},"variables":[{vars}],
            "steps":[{{"name":"script","script":["echo hi"],"timeout":600,"when":"on_success"}},
                     {{"name":"after_script","script":["echo bye"],"timeout":600,"when":"always"}}],
            "artifacts":[{{"name":"junit","paths":["report.xml"],"when":"always","artifact_type":"junit","artifact_format":"gzip"}}]}}"#).as_bytes()).unwrap()
    }

    #[test]
    fn untracked_is_what_the_index_does_not_name() {
        let list = b"src/a.rs\0odd\nname\0.gitignore\0";
        let tracked = tracked_set(list);
        // The guest's patterns: one a line; a name with a newline cannot be one.
        assert_eq!(tracked_patterns(list), b"src/a.rs\n.gitignore\n");
        let root = Path::new("/out");
        let files: Vec<PathBuf> = [
            "src/a.rs",
            "odd\nname",
            ".gitignore",
            ".git/config",
            "build/x.o",
            "src/new.rs",
        ]
        .iter()
        .map(|f| root.join(f))
        .collect();
        assert_eq!(
            untracked(&files, root, &tracked),
            [root.join("build/x.o"), root.join("src/new.rs")]
        );
        // Asked for by a saving cache or the archive artifact only.
        let dir = tempfile::tempdir().unwrap();
        let mut j = job("");
        assert!(prepare(&entry(), &j, dir.path())
            .unwrap()
            .plan
            .untracked
            .is_none());
        j.cache = vec![job::Cache {
            key: "k".into(),
            untracked: true,
            policy: job::CachePolicy::Pull,
            paths: vec![],
            when: When::OnSuccess,
            fallback_keys: vec![],
        }];
        assert!(prepare(&entry(), &j, dir.path())
            .unwrap()
            .plan
            .untracked
            .is_none());
        j.cache[0].policy = job::CachePolicy::PullPush;
        let p = prepare(&entry(), &j, dir.path()).unwrap();
        assert_eq!(p.plan.untracked.as_deref(), Some(GUEST_TRACKED_LIST));
    }

    #[test]
    fn a_job_becomes_a_plan() {
        let dir = tempfile::tempdir().unwrap();
        let j = job(
            r#"{"key":"A","value":"1"},{"key":"B","value":"x$A"},{"key":"R","value":"x$A","raw":true},
            {"key":"F","value":"file body","file":true},{"key":"GIT_STRATEGY","value":"none"},{"key":"RUNNER_ARCH","value":"aarch64"}"#,
        );
        let p = prepare(&entry(), &j, dir.path()).unwrap();
        assert_eq!(p.plan.id.arch, engine::Arch::Aarch64);
        assert!(p.checkout.is_none());
        let env = &p.plan.steps[0].env;
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("B"), Some("x1"));
        assert_eq!(get("R"), Some("x$A"));
        assert_eq!(get("F"), Some("/tmp/runner-job/variables/F"));
        assert_eq!(get("CI_PROJECT_DIR"), Some("/workspace"));
        // The chosen VM, last (so it wins over the job's own spelling).
        let last = |k: &str| {
            env.iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(last("RUNNER_ARCH"), Some("aarch64"));
        assert_eq!(last("RUNNER_IMAGE"), Some("debian-13"));
        assert_eq!(p.plan.files[0].contents, b"file body");
        assert_eq!(p.plan.steps[1].when, StepWhen::Always);
        assert!(p.plan.steps[1].allow_failure);
        assert_eq!(p.plan.steps[1].timeout, AFTER_SCRIPT_TIMEOUT);
        assert_eq!(p.plan.junit, ["report.xml"]);
        assert!(
            !p.plan.keep_failed,
            "a failure snapshot holds secrets: never by default"
        );
        let j = job(r#"{"key":"RUNNER_KEEP_FAILED","value":"true"}"#);
        assert!(prepare(&entry(), &j, dir.path()).unwrap().plan.keep_failed);
    }

    #[test]
    fn git_settings_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let p = prepare(
            &entry(),
            &job(r#"{"key":"GIT_DEPTH","value":"3"}"#),
            dir.path(),
        )
        .unwrap();
        let c = p.checkout.unwrap();
        assert_eq!(c.strategy, GitStrategy::Clone);
        assert_eq!(c.depth, Some(3));
        // (variables, expected message part)
        let cases = [
            (r#"{"key":"RUNNER_ARCH","value":"x86_64"}"#, "not allowed"),
            (r#"{"key":"RUNNER_ARCH","value":"mips"}"#, "mips"),
            (
                r#"{"key":"RUNNER_IMAGE","value":"other"}"#,
                "allowed_images",
            ),
            (r#"{"key":"GIT_STRATEGY","value":"svn"}"#, "GIT_STRATEGY"),
            (r#"{"key":"GIT_DEPTH","value":"deep"}"#, "GIT_DEPTH"),
            // Once overflowed the deadline arithmetic; now over the operator's max_timeout.
            (
                r#"{"key":"RUNNER_AFTER_SCRIPT_TIMEOUT","value":"100y"}"#,
                "RUNNER_AFTER_SCRIPT_TIMEOUT = 100years",
            ),
        ];
        for (vars, want) in cases {
            let e = prepare(&entry(), &job(vars), dir.path()).unwrap_err();
            assert!(e.contains(want), "{vars}: {e}");
        }
    }

    #[test]
    fn a_job_timeout_over_the_cap_fails_the_job_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = job("");
        j.runner_info.timeout = u64::MAX;
        let e = prepare(&entry(), &j, dir.path()).unwrap_err();
        assert!(e.starts_with("the job's timeout = "), "{e}");
        assert!(
            e.contains("over this runner's limit max_timeout = 3h"),
            "{e}"
        );
        // The caps travel with the plan.
        let p = prepare(&entry(), &job(""), dir.path()).unwrap();
        assert_eq!(p.plan.max_artifacts, 256 << 20);
        assert_eq!(p.plan.image_build_timeout, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn a_sha_that_is_not_one_fails_the_job() {
        let dir = tempfile::tempdir().unwrap();
        // Multi-byte characters where a short SHA would be cut once panicked the job's task.
        for sha in ["abcdefg€€€", "main", ""] {
            let mut j = job("");
            j.git_info.sha = sha.to_string();
            let e = prepare(&entry(), &j, dir.path()).unwrap_err();
            assert!(e.contains("not a commit SHA"), "{sha}: {e}");
        }
        // With GIT_STRATEGY none the SHA is not used, so it is not checked.
        let mut j = job(r#"{"key":"GIT_STRATEGY","value":"none"}"#);
        j.git_info.sha = "main".into();
        assert!(prepare(&entry(), &j, dir.path()).is_ok());
    }

    #[test]
    fn image_names_an_architecture_an_image_or_both() {
        let img = |s: &str| Some(s.parse::<engine::image::ImageName>().unwrap());
        // (image:, arch, image)
        let cases = [
            ("", None, None),
            ("riscv64", Some(engine::Arch::Riscv64), None),
            ("arm64", Some(engine::Arch::Aarch64), None), // Debian's name too
            ("debian-13", None, img("debian-13")),
            (
                " x86_64/debian-12 ",
                Some(engine::Arch::X86_64),
                img("debian-12"),
            ),
        ];
        for (name, arch, image) in cases {
            assert_eq!(
                parse_image(name).unwrap(),
                ImageChoice { arch, image },
                "{name}"
            );
        }
        // (image:, message part)
        let bad = [
            ("debian:trixie", "is not ARCH, IMAGE or ARCH/IMAGE"),
            ("registry.example.com/group/image:1", "not container images"),
            ("mips/debian-13", "mips"),
            ("riscv64/", "is not ARCH, IMAGE or ARCH/IMAGE"),
            ("riscv64/../x", "is not ARCH, IMAGE or ARCH/IMAGE"),
        ];
        for (name, want) in bad {
            let e = parse_image(name).unwrap_err();
            assert!(e.contains(want), "{name}: {e}");
        }
    }

    #[test]
    fn image_and_variables_pick_the_vm_within_what_the_entry_allows() {
        let cfg = crate::serve::ServeConfig::parse(
            std::path::Path::new("t.toml"),
            "[[runners]]\nname='r'\nurl='http://x'\ntoken='t'\narch='riscv64'\nimage='debian-13'\nallowed_arches=['aarch64']\nallowed_images=['debian-12']\n",
        )
        .unwrap();
        let entry = &cfg.runners[0];
        let with = |image: Option<&str>, vars: &str| {
            let mut j = job(vars);
            j.image = image.map(|name| job::Image { name: name.into() });
            choose_vm(entry, &j)
        };
        let ok = |image: Option<&str>, vars: &str| with(image, vars).unwrap();
        let (rv, aa) = (engine::Arch::Riscv64, engine::Arch::Aarch64);
        // (image:, variables, chosen)
        let cases = [
            (None, "", (rv, "debian-13")),
            (Some(""), "", (rv, "debian-13")),
            (Some("aarch64"), "", (aa, "debian-13")),
            (Some("debian-12"), "", (rv, "debian-12")),
            (Some("aarch64/debian-12"), "", (aa, "debian-12")),
            // The variables win over image:, each for its own part.
            (
                Some("aarch64/debian-12"),
                r#"{"key":"RUNNER_ARCH","value":"riscv64"}"#,
                (rv, "debian-12"),
            ),
            (
                Some("aarch64"),
                r#"{"key":"RUNNER_IMAGE","value":"debian-12"}"#,
                (aa, "debian-12"),
            ),
        ];
        for (image, vars, (arch, img)) in cases {
            assert_eq!(ok(image, vars), (arch, img.to_string()), "{image:?} {vars}");
        }
        // (image:, variables, message)
        let refused = [
            (
                Some("x86_64"),
                "",
                "image 'x86_64' (architecture x86_64) is not allowed on runner 'r' (allowed: riscv64, aarch64)",
            ),
            (
                Some("riscv64/debian-11"),
                "",
                "image 'riscv64/debian-11' is not allowed on runner 'r' (allowed images: debian-13, debian-12); pick one",
            ),
            (
                Some("riscv64"),
                r#"{"key":"RUNNER_ARCH","value":"x86_64"}"#,
                "RUNNER_ARCH=x86_64 is not allowed",
            ),
            (Some("ubuntu:24.04"), "", "image 'ubuntu:24.04' is not ARCH, IMAGE"),
        ];
        for (image, vars, want) in refused {
            let e = with(image, vars).unwrap_err();
            assert!(e.starts_with(want), "{image:?} {vars}: {e}");
        }
    }

    #[test]
    fn without_an_entry_image_each_arch_gets_its_own_default() {
        let cfg = crate::serve::ServeConfig::parse(
            std::path::Path::new("t.toml"),
            "[[runners]]\nname='r'\nurl='http://x'\ntoken='t'\narch='riscv64'\nallowed_arches=['mipsel']\n",
        )
        .unwrap();
        let entry = &cfg.runners[0];
        let pick = |image: &str| {
            let mut j = job("");
            j.image = Some(job::Image { name: image.into() });
            choose_vm(entry, &j)
        };
        assert_eq!(
            pick("riscv64").unwrap(),
            (engine::Arch::Riscv64, "debian-13".to_string())
        );
        // trixie has no mipsel: the arch's default is Debian 12, and only that one.
        assert_eq!(
            pick("mipsel").unwrap(),
            (engine::Arch::Mipsel, "debian-12".to_string())
        );
        let e = pick("mipsel/debian-13").unwrap_err();
        assert!(e.contains("allowed images: debian-12"), "{e}");
    }

    #[test]
    fn services_are_refused_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = job("");
        j.services = vec![
            job::Service {
                name: "postgres:16".into(),
            },
            job::Service {
                name: "redis".into(),
            },
        ];
        let e = prepare(&entry(), &j, dir.path()).unwrap_err();
        assert!(
            e.starts_with("services: (postgres:16, redis) are not supported by this runner"),
            "{e}"
        );
    }

    #[test]
    fn runner_network_is_granted_within_the_entrys_network_only() {
        let dir = tempfile::tempdir().unwrap();
        let ask = r#"{"key":"RUNNER_NETWORK","value":"proxy"}"#;
        // The entry's default ceiling is none: refused, naming the limit.
        let e = prepare(&entry(), &job(ask), dir.path()).unwrap_err();
        assert_eq!(
            e,
            "the job's RUNNER_NETWORK = \"proxy\" is over this runner's limit network = \"none\"; \
             run without network (vendor what the job fetches), or ask the runner's operator to allow it"
        );
        let cfg = crate::serve::ServeConfig::parse(
            std::path::Path::new("t.toml"),
            "[[runners]]\nname='r'\nurl='http://x'\ntoken='t'\narch='riscv64'\n\
             network='proxy'\nallowed_hosts=['pypi.org', 'files.pythonhosted.org:443']\n",
        )
        .unwrap();
        let p = prepare(&cfg.runners[0], &job(ask), dir.path()).unwrap();
        assert_eq!(p.plan.network.mode, crate::net::NetworkMode::Proxy);
        let allow = p.plan.network.allow.expect("the entry's allowlist");
        assert!(allow.allows("pypi.org", 443) && !allow.allows("deb.debian.org", 80));
        // No variable: no network, whatever the ceiling.
        let p = prepare(&cfg.runners[0], &job(""), dir.path()).unwrap();
        assert_eq!(p.plan.network.mode, crate::net::NetworkMode::None);
        let full = r#"{"key":"RUNNER_NETWORK","value":"full"}"#;
        assert!(prepare(&cfg.runners[0], &job(full), dir.path()).is_err());
        let bad = r#"{"key":"RUNNER_NETWORK","value":"lan"}"#;
        let e = prepare(&cfg.runners[0], &job(bad), dir.path()).unwrap_err();
        assert!(
            e.starts_with("RUNNER_NETWORK: unknown network 'lan'"),
            "{e}"
        );
    }
}
