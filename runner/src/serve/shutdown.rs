//! The service's two ways to stop, as gitlab-runner has them: *drain* (SIGQUIT — take no new
//! work, finish what runs) and *abort* (SIGTERM/SIGINT — cancel running jobs, report them,
//! clean up). Abort implies drain. Services hold a `Shutdown`; `commands::serve` holds the
//! controller.

use tokio::sync::watch;

/// The controlling side, owned by the signal handler.
#[derive(Debug)]
pub struct ShutdownController {
    drain: watch::Sender<bool>,
    abort: watch::Sender<bool>,
}

/// The observing side, cloned into every service and job.
#[derive(Debug, Clone)]
pub struct Shutdown {
    drain: watch::Receiver<bool>,
    abort: watch::Receiver<bool>,
}

impl ShutdownController {
    pub fn new() -> (ShutdownController, Shutdown) {
        let (drain_tx, drain_rx) = watch::channel(false);
        let (abort_tx, abort_rx) = watch::channel(false);
        (
            ShutdownController {
                drain: drain_tx,
                abort: abort_tx,
            },
            Shutdown {
                drain: drain_rx,
                abort: abort_rx,
            },
        )
    }

    /// Stop taking new work.
    pub fn drain(&self) {
        self.drain.send_replace(true);
    }

    /// Stop taking new work and cancel what runs.
    pub fn abort(&self) {
        self.drain.send_replace(true);
        self.abort.send_replace(true);
    }
}

impl Shutdown {
    /// True once no new work may be taken.
    pub fn is_draining(&self) -> bool {
        *self.drain.borrow()
    }

    /// Resolves when draining starts (at once if it has).
    pub async fn draining(&self) {
        let mut rx = self.drain.clone();
        // An error means the controller is gone: nobody can stop us any more, so wait forever.
        if rx.wait_for(|d| *d).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves when aborting starts (at once if it has).
    pub async fn aborting(&self) {
        let mut rx = self.abort.clone();
        if rx.wait_for(|a| *a).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// A receiver that turns true on abort: the shape `execute::run_suite` takes as `cancel`.
    pub fn abort_receiver(&self) -> watch::Receiver<bool> {
        self.abort.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn abort_implies_drain() {
        let (ctl, sd) = ShutdownController::new();
        assert!(!sd.is_draining() && !*sd.abort_receiver().borrow());
        ctl.abort();
        sd.draining().await;
        sd.aborting().await;
        assert!(sd.is_draining() && *sd.abort_receiver().borrow());
    }

    #[tokio::test]
    async fn drain_does_not_abort() {
        let (ctl, sd) = ShutdownController::new();
        ctl.drain();
        sd.draining().await;
        assert!(!*sd.abort_receiver().borrow());
    }
}
