//! The seam between the executor's step loop and the machine it drives: the few operations
//! the loop needs. The engine's `Vm` implements it here (an adapter over `run_stoppable`
//! and `transfer`); the executor's unit tests implement it with a scripted fake, so that
//! `when`, `allow_failure`, interrupts and a dying guest are tested without booting a VM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use engine::user::UserMachine;
use engine::vm::{CommandEnd, GuestCommand, GuestFault, Vm, VmError};
use tokio::sync::watch;

use crate::events::GuestReport;
use crate::outcome::Outcome;
use crate::run::plan::{SuitePlan, GUEST_WORKSPACE};
use crate::run::transfer;

/// A booted guest as the step loop sees it.
pub(crate) trait Guest {
    /// Puts the plan's workspace (if any; streamed, see `transfer::copy_in`) and files into
    /// the guest.
    async fn prepare(&mut self, plan: &SuitePlan) -> Result<(), Outcome>;

    /// Runs a step's command in the workspace, passing output to `live` as it comes; ends
    /// it at `timeout` (`TimedOut`) or when `stop` turns true (`Stopped`), leaving the
    /// command running in both cases.
    async fn run_step(
        &mut self,
        command: &GuestCommand,
        env: &[(String, String)],
        timeout: Duration,
        stop: &mut watch::Receiver<bool>,
        live: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<CommandEnd, VmError>;

    /// Kills the command a timed-out or stopped step left running.
    async fn stop_command(&mut self) -> Result<(), VmError>;

    /// After a step: the job's limits it hit (processes, memory), one note each. `failed`:
    /// the step did not exit 0 (the memory counters are read only then).
    async fn limits_hit(&mut self, failed: bool) -> Result<Vec<String>, VmError>;

    /// What `e`, an error while a job's step ran, says the job did to its guest (powered it
    /// off, panicked it, killed or starved its agent); `None` for a host-side error.
    fn job_fault(&self, e: &VmError) -> Option<String>;

    /// Saves the VM as it is into `dir` (a failed step's snapshot), then lets it run on;
    /// returns the snapshot's size on disk.
    async fn save_to(&mut self, dir: &Path) -> Result<u64, VmError>;

    /// Brings back the plan's JUnit reports and artifacts.
    async fn collect_results(
        &mut self,
        plan: &SuitePlan,
        reports: &mut Vec<GuestReport>,
        artifacts: &mut Vec<PathBuf>,
    ) -> Outcome;
}

impl Guest for Vm {
    async fn prepare(&mut self, plan: &SuitePlan) -> Result<(), Outcome> {
        transfer::put_in(self, plan).await?;
        crate::net::guest::bring_up(self, plan.network.mode).await
    }

    async fn run_step(
        &mut self,
        command: &GuestCommand,
        env: &[(String, String)],
        timeout: Duration,
        stop: &mut watch::Receiver<bool>,
        live: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<CommandEnd, VmError> {
        self.run_stoppable(command, GUEST_WORKSPACE, env, timeout, stop, live)
            .await
    }

    async fn stop_command(&mut self) -> Result<(), VmError> {
        Vm::stop_command(self).await
    }

    async fn limits_hit(&mut self, failed: bool) -> Result<Vec<String>, VmError> {
        let hits = self.job_limits_hit(failed).await?;
        Ok(hits.iter().map(ToString::to_string).collect())
    }

    fn job_fault(&self, e: &VmError) -> Option<String> {
        GuestFault::during_job(e, &self.console_tail(40)).map(|f| f.to_string())
    }

    async fn save_to(&mut self, dir: &Path) -> Result<u64, VmError> {
        Vm::save_to(self, dir).await
    }

    async fn collect_results(
        &mut self,
        plan: &SuitePlan,
        reports: &mut Vec<GuestReport>,
        artifacts: &mut Vec<PathBuf>,
    ) -> Outcome {
        transfer::collect_results(plan, self, reports, artifacts).await
    }
}

/// User mode: the same step loop, each command in a fresh sandbox (see `engine::user`).
impl Guest for UserMachine {
    async fn prepare(&mut self, plan: &SuitePlan) -> Result<(), Outcome> {
        transfer::put_in(self, plan).await
    }

    async fn run_step(
        &mut self,
        command: &GuestCommand,
        env: &[(String, String)],
        timeout: Duration,
        stop: &mut watch::Receiver<bool>,
        live: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<CommandEnd, VmError> {
        Ok(self
            .run(command, GUEST_WORKSPACE, env, timeout, stop, live)
            .await?)
    }

    async fn stop_command(&mut self) -> Result<(), VmError> {
        UserMachine::stop_command(self).await;
        Ok(())
    }

    async fn limits_hit(&mut self, _failed: bool) -> Result<Vec<String>, VmError> {
        // The job's cgroup is the host's; its counters are not read yet (README, user mode).
        Ok(Vec::new())
    }

    fn job_fault(&self, _e: &VmError) -> Option<String> {
        // No guest to power off or panic: every error is the host's.
        None
    }

    async fn save_to(&mut self, _dir: &Path) -> Result<u64, VmError> {
        // Never asked (user-mode runs keep nothing); an error rather than an empty snapshot.
        Err(engine::user::UserError::Command {
            command: "save the failed job".into(),
            desc: "user mode has no VM to save".into(),
        }
        .into())
    }

    async fn collect_results(
        &mut self,
        plan: &SuitePlan,
        reports: &mut Vec<GuestReport>,
        artifacts: &mut Vec<PathBuf>,
    ) -> Outcome {
        transfer::collect_results(plan, self, reports, artifacts).await
    }
}
