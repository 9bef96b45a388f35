//! Planning: the suite file and the command line become `SuitePlan`s — everything one
//! suite × architecture run needs, validated, with no decisions left for the executor.

use std::path::PathBuf;
use std::time::Duration;

use engine::image::{ImageName, RepositoryRecipes};
use engine::vm::GuestCommand;
use engine::Arch;

use crate::events::RunId;
use crate::net::{NetworkMode, NetworkPlan};
use crate::suite::Mode;
use crate::suite::{Suite, SuiteFile};

/// The image when neither the CLI nor runner.toml names one: the architecture's own default
/// (Debian 12 where trixie lacks it).
pub fn default_image(arch: Arch) -> ImageName {
    arch.default_image()
        .parse()
        .expect("the table's default image names are valid")
}

/// vCPUs and memory as asked, within what the architecture's machine boots with (malta has
/// one CPU; a 32-bit guest uses at most 3 GiB). Never more than asked.
pub fn fit_machine(arch: Arch, cpus: u32, memory_mib: u32) -> (u32, u32) {
    let info = arch.info();
    (cpus.min(info.max_cpus), memory_mib.min(info.max_memory_mib))
}
/// Default timeout for `runner test -- CMD`.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30 * 60);
pub const DEFAULT_CPUS: u32 = 2;
pub const DEFAULT_MEMORY_MIB: u32 = 1024;
/// Where the project directory appears in the guest.
pub const GUEST_WORKSPACE: &str = "/workspace";
/// Largest artifacts tar taken back from the guest unless the operator says otherwise.
pub const MAX_ARTIFACTS: u64 = 256 << 20;

/// The project directory to copy into the guest.
#[derive(Debug, Clone)]
pub struct WorkspacePlan {
    pub root: PathBuf,
    pub exclude: Vec<String>,
    pub max_size: u64,
}

/// When a step runs, given how the steps before it went (GitLab's `when`). A suite file's
/// steps are all `OnSuccess`: the first failure ends the suite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StepWhen {
    /// Only while everything before it passed.
    #[default]
    OnSuccess,
    /// Only after something failed, timed out or was cancelled gracefully.
    OnFailure,
    /// In any case (e.g. GitLab's after_script).
    Always,
}

impl StepWhen {
    /// Whether a step with this `when` runs when the steps before it `succeeded` (or not).
    pub fn runs(self, succeeded: bool) -> bool {
        match self {
            StepWhen::OnSuccess => succeeded,
            StepWhen::OnFailure => !succeeded,
            StepWhen::Always => true,
        }
    }
}

/// One step to run in the guest.
#[derive(Debug, Clone)]
pub struct StepPlan {
    pub name: String,
    pub command: GuestCommand,
    /// For `OnSuccess` steps also capped by what is left of the suite's timeout; steps that
    /// run after a failure (`OnFailure`, `Always`) have only their own, so that a cleanup step
    /// still runs after the suite timed out.
    pub timeout: Duration,
    pub env: Vec<(String, String)>,
    /// A failure (or timeout) of this step does not fail the suite.
    pub allow_failure: bool,
    pub when: StepWhen,
}

/// A file written into the guest after boot, before the first step (e.g. GitLab's file
/// variables).
#[derive(Debug, Clone)]
pub struct GuestFile {
    /// Absolute path in the guest; parent directories are created.
    pub path: String,
    pub contents: Vec<u8>,
}

