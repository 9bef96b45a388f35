//! Host-side checkouts of a job's sources (GitLab `git_info`, a GitHub head SHA). The real
//! `git` CLI does the work on the host, so the guest needs no network; the tree is then copied
//! into the VM like any workspace.
//!
//! Credentials never reach argv (visible to every user in /proc) or messages: a URL's
//! `user:password@` part is taken out and handed to git as an `Authorization` header through
//! `GIT_CONFIG_*` environment variables. Every git process runs in its own process group, under
//! one deadline for the whole checkout, and is killed on cancellation.
//!
//! URLs and refspecs come from job payloads, so git gets them after `--end-of-options` (a
//! refspec `--upload-pack=…` stays a refspec), may use only the operator's protocols
//! (`GIT_ALLOW_PROTOCOL`), and sees none of the service's own `GIT_*` variables (a `GIT_DIR`
//! in the service's environment would point every checkout at one repository). Directories
//! are private (0700): sources of private projects are not for other local users.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine as _;
use tokio::process::Command;
use tokio::sync::watch;

/// GitLab's `GIT_STRATEGY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GitStrategy {
    /// A fresh clone into an empty directory.
    #[default]
    Clone,
    /// Reuse the directory's repository if there is one (fetch + checkout + clean). The
    /// caller guarantees that no other checkout uses the directory meanwhile: lock files a
    /// cancelled git left behind are removed.
    Fetch,
    /// No git at all: the directory is created (empty) if missing.
    None,
}

impl FromStr for GitStrategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "clone" => Ok(GitStrategy::Clone),
            "fetch" => Ok(GitStrategy::Fetch),
            // GitLab's `empty` also means "no sources"; our directories start empty anyway.
            "none" | "empty" => Ok(GitStrategy::None),
            other => Err(format!(
                "GIT_STRATEGY '{other}' is not one of clone, fetch, none"
            )),
        }
    }
}

/// What to check out, where.
#[derive(Debug, Clone)]
pub struct Checkout {
    /// Repository URL (https, file://, or a local path). May carry `user:password@`.
    pub url: String,
    /// The commit to check out (full SHA).
    pub sha: String,
    /// Refspecs to fetch; empty = all branches.
    pub refspecs: Vec<String>,
    /// Shallow depth; `None` or 0 = full history.
    pub depth: Option<u32>,
    pub strategy: GitStrategy,
    /// Credentials for http(s) URLs (override any in the URL).
    pub auth: Option<(String, String)>,
    pub dest: PathBuf,
    /// Deadline for the whole checkout.
    pub timeout: Duration,
    /// The transports git may use (`GIT_ALLOW_PROTOCOL`), e.g. https, ssh; a local path
    /// counts as `file`.
    pub protocols: Vec<String>,
}

/// The operator's default for `git_protocols`: what GitLab and GitHub clone URLs use.
pub const DEFAULT_PROTOCOLS: [&str; 3] = ["https", "http", "ssh"];

/// Checks a `git_protocols` list from the config; `section` names it in the message.
pub fn check_protocols(section: &str, protocols: &[String]) -> Result<(), String> {
    let valid = |p: &String| {
        p.starts_with(|c: char| c.is_ascii_lowercase())
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+.-".contains(c))
    };
    if protocols.is_empty() {
        return Err(format!(
            "{section} git_protocols is empty; name the transports git may use, e.g. [\"https\"]"
        ));
    }
    match protocols.iter().find(|p| !valid(p)) {
        Some(bad) => Err(format!(
            "{section} git_protocols: '{bad}' is not a git transport name like https, ssh or file"
        )),
        None => Ok(()),
    }
}

