//! The job payload GitLab hands out (`POST /jobs/request` → 201), as serde types. Unknown
//! fields are ignored (GitLab adds fields all the time); `null` in any optional field means
//! GitLab's default, exactly as if the field were absent (the fixtures in `fixtures/` pin this). Parsing happens in two stages so that a payload too broken to run can
//! still be reported against its job: [`JobHandle`] (id and token) first, then [`Job`].

use std::collections::HashMap;

use serde::{Deserialize, Deserializer};

/// Just enough of a payload to report on the job, even when the rest is unusable.
#[derive(Debug, Clone, Deserialize)]
pub struct JobHandle {
    pub id: u64,
    pub token: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Job {
    pub id: u64,
    pub token: String,
    #[serde(default, deserialize_with = "null_default")]
    pub allow_git_fetch: bool,
    pub job_info: JobInfo,
    pub git_info: GitInfo,
    pub runner_info: RunnerInfo,
    #[serde(default, deserialize_with = "null_default")]
    pub variables: Vec<Variable>,
    #[serde(default, deserialize_with = "null_default")]
    pub steps: Vec<Step>,
    #[serde(default, deserialize_with = "null_default")]
    pub artifacts: Vec<Artifact>,
    #[serde(default, deserialize_with = "null_default")]
    pub features: Features,
    /// The job's `image:` (which VM, see `prepare::vm_choice`).
    #[serde(default, deserialize_with = "null_default")]
    pub image: Option<Image>,
    /// The job's `services:`; refused (each job is one VM), never silently dropped.
    #[serde(default, deserialize_with = "null_default")]
    pub services: Vec<Service>,
    /// Earlier jobs whose artifacts this job gets (`dependencies:`/`needs:`).
    #[serde(default, deserialize_with = "null_default")]
    pub dependencies: Vec<Dependency>,
    /// The job's `cache:` entries, keys resolved by GitLab (`key:files` hashed, the
    /// `-protected`/`-non_protected` suffix added).
    #[serde(default, deserialize_with = "null_default")]
    pub cache: Vec<Cache>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Cache {
    #[serde(default, deserialize_with = "null_default")]
    pub key: String,
    #[serde(default, deserialize_with = "null_default")]
    pub untracked: bool,
    #[serde(default, deserialize_with = "null_default")]
    pub policy: CachePolicy,
    #[serde(default, deserialize_with = "null_default")]
    pub paths: Vec<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub when: When,
    /// Keys to restore from, in order, when `key` has no cache yet.
    #[serde(default, deserialize_with = "null_default")]
    pub fallback_keys: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CachePolicy {
    Pull,
    Push,
    #[default]
    PullPush,
}

impl CachePolicy {
    pub fn pulls(self) -> bool {
        self != CachePolicy::Push
    }
    pub fn pushes(self) -> bool {
        self != CachePolicy::Pull
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Image {
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Service {
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
}

/// An earlier job of the pipeline; its artifacts are fetched with its own `token`.
#[derive(Debug, Clone, Deserialize)]
pub struct Dependency {
    pub id: u64,
    pub token: String,
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    /// Absent when that job left no artifacts archive.
    #[serde(default, deserialize_with = "null_default")]
    pub artifacts_file: Option<ArtifactsFile>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ArtifactsFile {
    #[serde(default, deserialize_with = "null_default")]
    pub filename: String,
    /// Bytes, as GitLab stored them (a hint: the download is bounded on its own).
    #[serde(default, deserialize_with = "null_default")]
    pub size: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct JobInfo {
    pub name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub stage: String,
    #[serde(default, deserialize_with = "null_default")]
    pub project_id: u64,
    #[serde(default, deserialize_with = "null_default")]
    pub project_name: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GitInfo {
    pub repo_url: String,
    #[serde(rename = "ref", default, deserialize_with = "null_default")]
    pub git_ref: String,
    pub sha: String,
    #[serde(default, deserialize_with = "null_default")]
    pub refspecs: Vec<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub depth: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RunnerInfo {
    /// Job timeout in seconds.
    pub timeout: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Variable {
    pub key: String,
    #[serde(default, deserialize_with = "null_default")]
    pub value: String,
    #[serde(default, deserialize_with = "null_default")]
    pub public: bool,
    #[serde(default, deserialize_with = "null_default")]
    pub file: bool,
    #[serde(default, deserialize_with = "null_default")]
    pub masked: bool,
    #[serde(default, deserialize_with = "null_default")]
    pub raw: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Step {
    pub name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub script: Vec<String>,
    /// Seconds; 0 when GitLab sends none.
    #[serde(default, deserialize_with = "null_default")]
    pub timeout: u64,
    #[serde(default, deserialize_with = "null_default")]
    pub when: When,
    #[serde(default, deserialize_with = "null_default")]
    pub allow_failure: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// GitLab's default for steps and artifacts alike.
    #[default]
    OnSuccess,
    OnFailure,
    Always,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Artifact {
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub paths: Vec<String>,
    /// Also the workspace's files that git does not track (ignored ones included).
    #[serde(default, deserialize_with = "null_default")]
    pub untracked: bool,
    #[serde(default, deserialize_with = "null_default")]
    pub when: When,
    #[serde(default = "archive", deserialize_with = "null_archive")]
    pub artifact_type: String,
    #[serde(default, deserialize_with = "null_default")]
    pub artifact_format: String,
    #[serde(default, deserialize_with = "null_default")]
    pub expire_in: String,
}

fn archive() -> String {
    "archive".into()
}

fn null_archive<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?
        .filter(|s| !s.is_empty())
        .unwrap_or_else(archive))
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Features {
    #[serde(default, deserialize_with = "null_default")]
    pub failure_reasons: Vec<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub token_mask_prefixes: Vec<String>,
}

/// `null` (or a missing field) as the type's default.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Why a payload cannot be run; its [`chain`](crate::outcome::chain) is one line, shown in
/// the job log and the service log.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("the job payload from GitLab is not usable")]
    Payload(#[source] serde_json::Error),
    #[error("the job payload from GitLab is not usable: field `{field}`")]
    Field {
        field: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl Job {
    pub fn parse(body: &[u8]) -> Result<Job, JobError> {
        serde_json::from_slice(body).map_err(|e| Job::explain(body, e))
    }

    /// Names the top-level field that broke parsing (serde_json's message has only a
    /// line and column, which mean nothing to whoever reads the job log).
    fn explain(body: &[u8], e: serde_json::Error) -> JobError {
        fn check<T: serde::de::DeserializeOwned>(
            v: &serde_json::Value,
        ) -> Option<serde_json::Error> {
            serde_json::from_value::<T>(v.clone()).err()
        }
        type Check = fn(&serde_json::Value) -> Option<serde_json::Error>;
        let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) else {
            return JobError::Payload(e);
        };
        let null = serde_json::Value::Null;
        let fields: [(&'static str, Check); 13] = [
            ("id", check::<u64>),
            ("token", check::<String>),
            ("job_info", check::<JobInfo>),
            ("git_info", check::<GitInfo>),
            ("runner_info", check::<RunnerInfo>),
            ("variables", check::<Option<Vec<Variable>>>),
            ("steps", check::<Option<Vec<Step>>>),
            ("artifacts", check::<Option<Vec<Artifact>>>),
            ("features", check::<Option<Features>>),
            ("image", check::<Option<Image>>),
            ("services", check::<Option<Vec<Service>>>),
            ("dependencies", check::<Option<Vec<Dependency>>>),
            ("cache", check::<Option<Vec<Cache>>>),
        ];
        for (field, check) in fields {
            if let Some(source) = check(map.get(field).unwrap_or(&null)) {
                return JobError::Field { field, source };
            }
        }
        JobError::Payload(e)
    }

    /// The value of variable `key` as GitLab sent it (the last one wins, as in GitLab).
    pub fn var(&self, key: &str) -> Option<&str> {
        self.variables
            .iter()
            .rev()
            .find(|v| v.key == key)
            .map(|v| v.value.as_str())
    }

    /// Values to mask in the log: masked variables, plus the job tokens (always secret).
    pub fn secrets(&self) -> Vec<String> {
        let mut s: Vec<String> = self
            .variables
            .iter()
            .filter(|v| v.masked && !v.value.is_empty())
            .map(|v| v.value.clone())
            .collect();
        s.push(self.token.clone());
        s.extend(
            self.dependencies
                .iter()
                .filter(|d| !d.token.is_empty())
                .map(|d| d.token.clone()),
        );
        s
    }
}

/// Expands `$NAME` and `${NAME}` in `value` from `vars` (unknown names become empty, `$$` is
/// a literal `$`), as GitLab does for variables that are not `raw`.
pub fn expand(value: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            match r.find('}') {
                Some(end) => {
                    out.push_str(vars.get(&r[..end]).map(String::as_str).unwrap_or(""));
                    rest = &r[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if len == 0 {
                out.push('$');
            } else {
                out.push_str(vars.get(&after[..len]).map(String::as_str).unwrap_or(""));
            }
            rest = &after[len..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion() {
        let vars: HashMap<String, String> = [("A", "1"), ("B_2", "two")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // (input, expected)
        let cases = [
            ("x$A-y", "x1-y"),
            ("${B_2}x", "twox"),
            ("$$A", "$A"),            // escaped dollar
            ("$NOPE.", "."),          // unknown: empty
            ("cost: 5$", "cost: 5$"), // trailing dollar stays
            ("${A", "${A"),           // unclosed brace stays
        ];
        for (input, want) in cases {
            assert_eq!(expand(input, &vars), want, "{input}");
        }
    }

    #[test]
    fn unknown_fields_and_nulls_are_fine() {
        let body = br#"{"id":7,"token":"t","new_field":{"x":1},"job_info":{"name":"j","project_id":1},
            "git_info":{"repo_url":"https://x/y.git","sha":"abc","refspecs":null},
            "runner_info":{"timeout":3600},"variables":null,"steps":[{"name":"script","script":["true"],"when":"on_success"}],
            "artifacts":null,"features":null}"#;
        let job = Job::parse(body).unwrap();
        assert_eq!(job.id, 7);
        assert!(job.artifacts.is_empty() && job.variables.is_empty());
        assert_eq!(job.steps[0].when, When::OnSuccess);
    }

    const FULL: &str = include_str!("fixtures/job-full.json");
    const NULLS: &str = include_str!("fixtures/job-optional-null.json");
    const ABSENT: &str = include_str!("fixtures/job-optional-absent.json");

    /// Fields a payload cannot do without (as `/`-joined paths; `[]` is any list element).
    const REQUIRED: [&str; 13] = [
        "id",
        "token",
        "job_info",
        "job_info/name",
        "git_info",
        "git_info/repo_url",
        "git_info/sha",
        "runner_info",
        "runner_info/timeout",
        "variables/[]/key",
        "steps/[]/name",
        "dependencies/[]/id",
        "dependencies/[]/token",
    ];

    fn parse(v: &serde_json::Value) -> Job {
        Job::parse(v.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("{}\n{v:#}", crate::outcome::chain(&e)))
    }

    #[test]
    fn fixtures_with_optional_fields_null_or_absent_mean_the_defaults() {
        let full = Job::parse(FULL.as_bytes()).unwrap();
        assert_eq!(full.artifacts[1].when, When::OnFailure);
        assert_eq!(full.secrets(), ["hunter22", "glcbt-full", "glcbt-dep"]);
        assert_eq!(
            full.dependencies[0].artifacts_file.as_ref().unwrap().size,
            1234
        );
        assert_eq!(full.services[0].name, "postgres:16");
        assert_eq!(full.cache[0].policy, CachePolicy::Pull);
        assert_eq!(full.cache[0].fallback_keys, ["main-protected"]);
        let nulls = Job::parse(NULLS.as_bytes()).unwrap();
        let absent = Job::parse(ABSENT.as_bytes()).unwrap();
        for job in [&nulls, &absent] {
            let a = &job.artifacts[0];
            assert_eq!(
                (a.when, a.artifact_type.as_str(), a.paths.len()),
                (When::OnSuccess, "archive", 0)
            );
            let s = &job.steps[0];
            assert_eq!(
                (s.when, s.timeout, s.allow_failure),
                (When::OnSuccess, 0, false)
            );
            assert_eq!(job.variables[0].value, "");
            assert!(!job.variables[0].masked && job.git_info.refspecs.is_empty());
        }
        // Null and absent are the same job (ids and tokens aside).
        let strip = |j: &Job| {
            format!(
                "{:?}",
                Job {
                    id: 0,
                    token: String::new(),
                    ..j.clone()
                }
            )
        };
        assert_eq!(strip(&nulls), strip(&absent));
    }

    /// Every field of the full fixture that is not required, set to null or removed, still
    /// parses, and both give the same job: no optional field can fail a job by being null.
    #[test]
    fn every_optional_field_may_be_null_or_absent() {
        fn paths(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, child) in m {
                        let p = if at.is_empty() {
                            k.clone()
                        } else {
                            format!("{at}/{k}")
                        };
                        out.push(p.clone());
                        paths(child, p, out);
                    }
                }
                serde_json::Value::Array(items) => {
                    for child in items.iter().take(1) {
                        paths(child, format!("{at}/[]"), out);
                    }
                }
                _ => {}
            }
        }
        // Applies `f` to the parent object of `path` (every element of a list on the way).
        fn edit(
            v: &mut serde_json::Value,
            path: &[&str],
            f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>, &str),
        ) {
            match (path, v) {
                ([last], serde_json::Value::Object(m)) => f(m, last),
                (["[]", rest @ ..], serde_json::Value::Array(items)) => {
                    items.iter_mut().for_each(|i| edit(i, rest, f))
                }
                ([first, rest @ ..], serde_json::Value::Object(m)) => {
                    if let Some(child) = m.get_mut(*first) {
                        edit(child, rest, f)
                    }
                }
                _ => {}
            }
        }
        let full: serde_json::Value = serde_json::from_str(FULL).unwrap();
        let mut all = Vec::new();
        paths(&full, String::new(), &mut all);
        let optional: Vec<&String> = all
            .iter()
            .filter(|p| !REQUIRED.contains(&p.as_str()))
            .collect();
        assert!(optional.len() > 30, "{optional:?}");
        for path in optional {
            let parts: Vec<&str> = path.split('/').collect();
            let mut nulled = full.clone();
            edit(&mut nulled, &parts, &|m, k| {
                m.insert(k.to_string(), serde_json::Value::Null);
            });
            let mut removed = full.clone();
            edit(&mut removed, &parts, &|m, k| {
                m.remove(k);
            });
            assert_eq!(
                format!("{:?}", parse(&nulled)),
                format!("{:?}", parse(&removed)),
                "{path}: null and absent differ"
            );
        }
    }

    #[test]
    fn bad_fields_are_refused_but_the_handle_survives() {
        let body =
            br#"{"id":8,"token":"t","job_info":{"name":"j"},"git_info":{"repo_url":"u","sha":"s"},
            "runner_info":{"timeout":"soon"}}"#;
        let e = Job::parse(body).unwrap_err().to_string();
        assert!(e.contains("not usable") && e.contains("runner_info"), "{e}");
        let h: JobHandle = serde_json::from_slice(body).unwrap();
        assert_eq!(h.id, 8);
    }

    #[test]
    fn the_printed_chain_names_the_cause_once() {
        let body =
            br#"{"id":8,"token":"t","job_info":{"name":"j"},"git_info":{"repo_url":"u","sha":"s"},
            "runner_info":{"timeout":"soon"}}"#;
        let chain = crate::outcome::chain(&Job::parse(body).unwrap_err());
        assert!(chain.contains("field `runner_info`"), "{chain}");
        assert_eq!(chain.matches("invalid type").count(), 1, "{chain}");
    }
}
