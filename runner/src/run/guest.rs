//! The seam between the executor's step loop and the machine it drives: the few operations
//! the loop needs. The engine's `Vm` implements it here (an adapter over `run_stoppable`
//! and `transfer`); the executor's unit tests implement it with a scripted fake, so that
//! `when`, `allow_failure`, interrupts and a dying guest are tested without booting a VM.

use std::path::PathBuf;
use std::time::Duration;

use engine::vm::{CommandEnd, GuestCommand, Vm, VmError};
use tokio::sync::watch;

use crate::events::GuestReport;
use crate::outcome::Outcome;
use crate::run::plan::{SuitePlan, GUEST_WORKSPACE};
use crate::run::transfer;
use crate::run::transfer::write_files;

/// A booted guest as the step loop sees it.
pub(crate) trait Guest {
    /// Puts the workspace archive (if any) and the plan's files into the guest.
    async fn prepare(&mut self, plan: &SuitePlan, archive: Option<Vec<u8>>) -> Result<(), Outcome>;

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

    /// Brings back the plan's JUnit reports and artifacts.
    async fn collect_results(
        &mut self,
        plan: &SuitePlan,
        reports: &mut Vec<GuestReport>,
        artifacts: &mut Vec<PathBuf>,
    ) -> Outcome;
}

impl Guest for Vm {
    async fn prepare(&mut self, plan: &SuitePlan, archive: Option<Vec<u8>>) -> Result<(), Outcome> {
        if let Some(archive) = archive {
            transfer::copy_in(self, &archive).await?;
        }
        write_files(self, &plan.files).await
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

    async fn collect_results(
        &mut self,
        plan: &SuitePlan,
        reports: &mut Vec<GuestReport>,
        artifacts: &mut Vec<PathBuf>,
    ) -> Outcome {
        transfer::collect_results(plan, self, reports, artifacts).await
    }
}
