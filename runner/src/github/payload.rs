//! Webhook payloads (only the fields we use) and what each event asks of us: a [`Trigger`].
//! Unknown fields are ignored — GitHub adds fields all the time — but a field we need that is
//! missing makes the payload invalid.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct Installation {
    pub id: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Owner {
    pub login: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Repository {
    pub name: String,
    pub full_name: String,
    pub owner: Owner,
    pub clone_url: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CheckSuite {
    pub head_sha: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CheckRun {
    pub id: u64,
    pub head_sha: String,
    pub name: String,
    pub external_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PrHead {
    pub sha: String,
    /// The repository the head branch lives in; None when the fork was deleted.
    pub repo: Option<Repository>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PullRequest {
    pub number: u64,
    pub head: PrHead,
}

#[derive(Debug, Clone, Deserialize)]
struct CheckSuiteEvent {
    action: String,
    check_suite: CheckSuite,
    repository: Repository,
    installation: Installation,
}

#[derive(Debug, Clone, Deserialize)]
struct CheckRunEvent {
    action: String,
    check_run: CheckRun,
    repository: Repository,
    installation: Installation,
}

#[derive(Debug, Clone, Deserialize)]
struct PullRequestEvent {
    action: String,
    pull_request: PullRequest,
    repository: Repository,
    installation: Installation,
}

/// Which commit of which repository to test, and how to fetch it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub installation: u64,
    pub owner: String,
    pub repo: String,
    /// "owner/repo", for logs.
    pub full_name: String,
    pub clone_url: String,
    pub sha: String,
    /// Extra refs to fetch besides the default ones (a fork's PR head lives only under
    /// `refs/pull/N/head` in the base repository).
    pub refspecs: Vec<String>,
}

/// What a delivery asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// Run every suite × arch of the commit.
    RunAll(Target),
    /// Run one suite × arch again (a re-requested check run); `external_id` names it.
    RunOne { target: Target, external_id: String },
    /// GitHub's hello when the webhook is set up.
    Ping,
    /// Nothing to do; the reason goes to the log.
    Ignore(String),
}

#[derive(Debug, thiserror::Error)]
#[error("invalid {event} payload")]
pub struct PayloadError {
    pub event: String,
    #[source]
    pub source: serde_json::Error,
}

fn target(repo: &Repository, installation: &Installation, sha: &str) -> Target {
    Target {
        installation: installation.id,
        owner: repo.owner.login.clone(),
        repo: repo.name.clone(),
        full_name: repo.full_name.clone(),
        clone_url: repo.clone_url.clone(),
        sha: sha.to_string(),
        // Just the commit (GitHub serves any reachable SHA): fetching every branch and tag
        // of a big repository would be slow for nothing.
        refspecs: vec![sha.to_string()],
    }
}

/// Decides what the delivery of `event` with (already authenticated) `body` asks for.
pub fn parse(event: &str, body: &[u8]) -> Result<Trigger, PayloadError> {
    let err = |source| PayloadError {
        event: event.to_string(),
        source,
    };
    Ok(match event {
        "ping" => Trigger::Ping,
        "check_suite" => {
            let e: CheckSuiteEvent = serde_json::from_slice(body).map_err(err)?;
            match e.action.as_str() {
                "requested" | "rerequested" => Trigger::RunAll(target(
                    &e.repository,
                    &e.installation,
                    &e.check_suite.head_sha,
                )),
                other => Trigger::Ignore(format!("check_suite action '{other}'")),
            }
        }
        "check_run" => {
            let e: CheckRunEvent = serde_json::from_slice(body).map_err(err)?;
            let t = target(&e.repository, &e.installation, &e.check_run.head_sha);
            match (e.action.as_str(), e.check_run.external_id) {
                ("rerequested", Some(id)) if !id.is_empty() => Trigger::RunOne {
                    target: t,
                    external_id: id,
                },
                // A check run of ours always has an external id; without one it is another
                // App's, or one created before ids existed: run everything.
                ("rerequested", _) => Trigger::RunAll(t),
                (other, _) => Trigger::Ignore(format!("check_run action '{other}'")),
            }
        }
        "pull_request" => {
            let e: PullRequestEvent = serde_json::from_slice(body).map_err(err)?;
            match e.action.as_str() {
                "opened" | "synchronize" | "reopened" => {
                    let pr = &e.pull_request;
                    let same_repo = pr
                        .head
                        .repo
                        .as_ref()
                        .is_some_and(|r| r.full_name == e.repository.full_name);
                    if same_repo {
                        // A branch of the same repository: its push already created a check
                        // suite, which we run; running it again here would double every check.
                        Trigger::Ignore(format!(
                            "pull_request #{} from the same repository (its check_suite runs it)",
                            pr.number
                        ))
                    } else {
                        // A fork's push creates no check suite in the base repository. Fetch
                        // the head from the base repository's pull ref: the installation's
                        // token may not reach the fork, the pull ref always exists.
                        let mut t = target(&e.repository, &e.installation, &pr.head.sha);
                        t.refspecs = vec![format!(
                            "+refs/pull/{n}/head:refs/remotes/pull/{n}/head",
                            n = pr.number
                        )];
                        Trigger::RunAll(t)
                    }
                }
                other => Trigger::Ignore(format!("pull_request action '{other}'")),
            }
        }
        other => Trigger::Ignore(format!("event '{other}'")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_bad_payload_names_its_cause_once() {
        let Err(e) = parse("check_suite", b"{not json") else {
            panic!("parsed")
        };
        let line = crate::outcome::chain(&e);
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert_eq!(line.matches(&cause).count(), 1, "{line}");
        assert!(line.starts_with("invalid check_suite payload"), "{line}");
    }

    fn repo(full: &str) -> serde_json::Value {
        let (owner, name) = full.split_once('/').unwrap();
        json!({"name": name, "full_name": full, "owner": {"login": owner},
               "clone_url": format!("https://github.com/{full}.git"), "private": false})
    }

    #[test]
    fn events_become_triggers() {
        let inst = json!({"id": 7});
        let suite = json!({"action": "requested", "check_suite": {"head_sha": "abc", "pull_requests": []},
                           "repository": repo("o/r"), "installation": inst});
        let Trigger::RunAll(t) = parse("check_suite", suite.to_string().as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(
            (
                t.installation,
                t.owner.as_str(),
                t.repo.as_str(),
                t.sha.as_str()
            ),
            (7, "o", "r", "abc")
        );

        let run = json!({"action": "rerequested",
            "check_run": {"id": 5, "head_sha": "abc", "name": "runner / unit (riscv64)", "external_id": "unit/riscv64"},
            "repository": repo("o/r"), "installation": inst});
        assert!(matches!(
            parse("check_run", run.to_string().as_bytes()).unwrap(),
            Trigger::RunOne { external_id, .. } if external_id == "unit/riscv64"
        ));

        let completed = json!({"action": "completed", "check_suite": {"head_sha": "abc"},
            "repository": repo("o/r"), "installation": inst});
        assert!(matches!(
            parse("check_suite", completed.to_string().as_bytes()).unwrap(),
            Trigger::Ignore(_)
        ));
        assert_eq!(parse("ping", b"{}").unwrap(), Trigger::Ping);
        assert!(matches!(parse("star", b"{}").unwrap(), Trigger::Ignore(_)));
        // A known event with a broken payload is an error, not a silent ignore.
        assert!(parse("check_suite", b"{\"action\": \"requested\"}").is_err());
    }

    #[test]
    fn pull_requests_only_from_forks() {
        let pr = |head_repo: &str| {
            json!({"action": "synchronize", "number": 3,
                   "pull_request": {"number": 3, "head": {"sha": "def", "repo": repo(head_repo)}},
                   "repository": repo("o/r"), "installation": {"id": 1}})
            .to_string()
        };
        assert!(matches!(
            parse("pull_request", pr("o/r").as_bytes()).unwrap(),
            Trigger::Ignore(_)
        ));
        let Trigger::RunAll(t) = parse("pull_request", pr("fork/r").as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(t.sha, "def");
        assert_eq!(t.clone_url, "https://github.com/o/r.git");
        assert_eq!(t.refspecs, ["+refs/pull/3/head:refs/remotes/pull/3/head"]);
    }
}
