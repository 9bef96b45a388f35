//! `runner test`: plan (suite file or a single command), run each suite × arch in a fresh
//! VM, report to the console and JUnit, and turn the outcome into the exit code.

use std::path::PathBuf;
use std::time::Duration;

use engine::image::InvalidImageName;
use engine::size::Memory;
use engine::Arch;
use tokio::sync::watch;

use crate::cli::TestArgs;
use crate::events::Reporters;
use crate::exit;
use crate::net::{self, Allowlist, HostRule, NetworkMode};
use crate::outcome::Outcome;
use crate::report::console::{Console, Status};
use crate::report::junit::JunitReporter;
use crate::run::execute::{run_suite, RunSettings};
use crate::run::plan::{self, Overrides, SuitePlan};
use crate::suite::{self, SuiteFile};

/// A bad input found before anything ran: message and exit code.
struct Refusal(String, i32);

fn config(msg: impl Into<String>) -> Refusal {
    Refusal(msg.into(), exit::CONFIG)
}

fn parse_arches(names: &[String]) -> Result<Vec<Arch>, Refusal> {
    names
        .iter()
        .map(|n| n.trim().parse::<Arch>().map_err(|e| config(e.to_string())))
        .collect()
}

fn overrides(args: &TestArgs) -> Result<Overrides, Refusal> {
    let timeout = args
        .timeout
        .as_deref()
        .map(|t| match humantime::parse_duration(t) {
            Ok(d) if d > Duration::ZERO => Ok(d),
            _ => Err(Refusal(
                format!("--timeout '{t}' is not a duration like 90s or 10m"),
                exit::USAGE,
            )),
        })
        .transpose()?;
    let memory_mib = args
        .memory
        .as_deref()
        .map(|m| match Memory::parse(m) {
            Ok(m) => Ok(m.mib()),
            Err(e) => Err(Refusal(format!("--memory '{m}': {e}"), exit::USAGE)),
        })
        .transpose()?;
    if let Some(c) = args.cpus {
        if !(1..=64).contains(&c) {
            return Err(Refusal(
                format!("--cpus {c} must be between 1 and 64"),
                exit::USAGE,
            ));
        }
    }
    // `--image ""` is "the default", so CI templates can pass an optional input through.
    let image = args
        .image
        .as_deref()
        .filter(|i| !i.is_empty())
        .map(|i| {
            i.parse()
                .map_err(|e: InvalidImageName| Refusal(format!("--image: {e}"), exit::USAGE))
        })
        .transpose()?;
    let network = args
        .network
        .as_deref()
        .map(|n| {
            n.parse::<NetworkMode>()
                .map_err(|e| Refusal(format!("--network: {e}"), exit::USAGE))
        })
        .transpose()?;
    Ok(Overrides {
        image,
        // The user's own machine: the project's images/NAME.toml may be built here.
        repository_recipes: true,
        timeout,
        cpus: args.cpus,
        memory_mib,
        out: args.out.clone(),
        mode: args.mode,
        keep_failed: args.keep_failed,
        network,
    })
}