/// A finished checkout.
#[derive(Debug, Clone)]
pub struct CheckoutDone {
    /// The commit now checked out (empty for `GitStrategy::None`).
    pub sha: String,
    /// What was done, one line per git command, for the job log (no credentials).
    pub log: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot run git (is it installed?)")]
    Spawn(#[source] std::io::Error),
    #[error("{command} failed ({status}): {stderr}")]
    Git {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("checkout did not finish within {0:?}")]
    TimedOut(Duration),
    #[error("checkout cancelled")]
    Cancelled,
    #[error("listing the tracked files did not finish within {0:?}")]
    ListTimedOut(Duration),
    #[error("the tracked files' list is over {0} bytes")]
    ListTooLong(u64),
    #[error("cannot prepare {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("'{0}' is not a commit SHA (40 or 64 hex digits)")]
    BadSha(String),
}

/// Refspec used when the job names none: every branch and every tag.
const DEFAULT_REFSPECS: [&str; 2] = [
    "+refs/heads/*:refs/remotes/origin/*",
    "+refs/tags/*:refs/tags/*",
];
/// Bytes of a failing git command's stderr kept for the message.
const STDERR_TAIL: usize = 2000;

/// Checks out `c.sha` into `c.dest` as `c.strategy` says. Cancelled when `cancel` turns true.
pub async fn checkout(
    c: &Checkout,
    mut cancel: watch::Receiver<bool>,
) -> Result<CheckoutDone, SourceError> {
    let work = async {
        match tokio::time::timeout(c.timeout, run_checkout(c)).await {
            Ok(r) => r,
            Err(_) => Err(SourceError::TimedOut(c.timeout)),
        }
    };
    tokio::select! {
        r = work => r,
        _ = cancel.wait_for(|v| *v) => Err(SourceError::Cancelled),
    }
}

async fn run_checkout(c: &Checkout) -> Result<CheckoutDone, SourceError> {
    let dir_err = |source| SourceError::Dir {
        path: c.dest.clone(),
        source,
    };
    if c.strategy == GitStrategy::None {
        private_dir(&c.dest).map_err(dir_err)?;
        return Ok(CheckoutDone {
            sha: String::new(),
            log: "Skipping Git repository setup (GIT_STRATEGY none)\n".into(),
        });
    }
    if !is_sha(&c.sha) {
        return Err(SourceError::BadSha(c.sha.clone()));
    }
    let (url, auth) = split_credentials(&c.url);
    let auth = c.auth.clone().or(auth);
    let git = Git {
        dir: c.dest.clone(),
        protocols: c.protocols.join(":"),
        auth_header: auth.map(|(user, pass)| {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
            format!("Authorization: Basic {token}")
        }),
    };
    let mut log = String::new();
    let reuse = c.strategy == GitStrategy::Fetch && c.dest.join(".git").is_dir();
    if reuse {
        log.push_str(&format!("Fetching changes into {}\n", c.dest.display()));
        private_dir(&c.dest).map_err(dir_err)?;
        for lock in remove_stale_locks(&c.dest.join(".git")).map_err(dir_err)? {
            log.push_str(&format!(
                "Removed .git/{}, left by an earlier job that was stopped\n",
                lock.display()
            ));
        }
        git.run(&["remote", "set-url", "--end-of-options", "origin", &url])
            .await?;
    } else {
        if c.dest.exists() {
            std::fs::remove_dir_all(&c.dest).map_err(dir_err)?;
        }
        private_dir(&c.dest).map_err(dir_err)?;
        log.push_str(&format!(
            "Cloning {} into {}\n",
            redact(&url),
            c.dest.display()
        ));
        git.run(&["init", "--quiet"]).await?;
        git.run(&["remote", "add", "--end-of-options", "origin", &url])
            .await?;
    }
    let depth = c.depth.filter(|d| *d > 0).map(|d| format!("--depth={d}"));
    let mut fetch: Vec<&str> = vec!["fetch", "--quiet", "--prune", "--no-tags"];
    fetch.extend(depth.as_deref());
    fetch.extend(["--end-of-options", "origin"]);
    if c.refspecs.is_empty() {
        fetch.extend(DEFAULT_REFSPECS);
    } else {
        fetch.extend(c.refspecs.iter().map(String::as_str));
    }
    git.run(&fetch).await?;
    // A shallow fetch, or refspecs that do not reach the commit (e.g. a fork's pull request
    // head), may leave it out: ask for the commit itself, which GitLab and GitHub allow.
    if git
        .run(&[
            "cat-file",
            "-e",
            "--end-of-options",
            &format!("{}^{{commit}}", c.sha),
        ])
        .await
        .is_err()
    {
        let mut by_sha: Vec<&str> = vec!["fetch", "--quiet", "--no-tags"];
        by_sha.extend(depth.as_deref());
        by_sha.extend(["--end-of-options", "origin", c.sha.as_str()]);
        git.run(&by_sha).await?;
    }
    git.run(&[
        "checkout",
        "--quiet",
        "--force",
        "--detach",
        "--end-of-options",
        &c.sha,
    ])
    .await?;
    if reuse {
        git.run(&["clean", "-ffdx", "--quiet"]).await?;
    }
    let head = git.run(&["rev-parse", "HEAD"]).await?;
    let sha = String::from_utf8_lossy(&head.stdout).trim().to_string();
    log.push_str(&format!("Checking out {} as detached HEAD\n", short(&sha)));
    Ok(CheckoutDone { sha, log })
}

/// Bytes in the regular files under `root` (symlinks are not followed): what a checkout will
/// cost as a workspace.
pub fn tree_size(root: &Path) -> std::io::Result<u64> {
    let mut total = 0u64;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file() {
                total = total.saturating_add(entry.metadata()?.len());
            }
        }
    }
    Ok(total)
}