/// One suite on one architecture.
#[derive(Debug, Clone)]
pub struct SuitePlan {
    pub id: RunId,
    pub image: ImageName,
    /// Whether the repository's own `images/NAME.toml` may be built (see
    /// [`Overrides::repository_recipes`]).
    pub repository_recipes: RepositoryRecipes,
    pub workspace: Option<WorkspacePlan>,
    pub host_setup: Vec<String>,
    pub steps: Vec<StepPlan>,
    /// Deadline for the whole suite: boot, copy, steps, results.
    pub timeout: Duration,
    pub junit: Vec<String>,
    pub artifacts: Vec<String>,
    /// Also bring back the workspace's files that git does not track (GitLab's
    /// `untracked: true`): every file outside `.git` not listed in this guest file (the
    /// tracked paths, one a line, written by `files`). Dropped, with a note beside
    /// `out_dir` ([`crate::run::transfer::untracked_note`]), when they would take the
    /// artifacts archive over `max_artifacts`.
    pub untracked: Option<String>,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Where artifacts of this suite × arch are copied back to.
    pub out_dir: PathBuf,
    /// Files to write into the guest before the first step.
    pub files: Vec<GuestFile>,
    /// Largest artifacts tar taken back from the guest.
    pub max_artifacts: u64,
    /// Deadline for building the base image if it is not cached; `None`: the engine's own
    /// step deadlines only (`runner test`, where the user waits for it). `runner serve` sets
    /// the operator's `image_build_timeout`: the build runs before the suite deadline, holding
    /// a VM slot.
    pub image_build_timeout: Option<Duration>,
    /// A VM, or qemu-user on the host's kernel.
    pub mode: Mode,
    /// Save the VM into `out_dir/failed-vm/` when a step fails (`runner test --keep-failed`,
    /// a suite's `keep_failed`); the snapshot holds the job's secrets, so never by default.
    pub keep_failed: bool,
    /// The guest's network (`none` unless asked for and allowed, see `crate::net`).
    pub network: NetworkPlan,
}

impl SuitePlan {
    /// The longest a run of this plan may take: the suite timeout, plus the own timeouts of
    /// the steps that may run after it passed (they are not cut short by it), plus time to
    /// bring results back after those.
    /// Saturates instead of overflowing (a sum of durations from a payload can).
    pub fn hard_deadline(&self) -> Duration {
        let cleanup = self
            .steps
            .iter()
            .filter(|s| s.when != StepWhen::OnSuccess)
            .fold(Duration::ZERO, |sum, s| sum.saturating_add(s.timeout));
        if cleanup.is_zero() {
            self.timeout
        } else {
            self.timeout
                .saturating_add(cleanup)
                .saturating_add(CLEANUP_RESULTS_ALLOWANCE)
        }
    }
}

/// Extra time after cleanup steps for killing the timed-out command and collecting results.
const CLEANUP_RESULTS_ALLOWANCE: Duration = Duration::from_secs(180);

/// Settings from the command line that override the suite file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub image: Option<ImageName>,
    /// Honour the project's own `images/NAME.toml` (next to the suite file; the current
    /// directory for a command). Only `runner test`, `runner matrix` and `runner images` on
    /// the user's own machine set it: a recipe is built on the host, so a service must never
    /// take one from the repository it runs (the default, `false`, refuses them).
    pub repository_recipes: bool,
    pub timeout: Option<Duration>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub out: Option<PathBuf>,
    /// `--mode`, replacing each suite's.
    pub mode: Option<Mode>,
    /// `--keep-failed`: every plan saves a failed step's VM.
    pub keep_failed: bool,
    /// `runner test --network`: the mode for `-- CMD`, and the most a suite may ask for
    /// (checked by the caller, which names the limit).
    pub network: Option<NetworkMode>,
}

