//! The example pipeline in ci-templates/gitlab/ cannot rot: its `.emulated` job is turned into
//! job payloads the way GitLab would (global and job variables, one job per `RUNNER_ARCH` of
//! the matrix, script, after_script, JUnit report and artifact paths), handed to a real
//! `runner serve` by the fake GitLab, and run against this repository's own sources — checked
//! out on the host from its git history — in a VM of each architecture.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::fake_gitlab::{job_payload, FakeGitlab};
use e2e::{private_cache, runner_bin, workspace_root};
use serde_json::json;
use yaml_rust2::{Yaml, YamlLoader};

const TOKEN: &str = "glrt-template-test";

fn strings(y: &Yaml) -> Vec<String> {
    match y {
        Yaml::String(s) => vec![s.clone()],
        Yaml::Array(a) => a.iter().flat_map(strings).collect(),
        Yaml::BadValue => Vec::new(),
        other => panic!("expected a string or a list of strings, got {other:?}"),
    }
}

fn variables(y: &Yaml) -> Vec<(String, String)> {
    y.as_hash()
        .map(|h| {
            h.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        other => panic!("variable {k:?}: {other:?}"),
                    };
                    (k.as_str().expect("variable name").to_string(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_example_pipeline_runs_its_suite_on_every_architecture_of_its_matrix() {
    let root = workspace_root();
    let path = root.join("ci-templates/gitlab/.gitlab-ci.yml");
    let text = std::fs::read_to_string(&path).expect("the GitLab template");
    let doc = YamlLoader::load_from_str(&text).expect("YAML").remove(0);
    let base = &doc[".emulated"];
    let test = &doc["test"];
    assert_eq!(test["extends"].as_str(), Some(".emulated"));
    assert!(
        !strings(&base["tags"]).is_empty(),
        "the jobs must be tagged for the runner"
    );
    let arches = strings(&test["parallel"]["matrix"][0]["RUNNER_ARCH"]);
    assert!(arches.len() >= 2, "{arches:?}");
    for a in &arches {
        assert!(
            ["riscv64", "aarch64", "x86_64"].contains(&a.as_str()),
            "{a}"
        );
    }
    let script = strings(&base["script"]);
    let after = strings(&base["after_script"]);
    let mut vars = variables(&doc["variables"]);
    vars.extend(variables(&base["variables"]));
    let junit = strings(&base["artifacts"]["reports"]["junit"]);
    let paths = strings(&base["artifacts"]["paths"]);

    // The sources: this repository at HEAD, cloned on the host like any GitLab project.
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(&root)
        .output()
        .expect("git");
    assert!(head.status.success());
    let sha = String::from_utf8_lossy(&head.stdout).trim().to_string();

    let cache = private_cache();
    let gl = FakeGitlab::start(TOKEN);
    let config = format!(
        "concurrent = 1\ncheck_interval = 1\n[[runners]]\nname = \"emu\"\nurl = \"{}\"\ntoken = \"{TOKEN}\"\narch = \"riscv64\"\nallowed_arches = [{}]\ngit_protocols = [\"file\"]\n",
        gl.url,
        arches.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ")
    );
    let config_path = cache.path().join("serve.toml");
    std::fs::write(&config_path, config).unwrap();
    let log_path: PathBuf = cache.path().join("serve.log");
    let serve = Command::new(runner_bin())
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("RUNNER_CACHE_DIR", cache.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("runner serve");
    // Killed however the test ends (a failed assertion included).
    let _serve = KillOnDrop(serve);

    for (i, arch) in arches.iter().enumerate() {
        let id = 900 + i as u64;
        let mut job_vars: Vec<(&str, &str, bool)> = vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str(), false))
            .collect();
        job_vars.push(("RUNNER_ARCH", arch, false));
        job_vars.push(("GIT_STRATEGY", "clone", false));
        let script: Vec<&str> = script.iter().map(String::as_str).collect();
        let after: Vec<&str> = after.iter().map(String::as_str).collect();
        let mut job = job_payload(id, &script, &after, &job_vars, 1800);
        job["git_info"]["repo_url"] = json!(format!("file://{}", root.display()));
        job["git_info"]["sha"] = json!(sha);
        job["git_info"]["refspecs"] = json!([]);
        job["artifacts"] = json!([
            {"name": "junit", "paths": junit, "when": "always", "artifact_type": "junit", "artifact_format": "gzip"},
            {"name": "artifacts", "paths": paths, "when": "always", "artifact_type": "archive", "artifact_format": "zip"},
        ]);
        gl.enqueue(job);
        let started = Instant::now();
        let j = gl.wait_final(id, Duration::from_secs(300));
        let log = String::from_utf8_lossy(&j.trace).into_owned();
        let fin = j.final_update.clone().unwrap();
        assert_eq!(fin["state"], "success", "{arch}: {fin}\n{log}");
        assert!(log.contains(&format!("$ {}", script[1])), "{log}");
        let junit = j
            .artifacts
            .iter()
            .find(|a| a.query.get("artifact_type").map(String::as_str) == Some("junit"))
            .unwrap_or_else(|| panic!("{arch}: no JUnit upload\n{log}"));
        let mut xml = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::MultiGzDecoder::new(&junit.data[..]),
            &mut xml,
        )
        .unwrap();
        assert!(xml.contains("name=\"arithmetic\""), "{arch}: {xml}");
        eprintln!(
            "figures: template job on {arch}: {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    assert_eq!(gl.violations(), Vec::<String>::new());
}

/// Runs `line` with bash in `dir`; panics with its output if it fails or outlives `deadline`.
fn run_line(line: &str, dir: &std::path::Path, deadline: Duration) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = KillOnDrop(
        Command::new("bash")
            .args(["-ec", line])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("bash"),
    );
    let until = Instant::now() + deadline;
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < until, "`{line}` took over {deadline:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = std::fs::read_to_string(log.path()).unwrap_or_default();
    assert!(status.success(), "`{line}`: {status}\n{out}");
}

/// The cross-compile example: its build job's commands run on this host (whose cross compiler
/// scripts/setup-host installs, so the `apt-get` lines are skipped), its artifact paths are
/// zipped as GitLab would keep them, and its riscv64 job gets that zip as a dependency from
/// the fake GitLab and runs with its own `image:`, variables, script and JUnit report.
#[test]
fn the_cross_compile_pipeline_tests_stage_ones_binary_in_a_riscv64_vm() {
    let root = workspace_root();
    let path = root.join("ci-templates/gitlab/cross-compile.gitlab-ci.yml");
    let text = std::fs::read_to_string(&path).expect("the cross-compile template");
    let doc = YamlLoader::load_from_str(&text).expect("YAML").remove(0);
    let build = &doc["build-riscv64"];
    let test = &doc["test-riscv64"];
    assert_eq!(strings(&test["needs"]), ["build-riscv64"]);

    // Stage 1 on the host, in a clone of this repository at HEAD.
    let clone = tempfile::tempdir().unwrap();
    let src = clone.path().join("repo");
    let status = Command::new("git")
        .args(["clone", "-q", "--no-hardlinks"])
        .arg(&root)
        .arg(&src)
        .status()
        .expect("git clone");
    assert!(status.success());
    for line in strings(&build["script"]) {
        if line.starts_with("apt-get") {
            continue;
        }
        run_line(&line, &src, Duration::from_secs(300));
    }
    let kept = strings(&build["artifacts"]["paths"]);
    let files: Vec<(String, Vec<u8>, u32)> = kept
        .iter()
        .map(|p| {
            use std::os::unix::fs::PermissionsExt;
            let f = src.join(p);
            let mode = std::fs::metadata(&f)
                .unwrap_or_else(|e| panic!("{p}: {e}"))
                .permissions()
                .mode();
            (p.clone(), std::fs::read(&f).unwrap(), mode & 0o777)
        })
        .collect();
    let entries: Vec<(&str, &[u8], u32)> = files
        .iter()
        .map(|(n, d, m)| (n.as_str(), d.as_slice(), *m))
        .collect();
    let zip = e2e::fake_gitlab::zip_of(&entries);

    // Stage 2 through `runner serve`.
    let cache = private_cache();
    let gl = FakeGitlab::start(TOKEN);
    gl.with(|s| {
        s.dependency_artifacts.insert(
            1000,
            e2e::fake_gitlab::DependencyArtifact {
                token: "deptoken-1000".into(),
                zip: zip.clone(),
                ..Default::default()
            },
        )
    });
    let config = format!(
        "concurrent = 1\ncheck_interval = 1\n[[runners]]\nname = \"emu\"\nurl = \"{}\"\ntoken = \"{TOKEN}\"\narch = \"riscv64\"\n",
        gl.url
    );
    let config_path = cache.path().join("serve.toml");
    std::fs::write(&config_path, config).unwrap();
    let serve = Command::new(runner_bin())
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("RUNNER_CACHE_DIR", cache.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(cache.path().join("serve.log")).unwrap())
        .spawn()
        .expect("runner serve");
    let _serve = KillOnDrop(serve);
    let mut vars = variables(&doc["variables"]);
    vars.extend(variables(&test["variables"]));
    let job_vars: Vec<(&str, &str, bool)> = vars
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str(), false))
        .collect();
    let script = strings(&test["script"]);
    let script: Vec<&str> = script.iter().map(String::as_str).collect();
    let mut job = job_payload(1001, &script, &[], &job_vars, 900);
    job["image"] = json!({"name": test["image"].as_str().expect("image:")});
    job["dependencies"] = json!([{"id": 1000, "name": "build-riscv64", "token": "deptoken-1000",
        "artifacts_file": {"filename": "artifacts.zip", "size": zip.len()}}]);
    job["artifacts"] = json!([{"name": "junit", "paths": strings(&test["artifacts"]["reports"]["junit"]),
        "when": "always", "artifact_type": "junit", "artifact_format": "gzip"}]);
    gl.enqueue(job);
    let j = gl.wait_final(1001, Duration::from_secs(300));
    let log = String::from_utf8_lossy(&j.trace).into_owned();
    let fin = j.final_update.clone().unwrap();
    assert_eq!(fin["state"], "success", "{fin}\n{log}");
    assert!(log.contains("Using debian-13 on riscv64"), "{log}");
    let junit = j
        .artifacts
        .iter()
        .find(|a| a.query.get("artifact_type").map(String::as_str) == Some("junit"))
        .unwrap_or_else(|| panic!("no JUnit upload\n{log}"));
    let mut xml = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::MultiGzDecoder::new(&junit.data[..]),
        &mut xml,
    )
    .unwrap();
    // The test that compares the binary's architecture with the guest's ran and passed.
    assert!(xml.contains("built_for_runner_arch"), "{xml}");
    assert!(!xml.contains("<failure"), "{xml}");
    assert_eq!(gl.violations(), Vec::<String>::new());
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