/// Creates `dir` (and missing parents) readable by this user only, and makes an existing
/// one so (directories made by earlier versions were 0755).
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Removes the lock files a git process killed mid-way leaves in `git_dir` (`index.lock`,
/// `shallow.lock`, ref locks …): git refuses to work while they exist, so one cancelled
/// fetch would fail every later job of the project. Only for a directory no other git uses.
/// Returns what was removed, relative to `git_dir`.
fn remove_stale_locks(git_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let mut dirs = vec![git_dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let kind = entry.file_type()?;
            // Locks live at the top (index, HEAD, config, shallow, packed-refs) and under
            // refs/; objects/ is large and has none.
            if kind.is_dir() && (dir != git_dir || entry.file_name() == "refs") {
                dirs.push(path);
            } else if kind.is_file() && path.extension().is_some_and(|e| e == "lock") {
                std::fs::remove_file(&path)?;
                removed.push(path.strip_prefix(git_dir).unwrap_or(&path).to_path_buf());
            }
        }
    }
    removed.sort();
    Ok(removed)
}

/// One repository directory and how to talk to its remote.
struct Git {
    dir: PathBuf,
    /// `GIT_ALLOW_PROTOCOL`: colon-separated transports.
    protocols: String,
    auth_header: Option<String>,
}

impl Git {
    async fn run(&self, args: &[&str]) -> Result<Output, SourceError> {
        let mut cmd = self.command(args);
        let out = engine::child::output_in_group(&mut cmd)
            .await
            .map_err(SourceError::Spawn)?;
        if out.status.success() {
            return Ok(out);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim();
        let tail_start = stderr
            .char_indices()
            .rev()
            .nth(STDERR_TAIL)
            .map_or(0, |(i, _)| i);
        Err(SourceError::Git {
            command: format!("git {}", args.first().copied().unwrap_or_default()),
            status: out.status.to_string(),
            stderr: redact(&stderr[tail_start..]).replace('\n', " | "),
        })
    }

    /// `git -C dir ARGS` with only the environment set here.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("git");
        cmd.arg("-C").arg(&self.dir).args(args);
        // None of the service's own GIT_* variables (GIT_DIR, GIT_SSH_COMMAND, GIT_CONFIG_*
        // …): only the ones set below.
        for (key, _) in std::env::vars_os() {
            if key.as_encoded_bytes().starts_with(b"GIT_") {
                cmd.env_remove(key);
            }
        }
        // Never prompt (there is no terminal), never read the host user's git config.
        cmd.env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ALLOW_PROTOCOL", &self.protocols)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_ASKPASS", "true")
            .env("LC_ALL", "C");
        let mut config: Vec<(&str, &str)> = vec![
            ("advice.detachedHead", "false"),
            // Local test repositories are owned by whoever created them.
            ("safe.directory", "*"),
        ];
        if let Some(h) = &self.auth_header {
            config.push(("http.extraHeader", h));
        }
        cmd.env("GIT_CONFIG_COUNT", config.len().to_string());
        for (i, (k, v)) in config.iter().enumerate() {
            cmd.env(format!("GIT_CONFIG_KEY_{i}"), k)
                .env(format!("GIT_CONFIG_VALUE_{i}"), v);
        }
        cmd
    }
}

