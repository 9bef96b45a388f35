//! The CI templates under ci-templates/github/ cannot rot: each is parsed as YAML, every
//! `runner ...` command in its scripts (including ones inside `$(...)`) is expanded the way
//! the Actions runner would — inputs at their defaults, each matrix value, the job's and
//! step's `env` — and parsed by runner's real command line (`Cli::try_parse_from`). A flag
//! that no longer exists, a misspelt variable or an unknown input fails here, not in a user's
//! pipeline.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Parser as _;
use e2e::{cache_dir, runner, workspace_root};
use runner::cli::Cli;
use yaml_rust2::{Yaml, YamlLoader};

fn templates() -> Vec<(PathBuf, Yaml)> {
    let dir = workspace_root().join("ci-templates/github");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("ci-templates/github") {
        let path = entry.unwrap().path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext != "yml" && ext != "yaml" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut docs = YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
        assert_eq!(docs.len(), 1, "{}", path.display());
        out.push((path, docs.remove(0)));
    }
    assert!(!out.is_empty(), "no templates in {}", dir.display());
    out
}

fn scalar(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// What `${{ ... }}` and `$VAR` expand to for one job and matrix combination.
struct Context {
    inputs: HashMap<String, String>,
    matrix: HashMap<String, String>,
    /// The job's number of matrix combinations (`strategy.job-total`).
    job_total: usize,
    env: HashMap<String, String>,
}

impl Context {
    /// Evaluates the expressions this project's templates use; others become "x".
    fn expr(&self, e: &str) -> String {
        let e = e.trim();
        if let Some(name) = e.strip_prefix("inputs.") {
            return self
                .inputs
                .get(name)
                .unwrap_or_else(|| panic!("unknown input '{name}'"))
                .clone();
        }
        if let Some(name) = e.strip_prefix("matrix.") {
            return self
                .matrix
                .get(name)
                .unwrap_or_else(|| panic!("unknown matrix key '{name}'"))
                .clone();
        }
        if e == "strategy.job-total" {
            return self.job_total.to_string();
        }
        if let Some(name) = e.strip_prefix("env.") {
            return self
                .env
                .get(name)
                .unwrap_or_else(|| panic!("unknown env '{name}'"))
                .clone();
        }
        "x".into()
    }

    fn expand_exprs(&self, s: &str) -> String {
        let mut out = String::new();
        let mut rest = s;
        while let Some(start) = rest.find("${{") {
            out.push_str(&rest[..start]);
            let end = rest[start..].find("}}").expect("unclosed ${{") + start;
            out.push_str(&self.expr(&rest[start + 3..end]));
            rest = &rest[end + 2..];
        }
        out.push_str(rest);
        out
    }

    /// A shell variable: the job's or step's env, or one the Actions runner sets.
    fn var(&self, name: &str) -> String {
        match name {
            "GITHUB_OUTPUT" | "GITHUB_STEP_SUMMARY" | "GITHUB_PATH" | "GITHUB_ENV" => {
                "/tmp/github-file".into()
            }
            "HOME" => "/root".into(),
            "GITHUB_RUN_ID" => "1234".into(),
            "GITHUB_REPOSITORY" => "octo/demo".into(),
            _ => self
                .env
                .get(name)
                .unwrap_or_else(|| panic!("script uses ${name}, which no env defines"))
                .clone(),
        }
    }
}

/// The value given to variables a script sets itself.
const SCRIPT_VALUE: &str = "script-value";

/// Names a script assigns: `NAME=value` at a command's start and `for NAME in`.
fn script_variables(script: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in script.lines() {
        for part in line.split([';', '&', '|']) {
            let t = part.trim_start();
            let t = t.strip_prefix("export ").unwrap_or(t);
            if let Some(rest) = t.strip_prefix("for ") {
                if let Some(name) = rest.split_whitespace().next() {
                    names.push(name.to_string());
                }
            } else if let Some((name, _)) = t.split_once('=') {
                if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    names.push(name.to_string());
                }
            }
        }
    }
    names
}

