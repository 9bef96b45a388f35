//! One fakeroot session across several host tools of an image build, so that the build needs
//! no root: mmdebstrap extracts the packages under it (the owners the .debs ask for are
//! recorded, not applied), and `mkfs.ext4 -d` later reads them back from the same session and
//! writes them into the disk image. The session's state lives in a file in the staging
//! directory; files the session never saw (written by runner itself, or by depmod) are
//! reported as root's, which is what they must be in the image.
//!
//! fakeroot's daemon (`faked`) detaches into a session of its own, out of reach of the tool's
//! process-group guard: [`Session`] kills it when dropped (a build cancelled mid-extraction),
//! and [`kill_daemons_under`] when a killed runner's staging directory is swept.

use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::Command;

/// A fakeroot session whose state is kept in `state`.
#[derive(Debug)]
pub struct Session {
    state: PathBuf,
}

impl Session {
    pub fn new(state: PathBuf) -> Self {
        Session { state }
    }

    /// `program` to be run inside the session (its state loaded if it exists, saved after).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("fakeroot");
        if self.state.exists() {
            cmd.arg("-i").arg(&self.state);
        }
        cmd.arg("-s").arg(&self.state).args(["--", program]);
        cmd
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        kill_daemons_naming(&self.state.to_string_lossy());
        let _ = std::fs::remove_file(&self.state);
    }
}

/// Stops the fakeroot daemons of sessions kept under `dir` (a leftover staging directory).
pub fn kill_daemons_under(dir: &Path) {
    kill_daemons_naming(&dir.to_string_lossy());
}

/// SIGKILL to every `faked` whose command line contains `needle` (a random staging path, so
/// only our own daemons). Not SIGTERM: on SIGTERM faked saves its state into the staging
/// directory, and a save landing while a cancelled build removes that directory left a
/// half-removed `.staging-*` behind. Nothing needs the state once its session is dropped.
fn kill_daemons_naming(needle: &str) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        let program = cmdline.split('\0').next().unwrap_or_default();
        if program
            .rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with("faked"))
            && cmdline.contains(needle)
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The daemon a session leaves when its tool is killed dies with the session.
    #[tokio::test]
    async fn dropping_the_session_stops_its_daemon() {
        if std::process::Command::new("fakeroot")
            .arg("true")
            .status()
            .is_err()
        {
            eprintln!("SKIPPED: fakeroot is not installed (scripts/setup-host installs it)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("fakeroot.state");
        let session = Session::new(state.clone());
        let mut cmd = session.command("sleep");
        cmd.arg("300");
        let (child, guard) = crate::child::spawn_in_group(&mut cmd).unwrap();
        let needle = state.to_string_lossy().into_owned();
        let daemon = || {
            std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
                std::fs::read(p.path().join("cmdline"))
                    .map(|c| {
                        let c = String::from_utf8_lossy(&c);
                        c.starts_with("/usr/bin/faked") && c.contains(&needle)
                    })
                    .unwrap_or(false)
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !daemon() {
            assert!(Instant::now() < deadline, "faked never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // What a cancelled build does: the tool's group is killed, then the session dropped.
        drop(guard);
        drop(child);
        drop(session);
        let deadline = Instant::now() + Duration::from_secs(10);
        while daemon() {
            assert!(Instant::now() < deadline, "faked outlived its session");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