/// The paths git tracks in the checkout `dir` (`git ls-files -z`: NUL-separated, relative
/// to `dir`), for GitLab's `untracked: true`: at most `max` bytes, within `timeout`.
pub async fn tracked_files(
    dir: &Path,
    timeout: Duration,
    max: u64,
) -> Result<Vec<u8>, SourceError> {
    use tokio::io::AsyncReadExt;
    let git = Git {
        dir: dir.to_path_buf(),
        protocols: String::new(),
        auth_header: None,
    };
    let mut cmd = git.command(&["ls-files", "-z"]);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    // The group dies with the guard, however this returns.
    let (mut child, _guard) =
        engine::child::spawn_in_group(&mut cmd).map_err(SourceError::Spawn)?;
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let work = async {
        let mut out = Vec::new();
        (&mut stdout)
            .take(max.saturating_add(1))
            .read_to_end(&mut out)
            .await
            .map_err(SourceError::Spawn)?;
        if out.len() as u64 > max {
            return Err(SourceError::ListTooLong(max));
        }
        let status = child.wait().await.map_err(SourceError::Spawn)?;
        if !status.success() {
            return Err(SourceError::Git {
                command: "git ls-files".into(),
                status: status.to_string(),
                stderr: String::new(),
            });
        }
        Ok(out)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| SourceError::ListTimedOut(timeout))?
}

/// Splits `https://user:pass@host/path` into the URL without credentials and the credentials.
/// Anything that is not an http(s) URL is returned as it is.
pub fn split_credentials(url: &str) -> (String, Option<(String, String)>) {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return (url.to_string(), None);
    };
    if !matches!(parsed.scheme(), "http" | "https") || parsed.username().is_empty() {
        return (url.to_string(), None);
    }
    let user = percent_decode(parsed.username());
    let pass = percent_decode(parsed.password().unwrap_or_default());
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    (parsed.to_string(), Some((user, pass)))
}