/// The network of each plan within the user's `--network` (the local ceiling: runner.toml
/// alone cannot open the network on the user's machine), with the `--allow-host` list.
fn grant_network(args: &TestArgs, ov: &Overrides, plans: &mut [SuitePlan]) -> Result<(), Refusal> {
    let allow = if args.allow_hosts.is_empty() {
        None
    } else {
        let rules = args
            .allow_hosts
            .iter()
            .map(|h| {
                h.parse::<HostRule>()
                    .map_err(|e| Refusal(format!("--allow-host: {e}"), exit::USAGE))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Some(Allowlist::new(rules))
    };
    let ceiling = ov.network.unwrap_or_default();
    for plan in plans {
        net::check(
            &format!("suite '{}'", plan.id.suite),
            plan.network.mode,
            ceiling,
            "--network",
            "pass --network with the mode the suite needs to allow it",
        )
        .map_err(|e| config(e.to_string()))?;
        plan.network.allow = allow.clone();
    }
    Ok(())
}

fn plans(args: &TestArgs) -> Result<Vec<SuitePlan>, Refusal> {
    let ov = overrides(args)?;
    let mut plans = unchecked_plans(args, &ov)?;
    grant_network(args, &ov, &mut plans)?;
    Ok(plans)
}

fn unchecked_plans(args: &TestArgs, ov: &Overrides) -> Result<Vec<SuitePlan>, Refusal> {
    if !args.command.is_empty() {
        let arches = parse_arches(&args.arch)?;
        if arches.is_empty() {
            return Err(Refusal(
                "--arch is required with a command (e.g. --arch riscv64)".into(),
                exit::USAGE,
            ));
        }
        if let Some(ws) = &args.workspace {
            if !ws.is_dir() {
                return Err(config(format!(
                    "--workspace {} is not a directory",
                    ws.display()
                )));
            }
        }
        return Ok(arches
            .into_iter()
            .map(|a| plan::plan_command(args.command.clone(), a, args.workspace.clone(), ov))
            .collect());
    }
    let path = args
        .file
        .clone()
        .unwrap_or_else(|| PathBuf::from(suite::SUITE_FILE_NAME));
    if !path.exists() {
        return Err(config(format!(
            "no {} here: give a command after `--` (runner test --arch riscv64 -- uname -a) or create a suite file (see examples/shell-suite)",
            path.display()
        )));
    }
    let file = SuiteFile::load(&path).map_err(|e| config(e.to_string()))?;
    let arches = if args.arch.is_empty() {
        file.defaults.arch.clone()
    } else {
        parse_arches(&args.arch)?
    };
    if arches.is_empty() {
        return Err(config(format!(
            "no architecture: pass --arch or set `arch` under [defaults] in {}",
            path.display()
        )));
    }
    plan::plan_suites(&file, &args.suites, &arches, ov).map_err(config)
}

/// Cancels the run on Ctrl-C or SIGTERM.
fn cancel_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        super::interrupted().await;
        let _ = tx.send(true);
    });
    rx
}

pub async fn run(args: TestArgs, settings: RunSettings, status: Status) -> i32 {
    let plans = match plans(&args) {
        Ok(p) => p,
        Err(Refusal(msg, code)) => {
            status.error(&msg);
            return code;
        }
    };
    if let Some(line) = super::swept_line(super::sweep_leftovers(&settings.store)) {
        status.line(&line);
    }
    let command_mode = !args.command.is_empty();
    let mut reporters = Reporters::default();
    reporters.add(Box::new(Console::new(status, command_mode)));
    if let Some(path) = &args.junit {
        reporters.add(Box::new(JunitReporter::new(path.clone())));
    }
    if let Some(path) = &args.summary {
        reporters.add(Box::new(crate::report::summary::MarkdownSummary::new(
            path.clone(),
        )));
    }
    let cancel = cancel_on_signals();
    let mut outcomes = Vec::new();
    for plan in &plans {
        let outcome = run_suite(plan, &settings, &mut reporters, cancel.clone()).await;
        let cancelled = outcome == Outcome::Cancelled;
        outcomes.push(outcome);
        if cancelled {
            break;
        }
    }
    if let Err(e) = reporters.finish() {
        status.error(&format!(
            "cannot write the JUnit report {}: {e}",
            args.junit
                .as_deref()
                .unwrap_or(std::path::Path::new(""))
                .display()
        ));
        return exit::IO;
    }
    let overall = Outcome::combine(&outcomes);
    if let Outcome::InfraError { message, .. } = &overall {
        let mut lines = message.lines();
        status.error(lines.next().unwrap_or_default());
        for l in lines {
            eprintln!("  {l}");
        }
    }
    if command_mode && outcomes.len() == 1 {
        // The command's own status passes through.
        return match &overall {
            // (A program that was not found has been explained by a note already.)
            Outcome::Failed {
                exit_code: Some(code),
                ..
            } => *code,
            Outcome::Failed {
                signal: Some(sig), ..
            } => 128 + sig,
            other => other.exit_code(),
        };
    }
    overall.exit_code()
}