/// Plans for `suites` of `file` (all when empty) on `arches`. Suites restricted to other
/// architectures are left out of those.
pub fn plan_suites(
    file: &SuiteFile,
    suite_names: &[String],
    arches: &[Arch],
    ov: &Overrides,
) -> Result<Vec<SuitePlan>, String> {
    let selected: Vec<&Suite> = if suite_names.is_empty() {
        file.suites.iter().collect()
    } else {
        suite_names
            .iter()
            .map(|n| {
                file.suite(n).ok_or_else(|| {
                    let known: Vec<_> = file.suites.iter().map(|s| s.name.as_str()).collect();
                    format!(
                        "{}: no suite named '{n}' (suites: {})",
                        file.path.display(),
                        known.join(", ")
                    )
                })
            })
            .collect::<Result<_, _>>()?
    };
    let repository_recipes = match file.path.parent() {
        Some(p) if ov.repository_recipes && p.as_os_str().is_empty() => {
            RepositoryRecipes::Honoured(PathBuf::from("."))
        }
        Some(p) if ov.repository_recipes => RepositoryRecipes::Honoured(p.to_path_buf()),
        _ => RepositoryRecipes::Refused,
    };
    let out_root = ov
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runner-out"));
    let mut plans = Vec::new();
    for &arch in arches {
        for suite in selected.iter().filter(|s| s.runs_on(arch)) {
            let timeout = ov.timeout.unwrap_or(suite.timeout);
            let (cpus, memory_mib) = fit_machine(
                arch,
                ov.cpus
                    .or(file.defaults.cpus)
                    .unwrap_or(arch.info().default_cpus),
                ov.memory_mib.unwrap_or(file.defaults.memory_mib),
            );
            plans.push(SuitePlan {
                id: RunId {
                    suite: suite.name.clone(),
                    arch,
                },
                image: ov
                    .image
                    .clone()
                    .or_else(|| file.defaults.image.clone())
                    .unwrap_or_else(|| default_image(arch)),
                repository_recipes: repository_recipes.clone(),
                workspace: Some(WorkspacePlan {
                    root: file.workspace.root.clone(),
                    exclude: file.workspace.exclude.clone(),
                    max_size: file.workspace.max_size,
                }),
                host_setup: suite.host_setup.clone(),
                steps: suite
                    .steps
                    .iter()
                    .map(|s| StepPlan {
                        name: s.name.clone(),
                        command: GuestCommand::Script(s.run.clone()),
                        timeout: s.timeout.min(timeout),
                        env: s.env.clone(),
                        allow_failure: s.allow_failure,
                        when: StepWhen::OnSuccess,
                    })
                    .collect(),
                timeout,
                junit: suite.junit.clone(),
                artifacts: suite.artifacts.clone(),
                untracked: None,
                cpus,
                memory_mib,
                out_dir: out_root.join(format!("{}-{arch}", suite.name)),
                files: Vec::new(),
                max_artifacts: MAX_ARTIFACTS,
                image_build_timeout: None,
                mode: ov.mode.unwrap_or(suite.mode),
                keep_failed: ov.keep_failed || suite.keep_failed,
                network: NetworkPlan {
                    mode: suite.network,
                    allow: None,
                },
            });
        }
    }
    if plans.is_empty() {
        let names: Vec<_> = arches.iter().map(|a| a.name()).collect();
        return Err(format!(
            "{}: no suite runs on {}",
            file.path.display(),
            names.join(", ")
        ));
    }
    Ok(plans)
}