/// Splits a command line the way sh would for the simple forms templates use: words,
/// "double quotes" (with $VAR expanded), 'single quotes', $VAR and ${VAR}.
fn words(line: &str, ctx: &Context) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (None | Some('"'), '$') => {
                let braced = chars.peek() == Some(&'{');
                if braced {
                    chars.next();
                }
                let mut name = String::new();
                while let Some(&n) = chars.peek() {
                    if n.is_ascii_alphanumeric() || n == '_' {
                        name.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                if braced {
                    assert_eq!(chars.next(), Some('}'), "in {line}");
                }
                let value = ctx.var(&name);
                if quote.is_none() {
                    // Unquoted: sh splits the value into words.
                    for (i, part) in value.split_whitespace().enumerate() {
                        if i > 0 {
                            out.push(std::mem::take(&mut cur));
                        }
                        cur.push_str(part);
                        in_word = true;
                    }
                } else {
                    cur.push_str(&value);
                    in_word = true;
                }
            }
            (_, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    assert!(quote.is_none(), "unclosed quote in {line}");
    if in_word {
        out.push(cur);
    }
    out
}

/// Every `runner ...` command in a script: at the start of a line, after `&&`, `||`, `;`,
/// `|`, or inside `$(...)`.
fn runner_commands(script: &str) -> Vec<String> {
    let joined = script.replace("\\\n", " ");
    let mut found = Vec::new();
    for line in joined.lines() {
        let mut starts = vec![0];
        for sep in ["&&", "||", ";", "|", "$("] {
            starts.extend(line.match_indices(sep).map(|(i, _)| i + sep.len()));
        }
        for s in starts {
            let rest = line[s..].trim_start();
            if !rest.starts_with("runner ") {
                continue;
            }
            // Up to the end of this command.
            let inside_subst = line[..s].ends_with("$(");
            let end = if inside_subst {
                let mut depth = 1;
                let mut end = rest.len();
                for (i, c) in rest.char_indices() {
                    match c {
                        '(' => depth += 1,
                        ')' => {
                            depth -= 1;
                            if depth == 0 {
                                end = i;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            } else {
                ["&&", "||", ";", " | ", " >"]
                    .iter()
                    .filter_map(|t| rest.find(t))
                    .min()
                    .unwrap_or(rest.len())
            };
            found.push(rest[..end].trim().to_string());
        }
    }
    found
}

fn hash_env(y: &Yaml, ctx: &Context) -> HashMap<String, String> {
    y.as_hash()
        .map(|h| {
            h.iter()
                .map(|(k, v)| {
                    (
                        scalar(k).unwrap(),
                        ctx.expand_exprs(&scalar(v).unwrap_or_default()),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_runner_command_in_the_templates_parses_with_the_real_cli() {
    let mut checked = 0;
    for (path, doc) in templates() {
        let name = path.display();
        let on = &doc["on"];
        assert!(!on.is_badvalue(), "{name}: no `on:`");
        // Inputs at their defaults (required ones get a plausible value).
        let mut inputs = HashMap::new();
        if let Some(h) = on["workflow_call"]["inputs"].as_hash() {
            for (k, v) in h {
                let value = scalar(&v["default"]).unwrap_or_else(|| "owner/name".into());
                inputs.insert(scalar(k).unwrap(), value);
            }
        }
        let jobs = doc["jobs"]
            .as_hash()
            .unwrap_or_else(|| panic!("{name}: no jobs"));
        for (job_name, job) in jobs {
            let job_name = scalar(job_name).unwrap();
            // Each matrix value of each key (the templates use one key per matrix).
            let mut combos = vec![HashMap::new()];
            if let Some(m) = job["strategy"]["matrix"].as_hash() {
                combos.clear();
                for (k, v) in m {
                    let key = scalar(k).unwrap();
                    let values: Vec<String> = match v {
                        Yaml::Array(a) => a.iter().filter_map(scalar).collect(),
                        other => {
                            // fromJSON(inputs.X): the input's default, as JSON.
                            let e = scalar(other).unwrap();
                            let input = e
                                .split("inputs.")
                                .nth(1)
                                .and_then(|r| r.split(')').next())
                                .unwrap_or_else(|| panic!("{name}: matrix {key} = {e}"));
                            let json: Vec<String> =
                                serde_json::from_str(&inputs[input.trim()]).unwrap();
                            json
                        }
                    };
                    assert!(!values.is_empty(), "{name}: empty matrix {key}");
                    combos.extend(
                        values
                            .into_iter()
                            .map(|v| HashMap::from([(key.clone(), v)])),
                    );
                }
            }
            let job_total = combos.len();
            for matrix in combos {
                let mut ctx = Context {
                    inputs: inputs.clone(),
                    matrix,
                    job_total,
                    env: HashMap::new(),
                };
                ctx.env = hash_env(&doc["env"], &ctx);
                let job_env = hash_env(&job["env"], &ctx);
                ctx.env.extend(job_env);
                let steps = job["steps"]
                    .as_vec()
                    .unwrap_or_else(|| panic!("{name}: job {job_name} has no steps"));
                for step in steps {
                    let uses = step["uses"].as_str();
                    let run = step["run"].as_str();
                    assert!(
                        uses.is_some() != run.is_some(),
                        "{name}: a step needs exactly one of uses/run: {step:?}"
                    );
                    if let Some(u) = uses {
                        // Pinned: a moving default branch would change CI under users' feet.
                        let local = u.starts_with("./") || u.starts_with("docker://");
                        assert!(local || u.contains('@'), "{name}: unpinned action {u}");
                    }
                    let Some(script) = run else { continue };
                    let saved = ctx.env.clone();
                    let step_env = hash_env(&step["env"], &ctx);
                    ctx.env.extend(step_env);
                    let script = ctx.expand_exprs(script);
                    // Variables the script sets itself (`NAME=...`, `for NAME in`) are fine;
                    // their value is unknown here.
                    for name in script_variables(&script) {
                        ctx.env.entry(name).or_insert_with(|| SCRIPT_VALUE.into());
                    }
                    for cmd in runner_commands(&script) {
                        let argv = words(&cmd, &ctx);
                        match Cli::try_parse_from(&argv) {
                            Err(e) => panic!("{name}: job {job_name}: `{cmd}` → {argv:?} is not a valid runner command line:\n{e}"),
                            // Values clap leaves as strings: the architectures at least.
                            Ok(Cli { command: runner::cli::Command::Test(t), .. }) => {
                                for a in t.arch.iter().filter(|a| *a != SCRIPT_VALUE) {
                                    assert!(["riscv64", "aarch64", "x86_64"].contains(&a.as_str()), "{name}: arch {a}");
                                }
                            }
                            Ok(Cli { command: runner::cli::Command::Matrix(m), .. }) => {
                                check_shard(&m, &format!("{name}: job {job_name}"));
                            }
                            Ok(_) => {}
                        }
                        checked += 1;
                    }
                    ctx.env = saved;
                }
            }
        }
    }
    assert!(checked >= 3, "only {checked} runner commands found");
}

/// A `--shard K/N` in a template is a valid one (the CLI keeps it as text until it runs).
fn check_shard(m: &runner::cli::MatrixArgs, what: &str) {
    if let Some(s) = &m.shard {
        if let Err(e) = s.parse::<runner::matrix::shard::Shard>() {
            panic!("{what}: {e}");
        }
    }
}

#[test]
fn the_matrix_workflow_caches_on_the_image_key_and_reports() {
    let (_, doc) = templates()
        .into_iter()
        .find(|(p, _)| p.ends_with("runner-matrix.yml"))
        .expect("runner-matrix.yml");
    assert!(
        !doc["on"]["workflow_call"].is_badvalue(),
        "reusable workflow"
    );
    let job = &doc["jobs"]["test"];
    assert_eq!(
        job["strategy"]["fail-fast"].as_bool(),
        Some(false),
        "one arch failing must not cancel the others"
    );
    let steps = job["steps"].as_vec().unwrap();
    let step = |pred: &dyn Fn(&Yaml) -> bool| steps.iter().find(|s| pred(s)).cloned();
    let key_step = step(&|s| s["id"].as_str() == Some("image-key")).expect("image-key step");
    assert!(key_step["run"]
        .as_str()
        .unwrap()
        .contains("runner images key"));
    let cache = step(&|s| {
        s["uses"]
            .as_str()
            .is_some_and(|u| u.starts_with("actions/cache@"))
            && s["with"]["path"].as_str() == Some("~/.cache/runner/images")
    })
    .expect("an actions/cache step for the images");
    assert!(cache["with"]["key"]
        .as_str()
        .unwrap()
        .contains("steps.image-key.outputs.key"));
    let test = step(&|s| s["run"].as_str().is_some_and(|r| r.contains("runner test")))
        .expect("runner test step");
    let run = test["run"].as_str().unwrap();
    for flag in ["--arch", "--junit", "--summary \"$GITHUB_STEP_SUMMARY\""] {
        assert!(run.contains(flag), "{flag} missing: {run}");
    }
    let upload = step(&|s| {
        s["uses"]
            .as_str()
            .is_some_and(|u| u.starts_with("actions/upload-artifact@"))
    })
    .expect("upload step");
    assert_eq!(
        upload["if"].as_str(),
        Some("always()"),
        "upload failing runs too"
    );
    // Failed VMs: off unless asked for, packed by runner itself (which prints the commands
    // for the summary), uploaded on failure only, and never raw inside the other artifact.
    let inputs = &doc["on"]["workflow_call"]["inputs"];
    assert_eq!(inputs["keep-failed"]["default"].as_bool(), Some(false));
    assert_eq!(
        test["env"]["RUNNER_KEEP_FAILED"].as_str(),
        Some("${{ inputs.keep-failed }}")
    );
    assert!(upload["with"]["path"]
        .as_str()
        .unwrap()
        .contains("!${{ env.OUT }}/*/failed-vm"));
    let pack = step(&|s| s["run"].as_str().is_some_and(|r| r.contains("--pack")))
        .expect("a step packing the failed VMs");
    assert_eq!(pack["if"].as_str(), Some("failure()"));
    let script = pack["run"].as_str().unwrap();
    for want in [
        "runner debug \"$dir\" --pack",
        "gh run download $GITHUB_RUN_ID -R $GITHUB_REPOSITORY -n $FAILED_VM_ARTIFACT",
        ">> \"$GITHUB_STEP_SUMMARY\"",
    ] {
        assert!(script.contains(want), "{want} missing: {script}");
    }
    let vm_upload = step(&|s| {
        s["uses"]
            .as_str()
            .is_some_and(|u| u.starts_with("actions/upload-artifact@"))
            && s["with"]["name"].as_str() == Some("${{ env.FAILED_VM_ARTIFACT }}")
    })
    .expect("an upload of the failed VMs");
    assert_eq!(vm_upload["if"].as_str(), Some("failure()"));
    assert_eq!(
        vm_upload["with"]["path"].as_str(),
        Some("runner-failed-vm/")
    );
    assert_eq!(
        job["env"]["FAILED_VM_ARTIFACT"].as_str(),
        Some("runner-failed-vm-${{ matrix.arch }}")
    );
}

#[test]
fn images_key_names_the_cached_image_directory() {
    // scripts/test builds the images before the tests; the key must name that directory.
    let r = runner(
        &workspace_root(),
        &["images", "key", "--arch", "riscv64,aarch64"],
    );
    assert_eq!(r.code, 0, "{r}");
    let keys: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(keys.len(), 2, "{r}");
    for (key, arch) in keys.iter().zip(["riscv64", "aarch64"]) {
        let hash = key
            .strip_prefix(&format!("debian-13-{arch}-"))
            .unwrap_or_else(|| panic!("{key}"));
        assert!(
            hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()),
            "{key}"
        );
    }
    let riscv = cache_dir().join("images").join(keys[0]);
    assert!(
        riscv.join("manifest.json").is_file(),
        "{} is not the cached image",
        riscv.display()
    );
    // A bad architecture is a config error, as everywhere else.
    let r = runner(&workspace_root(), &["images", "key", "--arch", "mips"]);
    assert_eq!(r.code, 78, "{r}");
}

#[test]
fn the_word_splitter_and_command_finder_work() {
    let ctx = Context {
        inputs: HashMap::new(),
        matrix: HashMap::new(),
        job_total: 1,
        env: HashMap::from([("A".to_string(), "x y".to_string())]),
    };
    assert_eq!(
        words(r#"runner test --arch "$A" '$A' ${A}"#, &ctx),
        ["runner", "test", "--arch", "x y", "$A", "x", "y"]
    );
    let script = "echo \"k=$(runner images key --arch \"$A\")\" >> f\nrunner test \\\n  --arch z && echo done\n";
    assert_eq!(
        script_variables("X=1; for a in b c; do echo; done\nexport Y=2 && echo Z=3"),
        ["X", "a", "Y"]
    );
    assert_eq!(
        runner_commands(script),
        ["runner images key --arch \"$A\"", "runner test    --arch z"]
    );
}

// ---- GitLab templates (ci-templates/gitlab/) ----

/// Every GitLab CI template, parsed.
fn gitlab_templates() -> Vec<(PathBuf, Yaml)> {
    let dir = workspace_root().join("ci-templates/gitlab");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("ci-templates/gitlab") {
        let path = entry.unwrap().path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !(name.ends_with(".yml") || name.ends_with(".yaml")) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut docs = YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
        assert_eq!(docs.len(), 1, "{}", path.display());
        out.push((path, docs.remove(0)));
    }
    assert!(!out.is_empty(), "no templates in {}", dir.display());
    out
}

/// Top-level keys of a .gitlab-ci.yml that are not jobs.
const GITLAB_GLOBAL_KEYS: [&str; 10] = [
    "stages",
    "variables",
    "default",
    "include",
    "workflow",
    "image",
    "services",
    "cache",
    "before_script",
    "after_script",
];

/// Variables GitLab itself defines that the templates may use.
const GITLAB_PREDEFINED: [(&str, &str); 4] = [
    ("CI_PROJECT_DIR", "/builds/group/project"),
    ("CI_PIPELINE_SOURCE", "schedule"),
    ("CI_COMMIT_SHA", "0123456789abcdef0123456789abcdef01234567"),
    ("CI_JOB_ID", "1"),
];

/// A GitLab `variables:` map (plain values or `{value: ..., description: ...}`).
fn gitlab_variables(y: &Yaml) -> HashMap<String, String> {
    let Some(h) = y.as_hash() else {
        return HashMap::new();
    };
    h.iter()
        .map(|(k, v)| {
            let value = scalar(v)
                .or_else(|| scalar(&v["value"]))
                .unwrap_or_default();
            (scalar(k).unwrap(), value)
        })
        .collect()
}

/// Every `runner ...` command of every job (script, before_script, after_script), with the
/// job's and the global variables, checked by the real command line; returns how many.
fn check_gitlab_template(name: &str, doc: &Yaml) -> usize {
    let stages: Vec<String> = doc["stages"]
        .as_vec()
        .map(|v| v.iter().filter_map(scalar).collect())
        .unwrap_or_default();
    let globals = gitlab_variables(&doc["variables"]);
    let jobs = doc.as_hash().unwrap_or_else(|| panic!("{name}: not a map"));
    let mut checked = 0;
    for (job_name, job) in jobs {
        let job_name = scalar(job_name).unwrap();
        if GITLAB_GLOBAL_KEYS.contains(&job_name.as_str()) {
            continue;
        }
        // `extends:` one hidden job: its keys, overridden by the job's own.
        let parent = match job["extends"].as_str() {
            Some(p) => {
                let parent = &doc[p];
                assert!(
                    !parent.is_badvalue(),
                    "{name}: job {job_name} extends unknown {p}"
                );
                parent.clone()
            }
            None => Yaml::BadValue,
        };
        let field = |key: &str| {
            let own = &job[key];
            if own.is_badvalue() {
                parent[key].clone()
            } else {
                own.clone()
            }
        };
        assert!(
            field("script").as_vec().is_some(),
            "{name}: job {job_name} has no script list"
        );
        if let Some(stage) = field("stage").as_str() {
            assert!(
                stages.iter().any(|s| s == stage),
                "{name}: job {job_name}: stage {stage} is not in stages {stages:?}"
            );
        }
        let mut env: HashMap<String, String> = GITLAB_PREDEFINED
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.extend(globals.clone());
        env.extend(gitlab_variables(&parent["variables"]));
        env.extend(gitlab_variables(&job["variables"]));
        // `parallel: N`: N copies of the job, told apart by CI_NODE_INDEX (1..=N).
        let nodes = field("parallel").as_i64().unwrap_or(1);
        assert!(
            (1..=200).contains(&nodes),
            "{name}: job {job_name}: parallel {nodes}"
        );
        for node in 1..=nodes {
            let mut ctx = Context {
                inputs: HashMap::new(),
                matrix: HashMap::new(),
                job_total: 1,
                env: env.clone(),
            };
            ctx.env.insert("CI_NODE_TOTAL".into(), nodes.to_string());
            if field("parallel").as_i64().is_some() {
                ctx.env.insert("CI_NODE_INDEX".into(), node.to_string());
            }
            for key in ["before_script", "script", "after_script"] {
                let lines: Vec<String> = field(key)
                    .as_vec()
                    .map(|v| v.iter().filter_map(scalar).collect())
                    .unwrap_or_default();
                let script = lines.join("\n");
                for var in script_variables(&script) {
                    ctx.env.entry(var).or_insert_with(|| SCRIPT_VALUE.into());
                }
                for cmd in runner_commands(&script) {
                    let argv = words(&cmd, &ctx);
                    match Cli::try_parse_from(&argv) {
                        Err(e) => panic!("{name}: job {job_name}: `{cmd}` → {argv:?} is not a valid runner command line:\n{e}"),
                        Ok(Cli { command: runner::cli::Command::Matrix(m), .. }) => {
                            check_shard(&m, &format!("{name}: job {job_name}"));
                        }
                        Ok(_) => {}
                    }
                    checked += 1;
                }
            }
        }
    }
    checked
}

#[test]
fn every_runner_command_in_the_gitlab_templates_parses_with_the_real_cli() {
    let mut checked = 0;
    for (path, doc) in gitlab_templates() {
        let name = path.display().to_string();
        let found = check_gitlab_template(&name, &doc);
        // The nightly template is one `runner matrix` command; the example pipeline has none.
        if name.ends_with("nightly-matrix.gitlab-ci.yml") {
            assert!(found >= 1, "{name}: no runner command found");
        }
        checked += found;
    }
    assert!(checked >= 1, "no runner command in any GitLab template");
}

#[test]
fn the_gitlab_template_check_catches_a_misspelt_flag_and_an_unknown_variable() {
    // (template text, what the panic must mention)
    let cases = [
        (
            "stages: [t]\nj:\n  stage: t\n  script:\n    - runner matrix m.toml --fail-onn regression\n",
            "--fail-onn",
        ),
        (
            "stages: [t]\nj:\n  stage: t\n  variables: {MATRIX_FILE: m.toml}\n  script:\n    - runner matrix \"$MATRIX_FIEL\"\n",
            "MATRIX_FIEL",
        ),
        (
            "stages: [t]\nj:\n  stage: t\n  parallel: 3\n  script:\n    - runner matrix m.toml --shard \"$CI_NODE_INDEX/2\"\n",
            "--shard '3/2': K must be between 1 and N",
        ),
    ];
    for (text, needle) in cases {
        let doc = YamlLoader::load_from_str(text).unwrap().remove(0);
        let err = std::panic::catch_unwind(|| check_gitlab_template("case", &doc))
            .expect_err("a broken template must fail the check");
        let msg = err
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        assert!(msg.contains(needle), "{needle}: {msg}");
    }
    // And the same job spelt right passes.
    let good =
        "stages: [t]\nj:\n  stage: t\n  script:\n    - runner matrix m.toml --fail-on regression\n";
    let doc = YamlLoader::load_from_str(good).unwrap().remove(0);
    assert_eq!(check_gitlab_template("good", &doc), 1);
}

/// Runs actionlint (with shellcheck for the `run:` scripts) on `files` with the project's
/// actionlint settings; returns its findings, empty when there are none. Panics when either
/// tool is missing: a lint that silently does not run is no lint (scripts/setup-host installs
/// both).
fn actionlint(files: &[PathBuf]) -> String {
    let shellcheck = std::process::Command::new("shellcheck")
        .arg("--version")
        .output();
    assert!(
        shellcheck.is_ok_and(|o| o.status.success()),
        "shellcheck is not installed: run scripts/setup-host"
    );
    let out = std::process::Command::new("actionlint")
        .arg("-no-color")
        .arg("-shellcheck")
        .arg("shellcheck")
        .arg("-config-file")
        .arg(workspace_root().join("ci-templates/actionlint.yaml"))
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("actionlint is not installed ({e}): run scripts/setup-host"));
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Exit 1 means findings; anything else (2, 3: bad flags or config) is a broken lint.
    match out.status.code() {
        Some(0) => assert!(findings.trim().is_empty(), "{findings}"),
        Some(1) => assert!(!findings.trim().is_empty()),
        other => panic!("actionlint failed to run ({other:?}):\n{findings}"),
    }
    findings
}

#[test]
fn actionlint_finds_nothing_in_the_templates() {
    let files: Vec<PathBuf> = templates().into_iter().map(|(p, _)| p).collect();
    let findings = actionlint(&files);
    assert!(findings.is_empty(), "actionlint:\n{findings}");
}

#[test]
fn actionlint_catches_an_outdated_pin_and_a_script_bug() {
    // The lint above can fail: the nightly template with the checkout pin it had before
    // (node20, which GitHub removed) and an unquoted variable in a script.
    let dir = tempfile::tempdir().unwrap();
    let original =
        std::fs::read_to_string(workspace_root().join("ci-templates/github/nightly-matrix.yml"))
            .unwrap();
    let old = original
        .replacen("actions/checkout@v7", "actions/checkout@v4", 1)
        .replacen("run: |\n", "run: |\n          ls $RUNNER_CACHE_DIR\n", 1);
    assert_ne!(old, original);
    let file = dir.path().join("old.yml");
    std::fs::write(&file, old).unwrap();
    let findings = actionlint(&[file]);
    assert!(
        findings.contains("actions/checkout@v4") && findings.contains("node20"),
        "{findings}"
    );
    assert!(findings.contains("SC2086"), "{findings}");
}

#[test]
fn the_nightly_templates_fan_out_in_shards_and_merge_them_in_a_final_job() {
    // GitLab: `parallel: N` shards, numbered by GitLab, and a report job after all of them.
    let (_, gl) = gitlab_templates()
        .into_iter()
        .find(|(p, _)| p.ends_with("nightly-matrix.gitlab-ci.yml"))
        .expect("the GitLab nightly template");
    let shards = &gl["nightly-matrix"];
    assert!(shards["parallel"].as_i64().is_some_and(|n| n >= 1));
    let script = shards["script"][0].as_str().unwrap();
    assert!(
        script.contains("--shard \"$CI_NODE_INDEX/$CI_NODE_TOTAL\"")
            && script.contains("--out \"matrix-shards/$CI_NODE_INDEX\""),
        "{script}"
    );
    assert_eq!(
        shards["cache"]["policy"].as_str(),
        Some("pull"),
        "only the report saves the history"
    );
    assert_eq!(
        shards["artifacts"]["paths"][0].as_str(),
        Some("matrix-shards/")
    );
    let report = &gl["nightly-matrix-report"];
    assert_eq!(report["needs"][0]["job"].as_str(), Some("nightly-matrix"));
    for rule in report["rules"].as_vec().unwrap() {
        assert_eq!(
            rule["when"].as_str(),
            Some("always"),
            "merge after a failed shard too"
        );
    }
    assert_eq!(report["cache"]["when"].as_str(), Some("always"));
    let merge = report["script"][0].as_str().unwrap();
    assert!(
        merge.starts_with("runner matrix merge") && merge.ends_with(" matrix-shards/*"),
        "{merge}"
    );
    assert_eq!(
        report["artifacts"]["reports"]["junit"].as_str(),
        Some("matrix-report/junit.xml")
    );

    // GitHub: a matrix of shards 1..=N, N taken from the matrix itself, and a report job.
    let (_, gh) = templates()
        .into_iter()
        .find(|(p, _)| p.ends_with("nightly-matrix.yml"))
        .expect("the GitHub nightly template");
    let job = &gh["jobs"]["shard"];
    let numbers: Vec<i64> = job["strategy"]["matrix"]["shard"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|n| n.as_i64().unwrap())
        .collect();
    assert_eq!(
        numbers,
        (1..=numbers.len() as i64).collect::<Vec<_>>(),
        "shards 1..=N"
    );
    assert_eq!(job["strategy"]["fail-fast"].as_bool(), Some(false));
    assert_eq!(
        job["env"]["SHARDS"].as_str(),
        Some("${{ strategy.job-total }}")
    );
    let steps = job["steps"].as_vec().unwrap();
    assert!(steps.iter().any(|s| s["run"]
        .as_str()
        .is_some_and(|r| r.contains("--shard \"$SHARD/$SHARDS\"")
            && r.contains("--out \"matrix-shard-$SHARD\""))));
    let upload = steps
        .iter()
        .find(|s| {
            s["uses"]
                .as_str()
                .is_some_and(|u| u.starts_with("actions/upload-artifact@"))
        })
        .expect("each shard uploads its directory");
    assert_eq!(upload["if"].as_str(), Some("always()"));
    assert_eq!(
        upload["with"]["name"].as_str(),
        Some("matrix-shard-${{ matrix.shard }}")
    );
    let report = &gh["jobs"]["report"];
    assert_eq!(report["needs"].as_str(), Some("shard"));
    assert_eq!(report["if"].as_str(), Some("always()"));
    let steps = report["steps"].as_vec().unwrap();
    let download = steps
        .iter()
        .find(|s| {
            s["uses"]
                .as_str()
                .is_some_and(|u| u.starts_with("actions/download-artifact@"))
        })
        .expect("the report fetches the shards");
    assert_eq!(download["with"]["pattern"].as_str(), Some("matrix-shard-*"));
    assert_eq!(download["with"]["path"].as_str(), Some("shards"));
    assert!(steps.iter().any(|s| s["run"].as_str().is_some_and(|r| r
        .starts_with("runner matrix merge")
        && r.trim_end().ends_with(" shards/*"))));
    assert!(steps.iter().any(|s| s["uses"]
        .as_str()
        .is_some_and(|u| u.starts_with("actions/cache/save@"))));
}