/// Removes `user:password@` from every URL in `text` (git echoes URLs in its errors).
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || c == '/' || c == '\'' || c == '"')
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => rest = &tail[at + 1..],
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `s` is a full commit SHA (SHA-1 or SHA-256), as a checkout needs.
pub fn is_sha(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The first eight characters of a commit SHA, as logs show it (all of it when shorter).
pub fn short(sha: &str) -> &str {
    sha.get(..8).unwrap_or(sha)
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;

    #[test]
    fn credentials_leave_the_url() {
        let (url, auth) =
            split_credentials("https://gitlab-ci-token:s%40cret@gitlab.example.com/g/p.git");
        assert_eq!(url, "https://gitlab.example.com/g/p.git");
        assert_eq!(
            auth,
            Some(("gitlab-ci-token".to_string(), "s@cret".to_string()))
        );
        let (url, auth) = split_credentials("/srv/repo.git");
        assert_eq!((url.as_str(), auth), ("/srv/repo.git", None));
    }

    #[test]
    fn redact_removes_userinfo() {
        assert_eq!(
            redact("fatal: unable to access 'https://u:tok@h.example/x.git/': 403"),
            "fatal: unable to access 'https://h.example/x.git/': 403"
        );
        assert_eq!(redact("no url here"), "no url here");
    }

    #[test]
    fn strategies_parse() {
        assert_eq!("Fetch".parse::<GitStrategy>(), Ok(GitStrategy::Fetch));
        assert_eq!("none".parse::<GitStrategy>(), Ok(GitStrategy::None));
        assert!("svn".parse::<GitStrategy>().unwrap_err().contains("svn"));
    }

    #[tokio::test]
    async fn clone_and_fetch_check_out_the_sha() {
        let root = tempfile::tempdir().unwrap();
        let (src, first, second) = repo(root.path());
        let dest = root.path().join("build");
        let mut c = Checkout {
            url: format!("file://{}", src.display()),
            sha: first.clone(),
            refspecs: vec![],
            depth: Some(1),
            strategy: GitStrategy::Clone,
            auth: None,
            dest: dest.clone(),
            timeout: Duration::from_secs(60),
            protocols: vec!["file".into()],
        };
        let done = checkout(&c, never()).await.unwrap();
        assert_eq!(done.sha, first);
        assert_eq!(std::fs::read_to_string(dest.join("f")).unwrap(), "one\n");
        // Fetch reuses the repository and cleans what the last job left.
        std::fs::write(dest.join("junk"), "x").unwrap();
        c.strategy = GitStrategy::Fetch;
        c.sha = second.clone();
        let done = checkout(&c, never()).await.unwrap();
        assert_eq!(done.sha, second);
        assert!(done.log.contains("Fetching"), "{}", done.log);
        assert!(!dest.join("junk").exists());
        assert_eq!(std::fs::read_to_string(dest.join("f")).unwrap(), "two\n");
    }

    #[tokio::test]
    async fn unknown_sha_and_bad_url_fail_clearly() {
        let root = tempfile::tempdir().unwrap();
        let (src, _, _) = repo(root.path());
        let c = Checkout {
            url: src.display().to_string(),
            sha: "0".repeat(40),
            refspecs: vec![],
            depth: None,
            strategy: GitStrategy::Clone,
            auth: None,
            dest: root.path().join("b"),
            timeout: Duration::from_secs(60),
            protocols: vec!["file".into()],
        };
        let e = checkout(&c, never()).await.unwrap_err().to_string();
        assert!(e.starts_with("git fetch failed"), "{e}");
        let c = Checkout {
            url: "https://user:hunter2@127.0.0.1:9/none.git".into(),
            sha: "a".repeat(40),
            ..c
        };
        let e = checkout(&c, never()).await.unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("git fetch failed"), "{e}");
    }

    #[tokio::test]
    async fn none_creates_an_empty_dir_and_bad_sha_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let c = Checkout {
            url: String::new(),
            sha: String::new(),
            refspecs: vec![],
            depth: None,
            strategy: GitStrategy::None,
            auth: None,
            dest: root.path().join("empty"),
            timeout: Duration::from_secs(5),
            protocols: vec!["file".into()],
        };
        checkout(&c, never()).await.unwrap();
        assert!(c.dest.is_dir());
        let c = Checkout {
            strategy: GitStrategy::Clone,
            sha: "main".into(),
            ..c
        };
        let e = checkout(&c, never()).await.unwrap_err();
        assert!(matches!(e, SourceError::BadSha(_)), "{e}");
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;

    pub fn sh(dir: &Path, script: &str) -> String {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// A repository with two commits on main; returns (repo dir, first sha, second sha).
    pub fn repo(root: &Path) -> (PathBuf, String, String) {
        let src = root.join("src");
        std::fs::create_dir(&src).unwrap();
        sh(
            &src,
            "git init -q -b main . && echo one > f && git add f && git commit -qm one",
        );
        let first = sh(&src, "git rev-parse HEAD");
        sh(&src, "echo two > f && git commit -qam two");
        let second = sh(&src, "git rev-parse HEAD");
        (src, first, second)
    }

    pub fn never() -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        std::mem::forget(tx);
        rx
    }

    /// A clone of `sha` from the local repository `src` into `dest`.
    pub fn checkout_of(src: &Path, sha: &str, dest: &Path) -> Checkout {
        Checkout {
            url: format!("file://{}", src.display()),
            sha: sha.to_string(),
            refspecs: vec![],
            depth: None,
            strategy: GitStrategy::Clone,
            auth: None,
            dest: dest.to_path_buf(),
            timeout: Duration::from_secs(60),
            protocols: vec!["file".into()],
        }
    }
}