/// The plan for `runner test --arch ARCH -- CMD...`.
pub fn plan_command(
    argv: Vec<String>,
    arch: Arch,
    workspace: Option<PathBuf>,
    ov: &Overrides,
) -> SuitePlan {
    let timeout = ov.timeout.unwrap_or(DEFAULT_COMMAND_TIMEOUT);
    let (cpus, memory_mib) = fit_machine(
        arch,
        ov.cpus.unwrap_or(arch.info().default_cpus),
        ov.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
    );
    SuitePlan {
        id: RunId {
            suite: "command".into(),
            arch,
        },
        image: ov.image.clone().unwrap_or_else(|| default_image(arch)),
        repository_recipes: match std::env::current_dir() {
            Ok(dir) if ov.repository_recipes => RepositoryRecipes::Honoured(dir),
            _ => RepositoryRecipes::Refused,
        },
        workspace: workspace.map(|root| WorkspacePlan {
            root,
            exclude: vec![".git".into(), "target".into()],
            max_size: 1 << 30,
        }),
        host_setup: Vec::new(),
        steps: vec![StepPlan {
            name: argv.join(" "),
            command: GuestCommand::Argv(argv),
            timeout,
            env: Vec::new(),
            allow_failure: false,
            when: StepWhen::OnSuccess,
        }],
        timeout,
        junit: Vec::new(),
        artifacts: Vec::new(),
        untracked: None,
        cpus,
        memory_mib,
        out_dir: ov
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("runner-out")),
        files: Vec::new(),
        max_artifacts: MAX_ARTIFACTS,
        image_build_timeout: None,
        mode: ov.mode.unwrap_or_default(),
        keep_failed: ov.keep_failed,
        network: NetworkPlan {
            mode: ov.network.unwrap_or_default(),
            allow: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const FILE: &str = r#"[defaults]
image = "debian-13"
cpus = 2
memory = "1G"
timeout = "10m"
step_timeout = "5m"

[[suite]]
name = "unit"
timeout = "2m"
  [[suite.step]]
  name = "short"
  run = "true"
  timeout = "30s"
  [[suite.step]]
  name = "long"
  run = "true"
  timeout = "1h"

[[suite]]
name = "riscv-only"
arch = ["riscv64"]
  [[suite.step]]
  name = "t"
  run = "true"
"#;

    fn file() -> SuiteFile {
        SuiteFile::parse(Path::new("proj/runner.toml"), FILE).unwrap()
    }

    fn ids(plans: &[SuitePlan]) -> Vec<String> {
        plans
            .iter()
            .map(|p| format!("{}/{}", p.id.suite, p.id.arch))
            .collect()
    }

    #[test]
    fn vm_size_follows_the_architecture() {
        let ov = Overrides::default();
        let size = |arch| {
            let p = plan_command(vec!["true".into()], arch, None, &ov);
            (p.cpus, p.memory_mib, p.image.to_string())
        };
        assert_eq!(size(Arch::Riscv64), (2, 1024, "debian-13".into()));
        // ppc64el resumes only 1-vCPU VMs; malta boots one CPU; mipsel uses 256 MiB.
        assert_eq!(size(Arch::Ppc64el), (1, 1024, "debian-12".into()));
        assert_eq!(size(Arch::Mipsel), (1, 256, "debian-12".into()));
        // Asked for more than the machine has: cut, never raised.
        let big = Overrides {
            cpus: Some(4),
            memory_mib: Some(4096),
            ..Overrides::default()
        };
        let p = plan_command(vec!["true".into()], Arch::Mips64el, None, &big);
        assert_eq!((p.cpus, p.memory_mib), (1, 2048));
        let p = plan_command(vec!["true".into()], Arch::X86_64, None, &big);
        assert_eq!((p.cpus, p.memory_mib), (4, 4096));
    }

    #[test]
    fn suites_times_arches_leaving_out_suites_for_other_arches() {
        let f = file();
        let both = [Arch::Riscv64, Arch::Aarch64];
        // (suite names asked for, arches, expected suite/arch pairs in order)
        let cases: [(&[&str], &[Arch], &[&str]); 4] = [
            // Every suite on every arch it runs on, arch by arch.
            (
                &[],
                &both,
                &["unit/riscv64", "riscv-only/riscv64", "unit/aarch64"],
            ),
            // Only the suites named.
            (&["unit"], &both, &["unit/riscv64", "unit/aarch64"]),
            (&["riscv-only"], &[Arch::Riscv64], &["riscv-only/riscv64"]),
            (&[], &[Arch::X86_64], &["unit/x86_64"]),
        ];
        for (names, arches, want) in cases {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let plans = plan_suites(&f, &names, arches, &Overrides::default()).unwrap();
            assert_eq!(ids(&plans), want, "{names:?} on {arches:?}");
        }
        // An unknown suite names the known ones; a suite on no asked arch is an error.
        let e = plan_suites(&f, &["nope".into()], &both, &Overrides::default()).unwrap_err();
        assert!(
            e.contains("no suite named 'nope' (suites: unit, riscv-only)"),
            "{e}"
        );
        let e = plan_suites(
            &f,
            &["riscv-only".into()],
            &[Arch::X86_64],
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(e.contains("no suite runs on x86_64"), "{e}");
    }

    #[test]
    fn step_timeouts_are_capped_at_the_suite_timeout() {
        let plans = plan_suites(
            &file(),
            &["unit".into()],
            &[Arch::Riscv64],
            &Overrides::default(),
        )
        .unwrap();
        let p = &plans[0];
        assert_eq!(p.timeout, Duration::from_secs(120));
        let steps: Vec<_> = p
            .steps
            .iter()
            .map(|s| (s.name.as_str(), s.timeout))
            .collect();
        // `long` asks for an hour but the suite has two minutes.
        assert_eq!(
            steps,
            [
                ("short", Duration::from_secs(30)),
                ("long", Duration::from_secs(120))
            ]
        );
        // A command-line timeout replaces the suite's, and caps the steps again.
        let ov = Overrides {
            timeout: Some(Duration::from_secs(10)),
            ..Default::default()
        };
        let p = &plan_suites(&file(), &["unit".into()], &[Arch::Riscv64], &ov).unwrap()[0];
        assert_eq!(p.timeout, Duration::from_secs(10));
        assert!(p.steps.iter().all(|s| s.timeout == Duration::from_secs(10)));
    }

    #[test]
    fn overrides_replace_the_files_defaults() {
        let f = file();
        let p = &plan_suites(&f, &[], &[Arch::Riscv64], &Overrides::default()).unwrap()[0];
        // The file's own settings, results under ./runner-out, the project beside the file.
        assert_eq!(
            (p.cpus, p.memory_mib, p.image.as_str()),
            (2, 1024, "debian-13")
        );
        assert_eq!(p.out_dir, Path::new("runner-out/unit-riscv64"));
        assert_eq!(p.repository_recipes, RepositoryRecipes::Refused);
        assert_eq!(p.mode, Mode::System);
        let ov = Overrides {
            image: Some("debian-12".parse().unwrap()),
            repository_recipes: true,
            timeout: None,
            cpus: Some(1),
            memory_mib: Some(512),
            out: Some("elsewhere".into()),
            mode: Some(Mode::User),
            keep_failed: true,
            network: None,
        };
        assert!(!p.keep_failed, "off unless asked for");
        let p = &plan_suites(&f, &[], &[Arch::Riscv64], &ov).unwrap()[0];
        assert_eq!(p.mode, Mode::User);
        assert!(p.keep_failed);
        assert_eq!(
            (p.cpus, p.memory_mib, p.image.as_str()),
            (1, 512, "debian-12")
        );
        assert_eq!(p.out_dir, Path::new("elsewhere/unit-riscv64"));
        assert_eq!(
            p.repository_recipes,
            RepositoryRecipes::Honoured("proj".into())
        );
    }

    #[test]
    fn when_decides_which_steps_run() {
        // (when, suite still succeeding, runs)
        let cases = [
            (StepWhen::OnSuccess, true, true),
            (StepWhen::OnSuccess, false, false),
            (StepWhen::OnFailure, true, false),
            (StepWhen::OnFailure, false, true),
            (StepWhen::Always, true, true),
            (StepWhen::Always, false, true),
        ];
        for (when, ok, runs) in cases {
            assert_eq!(when.runs(ok), runs, "{when:?} after success={ok}");
        }
    }

    /// A repository's own recipes are honoured only when the caller says so: services
    /// build plans with the default overrides and must never build one on their host.
    #[test]
    fn repository_recipes_are_refused_unless_asked_for() {
        let file = SuiteFile::parse(
            std::path::Path::new("/repo/runner.toml"),
            "[[suite]]\nname = \"s\"\n[[suite.step]]\nname = \"a\"\nrun = \"true\"\n",
        )
        .unwrap();
        let plans = plan_suites(&file, &[], &[Arch::Riscv64], &Overrides::default()).unwrap();
        assert_eq!(plans[0].repository_recipes, RepositoryRecipes::Refused);
        let ov = Overrides {
            repository_recipes: true,
            ..Overrides::default()
        };
        let plans = plan_suites(&file, &[], &[Arch::Riscv64], &ov).unwrap();
        assert_eq!(
            plans[0].repository_recipes,
            RepositoryRecipes::Honoured("/repo".into())
        );
        let cmd = plan_command(
            vec!["true".into()],
            Arch::Riscv64,
            None,
            &Overrides::default(),
        );
        assert_eq!(cmd.repository_recipes, RepositoryRecipes::Refused);
    }

    #[test]
    fn cleanup_steps_extend_the_hard_deadline() {
        let mut p = plan_command(
            vec!["true".into()],
            Arch::Riscv64,
            None,
            &Overrides::default(),
        );
        p.timeout = Duration::from_secs(60);
        assert_eq!(p.hard_deadline(), Duration::from_secs(60));
        let mut after = p.steps[0].clone();
        after.when = StepWhen::Always;
        after.timeout = Duration::from_secs(300);
        p.steps.push(after);
        assert_eq!(
            p.hard_deadline(),
            Duration::from_secs(60 + 300) + CLEANUP_RESULTS_ALLOWANCE
        );
        // Timeouts from a payload can be absurd: the sum saturates instead of panicking.
        let mut huge = p.steps[1].clone();
        huge.timeout = Duration::MAX;
        p.steps.push(huge);
        assert_eq!(p.hard_deadline(), Duration::MAX);
    }
}