#[cfg(test)]
mod hardening {
    use super::tests_support::*;
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn a_stale_index_lock_does_not_fail_later_fetches() {
        let root = tempfile::tempdir().unwrap();
        let (src, first, second) = repo(root.path());
        let mut c = checkout_of(&src, &first, &root.path().join("project"));
        c.strategy = GitStrategy::Fetch;
        checkout(&c, never()).await.unwrap();
        // What a fetch killed by a cancel leaves behind.
        std::fs::write(c.dest.join(".git/index.lock"), "").unwrap();
        std::fs::write(c.dest.join(".git/refs/heads/main.lock"), "").unwrap();
        c.sha = second.clone();
        let done = checkout(&c, never()).await.unwrap();
        assert_eq!(done.sha, second);
        assert!(done.log.contains("Removed .git/index.lock"), "{}", done.log);
        assert!(!c.dest.join(".git/index.lock").exists());
    }

    #[tokio::test]
    async fn tracked_files_are_the_index_not_the_worktree() {
        let root = tempfile::tempdir().unwrap();
        let (src, first, _) = repo(root.path());
        let c = checkout_of(&src, &first, &root.path().join("p"));
        checkout(&c, never()).await.unwrap();
        std::fs::write(c.dest.join("new"), "untracked").unwrap();
        let t = Duration::from_secs(30);
        assert_eq!(tracked_files(&c.dest, t, 1 << 20).await.unwrap(), b"f\0");
        // Bounded: a list over the cap is an error, not a cut list.
        let e = tracked_files(&c.dest, t, 1).await.unwrap_err();
        assert!(matches!(e, SourceError::ListTooLong(1)), "{e}");
        // Not a repository.
        assert!(tracked_files(root.path(), t, 1 << 20).await.is_err());
    }

    #[tokio::test]
    async fn checkouts_are_private() {
        let root = tempfile::tempdir().unwrap();
        let (src, first, _) = repo(root.path());
        // Parents the checkout creates are private too.
        let c = checkout_of(&src, &first, &root.path().join("builds/entry/5"));
        checkout(&c, never()).await.unwrap();
        for dir in [c.dest.clone(), root.path().join("builds/entry")] {
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", dir.display());
        }
    }

    #[tokio::test]
    async fn only_the_operators_protocols_are_used() {
        let root = tempfile::tempdir().unwrap();
        let (src, first, _) = repo(root.path());
        let mut c = checkout_of(&src, &first, &root.path().join("b"));
        c.protocols = DEFAULT_PROTOCOLS.map(String::from).to_vec();
        let e = checkout(&c, never()).await.unwrap_err().to_string();
        assert!(e.contains("transport 'file' not allowed"), "{e}");
        assert!(check_protocols("[github]", &c.protocols).is_ok());
        assert!(check_protocols("[github]", &[]).is_err());
        let e = check_protocols("[github]", &["https:file".into()]).unwrap_err();
        assert!(e.contains("'https:file'"), "{e}");
    }

    #[tokio::test]
    async fn a_refspec_cannot_become_an_option() {
        let root = tempfile::tempdir().unwrap();
        let (src, first, _) = repo(root.path());
        let marker = root.path().join("pwned");
        let mut c = checkout_of(&src, &first, &root.path().join("b"));
        // Without --end-of-options git fetch took this as its --upload-pack option and ran it.
        c.refspecs = vec![format!(
            "--upload-pack=touch {};git-upload-pack",
            marker.display()
        )];
        let _ = checkout(&c, never()).await;
        assert!(!marker.exists(), "a refspec from the payload ran a command");
    }

    #[test]
    fn tree_size_counts_regular_files() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("d")).unwrap();
        std::fs::write(root.path().join("a"), [0u8; 100]).unwrap();
        std::fs::write(root.path().join("d/b"), [0u8; 50]).unwrap();
        std::os::unix::fs::symlink("/dev/zero", root.path().join("z")).unwrap();
        assert_eq!(tree_size(root.path()).unwrap(), 150);
    }
}
